"""Tests for cascade_cli.train.checkpoints: out_dir, history.csv, the resume check, the state file and the backup."""

import csv
import errno
import hashlib
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from cascade_cli.train.checkpoints import (
    STATE_FILE,
    RestoredBackup,
    RunLock,
    backed_up_epoch,
    check_out_dir,
    check_settings,
    check_trained_model,
    prepare_out_dir,
    remove_training_run,
    read_state,
    reporting_full_disk,
    run_settings,
    saved_settings,
    save_models,
    trained_pair,
    write_history,
)
from cascade_cli.errors import DataError, ModelError, ParameterError
from cascade_cli.options import TrainConfig


class Data:
    """What `run_settings` reads of a `TrainingData`."""

    n_samples, outer_steps, features, output_size = 6, 3, 2, 1


def dense(seed):
    inputs = keras.Input(shape=(2,))
    return keras.Model(inputs, keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(seed))(inputs))


# ------------------------------------------------------------------ out_dir


def test_prepare_out_dir_creates_refuses_and_says_why(tmp_path):
    # out_dir is created with its missing parents (as every output's folders are); a failed run takes them away
    with pytest.raises(RuntimeError):
        with prepare_out_dir(tmp_path / "a" / "b", resume=False) as folder:
            assert folder.created == [tmp_path / "a" / "b", tmp_path / "a"]
            raise RuntimeError("the run failed before its first checkpoint")
    assert os.listdir(tmp_path) == []
    (tmp_path / "a").mkdir()
    with prepare_out_dir(tmp_path / "a" / "b", resume=False) as folder:
        assert folder.path == tmp_path / "a" / "b" and folder.created == [tmp_path / "a" / "b"]
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "a" / "b" / "checkpoints").mkdir()
    with prepare_out_dir(tmp_path / "a" / "b", resume=False) as folder:  # an empty checkpoints/ is no run
        assert folder.created == []

    (tmp_path / "file").write_text("")
    with pytest.raises(ParameterError, match=r"^out_dir: '.*file' is a file: expected a folder\.$"):
        prepare_out_dir(tmp_path / "file", resume=False)
    with pytest.raises(ParameterError, match=r"^resume: no backup to resume from in '.*b/checkpoints/backup'; "
                                             r"to start training, leave out resume=True\.$"):
        prepare_out_dir(tmp_path / "a" / "b", resume=True)
    write_history(tmp_path / "a" / "b" / "history.csv", [])
    with pytest.raises(ParameterError, match=r"^out_dir: '.*b' holds files of a training run \(history.csv\) but "
                                             r"no complete checkpoint to resume from; pass overwrite=True to "
                                             r"replace them, or choose another out_dir\.$"):
        prepare_out_dir(tmp_path / "a" / "b", resume=False)
    save_checkpoint(tmp_path / "a" / "b")
    with pytest.raises(ParameterError, match=r"^out_dir: '.*b' already holds a training run \(checkpoints, "
                                             r"history.csv\); pass resume=True to continue it, overwrite=True to "
                                             r"replace it, or choose another out_dir\.$"):
        prepare_out_dir(tmp_path / "a" / "b", resume=False)
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["checkpoints", "history.csv"]  # the lock went with the run


def test_overwrite_replaces_an_earlier_run_and_leaves_the_user_s_files(tmp_path):
    save_checkpoint(tmp_path / "run")
    for name in ("model_a.keras", "model_b.keras", "cascade.keras", "notes.txt"):
        (tmp_path / "run" / name).write_text("earlier")
    with prepare_out_dir(tmp_path / "run", resume=False, overwrite=True) as folder:
        assert sorted(os.listdir(folder.path)) == [".cascade-train.lock", "notes.txt"]
    assert sorted(os.listdir(tmp_path / "run")) == ["notes.txt"]


def save_checkpoint(out_dir, *, epoch=1, settings=None):
    """Writes a backup of epoch `epoch` into `out_dir/checkpoints` (as `BackupAndRestore` does) and its state."""
    history = [{"epoch": e, "loss": 0.5, "val_loss": None, "seconds": 1.0} for e in range(1, epoch + 1)]
    write_state(out_dir, settings or {}, history)  # what RunState writes before each backup
    write_history(out_dir / "history.csv", history)
    backup = out_dir / "checkpoints" / "backup"
    backup.mkdir(parents=True, exist_ok=True)
    dense(1.0).save_weights(backup / "latest.weights.h5")
    (backup / "training_metadata.json").write_text(json.dumps({"epoch": epoch, "batch": 0}))
    return out_dir / "checkpoints"


def test_a_failed_run_removes_the_folders_it_created_and_only_those(tmp_path):
    with pytest.raises(RuntimeError):
        with prepare_out_dir(tmp_path / "new", resume=False):
            raise RuntimeError("a bad setting found late")
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError):
        with prepare_out_dir(tmp_path / "mine", resume=False) as folder:
            (folder.path / "checkpoints" / "backup").mkdir(parents=True)  # a first backup that never ended
            (folder.path / "checkpoints" / "backup" / "latest.weights.h5").write_bytes(b"half")
            raise RuntimeError
    assert os.listdir(tmp_path) == ["mine"] and os.listdir(tmp_path / "mine") == []  # the user's folder stays
    with pytest.raises(RuntimeError):
        with prepare_out_dir(tmp_path / "kept", resume=False) as folder:
            save_checkpoint(folder.path)
            raise RuntimeError("a NaN in epoch 2")
    assert sorted(os.listdir(tmp_path / "kept")) == ["checkpoints", "history.csv"]  # epoch 1 is kept


def test_a_folder_without_a_complete_backup_is_no_dead_end(tmp_path):
    backup = tmp_path / "checkpoints" / "backup"
    backup.mkdir(parents=True)
    (backup / "latest.weights.h5").write_bytes(b"\0" * 10)  # a kill while the first backup was written
    assert backed_up_epoch(tmp_path / "checkpoints") is None
    with pytest.raises(ParameterError,
                       match=r"^resume: the backup in '.*backup' cannot be read \(a file of it damaged or cut "
                             r"short\?\): nothing to resume from; start afresh with overwrite=True\.$"):
        prepare_out_dir(tmp_path, resume=True)
    with prepare_out_dir(tmp_path, resume=False):  # a new run takes it, and clears what was left
        assert os.listdir(tmp_path) == [".cascade-train.lock"]


def restored(checkpoints, kernel):
    """A compiled `dense(kernel)` and the `RestoredBackup` of `checkpoints` that `fit` would begin with."""
    model = dense(kernel)
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    backup = RestoredBackup(checkpoints)
    backup.set_model(model)
    backup.on_train_begin()
    return model, backup


def test_a_backup_cut_short_gives_way_to_the_one_before(tmp_path):
    checkpoints = save_checkpoint(tmp_path, epoch=2)
    backup = checkpoints / "backup"
    assert backed_up_epoch(checkpoints) == 2
    for name in ("latest.weights.h5", "training_metadata.json"):  # what RestoredBackup keeps of epoch 1
        (backup / f"{name}.bkp").write_bytes((backup / name).read_bytes())
    (backup / "training_metadata.json.bkp").write_text(json.dumps({"epoch": 1, "batch": 0}))
    (backup / "training_metadata.json").write_text('{"epo')  # a kill while epoch 3's was written
    assert backed_up_epoch(checkpoints) == 1
    model, restoring = restored(checkpoints, 0.0)
    assert model._initial_epoch == 1
    np.testing.assert_array_equal(model.get_weights()[0], [[1.0], [1.0]])
    (backup / "latest.weights.h5").write_bytes(b"cut")
    (backup / "latest.weights.h5.bkp").unlink()
    with pytest.raises(ParameterError, match=r"^resume: the backup in '.*backup' cannot be restored into these "
                                             r"models \(a file of it damaged or cut short"):
        restoring.on_train_begin()
    assert backed_up_epoch(tmp_path / "missing") is None


def test_a_kill_between_the_backup_s_weights_and_its_epoch_file_resumes_from_the_epoch_before(tmp_path,
                                                                                                monkeypatch):
    """Keras writes the backup's weights, then its epoch file: a kill between the two must not leave epoch 2's
    weights labelled epoch 1 (a resume would train epoch 2 again from them, silently off the unbroken run)."""
    from keras.src.utils import file_utils

    checkpoints = tmp_path / "checkpoints"
    model, saving = restored(checkpoints, 1.0)
    saving.on_epoch_end(0)  # epoch 1's backup, whole
    assert backed_up_epoch(checkpoints) == 1
    model.set_weights([np.full((2, 1), 2.0), np.zeros(1)])  # what epoch 2 trained
    opened = file_utils.File

    def killed_at_the_epoch_file(path, *args, **kwargs):
        if str(path).endswith("training_metadata.json"):
            raise KeyboardInterrupt
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(file_utils, "File", killed_at_the_epoch_file)
    with pytest.raises(KeyboardInterrupt):
        saving.on_epoch_end(1)
    monkeypatch.setattr(file_utils, "File", opened)
    assert backed_up_epoch(checkpoints) == 1
    resumed, _ = restored(checkpoints, 0.0)
    assert resumed._initial_epoch == 1
    np.testing.assert_array_equal(resumed.get_weights()[0], [[1.0], [1.0]])  # epoch 1's, not epoch 2's


LOCK_HOLDER = """
import sys, time
from cascade_cli.train.checkpoints import prepare_out_dir
with prepare_out_dir(sys.argv[1], resume=False):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_run_into_the_same_out_dir_is_refused_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "run1")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        for resume in (False, True):
            with pytest.raises(ParameterError) as caught:
                prepare_out_dir(tmp_path / "run1", resume=resume)
            assert str(caught.value) == (
                f"out_dir: '{tmp_path / 'run1'}' is in use by another training run (pid {holder.pid}); wait for it "
                "to end, or choose another out_dir.")
    finally:
        holder.kill()
        holder.wait()
    with prepare_out_dir(tmp_path / "run1", resume=False):  # the lock died with its holder
        with pytest.raises(ParameterError, match=f"in use by another training run \\(pid {os.getpid()}\\)"):
            RunLock(tmp_path / "run1").acquire()


def test_check_out_dir_refuses_an_unwritable_folder_and_creates_nothing(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    (tmp_path / "file").write_text("")
    writable = lambda path, mode: os.fspath(path) != os.fspath(tmp_path / "ro")  # noqa: E731
    monkeypatch.setattr(os, "access", writable)  # as a non-root user sees a read-only folder
    assert check_out_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    with pytest.raises(ParameterError, match=r"^out_dir: '.*ro' is not writable\.$"):
        check_out_dir(tmp_path / "ro")
    with pytest.raises(ParameterError, match=r"^out_dir: '.*ro/run' cannot be created: '.*ro' is not writable\.$"):
        prepare_out_dir(tmp_path / "ro" / "run", resume=False)
    with pytest.raises(ParameterError, match=r"^out_dir: '.*file' is a file: expected a folder\.$"):
        check_out_dir(tmp_path / "file")
    assert sorted(os.listdir(tmp_path)) == ["file", "ro"]


def test_remove_training_run_removes_what_training_wrote_and_nothing_else(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "backup").mkdir()
    for name in ("model_a.keras", "model_b.keras", "cascade.keras", "history.csv", "notes.txt"):
        (tmp_path / name).write_text("")
    remove_training_run(tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]
    remove_training_run(tmp_path / "missing")  # nothing to remove


def test_write_history_by_hand(tmp_path):
    write_history(tmp_path / "history.csv", [{"epoch": 1, "loss": 0.5, "val_loss": None, "seconds": 1.25},
                                             {"epoch": 2, "loss": 0.25, "val_loss": 0.125, "seconds": 2.0}])
    assert (tmp_path / "history.csv").read_text().splitlines() == [
        "epoch,loss,val_loss,seconds", "1,0.5,,1.25", "2,0.25,0.125,2.0"]
    with open(tmp_path / "history.csv", newline="") as file:
        assert [row["val_loss"] for row in csv.DictReader(file)] == ["", "0.125"]
    assert sorted(os.listdir(tmp_path)) == ["history.csv"]  # no temporary file left


def test_history_csv_puts_the_metrics_after_the_fixed_columns_and_leaves_missing_ones_empty(tmp_path):
    write_history(tmp_path / "history.csv", [
        {"epoch": 1, "loss": 0.5, "val_loss": None, "seconds": 1.0},  # before --metrics mae was given on resume
        {"epoch": 2, "loss": 0.25, "val_loss": 0.5, "mae": 0.375, "val_mae": 0.625, "seconds": 2.0}])
    assert (tmp_path / "history.csv").read_text().splitlines() == [
        "epoch,loss,val_loss,seconds,mae,val_mae", "1,0.5,,1.0,,", "2,0.25,0.5,2.0,0.375,0.625"]


def test_the_generator_is_written_with_the_pair_and_checked_by_the_manifest(tmp_path):
    save_models((dense(1.0), dense(2.0)), tmp_path, history=[{"epoch": 1, "loss": 0.5, "val_loss": None,
                                                              "seconds": 1.0}], generator=dense(3.0))
    record = json.loads((tmp_path / "checkpoints" / "trained.json").read_text())
    assert sorted(record["files"]) == ["cascade.keras", "history.csv", "model_a.keras", "model_b.keras"]
    assert trained_pair(tmp_path) == record
    check_trained_model(tmp_path / "cascade.keras")
    (tmp_path / "cascade.keras").write_bytes(b"another epoch")
    assert trained_pair(tmp_path) is None
    with pytest.raises(ModelError, match="cascade.keras' is from a training run that stopped"):
        check_trained_model(tmp_path / "cascade.keras")


def test_save_models_writes_the_pair_then_its_manifest(tmp_path):
    history = [{"epoch": 3, "loss": 0.5, "val_loss": None, "seconds": 1.0}]
    save_models((dense(1.0), dense(2.0)), tmp_path, history=history)
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "history.csv", "model_a.keras", "model_b.keras"]
    kernel = keras.saving.load_model(tmp_path / "model_b.keras").get_weights()[0]
    np.testing.assert_array_equal(kernel, [[2.0], [2.0]])
    record = json.loads((tmp_path / "checkpoints" / "trained.json").read_text())
    assert record["epoch"] == 3 and sorted(record["files"]) == ["history.csv", "model_a.keras", "model_b.keras"]
    assert record["files"]["history.csv"] == hashlib.sha256((tmp_path / "history.csv").read_bytes()).hexdigest()
    assert trained_pair(tmp_path) == record
    check_trained_model(tmp_path / "model_a.keras")


def test_a_kill_between_the_two_models_leaves_no_pair_a_reader_accepts(tmp_path, monkeypatch):
    save_models((dense(1.0), dense(2.0)), tmp_path, history=[{"epoch": 1, "loss": 0.5, "val_loss": None,
                                                              "seconds": 1.0}])
    saves = []

    def killed_after_one(self, path, *args, **kwargs):
        if saves:
            raise KeyboardInterrupt  # the kill, after model_a.keras of epoch 2 is in place
        saves.append(path)
        original(self, path, *args, **kwargs)

    original = keras.Model.save
    monkeypatch.setattr(keras.Model, "save", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        save_models((dense(5.0), dense(6.0)), tmp_path, history=[{"epoch": 2, "loss": 0.5, "val_loss": None,
                                                                  "seconds": 1.0}])
    monkeypatch.undo()
    assert trained_pair(tmp_path) is None
    for name in ("model_a.keras", "model_b.keras"):
        with pytest.raises(ModelError) as caught:
            check_trained_model(tmp_path / name)
        assert str(caught.value) == (
            f"'{tmp_path / name}' is from a training run that stopped while writing its models (it does not match "
            f"'{tmp_path / 'checkpoints' / 'trained.json'}'), so model_a.keras and model_b.keras may be from "
            "different epochs: resume the run (resume=True) to write a matching pair.")
    check_trained_model(tmp_path / "history.csv")  # not a model: not checked
    (tmp_path / "copy").mkdir()
    (tmp_path / "model_a.keras").rename(tmp_path / "copy" / "model_a.keras")
    check_trained_model(tmp_path / "copy" / "model_a.keras")  # not in a training run's folder: a user's own file


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   tf.errors.ResourceExhaustedError(None, None, "/x/ckpt_temp; No space left")])
def test_a_full_disk_while_saving_is_reported_as_such(tmp_path, monkeypatch, error):
    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(keras.Model, "save", full)
    with pytest.raises(DataError, match=r"^no space left on device writing '.*model_a.keras'$"):
        save_models((dense(1.0), dense(2.0)), tmp_path)
    with pytest.raises(OSError, match="Permission"):
        with reporting_full_disk(tmp_path):
            raise PermissionError(errno.EACCES, "Permission denied")  # other errors stay what they are


# ----------------------------------------------------------------- settings


def test_run_settings_and_the_resume_check_name_python_settings():
    config = TrainConfig(batch_size=16, optimizer="sgd").resolved()
    settings = run_settings(config, Data())
    assert settings == {"seed": 0, "val_split": 0.1, "shuffle": True, "batch_size": 16, "optimizer": "sgd",
                        "loss": "mse", "from_logits": None, "freeze_a": False, "state": "reset",
                        "state_init": "zeros", "lr_schedule": "constant", "mixed_precision": False,
                        "epochs": 10, "learning_rate": 0.001, "patience": None, "clipnorm": None, "warmup_steps": 0,
                        "metrics": [], "tensorboard": None, "feedback": False, "feedback_start": "zeros",
                        "sampling_schedule": None, "jit_compile": None, "append_end_token": None,
                        "stop_gate": False, "stop_weight": 1.0, "stop_pos_weight": 1.0, "max_steps": None,
                        "window": None, "samples": [6, 3, 2, 1]}
    check_settings("run1/checkpoints", settings, dict(settings))
    check_settings("run1/checkpoints", settings, {**settings, "epochs": 40, "learning_rate": 0.5, "clipnorm": 1.0,
                                                  "warmup_steps": 5, "metrics": ["mae"], "max_steps": 9})  # may change
    with pytest.raises(ParameterError, match=r"made with lr_schedule='constant', mixed_precision=False; this "
                                             r"run has lr_schedule='cosine', mixed_precision=True\."):
        check_settings("run1/checkpoints", settings, {**settings, "lr_schedule": "cosine", "mixed_precision": True})
    older = {name: value for name, value in settings.items() if name != "state_init"}
    check_settings("run1/checkpoints", older, {**settings, "state_init": "ir"})  # not recorded then: not checked
    wanted = {**settings, "batch_size": 32, "freeze_a": True, "samples": [7, 3, 2, 1]}
    with pytest.raises(ParameterError) as caught:
        check_settings("run1/checkpoints", settings, wanted)
    assert str(caught.value) == (
        "resume: the checkpoints in 'run1/checkpoints' were made with batch_size=16, freeze_a=False, a training "
        "file of (N, Ta, F, O)=(6, 3, 2, 1); this run has batch_size=32, freeze_a=True, a training file of "
        "(N, Ta, F, O)=(7, 3, 2, 1). Resume with the same settings, or choose another out_dir."
    )
    assert caught.value.parameter == "resume"


# -------------------------------------------------------------- checkpoints


def write_state(out_dir, settings, history=()):
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out_dir / "checkpoints" / STATE_FILE).write_text(json.dumps({"history": list(history), "settings": settings}))


def test_saved_settings_read_the_state_file_beside_the_backup(tmp_path):
    settings = run_settings(TrainConfig().resolved(), Data())
    save_checkpoint(tmp_path, epoch=2, settings=settings)
    (tmp_path / "checkpoints" / STATE_FILE).unlink()
    with pytest.raises(ParameterError, match=r"^resume: '.*run_state\.json' is missing beside the backup of epoch 2"):
        saved_settings(tmp_path)
    write_state(tmp_path, settings)
    assert saved_settings(tmp_path) == {**settings, "epochs_done": 2}


def test_a_damaged_state_file_is_refused_naming_it(tmp_path):
    assert read_state(tmp_path) is None
    (tmp_path / STATE_FILE).write_text('{"history": ')
    with pytest.raises(ParameterError, match=r"^resume: '.*run_state\.json' cannot be read"):
        read_state(tmp_path)
