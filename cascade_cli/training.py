"""Train model A and model B jointly: the masked loss, the train step, the fit loop, checkpoints.

One `tf.GradientTape` covers both models (B alone with `freeze_a`); the loss is
averaged over the valid elements only (DESIGN section 5), which in value order
are exactly the rows the runner emits, so no mask is ever materialised.

A run is reproducible: every epoch is re-seeded from `(seed, epoch)` (Python,
NumPy and every `SeedGenerator` inside the two models, e.g. dropout) and
visits the samples in `epoch_order(seed, epoch)`, with TensorFlow's
deterministic ops on. A checkpoint is written after every epoch, so a killed
run resumed with the same settings reaches exactly the weights of an unbroken
one.

Layout of `out_dir`: `checkpoints/` (the last few epochs), `history.csv`
(`epoch,loss,val_loss,seconds`, rewritten after every epoch) and, at the end,
`model_a.keras` and `model_b.keras`. Every file is written atomically.

Past one device, `TrainConfig.strategy` picks a `tf.distribute` strategy
(`make_strategy`): `mirrored` (every local GPU, else every logical CPU device)
or `multi-worker` (the cluster in `TF_CONFIG`). Each global batch is the one
the `default` strategy takes, split into contiguous per-replica slices, and
each replica's loss is its sum of errors over the *global* count of valid
elements, so the summed gradient, and the step, do not depend on the number
of replicas. Only the chief writes `out_dir`; the other workers checkpoint into
a temporary folder they remove.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cascade_cli.data import Batch, epoch_order, split_indices
from cascade_cli.keras_internals import seed_generators
from cascade_cli.errors import CascadeError, DataError, ModelError
from cascade_cli.atomic import atomic_output
from cascade_cli.models import check_inputs_fit
from cascade_cli.options import LOSSES, OPTIMIZERS, STRATEGIES, TrainCallbacks, TrainConfig
from cascade_cli.runner import Cascade

HISTORY_FIELDS = ("epoch", "loss", "val_loss", "seconds")
CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 3
MODEL_FILES = ("model_a.keras", "model_b.keras")
HISTORY_FILE = "history.csv"
_RESUME_SETTINGS = TrainConfig.RESUME_SETTINGS
_FLAGS = {
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "learning_rate": "--learning-rate",
    "optimizer": "--optimizer",
    "loss": "--loss",
    "val_split": "--val-split",
    "shuffle": "--shuffle/--no-shuffle",
    "freeze_a": "--freeze-a",
    "state": "--state",
    "seed": "--seed",
    "patience": "--patience",
    "strategy": "--strategy",
}


# --------------------------------------------------------------------- loss


def _loss_terms(name):
    """Returns `terms(predictions, targets) -> (sum, count)` over the valid elements."""
    if name not in LOSSES:
        raise CascadeError(f"loss: expected one of {', '.join(LOSSES)}, received {name!r}.")

    def elements(errors):
        return tf.reduce_sum(errors), tf.cast(tf.size(errors), errors.dtype)

    if name == "mse":
        return lambda predictions, targets: elements(tf.square(predictions - targets))
    if name == "mae":
        return lambda predictions, targets: elements(tf.abs(predictions - targets))

    def crossentropy(predictions, targets):
        per_row = tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=predictions)
        return tf.reduce_sum(per_row), tf.cast(tf.shape(per_row)[0], per_row.dtype)

    return crossentropy


def masked_loss(name):
    """Returns the loss `name` averaged over the valid elements only.

    Predictions and targets are flat in value order, so every row is a valid
    `(sample, outer, inner)` step. `mse` and `mae` average over every valid
    element (rows x features); `categorical-crossentropy` reads predictions as
    logits and averages the softmax cross-entropy over the valid rows. An empty
    batch gives 0, not NaN.

    Args:
        name: one of `LOSSES`.

    Returns:
        `loss(predictions (total, O), targets (total, O)) -> scalar` tensor.

    Raises:
        CascadeError: an unknown loss name.
    """
    terms = _loss_terms(name)

    def loss(predictions, targets):
        predictions = tf.convert_to_tensor(predictions)
        total, count = terms(predictions, tf.cast(targets, predictions.dtype))
        return tf.math.divide_no_nan(total, count)

    return loss


# ---------------------------------------------------------------- the steps


def make_optimizer(name, *, learning_rate):
    """Returns a new Keras optimizer `name` (one of `OPTIMIZERS`) with `learning_rate`."""
    kinds = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    if name not in kinds:
        raise CascadeError(f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, received {name!r}.")
    return kinds[name](learning_rate=float(learning_rate))


def _batch_signature(data):
    return (
        tf.TensorSpec([None, data.outer_steps, data.features], tf.float32),
        tf.TensorSpec([None, data.outer_steps], tf.int64),
        tf.TensorSpec([None, data.output_size], tf.float32),
    )


def _evaluation_step(cascade, terms, data):
    """Returns a `tf.function` `(inputs, steps, targets) -> (sum, count)` with `training=False`."""

    @tf.function(input_signature=_batch_signature(data), reduce_retracing=True)
    def evaluate(inputs, steps, targets):
        values, _ = cascade.run(inputs, steps, training=False)
        return terms(values, tf.cast(targets, values.dtype))

    return evaluate


def _train_steps(cascade, terms, data, *, variables, optimizer):
    """Returns `(gradients, apply)`, two `tf.function`s.

    `gradients(inputs, steps, targets) -> (sum, count, grads, finite)` runs the
    cascade under one tape and differentiates the batch's mean loss;
    `apply(grads)` takes one optimizer step. They are apart so that a
    non-finite loss or gradient never reaches the weights.
    """

    @tf.function(input_signature=_batch_signature(data), reduce_retracing=True)
    def gradients(inputs, steps, targets):
        with tf.GradientTape() as tape:
            values, _ = cascade.run(inputs, steps, training=True)
            total, count = terms(values, tf.cast(targets, values.dtype))
            loss = tf.math.divide_no_nan(total, count)
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]
        finite = tf.math.is_finite(loss)
        for grad in grads:
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(grad)))
        return total, count, grads, finite

    @tf.function(reduce_retracing=True)
    def apply(grads):
        optimizer.apply(grads, variables)

    return gradients, apply


def _loss_over(step, data, indices, *, batch_size):
    """The mean loss over the valid elements of `indices`, or None when there are no samples."""
    if len(indices) == 0:
        return None
    total, count = 0.0, 0.0
    for batch in data.batches(indices, batch_size=batch_size):
        batch_total, batch_count = step(batch.inputs, batch.steps.astype(np.int64), batch.targets)
        total += float(batch_total)
        count += float(batch_count)
    return total / count if count else 0.0


def evaluate(model_a, model_b, data, indices=None, *, loss="mse", state="reset", batch_size=32):
    """Returns the masked loss of the two models over samples of a training file.

    Args:
        model_a: a `keras.Model`, `(batch, Ta, F) -> (batch, Ta, H)`.
        model_b: a step- or sequence-form `keras.Model`.
        data: an open `TrainingData`.
        indices: the samples to score (all when None).
        loss: one of `LOSSES`.
        state: the runner's state mode.
        batch_size: samples per call.

    Returns:
        The loss averaged over every valid element of those samples (0.0 when
        they emit nothing), or None for no samples.
    """
    cascade = Cascade(model_a, model_b, state=state)
    _check_fits(cascade, data)
    indices = np.arange(data.n_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    step = _evaluation_step(cascade, _loss_terms(loss), data)
    return _loss_over(step, data, indices, batch_size=batch_size)


# ------------------------------------------------------------- strategies

_TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}'
)


def _check_tf_config(raw):
    """Raises `CascadeError` unless `raw` (the `TF_CONFIG` variable) names a cluster and a task."""
    if not raw:
        raise CascadeError(
            "--strategy multi-worker reads the cluster from the TF_CONFIG environment variable: expected "
            f"JSON such as {_TF_CONFIG_EXAMPLE}, received no TF_CONFIG."
        )
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not isinstance(value.get("cluster"), dict) or not isinstance(
        value.get("task"), dict
    ):
        raise CascadeError(
            f"TF_CONFIG: expected JSON with a 'cluster' and a 'task' such as {_TF_CONFIG_EXAMPLE}, "
            f"received {raw!r}."
        )


def make_strategy(name):
    """Returns the `tf.distribute.Strategy` `name`, one of `STRATEGIES`.

    `default` is TensorFlow's one-device strategy; `mirrored` replicates over
    every local GPU, or over every logical CPU device when there is no GPU
    (`tf.config.set_logical_device_configuration` makes several);
    `multi-worker` reads the cluster and this process's task from `TF_CONFIG`.
    TensorFlow sets up a multi-worker strategy only before any other
    TensorFlow work, so make it first in the process, before loading the
    models, and pass it to `fit`.

    Raises:
        CascadeError: an unknown name, a missing or malformed `TF_CONFIG`, or
            a multi-worker strategy asked for after TensorFlow started.
    """
    if name not in STRATEGIES:
        raise CascadeError(f"--strategy: expected one of {', '.join(STRATEGIES)}, received {name!r}.")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[device.name for device in devices])
    _check_tf_config(os.environ.get("TF_CONFIG"))
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as exc:
        raise CascadeError(
            f"--strategy multi-worker: TensorFlow was already running ({exc}); expected the strategy to "
            "be made first in the process: call make_strategy('multi-worker') before loading the models "
            "and pass it to fit(strategy=...)."
        ) from exc


def _strategy_for(config, strategy):
    """The strategy `fit` trains under: `strategy`, checked against `config.strategy`, or a new one."""
    if strategy is None:
        return make_strategy(config.strategy)
    kinds = {"mirrored": tf.distribute.MirroredStrategy, "multi-worker": tf.distribute.MultiWorkerMirroredStrategy}
    if config.strategy in kinds:
        fits = isinstance(strategy, kinds[config.strategy])
    else:
        fits = not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()
    if not fits:
        raise CascadeError(
            f"--strategy {config.strategy}: expected a strategy made by make_strategy({config.strategy!r}), "
            f"received {type(strategy).__name__}."
        )
    return strategy


def _replicate(model, *, name):
    """Returns a copy of `model` built in the current strategy scope, holding `model`'s weights.

    Variables belong to the strategy they are created under, and `fit`
    receives models that are already built, so each is cloned from its config
    inside `strategy.scope()` (mirrored variables) and given the same weights.
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


def _distributed_train_steps(strategy, cascade, terms, *, spec, variables, optimizer):
    """Returns `(gradients, apply)` like `_train_steps`, run on every replica of `strategy`.

    Each replica runs the cascade on its slice of the global batch; its loss is
    its sum of errors over the *global* count of valid elements (all-reduced),
    so the replicas' gradients add up to the gradient of the global batch's
    mean loss. `gradients(inputs, steps, targets)` takes per-replica values and
    returns `(global sum, global count, per-replica grads, finite)`, `finite`
    judged on the summed gradients, so every worker decides alike;
    `apply(grads)` lets the optimizer sum the replicas' gradients and step.
    `spec` is the per-replica batch's `element_spec`: with it the step is
    traced once, whatever each replica's batch shape.
    """
    add = tf.distribute.ReduceOp.SUM

    def replica_gradients(inputs, steps, targets):
        context = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            values, _ = cascade.run(inputs, steps, training=True)
            total, count = terms(values, tf.cast(targets, values.dtype))
            count = tf.stop_gradient(context.all_reduce(add, count))
            loss = tf.math.divide_no_nan(total, count)
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]
        total, *summed = context.all_reduce(add, [total, *grads])
        finite = tf.math.is_finite(tf.math.divide_no_nan(total, count))
        for grad in summed:
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(grad)))
        return total, count, grads, finite

    @tf.function(input_signature=spec)
    def gradients(inputs, steps, targets):
        total, count, grads, finite = strategy.run(replica_gradients, args=(inputs, steps, targets))
        local = strategy.experimental_local_results
        return local(total)[0], local(count)[0], grads, local(finite)[0]

    def replica_apply(grads):
        # Arguments of a tf.function carry no device, and a multi-worker all-reduce needs one:
        # tf.identity places each gradient on this replica's device again.
        optimizer.apply([tf.identity(grad) for grad in grads], variables)

    @tf.function(reduce_retracing=True)
    def apply(grads):
        strategy.run(replica_apply, args=(grads,))

    return gradients, apply


def _default_batches(data, order, *, batch_size):
    """Yields `(emits, (inputs, steps, targets))` for each batch of `order`, read on the host."""
    for batch in data.batches(order, batch_size=batch_size):
        yield len(batch.targets) > 0, (batch.inputs, batch.steps.astype(np.int64), batch.targets)


def _read_slice(data, indices):
    """The `Batch` of `indices`, empty (0 samples) when there are none."""
    if len(indices) == 0:
        return Batch(
            inputs=np.zeros((0, data.outer_steps, data.features), np.float32),
            steps=np.zeros((0, data.outer_steps), np.int64),
            targets=np.zeros((0, data.output_size), np.float32),
        )
    return next(data.batches(indices, batch_size=len(indices)))


def _distributed_batches(strategy, data, *, batch_size):
    """Returns `(spec, batches)`: `batches(order)` yields per-replica batches; `spec` is their `element_spec`.

    `batches(order)` yields `(emits, (inputs, steps, targets))` for every
    global batch of `order`, as per-replica values.

    Global batch `k` is `order[k * batch_size:(k + 1) * batch_size]`, the very
    batch the default strategy takes; it is split into one contiguous slice per
    replica (`np.array_split`: any batch size works, and a replica may get 0
    samples). Each input pipeline (one per worker, from
    `distribute_datasets_from_function`) reads only the slices of its own
    replicas, as dense `(b, Ta, F)`, `(b, Ta)` and flat `(rows, O)` tensors, so
    the ragged targets need no padding. `emits` (whether the global batch has
    any target row) comes from the steps every worker holds, so all workers
    skip the same batches.
    """
    signature = _batch_signature(data)

    def dataset(order, context):
        replicas = context.num_replicas_in_sync
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def slices():
            for start in range(0, len(order), batch_size):
                parts = np.array_split(order[start : start + batch_size], replicas)
                for part in parts[first : first + local]:
                    yield tuple(_read_slice(data, part))

        return tf.data.Dataset.from_generator(slices, output_signature=signature)

    def distribute(order):
        return strategy.distribute_datasets_from_function(functools.partial(dataset, order))

    def batches(order):
        for start, batch in zip(range(0, len(order), batch_size), distribute(order)):
            yield bool(data.steps[order[start : start + batch_size]].any()), tuple(batch)

    return tuple(distribute(np.zeros(0, np.int64)).element_spec), batches


# ------------------------------------------------------------ checks, seeds


def _check_fits(cascade, data):
    """Raises `DataError` when the training file does not fit the two models."""
    name = f"'{os.fspath(data.path)}'"
    check_inputs_fit(cascade.a_spec, (data.n_samples, data.outer_steps, data.features),
                     where=f"inputs in {name} (key 'inputs')")
    if data.output_size != cascade.b_spec.output_size:
        raise DataError(
            f"targets in {name} (key 'targets') have O={data.output_size} values per step but model B "
            f"emits O={cascade.b_spec.output_size}."
        )


def _reseed(models, *, seed, epoch):
    """Seeds Python, NumPy and every `SeedGenerator` in `models` from `(seed, epoch)` alone.

    Keras layers draw their randomness (dropout, noise) from their own
    `SeedGenerator`s, so resetting those makes an epoch's random numbers a
    function of `(seed, epoch)`, whatever ran before it. TensorFlow's global
    seed is set once per run instead (`fit`): setting it again would clear
    TensorFlow's kernel cache and re-optimise every function each epoch.
    """
    entropy = np.random.SeedSequence([seed, epoch])
    generators = seed_generators(models)
    values = entropy.generate_state(1 + len(generators)) & 0x7FFFFFFF
    random.seed(int(values[0]))
    np.random.seed(int(values[0]))
    for generator, value in zip(generators, values[1:]):
        generator.state.assign(tf.constant([int(value), 0], dtype=generator.state.dtype))


# ---------------------------------------------------------------- out_dir


def _prepare_out_dir(out_dir, *, resume):
    """Creates `out_dir` if needed; refuses a fresh run over an earlier one."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CascadeError(f"--out-dir '{out_dir}' is a file: expected a folder.")
    checkpoints = out_dir / CHECKPOINT_DIR
    if resume:
        if tf.train.latest_checkpoint(str(checkpoints)) is None:
            raise CascadeError(
                f"--resume: no checkpoint to resume from in '{checkpoints}'; run without --resume "
                "to start training."
            )
        return out_dir
    earlier = [name for name in (CHECKPOINT_DIR, *MODEL_FILES, HISTORY_FILE) if (out_dir / name).exists()]
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        earlier.remove(CHECKPOINT_DIR)
    if earlier:
        raise CascadeError(
            f"--out-dir '{out_dir}' already holds a training run ({', '.join(earlier)}); pass --resume "
            "to continue it, or choose another --out-dir."
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CascadeError(f"--out-dir '{out_dir}' cannot be created: {exc.strerror or exc}.") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise CascadeError(f"--out-dir '{out_dir}' is not writable.")
    return out_dir


def _save_model(model, path):
    """Saves `model` to `path` (a `.keras` file) atomically."""
    with atomic_output(path, overwrite=True, suffix=".keras") as temp:
        model.save(temp)


def write_history(path, history):
    """Writes history rows to `path` as CSV (`epoch,loss,val_loss,seconds`), atomically."""
    with atomic_output(path, overwrite=True) as temp:
        with open(temp, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(HISTORY_FIELDS)
            for row in history:
                writer.writerow(["" if row[key] is None else repr(row[key]) for key in HISTORY_FIELDS])


# ------------------------------------------------------------- checkpoints


class _Progress(tf.Module):
    """What a checkpoint holds besides the models and the optimizer."""

    def __init__(self, weights, *, keep_best):
        super().__init__(name="progress")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.best_val = tf.Variable(math.inf, dtype=tf.float64, trainable=False, name="best_val_loss")
        self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="best_epoch")
        self.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_without_improvement")
        self.settings = tf.Variable("", dtype=tf.string, trainable=False, name="settings")
        self.history = tf.Variable("[]", dtype=tf.string, trainable=False, name="history")
        self.best = [tf.Variable(tf.convert_to_tensor(w), trainable=False, name="best") for w in weights]
        if not keep_best:
            self.best = []

    def keep_best(self, weights):
        """Copies `weights` (the models' current weights) into the best-so-far slots."""
        for best, weight in zip(self.best, weights):
            best.assign(tf.convert_to_tensor(weight))

    def restore_best(self, weights):
        """Puts the best-so-far values back into `weights`."""
        for best, weight in zip(self.best, weights):
            weight.assign(best)


def _settings(config, data):
    """The settings a checkpoint records and a resumed run must repeat, as JSON-ready values."""
    values = {name: getattr(config, name) for name in _RESUME_SETTINGS}
    kinds = {"seed": int, "val_split": float, "shuffle": bool, "batch_size": int, "freeze_a": bool}
    values = {name: kinds.get(name, str)(value) for name, value in values.items()}
    values["samples"] = [int(data.n_samples), int(data.outer_steps), int(data.features), int(data.output_size)]
    return values


def _describe(name, value):
    if name == "samples":
        return f"a training file of (N, Ta, F, O)={tuple(value)}"
    if name == "shuffle":
        return "--shuffle" if value else "--no-shuffle"
    if name == "freeze_a":
        return "--freeze-a" if value else "no --freeze-a"
    return f"{_FLAGS[name]} {value}"


def _check_settings(path, saved, wanted):
    """Raises `CascadeError` when a resumed run's settings differ from its checkpoint's."""
    differ = [name for name in wanted if saved.get(name) != wanted[name]]
    if differ:
        made = ", ".join(_describe(name, saved.get(name)) for name in differ)
        given = ", ".join(_describe(name, wanted[name]) for name in differ)
        raise CascadeError(
            f"--resume: the checkpoints in '{path}' were made with {made}; this run has {given}. "
            "Resume with the same settings, or choose another --out-dir."
        )


def _restore(checkpoint, progress, path, *, wanted):
    """Restores the latest checkpoint in `path` after checking its settings."""
    latest = tf.train.latest_checkpoint(str(path))
    probe = tf.Variable("", dtype=tf.string, trainable=False)
    try:
        tf.train.Checkpoint(progress=tf.train.Checkpoint(settings=probe)).restore(latest).expect_partial()
        saved = json.loads(probe.numpy().decode("utf-8"))
    except (tf.errors.OpError, ValueError, AssertionError) as exc:
        raise CascadeError(f"--resume: checkpoint '{latest}' cannot be read: {exc}") from exc
    _check_settings(path, saved, wanted)
    try:
        checkpoint.restore(latest).assert_existing_objects_matched()
    except (tf.errors.OpError, ValueError, AssertionError) as exc:
        raise CascadeError(
            f"--resume: checkpoint '{latest}' does not fit these models: expected the models the "
            f"run started from; {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    return json.loads(progress.history.numpy().decode("utf-8"))


# ------------------------------------------------------------------- fit


def _not_finite(what, value, *, epoch, batch, checkpoints, done):
    where = f"epoch {epoch}" + ("" if batch is None else f", batch {batch}")
    kept = (
        f"the last good checkpoint (epoch {done}) is in '{checkpoints}'"
        if done
        else "no checkpoint was written"
    )
    return CascadeError(
        f"training stopped at {where}: the {what} became {value} (expected a finite number); this epoch "
        f"was not saved and {kept}. Try a lower --learning-rate."
    )


def fit(model_a, model_b, data, *, out_dir, config, callbacks=None, strategy=None):
    """Trains A and B jointly on a training file and writes the results into `out_dir`.

    Each batch runs the cascade under one `tf.GradientTape`, takes the masked
    loss and one optimizer step over both models' trainable weights (B's only
    with `freeze_a`). After every epoch the validation loss is taken over the
    held-out samples and a checkpoint is written; with `patience`, the run
    stops once the validation loss has not improved for that many epochs, and
    the best weights are the ones kept and saved. The models passed in end with
    the final weights.

    With a `mirrored` or `multi-worker` strategy the models are cloned inside
    `strategy.scope()` (their variables must belong to the strategy), trained
    there, and their weights copied back at the end. Every global batch is the
    one the default strategy takes, split across the replicas, and a step
    means the same on any number of replicas. Every worker checkpoints each
    epoch (the chief into `out_dir`, the others into a temporary folder they
    remove); only the chief writes `history.csv` and the models. Validation
    runs whole on every worker.

    Args:
        model_a: a `keras.Model`, `(batch, Ta, F) -> (batch, Ta, H)`; trained in place.
        model_b: a step- or sequence-form `keras.Model`; trained in place.
        data: an open `TrainingData`.
        out_dir: the folder for `checkpoints/`, `history.csv`, `model_a.keras`
            and `model_b.keras`; created if missing.
        config: a `TrainConfig`.
        callbacks: a `TrainCallbacks` (progress), or None.
        strategy: the strategy `make_strategy(config.strategy)` returned, or
            None to make it here (too late for `multi-worker`, which must be
            made before any other TensorFlow work).

    Returns:
        The history, one dict per epoch (earlier epochs of a resumed run
        included): `{"epoch" (1-based), "loss", "val_loss" (None without a
        validation set), "seconds"}`.

    Raises:
        CascadeError: bad settings; `out_dir` holds an earlier run (without
            `resume`) or no checkpoint (with it); a checkpoint made with other
            settings or models; a loss that is not finite (nothing of that
            epoch is saved); a strategy that does not match `config.strategy`.
        DataError: the training file does not fit the models or holds
            non-finite values.
        ModelError: the two models do not fit together, or cannot be cloned
            for a distribution strategy.
    """
    callbacks = callbacks or TrainCallbacks()
    cascade = Cascade(model_a, model_b, state=config.state)
    _check_fits(cascade, data)
    if data.n_samples == 0:
        raise DataError(f"'{os.fspath(data.path)}' holds no samples: expected at least one to train on.")
    train_indices, val_indices = split_indices(data.n_samples, val_split=config.val_split, seed=config.seed)
    if config.patience is not None and len(val_indices) == 0:
        raise CascadeError(
            f"--patience needs a validation set, but --val-split {config.val_split} of {data.n_samples} "
            "samples keeps none: raise --val-split."
        )
    if not (model_b.trainable_variables if config.freeze_a else
            model_a.trainable_variables + model_b.trainable_variables):
        raise CascadeError("there is nothing to train: the models have no trainable weights.")
    strategy = _strategy_for(config, strategy)
    chief = strategy.extended.should_checkpoint  # False only on the non-chief workers of a multi-worker run
    data.check_finite()  # before the out dir exists: bad data leaves nothing behind
    out_dir = _prepare_out_dir(out_dir, resume=config.resume) if chief or config.resume else Path(out_dir)

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    distributed = config.strategy != "default"
    given = (model_a, model_b)
    with strategy.scope():
        if distributed:
            model_a, model_b = _replicate(model_a, name="A"), _replicate(model_b, name="B")
            cascade = Cascade(model_a, model_b, state=config.state)
        variables = list(model_b.trainable_variables if config.freeze_a else
                         model_a.trainable_variables + model_b.trainable_variables)
        optimizer = make_optimizer(config.optimizer, learning_rate=config.learning_rate)
        optimizer.build(variables)  # before the first step: a lazily built Adam fails inside strategy.run
    terms = _loss_terms(config.loss)
    if distributed:
        spec, epoch_batches = _distributed_batches(strategy, data, batch_size=config.batch_size)
        gradients, apply = _distributed_train_steps(strategy, cascade, terms, spec=spec, variables=variables,
                                                    optimizer=optimizer)
    else:
        gradients, apply = _train_steps(cascade, terms, data, variables=variables, optimizer=optimizer)
        epoch_batches = functools.partial(_default_batches, data, batch_size=config.batch_size)

    weights = list(model_a.weights) + list(model_b.weights)
    progress = _Progress(weights, keep_best=len(val_indices) > 0)
    checkpoint = tf.train.Checkpoint(model_a=model_a, model_b=model_b, optimizer=optimizer, progress=progress)
    checkpoints = out_dir / CHECKPOINT_DIR
    # Every worker saves (a save may need all of them); only the chief's checkpoints are kept.
    scratch = None if chief else Path(tempfile.mkdtemp(prefix="cascade-worker-checkpoints-"))
    try:
        manager = tf.train.CheckpointManager(checkpoint, str(checkpoints if chief else scratch),
                                             max_to_keep=KEEP_CHECKPOINTS)
        settings = _settings(config, data)
        history = []
        if config.resume:
            history = _restore(checkpoint, progress, checkpoints, wanted=settings)
            optimizer.learning_rate = float(config.learning_rate)
            callbacks.resumed(epoch=int(progress.epoch.numpy()))
        progress.settings.assign(json.dumps(settings, sort_keys=True))

        evaluation = _evaluation_step(cascade, terms, data)
        batches = math.ceil(len(train_indices) / config.batch_size)
        models = (model_a, model_b)

        def patience_spent():
            return config.patience is not None and int(progress.wait.numpy()) >= config.patience

        stopped = patience_spent()
        for epoch in range(int(progress.epoch.numpy()), config.epochs if not stopped else 0):
            number = epoch + 1
            _reseed(models, seed=config.seed, epoch=epoch)
            order = epoch_order(train_indices, seed=config.seed, epoch=epoch, shuffle=config.shuffle)
            callbacks.epoch_started(number, epochs=config.epochs, batches=batches)
            started = time.perf_counter()
            total, count = 0.0, 0.0
            for batch_number, (emits, batch) in enumerate(epoch_batches(order), start=1):
                if emits:  # a batch that emits nothing has nothing to learn from
                    batch_total, batch_count, grads, finite = gradients(*batch)
                    if not bool(finite):
                        loss = float(batch_total) / float(batch_count)
                        what = "training loss" if not math.isfinite(loss) else "gradient"
                        value = loss if not math.isfinite(loss) else "non-finite"
                        raise _not_finite(what, value, epoch=number, batch=batch_number, checkpoints=checkpoints,
                                          done=epoch)
                    apply(grads)
                    total += float(batch_total)
                    count += float(batch_count)
                callbacks.batch_done(total / count if count else 0.0)
            val_loss = _loss_over(evaluation, data, val_indices, batch_size=config.batch_size)
            if val_loss is not None and not math.isfinite(val_loss):
                raise _not_finite("validation loss", val_loss, epoch=number, batch=None, checkpoints=checkpoints,
                                  done=epoch)
            row = {"epoch": number, "loss": total / count if count else 0.0, "val_loss": val_loss,
                   "seconds": time.perf_counter() - started}
            if val_loss is not None:
                if val_loss < float(progress.best_val.numpy()):
                    progress.best_val.assign(val_loss)
                    progress.best_epoch.assign(number)
                    progress.wait.assign(0)
                    progress.keep_best(weights)
                else:
                    progress.wait.assign_add(1)
            history.append(row)
            progress.epoch.assign(number)
            progress.history.assign(json.dumps(history))
            manager.save(checkpoint_number=number)
            if chief:
                write_history(out_dir / HISTORY_FILE, history)
            callbacks.epoch_done(dict(row))
            if patience_spent():
                stopped = True
                break
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if stopped:
        callbacks.stopped_early(epoch=int(progress.epoch.numpy()), best_epoch=int(progress.best_epoch.numpy()))
    if config.patience is not None and int(progress.best_epoch.numpy()) > 0:
        progress.restore_best(weights)
    if distributed:
        for trained, model in zip(models, given):
            model.set_weights(trained.get_weights())
    if chief:
        write_history(out_dir / HISTORY_FILE, history)
        for model, name in zip(given, MODEL_FILES):
            _save_model(model, out_dir / name)
    return history
