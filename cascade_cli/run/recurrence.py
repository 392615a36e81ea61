"""The packed recurrence of a known cell, with a hand-written backward pass.

`packed_recurrence` runs the inner loop when every row's inputs are known
before the loop (given steps, no stopping rule): step `j` runs the first
`counts[j]` rows (rows are sorted longest first). In `carry` mode their inputs
are laid out step-major; in `reset` mode each row's one input serves all its
steps, and step `j` reads the first `counts[j]` of them. Every per-row tensor
is kept gate by gate (`cells.Backward`), so no step splits a wide tensor.

Its gradient is not TensorFlow's generic while-loop gradient
(which stacks every intermediate of every step and adds shape bookkeeping to
every elementwise op) but a second loop, backwards over the steps, that
recomputes each step's gates from its saved entering states and `h @ U`
(elementwise work only) and applies the cell's hand-written vector-Jacobian
product (`cells.Backward`). The recurrent weights' gradients are not summed
step by step: one matmul over every row after the loop gives them.
"""

from __future__ import annotations

import tensorflow as tf


@tf.autograph.experimental.do_not_convert  # plain graph code: AutoGraph would rewrite the loops' Python
def packed_recurrence(backward, inputs, *, counts, initial_states, prefix=False):
    """Runs a known cell over packed rows.

    Args:
        backward: the cell's `cells.Backward`.
        inputs: its projected gates (`backward.project`). Step-major, each
            `(sum(counts), units)`: step `j`'s `counts[j]` rows, one step after
            the other; or, with `prefix=True`, each `(counts[0], units)`, every
            row's one input for all its steps (step `j` reads the first `counts[j]`).
        counts: `(T + 1,)` int32, non-increasing, `counts[T] == 0`: rows at each step.
        initial_states: B's states for the `counts[0]` rows of step 0.

    Returns:
        Every state of every row at every step, step-major (`[h_all, ...]`;
        `h_all` is the cell's output).
    """
    weights = backward.weights()
    sizes = (len(inputs), len(initial_states))
    return _run(backward, sizes, prefix, counts, *inputs, *initial_states, *weights)


def _split(values, counts):
    """A `TensorArray` whose element `j` is step `j`'s block of `values` (plus an empty last one)."""
    return _empty_like(values.shape[1:], values.dtype, tf.size(counts)).split(values, counts)


def _empty_like(block_shape, dtype, size):
    # Read again by the gradient (perhaps more than once, under a persistent tape): never cleared.
    return tf.TensorArray(dtype, size=size, infer_shape=False, clear_after_read=False,
                          element_shape=tf.TensorShape([None]).concatenate(block_shape))


def _concat(array, last, like):
    """Every block of `array` in one tensor; an empty block written at `last` keeps it defined."""
    return array.write(last, like[:0]).concat()


def _sum_by_row(step_major, counts):
    """Sums, for each of the `counts[0]` rows, its blocks' rows in step-major tensors.

    Row `r` of step `j` sits at `start_j + r`. Gathering each row's steps next
    to each other first makes it a sorted segment sum (about twice as fast on
    CPU as an unsorted one).
    """
    rows = tf.range(counts[0])
    lengths = tf.searchsorted(-counts[:-1], -rows, side="left", out_type=counts.dtype)  # count(counts[j] > r)
    starts = tf.cumsum(counts, exclusive=True)[:-1]
    row_of_each = tf.repeat(rows, lengths)
    by_row = tf.gather(starts, tf.ragged.range(lengths).flat_values) + row_of_each
    return [tf.math.segment_sum(tf.gather(values, by_row), row_of_each) for values in step_major]


def _run(backward, sizes, prefix, counts, *tensors):
    n_inputs, n_states = sizes

    @tf.custom_gradient
    def run(*tensors):
        inputs = list(tensors[:n_inputs])
        initial = list(tensors[n_inputs : n_inputs + n_states])
        weights = list(tensors[n_inputs + n_states :])
        longest = tf.size(counts) - 1
        if prefix:

            def read(j):
                return [x[: counts[j]] for x in inputs]

        else:
            blocks = [_split(x, counts) for x in inputs]

            def read(j):
                return [block.read(j) for block in blocks]

        row_shapes = [tf.TensorShape([None]).concatenate(s.shape[1:]) for s in initial]
        gate_like = inputs[0][:0]  # zero rows: the shape and dtype of every gate

        def arrays(like):
            return [_empty_like(t.shape[1:], t.dtype, longest + 1) for t in like]

        def forward(j, states, entering, leaving, inners):
            inner = backward.inner(states[0], weights)
            new_states = backward.new_states(read(j), inner, states)
            entering = [array.write(j, s) for array, s in zip(entering, states)]
            leaving = [array.write(j, s) for array, s in zip(leaving, new_states)]
            inners = [array.write(j, part) for array, part in zip(inners, inner)]
            return j + 1, [s[: counts[j + 1]] for s in new_states], entering, leaving, inners

        # Each state entering and leaving every step, and `inner` (kept for the gradient: no matmul again).
        _, _, entering, leaving, inners = tf.while_loop(
            lambda j, *_: j < longest, forward,
            (tf.constant(0), initial, arrays(initial), arrays(initial), arrays([gate_like] * n_inputs)),
            shape_invariants=(tf.TensorShape([]), row_shapes, [tf.TensorShape(None)] * n_states,
                              [tf.TensorShape(None)] * n_states, [tf.TensorShape(None)] * n_inputs),
        )
        leaving_all = [_concat(array, longest, s) for array, s in zip(leaving, initial)]

        def gradient(*upstream):
            upstream = [_split(tf.zeros_like(s) if g is None else g, counts) for g, s in zip(upstream, leaving_all)]

            def grow(values, j):
                """`values` (the `counts[j + 1]` rows of step j + 1) padded with zero rows to step j's `counts[j]`.

                The padding comes from `counts`, not from `tf.shape(values)`: with steps known at trace time,
                Grappler's constant folding gave that shape the initial states' row count (issue 17).
                """
                return tf.pad(values, [[0, counts[j] - counts[j + 1]], [0, 0]])

            def step_back(j, carried, d_inputs, d_inner):
                d_new = [up.read(j) + grow(c, j) for up, c in zip(upstream, carried)]
                states = [array.read(j) for array in entering]
                d_x, d_i, d_direct = backward.vjp(read(j), [array.read(j) for array in inners], states, d_new)
                through_inner = backward.through_inner(d_i, weights)
                carried = [through_inner if d_direct[0] is None else through_inner + d_direct[0]]
                carried += [tf.zeros_like(s) if d is None else d for s, d in zip(states[1:], d_direct[1:])]
                d_inputs = [array.write(j, d) for array, d in zip(d_inputs, d_x)]
                return j - 1, carried, d_inputs, [array.write(j, d) for array, d in zip(d_inner, d_i)]

            # Backwards over the steps; after step 0, `carried` is the gradient of the initial states.
            gate_arrays = [tf.TensorShape(None)] * n_inputs
            _, carried, d_inputs, d_inner = tf.while_loop(
                lambda j, *_: j >= 0, step_back,
                (longest - 1, [s[:0] for s in initial], arrays([gate_like] * n_inputs), arrays([gate_like] * n_inputs)),
                shape_invariants=(tf.TensorShape([]), row_shapes, gate_arrays, gate_arrays),
            )
            d_inputs = [_concat(array, longest, gate_like) for array in d_inputs]
            if prefix:  # each row's one input fed all its steps: sum its step-major gradients
                d_inputs = _sum_by_row(d_inputs, counts)
            d_inner = [_concat(array, longest, gate_like) for array in d_inner]
            # Every step's h @ U at once.
            d_weights = backward.weight_grads(_concat(entering[0], longest, initial[0]), d_inner, weights)
            return (*d_inputs, *carried, *d_weights)

        return leaving_all, gradient

    return run(*tensors)
