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
exactly the weights of an unbroken one. Past one device, `distribute.py`
replicates the models and splits each global batch over the replicas.
"""

from __future__ import annotations

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
    HISTORY_FILE,
    Checkpoints,
    Progress,
    prepare_out_dir,
    run_settings,
    save_models,
    write_history,
)
from cascade_cli.data import epoch_order, split_indices
from cascade_cli.errors import CascadeError, DataError, ModelError, ParameterError
from cascade_cli.keras_internals import flatten_layers, seed_generators
from cascade_cli.models import check_inputs_fit
from cascade_cli.options import LOSSES, OPTIMIZERS, TrainCallbacks, check_choice
from cascade_cli.runner import Cascade


# --------------------------------------------------------------------- loss


def _loss_terms(name):
    """Returns `terms(predictions, targets) -> (sum, count)` over the valid elements."""
    check_choice("loss", name, LOSSES)

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
        ParameterError: an unknown loss name.
    """
    terms = _loss_terms(name)

    def loss(predictions, targets):
        predictions = tf.convert_to_tensor(predictions)
        total, count = terms(predictions, tf.cast(targets, predictions.dtype))
        return tf.math.divide_no_nan(total, count)

    return loss


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


def evaluate(model_a, model_b, data, *, indices=None, loss="mse", state="reset", batch_size=32):
    """Returns the loss of the two models over samples of a training file, as `fit` reports `val_loss`.

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
        they emit nothing) plus the models' regularization loss, or None for
        no samples.
    """
    cascade = Cascade(model_a, model_b, state=state)
    _check_fits(cascade, data)
    _check_regularizers((model_a, model_b))
    indices = np.arange(data.n_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    step = _evaluation_step(cascade, _loss_terms(loss), data)
    return _loss_over(step, data, indices, batch_size=batch_size, penalty=_penalty_now((model_a, model_b)))


# ------------------------------------------------------------ checks, seeds


def _check_fits(cascade, data):
    """Raises `DataError` when the training file does not fit the two models."""
    name = f"'{data.path}'"
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


def _trained_variables(model_a, model_b, *, freeze_a):
    return list(model_b.trainable_variables if freeze_a else model_a.trainable_variables + model_b.trainable_variables)


# ------------------------------------------------------------------- fit


@dataclasses.dataclass
class _Run:
    """Everything one prepared training run holds between epochs."""

    given: tuple  # the models passed to fit
    models: tuple  # the models trained: `given`, or their replicas under a strategy
    distributed: bool
    out_dir: Path
    chief: bool
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


def _prepare(model_a, model_b, data, *, out_dir, config, strategy):
    """Checks the models, the data and the settings, then builds the run; nothing is written before the checks."""
    cascade = Cascade(model_a, model_b, state=config.state)
    _check_fits(cascade, data)
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
    out_dir = prepare_out_dir(out_dir, resume=config.resume) if chief or config.resume else Path(out_dir)

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    distributed = config.strategy != "default"
    given = (model_a, model_b)
    with strategy.scope():
        if distributed:
            model_a, model_b = distribute.replicate(model_a, name="A"), distribute.replicate(model_b, name="B")
            cascade = Cascade(model_a, model_b, state=config.state)
        variables = _trained_variables(model_a, model_b, freeze_a=config.freeze_a)
        optimizer = make_optimizer(config.optimizer, learning_rate=config.learning_rate)
        optimizer.build(variables)  # before the first step: a lazily built Adam fails inside strategy.run
    terms = _loss_terms(config.loss)
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
    return _Run(given=given, models=(model_a, model_b), distributed=distributed, out_dir=out_dir, chief=chief,
                optimizer=optimizer, gradients=gradients, apply=apply,
                evaluation=_evaluation_step(cascade, terms, data), epoch_batches=epoch_batches,
                train_indices=train_indices, val_indices=val_indices)


def _default_batches(data, order, *, batch_size):
    """Yields `(emits, (inputs, steps, targets))` for each batch of `order`, read on the host."""
    for batch in data.batches(order, batch_size=batch_size):
        yield len(batch.targets) > 0, (batch.inputs, batch.steps.astype(np.int64), batch.targets)


def _run_epoch(run, data, epoch, *, config, callbacks, checkpoints):
    """Trains epoch `epoch` (0-based) and takes its validation loss; returns its history row."""
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
    """Copies replicas' weights back into the models given; the chief writes `history.csv` and the models."""
    if run.distributed:
        for trained, model in zip(run.models, run.given):
            model.set_weights(trained.get_weights())
    if run.chief:
        write_history(run.out_dir / HISTORY_FILE, history)
        save_models(run.given, run.out_dir)


def fit(model_a, model_b, data, *, out_dir, config, callbacks=None, strategy=None):
    """Trains A and B jointly on a training file and writes the results into `out_dir`.

    Each batch runs the cascade under one `tf.GradientTape`, takes the masked
    loss plus the models' weight regularization losses and one optimizer step
    over both models' trainable weights (B's only with `freeze_a`). After
    every epoch the validation loss is taken over the held-out samples and a
    checkpoint is written; with `patience`, the run stops once the validation
    loss has not improved for that many epochs, and the best weights are the
    ones kept and saved. The models passed in end with the final weights.

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
            no checkpoint (with it); a checkpoint made with other settings or
            models; `patience` without validation samples; a strategy that
            does not match `config.strategy`.
        CascadeError: a loss that is not finite (nothing of that epoch is
            saved), or nothing to train.
        DataError: the training file does not fit the models or holds
            non-finite values.
        ModelError: the two models do not fit together, use an activity
            regularizer, or cannot be cloned for a distribution strategy.
    """
    callbacks = callbacks or TrainCallbacks()
    run = _prepare(model_a, model_b, data, out_dir=out_dir, config=config, strategy=strategy)
    progress = Progress(run.weights, keep_best=len(run.val_indices) > 0)
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
            row = _run_epoch(run, data, epoch, config=config, callbacks=callbacks, checkpoints=checkpoints.folder)
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
    return history
