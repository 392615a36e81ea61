"""Tests of the `cascade` command line (`cascade_cli.cli`) and its rendering (`cascade_cli.progress`).

Every command runs in-process through click's `CliRunner` on tiny seeded models
saved to a temporary folder. Results are compared with the runner called
directly (and, for training, with an independent eager gradient); errors with
their exit code, their one `Error: ...` line and an empty output folder.
"""

import csv
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from clitools import assert_error, assert_nothing_in, assert_ok, invoke, pretend_read_only
from filetools import write_h5
from cascade_cli import cli, demo, inspection
from cascade_cli.cli import main
from cascade_cli.errors import DataError
from cascade_cli.inspection import histogram_rows
from cascade_cli.results_io import read_result, read_result_attrs
from cascade_cli.options import StopRule, TrainConfig
from cascade_cli.run.cascade import Cascade

N, TA, F = 5, 3, 3
KILL_SEED = 20261202  # the kill tests' delays: printed, so a failure can be reproduced
STEPS = np.array([[2, 0, 3], [0, 0, 0], [1, 1, 0], [3, 2, 1], [0, 4, 0]])  # sample 1 emits nothing


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny models, inputs, steps and a training file, written once for the module."""
    folder = tmp_path_factory.mktemp("files")
    paths = {name: folder / name for name in (
        "a.keras", "b.keras", "bs.keras", "a_fixed.keras", "b_wide.keras", "lambda.keras",
        "x.h5", "steps.txt", "train.h5")}
    builders.model_a().save(paths["a.keras"])  # F=3 -> H=4
    builders.step_b().save(paths["b.keras"])  # H=4 -> O=2, one state of 5
    builders.sequence_b().save(paths["bs.keras"])
    builders.model_a(outer_steps=4).save(paths["a_fixed.keras"])
    builders.step_b(ir_size=5).save(paths["b_wide.keras"])
    inputs = keras.Input(shape=(None, F))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(builders.model_a()(inputs))).save(paths["lambda.keras"])
    write_h5(paths["x.h5"], inputs=builders.inputs(N, TA))
    paths["steps.txt"].write_text("".join(" ".join(map(str, row)) + "\n" for row in STEPS))
    rng = np.random.default_rng(3)
    write_h5(paths["train.h5"], inputs=builders.inputs(4, TA, seed=1), steps=STEPS[:4],
             targets=rng.normal(size=(int(STEPS[:4].sum()), 2)).astype("float32"))
    return paths


def generate(files, out, *extra, model_b="b.keras", inputs="x.h5"):
    return invoke("generate", "--model-a", files["a.keras"], "--model-b", files[model_b],
                  "--inputs", files[inputs] if inputs in files else inputs, "-o", out, *extra)


def direct(files, steps, *, model_b="b.keras", **settings):
    """The runner called directly and eagerly on the same inputs: `(values, lengths)` in numpy."""
    with h5py.File(files["x.h5"], "r") as f:
        x = f["inputs"][()]
    a = keras.saving.load_model(files["a.keras"], compile=False)
    b = keras.saving.load_model(files[model_b], compile=False)
    values, lengths = Cascade(a, b, **settings).run(x, steps)
    return values.numpy(), lengths.numpy()


# ---------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[]] + [[name] for name in sorted(main.commands)])
def test_every_command_has_help_with_an_example(command):
    result = invoke(*command, "--help")
    assert_ok(result)
    assert result.stdout.startswith("Usage: cascade")
    assert "Example:" in result.stdout and "cascade " in result.stdout.split("Example:")[1]


def test_cli_defaults_are_those_of_train_config():
    required = ["--model-a", "a", "--model-b", "b", "--data", "d", "--out-dir", "o"]
    options = main.commands["train"].make_context("train", required).params
    config = TrainConfig()
    for name in ("epochs", "batch_size", "learning_rate", "optimizer", "loss", "val_split", "shuffle",
                 "freeze_a", "state", "seed", "patience", "resume", "strategy"):
        assert options[name] == getattr(config, name), name


# ------------------------------------------------ generate, export, inspect


def test_generate_then_export_round_trips_in_every_layout(files, tmp_path):
    result = generate(files, tmp_path / "r.h5", "--steps-file", files["steps.txt"], "--batch-size", 2)
    assert_ok(result)
    assert result.stdout == ""  # progress and summary go to stderr
    assert f"Wrote '{tmp_path / 'r.h5'}': 5 samples, 17 inner steps" in result.stderr
    values, lengths = direct(files, STEPS)
    got = read_result(tmp_path / "r.h5")
    np.testing.assert_array_equal(got.lengths, STEPS)
    np.testing.assert_array_equal(lengths, STEPS)
    np.testing.assert_allclose(got.values, values, rtol=1e-5, atol=1e-6)
    attrs = read_result_attrs(tmp_path / "r.h5")
    assert attrs["state"] == "reset" and attrs["stop_rule"] == "none"
    assert attrs["model_b"] == str(files["b.keras"])

    # ragged npz: numpy alone reads it, TensorFlow rebuilds the ragged tensor
    assert_ok(invoke("export", tmp_path / "r.h5", "--format", "npz", "--layout", "ragged", "-o", tmp_path / "r.npz"))
    with np.load(tmp_path / "r.npz", allow_pickle=False) as z:
        assert str(z["layout"]) == "ragged" and str(z["model_a"]) == str(files["a.keras"])
        np.testing.assert_array_equal(z["row_splits_0"], [0, 3, 6, 9, 12, 15])
        np.testing.assert_array_equal(z["row_splits_1"], np.concatenate([[0], np.cumsum(STEPS.ravel())]))
        ragged = tf.RaggedTensor.from_nested_row_splits(z["flat_values"], [z["row_splits_0"], z["row_splits_1"]])
    assert ragged.shape.as_list() == [N, None, None, 2]
    assert ragged[1].flat_values.shape[0] == 0
    np.testing.assert_allclose(ragged[3][0].numpy(), values[7:10], rtol=1e-5, atol=1e-6)  # after 5 + 0 + 2 rows

    # padded, time major, in HDF5: (Ta, L, N, O), filled with the pad value past each length
    assert_ok(invoke("export", tmp_path / "r.h5", "--layout", "padded", "--pad-value", -1, "--time-major",
                     "-o", tmp_path / "p.h5"))
    with h5py.File(tmp_path / "p.h5", "r") as f:
        padded, mask = f["values"][()], f["mask"][()]
    assert padded.shape == (TA, 4, N, 2) and mask.shape == (TA, 4, N)
    row = 0
    for n in range(N):
        for t in range(TA):
            for j in range(4):
                if j < STEPS[n, t]:
                    assert mask[t, j, n]
                    np.testing.assert_allclose(padded[t, j, n], values[row], rtol=1e-5, atol=1e-6)
                    row += 1
                else:
                    assert not mask[t, j, n] and (padded[t, j, n] == -1).all()
    assert row == len(values)

    # csv in long form: one row per emitted step, in value order
    assert_ok(invoke("export", tmp_path / "r.h5", "-o", tmp_path / "r.csv"))
    with open(tmp_path / "r.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["sample", "outer", "inner", "y0", "y1"]
    expected = [(n, t, j) for n in range(N) for t in range(TA) for j in range(STEPS[n, t])]
    assert [tuple(map(int, r[:3])) for r in rows[1:]] == expected
    np.testing.assert_allclose(np.array([r[3:] for r in rows[1:]], float), values, rtol=1e-5, atol=1e-6)

    shown = invoke("inspect", tmp_path / "p.h5")
    assert_ok(shown)
    assert "padded (format_version 1)" in shown.stdout and "pad_value -1.0, time_major True" in shown.stdout
    assert "17 emitted, longest 4" in shown.stdout


def test_generate_carry_with_a_sequence_b_and_shared_steps(files, tmp_path):
    assert_ok(generate(files, tmp_path / "r.h5", "--steps", "2,0,3", "--state", "carry", model_b="bs.keras"))
    values, _ = direct(files, [2, 0, 3], model_b="bs.keras", state="carry")
    got = read_result(tmp_path / "r.h5")
    np.testing.assert_array_equal(got.lengths, np.tile([2, 0, 3], (N, 1)))
    np.testing.assert_allclose(got.values, values, rtol=1e-5, atol=1e-6)


def test_nothing_to_emit_and_no_samples(files, tmp_path):
    assert_ok(generate(files, tmp_path / "zero.h5", "--steps", "0,0,0"))
    assert read_result(tmp_path / "zero.h5").total == 0
    assert_ok(invoke("export", tmp_path / "zero.h5", "-o", tmp_path / "zero.csv"))
    assert (tmp_path / "zero.csv").read_text() == "sample,outer,inner,y0,y1\n"
    write_h5(tmp_path / "empty.h5", inputs=np.zeros((0, TA, F), np.float32))
    assert_ok(generate(files, tmp_path / "none.h5", "--steps", "1,2,3", inputs=tmp_path / "empty.h5"))
    empty = read_result(tmp_path / "none.h5")
    assert (empty.n_samples, empty.outer_steps, empty.total) == (0, TA, 0)
    assert_ok(invoke("export", tmp_path / "none.h5", "--layout", "padded", "-o", tmp_path / "none.npz"))
    with np.load(tmp_path / "none.npz", allow_pickle=False) as z:
        assert z["values"].shape == (0, TA, 0, 2)


def test_stop_rule_with_a_steps_file_cap_matches_the_runner_and_inspect_shows_it(files, tmp_path):
    threshold = 1.2
    result = generate(files, tmp_path / "r.h5", "--max-steps", 4, "--stop-norm", threshold,
                      "--steps-file", files["steps.txt"], "--exclude-stop-step")
    assert_ok(result)
    values, lengths = direct(files, STEPS, max_steps=4, stop_rule=StopRule.norm(threshold), exclude_stop_step=True)
    got = read_result(tmp_path / "r.h5")
    np.testing.assert_array_equal(got.lengths, lengths)
    np.testing.assert_allclose(got.values, values, rtol=1e-5, atol=1e-6)
    assert (lengths < STEPS).any() and (lengths == STEPS)[STEPS > 0].any()  # the rule fired, and not everywhere
    running, at_cap = int((STEPS > 0).sum()), int(((lengths == STEPS) & (STEPS > 0)).sum())
    assert f"{at_cap} of {running} pairs reached their cap" in result.stderr

    shown = invoke("inspect", tmp_path / "r.h5")
    assert_ok(shown)
    assert "stop rule" in shown.stdout and "norm >= 1.2:" in shown.stdout
    counts = np.bincount(lengths.ravel())
    for length, count in enumerate(counts):
        assert any(line.split()[:2] == [str(length), str(count)] for line in shown.stdout.splitlines())


def test_stop_token_without_given_steps(files, tmp_path):
    assert_ok(generate(files, tmp_path / "r.h5", "--max-steps", 3, "--stop-token", 1))
    values, lengths = direct(files, None, max_steps=3, stop_rule=StopRule.token(1))
    got = read_result(tmp_path / "r.h5")
    np.testing.assert_array_equal(got.lengths, lengths)
    np.testing.assert_allclose(got.values, values, rtol=1e-5, atol=1e-6)
    attrs = read_result_attrs(tmp_path / "r.h5")
    assert (attrs["stop_rule"], attrs["stop_value"], attrs["max_steps"]) == ("token", 1, 3)


# ---------------------------------------------------------- usage errors


@pytest.mark.parametrize("args, words", [
    (["--steps", "1,2,3", "--steps-file", "s.txt"], ["--steps and --steps-file"]),
    ([], ["no inner steps given", "--steps-file", "--max-steps"]),
    (["--stop-norm", "1"], ["--stop-norm: needs --max-steps"]),
    (["--steps", "1,2,3", "--stop-token", "1"], ["--stop-token: needs --max-steps"]),
    (["--max-steps", "3", "--stop-norm", "1", "--stop-token", "0"], ["--stop-norm and --stop-token"]),
    (["--max-steps", "0"], ["--max-steps", "0 is not in the range 1<=x<="]),
    (["--max-steps", "3", "--stop-token", "-1"], ["--stop-token"]),
    (["--max-steps", "3", "--stop-norm", "nan"], ["--stop-norm", "finite"]),
    (["--steps", "1,2,3", "--exclude-stop-step"], ["--exclude-stop-step: leaves out the step that met the stop rule, "
                                                   "so it needs a stop rule; received no --stop-norm"]),
    (["--steps", "1,2,3", "--state", "carry", "--state-init", "ir"], ["--state-init: 'ir' needs", "--state reset"]),
    (["--steps", "1,2,3", "--batch-size", "0"], ["--batch-size"]),
])
def test_generate_usage_errors_exit_2_naming_the_flags(files, tmp_path, args, words):
    out = tmp_path / "out"
    out.mkdir()
    assert_error(generate(files, out / "r.h5", *args), 2, *words)
    assert_nothing_in(out)


def test_a_stop_token_outside_b_outputs_is_a_usage_error_once_b_is_loaded(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = generate(files, out / "r.h5", "--max-steps", 3, "--stop-token", 2)
    assert_error(result, 2, "--stop-token", "2 is outside", "expected an id in [0, 2)")
    assert_nothing_in(out)


def test_generate_writes_only_hdf5(files, tmp_path):
    assert_error(generate(files, tmp_path / "r.npz", "--steps", "1,2,3"), 2, "--output", "expected a .h5 name",
                 "cascade export")


@pytest.mark.parametrize("name, args, words", [
    ("x.csv", ["--layout", "padded"], ["csv is written in long form", "--layout"]),
    ("x.npz", ["--format", "csv"], ["--format csv does not match the suffix of --output"]),
    ("x.npz", ["--time-major"], ["--pad-value and --time-major need --layout padded"]),
    ("x.h5", ["--layout", "ragged", "--pad-value", "0"], ["--pad-value and --time-major need --layout padded"]),
])
def test_export_usage_errors(tmp_path, name, args, words):
    out = tmp_path / "out"
    out.mkdir()
    assert_error(invoke("export", tmp_path / "r.h5", "-o", out / name, *args), 2, *words)
    assert_error(invoke("export", tmp_path / "r.h5", "-o", out / "x"), 2, "cannot tell the format", "--format")
    assert_nothing_in(out)


def test_the_same_run_gives_the_same_bytes(files, tmp_path):
    for name in ("one.h5", "two.h5"):
        assert_ok(generate(files, tmp_path / name, "--steps-file", files["steps.txt"], "--seed", 3))
    assert (tmp_path / "one.h5").read_bytes() == (tmp_path / "two.h5").read_bytes()


@pytest.mark.slow
def test_a_killed_generate_leaves_nothing_and_the_next_run_cleans_up(files, tmp_path):
    write_h5(tmp_path / "big.h5", inputs=builders.inputs(3000, TA))
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-c", "from cascade_cli.cli import main; main()", "generate",
               "--model-a", str(files["a.keras"]), "--model-b", str(files["b.keras"]), "--inputs",
               str(tmp_path / "big.h5"), "--steps", "3,1,2", "--batch-size", "8", "-o", str(out / "r.h5")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not os.listdir(out) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # wait until the temporary file exists: the run is writing
        delay = np.random.default_rng(KILL_SEED).uniform(0, 0.3)
        print(f"killing generate {delay:.3f} s after its temporary file appeared (seed {KILL_SEED})")
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed; give it more work"
    assert not (out / "r.h5").exists()
    assert_ok(generate(files, out / "r.h5", "--steps", "1,0,1"))
    assert os.listdir(out) == ["r.h5"]  # the killed run's temporary file is gone


# ------------------------------------------------------------ data errors


def bad_inputs(folder):
    """Builds bad input files; returns `{name: (path, inputs_key)}`."""
    made = {
        "nan": write_h5(folder / "nan.h5", inputs=np.full((2, TA, F), np.nan, np.float32)),
        "features": write_h5(folder / "f2.h5", inputs=np.zeros((2, TA, 2), np.float32)),
        "rank": write_h5(folder / "rank.h5", inputs=np.zeros((2, TA), np.float32)),
        "text": folder / "text.h5",
        "truncated": folder / "truncated.h5",
        "objects": folder / "objects.npz",
        "external": folder / "external.h5",
    }
    made["text"].write_text("not hdf5")
    whole = write_h5(folder / "whole.h5", inputs=np.zeros((200, TA, F), np.float32)).read_bytes()
    made["truncated"].write_bytes(whole[: len(whole) // 2])
    np.savez(made["objects"], inputs=np.array([{"a": 1}], dtype=object))
    with h5py.File(made["external"], "w") as f:
        f["inputs"] = h5py.ExternalLink("whole.h5", "inputs")
    return made


@pytest.mark.parametrize("case, extra, words", [
    ("nan", [], ["nan.h5' (key 'inputs') sample 0", "expected finite values, received nan"]),
    ("features", [], ["F=2 features per step but model A expects F=3", "(2, 3, 2)"]),
    ("rank", [], ["dataset 'inputs' in '", "rank.h5' has 2 dimensions: expected 3"]),
    ("text", [], ["'", "text.h5' is not a readable HDF5 file"]),
    ("truncated", [], ["truncated.h5"]),
    ("objects", [], ["objects.npz", "Python objects"]),
    ("external", [], ["links 'inputs' to another file", "nothing outside the file is read"]),
    ("missing-key", ["--inputs-key", "nope"], ["has no dataset 'nope'"]),
])
def test_bad_inputs_exit_1_and_leave_no_file(files, tmp_path, case, extra, words):
    made = bad_inputs(tmp_path)
    made["missing-key"] = files["x.h5"]
    out = tmp_path / "out"
    out.mkdir()
    result = generate(files, out / "r.h5", "--steps", "1,2,3", *extra, inputs=made[case])
    assert_error(result, 1, *words)
    assert_nothing_in(out)


@pytest.mark.parametrize("steps, code, words", [
    (["--steps", "1,2"], 1, ["--steps 1,2 have shape (2,)", "expected (Ta,)=(3,) or (N, Ta)=(5, 3)"]),
    (["--steps", "1,x,3"], 2, ["--steps value 2: expected a non-negative integer, received 'x'"]),  # usage errors
    (["--steps", "1,-1,3"], 2, ["received '-1'"]),
    (["--max-steps", "2", "--steps", "1,3,0"], 1, ["at index 1: expected at most --max-steps 2, received 3"]),
])
def test_bad_steps_exit_1_or_2_when_malformed(files, tmp_path, steps, code, words):
    out = tmp_path / "out"
    out.mkdir()
    assert_error(generate(files, out / "r.h5", *steps), code, *words)
    assert_nothing_in(out)


def test_bad_steps_file_names_the_line(files, tmp_path):
    (tmp_path / "s.txt").write_text("1 2 3\n1 2.5 3\n")
    out = tmp_path / "out"
    out.mkdir()
    assert_error(generate(files, out / "r.h5", "--steps-file", tmp_path / "s.txt"), 1,
                 "s.txt' line 2, value 2: expected a non-negative integer, received '2.5'")
    assert_nothing_in(out)


def test_output_checks_come_before_any_work(files, tmp_path, monkeypatch):
    existing = tmp_path / "r.h5"
    existing.write_bytes(b"keep me")
    # the models do not even exist: the output is refused first
    result = invoke("generate", "--model-a", "missing.keras", "--model-b", "missing.keras", "--inputs", "missing.h5",
                    "--steps", "1", "-o", existing)
    assert_error(result, 1, f"output '{existing}' already exists; pass --overwrite to replace it")
    assert existing.read_bytes() == b"keep me"
    (tmp_path / "file").write_text("")
    assert_error(generate(files, tmp_path / "file" / "r.h5", "--steps", "1,2,3"), 1,
                 f"output folder '{tmp_path / 'file'}' is a file")
    assert_error(invoke("export", files["x.h5"], "-o", existing), 1, "already exists")
    locked = tmp_path / "locked"
    locked.mkdir()
    pretend_read_only(monkeypatch, locked)
    try:
        assert_error(generate(files, locked / "r.h5", "--steps", "1,2,3"), 1, f"'{locked}' is not writable")
    finally:
        locked.chmod(0o700)


def test_overwrite_replaces_the_output(files, tmp_path):
    (tmp_path / "r.h5").write_bytes(b"old")
    assert_ok(generate(files, tmp_path / "r.h5", "--steps", "1,0,1", "--overwrite"))
    assert read_result(tmp_path / "r.h5").total == 2 * N
    assert sorted(os.listdir(tmp_path)) == ["r.h5"]


# ------------------------------------------------------------ model errors


def bad_models(folder, files):
    made = {
        "missing": folder / "missing.keras",
        "folder": folder / "plain_dir",
        "savedmodel": folder / "saved",
        "bytes": folder / "bytes.keras",
        "truncated": folder / "truncated.keras",
        "legacy": folder / "legacy.h5",
        "remote": "hf://someone/model.keras",
    }
    made["folder"].mkdir()
    made["savedmodel"].mkdir()
    (made["savedmodel"] / "saved_model.pb").write_bytes(b"")
    made["bytes"].write_bytes(os.urandom(256))
    whole = files["a.keras"].read_bytes()
    made["truncated"].write_bytes(whole[: len(whole) // 2])
    made["legacy"].write_bytes(b"")
    return made


@pytest.mark.parametrize("case, words", [
    ("missing", ["model A", "missing.keras' does not exist; expected a .keras file"]),
    ("folder", ["plain_dir' is a directory; only local .keras files are loaded"]),
    ("savedmodel", ["is a TensorFlow SavedModel directory; only local .keras files are loaded"]),
    ("bytes", ["bytes.keras' is not a valid .keras file"]),
    ("truncated", ["truncated.keras'"]),
    ("legacy", ["legacy .h5 model", "--allow-legacy-h5"]),
    ("remote", ["'hf://someone/model.keras' is a remote path; only local .keras files are loaded"]),
])
def test_bad_model_files_exit_1(files, tmp_path, case, words):
    made = bad_models(tmp_path, files)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("generate", "--model-a", made[case], "--model-b", files["b.keras"], "--inputs", files["x.h5"],
                    "--steps", "1,2,3", "-o", out / "r.h5")
    assert_error(result, 1, *words)
    assert_nothing_in(out)


def test_models_that_do_not_fit(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert_error(generate(files, out / "r.h5", "--steps", "1,2,3", model_b="b_wide.keras"), 1,
                 f"model A ('{files['a.keras']}') emits IR vectors of size 4 but model B "
                 f"('{files['b_wide.keras']}') expects inputs of size 5")
    result = invoke("generate", "--model-a", files["a_fixed.keras"], "--model-b", files["b.keras"],
                    "--inputs", files["x.h5"], "--steps", "1,2,3", "-o", out / "r.h5")
    assert_error(result, 1, "fixed Ta=4", "Ta=3", "(5, 3, 3)")
    assert_nothing_in(out)


def test_b_whose_state_outputs_do_not_match_its_state_inputs(files, tmp_path):
    x, state = keras.Input(shape=(4,)), keras.Input(shape=(5,))
    keras.Model([x, state], [keras.layers.Dense(2)(x), keras.layers.Dense(3)(state)]).save(tmp_path / "bad.keras")
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("generate", "--model-a", files["a.keras"], "--model-b", tmp_path / "bad.keras",
                    "--inputs", files["x.h5"], "--steps", "1,2,3", "-o", out / "r.h5")
    assert_error(result, 1, f"model B ('{tmp_path / 'bad.keras'}') state 1: its output has size 3 but its input "
                            "has size 5")
    assert_nothing_in(out)


def test_a_lambda_model_needs_unsafe_and_then_loads_with_a_loud_warning(files, tmp_path):
    args = ["generate", "--model-a", files["lambda.keras"], "--model-b", files["b.keras"], "--inputs", files["x.h5"],
            "--steps", "1,0,2", "-o", tmp_path / "r.h5"]
    assert_error(invoke(*args), 1, "lambda.keras' contains code", "--unsafe")
    assert not (tmp_path / "r.h5").exists()
    result = invoke(*args, "--unsafe")
    assert_ok(result)
    assert "WARNING: --unsafe turns Keras safe mode off" in result.stderr
    assert read_result(tmp_path / "r.h5").total == 3 * N


# -------------------------------------------------------------------- train


@pytest.mark.slow  # test_train_cli's test_cascade_train_s_step_is_cascade_model_fit_s_step_and_w_minus_lr_times_the_
# reference_gradient[False-None] runs this step (gru A and B, reset, SGD 0.1, one batch) against the same reference
def test_one_sgd_step_through_the_cli_is_w_minus_lr_times_the_eager_gradient(files, tmp_path):
    with h5py.File(files["train.h5"], "r") as f:
        inputs, steps, targets = f["inputs"][()], f["steps"][()], f["targets"][()]
    result = invoke("train", "--model-a", files["a.keras"], "--model-b", files["b.keras"], "--data", files["train.h5"],
                    "--out-dir", tmp_path / "run", "--optimizer", "sgd", "--learning-rate", 0.1, "--epochs", 1,
                    "--batch-size", len(inputs), "--no-shuffle", "--val-split", 0)
    assert_ok(result)
    assert "epoch" in result.stderr and str(tmp_path / "run" / "model_a.keras") in result.stderr

    ref_a = keras.saving.load_model(files["a.keras"], compile=False)
    ref_b = keras.saving.load_model(files["b.keras"], compile=False)
    variables = ref_a.trainable_variables + ref_b.trainable_variables
    with tf.GradientTape() as tape:
        values, _ = builders.reference(ref_a, ref_b, inputs, steps)
        # the masked mse: every valid (sample, outer, inner, feature) element, nothing else
        loss = tf.reduce_sum(tf.square(values - targets)) / (int(steps.sum()) * targets.shape[1])
    grads = tape.gradient(loss, variables)
    for name, model in (("model_a.keras", ref_a), ("model_b.keras", ref_b)):
        saved = keras.saving.load_model(tmp_path / "run" / name, compile=False)
        for v, w in zip(model.trainable_variables, saved.trainable_variables):
            g = grads[[id(x) for x in variables].index(id(v))]
            assert np.abs(g.numpy()).max() > 0
            np.testing.assert_allclose(w.numpy(), v.numpy() - 0.1 * g.numpy(), rtol=1e-4, atol=1e-6)
    with open(tmp_path / "run" / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and float(rows[0]["loss"]) == pytest.approx(float(loss), rel=1e-5)


def test_train_errors(files, tmp_path):
    common = ["train", "--model-a", files["a.keras"], "--model-b", files["b.keras"]]
    assert_error(invoke(*common, "--data", files["train.h5"], "--out-dir", tmp_path / "o", "--patience", 2,
                        "--val-split", 0), 2, "--patience: needs a validation set to watch: expected --val-split > 0")
    (tmp_path / "file").write_text("")
    assert_error(invoke(*common, "--data", files["train.h5"], "--out-dir", tmp_path / "file"), 1,
                 "--out-dir", "is a file: expected a folder")
    assert_error(invoke(*common, "--data", files["x.h5"], "--out-dir", tmp_path / "o"), 1,
                 "x.h5' has no dataset 'steps'")
    assert_error(invoke(*common, "--data", files["train.h5"], "--out-dir", tmp_path / "o", "--resume"), 1,
                 "--resume: no backup to resume from")
    assert_error(invoke(*common, "--data", files["train.h5"], "--out-dir", tmp_path / "o", "--learning-rate", 0), 2,
                 "--learning-rate")
    assert sorted(os.listdir(tmp_path)) == ["file"]


# ------------------------------------------------------------------ inspect


def test_inspect_a_model_and_its_partner(files):
    result = invoke("inspect", files["b.keras"], "--partner", files["a.keras"])
    assert_ok(result)
    assert "as model B  yes: step form, H=4, O=2, states [5]" in result.stdout
    assert "parameters  177 (177 trainable)" in result.stdout  # GRUCell 3*(4*5 + 5*5 + 2*5) + Dense 5*2 + 2
    assert f"A='{files['a.keras']}' and B='{files['b.keras']}' fit: IR size H=4" in result.stdout
    result = invoke("inspect", files["a.keras"], "--partner", files["b_wide.keras"])
    assert result.exit_code == 1  # each model's description is on stdout, the pair's error on stderr
    assert (f"Error: model A ('{files['a.keras']}') emits IR vectors of size 4 but model B "
            f"('{files['b_wide.keras']}') expects inputs of size 5") in result.stderr
    # a sequence-form B qualifies as an A too: the README's order (PATH is B, --partner is A) is tried first
    result = invoke("inspect", files["bs.keras"], "--partner", files["a.keras"])
    assert_ok(result)
    assert f"A='{files['a.keras']}' and B='{files['bs.keras']}' fit" in result.stdout


def test_inspect_data_files(files, tmp_path):
    result = invoke("inspect", files["train.h5"])
    assert_ok(result)
    for words in ("samples N       4", "features F      3", "output size O   2", "targets         flat (13 valid rows)",
                  "zero-step pairs  5 (41.7 %)", "per pair         min 0, mean 1.08, max 3"):
        assert " ".join(words.split()) in " ".join(result.stdout.split()), words
    result = invoke("inspect", files["steps.txt"])
    assert_ok(result)
    assert "(5, 3): (N, Ta), one row per sample" in result.stdout
    result = invoke("inspect", files["x.h5"])
    assert_ok(result)
    assert "(5, 3, 3)" in result.stdout
    assert_error(invoke("inspect", tmp_path), 1, "is a folder: expected a model")
    assert_error(invoke("inspect", tmp_path / "nothing.txt"), 1, "does not exist")
    (tmp_path / "x.bin").write_text("")
    assert_error(invoke("inspect", tmp_path / "x.bin"), 1, "has suffix '.bin'")
    assert_error(invoke("inspect", files["steps.txt"], "--partner", files["a.keras"]), 2, "--partner needs PATH")


# --------------------------------------------------------------------- demo


def test_demo_refuses_an_earlier_demo_before_any_work(tmp_path):
    (tmp_path / "generated.h5").write_bytes(b"earlier")
    assert_error(invoke("demo", "--out-dir", tmp_path), 1, "holds an earlier demo (generated.h5)", "--overwrite")
    assert (tmp_path / "generated.h5").read_bytes() == b"earlier"


@pytest.mark.slow
def test_demo_trains_generates_and_exports(tmp_path, monkeypatch):
    result = invoke("demo", "--out-dir", tmp_path, "--epochs", 2)
    assert_ok(result)
    for name in ("trained/model_a.keras", "trained/model_b.keras", "trained/history.csv", "generated.h5",
                 "generated_padded.npz", "generated.csv", "tokens/trained/cascade.keras", "tokens/generated.h5"):
        assert (tmp_path / name).is_file(), name
        assert str(tmp_path / name) in result.stdout
    assert "Generated beside the targets" in result.stdout and "Held-out mse" in result.stdout
    sampled = read_result(tmp_path / "tokens" / "generated.h5")
    assert sampled.tokens is not None and sampled.total > 0
    kept = re.search(r"(\d+) of (\d+) sampled patterns keep to their rule", result.stdout)
    assert kept is not None and int(kept.group(2)) > 0  # the count itself is checked in test_demo
    assert not (tmp_path / "sample_data").exists()  # the repository's sample_data/ was used

    (tmp_path / "trained" / "notes.txt").write_text("mine")  # a user's own file beside the demo's
    monkeypatch.setattr(demo, "sample_data_dir", lambda: None)  # as when installed without sample_data/
    result = invoke("demo", "--out-dir", tmp_path, "--epochs", 1, "--overwrite")
    assert_ok(result)
    assert f"building it in '{tmp_path / 'sample_data'}'" in result.stderr
    assert (tmp_path / "sample_data" / "train.h5").is_file() and (tmp_path / "generated.csv").is_file()
    assert (tmp_path / "trained" / "notes.txt").read_text() == "mine"  # --overwrite replaced only the demo's files


# ---------------------------------------------------------------- rendering


def test_histogram_rows_by_hand():
    assert histogram_rows([]) == []
    assert histogram_rows([0, 0, 2]) == [("0", 2), ("1", 0), ("2", 1)]
    assert histogram_rows(list(range(40)), max_rows=4) == [("0-9", 10), ("10-19", 10), ("20-29", 10), ("30-39", 10)]
    assert histogram_rows([0, 5], max_rows=4) == [("0-1", 1), ("2-3", 0), ("4-5", 1)]


def test_library_errors_become_one_line(monkeypatch):
    def broken(*args, **kwargs):
        raise DataError("first line\nsecond line")

    monkeypatch.setattr(inspection, "kind_of", broken)
    assert_error(invoke("inspect", "x"), 1, "first line second line")


@pytest.mark.parametrize("message, parameter, expected", [
    ("batch_size: expected a positive integer, received 0.", "batch_size",
     "--batch-size: expected a positive integer, received 0."),
    ("output 'r.h5' already exists; pass overwrite=True to replace it", None,
     "output 'r.h5' already exists; pass --overwrite to replace it"),
    ("the checkpoints were made with batch_size=16, --shuffle; this run has batch_size=32, shuffle=False.", None,
     "the checkpoints were made with --batch-size 16, --shuffle; this run has --batch-size 32, --no-shuffle."),
    ("state_init='ir' needs state='reset'", None, "--state-init ir needs --state reset"),
    ("steps at index 3: expected at most max_steps=5, received 9", None,
     "steps at index 3: expected at most --max-steps 5, received 9"),
    ("choose another out_dir than '/data/out_dir/max_steps=2'", None,
     "choose another --out-dir than '/data/out_dir/max_steps=2'"),  # quoted file names stay as they are
    ("model_a.keras: expected a file, received a folder", None, "model_a.keras: expected a file, received a folder"),
])
def test_flag_text_shows_flags_for_parameters_by_hand(message, parameter, expected):
    assert cli.flag_text(message, parameter=parameter) == expected


def test_a_tensorflow_error_is_one_line_and_a_bug_asks_for_debug(monkeypatch):
    def tensorflow_fails(*args, **kwargs):
        raise tf.errors.InvalidArgumentError(None, None, "Paddings must be non-negative\n\tdetails")

    monkeypatch.setattr(inspection, "kind_of", tensorflow_fails)
    assert_error(invoke("inspect", "x"), 1, "TensorFlow failed", "(InvalidArgumentError): Paddings must be non-negative")

    def bug(*args, **kwargs):
        raise KeyError("layout")

    monkeypatch.setattr(inspection, "kind_of", bug)
    assert_error(invoke("inspect", "x"), 1, "internal error (KeyError: 'layout')", "cascade --debug")
    shown = invoke("--debug", "inspect", "x")  # --debug lets the traceback through
    assert shown.exit_code == 1 and isinstance(shown.exception, KeyError)


def test_a_stop_rule_that_never_or_always_fires_is_warned_about(files, tmp_path):
    never = generate(files, tmp_path / "never.h5", "--max-steps", 3, "--stop-norm", 1e9)
    assert_ok(never)
    assert "the stop rule never fired" in never.stderr
    always = generate(files, tmp_path / "always.h5", "--max-steps", 3, "--stop-norm", 0)
    assert_ok(always)
    assert "fired at the first step of every pair" in always.stderr
    assert read_result(tmp_path / "always.h5").lengths.max() == 1
    some = generate(files, tmp_path / "some.h5", "--max-steps", 4, "--stop-norm", 1.2)
    assert_ok(some)
    assert "Warning" not in some.stderr


def test_pack_then_generate_from_the_generator_with_flags_over_its_settings(files, tmp_path):
    generator = tmp_path / "g.keras"
    assert_ok(invoke("pack", "--model-a", files["a.keras"], "--model-b", files["b.keras"], "--max-steps", 4,
                     "--stop-norm", 1.2, "--exclude-stop-step", "-o", generator))
    assert_error(invoke("pack", "--model-a", files["a.keras"], "--model-b", files["b.keras"], "-o", generator), 1,
                 "already exists")
    assert_ok(invoke("generate", "--model", generator, "--inputs", files["x.h5"], "-o", tmp_path / "saved.h5"))
    values, lengths = direct(files, None, max_steps=4, stop_rule=StopRule.norm(1.2), exclude_stop_step=True)
    got = read_result(tmp_path / "saved.h5")
    np.testing.assert_array_equal(got.lengths, lengths)
    np.testing.assert_allclose(got.values, values, rtol=1e-5, atol=1e-6)
    attrs = read_result_attrs(tmp_path / "saved.h5")
    assert (attrs["model"], attrs["stop_rule"], attrs["max_steps"]) == (str(generator), "norm", 4)
    # a flag given on the command line wins over the generator's own setting
    assert_ok(invoke("generate", "--model", generator, "--inputs", files["x.h5"], "--steps-file", files["steps.txt"],
                     "--stop-norm", 1e9, "-o", tmp_path / "given.h5"))
    values, lengths = direct(files, STEPS, max_steps=4, stop_rule=StopRule.norm(1e9), exclude_stop_step=True)
    np.testing.assert_array_equal(read_result(tmp_path / "given.h5").lengths, lengths)
    assert_error(invoke("generate", "--model", generator, "--model-a", files["a.keras"], "--inputs", files["x.h5"],
                        "-o", tmp_path / "both.h5"), 2, "not both")
    assert_error(invoke("generate", "--model", files["a.keras"], "--inputs", files["x.h5"], "--steps", "1,2,3",
                        "-o", tmp_path / "plain.h5"), 1, "not a CascadeModel")


def test_export_model_writes_a_saved_model_that_serves_the_generator(files, tmp_path):
    generator = tmp_path / "g.keras"
    assert_ok(invoke("pack", "--model-a", files["a.keras"], "--model-b", files["b.keras"], "-o", generator))
    assert_ok(invoke("export-model", generator, "--saved-model", tmp_path / "served"))
    served = tf.saved_model.load(str(tmp_path / "served")).signatures["serving_default"]
    with h5py.File(files["x.h5"], "r") as f:
        x = f["inputs"][()]
    out = served(inputs=tf.constant(x), steps=tf.constant(STEPS, tf.int32))
    values, lengths = direct(files, STEPS)
    np.testing.assert_array_equal(out["lengths"].numpy(), lengths)
    np.testing.assert_allclose(out["flat_values"].numpy(), values, rtol=1e-5, atol=1e-6)
    assert_error(invoke("export-model", generator, "--saved-model", tmp_path / "served"), 1, "already holds files")
    assert sorted(os.listdir(tmp_path)) == ["g.keras", "served"]  # no temporary folder left


def test_export_model_of_a_token_sampler_serves_the_tokens_generate_writes(files, tmp_path):
    builders.feedback_b(output_size=3).save(tmp_path / "fb.keras")
    generator = tmp_path / "g.keras"
    assert_ok(invoke("pack", "--model-a", files["a.keras"], "--model-b", tmp_path / "fb.keras", "--feedback",
                     "--sampler", "categorical", "--max-steps", "4", "--stop-token", "0",
                     "-o", generator))
    result = invoke("export-model", generator, "--saved-model", tmp_path / "served")
    assert_ok(result)
    assert "serving_default maps inputs to flat_values, lengths, tokens" in " ".join(result.output.split())
    assert_ok(invoke("generate", "--model", generator, "--inputs", files["x.h5"], "-o", tmp_path / "r.h5"))
    written = read_result(tmp_path / "r.h5")
    with h5py.File(files["x.h5"], "r") as f:
        x = f["inputs"][()]
    out = tf.saved_model.load(str(tmp_path / "served")).signatures["serving_default"](inputs=tf.constant(x))
    assert written.total > 0
    np.testing.assert_array_equal(out["lengths"].numpy(), written.lengths)
    np.testing.assert_array_equal(out["tokens"].numpy(), written.tokens)
    np.testing.assert_allclose(out["flat_values"].numpy(), written.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("command", ["merge", "export-model", "generate", "export", "inspect", "train", "pack",
                                     "demo"])
def test_the_top_level_help_shows_each_command_s_description_whole(command):
    result = invoke("--help")
    assert_ok(result)
    (line,) = [line for line in result.stdout.splitlines() if line.strip().startswith(command + " ")]
    description = line.strip()[len(command):].strip()
    assert not description.endswith("..."), line
    assert description == main.commands[command].get_short_help_str(limit=1000)


def test_max_steps_help_says_what_given_steps_above_it_are_and_they_are_refused(files, tmp_path):
    help_text = " ".join(invoke("generate", "--help").stdout.split())
    assert "given steps above M are an error" in help_text
    assert_error(generate(files, tmp_path / "r.h5", "--steps", "1,5,2", "--max-steps", "4"), 1,
                 "--steps 1,5,2 at index 1: expected at most --max-steps 4, received 5")
    assert not (tmp_path / "r.h5").exists()


def test_a_packed_generator_with_a_lambda_inside_a_needs_unsafe(files, tmp_path):
    from cascade_cli.train.keras_model import CascadeModel

    lambda_a = keras.saving.load_model(files["lambda.keras"], safe_mode=False, compile=False)
    CascadeModel(lambda_a, keras.saving.load_model(files["b.keras"], compile=False)).save(tmp_path / "g.keras")
    args = ["generate", "--model", tmp_path / "g.keras", "--inputs", files["x.h5"], "--steps", "1,0,2",
            "-o", tmp_path / "r.h5"]
    assert_error(invoke(*args), 1, "g.keras' contains code", "--unsafe")
    assert not (tmp_path / "r.h5").exists()
    assert_error(invoke("export-model", tmp_path / "g.keras", "--saved-model", tmp_path / "served"), 1, "--unsafe")
    result = invoke(*args, "--unsafe")
    assert_ok(result)
    assert "WARNING: --unsafe turns Keras safe mode off" in result.stderr
    assert read_result(tmp_path / "r.h5").total == 3 * N
