"""Issue 5 through the command line: bad input, untrusted files, killed runs and bad numbers.

Each case runs `cascade` (in-process through click's `CliRunner`, or as a real
subprocess where a process must be killed) on tiny seeded models saved to a
temporary folder, and checks the exit code, the words of the one `Error: ...`
line, and that nothing is left at the output path. The cases `tests/test_cli.py`
already covers are not repeated here.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import h5py
import keras
import numpy as np
import pytest

import builders
from clitools import assert_error, assert_nothing_in, assert_ok, invoke, pretend_read_only
from filetools import write_h5
from cascade_cli.results_io import read_result, write_result
from cascade_cli.result import CascadeResult
from cascade_cli.train.checkpoints import backed_up_epoch
from cascade_cli.train.keras_model import CascadeModel

N, TA, F = 5, 3, 3
STEPS = np.array([[2, 0, 3], [0, 0, 0], [1, 1, 0], [3, 2, 1], [0, 4, 0]])
CASCADE = [sys.executable, "-c", "from cascade_cli.cli import main; main()"]  # the `cascade` entry point
PROCESS_TIMEOUT = 300


def train_arrays(n=4, seed=3):
    """`(inputs (n, Ta, F), steps (n, Ta), flat targets (sum(steps), 2))`."""
    steps = np.tile(STEPS, (n // len(STEPS) + 1, 1))[:n]
    targets = np.random.default_rng(seed).normal(size=(int(steps.sum()), 2)).astype("float32")
    return builders.inputs(n, TA, seed=seed), steps, targets


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny models (also as a legacy .h5 and with a Lambda layer), inputs and training data."""
    folder = tmp_path_factory.mktemp("files")
    paths = {name: folder / name for name in ("a.keras", "b.keras", "a.h5", "lambda.h5", "x.h5", "train.h5")}
    model_a = builders.model_a()
    model_a.save(paths["a.keras"])
    model_a.save(paths["a.h5"])  # Keras' legacy HDF5 model format
    builders.step_b().save(paths["b.keras"])
    inputs = keras.Input(shape=(None, F))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(builders.model_a()(inputs))).save(paths["lambda.h5"])
    write_h5(paths["x.h5"], inputs=builders.inputs(N, TA))
    inputs, steps, targets = train_arrays()
    write_h5(paths["train.h5"], inputs=inputs, steps=steps, targets=targets)
    return paths


def generate(files, out, *extra, model_a=None, model_b=None, inputs=None):
    return invoke("generate", "--model-a", model_a or files["a.keras"], "--model-b", model_b or files["b.keras"],
                  "--inputs", inputs or files["x.h5"], "-o", out, *extra)


def train(files, out_dir, *extra, data=None, model_a=None):
    return invoke("train", "--model-a", model_a or files["a.keras"], "--model-b", files["b.keras"],
                  "--data", data or files["train.h5"], "--out-dir", out_dir, *extra)


def out_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return out


def weights_of(path):
    return [np.asarray(w) for w in keras.saving.load_model(path, compile=False).get_weights()]


def assert_same_weights(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)


# ------------------------------------------------------------- model files


def bad_model(folder, files, case):
    """Builds one bad model file (or names a remote one) in `folder` and returns its path."""
    path = folder / {"bytes": "bytes.keras", "truncated": "truncated.keras", "folder": "plain_dir",
                     "savedmodel": "saved", "not-keras-zip": "other.keras", "keras-dir": "dir.keras"}.get(case, "x")
    if case == "bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "truncated":
        whole = files["b.keras"].read_bytes()
        path.write_bytes(whole[: len(whole) * 2 // 3])
    elif case in ("folder", "keras-dir"):
        path.mkdir()
    elif case == "savedmodel":
        (path / "variables").mkdir(parents=True)
        (path / "saved_model.pb").write_bytes(b"\x08\x01")
        (path / "fingerprint.pb").write_bytes(b"")
    elif case == "not-keras-zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "a zip, but not a Keras archive")
    else:
        return case  # a remote path
    return path


@pytest.mark.parametrize("case, words", [
    ("bytes", ["bytes.keras' is not a valid .keras file (not a zip archive"]),
    ("truncated", ["truncated.keras' is not a valid .keras file (not a zip archive; truncated or corrupt?)"]),
    ("folder", ["plain_dir' is a directory; only local .keras files are loaded"]),
    ("keras-dir", ["dir.keras' is a directory; only local .keras files are loaded"]),
    ("savedmodel", ["saved' is a TensorFlow SavedModel directory; only local .keras files are loaded"]),
    ("not-keras-zip", ["could not load model B", "other.keras'"]),
    ("hf://someone/model.keras", ["'hf://someone/model.keras' is a remote path; only local .keras files are loaded"]),
    ("gs://bucket/model.keras", ["'gs://bucket/model.keras' is a remote path; only local .keras files are loaded"]),
])
def test_bad_model_b_exits_1_naming_the_file(files, tmp_path, case, words):
    out = out_folder(tmp_path)
    path = bad_model(tmp_path, files, case)
    assert_error(generate(files, out / "r.h5", "--steps", "1,2,3", model_b=path), 1, "model B", *words)
    assert_nothing_in(out)


@pytest.mark.parametrize("case", ["bytes", "savedmodel", "gs://bucket/model.keras"])
def test_bad_model_files_through_train_and_inspect(files, tmp_path, case):
    path = bad_model(tmp_path, files, case)
    result = train(files, tmp_path / "run", model_a=path)
    assert_error(result, 1, "model A", str(path))
    assert not (tmp_path / "run").exists()
    assert_error(invoke("inspect", path), 1, str(path))


def test_a_legacy_h5_model_needs_allow_legacy_h5_and_then_matches_the_keras_file(files, tmp_path):
    out = out_folder(tmp_path)
    assert_error(generate(files, out / "r.h5", "--steps", "1,2,3", model_a=files["a.h5"]), 1,
                 f"model A '{files['a.h5']}' is a legacy .h5 model", "Pass --allow-legacy-h5")
    assert_nothing_in(out)
    assert_ok(generate(files, out / "legacy.h5", "--steps", "1,2,3", "--allow-legacy-h5", model_a=files["a.h5"]))
    assert_ok(generate(files, out / "keras.h5", "--steps", "1,2,3"))
    legacy, modern = read_result(out / "legacy.h5"), read_result(out / "keras.h5")
    assert legacy.total == 6 * N
    np.testing.assert_array_equal(legacy.lengths, modern.lengths)
    np.testing.assert_array_equal(legacy.values, modern.values)


def test_allow_legacy_h5_keeps_safe_mode_on(files, tmp_path):
    out = out_folder(tmp_path)
    result = generate(files, out / "r.h5", "--steps", "1,2,3", "--allow-legacy-h5", model_a=files["lambda.h5"])
    assert_error(result, 1, "lambda.h5' contains code", "--unsafe")
    assert_nothing_in(out)


def crafted_keras(path, config):
    """A `.keras` archive whose `config.json` is `config`, as an attacker would write it."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": keras.__version__, "date_saved": "now"}))
        archive.writestr("config.json", json.dumps(config))
    return path


def payloads(marker):
    """Configs that would run `touch marker` if a loader trusted the modules they name."""
    command = f"touch {marker}"
    call = {"module": "os", "class_name": "system", "config": {"command": command}, "registered_name": "system"}
    popen = {"module": "subprocess", "class_name": "Popen", "config": {"args": ["touch", str(marker)]},
             "registered_name": "Popen"}
    activation = {"module": "keras", "class_name": "Sequential", "registered_name": None, "config": {
        "name": "s", "layers": [
            {"module": "keras.layers", "class_name": "InputLayer",
             "config": {"batch_shape": [None, 3, 3], "name": "i"}},
            {"module": "keras.layers", "class_name": "Activation", "config": {"name": "act", "activation": {
                "module": "os", "class_name": "function", "config": "system", "registered_name": "function"}}}]}}
    return {"os.system": call, "subprocess.Popen": popen, "activation os.system": activation}


@pytest.mark.parametrize("name", ["os.system", "subprocess.Popen", "activation os.system"])
def test_a_keras_file_naming_code_outside_keras_is_refused_and_runs_nothing(files, tmp_path, name):
    marker = tmp_path / "ran"
    path = crafted_keras(tmp_path / "evil.keras", payloads(marker)[name])
    out = out_folder(tmp_path)
    for extra in ([], ["--unsafe"]):  # not even with safe mode off: Keras loads classes from its own modules only
        assert_error(generate(files, out / "r.h5", "--steps", "1,2,3", *extra, model_b=path), 1,
                     f"could not load model B '{path}'")
        assert not marker.exists()
    assert_nothing_in(out)


# ------------------------------------------------------------------ inputs


def external_storage(folder, name, key, array):
    """An HDF5 file whose dataset `key` keeps its bytes in a raw file beside it."""
    raw = folder / f"{name}.raw"
    raw.write_bytes(np.ascontiguousarray(array).tobytes())
    path = folder / name
    with h5py.File(path, "w") as f:
        f.create_dataset(key, shape=array.shape, dtype=array.dtype, external=[(str(raw), 0, raw.stat().st_size)])
    return path


def virtual(folder, name, key, array):
    """An HDF5 file whose dataset `key` is a virtual dataset over another file."""
    source = write_h5(folder / f"{name}.source.h5", data=array)
    layout = h5py.VirtualLayout(shape=array.shape, dtype=array.dtype)
    layout[...] = h5py.VirtualSource(str(source), "data", shape=array.shape)
    path = folder / name
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset(key, layout)
    return path


def external_link(folder, name, key, array):
    write_h5(folder / f"{name}.target.h5", data=array)
    path = folder / name
    with h5py.File(path, "w") as f:
        f[key] = h5py.ExternalLink(f"{name}.target.h5", "data")
    return path


def test_outside_storage_is_readable_by_h5py_so_the_refusal_is_real(tmp_path):
    array = builders.inputs(2, TA)
    for make in (external_storage, virtual, external_link):
        path = make(tmp_path, f"{make.__name__}.h5", "inputs", array)
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(f["inputs"][()], array)


@pytest.mark.parametrize("make, words", [
    (external_storage, ["dataset 'inputs' in '", "keeps its data in external files"]),
    (virtual, ["dataset 'inputs' in '", "is a virtual dataset"]),
])
def test_generate_refuses_inputs_stored_outside_the_file(files, tmp_path, make, words):
    out = out_folder(tmp_path)
    path = make(tmp_path, "x.h5", "inputs", builders.inputs(N, TA))
    assert_error(generate(files, out / "r.h5", "--steps", "1,2,3", inputs=path), 1, *words,
                 "nothing outside the file is read")
    assert_nothing_in(out)


@pytest.mark.parametrize("make, words", [
    (external_storage, ["dataset 'steps' in '", "keeps its data in external files"]),
    (virtual, ["dataset 'steps' in '", "is a virtual dataset"]),
    (external_link, ["links 'steps' to another file"]),
])
def test_generate_refuses_a_steps_file_stored_outside_the_file(files, tmp_path, make, words):
    out = out_folder(tmp_path)
    path = make(tmp_path, "s.h5", "steps", STEPS)
    assert_error(generate(files, out / "r.h5", "--steps-file", path), 1, *words, "nothing outside the file is read")
    assert_nothing_in(out)


@pytest.mark.parametrize("make, key", [
    (external_storage, "inputs"), (virtual, "steps"), (external_link, "targets"), (virtual, "targets")])
def test_train_refuses_data_stored_outside_the_file(files, tmp_path, make, key):
    arrays = dict(zip(("inputs", "steps", "targets"), train_arrays()))
    path = make(tmp_path, "train.h5", key, arrays.pop(key))
    with h5py.File(path, "a") as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=value)
    assert_error(train(files, tmp_path / "run", data=path), 1, f"'{key}'", "nothing outside the file is read")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, array, words", [
    ("inf.h5", np.where(np.arange(N * TA * F).reshape(N, TA, F) == 20, np.inf, 0).astype("float32"),
     ["(key 'inputs') sample 2: expected finite values, received inf"]),
    ("neg_inf.npy", np.where(np.arange(N * TA * F).reshape(N, TA, F) == 40, -np.inf, 0).astype("float32"),
     ["neg_inf.npy' sample 4: expected finite values, received -inf"]),
    ("nan.npz", np.where(np.arange(N * TA * F).reshape(N, TA, F) == 9, np.nan, 0).astype("float32"),
     ["nan.npz' (key 'inputs') sample 1: expected finite values, received nan"]),
    ("big.h5", np.full((N, TA, F), 1e300), ["sample 0: expected finite values, received inf"]),  # float32 overflow
    ("f4.npy", np.zeros((N, TA, 4), np.float32), ["F=4 features per step but model A expects F=3", "(5, 3, 4)"]),
    ("strings.h5", np.full((N, TA, F), b"x"), ["dataset 'inputs' in '", "has dtype |S1: expected"]),
    ("objects.npy", np.array([[[{"code": "run"}]]], dtype=object), ["objects.npy' holds Python objects"]),
    ("complex.npy", np.zeros((N, TA, F), np.complex64), ["complex64: expected integers or floating-point"]),
])
def test_bad_input_values_exit_1_naming_file_key_and_shape(files, tmp_path, name, array, words):
    path = tmp_path / name
    if name.endswith(".h5"):
        write_h5(path, inputs=array)
    elif name.endswith(".npz"):
        np.savez(path, inputs=array)
    else:
        np.save(path, array, allow_pickle=array.dtype == object)
    out = out_folder(tmp_path)
    assert_error(generate(files, out / "r.h5", "--steps", "1,2,3", inputs=path), 1, *words)
    assert_nothing_in(out)


def test_a_steps_file_of_python_objects_is_refused(files, tmp_path):
    np.save(tmp_path / "s.npy", np.array([1, "2", None], dtype=object), allow_pickle=True)
    out = out_folder(tmp_path)
    assert_error(generate(files, out / "r.h5", "--steps-file", tmp_path / "s.npy"), 1,
                 "s.npy' holds Python objects", "pickles are never loaded")
    assert_nothing_in(out)


# ------------------------------------------------------------------- steps


@pytest.mark.parametrize("steps, words", [
    ([[2, 0, 3], [0, 0, 0], [1, 1, 0], [3, 5, 1], [0, 4, 0]],
     ["s.npy' at index (3, 1): expected at most --max-steps 4, received 5"]),
    ([[1, 2, 3]] * 4, ["have shape (4, 3)", "expected (Ta,)=(3,) or (N, Ta)=(5, 3)"]),
    ([[1, -1, 3]] * 5, ["s.npy'", "received -1"]),
])
def test_steps_file_above_the_cap_or_of_the_wrong_shape(files, tmp_path, steps, words):
    np.save(tmp_path / "s.npy", np.array(steps, np.int64))
    out = out_folder(tmp_path)
    assert_error(generate(files, out / "r.h5", "--max-steps", 4, "--stop-norm", 1.0, "--steps-file",
                          tmp_path / "s.npy"), 1, *words)
    assert_nothing_in(out)


@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(targets=d["targets"][:-1]), ["targets in '", "have 12 rows, expected sum(steps) = 13"]),
    (lambda d: d.update(targets=np.zeros((14, 2), np.float32)), ["have 14 rows, expected sum(steps) = 13"]),
    (lambda d: d.update(steps=d["steps"] - 1), ["(key 'steps')", "received -1"]),
    (lambda d: d.update(steps=d["steps"] + 0.5), ["(key 'steps')", "received 2.5"]),
    (lambda d: d.update(steps=d["steps"][:, :2]), ["steps in '", "have shape (4, 2): expected (N, Ta)=(4, 3)"]),
    (lambda d: d.pop("targets"), ["has no dataset 'targets'"]),
    (lambda d: d.update(inputs=d["inputs"][..., :2]), ["F=2", "F=3"]),
    (lambda d: d.update(inputs=d["inputs"].astype("S8")), ["dataset 'inputs' in '", "dtype |S8"]),
    (lambda d: d.update(targets=np.where(np.arange(26).reshape(13, 2) == 7, np.inf, d["targets"])),
     ["(key 'targets') row 3 (sample 0): expected finite values, received inf"]),
])
def test_bad_training_data_exits_1_before_any_work(files, tmp_path, change, words):
    datasets = dict(zip(("inputs", "steps", "targets"), train_arrays()))
    change(datasets)
    path = write_h5(tmp_path / "bad.h5", **datasets)
    assert_error(train(files, tmp_path / "run", data=path), 1, *words)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_training_data_that_is_not_hdf5_or_is_truncated(files, tmp_path):
    (tmp_path / "text.h5").write_text("inputs,steps,targets\n")
    whole = files["train.h5"].read_bytes()
    (tmp_path / "cut.h5").write_bytes(whole[: len(whole) // 2])
    for name in ("text.h5", "cut.h5"):
        assert_error(train(files, tmp_path / "run", data=tmp_path / name), 1,
                     f"'{tmp_path / name}' is not a readable HDF5 file")
    assert_error(train(files, tmp_path / "run", data=tmp_path), 1, f"'{tmp_path}' is a directory: expected")
    assert not (tmp_path / "run").exists()


def test_non_finite_training_data_leaves_no_out_dir(files, tmp_path):
    inputs, steps, targets = train_arrays()
    targets[3, 1] = np.inf
    path = write_h5(tmp_path / "bad.h5", inputs=inputs, steps=steps, targets=targets)
    assert_error(train(files, tmp_path / "run", data=path), 1, "row 3 (sample 0): expected finite values")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ outputs


def test_an_output_folder_that_cannot_be_made_or_written(files, tmp_path, monkeypatch):
    # a missing folder is made (tests/test_first_minutes.py); one under a file cannot be
    write_result(tmp_path / "r.h5", CascadeResult(np.zeros((3, 2), np.float32), [[1, 2]]))
    (tmp_path / "file").write_text("")
    assert_error(generate(files, tmp_path / "file" / "missing" / "r.h5", "--steps", "1,2,3"), 1,
                 f"output folder '{tmp_path / 'file' / 'missing'}' cannot be created: '{tmp_path / 'file'}' is a file")
    assert_error(invoke("export", tmp_path / "r.h5", "-o", tmp_path / "file" / "r.npz"), 1,
                 f"output folder '{tmp_path / 'file'}' is a file")

    locked = out_folder(tmp_path)
    pretend_read_only(monkeypatch, locked)  # root (as CI runs) writes anywhere
    try:
        # the models do not exist either: the folder is refused before any work
        assert_error(generate(files, locked / "r.h5", "--steps", "1,2,3", model_a=tmp_path / "nope.keras"), 1,
                     f"output folder '{locked}' is not writable")
        assert_error(invoke("export", tmp_path / "r.h5", "-o", locked / "r.csv"), 1, "is not writable")
        assert_error(train(files, locked, model_a=tmp_path / "nope.keras"), 1, f"--out-dir: '{locked}' is not writable")
        assert_error(train(files, locked / "run", model_a=tmp_path / "nope.keras"), 1,
                     f"cannot be created: '{locked}' is not writable")
    finally:
        locked.chmod(0o700)
    assert_nothing_in(locked)


def test_export_output_that_exists_is_kept(files, tmp_path):
    write_result(tmp_path / "r.h5", CascadeResult(np.zeros((3, 2), np.float32), [[1, 2]]))
    (tmp_path / "out.npz").write_bytes(b"keep me")
    assert_error(invoke("export", tmp_path / "r.h5", "-o", tmp_path / "out.npz"), 1,
                 f"output '{tmp_path / 'out.npz'}' already exists; pass --overwrite to replace it")
    assert (tmp_path / "out.npz").read_bytes() == b"keep me"


# --------------------------------------------------------------- training


def test_a_loss_that_becomes_inf_exits_1_and_keeps_the_last_checkpoint_and_models(files, tmp_path):
    """One full-batch SGD step with a huge rate: epoch 1 is finite, epoch 2's loss overflows."""
    run = tmp_path / "run"
    flags = ["--optimizer", "sgd", "--learning-rate", 1e30, "--batch-size", 4, "--no-shuffle", "--val-split", 0]
    assert_ok(train(files, run, *flags, "--epochs", 1))
    saved = {name: (run / name).read_bytes() for name in ("model_a.keras", "model_b.keras", "history.csv")}
    assert all(np.isfinite(w).all() for w in weights_of(run / "model_b.keras"))

    result = train(files, run, *flags, "--epochs", 3, "--resume")
    assert_error(result, 1, "epoch 2, batch 1: the training loss became inf",
                 f"last good backup (epoch 1) is in '{run / 'checkpoints' / 'backup'}'")
    assert {name: (run / name).read_bytes() for name in saved} == saved
    assert backed_up_epoch(run / "checkpoints") == 1
    restored = [builders.model_a(), builders.step_b()]
    CascadeModel(*restored).load_weights(run / "checkpoints" / "backup" / "latest.weights.h5")
    assert_same_weights(restored[0].get_weights(), weights_of(run / "model_a.keras"))
    assert_same_weights(restored[1].get_weights(), weights_of(run / "model_b.keras"))
    assert sorted(os.listdir(run)) == ["cascade.keras", "checkpoints", "history.csv", "model_a.keras", "model_b.keras"]


@pytest.mark.slow  # 15-35 s on 2 cores; kept out of the default suite to hold it well under 15 minutes
def test_two_trainings_with_the_same_seed_give_the_same_weights(files, tmp_path):
    flags = ["--epochs", 2, "--batch-size", 2, "--val-split", 0.25, "--seed", 5]
    for name in ("one", "two"):
        assert_ok(train(files, tmp_path / name, *flags))
    for name in ("model_a.keras", "model_b.keras"):
        first, second = weights_of(tmp_path / "one" / name), weights_of(tmp_path / "two" / name)
        assert_same_weights(first, second)
        assert b"".join(w.tobytes() for w in first) == b"".join(w.tobytes() for w in second)
    assert_ok(train(files, tmp_path / "other", *flags[:-1], 6))
    assert not all(np.array_equal(a, b) for a, b in zip(weights_of(tmp_path / "one" / "model_a.keras"),
                                                        weights_of(tmp_path / "other" / "model_a.keras")))


# ----------------------------------------------------------- killed runs


KILL_SEED = 20261202  # the kill tests' delays: seeded and printed, so a failure can be reproduced


def start(args, cwd):
    return subprocess.Popen(CASCADE + [str(arg) for arg in args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(process):
    try:
        _, stderr = process.communicate(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    assert process.returncode == 0, stderr
    return stderr


def kill_when(process, ready, *, timeout=PROCESS_TIMEOUT, delay=0.0, signum=signal.SIGKILL, exit_code=None):
    """Polls until `ready()` (bounded), waits `delay` seconds, then sends `signum` (SIGKILL) to `process`.

    The process must then end with `exit_code` (by default: killed by the signal).
    """
    deadline = time.monotonic() + timeout
    stderr = ""
    try:
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ready(), "the run ended or timed out before it could be killed"
        print(f"killing {process.args[1:3]} {delay:.3f} s after it was ready (seed {KILL_SEED})")
        time.sleep(delay)
        os.kill(process.pid, signum)
    finally:
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
    expected = -signum if exit_code is None else exit_code
    ended = "the run ended before the signal; give it more work" if process.returncode == 0 else "it printed"
    assert process.returncode == expected, f"exit {process.returncode}: {ended}\n{(stderr or '')[-3000:]}"


def test_a_killed_export_leaves_nothing_and_the_next_run_cleans_up(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, size=(20_000, 10))
    write_result(tmp_path / "r.h5", CascadeResult(rng.normal(size=(int(lengths.sum()), 4)).astype("float32"), lengths))
    out = out_folder(tmp_path)
    rng = np.random.default_rng(KILL_SEED)
    # writing takes about 2 s for the csv and 0.3 s for the padded npz: kill at a random moment inside
    runs = (("r.csv", rng.uniform(0, 1.0), []), ("r.npz", rng.uniform(0, 0.05), ["--layout", "padded"]))
    for name, delay, extra in runs:
        process = start(["export", tmp_path / "r.h5", "-o", out / name, *extra], cwd=tmp_path)
        def temporary(name=name):
            return [entry for entry in os.listdir(out) if entry.startswith(f".{name}.cascade-tmp-")]

        kill_when(process, lambda: bool(temporary()), delay=delay)  # a temporary file exists: it is writing
        assert not (out / name).exists()
        assert temporary()  # the half-written file, under its temporary name
    for name in ("r.csv", "r.npz"):
        finish(start(["export", tmp_path / "r.h5", "-o", out / name], cwd=tmp_path))
    assert sorted(os.listdir(out)) == ["r.csv", "r.npz"]  # the killed runs' temporary files are gone
    with np.load(out / "r.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["lengths"], lengths)


def test_an_output_that_is_one_of_the_inputs_is_refused_whatever_its_spelling(files, tmp_path, monkeypatch):
    work = tmp_path / "d"
    work.mkdir()
    for name in ("x.h5", "a.keras", "b.keras"):
        shutil.copy(files[name], work / name)
    (work / "steps.txt").write_text("1 0 2\n")
    (work / "link.h5").symlink_to(work / "x.h5")
    monkeypatch.chdir(work)
    before = {name: (work / name).read_bytes() for name in ("x.h5", "a.keras", "b.keras", "steps.txt")}
    common = ["generate", "--model-a", "a.keras", "--model-b", "b.keras", "--inputs", "x.h5",
              "--steps-file", "steps.txt", "--overwrite"]
    for output in ("x.h5", "./../d/x.h5", "link.h5", "a.keras", "steps.txt"):
        assert_error(invoke(*common, "-o", output), 1 if output.endswith(".h5") else 2,
                     *(["is one of this command's inputs", "choose another output name"] if output.endswith(".h5")
                       else ["expected a .h5 name"]))
    assert_ok(invoke(*common, "-o", "r.h5"))
    assert_error(invoke("export", "r.h5", "-o", "./r.h5", "--format", "h5", "--overwrite"), 1,
                 "is one of this command's inputs")
    assert_error(invoke("merge", "r.h5", "-o", "r.h5", "--overwrite"), 1, "is one of this command's inputs")
    assert {name: (work / name).read_bytes() for name in before} == before  # nothing of the user's was touched


def test_pack_and_export_model_outputs_of_the_wrong_kind_name_their_flag(files, tmp_path):
    out = out_folder(tmp_path)
    models = ["--model-a", files["a.keras"], "--model-b", files["b.keras"]]
    assert_error(invoke("pack", *models, "--max-steps", 3, "-o", out / "x.h5"), 2, "'-o' / '--output'",
                 "expected a .keras name", f"'{out / 'x.h5'}'")
    assert_nothing_in(out)
    generator = tmp_path / "g.keras"
    assert_ok(invoke("pack", *models, "--max-steps", 3, "-o", generator))
    taken = out / "taken"
    taken.write_bytes(b"keep me")
    assert_error(invoke("export-model", generator, "--saved-model", taken), 2, "'--saved-model'",
                 "expected a folder name", f"'{taken}', which is a file")
    assert taken.read_bytes() == b"keep me" and sorted(os.listdir(out)) == ["taken"]


def test_a_dash_is_not_a_file_name(files, tmp_path):
    assert_error(invoke("export", files["x.h5"], "-o", "-", "--format", "csv"), 1, "output '-'")
    assert not os.path.exists("-")


@pytest.mark.parametrize("flag, value, words", [
    ("--seed", 2**32, "0<=x<=4294967295"),  # Keras seeds take 32 bits
    ("--max-steps", 5_000_000_000, "1<=x<=2147483647"),
    ("--batch-size", 2**31, "1<=x<=2147483647"),
    ("--stop-token", 2**40, "0<=x<=2147483647"),
])
def test_integer_flags_out_of_range_are_usage_errors(files, tmp_path, flag, value, words):
    out = out_folder(tmp_path)
    extra = ["--max-steps", 3] if flag == "--stop-token" else []
    assert_error(generate(files, out / "r.h5", "--steps", "1,2,3", *extra, flag, value), 2, f"'{flag}'", words)
    assert_nothing_in(out)


def test_steps_that_need_more_memory_than_the_machine_has_are_refused_before_any_work(files, tmp_path):
    out = out_folder(tmp_path)
    result = generate(files, out / "r.h5", "--steps", "1000000000,0,0")
    assert_error(result, 1, "would need about", "GiB", "use a smaller --batch-size or --max-steps")
    assert_nothing_in(out)


# SIGHUP's process (15-20 s on 2 cores) is slow: the default suite ends a real process with SIGTERM here, and
# test_generate_ended_by_sighup_in_process_removes_what_it_was_writing checks SIGHUP's exit code and cleanup
@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.slow)])
def test_generate_ended_by_a_signal_removes_what_it_was_writing(files, tmp_path, signum):
    write_h5(tmp_path / "big.h5", inputs=builders.inputs(3000, 3))
    out = out_folder(tmp_path)
    process = start(["generate", "--model-a", files["a.keras"], "--model-b", files["b.keras"], "--inputs",
                     tmp_path / "big.h5", "--steps", "3,1,2", "--batch-size", 8, "-o", out / "r.h5"], cwd=tmp_path)
    kill_when(process, lambda: bool(os.listdir(out)), delay=0.2, signum=signum, exit_code=128 + signum)
    assert os.listdir(out) == []  # the temporary file went with the run


def test_generate_ended_by_sighup_in_process_removes_what_it_was_writing(files, tmp_path, monkeypatch):
    """SIGHUP (a closed terminal) arriving while generate writes ends it as SIGTERM does: exit 129, no file left."""
    from cascade_cli.atomic import atomic_output

    before = signal.getsignal(signal.SIGHUP)

    def generate_to_file(cascade, source, steps=None, *, output, **options):
        with atomic_output(output) as temp:
            temp.write_bytes(b"half a result")
            signal.raise_signal(signal.SIGHUP)  # the command's handler raises SystemExit here
            temp.write_bytes(b"never reached")

    assert_generate_ends_by(signal.SIGHUP, generate_to_file, files, tmp_path, monkeypatch)
    assert signal.getsignal(signal.SIGHUP) is before  # the handler before the command is back


def test_a_signal_that_a_library_turns_into_an_error_still_ends_the_run_with_its_code(files, tmp_path, monkeypatch):
    from cascade_cli.atomic import atomic_output

    def generate_to_file(cascade, source, steps=None, *, output, **options):
        with atomic_output(output) as temp:
            temp.write_bytes(b"half a result")
            try:
                signal.raise_signal(signal.SIGTERM)  # the handler raises SystemExit here
            except SystemExit as error:  # as a library's cleanup may: its own error replaces the SystemExit
                raise RuntimeError("the file could not be closed") from error

    assert_generate_ends_by(signal.SIGTERM, generate_to_file, files, tmp_path, monkeypatch)


def assert_generate_ends_by(signum, generate_to_file, files, tmp_path, monkeypatch):
    """`generate` with `generation.generate_to_file` replaced by `generate_to_file` (which raises `signum`
    while it writes) exits `128 + signum` without an error line and leaves nothing in its output folder."""
    from cascade_cli import generation

    monkeypatch.setattr(generation, "generate_to_file", generate_to_file)
    out = out_folder(tmp_path)
    result = generate(files, out / "r.h5", "--steps", "1,2,0")
    assert result.exit_code == 128 + signum, result.output
    assert "Error" not in result.output
    assert_nothing_in(out)


@pytest.mark.slow  # three TensorFlow processes: about 30 s on 2 cores
def test_train_killed_mid_epoch_then_resumed_ends_with_the_weights_of_an_unbroken_run(tmp_path):
    inputs, steps, targets = train_arrays(n=400, seed=1)
    write_h5(tmp_path / "train.h5", inputs=inputs, steps=steps, targets=targets)
    builders.model_a().save(tmp_path / "a.keras")
    builders.step_b(dropout=0.2).save(tmp_path / "b.keras")  # dropout: the random ops must resume too
    common = ["train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data",
              tmp_path / "train.h5", "--epochs", 4, "--batch-size", 4, "--learning-rate", 0.01, "--seed", 11]
    unbroken = start(common + ["--out-dir", tmp_path / "unbroken"], cwd=tmp_path)
    broken = start(common + ["--out-dir", tmp_path / "broken"], cwd=tmp_path)
    try:
        checkpoints = tmp_path / "broken" / "checkpoints"
        # BackupAndRestore writes its epoch file after the weights
        kill_when(broken, lambda: (checkpoints / "backup" / "training_metadata.json").exists(),
                  delay=np.random.default_rng(KILL_SEED).uniform(0.02, 0.3))  # an epoch takes ~0.4 s
    finally:
        finish(unbroken)
    assert not (tmp_path / "broken" / "model_a.keras").exists()
    assert backed_up_epoch(checkpoints) < 4  # killed before the last epoch ended
    stderr = finish(start(common + ["--out-dir", tmp_path / "broken", "--resume"], cwd=tmp_path))
    assert "Error" not in stderr
    for name in ("model_a.keras", "model_b.keras"):
        assert_same_weights(weights_of(tmp_path / "broken" / name), weights_of(tmp_path / "unbroken" / name))
    history = [(tmp_path / run / "history.csv").read_text().splitlines() for run in ("broken", "unbroken")]
    assert [row.split(",")[:3] for row in history[0]] == [row.split(",")[:3] for row in history[1]]
    assert len(history[0]) == 5
