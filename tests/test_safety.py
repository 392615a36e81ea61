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

    with pytest.raises(ParameterError, match=r"^max_steps: the runner counts inner steps in int32: expected at most "
                                             r"2147483646 \(2\*\*31 - 2\), received 2147483647\.$"):
        Cascade(*pair, max_steps=2**31 - 1)


# ------------------------------------------------------------ a bool setting is a bool


@pytest.mark.parametrize("value", ["false", "no", 0, 1, None])
def test_exclude_stop_step_must_be_a_bool_in_python(pair, value):
    from cascade_cli import Cascade
    from cascade_cli.errors import ParameterError
    from cascade_cli.train.keras_model import CascadeModel

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
    assert_error(result, 1, f"could not load generator '{edited}'", "exclude_stop_step: expected one of True, False, "
                 "received 'false'")  # the key as config.json names it, not the flag
    assert not (tmp_path / "r.h5").exists()


# ----------------------------------------------------------- non-finite model outputs


def nan_b(path):
    model = builders.step_b()
    weights = model.get_weights()
    weights[-1] = np.full_like(weights[-1], np.nan)  # the head's bias: every output is NaN
    model.set_weights(weights)
    model.save(path)
    return path


def exploding_a(path):
    """A = exp(x @ ones): finite for small inputs, Inf where an input is 1000."""
    inputs = keras.Input(shape=(TA, F))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="exponential", kernel_initializer="ones")(inputs))
    model.save(path)
    return path


def test_generate_stops_at_the_first_nan_of_model_b_and_allow_nonfinite_writes_it(files, tmp_path):
    b = nan_b(tmp_path / "nan_b.keras")
    args = ["generate", "--model-a", files["a.keras"], "--model-b", b, "--inputs", files["x.h5"], "--steps", STEPS]
    assert_error(invoke(*args, "-o", tmp_path / "r.h5"), 1,
                 "model B ('", "') went non-finite at sample 0, outer step 0, inner step 0, the first non-finite "
                 "value (nan); nothing was written", "--allow-nonfinite")
    assert os.listdir(tmp_path) == ["nan_b.keras"]
    assert_ok(invoke(*args, "-o", tmp_path / "r.h5", "--allow-nonfinite"))
    result = invoke("inspect", tmp_path / "r.h5")
    assert_ok(result)
    assert "25 of 25 inner steps hold NaN or Inf values (the first at sample 0, outer step 0, inner step 0)" in (
        result.stdout)  # 5 samples x (2 + 0 + 3) steps


def test_generate_names_model_a_and_the_first_pair_it_made_non_finite(files, tmp_path):
    a = exploding_a(tmp_path / "exp_a.keras")
    inputs = np.zeros((N, TA, F), "float32")
    inputs[3, 2, 0] = 1000.0  # exp(1000) = Inf in sample 3's outer step 2 only
    write_h5(tmp_path / "x.h5", inputs=inputs)
    assert_error(invoke("generate", "--model-a", a, "--model-b", files["b.keras"], "--inputs", tmp_path / "x.h5",
                        "--steps", STEPS, "--batch-size", 2, "-o", tmp_path / "r.h5"), 1,
                 "model A ('", "at sample 3, outer step 2, inner step 0, the first non-finite value")
    assert not (tmp_path / "r.h5").exists()


def test_check_finite_outputs_finds_sample_outer_and_inner_by_hand():
    from cascade_cli.errors import CascadeError
    from cascade_cli.generation import check_finite_outputs
    from cascade_cli.result import CascadeResult

    class Finite:
        name = "finite_a"

        def __call__(self, inputs, training=False):
            return np.zeros((len(inputs), 3, 4), "float32")

    class FakeCascade:
        model_a = Finite()
        model_b = type("B", (), {"name": "my_b"})()

        def run_a(self, inputs):
            return self.model_a(inputs), []

    lengths = np.array([[2, 0, 1], [0, 3, 1]])  # value rows: (0,0,0) (0,0,1) (0,2,0) (1,1,0) (1,1,1) (1,1,2) (1,2,0)
    values = np.zeros((7, 2), "float32")
    values[4, 1] = np.inf
    values[6, 0] = np.nan
    with pytest.raises(CascadeError, match=r"^model B \('my_b'\) went non-finite at sample 11 \(input 5, draw 1\), "
                                           r"outer step 1, inner step 1, the first non-finite value \(inf\)"):
        check_finite_outputs(FakeCascade(), CascadeResult(values, lengths), np.zeros((2, 3, 3)), first_sample=10,
                             repeats=2)
    values[4, 1] = 0.0
    values[6, 0] = 0.0
    check_finite_outputs(FakeCascade(), CascadeResult(values, lengths), np.zeros((2, 3, 3)), first_sample=0)


def test_inspect_says_when_a_model_holds_non_finite_weights(files, tmp_path):
    result = invoke("inspect", nan_b(tmp_path / "nan_b.keras"))
    assert_ok(result)
    assert "non-finite weights: 2 of" in result.stdout and "NaN or Inf" in result.stdout
    clean = invoke("inspect", files["b.keras"])
    assert_ok(clean)
    assert "non-finite" not in clean.stdout


# ---------------------------------------------------------- --num-samples streams


def test_num_samples_with_per_sample_steps_streams_a_shard(files, tmp_path):
    """50 million draws of 5 inputs: the old code asked np.repeat for all N x K rows of steps (6 GB)."""
    import tracemalloc

    from cascade_cli import Cascade
    from cascade_cli.data import open_inputs
    from cascade_cli.generation import generate_to_file

    steps = np.array([[2, 0, 3], [0, 0, 0], [1, 1, 0], [3, 2, 1], [0, 4, 0]])
    cascade = Cascade(keras.saving.load_model(files["a.keras"]), keras.saving.load_model(files["b.keras"]),
                      jit_compile=False)
    tracemalloc.start()
    try:
        with open_inputs(files["x.h5"]) as source:
            summary = generate_to_file(cascade, source, steps, output=tmp_path / "r.h5", num_samples=50_000_000,
                                       shard=(123_456, 1_000_000), batch_size=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.samples == 250 and peak < 64 << 20, peak
    from cascade_cli.results_io import read_result

    result = read_result(tmp_path / "r.h5")
    first = 123_456 * 250  # the shard's first result sample; sample i runs input i // K's steps
    np.testing.assert_array_equal(result.lengths, steps[np.arange(first, first + 250) // 50_000_000])


def test_batch_ranges_of_a_huge_run_are_computed_on_demand():
    from cascade_cli.generation import BatchRange, batch_ranges

    ranges = batch_ranges(0, 8 * (2**31 - 1), batch_size=256, n_samples=8 * (2**31 - 1))
    assert len(ranges) == 67_108_864 and ranges.samples == 8 * (2**31 - 1)
    assert ranges[-1] == BatchRange(17_179_869_184 - 256, 17_179_869_176, (0, 248)) and ranges.largest == 256


def test_num_samples_above_what_a_result_holds_names_the_limit(files, tmp_path):
    assert_error(invoke("generate", *models_of(files), "--inputs", files["x.h5"], "--steps", STEPS,
                        "--num-samples", 2**62, "-o", tmp_path / "r.h5"), 1,
                 "--num-samples: expected at most 614,891,469,123,651,720 for 5 inputs of 3 outer steps (a result's "
                 "row splits are int64), received 4,611,686,018,427,387,904.")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # a real process: TensorFlow's start-up, then a kill
def test_a_sigterm_ends_a_huge_num_samples_run_at_once(files, tmp_path):
    """Before issue 34 the 67 million batch ranges were listed first: minutes before the first write, deaf to it.

    Timed with a wide margin: what is measured is that the half file goes at once, not TensorFlow's exit.
    """
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "r.h5"
    process = subprocess.Popen(
        [sys.executable, "-c", "from cascade_cli.cli import main; main()", "generate", *map(str, models_of(files)),
         "--inputs", str(files["x.h5"]), "--steps", STEPS, "--num-samples", str(2**31 - 1), "--no-xla", "-o",
         str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(name.startswith(".r.h5.cascade-tmp-") for name in os.listdir(tmp_path)):
            assert process.poll() is None and time.monotonic() < deadline, "it never started writing"
            time.sleep(0.05)
        time.sleep(0.5)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        while any(name.startswith(".r.h5.cascade-tmp-") for name in os.listdir(tmp_path)):
            assert time.monotonic() - sent < 10, "the half file was not removed within 10 s of the SIGTERM"
            time.sleep(0.05)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == 128 + signal.SIGTERM and os.listdir(tmp_path) == []


def test_a_train_run_ended_by_a_full_disk_says_so_and_keeps_the_last_backup(files, tmp_path, monkeypatch):
    import errno

    import keras

    from cascade_cli.train.checkpoints import backed_up_epoch

    out_dir = tmp_path / "run"
    saves = []
    save = keras.callbacks.BackupAndRestore._save_model

    def full_disk(self):  # the backup of epoch 2 hits a full disk
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", self._weights_path)
        save(self)

    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "_save_model", full_disk)
    result = invoke("train", *models_of(files), "--data", files["train.h5"], "--out-dir", out_dir, "--epochs", 2)
    assert_error(result, 1, "no space left on device writing", f"{out_dir / 'checkpoints'}")
    assert "memory" not in result.stderr
    assert backed_up_epoch(out_dir / "checkpoints") == 1 and not (out_dir / "model_a.keras").exists()


def test_pack_warns_of_non_finite_weights(files, tmp_path):
    b = nan_b(tmp_path / "nan_b.keras")
    result = invoke("pack", "--model-a", files["a.keras"], "--model-b", b, "--max-steps", 3, "-o", tmp_path / "g.keras")
    assert_ok(result)
    assert f"Warning: model B '{b}' has non-finite weights: 2 of" in result.stderr
    assert "Warning" not in invoke("pack", *models_of(files), "--max-steps", 3, "-o", tmp_path / "h.keras").stderr
