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
import os
import random
import time
from pathlib import Path
from typing import Callable, NamedTuple

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
    EXPONENTIAL_FINAL_FRACTION,
    LOSSES,
    LR_SCHEDULES,
    METRICS,
    OPTIMIZERS,
    RunInfo,
    SamplingSchedule,
    StopRule,
    TrainCallbacks,
    TrainConfig,
    check_choice,
)
from cascade_cli.runner import Cascade


# --------------------------------------------------------------------- loss


def loss_terms(name, *, from_logits=True):
    """Returns `terms(predictions, targets) -> (sum, count)` over the valid elements (one of `LOSSES`).

    The mean is `sum / count`: `mse` and `mae` count every element, the
    cross-entropies every row. `training` and `CascadeModel` both take their loss from here.
    """
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


def gate_terms(terms, *, elements_per_row, stop_weight=1.0, stop_pos_weight=1.0):
    """The loss terms of a B whose last output column is a stop logit (`TrainConfig.stop_gate`).

    Targets carry the gate's target as their last column (`data.append_gate_targets`).
    `terms` takes the other columns; the gate adds a binary cross-entropy
    per row, `-(stop_pos_weight * z * log(sigmoid(l)) + (1 - z) * log(1 - sigmoid(l)))`,
    so that `sum / count` is `terms`' mean plus `stop_weight` times the
    gate's mean over the valid rows.

    Args:
        terms: `(predictions, targets) -> (sum, count)` of the other columns (`loss_terms`).
        elements_per_row: what `terms` counts per row: `O - 1` for `mse` and `mae`, 1 for the cross-entropies.
        stop_weight, stop_pos_weight: the gate loss's weight and its positives' weight.
    """

    def combined(predictions, targets):
        targets = tf.cast(targets, predictions.dtype)
        total, count = terms(predictions[:, :-1], targets[:, :-1])
        logits, stops = predictions[:, -1], targets[:, -1]
        bce = -(stop_pos_weight * stops * tf.math.log_sigmoid(logits) + (1 - stops) * tf.math.log_sigmoid(-logits))
        return total + (stop_weight * elements_per_row) * tf.reduce_sum(bce), count

    return combined


def without_gate(terms):
    """`terms` (a metric's) over every column but the last, the stop gate's, of predictions and targets."""
    return lambda predictions, targets: terms(predictions[:, :-1], targets[:, :-1])


def _gated_terms(config, terms, metrics, output_size):
    """`(terms, metrics)` of a run: with `stop_gate`, `gate_terms` and the metrics without the gate column."""
    if not config.stop_gate:
        return terms, metrics
    per_row = output_size - 1 if config.loss in ("mse", "mae") else 1
    terms = gate_terms(terms, elements_per_row=per_row, stop_weight=config.stop_weight,
                       stop_pos_weight=config.stop_pos_weight)
    return terms, tuple(without_gate(metric) for metric in metrics)


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
    terms = loss_terms(name, from_logits=from_logits)

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


def check_regularizers(models):
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


@keras.saving.register_keras_serializable(package="cascade_cli")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """`after(step - warmup_steps)`, preceded by `warmup_steps` steps rising linearly to `after(0)`.

    Step `s < warmup_steps` (0-based) takes `(s + 1) / warmup_steps * after(0)`,
    so the first step already moves and step `warmup_steps - 1` takes the full rate.

    Args:
        after: a learning rate (float) or a `LearningRateSchedule`.
        warmup_steps: a positive integer.
    """

    def __init__(self, after, warmup_steps):
        if isinstance(after, dict):
            after = keras.optimizers.schedules.deserialize(after)
        self.after = after
        self.warmup_steps = int(warmup_steps)

    def _after(self, step):
        if isinstance(self.after, keras.optimizers.schedules.LearningRateSchedule):
            return tf.cast(self.after(step), tf.float32)
        return tf.constant(float(self.after), tf.float32)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = float(self.warmup_steps)
        rising = (step + 1.0) / warmup * self._after(tf.zeros((), tf.float32))
        return tf.where(step < warmup, rising, self._after(tf.maximum(step - warmup, 0.0)))

    def get_config(self):
        after = self.after
        if isinstance(after, keras.optimizers.schedules.LearningRateSchedule):
            after = keras.optimizers.schedules.serialize(after)
        return {"after": after, "warmup_steps": self.warmup_steps}


def learning_rate_schedule(name, *, learning_rate, total_steps, warmup_steps=0):
    """Returns the learning rate `make_optimizer` takes: a float, or a Keras `LearningRateSchedule`.

    Args:
        name: one of `LR_SCHEDULES`: `"constant"`, `"cosine"` (Keras'
            `CosineDecay` to 0 by the last step) or `"exponential"` (Keras'
            `ExponentialDecay`, to `EXPONENTIAL_FINAL_FRACTION` of the rate by
            the last step).
        learning_rate: the peak rate.
        total_steps: the optimizer steps of the whole run (warmup included).
        warmup_steps: steps of linear warmup first (`LinearWarmup`); 0: none.

    Raises:
        ParameterError: an unknown name.
    """
    check_choice("lr_schedule", name, LR_SCHEDULES)
    learning_rate = float(learning_rate)
    decay_steps = max(1, int(total_steps) - int(warmup_steps))
    if name == "constant":
        rate = learning_rate
    elif name == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps, alpha=0.0)
    else:
        rate = keras.optimizers.schedules.ExponentialDecay(learning_rate, decay_steps,
                                                           decay_rate=EXPONENTIAL_FINAL_FRACTION)
    return LinearWarmup(rate, warmup_steps) if warmup_steps else rate


def make_optimizer(name, *, learning_rate, clipnorm=None, mixed_precision=False):
    """Returns a new Keras optimizer `name` (one of `OPTIMIZERS`, Keras' own names) with `learning_rate`.

    Args:
        name: one of `OPTIMIZERS`.
        learning_rate: a float or a `LearningRateSchedule` (`learning_rate_schedule`).
        clipnorm: Keras' `clipnorm` (each gradient clipped to this L2 norm), or None.
        mixed_precision: wrap it in Keras' `LossScaleOptimizer` (dynamic loss
            scaling, as `Model.compile` does under `mixed_float16`).

    Raises:
        ParameterError: an unknown optimizer name.
    """
    check_choice("optimizer", name, OPTIMIZERS)
    if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        learning_rate = float(learning_rate)
    config = {"learning_rate": learning_rate}
    if clipnorm is not None:
        config["clipnorm"] = float(clipnorm)
    optimizer = keras.optimizers.get(name)
    optimizer = type(optimizer)(**config)
    return keras.optimizers.LossScaleOptimizer(optimizer) if mixed_precision else optimizer


def current_learning_rate(optimizer):
    """The rate `optimizer`'s next step takes (its schedule at its step count), as a float."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = inner._learning_rate  # a variable, or the schedule itself
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        return float(rate(inner.iterations))
    return float(tf.convert_to_tensor(rate))


def _has_schedule(optimizer):
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return isinstance(inner._learning_rate, keras.optimizers.schedules.LearningRateSchedule)


def metric_terms(name, *, loss, from_logits=None):
    """Returns `terms(predictions, targets) -> (sum, count)` of the metric `name` (one of `METRICS`).

    `mse` and `mae` are the losses of those names; `accuracy` counts the rows
    whose `argmax` is the target's (its token id for
    `sparse-categorical-crossentropy`, its `argmax` otherwise).

    Raises:
        ParameterError: an unknown name.
    """
    check_choice("metrics", name, METRICS)
    if name != "accuracy":
        return loss_terms(name)
    sparse = loss == "sparse-categorical-crossentropy"

    def accuracy(predictions, targets):
        wanted = tf.cast(tf.reshape(targets, [-1]), tf.int64) if sparse else tf.argmax(targets, axis=-1)
        hits = tf.cast(tf.equal(tf.argmax(predictions, axis=-1), wanted), tf.float32)
        return tf.reduce_sum(hits), tf.cast(tf.size(hits), tf.float32)

    return accuracy


def batch_signature(data):
    """The `TensorSpec`s of one batch of `data`: `inputs (b, Ta, F)`, `steps (b, Ta)`, `targets (rows, O)`."""
    return (
        tf.TensorSpec([None, data.outer_steps, data.features], tf.float32),
        tf.TensorSpec([None, data.outer_steps], tf.int64),
        tf.TensorSpec([None, data.output_size], tf.float32),
    )


class BatchLoss(NamedTuple):
    """What `batch_loss`'s function returns for one batch.

    Attributes:
        total: the sum of the errors over the batch's valid elements.
        count: what `total` is divided by: the valid elements, summed over the
            replicas under a strategy (`reduce_count`).
        local_count: this batch's own valid elements.
        penalty: the models' `regularization_loss` (0 without regularizers).
        loss: what the step differentiates, `total / count + penalty / replicas`.
        values: the outputs `(rows, O)` in value order, at least float32.
        targets: the flat targets, cast like `values`.
        metrics: one `(sum, count)` per metric asked for.
    """

    total: tf.Tensor
    count: tf.Tensor
    local_count: tf.Tensor
    penalty: tf.Tensor
    loss: tf.Tensor
    values: tf.Tensor
    targets: tf.Tensor
    metrics: tuple


def _at_least_float32(values):
    """`values` in float32 when they are float16 or bfloat16 (mixed precision: the loss in float32), else as they are."""
    return tf.cast(values, tf.float32) if values.dtype in (tf.float16, tf.bfloat16) else values


def batch_loss(cascade, terms, *, models, metrics=(), ids=False, gate=False):
    """Returns the training loss of one batch, the function every train step differentiates.

    `loss(inputs, steps, targets, *, training=True, reduce_count=None,
    replicas=1, sampling_probability=None) -> BatchLoss` runs the cascade on
    flat `targets` (value order) and takes `terms` over its outputs (cast to
    float32 when they are float16), plus the models' `regularization_loss`.
    On a replica, `reduce_count` all-reduces the count (the global count of
    valid elements) and `replicas` is the number of replicas, so that the
    replicas' losses add up to the global batch's. `cascade train` and
    `CascadeModel.train_step` both run it (through `compute_gradients`).

    With a feedback cascade (`cascade.feedback`), the runner is given the
    flat targets (teacher forcing; with `ids`, token ids `(total, 1)` of a
    sparse loss, fed as their one-hot) and `sampling_probability`, a scalar
    tensor (scheduled sampling).

    Args:
        cascade: a `Cascade`.
        terms: `(predictions, targets) -> (sum, count)`, e.g. `loss_terms(name)`.
        models: `(model_a, model_b)`, whose weight regularizers count.
        metrics: `(predictions, targets) -> (sum, count)` functions (`metric_terms`).
        ids: the targets are token ids (`sparse-categorical-crossentropy`).
        gate: B's last column is a stop gate (`stop_gate`): teacher forcing
            feeds the targets' other columns and a 0 gate, as generation feeds
            B its values and a 0 gate.
    """

    def loss(inputs, steps, targets, *, training=True, reduce_count=None, replicas=1, sampling_probability=None):
        run = {}
        if getattr(cascade, "feedback", False):
            fed = tf.concat([targets[:, :-1], tf.zeros_like(targets[:, -1:])], axis=1) if gate else targets
            run["targets"] = tf.cast(tf.reshape(targets, [-1]), tf.int64) if ids else fed
            if sampling_probability is not None:
                run["sampling_probability"] = sampling_probability
        values, _ = cascade.run(inputs, steps, training=training, **run)
        values = _at_least_float32(values)
        targets = tf.cast(targets, values.dtype)
        total, local_count = terms(values, targets)
        count = local_count
        if reduce_count is not None:
            count = tf.stop_gradient(reduce_count(local_count))
        mean = tf.math.divide_no_nan(total, count)
        measured = tuple(tf.stop_gradient(tf.stack(metric(values, targets))) for metric in metrics)
        penalty = regularization_loss(models)
        if penalty is None:
            return BatchLoss(total, count, local_count, tf.zeros((), mean.dtype), mean, values, targets, measured)
        penalty = tf.cast(penalty, mean.dtype)
        return BatchLoss(total, count, local_count, penalty, mean + penalty / replicas, values, targets, measured)

    return loss


def compute_gradients(loss, batch, *, variables, optimizer, **options):
    """The gradients of one batch's loss: the first half of every train step, `cascade train`'s and `CascadeModel`'s.

    Runs `loss(*batch, **options)` (a `batch_loss` function) under one
    `tf.GradientTape` and differentiates the optimizer's scaled loss
    (`optimizer.scale_loss`: a `LossScaleOptimizer`'s loss scale under mixed
    precision, the loss itself otherwise). A variable the loss does not reach
    gets a zero gradient.

    Returns:
        `(BatchLoss, grads)`, the grads in the order of `variables` (scaled,
        as `optimizer.apply` expects them).
    """
    with tf.GradientTape() as tape:
        result = loss(*batch, **options)
        scaled = optimizer.scale_loss(result.loss)
    grads = tape.gradient(scaled, variables)
    grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]
    return result, grads


def apply_gradients(optimizer, grads, variables):
    """The second half of every train step: one optimizer step (clipping, loss-scale handling and all)."""
    optimizer.apply(grads, variables)


def finite_step(result, grads, *, optimizer):
    """Whether a step may be taken: a finite loss and, unless a `LossScaleOptimizer` judges them itself, finite grads."""
    finite = tf.math.is_finite(result.loss)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return finite  # an overflow of the scaled grads only lowers the scale: the optimizer skips that step
    for grad in grads:
        finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(grad)))
    return finite


SAMPLING_SPEC = tf.TensorSpec([], tf.float32, name="sampling_probability")  # each step's scheduled-sampling rate


def no_sampling(epoch, batch):
    """The scheduled-sampling probability of step `batch` (1-based) of epoch `epoch` (0-based) without feedback: 0."""
    return 0.0


def sampling_probabilities(schedule, *, batches_per_epoch):
    """`(epoch (0-based), batch (1-based)) -> probability` of a `--sampling-schedule` text, or `no_sampling`.

    The schedule's step is the run's global optimizer step, counted from 0
    (`SamplingSchedule.probability`), so a resumed run goes on where it was.
    """
    if schedule is None:
        return no_sampling
    schedule = SamplingSchedule.parse(schedule)
    return lambda epoch, batch: schedule.probability(epoch * batches_per_epoch + batch - 1)


def train_steps(batch_loss, *, signature, variables, optimizer):
    """Returns `(gradients, apply)`, two `tf.function`s for one device.

    `gradients(inputs, steps, targets, sampling_probability) -> (sum, count,
    penalty, metrics, grads, finite)` is `compute_gradients` (`metrics`: a
    `(sum, count)` per metric; `sampling_probability`, a float32 scalar,
    reaches a feedback cascade only); `apply(grads)` is `apply_gradients`.
    They are apart so that a non-finite loss or gradient never reaches the weights.
    """

    @tf.function(input_signature=(*signature, SAMPLING_SPEC), reduce_retracing=True)
    def gradients(inputs, steps, targets, sampling_probability):
        result, grads = compute_gradients(batch_loss, (inputs, steps, targets), variables=variables,
                                          optimizer=optimizer, sampling_probability=sampling_probability)
        finite = finite_step(result, grads, optimizer=optimizer)
        return result.total, result.count, result.penalty, result.metrics, grads, finite

    @tf.function(reduce_retracing=True)
    def apply(grads):
        apply_gradients(optimizer, grads, variables)

    return gradients, apply


def _evaluation_step(cascade, terms, data, *, models=(), metrics=(), ids=False, gate=False):
    """Returns a `tf.function` `(inputs, steps, targets) -> (sum, count, metrics)` with `training=False`."""
    loss = batch_loss(cascade, terms, models=models, metrics=metrics, ids=ids, gate=gate)

    @tf.function(input_signature=batch_signature(data), reduce_retracing=True)
    def evaluate(inputs, steps, targets):
        result = loss(inputs, steps, targets, training=False)
        return result.total, result.local_count, result.metrics

    return evaluate


def _penalty_now(models):
    """The models' regularization loss at their current weights, as a float, or None without regularizers."""
    penalty = regularization_loss(models)
    return None if penalty is None else float(penalty)


def _scores_over(step, data, indices, *, batch_size, penalty=None):
    """`(loss, [metric, ...])` over the valid elements of `indices` (loss plus `penalty`), or None for no samples."""
    if len(indices) == 0:
        return None
    total, count, sums = 0.0, 0.0, None
    for batch in data.batches(indices, batch_size=batch_size):
        batch_total, batch_count, measured = step(batch.inputs, batch.steps.astype(np.int64), batch.targets)
        total += float(batch_total)
        count += float(batch_count)
        pairs = [(float(pair[0]), float(pair[1])) for pair in measured]
        sums = pairs if sums is None else [(a + x, b + y) for (a, b), (x, y) in zip(sums, pairs)]
    loss = total / count if count else 0.0
    metrics = [a / b if b else 0.0 for a, b in (sums or [])]
    return (loss if penalty is None else loss + penalty), metrics


def _loss_over(step, data, indices, *, batch_size, penalty=None):
    """The mean loss over the valid elements of `indices` (plus `penalty`), or None when there are no samples."""
    scores = _scores_over(step, data, indices, batch_size=batch_size, penalty=penalty)
    return None if scores is None else scores[0]


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
    check_regularizers((model_a, model_b))
    indices = np.arange(data.n_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    terms = loss_terms(loss, from_logits=resolve_from_logits(model_b, from_logits, loss=loss))
    step = _evaluation_step(cascade, terms, data)
    return _loss_over(step, data, indices, batch_size=batch_size, penalty=_penalty_now((model_a, model_b)))


# ------------------------------------------------------------ checks, seeds


def _check_fits(cascade, data, *, loss, gate=False):
    """Raises `DataError` when the training file does not fit the two models (and the loss's targets)."""
    name = f"'{data.path}'"
    check_inputs_fit(cascade.a_spec, (data.n_samples, data.outer_steps, data.features),
                     where=f"inputs in {name} (key 'inputs')")
    emits = cascade.b_spec.output_size
    scored = emits - int(gate)  # the columns the loss reads
    if loss in CROSSENTROPY_LOSSES and scored < 2:
        raise ParameterError(
            "loss", f"loss={loss!r} is a softmax over B's outputs, but B emits O={scored} "
            f"{'beside the stop gate ' if gate else ''}per step: one output makes the loss 0 whatever B emits; "
            "expected O >= 2 token scores, or loss='mse'.")
    if loss == "sparse-categorical-crossentropy":
        if data.output_size != 1 or data.targets_dtype.kind not in "iu":
            raise DataError(
                f"targets in {name} (key 'targets') have {data.output_size} {data.targets_dtype} value"
                f"{'' if data.output_size == 1 else 's'} per step: sparse-categorical-crossentropy expects one "
                f"integer token id per step, (sum(steps), 1) or (N, Ta, L, 1), each in [0, {emits})."
            )
        return
    if gate and data.output_size != emits - 1:
        raise DataError(
            f"targets in {name} (key 'targets') have O={data.output_size} values per step but model B emits "
            f"O={emits}, the last a stop gate: expected O - 1 = {emits - 1} (--stop-gate)."
        )
    if not gate and data.output_size != emits:
        raise DataError(
            f"targets in {name} (key 'targets') have O={data.output_size} values per step but model B "
            f"emits O={emits}."
        )


def training_stop_rule(config):
    """The stop rule a run's model is meant to generate with, or None: the gate with `stop_gate`, else the end token."""
    if config.stop_gate:
        return StopRule.gate()
    if config.append_end_token is not None:
        return StopRule.token(config.append_end_token)
    return None


def generator_settings(config, *, b_form, longest):
    """The runner settings the run's `cascade.keras` generates with: one home for `val_length_mae` and the file.

    A run that implies a stop (`append_end_token`, `stop_gate`) generates
    with it: the end token's rule with `exclude_stop_step` (the end token is
    not a value) or the gate, up to `max_steps = longest + 1`, and the
    `greedy` sampler for a token loss (a step-form B fed back the token it
    picked, as it was trained on one-hot targets); `config.max_steps`, when
    given, instead of `longest + 1`. Else the runner settings.

    Args:
        config: a resolved `TrainConfig`.
        b_form: B's form, `"step"` or `"sequence"`.
        longest: the longest inner sequence of the training file (end rows not counted).
    """
    settings = runner_settings(config)
    rule = training_stop_rule(config)
    if rule is None:
        return settings
    tokens = config.loss in CROSSENTROPY_LOSSES and rule.kind == "token" and b_form == "step"
    max_steps = longest + 1 if config.max_steps is None else config.max_steps
    return {**settings, "stop_rule": rule, "exclude_stop_step": rule.kind == "token", "max_steps": max_steps,
            "sampler": "greedy" if tokens else "identity"}


def _length_error(run, data):
    """`val_length_mae`: the mean absolute error, over the validation pairs, of the lengths the run's generator gives.

    The models generate as `cascade.keras` does (`generator_settings`: its
    sampler, stop rule, `exclude_stop_step` and `max_steps`), and the lengths
    are compared with the file's steps (end rows not counted). None without a
    stop rule or a validation split.
    """
    if training_stop_rule(run.config) is None or len(run.val_indices) == 0:
        return None
    cascade = Cascade(*run.models, **{**run.generation, "jit_compile": False})
    errors = pairs = 0
    for batch in data.batches(run.val_indices, batch_size=run.config.batch_size):
        lengths = cascade.run(batch.inputs)[1].numpy()
        errors += int(np.abs(lengths - (batch.steps - int(data.end_token is not None))).sum())
        pairs += lengths.size
    return errors / pairs if pairs else None


def _end_token(cascade, data, config):
    """Applies `append_end_token` to `data` (`TrainingData.with_end_token`) once the id is checked against B."""
    token, size = config.append_end_token, cascade.b_spec.output_size - int(bool(config.stop_gate))
    if token is not None and token >= size:
        where = "beside the stop gate" if config.stop_gate else f"B emits O={size}"
        raise ParameterError("append_end_token", f"expected a token id in [0, {size}) ({where}), received {token}.")
    data.with_end_token(token, ids=config.loss == "sparse-categorical-crossentropy")


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
    gradients: Callable  # (inputs, steps, targets) -> (sum, count, penalty, metrics, grads, finite)
    apply: Callable  # (grads) -> None: one optimizer step
    evaluation: Callable  # (inputs, steps, targets) -> (sum, count, metrics), training=False
    epoch_batches: Callable  # (order) -> iterator of (emits, (inputs, steps, targets))
    train_indices: np.ndarray
    val_indices: np.ndarray
    board: "_Board | None" = None
    # (epoch (0-based), batch (1-based)) -> the step's scheduled-sampling probability (feedback runs only)
    sampling_probability: Callable = no_sampling
    generation: dict = dataclasses.field(default_factory=dict)  # `generator_settings`: what cascade.keras runs

    @property
    def weights(self):
        return [*self.models[0].weights, *self.models[1].weights]


class _RunningLoss:
    """An epoch's training loss so far: errors over valid elements, plus the mean penalty of the steps taken."""

    def __init__(self, metrics=0):
        self.total, self.count, self.penalty, self.steps = 0.0, 0.0, 0.0, 0
        self.sums = [[0.0, 0.0] for _ in range(metrics)]

    def add(self, total, count, penalty, metrics=()):
        self.total += float(total)
        self.count += float(count)
        self.penalty += float(penalty)
        self.steps += 1
        for kept, pair in zip(self.sums, metrics):
            kept[0] += float(pair[0])
            kept[1] += float(pair[1])

    @property
    def metrics(self):
        """Each metric over the valid elements of the steps taken (0.0 before any)."""
        return [total / count if count else 0.0 for total, count in self.sums]

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
                "epochs", f"the run in '{out_dir}' has trained {done} epoch{'' if done == 1 else 's'} already "
                f"(its models are those of epoch {done}): expected epochs > {done} to train on, received "
                f"epochs={resolved.epochs}."
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
    cascade = Cascade(model_a, model_b, **runner_settings(config))
    _check_fits(cascade, data, loss=config.loss, gate=bool(config.stop_gate))
    _end_token(cascade, data, config)
    data.with_stop_gate(bool(config.stop_gate))
    check_regularizers((model_a, model_b))
    if data.n_samples == 0:
        raise DataError(f"'{data.path}' holds no samples: expected at least one to train on.")
    if not data.steps.any():
        raise DataError(f"steps in '{data.path}' (key 'steps') are all 0 (shape {data.steps.shape}): there is no "
                        "target to learn from; expected at least one inner step (or --append-end-token to learn to "
                        "emit nothing).")
    train_indices, val_indices = split_indices(data.n_samples, val_split=config.val_split, seed=config.seed)
    if config.patience is not None and len(val_indices) == 0:
        raise ParameterError("patience", f"needs a validation set, but val_split={config.val_split} of "
                                         f"{data.n_samples} samples keeps none: raise val_split.")
    if not _trained_variables(model_a, model_b, freeze_a=config.freeze_a):
        raise CascadeError("there is nothing to train: the models have no trainable weights.")
    board = _Board.check(config.tensorboard)
    strategy = distribute.strategy_for(config.strategy, strategy)
    chief = distribute.is_chief(strategy)
    trained = mixed_precision_pair(model_a, model_b, **runner_settings(config)) if config.mixed_precision else None
    sparse = config.loss == "sparse-categorical-crossentropy"
    data.check_finite(token_ids=cascade.b_spec.output_size if sparse else None)  # bad data leaves no out dir
    folder = (prepare_out_dir(out_dir, resume=config.resume, lock=chief, overwrite=config.overwrite)
              if chief or config.resume else None)
    try:
        run = _build(model_a, model_b, data, cascade, out_dir=Path(out_dir), config=config, strategy=strategy,
                     chief=chief, train_indices=train_indices, val_indices=val_indices, done=done, trained=trained)
        run.board = board if chief else None
        run.generation = generator_settings(config, b_form=cascade.b_spec.form,
                                            longest=int(data.file_steps.max(initial=0)))
    except BaseException:
        if folder is not None:
            folder.__exit__(CascadeError, None, None)
        raise
    return run, folder


def runner_settings(config):
    """The `Cascade` settings of a resolved `TrainConfig`: one home for what training runs the runner with."""
    settings = {"state": config.state, "state_init": config.state_init, "feedback": config.feedback,
                "feedback_start": config.feedback_start}
    return settings if config.jit_compile is None else {**settings, "jit_compile": config.jit_compile}


def mixed_precision_pair(model_a, model_b, **settings):
    """Copies of A and B built under the `mixed_float16` policy (float16 compute, float32 weights), holding their weights.

    Each layer is rebuilt from its config with `dtype="mixed_float16"` (the
    inputs stay as they are), as a model made under
    `keras.mixed_precision.set_global_policy("mixed_float16")` would be.

    Raises:
        ModelError: a model that cannot be rebuilt from its config, or a pair
            the runner cannot run in mixed precision (its reason).
    """
    def mixed(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = "mixed_float16"
        return type(layer).from_config(config)

    copies = []
    for name, model in zip("AB", (model_a, model_b)):
        try:
            copy = keras.models.clone_model(model, clone_function=mixed)
            copy.set_weights(model.get_weights())
        except (TypeError, ValueError, NotImplementedError, AttributeError) as exc:
            raise ModelError(
                f"model {name} cannot be rebuilt under the mixed_float16 policy for mixed_precision=True: "
                f"expected a functional or Sequential model of built-in layers; {_first_line(exc)} Train it "
                "without mixed_precision.") from exc
        copies.append(copy)
    try:
        Cascade(*copies, **settings)
    except (ModelError, ParameterError) as exc:
        raise ModelError(f"the two models cannot run in mixed precision (mixed_precision=True): {exc} Train "
                         "them without mixed_precision.") from exc
    return tuple(copies)


def _first_line(exc):
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__).rstrip(".") + "."


def _build(model_a, model_b, data, cascade, *, out_dir, config, strategy, chief, train_indices, val_indices, done,
           trained=None):
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    distributed = config.strategy != "default"
    given = (model_a, model_b)
    if trained is not None:  # mixed precision: the copies train, the models given get their weights at the end
        model_a, model_b = trained
        cascade = Cascade(model_a, model_b, **runner_settings(config))
    batches_per_epoch = math.ceil(len(train_indices) / config.batch_size)
    rate = learning_rate_schedule(config.lr_schedule, learning_rate=config.learning_rate,
                                  total_steps=config.epochs * batches_per_epoch, warmup_steps=config.warmup_steps)
    with strategy.scope():
        if distributed:
            model_a, model_b = distribute.replicate(model_a, name="A"), distribute.replicate(model_b, name="B")
            cascade = Cascade(model_a, model_b, **runner_settings(config))
        variables = _trained_variables(model_a, model_b, freeze_a=config.freeze_a)
        optimizer = make_optimizer(config.optimizer, learning_rate=rate, clipnorm=config.clipnorm,
                                   mixed_precision=config.mixed_precision)
        optimizer.build(variables)  # before the first step: a lazily built Adam fails inside strategy.run
    terms = loss_terms(config.loss, from_logits=config.from_logits)
    metrics = tuple(metric_terms(name, loss=config.loss) for name in config.metrics)
    terms, metrics = _gated_terms(config, terms, metrics, cascade.b_spec.output_size)
    ids = config.loss == "sparse-categorical-crossentropy"
    gate = bool(config.stop_gate)
    loss = batch_loss(cascade, terms, models=(model_a, model_b), metrics=metrics, ids=ids, gate=gate)
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
    return _Run(given=given, models=(model_a, model_b), distributed=distributed or trained is not None,
                out_dir=out_dir, chief=chief, config=config, info=info, optimizer=optimizer, gradients=gradients,
                apply=apply, evaluation=_evaluation_step(cascade, terms, data, metrics=metrics, ids=ids, gate=gate),
                epoch_batches=epoch_batches, train_indices=train_indices, val_indices=val_indices,
                sampling_probability=sampling_probabilities(config.sampling_schedule,
                                                            batches_per_epoch=batches_per_epoch))


def _default_batches(data, order, *, batch_size):
    """Yields `(emits, (inputs, steps, targets))` for each batch of `order`, read on the host."""
    for batch in data.batches(order, batch_size=batch_size):
        yield len(batch.targets) > 0, (batch.inputs, batch.steps.astype(np.int64), batch.targets)


class _Board:
    """TensorBoard event files of one run: loss, val_loss, learning_rate and the metrics, once per epoch."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._writer = None

    @classmethod
    def check(cls, folder):
        """A `_Board` for `folder` (None: none), refused before any work when it cannot be a folder.

        Raises:
            ParameterError: (`tensorboard`) `folder` is a file, or cannot be created or written.
        """
        if folder is None:
            return None
        path = Path(folder)
        if path.exists() and not path.is_dir():
            raise ParameterError("tensorboard", f"'{path}' is a file: expected a folder for the event files.")
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ParameterError("tensorboard", f"'{path}' cannot be written: '{existing}' is not writable.")
        return cls(path)

    def write(self, row, *, learning_rate):
        """Writes one epoch's scalars (a history row), at step `row["epoch"]`."""
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._writer = tf.summary.create_file_writer(str(self.folder))
        with self._writer.as_default():
            for key, value in row.items():
                if key not in ("epoch", "seconds") and value is not None:
                    tf.summary.scalar(key, float(value), step=int(row["epoch"]))
            tf.summary.scalar("learning_rate", float(learning_rate), step=int(row["epoch"]))
        self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _run_epoch(run, data, epoch, *, callbacks, checkpoints):
    """Trains epoch `epoch` (0-based) and takes its validation loss; returns its history row."""
    config = run.config
    number = epoch + 1
    _reseed(run.models, seed=config.seed, epoch=epoch)
    order = epoch_order(run.train_indices, seed=config.seed, epoch=epoch, shuffle=config.shuffle)
    callbacks.epoch_started(number, epochs=config.epochs,
                            batches=math.ceil(len(run.train_indices) / config.batch_size))
    started = time.perf_counter()
    running = _RunningLoss(len(config.metrics))
    for batch_number, (emits, batch) in enumerate(run.epoch_batches(order), start=1):
        if emits:  # a batch that emits nothing has nothing to learn from
            sampling = tf.constant(run.sampling_probability(epoch, batch_number), tf.float32)
            total, count, penalty, measured, grads, finite = run.gradients(*batch, sampling)
            if not bool(finite):
                loss = float(total) / float(count) + float(penalty)
                what, value = ("training loss", loss) if not math.isfinite(loss) else ("gradient", "non-finite")
                raise _not_finite(what, value, epoch=number, batch=batch_number, checkpoints=checkpoints,
                                  done=epoch)
            run.apply(grads)
            running.add(total, count, penalty, measured)
        callbacks.batch_done(running.value)
    scores = _scores_over(run.evaluation, data, run.val_indices, batch_size=config.batch_size,
                          penalty=_penalty_now(run.models))
    val_loss, val_metrics = (None, [None] * len(config.metrics)) if scores is None else scores
    if val_loss is not None and not math.isfinite(val_loss):
        raise _not_finite("validation loss", val_loss, epoch=number, batch=None, checkpoints=checkpoints, done=epoch)
    row = {"epoch": number, "loss": running.value, "val_loss": val_loss}
    for name, value, val_value in zip(config.metrics, running.metrics, val_metrics):
        row[name], row[f"val_{name}"] = value, val_value
    length_error = _length_error(run, data)
    if length_error is not None:
        row["val_length_mae"] = length_error
    row["seconds"] = time.perf_counter() - started
    return row


def _finish(run, history):
    """Copies trained copies' weights back into the models given; the chief writes the pair and `history.csv` as one.

    The chief also writes `cascade.keras`, the whole generator (`CascadeModel`
    with the run's runner settings).
    """
    if run.distributed:
        for trained, model in zip(run.models, run.given):
            model.set_weights(trained.get_weights())
    if run.chief:
        from cascade_cli.keras_model import CascadeModel

        generator = CascadeModel(*run.given, **run.generation)
        save_models(run.given, run.out_dir, history=history, generator=generator)


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
    The two models, `cascade.keras` (the whole generator, a `CascadeModel`
    with the run's `state` and `state_init`) and `history.csv` are written as
    one set at the end (`checkpoints.save_models`). Each step is
    `compute_gradients` then `apply_gradients`, the step
    `CascadeModel.train_step` takes too. With `mixed_precision`, copies of
    the models built under `mixed_float16` train (`mixed_precision_pair`)
    and the models given get their weights at the end; with `tensorboard`,
    each epoch's scalars go into event files there.

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
        out_dir: the folder for `checkpoints/`, `history.csv`, `model_a.keras`,
            `model_b.keras` and `cascade.keras`; created if missing (with
            its missing parents); with `config.overwrite` an earlier run in it
            is replaced.
        config: a `TrainConfig`.
        callbacks: a `TrainCallbacks` (progress), or None.
        strategy: the strategy `distribute.make_strategy(config.strategy)`
            returned, or None to make it here (too late for `multi-worker`,
            which must be made before any other TensorFlow work).

    Returns:
        The history, one dict per epoch (earlier epochs of a resumed run
        included): `{"epoch" (1-based), "loss", "val_loss" (None without a
        validation set), then each metric and its `val_` figure, "seconds"}`. Both losses include the regularization
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
            if not _has_schedule(run.optimizer):  # a schedule is rebuilt from the settings; a constant rate is set
                run.optimizer.learning_rate = float(config.learning_rate)
            callbacks.resumed(epoch=progress.epochs_done, history=list(history))
        checkpoints.start()
        stopped = progress.patience_spent(config.patience)
        try:
            for epoch in range(progress.epochs_done, config.epochs if not stopped else 0):
                rate = current_learning_rate(run.optimizer)  # the rate this epoch starts with
                row = _run_epoch(run, data, epoch, callbacks=callbacks, checkpoints=checkpoints.folder)
                progress.record(row["val_loss"], epoch=row["epoch"], weights=run.weights)
                history.append(row)
                checkpoints.save(history)
                if run.board is not None:
                    run.board.write(row, learning_rate=rate)
                callbacks.epoch_done(dict(row))
                stopped = progress.patience_spent(config.patience)
                if stopped:
                    break
        finally:
            if run.board is not None:
                run.board.close()
    if stopped:
        callbacks.stopped_early(epoch=progress.epochs_done, best_epoch=int(progress.best_epoch.numpy()))
    if config.patience is not None:
        progress.restore_best(run.weights)
    _finish(run, history)
    callbacks.run_finished(list(history))
    return history
