"""The first ten minutes of a new user (issue 31): each defect found by trying cascade as a new user would.

Outputs create the folders they need (and a failed run takes them away
again); messages never show a Python value as a flag's value; flags that
need another flag, and malformed lists of numbers, are usage errors (exit 2).
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cascade_cli import atomic, cli
from cascade_cli.errors import DataError
from cascade_cli.result import CascadeResult
from cascade_cli.results_io import read_result, write_result
from clitools import assert_error, assert_ok, invoke, pretend_read_only

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A copy of the sine task's models and inputs, and a generator packed from them."""
    folder = tmp_path_factory.mktemp("sample")
    for name in ("model_a.keras", "model_b.keras", "inputs.h5", "steps.txt"):
        shutil.copy(SAMPLE / name, folder / name)
    assert_ok(invoke("pack", "--model-a", folder / "model_a.keras", "--model-b", folder / "model_b.keras",
                     "--max-steps", 4, "--no-xla", "-o", folder / "g.keras"))
    return folder


def generate(sample, out, *extra):
    return invoke("generate", "--model-a", sample / "model_a.keras", "--model-b", sample / "model_b.keras",
                  "--inputs", sample / "inputs.h5", "--no-xla", "-o", out, *extra)


# ------------------------------------------------------ outputs make their folders


def test_export_model_writes_the_saved_model_its_own_help_shows(sample, tmp_path, monkeypatch):
    assert "cascade export-model generator.keras --saved-model serving/cascade/1" in invoke("export-model",
                                                                                           "--help").output
    monkeypatch.chdir(tmp_path)
    done = invoke("export-model", sample / "g.keras", "--saved-model", "serving/cascade/1")
    assert_ok(done)
    assert (tmp_path / "serving" / "cascade" / "1" / "saved_model.pb").is_file()
    assert sorted(os.listdir(tmp_path / "serving" / "cascade")) == ["1"]  # no temporary folder left


def test_generate_export_pack_and_plot_create_the_folders_of_their_output(sample, tmp_path):
    assert_ok(generate(sample, tmp_path / "a" / "b" / "r.h5", "--steps-file", sample / "steps.txt"))
    assert read_result(tmp_path / "a" / "b" / "r.h5").n_samples == 8
    assert_ok(invoke("export", tmp_path / "a" / "b" / "r.h5", "-o", tmp_path / "c" / "d" / "r.npz"))
    assert read_result(tmp_path / "c" / "d" / "r.npz").total == read_result(tmp_path / "a" / "b" / "r.h5").total
    assert_ok(invoke("plot", tmp_path / "c" / "d" / "r.npz", "-o", tmp_path / "e" / "r.png"))
    assert (tmp_path / "e" / "r.png").is_file()
    assert_ok(invoke("pack", "--model-a", sample / "model_a.keras", "--model-b", sample / "model_b.keras",
                     "--max-steps", 4, "-o", tmp_path / "f" / "g" / "g.keras"))
    assert (tmp_path / "f" / "g" / "g.keras").is_file()


def test_a_run_that_fails_takes_away_the_folders_it_made(sample, tmp_path):
    done = invoke("generate", "--model-a", tmp_path / "nope.keras", "--model-b", sample / "model_b.keras",
                  "--inputs", sample / "inputs.h5", "--steps", "1", "-o", tmp_path / "x" / "y" / "r.h5")
    assert_error(done, 1, "nope.keras")
    write_result(tmp_path / "r.h5", CascadeResult(np.zeros((3, 2), np.float32), [[1, 2]]))
    assert_error(invoke("plot", tmp_path / "r.h5", "--samples", 5, "-o", tmp_path / "p" / "q" / "r.png"), 1,
                 "--samples: sample 5 is out of range")
    assert sorted(os.listdir(tmp_path)) == ["r.h5"]


def test_a_folder_that_cannot_be_made_is_refused_naming_the_output(tmp_path, monkeypatch):
    write_result(tmp_path / "r.h5", CascadeResult(np.zeros((3, 2), np.float32), [[1, 2]]))
    (tmp_path / "file").write_text("")
    assert_error(invoke("export", tmp_path / "r.h5", "-o", tmp_path / "file" / "sub" / "r.npz"), 1,
                 f"output folder '{tmp_path / 'file' / 'sub'}' cannot be created: '{tmp_path / 'file'}' is a file")
    locked = tmp_path / "locked"
    locked.mkdir()
    pretend_read_only(monkeypatch, locked)
    try:
        assert_error(invoke("export", tmp_path / "r.h5", "-o", locked / "sub" / "r.npz"), 1,
                     f"output folder '{locked / 'sub'}' cannot be created: '{locked}' is not writable")
    finally:
        locked.chmod(0o700)
    assert sorted(os.listdir(tmp_path)) == ["file", "locked", "r.h5"] and os.listdir(locked) == []


def test_make_parents_returns_what_it_made_and_remove_made_folders_leaves_a_folder_with_files(tmp_path):
    made = atomic.make_parents(tmp_path / "a" / "b" / "c" / "r.h5")
    assert made == [tmp_path / "a" / "b" / "c", tmp_path / "a" / "b", tmp_path / "a"]  # innermost first
    assert atomic.make_parents(tmp_path / "a" / "b" / "c" / "r.h5") == []
    (tmp_path / "a" / "b" / "kept.txt").write_text("")
    atomic.remove_made_folders(made)
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["kept.txt"]
    with pytest.raises(DataError, match=r"output folder '.*kept\.txt' is a file$"):
        atomic.make_parents(tmp_path / "a" / "b" / "kept.txt" / "r.h5")
    with pytest.raises(DataError, match=r"output folder '.*kept\.txt/c' cannot be created: '.*kept\.txt' is a file$"):
        atomic.make_parents(tmp_path / "a" / "b" / "kept.txt" / "c" / "r.h5")


# ------------------------------------------------------------- message wording


@pytest.mark.parametrize("message, parameter, flags, expected", [
    ("min_steps: holds a stop rule off for the first steps and needs one (stop_rule); received min_steps=3 with "
     "stop_rule=None.", "min_steps", {"stop_rule": "--stop-norm"},
     "--min-steps: holds a stop rule off for the first steps and needs one (--stop-norm); received --min-steps 3 "
     "with no --stop-norm."),
    ("stop_rule: needs max_steps, the most inner steps a pair may run; received max_steps=None.", None, None,
     "stop_rule: needs --max-steps, the most inner steps a pair may run; received no --max-steps."),
    ("jit_compile: expected one of auto, True, False, received 'yes'.", "jit_compile", None,
     "jit_compile: expected one of auto, True, False, received 'yes'."),  # --no-xla is a switch, not this setting
    ("the checkpoint ran with jit_compile=False; this run has jit_compile=True.", None, None,
     "the checkpoint ran with --no-xla; this run has jit_compile=True."),
])
def test_flag_text_never_shows_a_python_value_as_a_flags_value(message, parameter, flags, expected):
    assert cli.flag_text(message, parameter=parameter, flags=flags) == expected


def test_min_steps_without_a_stop_rule_names_the_stop_rules_not_none(sample, tmp_path):
    done = generate(sample, tmp_path / "r.h5", "--steps", "1,2", "--min-steps", 2)
    assert_error(done, 2, "--min-steps", "--stop-norm, --stop-token or --stop-gate")
    assert "None" not in done.stderr and os.listdir(tmp_path) == []


def test_resume_without_a_checkpoint_says_to_leave_out_resume(sample, tmp_path):
    from cascade_cli.errors import ParameterError

    text = cli.flag_text("resume: no checkpoint to resume from in 'run/checkpoints'; to start training, leave out "
                         "resume=True.", parameter="resume")
    assert text == "--resume: no checkpoint to resume from in 'run/checkpoints'; to start training, leave out --resume."
    from cascade_cli.train import checkpoints

    (tmp_path / "run").mkdir()
    with pytest.raises(ParameterError) as raised:
        checkpoints.saved_settings(tmp_path / "run")
    assert "leave out resume=True" in str(raised.value) and "False" not in str(raised.value)


# ------------------------------------------------------------------ usage errors


def test_keep_gate_without_a_stop_gate_is_a_usage_error(sample, tmp_path):
    done = generate(sample, tmp_path / "r.h5", "--steps", "1,2", "--keep-gate")
    assert_error(done, 2, "--keep-gate", "--stop-gate")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flag, value, words", [
    ("--steps", "1,,2", "--steps value 2: expected a non-negative integer, received ''"),
    ("--steps", "1,-2", "--steps value 2: expected a non-negative integer, received '-2'"),
    ("--steps", ",", "--steps value 1: expected a non-negative integer, received ''"),
    ("--steps", " ", "--steps: expected comma-separated non-negative integers, received ' '"),
    ("--stop-token", ",", "'--stop-token'"),
])
def test_a_malformed_list_of_numbers_is_a_usage_error(sample, tmp_path, flag, value, words):
    extra = [flag, value] + (["--max-steps", 3] if flag == "--stop-token" else [])
    assert_error(generate(sample, tmp_path / "r.h5", *extra), 2, words)
    assert os.listdir(tmp_path) == []
