"""An eager reference for run-time stopping with `min_steps`, several tokens and the gate.

One sample, one outer step and one inner step at a time, calling B directly;
independent of the runner (no packing, no masks).
"""

import numpy as np
import tensorflow as tf


def reference(model_a, model_b, x, caps, *, state="reset", feedback=False, sampler="identity", stop=None,
              min_steps=0, exclude_stop_step=False, fed=None):
    """Returns `(values (total, O) np.ndarray, lengths (N, Ta), tokens list)`.

    `stop(y) -> bool` is a Python predicate on one output vector (numpy), or
    on its argmax token with `sampler="greedy"` (`stop(y, token)` then); it is
    ignored while the pair has run fewer than `min_steps` steps, the step
    being tested included. With `feedback`, B is `[x, y_prev, *states]`, fed
    zeros at a pair's first step and the sampler's value of its previous `y`.
    A sequence-form B (reset only) is run once per pair on `cap` repeats.
    `fed(y) -> y_prev` (identity sampler) changes what is fed back, e.g. `without_gate`.
    """
    ir = model_a(tf.convert_to_tensor(x))
    n_samples, outer = x.shape[0], x.shape[1]
    caps = np.broadcast_to(np.asarray(caps), (n_samples, outer))
    sequence_form = len(model_b.inputs) == 1 and len(model_b.inputs[0].shape) == 3
    first_state = 2 if feedback else 1
    sizes = [] if sequence_form else [int(s.shape[-1]) for s in model_b.inputs[first_state:]]
    size = int(model_b.outputs[0].shape[-1])
    values, tokens, lengths = [], [], np.zeros((n_samples, outer), np.int64)
    for n in range(n_samples):
        carried = [tf.zeros([1, s], ir.dtype) for s in sizes]
        for t in range(outer):
            cap = int(caps[n, t])
            if cap == 0:
                continue
            states = carried if state == "carry" else [tf.zeros([1, s], ir.dtype) for s in sizes]
            y_prev = tf.zeros([1, size], ir.dtype)
            sequence = model_b(tf.repeat(ir[n, t][None, None], cap, axis=1))[0] if sequence_form else None
            emitted = 0
            for j in range(cap):
                if sequence_form:
                    y = sequence[j][None]
                else:
                    out = model_b([ir[n, t][None], y_prev, *states] if feedback else [ir[n, t][None], *states])
                    out = out if isinstance(out, (list, tuple)) else [out]
                    y, states = out[0], list(out[1:])
                row = y[0].numpy()
                token = int(np.argmax(row))
                if sampler == "greedy":
                    y_prev = tf.one_hot([token], size, dtype=ir.dtype)
                    hit = stop is not None and stop(row, token)
                else:
                    y_prev = y if fed is None else fed(y)
                    hit = stop is not None and stop(row)
                hit = hit and j + 1 >= min_steps
                if not (hit and exclude_stop_step):
                    values.append(row)
                    tokens.append(token)
                    emitted += 1
                if hit:
                    break
            lengths[n, t] = emitted
            carried = states
    values = np.stack(values) if values else np.zeros([0, size], np.float32)
    return values, lengths, tokens


def without_gate(y):
    """`y (1, O)` with its last column, a stop gate's logit, set to 0: what a gated feedback B is fed back."""
    return tf.concat([y[:, :-1], tf.zeros_like(y[:, -1:])], axis=1)


def sigmoid(value):
    return 1.0 / (1.0 + np.exp(-value))


def assert_rows_processed_equal_emitted(cascade, counter, x, caps):
    """B (a `counting_b`) processes exactly the rows the cascade emits, fewer than the caps allow."""
    run = tf.function(lambda x: cascade(x, caps))
    run(x)  # the trace counts too: count the second call only
    counter.rows.assign(0)
    out = run(x)
    emitted = int(tf.reduce_sum(out.row_lengths(axis=2)))
    assert int(counter.rows.numpy()) == emitted < caps.sum()


def assert_eager_equals_compiled(cascade, x, caps):
    """The eager call and a caller's `tf.function` give the same lengths and values."""
    eager = cascade(x, caps)
    compiled = tf.function(lambda x, s: cascade(x, s))(tf.constant(x), tf.constant(caps))
    np.testing.assert_array_equal(eager.row_lengths(axis=2).numpy(), compiled.row_lengths(axis=2).numpy())
    np.testing.assert_allclose(eager.flat_values.numpy(), compiled.flat_values.numpy(), atol=1e-6)
