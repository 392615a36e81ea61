"""Steps: parse and check the inner steps of every outer step, from files, flags and arrays.

Numpy only (an `.h5` steps file is read through `cascade_cli.h5`, imported when
one is given). Steps are `(Ta,)` (the same for every sample) or `(N, Ta)`, every
entry a non-negative integer of at most `MAX_STEPS_PER_PAIR` (`2**31 - 1`,
checked with the data wherever steps are read), and `steps_total` sums them in
int64 with an overflow check; a problem is a `DataError` naming where the steps
came from, the position and the value. Text and JSON files may start with a
UTF-8 byte-order mark.
"""

import json
import math
import os
import re
import sys

import numpy as np

from cascade_cli.errors import DataError

STEPS_SUFFIXES = (".txt", ".csv", ".npy", ".json", ".h5", ".hdf5")

_INT_TOKEN = re.compile(r"[+-]?[0-9]+")
_FLOAT_TOKEN = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SEPARATOR = re.compile(r"\s*,\s*|\s+")
_INT64_MAX = np.iinfo(np.int64).max

# The most inner steps one (n, t) pair may ask for, checked wherever steps are
# read: sums over any real number of pairs then stay far inside int64.
MAX_STEPS_PER_PAIR = 2**31 - 1
_OVER_CAP = f"expected at most 2**31 - 1 = {MAX_STEPS_PER_PAIR} inner steps per pair"


def _shown(text: str) -> str:
    """A value for a message: quoted, and cut to 40 digits when longer."""
    if len(text) <= 40:
        return repr(text)
    digits = sum(char.isdigit() for char in text)
    return f"'{text[:40]}...' ({digits} digits)"


def _steps_value(value, *, where: str) -> int:
    """One step count from a parsed JSON value, or `DataError` naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: expected a non-negative integer, received {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise DataError(f"{where}: expected a non-negative integer, received {value!r}")
        value = int(value)
    if value < 0:
        raise DataError(f"{where}: expected a non-negative integer, received {value}")
    if value > MAX_STEPS_PER_PAIR:
        shown = str(value) if value.bit_length() < 128 else _shown(str(value))
        raise DataError(f"{where}: {_OVER_CAP}, received {shown}")
    return value


def _token_value(token: str, *, where: str) -> int:
    """One step count from a text token, or `DataError` naming `where` and the token."""
    value = None
    if _INT_TOKEN.fullmatch(token):
        if len(token.lstrip("+-").lstrip("0")) > 19 and not token.startswith("-"):
            raise DataError(f"{where}: {_OVER_CAP}, received {_shown(token)}")
        value = int(token)
    elif _FLOAT_TOKEN.fullmatch(token):
        number = float(token)
        value = int(number) if number.is_integer() else None
    if value is None or value < 0:
        raise DataError(f"{where}: expected a non-negative integer, received {_shown(token)}")
    if value > MAX_STEPS_PER_PAIR:
        raise DataError(f"{where}: {_OVER_CAP}, received {_shown(token)}")
    return value


def _split_tokens(line: str) -> list[str]:
    stripped = line.strip()
    return _SEPARATOR.split(stripped) if stripped else []


def steps_from_array(array: np.ndarray, *, source: str) -> np.ndarray:
    """Checks a numeric steps array (`(Ta,)` or `(N, Ta)`) and returns it as int64."""
    array = np.asarray(array)
    if array.ndim not in (1, 2):
        raise DataError(
            f"steps from {source} have shape {tuple(array.shape)}: expected (Ta,) or (N, Ta)"
        )
    if array.dtype.kind not in "iuf":
        raise DataError(f"steps from {source} have dtype {array.dtype}: expected integers")
    if array.dtype.kind == "f":
        negative = ~np.isfinite(array) | (array != np.round(array)) | (array < 0)
    elif array.dtype.kind == "u":
        negative = np.zeros(array.shape, dtype=bool)
    else:
        negative = array < 0
    with np.errstate(invalid="ignore"):
        above = ~negative & (array > MAX_STEPS_PER_PAIR)
    for bad, expected in ((negative, "expected a non-negative integer"), (above, _OVER_CAP)):
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            shown = index[0] if len(index) == 1 else index
            raise DataError(
                f"steps from {source} at index {shown}: {expected}, received {array[index].item()!r}"
            )
    return array.astype(np.int64)


def steps_total(steps, *, source: str, axis=None):
    """Sums checked steps in int64, refusing a total that does not fit.

    Args:
        steps: `(Ta,)` or `(N, Ta)` non-negative integers.
        source: where the steps came from, for messages.
        axis: None for one total, or the axis to sum over (1: per sample).

    Returns:
        A Python `int` (axis None) or an `int64` array.

    Raises:
        DataError: a total is above `2**63 - 1` (the sum would wrap).
    """
    array = np.asarray(steps, dtype=np.int64)
    top = int(array.max(initial=0))
    count = array.size if axis is None else (array.shape[axis] if array.ndim else 1)
    if top * count <= _INT64_MAX:
        total = array.sum(axis=axis, dtype=np.int64)
        return int(total) if axis is None else total
    exact = np.sum(array.astype(object), axis=axis)  # Python integers: no wrap
    flat = [exact] if axis is None else list(np.ravel(exact))
    for position, value in enumerate(flat):
        if value > _INT64_MAX:
            where = f"steps from {source}" + ("" if axis is None else f" sample {position}")
            raise DataError(f"{where} add up to {value} inner steps: expected at most 2**63 - 1")
    return int(exact) if axis is None else np.asarray(exact, dtype=np.int64)


def _read_steps_text(path) -> np.ndarray:
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8-sig") as handle:  # a byte-order mark is fine
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"steps file '{name}' is not a readable text file: {exc}") from exc
    rows, numbers = [], []
    for number, line in enumerate(lines, start=1):
        tokens = _split_tokens(line.split("#", 1)[0])
        if not tokens:
            continue
        rows.append(
            [
                _token_value(token, where=f"steps file '{name}' line {number}, value {position}")
                for position, token in enumerate(tokens, start=1)
            ]
        )
        numbers.append(number)
    if not rows:
        raise DataError(
            f"steps file '{name}' has no steps: expected one line of integers "
            "(the same for every sample) or one line per sample"
        )
    for row, number in zip(rows[1:], numbers[1:]):
        if len(row) != len(rows[0]):
            raise DataError(
                f"steps file '{name}' line {number} has {len(row)} values: expected "
                f"{len(rows[0])} like line {numbers[0]}"
            )
    if len(rows) == 1:
        return np.array(rows[0], dtype=np.int64)
    return np.array(rows, dtype=np.int64)


def _read_steps_json(path) -> np.ndarray:
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8-sig") as handle:  # a byte-order mark is fine
            value = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"steps file '{name}' line {exc.lineno}, column {exc.colno}: "
            f"expected JSON, {exc.msg}"
        ) from exc
    except RecursionError:
        raise DataError(
            f"steps file '{name}': expected a list of integers or a list of lists of "
            "integers, received lists nested too deeply to read"
        ) from None
    except ValueError as exc:  # an integer past Python's int-string conversion limit
        raise DataError(
            f"steps file '{name}': expected JSON numbers Python can read, received a number "
            f"of more than {sys.get_int_max_str_digits()} digits ({exc})"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"steps file '{name}' is not a readable text file: {exc}") from exc
    expected = "a list of integers or a list of lists of integers"
    if not isinstance(value, list):
        raise DataError(
            f"steps file '{name}': expected {expected}, received {type(value).__name__}"
        )
    nested = bool(value) and isinstance(value[0], list)
    for p, item in enumerate(value):
        if isinstance(item, list) != nested:
            raise DataError(
                f"steps file '{name}' position {p}: expected {expected}, received a "
                "mix of numbers and lists"
            )
    if nested:
        rows = []
        for r, row in enumerate(value):
            if len(row) != len(value[0]):
                raise DataError(
                    f"steps file '{name}' row {r} has {len(row)} values: expected "
                    f"{len(value[0])} like row 0"
                )
            rows.append(
                [
                    _steps_value(item, where=f"steps file '{name}' row {r}, position {p}")
                    for p, item in enumerate(row)
                ]
            )
        return np.array(rows, dtype=np.int64).reshape(len(rows), len(value[0]))
    values = [
        _steps_value(item, where=f"steps file '{name}' position {p}")
        for p, item in enumerate(value)
    ]
    return np.array(values, dtype=np.int64)


def read_steps(path, *, key: str = "steps") -> np.ndarray:
    """Reads a steps file.

    Formats: `.txt`/`.csv` (integers split by commas and/or white space; blank
    lines and `#` comments ignored; one line gives `(Ta,)`, several lines
    `(N, Ta)`), `.npy`, `.json` (a list or a list of lists) and `.h5`/`.hdf5`
    (dataset `key`). Integer-valued floats such as `2.0` are accepted.

    Args:
        path: the file.
        key: dataset name in an HDF5 file.

    Returns:
        `(Ta,)` or `(N, Ta)` `int64`, every entry >= 0.

    Raises:
        DataError: naming file, line or position and value, for an unknown
            suffix, a negative, fractional or non-numeric value, or rows of
            different lengths.
    """
    name = os.fspath(path)
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in STEPS_SUFFIXES:
        raise DataError(
            f"steps file '{name}' has suffix '{suffix}': expected one of "
            f"{', '.join(STEPS_SUFFIXES)}"
        )
    from cascade_cli import h5  # h5py only when a steps file is read

    h5.check_file(path, expected="a steps file")
    if suffix in (".txt", ".csv"):
        return _read_steps_text(path)
    if suffix == ".json":
        return _read_steps_json(path)
    if suffix == ".npy":
        array = h5.np_load(path, expected="a .npy array")
        if not isinstance(array, np.ndarray):
            array.close()
            raise DataError(f"'{name}' is a .npz archive: expected a .npy array")
        return steps_from_array(array, source=f"'{name}'")
    with h5.open_h5(path) as f:
        dset = h5.h5_dataset(f, key, path=path)
        return steps_from_array(h5.read_dataset(dset, (), path=path), source=f"'{name}' (key '{key}')")


def parse_steps(text: str, *, flag: str = "steps") -> np.ndarray:
    """Parses steps given as text, e.g. `"3,4,2"`.

    Args:
        text: integers split by commas and/or white space.
        flag: the name the text was given under, for messages (the command
            line passes its option, `--steps`).

    Returns:
        `(Ta,)` `int64`.

    Raises:
        DataError: naming the flag, for an empty list or a bad value.
    """
    tokens = _split_tokens(text)
    if not tokens:
        raise DataError(
            f"{flag}: expected comma-separated non-negative integers, received {text!r}"
        )
    return np.array(
        [_token_value(token, where=f"{flag} value {p}") for p, token in enumerate(tokens, start=1)],
        dtype=np.int64,
    )


def shape_text(shape) -> str:
    return str(tuple(int(n) for n in shape))


def check_steps(steps, *, n_samples=None, outer_steps=None, max_steps=None, source: str = "the call"):
    """Checks steps of the form `(Ta,)` or `(N, Ta)` without broadcasting them.

    Args:
        steps: array-like (or an eager tensor) of non-negative integers.
        n_samples: `N`, or None when not known.
        outer_steps: `Ta`, or None when not known.
        max_steps: the largest value allowed, or None.
        source: where the steps came from, e.g. `"'steps.txt'"` or `"--steps"`.

    Returns:
        `(Ta,)` or `(N, Ta)` `int64`.

    Raises:
        DataError: the shape fits neither form, a value is not a non-negative
            integer, or a value is above `max_steps`.
    """
    if isinstance(steps, (str, bytes, dict, set)):
        raise DataError(f"steps from {source}: expected integers of shape (Ta,) or (N, Ta), received a "
                        f"{type(steps).__name__} ({str(steps)[:40]!r})")
    try:
        array = np.asarray(steps.numpy() if hasattr(steps, "numpy") else steps)
    except (ValueError, TypeError) as error:  # rows of different lengths: numpy's "inhomogeneous shape"
        lengths = sorted({len(row) for row in steps if hasattr(row, "__len__")}) if hasattr(steps, "__iter__") else []
        raise DataError(f"steps from {source} are ragged (rows of lengths {lengths}): expected one row (Ta,) for "
                        "every sample or one row per sample (N, Ta), all of the same length") from error
    ta = outer_steps if outer_steps is not None else (array.shape[-1] if array.ndim else None)
    n = n_samples if n_samples is not None else (array.shape[0] if array.ndim == 2 else None)
    if array.ndim not in (1, 2) or array.shape not in ((ta,), (n, ta)):
        wanted = "(Ta,) or (N, Ta)"
        if outer_steps is not None:
            wanted = f"(Ta,)=({ta},) or (N, Ta)=({n if n is not None else 'N'}, {ta})"
        raise DataError(f"steps from {source} have shape {shape_text(array.shape)}, expected {wanted}")
    array = steps_from_array(array, source=source)
    if max_steps is not None and array.size and array.max() > max_steps:
        index = tuple(int(i) for i in np.argwhere(array > max_steps)[0])
        raise DataError(
            f"steps from {source} at index {index[0] if len(index) == 1 else index}: expected at most "
            f"max_steps={max_steps}, received {array[index].item()}"
        )
    return array


def broadcast_steps(steps, *, n_samples: int, outer_steps: int, source: str) -> np.ndarray:
    """Gives every sample its row of steps.

    Args:
        steps: `(Ta,)` (shared by all samples) or `(N, Ta)`.
        n_samples: `N`.
        outer_steps: `Ta`.
        source: where the steps came from, e.g. `"'steps.txt'"` or `"--steps"`.

    Returns:
        `(N, Ta)` `int64`, a new array.

    Raises:
        DataError: the shape fits neither form, or a value is not a
            non-negative integer.
    """
    array = check_steps(steps, n_samples=n_samples, outer_steps=outer_steps, source=source)
    if array.ndim == 1:
        return np.tile(array, (n_samples, 1)).reshape(n_samples, outer_steps)
    return array.copy()
