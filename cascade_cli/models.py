"""Load the two saved models safely, detect B's form and check that A and B fit.

Model A maps `(batch, Ta, F)` to `(batch, Ta, H)`. Model B comes in one of two
forms, detected from its inputs:

- *step form*: `[x, s1, ..., sk] -> [y, s1', ..., sk']` with `x: (batch, H)`,
  `y: (batch, O)` and each `si'` shaped like `si` (a cell wrapped in a
  functional model);
- *sequence form*: `(batch, T, H) -> (batch, T, O)`, which must be causal.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np

from cascade_cli.errors import DataError, ModelError

@dataclasses.dataclass(frozen=True)
class ASpec:
    """What cascade needs to know about model A.

    Attributes:
        features: `F`, the input feature count (None when not fixed).
        outer_steps: `Ta` when A was saved with a fixed length, else None.
        ir_size: `H`, the size of one intermediate representation.
    """

    features: int | None
    outer_steps: int | None
    ir_size: int


@dataclasses.dataclass(frozen=True)
class BSpec:
    """What cascade needs to know about model B.

    Attributes:
        form: `"step"` or `"sequence"`.
        input_size: `H`, the size of the IR vector B is fed.
        output_size: `O`, the size of one emitted step.
        state_sizes: one size per state of a step-form B (empty otherwise).
    """

    form: str
    input_size: int
    output_size: int
    state_sizes: tuple[int, ...] = ()


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


def load_model(path, *, role="model", safe_mode=True, allow_legacy_h5=False):
    """Loads a local `.keras` file without compiling it.

    Args:
        path: the file to load.
        role: how to name the file in messages, e.g. `"model A"`.
        safe_mode: refuse to deserialize code (`Lambda` layers); Keras' own flag.
        allow_legacy_h5: also accept legacy Keras `.h5` model files.

    Returns:
        The `keras.Model`.

    Raises:
        ModelError: the path is remote, missing, a directory, not a `.keras`
            archive, or Keras cannot rebuild the model from it.
    """
    text = str(path)
    if "://" in text:  # hf://, gs://, s3://, https://, ...
        raise ModelError(
            f"{role} '{text}' is a remote path; only local .keras files are loaded. "
            "Download it first."
        )
    path = Path(text)
    if not path.exists():
        raise ModelError(f"{role} '{path}' does not exist; expected a .keras file.")
    if path.is_dir():
        kind = "a TensorFlow SavedModel directory" if (path / "saved_model.pb").exists() else "a directory"
        raise ModelError(
            f"{role} '{path}' is {kind}; only local .keras files are loaded "
            "(save the model with model.save('name.keras'))."
        )
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        if not allow_legacy_h5:
            raise ModelError(
                f"{role} '{path}' is a legacy .h5 model; only local .keras files are loaded "
                "by default. Pass --allow-legacy-h5 to load it anyway."
            )
    elif suffix != ".keras":
        raise ModelError(f"{role} '{path}' has suffix '{suffix}'; expected a .keras file.")
    elif not zipfile.is_zipfile(path):
        raise ModelError(
            f"{role} '{path}' is not a valid .keras file (not a zip archive; truncated or corrupt?)."
        )

    import keras

    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    except Exception as error:  # Keras raises many types; every one means "cannot load".
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if safe_mode and ("safe_mode" in str(error) or "Lambda" in str(error)):
            raise ModelError(
                f"{role} '{path}' contains code (a Lambda layer or similar) and safe mode refused "
                "to load it. Pass --unsafe only if you trust where the file came from."
            ) from error
        raise ModelError(f"could not load {role} '{path}': {message}") from error
    if not isinstance(model, keras.Model):
        raise ModelError(f"{role} '{path}' holds a {type(model).__name__}, expected a keras.Model.")
    return model


def _shapes(tensors):
    return [tuple(t.shape) for t in tensors]


def _dim(value):
    return None if value is None else int(value)


def inspect_a(model_a, *, role="model A"):
    """Checks that A maps `(batch, Ta, F)` to `(batch, Ta, H)` and returns its `ASpec`."""
    inputs, outputs = list(model_a.inputs), list(model_a.outputs)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"{role} must have one input (batch, Ta, F) and one output (batch, Ta, H); "
            f"received inputs {_shapes(inputs)} and outputs {_shapes(outputs)}."
        )
    in_shape, out_shape = tuple(inputs[0].shape), tuple(outputs[0].shape)
    if len(in_shape) != 3 or len(out_shape) != 3 or out_shape[-1] is None:
        raise ModelError(
            f"{role} must map (batch, Ta, F) to (batch, Ta, H); received input shape "
            f"{in_shape} and output shape {out_shape}."
        )
    return ASpec(features=_dim(in_shape[2]), outer_steps=_dim(in_shape[1]), ir_size=int(out_shape[2]))


def inspect_b(model_b, *, role="model B", check_causal=True):
    """Detects B's form and state sizes and returns its `BSpec`.

    Raises:
        ModelError: B is in neither form, its state outputs do not match its
            state inputs, or a sequence-form B is not causal.
    """
    inputs, outputs = list(model_b.inputs), list(model_b.outputs)
    in_shapes, out_shapes = _shapes(inputs), _shapes(outputs)
    expected = (
        "expected step form [x (batch, H), states...] -> [y (batch, O), states...] "
        "or sequence form (batch, T, H) -> (batch, T, O)"
    )
    if len(inputs) == 1 and len(in_shapes[0]) == 3:
        if len(outputs) != 1 or len(out_shapes[0]) != 3:
            raise ModelError(f"{role} takes a sequence but returns {out_shapes}; {expected}.")
        if in_shapes[0][2] is None or out_shapes[0][2] is None:
            raise ModelError(f"{role} must have fixed feature sizes; received {in_shapes[0]} -> {out_shapes[0]}.")
        if in_shapes[0][1] is not None:
            raise ModelError(
                f"{role} (sequence form) was saved with a fixed length T={in_shapes[0][1]}; "
                "it must accept any length (use Input(shape=(None, H)))."
            )
        spec = BSpec("sequence", int(in_shapes[0][2]), int(out_shapes[0][2]))
        if check_causal:
            _check_causal(model_b, spec, role=role)
        return spec
    if not inputs or any(len(shape) != 2 for shape in in_shapes):
        raise ModelError(f"{role} has inputs {in_shapes}; {expected}.")
    if len(outputs) != len(inputs) or any(len(shape) != 2 for shape in out_shapes):
        raise ModelError(
            f"{role} has {len(inputs)} inputs {in_shapes} but {len(outputs)} outputs {out_shapes}; "
            "a step-form B returns [y, *new_states], one new state per state input."
        )
    if in_shapes[0][1] is None or out_shapes[0][1] is None:
        raise ModelError(f"{role} must have fixed feature sizes; received {in_shapes} -> {out_shapes}.")
    for index, (state_in, state_out) in enumerate(zip(in_shapes[1:], out_shapes[1:]), start=1):
        if state_in[1] != state_out[1]:
            raise ModelError(
                f"{role} state {index}: its output has size {state_out[1]} but its input has size "
                f"{state_in[1]}; a step-form B must return each state with the size it was given."
            )
    states = tuple(int(shape[1]) for shape in in_shapes[1:])
    return BSpec("step", int(in_shapes[0][1]), int(out_shapes[0][1]), states)


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


def check_pair(model_a, model_b, *, check_causal=True):
    """Checks that A's IR size equals B's input size.

    Returns:
        `(ASpec, BSpec)`.

    Raises:
        ModelError: naming both sizes when they differ.
    """
    a_spec = inspect_a(model_a)
    b_spec = inspect_b(model_b, check_causal=check_causal)
    if a_spec.ir_size != b_spec.input_size:
        raise ModelError(
            f"model A emits IR vectors of size {a_spec.ir_size} but model B expects inputs of "
            f"size {b_spec.input_size}; they must be equal."
        )
    return a_spec, b_spec

