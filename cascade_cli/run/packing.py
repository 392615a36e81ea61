"""Packing plans: which rows run at each inner step, in which order, and the value order.

Pure TensorFlow ops on the caps `(N, Ta)` int32 (the steps, or `max_steps`
where none are given): no model, no I/O. The runner (`cascade_cli.run.cascade`)
turns a plan into a loop, the way Keras' `RNN` layer hands `backend.rnn` a
step function.

Every inner sequence that runs is a *row*: a `(n, t)` pair in `reset` mode, a
whole sample in `carry` mode. Pair ids are flat indices `n * Ta + t`. Rows are
sorted longest first (stable), so at inner step `j` the rows still running
are a prefix, `counts[j]` long; `counts` ends with a 0. Outputs come out
*step-major* (step 0's rows, then step 1's, ...); `value_order` is the
permutation that puts them in value order (sample, then outer step, then
inner step): `values = tf.gather(step_major, value_order)`.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class ResetPlan:
    """The packing of `reset` mode with given steps: rows are `(n, t)` pairs.

    Attributes:
        pair_ids: `(rows,)` the pairs with steps > 0, longest first.
        row_caps: `(rows,)` their steps.
        counts: `(longest + 1,)` rows running at each step, ending with 0.
        step_pairs: `(total,)` the pair of each step-major output row.
        value_order: `(total,)` the step-major row of each value, in value order.
    """

    pair_ids: tf.Tensor
    row_caps: tf.Tensor
    counts: tf.Tensor
    step_pairs: tf.Tensor
    value_order: tf.Tensor


@dataclasses.dataclass(frozen=True)
class CarryPlan:
    """The packing of `carry` mode with given steps: rows are samples.

    Each sample's inner steps, outer step after outer step, form one sequence.

    Attributes:
        samples: `(rows,)` the samples with any step, longest total first.
        counts: `(longest + 1,)` rows running at each step, ending with 0.
        step_pairs: `(total,)` the pair each step-major row's input comes from.
        value_order: `(total,)` the step-major row of each value, in value order.
        value_pairs: `(total,)` the pair of each value, in value order (ascending).
    """

    samples: tf.Tensor
    counts: tf.Tensor
    step_pairs: tf.Tensor
    value_order: tf.Tensor
    value_pairs: tf.Tensor


def prefix_counts(sorted_lengths):
    """Returns `counts (longest + 1,)`: `counts[j] = count(sorted_lengths > j)`, the rows running at step `j`.

    Args:
        sorted_lengths: `(rows,)` int32 in descending order, so the count is a
            binary search.
    """
    longest = tf.reduce_max(tf.concat([sorted_lengths, [0]], 0))
    return tf.searchsorted(-sorted_lengths, -tf.range(longest + 1), side="left", out_type=tf.int32)


def longest_first(lengths):
    """Returns `(order, sorted_lengths, running)`: a stable descending sort and how many lengths are > 0."""
    order = tf.argsort(lengths, direction="DESCENDING", stable=True)
    sorted_lengths = tf.gather(lengths, order)
    return order, sorted_lengths, tf.math.count_nonzero(sorted_lengths, dtype=tf.int32)


def reset_rows(caps):
    """Returns `(pair_ids, row_caps)`: the pairs with caps > 0, longest first, and their caps."""
    order, sorted_caps, running = longest_first(tf.reshape(caps, [-1]))
    return order[:running], sorted_caps[:running]


def reset_plan(caps):
    """Returns the `ResetPlan` of caps `(N, Ta)` int32."""
    caps_flat = tf.reshape(caps, [-1])
    order, sorted_caps, running = longest_first(caps_flat)
    pair_ids = order[:running]
    counts = prefix_counts(sorted_caps)
    # Step j runs rows 0..counts[j]-1, so every output row's pair and step are known up front.
    rows = tf.ragged.range(counts[:-1], row_splits_dtype=tf.int32)
    step_pairs = tf.gather(pair_ids, rows.flat_values)
    positions = tf.gather(tf.cumsum(caps_flat, exclusive=True), step_pairs) + rows.value_rowids()
    return ResetPlan(pair_ids, sorted_caps[:running], counts, step_pairs, tf.math.invert_permutation(positions))


def carry_rows(caps):
    """Returns `samples`: the samples with any step, longest total first."""
    order, _, running = longest_first(tf.reduce_sum(caps, axis=1))
    return order[:running]


def carry_plan(caps):
    """Returns the `CarryPlan` of caps `(N, Ta)` int32."""
    outer = tf.shape(caps)[1]
    caps_flat = tf.reshape(caps, [-1])
    totals = tf.reduce_sum(caps, axis=1)
    order, sorted_totals, running = longest_first(totals)
    counts = prefix_counts(sorted_totals)
    # Each value's pair, sample and position in its sample's flattened sequence.
    value_pairs = tf.repeat(tf.range(tf.size(caps_flat)), caps_flat)
    value_samples = tf.math.floordiv(value_pairs, outer)
    positions = tf.range(tf.size(value_pairs)) - tf.gather(tf.cumsum(totals, exclusive=True), value_samples)
    value_order = tf.gather(tf.cumsum(counts, exclusive=True), positions) + tf.gather(
        tf.math.invert_permutation(order), value_samples)
    step_pairs = tf.gather(value_pairs, tf.math.invert_permutation(value_order))
    return CarryPlan(order[:running], counts, step_pairs, value_order, value_pairs)


def next_running_pair(running_pairs, pair_ids, *, samples, outer):
    """The first pair `>= pair_ids` with steps > 0 in the same sample; -1 where there is none.

    Args:
        running_pairs: `(P,)` int32 ascending: the pairs with steps > 0.
        pair_ids: `(rows,)` int32 where to start looking.
        samples: `(rows,)` int32 the sample of each row.
        outer: `Ta`, the outer steps per sample.
    """
    found = tf.searchsorted(running_pairs, pair_ids, side="left")
    candidate = tf.gather(tf.concat([running_pairs, [-1]], 0), found)
    same = tf.logical_and(candidate >= 0, tf.math.floordiv(candidate, outer) == samples)
    return tf.where(same, candidate, -1)


ROW_QUANTUM = 16
"""Rows per block when a row's values must not depend on the rows beside it.

TensorFlow's CPU kernels run elementwise ops (tanh, sigmoid, exp, ...) on
packets of 8 or 16 floats and compute a buffer's leftover elements in scalar
code, which rounds differently. A row whose elements fall in that leftover
gets other last bits than in a batch of another size. With the row count a
multiple of 16, every `(rows, k)` buffer is whole packets, and a row's values
are the same in any batch (matrix products already are, row by row).
"""


def row_quantum(model):
    """Rows per block for `model`'s steps in a compiled loop: fewer than `ROW_QUANTUM` where its widths allow.

    A `(rows, width)` buffer is whole packets of `ROW_QUANTUM` floats when
    `rows * width` is a multiple of `ROW_QUANTUM`: with every width of the
    model (its inputs, every layer's outputs, a cell's units, whose gates are
    multiples of them) a multiple of 16, any row count is. Never fewer than 2
    rows: one row is a matrix-vector product, which rounds otherwise (the
    known-inputs loop still runs a batch of one sample as one row, which is
    faster: `compiled_loop.known_rows`). A layer from outside Keras may
    compute at widths no output shows: `ROW_QUANTUM`.

    Returns:
        A power of two in [2, `ROW_QUANTUM`].
    """
    import math

    from cascade_cli.keras_internals import flatten_layers, inbound_calls

    widths = [tensor.shape[-1] for tensor in [*model.inputs, *model.outputs]]
    for layer in flatten_layers(model):
        if not type(layer).__module__.startswith("keras."):
            return ROW_QUANTUM
        widths += [layer.units] if hasattr(layer, "units") else []
        widths += [tensor.shape[-1] for call in inbound_calls(layer) for tensor in call.outputs]
    if any(not isinstance(width, int) or width < 1 for width in widths):
        return ROW_QUANTUM
    return max(2, *(ROW_QUANTUM // math.gcd(ROW_QUANTUM, width) for width in widths))


def on_whole_blocks(fn, quantum=ROW_QUANTUM):
    """Wraps `fn(*args)` so it runs on rows padded with zeros to a multiple of `quantum`.

    Every tensor in `args` (nested, None allowed) is `(rows, ...)` with the
    same `rows`; every tensor `fn` returns gets its first `rows` back.
    """

    def call(*args):
        flat = tf.nest.flatten(args)
        rows = tf.shape(next(t for t in flat if t is not None))[0]
        extra = (-rows) % quantum

        def pad(t):
            return tf.pad(t, [[0, extra]] + [[0, 0]] * (t.shape.rank - 1))

        padded = tf.nest.pack_sequence_as(args, [None if t is None else pad(t) for t in flat])
        return tf.nest.map_structure(lambda t: None if t is None else t[:rows], fn(*padded))

    return call
