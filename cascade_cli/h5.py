"""Safe reads of HDF5 and numpy files: one home for opening, keyed reads and their errors.

Every reader opens only regular files (`check_file`: a FIFO or a device would
block). HDF5 files are opened read-only and refused when any part of them lives
in another file or a soft link loops; a failed read names the file and the key,
whatever h5py raised on a damaged file (`H5PY_ERRORS`); attributes are read as
one scalar of a checked type (`read_attr`, `scalar_value`). `.npy` / `.npz`
files are loaded with `allow_pickle=False` only, and an `.npz` member can be
read a block at a time (`open_npz`, `NpyMember`) without loading it whole.
Headers are read against the file before anything is allocated: a contiguous
dataset or a `.npy` array cannot declare more bytes than its file holds, and
a large read is weighed against the memory available (`check_memory`).
Every problem is a `DataError`.
"""

import contextlib
import math
import os
import stat
import tokenize
import zipfile
import zlib
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


# What h5py raises when a file's structures are damaged: OSError from HDF5 itself,
# and RuntimeError, SystemError, TypeError, ValueError and KeyError from its
# bindings. Only calls into h5py are wrapped, so our own bugs still surface.
H5PY_ERRORS = (OSError, RuntimeError, SystemError, TypeError, ValueError, KeyError)

# What zipfile and numpy raise on a damaged `.npy` / `.npz`: a bad header (numpy
# tokenizes it: TokenError, SyntaxError), CRC or size, an unsupported compression
# method or zip version, a corrupt deflate stream.
ZIP_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, zlib.error,
              tokenize.TokenError, SyntaxError)

_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_file(path, *, expected: str) -> None:
    """Raises `DataError` unless `path` is an existing regular file (a symlink to one is fine).

    The one home of this rule for every reader: a FIFO or a device would make
    HDF5, numpy or a text read block or read forever.
    """
    name = display(path)
    try:
        mode = os.stat(name).st_mode
    except FileNotFoundError:
        raise DataError(f"'{name}' does not exist: expected {expected}") from None
    except OSError as exc:
        raise DataError(f"'{name}' cannot be read: {exc.strerror or exc}: expected {expected}") from exc
    if stat.S_ISDIR(mode):
        raise DataError(f"'{name}' is a directory: expected {expected}")
    if not stat.S_ISREG(mode):
        kind = next((words for test, words in _SPECIAL_FILES if test(mode)), "a special file")
        raise DataError(f"'{name}' is {kind}, not a regular file: expected {expected}")


def size_text(nbytes: int) -> str:
    """`13207024435` -> `"12.3 GiB"`: bytes in the largest binary unit that keeps a number >= 1."""
    value = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def memory_available() -> int:
    """Bytes this process can still allocate: the system's available memory, and its address-space limit."""
    available = []
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not available:
        try:
            available.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            available.append(1 << 62)
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            with open("/proc/self/statm", encoding="ascii") as handle:
                used = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            available.append(max(0, limit - used))
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return min(available)


def check_memory(nbytes: int, *, what: str, advice: str | None = None) -> None:
    """Raises `DataError` before allocating when `nbytes` cannot fit in memory.

    Args:
        nbytes: what the work would allocate, estimated from declared shapes.
        what: the work, for messages, e.g. `"reading dataset 'targets' from 'f.h5'"`.
        advice: how to need less, e.g. `"use a smaller batch_size"`.
    """
    available = memory_available()
    if nbytes > available:
        raise DataError(
            f"{what} would need about {size_text(nbytes)} of memory, more than the "
            f"{size_text(available)} available" + (f"; {advice}" if advice else "")
        )


def _declared_bytes(shape, dtype) -> int:
    return int(math.prod(int(n) for n in shape)) * int(dtype.itemsize)


def _refuse_outside_storage(f: h5py.File, *, path) -> None:
    """Raises `DataError` if any link or dataset of `f` reaches outside the file or loops."""
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
        elif isinstance(link, h5py.SoftLink):
            try:
                f.get(link_name)  # None when dangling (legal; refused when read)
            except H5PY_ERRORS:
                problems.append(f"soft link '{link_name}' in '{name}' does not resolve (a loop of links)")
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
        else:
            problems.append(f"'{name}' has a user-defined link '{link_name}'")
        return None

    try:
        f.visititems_links(visit)
    except H5PY_ERRORS as exc:
        raise DataError(f"'{name}' is not a readable HDF5 file: its links cannot be read ({exc})") from exc
    if problems:
        raise DataError(
            f"{problems[0]}: expected a self-contained HDF5 file; nothing outside the "
            "file is read"
        )


def is_hdf5(path) -> bool:
    """Returns whether `path` holds HDF5 (by its signature), or raises `DataError` naming it."""
    check_file(path, expected="a file")
    try:
        return bool(h5py.is_hdf5(display(path)))
    except H5PY_ERRORS as exc:
        raise DataError(f"'{display(path)}' cannot be read: {exc}") from exc


@contextlib.contextmanager
def open_h5(path) -> Iterator[h5py.File]:
    """Opens an HDF5 file read-only, refusing anything stored outside it.

    Args:
        path: the file.

    Yields:
        The open `h5py.File`; it is closed when the block ends.

    Raises:
        DataError: the file is missing, not a regular file, not HDF5 or
            truncated, or it holds an external link, a soft link that loops, a
            dataset with external storage or a virtual dataset.
    """
    name = display(path)
    check_file(path, expected="an HDF5 file")
    try:
        f = h5py.File(name, "r")
    except H5PY_ERRORS as exc:
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
        DataError: naming file and key, when the key is missing, a loop or
            dangling soft link, not a dataset, a dataset with a null dataspace
            (no shape), or the rank or dtype kind is wrong.
    """
    name = display(path)
    if kind is not None and kind not in _DTYPE_KINDS:
        raise ValueError(f"kind must be one of {sorted(_DTYPE_KINDS)} or None, received {kind!r}")
    try:
        obj = f.get(key)
        link = f.get(key, getlink=True) if obj is None else None
    except H5PY_ERRORS as exc:
        raise DataError(f"'{key}' in '{name}' cannot be read: {exc}: expected a dataset") from exc
    if obj is None:
        if isinstance(link, h5py.SoftLink):
            raise DataError(
                f"'{key}' in '{name}' is a soft link to '{link.path}', which does not exist: "
                "expected a dataset"
            )
        try:
            keys = sorted(f.keys())
        except H5PY_ERRORS:
            keys = []
        shown = ", ".join(repr(k) for k in keys[:10]) + (", ..." if len(keys) > 10 else "")
        raise DataError(
            f"'{name}' has no dataset '{key}': expected a dataset '{key}', "
            f"received keys [{shown}]"
        )
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"'{key}' in '{name}' is a group: expected a dataset")
    try:
        shape, dtype = obj.shape, obj.dtype
    except H5PY_ERRORS as exc:
        raise DataError(f"dataset '{key}' in '{name}' cannot be read: {exc}") from exc
    if shape is None:
        raise DataError(
            f"dataset '{key}' in '{name}' has a null dataspace (no shape, no values): expected an array"
        )
    if ndim is not None and len(shape) != ndim:
        raise DataError(
            f"dataset '{key}' in '{name}' has {len(shape)} dimensions: expected {ndim}, "
            f"received shape {tuple(shape)}"
        )
    if kind is not None:
        kinds, words = _DTYPE_KINDS[kind]
        if dtype.kind not in kinds:
            raise DataError(
                f"dataset '{key}' in '{name}' has dtype {dtype}: expected {words}"
            )
    _check_declared_size(obj, shape, dtype, key=key, path=path)
    return obj


def _check_declared_size(obj: h5py.Dataset, shape, dtype, *, key, path) -> None:
    """Refuses a contiguous dataset that declares more bytes than the whole file holds.

    Contiguous storage cannot be sparse and carries no filters, so such a
    header is forged or damaged; chunked data can be sparse and is judged by
    what a read needs (`read_dataset`).
    """
    try:
        contiguous = obj.id.get_create_plist().get_layout() == h5py.h5d.CONTIGUOUS
    except H5PY_ERRORS:
        return
    declared = _declared_bytes(shape, dtype)
    if not contiguous or declared <= 1 << 20:
        return
    name = display(path)
    try:
        file_size = os.path.getsize(name)
    except OSError:
        return
    if declared > file_size:
        raise DataError(
            f"dataset '{key}' in '{name}' declares shape {tuple(shape)} ({size_text(declared)}) "
            f"stored contiguously, but the whole file holds {size_text(file_size)}: expected "
            "a dataset that fits in its file (is the file damaged or forged?)"
        )


def _selection_count(shape, selection) -> int | None:
    """The number of elements `dset[selection]` returns, or None for selections other than ints and slices."""
    if selection == () or selection is Ellipsis:
        return int(math.prod(shape))
    items = selection if isinstance(selection, tuple) else (selection,)
    if sum(item is Ellipsis for item in items) > 1:
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + (slice(None),) * (len(shape) - len(items) + 1) + items[at + 1 :]
    if len(items) > len(shape):
        return None
    count = 1
    for item, size in zip(items + (slice(None),) * (len(shape) - len(items)), shape):
        if isinstance(item, slice):
            count *= len(range(*item.indices(int(size))))
        elif not isinstance(item, (int, np.integer)):
            return None
    return count


# Reads smaller than this are not weighed against free memory.
_SMALL_READ = 1 << 26


def read_dataset(dset: h5py.Dataset, selection, *, path):
    """Reads `dset[selection]`, naming file and key if HDF5 fails or the read cannot fit in memory.

    A large read is weighed against the memory available before anything is
    allocated, so a header that declares far more than the file holds (a
    sparse chunked dataset) is refused instead of filling memory.
    """
    key = dset.name.lstrip("/")
    try:
        shape, itemsize = dset.shape, dset.dtype.itemsize
    except H5PY_ERRORS as exc:
        raise DataError(f"could not read dataset '{key}' from '{display(path)}': {exc}") from exc
    count = _selection_count(shape or (), selection) if shape is not None else None
    if count is not None and count * itemsize > _SMALL_READ:
        check_memory(count * itemsize, what=f"reading dataset '{key}' from '{display(path)}'")
    try:
        return dset[selection]
    except H5PY_ERRORS as exc:
        raise DataError(
            f"could not read dataset '{key}' from '{display(path)}': {exc}"
        ) from exc


_ATTR_KINDS = {
    bool: ("a bool (True or False)", "a single bool"),
    int: ("an integer", "a single integer"),
    float: ("a number", "a single number"),
    str: ("a string", "a single string"),
}
_REQUIRED = object()


def scalar_value(value, *, kind: type, where: str):
    """Checks that a stored value is one scalar of `kind` and returns it as that Python type.

    A bool is only a stored bool (never the string `"false"` or the integer
    1); an integer is not a bool; a float may be stored as an integer; a string
    may be stored as UTF-8 bytes. Arrays, even of one element, are refused.

    Args:
        value: what h5py or numpy returned (a numpy scalar, 0-d array, `bytes`...).
        kind: `bool`, `int`, `float` or `str`.
        where: the file and key, for messages, e.g. `"'r.h5' attribute 'layout'"`.

    Returns:
        A Python `bool`, `int`, `float` or `str`.

    Raises:
        DataError: naming `where`, what was expected and what was received.
    """
    if kind not in _ATTR_KINDS:
        raise ValueError(f"kind must be one of bool, int, float, str, received {kind!r}")
    words, single = _ATTR_KINDS[kind]
    if isinstance(value, np.ndarray):
        if value.ndim:
            raise DataError(f"{where}: expected {single}, received an array of shape {value.shape}")
        value = value[()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where}: expected {words}, received bytes that are not UTF-8") from None
    if kind is bool:
        good = isinstance(value, bool)
    elif kind is int:
        good = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        good = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if good else value
    else:
        good = isinstance(value, str)
    if not good:
        shown = repr(value) if isinstance(value, (str, int, float)) else type(value).__name__
        raise DataError(f"{where}: expected {words}, received {shown[:80]}")
    return value


def read_attr(obj, name: str, *, kind: type, path, default=_REQUIRED):
    """Reads attribute `name` of an open HDF5 file, group or dataset as one scalar of `kind`.

    Args:
        obj: the `h5py` object holding the attribute.
        name: the attribute's name, e.g. `"time_major"`.
        kind: `bool`, `int`, `float` or `str`; see `scalar_value`.
        path: the file, for messages.
        default: returned when the attribute is missing; without it a missing
            attribute is an error.

    Returns:
        A Python `bool`, `int`, `float` or `str` (or `default`).

    Raises:
        DataError: naming file and attribute, when it is missing (and no
            default is given), cannot be read, is an array, or has another type.
    """
    where = f"'{display(path)}' attribute '{name}'"
    try:
        present = name in obj.attrs
        value = obj.attrs[name] if present else None
    except H5PY_ERRORS as exc:
        raise DataError(f"{where} cannot be read: {exc}") from exc
    if not present:
        if default is _REQUIRED:
            raise DataError(f"{where} is missing")
        return default
    return scalar_value(value, kind=kind, where=where)


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
        DataError: the file is missing or not a regular file, a single `.npy`
            array or not a readable zip archive.
    """
    name = display(path)
    check_file(path, expected=expected)
    try:
        with open(name, "rb") as handle:
            single = handle.read(len(_NPY_MAGIC)) == _NPY_MAGIC
        if single:
            raise DataError(f"'{name}' holds a single array; expected {expected}")
        archive = zipfile.ZipFile(name)
    except ZIP_ERRORS as exc:
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
        except (KeyError,) + ZIP_ERRORS as error:
            raise DataError(f"'{path}' key '{key}' cannot be read: {error}") from error
        if dtype.hasobject:
            raise DataError(
                f"'{path}' key '{key}' cannot be read without pickle: it holds Python objects"
            )
        self.shape = tuple(int(n) for n in shape)
        self.dtype = dtype
        declared = _declared_bytes(self.shape, dtype)
        try:
            held = archive.getinfo(f"{key}.npy").file_size - self._offset
        except KeyError:
            held = declared
        if declared > held:
            raise DataError(
                f"'{path}' key '{key}' declares shape {self.shape} ({size_text(declared)}) but the "
                f"archive holds {size_text(max(held, 0))} of it: expected an array that fits in its "
                "member (is the file damaged or forged?)"
            )
        self._whole = None
        if fortran_order and len(self.shape) > 1:  # never written by cascade: read it whole
            size = declared
            check_memory(size, what=f"reading '{path}' key '{key}' (Fortran order, read whole)")
            self._whole = self._read_bytes(0, size).reshape(self.shape, order="F")

    def _read_bytes(self, offset, size):
        try:
            self._file.seek(self._offset + offset)
            data = self._file.read(size)
        except ZIP_ERRORS as error:
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
        if blocks * width * self.dtype.itemsize > _SMALL_READ:
            check_memory(blocks * width * self.dtype.itemsize, what=f"reading '{self.path}' key '{self.key}'")
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
            if magic == _NPY_MAGIC:
                shape, _, dtype = _npy_header(handle)
                if dtype.hasobject:
                    raise DataError(
                        f"'{name}' holds Python objects or pickled data: expected {expected} "
                        "of numbers (pickles are never loaded)"
                    )
                declared = _declared_bytes(shape, dtype)
                held = os.fstat(handle.fileno()).st_size - handle.tell()
                if declared > held:
                    raise DataError(
                        f"'{name}' declares shape {tuple(shape)} ({size_text(declared)}) but holds "
                        f"{size_text(held)} of data: expected {expected} that fits in its file "
                        "(is the file damaged or forged?)"
                    )
                if mmap_mode is None and declared > _SMALL_READ:
                    check_memory(declared, what=f"reading '{name}'")
        if magic != _NPY_MAGIC and magic[:4] not in _ZIP_MAGICS:
            raise DataError(
                f"'{name}' is not readable as {expected}: it is neither a .npy array nor a .npz archive"
            )
        return np.load(name, mmap_mode=mmap_mode, allow_pickle=False)
    except ZIP_ERRORS as exc:
        raise DataError(f"'{name}' is not readable as {expected}: {exc}") from exc
