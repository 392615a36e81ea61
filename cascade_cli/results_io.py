"""Result files: the one spec of their layouts, the writers and the streaming reader.

Both layouts exist in `.h5` and `.npz` and record `layout` and `format_version`:

- ragged: `flat_values (total, O)`, `row_splits_0 (N+1,)`, `row_splits_1 (N*Ta+1,)`
  (int64 from 0) and `lengths (N, Ta)`.
- padded: `values (N, Ta, L, O)` (or `(Ta, L, N, O)` with `time_major`),
  `lengths (N, Ta)` and `mask (N, Ta, L)` (or `(Ta, L, N)`), with `pad_value`
  and `time_major` recorded.

A result with sampled tokens (`CascadeResult.tokens`, from a `greedy` or
`categorical` sampler) adds `tokens` (`OPTIONAL_KEYS`), int64 in either layout:
`(total,)` in value order beside `flat_values`, or `(N, Ta, L)` (`(Ta, L, N)`
with `time_major`) padded with `TOKEN_PAD` (-1) like `mask`. A file without it
reads as a result without tokens.

`.csv` is a write-only long form with one row per emitted step
(`sample,outer,inner[,token],y0,...`; the `token` column only with tokens). Every file is
written under a temporary name in the target folder and renamed into place
(`cascade_cli.atomic`), never over one of its inputs, and a full disk is one
`DataError`; HDF5 results are chunked for their batch, gzip-compressed and
checksummed (`_FILTERS`, the 1.10 file format), and read through
`cascade_cli.h5`, every failure of a damaged file a `DataError` naming the
file and key (`reading`), every declared size weighed against the file's real
size and memory before anything is allocated.

Results are read and written a batch of samples at a time: `open_result`
gives a `ResultReader` (the header and `lengths` in memory, the values on
disk) whose `pieces` are `CascadeResult`s, and `write_result` takes either a
`CascadeResult` or such a reader, so an export holds one batch, not a result.
"""

import contextlib
import os
import struct
import sys
import zipfile
from pathlib import Path
from types import MappingProxyType

import h5py
import numpy as np

from cascade_cli import h5
from cascade_cli.atomic import atomic_output, check_output_path, is_no_space
from cascade_cli.errors import CascadeError, DataError, ParameterError, one_line
from cascade_cli.result import TOKEN_PAD, ArrayError, CascadeResult

# --------------------------------------------------------------------------- the results spec

FORMAT_VERSION = 1
"""The version every result file records as `format_version`."""
LAYOUTS = ("ragged", "padded")
FORMATS = ("h5", "npz", "csv")
SUFFIX_FORMATS = MappingProxyType({".h5": "h5", ".hdf5": "h5", ".npz": "npz", ".csv": "csv"})

LAYOUT = "layout"
FORMAT_VERSION_ATTR = "format_version"
PAD_VALUE = "pad_value"
TIME_MAJOR = "time_major"
LAYOUT_ATTRS = (LAYOUT, FORMAT_VERSION_ATTR, PAD_VALUE, TIME_MAJOR)
"""The attributes that describe the layout, not the run."""

FLAT_VALUES = "flat_values"
ROW_SPLITS_0 = "row_splits_0"
ROW_SPLITS_1 = "row_splits_1"
LENGTHS = "lengths"
VALUES = "values"
MASK = "mask"
TOKENS = "tokens"
LAYOUT_KEYS = MappingProxyType({
    "ragged": (FLAT_VALUES, ROW_SPLITS_0, ROW_SPLITS_1, LENGTHS),
    "padded": (VALUES, LENGTHS, MASK),
})
"""The arrays of each layout."""
OPTIONAL_KEYS = MappingProxyType({"ragged": (TOKENS,), "padded": (TOKENS,)})
"""The arrays a file of each layout may hold besides `LAYOUT_KEYS`: the sampled `tokens` (int64; ragged
`(total,)`, padded like `mask`, `TOKEN_PAD` past the lengths)."""
RESERVED_ATTRS = frozenset(LAYOUT_ATTRS) | {
    key for spec in (LAYOUT_KEYS, OPTIONAL_KEYS) for keys in spec.values() for key in keys
}
"""Names extra attributes may not take."""
STOP_SUMMARY_ATTRS = ("stop_pairs", "stop_at_cap", "stop_at_first")
"""What a stop-rule run counted (`generation.GenerateSummary.pairs`, `at_cap`, `at_first`), recorded so
that `inspect` says what `generate` said; set them in `RaggedH5Writer.attrs` before the block ends."""
CSV_INDEX_COLUMNS = ("sample", "outer", "inner")
"""The first columns of the csv long form; `CSV_TOKEN_COLUMN` (with tokens) and `y0, y1, ...` follow."""
CSV_TOKEN_COLUMN = "token"
"""The csv column of the sampled ids, after `inner`, written only for a result with tokens."""
STDOUT = "-"
"""The output name that streams csv to standard output."""

# Bytes of values read or padded at a time when no batch size is given (about 64 MiB).
_BATCH_BYTES = 1 << 26
_CHUNK_ROWS = 65536  # csv rows formatted at a time
_CHUNK_MIN_BYTES = 4 << 10
_CHUNK_MAX_BYTES = 1 << 20
# Kept free beside an HDF5 file being written (`.reserve`), released when the disk fills, so that
# HDF5 can flush its caches on close (1 MiB of chunk cache per dataset, and metadata).
_RESERVE_BYTES = 8 << 20


def run_attrs(attrs):
    """Returns the attributes of a result that describe its run: the scalars that are not `LAYOUT_ATTRS`."""
    return {
        key: value for key, value in attrs.items()
        if key not in LAYOUT_ATTRS and isinstance(value, (str, bool, int, float))
    }


def is_result(attrs):
    """Returns whether a file's attribute (or `.npz` entry) names mark it as a cascade result."""
    return LAYOUT in attrs


def _format_of(path, format):
    """Returns the format to write `path` in, from `format` or the suffix."""
    if format is not None:
        if format not in FORMATS:
            raise DataError(f"format: expected one of {', '.join(FORMATS)}, received '{format}'")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise DataError(
            f"output '{path}': cannot tell the format from the suffix '{suffix}'; "
            "expected .h5, .hdf5, .npz or .csv, or pass format (one of h5, npz, csv)"
        )
    return SUFFIX_FORMATS[suffix]


def _checked_attrs(attrs):
    """Returns extra attributes as a dict of str -> scalar, or raises `DataError`."""
    checked = {}
    for key, value in (attrs or {}).items():
        if not isinstance(key, str) or not key:
            raise DataError(f"attrs: expected non-empty string keys, received {key!r}")
        if key in RESERVED_ATTRS:
            raise DataError(f"attrs: '{key}' is reserved for the result layout; use another name")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (str, bool, int, float)):
            raise DataError(
                f"attrs: '{key}' expected a string or a number, received {type(value).__name__}"
            )
        checked[key] = value
    return checked


def _header_attrs(layout, *, pad_value=0.0, time_major=False):
    """Returns the `LAYOUT_ATTRS` a file of `layout` records."""
    attrs = {LAYOUT: layout, FORMAT_VERSION_ATTR: FORMAT_VERSION}
    if layout == "padded":
        attrs[PAD_VALUE] = float(pad_value)
        attrs[TIME_MAJOR] = bool(time_major)
    return attrs


def _batch_samples(row_bytes, batch_samples):
    """Samples per piece: `batch_samples`, or as many as fill about 64 MiB at `row_bytes` each."""
    if batch_samples is not None:
        if isinstance(batch_samples, bool) or int(batch_samples) != batch_samples or batch_samples < 1:
            raise DataError(f"batch_samples: expected a positive integer, received {batch_samples!r}")
        return int(batch_samples)
    return max(1, _BATCH_BYTES // max(1, int(row_bytes)))


# --------------------------------------------------------------------------- sinks: where arrays go


def _chunk_rows(row_shape, dtype, rows):
    """Rows per HDF5 chunk: about `rows` (the batch or the whole column), within 4 KiB to 1 MiB per chunk."""
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    wanted = max(1, int(rows or 1)) * row_bytes
    return max(1, min(max(wanted, _CHUNK_MIN_BYTES), _CHUNK_MAX_BYTES) // row_bytes)


_FILTERS = MappingProxyType({"compression": "gzip", "compression_opts": 1, "shuffle": True, "fletcher32": True})
"""The HDF5 filters of every result array: gzip (readable everywhere) after byte shuffling, and a checksum
per chunk, so a damaged file is an error rather than other values."""
_LIBVER = ("v110", "v110")


def _new_h5(path):
    """A new HDF5 file at `path` in the `_LIBVER` format (checksummed metadata), without timestamps.

    That format stamps every object with times unless told not to, which
    would make two identical runs write different bytes.
    """
    access = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    access.set_libver_bounds(*(getattr(h5py.h5f, f"LIBVER_{version.upper()}") for version in _LIBVER))
    creation = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    creation.set_obj_track_times(False)
    return h5py.File(h5py.h5f.create(os.fsencode(path), h5py.h5f.ACC_TRUNC, fcpl=creation, fapl=access))
"""HDF5 1.10 file format: checksummed metadata (superblock, object headers), readable by HDF5 1.10 and later."""


def _fixed_length_text(text):
    """`text` as a fixed-length UTF-8 HDF5 string, which h5py reads back as `bytes`.

    A variable-length string lives in the file's global heap, which no
    checksum covers: libhdf5 can hang for good reading a damaged one (holding
    the GIL, so not even a signal ends it). A fixed-length one lives in the
    attribute's object header, which `_LIBVER`'s format checksums.
    """
    data = text.encode("utf-8")
    return np.array(data, dtype=h5py.string_dtype("utf-8", max(len(data), 1)))


def _compression(size):
    """The filters of an HDF5 dataset of `size` entries: `_FILTERS`, none for an empty one."""
    return dict(_FILTERS) if size else {}


class _H5Column:
    """A dataset of `file` that grows along its first axis, chunked for `rows` rows and compressed."""

    def __init__(self, file, key, row_shape, dtype, *, rows=None):
        row_shape = tuple(int(n) for n in row_shape)
        chunk = _chunk_rows(row_shape, dtype, rows)
        self.dataset = file.create_dataset(
            key, shape=(0, *row_shape), maxshape=(None, *(n or None for n in row_shape)), dtype=dtype,
            chunks=(chunk, *(max(n, 1) for n in row_shape)), **_FILTERS,
        )

    def extend(self, array):
        start = self.dataset.shape[0]
        self.dataset.resize(start + len(array), axis=0)
        if len(array):
            self.dataset[start:] = array


class _H5Sink:
    """Writes a result's arrays and attributes into an open, writable HDF5 file."""

    def __init__(self, file):
        self.file = file

    def column(self, key, row_shape, dtype, *, rows=None):
        return _H5Column(self.file, key, row_shape, dtype, rows=rows)

    def array(self, key, shape, dtype):
        size = int(np.prod(shape, dtype=np.int64))
        if not size:
            return self.file.create_dataset(key, shape=shape, dtype=dtype)
        return self.file.create_dataset(key, shape=shape, dtype=dtype, chunks=True, **_compression(size))

    def put(self, key, array):
        array = np.asarray(array)
        self.file.create_dataset(key, data=array, **(_compression(array.size) if array.ndim else {}))

    def finish(self, attrs):
        for key, value in attrs.items():
            self.file.attrs[key] = _fixed_length_text(value) if isinstance(value, str) else value

    def close(self):
        pass


class _RawColumn:
    """Rows appended to a raw part file; `.npz` member `key.npy` once the row count is known."""

    def __init__(self, path, row_shape, dtype):
        self.path = path
        self.row_shape = tuple(int(n) for n in row_shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self._file = open(path, "wb")

    def extend(self, array):
        array = np.ascontiguousarray(array, dtype=self.dtype)
        self._file.write(array.tobytes())
        self.rows += len(array)

    def write_member(self, archive, key):
        self._file.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, *self.row_shape)}
        with archive.open(f"{key}.npy", "w", force_zip64=True) as member, open(self.path, "rb") as part:
            np.lib.format.write_array_header_2_0(member, header)
            for chunk in iter(lambda: part.read(1 << 20), b""):
                member.write(chunk)

    def close(self):
        self._file.close()


class _NpzSink:
    """Builds an `.npz` archive at `temp` (stored, one `.npy` per key, as `np.savez` writes).

    Large arrays are written to part files beside `temp` (named after it, so a
    killed run's parts are removed like its temporary file) and copied into
    the archive at the end.
    """

    def __init__(self, temp):
        self.temp = Path(temp)
        self._members = {}

    def _part(self, key):
        return self.temp.with_name(f"{self.temp.name}.{key}")

    def column(self, key, row_shape, dtype, *, rows=None):
        column = _RawColumn(self._part(key), row_shape, dtype)
        self._members[key] = column
        return column

    def array(self, key, shape, dtype):
        if int(np.prod(shape, dtype=np.int64)) == 0:
            array = np.zeros(shape, dtype)
        else:
            array = np.lib.format.open_memmap(self._part(key), mode="w+", dtype=dtype, shape=tuple(shape))
        self._members[key] = array
        return array

    def put(self, key, array):
        self._members[key] = np.asarray(array)

    def finish(self, attrs):
        for key, value in attrs.items():
            self._members[key] = np.asarray(value)
        with zipfile.ZipFile(self.temp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, member in self._members.items():
                if isinstance(member, _RawColumn):
                    member.write_member(archive, key)
                elif isinstance(member, np.memmap):
                    member.flush()
                    archive.write(self._part(key), arcname=f"{key}.npy")
                else:
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as file:
                        np.lib.format.write_array(file, member, allow_pickle=False)

    def close(self):
        for key, member in self._members.items():
            if isinstance(member, (_RawColumn, np.memmap)):
                if isinstance(member, _RawColumn):
                    member.close()
                with contextlib.suppress(OSError):
                    os.unlink(self._part(key))
        self._members = {}


def _reserve(path, size):
    """Allocates `size` bytes at `path` (a file of zeros where the file system cannot allocate)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if is_no_space(error):
                raise
            zeros = bytes(1 << 20)
            for _ in range(size >> 20):
                os.write(fd, zeros)
    finally:
        os.close(fd)


def _close_h5(file, temp, reserve):
    """Closes an HDF5 file being written; into a full file system, space is freed and the close retried."""
    try:
        file.close()
    except (OSError, RuntimeError) as error:
        if not is_no_space(error):
            raise
        _free(temp, reserve)
        with contextlib.suppress(OSError, RuntimeError):
            file.close()
        raise


def _free(temp, reserve):
    """Frees the space of a failed HDF5 write: its reserve and the file's own blocks."""
    with contextlib.suppress(OSError):
        os.unlink(reserve)
    with contextlib.suppress(OSError):
        os.truncate(temp, 0)


@contextlib.contextmanager
def _open_sink(temp, format):
    """Yields the sink that writes `format` (`"h5"` or `"npz"`) at `temp`.

    HDF5 flushes its caches when the file closes; into a full file system that
    fails and leaves objects whose release crashes the interpreter. So
    `_RESERVE_BYTES` are held beside the file while it is written and freed
    (with the file's own blocks) as soon as a write fails for want of space,
    and the close then succeeds; the half file is removed by `atomic_output`.
    """
    if format == "h5":
        reserve = temp.with_name(f"{temp.name}.reserve")
        try:
            _reserve(reserve, _RESERVE_BYTES)
            file = _new_h5(temp)
            try:
                yield _H5Sink(file)
            except BaseException as error:
                if is_no_space(error):
                    _free(temp, reserve)
                _close_h5(file, temp, reserve)
                raise
            _close_h5(file, temp, reserve)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(reserve)
        return
    sink = _NpzSink(temp)
    try:
        yield sink
    finally:
        sink.close()


# --------------------------------------------------------------------------- the layouts


class _RaggedLayout:
    """Writes the ragged layout into a sink, piece by piece.

    The one routine behind `write_result(layout="ragged")` and `RaggedH5Writer`.
    """

    def __init__(self, sink, *, outer_steps, output_size, dtype, samples=None, total=None, tokens=False):
        self.sink = sink
        self.outer_steps = int(outer_steps)
        self.values = sink.column(FLAT_VALUES, (int(output_size),), dtype, rows=total)
        self.tokens = sink.column(TOKENS, (), np.int64, rows=total) if tokens else None
        self.lengths = sink.column(LENGTHS, (self.outer_steps,), np.int64, rows=samples)
        pairs = None if samples is None else samples * self.outer_steps
        self.row_splits_1 = sink.column(ROW_SPLITS_1, (), np.int64, rows=pairs)
        self.row_splits_1.extend(np.zeros(1, np.int64))
        self.n_samples = 0
        self.total = 0

    def append(self, piece):
        self.values.extend(piece.values)
        if self.tokens is not None:
            self.tokens.extend(piece.tokens)
        self.lengths.extend(piece.lengths)
        self.row_splits_1.extend(self.total + piece.row_splits_1[1:])
        self.n_samples += piece.n_samples
        self.total += piece.total

    def finish(self, extra):
        self.sink.put(ROW_SPLITS_0, np.arange(self.n_samples + 1, dtype=np.int64) * self.outer_steps)
        self.sink.finish({**_header_attrs("ragged"), **extra})


def _write_padded(sink, source, pieces, *, pad_value, time_major, extra):
    """Writes the padded layout of `source` into a sink, one piece of samples at a time."""
    n, outer, size, length = source.n_samples, source.outer_steps, source.output_size, source.max_length
    sink.put(LENGTHS, source.lengths)
    columns = {}
    if time_major:
        columns[VALUES] = sink.array(VALUES, (outer, length, n, size), _dtype_of(source))
        columns[MASK] = sink.array(MASK, (outer, length, n), bool)
        if source.has_tokens:
            columns[TOKENS] = sink.array(TOKENS, (outer, length, n), np.int64)
    else:
        columns[VALUES] = sink.column(VALUES, (outer, length, size), _dtype_of(source), rows=n)
        columns[MASK] = sink.column(MASK, (outer, length), bool, rows=n)
        if source.has_tokens:
            columns[TOKENS] = sink.column(TOKENS, (outer, length), np.int64, rows=n)
    start = 0
    for piece in pieces:
        padded, _, piece_mask = piece.to_padded(pad_value, time_major=time_major, max_length=length)
        arrays = {VALUES: padded, MASK: piece_mask}
        if source.has_tokens:
            arrays[TOKENS] = piece.padded_tokens(TOKEN_PAD, time_major=time_major, max_length=length)
        stop = start + piece.n_samples
        for key, array in arrays.items():
            if not time_major:
                columns[key].extend(array)
            elif stop > start:
                columns[key][:, :, start:stop] = array
        start = stop
    sink.finish({**_header_attrs("padded", pad_value=pad_value, time_major=time_major), **extra})


def _write_csv(file, pieces, *, output_size, dtype, tokens=False):
    """Writes long form: `sample,outer,inner[,token],y0,...`, one row per emitted step."""
    index_columns = [*CSV_INDEX_COLUMNS, *([CSV_TOKEN_COLUMN] if tokens else [])]
    header = ",".join([*index_columns, *(f"y{i}" for i in range(output_size))])
    file.write((header + "\n").encode())
    digits = 9 if np.dtype(dtype).itemsize <= 4 else 17
    value_format = ",".join([f"%.{digits}g"] * output_size)
    row_format = ",".join(["%d"] * len(index_columns)) + ("," + value_format if output_size else "")
    first_sample = 0
    for piece in pieces:
        lengths = piece.lengths.ravel()
        pair = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
        inner = np.arange(piece.total, dtype=np.int64) - piece.row_splits_1[:-1][pair]
        sample, outer = np.divmod(pair, max(piece.outer_steps, 1))
        sample += first_sample
        for start in range(0, piece.total, _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, piece.total)
            table = np.column_stack(
                [sample[start:stop], outer[start:stop], inner[start:stop],
                 *([piece.tokens[start:stop]] if tokens else [])]
            ).astype(object)
            table = np.concatenate([table, piece.values[start:stop].astype(object)], axis=1)
            file.write("".join(row_format % tuple(row) + "\n" for row in table).encode())
        first_sample += piece.n_samples


def _dtype_of(source):
    """The values' dtype of a `CascadeResult` or a `ResultReader`."""
    return source.values.dtype if isinstance(source, CascadeResult) else source.dtype


def _pieces_of(source, *, batch_samples, row_bytes):
    """Yields `source` (a `CascadeResult` or a `ResultReader`) as results of at most `batch_samples` samples."""
    if isinstance(source, CascadeResult):
        batch = _batch_samples(row_bytes, batch_samples)
        for start in range(0, source.n_samples, batch):
            yield source.slice_samples(start, start + batch)
    else:
        yield from source.pieces(batch_samples=batch_samples, row_bytes=row_bytes)


def write_result(
    path,
    result,
    *,
    format=None,
    layout="ragged",
    pad_value=0.0,
    time_major=False,
    overwrite=False,
    attrs=None,
    batch_samples=None,
    inputs=(),
):
    """Writes a result to `path` atomically, a batch of samples at a time.

    Args:
        path: the output file; `"-"` streams csv to standard output (the
            convention), and is refused for the other formats.
        result: a `CascadeResult`, or a `ResultReader` (from `open_result`)
            whose samples are read one batch at a time; its tokens, when it
            has them, are written too (`OPTIONAL_KEYS`, csv's `token` column).
        format: `"h5"`, `"npz"` or `"csv"`; `None` takes it from the suffix
            (`.h5`/`.hdf5`, `.npz`, `.csv`).
        layout: `"ragged"` or `"padded"` (ignored for csv).
        pad_value: value past each sequence's length in the padded layout.
        time_major: padded layout as `(Ta, L, N, O)` and mask `(Ta, L, N)`.
        overwrite: whether an existing file may be replaced.
        attrs: extra `str -> str | number` attributes (h5 attrs, npz 0-d
            arrays); ignored for csv.
        batch_samples: samples per batch; `None` takes about 64 MiB of values.
        inputs: other files the command reads; `path` may be none of them,
            nor the file of a `ResultReader` being written out.

    Raises:
        DataError: for an unknown format or layout, reserved or non-scalar
            attrs, an output path that cannot be written, or a reader whose
            file turns out inconsistent (nothing is left at `path` then).
    """
    format = _format_of(path, format)
    extra = _checked_attrs(attrs)
    if format != "csv" and layout not in LAYOUTS:
        raise DataError(f"layout: expected one of {', '.join(LAYOUTS)}, received '{layout}'")
    to_stdout = format == "csv" and os.fspath(path) == STDOUT
    inputs = (*inputs, *((result.path,) if isinstance(result, ResultReader) else ()))
    if not to_stdout:
        check_output_path(path, overwrite=overwrite, inputs=inputs)
    dtype = _dtype_of(result)
    size = result.output_size
    padded = format != "csv" and layout == "padded"
    tokens = result.has_tokens
    row_bytes = (dtype.itemsize * max(size, 1) + (8 if tokens else 0)) * (
        result.outer_steps * result.max_length if padded else max(1, result.total) / max(1, result.n_samples)
    )
    pieces = _pieces_of(result, batch_samples=batch_samples, row_bytes=row_bytes)
    if to_stdout:
        _write_csv(sys.stdout.buffer, pieces, output_size=size, dtype=dtype, tokens=tokens)
        sys.stdout.buffer.flush()
        return
    with atomic_output(path, overwrite=overwrite, inputs=inputs) as temp:
        if format == "csv":
            with open(temp, "wb") as file:
                _write_csv(file, pieces, output_size=size, dtype=dtype, tokens=tokens)
            return
        with _open_sink(temp, format) as sink:
            if padded:
                _write_padded(sink, result, pieces, pad_value=pad_value, time_major=time_major, extra=extra)
            else:
                ragged = _RaggedLayout(sink, outer_steps=result.outer_steps, output_size=size, dtype=dtype,
                                       samples=result.n_samples, total=result.total, tokens=tokens)
                for piece in pieces:
                    ragged.append(piece)
                ragged.finish(extra)


class RaggedH5Writer:
    """Writes a ragged HDF5 result batch by batch, atomically.

    Use as a context manager; the file appears at `path` only when the block
    ends without an exception.

    Args:
        path: the output `.h5` file.
        outer_steps: `Ta` of every batch.
        output_size: `O` of every batch.
        overwrite: whether an existing file may be replaced.
        attrs: extra `str -> str | number` attributes.
        dtype: dtype of `flat_values`; `None` takes the first batch's (float32
            when no batch is appended).
        inputs: the files the run reads (models, inputs, steps, shards);
            `path` may be none of them (`atomic.check_output_path`).
        tokens: whether the file holds the batches' sampled `tokens`:
            `"auto"` (the default) as the first batch does (none when no
            batch is appended), `True` (every batch must hold them; a file
            without batches gets an empty `tokens`) or `False` (no batch may).
            A batch that differs from the others is a `DataError`.

    Chunks are sized from the first batch and compressed (`_FILTERS`).
    """

    def __init__(self, path, *, outer_steps, output_size, overwrite=False, attrs=None, dtype=None, inputs=(),
                 tokens="auto"):
        if tokens not in ("auto", True, False) or not isinstance(tokens, (str, bool)):
            raise ParameterError("tokens", f'expected "auto", True or False, received {tokens!r}')
        self.tokens = tokens
        self.inputs = tuple(inputs)
        self.path = check_output_path(path, overwrite=overwrite, inputs=self.inputs)
        self.outer_steps = int(outer_steps)
        self.output_size = int(output_size)
        self.overwrite = overwrite
        self.attrs = _checked_attrs(attrs)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self._stack = None
        self._sink = None
        self._layout = None
        self._tokens_rule = "like the first batch" if tokens == "auto" else f"as tokens={tokens} asks"

    def __enter__(self):
        stack = contextlib.ExitStack()
        try:
            temp = stack.enter_context(atomic_output(self.path, overwrite=self.overwrite, inputs=self.inputs))
            self._sink = stack.enter_context(_open_sink(temp, "h5"))
        except BaseException:
            if not stack.__exit__(*sys.exc_info()):  # atomic_output sees the error and removes its files
                raise
            raise
        self._stack = stack
        return self

    def _ragged(self, dtype, first=None):
        """Returns the ragged layout being written, starting it at first use (chunks sized by `first`, the first batch)."""
        if self._layout is None:
            self.dtype = self.dtype or np.dtype(dtype)
            if self.tokens == "auto":
                self.tokens = first is not None and first.has_tokens
            self._layout = _RaggedLayout(
                self._sink, outer_steps=self.outer_steps, output_size=self.output_size, dtype=self.dtype,
                samples=None if first is None else first.n_samples, total=None if first is None else first.total,
                tokens=self.tokens,
            )
        return self._layout

    def append(self, result):
        """Appends the samples of `result`, a `CascadeResult` with the writer's `Ta` and `O` (and its tokens)."""
        if self._sink is None:
            raise RuntimeError("RaggedH5Writer.append is only valid inside its `with` block")
        if (result.outer_steps, result.output_size) != (self.outer_steps, self.output_size):
            raise DataError(
                f"output '{self.path}': expected batches with {self.outer_steps} outer steps "
                f"and output size {self.output_size}, received {result.outer_steps} and "
                f"{result.output_size}"
            )
        layout = self._ragged(result.values.dtype, result)
        if result.has_tokens != self.tokens:
            raise DataError(
                f"output '{self.path}': expected every batch {'with' if self.tokens else 'without'} sampled "
                f"tokens, {self._tokens_rule}, received one {'with' if result.has_tokens else 'without'}"
            )
        layout.append(result)

    def __exit__(self, exc_type, exc, traceback):
        stack, self._stack = self._stack, None
        try:
            if exc_type is None:
                self._ragged(np.float32).finish(self.attrs)
        except BaseException:
            self._sink = self._layout = None
            stack.__exit__(*sys.exc_info())
            raise
        self._sink = self._layout = None
        return stack.__exit__(exc_type, exc, traceback)


# --------------------------------------------------------------------------- reading


def _python_scalar(value):
    """Returns an attribute value as a Python scalar (`str`, `bool`, `int` or `float`)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_kind(path):
    """Returns `"h5"` or `"npz"` for a result file, from its suffix or its content."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"result file '{path}' does not exist")
    if path.is_dir():
        raise DataError(f"result file '{path}' is a folder; expected a .h5 or .npz file")
    suffix = path.suffix.lower()
    if suffix in h5.HDF5_SUFFIXES:
        return "h5"
    if suffix in (".npz", ".npy"):
        return "npz"
    if suffix == ".csv":
        raise DataError(
            f"result file '{path}' is csv, which cannot be read back; expected a .h5 or .npz file"
        )
    if h5.is_hdf5(path):
        return "h5"
    try:
        if zipfile.is_zipfile(path):
            return "npz"
    except OSError as error:
        raise DataError(f"result file '{path}' cannot be read: {error}") from error
    raise DataError(f"result file '{path}' is neither HDF5 nor .npz; expected a cascade result")


_DAMAGED = (*h5.H5PY_ERRORS, *h5.ZIP_ERRORS, IndexError, OverflowError, struct.error)
"""What h5py, zipfile and numpy raise on a damaged file (HDF5's own checks surface as any of them)."""


@contextlib.contextmanager
def reading(path, key=None):
    """Turns what a damaged file makes h5py, zipfile or numpy raise into a `DataError` naming the file (and key).

    `CascadeError`s pass through unchanged.
    """
    try:
        yield
    except CascadeError:
        raise
    except _DAMAGED as error:
        where = f" key '{key}'" if key else ""
        raise DataError(
            f"'{path}'{where} cannot be read: the file is damaged or is not a cascade result "
            f"({type(error).__name__}: {one_line(error)[:200]})"
        ) from error


def _shown(value):
    """An attribute value for a message: arrays by their shape, never their entries."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    return repr(value)


_ATTR_TYPES = MappingProxyType({
    LAYOUT: ((str,), "a string"),
    FORMAT_VERSION_ATTR: ((int,), "an integer"),
    PAD_VALUE: ((int, float), "a number"),
    TIME_MAJOR: ((bool,), "a boolean (true or false, not a string)"),
    "run_id": ((str,), "a string"),
})
"""The attributes whose type a reader relies on, with what they must be."""


def _check_attr_types(path, attrs):
    """Raises `DataError` when an attribute of `_ATTR_TYPES` has another type (`"false"` is not False)."""
    for key, (types, words) in _ATTR_TYPES.items():
        if key not in attrs:
            continue
        value = attrs[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise DataError(f"'{path}' attribute '{key}': expected {words}, received {_shown(value)}")


def _check_header(path, attrs):
    """Checks the types of the attributes a reader relies on, `layout` and `format_version`; returns the layout."""
    _check_attr_types(path, attrs)
    if LAYOUT not in attrs:
        raise DataError(
            f"'{path}' is not a cascade result: key '{LAYOUT}' is missing "
            f"(expected one of {', '.join(LAYOUTS)})"
        )
    layout = attrs[LAYOUT]
    if layout not in LAYOUTS:
        raise DataError(
            f"'{path}' key '{LAYOUT}': expected one of {', '.join(LAYOUTS)}, received {layout!r}"
        )
    if FORMAT_VERSION_ATTR not in attrs:
        raise DataError(f"'{path}' is not a cascade result: key '{FORMAT_VERSION_ATTR}' is missing")
    version = attrs[FORMAT_VERSION_ATTR]
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise DataError(
            f"'{path}' key '{FORMAT_VERSION_ATTR}': expected {FORMAT_VERSION}, received {version!r}; "
            "it was written by another version of cascade"
        )
    return layout


_NPZ_RESULT = "an .npz archive of a cascade result"
# No result's arrays hold more than this many bytes per byte of file (gzip's limit is about 1,032).
_MAX_EXPANSION = 4096
_SLACK_BYTES = 64 << 20
# The arrays a reader holds whole (lengths, both row splits) and what it derives from them, per entry.
_HEADER_COPIES = 6


def _check_declared_sizes(path, arrays):
    """Refuses arrays larger than the file could hold, and headers larger than memory, before reading any.

    A 16 KB file may not declare 4 GB of `flat_values` (or sparse `lengths`):
    what a header claims is read against the file's real size.
    """
    available = os.path.getsize(path)
    limit = _MAX_EXPANSION * available + _SLACK_BYTES
    for key, array in arrays.items():
        declared = int(np.prod(array.shape, dtype=np.float64)) * array.dtype.itemsize
        if declared > limit:
            raise DataError(
                f"'{path}' key '{key}' declares shape {array.shape}, which would need about {h5.size_text(declared)}, "
                f"but the file holds only {available:,} bytes: it is damaged or forged"
            )
    lengths = arrays[LENGTHS]
    needed = int(np.prod(lengths.shape, dtype=np.float64)) * 8 * _HEADER_COPIES
    h5.check_memory(needed, what=f"reading key '{LENGTHS}' {lengths.shape} of '{path}'")


def _missing(path, key):
    return DataError(f"'{path}' is not a complete cascade result: key '{key}' is missing")


class _H5Array:
    """One array of a result in an open HDF5 file, read a block at a time through `cascade_cli.h5`."""

    def __init__(self, path, file, key):
        with reading(path, key):
            if key not in file:
                raise _missing(path, key)
            self.path, self.key = path, key
            self.dataset = h5.h5_dataset(file, key, path=path)
            shape, dtype = self.dataset.shape, self.dataset.dtype
        if shape is None or dtype.kind not in "biuf":
            raise DataError(
                f"'{path}' key '{key}': expected a numeric array, received dtype {self.dataset.dtype}"
            )
        self.shape = tuple(int(n) for n in self.dataset.shape)
        self.dtype = self.dataset.dtype

    def read(self, start=None, stop=None, *, axis=0):
        """Reads `[start, stop)` along `axis` (every entry of the other axes); all of it by default."""
        with reading(self.path, self.key):
            if start is None:
                return np.asarray(h5.read_dataset(self.dataset, (), path=self.path))
            selection = (slice(None),) * axis + (slice(start, stop),)
            return h5.read_dataset(self.dataset, selection, path=self.path)


def _h5_attrs(path, file):
    """Returns the root attributes of an open HDF5 file as Python scalars (arrays stay arrays)."""
    attrs = {}
    with reading(path, "attributes"):
        keys = list(file.attrs)
    for key in keys:
        if not isinstance(key, str):
            raise DataError(f"'{path}' has an attribute whose name is not text ({key!r}): the file is damaged")
        with reading(path, key):
            attrs[key] = _python_scalar(file.attrs[key])
    return attrs


def _npz_keys(archive):
    return [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]


def _npz_attrs(path, archive):
    """Returns the 0-d entries of an open `.npz` archive as Python scalars."""
    attrs = {}
    for key in _npz_keys(archive):
        if key in RESERVED_ATTRS and key not in LAYOUT_ATTRS:
            continue
        member = h5.NpyMember(archive, key, path=path)
        if member.shape == ():
            attrs[key] = _python_scalar(member.read())
        elif key in _ATTR_TYPES:  # an array where a scalar belongs: refused by its shape, never read
            attrs[key] = np.broadcast_to(np.zeros((), member.dtype), member.shape)
    return attrs


class ResultReader:
    """A result file open for reading: its header in memory, its values read a batch of samples at a time.

    Use as a context manager (or call `close()`); `open_result` opens one.
    Every array's shape and dtype, the row splits and `lengths` are checked on
    opening; the mask of a padded file is checked piece by piece.

    Attributes:
        path: the file.
        layout: `"ragged"` or `"padded"`.
        attrs: every attribute, as `read_result_attrs` returns them.
        n_samples: `N`.
        outer_steps: `Ta`.
        output_size: `O`.
        total: emitted inner steps over all samples.
        max_length: the longest inner sequence.
        lengths: `(N, Ta)` int64, in memory.
        dtype: the values' dtype.
        has_tokens: whether the file holds sampled `tokens` (its pieces then carry them).
    """

    def __init__(self, path):
        self.path = path
        self._arrays = None
        self._stack = contextlib.ExitStack()
        try:
            with reading(path):
                if _read_kind(path) == "h5":
                    file = self._stack.enter_context(h5.open_h5(path))
                    self.attrs = _h5_attrs(path, file)
                    self.layout = _check_header(path, self.attrs)
                    arrays = {key: _H5Array(path, file, key) for key in LAYOUT_KEYS[self.layout]}
                    arrays.update({key: _H5Array(path, file, key) for key in OPTIONAL_KEYS[self.layout]
                                   if key in file})
                else:
                    archive = self._stack.enter_context(h5.open_npz(path, expected=_NPZ_RESULT))
                    self.attrs = _npz_attrs(path, archive)
                    self.layout = _check_header(path, self.attrs)
                    keys = set(_npz_keys(archive))
                    arrays = {}
                    for key in LAYOUT_KEYS[self.layout]:
                        if key not in keys:
                            raise _missing(path, key)
                        arrays[key] = h5.NpyMember(archive, key, path=path)
                    arrays.update({key: h5.NpyMember(archive, key, path=path) for key in OPTIONAL_KEYS[self.layout]
                                   if key in keys})
                self._arrays = arrays
                _check_declared_sizes(path, arrays)
                try:
                    self._check()
                except ArrayError as error:
                    raise DataError(f"'{path}' key '{error.array}': {error.problem}") from error
        except BaseException:
            self.close()
            raise

    def _check(self):
        """Checks shapes, dtypes and the small arrays; sets the header attributes."""
        arrays = self._arrays
        self.has_tokens = TOKENS in arrays
        tokens = arrays.get(TOKENS)
        stand_in_tokens = None if tokens is None else np.broadcast_to(np.zeros((), tokens.dtype), tokens.shape)
        if self.layout == "ragged":
            values = arrays[FLAT_VALUES]
            lengths = arrays[LENGTHS].read()
            outer_steps = lengths.shape[1] if lengths.ndim == 2 else None
            stand_in = np.broadcast_to(np.zeros((), values.dtype), values.shape)
            header = CascadeResult.from_row_splits(
                stand_in, arrays[ROW_SPLITS_0].read(), arrays[ROW_SPLITS_1].read(),
                outer_steps=outer_steps,
            )
            if lengths.shape != header.lengths.shape or not np.array_equal(lengths, header.lengths):
                raise ArrayError(
                    LENGTHS, f"expected {header.lengths.shape} entries equal to the differences of "
                    f"{ROW_SPLITS_1}, received shape {lengths.shape} with other values"
                )
            if tokens is not None:
                CascadeResult.check_tokens(stand_in_tokens, header.total)
            self.lengths = header.lengths
            self._splits = header.row_splits_1
            self.output_size = header.output_size
        else:
            values = arrays[VALUES]
            self.time_major = self.attrs.get(TIME_MAJOR, False)
            stand_in = np.broadcast_to(np.zeros((), values.dtype), values.shape)
            self.lengths = CascadeResult.check_padded(
                stand_in, arrays[LENGTHS].read(), tokens=stand_in_tokens, time_major=self.time_major
            )
            self.output_size = int(values.shape[3])
            self._length = int(values.shape[1 if self.time_major else 2])
            n, outer = self.lengths.shape
            expected = (outer, self._length, n) if self.time_major else (n, outer, self._length)
            if arrays[MASK].shape != expected:
                self._mask_error(expected, arrays[MASK].shape)
        self.dtype = values.dtype
        self.n_samples, self.outer_steps = (int(n) for n in self.lengths.shape)
        self.total = int(self.lengths.sum())
        self.max_length = int(self.lengths.max()) if self.lengths.size else 0

    def _mask_error(self, expected, received):
        raise ArrayError(
            MASK, f"expected shape {expected}, true exactly below lengths, "
            f"received shape {received} with other entries"
        )

    def _row_bytes(self):
        """Bytes of values (and tokens) one sample reads, on average."""
        entry = max(1, self.output_size) * self.dtype.itemsize + (8 if self.has_tokens else 0)
        if self.layout == "padded":
            return self.outer_steps * self._length * entry
        return max(1, self.total) / max(1, self.n_samples) * entry

    def _piece(self, start, stop):
        lengths = self.lengths[start:stop]
        if self.layout == "ragged":
            outer = self.outer_steps
            first, last = int(self._splits[start * outer]), int(self._splits[stop * outer])
            tokens = self._arrays[TOKENS].read(first, last) if self.has_tokens else None
            return CascadeResult(self._arrays[FLAT_VALUES].read(first, last), lengths, tokens)
        axis = 2 if self.time_major else 0
        values = self._arrays[VALUES].read(start, stop, axis=axis)
        tokens = self._arrays[TOKENS].read(start, stop, axis=axis) if self.has_tokens else None
        mask = self._arrays[MASK].read(start, stop, axis=axis)
        expected = np.arange(self._length) < lengths[..., None]
        if self.time_major:
            expected = expected.transpose(1, 2, 0)
        if not np.array_equal(mask, expected):
            n = self.n_samples
            full = (self.outer_steps, self._length, n) if self.time_major else (n, self.outer_steps, self._length)
            self._mask_error(full, full)
        return CascadeResult.from_padded(values, lengths, tokens=tokens, time_major=self.time_major)

    def pieces(self, *, batch_samples=None, row_bytes=None):
        """Yields the samples in order, as `CascadeResult`s of at most `batch_samples` samples.

        Args:
            batch_samples: samples per piece; `None` takes about 64 MiB of values.
            row_bytes: bytes one sample costs the consumer, when it is more
                than reading it (padding it, say); used only when
                `batch_samples` is None.

        Raises:
            DataError: naming file and key when a read fails or a padded
                file's mask disagrees with its lengths.
        """
        if self._arrays is None:
            raise DataError(f"result file '{self.path}' is closed")
        per_sample = max(row_bytes or 0, self._row_bytes())
        batch = _batch_samples(per_sample, batch_samples)
        if self.n_samples:
            h5.check_memory(int(min(batch, self.n_samples) * per_sample),
                            what=f"reading {min(batch, self.n_samples):,} samples of '{self.path}' at a time")
        for start in range(0, self.n_samples, batch):
            stop = min(start + batch, self.n_samples)
            try:
                with reading(self.path):
                    piece = self._piece(start, stop)
            except ArrayError as error:
                raise DataError(f"'{self.path}' key '{error.array}': {error.problem}") from error
            yield piece

    def read(self):
        """Reads every sample into one `CascadeResult`."""
        pieces = list(self.pieces())
        if not pieces:
            tokens = np.zeros(0, np.int64) if self.has_tokens else None
            return CascadeResult(np.zeros((0, self.output_size), self.dtype), self.lengths, tokens)
        return pieces[0] if len(pieces) == 1 else CascadeResult.concatenate(pieces)

    def close(self):
        """Closes the file; further reads fail."""
        self._arrays = None
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return (f"ResultReader('{self.path}', layout={getattr(self, 'layout', None)!r}, "
                f"n_samples={getattr(self, 'n_samples', None)}, total={getattr(self, 'total', None)})")


def open_result(path):
    """Opens a cascade result (`.h5` or `.npz`, either layout) for reading a batch at a time.

    Returns:
        A `ResultReader`; close it, or use it in a `with` block.

    Raises:
        DataError: naming the file and key when it is not a cascade result,
            a key is missing, the version is unknown or the arrays disagree.
    """
    return ResultReader(path)


def iter_result(path, *, batch_samples=None):
    """Yields the samples of a result file in order, as `CascadeResult`s of at most `batch_samples` samples."""
    with open_result(path) as reader:
        yield from reader.pieces(batch_samples=batch_samples)


def read_result_attrs(path):
    """Returns the attributes of a cascade result file.

    These include `layout` and `format_version`, `pad_value` and `time_major`
    for the padded layout, and any extra attrs the writer recorded.

    Raises:
        DataError: when `path` is not a readable cascade result.
    """
    with reading(path):
        if _read_kind(path) == "h5":
            with h5.open_h5(path) as file:
                attrs = _h5_attrs(path, file)
        else:
            with h5.open_npz(path, expected=_NPZ_RESULT) as archive:
                attrs = _npz_attrs(path, archive)
    _check_header(path, attrs)
    return attrs


def read_result(path):
    """Reads a whole cascade result from an `.h5` or `.npz` file in either layout.

    `open_result` reads one batch of samples at a time instead.

    Raises:
        DataError: naming the file and key when it is not a cascade result,
            a key is missing, the version is unknown or the arrays disagree.
    """
    with open_result(path) as reader:
        return reader.read()
