"""Shared helpers of the file tests: write small HDF5 and text files, quote paths for messages, a dead pid."""

import re
import subprocess
import sys

import h5py


def write_h5(path, **datasets):
    """Writes each keyword as a dataset of a new HDF5 file at `path`; returns `path`."""
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
    return path


def write_text(path, text):
    """Writes `text` as UTF-8; returns `path`."""
    path.write_text(text, encoding="utf-8")
    return path


def quoted(path):
    """Returns `'path'` escaped for `pytest.raises(match=...)`."""
    return re.escape(f"'{path}'")


def dead_pid():
    """The id of a process that has just ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
