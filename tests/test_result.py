"""Tests of `cascade_cli.result.CascadeResult`."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cascade_cli.errors import DataError
from cascade_cli.result import ArrayError, CascadeResult

# The hand-worked example: lengths [[3, 0], [1, 2]], O = 2, values np.arange.
LENGTHS = [[3, 0], [1, 2]]


def hand_result():
    return CascadeResult(np.arange(12, dtype=np.float64).reshape(6, 2), LENGTHS)


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


def assert_same(result, expected):
    assert result.lengths.dtype == np.int64
    assert result.lengths.shape == expected.lengths.shape
    np.testing.assert_array_equal(result.lengths, expected.lengths)
    assert result.values.shape == expected.values.shape
    np.testing.assert_array_equal(result.values, expected.values)


def reference_sequences(values, lengths):
    """Nested lists `[n][t] -> (len, O)` built with plain Python loops."""
    nested, offset = [], 0
    for row in np.asarray(lengths).tolist():
        nested.append([])
        for length in row:
            nested[-1].append(values[offset : offset + length])
            offset += length
    return nested


def test_import_does_not_load_tensorflow():
    code = "import sys, cascade_cli.result; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the hand-worked example ---------------------------------------------------------


def test_hand_example_properties():
    result = hand_result()
    assert (result.n_samples, result.outer_steps, result.output_size) == (2, 2, 2)
    assert (result.total, result.max_length) == (6, 3)
    assert result.row_splits_0.dtype == np.int64
    assert result.row_splits_1.dtype == np.int64
    assert result.row_splits_0.tolist() == [0, 2, 4]
    assert result.row_splits_1.tolist() == [0, 3, 3, 4, 6]
    assert result.sequence(0, 0).tolist() == [[0, 1], [2, 3], [4, 5]]
    assert result.sequence(0, 1).shape == (0, 2)
    assert result.sequence(1, 0).tolist() == [[6, 7]]
    assert result.sequence(1, 1).tolist() == [[8, 9], [10, 11]]
    with pytest.raises(IndexError):
        result.sequence(2, 0)
    with pytest.raises(IndexError):
        result.sequence(0, -1)
    assert "n_samples=2" in repr(result)


def test_hand_example_to_padded():
    values, lengths, mask = hand_result().to_padded(-1.0)
    assert values.shape == (2, 2, 3, 2)
    assert values[..., 0].tolist() == [
        [[0, 2, 4], [-1, -1, -1]],
        [[6, -1, -1], [8, 10, -1]],
    ]
    assert values[..., 1].tolist() == [
        [[1, 3, 5], [-1, -1, -1]],
        [[7, -1, -1], [9, 11, -1]],
    ]
    assert mask.dtype == bool
    assert mask.tolist() == [
        [[True, True, True], [False, False, False]],
        [[True, False, False], [True, True, False]],
    ]
    assert lengths.tolist() == LENGTHS


def test_hand_example_time_major_is_a_transposition():
    values, lengths, mask = hand_result().to_padded(np.nan)
    values_tm, lengths_tm, mask_tm = hand_result().to_padded(np.nan, time_major=True)
    assert values_tm.shape == (2, 3, 2, 2)  # (Ta, L, N, O)
    assert mask_tm.shape == (2, 3, 2)  # (Ta, L, N)
    assert lengths_tm.tolist() == LENGTHS  # lengths stay (N, Ta)
    for n in range(2):
        for t in range(2):
            for j in range(3):
                assert mask_tm[t, j, n] == mask[n, t, j]
                np.testing.assert_array_equal(values_tm[t, j, n], values[n, t, j])
    assert values_tm[1, 1, 1].tolist() == [10, 11]  # sample 1, outer 1, inner 1
    assert np.isnan(values_tm[1, 0, 0]).all()  # sample 0, outer 1 emitted nothing


def test_to_padded_max_length():
    values, _, mask = hand_result().to_padded(7.0, max_length=5)
    assert values.shape == (2, 2, 5, 2)
    assert (values[:, :, 3:] == 7.0).all()
    assert not mask[:, :, 3:].any()
    with pytest.raises(DataError, match="max_length: expected at least .* 3, received 2"):
        hand_result().to_padded(max_length=2)


def test_from_padded_ignores_entries_past_lengths():
    padded = np.full((2, 2, 4, 2), np.nan)
    padded[0, 0, :3] = [[0, 1], [2, 3], [4, 5]]
    padded[1, 0, :1] = [[6, 7]]
    padded[1, 1, :2] = [[8, 9], [10, 11]]
    assert_same(CascadeResult.from_padded(padded, LENGTHS), hand_result())
    time_major = np.ascontiguousarray(padded.transpose(1, 2, 0, 3))
    assert_same(CascadeResult.from_padded(time_major, LENGTHS, time_major=True), hand_result())


@pytest.mark.parametrize(
    ("values", "lengths", "message"),
    [
        (np.zeros((2, 2, 3)), LENGTHS, "expected a 4-D array"),
        (np.zeros((2, 2, 3, 1), np.int32), LENGTHS, "expected floats"),
        (np.zeros((2, 3, 3, 1)), LENGTHS, r"lengths: expected shape \(2, 3\)"),
        (np.zeros((2, 2, 2, 1)), LENGTHS, "at most the padded length 2, received 3"),
        (np.zeros((2, 2, 3, 1)), [[1.0, 2.0], [0.0, 0.0]], "lengths: expected integers"),
    ],
)
def test_from_padded_errors(values, lengths, message):
    with pytest.raises(DataError, match=message):
        CascadeResult.from_padded(values, lengths)


def test_from_row_splits_hand_example():
    result = CascadeResult.from_row_splits(
        np.arange(12.0).reshape(6, 2), [0, 2, 4], [0, 3, 3, 4, 6]
    )
    assert_same(result, hand_result())


@pytest.mark.parametrize(
    ("splits_0", "splits_1", "message"),
    [
        ([1, 2, 4], [0, 3, 3, 4, 6], "row_splits_0: expected to start at 0, received 1"),
        ([0, 2, 4], [1, 3, 3, 4, 6], "row_splits_1: expected to start at 0, received 1"),
        ([0, 2, 4], [0, 3, 2, 4, 6], "row_splits_1: expected non-decreasing values"),
        ([0, 2, 1], [0, 3, 3, 4, 6], "row_splits_0: expected non-decreasing"),
        ([0, 1, 4], [0, 3, 3, 4, 6], "row_splits_0: expected uniform steps of 1"),
        ([0, 2, 4], [0, 3, 4, 6], "row_splits_1: expected 5 entries"),
        ([0, 2, 4], [0, 3, 3, 4, 5], "row_splits_1: expected to end at 6 .*received 5"),
        ([], [0], "row_splits_0: expected a 1-D array with at least one entry"),
        ([0.0, 2.0, 4.0], [0, 3, 3, 4, 6], "row_splits_0: expected integers"),
    ],
)
def test_from_row_splits_errors(splits_0, splits_1, message):
    with pytest.raises(DataError, match=message):
        CascadeResult.from_row_splits(np.arange(12.0).reshape(6, 2), splits_0, splits_1)


def test_from_row_splits_checks_outer_steps():
    with pytest.raises(DataError, match="expected steps of 3 outer steps, received 2"):
        CascadeResult.from_row_splits(
            np.arange(12.0).reshape(6, 2), [0, 2, 4], [0, 3, 3, 4, 6], outer_steps=3
        )


@pytest.mark.parametrize(
    ("values", "lengths", "message"),
    [
        (np.arange(6.0), LENGTHS, r"values: expected a 2-D array `\(total, O\)`"),
        (np.arange(12).reshape(6, 2), LENGTHS, "values: expected floats, received dtype int"),
        (np.zeros((5, 2)), LENGTHS, "values: expected 6 rows .*received 5"),
        (np.zeros((6, 2)), [3, 0, 1, 2], r"lengths: expected a 2-D array `\(N, Ta\)`"),
        (np.zeros((6, 2)), [[3, 0], [1.0, 2]], "lengths: expected integers"),
        (np.zeros((2, 2)), [[3, -1], [0, 0]], "lengths: expected non-negative .*received -1"),
    ],
)
def test_constructor_errors(values, lengths, message):
    with pytest.raises(DataError, match=message):
        CascadeResult(values, lengths)


# --- empty and zero-length cases -------------------------------------------------------


def test_no_samples():
    result = CascadeResult(np.zeros((0, 2), np.float32), np.zeros((0, 3), np.int64))
    assert (result.n_samples, result.outer_steps, result.total, result.max_length) == (0, 3, 0, 0)
    assert result.row_splits_0.tolist() == [0]
    assert result.row_splits_1.tolist() == [0]
    values, lengths, mask = result.to_padded()
    assert values.shape == (0, 3, 0, 2) and values.dtype == np.float32
    assert lengths.shape == (0, 3) and mask.shape == (0, 3, 0)
    assert result.to_padded(time_major=True)[0].shape == (3, 0, 0, 2)
    assert_same(CascadeResult.from_padded(values, lengths), result)
    rebuilt = CascadeResult.from_row_splits(result.values, [0], [0], outer_steps=3)
    assert_same(rebuilt, result)
    assert CascadeResult.from_row_splits(result.values, [0], [0]).outer_steps == 0


def test_all_zero_lengths():
    result = CascadeResult(np.zeros((0, 4)), np.zeros((2, 3), np.int32))
    assert result.lengths.dtype == np.int64
    assert (result.total, result.max_length) == (0, 0)
    assert result.row_splits_0.tolist() == [0, 3, 6]
    assert result.row_splits_1.tolist() == [0] * 7
    assert result.sequence(1, 2).shape == (0, 4)
    values, lengths, mask = result.to_padded()
    assert values.shape == (2, 3, 0, 4) and mask.shape == (2, 3, 0)
    assert_same(CascadeResult.from_padded(values, lengths), result)
    values, _, _ = result.to_padded(max_length=2, pad_value=5.0)
    assert values.shape == (2, 3, 2, 4) and (values == 5.0).all()
    assert_same(
        CascadeResult.from_row_splits(result.values, result.row_splits_0, result.row_splits_1),
        result,
    )


def test_no_outer_steps():
    result = CascadeResult(np.zeros((0, 1)), np.zeros((2, 0), np.int64))
    assert result.row_splits_0.tolist() == [0, 0, 0]
    assert result.row_splits_1.tolist() == [0]
    assert result.to_padded()[0].shape == (2, 0, 0, 1)
    assert_same(CascadeResult.from_row_splits(result.values, [0, 0, 0], [0]), result)


def test_one_huge_row():
    length = 200_000
    values = np.random.default_rng(0).standard_normal((length, 3)).astype(np.float32)
    result = CascadeResult(values, [[0, length], [0, 0]])
    assert result.max_length == length
    padded, lengths, mask = result.to_padded(np.nan)
    assert padded.shape == (2, 2, length, 3)
    np.testing.assert_array_equal(padded[0, 1], values)
    assert np.isnan(padded[0, 0]).all() and np.isnan(padded[1]).all()
    assert mask.sum() == length
    assert_same(CascadeResult.from_padded(padded, lengths), result)
    assert result.row_splits_1.tolist() == [0, 0, length, length, length]


# --- concatenate and slice ------------------------------------------------------------


def test_concatenate_and_slice_hand_example():
    result = hand_result()
    first, second = result.slice_samples(0, 1), result.slice_samples(1, 2)
    assert first.lengths.tolist() == [[3, 0]]
    assert first.values.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert second.lengths.tolist() == [[1, 2]]
    assert second.values.tolist() == [[6, 7], [8, 9], [10, 11]]
    empty = result.slice_samples(2, 2)
    assert empty.n_samples == 0 and empty.outer_steps == 2 and empty.values.shape == (0, 2)
    assert_same(CascadeResult.concatenate([first, empty, second]), result)
    assert_same(result.slice_samples(-1, None), second)
    assert_same(result.slice_samples(1, 10), second)
    assert result.slice_samples(2, 1).n_samples == 0


def test_concatenate_errors():
    with pytest.raises(DataError, match="at least one result"):
        CascadeResult.concatenate([])
    other = CascadeResult(np.zeros((0, 2)), np.zeros((1, 3), np.int64))
    with pytest.raises(DataError, match="result 1: expected 2 outer steps"):
        CascadeResult.concatenate([hand_result(), other])
    other = CascadeResult(np.zeros((0, 3)), np.zeros((1, 2), np.int64))
    with pytest.raises(DataError, match="output size 2 like result 0, received 2 and 3"):
        CascadeResult.concatenate([hand_result(), other])


# --- TensorFlow ------------------------------------------------------------------------


def test_to_tensor_hand_example(tf):
    ragged = hand_result().to_tensor()
    assert isinstance(ragged, tf.RaggedTensor)
    assert ragged.shape.as_list() == [2, None, None, 2]
    assert ragged.to_list() == [
        [[[0, 1], [2, 3], [4, 5]], []],
        [[[6, 7]], [[8, 9], [10, 11]]],
    ]
    # TensorFlow's own padding agrees with ours.
    dense = ragged.to_tensor(default_value=-1.0).numpy()
    np.testing.assert_array_equal(dense, hand_result().to_padded(-1.0)[0])


def test_from_tensor_hand_example(tf):
    ragged = tf.ragged.constant(
        [[[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], []], [[[6.0, 7.0]], [[8.0, 9.0], [10.0, 11.0]]]],
        ragged_rank=2,
    )
    assert_same(CascadeResult.from_tensor(ragged), hand_result())


def test_from_tensor_with_uniform_outer_axis(tf):
    inner = tf.RaggedTensor.from_row_splits(np.arange(12.0).reshape(6, 2), [0, 3, 3, 4, 6])
    ragged = tf.RaggedTensor.from_uniform_row_length(inner, 2)
    assert_same(CascadeResult.from_tensor(ragged), hand_result())


def test_tensor_round_trip_zero_lengths(tf):
    result = CascadeResult(np.zeros((0, 3), np.float32), np.zeros((2, 4), np.int64))
    ragged = result.to_tensor()
    assert ragged.to_list() == [[[], [], [], []], [[], [], [], []]]
    assert_same(CascadeResult.from_tensor(ragged), result)
    empty = CascadeResult(np.zeros((0, 3), np.float32), np.zeros((0, 4), np.int64))
    back = CascadeResult.from_tensor(empty.to_tensor())
    assert back.n_samples == 0 and back.values.shape == (0, 3)


def test_from_tensor_errors(tf):
    with pytest.raises(DataError, match="expected a tf.RaggedTensor .*received EagerTensor"):
        CascadeResult.from_tensor(tf.zeros((2, 2, 3, 1)))
    with pytest.raises(DataError, match="ragged_rank 2, received .* ragged_rank 1"):
        CascadeResult.from_tensor(tf.ragged.constant([[[1.0]], [[2.0], [3.0]]], ragged_rank=1))


# --- properties ------------------------------------------------------------------------


@st.composite
def results(draw):
    """Random results: small lengths (zeros common), empty batches, or one huge row."""
    n_samples = draw(st.integers(0, 4))
    n_outer = draw(st.integers(0, 4))
    if draw(st.booleans()) and n_samples * n_outer:
        lengths = np.zeros((n_samples, n_outer), np.int64)
        lengths[draw(st.integers(0, n_samples - 1)), draw(st.integers(0, n_outer - 1))] = draw(
            st.integers(1000, 5000)
        )
    else:
        lengths = np.array(
            draw(
                st.lists(
                    st.lists(st.integers(0, 5), min_size=n_outer, max_size=n_outer),
                    min_size=n_samples,
                    max_size=n_samples,
                )
            ),
            dtype=np.int64,
        ).reshape(n_samples, n_outer)
    output_size = draw(st.integers(0, 3))
    total = int(lengths.sum())
    values = np.arange(total * output_size, dtype=np.float32).reshape(total, output_size)
    return CascadeResult(values, lengths)


@settings(max_examples=80, deadline=None)
@given(results(), st.booleans())
@example(CascadeResult(np.zeros((0, 2)), np.zeros((3, 2), np.int64)), False)
@example(CascadeResult(np.zeros((0, 2)), np.zeros((0, 2), np.int64)), True)
def test_padded_round_trip(result, time_major):
    padded, lengths, mask = result.to_padded(-7.0, time_major=time_major)
    batch_mask = mask.transpose(2, 0, 1) if time_major else mask
    batch_values = padded.transpose(2, 0, 1, 3) if time_major else padded
    length = result.max_length
    assert batch_values.shape == (result.n_samples, result.outer_steps, length, result.output_size)
    np.testing.assert_array_equal(batch_mask.sum(axis=-1), result.lengths)
    np.testing.assert_array_equal(batch_mask, np.arange(length) < result.lengths[..., None])
    # Boolean indexing walks (n, t, j) in C order, which is the value order.
    np.testing.assert_array_equal(batch_values[batch_mask], result.values)
    assert (batch_values[~batch_mask] == -7.0).all()
    assert_same(CascadeResult.from_padded(padded, lengths, time_major=time_major), result)


@settings(max_examples=80, deadline=None)
@given(results())
@example(CascadeResult(np.zeros((0, 1)), np.zeros((0, 3), np.int64)))
def test_row_splits_round_trip(result):
    splits_0, splits_1 = result.row_splits_0, result.row_splits_1
    assert splits_0.tolist() == [n * result.outer_steps for n in range(result.n_samples + 1)]
    assert splits_1[0] == 0 and splits_1[-1] == result.total
    np.testing.assert_array_equal(np.diff(splits_1), result.lengths.ravel())
    rebuilt = CascadeResult.from_row_splits(
        result.values, splits_0, splits_1, outer_steps=result.outer_steps
    )
    assert_same(rebuilt, result)
    nested = reference_sequences(result.values, result.lengths)
    for n in range(result.n_samples):
        for t in range(result.outer_steps):
            np.testing.assert_array_equal(result.sequence(n, t), nested[n][t])


@settings(max_examples=50, deadline=None)
@given(results(), st.integers(-5, 5), st.integers(-5, 5))
def test_slice_and_concatenate(result, start, stop):
    middle = result.slice_samples(start, stop)
    indices = list(range(result.n_samples))[start:stop]
    np.testing.assert_array_equal(middle.lengths, result.lengths[indices])
    expected = [result.sequence(n, t) for n in indices for t in range(result.outer_steps)]
    expected = np.concatenate(expected) if expected else np.zeros((0, result.output_size))
    np.testing.assert_array_equal(middle.values, expected)
    split = min(max(start, 0), result.n_samples)
    parts = [result.slice_samples(0, split), result.slice_samples(split, None)]
    assert_same(CascadeResult.concatenate(parts), result)


def test_array_errors_name_the_array_apart_from_the_problem():
    with pytest.raises(ArrayError) as info:
        CascadeResult.from_row_splits(np.zeros((6, 2)), [0, 2, 4], [0, 3, 2, 4, 6])
    assert isinstance(info.value, DataError)
    assert info.value.array == "row_splits_1"
    assert info.value.problem == "expected non-decreasing values, received 3 then 2 at index 2"
    assert str(info.value) == f"row_splits_1: {info.value.problem}"


def test_check_padded_looks_only_at_shapes():
    stand_in = np.broadcast_to(np.zeros((), np.float32), (2, 2, 3, 5))  # no values behind it
    assert CascadeResult.check_padded(stand_in, LENGTHS).tolist() == LENGTHS
    with pytest.raises(ArrayError, match=r"^lengths: expected at most the padded length 2, received 3$"):
        CascadeResult.check_padded(np.zeros((2, 2, 2, 1)), LENGTHS)
    time_major = np.zeros((2, 3, 2, 1))  # (Ta, L, N, O)
    assert CascadeResult.check_padded(time_major, LENGTHS, time_major=True).dtype == np.int64
    with pytest.raises(ArrayError, match=r"lengths: expected shape \(2, 3\)"):
        CascadeResult.check_padded(np.zeros((2, 3, 4, 1)), LENGTHS)
