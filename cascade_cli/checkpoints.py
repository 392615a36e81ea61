"""What a training run writes into `out_dir`, and how a killed run resumes exactly.

Layout of `out_dir`: `checkpoints/` (the last few epochs), `history.csv`
(`epoch,loss,val_loss,seconds`, rewritten after every epoch) and, at the end,
`model_a.keras` and `model_b.keras`. Every file is written atomically.

A checkpoint holds the two models, the optimizer and the run's `Progress`
(epochs done, the history, the best validation loss and its weights, the
settings). A resumed run must repeat the settings that fix the data split and
order, the optimizer's slots and what each step computes
(`TrainConfig.RESUME_SETTINGS`); it then reaches exactly the weights of an
unbroken one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

from cascade_cli.atomic import atomic_output
from cascade_cli.errors import ParameterError
from cascade_cli.options import TrainConfig

HISTORY_FIELDS = ("epoch", "loss", "val_loss", "seconds")
CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 3
MODEL_FILES = ("model_a.keras", "model_b.keras")
HISTORY_FILE = "history.csv"


# ---------------------------------------------------------------- out_dir


def check_out_dir(out_dir):
    """Checks, before any work and creating nothing, that `out_dir` is a folder that can be written or created.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ParameterError: (`out_dir`) it is a file, or it (or the folder it
            would be created in) is not writable.
    """
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ParameterError("out_dir", f"'{path}' is a file: expected a folder.")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: '{existing}' is not writable"
        raise ParameterError("out_dir", f"'{path}' {what}.")
    return path


def prepare_out_dir(out_dir, *, resume):
    """Creates `out_dir` if needed; refuses a fresh run over an earlier one, or a resume without a checkpoint.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ParameterError: `out_dir` is a file, holds an earlier run (without
            `resume`) or no checkpoint (with it), or cannot be written.
    """
    out_dir = check_out_dir(out_dir)
    checkpoints = out_dir / CHECKPOINT_DIR
    if resume:
        if tf.train.latest_checkpoint(str(checkpoints)) is None:
            raise ParameterError(
                "resume", f"no checkpoint to resume from in '{checkpoints}'; set resume=False to start training."
            )
        return out_dir
    earlier = _training_files(out_dir)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        earlier.remove(CHECKPOINT_DIR)
    if earlier:
        raise ParameterError(
            "out_dir",
            f"'{out_dir}' already holds a training run ({', '.join(earlier)}); pass resume=True to continue it, "
            "or choose another out_dir.",
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParameterError("out_dir", f"'{out_dir}' cannot be created: {exc.strerror or exc}.") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ParameterError("out_dir", f"'{out_dir}' is not writable.")
    return out_dir


def _training_files(out_dir):
    """The names of the files and folders a training run writes that exist in `out_dir`."""
    return [name for name in (CHECKPOINT_DIR, *MODEL_FILES, HISTORY_FILE) if (Path(out_dir) / name).exists()]


def remove_training_run(out_dir):
    """Removes what a training run wrote into `out_dir` (`checkpoints/`, the models, `history.csv`), nothing else."""
    out_dir = Path(out_dir)
    for name in _training_files(out_dir):
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def save_models(models, out_dir):
    """Saves `(model_a, model_b)` as `out_dir/model_a.keras` and `out_dir/model_b.keras`, each atomically."""
    for model, name in zip(models, MODEL_FILES):
        with atomic_output(Path(out_dir) / name, overwrite=True, suffix=".keras") as temp:
            model.save(temp)


def write_history(path, history):
    """Writes history rows to `path` as CSV (`epoch,loss,val_loss,seconds`), atomically."""
    with atomic_output(path, overwrite=True) as temp:
        with open(temp, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(HISTORY_FIELDS)
            for row in history:
                writer.writerow(["" if row[key] is None else repr(row[key]) for key in HISTORY_FIELDS])


# ---------------------------------------------------------------- progress


class Progress(tf.Module):
    """What a checkpoint holds besides the models and the optimizer: epochs done, history, patience, settings.

    Args:
        weights: every weight of the two models, in a fixed order.
        keep_best: keep a copy of the weights of the best validation loss
            (only with a validation set).
    """

    def __init__(self, weights, *, keep_best):
        super().__init__(name="progress")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.best_val = tf.Variable(math.inf, dtype=tf.float64, trainable=False, name="best_val_loss")
        self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="best_epoch")
        self.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_without_improvement")
        self.settings = tf.Variable("", dtype=tf.string, trainable=False, name="settings")
        self.history = tf.Variable("[]", dtype=tf.string, trainable=False, name="history")
        self.best = [tf.Variable(tf.convert_to_tensor(w), trainable=False, name="best") for w in weights]
        if not keep_best:
            self.best = []

    @property
    def epochs_done(self):
        """The number of epochs completed (an int)."""
        return int(self.epoch.numpy())

    def patience_spent(self, patience):
        """Whether `patience` epochs (None: never) have passed without a better validation loss."""
        return patience is not None and int(self.wait.numpy()) >= patience

    def record(self, val_loss, *, epoch, weights):
        """Notes epoch `epoch`'s validation loss (None without a validation set); keeps the best `weights`."""
        if val_loss is None:
            return
        if val_loss < float(self.best_val.numpy()):
            self.best_val.assign(val_loss)
            self.best_epoch.assign(epoch)
            self.wait.assign(0)
            for best, weight in zip(self.best, weights):
                best.assign(tf.convert_to_tensor(weight))
        else:
            self.wait.assign_add(1)

    def restore_best(self, weights):
        """Puts the weights of the best epoch, when one was kept, back into `weights`."""
        if int(self.best_epoch.numpy()) > 0:
            for best, weight in zip(self.best, weights):
                weight.assign(best)


# ---------------------------------------------------------------- settings


def run_settings(config, data):
    """The settings a checkpoint records and a resumed run must repeat, as JSON-ready values."""
    values = {name: getattr(config, name) for name in TrainConfig.RESUME_SETTINGS}
    kinds = {"seed": int, "val_split": float, "shuffle": bool, "batch_size": int, "freeze_a": bool}
    values = {name: kinds.get(name, str)(value) for name, value in values.items()}
    values["samples"] = [int(data.n_samples), int(data.outer_steps), int(data.features), int(data.output_size)]
    return values


def _describe(name, value):
    """One setting as a Python user writes it: `batch_size=16`, `optimizer='adam'`."""
    if name == "samples":
        return f"a training file of (N, Ta, F, O)={tuple(value)}"
    return f"{name}={value!r}"


def check_settings(path, saved, wanted):
    """Raises `ParameterError` (`resume`) when a resumed run's settings differ from its checkpoint's."""
    differ = [name for name in wanted if saved.get(name) != wanted[name]]
    if differ:
        made = ", ".join(_describe(name, saved.get(name)) for name in differ)
        given = ", ".join(_describe(name, wanted[name]) for name in differ)
        raise ParameterError(
            "resume",
            f"the checkpoints in '{path}' were made with {made}; this run has {given}. Resume with the same "
            "settings, or choose another out_dir.",
        )


# ------------------------------------------------------------- checkpoints


class Checkpoints:
    """The checkpoints of one run: restore on resume, save after every epoch.

    Every worker saves (a multi-worker save may need all of them), but only
    the chief's checkpoints are kept, in `out_dir/checkpoints`; the other
    workers write into a temporary folder that `close` removes. Use it as a
    context manager.

    Args:
        out_dir: the run's folder (prepared by `prepare_out_dir`).
        models: `(model_a, model_b)` as trained (replicated under a strategy).
        optimizer: the run's optimizer.
        progress: the run's `Progress`.
        settings: `run_settings(config, data)`.
        chief: whether this process keeps its checkpoints and writes `history.csv`.
    """

    def __init__(self, out_dir, *, models, optimizer, progress, settings, chief):
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir / CHECKPOINT_DIR
        self.progress = progress
        self.settings = settings
        self.chief = chief
        model_a, model_b = models
        self._checkpoint = tf.train.Checkpoint(model_a=model_a, model_b=model_b, optimizer=optimizer,
                                               progress=progress)
        self._scratch = None if chief else Path(tempfile.mkdtemp(prefix="cascade-worker-checkpoints-"))
        self._manager = tf.train.CheckpointManager(self._checkpoint, str(self.folder if chief else self._scratch),
                                                   max_to_keep=KEEP_CHECKPOINTS)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Removes a non-chief worker's temporary folder."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def restore(self):
        """Restores the latest checkpoint after checking its settings; returns the history it holds.

        Raises:
            ParameterError: (`resume`) the checkpoint cannot be read, was made
                with other settings, or does not fit these models.
        """
        latest = tf.train.latest_checkpoint(str(self.folder))
        probe = tf.Variable("", dtype=tf.string, trainable=False)
        try:
            tf.train.Checkpoint(progress=tf.train.Checkpoint(settings=probe)).restore(latest).expect_partial()
            saved = json.loads(probe.numpy().decode("utf-8"))
        except (tf.errors.OpError, ValueError, AssertionError) as exc:
            raise ParameterError("resume", f"checkpoint '{latest}' cannot be read: {exc}") from exc
        check_settings(self.folder, saved, self.settings)
        try:
            self._checkpoint.restore(latest).assert_existing_objects_matched()
        except (tf.errors.OpError, ValueError, AssertionError) as exc:
            raise ParameterError(
                "resume",
                f"checkpoint '{latest}' does not fit these models: expected the models the run started from; "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            ) from exc
        return json.loads(self.progress.history.numpy().decode("utf-8"))

    def start(self):
        """Records this run's settings in the next checkpoints."""
        self.progress.settings.assign(json.dumps(self.settings, sort_keys=True))

    def save(self, history):
        """Saves the checkpoint of the epoch `history` ends with; the chief rewrites `history.csv` too."""
        epoch = history[-1]["epoch"]
        self.progress.epoch.assign(epoch)
        self.progress.history.assign(json.dumps(history))
        self._manager.save(checkpoint_number=epoch)
        if self.chief:
            write_history(self.out_dir / HISTORY_FILE, history)
