"""Train model A and model B jointly: the masked loss, the train and evaluation steps, `evaluate` and `fit`.

One `tf.GradientTape` covers both models (B alone with `freeze_a`); the loss is
averaged over the valid elements only (DESIGN section 5), which in value order
are exactly the rows the runner emits, so no mask is ever materialised. The
models' weight regularization losses (`kernel_regularizer=...`) are added to
it, as Keras' `Model.fit` adds `model.losses`.

A run is reproducible: every epoch is re-seeded from `(seed, epoch)` (Python,
NumPy and every `SeedGenerator` inside the two models, e.g. dropout) and
visits the samples in `epoch_order(seed, epoch)`, with TensorFlow's
deterministic ops on. A checkpoint is written after every epoch
(`checkpoints.py`), so a killed run resumed with the same settings reaches
exactly the weights of an unbroken one; settings a resume does not give come
from that checkpoint (`resolve_config`). Ctrl-C ends `fit` with
`TrainingInterrupted`, naming the epoch saved. The cross-entropies read B's
outputs as logits or, when B ends in a softmax, as probabilities
(`resolve_from_logits`). Past one device, `distribute.py` replicates the
models and splits each global batch over the replicas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from cascade_cli import distribute
from cascade_cli.checkpoints import (
    CHECKPOINT_DIR,
    Checkpoints,
    Progress,
    check_settings,
    latest_checkpoint,
    prepare_out_dir,
    run_settings,
    save_models,
    saved_settings,
    trained_pair,
)
from cascade_cli.data import epoch_order, split_indices
from cascade_cli.errors import CascadeError, DataError, ModelError, ParameterError
from cascade_cli.keras_internals import flatten_layers, seed_generators
from cascade_cli.models import check_inputs_fit
from cascade_cli.options import (
    CROSSENTROPY_LOSSES,
    LOSSES,
    OPTIMIZERS,
    RunInfo,
    TrainCallbacks,
    TrainConfig,
    check_choice,
)
from cascade_cli.runner import Cascade


# --------------------------------------------------------------------- loss


def _loss_terms(name, *, from_logits=True):
    """Returns `terms(predictions, targets) -> (sum, count)` over the valid elements."""
    check_choice("loss", name, LOSSES)

    def elements(errors):
        return tf.reduce_sum(errors), tf.cast(tf.size(errors), errors.dtype)

    if name == "mse":
        return lambda predictions, targets: elements(tf.square(predictions - tf.cast(targets, predictions.dtype)))
    if name == "mae":
        return lambda predictions, targets: elements(tf.abs(predictions - tf.cast(targets, predictions.dtype)))

    def rows(per_row):
        return tf.reduce_sum(per_row), tf.cast(tf.shape(per_row)[0], per_row.dtype)

    if name == "categorical-crossentropy":
        def crossentropy(predictions, targets):
            targets = tf.cast(targets, predictions.dtype)
            if from_logits:
                return rows(tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=predictions))
            return rows(keras.losses.categorical_crossentropy(targets, predictions, from_logits=False))

        return crossentropy

    def sparse_crossentropy(predictions, targets):
        ids = tf.cast(tf.reshape(targets, [-1]), tf.int64)  # (rows,) or (rows, 1) token ids
        if from_logits:
            return rows(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=ids, logits=predictions))
        return rows(keras.losses.sparse_categorical_crossentropy(ids, predictions, from_logits=False))

    return sparse_crossentropy


def masked_loss(name, *, from_logits=True):
    """Returns the loss `name` averaged over the valid elements only.

    Predictions and targets are flat in value order, so every row is a valid
    `(sample, outer, inner)` step. `mse` and `mae` average over every valid
    element (rows x features); the cross-entropies average over the valid
    rows: `categorical-crossentropy` against one-hot (or soft) targets
    `(total, O)`, `sparse-categorical-crossentropy` against integer token ids
    `(total,)` (or `(total, 1)`). An empty batch gives 0, not NaN.

    Args:
        name: one of `LOSSES`.
        from_logits: for the cross-entropies, whether predictions are logits
            (else probabilities, clipped to `[1e-7, 1 - 1e-7]` as Keras does).

    Returns:
        `loss(predictions (total, O), targets) -> scalar` tensor.

    Raises:
        ParameterError: an unknown loss name.
    """
    terms = _loss_terms(name, from_logits=from_logits)

    def loss(predictions, targets):
        predictions = tf.convert_to_tensor(predictions)
        total, count = terms(predictions, targets)
        return tf.math.divide_no_nan(total, count)

    return loss


def _output_layer(model_b):
    """The layer that computes B's output `y` (its first output), or None when it cannot be told."""
    output = model_b.outputs[0]
    for layer in reversed(model_b.layers):
        try:
            if layer.output is output:
                return layer
        except (AttributeError, ValueError, RuntimeError):  # a layer called more than once
            continue
    return None


def ends_in_softmax(model_b):
    """Whether B's output `y` comes out of a softmax (a layer's `activation="softmax"`, `Softmax` or `Activation`)."""
    layer = _output_layer(model_b)
    if layer is None:
        return False
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None) == "softmax"


def resolve_from_logits(model_b, from_logits, *, loss):
    """How a cross-entropy reads B's outputs: the given `from_logits`, or detected when None.

    Detection: probabilities (False) when B's output layer ends in a softmax,
    logits (True) otherwise.

    Args:
        model_b: the B model.
        from_logits: True, False or None (detect).
        loss: one of `LOSSES`.

    Returns:
        True or False for a cross-entropy loss; None for the other losses.
    """
    if loss not in CROSSENTROPY_LOSSES:
        return None
    if from_logits is not None:
        return bool(from_logits)
    return not ends_in_softmax(model_b)


def regularization_loss(models):
    """Returns the sum of the weight regularization losses of `models`, or None when they have none.

    These are the terms Keras adds to a model's training loss
    (`model.losses`): `regularizer(weight)` for every trainable weight made
    with a regularizer (`kernel_regularizer=keras.regularizers.L2(1e-4)`, ...).

    Args:
        models: Keras models, e.g. `(model_a, model_b)`.

    Returns:
        A scalar `float32` tensor, or None.
    """
    terms = [
        tf.cast(weight.regularizer(weight), tf.float32)
        for model in models
        for weight in model.trainable_weights
        if getattr(weight, "regularizer", None) is not None
    ]
    return tf.add_n(terms) if terms else None


def _check_regularizers(models):
    """Raises `ModelError` for an activity regularizer, a loss training cannot collect."""
    for name, model in zip("AB", models):
        for layer in flatten_layers(model, include_self=True):
            if getattr(layer, "activity_regularizer", None) is not None:
                raise ModelError(
                    f"model {name}: layer '{layer.name}' has an activity_regularizer, which cascade's training "
                    "does not add to the loss (the runner calls the layers inside its loop, or not at all on the "
                    "fast path); expected weight regularizers only (kernel_regularizer, bias_regularizer, ...): "
                    "remove it, or train with an L2 on the weights instead."
                )


# ---------------------------------------------------------------- the steps


def make_optimizer(name, *, learning_rate):
    """Returns a new Keras optimizer `name` (one of `OPTIMIZERS`, Keras' own names) with `learning_rate`.

    Raises:
        ParameterError: an unknown optimizer name.
    """
    check_choice("optimizer", name, OPTIMIZERS)
    return keras.optimizers.get({"class_name": name, "config": {"learning_rate": float(learning_rate)}})


def batch_signature(data):
    """The `TensorSpec`s of one batch of `data`: `inputs (b, Ta, F)`, `steps (b, Ta)`, `targets (rows, O)`."""
    return (
        tf.TensorSpec([None, data.outer_steps, data.features], tf.float32),
        tf.TensorSpec([None, data.outer_steps], tf.int64),
        tf.TensorSpec([None, data.output_size], tf.float32),
    )


def batch_loss(cascade, terms, *, models):
    """Returns the training loss of one batch, the function every train step differentiates.

    `loss(inputs, steps, targets, *, reduce_count=None, replicas=1) -> (sum,
    count, penalty, loss)` runs the cascade with `training=True`; `sum` and
    `count` are the batch's errors and valid elements, `penalty` the models'
    `regularization_loss` (0 without regularizers) and `loss = sum / count +
    penalty / replicas`. On a replica, `reduce_count` all-reduces the count
    (the global count of valid elements) and `replicas` is the number of
    replicas, so that the replicas' losses add up to the global batch's.
    """

    def loss(inputs, steps, targets, *, reduce_count=None, replicas=1):
        values, _ = cascade.run(inputs, steps, training=True)
        total, count = terms(values, tf.cast(targets, values.dtype))
        if reduce_count is not None:
            count = tf.stop_gradient(reduce_count(count))
        mean = tf.math.divide_no_nan(total, count)
        penalty = regularization_loss(models)
        if penalty is None:
            return total, count, tf.zeros((), mean.dtype), mean
        penalty = tf.cast(penalty, mean.dtype)
        return total, count, penalty, mean + penalty / replicas

    return loss


def train_steps(batch_loss, *, signature, variables, optimizer):
    """Returns `(gradients, apply)`, two `tf.function`s for one device.

    `gradients(inputs, steps, targets) -> (sum, count, penalty, grads,
    finite)` differentiates `batch_loss` under one tape; `apply(grads)` takes
    one optimizer step. They are apart so that a non-finite loss or gradient
    never reaches the weights.
    """

    @tf.function(input_signature=signature, reduce_retracing=True)
    def gradients(inputs, steps, targets):
        with tf.GradientTape() as tape:
            total, count, penalty, loss = batch_loss(inputs, steps, targets)
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]
        finite = tf.math.is_finite(loss)
        for grad in grads:
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(grad)))
        return total, count, penalty, grads, finite

    @tf.function(reduce_retracing=True)
    def apply(grads):
        optimizer.apply(grads, variables)

    return gradients, apply


def _evaluation_step(cascade, terms, data):
    """Returns a `tf.function` `(inputs, steps, targets) -> (sum, count)` with `training=False`."""

    @tf.function(input_signature=batch_signature(data), reduce_retracing=True)
    def evaluate(inputs, steps, targets):
        values, _ = cascade.run(inputs, steps, training=False)
        return terms(values, tf.cast(targets, values.dtype))

    return evaluate


def _penalty_now(models):
    """The models' regularization loss at their current weights, as a float, or None without regularizers."""
    penalty = regularization_loss(models)
    return None if penalty is None else float(penalty)


def _loss_over(step, data, indices, *, batch_size, penalty=None):
    """The mean loss over the valid elements of `indices` (plus `penalty`), or None when there are no samples."""
    if len(indices) == 0:
        return None
    total, count = 0.0, 0.0
    for batch in data.batches(indices, batch_size=batch_size):
        batch_total, batch_count = step(batch.inputs, batch.steps.astype(np.int64), batch.targets)
        total += float(batch_total)
        count += float(batch_count)
    loss = total / count if count else 0.0
    return loss if penalty is None else loss + penalty


def evaluate(model_a, model_b, data, *, indices=None, loss="mse", from_logits=None, state="reset",
             state_init="zeros", batch_size=32):
    """Returns the loss of the two models over samples of a training file, as `fit` reports `val_loss`.

    Args:
        model_a: a `keras.Model`, `(batch, Ta, F) -> (batch, Ta, H)`.
        model_b: a step- or sequence-form `keras.Model`.
        data: an open `TrainingData`.
        indices: the samples to score (all when None).
        loss: one of `LOSSES`.
        from_logits: how a cross-entropy reads B's outputs; None detects it
            (`resolve_from_logits`).
        state: the runner's state mode.
        state_init: B's initial state, one of `STATE_INITS`.
        batch_size: samples per call.

    Returns:
        The loss averaged over every valid element of those samples (0.0 when
        they emit nothing) plus the models' regularization loss, or None for
        no samples.
    """
    cascade = Cascade(model_a, model_b, state=state, state_init=state_init)
    _check_fits(cascade, data, loss=loss)
    _check_regularizers((model_a, model_b))
    indices = np.arange(data.n_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    terms = _loss_terms(loss, from_logits=resolve_from_logits(model_b, from_logits, loss=loss))
    step = _evaluation_step(cascade, terms, data)
    return _loss_over(step, data, indices, batch_size=batch_size, penalty=_penalty_now((model_a, model_b)))


# ------------------------------------------------------------ checks, seeds


def _check_fits(cascade, data, *, loss):
    """Raises `DataError` when the training file does not fit the two models (and the loss's targets)."""
    name = f"'{data.path}'"
    check_inputs_fit(cascade.a_spec, (data.n_samples, data.outer_steps, data.features),
                     where=f"inputs in {name} (key 'inputs')")
    emits = cascade.b_spec.output_size
    if loss == "sparse-categorical-crossentropy":
        if data.output_size != 1:
            raise DataError(
                f"targets in {name} (key 'targets') have {data.output_size} values per step: "
                "sparse-categorical-crossentropy expects one integer token id per step, (sum(steps), 1) or "
                f"(N, Ta, L, 1), each in [0, {emits})."
            )
        return
    if data.output_size != emits:
        raise DataError(
            f"targets in {name} (key 'targets') have O={data.output_size} values per step but model B "
            f"emits O={emits}."
        )


def split_warning(n_samples, *, train_samples, val_samples, val_split):
    """The warning a split deserves, or None: fewer than 2 training samples, or no validation sample.

    Args:
        n_samples: the samples in the training file.
        train_samples: how many the split trains on.
        val_samples: how many it holds out.
        val_split: the fraction asked for.

    Returns:
        One sentence naming `val_split`, or None when the split is sensible.
    """
    if n_samples and train_samples < 2:
        return (f"val_split={val_split:g} of {n_samples} samples leaves {train_samples} sample"
                f"{'' if train_samples == 1 else 's'} to train on: lower val_split.")
    if val_split > 0 and val_samples == 0:
        return (f"val_split={val_split:g} of {n_samples} samples holds out no validation sample: val_loss is not "
                "measured; raise val_split, or pass val_split=0.")
    return None


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


def _trained_variables(model_a, model_b, *, freeze_a):
    return list(model_b.trainable_variables if freeze_a else model_a.trainable_variables + model_b.trainable_variables)


# ------------------------------------------------------------------- fit


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (`KeyboardInterrupt`) during `fit`, after nothing half-written was left behind.

    A `KeyboardInterrupt` still, so code that catches that catches this too.

    Attributes:
        epoch: the last epoch saved in a checkpoint (0: none; the run starts
            afresh then).
        epochs: the epoch the run was training up to.
        out_dir: the run's folder, a `Path`.
        models_written: whether `model_a.keras` and `model_b.keras` are a
            complete pair of the run's last epoch.
    """

    def __init__(self, *, epoch, epochs, out_dir, models_written):
        self.epoch, self.epochs, self.out_dir, self.models_written = epoch, epochs, Path(out_dir), models_written
        super().__init__(self.message)

    @property
    def message(self):
        """What was kept and how to go on, in Python names."""
        if self.epoch == 0:
            return f"training was interrupted before its first epoch was saved; nothing was kept in '{self.out_dir}'."
        models = "" if self.models_written else " (no model files yet)"
        return (f"training was interrupted: epoch {self.epoch} of {self.epochs} is saved in "
                f"'{self.out_dir / CHECKPOINT_DIR}'{models}; continue it with resume=True.")


@dataclasses.dataclass
class _Run:
    """Everything one prepared training run holds between epochs."""

    given: tuple  # the models passed to fit
    models: tuple  # the models trained: `given`, or their replicas under a strategy
    distributed: bool
    out_dir: Path
    chief: bool
    config: TrainConfig  # resolved: every setting set
    info: RunInfo
    optimizer: keras.optimizers.Optimizer
    gradients: Callable  # (inputs, steps, targets) -> (sum, count, penalty, grads, finite)
    apply: Callable  # (grads) -> None: one optimizer step
    evaluation: Callable  # (inputs, steps, targets) -> (sum, count), training=False
    epoch_batches: Callable  # (order) -> iterator of (emits, (inputs, steps, targets))
    train_indices: np.ndarray
    val_indices: np.ndarray

    @property
    def weights(self):
        return [*self.models[0].weights, *self.models[1].weights]


class _RunningLoss:
    """An epoch's training loss so far: errors over valid elements, plus the mean penalty of the steps taken."""

    def __init__(self):
        self.total, self.count, self.penalty, self.steps = 0.0, 0.0, 0.0, 0

    def add(self, total, count, penalty):
        self.total += float(total)
        self.count += float(count)
        self.penalty += float(penalty)
        self.steps += 1

    @property
    def value(self):
        data = self.total / self.count if self.count else 0.0
        return data + (self.penalty / self.steps if self.steps else 0.0)


def _not_finite(what, value, *, epoch, batch, checkpoints, done):
    where = f"epoch {epoch}" + ("" if batch is None else f", batch {batch}")
    kept = f"the last good checkpoint (epoch {done}) is in '{checkpoints}'" if done else "no checkpoint was written"
    return CascadeError(
        f"training stopped at {where}: the {what} became {value} (expected a finite number); this epoch "
        f"was not saved and {kept}. Try a lower learning rate."
    )


def resolve_config(config, model_b, *, out_dir):
    """Returns `config` with every setting filled in: from the checkpoint in `out_dir` on resume, else the defaults.

    `from_logits` is resolved against B (`resolve_from_logits`). Nothing is
    written.

    Returns:
        `(resolved, epochs_done)`: the `TrainConfig` and the epochs the
        checkpoint holds (0 for a new run).

    Raises:
        ParameterError: (`resume`) no checkpoint, an unreadable one, or one
            made with other `RESUME_SETTINGS`; (`epochs`) a resumed run asked
            to end at an epoch it has passed, or that it has finished.
    """
    saved = saved_settings(out_dir) if config.resume else {}
    resolved = config.resolved(saved)
    resolved = dataclasses.replace(
        resolved, from_logits=resolve_from_logits(model_b, resolved.from_logits, loss=resolved.loss))
    done = int(saved.get("epochs_done", 0))
    if config.resume:
        wanted = run_settings(resolved, _NoData)
        del wanted["samples"]  # the data are compared once the models are restored
        check_settings(Path(out_dir) / CHECKPOINT_DIR, saved, wanted)
        finished = trained_pair(out_dir)
        if resolved.epochs < done or (resolved.epochs == done and finished and finished.get("epoch") == done):
            raise ParameterError(
                "epochs", f"the run in '{out_dir}' has trained {done} epochs already (its models are those of "
                f"epoch {done}): expected epochs > {done} to train on, received epochs={resolved.epochs}."
            )
    return resolved, done


class _NoData:
    """Stands for the data in `run_settings` when only the settings are compared."""

    n_samples = outer_steps = features = output_size = 0


def _device_text(strategy):
    """Where the run computes: `"GPU (name)"`, `"2 GPUs"` or `"CPU"`."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    if len(gpus) > 1:
        return f"{len(gpus)} GPUs"
    try:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name")
    except (ValueError, RuntimeError):
        name = None
    return f"GPU ({name})" if name else "GPU"


def _run_warnings(config, data, *, train_indices, val_indices, replicas):
    warnings = []
    split = split_warning(data.n_samples, train_samples=len(train_indices), val_samples=len(val_indices),
                          val_split=config.val_split)
    if split:
        warnings.append(split)
    if config.strategy == "mirrored" and replicas == 1:
        warnings.append("strategy='mirrored' found one device, so it trains on 1 replica, as the default "
                        "strategy does; make more logical CPU devices or use more GPUs to mirror.")
    return tuple(warnings)


def _prepare(model_a, model_b, data, *, out_dir, config, strategy, done):
    """Checks the models, the data and the settings, then builds the run; nothing is written before the checks.

    Returns:
        `(run, folder)`: the `_Run` and the locked `RunFolder` (None on a
        non-chief worker of a new run).
    """
    cascade = Cascade(model_a, model_b, state=config.state, state_init=config.state_init)
    _check_fits(cascade, data, loss=config.loss)
    _check_regularizers((model_a, model_b))
    if data.n_samples == 0:
        raise DataError(f"'{data.path}' holds no samples: expected at least one to train on.")
    train_indices, val_indices = split_indices(data.n_samples, val_split=config.val_split, seed=config.seed)
    if config.patience is not None and len(val_indices) == 0:
        raise ParameterError("patience", f"needs a validation set, but val_split={config.val_split} of "
                                         f"{data.n_samples} samples keeps none: raise val_split.")
    if not _trained_variables(model_a, model_b, freeze_a=config.freeze_a):
        raise CascadeError("there is nothing to train: the models have no trainable weights.")
    strategy = distribute.strategy_for(config.strategy, strategy)
    chief = distribute.is_chief(strategy)
    data.check_finite()  # before the out dir exists: bad data leaves nothing behind
    folder = prepare_out_dir(out_dir, resume=config.resume, lock=chief) if chief or config.resume else None
    try:
        run = _build(model_a, model_b, data, cascade, out_dir=Path(out_dir), config=config, strategy=strategy,
                     chief=chief, train_indices=train_indices, val_indices=val_indices, done=done)
    except BaseException:
        if folder is not None:
            folder.__exit__(CascadeError, None, None)
        raise
    return run, folder


def _build(model_a, model_b, data, cascade, *, out_dir, config, strategy, chief, train_indices, val_indices, done):
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    distributed = config.strategy != "default"
    given = (model_a, model_b)
    with strategy.scope():
        if distributed:
            model_a, model_b = distribute.replicate(model_a, name="A"), distribute.replicate(model_b, name="B")
            cascade = Cascade(model_a, model_b, state=config.state, state_init=config.state_init)
        variables = _trained_variables(model_a, model_b, freeze_a=config.freeze_a)
        optimizer = make_optimizer(config.optimizer, learning_rate=config.learning_rate)
        optimizer.build(variables)  # before the first step: a lazily built Adam fails inside strategy.run
    terms = _loss_terms(config.loss, from_logits=config.from_logits)
    loss = batch_loss(cascade, terms, models=(model_a, model_b))
    if distributed:
        spec, epoch_batches = distribute.batches(strategy, data, batch_size=config.batch_size,
                                                 signature=batch_signature(data))
        gradients, apply = distribute.train_steps(strategy, loss, spec=spec, variables=variables,
                                                  optimizer=optimizer)
    else:
        gradients, apply = train_steps(loss, signature=batch_signature(data), variables=variables,
                                       optimizer=optimizer)
        epoch_batches = functools.partial(_default_batches, data, batch_size=config.batch_size)
    replicas = int(strategy.num_replicas_in_sync)
    info = RunInfo(train_samples=len(train_indices), val_samples=len(val_indices), device=_device_text(strategy),
                   replicas=replicas, strategy=config.strategy, epochs=config.epochs, first_epoch=done + 1,
                   learning_rate=float(config.learning_rate), loss=config.loss, from_logits=config.from_logits,
                   resumed=config.resume,
                   warnings=_run_warnings(config, data, train_indices=train_indices, val_indices=val_indices,
                                          replicas=replicas))
    return _Run(given=given, models=(model_a, model_b), distributed=distributed, out_dir=out_dir, chief=chief,
                config=config, info=info, optimizer=optimizer, gradients=gradients, apply=apply,
                evaluation=_evaluation_step(cascade, terms, data), epoch_batches=epoch_batches,
                train_indices=train_indices, val_indices=val_indices)


def _default_batches(data, order, *, batch_size):
    """Yields `(emits, (inputs, steps, targets))` for each batch of `order`, read on the host."""
    for batch in data.batches(order, batch_size=batch_size):
        yield len(batch.targets) > 0, (batch.inputs, batch.steps.astype(np.int64), batch.targets)


def _run_epoch(run, data, epoch, *, callbacks, checkpoints):
    """Trains epoch `epoch` (0-based) and takes its validation loss; returns its history row."""
    config = run.config
    number = epoch + 1
    _reseed(run.models, seed=config.seed, epoch=epoch)
    order = epoch_order(run.train_indices, seed=config.seed, epoch=epoch, shuffle=config.shuffle)
    callbacks.epoch_started(number, epochs=config.epochs,
                            batches=math.ceil(len(run.train_indices) / config.batch_size))
    started = time.perf_counter()
    running = _RunningLoss()
    for batch_number, (emits, batch) in enumerate(run.epoch_batches(order), start=1):
        if emits:  # a batch that emits nothing has nothing to learn from
            total, count, penalty, grads, finite = run.gradients(*batch)
            if not bool(finite):
                loss = float(total) / float(count) + float(penalty)
                what, value = ("training loss", loss) if not math.isfinite(loss) else ("gradient", "non-finite")
                raise _not_finite(what, value, epoch=number, batch=batch_number, checkpoints=checkpoints,
                                  done=epoch)
            run.apply(grads)
            running.add(total, count, penalty)
        callbacks.batch_done(running.value)
    val_loss = _loss_over(run.evaluation, data, run.val_indices, batch_size=config.batch_size,
                          penalty=_penalty_now(run.models))
    if val_loss is not None and not math.isfinite(val_loss):
        raise _not_finite("validation loss", val_loss, epoch=number, batch=None, checkpoints=checkpoints, done=epoch)
    return {"epoch": number, "loss": running.value, "val_loss": val_loss, "seconds": time.perf_counter() - started}


def _finish(run, history):
    """Copies replicas' weights back into the models given; the chief writes the pair and `history.csv` as one."""
    if run.distributed:
        for trained, model in zip(run.models, run.given):
            model.set_weights(trained.get_weights())
    if run.chief:
        save_models(run.given, run.out_dir, history=history)


def _saved_epoch(out_dir):
    latest = latest_checkpoint(Path(out_dir) / CHECKPOINT_DIR)
    return 0 if latest is None else int(latest.rsplit("-", 1)[1])


def fit(model_a, model_b, data, *, out_dir, config, callbacks=None, strategy=None):
    """Trains A and B jointly on a training file and writes the results into `out_dir`.

    Each batch runs the cascade under one `tf.GradientTape`, takes the masked
    loss plus the models' weight regularization losses and one optimizer step
    over both models' trainable weights (B's only with `freeze_a`). After
    every epoch the validation loss is taken over the held-out samples and a
    checkpoint is written; with `patience`, the run stops once the validation
    loss has not improved for that many epochs, and the best weights are the
    ones kept and saved. The models passed in end with the final weights.
    The two models and `history.csv` are written as one pair at the end
    (`checkpoints.save_models`).

    Settings not given (None) come from the checkpoint on resume and from
    `TRAIN_DEFAULTS` otherwise (`resolve_config`). The run holds a lock on
    `out_dir` throughout; a run that fails before its first checkpoint removes
    the folder it created.

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
        strategy: the strategy `distribute.make_strategy(config.strategy)`
            returned, or None to make it here (too late for `multi-worker`,
            which must be made before any other TensorFlow work).

    Returns:
        The history, one dict per epoch (earlier epochs of a resumed run
        included): `{"epoch" (1-based), "loss", "val_loss" (None without a
        validation set), "seconds"}`. Both losses include the regularization
        losses, as Keras' do.

    Raises:
        ParameterError: `out_dir` holds an earlier run (without `resume`) or
            no checkpoint (with it), or is in use by another training run; a
            checkpoint made with other settings or models; a resumed run
            whose `epochs` it has already reached; `patience` without
            validation samples; a strategy that does not match `config.strategy`.
        CascadeError: a loss that is not finite (nothing of that epoch is
            saved), or nothing to train.
        DataError: the training file does not fit the models or holds
            non-finite values; the disk filled up.
        ModelError: the two models do not fit together, use an activity
            regularizer, or cannot be cloned for a distribution strategy.
        TrainingInterrupted: Ctrl-C; it says which epoch is saved.
    """
    callbacks = callbacks or TrainCallbacks()
    config, done = resolve_config(config, model_b, out_dir=out_dir)
    run, folder = _prepare(model_a, model_b, data, out_dir=out_dir, config=config, strategy=strategy, done=done)
    with folder or contextlib.nullcontext():
        try:
            history = _train(run, data, callbacks=callbacks)
        except KeyboardInterrupt as exc:
            if isinstance(exc, TrainingInterrupted):
                raise
            raise TrainingInterrupted(epoch=_saved_epoch(run.out_dir), epochs=config.epochs, out_dir=run.out_dir,
                                      models_written=trained_pair(run.out_dir) is not None) from None
    return history


def _train(run, data, *, callbacks):
    config = run.config
    progress = Progress(run.weights, keep_best=len(run.val_indices) > 0)
    callbacks.run_started(run.info)
    with Checkpoints(run.out_dir, models=run.models, optimizer=run.optimizer, progress=progress,
                     settings=run_settings(config, data), chief=run.chief) as checkpoints:
        history = []
        if config.resume:
            history = checkpoints.restore()
            run.optimizer.learning_rate = float(config.learning_rate)
            callbacks.resumed(epoch=progress.epochs_done)
        checkpoints.start()
        stopped = progress.patience_spent(config.patience)
        for epoch in range(progress.epochs_done, config.epochs if not stopped else 0):
            row = _run_epoch(run, data, epoch, callbacks=callbacks, checkpoints=checkpoints.folder)
            progress.record(row["val_loss"], epoch=row["epoch"], weights=run.weights)
            history.append(row)
            checkpoints.save(history)
            callbacks.epoch_done(dict(row))
            stopped = progress.patience_spent(config.patience)
            if stopped:
                break
    if stopped:
        callbacks.stopped_early(epoch=progress.epochs_done, best_epoch=int(progress.best_epoch.numpy()))
    if config.patience is not None:
        progress.restore_best(run.weights)
    _finish(run, history)
    callbacks.run_finished(list(history))
    return history
