"""Detect A's and B's forms and check that A and B fit (the files load in `cascade_cli.model_files`).

Model A maps `(batch, Ta, F)` to `(batch, Ta, H)`. Model B comes in one of two
forms, detected from its inputs:

- *step form*: `[x, s1, ..., sk] -> [y, s1', ..., sk']` with `x: (batch, H)`,
  `y: (batch, O)` and each `si'` shaped like `si` (a cell wrapped in a
  functional model);
- *sequence form*: `(batch, T, H) -> (batch, T, O)`, which must be causal.

Everything is refused before any work: an A that changes the length Ta, a B
with an unknown state size or no outputs, and dtypes the runner cannot carry
(see `check_pair`); `model_files.load_pair` checks a pair as it loads it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cascade_cli.errors import DataError, ModelError, ParameterError

# The dtypes a run computes and stores in: result files and the masked loss hold these.
FLOAT_DTYPES = ("float16", "float32", "float64")
# The lengths Ta that A is probed with when its symbolic output length is unknown.
_PROBE_LENGTHS = (3, 5)
# The feedback form of B, as messages name it.
FEEDBACK_FORM = "[x (batch, H), y_prev (batch, O), states...] -> [y (batch, O), states...]"

@dataclasses.dataclass(frozen=True)
class ASpec:
    """What cascade needs to know about model A.

    Attributes:
        features: `F`, the input feature count (None when not fixed).
        outer_steps: `Ta` when A was saved with a fixed length, else None.
        ir_size: `H`, the size of one intermediate representation.
        state_sizes: A in *state form* (`[x, s1, ..., sk] -> [ir, s1', ...,
            sk']`): the size of each state, in order; empty for a plain A.
    """

    features: int | None
    outer_steps: int | None
    ir_size: int
    state_sizes: tuple[int, ...] = ()

    @property
    def form(self):
        """`"state"` for an A in state form, else `"plain"`."""
        return "state" if self.state_sizes else "plain"


@dataclasses.dataclass(frozen=True)
class BSpec:
    """What cascade needs to know about model B.

    Attributes:
        form: `"step"` or `"sequence"`.
        input_size: `H`, the size of the IR vector B is fed.
        output_size: `O`, the size of one emitted step.
        state_sizes: one size per state of a step-form B (empty otherwise);
            a feedback-form B's `y_prev` input is not a state.
        feedback: B is in feedback form (`inspect_b(..., feedback=True)`).
    """

    form: str
    input_size: int
    output_size: int
    state_sizes: tuple[int, ...] = ()
    feedback: bool = False


def check_inputs_fit(a_spec, shape, *, where="the inputs"):
    """Raises `DataError` when inputs of `shape` `(N, Ta, F)` do not fit model A.

    The one check of inputs against A, for the runner, generation and training.

    Args:
        a_spec: model A's `ASpec`.
        shape: the inputs' shape; unknown (None) sizes pass.
        where: names the inputs in messages, e.g. `"inputs in 'x.h5' (key 'inputs')"`.
    """
    shape = tuple(shape)
    if len(shape) != 3:
        raise DataError(f"{where} have shape {shape}: expected (N, Ta, F).")
    features, outer = a_spec.features, a_spec.outer_steps
    if features is not None and shape[2] is not None and shape[2] != features:
        raise DataError(
            f"{where} have F={shape[2]} features per step but model A expects F={features}; "
            f"received shape {shape}."
        )
    if outer is not None and shape[1] is not None and shape[1] != outer:
        raise DataError(
            f"model A was saved with a fixed Ta={outer} but {where} have Ta={shape[1]} (shape {shape}); "
            f"give inputs with Ta={outer} or re-save A with Input(shape=(None, F))."
        )


def _shapes(tensors):
    return [tuple(t.shape) for t in tensors]


def _dim(value):
    return None if value is None else int(value)


def inspect_a(model_a, *, role="model A"):
    """Checks that A maps `(batch, Ta, F)` to `(batch, Ta, H)` and returns its `ASpec`.

    A comes in two forms, detected from its inputs: *plain*, one input `(batch,
    Ta, F)` and one output `(batch, Ta, H)`; or *state form*, inputs `[x
    (batch, Ta, F), s1, ..., sk]` and outputs `[ir (batch, Ta, H), s1', ...,
    sk']`, each `si` `(batch, size)` and `si'` shaped like it (recurrent
    layers called with `initial_state` and `return_state=True`), so that a
    long sequence can run a window at a time with A's state carried
    (`Cascade.run(..., initial_state=..., return_state=True)`). An A with
    `stateful=True` layers is refused: its state would persist across calls
    and batches unseen.

    The output length must equal the input length: an A that pools, crops or
    upsamples over time is refused. Where the symbolic shapes leave Ta unknown,
    A's output is worked out for Ta = 3 and 5 (symbolically, else by a call on
    zeros); an A that cannot be probed that way is checked by the runner.
    """
    _refuse_stateful(model_a, role=role)
    inputs, outputs = list(model_a.inputs), list(model_a.outputs)
    state_sizes = _a_state_sizes(inputs, outputs, role=role)
    in_shape, out_shape = tuple(inputs[0].shape), tuple(outputs[0].shape)
    if len(in_shape) != 3 or len(out_shape) != 3 or out_shape[-1] is None:
        raise ModelError(
            f"{role} must map (batch, Ta, F) to (batch, Ta, H); received input shape "
            f"{in_shape} and output shape {out_shape}."
        )
    if out_shape[2] < 1:
        raise ModelError(f"{role} emits IR vectors of size H={out_shape[2]} (output shape {out_shape}); "
                         "expected H >= 1.")
    _check_a_keeps_ta(model_a, in_shape, out_shape, role=role, state_sizes=state_sizes)
    return ASpec(features=_dim(in_shape[2]), outer_steps=_dim(in_shape[1]), ir_size=int(out_shape[2]),
                 state_sizes=state_sizes)


# A's state form, as messages name it.
A_STATE_FORM = "[x (batch, Ta, F), s1, ..., sk] -> [ir (batch, Ta, H), s1', ..., sk']"


def _refuse_stateful(model_a, *, role):
    """Refuses an A with `stateful=True` layers, pointing to the state form."""
    from cascade_cli.keras_internals import flatten_layers

    stateful = [layer.name for layer in flatten_layers(model_a) if getattr(layer, "stateful", False) is True]
    if stateful:
        raise ModelError(
            f"{role} has stateful=True layers ({', '.join(repr(name) for name in stateful)}): their state would "
            "persist from one call and one batch to the next unseen, so the same inputs would give other values. "
            f"Save A in state form instead, {A_STATE_FORM} (recurrent layers called with initial_state and "
            "return_state=True, stateful=False), and carry its state with Cascade.run(..., initial_state=..., "
            "return_state=True)."
        )


def _a_state_sizes(inputs, outputs, *, role):
    """The state sizes of an A in state form (empty for a plain A); refuses any other set of inputs and outputs."""
    if len(inputs) == 1 and len(outputs) == 1:
        return ()
    in_states, out_states = [tuple(t.shape) for t in inputs[1:]], [tuple(t.shape) for t in outputs[1:]]
    fits = (len(inputs) == len(outputs) and len(inputs) > 1 and len(tuple(inputs[0].shape)) == 3
            and all(len(shape) == 2 and shape[1] is not None for shape in in_states)
            and [shape[1:] for shape in in_states] == [shape[1:] for shape in out_states])
    if not fits:
        raise ModelError(
            f"{role} must have one input (batch, Ta, F) and one output (batch, Ta, H), or be in state form "
            f"{A_STATE_FORM} with each si (batch, size) and si' shaped like si; received inputs "
            f"{_shapes(inputs)} and outputs {_shapes(outputs)}."
        )
    return tuple(int(shape[1]) for shape in in_states)


def state_form(model_a, *, tolerance=1e-5):
    """Model A in state form with A's own weights, or None where it cannot be built and shown to be A.

    Built for an A that is a chain of layers, each fed the previous one's
    output: its Keras recurrent layers (`keras.layers.RNN` and its GRU, LSTM
    and SimpleRNN; `return_sequences=True`, forward) are rebuilt from their
    config with `return_state=True`, called with `initial_state` and given A's
    weights; every other layer is reused as it is. The result `[x, s1, ...,
    sk] -> [ir, s1', ..., sk']` is kept only where, on a seeded probe input,
    it equals A whole (zero states) and cut into two windows with the state
    passed on: a layer that mixes outer steps (a convolution over time,
    attention, a backward layer) gives None. A saved with a fixed `Ta` or `F`
    gives None too.

    Args:
        model_a: a plain model A.
        tolerance: how close the probe's values must come (times their scale).
    """
    import keras

    inputs = list(model_a.inputs)
    if len(inputs) != 1 or len(model_a.outputs) != 1 or len(inputs[0].shape) != 3:
        return None
    _, outer, features = inputs[0].shape
    if outer is not None or features is None:
        return None
    dtype = inputs[0].dtype
    try:
        x = keras.Input(shape=(None, features), dtype=dtype)
        hidden, states_in, states_out, copies = x, [], [], []
        for layer in model_a.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if isinstance(layer, keras.layers.RNN):
                if not layer.return_sequences or layer.go_backwards:
                    return None
                sizes = layer.cell.state_size
                sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
                state = [keras.Input(shape=(int(size),), dtype=dtype) for size in sizes]
                copy = type(layer).from_config({**layer.get_config(), "return_state": True})
                hidden, *new_states = copy(hidden, initial_state=state if len(state) > 1 else state[0])
                states_in += state
                states_out += new_states
                copies.append((copy, layer))
            else:
                hidden = layer(hidden)
        if not states_in:
            return None
        model = keras.Model([x, *states_in], [hidden, *states_out], name=f"{model_a.name}_state_form")
        for copy, layer in copies:
            copy.set_weights(layer.get_weights())
        probe = np.random.default_rng(0).normal(size=(2, 5, features)).astype(np.dtype(dtype))
        zeros = [keras.ops.zeros((2, int(t.shape[-1])), dtype) for t in states_in]
        want = np.asarray(model_a(probe, training=False))
        first = model([keras.ops.convert_to_tensor(probe[:, :2]), *zeros], training=False)
        second = model([keras.ops.convert_to_tensor(probe[:, 2:]), *first[1:]], training=False)
        got = np.concatenate([np.asarray(first[0]), np.asarray(second[0])], axis=1)
    except Exception:  # a layer that cannot be rebuilt or called this way: no state form
        return None
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=tolerance * scale):
        return None
    return model


def _check_a_keeps_ta(model_a, in_shape, out_shape, *, role, state_sizes=()):
    """Refuses an A whose output length differs from its input length, naming both."""
    if in_shape[1] is not None and out_shape[1] is not None:
        pairs = [(in_shape[1], out_shape[1])]
    elif in_shape[2] is None:
        return  # no probe without a known F
    else:
        lengths = _PROBE_LENGTHS if in_shape[1] is None else (in_shape[1],)
        pairs = [(length, _probe_length(model_a, (in_shape[0] or 1, length, in_shape[2]), state_sizes))
                 for length in lengths]
    for given, emitted in pairs:
        if emitted is not None and emitted != given:
            raise ModelError(
                f"{role} changes the number of outer steps: given Ta={given} it emits {emitted} IR "
                f"vectors (input shape {in_shape}, output shape {out_shape}). Cascade runs B once per "
                "outer step, so A must emit one IR vector per input step (no pooling, cropping, "
                "upsampling or 'valid' convolution over time)."
            )


def _probe_length(model_a, shape, state_sizes=()):
    """A's output length for inputs of `shape`: symbolically, else by a call on zeros; None when unknown."""
    import keras

    dtype = model_a.inputs[0].dtype
    states = [(shape[0], size) for size in state_sizes]
    try:
        spec = [keras.KerasTensor(shape, dtype=dtype), *(keras.KerasTensor(s, dtype=dtype) for s in states)]
        output = model_a.compute_output_spec(spec if states else spec[0])
        length = (output[0] if states else output).shape[1]
    except Exception:  # a layer without a symbolic shape rule; call it instead
        length = None
    if length is None:
        try:
            zeros = [np.zeros(shape, dtype=np.dtype(dtype)), *(np.zeros(s, dtype=np.dtype(dtype)) for s in states)]
            output = model_a(zeros if states else zeros[0], training=False)
            length = (output[0] if states else output).shape[1]
        except Exception:  # A cannot run at this length (or at all): the runner will say so with real inputs
            return None
    return None if length is None else int(length)


def inspect_b(model_b, *, role="model B", check_causal=True, feedback=False):
    """Detects B's form and state sizes and returns its `BSpec`.

    Args:
        model_b: the model.
        role: how to name it in messages.
        check_causal: probe a sequence-form B for causality.
        feedback: B is in feedback form, `[x (batch, H), y_prev (batch, O),
            *states] -> [y (batch, O), *states]`: its second input is what it
            emitted at the previous inner step.

    Raises:
        ModelError: B is in neither form, its state outputs do not match its
            state inputs, a sequence-form B is not causal, or (feedback) B's
            second input does not have size O.
        ParameterError: `feedback` with a sequence-form B.
    """
    inputs, outputs = list(model_b.inputs), list(model_b.outputs)
    in_shapes, out_shapes = _shapes(inputs), _shapes(outputs)
    expected = (
        "expected step form [x (batch, H), states...] -> [y (batch, O), states...] "
        "or sequence form (batch, T, H) -> (batch, T, O)"
    )
    if feedback:
        expected = FEEDBACK_FORM
    if len(inputs) == 1 and len(in_shapes[0]) == 3:
        if feedback:
            raise ParameterError(
                "feedback", f"needs a step-form B ({FEEDBACK_FORM}); {role} is in sequence form {in_shapes[0]} -> "
                            f"{out_shapes[0] if out_shapes else ()}, which cannot be fed what it emitted step by step.")
        if len(outputs) != 1 or len(out_shapes[0]) != 3:
            raise ModelError(f"{role} takes a sequence but returns {out_shapes}; {expected}.")
        if in_shapes[0][2] is None or out_shapes[0][2] is None:
            raise ModelError(f"{role} must have fixed feature sizes; received {in_shapes[0]} -> {out_shapes[0]}.")
        if in_shapes[0][1] is not None:
            raise ModelError(
                f"{role} (sequence form) was saved with a fixed length T={in_shapes[0][1]}; "
                "it must accept any length (use Input(shape=(None, H)))."
            )
        _check_output_size(out_shapes[0][2], role=role, shapes=out_shapes)
        spec = BSpec("sequence", int(in_shapes[0][2]), int(out_shapes[0][2]))
        if check_causal:
            _check_causal(model_b, spec, role=role)
        return spec
    if not inputs or any(len(shape) != 2 for shape in in_shapes):
        raise ModelError(f"{role} has inputs {in_shapes}; {expected}.")
    extra = 1 if feedback else 0  # y_prev: an input with no output of its own
    if feedback and len(inputs) < 2:
        raise ModelError(f"{role} has one input {in_shapes[0]}; with feedback, {expected}.")
    if len(outputs) != len(inputs) - extra or any(len(shape) != 2 for shape in out_shapes):
        hint = ""
        if not feedback and len(outputs) == len(inputs) - 1 and len(inputs) > 1:
            hint = f" (a feedback-form B, {FEEDBACK_FORM}, needs feedback=True)"
        raise ModelError(
            f"{role} has {len(inputs)} inputs {in_shapes} but {len(outputs)} outputs {out_shapes}; "
            + ("a feedback-form B returns [y, *new_states], one new state per state input after y_prev."
               if feedback else "a step-form B returns [y, *new_states], one new state per state input.")
            + hint
        )
    if in_shapes[0][1] is None or out_shapes[0][1] is None:
        raise ModelError(f"{role} must have fixed feature sizes; received {in_shapes} -> {out_shapes}.")
    _check_output_size(out_shapes[0][1], role=role, shapes=out_shapes)
    if feedback and in_shapes[1][1] != out_shapes[0][1]:
        raise ModelError(
            f"{role}'s second input (y_prev, what it emitted at the previous inner step) has size "
            f"{in_shapes[1][1]} but B emits O={out_shapes[0][1]}; with feedback they must be equal "
            f"({FEEDBACK_FORM})."
        )
    state_shapes = in_shapes[1 + extra:]
    for index, (state_in, state_out) in enumerate(zip(state_shapes, out_shapes[1:]), start=1):
        if state_in[1] is None or state_in[1] < 1:
            raise ModelError(
                f"{role} state {index} has input shape {state_in}, an unknown or empty size; a step-form B "
                "needs every state's size fixed (e.g. Input(shape=(units,))) to start it from zeros."
            )
        if state_in[1] != state_out[1]:
            raise ModelError(
                f"{role} state {index}: its output has size {state_out[1]} but its input has size "
                f"{state_in[1]}; a step-form B must return each state with the size it was given."
            )
    states = tuple(int(shape[1]) for shape in state_shapes)
    return BSpec("step", int(in_shapes[0][1]), int(out_shapes[0][1]), states, feedback=bool(feedback))


def feedback_problem(model_b):
    """Why B does not fit the feedback form, as a sentence, or None when it does (for `inspect`)."""
    try:
        inspect_b(model_b, check_causal=False, feedback=True)
    except ParameterError as error:
        return error.problem
    except ModelError as error:
        return str(error)
    return None


def _check_output_size(size, *, role, shapes):
    if size < 1:
        raise ModelError(f"{role} emits outputs of size O={size} (output shapes {shapes}); "
                         "each inner step must emit at least one value (O >= 1).")


def _check_causal(model_b, spec, *, role, length=8, cut=4):
    """Refuses a sequence-form B whose early outputs move when late inputs change."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, length, spec.input_size)).astype("float32")
    changed = x.copy()
    changed[:, cut:] = rng.normal(size=changed[:, cut:].shape)
    before = np.asarray(model_b(x, training=False))[:, :cut]
    after = np.asarray(model_b(changed, training=False))[:, :cut]
    if not np.allclose(before, after, rtol=1e-5, atol=1e-6):
        raise ModelError(
            f"{role} (sequence form) is not causal: changing inputs at steps >= {cut} changed its "
            f"outputs at steps < {cut}. A generator must not look ahead (no Bidirectional, no "
            "non-causal convolution)."
        )


def check_pair(model_a, model_b, *, names=None, check_causal=True, feedback=False):
    """Checks that A and B fit together: sizes and dtypes.

    Mixed dtypes are refused on load rather than cast: A's IR must be a float
    (float16, float32 or float64), B's output `y` too (result files and the
    losses hold those; bfloat16 and integer outputs are refused), and a
    step-form B must return its states in the IR's dtype, because the runner
    starts them in that dtype and carries them through one compiled loop.
    Mixed precision passes when both models use it: under `mixed_float16`
    (float32 variables, float16 compute) A emits float16 IR and B returns
    float16 states. A float32 A with a `mixed_float16` B is refused (its
    float16 states would not match the float32 ones it starts from).

    Args:
        model_a: model A.
        model_b: model B.
        names: `(path_a, path_b)`, the files the models came from, named in
            messages ("model A ('a.keras')"); None names the roles only.
        check_causal: probe a sequence-form B for causality.
        feedback: B is in feedback form (`inspect_b`).

    Returns:
        `(ASpec, BSpec)`.

    Raises:
        ModelError: naming the model (and file) and both sizes or dtypes.
    """
    role_a, role_b = ("model A", "model B") if names is None else (
        f"model A ('{names[0]}')", f"model B ('{names[1]}')")
    a_spec = inspect_a(model_a, role=role_a)
    b_spec = inspect_b(model_b, role=role_b, check_causal=check_causal, feedback=feedback)
    if a_spec.ir_size != b_spec.input_size:
        raise ModelError(
            f"{role_a} emits IR vectors of size {a_spec.ir_size} but {role_b} expects inputs of "
            f"size {b_spec.input_size}; they must be equal."
        )
    _check_dtypes(model_a, model_b, form=b_spec.form, role_a=role_a, role_b=role_b)
    return a_spec, b_spec


def _dtype_name(tensor):
    import keras

    return keras.backend.standardize_dtype(tensor.dtype)


def _check_dtypes(model_a, model_b, *, form, role_a, role_b):
    """The dtype rules of `check_pair`."""
    ir, outputs = _dtype_name(model_a.outputs[0]), [_dtype_name(t) for t in model_b.outputs]
    hint = "save both models with one float dtype (or one mixed precision policy)"
    if ir not in FLOAT_DTYPES:
        raise ModelError(f"{role_a} emits {ir} IR vectors and {role_b} emits {outputs[0]} outputs; "
                         f"cascade runs float16, float32 or float64 models: {hint}.")
    if outputs[0] not in FLOAT_DTYPES:
        raise ModelError(f"{role_b} emits {outputs[0]} outputs and {role_a} emits {ir} IR vectors; cascade "
                         f"stores and trains float16, float32 or float64 outputs: {hint}.")
    if form == "step":  # its states follow y
        for index, state in enumerate(outputs[1:], start=1):
            if state != ir:
                raise ModelError(
                    f"{role_a} emits {ir} IR vectors but {role_b} returns state {index} in {state}; B's states "
                    f"start in the IR's dtype and must keep it: {hint}."
                )
