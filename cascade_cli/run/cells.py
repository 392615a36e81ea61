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
the states or `x`) gets `None` and runs through B itself. Whether the path
applies to a run is one predicate, `fast_path_problem` (the cell, its dtype
policy, the stop rule, dropout in training), behind the runner's
`fast_cells="auto"|True|False`.

Where one recurrent matmul serves every gate (all but GRU with
`reset_after=False`), a cell also gets a `Gated`: its step from the input
projection split by gate, with Keras' own one recurrent matmul split the same
way, for the loops compiled whole (`compiled_loop.Step`), which make the
projection once per pair and read each gate's rows apart: under XLA:CPU a
step that slices one wide projected tensor ran 2x slower than B's own call,
one tensor per gate 0.7-0.8 of it. With feedback the part of the projection
that `y_prev` gives is added at every step.

For the usual activations (tanh, sigmoid, linear) a cell also gets a
`Backward`: its step written gate by gate, `new_states(projected, inner(h),
states)` with `inner` holding the only matmuls (one per gate), and the
vector-Jacobian product of `new_states` written out, so that
`cascade_cli.run.recurrence` can run the backward pass with a few ops per step
instead of TensorFlow's generic while-loop gradient, and take the recurrent
weights' gradients in one matmul per gate after the loop. GRU with
`reset_after=False` (its reset gate acts before the recurrent matmul) and
other activations keep the generic gradient (`backward_problem` says why).
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from cascade_cli.keras_internals import flatten_layers, inbound_calls


RESET_BEFORE = "GRUCell(reset_after=False) applies its reset gate before the recurrent matmul"
"""Why such a cell has neither a `Backward` nor a `Gated`: its candidate's recurrent matmul reads the reset gate."""


@dataclasses.dataclass(frozen=True)
class Backward:
    """A known cell's step gate by gate, with its gradient written out.

    Every per-row tensor comes as a list with one `(rows, units)` tensor per
    gate (GRU: update, reset, candidate; LSTM: input, forget, cell, output;
    SimpleRNN: one), so that no step has to split a wide tensor.

    Attributes:
        gates: how many gates, G.
        project: `x -> [projected gates]`: the input projection.
        weights: `() -> [U_1, ..., U_G, *biases]`: the recurrent kernel's
            columns for each gate, then the recurrent bias's if any, read now.
        new_states: `(projected, inner, states) -> new_states`: the step given
            `inner = inner(states[0], weights)`.
        vjp: `(projected, inner, states, d_new_states) -> (d_projected, d_inner,
            d_states)`: the gradient of `new_states`; `d_states` holds the
            direct part only (None where there is none).
    """

    gates: int
    project: object
    weights: object
    new_states: object
    vjp: object

    def inner(self, h, weights):
        """`h @ U_g (+ bias_g)` for each gate: the only matmuls on the recurrent path."""
        return _gate_products(h, weights, self.gates)

    def through_inner(self, d_inner, weights):
        """The gradient reaching `h` through `inner`."""
        return tf.add_n([tf.matmul(d, kernel, transpose_b=True) for d, kernel in zip(d_inner, weights)])

    def weight_grads(self, h, d_inner, weights):
        """The gradients of `weights`, given every step's `h` and `d_inner` at once (one matmul per gate)."""
        grads = [tf.matmul(h, d, transpose_a=True) for d in d_inner]
        return grads + [tf.reduce_sum(d, axis=0) for d in d_inner] if len(weights) > self.gates else grads


@dataclasses.dataclass(frozen=True)
class Gated:
    """A known cell's step from its input projection split by gate (see the module docstring).

    Attributes:
        project: `x -> [(rows, units)] * gates`: `x @ kernel (+ input bias)` by gate, `x` B's step input (with
            feedback, without `y_prev`: the rows of the kernel it reads).
        step: `(projected, y_prev, states) -> (h, new_states)`; `y_prev` is None, or (feedback) what the step
            is fed, whose projection joins `projected` here.
    """

    project: object
    step: object


@dataclasses.dataclass(frozen=True)
class SplitB:
    """B taken apart: see the module docstring."""

    cell: keras.layers.Layer
    project: object
    step: object
    head: object  # a keras.Model from the cell output to y, or None when y is the cell output
    gated: Gated | None = None  # None where one recurrent matmul does not serve every gate
    backward: Backward | None = None  # None: only TensorFlow's own gradient applies
    backward_problem: str | None = None  # why `backward` is None (`backward_problem(cell)`)

    @property
    def has_dropout(self):
        return bool(getattr(self.cell, "dropout", 0.0) or getattr(self.cell, "recurrent_dropout", 0.0))


def split_b(model_b, *, feedback=False):
    """Returns a `SplitB` when B is a known cell plus a head, else None.

    With `feedback`, B is `[x, y_prev, *states]` and the cell must be called
    on `Concatenate()([x, y_prev])` (last axis): its `project` then takes
    that concatenation, `[x, y_prev]` side by side.
    """
    cells = [layer for layer in flatten_layers(model_b) if type(layer) in _KITS]
    if len(cells) != 1:
        return None
    cell = cells[0]
    calls = inbound_calls(cell)
    if len(calls) != 1:
        return None
    args, kwargs, cell_outputs = calls[0].args, calls[0].kwargs, calls[0].outputs
    if not args or set(kwargs) - {"states", "training"}:
        return None
    states = args[1] if len(args) > 1 else kwargs.get("states")
    states = list(states) if isinstance(states, (list, tuple)) else [states]
    inputs, outputs = list(model_b.inputs), list(model_b.outputs)
    fed = 2 if feedback else 1  # the inputs before the states
    first = _joined_input(model_b, args[0], inputs[:2]) if feedback else args[0] is inputs[0]
    if not first or len(states) != len(inputs) - fed or len(outputs) != len(inputs) - fed + 1:
        return None
    if any(given is not expected for given, expected in zip(states, inputs[fed:])):
        return None
    if any(given is not expected for given, expected in zip(outputs[1:], cell_outputs[1:])):
        return None
    head = None
    if outputs[0] is not cell_outputs[0]:
        try:
            head = keras.Model(cell_outputs[0], outputs[0])
        except Exception:  # the head reads more than the cell output: not splittable
            return None
    problem = backward_problem(cell)
    project, step, gated, backward = _KITS[type(cell)](cell, with_backward=problem is None)
    gated = None if gated is None else gated(inputs[1].shape[-1] if feedback else 0)
    return SplitB(cell, project, step, head, gated, backward, problem)


def _joined_input(model_b, tensor, parts):
    """Whether `tensor` is `Concatenate()(parts)` over the last axis, in that order."""
    for layer in flatten_layers(model_b):
        if type(layer) is not keras.layers.Concatenate or layer.axis not in (-1, 1):
            continue
        for call in inbound_calls(layer):
            if call.outputs and call.outputs[0] is tensor and len(call.args) == 1 and not call.kwargs:
                joined = call.args[0]
                return (isinstance(joined, (list, tuple)) and len(joined) == len(parts)
                        and all(a is b for a, b in zip(joined, parts)))
    return False


def fast_path_problem(split, *, form, ir_dtype, stop_rule, training, feedback=False, sampler="identity",
                      teacher_forced=False):
    """Why the known-cell path cannot run B, or None when it can: the one predicate behind `fast_cells`.

    Like Keras' `_do_gru_arguments_support_cudnn`: every condition the path
    needs, checked in one place. Whether its gradient is written by hand is
    `SplitB.backward_problem`; TensorFlow's own gradient serves otherwise.

    Args:
        split: `split_b(model_b)`, or None.
        form: B's form, `"step"` or `"sequence"`.
        ir_dtype: the dtype of model A's output, the cell's input.
        stop_rule: the runner's `StopRule`, or None.
        training: the run's `training` flag.
        feedback: B is in feedback form (`split` from `split_b(model_b, feedback=True)`).
        sampler: the runner's sampler kind.
        teacher_forced: (feedback) the run is fed the targets: targets given
            and no tokens asked for (where a scheduled sampling probability is
            above 0, the runner calls B itself).
    """
    if form != "step":
        return "B is in sequence form; the known-cell path runs a step-form B"
    if feedback and not teacher_forced:
        return ("B is in feedback form and fed what it emitted (free running, or tokens asked for); the "
                "known-cell path runs teacher forcing only (targets given)")
    if sampler != "identity" and not feedback:
        return f"the {sampler} sampler reads B's output at every inner step"
    if split is None:
        if feedback:
            return ("B is not one SimpleRNNCell, GRUCell or LSTMCell called on Concatenate()([x, y_prev]) and "
                    "[*states] with a head that reads only the cell's output")
        return ("B is not one SimpleRNNCell, GRUCell or LSTMCell called on [x, *states] with a head that "
                "reads only the cell's output")
    if feedback and split.backward is None:
        return f"teacher forcing runs the cell's hand-written gradient, and {split.backward_problem}"
    if stop_rule is not None:
        return "a stop rule reads B's output at every inner step"
    return _cell_problem(split, ir_dtype=ir_dtype, training=training)


def gated_problem(split, *, ir_dtype, training):
    """Why a loop compiled whole cannot run B as its known cell's `Gated` (the cell's projection once per pair),
    or None when it can: B a known cell plus a head, one recurrent matmul for every gate, and the cell's own
    conditions of `fast_path_problem` (its dtype policy, A's dtype, no dropout drawn in training). The head runs
    at every step there, so stop rules, samplers and feedback do not matter."""
    if split is None:
        return "B is not one SimpleRNNCell, GRUCell or LSTMCell and a head"
    if split.gated is None:
        return RESET_BEFORE
    return _cell_problem(split, ir_dtype=ir_dtype, training=training)


def _cell_problem(split, *, ir_dtype, training):
    """The cell's own conditions for running it apart from B: its dtype policy, A's dtype, dropout in training."""
    cell = split.cell
    if cell.compute_dtype != cell.variable_dtype:
        return (f"the cell's dtype policy {cell.dtype_policy.name} computes in {cell.compute_dtype} from "
                f"{cell.variable_dtype} weights, which only calling B casts")
    if tf.as_dtype(ir_dtype) != tf.as_dtype(cell.compute_dtype):
        return f"model A emits {tf.as_dtype(ir_dtype).name} but the cell computes in {cell.compute_dtype}"
    if training is not False and split.has_dropout:
        return "the cell's dropout draws its own masks in training"
    return None


def backward_problem(cell):
    """Why a known cell's gradient cannot be written by hand (`Backward`), or None when it can."""
    activations = [("activation", cell.activation)]
    if not isinstance(cell, keras.layers.SimpleRNNCell):
        activations.append(("recurrent_activation", cell.recurrent_activation))
    for name, activation in activations:
        if _derivative(activation) is None:
            return (f"its {name} {getattr(activation, '__name__', activation)!s} has no hand-written "
                    "derivative (tanh, sigmoid and linear do)")
    if isinstance(cell, keras.layers.GRUCell) and not cell.reset_after:
        return RESET_BEFORE
    return None


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


def _by_gate(matrix, gates):
    """Keras keeps a cell's gates side by side in a weight's last axis: one tensor per gate."""
    return tf.split(tf.convert_to_tensor(matrix), gates, axis=-1)


def _weights(kernel, gates, bias):
    """A reader of `[kernel_1, ..., kernel_G, *biases]` from a Keras kernel and bias reader."""

    def read():
        kernels = _by_gate(kernel, gates)
        return kernels if bias is None else kernels + _by_gate(bias(), gates)

    return read


def _kit(cell, gates, input_bias, recurrent_bias=None):
    """`project(x)` by gate, and the reader of the recurrent `weights`, of a cell."""
    input_weights = _weights(cell.kernel, gates, input_bias)

    def project(x):
        return _gate_products(x, input_weights(), gates)

    return project, _weights(cell.recurrent_kernel, gates, recurrent_bias)


def _gate_products(x, weights, gates):
    """`[x @ kernel_g (+ bias_g)]` for each gate, from `weights = [kernel_1, ..., kernel_G, *biases]`."""
    products = [tf.matmul(x, kernel) for kernel in weights[:gates]]
    biases = weights[gates:]
    return [p + b for p, b in zip(products, biases)] if biases else products


def _gated(cell, gates, new_states, input_bias, recurrent_bias=None):
    """`fed -> Gated` from a cell's `new_states(projected, inner, states)`, `fed` the width of `y_prev` at the end
    of the cell's input (0 without feedback): `inner` is one matmul of the output with the whole recurrent kernel
    (plus its bias, if any) split by gate, as Keras' cells compute it."""

    def gated(fed):
        def project(x):
            projected = tf.matmul(x, cell.kernel[: cell.kernel.shape[0] - fed])
            return tf.split(projected if input_bias is None else projected + input_bias(), gates, axis=1)

        def step(projected, y_prev, states):
            if y_prev is not None:
                fed_part = tf.split(tf.matmul(y_prev, cell.kernel[cell.kernel.shape[0] - fed :]), gates, axis=1)
                projected = [p + q for p, q in zip(projected, fed_part)]
            inner = tf.matmul(states[0], cell.recurrent_kernel)
            inner = inner if recurrent_bias is None else inner + recurrent_bias()
            new = new_states(projected, tf.split(inner, gates, axis=1), states)
            return new[0], new

        return Gated(project, step)

    return gated


def _bias(cell, part=None):
    """A reader of the cell's bias (or of one row of it), or None when the cell has none."""
    if not cell.use_bias:
        return None

    def read():
        return cell.bias if part is None else cell.bias[part]

    return read


def _simple_rnn(cell, *, with_backward):
    bias = _bias(cell)
    project, weights = _kit(cell, 1, bias)

    def new_states(projected, inner, states):
        return [_apply(cell.activation, projected[0] + inner[0])]

    def step(projected, states):
        [h] = new_states([projected], _gate_products(states[0], weights(), 1), states)
        return h, [h]

    derivative = _derivative(cell.activation)
    backward = None
    if with_backward:

        def vjp(projected, inner, states, d_new):
            d_pre = _times(d_new[0], derivative(new_states(projected, inner, states)[0]))
            return [d_pre], [d_pre], [None]

        backward = Backward(1, project, weights, new_states, vjp)
    return _joined(cell, bias), step, _gated(cell, 1, new_states, bias), backward


def _gru(cell, *, with_backward):
    units = cell.units
    if cell.use_bias and cell.reset_after:
        input_bias, recurrent_bias = _bias(cell, 0), _bias(cell, 1)
    else:
        input_bias, recurrent_bias = _bias(cell), None
    project, weights = _kit(cell, 3, input_bias, recurrent_bias)

    def gates(projected, inner, h_prev):
        """`(z, r, candidate, h)` of the reset-after GRU."""
        (x_z, x_r, x_h), (i_z, i_r, i_h) = projected, inner
        z = cell.recurrent_activation(x_z + i_z)
        r = cell.recurrent_activation(x_r + i_r)
        candidate = cell.activation(x_h + r * i_h)
        return z, r, candidate, z * h_prev + (1 - z) * candidate

    def new_states(projected, inner, states):
        return [gates(projected, inner, states[0])[3]]

    def step(projected, states):
        h_prev = states[0]
        x_z, x_r, x_h = tf.split(projected, 3, axis=1)
        if cell.reset_after:
            [h] = new_states([x_z, x_r, x_h], _gate_products(h_prev, weights(), 3), states)
            return h, [h]
        inner_zr = tf.matmul(h_prev, cell.recurrent_kernel[:, : 2 * units])
        z = cell.recurrent_activation(x_z + inner_zr[:, :units])
        r = cell.recurrent_activation(x_r + inner_zr[:, units:])
        candidate = cell.activation(x_h + tf.matmul(r * h_prev, cell.recurrent_kernel[:, 2 * units :]))
        h = z * h_prev + (1 - z) * candidate
        return h, [h]

    gate_derivative, derivative = _derivative(cell.recurrent_activation), _derivative(cell.activation)
    backward = None
    if with_backward:

        def vjp(projected, inner, states, d_new):
            h_prev, d_h = states[0], d_new[0]
            z, r, candidate, _ = gates(projected, inner, h_prev)
            d_candidate = _times(d_h * (1 - z), derivative(candidate))
            d_z = _times(d_h * (h_prev - candidate), gate_derivative(z))
            d_r = _times(d_candidate * inner[2], gate_derivative(r))
            return [d_z, d_r, d_candidate], [d_z, d_r, d_candidate * r], [d_h * z]

        backward = Backward(3, project, weights, new_states, vjp)
    gated = _gated(cell, 3, new_states, input_bias, recurrent_bias) if cell.reset_after else None
    return _joined(cell, input_bias), step, gated, backward


def _lstm(cell, *, with_backward):
    bias = _bias(cell)
    project, weights = _kit(cell, 4, bias)

    def gates(projected, inner, c_prev):
        """`(i, f, g, o, c, activation(c))` of the LSTM."""
        z_i, z_f, z_g, z_o = [x + h for x, h in zip(projected, inner)]
        i = cell.recurrent_activation(z_i)
        f = cell.recurrent_activation(z_f)
        g = _apply(cell.activation, z_g)
        o = cell.recurrent_activation(z_o)
        c = f * c_prev + i * g
        return i, f, g, o, c, _apply(cell.activation, c)

    def new_states(projected, inner, states):
        *_, o, c, activated = gates(projected, inner, states[1])
        return [o * activated, c]

    def step(projected, states):
        h, c = new_states(tf.split(projected, 4, axis=1), _gate_products(states[0], weights(), 4), states)
        return h, [h, c]

    gate_derivative, derivative = _derivative(cell.recurrent_activation), _derivative(cell.activation)
    backward = None
    if with_backward:

        def vjp(projected, inner, states, d_new):
            c_prev = states[1]
            d_h, d_c = d_new
            i, f, g, o, _, activated = gates(projected, inner, c_prev)
            d_c = _times(d_h * o, derivative(activated)) + d_c
            d_pre = [
                _times(d_c * g, gate_derivative(i)),
                _times(d_c * c_prev, gate_derivative(f)),
                _times(d_c * i, derivative(g)),
                _times(d_h * activated, gate_derivative(o)),
            ]
            return d_pre, d_pre, [None, d_c * f]

        backward = Backward(4, project, weights, new_states, vjp)
    return _joined(cell, bias), step, _gated(cell, 4, new_states, bias), backward


def _joined(cell, bias):
    """The one-tensor projection `SplitB.project` gives: every gate side by side, as Keras computes it."""

    def project(x):
        projected = tf.matmul(x, cell.kernel)
        return projected if bias is None else projected + bias()

    return project


_KITS = {
    keras.layers.SimpleRNNCell: _simple_rnn,
    keras.layers.GRUCell: _gru,
    keras.layers.LSTMCell: _lstm,
}
