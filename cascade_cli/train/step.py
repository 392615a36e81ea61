"""One train step, the one `cascade train` and `CascadeModel.train_step` both take, with or without a strategy.

`batch_loss` runs the cascade on one batch and takes the masked loss plus
the models' regularization losses; `compute_gradients` differentiates it
under one `tf.GradientTape`; the step applies the gradients only when the
loss and gradients are finite, so a non-finite step never reaches the
weights. Under a `tf.distribute` strategy each replica divides its errors by
the *global* count of valid elements and adds `1 / replicas` of the penalty,
so the replicas' gradients add up to the global batch's, and the step does
not depend on the number of replicas.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

from cascade_cli.train.losses import regularization_loss

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

