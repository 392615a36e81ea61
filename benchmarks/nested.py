"""The two yardsticks the packed runner is measured against.

`nested_loops` is the usual hand-written answer: an outer `tf.while_loop` over
the outer steps and, inside it, a `tf.while_loop` over that outer step's longest
inner length for the whole batch, masked, writing `TensorArray`s. It does
`Ta x max_t(max_n steps)` sequential calls of B on the full batch.

`limit` is the work no runner can avoid: one call of A, plus one non-recurrent
call of B on a single batch holding every useful `(pair, step)` row.

Both take B in step form: a model `[x, s1, ..., sk] -> [y, s1', ..., sk']` with
`x: (batch, H)`, `y: (batch, O)` and each `si: (batch, Ui)`. Wrap them in
`tf.function` to time them (`make_nested_loops`, `make_limit` do).
"""

import tensorflow as tf

STATE_MODES = ("reset", "carry")


def step_spec(model_b):
    """Reads the state sizes and output size of a step-form model B.

    Args:
        model_b: a functional keras model `[x, s1, ..., sk] -> [y, s1', ..., sk']`.

    Returns:
        `(state_sizes, output_size)`: a tuple of `k` ints and an int.
    """
    state_sizes = tuple(int(spec.shape[-1]) for spec in model_b.inputs[1:])
    output_size = int(model_b.outputs[0].shape[-1])
    return state_sizes, output_size


def _call_step(model_b, x, states, *, training):
    """Calls B once; returns `(y, new_states)` whatever the number of states."""
    result = model_b([x, *states] if states else x, training=training)
    if not isinstance(result, (list, tuple)):
        result = [result]
    return result[0], list(result[1:])


def nested_loops(model_a, model_b, inputs, steps, *, state="reset", training=False):
    """Runs the cascade the hand-written way: two nested, masked while loops.

    At outer step `t` the inner loop runs `max_n steps[n, t]` times on the whole
    batch. A row whose steps are done keeps its state and emits zeros. In
    `reset` mode the state is zeroed at every outer step; in `carry` mode it
    flows from the last inner step a sample actually ran into its next outer
    step (a 0-step outer step leaves it unchanged), starting at zeros.

    Args:
        model_a: keras model `(N, Ta, F) -> (N, Ta, H)`.
        model_b: step-form keras model (see the module docstring).
        inputs: float tensor `(N, Ta, F)`.
        steps: int tensor `(N, Ta)`, every entry >= 0.
        state: `"reset"` or `"carry"`.
        training: passed to both models.

    Returns:
        `(outputs, mask)`: time-major padded `outputs` `(Ta, L, N, O)` (zeros
        past each `steps[n, t]`) and bool `mask` `(Ta, L, N)`, with
        `L = max(steps)` (0 when `steps` is empty).
    """
    if state not in STATE_MODES:
        raise ValueError(f"state must be one of {STATE_MODES}. Received: state={state!r}")
    state_sizes, output_size = step_spec(model_b)
    steps = tf.cast(steps, tf.int32)
    ir = model_a(inputs, training=training)
    ir_time_major = tf.transpose(ir, [1, 0, 2])  # (Ta, N, H)
    steps_time_major = tf.transpose(steps)  # (Ta, N)
    num_outer = tf.shape(steps)[1]
    batch = tf.shape(steps)[0]
    longest = tf.reduce_max(tf.concat([tf.reshape(steps, [-1]), [0]], axis=0))
    zero_states = [tf.zeros(tf.stack([batch, size]), ir.dtype) for size in state_sizes]
    empty_block = tf.zeros(tf.stack([0, batch, output_size]), ir.dtype)

    def inner_loop(x, lengths, states):
        """Runs one outer step: `max(lengths)` masked calls of B on the batch."""
        inner_len = tf.reduce_max(lengths)
        written = tf.TensorArray(ir.dtype, size=inner_len, element_shape=tf.TensorShape([None, output_size]))

        def body(j, states, written):
            y, new_states = _call_step(model_b, x, states, training=training)
            active = tf.expand_dims(j < lengths, 1)  # (N, 1)
            states = [tf.where(active, new, old) for new, old in zip(new_states, states)]
            written = written.write(j, tf.where(active, y, tf.zeros_like(y)))
            return j + 1, states, written

        _, states, written = tf.while_loop(lambda j, *_: j < inner_len, body, (tf.constant(0), states, written))
        block = tf.cond(inner_len > 0, written.stack, lambda: empty_block)  # (inner_len, N, O)
        block = tf.pad(block, [[0, longest - inner_len], [0, 0], [0, 0]])  # (L, N, O)
        return block, states

    def outer_body(t, states, blocks):
        start = zero_states if state == "reset" else states
        block, states = inner_loop(ir_time_major[t], steps_time_major[t], start)
        return t + 1, states, blocks.write(t, block)

    blocks = tf.TensorArray(ir.dtype, size=num_outer, element_shape=tf.TensorShape([None, None, output_size]))
    _, _, blocks = tf.while_loop(lambda t, *_: t < num_outer, outer_body, (tf.constant(0), zero_states, blocks))
    outputs = tf.cond(
        num_outer > 0,
        blocks.stack,
        lambda: tf.zeros(tf.stack([0, longest, batch, output_size]), ir.dtype),
    )
    mask = tf.range(longest)[None, :, None] < steps_time_major[:, None, :]
    return outputs, mask


def limit(model_a, model_b, inputs, steps, *, training=False):
    """Does the work no runner can avoid: A once, B once on every useful row.

    B is called once, without recurrence, on `sum(steps)` rows: each pair's IR
    repeated `steps[n, t]` times, with zero states.

    Args:
        model_a: keras model `(N, Ta, F) -> (N, Ta, H)`.
        model_b: step-form keras model (see the module docstring).
        inputs: float tensor `(N, Ta, F)`.
        steps: int tensor `(N, Ta)`, every entry >= 0.
        training: passed to both models.

    Returns:
        B's outputs `(sum(steps), O)` in value order (sample, outer, inner).
    """
    state_sizes, _ = step_spec(model_b)
    steps = tf.cast(steps, tf.int32)
    ir = model_a(inputs, training=training)
    hidden = tf.shape(ir)[-1]
    rows = tf.repeat(tf.reshape(ir, tf.stack([-1, hidden])), tf.reshape(steps, [-1]), axis=0)
    count = tf.shape(rows)[0]
    states = [tf.zeros(tf.stack([count, size]), ir.dtype) for size in state_sizes]
    y, _ = _call_step(model_b, rows, states, training=training)
    return y


def make_nested_loops(model_a, model_b, *, state="reset", training=False):
    """Returns `nested_loops` for these models as a `tf.function(inputs, steps)`."""
    return tf.function(
        lambda inputs, steps: nested_loops(model_a, model_b, inputs, steps, state=state, training=training),
        reduce_retracing=True,
    )


def make_limit(model_a, model_b, *, training=False):
    """Returns `limit` for these models as a `tf.function(inputs, steps)`."""
    return tf.function(
        lambda inputs, steps: limit(model_a, model_b, inputs, steps, training=training),
        reduce_retracing=True,
    )
