"""Tests for `cascade_cli.steps`: steps files, flags and arrays."""

import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_cli.errors import DataError
from cascade_cli.steps import broadcast_steps, parse_steps, read_steps, steps_from_array, steps_total
from filetools import quoted, write_h5, write_text


def test_steps_txt_one_line_is_shared(tmp_path):
    path = write_text(tmp_path / "s.txt", "3, 4 2\n")
    steps = read_steps(path)
    assert steps.dtype == np.int64
    np.testing.assert_array_equal(steps, [3, 4, 2])
    assert steps.shape == (3,)


def test_steps_txt_lines_per_sample_with_comments_and_blank_lines(tmp_path):
    text = "# steps per sample\n\n1,2 ,3\n  0\t0,0   # all empty\n\n5 6 7\n"
    steps = read_steps(write_text(tmp_path / "s.txt", text))
    np.testing.assert_array_equal(steps, [[1, 2, 3], [0, 0, 0], [5, 6, 7]])
    assert steps.shape == (3, 3)


def test_steps_csv_and_integer_valued_floats(tmp_path):
    steps = read_steps(write_text(tmp_path / "s.csv", "2.0,1\n0,3e0\n"))
    np.testing.assert_array_equal(steps, [[2, 1], [0, 3]])


def test_steps_npy_one_and_two_dimensions(tmp_path):
    np.save(tmp_path / "a.npy", np.array([4, 0, 1], dtype=np.int32))
    np.save(tmp_path / "b.npy", np.array([[1.0, 2.0], [0.0, 5.0]]))
    np.testing.assert_array_equal(read_steps(tmp_path / "a.npy"), [4, 0, 1])
    b = read_steps(tmp_path / "b.npy")
    assert b.dtype == np.int64
    np.testing.assert_array_equal(b, [[1, 2], [0, 5]])


def test_steps_json_list_and_list_of_lists(tmp_path):
    np.testing.assert_array_equal(read_steps(write_text(tmp_path / "a.json", "[3, 0, 2.0]")), [3, 0, 2])
    steps = read_steps(write_text(tmp_path / "b.json", "[[1, 2], [3, 4], [0, 0]]"))
    np.testing.assert_array_equal(steps, [[1, 2], [3, 4], [0, 0]])


def test_steps_json_empty_cases(tmp_path):
    assert read_steps(write_text(tmp_path / "a.json", "[]")).shape == (0,)
    assert read_steps(write_text(tmp_path / "b.json", "[[], []]")).shape == (2, 0)


def test_steps_h5_default_and_custom_key(tmp_path):
    path = write_h5(tmp_path / "s.h5", steps=np.array([[1, 2], [3, 0]]), other=np.array([7, 8, 9], dtype=np.uint8))
    np.testing.assert_array_equal(read_steps(path), [[1, 2], [3, 0]])
    np.testing.assert_array_equal(read_steps(path, key="other"), [7, 8, 9])


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        ("neg.txt", "1 2 3\n4 5 -1\n", "line 2, value 3: expected a non-negative integer, received '-1'"),
        ("frac.txt", "1.5,2\n", "line 1, value 1: expected a non-negative integer, received '1.5'"),
        ("text.csv", "1,x,2\n", "line 1, value 2: expected a non-negative integer, received 'x'"),
        ("empty_field.csv", "1,,2\n", "line 1, value 2: expected a non-negative integer, received ''"),
        ("inf.txt", "1e999\n", "received '1e999'"),
        ("ragged.txt", "1 2 3\n# note\n4 5\n", "line 3 has 2 values: expected 3 like line 1"),
        ("empty.txt", "# nothing\n\n", "has no steps"),
        ("neg.json", "[1, -2]", "position 1: expected a non-negative integer, received -2"),
        ("frac.json", "[[1, 2], [0.5, 1]]", "row 1, position 0: expected a non-negative integer, received 0.5"),
        ("bool.json", "[1, true]", "position 1: expected a non-negative integer, received True"),
        ("str.json", '["3"]', "position 0: expected a non-negative integer, received '3'"),
        ("ragged.json", "[[1, 2], [3]]", "row 1 has 1 values: expected 2 like row 0"),
        ("mixed.json", "[[1, 2], 3]", "position 1: expected a list of integers"),
        ("dict.json", '{"steps": [1]}', "expected a list of integers or a list of lists of integers, received dict"),
        ("bad.json", "[1, 2", "line 1, column 6: expected JSON"),
    ],
)
def test_steps_file_errors_name_file_position_and_value(tmp_path, name, text, words):
    path = write_text(tmp_path / name, text)
    with pytest.raises(DataError) as info:
        read_steps(path)
    message = str(info.value)
    assert f"'{path}'" in message
    assert words in message


def test_steps_npy_and_h5_errors_name_index_and_value(tmp_path):
    np.save(tmp_path / "neg.npy", np.array([[1, 2], [3, -4]]))
    with pytest.raises(DataError, match=r"at index \(1, 1\): expected a non-negative integer, received -4"):
        read_steps(tmp_path / "neg.npy")
    np.save(tmp_path / "frac.npy", np.array([1.0, 2.5]))
    with pytest.raises(DataError, match=r"at index 1: expected a non-negative integer, received 2.5"):
        read_steps(tmp_path / "frac.npy")
    np.save(tmp_path / "bool.npy", np.array([True, False]))
    with pytest.raises(DataError, match="dtype bool: expected integers"):
        read_steps(tmp_path / "bool.npy")
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), dtype=np.int64))
    with pytest.raises(DataError, match=r"shape \(2, 2, 2\): expected \(Ta,\) or \(N, Ta\)"):
        read_steps(tmp_path / "cube.npy")
    path = write_h5(tmp_path / "s.h5", steps=np.array([1, -1]))
    with pytest.raises(DataError, match=r"'.*s\.h5' \(key 'steps'\) at index 1: .* received -1"):
        read_steps(path)
    with pytest.raises(DataError, match=r"has no dataset 'nope': expected a dataset 'nope', received keys \['steps'\]"):
        read_steps(path, key="nope")


def test_steps_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"suffix '\.yaml': expected one of \.txt, \.csv, \.npy, \.json, \.h5"):
        read_steps(write_text(tmp_path / "s.yaml", "[1]"))
    with pytest.raises(DataError, match=r"'.*missing\.txt' does not exist"):
        read_steps(tmp_path / "missing.txt")


def test_steps_npy_object_array_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="Python objects"):
        read_steps(tmp_path / "o.npy")


def _write_steps(directory, array, fmt, separator):
    if fmt == "json":
        path = os.path.join(directory, "s.json")
        with open(path, "w") as handle:
            json.dump(array.tolist(), handle)
        return path
    rows = array.reshape(1, -1) if array.ndim == 1 else array
    path = os.path.join(directory, f"s.{fmt}")
    with open(path, "w") as handle:
        handle.write("\n".join(separator.join(str(v) for v in row) for row in rows) + "\n")
    return path


@settings(max_examples=60, deadline=None)
@given(
    shape=st.one_of(
        st.tuples(st.integers(1, 6)),
        st.tuples(st.integers(1, 5), st.integers(1, 6)),
    ),
    values=st.lists(st.one_of(st.just(0), st.integers(0, 2**31 - 1)), min_size=30, max_size=30),
    fmt=st.sampled_from(["txt", "csv", "json"]),
    separator=st.sampled_from([",", " ", ", ", "\t", " ,  "]),
)
def test_steps_round_trip_property(shape, values, fmt, separator):
    array = np.array(values[: int(np.prod(shape))], dtype=np.int64).reshape(shape)
    with tempfile.TemporaryDirectory() as directory:
        steps = read_steps(_write_steps(directory, array, fmt, separator))
    expected = array
    if fmt != "json" and array.ndim == 2 and array.shape[0] == 1:
        expected = array[0]  # one text line means the same steps for every sample
    assert steps.dtype == np.int64
    np.testing.assert_array_equal(steps, expected)
    assert steps.shape == expected.shape


def test_parse_steps():
    np.testing.assert_array_equal(parse_steps("3,4,2"), [3, 4, 2])
    np.testing.assert_array_equal(parse_steps(" 3 4, 0 "), [3, 4, 0])
    assert parse_steps("5").dtype == np.int64
    with pytest.raises(DataError, match=r"^steps value 2: expected a non-negative integer, received 'x'$"):
        parse_steps("3,x")
    with pytest.raises(DataError, match=r"^--steps value 2: expected a non-negative integer, received 'x'$"):
        parse_steps("3,x", flag="--steps")
    with pytest.raises(DataError, match=r"^--lengths value 1: expected a non-negative integer, received '-3'$"):
        parse_steps("-3,1", flag="--lengths")
    with pytest.raises(DataError, match=r"^steps: expected comma-separated non-negative integers, received ''$"):
        parse_steps("")


def test_broadcast_steps():
    shared = broadcast_steps(np.array([1, 0, 2]), n_samples=2, outer_steps=3, source="--steps")
    np.testing.assert_array_equal(shared, [[1, 0, 2], [1, 0, 2]])
    assert shared.dtype == np.int64
    shared[0, 0] = 9  # a real array, not a read-only broadcast view
    per_sample = np.array([[1, 2], [3, 4]], dtype=np.int32)
    out = broadcast_steps(per_sample, n_samples=2, outer_steps=2, source="'s.txt'")
    np.testing.assert_array_equal(out, per_sample)
    assert out.dtype == np.int64
    empty = broadcast_steps(np.array([2, 3]), n_samples=0, outer_steps=2, source="--steps")
    assert empty.shape == (0, 2)


def test_broadcast_steps_wrong_shape_message():
    with pytest.raises(DataError) as info:
        broadcast_steps(np.array([1, 2, 3, 4, 5]), n_samples=3, outer_steps=4, source="'s.txt'")
    assert str(info.value) == (
        "steps from 's.txt' have shape (5,), expected (Ta,)=(4,) or (N, Ta)=(3, 4)"
    )
    with pytest.raises(DataError, match=r"have shape \(2, 4\), expected \(Ta,\)=\(4,\) or \(N, Ta\)=\(3, 4\)"):
        broadcast_steps(np.ones((2, 4), dtype=int), n_samples=3, outer_steps=4, source="--steps")
    with pytest.raises(DataError, match="at index 1: expected a non-negative integer, received -1"):
        broadcast_steps(np.array([1, -1]), n_samples=3, outer_steps=2, source="--steps")


def test_steps_fifo_is_refused_without_blocking(tmp_path):
    for name in ("s.txt", "s.json", "s.npy", "s.h5"):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        with pytest.raises(DataError, match=rf"^{quoted(fifo)} is a FIFO \(named pipe\), not a regular file: "
                                            "expected a steps file$"):
            read_steps(fifo)


def test_steps_upper_case_suffixes(tmp_path):
    np.testing.assert_array_equal(read_steps(write_text(tmp_path / "s.TXT", "1 2\n")), [1, 2])
    np.testing.assert_array_equal(read_steps(write_text(tmp_path / "s.Json", "[3]")), [3])
    np.testing.assert_array_equal(read_steps(write_h5(tmp_path / "s.H5", steps=np.array([4]))), [4])
    np.save(tmp_path / "s.npy", np.array([5]))
    os.rename(tmp_path / "s.npy", tmp_path / "s.NPY")
    np.testing.assert_array_equal(read_steps(tmp_path / "s.NPY"), [5])


def test_steps_text_and_json_accept_a_byte_order_mark(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf3, 4\n1 2\n")
    np.testing.assert_array_equal(read_steps(tmp_path / "bom.txt"), [[3, 4], [1, 2]])
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf0,1\n")
    np.testing.assert_array_equal(read_steps(tmp_path / "bom.csv"), [0, 1])
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf[[1, 2]]")
    np.testing.assert_array_equal(read_steps(tmp_path / "bom.json"), [[1, 2]])


def test_steps_json_nested_thousands_deep(tmp_path):
    path = write_text(tmp_path / "deep.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=rf"^steps file {quoted(path)}: expected a list of integers or a list of "
                                        r"lists of integers, received lists nested too deeply to read$"):
        read_steps(path)


def test_steps_huge_numbers_are_one_error(tmp_path):
    digits = "9" * 5000  # past Python's int-string conversion limit (4300 digits)
    shown = r"'9999999999999999999999999999999999999999\.\.\.' \(5000 digits\)"
    path = write_text(tmp_path / "big.txt", f"1 {digits}\n")
    with pytest.raises(DataError, match=rf"^steps file {quoted(path)} line 1, value 2: expected at most "
                                        rf"2\*\*31 - 1 = 2147483647 inner steps per pair, received {shown}$"):
        read_steps(path)
    path = write_text(tmp_path / "big.json", f"[1, {digits}]")
    with pytest.raises(DataError, match=rf"^steps file {quoted(path)}: expected JSON numbers Python can read, "
                                        r"received a number of more than 4300 digits"):
        read_steps(path)
    with pytest.raises(DataError, match=r"^steps value 1: expected at most 2\*\*31 - 1 = 2147483647 inner steps per "
                                        r"pair, received '1111111111111111111111111111111111111111\.\.\.' \(64 digits\)$"):
        parse_steps("1" * 64)
    with pytest.raises(DataError, match=r"^steps value 2: expected at most 2\*\*31 - 1 = 2147483647 inner steps per "
                                        r"pair, received '9223372036854775808'$"):
        parse_steps("1, 9223372036854775808")
    with pytest.raises(DataError, match=r"^steps value 1: expected a non-negative integer, received '1e400'$"):
        parse_steps("1e400")


def test_steps_per_pair_are_capped_with_the_data(tmp_path):
    top = 2**31 - 1
    np.testing.assert_array_equal(parse_steps(f"{top},0"), [top, 0])
    with pytest.raises(DataError, match=r"^steps value 1: expected at most 2\*\*31 - 1 = 2147483647 inner steps per "
                                        r"pair, received '2147483648'$"):
        parse_steps(str(top + 1))
    path = write_text(tmp_path / "wrap.json", f"[{2**62}, {2**62}]")
    with pytest.raises(DataError, match=rf"^steps file {quoted(path)} position 0: expected at most 2\*\*31 - 1 = "
                                        r"2147483647 inner steps per pair, received 4611686018427387904$"):
        read_steps(path)
    for array in (np.array([2**62, 2**62]), np.array([2.0**40]), np.array([2**63], dtype=np.uint64)):
        with pytest.raises(DataError, match=r"^steps from 'x' at index 0: expected at most 2\*\*31 - 1 = "
                                            r"2147483647 inner steps per pair, received "):
            steps_from_array(array, source="'x'")
    np.testing.assert_array_equal(steps_from_array(np.array([top], dtype=np.uint32), source="'x'"), [top])


def test_steps_total_sums_in_int64_and_refuses_overflow():
    assert steps_total(np.array([[3, 4], [0, 2]]), source="'s'") == 9
    assert steps_total(np.zeros((0, 3), dtype=np.int64), source="'s'") == 0
    np.testing.assert_array_equal(steps_total(np.array([[3, 4], [0, 2]]), source="'s'", axis=1), [7, 2])
    # Capped steps overflow only past 2**32 pairs; unchecked ones show the same sum check.
    with pytest.raises(DataError, match=r"^steps from 's' add up to 9223372036854775808 inner steps: expected "
                                        r"at most 2\*\*63 - 1$"):
        steps_total(np.array([2**62, 2**62]), source="'s'")
    with pytest.raises(DataError, match=r"^steps from 's' sample 1 add up to 9223372036854775808 inner steps"):
        steps_total(np.array([[1, 2], [2**62, 2**62]]), source="'s'", axis=1)
