"""Atomic output: every file cascade writes goes to a temporary name in its folder, then is renamed into place.

A killed run never leaves a half-written file where a result should be. An
output is checked before any work (`check_output_path`): never one of the
command's own inputs, whatever the spelling, and never `-`. While a writer
writes, it holds `fcntl.flock` on a lock file beside its temporary file
(HDF5 takes its own lock on the file it writes, so the lock cannot be on the
temporary file itself); the next writer of the same target removes only the
temporary files whose lock it can take, so a live writer in another process,
PID namespace or container keeps its files. A full file system ends in
`DataError("no space left on device writing '<path>'")` (`no_space_error`).

Nothing but a regular file (or a folder cascade wrote) is ever replaced: a
device node, a FIFO or a socket as an output is refused, with or without
`overwrite`, and so is an output folder that holds one of the command's inputs
(`check_not_holding_inputs`). Temporary folders (`atomic_directory`) take the
same lock as temporary files, so the next writer of the same target removes
those of a killed writer too.
"""

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

from cascade_cli.errors import DataError

_TMP_MARK = ".cascade-tmp-"
_LOCK_SUFFIX = ".lock"
_NAME_MAX = 255
# A temporary name is prefix + token (`{pid}-{8 hex}`, at most 19 bytes) + a writer's suffix
# (`.keras`) + a part key (`.row_splits_1`); the prefix keeps 64 bytes free for the rest.
_PREFIX_MAX = _NAME_MAX - 64
_TOKEN = re.compile(r"(\d+-[0-9a-f]+)")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _temp_prefix(path):
    """Returns the prefix of the temporary names used while writing `path`, at most `_PREFIX_MAX` bytes.

    A long name keeps its first bytes and a hash of the whole name, so a valid
    file name of up to 255 bytes still has temporary names within the limit.
    """
    prefix = f".{path.name}{_TMP_MARK}"
    if len(os.fsencode(prefix)) <= _PREFIX_MAX:
        return prefix
    digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]
    room = _PREFIX_MAX - len(f".~{digest}{_TMP_MARK}")
    head = os.fsdecode(os.fsencode(path.name)[:room])  # a character cut in half stays valid bytes
    return f".{head}~{digest}{_TMP_MARK}"


def is_no_space(error):
    """Returns whether an exception says the file system is full (or the quota is spent).

    HDF5 reports it as an `OSError` (errno 28) or, from its cleanup, a
    `RuntimeError` whose message carries `errno = 28`; TensorFlow's file
    writers (SavedModel, checkpoints, TensorBoard) as an error, often a
    `ResourceExhaustedError`, whose message says "No space left on device".
    An exception raised while handling one (`__context__`) counts too.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return True
        text = str(getattr(error, "message", None) or error)
        if "errno = 28" in text or "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def no_space_error(path):
    """The `DataError` a full file system ends in, naming the file being written."""
    return DataError(f"no space left on device writing '{path}'")


def _try_lock(fd):
    """Takes an exclusive flock on `fd` without waiting: `"locked"`, `"busy"` (another holds it) or `"none"`.

    `"none"`: the file system has no flock (some network mounts); a cleaner
    then removes nothing on a guess.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        return "busy" if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else "none"
    return "locked"


_OLD_SUFFIX = "-old"


def _remove_stale_temps(path):
    """Removes temporary files and folders of `path` whose writer's lock can be taken (the writer is gone).

    Temporary names without a lock file (left by a writer killed after it
    removed its lock, or by an older cascade) are removed too: a live writer
    creates its lock before its temporary name and removes it last. A folder
    writer killed between moving the old folder aside (`...-old`) and moving
    the new one in left no folder at `path`: the old one is put back.
    """
    prefix = _temp_prefix(path)
    groups = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if entry.name.startswith(prefix):
                match = _TOKEN.match(entry.name, len(prefix))
                if match is not None and (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
                    groups.setdefault(match.group(1), []).append(entry.path)
    for token, names in groups.items():
        lock = str(path.parent / f"{prefix}{token}{_LOCK_SUFFIX}")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            fd = None
        except OSError:
            continue
        try:
            if fd is not None and _try_lock(fd) != "locked":
                continue  # a live writer holds it
            for name in sorted(names, key=lambda name: name.endswith(_LOCK_SUFFIX)):  # the lock goes last
                if name.endswith(_OLD_SUFFIX) and not os.path.lexists(path):
                    with contextlib.suppress(OSError):
                        os.replace(name, path)  # the previous folder, moved aside by a killed writer
                        continue
                if os.path.isdir(name) and not os.path.islink(name):
                    shutil.rmtree(name, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(name)
        finally:
            if fd is not None:
                os.close(fd)


@contextlib.contextmanager
def _locked(path):
    """Creates and locks a new lock file for a write of `path`, yields its token, and removes it on the way out."""
    token, fd, lock = _take_lock(path)
    try:
        yield token
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _take_lock(path):
    """Creates and locks a new lock file for a write of `path`: `(token, fd, lock_path)`."""
    prefix = _temp_prefix(path)
    for _ in range(100):
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        lock = path.parent / f"{prefix}{token}{_LOCK_SUFFIX}"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        except OSError as error:
            if is_no_space(error):
                raise no_space_error(path) from error
            raise DataError(f"output '{path}': cannot create a file in '{path.parent}': {error}") from error
        state = _try_lock(fd)
        try:  # another run's cleanup may have removed it between the open and the lock
            same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if same and state != "busy":
            return token, fd, lock
        os.close(fd)
    raise DataError(f"output '{path}': could not take a lock for its temporary file")


def _same_file(first, second):
    """Whether two paths name one existing file (device and inode), whatever their spelling or links."""
    try:
        return os.path.samefile(first, second)
    except (OSError, ValueError):
        return False


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _kind_of(mode):
    """Names what a non-regular file is, from its `st_mode`."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_replaceable(path):
    """Raises `DataError` when `path` exists and is anything but a regular file (or a link to one, or dangling).

    A device node, a FIFO or a socket is never replaced by a rename, whatever
    `overwrite` says: writing "over" `/dev/null` must not replace it with a file.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing, or a dangling link: nothing but the link is replaced
        return
    if not stat.S_ISREG(mode):
        raise DataError(f"output '{path}' is {_kind_of(mode)}, not a regular file; cascade replaces only regular "
                        "files, even with overwrite=True; choose a file name")


def _inside(path, folder):
    """Whether `path` (resolved) is `folder` (resolved) or lies under it."""
    try:
        path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    except (OSError, ValueError):
        return False
    return path == folder or folder in path.parents


def check_not_holding_inputs(folder, inputs, *, what="output folder"):
    """Raises `DataError` when the output folder `folder` holds (or is) one of the command's `inputs`.

    A command that replaces or cleans a folder (`export-model --saved-model`,
    `train --out-dir` with `overwrite`) would destroy an input inside it, so it
    is refused whatever `overwrite` says, and the message does not suggest it.
    Paths are compared resolved: symlinks and `..` count.

    Args:
        folder: the output folder, existing or not.
        inputs: the files the command reads (None entries are skipped).
        what: how messages name `folder`, e.g. `"out_dir"`.
    """
    for source in inputs:
        if source is not None and _inside(source, folder):
            raise DataError(
                f"{what} '{os.fspath(folder)}' holds '{os.fspath(source)}', one of this command's inputs; writing "
                "the folder could destroy it: choose a folder outside it, or move the input out first")


def check_output_path(path, *, overwrite=False, inputs=()):
    """Checks that `path` can be written, before any work starts.

    Args:
        path: the output file.
        overwrite: whether an existing file may be replaced.
        inputs: the files the command reads (models, inputs, steps, the
            result being exported, the shards being merged); `path` may be
            none of them, with or without `overwrite`.

    Returns:
        `path` as a `Path`.

    Raises:
        DataError: when `path` is `-`, is one of `inputs` (compared by device
            and inode, so `./d/../d/x.h5` and a symlink count), exists (and
            `overwrite` is false) or is not a regular file (a folder, a
            device node, a FIFO or a socket, whatever `overwrite` says), or
            when its folder is missing or not writable.
    """
    if os.fspath(path) == "-":
        raise DataError("output '-': expected a file name; this writer does not stream to standard output")
    given, path = os.fspath(path), Path(path)
    for source in inputs:
        if source is not None and _same_file(path, source):
            same = os.fspath(source) == given
            shown = f"'{given}'" if same else f"'{given}' (the same file as '{os.fspath(source)}')"
            raise DataError(
                f"output {shown} is one of this command's inputs; writing it would destroy them, "
                "even with overwrite=True: choose another output name"
            )
    if path.is_dir():
        raise DataError(f"output '{path}' is a folder; expected a file name")
    check_replaceable(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise DataError(f"output '{path}' already exists; pass overwrite=True to replace it")
    _check_parent(path)
    return path


def _check_parent(path):
    """Raises `DataError` unless the folder `path` is written into exists and can be written."""
    folder = path.parent
    if not folder.is_dir():
        raise DataError(f"output folder '{folder}' does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"output folder '{folder}' is not writable")


@contextlib.contextmanager
def atomic_output(path, *, overwrite=False, suffix="", inputs=()):
    """Yields a temporary path in the target's folder and renames it onto `path` on success.

    The temporary name is `.{name}.cascade-tmp-{pid}-{random}{suffix}` (a
    long name is shortened with a hash); `.{name}.cascade-tmp-{pid}-{random}.lock`
    beside it is held with `fcntl.flock` while the body runs. When the body
    raises (also `KeyboardInterrupt` and `SystemExit`), both are removed and
    `path` is left untouched. Temporary files of the same target whose
    writer is gone are removed first.

    Args:
        path: the output file.
        overwrite: whether an existing file may be replaced.
        suffix: ends the temporary name, for writers that insist on one
            (Keras saves only to names ending in `.keras`).
        inputs: the files the command reads; see `check_output_path`.

    Yields:
        The temporary `Path` the body must write.

    Raises:
        DataError: see `check_output_path`; also when `path` appeared while
            the body ran and `overwrite` is false, and
            `no space left on device writing '<path>'` when the file system
            is full.
    """
    path = check_output_path(path, overwrite=overwrite, inputs=inputs)
    _remove_stale_temps(path)
    with _locked(path) as token:
        temp = path.parent / f"{_temp_prefix(path)}{token}{suffix}"
        try:
            yield temp
            if not temp.exists():
                raise DataError(f"output '{path}': nothing was written")
            if not overwrite and (path.exists() or path.is_symlink()):
                raise DataError(f"output '{path}' already exists; pass overwrite=True to replace it")
            check_replaceable(path)  # again: a node may have appeared while the body ran
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException as error:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if is_no_space(error):
                raise no_space_error(path) from error
            raise


@contextlib.contextmanager
def atomic_directory(path, *, overwrite=False, inputs=(), made_by="saved_model.pb"):
    """Yields a temporary folder beside `path` and renames it onto `path` on success.

    For writers that make a folder (a TensorFlow SavedModel): a killed run
    leaves no half folder at `path`. An existing folder is replaced only with
    `overwrite`, after the new one is complete, and only when it is empty or
    holds `made_by` (a folder this writer made): a folder of anything else is
    never replaced. The temporary folder is
    `.{name}.cascade-tmp-{pid}-{random}` with a lock file beside it, as
    `atomic_output`'s, so the next writer of the same target removes what a
    killed writer left (and puts a folder it had moved aside back).

    Args:
        path: the output folder.
        overwrite: whether a folder that holds files may be replaced.
        inputs: the files the command reads; `path` may not hold any of them
            (`check_not_holding_inputs`), with or without `overwrite`.
        made_by: the file that marks a folder this writer made.

    Raises:
        DataError: `path` is a file, holds one of `inputs`, or is a folder with
            files in it and `overwrite` is false or `made_by` is missing, or
            its parent is missing or not writable; `no space left on device
            writing '<path>'` when the file system is full.
    """
    path = Path(path)
    _remove_stale_temps(path)  # first: it may put back a folder a killed writer had moved aside
    if path.exists() and not path.is_dir():
        raise DataError(f"output '{path}' is a file; expected a folder name")
    check_not_holding_inputs(path, inputs)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise DataError(f"output folder '{path}' already holds files; pass overwrite=True to replace it")
        if not (path / made_by).is_file():
            raise DataError(f"output folder '{path}' holds files but no '{made_by}': it is not a folder this writer "
                            "made, and it is never replaced, even with overwrite=True; choose another folder")
    _check_parent(path)
    with _locked(path) as token:
        temp = path.parent / f"{_temp_prefix(path)}{token}"
        try:
            temp.mkdir()
            yield temp
            if path.exists():
                old = temp.with_name(f"{temp.name}{_OLD_SUFFIX}")
                os.replace(path, old)
                os.replace(temp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(temp, path)
        except BaseException as error:
            shutil.rmtree(temp, ignore_errors=True)
            old = temp.with_name(f"{temp.name}{_OLD_SUFFIX}")
            if old.is_dir() and not os.path.lexists(path):
                with contextlib.suppress(OSError):
                    os.replace(old, path)  # ended between the two renames: the previous folder goes back
            if is_no_space(error):
                raise no_space_error(path) from error
            raise


def make_parents(path):
    """Creates the missing folders above the output `path`, as `mkdir -p` does: the one rule for every output.

    Returns:
        The folders it created, innermost first: give them to
        `remove_made_folders` when the write does not happen.

    Raises:
        DataError: a folder on the way is a file, or the first existing one is
            not writable, naming the output's folder.
    """
    folder = Path(path).parent
    missing = []
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        what = f"output folder '{folder}'" + (" cannot be created:" if missing else "")
        raise DataError(f"{what} '{existing}' is a file" if missing else f"{what} is a file")
    if not missing:
        return []
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"output folder '{folder}' cannot be created: '{existing}' is not writable")
    made = []
    try:
        for part in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another run made it meanwhile: not ours to remove
                part.mkdir()
                made.insert(0, part)
    except OSError as error:
        remove_made_folders(made)
        if is_no_space(error):
            raise no_space_error(path) from error
        raise DataError(f"output folder '{folder}' cannot be created: {error.strerror or error}") from error
    return made


def remove_made_folders(folders):
    """Removes folders `make_parents` made, innermost first, where they are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
