"""Tiny seeded Keras models and an independent eager reference for the tests."""

import numpy as np
import keras
import tensorflow as tf


def init(seed):
    return keras.initializers.RandomNormal(stddev=0.5, seed=seed)


def model_a(kind="gru", *, features=3, ir_size=4, outer_steps=None, seed=0, dtype="float32"):
    """A: `(batch, Ta, F) -> (batch, Ta, H)` with a SimpleRNN, GRU or LSTM."""
    layer = {"simple": keras.layers.SimpleRNN, "gru": keras.layers.GRU, "lstm": keras.layers.LSTM}[kind]
    inputs = keras.Input(shape=(outer_steps, features), dtype=dtype)
    outputs = layer(ir_size, return_sequences=True, kernel_initializer=init(seed), dtype=dtype,
                    recurrent_initializer=init(seed + 1), bias_initializer=init(seed + 2))(inputs)
    return keras.Model(inputs, outputs, name=f"a_{kind}")


def step_b(kind="gru", *, ir_size=4, units=5, output_size=2, seed=10, batch_size=None, dropout=0.0,
           dtype="float32"):
    """Step-form B: `[x, *states] -> [y, *states]` around a Keras cell, then Dense.

    `dtype` is the layers' dtype policy (e.g. `"mixed_float16"`; None: the global one).
    """
    cell_type = {"simple": keras.layers.SimpleRNNCell, "gru": keras.layers.GRUCell,
                 "lstm": keras.layers.LSTMCell}[kind]
    cell = cell_type(units, kernel_initializer=init(seed), recurrent_initializer=init(seed + 1),
                     bias_initializer=init(seed + 2), dropout=dropout, dtype=dtype)
    input_dtype = None if dtype is None else keras.DTypePolicy(dtype).variable_dtype  # "mixed_float16": float32
    x = keras.Input(batch_shape=(batch_size, ir_size), dtype=input_dtype)
    n_states = 2 if kind == "lstm" else 1
    states = [keras.Input(batch_shape=(batch_size, units), dtype=input_dtype) for _ in range(n_states)]
    h, new_states = cell(x, states if n_states > 1 else states[0])
    if not isinstance(new_states, (list, tuple)):
        new_states = [new_states]
    if output_size is None:  # emit the cell's output itself
        y = h
    else:
        y = keras.layers.Dense(output_size, kernel_initializer=init(seed + 3), bias_initializer=init(seed + 4),
                               dtype=dtype)(h)
    return keras.Model([x, *states], [y, *new_states], name=f"b_{kind}")


def sequence_b(*, ir_size=4, units=5, output_size=2, seed=20):
    """Sequence-form B: `(batch, T, H) -> (batch, T, O)`."""
    inputs = keras.Input(shape=(None, ir_size))
    h = keras.layers.GRU(units, return_sequences=True, kernel_initializer=init(seed),
                         recurrent_initializer=init(seed + 1), bias_initializer=init(seed + 2))(inputs)
    y = keras.layers.Dense(output_size, kernel_initializer=init(seed + 3))(h)
    return keras.Model(inputs, y, name="b_sequence")


def inputs(n, outer, features=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, outer, features)).astype("float32")


def reference(model_a, model_b, x, steps, *, state="reset", state_init="zeros",
              max_steps=None, stop=None, exclude_stop_step=False):
    """Plain eager loops, one sample, one outer step and one inner step at a time.

    Returns `(values (total, O) tf.Tensor, lengths (N, Ta) np.ndarray)` in value order.
    `stop(y) -> bool` is a Python predicate on one output vector (numpy).
    """
    ir = model_a(tf.convert_to_tensor(x))
    n_samples, outer = x.shape[0], x.shape[1]
    steps = np.broadcast_to(np.asarray(steps if steps is not None else max_steps), (n_samples, outer))
    sequence_form = len(model_b.inputs) == 1 and len(model_b.inputs[0].shape) == 3
    values, lengths = [], np.zeros((n_samples, outer), np.int64)
    for n in range(n_samples):
        if sequence_form:
            if state == "carry":
                flat = [ir[n, t] for t in range(outer) for _ in range(int(steps[n, t]))]
                if flat:
                    y = model_b(tf.stack(flat)[None])[0]
                    values.extend(y[i] for i in range(len(flat)))
                lengths[n] = steps[n]
                continue
            for t in range(outer):
                cap = int(steps[n, t])
                if cap == 0:
                    continue
                y = model_b(tf.repeat(ir[n, t][None, None], cap, axis=1))[0]
                emitted = 0
                for j in range(cap):
                    hit = stop is not None and stop(y[j].numpy())
                    if not (hit and exclude_stop_step):
                        values.append(y[j]); emitted += 1
                    if hit:
                        break
                lengths[n, t] = emitted
            continue
        sizes = [int(s.shape[-1]) for s in model_b.inputs[1:]]
        carried = [tf.zeros([1, size], ir.dtype) for size in sizes]
        for t in range(outer):
            cap = int(steps[n, t])
            if cap == 0:
                continue
            if state == "carry":
                states = carried
            elif state_init == "ir":
                states = [ir[n, t][None] for _ in sizes]
            else:
                states = [tf.zeros([1, size], ir.dtype) for size in sizes]
            emitted = 0
            for j in range(cap):
                out = model_b([ir[n, t][None], *states]) if sizes else [model_b(ir[n, t][None])]
                y, states = out[0], list(out[1:])
                hit = stop is not None and stop(y[0].numpy())
                if not (hit and exclude_stop_step):
                    values.append(y[0]); emitted += 1
                if hit:
                    break
            lengths[n, t] = emitted
            carried = states
    output_size = model_b.outputs[0].shape[-1]
    values = tf.stack(values) if values else tf.zeros([0, output_size], ir.dtype)
    return values, lengths


def feedback_b(kind="gru", *, ir_size=4, units=5, output_size=3, seed=30, dtype="float32", states=True):
    """Feedback-form B: `[x, y_prev, *states] -> Concatenate -> cell -> Dense -> [y, *states]`.

    `kind` is `"simple"`, `"gru"` or `"lstm"`; `states=False` gives a stateless
    `[x, y_prev] -> Dense -> y` (no cell).
    """
    x = keras.Input(shape=(ir_size,), dtype=dtype, name="x")
    y_prev = keras.Input(shape=(output_size,), dtype=dtype, name="y_prev")
    joined = keras.layers.Concatenate(dtype=dtype)([x, y_prev])
    if not states:
        y = keras.layers.Dense(output_size, kernel_initializer=init(seed), bias_initializer=init(seed + 1),
                               dtype=dtype)(joined)
        return keras.Model([x, y_prev], y, name="b_feedback_dense")
    cell_type = {"simple": keras.layers.SimpleRNNCell, "gru": keras.layers.GRUCell,
                 "lstm": keras.layers.LSTMCell}[kind]
    cell = cell_type(units, kernel_initializer=init(seed), recurrent_initializer=init(seed + 1),
                     bias_initializer=init(seed + 2), dtype=dtype)
    state_inputs = [keras.Input(shape=(units,), dtype=dtype) for _ in range(2 if kind == "lstm" else 1)]
    h, new_states = cell(joined, state_inputs if kind == "lstm" else state_inputs[0])
    if not isinstance(new_states, (list, tuple)):
        new_states = [new_states]
    y = keras.layers.Dense(output_size, kernel_initializer=init(seed + 3), bias_initializer=init(seed + 4),
                           dtype=dtype)(h)
    return keras.Model([x, y_prev, *state_inputs], [y, *new_states], name=f"b_feedback_{kind}")


class KillAfterEpoch(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at the end of epoch `epoch` (0-based), after the callbacks before it: a killed run."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


# Hand-made hooks of `cascade_cli.run.loop.packed_loop` (no Keras): a row is `(pair_id, x, caps)` or `(pair_id, x)`.


def accumulate(x, states):
    """A plain step: `y = s + x`, the new state is `y`."""
    y = states[0] + x
    return y, [y]


def pair_inputs(j, rows):
    """Each row's input: its `x`, the same at every step."""
    return rows[1]


def pair_advance(j, rows, states, fed, hit, finals):
    """A row stays while `j + 1 < caps` and no stop rule hit it."""
    pair_ids, _, caps = rows
    keep = j + 1 < caps
    return pair_ids, (keep if hit is None else tf.logical_and(keep, tf.logical_not(hit))), rows, states, finals
