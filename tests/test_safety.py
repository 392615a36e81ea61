"""Issue 34, "nothing destroyed, nothing silent", through the command line and the Python API.

Each test here failed on the code before the issue: a FIFO given as `-o` was
replaced by a file, an input inside an output folder was destroyed, a killed
`export-model` left its temporary folder for good, `--num-samples` grew with
N x K, non-finite model outputs were written without a word, a mistyped setting
changed meaning, a full disk read as "ran out of memory", and the Python API
raised other libraries' errors.
"""

import json
import os
import shutil
import stat
import zipfile

import keras
import numpy as np
import pytest

import builders
from clitools import assert_error, assert_ok, invoke
from filetools import write_h5

N, TA, F = 5, 3, 3
STEPS = "2,0,3"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny models, inputs, a result, a packed generator and training data, in one folder."""
    folder = tmp_path_factory.mktemp("files")
    paths = {name: folder / name for name in ("a.keras", "b.keras", "x.h5", "r.h5", "g.keras", "train.h5")}
    builders.model_a().save(paths["a.keras"])
    builders.step_b().save(paths["b.keras"])
    write_h5(paths["x.h5"], inputs=builders.inputs(N, TA))
    steps = np.array([[2, 0, 3]] * 4)
    write_h5(paths["train.h5"], inputs=builders.inputs(4, TA, seed=3), steps=steps,
             targets=np.random.default_rng(3).normal(size=(int(steps.sum()), 2)).astype("float32"))
    models = ["--model-a", paths["a.keras"], "--model-b", paths["b.keras"]]
    assert_ok(invoke("generate", *models, "--inputs", paths["x.h5"], "--steps", STEPS, "-o", paths["r.h5"]))
    assert_ok(invoke("pack", *models, "--max-steps", 3, "-o", paths["g.keras"]))
    return paths


def models_of(files):
    return ["--model-a", files["a.keras"], "--model-b", files["b.keras"]]


# ------------------------------------------------------- only regular files are replaced


@pytest.mark.parametrize("command", ["export-csv", "export-npz", "generate", "pack", "merge"])
def test_a_fifo_as_output_is_refused_and_kept_with_or_without_overwrite(files, tmp_path, command):
    suffix = {"export-csv": ".csv", "export-npz": ".npz", "pack": ".keras"}.get(command, ".h5")
    target = tmp_path / f"node{suffix}"
    os.mkfifo(target)
    args = {"export-csv": ["export", files["r.h5"]], "export-npz": ["export", files["r.h5"]],
            "generate": ["generate", *models_of(files), "--inputs", files["x.h5"], "--steps", STEPS],
            "pack": ["pack", *models_of(files), "--max-steps", 3], "merge": ["merge", files["r.h5"]]}[command]
    for extra in ([], ["--overwrite"]):
        assert_error(invoke(*args, "-o", target, *extra), 1, f"output '{target}' is a named pipe (FIFO), not a "
                     "regular file; cascade replaces only regular files, even with --overwrite; choose a file name")
    assert stat.S_ISFIFO(os.lstat(target).st_mode) and os.listdir(tmp_path) == [target.name]


# -------------------------------------------- an output location never holds an input


def test_export_model_refuses_a_folder_that_holds_the_generator(files, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    generator = shutil.copy(files["g.keras"], folder / "g.keras")
    before = generator.read_bytes()
    for extra in ([], ["--overwrite"]):
        result = invoke("export-model", generator, "--saved-model", folder, *extra)
        assert_error(result, 1, f"--saved-model '{folder}' holds '{generator}', one of this command's inputs")
        assert "overwrite" not in result.stderr
    assert os.listdir(folder) == ["g.keras"] and generator.read_bytes() == before


@pytest.mark.parametrize("inside", ["model_a", "data"])
def test_train_refuses_an_out_dir_that_holds_an_input(files, tmp_path, inside):
    out_dir = tmp_path / "d"
    (out_dir / "checkpoints").mkdir(parents=True)
    moved = {"model_a": out_dir / "model_a.keras", "data": out_dir / "checkpoints" / "data.h5"}[inside]
    shutil.copy(files["a.keras" if inside == "model_a" else "train.h5"], moved)
    before = moved.read_bytes()
    args = ["train", "--model-a", moved if inside == "model_a" else files["a.keras"], "--model-b", files["b.keras"],
            "--data", moved if inside == "data" else files["train.h5"], "--out-dir", out_dir, "--epochs", 1]
    for extra in ([], ["--overwrite"]):
        result = invoke(*args, *extra)
        assert_error(result, 1, f"--out-dir '{out_dir}' holds '{moved}', one of this command's inputs")
        assert "overwrite" not in result.stderr
    assert moved.read_bytes() == before


# --------------------------------------------- export-model's temporary folders are cleaned


def test_export_model_removes_the_temporary_folder_a_killed_export_left(files, tmp_path):
    left = tmp_path / f".sm.cascade-tmp-{os.getpid() + 100000}-0badf00d"  # an older cascade's, no lock
    (left / "variables").mkdir(parents=True)
    (left / "variables" / "variables.data-00000-of-00001").write_bytes(b"half")
    assert_ok(invoke("export-model", files["g.keras"], "--saved-model", tmp_path / "sm"))
    assert os.listdir(tmp_path) == ["sm"] and (tmp_path / "sm" / "saved_model.pb").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    assert_error(invoke("export-model", files["g.keras"], "--saved-model", mine, "--overwrite"), 1,
                 "holds files but no 'saved_model.pb'")
    assert os.listdir(mine) == ["notes.txt"]


# ------------------------------------------------------------------ a full disk


def test_a_full_disk_while_exporting_a_model_reads_as_a_full_disk(files, tmp_path, monkeypatch):
    import tensorflow as tf

    def full(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, f"{tmp_path}/sm/variables/variables.data-00000-of-00001"
                                                           ".tempstate1; No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", full)
    result = invoke("export-model", files["g.keras"], "--saved-model", tmp_path / "sm")
    assert_error(result, 1, f"no space left on device writing '{tmp_path / 'sm'}'")
    assert "memory" not in result.stderr and os.listdir(tmp_path) == []


def test_a_full_disk_from_tensorflow_outside_an_atomic_writer_reads_as_a_full_disk():
    import tensorflow as tf

    from cascade_cli.cli import _describe_failure

    error = tf.errors.ResourceExhaustedError(None, None, "logs/events.out.tfevents.1; No space left on device")
    text = _describe_failure(error)
    assert text.startswith("no space left on device (ResourceExhaustedError: logs/events") and "memory" not in text
    assert _describe_failure(OSError(28, "No space left on device", "out/x.h5")) == (
        "no space left on device writing 'out/x.h5'.")
    assert _describe_failure(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating")).startswith(
        "ran out of memory")


# ------------------------------------------------------- the Python API names the parameter


@pytest.fixture(scope="module")
def pair():
    return builders.model_a(), builders.step_b()


@pytest.mark.parametrize("given, parameter, words", [
    (("a.keras", "b"), "model_a", "expected a keras.Model, received 'a.keras' (a str); load it with "
                                  "keras.saving.load_model."),
    ((None, "b"), "model_a", "expected a keras.Model, received None."),
    (("a", 3), "model_b", "expected a keras.Model, received '3' (a int)."),
])
def test_cascade_names_a_model_argument_that_is_not_a_model(pair, given, parameter, words):
    from cascade_cli import Cascade
    from cascade_cli.errors import ParameterError

    models = [pair[0] if value == "a" else pair[1] if value == "b" else value for value in given]
    with pytest.raises(ParameterError) as error:
        Cascade(*models)
    assert str(error.value) == f"{parameter}: {words}" and error.value.parameter == parameter


@pytest.mark.parametrize("inputs, steps, error_type, words", [
    ("x", [[1, 2], [3]], "DataError", "steps from the call are ragged (rows of lengths [1, 2])"),
    ("x", "1,2,3", "DataError", "steps from the call: expected integers of shape (Ta,) or (N, Ta), received a str"),
    ([[[1.0, 2, 3]], [[1.0, 2, 3], [1, 2, 3]]], [1], "ParameterError", "inputs: expected a float array (N, Ta, F) "
                                                                       "of one shape, received a list"),
    ("ragged", [1], "ParameterError", "inputs: expected a dense array (N, Ta, F), received a RaggedTensor"),
    ("strings", [1, 1, 1], "ParameterError", "inputs: expected a float array (N, Ta, F), received dtype string."),
    (None, [1, 1, 1], "ParameterError", "inputs: expected a float array (N, Ta, F), received None."),
    ("one", [[2**31 - 1]], "ParameterError", "steps: the runner counts inner steps in int32: expected at most "
                                             "2147483646 (2**31 - 2) per pair and per call, received a step of "
                                             "2147483647."),
    ("two", [[2**30, 2**30]], "ParameterError", "expected at most 2147483646 (2**31 - 2) per pair and per call, "
                                                "received 2147483648 in all."),
])
def test_run_names_bad_inputs_and_steps(pair, inputs, steps, error_type, words):
    import tensorflow as tf

    from cascade_cli import Cascade

    cascade = Cascade(*pair, jit_compile=False)
    x = builders.inputs(2, 3)
    inputs = {"x": x, "ragged": tf.ragged.constant([[[1.0, 2, 3]], [[1.0, 2, 3], [1, 2, 3]]], ragged_rank=1),
              "strings": np.array([[["a", "b", "c"]] * 3] * 2), "one": x[:1, :1], "two": x[:1, :2]}.get(
                  inputs, inputs) if isinstance(inputs, str) or inputs is None else inputs
    with pytest.raises(Exception) as error:
        cascade.run(inputs, steps)
    assert type(error.value).__name__ == error_type and words in str(error.value), str(error.value)


def test_max_steps_at_the_int32_limit_is_refused_naming_it(pair):
    from cascade_cli import Cascade
    from cascade_cli.errors import ParameterError

    with pytest.raises(ParameterError, match=r"^max_steps: expected an integer in \[1, 2147483646\], received "
                                             r"2147483647\.$"):
        Cascade(*pair, max_steps=2**31 - 1)


# ------------------------------------------------------------ a bool setting is a bool


@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
def test_exclude_stop_step_must_be_a_bool_in_python(pair, value):
    from cascade_cli import Cascade
    from cascade_cli.errors import ParameterError
    from cascade_cli.keras_model import CascadeModel

    for cls in (Cascade, CascadeModel):
        with pytest.raises(ParameterError, match=rf"^exclude_stop_step: expected one of True, False, received "
                                                 rf"{re_escape(repr(value))}\.$"):
            cls(*pair, max_steps=3, exclude_stop_step=value)


def re_escape(text):
    import re

    return re.escape(text)


def test_a_packed_generator_whose_config_json_says_false_as_text_is_refused(files, tmp_path):
    edited = tmp_path / "g.keras"
    with zipfile.ZipFile(files["g.keras"]) as source, zipfile.ZipFile(edited, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"]["exclude_stop_step"] = "false"
                data = json.dumps(config).encode()
            target.writestr(item, data)
    result = invoke("generate", "--model", edited, "--inputs", files["x.h5"], "-o", tmp_path / "r.h5")
    assert_error(result, 1, f"could not load generator '{edited}'", "exclude-stop-step: expected one of True, False, "
                 "received 'false'")
    assert not (tmp_path / "r.h5").exists()
