"""Tests for cascade_cli.train.callbacks: `RunState` beside `BackupAndRestore` and `EarlyStopping` in `CascadeModel.fit`."""

import csv

import keras
import numpy as np
import pytest

import builders
from cascade_cli.errors import ParameterError
from cascade_cli.train.callbacks import STATE_FILE, RunState, ShowProgress, early_stopping_state, read_state
from cascade_cli.train.keras_model import CascadeModel, ReseedEachEpoch
from test_keras_model import training_arrays


def test_early_stopping_state_by_hand():
    rows = [{"epoch": 1, "val_loss": 3.0}, {"epoch": 2, "val_loss": 2.0}, {"epoch": 3, "val_loss": 2.0},
            {"epoch": 4, "val_loss": None}, {"epoch": 5, "val_loss": 2.5}]
    assert early_stopping_state(rows) == (2.0, 2, 2)  # a tie is no improvement; a row without it does not count
    assert early_stopping_state([]) == (None, 0, 0)
    assert early_stopping_state(rows[:2]) == (2.0, 2, 0)


def test_run_state_refuses_an_early_stopping_it_cannot_resume(tmp_path):
    with pytest.raises(ParameterError, match="early_stopping.*monitor='loss'"):
        RunState(tmp_path, early_stopping=keras.callbacks.EarlyStopping(monitor="loss"))


def _fit(tmp_path, *, kill=None, before_backup=False, epochs=5):
    """A seeded run with EarlyStopping, RunState and BackupAndRestore; `kill` ends it at that epoch's end.

    `before_backup`: the kill falls between RunState's write and Keras' backup of that epoch.
    """
    from cascade_cli.data import dataset
    from filetools import write_h5

    inputs, steps, flat, _ = training_arrays(n=8)
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "train.h5"
    if not path.exists():
        write_h5(path, inputs=inputs, steps=steps, targets=flat)
    train = dataset(path, batch_size=2, seed=3, indices=np.arange(6))
    val = dataset(path, batch_size=2, shuffle=False, indices=np.arange(6, 8))
    model = CascadeModel(builders.model_a(), builders.step_b())
    model.compile(keras.optimizers.Adam(0.3), loss="mse", jit_compile=False)  # a rate that makes val_loss jump
    stop = keras.callbacks.EarlyStopping(patience=2, restore_best_weights=True)
    state = RunState(tmp_path / "state", settings={"seed": 3}, early_stopping=stop,
                     history_file=tmp_path / "history.csv")
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)
    killer = [] if kill is None else [builders.KillAfterEpoch(kill)]
    callbacks = [ReseedEachEpoch(3), stop, state, *(killer if before_backup else []), backup,
                 *([] if before_backup else killer)]
    model.fit(train, validation_data=val, epochs=epochs, callbacks=callbacks, verbose=0)
    return model, stop, state


def _rows(history):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in history]


@pytest.mark.slow  # three runs of up to 5 epochs: about 20-40 s on 2 cores
@pytest.mark.parametrize("before_backup", [False, True])
def test_a_killed_run_resumes_to_the_weights_history_and_stop_of_an_unbroken_one(tmp_path, before_backup):
    unbroken, stop, state = _fit(tmp_path / "unbroken")
    best, best_epoch, wait = early_stopping_state(state.history)
    assert best_epoch < len(state.history)  # the weights restored are not the last epoch's: the test can fail
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "resumed", kill=1, before_backup=before_backup)
    assert len(read_state(tmp_path / "resumed" / "state")["history"]) == 2
    resumed, resumed_stop, resumed_state = _fit(tmp_path / "resumed")
    assert _rows(resumed_state.history) == _rows(state.history)
    assert (resumed_stop.stopped_epoch, resumed_stop.best_epoch) == (stop.stopped_epoch, stop.best_epoch)
    for left, right in zip(resumed.get_weights(), unbroken.get_weights()):
        np.testing.assert_array_equal(left, right)
    with open(tmp_path / "resumed" / "history.csv", newline="", encoding="utf-8") as file:
        written = list(csv.DictReader(file))
    assert [int(row["epoch"]) for row in written] == [row["epoch"] for row in state.history]
    assert list(written[0])[:4] == ["epoch", "loss", "val_loss", "seconds"]
    assert read_state(tmp_path / "resumed" / "state")["settings"] == {"seed": 3}
    assert len(list((tmp_path / "resumed" / "state").glob("best-*.weights.npz"))) <= 2
    assert STATE_FILE == "run_state.json"


def test_show_progress_tells_a_train_callbacks_what_fit_does(tmp_path):
    from cascade_cli.options import TrainCallbacks

    class Record(TrainCallbacks):
        def __init__(self):
            self.calls = []

        def epoch_started(self, epoch, *, epochs, batches):
            self.calls.append(("epoch_started", epoch, epochs, batches))

        def batch_done(self, loss):
            self.calls.append(("batch_done", loss))

        def epoch_done(self, logs):
            self.calls.append(("epoch_done", logs))

    inputs, steps, _, padded = training_arrays(n=6)
    model = CascadeModel(builders.model_a(), builders.step_b())
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    display = Record()
    state = RunState(tmp_path)
    history = model.fit((inputs[:4], steps[:4]), padded[:4], batch_size=2, epochs=2, shuffle=False, verbose=0,
                        validation_data=((inputs[4:], steps[4:]), padded[4:]),
                        callbacks=[state, ShowProgress(display, run_state=state)]).history
    kinds = [call[0] for call in display.calls]
    assert kinds == ["epoch_started", "batch_done", "batch_done", "epoch_done"] * 2
    assert display.calls[0] == ("epoch_started", 1, 2, 2) and display.calls[4] == ("epoch_started", 2, 2, 2)
    assert display.calls[2][1] == pytest.approx(history["loss"][0])  # the running loss at the epoch's end
    rows = [call[1] for call in display.calls if call[0] == "epoch_done"]
    assert rows == state.history
    assert [row["epoch"] for row in rows] == [1, 2]
    assert [row["val_loss"] for row in rows] == pytest.approx(history["val_loss"])
    assert all(row["seconds"] > 0 for row in rows)
