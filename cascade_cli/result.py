"""`CascadeResult`: the ragged `(N, Ta, None, O)` result of a cascade, in numpy.

A result is two arrays: `values (total, O)`, every emitted inner step in value
order (sample, then outer step, then inner step), and `lengths (N, Ta)`, how
many inner steps each outer step emitted; a run with a token sampler
(`greedy`, `categorical`) adds a third, `tokens (total,)`, the sampled id of
every value row. Row splits and padded views are derived from them. Only numpy is imported here; TensorFlow is imported lazily
by the two methods that convert to and from `tf.RaggedTensor`.
"""

import numpy as np

from cascade_cli.errors import DataError

TOKEN_PAD = -1
"""What padded tokens hold past each sequence's length: no token id (ids are >= 0)."""


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


def _check_tokens(tokens, *, ndim=1, layout="`(total,)`"):
    """Returns `tokens` as an array after checking its rank and integer dtype, its entries unread.

    Padded tokens hold `TOKEN_PAD` past the lengths, and a reader checks
    broadcast stand-ins for arrays on disk, so neither is converted or read here.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != ndim:
        raise ArrayError(
            "tokens", f"expected a {ndim}-D array {layout}, received shape {tokens.shape}"
        )
    if tokens.dtype.kind not in "iu":
        raise ArrayError("tokens", f"expected integer token ids, received dtype {tokens.dtype}")
    return tokens


def _as_tokens(tokens):
    """Returns flat `tokens` as int64 non-negative ids, or raises `DataError`."""
    tokens = _check_tokens(tokens).astype(np.int64, copy=False)  # a uint64 past int64 turns negative: refused
    if tokens.size and tokens.min() < 0:
        raise ArrayError("tokens", f"expected non-negative token ids, received {int(tokens.min())}")
    return tokens


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
    and `lengths (N, Ta)`, with `total == lengths.sum()`, and optionally
    `tokens (total,)`, the id a token sampler drew for each value row.

    Args:
        values: float array `(total, O)`.
        lengths: non-negative integer array `(N, Ta)`; stored as int64.
        tokens: `None` (the default: a result without tokens), or a
            non-negative integer array `(total,)` in value order; stored as
            int64. Everything that builds or slices results keeps them;
            `from_tensor` and `to_tensor` carry the values only.

    Raises:
        DataError: when the shapes, dtypes or the total do not fit together.
    """

    def __init__(self, values, lengths, tokens=None):
        values = _as_values(values)
        lengths = _as_lengths(lengths)
        total = int(lengths.sum())
        if values.shape[0] != total:
            raise ArrayError(
                "values", f"expected {total} rows (the sum of lengths), "
                f"received {values.shape[0]}"
            )
        if tokens is not None:
            self.check_tokens(tokens, total)
            tokens = _as_tokens(tokens)
        self.values = values
        self.lengths = lengths
        self.tokens = tokens

    @staticmethod
    def check_tokens(tokens, total):
        """Checks that flat `tokens` fit a result of `total` value rows, without reading them.

        Only the shape and dtype are looked at (the constructor also checks
        that every id is non-negative), so a broadcast view standing in for
        tokens on disk is enough.

        Args:
            tokens: integer `(total,)`.
            total: the rows of the values, `lengths.sum()`.

        Raises:
            ArrayError: when the rank, dtype or length is wrong.
        """
        tokens = _check_tokens(tokens)
        if tokens.shape[0] != total:
            raise ArrayError(
                "tokens", f"expected {total} entries (the sum of lengths, one per value row), "
                f"received {tokens.shape[0]}"
            )

    def __repr__(self):
        return (
            f"CascadeResult(n_samples={self.n_samples}, outer_steps={self.outer_steps}, "
            f"output_size={self.output_size}, total={self.total}, "
            f"max_length={self.max_length}, dtype={self.values.dtype}, tokens={self.has_tokens})"
        )

    @property
    def has_tokens(self):
        """Whether the result holds the sampled `tokens`."""
        return self.tokens is not None

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

    def _span(self, n, t):
        """Returns `(start, stop)`: the value rows of sample `n` at outer step `t`."""
        if not (0 <= n < self.n_samples and 0 <= t < self.outer_steps):
            raise IndexError(
                f"sequence ({n}, {t}) is out of range for a result with "
                f"{self.n_samples} samples and {self.outer_steps} outer steps"
            )
        pair = n * self.outer_steps + t
        start = int(self.lengths.ravel()[:pair].sum())
        return start, start + int(self.lengths[n, t])

    def sequence(self, n, t):
        """Returns the outputs of sample `n` at outer step `t`: `(lengths[n, t], O)`."""
        start, stop = self._span(n, t)
        return self.values[start:stop]

    def token_sequence(self, n, t):
        """Returns the sampled ids of sample `n` at outer step `t`: int64 `(lengths[n, t],)`.

        Raises:
            DataError: when the result has no tokens.
        """
        self._require_tokens()
        start, stop = self._span(n, t)
        return self.tokens[start:stop]

    def _require_tokens(self):
        if self.tokens is None:
            raise DataError(
                "tokens: this result has none (only a run with a token sampler, greedy or categorical, "
                "records them)"
            )

    def _padded_length(self, max_length):
        """The padded length `L`: `max_length`, at least the longest sequence; that sequence by default."""
        length = self.max_length if max_length is None else int(max_length)
        if length < self.max_length:
            raise DataError(
                f"max_length: expected at least the longest sequence, {self.max_length}, "
                f"received {length}"
            )
        return length

    def _pad(self, rows, pad_value, length, *, time_major):
        """Scatters per-row entries `rows (total, ...)` into `(N, Ta, L, ...)` (or `(Ta, L, N, ...)`)."""
        pair, inner = _pair_positions(self.lengths)
        padded = np.full((self.lengths.size, length, *rows.shape[1:]), pad_value, dtype=rows.dtype)
        padded[pair, inner] = rows
        padded = padded.reshape((self.n_samples, self.outer_steps, length, *rows.shape[1:]))
        if time_major:
            padded = np.ascontiguousarray(np.moveaxis(padded, 0, 2))
        return padded

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

        The sampled tokens are padded apart, by `padded_tokens`.

        Raises:
            DataError: when `max_length` is shorter than the longest sequence.
        """
        length = self._padded_length(max_length)
        values = self._pad(np.asarray(self.values), pad_value, length, time_major=time_major)
        mask = self._pad(np.ones(self.total, bool), False, length, time_major=time_major)
        return values, self.lengths.copy(), mask

    def padded_tokens(self, pad=TOKEN_PAD, *, time_major=False, max_length=None):
        """Pads the sampled ids like `to_padded` pads the values.

        Args:
            pad: id written past each sequence's length; `TOKEN_PAD` (-1) by default.
            time_major: return `(Ta, L, N)` instead of `(N, Ta, L)`.
            max_length: padded length `L`; defaults to `max_length`.

        Returns:
            int64 `(N, Ta, L)` (or `(Ta, L, N)`), true ids where `to_padded`'s mask is true.

        Raises:
            DataError: when the result has no tokens, or `max_length` is
                shorter than the longest sequence.
        """
        self._require_tokens()
        length = self._padded_length(max_length)
        return self._pad(self.tokens, int(pad), length, time_major=time_major)

    @staticmethod
    def check_padded(values, lengths, *, tokens=None, time_major=False):
        """Checks that padded `values` (and `tokens`) and `lengths` fit together, without reading the values.

        Only the shape and dtype of `values` and `tokens` are looked at, so
        broadcast views standing in for arrays on disk are enough.

        Args:
            values: float `(N, Ta, L, O)`, or `(Ta, L, N, O)` when `time_major`.
            lengths: integer `(N, Ta)`, each entry at most `L`.
            tokens: `None`, or integer `(N, Ta, L)` (`(Ta, L, N)` when `time_major`).
            time_major: whether `values` (and `tokens`) are time major.

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
        if tokens is not None:
            token_layout = "`(Ta, L, N)`" if time_major else "`(N, Ta, L)`"
            tokens = _check_tokens(tokens, ndim=3, layout=token_layout)
            if tokens.shape != values.shape[:3]:
                raise ArrayError(
                    "tokens", f"expected shape {values.shape[:3]} {token_layout} to match values "
                    f"{layout} of shape {values.shape}, received {tokens.shape}"
                )
        return lengths

    @classmethod
    def from_padded(cls, values, lengths, *, tokens=None, time_major=False):
        """Builds a result from padded values (and tokens); entries past `lengths` are ignored.

        Args:
            values: float `(N, Ta, L, O)`, or `(Ta, L, N, O)` when `time_major`.
            lengths: integer `(N, Ta)`, each entry at most `L`.
            tokens: `None`, or integer `(N, Ta, L)` (`(Ta, L, N)` when
                `time_major`), non-negative below `lengths`.
            time_major: whether `values` (and `tokens`) are time major.

        Raises:
            DataError: when the shapes do not fit together, or a token below
                `lengths` is negative.
        """
        lengths = cls.check_padded(values, lengths, tokens=tokens, time_major=time_major)
        n_outer = lengths.shape[1]
        pair, inner = _pair_positions(lengths)
        sample, outer = np.divmod(pair, max(n_outer, 1))
        where = (outer, inner, sample) if time_major else (sample, outer, inner)
        flat_tokens = None if tokens is None else np.asarray(tokens)[where]
        return cls(np.asarray(values)[where], lengths, flat_tokens)

    @classmethod
    def from_row_splits(cls, flat_values, row_splits_0, row_splits_1, *, outer_steps=None, tokens=None):
        """Builds a result from the nested row splits of a `(N, Ta, None, O)` ragged array.

        Args:
            flat_values: float `(total, O)`.
            row_splits_0: integer `(N + 1,)`, uniform steps of `Ta` from 0.
            row_splits_1: integer `(N * Ta + 1,)`, non-decreasing from 0 to `total`.
            outer_steps: `Ta`, needed only when `N == 0` (the splits cannot
                tell it); checked against the splits otherwise.
            tokens: `None`, or the sampled ids, integer `(total,)`.

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
        return cls(flat_values, lengths, tokens)

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
        """Joins results along the sample axis; all must share `Ta` and `O`, and all or none hold tokens.

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
            if result.has_tokens != first.has_tokens:
                raise DataError(
                    f"result {index}: expected {'tokens' if first.has_tokens else 'no tokens'} like result 0, "
                    f"received {'tokens' if result.has_tokens else 'none'}"
                )
        values = np.concatenate([result.values for result in results], axis=0)
        lengths = np.concatenate([result.lengths for result in results], axis=0)
        tokens = np.concatenate([result.tokens for result in results]) if first.has_tokens else None
        return cls(values, lengths, tokens)

    def slice_samples(self, start, stop):
        """Returns samples `start:stop` (Python slice rules) as a new result."""
        start, stop, _ = slice(start, stop).indices(self.n_samples)
        stop = max(start, stop)
        splits = self.row_splits_1
        first = int(splits[start * self.outer_steps])
        last = int(splits[stop * self.outer_steps])
        tokens = None if self.tokens is None else self.tokens[first:last]
        return CascadeResult(self.values[first:last], self.lengths[start:stop], tokens)
