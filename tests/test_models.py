"""Model checks: model files, B's form and sizes, an A that keeps Ta, dtypes, and a sequence-form B that looks ahead."""

import os
import re
import signal
import zipfile

import keras
import numpy as np
import pytest

import builders
from clitools import assert_error, assert_nothing_in, invoke
from filetools import quoted, write_h5
from cascade_cli import model_files
from cascade_cli.run import models
from cascade_cli.errors import ModelError
from cascade_cli.model_files import load_model, load_pair
from cascade_cli.run.models import check_pair, inspect_a, inspect_b
from cascade_cli.run.cascade import Cascade

NOT_CAUSAL = ("model B (sequence form) is not causal: changing inputs at steps >= 4 changed its outputs at "
              "steps < 4. A generator must not look ahead (no Bidirectional, no non-causal convolution).")


def sequence_b(middle):
    inputs = keras.Input(shape=(None, 4))
    return keras.Model(inputs, keras.layers.Dense(2)(middle(inputs)))


def test_a_bidirectional_sequence_b_is_refused_on_load():
    b = sequence_b(keras.layers.Bidirectional(keras.layers.GRU(3, return_sequences=True)))
    with pytest.raises(ModelError, match="^" + re.escape(NOT_CAUSAL) + "$"):
        inspect_b(b)
    with pytest.raises(ModelError, match=re.escape(NOT_CAUSAL)):
        Cascade(builders.model_a(), b)


def test_a_same_padded_convolution_is_refused_and_a_causal_one_accepted():
    with pytest.raises(ModelError, match=re.escape(NOT_CAUSAL)):
        inspect_b(sequence_b(keras.layers.Conv1D(3, 3, padding="same")))
    assert inspect_b(sequence_b(keras.layers.Conv1D(3, 3, padding="causal"))).form == "sequence"


def test_a_causal_sequence_b_is_accepted():
    spec = inspect_b(builders.sequence_b())
    assert (spec.form, spec.input_size, spec.output_size, spec.state_sizes) == ("sequence", 4, 2, ())
    a_spec, b_spec = check_pair(builders.model_a(), builders.sequence_b())
    assert (a_spec.ir_size, b_spec.input_size) == (4, 4)


def test_the_causality_check_can_be_skipped():
    b = sequence_b(keras.layers.Bidirectional(keras.layers.GRU(3, return_sequences=True)))
    assert inspect_b(b, check_causal=False).form == "sequence"


# ------------------------------------------------------------- A keeps Ta


def a_then(layer, *, outer_steps=None):
    inputs = keras.Input(shape=(outer_steps, 3))
    return keras.Model(inputs, layer(keras.layers.Dense(4)(inputs)))


TA_CHANGES = {  # A's last layer: (the Ta A is given, the Ta it emits)
    "pooling": (lambda: keras.layers.MaxPooling1D(2), 3, 1),
    "cropping": (lambda: keras.layers.Cropping1D((1, 1)), 3, 1),
    "upsampling": (lambda: keras.layers.UpSampling1D(2), 3, 6),
    "valid convolution": (lambda: keras.layers.Conv1D(4, 3), 3, 1),
}


@pytest.mark.parametrize("name", sorted(TA_CHANGES))
def test_an_a_that_changes_ta_is_refused_on_load_naming_both(name):
    make, given, emitted = TA_CHANGES[name]
    a = a_then(make())
    why = (f"model A changes the number of outer steps: given Ta={given} it emits {emitted} IR vectors "
           f"(input shape (None, None, 3), output shape (None, None, 4))")
    with pytest.raises(ModelError, match="^" + re.escape(why)):
        inspect_a(a)
    with pytest.raises(ModelError, match=re.escape(why)):
        Cascade(a, builders.step_b())


def test_a_fixed_ta_a_that_pools_is_refused_from_its_symbolic_shapes():
    with pytest.raises(ModelError, match=re.escape("given Ta=6 it emits 3 IR vectors")):
        inspect_a(a_then(keras.layers.MaxPooling1D(2), outer_steps=6))


def test_an_a_that_keeps_ta_is_accepted():
    assert inspect_a(a_then(keras.layers.Conv1D(4, 3, padding="causal"))).ir_size == 4
    assert inspect_a(builders.model_a(outer_steps=5)).outer_steps == 5


# ------------------------------------------------------------- B's sizes


def test_a_b_with_a_state_of_unknown_size_is_refused():
    x, state = keras.Input(shape=(4,)), keras.Input(shape=(None,))
    b = keras.Model([x, state], [keras.layers.Dense(2)(x), state])
    with pytest.raises(ModelError, match="^" + re.escape(
            "model B state 1 has input shape (None, None), an unknown or empty size")):
        inspect_b(b)


def test_a_b_that_emits_nothing_is_refused():
    x, state = keras.Input(shape=(4,)), keras.Input(shape=(5,))
    h, new_state = keras.layers.GRUCell(5)(x, state)
    step = keras.Model([x, state], [h[:, 0:0], new_state])
    with pytest.raises(ModelError, match="^" + re.escape("model B emits outputs of size O=0 (output shapes "
                                                         "[(None, 0), (None, 5)])")):
        inspect_b(step)
    inputs = keras.Input(shape=(None, 4))
    with pytest.raises(ModelError, match=re.escape("model B emits outputs of size O=0")):
        inspect_b(keras.Model(inputs, inputs[:, :, 0:0]))


# ---------------------------------------------------------------- dtypes


def int_b():
    x, state = keras.Input(shape=(4,)), keras.Input(shape=(5,))
    h, new_state = keras.layers.GRUCell(5)(x, state)
    return keras.Model([x, state], [keras.ops.cast(keras.layers.Dense(2)(h), "int32"), new_state])


DTYPES = {  # (A, B, the words of the refusal)
    "float64 A, float32 B": (lambda: builders.model_a(dtype="float64"), builders.step_b,
                             "model A emits float64 IR vectors but model B returns state 1 in float32"),
    "float32 A, float16 B": (builders.model_a, lambda: builders.step_b(dtype="float16"),
                             "model A emits float32 IR vectors but model B returns state 1 in float16"),
    "float64 A, bfloat16 B": (lambda: builders.model_a(dtype="float64"), lambda: builders.step_b(dtype="bfloat16"),
                              "model B emits bfloat16 outputs and model A emits float64 IR vectors"),
    "bfloat16 pair": (lambda: builders.model_a(dtype="bfloat16"), lambda: builders.step_b(dtype="bfloat16"),
                      "model A emits bfloat16 IR vectors and model B emits bfloat16 outputs"),
    "integer outputs": (builders.model_a, int_b, "model B emits int32 outputs and model A emits float32 IR vectors"),
    "float32 A, mixed_float16 B": (builders.model_a, lambda: builders.step_b(dtype="mixed_float16"),
                                   "model A emits float32 IR vectors but model B returns state 1 in float16"),
}


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_dtypes_the_runner_cannot_carry_are_refused_on_load_naming_both(name):
    make_a, make_b, words = DTYPES[name]
    with pytest.raises(ModelError, match="^" + re.escape(words)):
        check_pair(make_a(), make_b())


def mixed_gru_a():
    inputs = keras.Input(shape=(None, 3))
    return keras.Model(inputs, keras.layers.GRU(4, return_sequences=True, dtype="mixed_float16")(inputs))


def test_mixed_precision_and_stateless_dtype_changes_are_accepted():
    mixed_b = builders.step_b(dtype="mixed_float16")  # float32 variables, float16 states
    check_pair(mixed_gru_a(), mixed_b)  # float16 IR, float16 states
    x = keras.Input(shape=(4,), dtype="float32")
    check_pair(builders.model_a(dtype="float64"), keras.Model(x, keras.layers.Dense(2)(x)))  # no state to carry


# ------------------------------------------------------- names of files


def test_check_pair_names_the_files_when_given():
    with pytest.raises(ModelError, match="^" + re.escape(
            "model A ('a.keras') emits IR vectors of size 4 but model B ('b.keras') expects inputs of size 5")):
        check_pair(builders.model_a(), builders.step_b(ir_size=5), names=("a.keras", "b.keras"))
    with pytest.raises(ModelError, match="^" + re.escape("model A ('x/a.keras') changes the number of outer")):
        check_pair(a_then(keras.layers.MaxPooling1D(2)), builders.step_b(), names=("x/a.keras", "b.keras"))


def test_load_pair_checks_the_pair_naming_the_files(tmp_path):
    builders.model_a(dtype="float64").save(tmp_path / "a.keras")
    builders.step_b().save(tmp_path / "b.keras")
    builders.model_a().save(tmp_path / "a32.keras")
    with pytest.raises(ModelError, match="^" + re.escape(
            f"model A ('{tmp_path / 'a.keras'}') emits float64 IR vectors but model B ('{tmp_path / 'b.keras'}') "
            "returns state 1 in float32")):
        load_pair(tmp_path / "a.keras", tmp_path / "b.keras")
    model_a, model_b = load_pair(tmp_path / "a32.keras", tmp_path / "b.keras")
    assert (model_a.name, model_b.name) == ("a_gru", "b_gru")


# ---------------------------------------------------------- model files


def test_an_archive_declaring_a_huge_config_is_refused_before_keras_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "bomb.keras"
    size = model_files.ARCHIVE_JSON_LIMIT + 1
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("metadata.json", "{}")
        with archive.open("config.json", "w", force_zip64=True) as member:
            block = b" " * 2**20
            for _ in range(size // len(block)):
                member.write(block)
            member.write(b" " * (size % len(block)))
    assert path.stat().st_size < 2**20  # a small file
    assert model_files.ARCHIVE_JSON_LIMIT == 64 * 2**20

    def fail(*args, **kwargs):
        raise AssertionError("Keras was asked to read the archive")

    monkeypatch.setattr(keras.saving, "load_model", fail)
    with pytest.raises(ModelError, match="^model A " + quoted(path) + re.escape(
            f" declares a config.json of {size:,} bytes, over the 67,108,864 bytes")):
        load_model(path, role="model A")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe.keras"
    os.mkfifo(path)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("load_model blocked on a FIFO"))
    signal.alarm(20)
    try:
        with pytest.raises(ModelError, match="^model B " + quoted(path) + re.escape(
                " is not a regular file (a pipe or device?)")):
            load_model(path, role="model B")
    finally:
        signal.alarm(0)


def test_upper_case_suffixes_are_accepted(tmp_path):
    model = builders.step_b()
    model.save(tmp_path / "b.keras")
    (tmp_path / "b.keras").rename(tmp_path / "B.KERAS")
    loaded = load_model(tmp_path / "B.KERAS")
    for saved, read in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(saved, read)
    model.save(tmp_path / "legacy.h5")
    (tmp_path / "legacy.h5").rename(tmp_path / "legacy.H5")
    with pytest.raises(ModelError, match=re.escape("is a legacy .h5 model")):
        load_model(tmp_path / "legacy.H5")
    loaded = load_model(tmp_path / "legacy.H5", allow_legacy_h5=True)
    for saved, read in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(saved, read)


def test_the_command_line_refuses_such_models_on_load_in_one_line(tmp_path):
    a_then(keras.layers.MaxPooling1D(2)).save(tmp_path / "pool.keras")
    builders.model_a(dtype="float64").save(tmp_path / "a64.keras")
    builders.step_b().save(tmp_path / "b.keras")
    write_h5(tmp_path / "x.h5", inputs=builders.inputs(2, 4))
    out = tmp_path / "out"
    out.mkdir()
    for model_a, words in (("pool.keras", ["model A", "given Ta=3 it emits 1 IR vectors"]),
                           ("a64.keras", ["model A", "float64", "model B", "float32"])):
        result = invoke("generate", "--model-a", tmp_path / model_a, "--model-b", tmp_path / "b.keras",
                        "--inputs", tmp_path / "x.h5", "--steps", "1,2,0,1", "-o", out / "r.h5")
        assert_error(result, 1, *words)
        assert_nothing_in(out)


# --------------------------------------------------------------- feedback form


def test_feedback_form_is_checked_naming_sizes_and_files():
    b = builders.feedback_b(output_size=3)
    a_spec, b_spec = check_pair(builders.model_a(), b, feedback=True, names=("a.keras", "b.keras"))
    assert (b_spec.form, b_spec.output_size, b_spec.state_sizes, b_spec.feedback) == ("step", 3, (5,), True)
    with pytest.raises(ModelError, match="^" + re.escape("model B ('b.keras') has 3 inputs") + r".*needs feedback=True"):
        check_pair(builders.model_a(), b, names=("a.keras", "b.keras"))  # feedback form without feedback
    x, y_prev, state = keras.Input((4,)), keras.Input((2,)), keras.Input((5,))
    h, [new_state] = keras.layers.GRUCell(5)(keras.layers.Concatenate()([x, y_prev]), [state])
    wrong = keras.Model([x, y_prev, state], [keras.layers.Dense(3)(h), new_state])
    with pytest.raises(ModelError, match="^" + re.escape(
            "model B ('b.keras')'s second input (y_prev, what it emitted at the previous inner step) has size 2 "
            "but B emits O=3")):
        check_pair(builders.model_a(), wrong, feedback=True, names=("a.keras", "b.keras"))
    assert "has size 2 but B emits O=3" in models.feedback_problem(wrong)
    with pytest.raises(ModelError, match=r"has one input .*with feedback"):
        inspect_b(keras.Model(x, keras.layers.Dense(3)(x)), feedback=True)
    stateless = builders.feedback_b(output_size=3, states=False)
    assert inspect_b(stateless, feedback=True).state_sizes == ()
    assert models.feedback_problem(stateless) is None
