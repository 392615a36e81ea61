"""Writing and reading cascade results in the ragged and padded layouts, atomically.

Both layouts exist in `.h5` and `.npz` and record `layout` and `format_version`:

- ragged: `flat_values (total, O)`, `row_splits_0 (N+1,)`, `row_splits_1 (N*Ta+1,)`
  (int64 from 0) and `lengths (N, Ta)`.
- padded: `values (N, Ta, L, O)` (or `(Ta, L, N, O)` with `time_major`),
  `lengths (N, Ta)` and `mask (N, Ta, L)` (or `(Ta, L, N)`), with `pad_value`
  and `time_major` recorded.

`.csv` is a write-only long form with one row per emitted step. Every file is
written under a temporary name in the target folder and renamed into place.
"""

import contextlib
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np

from cascade_cli.h5 import open_h5
from cascade_cli.atomic import atomic_output, check_output_path
from cascade_cli.errors import DataError
from cascade_cli.result import CascadeResult

FORMAT_VERSION = 1
LAYOUTS = ("ragged", "padded")
FORMATS = ("h5", "npz", "csv")

SUFFIX_FORMATS = {".h5": "h5", ".hdf5": "h5", ".npz": "npz", ".csv": "csv"}
_LAYOUT_KEYS = {
    "ragged": ("flat_values", "row_splits_0", "row_splits_1", "lengths"),
    "padded": ("values", "lengths", "mask"),
}
_RESERVED_ATTRS = frozenset(
    {"layout", "format_version", "pad_value", "time_major"}
    | {key for keys in _LAYOUT_KEYS.values() for key in keys}
)
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
            "expected .h5, .hdf5, .npz or .csv, or pass --format"
        )
    return SUFFIX_FORMATS[suffix]


def _checked_attrs(attrs):
    """Returns extra attributes as a dict of str -> scalar, or raises `DataError`."""
    checked = {}
    for key, value in (attrs or {}).items():
        if not isinstance(key, str) or not key:
            raise DataError(f"attrs: expected non-empty string keys, received {key!r}")
        if key in _RESERVED_ATTRS:
            raise DataError(f"attrs: '{key}' is reserved for the result layout; use another name")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (str, bool, int, float)):
            raise DataError(
                f"attrs: '{key}' expected a string or a number, received {type(value).__name__}"
            )
        checked[key] = value
    return checked


def _layout_arrays(result, *, layout, pad_value, time_major):
    """Returns `(arrays, attrs)` describing `result` in `layout`."""
    if layout not in LAYOUTS:
        raise DataError(f"layout: expected one of {', '.join(LAYOUTS)}, received '{layout}'")
    attrs = {"layout": layout, "format_version": FORMAT_VERSION}
    if layout == "ragged":
        arrays = {
            "flat_values": result.values,
            "row_splits_0": result.row_splits_0,
            "row_splits_1": result.row_splits_1,
            "lengths": result.lengths,
        }
    else:
        values, lengths, mask = result.to_padded(pad_value, time_major=time_major)
        arrays = {"values": values, "lengths": lengths, "mask": mask}
        attrs["pad_value"] = float(pad_value)
        attrs["time_major"] = bool(time_major)
    return arrays, attrs


def _write_csv(file, result):
    """Writes `result` in long form: `sample,outer,inner,y0,...`, one row per emitted step."""
    header = ",".join(["sample", "outer", "inner"] + [f"y{i}" for i in range(result.output_size)])
    file.write((header + "\n").encode())
    lengths = result.lengths.ravel()
    pair = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
    inner = np.arange(result.total, dtype=np.int64) - result.row_splits_1[:-1][pair]
    sample, outer = np.divmod(pair, max(result.outer_steps, 1))
    digits = 9 if result.values.dtype.itemsize <= 4 else 17
    value_format = ",".join([f"%.{digits}g"] * result.output_size)
    row_format = "%d,%d,%d" + ("," + value_format if result.output_size else "")
    chunk = 65536
    for start in range(0, result.total, chunk):
        stop = min(start + chunk, result.total)
        table = np.column_stack(
            [sample[start:stop], outer[start:stop], inner[start:stop]]
        ).astype(object)
        table = np.concatenate([table, result.values[start:stop].astype(object)], axis=1)
        file.write("".join(row_format % tuple(row) + "\n" for row in table).encode())


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
):
    """Writes `result` to `path` atomically.

    Args:
        path: the output file.
        result: the `CascadeResult` to write.
        format: `"h5"`, `"npz"` or `"csv"`; `None` takes it from the suffix
            (`.h5`/`.hdf5`, `.npz`, `.csv`).
        layout: `"ragged"` or `"padded"` (ignored for csv).
        pad_value: value past each sequence's length in the padded layout.
        time_major: padded layout as `(Ta, L, N, O)` and mask `(Ta, L, N)`.
        overwrite: whether an existing file may be replaced.
        attrs: extra `str -> str | number` attributes (h5 attrs, npz 0-d
            arrays); ignored for csv.

    Raises:
        DataError: for an unknown format or layout, reserved or non-scalar
            attrs, or an output path that cannot be written.
    """
    format = _format_of(path, format)
    extra = _checked_attrs(attrs)
    check_output_path(path, overwrite=overwrite)
    if format != "csv":
        arrays, layout_attrs = _layout_arrays(
            result, layout=layout, pad_value=pad_value, time_major=time_major
        )
    with atomic_output(path, overwrite=overwrite) as temp:
        if format == "csv":
            with open(temp, "wb") as file:
                _write_csv(file, result)
        elif format == "npz":
            scalars = {key: np.asarray(value) for key, value in {**layout_attrs, **extra}.items()}
            with open(temp, "wb") as file:
                np.savez(file, **arrays, **scalars)
        else:
            with h5py.File(temp, "w") as file:
                for key, array in arrays.items():
                    file.create_dataset(key, data=array)
                file.attrs.update({**layout_attrs, **extra})


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
    if suffix in (".h5", ".hdf5"):
        return "h5"
    if suffix in (".npz", ".npy"):
        return "npz"
    if suffix == ".csv":
        raise DataError(
            f"result file '{path}' is csv, which cannot be read back; expected a .h5 or .npz file"
        )
    try:
        if h5py.is_hdf5(path):
            return "h5"
        if zipfile.is_zipfile(path):
            return "npz"
    except OSError as error:
        raise DataError(f"result file '{path}' cannot be read: {error}") from error
    raise DataError(f"result file '{path}' is neither HDF5 nor .npz; expected a cascade result")


def _check_header(path, attrs):
    """Checks the `layout` and `format_version` attributes; returns the layout."""
    if "layout" not in attrs:
        raise DataError(
            f"'{path}' is not a cascade result: key 'layout' is missing "
            f"(expected one of {', '.join(LAYOUTS)})"
        )
    layout = attrs["layout"]
    if layout not in LAYOUTS:
        raise DataError(
            f"'{path}' key 'layout': expected one of {', '.join(LAYOUTS)}, received {layout!r}"
        )
    if "format_version" not in attrs:
        raise DataError(f"'{path}' is not a cascade result: key 'format_version' is missing")
    version = attrs["format_version"]
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise DataError(
            f"'{path}' key 'format_version': expected {FORMAT_VERSION}, received {version!r}; "
            "it was written by another version of cascade"
        )
    return layout


def _h5_attrs(path, file):
    """Returns the root attributes of an open HDF5 file as Python scalars."""
    attrs = {}
    for key in file.attrs:
        try:
            attrs[key] = _python_scalar(file.attrs[key])
        except (OSError, TypeError, ValueError) as error:
            raise DataError(f"'{path}' attribute '{key}' cannot be read: {error}") from error
    return attrs


def _h5_dataset(path, file, key):
    """Reads dataset `key` (`open_h5` has already refused storage outside the file)."""
    if key not in file:
        raise DataError(f"'{path}' is not a complete cascade result: key '{key}' is missing")
    dataset = file[key]
    if not isinstance(dataset, h5py.Dataset):
        raise DataError(f"'{path}' key '{key}': expected a dataset, received a group")
    if dataset.shape is None or dataset.dtype.kind not in "biuf":
        raise DataError(
            f"'{path}' key '{key}': expected a numeric array, received dtype {dataset.dtype}"
        )
    try:
        return dataset[()]
    except (OSError, TypeError, ValueError) as error:
        raise DataError(f"'{path}' key '{key}' cannot be read: {error}") from error


def _open_npz(path):
    """Opens `path` with `np.load(allow_pickle=False)`, expecting an `.npz` archive."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"'{path}' is not a readable .npz file: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"'{path}' holds a single array; expected an .npz archive of a cascade result"
        )
    return archive


def _npz_array(path, archive, key):
    """Reads array `key` of an open `.npz` archive, refusing object arrays."""
    if key not in archive.files:
        raise DataError(f"'{path}' is not a complete cascade result: key '{key}' is missing")
    try:
        return archive[key]
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(
            f"'{path}' key '{key}' cannot be read without pickle: {error}"
        ) from error


def _npz_attrs(path, archive):
    """Returns the 0-d entries of an open `.npz` archive as Python scalars."""
    attrs = {}
    for key in archive.files:
        if key in _LAYOUT_KEYS["ragged"] or key in _LAYOUT_KEYS["padded"]:
            continue
        value = _npz_array(path, archive, key)
        if value.ndim == 0:
            attrs[key] = _python_scalar(value)
    return attrs


def _read_raw(path):
    """Returns `(attrs, arrays)` of a result file, with the header checked."""
    if _read_kind(path) == "h5":
        with open_h5(path) as file:
            attrs = _h5_attrs(path, file)
            layout = _check_header(path, attrs)
            arrays = {key: _h5_dataset(path, file, key) for key in _LAYOUT_KEYS[layout]}
    else:
        with _open_npz(path) as archive:
            attrs = _npz_attrs(path, archive)
            layout = _check_header(path, attrs)
            arrays = {key: _npz_array(path, archive, key) for key in _LAYOUT_KEYS[layout]}
    return attrs, arrays


def read_result_attrs(path):
    """Returns the attributes of a cascade result file.

    These include `layout` and `format_version`, `pad_value` and `time_major`
    for the padded layout, and any extra attrs the writer recorded.

    Raises:
        DataError: when `path` is not a readable cascade result.
    """
    if _read_kind(path) == "h5":
        with open_h5(path) as file:
            attrs = _h5_attrs(path, file)
    else:
        with _open_npz(path) as archive:
            attrs = _npz_attrs(path, archive)
    _check_header(path, attrs)
    return attrs


def read_result(path):
    """Reads a cascade result from an `.h5` or `.npz` file in either layout.

    Raises:
        DataError: naming the file and key when it is not a cascade result,
            a key is missing, the version is unknown or the arrays disagree.
    """
    attrs, arrays = _read_raw(path)
    try:
        if attrs["layout"] == "ragged":
            lengths = arrays["lengths"]
            outer_steps = lengths.shape[1] if lengths.ndim == 2 else None
            result = CascadeResult.from_row_splits(
                arrays["flat_values"],
                arrays["row_splits_0"],
                arrays["row_splits_1"],
                outer_steps=outer_steps,
            )
            if lengths.shape != result.lengths.shape or not np.array_equal(
                lengths, result.lengths
            ):
                raise DataError(
                    f"lengths: expected {result.lengths.shape} entries equal to the "
                    f"differences of row_splits_1, received shape {lengths.shape} "
                    "with other values"
                )
        else:
            time_major = bool(attrs.get("time_major", False))
            result = CascadeResult.from_padded(
                arrays["values"], arrays["lengths"], time_major=time_major
            )
            length = arrays["values"].shape[1 if time_major else 2]
            expected_mask = np.arange(length) < result.lengths[..., None]
            if time_major:
                expected_mask = expected_mask.transpose(1, 2, 0)
            mask = arrays["mask"]
            if mask.shape != expected_mask.shape or not np.array_equal(mask, expected_mask):
                raise DataError(
                    f"mask: expected shape {expected_mask.shape}, true exactly below lengths, "
                    f"received shape {mask.shape} with other entries"
                )
    except DataError as error:
        key, _, problem = str(error).partition(": ")
        raise DataError(f"'{path}' key '{key}': {problem}") from error
    return result


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
    """

    def __init__(self, path, *, outer_steps, output_size, overwrite=False, attrs=None, dtype=None):
        self.path = check_output_path(path, overwrite=overwrite)
        self.outer_steps = int(outer_steps)
        self.output_size = int(output_size)
        self.overwrite = overwrite
        self.attrs = _checked_attrs(attrs)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self._stack = None
        self._file = None
        self._n_samples = 0
        self._total = 0

    def __enter__(self):
        stack = contextlib.ExitStack()
        try:
            temp = stack.enter_context(atomic_output(self.path, overwrite=self.overwrite))
            self._file = stack.enter_context(h5py.File(temp, "w"))
            n_outer = self.outer_steps
            self._file.create_dataset(
                "lengths",
                shape=(0, n_outer),
                maxshape=(None, n_outer),
                dtype=np.int64,
                chunks=(max(1, 65536 // max(n_outer, 1)), max(n_outer, 1)),
            )
            self._file.create_dataset(
                "row_splits_1", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(65536,)
            )
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def _values_dataset(self):
        """Returns the `flat_values` dataset, creating it with `self.dtype` at first use."""
        if "flat_values" not in self._file:
            size = self.output_size
            self._file.create_dataset(
                "flat_values",
                shape=(0, size),
                maxshape=(None, size),
                dtype=self.dtype or np.float32,
                chunks=(max(1, 65536 // max(size, 1)), max(size, 1)),
            )
        return self._file["flat_values"]

    def append(self, result):
        """Appends the samples of `result`, a `CascadeResult` with the writer's `Ta` and `O`."""
        if self._file is None:
            raise RuntimeError("RaggedH5Writer.append is only valid inside its `with` block")
        if (result.outer_steps, result.output_size) != (self.outer_steps, self.output_size):
            raise DataError(
                f"output '{self.path}': expected batches with {self.outer_steps} outer steps "
                f"and output size {self.output_size}, received {result.outer_steps} and "
                f"{result.output_size}"
            )
        if self.dtype is None:
            self.dtype = result.values.dtype
        values = self._values_dataset()
        n_new, total_new = result.n_samples, result.total
        values.resize(self._total + total_new, axis=0)
        values[self._total :] = result.values
        lengths = self._file["lengths"]
        lengths.resize(self._n_samples + n_new, axis=0)
        lengths[self._n_samples :] = result.lengths
        splits = self._file["row_splits_1"]
        start = splits.shape[0]
        splits.resize(start + result.lengths.size, axis=0)
        splits[start:] = self._total + result.row_splits_1[1:]
        self._n_samples += n_new
        self._total += total_new

    def __exit__(self, exc_type, exc, traceback):
        stack, self._stack = self._stack, None
        try:
            if exc_type is None:
                self._values_dataset()
                self._file.create_dataset(
                    "row_splits_0",
                    data=np.arange(self._n_samples + 1, dtype=np.int64) * self.outer_steps,
                )
                self._file.attrs.update(
                    {"layout": "ragged", "format_version": FORMAT_VERSION, **self.attrs}
                )
        except BaseException:
            self._file = None
            stack.__exit__(*sys.exc_info())
            raise
        self._file = None
        return stack.__exit__(exc_type, exc, traceback)
