"""Tests for cascade_cli.checkpoints: out_dir, history.csv, the resume check, Progress and Checkpoints."""

import csv
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from cascade_cli.checkpoints import (
    Checkpoints,
    Progress,
    check_out_dir,
    check_settings,
    prepare_out_dir,
    remove_training_run,
    run_settings,
    save_models,
    write_history,
)
from cascade_cli.errors import ParameterError
from cascade_cli.options import TrainConfig


class Data:
    """What `run_settings` reads of a `TrainingData`."""

    n_samples, outer_steps, features, output_size = 6, 3, 2, 1


def dense(seed):
    inputs = keras.Input(shape=(2,))
    return keras.Model(inputs, keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(seed))(inputs))


# ------------------------------------------------------------------ out_dir


def test_prepare_out_dir_creates_refuses_and_says_why(tmp_path):
    assert prepare_out_dir(tmp_path / "a" / "b", resume=False) == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "a" / "b" / "checkpoints").mkdir()
    assert prepare_out_dir(tmp_path / "a" / "b", resume=False).is_dir()  # an empty checkpoints/ is no run

    (tmp_path / "file").write_text("")
    with pytest.raises(ParameterError, match=r"^out_dir: '.*file' is a file: expected a folder\.$"):
        prepare_out_dir(tmp_path / "file", resume=False)
    with pytest.raises(ParameterError, match=r"^resume: no checkpoint to resume from in '.*b/checkpoints'; "
                                             r"set resume=False to start training\.$"):
        prepare_out_dir(tmp_path / "a" / "b", resume=True)
    write_history(tmp_path / "a" / "b" / "history.csv", [])
    (tmp_path / "a" / "b" / "checkpoints" / "checkpoint").write_text("")
    with pytest.raises(ParameterError, match=r"^out_dir: '.*b' already holds a training run \(checkpoints, "
                                             r"history.csv\); pass resume=True to continue it, or choose another "
                                             r"out_dir\.$"):
        prepare_out_dir(tmp_path / "a" / "b", resume=False)


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
    (tmp_path / "checkpoints" / "ckpt-1.index").write_text("")
    for name in ("model_a.keras", "model_b.keras", "history.csv", "notes.txt"):
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


def test_save_models_writes_both_files(tmp_path):
    save_models((dense(1.0), dense(2.0)), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model_a.keras", "model_b.keras"]
    kernel = keras.saving.load_model(tmp_path / "model_b.keras").get_weights()[0]
    np.testing.assert_array_equal(kernel, [[2.0], [2.0]])


# ----------------------------------------------------------------- settings


def test_run_settings_and_the_resume_check_name_python_settings():
    config = TrainConfig(batch_size=16, optimizer="sgd")
    settings = run_settings(config, Data())
    assert settings == {"seed": 0, "val_split": 0.1, "shuffle": True, "batch_size": 16, "optimizer": "sgd",
                        "loss": "mse", "freeze_a": False, "state": "reset", "samples": [6, 3, 2, 1]}
    check_settings("run1/checkpoints", settings, dict(settings))
    wanted = {**settings, "batch_size": 32, "freeze_a": True, "samples": [7, 3, 2, 1]}
    with pytest.raises(ParameterError) as caught:
        check_settings("run1/checkpoints", settings, wanted)
    assert str(caught.value) == (
        "resume: the checkpoints in 'run1/checkpoints' were made with batch_size=16, freeze_a=False, a training "
        "file of (N, Ta, F, O)=(6, 3, 2, 1); this run has batch_size=32, freeze_a=True, a training file of "
        "(N, Ta, F, O)=(7, 3, 2, 1). Resume with the same settings, or choose another out_dir."
    )
    assert caught.value.parameter == "resume"


# ----------------------------------------------------------------- progress


def test_progress_keeps_the_best_weights_and_counts_patience():
    weight = tf.Variable([1.0, 2.0])
    progress = Progress([weight], keep_best=True)
    assert (progress.epochs_done, float(progress.best_val.numpy())) == (0, math.inf)
    assert not progress.patience_spent(1) and not progress.patience_spent(None)
    progress.record(0.5, epoch=1, weights=[weight])
    weight.assign([3.0, 4.0])
    progress.record(0.75, epoch=2, weights=[weight])  # worse: wait 1
    assert progress.patience_spent(1) and not progress.patience_spent(2)
    progress.record(None, epoch=3, weights=[weight])  # no validation set: nothing changes
    assert (int(progress.best_epoch.numpy()), int(progress.wait.numpy())) == (1, 1)
    progress.restore_best([weight])
    np.testing.assert_array_equal(weight.numpy(), [1.0, 2.0])

    nothing = Progress([weight], keep_best=False)
    weight.assign([5.0, 6.0])
    nothing.restore_best([weight])  # no best epoch: the weights stay
    np.testing.assert_array_equal(weight.numpy(), [5.0, 6.0])


# -------------------------------------------------------------- checkpoints


def checkpoints_for(out_dir, models, *, settings, chief=True):
    optimizer = keras.optimizers.SGD(learning_rate=0.1)
    optimizer.build([w for model in models for w in model.trainable_variables])
    progress = Progress([w for model in models for w in model.weights], keep_best=False)
    return Checkpoints(out_dir, models=models, optimizer=optimizer, progress=progress, settings=settings,
                       chief=chief), progress


def test_checkpoints_save_and_restore_the_models_the_history_and_the_settings(tmp_path):
    settings = run_settings(TrainConfig(), Data())
    models = (dense(1.0), dense(2.0))
    with checkpoints_for(tmp_path, models, settings=settings)[0] as checkpoints:
        checkpoints.start()
        history = [{"epoch": 1, "loss": 0.5, "val_loss": None, "seconds": 1.0}]
        checkpoints.save(history)
        models[1].layers[1].kernel.assign([[7.0], [7.0]])
        history.append({"epoch": 2, "loss": 0.25, "val_loss": None, "seconds": 1.0})
        checkpoints.save(history)
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "history.csv"]
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-2")

    fresh = (dense(0.0), dense(0.0))
    checkpoints, progress = checkpoints_for(tmp_path, fresh, settings=settings)
    assert checkpoints.restore() == history
    assert progress.epochs_done == 2
    np.testing.assert_array_equal(fresh[1].get_weights()[0], [[7.0], [7.0]])
    np.testing.assert_array_equal(fresh[0].get_weights()[0], [[1.0], [1.0]])

    other = checkpoints_for(tmp_path, (dense(0.0), dense(0.0)), settings={**settings, "seed": 5})[0]
    with pytest.raises(ParameterError, match="made with seed=0; this run has seed=5"):
        other.restore()


def test_a_non_chief_worker_checkpoints_into_a_temporary_folder_it_removes(tmp_path):
    models = (dense(1.0), dense(2.0))
    checkpoints, _ = checkpoints_for(tmp_path / "out", models, settings={}, chief=False)
    scratch = checkpoints._scratch
    with checkpoints:
        checkpoints.save([{"epoch": 1, "loss": 0.5, "val_loss": None, "seconds": 1.0}])
        assert tf.train.latest_checkpoint(str(scratch)).endswith("ckpt-1")
    assert not scratch.exists() and not (tmp_path / "out").exists()
