"""Safe reads of HDF5 and numpy files: one home for opening, keyed reads and their errors.

HDF5 files are opened read-only and refused when any part of them lives in
another file; a failed read names the file and the key. `.npy` / `.npz` files
are loaded with `allow_pickle=False` only, and an `.npz` member can be read a
block at a time (`open_npz`, `NpyMember`) without loading it whole. Every
problem is a `DataError`.
"""

import contextlib
import os
import zipfile
from typing import Iterator

import h5py
import numpy as np

from cascade_cli.errors import DataError

HDF5_SUFFIXES = (".h5", ".hdf5")
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")

_DTYPE_KINDS = {
    "float": ("f", "floating-point numbers"),
    "int": ("iu", "integers"),
    "numeric": ("iuf", "integers or floating-point numbers"),
}


def display(path) -> str:
    return os.fspath(path)


def check_file(path, *, expected: str) -> None:
    """Raises `DataError` unless `path` is an existing regular file."""
    name = display(path)
    if not os.path.exists(name):
        raise DataError(f"'{name}' does not exist: expected {expected}")
    if os.path.isdir(name):
        raise DataError(f"'{name}' is a directory: expected {expected}")


def _refuse_outside_storage(f: h5py.File, *, path) -> None:
    """Raises `DataError` if any link or dataset of `f` reaches outside the file."""
    name = display(path)
    problems = []

    def visit(link_name, link):
        if problems:
            return None
        if isinstance(link, h5py.ExternalLink):
            problems.append(
                f"'{name}' links '{link_name}' to another file "
                f"('{link.filename}:{link.path}')"
            )
        elif isinstance(link, h5py.HardLink):
            obj = f[link_name]
            if isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    problems.append(f"dataset '{link_name}' in '{name}' is a virtual dataset")
                elif obj.external:
                    files = ", ".join(repr(entry[0]) for entry in obj.external)
                    problems.append(
                        f"dataset '{link_name}' in '{name}' keeps its data in external "
                        f"files ({files})"
                    )
        elif not isinstance(link, h5py.SoftLink):
            problems.append(f"'{name}' has a user-defined link '{link_name}'")
        return None

    f.visititems_links(visit)
    if problems:
        raise DataError(
            f"{problems[0]}: expected a self-contained HDF5 file; nothing outside the "
            "file is read"
        )


def is_hdf5(path) -> bool:
    """Returns whether `path` holds HDF5 (by its signature), or raises `DataError` naming it."""
    try:
        return bool(h5py.is_hdf5(display(path)))
    except OSError as exc:
        raise DataError(f"'{display(path)}' cannot be read: {exc}") from exc


@contextlib.contextmanager
def open_h5(path) -> Iterator[h5py.File]:
    """Opens an HDF5 file read-only, refusing anything stored outside it.

    Args:
        path: the file.

    Yields:
        The open `h5py.File`; it is closed when the block ends.

    Raises:
        DataError: the file is missing, a directory, not HDF5 or truncated, or
            it holds an external link, a dataset with external storage or a
            virtual dataset.
    """
    name = display(path)
    check_file(path, expected="an HDF5 file")
    try:
        f = h5py.File(name, "r")
    except OSError as exc:
        raise DataError(f"'{name}' is not a readable HDF5 file: {exc}") from exc
    with f:
        _refuse_outside_storage(f, path=path)
        yield f


def h5_dataset(
    f: h5py.File, key: str, *, path, ndim: int | None = None, kind: str | None = None
) -> h5py.Dataset:
    """Returns dataset `key` of an open file, checking its rank and dtype.

    Args:
        f: an open HDF5 file or group.
        key: the dataset's name, e.g. `"inputs"` or `"group/inputs"`.
        path: the file's path, for messages.
        ndim: the rank it must have, or None for any.
        kind: `"float"`, `"int"` (signed or unsigned), `"numeric"` (either) or
            None for any dtype.

    Returns:
        The `h5py.Dataset`.

    Raises:
        DataError: naming file and key, when the key is missing, not a dataset,
            or the rank or dtype kind is wrong.
    """
    name = display(path)
    if kind is not None and kind not in _DTYPE_KINDS:
        raise ValueError(f"kind must be one of {sorted(_DTYPE_KINDS)} or None, received {kind!r}")
    try:
        obj = f[key]
    except (KeyError, ValueError) as exc:
        keys = sorted(f.keys())
        shown = ", ".join(repr(k) for k in keys[:10]) + (", ..." if len(keys) > 10 else "")
        raise DataError(
            f"'{name}' has no dataset '{key}': expected a dataset '{key}', "
            f"received keys [{shown}]"
        ) from exc
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"'{key}' in '{name}' is a group: expected a dataset")
    if ndim is not None and obj.ndim != ndim:
        raise DataError(
            f"dataset '{key}' in '{name}' has {obj.ndim} dimensions: expected {ndim}, "
            f"received shape {tuple(obj.shape)}"
        )
    if kind is not None:
        kinds, words = _DTYPE_KINDS[kind]
        if obj.dtype.kind not in kinds:
            raise DataError(
                f"dataset '{key}' in '{name}' has dtype {obj.dtype}: expected {words}"
            )
    return obj


def read_dataset(dset: h5py.Dataset, selection, *, path):
    """Reads `dset[selection]`, naming file and key if HDF5 fails."""
    try:
        return dset[selection]
    except OSError as exc:
        raise DataError(
            f"could not read dataset '{dset.name.lstrip('/')}' from '{display(path)}': {exc}"
        ) from exc


def _npy_header(handle):
    """Reads the magic and header of the `.npy` data at `handle`: `(shape, fortran_order, dtype)`."""
    version = np.lib.format.read_magic(handle)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    return read_header(handle)


@contextlib.contextmanager
def open_npz(path, *, expected: str) -> Iterator[zipfile.ZipFile]:
    """Opens an `.npz` archive as a zip file of `.npy` members, for `NpyMember`.

    Args:
        path: the file.
        expected: what the file should be, for messages.

    Yields:
        The open `zipfile.ZipFile`; it is closed when the block ends.

    Raises:
        DataError: the file is a single `.npy` array or not a readable zip archive.
    """
    name = display(path)
    try:
        with open(name, "rb") as handle:
            single = handle.read(len(_NPY_MAGIC)) == _NPY_MAGIC
        if single:
            raise DataError(f"'{name}' holds a single array; expected {expected}")
        archive = zipfile.ZipFile(name)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"'{name}' is not a readable .npz file: {exc}") from exc
    with archive:
        yield archive


class NpyMember:
    """One `.npy` member of an open `.npz` archive, read a block at a time without loading it whole.

    Its header is read on opening; arrays of Python objects are refused then.

    Args:
        archive: the `zipfile.ZipFile` from `open_npz`.
        key: the member's name without `.npy`.
        path: the archive's path, for messages.

    Attributes:
        shape: the array's shape.
        dtype: its dtype.

    Raises:
        DataError: naming the file and key, when the header cannot be read or
            the array holds Python objects.
    """

    def __init__(self, archive, key, *, path):
        self.path, self.key = path, key
        try:
            self._file = archive.open(f"{key}.npy")
            shape, fortran_order, dtype = _npy_header(self._file)
            self._offset = self._file.tell()
        except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise DataError(f"'{path}' key '{key}' cannot be read: {error}") from error
        if dtype.hasobject:
            raise DataError(
                f"'{path}' key '{key}' cannot be read without pickle: it holds Python objects"
            )
        self.shape = tuple(int(n) for n in shape)
        self.dtype = dtype
        self._whole = None
        if fortran_order and len(self.shape) > 1:  # never written by cascade: read it whole
            size = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize
            self._whole = self._read_bytes(0, size).reshape(self.shape, order="F")

    def _read_bytes(self, offset, size):
        try:
            self._file.seek(self._offset + offset)
            data = self._file.read(size)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise DataError(f"'{self.path}' key '{self.key}' cannot be read: {error}") from error
        if len(data) != size:
            raise DataError(f"'{self.path}' key '{self.key}' cannot be read: the archive ends early")
        return np.frombuffer(data, dtype=self.dtype)

    def read(self, start=None, stop=None, *, axis=0):
        """Reads `[start, stop)` along `axis` (every entry of the other axes); all of it by default."""
        if start is None:
            start, stop, axis = 0, (self.shape[0] if self.shape else None), 0
        if not self.shape:
            return self._read_bytes(0, self.dtype.itemsize).reshape(())
        if self._whole is not None:
            return np.ascontiguousarray(self._whole[(slice(None),) * axis + (slice(start, stop),)])
        blocks = int(np.prod(self.shape[:axis], dtype=np.int64))
        span = self.shape[axis]
        inner = int(np.prod(self.shape[axis + 1 :], dtype=np.int64))
        width = (stop - start) * inner
        out = np.empty((blocks, width), dtype=self.dtype)
        for block in range(blocks):
            offset = (block * span + start) * inner * self.dtype.itemsize
            out[block] = self._read_bytes(offset, width * self.dtype.itemsize)
        return out.reshape(self.shape[:axis] + (stop - start,) + self.shape[axis + 1 :])



def np_load(path, *, mmap_mode=None, expected: str):
    """`np.load` with `allow_pickle=False`, turning every failure into `DataError`.

    The file's kind is told from its first bytes (`.npy` magic or a zip
    archive) and a `.npy` array's dtype from its header, so a file of Python
    objects is named as such before numpy is asked to load it.
    """
    name = display(path)
    check_file(path, expected=expected)
    try:
        with open(name, "rb") as handle:
            magic = handle.read(len(_NPY_MAGIC))
            handle.seek(0)
            if magic == _NPY_MAGIC and _npy_header(handle)[2].hasobject:
                raise DataError(
                    f"'{name}' holds Python objects or pickled data: expected {expected} "
                    "of numbers (pickles are never loaded)"
                )
        if magic != _NPY_MAGIC and magic[:4] not in _ZIP_MAGICS:
            raise DataError(
                f"'{name}' is not readable as {expected}: it is neither a .npy array nor a .npz archive"
            )
        return np.load(name, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"'{name}' is not readable as {expected}: {exc}") from exc
