"""Training past one device: the `tf.distribute` strategies, replicated models and distributed batches.

`make_strategy` builds the strategy a `TrainConfig.strategy` names:
`mirrored` (every local GPU, else every logical CPU device) or `multi-worker`
(the cluster in `TF_CONFIG`). Each global batch is the one the `default`
strategy takes, split into contiguous per-replica slices; the step itself
(`step.train_step`, the one step of every run) makes the replicas' gradients
add up to the global batch's.
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from cascade_cli.errors import CascadeError, ModelError, ParameterError
from cascade_cli.options import STRATEGIES, TRAIN_DEFAULTS, check_choice

_TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}'
)


# ------------------------------------------------------------- strategies


def _check_tf_config(raw):
    """Raises unless `raw` (the `TF_CONFIG` variable) names a cluster and a task."""
    if not raw:
        raise ParameterError(
            "strategy",
            "'multi-worker' reads the cluster from the TF_CONFIG environment variable: expected JSON such as "
            f"{_TF_CONFIG_EXAMPLE}, received no TF_CONFIG.",
        )
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not isinstance(value.get("cluster"), dict) or not isinstance(
        value.get("task"), dict
    ):
        raise CascadeError(
            f"TF_CONFIG: expected JSON with a 'cluster' and a 'task' such as {_TF_CONFIG_EXAMPLE}, received {raw!r}."
        )


def make_strategy(name):
    """Returns the `tf.distribute.Strategy` `name`, one of `STRATEGIES` (None: not given, the default one).

    `default` is TensorFlow's one-device strategy; `mirrored` replicates over
    every local GPU, or over every logical CPU device when there is no GPU
    (`tf.config.set_logical_device_configuration` makes several);
    `multi-worker` reads the cluster and this process's task from `TF_CONFIG`.
    TensorFlow sets up a multi-worker strategy only before any other
    TensorFlow work, so make it first in the process, before loading the
    models, and pass it to `fit`.

    Raises:
        ParameterError: an unknown name, no `TF_CONFIG`, or a multi-worker
            strategy asked for after TensorFlow started.
        CascadeError: a malformed `TF_CONFIG`.
    """
    if name is None:
        name = TRAIN_DEFAULTS["strategy"]
    check_choice("strategy", name, STRATEGIES)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[device.name for device in devices])
    _check_tf_config(os.environ.get("TF_CONFIG"))
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as exc:
        raise ParameterError(
            "strategy",
            f"'multi-worker': TensorFlow was already running ({exc}); expected the strategy to be made first in "
            "the process: call make_strategy('multi-worker') before loading the models and pass it to "
            "fit(strategy=...).",
        ) from exc


def strategy_for(name, strategy):
    """Returns the strategy to train under: `strategy`, checked against `name`, or `make_strategy(name)`.

    Raises:
        ParameterError: `strategy` is not of the kind `name` says.
    """
    if strategy is None:
        return make_strategy(name)
    kinds = {"mirrored": tf.distribute.MirroredStrategy, "multi-worker": tf.distribute.MultiWorkerMirroredStrategy}
    if name in kinds:
        fits = isinstance(strategy, kinds[name])
    else:
        fits = not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()
    if not fits:
        raise ParameterError(
            "strategy",
            f"the config says {name!r}: expected a strategy made by make_strategy({name!r}), received "
            f"{type(strategy).__name__}.",
        )
    return strategy


def is_chief(strategy):
    """Whether this process writes the run's files: False only on the non-chief workers of a multi-worker run."""
    return bool(strategy.extended.should_checkpoint)


def replicate(model, *, name):
    """Returns a copy of `model` built in the current strategy scope, holding `model`'s weights.

    Variables belong to the strategy they are created under, and `fit`
    receives models that are already built, so each is cloned from its config
    inside `strategy.scope()` (mirrored variables) and given the same weights.

    Raises:
        ModelError: `model` cannot be rebuilt from its config.
    """
    try:
        copy = keras.models.clone_model(model)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ModelError(
            f"model {name} cannot be rebuilt from its config for a distribution strategy: expected a "
            f"functional or Sequential model (or one with get_config), received {type(model).__name__}: {exc}"
        ) from exc
    weights = model.get_weights()
    if len(copy.weights) != len(weights):
        raise ModelError(
            f"model {name} rebuilt from its config has {len(copy.weights)} weights: expected "
            f"{len(weights)} like the model given."
        )
    copy.set_weights(weights)
    return copy
