"""The packed recurrence of a known cell, with a hand-written backward pass.

`packed_recurrence` runs the inner loop when every row's inputs are known
before the loop (given steps, no stopping rule): step `j` runs the first
`counts[j]` rows (rows are sorted longest first), fed row-by-row inputs laid
out step-major. Its gradient is not TensorFlow's generic while-loop gradient
(which stacks every intermediate of every step and adds shape bookkeeping to
every elementwise op) but a second loop, backwards over the steps, that
recomputes each step's gates from its saved entering states and `h @ U`
(elementwise work only) and applies the cell's hand-written vector-Jacobian
product (`cells.Backward`). The recurrent weights' gradients are not summed
step by step: one matmul over every row after the loop gives them.
"""

from __future__ import annotations

import tensorflow as tf


def packed_recurrence(backward, inputs, counts, initial_states):
    """Runs a known cell over packed rows.

    Args:
        backward: the cell's `cells.Backward`.
        inputs: `(sum(counts), P)`: step `j`'s projected inputs for its
            `counts[j]` rows, one step after the other.
        counts: `(T + 1,)` int32, non-increasing, `counts[T] == 0`: rows at each step.
        initial_states: B's states for the `counts[0]` rows of step 0.

    Returns:
        Every state of every row at every step, step-major like `inputs`
        (`[h_all, ...]`; `h_all` is the cell's output).
    """
    weights = backward.weights()
    return _run(backward, len(initial_states), inputs, counts, *initial_states, *weights)


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


def _run(backward, n_states, inputs, counts, *tensors):
    @tf.custom_gradient
    def run(inputs, *tensors):
        initial, weights = list(tensors[:n_states]), list(tensors[n_states:])
        longest = tf.size(counts) - 1
        blocks = _split(inputs, counts)
        row_shapes = [tf.TensorShape([None]).concatenate(s.shape[1:]) for s in initial]
        inner_shape = backward.inner(initial[0][:0], weights).shape[1:]

        def forward(j, states, entering, leaving, inners):
            inner = backward.inner(states[0], weights)
            new_states = backward.new_states(blocks.read(j), inner, states)
            entering = [array.write(j, s) for array, s in zip(entering, states)]
            leaving = [array.write(j, s) for array, s in zip(leaving, new_states)]
            return j + 1, [s[: counts[j + 1]] for s in new_states], entering, leaving, inners.write(j, inner)

        def arrays():
            return [_empty_like(s.shape[1:], s.dtype, longest + 1) for s in initial]

        # Each state entering and leaving every step, and `inner` (kept for the gradient: no matmul again).
        _, _, entering, leaving, inners = tf.while_loop(
            lambda j, *_: j < longest, forward,
            (tf.constant(0), initial, arrays(), arrays(), _empty_like(inner_shape, inputs.dtype, longest + 1)),
            shape_invariants=(tf.TensorShape([]), row_shapes, [tf.TensorShape(None)] * n_states,
                              [tf.TensorShape(None)] * n_states, tf.TensorShape(None)),
        )
        leaving_all = [_concat(array, longest, s) for array, s in zip(leaving, initial)]

        def gradient(*upstream):
            upstream = [_split(tf.zeros_like(s) if g is None else g, counts) for g, s in zip(upstream, leaving_all)]
            d_projected_blocks = _empty_like(inputs.shape[1:], inputs.dtype, longest + 1)
            d_inner_blocks = _empty_like(inner_shape, inputs.dtype, longest + 1)

            def step_back(j, carried, d_projected_blocks, d_inner_blocks):
                rows = counts[j]
                d_new = [up.read(j) + tf.pad(c, [[0, rows - tf.shape(c)[0]], [0, 0]]) for up, c in zip(upstream, carried)]
                states = [array.read(j) for array in entering]
                d_projected, d_inner, d_direct = backward.vjp(blocks.read(j), inners.read(j), states, d_new)
                through_inner = tf.matmul(d_inner, weights[0], transpose_b=True)
                carried = [through_inner if d_direct[0] is None else through_inner + d_direct[0]]
                carried += [tf.zeros_like(s) if d is None else d for s, d in zip(states[1:], d_direct[1:])]
                return j - 1, carried, d_projected_blocks.write(j, d_projected), d_inner_blocks.write(j, d_inner)

            # Backwards over the steps; after step 0, `carried` is the gradient of the initial states.
            _, carried, d_projected_blocks, d_inner_blocks = tf.while_loop(
                lambda j, *_: j >= 0, step_back,
                (longest - 1, [s[:0] for s in initial], d_projected_blocks, d_inner_blocks),
                shape_invariants=(tf.TensorShape([]), row_shapes, tf.TensorShape(None), tf.TensorShape(None)),
            )
            d_inputs = _concat(d_projected_blocks, longest, inputs)
            d_inner = d_inner_blocks.write(longest, tf.zeros([0, *inner_shape], inputs.dtype)).concat()
            h_entering = _concat(entering[0], longest, initial[0])
            d_kernel = tf.matmul(h_entering, d_inner, transpose_a=True)  # every step's h @ U at once
            return (d_inputs, *carried, d_kernel, *backward.extra_grads(d_inner))

        return leaving_all, gradient

    return run(inputs, *tensors)
