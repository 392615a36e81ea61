"""Sampled tokens in results: `CascadeResult.tokens` and the `tokens` key of result files.

Every check compares against plain Python loops over (sample, outer step,
inner step), written here apart from the code under test.
"""

import h5py
import numpy as np
import pytest

from cascade_cli.errors import DataError, ParameterError
from cascade_cli.result import TOKEN_PAD, CascadeResult
from cascade_cli.results_io import (
    OPTIONAL_KEYS,
    TOKENS,
    RaggedH5Writer,
    open_result,
    read_result,
    write_result,
)
from cascade_cli.shards import merge_shards, shard_attrs

# The hand-worked example: lengths [[3, 0], [1, 2]], O = 2, values np.arange, tokens by hand.
LENGTHS = [[3, 0], [1, 2]]
TOKENS_BY_HAND = [5, 1, 0, 2, 3, 4]


def hand_result(tokens=TOKENS_BY_HAND):
    return CascadeResult(np.arange(12, dtype=np.float32).reshape(6, 2), LENGTHS, tokens)


def random_result(seed, *, n_samples=5, outer=3, output_size=2, max_length=4, vocabulary=6):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_length + 1, size=(n_samples, outer))
    total = int(lengths.sum())
    values = rng.standard_normal((total, output_size)).astype(np.float32)
    return CascadeResult(values, lengths, rng.integers(0, vocabulary, size=total))


def empty_results():
    return [CascadeResult(np.zeros((0, 2), np.float32), np.zeros((0, 3), np.int64), np.zeros(0, np.int64)),
            CascadeResult(np.zeros((0, 2), np.float32), np.zeros((2, 3), np.int64), np.zeros(0, np.int32))]


def reference_token_sequences(tokens, lengths):
    """Nested lists `[n][t] -> [ids]`, one sample and one outer step at a time."""
    nested, offset = [], 0
    for row in np.asarray(lengths).tolist():
        nested.append([])
        for length in row:
            nested[-1].append([int(token) for token in tokens[offset : offset + length]])
            offset += length
    return nested


def reference_padded_tokens(result, length, *, time_major=False):
    """`(N, Ta, L)` (or `(Ta, L, N)`) ids filled with -1, built entry by entry."""
    nested = reference_token_sequences(result.tokens, result.lengths)
    n_samples, outer = result.lengths.shape
    shape = (outer, length, n_samples) if time_major else (n_samples, outer, length)
    padded = np.full(shape, -1, np.int64)
    for n in range(n_samples):
        for t in range(outer):
            for j, token in enumerate(nested[n][t]):
                padded[(t, j, n) if time_major else (n, t, j)] = token
    return padded


def assert_same(result, expected):
    np.testing.assert_array_equal(result.lengths, expected.lengths)
    assert result.values.dtype == expected.values.dtype
    np.testing.assert_array_equal(result.values, expected.values)
    assert result.has_tokens == expected.has_tokens
    if expected.has_tokens:
        assert result.tokens.dtype == np.int64 and result.tokens.shape == (expected.total,)
        np.testing.assert_array_equal(result.tokens, expected.tokens)
    else:
        assert result.tokens is None


# --- CascadeResult ----------------------------------------------------------------------


def test_hand_example_token_sequences_and_padding():
    result = hand_result()
    assert result.has_tokens and result.tokens.dtype == np.int64
    assert [[result.token_sequence(n, t).tolist() for t in range(2)] for n in range(2)] == [
        [[5, 1, 0], []], [[2], [3, 4]]
    ]
    assert result.padded_tokens().tolist() == [[[5, 1, 0], [-1, -1, -1]], [[2, -1, -1], [3, 4, -1]]]
    assert TOKEN_PAD == -1
    time_major = result.padded_tokens(time_major=True)
    assert time_major.shape == (2, 3, 2) and time_major[1, 1, 1] == 4 and time_major[0, 0, 1] == 2
    wide = result.padded_tokens(99, max_length=5)
    assert wide.shape == (2, 2, 5) and (wide[:, :, 3:] == 99).all()
    _, _, mask = result.to_padded(max_length=5)
    np.testing.assert_array_equal(wide[mask], TOKENS_BY_HAND)  # true ids exactly where the mask is
    with pytest.raises(DataError, match="max_length: expected at least .* 3, received 2"):
        result.padded_tokens(max_length=2)
    assert "tokens=True" in repr(result)


def test_a_result_without_tokens():
    result = hand_result(None)
    assert result.tokens is None and not result.has_tokens and "tokens=False" in repr(result)
    for call in (lambda: result.token_sequence(0, 0), result.padded_tokens):
        with pytest.raises(DataError, match="tokens: this result has none"):
            call()
    assert result.slice_samples(0, 1).tokens is None
    assert CascadeResult.concatenate([result, result]).tokens is None


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([5, 1, 0, 2, 3], r"tokens: expected 6 entries \(the sum of lengths, one per value row\), received 5"),
        ([[5, 1, 0, 2, 3, 4]], r"tokens: expected a 1-D array `\(total,\)`, received shape \(1, 6\)"),
        (np.arange(6.0), "tokens: expected integer token ids, received dtype float64"),
        (np.ones(6, bool), "tokens: expected integer token ids, received dtype bool"),
        ([5, 1, -1, 2, 3, 4], "tokens: expected non-negative token ids, received -1"),
        (np.array([0, 0, 0, 0, 0, 2**63], np.uint64), "tokens: expected non-negative token ids"),
    ],
)
def test_constructor_checks_tokens(tokens, message):
    with pytest.raises(DataError, match=message):
        hand_result(tokens)


def test_tokens_are_stored_as_int64():
    assert hand_result(np.array(TOKENS_BY_HAND, np.uint8)).tokens.dtype == np.int64


@pytest.mark.parametrize("seed", range(4))
def test_slice_and_concatenate_keep_the_tokens(seed):
    result = random_result(seed)
    nested = reference_token_sequences(result.tokens, result.lengths)
    for start, stop in [(0, 2), (2, 5), (1, 1), (-2, None), (4, 2)]:
        part = result.slice_samples(start, stop)
        indices = list(range(result.n_samples))[start:stop]
        assert part.tokens.tolist() == [token for n in indices for t in range(3) for token in nested[n][t]]
    parts = [result.slice_samples(0, 2), result.slice_samples(2, 2), result.slice_samples(2, None)]
    assert_same(CascadeResult.concatenate(parts), result)
    for n in range(result.n_samples):
        for t in range(result.outer_steps):
            assert result.token_sequence(n, t).tolist() == nested[n][t]


def test_concatenate_refuses_a_mix_of_results_with_and_without_tokens():
    with pytest.raises(DataError, match="result 1: expected tokens like result 0, received none"):
        CascadeResult.concatenate([hand_result(), hand_result(None)])
    with pytest.raises(DataError, match="result 1: expected no tokens like result 0, received tokens"):
        CascadeResult.concatenate([hand_result(None), hand_result()])


@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_padded_tokens_round_trip_against_the_loop(seed, time_major):
    result = random_result(seed)
    padded = result.padded_tokens(time_major=time_major)
    np.testing.assert_array_equal(padded, reference_padded_tokens(result, result.max_length, time_major=time_major))
    values, lengths, _ = result.to_padded(time_major=time_major)
    noisy = np.where(padded == TOKEN_PAD, 1000 + seed, padded)  # entries past the lengths are ignored
    assert_same(CascadeResult.from_padded(values, lengths, tokens=noisy, time_major=time_major), result)
    assert CascadeResult.from_padded(values, lengths, time_major=time_major).tokens is None


def test_from_padded_checks_the_tokens():
    values, lengths, _ = hand_result().to_padded()
    tokens = hand_result().padded_tokens()
    with pytest.raises(DataError, match=r"tokens: expected shape \(2, 2, 3\) `\(N, Ta, L\)` to match values"):
        CascadeResult.from_padded(values, lengths, tokens=tokens[:, :, :2])
    with pytest.raises(DataError, match=r"tokens: expected a 3-D array `\(Ta, L, N\)`"):
        CascadeResult.from_padded(values.transpose(1, 2, 0, 3), lengths, tokens=tokens[0], time_major=True)
    with pytest.raises(DataError, match="tokens: expected integer token ids, received dtype float"):
        CascadeResult.from_padded(values, lengths, tokens=tokens.astype(float))
    tokens[1, 1, 0] = -3  # below lengths: a real entry
    with pytest.raises(DataError, match="tokens: expected non-negative token ids, received -3"):
        CascadeResult.from_padded(values, lengths, tokens=tokens)


def test_from_row_splits_and_empty_results_keep_tokens():
    result = hand_result()
    rebuilt = CascadeResult.from_row_splits(result.values, result.row_splits_0, result.row_splits_1,
                                            tokens=TOKENS_BY_HAND)
    assert_same(rebuilt, result)
    for empty in empty_results():
        assert empty.padded_tokens().shape == (empty.n_samples, 3, 0)
        assert empty.padded_tokens(time_major=True, max_length=2).shape == (3, 2, empty.n_samples)
        assert_same(CascadeResult.from_padded(*empty.to_padded()[:2], tokens=empty.padded_tokens()), empty)


def test_check_tokens_reads_no_entries():
    stand_in = np.broadcast_to(np.zeros((), np.int32), (10**12,))  # no entries behind it
    CascadeResult.check_tokens(stand_in, 10**12)
    with pytest.raises(DataError, match="tokens: expected 5 entries"):
        CascadeResult.check_tokens(stand_in, 5)


# --- result files ------------------------------------------------------------------------

LAYOUTS = [("ragged", False), ("padded", False), ("padded", True)]


def cases():
    return [hand_result(), random_result(7), *empty_results()]


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
@pytest.mark.parametrize(("layout", "time_major"), LAYOUTS)
def test_round_trip_of_every_layout(tmp_path, suffix, layout, time_major):
    for index, result in enumerate(cases()):
        path = tmp_path / f"out{index}{suffix}"
        write_result(path, result, layout=layout, time_major=time_major)
        assert_same(read_result(path), result)
        with open_result(path) as reader:
            assert reader.has_tokens
            pieces = list(reader.pieces(batch_samples=1))
        assert all(piece.has_tokens for piece in pieces)
        if pieces:
            assert_same(CascadeResult.concatenate(pieces), result)


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
@pytest.mark.parametrize(("layout", "time_major"), LAYOUTS)
def test_a_result_without_tokens_writes_no_tokens_key(tmp_path, suffix, layout, time_major):
    path = tmp_path / f"out{suffix}"
    write_result(path, hand_result(None), layout=layout, time_major=time_major)
    if suffix == ".h5":
        with h5py.File(path) as file:
            assert TOKENS not in file
    else:
        with np.load(path, allow_pickle=False) as archive:
            assert TOKENS not in archive.files
    with open_result(path) as reader:
        assert not reader.has_tokens
    assert_same(read_result(path), hand_result(None))


def test_ragged_tokens_on_disk_with_numpy_and_h5py_alone(tmp_path):
    result = random_result(3)
    write_result(tmp_path / "out.npz", result)
    write_result(tmp_path / "out.h5", result)
    with np.load(tmp_path / "out.npz", allow_pickle=False) as archive:
        assert archive[TOKENS].dtype == np.int64 and archive[TOKENS].shape == (result.total,)
        tokens, splits = archive[TOKENS], archive["row_splits_1"]
    with h5py.File(tmp_path / "out.h5") as file:
        assert file[TOKENS].dtype == np.int64
        np.testing.assert_array_equal(file[TOKENS][()], tokens)
    nested = reference_token_sequences(result.tokens, result.lengths)
    for n in range(result.n_samples):
        for t in range(result.outer_steps):
            pair = n * result.outer_steps + t
            assert tokens[splits[pair] : splits[pair + 1]].tolist() == nested[n][t]


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
@pytest.mark.parametrize("time_major", [False, True])
def test_padded_tokens_on_disk(tmp_path, suffix, time_major):
    result = random_result(4)
    path = tmp_path / f"out{suffix}"
    write_result(path, result, layout="padded", time_major=time_major, pad_value=np.nan)
    if suffix == ".h5":
        with h5py.File(path) as file:
            tokens, mask = file[TOKENS][()], file["mask"][()]
    else:
        with np.load(path, allow_pickle=False) as archive:
            tokens, mask = archive[TOKENS], archive["mask"]
    assert tokens.dtype == np.int64 and tokens.shape == mask.shape
    np.testing.assert_array_equal(tokens, reference_padded_tokens(result, result.max_length, time_major=time_major))
    assert (tokens[~mask] == -1).all() and (tokens[mask] >= 0).all()


def test_csv_gains_a_token_column_after_inner(tmp_path):
    write_result(tmp_path / "out.csv", hand_result())
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines == ["sample,outer,inner,token,y0,y1", "0,0,0,5,0,1", "0,0,1,1,2,3", "0,0,2,0,4,5",
                     "1,0,0,2,6,7", "1,1,0,3,8,9", "1,1,1,4,10,11"]
    write_result(tmp_path / "plain.csv", hand_result(None))
    assert (tmp_path / "plain.csv").read_text().splitlines()[:2] == ["sample,outer,inner,y0,y1", "0,0,0,0,1"]


def test_csv_tokens_stream_to_standard_output(capfdbinary):
    write_result("-", hand_result(), format="csv")
    assert capfdbinary.readouterr().out.decode().splitlines()[:2] == ["sample,outer,inner,token,y0,y1",
                                                                      "0,0,0,5,0,1"]


@pytest.mark.parametrize("source_suffix", [".h5", ".npz"])
@pytest.mark.parametrize(("source_layout", "source_time_major"), LAYOUTS)
def test_export_from_a_reader_keeps_the_tokens_in_every_format(tmp_path, source_suffix, source_layout,
                                                               source_time_major):
    result = random_result(5)
    source = tmp_path / f"source{source_suffix}"
    write_result(source, result, layout=source_layout, time_major=source_time_major)
    for name, layout, time_major in [("a.h5", "ragged", False), ("b.npz", "padded", True), ("c.h5", "padded", False)]:
        with open_result(source) as reader:
            write_result(tmp_path / name, reader, layout=layout, time_major=time_major, batch_samples=2)
        assert_same(read_result(tmp_path / name), result)
    with open_result(source) as reader:
        write_result(tmp_path / "d.csv", reader, batch_samples=2)
    rows = (tmp_path / "d.csv").read_text().splitlines()
    assert rows[0].startswith("sample,outer,inner,token,")
    assert [int(row.split(",")[3]) for row in rows[1:]] == result.tokens.tolist()
    nested = reference_token_sequences(result.tokens, result.lengths)
    for row in rows[1:]:
        n, t, j, token = (int(field) for field in row.split(",")[:4])
        assert nested[n][t][j] == token


# --- the streaming writer ---------------------------------------------------------------------


def test_ragged_h5_writer_writes_the_tokens_of_its_batches(tmp_path):
    result = random_result(6)
    with RaggedH5Writer(tmp_path / "streamed.h5", outer_steps=3, output_size=2) as writer:
        for start in range(0, result.n_samples, 2):
            writer.append(result.slice_samples(start, start + 2))
    write_result(tmp_path / "whole.h5", result)
    assert_same(read_result(tmp_path / "streamed.h5"), result)
    with h5py.File(tmp_path / "streamed.h5") as streamed, h5py.File(tmp_path / "whole.h5") as whole:
        np.testing.assert_array_equal(streamed[TOKENS][()], whole[TOKENS][()])


@pytest.mark.parametrize(("tokens", "pieces", "message"), [
    ("auto", [True, False], "expected every batch with sampled tokens, like the first batch, received one without"),
    ("auto", [False, True], "expected every batch without sampled tokens, like the first batch, received one with"),
    (True, [False], "expected every batch with sampled tokens, as tokens=True asks, received one without"),
    (False, [True], "expected every batch without sampled tokens, as tokens=False asks, received one with"),
])
def test_ragged_h5_writer_refuses_a_mix_and_leaves_nothing(tmp_path, tokens, pieces, message):
    path = tmp_path / "out.h5"
    with pytest.raises(DataError, match=message):
        with RaggedH5Writer(path, outer_steps=2, output_size=2, tokens=tokens) as writer:
            for has_tokens in pieces:
                writer.append(hand_result(TOKENS_BY_HAND if has_tokens else None))
    assert list(tmp_path.iterdir()) == []


def test_ragged_h5_writer_told_tokens_without_batches(tmp_path):
    for tokens in (True, False, "auto"):
        path = tmp_path / f"{tokens}.h5"
        with RaggedH5Writer(path, outer_steps=2, output_size=2, tokens=tokens):
            pass
        empty = read_result(path)
        assert empty.n_samples == 0 and empty.has_tokens == (tokens is True)
    for bad in ("yes", 1, None):
        with pytest.raises(ParameterError, match=r'tokens: expected "auto", True or False'):
            RaggedH5Writer(tmp_path / "bad.h5", outer_steps=2, output_size=2, tokens=bad)


# --- damaged files --------------------------------------------------------------------------


def rewrite_h5_tokens(path, array):
    with h5py.File(path, "a") as file:
        del file[TOKENS]
        file[TOKENS] = array


@pytest.mark.parametrize(("layout", "array", "message"), [
    ("ragged", np.zeros(5, np.int64), r"key 'tokens': expected 6 entries"),
    ("ragged", np.zeros(6, np.float32), "key 'tokens': expected integer token ids, received dtype float32"),
    ("ragged", np.zeros((6, 1), np.int64), r"key 'tokens': expected a 1-D array `\(total,\)`"),
    ("padded", np.zeros((2, 2, 2), np.int64), r"key 'tokens': expected shape \(2, 2, 3\)"),
    ("padded", np.zeros((2, 2, 3), bool), "key 'tokens': expected integer token ids, received dtype bool"),
])
def test_damaged_tokens_are_refused_on_opening_naming_file_and_key(tmp_path, layout, array, message):
    path = tmp_path / "out.h5"
    write_result(path, hand_result(), layout=layout)
    rewrite_h5_tokens(path, array)
    with pytest.raises(DataError, match=message) as info:
        open_result(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_a_negative_token_is_refused_when_its_piece_is_read(tmp_path, layout):
    path = tmp_path / "out.npz"
    result = hand_result()
    write_result(path, result, layout=layout)
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays[TOKENS] = arrays[TOKENS].copy()
    if layout == "ragged":
        arrays[TOKENS][4] = -2
    else:
        arrays[TOKENS][1, 1, 0] = -2
        arrays_pad_only = dict(arrays, **{TOKENS: result.padded_tokens(77)})  # pads are ignored
        np.savez(tmp_path / "pads.npz", **arrays_pad_only)
        assert_same(read_result(tmp_path / "pads.npz"), result)
    np.savez(path, **arrays)
    with open_result(path) as reader:
        assert next(reader.pieces(batch_samples=1)).tokens.tolist() == [5, 1, 0]  # sample 0 is sound
    with pytest.raises(DataError, match=f"'{path}' key 'tokens': expected non-negative token ids, received -2"):
        read_result(path)


def test_the_spec_names_tokens_once():
    assert TOKENS == "tokens" and OPTIONAL_KEYS == {"ragged": (TOKENS,), "padded": (TOKENS,)}
    with pytest.raises(DataError, match="'tokens' is reserved"):
        write_result("unused.h5", hand_result(), attrs={"tokens": 1})


# --- merge ------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
def test_merged_shards_keep_the_tokens_of_the_unsharded_result(tmp_path, count):
    whole = random_result(8, n_samples=7)
    run = "0123456789abcdef"
    bounds = np.linspace(0, whole.n_samples, count + 1).astype(int)
    bounds[1] = bounds[0]  # shard 0 empty: the next shard's batches decide
    paths = []
    for index in range(count):
        start, stop = int(bounds[index]), int(bounds[index + 1])
        paths.append(tmp_path / f"part{index}.{'npz' if index % 2 else 'h5'}")
        write_result(paths[-1], whole.slice_samples(start, stop), layout="padded" if index == 1 else "ragged",
                     attrs=shard_attrs(index=index, count=count, start=start, stop=stop,
                                       total_samples=whole.n_samples, run=run))
    merge_shards(paths[::-1], tmp_path / "all.h5", batch_samples=2)
    assert_same(read_result(tmp_path / "all.h5"), whole)
    write_result(tmp_path / "unsharded.h5", whole)
    with h5py.File(tmp_path / "all.h5") as merged, h5py.File(tmp_path / "unsharded.h5") as unsharded:
        np.testing.assert_array_equal(merged[TOKENS][()], unsharded[TOKENS][()])


def write_shards(folder, parts, run="0123456789abcdef"):
    """Writes `parts` as the shards of one run; returns their paths."""
    paths, start = [], 0
    total = sum(part.n_samples for part in parts)
    for index, part in enumerate(parts):
        paths.append(folder / f"part{index}.h5")
        write_result(paths[-1], part, attrs=shard_attrs(index=index, count=len(parts), start=start,
                                                        stop=start + part.n_samples, total_samples=total, run=run))
        start += part.n_samples
    return paths


def test_merge_of_empty_shards_keeps_that_the_run_had_tokens(tmp_path):
    empty = hand_result().slice_samples(0, 0)
    merge_shards(write_shards(tmp_path, [empty, empty]), tmp_path / "all.h5")
    merged = read_result(tmp_path / "all.h5")
    assert merged.n_samples == 0 and merged.has_tokens and merged.tokens.shape == (0,)


@pytest.mark.parametrize("first_has_tokens", [True, False])
def test_merge_refuses_shards_with_and_without_tokens_naming_the_shard(tmp_path, first_has_tokens):
    parts = [hand_result(), hand_result(None)][:: 1 if first_has_tokens else -1]
    paths = write_shards(tmp_path, parts)
    words = "'.*part1.h5' has no sampled tokens: expected them" if first_has_tokens else \
        "'.*part1.h5' holds sampled tokens: expected none"
    with pytest.raises(DataError, match=words):
        merge_shards(paths, tmp_path / "all.h5")
    assert not (tmp_path / "all.h5").exists()


def test_cascade_export_and_merge_carry_the_tokens(tmp_path):
    from clitools import assert_ok, invoke

    result = random_result(9, n_samples=4)
    write_result(tmp_path / "r.h5", result)
    assert_ok(invoke("export", tmp_path / "r.h5", "--layout", "padded", "--time-major", "-o", tmp_path / "p.npz"))
    assert_same(read_result(tmp_path / "p.npz"), result)
    assert_ok(invoke("export", tmp_path / "p.npz", "-o", tmp_path / "r.csv"))
    rows = [row.split(",") for row in (tmp_path / "r.csv").read_text().splitlines()]
    assert rows[0][:4] == ["sample", "outer", "inner", "token"]
    assert [int(row[3]) for row in rows[1:]] == result.tokens.tolist()
    paths = write_shards(tmp_path, [result.slice_samples(0, 1), result.slice_samples(1, 4)])
    assert_ok(invoke("merge", *paths, "-o", tmp_path / "all.h5"))
    assert_same(read_result(tmp_path / "all.h5"), result)
