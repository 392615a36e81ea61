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

import functools
from typing import NamedTuple

import keras
import tensorflow as tf

from cascade_cli.errors import CascadeError
from cascade_cli.train.losses import regularization_loss

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
    """

    total: tf.Tensor
    count: tf.Tensor
    local_count: tf.Tensor
    penalty: tf.Tensor
    loss: tf.Tensor
    values: tf.Tensor
    targets: tf.Tensor


def _at_least_float32(values):
    """`values` in float32 when they are float16 or bfloat16 (mixed precision: the loss in float32), else as they are."""
    return tf.cast(values, tf.float32) if values.dtype in (tf.float16, tf.bfloat16) else values


def batch_loss(cascade, terms, *, models, gate=False):
    """Returns the training loss of one batch, the function every train step differentiates.

    `loss(inputs, steps, targets, *, training=True, reduce_count=None,
    replicas=1, sampling_probability=None) -> BatchLoss` runs the cascade on
    flat `targets` (value order) and takes `terms` over its outputs (cast to
    float32 when they are float16), plus the models' `regularization_loss`.
    On a replica, `reduce_count` all-reduces the count (the global count of
    valid elements) and `replicas` is the number of replicas, so that the
    replicas' losses add up to the global batch's. `CascadeModel.train_step`
    runs it (through `compute_gradients`), and so `cascade train`.

    With a feedback cascade (`cascade.feedback`), the runner is given the
    flat targets (teacher forcing; token ids `(total,)` of a sparse loss are
    fed as their one-hot) and `sampling_probability`, a scalar tensor
    (scheduled sampling).

    Args:
        cascade: a `Cascade`.
        terms: `(predictions, targets) -> (sum, count)`, e.g. `loss_terms(name)`.
        models: `(model_a, model_b)`, whose weight regularizers count.
        gate: B's last column is a stop gate (`stop_gate`): teacher forcing
            feeds the targets' other columns and a 0 gate, as generation feeds
            B its values and a 0 gate.
    """

    def loss(inputs, steps, targets, *, training=True, reduce_count=None, replicas=1, sampling_probability=None):
        run = {}
        if getattr(cascade, "feedback", False):
            fed = tf.concat([targets[:, :-1], tf.zeros_like(targets[:, -1:])], axis=1) if gate else targets
            run["targets"] = fed
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
        penalty = regularization_loss(models)
        if penalty is None:
            return BatchLoss(total, count, local_count, tf.zeros((), mean.dtype), mean, values, targets)
        penalty = tf.cast(penalty, mean.dtype)
        return BatchLoss(total, count, local_count, penalty, mean + penalty / replicas, values, targets)

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
    """Whether a step may be taken: a finite loss and, unless a `LossScaleOptimizer` judges them itself, finite grads.

    On one of several replicas the verdict is the replicas' together (any
    replica's non-finite loss or gradient refuses the step everywhere), so
    every replica and worker decides alike.
    """
    finite = tf.math.is_finite(result.loss)
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):  # it lowers its scale on an overflow instead
        for grad in grads:
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(grad)))
    context = replica_context()
    if context is None:
        return finite
    refusals = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.float32))
    return tf.equal(refusals, 0.0)


def replica_context():
    """The replica context when running on one of several replicas, else None."""
    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def _apply_if(take, optimizer, grads, variables):
    """`apply_gradients` when `take` (a boolean scalar) holds, else nothing (the optimizer's step count stays too).

    A strategy that needs `merge_call` to apply does not allow it inside a
    `tf.cond` on a replica, so there the condition is taken across replicas,
    as Keras' `LossScaleOptimizer` does.
    """
    if not tf.distribute.has_strategy() or tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(take, lambda: apply_gradients(optimizer, grads, variables), lambda: None)
        return

    def across_replicas(strategy, take, grads):
        def apply():
            strategy.extended.call_for_each_replica(apply_gradients, args=(optimizer, grads, variables))

        tf.cond(strategy.experimental_local_results(take)[0], apply, lambda: None)

    tf.distribute.get_replica_context().merge_call(across_replicas, args=(take, grads))


def sampling_probability(schedule, iterations):
    """The scheduled-sampling probability at the optimizer's step count `iterations`, a float32 scalar, in-graph.

    `SamplingSchedule.probability` of the steps taken so far: a batch that
    emits nothing takes no step, so it does not move the schedule on, and a
    resumed run (its optimizer restored) goes on where it was.
    """
    if schedule.kind == "constant":
        return tf.constant(schedule.value, tf.float32)
    k = tf.constant(schedule.value, tf.float64)
    exponent = tf.minimum(tf.cast(iterations, tf.float64) / k, 700.0)
    return tf.cast(1.0 - k / (k + tf.exp(exponent)), tf.float32)


def train_step(loss, batch, *, variables, optimizer, only_if=None, sampling=None, **options):
    """Takes one train step on one batch: the step `cascade train` and `CascadeModel.train_step` both take.

    Runs `compute_gradients` and applies the gradients only when the loss
    and gradients are finite (`finite_step`): a non-finite step never
    reaches the weights, and the caller refuses it. A batch with no valid
    element (every pair 0 steps) takes no step either: the optimizer, its
    step count and its moments stay as they were. On one of several
    replicas (inside `strategy.run`, as Keras' `fit` calls `train_step`)
    the count of valid elements is all-reduced and the regularization shared
    (`batch_loss`'s `reduce_count` and `replicas`), so the replicas'
    gradients add up to the global batch's.

    Args:
        loss: a `batch_loss` function.
        batch: `(inputs, steps, targets)`.
        variables: the variables to train.
        optimizer: a Keras optimizer.
        only_if: a boolean scalar, or None: the step is taken only when it
            holds too (e.g. no earlier step was refused).
        sampling: a `SamplingSchedule` (scheduled sampling of a feedback B),
            read at the optimizer's step count (`sampling_probability`), or None.
        **options: `loss`'s others.

    Returns:
        `(BatchLoss, finite)`: this replica's loss terms, and whether the
        loss and gradients were finite.
    """
    context = replica_context()
    if context is not None:
        options = {"reduce_count": functools.partial(context.all_reduce, tf.distribute.ReduceOp.SUM),
                   "replicas": context.num_replicas_in_sync, **options}
    if not optimizer.built:  # its variables are made outside the condition
        optimizer.build(variables)
    if sampling is not None:
        options["sampling_probability"] = sampling_probability(sampling, optimizer.iterations)
    result, grads = compute_gradients(loss, batch, variables=variables, optimizer=optimizer, **options)
    finite = finite_step(result, grads, optimizer=optimizer)
    take = tf.logical_and(finite, result.count > 0)  # a batch that emits nothing has nothing to learn from
    _apply_if(take if only_if is None else tf.logical_and(take, only_if), optimizer, grads, variables)
    return result, finite


class NonFiniteStep(CascadeError):
    """A step or validation refused for a value that is not finite (`non_finite_error`); what, where and its value.

    Attributes:
        what: `"training loss"`, `"gradient"` or `"validation loss"`.
        value: the value (a float, or `"non-finite"` for a gradient).
        epoch: the epoch, 1-based.
        batch: the batch, 1-based (None: validation).
    """

    def __init__(self, message, *, what, value, epoch, batch):
        super().__init__(message)
        self.what, self.value, self.epoch, self.batch = what, value, epoch, batch


def non_finite_error(what, value, *, epoch, batch, kept):
    """The refusal of a non-finite step: where (`epoch`, `batch`, 1-based; batch None: validation), what, and `kept`."""
    where = f"epoch {epoch}" + ("" if batch is None else f", batch {batch}")
    return NonFiniteStep(f"training stopped at {where}: the {what} became {value} (expected a finite number); {kept}. "
                         "Try a lower learning rate.", what=what, value=value, epoch=epoch, batch=batch)
