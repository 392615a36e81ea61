"""Atomic output: every file cascade writes goes to a temporary name in its folder, then is renamed into place.

A killed run never leaves a half-written file where a result should be, and
temporary files left by dead processes are removed by the next writer.
"""

import contextlib
import os
import re
import secrets
from pathlib import Path

from cascade_cli.errors import DataError

_TMP_MARK = ".cascade-tmp-"


def _temp_prefix(path):
    """Returns the prefix of the temporary names used while writing `path`."""
    return f".{path.name}{_TMP_MARK}"


def _pid_alive(pid):
    """Returns whether a process with id `pid` exists."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_temps(path):
    """Removes temporary files of `path` left by processes that are no longer alive."""
    prefix = _temp_prefix(path)
    pattern = re.compile(r"(\d+)-[0-9a-f]+(\.\w+)?")
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if not entry.name.startswith(prefix):
                continue
            match = pattern.fullmatch(entry.name[len(prefix) :])
            if match is None or _pid_alive(int(match.group(1))):
                continue
            if entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def check_output_path(path, *, overwrite=False):
    """Checks that `path` can be written, before any work starts.

    Args:
        path: the output file.
        overwrite: whether an existing file may be replaced.

    Returns:
        `path` as a `Path`.

    Raises:
        DataError: when `path` exists (and `overwrite` is false) or is a folder,
            or when its folder is missing or not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"output '{path}' is a folder; expected a file name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise DataError(f"output '{path}' already exists; pass overwrite=True to replace it")
    folder = path.parent
    if not folder.is_dir():
        raise DataError(f"output folder '{folder}' does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"output folder '{folder}' is not writable")
    return path


@contextlib.contextmanager
def atomic_output(path, *, overwrite=False, suffix=""):
    """Yields a temporary path in the target's folder and renames it onto `path` on success.

    The temporary name is `.{name}.cascade-tmp-{pid}-{random}{suffix}`. When the body
    raises, the temporary file is removed and `path` is left untouched.
    Temporary files of the same target left by dead processes are removed.

    Args:
        path: the output file.
        overwrite: whether an existing file may be replaced.
        suffix: ends the temporary name, for writers that insist on one
            (Keras saves only to names ending in `.keras`).

    Yields:
        The temporary `Path` the body must write.

    Raises:
        DataError: see `check_output_path`; also when `path` appeared while
            the body ran and `overwrite` is false.
    """
    path = check_output_path(path, overwrite=overwrite)
    _remove_stale_temps(path)
    temp = path.parent / f"{_temp_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    try:
        yield temp
        if not temp.exists():
            raise DataError(f"output '{path}': nothing was written")
        if not overwrite and (path.exists() or path.is_symlink()):
            raise DataError(f"output '{path}' already exists; pass overwrite=True to replace it")
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
