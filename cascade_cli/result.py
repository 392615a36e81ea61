"""`CascadeResult`: the ragged `(N, Ta, None, O)` result of a cascade, in numpy.

A result is two arrays: `values (total, O)`, every emitted inner step in value
order (sample, then outer step, then inner step), and `lengths (N, Ta)`, how
many inner steps each outer step emitted. Row splits and padded views are
derived from them. Only numpy is imported here; TensorFlow is imported lazily
by the two methods that convert to and from `tf.RaggedTensor`.
"""

import numpy as np

from cascade_cli.errors import DataError


class ArrayError(DataError):
    """One array of a result is malformed or does not fit the others.

    The message reads `"{array}: {problem}"`, e.g. `row_splits_1: expected to
    start at 0, received 2`; a reader of a file adds the file to it from the
    attributes, without parsing the message.

    Attributes:
        array: the array's name, e.g. `"lengths"` or `"row_splits_1"`.
        problem: what is wrong, what was expected and what was received.
    """

    def __init__(self, array, problem):
        super().__init__(f"{array}: {problem}")
        self.array = array
        self.problem = problem


def _as_lengths(lengths, *, name="lengths"):
    """Returns `lengths` as a 2-D non-negative int64 array, or raises `DataError`."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 2:
        raise ArrayError(
            name, f"expected a 2-D array `(N, Ta)`, received shape {lengths.shape}"
        )
    if lengths.dtype.kind not in "iu":
        raise ArrayError(name, f"expected integers, received dtype {lengths.dtype}")
    if lengths.size and lengths.min() < 0:
        raise ArrayError(
            name, f"expected non-negative integers, received {int(lengths.min())}"
        )
    return lengths.astype(np.int64, copy=False)


def _as_values(values, *, name="values", ndim=2, layout="`(total, O)`"):
    """Returns `values` as an `ndim`-D float array, or raises `DataError`."""
    values = np.asarray(values)
    if values.ndim != ndim:
        raise ArrayError(
            name, f"expected a {ndim}-D array {layout}, received shape {values.shape}"
        )
    if values.dtype.kind != "f":
        raise ArrayError(name, f"expected floats, received dtype {values.dtype}")
    return values


def _as_splits(splits, *, name):
    """Returns `splits` as a 1-D int64 array starting at 0 and non-decreasing."""
    splits = np.asarray(splits)
    if splits.ndim != 1 or splits.shape[0] < 1:
        raise ArrayError(
            name, f"expected a 1-D array with at least one entry, "
            f"received shape {splits.shape}"
        )
    if splits.dtype.kind not in "iu":
        raise ArrayError(name, f"expected integers, received dtype {splits.dtype}")
    splits = splits.astype(np.int64, copy=False)
    if splits[0] != 0:
        raise ArrayError(name, f"expected to start at 0, received {int(splits[0])}")
    steps = np.diff(splits)
    if steps.size and steps.min() < 0:
        where = int(np.argmax(steps < 0))
        raise ArrayError(
            name, f"expected non-decreasing values, received "
            f"{int(splits[where])} then {int(splits[where + 1])} at index {where + 1}"
        )
    return splits


def _pair_positions(lengths):
    """Returns `(pair, inner)`: for every value row, its flat `(n, t)` pair index and inner step.

    Args:
        lengths: int64 `(N, Ta)`.

    Returns:
        Two int64 arrays `(total,)`.
    """
    flat_lengths = lengths.ravel()
    pair = np.repeat(np.arange(flat_lengths.size, dtype=np.int64), flat_lengths)
    starts = np.cumsum(flat_lengths) - flat_lengths
    inner = np.arange(pair.size, dtype=np.int64) - starts[pair]
    return pair, inner


class CascadeResult:
    """Ragged result of a cascade.

    Holds `values (total, O)` in value order (sample, outer step, inner step)
    and `lengths (N, Ta)`, with `total == lengths.sum()`.

    Args:
        values: float array `(total, O)`.
        lengths: non-negative integer array `(N, Ta)`; stored as int64.

    Raises:
        DataError: when the shapes, dtypes or the total do not fit together.
    """

    def __init__(self, values, lengths):
        values = _as_values(values)
        lengths = _as_lengths(lengths)
        total = int(lengths.sum())
        if values.shape[0] != total:
            raise ArrayError(
                "values", f"expected {total} rows (the sum of lengths), "
                f"received {values.shape[0]}"
            )
        self.values = values
        self.lengths = lengths

    def __repr__(self):
        return (
            f"CascadeResult(n_samples={self.n_samples}, outer_steps={self.outer_steps}, "
            f"output_size={self.output_size}, total={self.total}, "
            f"max_length={self.max_length}, dtype={self.values.dtype})"
        )

    @property
    def n_samples(self):
        """Number of samples `N`."""
        return int(self.lengths.shape[0])

    @property
    def outer_steps(self):
        """Number of outer steps `Ta`."""
        return int(self.lengths.shape[1])

    @property
    def output_size(self):
        """Size `O` of one emitted output vector."""
        return int(self.values.shape[1])

    @property
    def total(self):
        """Number of emitted inner steps over all samples and outer steps."""
        return int(self.values.shape[0])

    @property
    def max_length(self):
        """Longest inner sequence; 0 when nothing was emitted."""
        return int(self.lengths.max()) if self.lengths.size else 0

    @property
    def row_splits_0(self):
        """Row splits of the outer axis: int64 `(N + 1,)`, `arange(N + 1) * Ta`."""
        return np.arange(self.n_samples + 1, dtype=np.int64) * self.outer_steps

    @property
    def row_splits_1(self):
        """Row splits of the inner axis: int64 `(N * Ta + 1,)`, `[0, cumsum(lengths)]`."""
        splits = np.zeros(self.lengths.size + 1, dtype=np.int64)
        np.cumsum(self.lengths.ravel(), out=splits[1:])
        return splits

    def sequence(self, n, t):
        """Returns the outputs of sample `n` at outer step `t`: `(lengths[n, t], O)`."""
        if not (0 <= n < self.n_samples and 0 <= t < self.outer_steps):
            raise IndexError(
                f"sequence ({n}, {t}) is out of range for a result with "
                f"{self.n_samples} samples and {self.outer_steps} outer steps"
            )
        pair = n * self.outer_steps + t
        start = int(self.lengths.ravel()[:pair].sum())
        return self.values[start : start + int(self.lengths[n, t])]

    def to_padded(self, pad_value=0.0, *, time_major=False, max_length=None):
        """Pads every inner sequence to one length.

        Args:
            pad_value: value written past each sequence's length.
            time_major: return `(Ta, L, N, O)` values and a `(Ta, L, N)` mask
                (the layout of the nested-loop answer) instead of batch major.
            max_length: padded length `L`; defaults to `max_length`.

        Returns:
            `(values, lengths, mask)`: `values (N, Ta, L, O)` filled with
            `pad_value`, `lengths (N, Ta)` (always batch major) and a bool
            `mask (N, Ta, L)`, true where a value was emitted.

        Raises:
            DataError: when `max_length` is shorter than the longest sequence.
        """
        length = self.max_length if max_length is None else int(max_length)
        if length < self.max_length:
            raise DataError(
                f"max_length: expected at least the longest sequence, {self.max_length}, "
                f"received {length}"
            )
        n_pairs = self.lengths.size
        pair, inner = _pair_positions(self.lengths)
        values = np.full(
            (n_pairs, length, self.output_size), pad_value, dtype=self.values.dtype
        )
        values[pair, inner] = self.values
        mask = np.zeros((n_pairs, length), dtype=bool)
        mask[pair, inner] = True
        shape = (self.n_samples, self.outer_steps, length)
        values = values.reshape(shape + (self.output_size,))
        mask = mask.reshape(shape)
        if time_major:
            values = np.ascontiguousarray(values.transpose(1, 2, 0, 3))
            mask = np.ascontiguousarray(mask.transpose(1, 2, 0))
        return values, self.lengths.copy(), mask

    @staticmethod
    def check_padded(values, lengths, *, time_major=False):
        """Checks that padded `values` and `lengths` fit together, without reading the values.

        Only the shape and dtype of `values` are looked at, so a broadcast
        view standing in for values on disk is enough.

        Args:
            values: float `(N, Ta, L, O)`, or `(Ta, L, N, O)` when `time_major`.
            lengths: integer `(N, Ta)`, each entry at most `L`.
            time_major: whether `values` is time major.

        Returns:
            `lengths` as int64.

        Raises:
            ArrayError: when the shapes or dtypes do not fit together.
        """
        layout = "`(Ta, L, N, O)`" if time_major else "`(N, Ta, L, O)`"
        values = _as_values(values, ndim=4, layout=layout)
        lengths = _as_lengths(lengths)
        if time_major:
            n_outer, length, n_samples, _ = values.shape
        else:
            n_samples, n_outer, length, _ = values.shape
        if lengths.shape != (n_samples, n_outer):
            raise ArrayError(
                "lengths", f"expected shape {(n_samples, n_outer)} to match values "
                f"{layout} of shape {values.shape}, received {lengths.shape}"
            )
        if lengths.size and lengths.max() > length:
            raise ArrayError(
                "lengths", f"expected at most the padded length {length}, "
                f"received {int(lengths.max())}"
            )
        return lengths

    @classmethod
    def from_padded(cls, values, lengths, *, time_major=False):
        """Builds a result from padded values; entries past `lengths` are ignored.

        Args:
            values: float `(N, Ta, L, O)`, or `(Ta, L, N, O)` when `time_major`.
            lengths: integer `(N, Ta)`, each entry at most `L`.
            time_major: whether `values` is time major.

        Raises:
            DataError: when the shapes do not fit together.
        """
        lengths = cls.check_padded(values, lengths, time_major=time_major)
        values = np.asarray(values)
        n_outer = lengths.shape[1]
        pair, inner = _pair_positions(lengths)
        sample, outer = np.divmod(pair, max(n_outer, 1))
        if time_major:
            flat_values = values[outer, inner, sample]
        else:
            flat_values = values[sample, outer, inner]
        return cls(flat_values, lengths)

    @classmethod
    def from_row_splits(cls, flat_values, row_splits_0, row_splits_1, *, outer_steps=None):
        """Builds a result from the nested row splits of a `(N, Ta, None, O)` ragged array.

        Args:
            flat_values: float `(total, O)`.
            row_splits_0: integer `(N + 1,)`, uniform steps of `Ta` from 0.
            row_splits_1: integer `(N * Ta + 1,)`, non-decreasing from 0 to `total`.
            outer_steps: `Ta`, needed only when `N == 0` (the splits cannot
                tell it); checked against the splits otherwise.

        Raises:
            DataError: naming the split that is inconsistent.
        """
        flat_values = _as_values(flat_values, name="flat_values")
        row_splits_0 = _as_splits(row_splits_0, name="row_splits_0")
        row_splits_1 = _as_splits(row_splits_1, name="row_splits_1")
        n_samples = row_splits_0.shape[0] - 1
        if n_samples:
            n_outer = int(row_splits_0[1])
            if np.any(np.diff(row_splits_0) != n_outer):
                raise ArrayError(
                    "row_splits_0", f"expected uniform steps of {n_outer} "
                    f"(every sample has the same number of outer steps), "
                    f"received {row_splits_0.tolist()[:8]}"
                )
            if outer_steps is not None and int(outer_steps) != n_outer:
                raise ArrayError(
                    "row_splits_0", f"expected steps of {int(outer_steps)} outer steps, "
                    f"received {n_outer}"
                )
        else:
            n_outer = 0 if outer_steps is None else int(outer_steps)
        n_pairs = n_samples * n_outer
        if row_splits_1.shape[0] != n_pairs + 1:
            raise ArrayError(
                "row_splits_1", f"expected {n_pairs + 1} entries (N * Ta + 1 with "
                f"N={n_samples}, Ta={n_outer}), received {row_splits_1.shape[0]}"
            )
        if int(row_splits_1[-1]) != flat_values.shape[0]:
            raise ArrayError(
                "row_splits_1", f"expected to end at {flat_values.shape[0]} "
                f"(the rows of flat_values), received {int(row_splits_1[-1])}"
            )
        lengths = np.diff(row_splits_1).reshape(n_samples, n_outer)
        return cls(flat_values, lengths)

    @classmethod
    def from_tensor(cls, ragged):
        """Builds a result from a `tf.RaggedTensor` `(N, Ta, None, O)`.

        Raises:
            DataError: when `ragged` is not a ragged tensor of that shape.
        """
        import tensorflow as tf

        if not isinstance(ragged, tf.RaggedTensor):
            raise DataError(
                f"expected a tf.RaggedTensor `(N, Ta, None, O)`, received {type(ragged).__name__}"
            )
        if ragged.ragged_rank != 2 or ragged.flat_values.shape.rank != 2:
            raise DataError(
                "expected a tf.RaggedTensor `(N, Ta, None, O)` with ragged_rank 2, "
                f"received shape {ragged.shape} with ragged_rank {ragged.ragged_rank}"
            )
        row_splits_0, row_splits_1 = (s.numpy() for s in ragged.nested_row_splits)
        outer_steps = ragged.shape[1]
        return cls.from_row_splits(
            ragged.flat_values.numpy(), row_splits_0, row_splits_1, outer_steps=outer_steps
        )

    def to_tensor(self):
        """Returns the result as a `tf.RaggedTensor` `(N, Ta, None, O)`."""
        import tensorflow as tf

        return tf.RaggedTensor.from_nested_row_splits(
            self.values, [self.row_splits_0, self.row_splits_1]
        )

    @classmethod
    def concatenate(cls, results):
        """Joins results along the sample axis; all must share `Ta` and `O`.

        Raises:
            DataError: when `results` is empty or the results do not fit together.
        """
        results = list(results)
        if not results:
            raise DataError("expected at least one result to concatenate, received none")
        first = results[0]
        for index, result in enumerate(results[1:], start=1):
            if (result.outer_steps, result.output_size) != (first.outer_steps, first.output_size):
                raise DataError(
                    f"result {index}: expected {first.outer_steps} outer steps and "
                    f"output size {first.output_size} like result 0, received "
                    f"{result.outer_steps} and {result.output_size}"
                )
        values = np.concatenate([result.values for result in results], axis=0)
        lengths = np.concatenate([result.lengths for result in results], axis=0)
        return cls(values, lengths)

    def slice_samples(self, start, stop):
        """Returns samples `start:stop` (Python slice rules) as a new result."""
        start, stop, _ = slice(start, stop).indices(self.n_samples)
        stop = max(start, stop)
        splits = self.row_splits_1
        first = int(splits[start * self.outer_steps])
        last = int(splits[stop * self.outer_steps])
        return CascadeResult(self.values[first:last], self.lengths[start:stop])
