"""What a resumed `fit` needs that Keras' `BackupAndRestore` does not keep: `RunState`, cascade's own state file.

`BackupAndRestore` keeps the weights, the optimizer and the epoch; a resumed
`fit` also needs the history of the epochs before it (for `history.csv` and
the best-epoch line), `EarlyStopping`'s best value, wait count and best
weights (so `patience` counts the epochs before the resume), and what the run
was started with (its settings and the data file's hash, which a resume must
repeat). `RunState` writes them after every epoch and gives them back to a
resumed `fit`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import keras
import numpy as np

from cascade_cli.atomic import atomic_output
from cascade_cli.errors import ParameterError
from cascade_cli.train.checkpoints import STATE_FILE, read_state, write_history

_BEST_WEIGHTS = "best-{epoch}.weights.npz"  # the weights of a best epoch (1-based), for EarlyStopping


def early_stopping_state(history, *, monitor="val_loss"):
    """What `EarlyStopping(monitor, mode="min")` holds after the epochs of `history`: `(best, best_epoch, wait)`.

    `best` is the lowest `monitor` value (None when no row has one),
    `best_epoch` its epoch (1-based; 0 with none) and `wait` the epochs with a
    value since it, as Keras counts them (a row without the value does not count).
    """
    best, best_epoch, wait = None, 0, 0
    for row in history:
        value = row.get(monitor)
        if value is None:
            continue
        wait += 1
        if best is None or value < best:
            best, best_epoch, wait = value, int(row["epoch"]), 0
    return best, best_epoch, wait


class RunState(keras.callbacks.Callback):
    """Writes a run's history, settings and best weights beside `BackupAndRestore`, and gives them back on resume.

    After every epoch it appends the epoch's row to the history (`epoch`,
    1-based, then every figure of the epoch's logs, then `seconds`) and
    writes `folder/run_state.json` (the history and `settings`) atomically,
    and `history_file` (`checkpoints.write_history`) when given; with an
    `EarlyStopping(restore_best_weights=True)`, the weights of a new best
    epoch go into `folder/best-E.weights.npz`.

    Give it *before* `BackupAndRestore` in `callbacks`: the state of an
    epoch is written before Keras' backup of it, so a kill between the two
    leaves a state one epoch ahead, never behind. As the first epoch of a
    `fit` begins (the epoch `BackupAndRestore` resumes from), it keeps the
    history of the epochs before it only and gives `early_stopping` the best
    value, wait count, best epoch and best weights that an unbroken run held
    there, so the weights restored at the end and the stopping epoch are
    those of an unbroken run.

    Args:
        folder: where the state goes (`BackupAndRestore`'s own folder may not
            hold other files: give another one).
        settings: a JSON-able dict recorded with the state (a resume checks it), or None.
        early_stopping: the run's `keras.callbacks.EarlyStopping` (on
            `val_loss`, mode `min`, `min_delta=0`), or None.
        history_file: a path to rewrite as `history.csv` after every epoch, or None.
        write: False on a worker that only reads the state (not the chief of a
            multi-worker run): it keeps the history in memory only.

    Attributes:
        history: the rows so far, earlier epochs of a resumed run included.
    """

    def __init__(self, folder, *, settings=None, early_stopping=None, history_file=None, write=True):
        super().__init__()
        stop = early_stopping
        if stop is not None and (stop.monitor != "val_loss" or stop.mode not in ("auto", "min") or stop.min_delta):
            raise ParameterError("early_stopping", f"expected EarlyStopping(monitor='val_loss', mode='min', "
                                                   f"min_delta=0), received monitor={stop.monitor!r}, "
                                                   f"mode={stop.mode!r}, min_delta={stop.min_delta!r}.")
        self.folder = Path(folder)
        self.settings = settings
        self.early_stopping = early_stopping
        self.history_file = None if history_file is None else Path(history_file)
        self.write = write
        self.history = []
        self._resumed = False
        self._started = None

    def on_train_begin(self, logs=None):
        self._resumed = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._resumed:
            self.resume(epoch)
        self._started = time.perf_counter()

    def resume(self, epoch):
        """Takes the state of the `epoch` epochs done (0: none) and returns their history; done once a `fit`.

        Keeps the history of those epochs and gives `early_stopping` (after its
        `on_train_begin`) the best value, wait count, best epoch and best
        weights an unbroken run held after them. `fit` calls it as its first
        epoch begins; a loop that drives the callbacks itself calls it after
        `on_train_begin`.

        Raises:
            ParameterError: (`resume`) the state holds fewer epochs, or cannot be read.
        """
        self._resumed = True
        state = read_state(self.folder) if epoch else None
        history = [] if state is None else [row for row in state["history"] if row["epoch"] <= epoch]
        if epoch and len(history) != epoch:
            raise ParameterError("resume", f"'{self.folder / STATE_FILE}' holds {len(history)} epochs, but the "
                                           f"backup resumes after epoch {epoch}: expected the state of each epoch "
                                           "backed up; start afresh with overwrite=True.")
        self.history = history
        stop = self.early_stopping
        if stop is None or not history:
            return list(history)
        best, best_epoch, wait = early_stopping_state(history, monitor=stop.monitor)
        stop.best, stop.wait = best, wait
        stop.best_epoch = max(best_epoch - 1, 0)
        if stop.restore_best_weights and best is not None:
            with np.load(self.folder / _BEST_WEIGHTS.format(epoch=best_epoch)) as saved:
                stop.best_weights = [saved[f"w{i}"] for i in range(len(saved.files))]
        return list(history)

    def on_epoch_end(self, epoch, logs=None):
        logs = {key: float(value) for key, value in (logs or {}).items()}
        row = {"epoch": epoch + 1}
        for key in [key for key in logs if not key.startswith("val_")]:  # each figure, then its val_ (None: none)
            row[key], row[f"val_{key}"] = logs[key], logs.get(f"val_{key}")
        row.update((key, value) for key, value in logs.items() if key not in row)
        row = {key: None if value is None or not math.isfinite(value) else value for key, value in row.items()}
        row["epoch"] = epoch + 1
        row["seconds"] = time.perf_counter() - self._started
        before = early_stopping_state(self.history)[1]
        self.history.append(row)
        if not self.write:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        best = early_stopping_state(self.history)[1]
        keep = {before, best}
        if self.early_stopping is not None and self.early_stopping.restore_best_weights and best == epoch + 1:
            with atomic_output(self.folder / _BEST_WEIGHTS.format(epoch=best), overwrite=True,
                               suffix=".npz") as temp:
                np.savez(temp, **{f"w{i}": w for i, w in enumerate(self.model.get_weights())})
        for path in self.folder.glob(_BEST_WEIGHTS.format(epoch="*")):
            if int(path.name.split("-")[1].split(".")[0]) not in keep:  # a best that no resume can need
                path.unlink()
        with atomic_output(self.folder / STATE_FILE, overwrite=True) as temp:
            temp.write_text(json.dumps({"format_version": 1, "history": self.history, "settings": self.settings},
                                       indent=1), encoding="utf-8")
        if self.history_file is not None:
            write_history(self.history_file, self.history)


class ShowProgress(keras.callbacks.Callback):
    """Tells a `TrainCallbacks` (`cascade train`'s rich display) what `fit` does, in the command's terms.

    Each epoch's start (1-based, of `fit`'s `epochs`, with its batches when
    Keras knows them), each batch's running training loss, and each epoch's
    history row: `run_state`'s (give this callback after it), else the
    epoch's logs with `epoch` (1-based) and `val_loss` (None without one).
    The run's start, a resume, an early stop and the run's end belong to
    whoever calls `fit`.

    Args:
        display: a `TrainCallbacks`.
        run_state: the run's `RunState`, or None.
    """

    def __init__(self, display, *, run_state=None):
        super().__init__()
        self.display = display
        self.run_state = run_state

    def on_epoch_begin(self, epoch, logs=None):
        self.display.epoch_started(epoch + 1, epochs=self.params["epochs"], batches=self.params.get("steps"))

    def on_train_batch_end(self, batch, logs=None):
        self.display.batch_done(float((logs or {})["loss"]))

    def on_epoch_end(self, epoch, logs=None):
        if self.run_state is not None:
            row = dict(self.run_state.history[-1])
        else:
            row = {"epoch": epoch + 1, "val_loss": None, **{key: float(value) for key, value in (logs or {}).items()}}
        self.display.epoch_done(row)
