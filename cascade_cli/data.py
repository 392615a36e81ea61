"""Inputs and HDF5 training data: open and check them, stream batches, split and order samples.

The file layouts are those of DESIGN section 4:

- inputs: `.h5` (a dataset, `inputs` by default), `.npy` or `.npz` (key
  `inputs`), numeric, shaped `(N, Ta, F)`;
- training data (HDF5): `inputs (N, Ta, F)`, `steps (N, Ta)` and `targets`,
  either flat `(sum(steps), O)` in value order (or `(sum(steps),)`, one
  value per step, e.g. integer token ids) or padded `(N, Ta, L, O)`.

`dataset(path, batch_size, shuffle, seed)` streams a training file as a
`tf.data.Dataset` for `CascadeModel.fit`.

Files are opened and read through `cascade_cli.h5` (read-only, nothing
outside the file, keyed read errors, no pickles); the steps of a training file
are checked by `cascade_cli.steps`, which also reads steps files. Every problem
is a `DataError` naming the file, the key and what was expected. Large arrays
are read in chunks, never whole; padded targets only up to the longest steps,
however long `L` is declared; and a batch is weighed against free memory from
the declared shapes and the steps before anything is read
(`TrainingData.check_batch_size`), so a tiny file that declares gigabytes is
refused instead of filling memory.
"""

import contextlib
import os
from typing import Iterator, NamedTuple

import h5py
import numpy as np

from cascade_cli.errors import DataError
from cascade_cli.h5 import (HDF5_SUFFIXES, NpyMember, check_memory, display, h5_dataset, np_load, open_h5,
                            open_npz, read_dataset)
from cascade_cli.steps import shape_text, steps_from_array, steps_total

INPUT_SUFFIXES = HDF5_SUFFIXES + (".npy", ".npz")

# Bytes read at a time when scanning a large array (about 64 MiB).
_CHUNK_BYTES = 1 << 26


def _read_ranges(array, starts: np.ndarray, stops: np.ndarray, *, path, tail=()) -> np.ndarray:
    """Reads rows `[starts[i], stops[i])` of `array`, in order, concatenated.

    Ranges must be sorted and must not overlap; touching ranges are merged into
    one read, so neighbouring rows cost one HDF5 call.

    Args:
        array: an `h5py.Dataset` or numpy array (a memory map is fine).
        starts: `(k,)` first rows.
        stops: `(k,)` rows past the end.
        path: the file, for messages.
        tail: index of the remaining axes, e.g. `(slice(None), slice(0, 3))`.

    Returns:
        The rows read, `(sum(stops - starts), ...)`.
    """
    selections = [(slice(0, 0),) + tuple(tail)]
    if len(starts):
        breaks = np.flatnonzero(starts[1:] != stops[:-1]) + 1
        run_starts = starts[np.concatenate([[0], breaks])].tolist()
        run_stops = stops[np.concatenate([breaks - 1, [len(stops) - 1]])].tolist()
        runs = [(slice(a, b),) + tuple(tail) for a, b in zip(run_starts, run_stops) if b > a]
        selections = runs or selections
    if isinstance(array, h5py.Dataset):
        pieces = [read_dataset(array, selection, path=path) for selection in selections]
    else:
        pieces = [np.asarray(array[selection]) for selection in selections]
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Returns `concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros((0,), dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def _chunk_rows(row_shape, itemsize: int, chunk: int | None) -> int:
    """Rows per chunk: `chunk`, or as many as fit in about 64 MiB."""
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, received {chunk}")
        return int(chunk)
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)
    return max(1, _CHUNK_BYTES // row_bytes)


def _as_float32(values) -> np.ndarray:
    """A `float32` copy; values too large become inf (and `check_finite` says so)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.array(values, dtype=np.float32)


def _good_targets(values: np.ndarray, token_ids: int | None) -> np.ndarray:
    """Which values are finite (and, with `token_ids`, token ids in `[0, token_ids)`)."""
    good = np.isfinite(values)
    if token_ids is not None:
        good &= (values >= 0) & (values < token_ids)
    return good


def _first_bad_value(values: np.ndarray, token_ids: int | None = None) -> str:
    bad = values[~_good_targets(values, token_ids)]
    if not bad.size:
        return "?"
    value = bad.flat[0]
    return str(int(value)) if token_ids is not None and np.isfinite(value) else str(value)


# ---------------------------------------------------------------------------
# Inputs


def _numeric_or_raise(dtype: np.dtype, *, what: str) -> None:
    if dtype.kind not in "iuf":
        raise DataError(
            f"{what} has dtype {dtype}: expected integers or floating-point numbers"
        )


class InputSource:
    """Model inputs `(N, Ta, F)` read from `.h5`, `.npy` or `.npz`, a chunk at a time.

    `.h5` datasets stay on disk and `.npy` files are memory-mapped; `.npz`
    archives cannot be mapped, so their array is loaded once. Use it as a
    context manager, or call `close()`.

    Attributes:
        path: the file.
        key: the dataset or array name (None for `.npy`).
        shape: `(N, Ta, F)`.
        n_samples: `N`.
        outer_steps: `Ta`.
        features: `F`.
    """

    def __init__(self, path, *, key: str = "inputs"):
        """Opens and checks an inputs file; see `open_inputs`."""
        self.path = path
        name = display(path)
        suffix = os.path.splitext(name)[1].lower()
        self.key = key
        self._stack = contextlib.ExitStack()
        self._array = None
        try:
            if suffix in HDF5_SUFFIXES:
                f = self._stack.enter_context(open_h5(path))
                self._array = h5_dataset(f, key, path=path, ndim=3, kind="numeric")
            elif suffix == ".npy":
                self.key = None
                array = np_load(path, mmap_mode="r", expected="a .npy array")
                if not isinstance(array, np.ndarray):
                    array.close()
                    raise DataError(f"'{name}' is a .npz archive: expected a .npy array")
                self._array = array
            elif suffix == ".npz":
                self._array = _load_npz_array(path, key=key)
            else:
                raise DataError(
                    f"inputs file '{name}' has suffix '{suffix}': expected one of "
                    f"{', '.join(INPUT_SUFFIXES)}"
                )
            if self._array.ndim != 3:
                raise DataError(
                    f"inputs in {self.name} have {self._array.ndim} dimensions: expected 3 "
                    f"(N, Ta, F), received shape {tuple(self._array.shape)}"
                )
            _numeric_or_raise(self._array.dtype, what=f"inputs in {self.name}")
        except BaseException:
            self.close()
            raise
        self.shape = tuple(int(n) for n in self._array.shape)
        self.n_samples, self.outer_steps, self.features = self.shape

    @property
    def name(self) -> str:
        """The file and key, quoted, for messages."""
        if self.key is None:
            return f"'{display(self.path)}'"
        return f"'{display(self.path)}' (key '{self.key}')"

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype (reads are always `float32`)."""
        return self._array.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        """Reads samples `[start, stop)`.

        Args:
            start: first sample.
            stop: sample past the last; `start <= stop <= N`.

        Returns:
            `(stop - start, Ta, F)` `float32`.
        """
        if self._array is None:
            raise DataError(f"inputs {self.name} are closed")
        if not 0 <= start <= stop <= self.n_samples:
            raise DataError(
                f"inputs {self.name}: expected 0 <= start <= stop <= {self.n_samples}, "
                f"received start={start}, stop={stop}"
            )
        if isinstance(self._array, h5py.Dataset):
            values = read_dataset(self._array, slice(start, stop), path=self.path)
        else:
            values = self._array[start:stop]
        return _as_float32(values)

    def check_finite(self, *, chunk: int | None = None) -> None:
        """Scans every sample, a chunk at a time, for NaN or infinity.

        Values are checked as the `float32` that `read` returns, so a float64
        too large for `float32` counts as infinite.

        Args:
            chunk: samples per read; None reads about 64 MiB at a time.

        Raises:
            DataError: naming file, key and the first bad sample.
        """
        rows = _chunk_rows(self.shape[1:], 4, chunk)
        for start in range(0, self.n_samples, rows):
            values = self.read(start, min(start + rows, self.n_samples))
            good = np.isfinite(values).reshape(len(values), -1).all(axis=1)
            if not good.all():
                first = int(np.argmin(good))
                raise DataError(
                    f"inputs in {self.name} sample {start + first}: expected finite "
                    f"values, received {_first_bad_value(values[first])}"
                )

    def close(self) -> None:
        """Closes the file; further reads fail."""
        self._array = None
        self._stack.close()

    def __enter__(self) -> "InputSource":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"InputSource({self.name}, shape={getattr(self, 'shape', None)})"


def _load_npz_array(path, *, key: str) -> np.ndarray:
    """Loads one array of a `.npz` archive (without pickles), after checking its header against the archive."""
    name = display(path)
    with open_npz(path, expected="a .npz archive") as archive:
        keys = [member[: -len(".npy")] for member in archive.namelist() if member.endswith(".npy")]
        if key not in keys:
            raise DataError(
                f"'{name}' has no array '{key}': expected an array '{key}', "
                f"received arrays {keys}"
            )
        member = NpyMember(archive, key, path=name)
        nbytes = int(np.prod(member.shape, dtype=np.int64)) * member.dtype.itemsize
        check_memory(nbytes, what=f"loading array '{key}' of '{name}' (an .npz array is read whole)",
                     advice="save the inputs as .npy or .h5, which are read a batch at a time")
        return member.read()


def open_inputs(path, *, key: str = "inputs") -> InputSource:
    """Opens a model inputs file `(N, Ta, F)`.

    Args:
        path: `.h5`/`.hdf5`, `.npy` or `.npz`.
        key: dataset (`.h5`) or array (`.npz`) name; unused for `.npy`.

    Returns:
        An `InputSource`; close it, or use it in a `with` block.

    Raises:
        DataError: unknown suffix, unreadable file, missing key, rank other
            than 3, non-numeric dtype or object array.
    """
    return InputSource(path, key=key)


# ---------------------------------------------------------------------------
# Training data


class Batch(NamedTuple):
    """One training batch.

    Attributes:
        inputs: `(b, Ta, F)` `float32`.
        steps: `(b, Ta)` `int64`.
        targets: `(sum(steps), O)` `float32`, in value order (sample, then
            outer step, then inner step).
    """

    inputs: np.ndarray
    steps: np.ndarray
    targets: np.ndarray


class TrainingData:
    """An HDF5 training set: `inputs (N, Ta, F)`, `steps (N, Ta)` and `targets`.

    `targets` is flat `(sum(steps), O)` in value order, or padded
    `(N, Ta, L, O)` with `L >= max(steps)` (entries past `steps` are ignored).
    The file stays open until `close()` (or the end of a `with` block); shapes,
    dtypes and steps are checked on opening, finiteness by `check_finite()`,
    which reads the whole file a chunk at a time.

    Attributes:
        path: the file.
        n_samples: `N`.
        outer_steps: `Ta`.
        features: `F`.
        output_size: `O`.
        targets_layout: `"flat"` or `"padded"`.
        steps: `(N, Ta)` `int64`, held in memory (end rows of `with_end_token` counted).
        file_steps: `steps` as the file holds them.
    """

    def __init__(self, path):
        """Opens and checks a training file.

        Args:
            path: the HDF5 file.

        Raises:
            DataError: the file is unreadable or any dataset is missing or has
                the wrong shape, dtype or (for steps) values.
        """
        self.path = path
        name = display(path)
        self._stack = contextlib.ExitStack()
        try:
            f = self._stack.enter_context(open_h5(path))
            self._inputs = h5_dataset(f, "inputs", path=path, ndim=3, kind="numeric")
            self.n_samples, self.outer_steps, self.features = (int(n) for n in self._inputs.shape)
            steps = h5_dataset(f, "steps", path=path, ndim=2)
            self.steps = steps_from_array(
                read_dataset(steps, (), path=path), source=f"'{name}' (key 'steps')"
            )
            if self.steps.shape != (self.n_samples, self.outer_steps):
                raise DataError(
                    f"steps in '{name}' have shape {shape_text(self.steps.shape)}: expected "
                    f"(N, Ta)={shape_text((self.n_samples, self.outer_steps))} like inputs"
                )
            self._targets = h5_dataset(f, "targets", path=path, kind="numeric")
            self._check_targets()
        except BaseException:
            self.close()
            raise
        totals = steps_total(self.steps, source=f"'{name}' (key 'steps')", axis=1)
        self._offsets = np.concatenate([[0], np.cumsum(totals)]).astype(np.int64)
        self.file_steps = self.steps  # what the file holds; `steps` counts the end rows `with_end_token` adds
        self._file_output_size = self.output_size  # `output_size` counts the column `with_stop_gate` adds
        self.end_token = None
        self._end_ids = False
        self.stop_gate = False

    def with_stop_gate(self, on=True):
        """Makes every batch's targets end in one more column, the stop gate's target (`append_gate_targets`).

        Applied after `with_end_token`'s rows, so an end row is where the gate's
        target is 1. `output_size` counts the column.

        Returns:
            This `TrainingData`.
        """
        self.stop_gate = bool(on)
        self.output_size = self._file_output_size + int(self.stop_gate)
        return self

    def with_end_token(self, token, *, ids=False):
        """Makes every batch end each pair, 0-step pairs included, with one more target row: token `token`.

        The row is the one-hot of `token` (`O` = the file's values per step),
        or with `ids` (token-id targets, one per step) the id itself;
        `steps` and every batch's steps count it (`append_end_token`).
        Calling it again replaces the token; None takes the rows away.

        Returns:
            This `TrainingData`.
        """
        self.end_token, self._end_ids = token, bool(ids)
        self.steps = self.file_steps if token is None else self.file_steps + 1
        return self

    def _check_targets(self) -> None:
        name = display(self.path)
        shape = tuple(int(n) for n in self._targets.shape)
        total = steps_total(self.steps, source=f"'{name}' (key 'steps')")
        self._one_per_step = len(shape) == 1  # (sum(steps),): one value (a token id) per step, read as (rows, 1)
        if self._one_per_step:
            shape = shape + (1,)
        if len(shape) == 2:
            self.targets_layout = "flat"
            if shape[0] != total:
                raise DataError(
                    f"targets in '{name}' have {shape[0]} rows, expected sum(steps) = {total}"
                )
        elif len(shape) == 4:
            self.targets_layout = "padded"
            if shape[:2] != (self.n_samples, self.outer_steps):
                raise DataError(
                    f"padded targets in '{name}' have shape {shape_text(shape)}: expected "
                    f"(N, Ta, L, O) with (N, Ta)={shape_text((self.n_samples, self.outer_steps))}"
                )
            longest = int(self.steps.max(initial=0))
            if shape[2] < longest:
                raise DataError(
                    f"padded targets in '{name}' have L = {shape[2]} inner steps, "
                    f"expected L >= max(steps) = {longest}"
                )
        else:
            raise DataError(
                f"targets in '{name}' have shape {shape_text(shape)}: expected flat "
                "(sum(steps), O), (sum(steps),) or padded (N, Ta, L, O)"
            )
        self.output_size = shape[-1]

    @property
    def total_steps(self) -> int:
        """`sum(steps)`: the number of target rows."""
        return int(self._offsets[-1])

    def _check_open(self) -> None:
        if getattr(self, "_inputs", None) is None:
            raise DataError(f"training data '{display(self.path)}' is closed")

    @property
    def targets_dtype(self) -> np.dtype:
        """The dtype `targets` is stored in."""
        return self._targets.dtype

    def check_finite(self, *, chunk: int | None = None, token_ids: int | None = None) -> None:
        """Scans inputs and the valid targets, a chunk at a time, for NaN or infinity.

        Padded targets are checked only where `inner step < steps`, so any pad
        value (NaN included) is fine.

        Args:
            chunk: samples (or flat target rows) per read; None reads about
                64 MiB at a time.
            token_ids: the targets are token ids: each valid one must also be
                in `[0, token_ids)`.

        Raises:
            DataError: naming file, key and the first bad sample.
        """
        self._check_open()
        name = display(self.path)
        rows = _chunk_rows(self._inputs.shape[1:], 4, chunk)
        for start in range(0, self.n_samples, rows):
            stop = min(start + rows, self.n_samples)
            values = _as_float32(read_dataset(self._inputs, slice(start, stop), path=self.path))
            good = np.isfinite(values).reshape(len(values), -1).all(axis=1)
            if not good.all():
                first = int(np.argmin(good))
                raise DataError(
                    f"inputs in '{name}' (key 'inputs') sample {start + first}: expected "
                    f"finite values, received {_first_bad_value(values[first])}"
                )
        longest = int(self.file_steps.max(initial=0))
        if self.targets_layout == "flat":
            rows = _chunk_rows(self._targets.shape[1:], 4, chunk)
            length, tail = self.total_steps, ()
        else:  # only the inner steps some pair uses: L may be declared far longer
            rows = _chunk_rows((self.outer_steps, longest, self.output_size), 4, chunk)
            length, tail = (self.n_samples if longest else 0), (slice(None), slice(0, longest))
        for start in range(0, length, rows):
            stop = min(start + rows, length)
            selection = (slice(start, stop),) + tail
            values = _as_float32(read_dataset(self._targets, selection, path=self.path))
            if self._one_per_step:
                values = values.reshape(-1, 1)
            expected = "finite values" if token_ids is None else f"token ids in [0, {token_ids})"
            if self.targets_layout == "flat":
                good = _good_targets(values, token_ids).all(axis=1)
                if not good.all():
                    row = start + int(np.argmin(good))
                    sample = int(np.searchsorted(self._offsets, row, side="right") - 1)
                    raise DataError(
                        f"targets in '{name}' (key 'targets') row {row} (sample {sample}): "
                        f"expected {expected}, received {_first_bad_value(values[row - start], token_ids)}"
                    )
            else:
                valid = np.arange(values.shape[2]) < self.file_steps[start:stop, :, None]
                good = _good_targets(values, token_ids).all(axis=3) | ~valid
                good = good.reshape(len(values), -1).all(axis=1)
                if not good.all():
                    first = int(np.argmin(good))
                    bad = values[first][valid[first]]
                    raise DataError(
                        f"targets in '{name}' (key 'targets') sample {start + first}: "
                        f"expected {expected}, received {_first_bad_value(bad, token_ids)}"
                    )

    def sample_bytes(self) -> np.ndarray:
        """Estimates the bytes a batch spends on each sample, from the declared shapes and the steps.

        Counts what `batches` allocates: the inputs and the target rows as
        stored, their `float32` copies and the reordered batch; padded targets
        are read up to the longest steps, not to `L`.

        Returns:
            `(N,)` `float64` (floats: a forged header cannot wrap the estimate).
        """
        self._check_open()
        inputs = self.outer_steps * self.features * (self._inputs.dtype.itemsize + 8.0)
        rows = self.steps.sum(axis=1).astype(np.float64)
        item = float(self._targets.dtype.itemsize)
        if self.targets_layout == "flat":
            targets = rows * self.output_size * (item + 12.0)
        else:
            longest = float(self.steps.max(initial=0))
            targets = self.outer_steps * longest * self.output_size * (item + 8.0) + rows * self.output_size * 4.0
        return inputs + targets

    def check_batch_size(self, batch_size: int, *, indices=None) -> None:
        """Refuses a `batch_size` whose largest batch cannot fit in memory, before anything is read.

        Args:
            batch_size: samples per batch.
            indices: the samples the batches are drawn from; None for all.

        Raises:
            DataError: saying about how much the largest batch would need and
                to use a smaller `batch_size`.
        """
        self._check_open()
        needs = self.sample_bytes()
        if indices is not None:
            needs = needs[np.unique(np.asarray(indices, dtype=np.int64))]
        count = min(int(batch_size), len(needs))
        if count:
            largest = float(np.sort(needs)[-count:].sum())
            check_memory(int(min(largest, 2.0**62)),
                         what=f"a training batch of {count} samples of '{display(self.path)}'",
                         advice="use a smaller batch_size")

    def batches(self, indices, *, batch_size: int) -> Iterator[Batch]:
        """Streams batches of the given samples, in the given order.

        Only the rows a batch needs are read: its samples are sorted (and
        duplicates read once), neighbouring rows are read together, then the
        requested order is restored.

        Args:
            indices: `(k,)` sample indices in `[0, N)`, in the order wanted.
            batch_size: samples per batch (the last batch may be smaller).

        Yields:
            `Batch(inputs, steps, targets)`.

        Raises:
            DataError: an index is out of range, the largest batch would not
                fit in memory (checked before the first read), or the file
                cannot be read.
        """
        self._check_open()
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, received {batch_size!r}")
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise DataError(
                f"sample indices for '{display(self.path)}': expected a 1-D array of "
                f"integers, received shape {indices.shape} dtype {indices.dtype}"
            )
        indices = indices.astype(np.int64)
        outside = (indices < 0) | (indices >= self.n_samples)
        if outside.any():
            raise DataError(
                f"sample index {int(indices[outside][0])} for '{display(self.path)}': "
                f"expected 0 <= index < {self.n_samples}"
            )
        self.check_batch_size(int(batch_size), indices=indices)
        for start in range(0, len(indices), int(batch_size)):
            yield self._batch(indices[start : start + int(batch_size)])

    def _batch(self, wanted: np.ndarray) -> Batch:
        self._check_open()
        samples, order = np.unique(wanted, return_inverse=True)
        inputs = _read_ranges(self._inputs, samples, samples + 1, path=self.path)
        inputs = _as_float32(inputs)[order]
        steps = self.file_steps[wanted]
        if self.targets_layout == "flat":
            starts, stops = self._offsets[samples], self._offsets[samples + 1]
            rows = _as_float32(_read_ranges(self._targets, starts, stops, path=self.path))
            rows = rows.reshape(-1, 1) if self._one_per_step else rows
            lengths = stops - starts
            read_at = np.cumsum(lengths) - lengths
            targets = rows[_segments(read_at[order], lengths[order])]
        else:
            longest = int(steps.max(initial=0))
            tail = (slice(None), slice(0, longest), slice(None))
            padded = _read_ranges(self._targets, samples, samples + 1, path=self.path, tail=tail)
            padded = _as_float32(padded)[order]
            valid = np.arange(longest) < steps[:, :, None]
            targets = padded[valid]
        if self.end_token is not None:
            steps, targets = append_end_token(steps, targets, self.end_token, output_size=self._file_output_size,
                                              ids=self._end_ids)
        if self.stop_gate:
            targets = append_gate_targets(steps, targets)
        return Batch(inputs=inputs, steps=steps, targets=np.ascontiguousarray(targets))

    def close(self) -> None:
        """Closes the file; further reads fail."""
        self._inputs = None
        self._targets = None
        self._stack.close()

    def __enter__(self) -> "TrainingData":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TrainingData('{display(self.path)}', n_samples={getattr(self, 'n_samples', None)}, "
            f"targets_layout={getattr(self, 'targets_layout', None)!r})"
        )


# ---------------------------------------------------------------------------
# Splits and order


def split_indices(n_samples: int, *, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits `range(n_samples)` into training and validation samples.

    The validation set has `round(n_samples * val_split)` samples chosen by
    `np.random.default_rng(seed)`; both sets come back sorted.

    Args:
        n_samples: `N`.
        val_split: fraction in `[0, 1)` kept for validation.
        seed: random seed.

    Returns:
        `(train, val)`, `int64` index arrays.

    Raises:
        DataError: `val_split` outside `[0, 1)`, or it leaves no training sample.
    """
    if not 0.0 <= val_split < 1.0:
        raise DataError(f"validation split: expected a fraction in [0, 1), received {val_split}")
    n_val = int(round(n_samples * val_split))
    if n_samples > 0 and n_val >= n_samples:
        raise DataError(
            f"validation split {val_split} of {n_samples} samples keeps {n_val} for "
            "validation: expected at least one training sample"
        )
    order = np.random.default_rng(seed).permutation(n_samples)
    val = np.sort(order[:n_val]).astype(np.int64)
    train = np.sort(order[n_val:]).astype(np.int64)
    return train, val


def epoch_order(indices, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Returns the order in which one epoch visits `indices`.

    Args:
        indices: `(k,)` sample indices.
        seed: non-negative random seed.
        epoch: non-negative epoch number.
        shuffle: False keeps the given order.

    Returns:
        `(k,)` `int64`: a permutation drawn from `np.random.default_rng([seed,
        epoch])`, the same for the same seed and epoch.
    """
    indices = np.array(indices, dtype=np.int64)
    if not shuffle:
        return indices
    return np.random.default_rng([seed, epoch]).permutation(indices)


# ---------------------------------------------------------------------------
# tf.data


def append_end_token(steps, targets, token, *, output_size, ids=False):
    """Ends every pair, 0-step pairs included, with one more target row: the end token.

    Pure numpy. The row goes after each pair's last row in value order.

    Args:
        steps: `(b, Ta)` integers.
        targets: `(sum(steps), O)` in value order.
        token: the end token's id, in `[0, output_size)` (the caller checks it against B).
        output_size: `O`, the width of the one-hot row.
        ids: the targets are token ids, one per step (`(sum(steps), 1)`): the row is `[token]`.

    Returns:
        `(steps + 1, targets (sum(steps) + b * Ta, O))`.
    """
    steps = np.asarray(steps)
    targets = np.asarray(targets)
    if ids:
        row = np.full((1, targets.shape[1] if targets.ndim == 2 else 1), token, targets.dtype)
    else:
        row = np.zeros((1, output_size), targets.dtype)
        row[0, token] = 1
    ends = np.cumsum(steps.reshape(-1))  # where each pair's rows stop, in the file's rows
    targets = targets.reshape(-1, row.shape[1])
    return steps + 1, np.insert(targets, ends, row, axis=0)


def append_gate_targets(steps, targets):
    """The stop gate's targets as one more column: 1 at each pair's last valid step, 0 before it.

    Pure numpy.

    Args:
        steps: `(b, Ta)` integers.
        targets: `(sum(steps), K)` in value order.

    Returns:
        `(sum(steps), K + 1)`, in `targets`' dtype.
    """
    counts = np.asarray(steps).reshape(-1)
    targets = np.asarray(targets)
    targets = targets.reshape(-1, 1) if targets.ndim == 1 else targets
    gate = np.zeros((len(targets), 1), targets.dtype)
    gate[np.cumsum(counts)[counts > 0] - 1] = 1
    return np.concatenate([targets, gate], axis=1)


def padded_targets(steps, flat, *, pad_value=0.0, dtype=np.float32) -> np.ndarray:
    """Flat targets `(sum(steps), O)` in value order as padded `(b, Ta, L, O)`, `L = max(steps)`, `pad_value` past each end."""
    steps = np.asarray(steps)
    longest = int(steps.max(initial=0))
    padded = np.full(steps.shape + (longest, flat.shape[-1]), pad_value, dtype)
    padded[np.arange(longest) < steps[..., None]] = flat  # C order is value order
    return padded


def dataset(path, batch_size=32, shuffle=True, seed=0, *, indices=None, pad_value=0.0, append_end_token=None):
    """A streamed `tf.data.Dataset` over an HDF5 training file, for `CascadeModel.fit`.

    Each element is one batch `((inputs (b, Ta, F) float32, steps (b, Ta)
    int32), targets (b, Ta, L, O) float32)`, the targets padded to the
    batch's longest steps (`L`) with `pad_value`, which the loss never reads;
    a file of integer token ids (one per step) gives `targets (b, Ta, L, 1)`
    int64, which `CascadeModel` keeps as ids (teacher forcing feeds their
    one-hot).
    The file is read a batch at a time (`TrainingData.batches`: only the
    rows the batch needs), never whole. Every pass over the dataset (an
    epoch of `fit`) visits the samples in `epoch_order(indices, seed=seed,
    epoch=k)` for the k-th pass (0-based), or in the given order without
    `shuffle`, so a run is the same each time it is made. `CascadeModel.fit`
    says which epoch each pass is (the dataset's `epoch_of_next_pass`, a
    one-item list, set as each epoch begins), so a run resumed at epoch k
    (`keras.callbacks.BackupAndRestore`) visits epoch k's order.

    Args:
        path: the HDF5 training file (`inputs`, `steps`, `targets`).
        batch_size: samples per batch (the last may be smaller).
        shuffle: a new seeded order every pass.
        seed: seeds the order.
        indices: the samples to visit (e.g. `split_indices`' training part);
            None for all.
        pad_value: the value past each inner sequence's end.
        append_end_token: a token id: every pair, 0-step pairs included, ends
            with one more target row, that token (`TrainingData.with_end_token`,
            `cascade train --append-end-token`); steps count it.

    Returns:
        A `tf.data.Dataset`.

    Raises:
        DataError: the file is unreadable or malformed, or an index is out of range.
        ParameterError: a bad `batch_size` or `seed`.
    """
    import tensorflow as tf

    from cascade_cli.errors import ParameterError
    from cascade_cli.options import SEED_MAX, check_int

    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed, maximum=SEED_MAX)
    if append_end_token is not None:
        append_end_token = check_int("append_end_token", append_end_token, maximum=SEED_MAX)
    with TrainingData(path) as data:  # checked now; read again on every pass
        outer, features, output_size = data.outer_steps, data.features, data.output_size
        ids = output_size == 1 and data.targets_dtype.kind in "iu"
        if append_end_token is not None and not ids and append_end_token >= output_size:
            raise ParameterError("append_end_token", f"expected a token id in [0, {output_size}) (the targets' O), "
                                                     f"received {append_end_token}.")
        chosen = np.arange(data.n_samples, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        if chosen.size and (chosen.min() < 0 or chosen.max() >= data.n_samples):
            raise DataError(f"sample indices for '{display(path)}': expected 0 <= index < {data.n_samples}")
        data.check_batch_size(batch_size, indices=chosen)
    passes = [0]  # the epoch of the next pass: counted here, or set by CascadeModel.fit as each epoch begins

    def batches():
        order = epoch_order(chosen, seed=seed, epoch=passes[0], shuffle=bool(shuffle))
        passes[0] += 1
        with TrainingData(path) as data:
            data.with_end_token(append_end_token, ids=ids)
            for batch in data.batches(order, batch_size=batch_size):
                yield ((batch.inputs, batch.steps.astype(np.int32)),
                       padded_targets(batch.steps, batch.targets, pad_value=pad_value,
                                      dtype=np.int64 if ids else np.float32))

    signature = ((tf.TensorSpec([None, outer, features], tf.float32), tf.TensorSpec([None, outer], tf.int32)),
                 tf.TensorSpec([None, outer, None, output_size], tf.int64 if ids else tf.float32))
    stream = tf.data.Dataset.from_generator(batches, output_signature=signature)
    # the number of batches is known: Keras then sees where an epoch ends (no "ran out of data")
    stream = stream.apply(tf.data.experimental.assert_cardinality(-(-len(chosen) // batch_size)))
    stream.epoch_of_next_pass = passes
    return stream
