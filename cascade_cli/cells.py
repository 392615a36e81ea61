"""A faster inner step for a B that is a known Keras cell wrapped in a model.

When B is exactly `[x, *states] -> SimpleRNNCell | GRUCell | LSTMCell -> head`,
the cell's input projection `x @ kernel + bias` depends only on the IR vector,
which stays the same for every inner step of a pair. `split_b` takes such a B
apart into

- `project(x)`: the input projection, computed once per pair;
- `step(projected, states) -> (h, new_states)`: the recurrent part only;
- `head(h)`: whatever B computes from the cell output (e.g. `Dense`), applied
  once to every emitted row after the loop instead of once per inner step.

The arithmetic is the cell's own (its weights and activations); only the order
of two additions differs, so results agree with calling B to float rounding.
Any other B (extra layers before the cell, several cells, a head that reads
the states or `x`) gets `None` and runs through B itself.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class SplitB:
    """B taken apart: see the module docstring."""

    cell: keras.layers.Layer
    project: object
    step: object
    head: object  # a keras.Model from the cell output to y, or None when y is the cell output

    @property
    def has_dropout(self):
        return bool(getattr(self.cell, "dropout", 0.0) or getattr(self.cell, "recurrent_dropout", 0.0))


def split_b(model_b):
    """Returns a `SplitB` when B is a known cell plus a head, else None."""
    cells = [layer for layer in model_b._flatten_layers(include_self=False) if type(layer) in _STEPS]
    if len(cells) != 1 or len(cells[0]._inbound_nodes) != 1:
        return None
    cell = cells[0]
    node = cell._inbound_nodes[0]
    args, kwargs = node.arguments.args, node.arguments.kwargs
    if not args or set(kwargs) - {"states", "training"}:
        return None
    states = args[1] if len(args) > 1 else kwargs.get("states")
    states = list(states) if isinstance(states, (list, tuple)) else [states]
    inputs, outputs = list(model_b.inputs), list(model_b.outputs)
    if args[0] is not inputs[0] or len(states) != len(inputs) - 1 or len(outputs) != len(inputs):
        return None
    if any(given is not expected for given, expected in zip(states, inputs[1:])):
        return None
    cell_outputs = list(node.outputs)
    if any(given is not expected for given, expected in zip(outputs[1:], cell_outputs[1:])):
        return None
    head = None
    if outputs[0] is not cell_outputs[0]:
        try:
            head = keras.Model(cell_outputs[0], outputs[0])
        except Exception:  # the head reads more than the cell output: not splittable
            return None
    project, step = _STEPS[type(cell)](cell)
    return SplitB(cell, project, step, head)


def _simple_rnn(cell):
    def project(x):
        projected = tf.matmul(x, cell.kernel)
        return projected + cell.bias if cell.use_bias else projected

    def step(projected, states):
        h = projected + tf.matmul(states[0], cell.recurrent_kernel)
        if cell.activation is not None:
            h = cell.activation(h)
        return h, [h]

    return project, step


def _gru(cell):
    units = cell.units

    def biases():
        if not cell.use_bias:
            return None, None
        if cell.reset_after:
            return cell.bias[0], cell.bias[1]
        return cell.bias, None

    def project(x):
        projected = tf.matmul(x, cell.kernel)
        input_bias, _ = biases()
        return projected if input_bias is None else projected + input_bias

    def step(projected, states):
        h_prev = states[0]
        x_z, x_r, x_h = projected[:, :units], projected[:, units : 2 * units], projected[:, 2 * units :]
        if cell.reset_after:
            inner = tf.matmul(h_prev, cell.recurrent_kernel)
            _, recurrent_bias = biases()
            if recurrent_bias is not None:
                inner = inner + recurrent_bias
        else:
            inner = tf.matmul(h_prev, cell.recurrent_kernel[:, : 2 * units])
        z = cell.recurrent_activation(x_z + inner[:, :units])
        r = cell.recurrent_activation(x_r + inner[:, units : 2 * units])
        if cell.reset_after:
            recurrent_h = r * inner[:, 2 * units :]
        else:
            recurrent_h = tf.matmul(r * h_prev, cell.recurrent_kernel[:, 2 * units :])
        candidate = cell.activation(x_h + recurrent_h)
        h = z * h_prev + (1 - z) * candidate
        return h, [h]

    return project, step


def _lstm(cell):
    units = cell.units

    def project(x):
        projected = tf.matmul(x, cell.kernel)
        return projected + cell.bias if cell.use_bias else projected

    def step(projected, states):
        h_prev, c_prev = states
        z = projected + tf.matmul(h_prev, cell.recurrent_kernel)
        i = cell.recurrent_activation(z[:, :units])
        f = cell.recurrent_activation(z[:, units : 2 * units])
        c = f * c_prev + i * cell.activation(z[:, 2 * units : 3 * units])
        o = cell.recurrent_activation(z[:, 3 * units :])
        h = o * cell.activation(c)
        return h, [h, c]

    return project, step


_STEPS = {
    keras.layers.SimpleRNNCell: _simple_rnn,
    keras.layers.GRUCell: _gru,
    keras.layers.LSTMCell: _lstm,
}
