"""What a training run writes into `out_dir`, and how a killed run resumes exactly.

Layout of `out_dir`: `checkpoints/` (`backup/`, Keras' `BackupAndRestore` of
the last two epochs; the run's state), `history.csv`
(`epoch,loss,val_loss,seconds`, then the metrics and their `val_` figures,
rewritten after every epoch) and, at the end, `model_a.keras`,
`model_b.keras` and `cascade.keras` (the whole generator). Every file is written atomically, and the
pair is written as one: `checkpoints/trained.json` (the epoch and the files'
SHA-256 digests) is removed before the models are replaced and written after
them, so a reader that checks it (`check_trained_model`) never takes a pair
from two epochs. While a run works on `out_dir` it holds an exclusive
`fcntl.flock` on `out_dir/.cascade-train.lock` (`RunLock`), so a second run
into the same folder is refused.

A folder whose `checkpoints/` holds no readable backup (a kill or a full
disk while the first one was written) is no run: a new run clears it.

A backup holds the weights, the optimizer and the epoch; the history, the
settings and what `patience` needs (the best validation loss, its weights)
are in `checkpoints/run_state.json` and `best-E.weights.npz`, written by
`callbacks.RunState` before each backup. A resumed run must repeat the settings that fix the data split and
order, the optimizer's slots and what each step computes
(`TrainConfig.RESUME_SETTINGS`); it then reaches exactly the weights of an
unbroken one.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import h5py
import keras
import tensorflow as tf

from cascade_cli.atomic import atomic_output, is_no_space, no_space_error
from cascade_cli.errors import ModelError, ParameterError
from cascade_cli.options import TrainConfig

HISTORY_FIELDS = ("epoch", "loss", "val_loss", "seconds")
CHECKPOINT_DIR = "checkpoints"
BACKUP_DIR = "backup"  # in checkpoints/: Keras' BackupAndRestore (`RestoredBackup`)
_BACKUP_WEIGHTS, _BACKUP_METADATA = "latest.weights.h5", "training_metadata.json"  # its files
MODEL_FILES = ("model_a.keras", "model_b.keras")
GENERATOR_FILE = "cascade.keras"  # the whole generator (CascadeModel), written with the pair
HISTORY_FILE = "history.csv"
STATE_FILE = "run_state.json"  # in checkpoints/: the history, settings and patience (`callbacks.RunState`)
MANIFEST_FILE = "trained.json"  # in checkpoints/: written last, after the models
LOCK_FILE = ".cascade-train.lock"


# ---------------------------------------------------------------- disk full


@contextlib.contextmanager
def reporting_full_disk(path):
    """Turns a full disk in the block into `atomic.no_space_error(path)` ("no space left on device writing ...").

    Only file writes belong in the block: TensorFlow reports a full disk
    (ENOSPC) as a `ResourceExhaustedError`, which elsewhere means memory.
    """
    try:
        yield
    except tf.errors.ResourceExhaustedError as exc:
        raise no_space_error(path) from exc
    except (OSError, RuntimeError, tf.errors.OpError) as exc:
        if is_no_space(exc) or "no space left on device" in str(exc).lower():
            raise no_space_error(path) from exc
        raise


# -------------------------------------------------------------------- lock


class RunLock:
    """An exclusive lock on `out_dir` for one training run: `fcntl.flock` on `out_dir/.cascade-train.lock`.

    The lock file holds the owner's pid, which a refused run names. The file is
    removed when the lock is released (a run that opened it meanwhile sees
    another file at that name and tries again). Use it as a context manager.

    Args:
        out_dir: an existing folder.
    """

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()

    def acquire(self):
        """Takes the lock.

        Raises:
            ParameterError: (`out_dir`) another process holds it.
        """
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise ParameterError(
                    "out_dir", f"'{self.out_dir}' is in use by another training run (pid {owner}); wait for it to "
                    "end, or choose another out_dir.") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed it as we opened it: lock the file now at that name
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd

    def release(self):
        """Removes the lock file and releases the lock (nothing when not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


# ------------------------------------------------------------------ backup


def _backup_epoch(backup, suffix=""):
    """The epoch of `BackupAndRestore`'s pair of files in `backup` (`suffix` ".bkp": the copy before), or None when
    either is missing or cannot be read (a kill while it was written)."""
    try:
        epoch = int(json.loads((backup / f"{_BACKUP_METADATA}{suffix}").read_text(encoding="utf-8"))["epoch"])
        with h5py.File(backup / f"{_BACKUP_WEIGHTS}{suffix}", "r"):
            pass
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return epoch


def backed_up_epoch(folder):
    """The epoch (1-based count of epochs done) of the newest readable backup in `folder/backup`, or None.

    `RestoredBackup` keeps the newest backup and the one before (`.bkp`); a
    newest one cut short by a kill leaves the one before.
    """
    backup = Path(folder) / BACKUP_DIR
    if not backup.is_dir():
        return None
    newest = _backup_epoch(backup)
    return newest if newest is not None else _backup_epoch(backup, ".bkp")


def no_backup_error(folder):
    """The refusal of a resume from `folder` (a run's `checkpoints/`) without a readable backup."""
    backup = Path(folder) / BACKUP_DIR
    if backup.is_dir() and any(backup.iterdir()):
        return ParameterError("resume", f"the backup in '{backup}' cannot be read (a file of it damaged or cut "
                                        "short?): nothing to resume from; start afresh with overwrite=True.")
    return ParameterError("resume", f"no backup to resume from in '{backup}'; to start training, leave out "
                                    "resume=True.")


class RestoredBackup(keras.callbacks.BackupAndRestore):
    """Keras' `BackupAndRestore` in `folder/backup`: two backups kept, kept after `fit` too.

    Keras writes a backup's weights, then its epoch file; a kill between the
    two would leave the new weights under the old epoch. So before each backup
    the whole pair before is copied aside (`*.bkp`, what Keras'
    `double_checkpoint` keeps) and its epoch file removed: until the new pair
    is whole, the newest backup names no epoch. As `fit` begins, a newest
    backup that cannot be read (a kill while it was written) gives way to the
    pair before; a backup that cannot be restored into the models is refused
    (`ParameterError("resume")`) instead of an internal error.
    """

    def __init__(self, folder):
        super().__init__(str(Path(folder) / BACKUP_DIR), delete_checkpoint=False)

    def on_epoch_end(self, epoch, logs=None):
        backup = Path(self.backup_dir)
        if _backup_epoch(backup) is not None:
            for name in (_BACKUP_WEIGHTS, _BACKUP_METADATA):
                shutil.copyfile(backup / name, backup / f"{name}.bkp")
            (backup / _BACKUP_METADATA).unlink()
        super().on_epoch_end(epoch, logs)

    def on_train_begin(self, logs=None):
        backup = Path(self.backup_dir)
        if backup.is_dir() and _backup_epoch(backup) is None and _backup_epoch(backup, ".bkp") is not None:
            for name in (_BACKUP_WEIGHTS, _BACKUP_METADATA):
                shutil.copyfile(backup / f"{name}.bkp", backup / name)
        try:
            super().on_train_begin(logs)
        except (OSError, ValueError, KeyError) as exc:
            raise ParameterError(
                "resume",
                f"the backup in '{backup}' cannot be restored into these models (a file of it damaged or cut "
                f"short, or other models than the run started from?): {_first_line(exc)}; start afresh with "
                "overwrite=True.",
            ) from exc


def _remove_incomplete(checkpoints):
    """Removes a `checkpoints/` folder that holds no readable backup (what a killed first epoch leaves)."""
    if checkpoints.is_dir() and not checkpoints.is_symlink() and backed_up_epoch(checkpoints) is None:
        shutil.rmtree(checkpoints)


# ---------------------------------------------------------------- out_dir


def check_out_dir(out_dir, *, parameter="out_dir", holding=""):
    """Checks, before any work and creating nothing, that `out_dir` is a folder that can be written or created.

    A missing `out_dir` is created with its missing parents, as every output's
    folders are (`atomic.make_parents`).

    Args:
        out_dir: the folder.
        parameter: the setting that names it (`out_dir`, `tensorboard`).
        holding: what the folder is for, as the refusal of a file says it (" for the event files").

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ParameterError: (`parameter`) it is a file, or it (or the folder it
            would be created in) is not writable.
    """
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ParameterError(parameter, f"'{path}' is a file: expected a folder{holding}.")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: '{existing}' is not writable"
        raise ParameterError(parameter, f"'{path}' {what}.")
    return path


class RunFolder:
    """The `out_dir` of one training run, locked while the run works in it; use it as a context manager.

    When the run fails before its first complete checkpoint, what it made
    goes: a folder it created is removed again (with the parents it created),
    so a failed run leaves no empty `out_dir` behind.

    Attributes:
        path: the folder, a `Path`.
        created: the folders this run created, innermost first.
    """

    def __init__(self, path, *, created, lock):
        self.path = path
        self.created = created
        self._lock = lock

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        failed = kind is not None
        if failed and backed_up_epoch(self.path / CHECKPOINT_DIR) is None:
            _remove_incomplete(self.path / CHECKPOINT_DIR)
        if self._lock is not None:
            self._lock.release()
        if failed and self.created and backed_up_epoch(self.path / CHECKPOINT_DIR) is None:
            for folder in self.created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: nothing of anyone else's goes


def prepare_out_dir(out_dir, *, resume, lock=True, overwrite=False):
    """Creates `out_dir` if needed and locks it; refuses a new run over an earlier one, or a resume without a checkpoint.

    A `checkpoints/` folder without a complete checkpoint (a kill while the
    first one was written) is no run: a new run removes it. `out_dir` is
    created with its missing parents, which go again when the run fails
    before its first checkpoint.

    Args:
        out_dir: the run's folder.
        resume: whether the run continues the latest checkpoint there.
        lock: take the `RunLock` (the chief of a multi-worker run; the other
            workers only read the chief's checkpoints).
        overwrite: a new run replaces an earlier one in `out_dir`
            (`remove_training_run`, once the lock is held) instead of being refused.

    Returns:
        A `RunFolder`, the lock held until it exits.

    Raises:
        ParameterError: `out_dir` is a file, holds an earlier run (without
            `resume`) or no complete checkpoint (with it), cannot be written,
            or is in use by another training run.
    """
    path = check_out_dir(out_dir)
    checkpoints = path / CHECKPOINT_DIR
    created = []
    if not resume:
        missing = path
        while not missing.exists():
            created.append(missing)
            missing = missing.parent
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ParameterError("out_dir", f"'{path}' cannot be created: {exc.strerror or exc}.") from exc
    run_lock = RunLock(path) if lock and path.is_dir() else None
    folder = RunFolder(path, created=created, lock=run_lock)
    try:
        if run_lock is not None:
            run_lock.acquire()
        if resume:
            if backed_up_epoch(checkpoints) is None:
                raise no_backup_error(checkpoints)
            return folder
        if overwrite:
            remove_training_run(path)
        complete = backed_up_epoch(checkpoints) is not None
        earlier = [name for name in _training_files(path) if name != CHECKPOINT_DIR or complete]
        if earlier and not complete:
            raise ParameterError(
                "out_dir",
                f"'{path}' holds files of a training run ({', '.join(earlier)}) but no complete checkpoint to "
                "resume from; pass overwrite=True to replace them, or choose another out_dir.",
            )
        if earlier:
            raise ParameterError(
                "out_dir",
                f"'{path}' already holds a training run ({', '.join(earlier)}); pass resume=True to continue it, "
                "overwrite=True to replace it, or choose another out_dir.",
            )
        _remove_incomplete(checkpoints)
        if not os.access(path, os.W_OK | os.X_OK):
            raise ParameterError("out_dir", f"'{path}' is not writable.")
    except BaseException:
        folder.__exit__(ParameterError, None, None)
        raise
    return folder


def _training_files(out_dir):
    """The names of the files and folders a training run writes that exist in `out_dir`."""
    return [name for name in (CHECKPOINT_DIR, *MODEL_FILES, GENERATOR_FILE, HISTORY_FILE)
            if (Path(out_dir) / name).exists()]


def remove_training_run(out_dir):
    """Removes what a training run wrote into `out_dir` (`checkpoints/`, the models, `history.csv`), nothing else.

    TensorBoard event files (`tensorboard=`, a folder of the user's choice) are left alone.
    """
    out_dir = Path(out_dir)
    for name in _training_files(out_dir):
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def save_models(models, out_dir, *, history=None, generator=None):
    """Writes `(model_a, model_b)` (and `history`, `generator`) into `out_dir` as one pair, then `checkpoints/trained.json`.

    The manifest of the last pair is first replaced by one that lists no
    file (`"writing": true`: the folder stays a training run's), each file is
    written atomically, and the new manifest (the epoch and every file's
    SHA-256) is written last: a kill on the way leaves no complete manifest,
    never a mixed pair that `check_trained_model` accepts.

    Args:
        models: `(model_a, model_b)`.
        out_dir: the run's folder.
        history: the history rows to write as `history.csv` with them, or None.
        generator: a `CascadeModel` of the pair to write as `cascade.keras`, or None.

    Raises:
        DataError: the disk is full.
    """
    out_dir = Path(out_dir)
    manifest = out_dir / CHECKPOINT_DIR / MANIFEST_FILE
    manifest.parent.mkdir(exist_ok=True)
    with reporting_full_disk(manifest), atomic_output(manifest, overwrite=True) as temp:
        temp.write_text(json.dumps({"format_version": 1, "writing": True}), encoding="utf-8")
    names = list(MODEL_FILES)
    if history is not None:
        write_history(out_dir / HISTORY_FILE, history)
        names.append(HISTORY_FILE)
    written = list(zip(models, MODEL_FILES))
    if generator is not None:
        written.append((generator, GENERATOR_FILE))
        names.append(GENERATOR_FILE)
    for model, name in written:
        with reporting_full_disk(out_dir / name), atomic_output(out_dir / name, overwrite=True,
                                                                suffix=".keras") as temp:
            model.save(temp)
    epoch = history[-1]["epoch"] if history else None
    record = {"format_version": 1, "epoch": epoch, "files": {name: _digest(out_dir / name) for name in names}}
    manifest.parent.mkdir(exist_ok=True)
    with reporting_full_disk(manifest), atomic_output(manifest, overwrite=True) as temp:
        temp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")


def _digest(path):
    """The SHA-256 of the file at `path`, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trained_pair(out_dir):
    """The manifest of the pair in `out_dir` (`{"epoch", "files": {name: sha256}}`), or None when it is not complete.

    None when `checkpoints/trained.json` is missing or unreadable, or a model
    file no longer matches it.
    """
    out_dir = Path(out_dir)
    try:
        record = json.loads((out_dir / CHECKPOINT_DIR / MANIFEST_FILE).read_text(encoding="utf-8"))
        files = record["files"]
        checked = (*MODEL_FILES, *([GENERATOR_FILE] if GENERATOR_FILE in files else []))
        if all(_digest(out_dir / name) == files[name] for name in checked):
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def check_trained_model(path):
    """Refuses a `model_a.keras` / `model_b.keras` of a training run whose pair is not complete.

    A model file named as `train` names them, in a training run's folder (its
    `checkpoints/` holds `trained.json`, or a checkpoint beside the run's
    `history.csv`), must match that folder's `checkpoints/trained.json`:
    otherwise a run was stopped while it wrote its models and the pair may be
    from two epochs. Other files, and files beside a `checkpoints/` folder
    of another kind, are not checked.

    Raises:
        ModelError: the manifest is missing or the file does not match it.
    """
    path = Path(path)
    folder = path.parent
    checkpoints = folder / CHECKPOINT_DIR
    if path.name not in (*MODEL_FILES, GENERATOR_FILE) or not checkpoints.is_dir():
        return
    run = (checkpoints / MANIFEST_FILE).exists() or ((folder / HISTORY_FILE).is_file()
                                                     and backed_up_epoch(checkpoints) is not None)
    if not run:
        return
    if trained_pair(folder) is None:
        raise ModelError(
            f"'{path}' is from a training run that stopped while writing its models (it does not match "
            f"'{folder / CHECKPOINT_DIR / MANIFEST_FILE}'), so model_a.keras and model_b.keras may be from "
            "different epochs: resume the run (resume=True) to write a matching pair."
        )


def history_fields(history):
    """The columns of `history.csv`: `HISTORY_FIELDS`, then every other key of the rows (metrics), in first-seen order."""
    extra = {}
    for row in history:
        extra.update((key, None) for key in row if key not in HISTORY_FIELDS)
    return (*HISTORY_FIELDS, *extra)


def write_history(path, history):
    """Writes history rows to `path` as CSV (`epoch,loss,val_loss,seconds`, then the metrics), atomically.

    A value a row lacks or holds as None (no validation set; a metric added on resume) is left empty.
    """
    fields = history_fields(history)
    with reporting_full_disk(path), atomic_output(path, overwrite=True) as temp:
        with open(temp, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(fields)
            for row in history:
                writer.writerow(["" if row.get(key) is None else repr(row[key]) for key in fields])


# ---------------------------------------------------------------- settings


def read_state(folder):
    """The state `callbacks.RunState` wrote into `folder` (`{"history", "settings"}`), or None when there is none.

    Raises:
        ParameterError: (`resume`) the file is there but cannot be read.
    """
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("history"), list):
            raise ValueError("expected a JSON object with a 'history' list")
    except (OSError, ValueError) as exc:
        raise ParameterError("resume", f"'{path}' cannot be read (damaged or cut short?): {exc}; start afresh "
                                       "with overwrite=True.") from exc
    return state




def run_settings(config, data):
    """The settings a checkpoint records (`TrainConfig.SAVED_SETTINGS` of a resolved config, and the data's shape)."""
    kinds = {"seed": int, "val_split": float, "shuffle": bool, "batch_size": int, "freeze_a": bool, "epochs": int,
             "learning_rate": float, "clipnorm": float, "warmup_steps": int, "metrics": list,
             "mixed_precision": bool, "tensorboard": str, "max_steps": int}
    values = {}
    for name in TrainConfig.SAVED_SETTINGS:
        value = getattr(config, name)
        values[name] = None if value is None else kinds.get(name, lambda v: v)(value)
    values["samples"] = [int(data.n_samples), int(data.outer_steps), int(data.features), int(data.output_size)]
    if getattr(data, "path", None) is not None:  # the data's fingerprint: a resume on another file is refused
        values["data_file"], values["data_sha256"] = str(data.path), _digest(data.path)
    return values


def saved_settings(out_dir):
    """The settings the run in `out_dir` recorded (`run_settings`'s dict, in its state file), with `"epochs_done"`.

    `"epochs_done"` is the epoch of the newest readable backup (`backed_up_epoch`).

    Raises:
        ParameterError: (`resume`) there is no readable backup, or no
            readable state file beside it.
    """
    folder = Path(out_dir) / CHECKPOINT_DIR
    done = backed_up_epoch(folder)
    if done is None:
        raise no_backup_error(folder)
    state = read_state(folder)
    if state is None or not isinstance(state.get("settings"), dict):
        raise ParameterError("resume", f"'{folder / STATE_FILE}' is missing beside the backup of epoch {done} (a "
                                       "run made by an earlier cascade keeps its settings elsewhere): start afresh "
                                       "with overwrite=True.")
    return {**state["settings"], "epochs_done": done}


def _first_line(exc):
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _describe(name, value):
    """One setting as a Python user writes it: `batch_size=16`, `optimizer='adam'`."""
    if name == "samples":
        return f"a training file of (N, Ta, F, O)={tuple(value)}"
    return f"{name}={value!r}"


def check_settings(path, saved, wanted):
    """Raises `ParameterError` (`resume`) when a resumed run's `RESUME_SETTINGS` (or data) differ from its checkpoint's.

    A setting the checkpoint did not record (an older run) is not checked.
    """
    if "data_sha256" in saved and "data_sha256" in wanted and saved["data_sha256"] != wanted["data_sha256"]:
        raise ParameterError(
            "resume",
            f"the checkpoints in '{path}' were made on another training file than '{wanted['data_file']}' (made on "
            f"'{saved.get('data_file')}', SHA-256 {saved['data_sha256'][:12]}...; this one's is "
            f"{wanted['data_sha256'][:12]}...): resume on the file the run started with, or choose another out_dir.",
        )
    checked = (*TrainConfig.RESUME_SETTINGS, "samples")
    differ = [name for name in checked if name in saved and name in wanted and saved[name] != wanted[name]]
    if differ:
        made = ", ".join(_describe(name, saved.get(name)) for name in differ)
        given = ", ".join(_describe(name, wanted[name]) for name in differ)
        raise ParameterError(
            "resume",
            f"the checkpoints in '{path}' were made with {made}; this run has {given}. Resume with the same "
            "settings, or choose another out_dir.",
        )
