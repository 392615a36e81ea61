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

A step is `gates(projected, inner(h), states)`, where `inner` is the only
matmul on the recurrent path. For the usual activations (tanh, sigmoid,
linear) a cell also gets a hand-written `Backward`: the vector-Jacobian
product of `gates` written out, so that `cascade_cli.recurrence` can run the
backward pass with a few fused-size ops per step instead of TensorFlow's
generic while-loop gradient, and take the recurrent weights' gradients in one
matmul after the loop. GRU with `reset_after=False` (its reset gate acts before
the recurrent matmul) and other activations keep the generic gradient.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Backward:
    """The hand-written gradient of one known cell's step.

    Attributes:
        weights: `() -> [U, *extra]`: the recurrent kernel `U`, then any weight
            `inner` adds (GRU's recurrent bias), as tensors read now.
        inner: `(h, weights) -> inner`: `h @ U`, plus the recurrent bias if any.
        new_states: `(projected, inner, states) -> new_states`: the rest of the step.
        vjp: `(projected, inner, states, d_new_states) -> (d_projected, d_inner,
            d_states)`: the gradient of `gates` given the gradients of its new
            states; `d_states` holds the direct part only (None where there is
            none); the part through `inner` is `d_inner @ U^T`, added by the caller.
        extra_grads: `(d_inner_all) -> [grads of weights[1:]]`, summed over rows.
    """

    weights: object
    inner: object
    new_states: object
    vjp: object
    extra_grads: object


@dataclasses.dataclass(frozen=True)
class SplitB:
    """B taken apart: see the module docstring."""

    cell: keras.layers.Layer
    project: object
    step: object
    head: object  # a keras.Model from the cell output to y, or None when y is the cell output
    backward: Backward | None = None  # None: only TensorFlow's own gradient applies

    @property
    def has_dropout(self):
        return bool(getattr(self.cell, "dropout", 0.0) or getattr(self.cell, "recurrent_dropout", 0.0))


def split_b(model_b):
    """Returns a `SplitB` when B is a known cell plus a head, else None."""
    cells = [layer for layer in model_b._flatten_layers(include_self=False) if type(layer) in _KITS]
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
    project, step, backward = _KITS[type(cell)](cell)
    return SplitB(cell, project, step, head, backward)


def _derivative(activation):
    """`y -> d activation / d input` written from the activation's output `y`, or None when unknown."""
    if activation is None or activation is keras.activations.linear:
        return lambda y: None  # the identity: nothing to multiply by
    if activation is keras.activations.tanh:
        return lambda y: 1 - y * y
    if activation is keras.activations.sigmoid:
        return lambda y: y * (1 - y)
    return None


def _times(gradient, derivative):
    return gradient if derivative is None else gradient * derivative


def _apply(activation, x):
    return x if activation is None else activation(x)


def _kernel_inner(cell):
    def weights():
        return [tf.convert_to_tensor(cell.recurrent_kernel)]

    def inner(h, weights):
        return tf.matmul(h, weights[0])

    return weights, inner


def _simple_rnn(cell):
    weights, inner = _kernel_inner(cell)

    def project(x):
        projected = tf.matmul(x, cell.kernel)
        return projected + cell.bias if cell.use_bias else projected

    def gates(projected, inner_h):
        return _apply(cell.activation, projected + inner_h)

    def step(projected, states):
        h = gates(projected, inner(states[0], weights()))
        return h, [h]

    derivative = _derivative(cell.activation)
    if derivative is None:
        return project, step, None

    def vjp(projected, inner_h, states, d_new):
        h = gates(projected, inner_h)
        d_pre = _times(d_new[0], derivative(h))
        return d_pre, d_pre, [None]

    return project, step, Backward(weights, inner, lambda p, i, states: [gates(p, i)], vjp, lambda d_inner: [])


def _gru(cell):
    units = cell.units
    has_recurrent_bias = cell.use_bias and cell.reset_after

    def project(x):
        projected = tf.matmul(x, cell.kernel)
        if not cell.use_bias:
            return projected
        return projected + (cell.bias[0] if cell.reset_after else cell.bias)

    def weights():
        kernel = [tf.convert_to_tensor(cell.recurrent_kernel)]
        return kernel + [cell.bias[1]] if has_recurrent_bias else kernel

    def inner(h, weights):
        product = tf.matmul(h, weights[0])
        return product + weights[1] if has_recurrent_bias else product

    def gates(projected, inner_h, h_prev):
        """`(z, r, candidate, h)` of the reset-after GRU."""
        x_z, x_r, x_h = tf.split(projected, 3, axis=1)
        i_z, i_r, i_h = tf.split(inner_h, 3, axis=1)
        z = cell.recurrent_activation(x_z + i_z)
        r = cell.recurrent_activation(x_r + i_r)
        candidate = cell.activation(x_h + r * i_h)
        return z, r, candidate, z * h_prev + (1 - z) * candidate

    def step(projected, states):
        h_prev = states[0]
        if cell.reset_after:
            h = gates(projected, inner(h_prev, weights()), h_prev)[3]
            return h, [h]
        x_z, x_r, x_h = tf.split(projected, 3, axis=1)
        inner_zr = tf.matmul(h_prev, cell.recurrent_kernel[:, : 2 * units])
        z = cell.recurrent_activation(x_z + inner_zr[:, :units])
        r = cell.recurrent_activation(x_r + inner_zr[:, units:])
        candidate = cell.activation(x_h + tf.matmul(r * h_prev, cell.recurrent_kernel[:, 2 * units :]))
        h = z * h_prev + (1 - z) * candidate
        return h, [h]

    gate_derivative, derivative = _derivative(cell.recurrent_activation), _derivative(cell.activation)
    if not cell.reset_after or gate_derivative is None or derivative is None:
        return project, step, None

    def vjp(projected, inner_h, states, d_new):
        h_prev, d_h = states[0], d_new[0]
        z, r, candidate, _ = gates(projected, inner_h, h_prev)
        i_h = tf.split(inner_h, 3, axis=1)[2]
        d_candidate = _times(d_h * (1 - z), derivative(candidate))
        d_z = _times(d_h * (h_prev - candidate), gate_derivative(z))
        d_r = _times(d_candidate * i_h, gate_derivative(r))
        d_projected = tf.concat([d_z, d_r, d_candidate], axis=1)
        d_inner = tf.concat([d_z, d_r, d_candidate * r], axis=1)
        return d_projected, d_inner, [d_h * z]

    def extra_grads(d_inner):
        return [tf.reduce_sum(d_inner, axis=0)] if has_recurrent_bias else []

    def new_states(projected, inner_h, states):
        return [gates(projected, inner_h, states[0])[3]]

    return project, step, Backward(weights, inner, new_states, vjp, extra_grads)


def _lstm(cell):
    weights, inner = _kernel_inner(cell)

    def project(x):
        projected = tf.matmul(x, cell.kernel)
        return projected + cell.bias if cell.use_bias else projected

    def gates(projected, inner_h, c_prev):
        """`(i, f, g, o, c, activation(c))` of the LSTM."""
        z_i, z_f, z_g, z_o = tf.split(projected + inner_h, 4, axis=1)
        i = cell.recurrent_activation(z_i)
        f = cell.recurrent_activation(z_f)
        g = _apply(cell.activation, z_g)
        o = cell.recurrent_activation(z_o)
        c = f * c_prev + i * g
        return i, f, g, o, c, _apply(cell.activation, c)

    def new_states(projected, inner_h, states):
        *_, o, c, activated = gates(projected, inner_h, states[1])
        return [o * activated, c]

    def step(projected, states):
        h, c = new_states(projected, inner(states[0], weights()), states)
        return h, [h, c]

    gate_derivative, derivative = _derivative(cell.recurrent_activation), _derivative(cell.activation)
    if gate_derivative is None or derivative is None:
        return project, step, None

    def vjp(projected, inner_h, states, d_new):
        c_prev = states[1]
        d_h, d_c = d_new
        i, f, g, o, _, activated = gates(projected, inner_h, c_prev)
        d_c = _times(d_h * o, derivative(activated)) + (0 if d_c is None else d_c)
        d_pre = tf.concat([
            _times(d_c * g, gate_derivative(i)),
            _times(d_c * c_prev, gate_derivative(f)),
            _times(d_c * i, derivative(g)),
            _times(d_h * activated, gate_derivative(o)),
        ], axis=1)
        return d_pre, d_pre, [None, d_c * f]

    return project, step, Backward(weights, inner, new_states, vjp, lambda d_inner: [])


_KITS = {
    keras.layers.SimpleRNNCell: _simple_rnn,
    keras.layers.GRUCell: _gru,
    keras.layers.LSTMCell: _lstm,
}
