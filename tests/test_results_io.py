"""Tests of `cascade_cli.results_io`: result layouts on disk, the streaming writer and reader."""

import errno
import os
import re
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from cascade_cli.errors import DataError
from cascade_cli import h5, results_io
from cascade_cli.results_io import (
    FORMAT_VERSION,
    LAYOUT_ATTRS,
    LAYOUT_KEYS,
    LAYOUTS,
    RESERVED_ATTRS,
    RaggedH5Writer,
    iter_result,
    open_result,
    read_result,
    read_result_attrs,
    run_attrs,
    write_result,
)
from cascade_cli.result import CascadeResult
from filetools import dead_pid, quoted

LENGTHS = [[3, 0], [1, 2]]


def hand_result():
    return CascadeResult(np.arange(12, dtype=np.float32).reshape(6, 2), LENGTHS)


def no_samples():
    return CascadeResult(np.zeros((0, 2), np.float32), np.zeros((0, 3), np.int64))


def all_zero():
    return CascadeResult(np.zeros((0, 2), np.float32), np.zeros((2, 3), np.int64))


def assert_same(result, expected):
    assert result.lengths.shape == expected.lengths.shape
    np.testing.assert_array_equal(result.lengths, expected.lengths)
    assert result.values.dtype == expected.values.dtype
    assert result.values.shape == expected.values.shape
    np.testing.assert_array_equal(result.values, expected.values)


def test_constants():
    assert FORMAT_VERSION == 1
    assert LAYOUTS == ("ragged", "padded")


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
@pytest.mark.parametrize(
    ("layout", "time_major"), [("ragged", False), ("padded", False), ("padded", True)]
)
@pytest.mark.parametrize("make", [hand_result, no_samples, all_zero])
def test_write_read_round_trip(tmp_path, suffix, layout, time_major, make):
    path = tmp_path / f"out{suffix}"
    write_result(path, make(), layout=layout, time_major=time_major, pad_value=-1.0)
    assert_same(read_result(path), make())
    assert sorted(os.listdir(tmp_path)) == [path.name]
    attrs = read_result_attrs(path)
    assert attrs["layout"] == layout and attrs["format_version"] == 1
    if layout == "padded":
        assert attrs["pad_value"] == -1.0 and attrs["time_major"] is time_major


def test_npz_ragged_loads_with_numpy_alone(tmp_path):
    tf = pytest.importorskip("tensorflow")
    path = tmp_path / "out.npz"
    write_result(path, hand_result(), attrs={"state": "carry"})
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == [
            "flat_values", "format_version", "layout", "lengths",
            "row_splits_0", "row_splits_1", "state",
        ]  # fmt: skip
        assert archive["layout"].shape == () and str(archive["layout"]) == "ragged"
        assert int(archive["format_version"]) == 1
        assert str(archive["state"]) == "carry"
        assert archive["row_splits_0"].dtype == np.int64
        assert archive["row_splits_1"].dtype == np.int64
        assert archive["row_splits_0"].tolist() == [0, 2, 4]
        assert archive["row_splits_1"].tolist() == [0, 3, 3, 4, 6]
        assert archive["lengths"].tolist() == LENGTHS
        ragged = tf.RaggedTensor.from_nested_row_splits(
            archive["flat_values"], [archive["row_splits_0"], archive["row_splits_1"]]
        )
    assert ragged.to_list() == [
        [[[0, 1], [2, 3], [4, 5]], []],
        [[[6, 7]], [[8, 9], [10, 11]]],
    ]
    np.testing.assert_array_equal(ragged.flat_values.numpy(), hand_result().values)


def test_npz_padded_time_major_on_disk(tmp_path):
    path = tmp_path / "out.npz"
    write_result(path, hand_result(), layout="padded", pad_value=-1.0, time_major=True)
    with np.load(path, allow_pickle=False) as archive:
        values, mask = archive["values"], archive["mask"]
        assert values.shape == (2, 3, 2, 2)  # (Ta, L, N, O)
        assert mask.shape == (2, 3, 2) and mask.dtype == bool
        assert archive["lengths"].tolist() == LENGTHS
        assert float(archive["pad_value"]) == -1.0 and bool(archive["time_major"])
    # Sample 1, outer step 1, inner steps 0 and 1: [8, 9] and [10, 11].
    assert values[1, :, 1].tolist() == [[8, 9], [10, 11], [-1, -1]]
    assert mask[:, :, 0].tolist() == [[True, True, True], [False, False, False]]


def test_h5_padded_on_disk(tmp_path):
    path = tmp_path / "out.h5"
    write_result(path, hand_result(), layout="padded", pad_value=9.0, attrs={"seed": 3})
    with h5py.File(path, "r") as file:
        assert sorted(file) == ["lengths", "mask", "values"]
        assert dict(file.attrs) == {
            "layout": b"padded",
            "format_version": 1,
            "pad_value": 9.0,
            "time_major": False,
            "seed": 3,
        }
        values = file["values"][()]
        assert values.shape == (2, 2, 3, 2)
        assert values[1, 0].tolist() == [[6, 7], [9, 9], [9, 9]]
        assert file["mask"].dtype == bool


def test_h5_ragged_on_disk(tmp_path):
    path = tmp_path / "out.hdf5"
    write_result(path, hand_result())
    assert h5py.is_hdf5(path)
    with h5py.File(path, "r") as file:
        assert sorted(file) == ["flat_values", "lengths", "row_splits_0", "row_splits_1"]
        assert file.attrs["layout"] == b"ragged" and file.attrs["format_version"] == 1
        assert file["row_splits_1"][()].tolist() == [0, 3, 3, 4, 6]
        assert file["row_splits_1"].dtype == np.int64
        assert file["flat_values"].dtype == np.float32


def test_csv_long_form(tmp_path):
    path = tmp_path / "out.csv"
    write_result(path, hand_result(), layout="padded", attrs={"ignored": 1})
    assert path.read_text() == (
        "sample,outer,inner,y0,y1\n"
        "0,0,0,0,1\n0,0,1,2,3\n0,0,2,4,5\n"
        "1,0,0,6,7\n1,1,0,8,9\n1,1,1,10,11\n"
    )


def test_csv_values_round_trip_and_empty(tmp_path):
    values = np.array([[0.1], [-1e-30], [3.0e38]], np.float32)
    result = CascadeResult(values, [[0, 2], [1, 0]])
    write_result(tmp_path / "a.csv", result)
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0] == "sample,outer,inner,y0"
    assert [line.split(",")[:3] for line in lines[1:]] == [
        ["0", "1", "0"], ["0", "1", "1"], ["1", "0", "0"],
    ]  # fmt: skip
    parsed = np.array([float(line.split(",")[3]) for line in lines[1:]], np.float32)
    np.testing.assert_array_equal(parsed, values[:, 0])
    write_result(tmp_path / "b.csv", all_zero())
    assert (tmp_path / "b.csv").read_text() == "sample,outer,inner,y0,y1\n"


def test_explicit_format_and_content_sniffing(tmp_path):
    write_result(tmp_path / "out.dat", hand_result(), format="npz")
    write_result(tmp_path / "out.bin", hand_result(), format="h5", layout="padded")
    assert_same(read_result(tmp_path / "out.dat"), hand_result())
    assert_same(read_result(tmp_path / "out.bin"), hand_result())


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("out.txt", {}, r"cannot tell the format from the suffix '\.txt'.*pass format \(one of h5, npz, csv\)"),
        ("out.h5", {"format": "parquet"}, "format: expected one of h5, npz, csv, received 'parquet'"),
        ("out.h5", {"layout": "dense"}, "layout: expected one of ragged, padded, received 'dense'"),
        ("out.h5", {"attrs": {"layout": "x"}}, "attrs: 'layout' is reserved"),
        ("out.npz", {"attrs": {"lengths": 1}}, "attrs: 'lengths' is reserved"),
        ("out.h5", {"attrs": {"a": [1, 2]}}, "attrs: 'a' expected a string or a number"),
    ],
)
def test_write_result_errors(tmp_path, name, kwargs, message):
    with pytest.raises(DataError, match=message):
        write_result(tmp_path / name, hand_result(), **kwargs)
    assert os.listdir(tmp_path) == []


def test_attrs_round_trip(tmp_path):
    attrs = {"state": "reset", "model_a": "/m/a.keras", "seed": np.int64(4), "ok": True, "x": 0.5}
    for name in ("out.h5", "out.npz"):
        write_result(tmp_path / name, hand_result(), attrs=attrs)
        read = read_result_attrs(tmp_path / name)
        assert read == {"layout": "ragged", "format_version": 1, **attrs}
        assert type(read["seed"]) is int and type(read["state"]) is str


def test_h5_text_attributes_are_fixed_length(tmp_path):
    """No variable-length string: those live in HDF5's global heap, which no checksum covers (a damaged one hung
    libhdf5 for good in the fuzz test); fixed-length UTF-8 ones live in the checksummed object header."""
    attrs = {"state": "reset", "note": "naïve ✓", "empty": "", "seed": 4}
    write_result(tmp_path / "out.h5", hand_result(), attrs=attrs)
    with h5py.File(tmp_path / "out.h5", "r") as file:
        for key in ("layout", "state", "note", "empty"):
            info = h5py.check_string_dtype(file.attrs.get_id(key).dtype)
            assert info is not None and info.length is not None and info.encoding == "utf-8", key
        assert file.attrs["note"].decode("utf-8") == "naïve ✓"
    assert read_result_attrs(tmp_path / "out.h5") == {"layout": "ragged", "format_version": 1, **attrs}


def test_write_result_writes_through_atomic_output(tmp_path):
    target = tmp_path / "out.h5"
    target.write_bytes(b"old")
    with pytest.raises(DataError, match="already exists; pass overwrite=True to replace it"):
        write_result(target, hand_result())
    assert target.read_bytes() == b"old"
    stale = tmp_path / f".out.h5.cascade-tmp-{dead_pid()}-0badf00d"
    stale.write_bytes(b"half")
    write_result(target, hand_result(), overwrite=True)
    assert_same(read_result(target), hand_result())
    assert os.listdir(tmp_path) == ["out.h5"]
    with pytest.raises(DataError, match="does not exist"):
        write_result(tmp_path / "missing" / "out.npz", hand_result())


# --- incremental HDF5 writer -----------------------------------------------------------


def test_ragged_h5_writer_matches_write_result(tmp_path):
    full = CascadeResult(np.arange(30, dtype=np.float32).reshape(10, 3), [[2, 0], [1, 3], [0, 4]])
    batches = [full.slice_samples(0, 2), all_zero_batch(2, 3), full.slice_samples(2, 3)]
    expected = CascadeResult.concatenate(batches)
    attrs = {"state": "reset", "batch_size": 2}
    with RaggedH5Writer(
        tmp_path / "inc.h5", outer_steps=2, output_size=3, attrs=attrs
    ) as writer:
        for batch in batches:
            writer.append(batch)
        assert not (tmp_path / "inc.h5").exists()
    write_result(tmp_path / "whole.h5", expected, attrs=attrs)
    assert sorted(os.listdir(tmp_path)) == ["inc.h5", "whole.h5"]
    assert_same(read_result(tmp_path / "inc.h5"), expected)
    with h5py.File(tmp_path / "inc.h5", "r") as inc, h5py.File(tmp_path / "whole.h5", "r") as whole:
        assert sorted(inc) == sorted(whole)
        for key in whole:
            assert inc[key].dtype == whole[key].dtype, key
            np.testing.assert_array_equal(inc[key][()], whole[key][()], err_msg=key)
        assert dict(inc.attrs) == dict(whole.attrs)
    assert read_result(tmp_path / "inc.h5").lengths.tolist() == [
        [2, 0], [1, 3], [0, 0], [0, 0], [0, 4],
    ]  # fmt: skip


def all_zero_batch(n_samples, output_size):
    return CascadeResult(
        np.zeros((0, output_size), np.float32), np.zeros((n_samples, 2), np.int64)
    )


def test_ragged_h5_writer_without_batches(tmp_path):
    with RaggedH5Writer(tmp_path / "empty.h5", outer_steps=4, output_size=2):
        pass
    result = read_result(tmp_path / "empty.h5")
    assert (result.n_samples, result.outer_steps, result.output_size) == (0, 4, 2)
    assert result.values.dtype == np.float32


def test_ragged_h5_writer_removes_temp_on_error(tmp_path):
    with pytest.raises(DataError, match="expected batches with 2 outer steps and output size 2"):
        with RaggedH5Writer(tmp_path / "out.h5", outer_steps=2, output_size=2) as writer:
            writer.append(hand_result())
            writer.append(no_samples())
    assert os.listdir(tmp_path) == []


def test_ragged_h5_writer_refuses_existing_path_before_work(tmp_path):
    (tmp_path / "out.h5").write_bytes(b"old")
    with pytest.raises(DataError, match="already exists; pass overwrite=True"):
        RaggedH5Writer(tmp_path / "out.h5", outer_steps=2, output_size=2)
    with RaggedH5Writer(tmp_path / "out.h5", outer_steps=2, output_size=2, overwrite=True) as w:
        w.append(hand_result())
    assert_same(read_result(tmp_path / "out.h5"), hand_result())


# --- reading errors --------------------------------------------------------------------


def rewrite_npz(path, **changes):
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays.update(changes)
    arrays = {key: value for key, value in arrays.items() if value is not None}
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def test_read_not_a_cascade_file(tmp_path):
    path = tmp_path / "train.h5"
    with h5py.File(path, "w") as file:
        file["inputs"] = np.zeros((2, 3, 4))
    with pytest.raises(DataError) as error:
        read_result(path)
    assert str(error.value) == (
        f"'{path}' is not a cascade result: key 'layout' is missing "
        "(expected one of ragged, padded)"
    )
    with pytest.raises(DataError, match="key 'layout' is missing"):
        read_result_attrs(path)
    np.savez(tmp_path / "x.npz", inputs=np.zeros(3))
    with pytest.raises(DataError, match=f"{quoted(tmp_path / 'x.npz')} is not a cascade result"):
        read_result(tmp_path / "x.npz")


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
@pytest.mark.parametrize("key", ["flat_values", "row_splits_0", "row_splits_1", "lengths"])
def test_read_missing_key(tmp_path, suffix, key):
    path = tmp_path / f"out{suffix}"
    write_result(path, hand_result())
    if suffix == ".h5":
        with h5py.File(path, "a") as file:
            del file[key]
    else:
        rewrite_npz(path, **{key: None})
    with pytest.raises(DataError) as error:
        read_result(path)
    assert str(error.value) == (
        f"'{path}' is not a complete cascade result: key '{key}' is missing"
    )


def test_read_wrong_format_version(tmp_path):
    path = tmp_path / "out.h5"
    write_result(path, hand_result())
    with h5py.File(path, "a") as file:
        file.attrs["format_version"] = 2
    with pytest.raises(DataError, match=r"key 'format_version': expected 1, received 2"):
        read_result(path)
    write_result(tmp_path / "out.npz", hand_result())
    rewrite_npz(tmp_path / "out.npz", format_version=None)
    with pytest.raises(DataError, match="key 'format_version' is missing"):
        read_result(tmp_path / "out.npz")
    rewrite_npz(tmp_path / "out.npz", format_version=np.array(1), layout=np.array("jagged"))
    with pytest.raises(DataError, match="key 'layout': expected one of ragged, padded"):
        read_result(tmp_path / "out.npz")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"row_splits_1": np.array([0, 3, 2, 4, 6])}, "key 'row_splits_1': expected non-decreasing"),
        ({"row_splits_1": np.array([0, 3, 3, 4, 5])}, "key 'row_splits_1': expected to end at 6"),
        ({"row_splits_0": np.array([0, 1, 4])}, "key 'row_splits_0': expected uniform steps"),
        ({"lengths": np.array([[3, 0], [2, 1]])}, "key 'lengths': expected .* differences of row_splits_1"),
        ({"lengths": np.array([[3, 0, 1, 2]])}, "key 'row_splits_0': expected steps of 4"),
        ({"flat_values": np.zeros((6, 2), np.int32)}, "key 'flat_values': expected floats"),
    ],
)
def test_read_inconsistent_ragged(tmp_path, changes, message):
    path = tmp_path / "out.npz"
    write_result(path, hand_result())
    rewrite_npz(path, **changes)
    with pytest.raises(DataError, match=f"^{quoted(path)} {message}"):
        read_result(path)


def test_read_inconsistent_padded(tmp_path):
    path = tmp_path / "out.h5"
    write_result(path, hand_result(), layout="padded")
    with h5py.File(path, "a") as file:
        mask = file["mask"][()]
        mask[0, 1, 0] = True
        file["mask"][...] = mask
    with pytest.raises(DataError, match=f"^{quoted(path)} key 'mask': expected shape"):
        read_result(path)
    write_result(path, hand_result(), layout="padded", overwrite=True)
    with h5py.File(path, "a") as file:
        file["lengths"][0, 0] = 4
    with pytest.raises(DataError, match=f"^{quoted(path)} key 'lengths': expected at most the padded"):
        read_result(path)


def test_read_refuses_object_arrays(tmp_path):
    path = tmp_path / "out.npz"
    write_result(path, hand_result())
    rewrite_npz(path, flat_values=np.array([object(), 1], dtype=object))
    with pytest.raises(DataError, match=f"{quoted(path)} key 'flat_values' cannot be read without pickle"):
        read_result(path)


def test_read_refuses_external_and_virtual_datasets(tmp_path):
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.arange(12.0).tobytes())
    external = tmp_path / "external.h5"
    write_result(external, CascadeResult(np.arange(12.0).reshape(6, 2), LENGTHS))
    with h5py.File(external, "a") as file:
        del file["flat_values"]
        file.create_dataset(
            "flat_values", shape=(6, 2), dtype="f8", external=[(str(raw), 0, h5py.h5f.UNLIMITED)]
        )
    with pytest.raises(DataError, match="keeps its data in external files.*nothing outside the file is read"):
        read_result(external)

    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as file:
        file["x"] = np.arange(12.0).reshape(6, 2)
    virtual = tmp_path / "virtual.h5"
    write_result(virtual, CascadeResult(np.arange(12.0).reshape(6, 2), LENGTHS))
    with h5py.File(virtual, "a") as file:
        del file["flat_values"]
        layout = h5py.VirtualLayout(shape=(6, 2), dtype="f8")
        layout[:] = h5py.VirtualSource(str(source), "x", shape=(6, 2))
        file.create_virtual_dataset("flat_values", layout)
    with pytest.raises(DataError, match="'flat_values'.*is a virtual dataset.*nothing outside the file is read"):
        read_result(virtual)


def test_read_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=f"result file {quoted(tmp_path / 'nope.h5')} does not exist"):
        read_result(tmp_path / "nope.h5")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match=f"{quoted(tmp_path / 'bad.h5')} is not a readable HDF5 file"):
        read_result(tmp_path / "bad.h5")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=f"{quoted(tmp_path / 'bad.npz')} is not a readable .npz file"):
        read_result(tmp_path / "bad.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataError, match="holds a single array; expected an .npz archive"):
        read_result_attrs(tmp_path / "one.npy")
    write_result(tmp_path / "out.csv", hand_result())
    with pytest.raises(DataError, match="is csv, which cannot be read back"):
        read_result(tmp_path / "out.csv")
    (tmp_path / "out.dat").write_bytes(b"plain")
    with pytest.raises(DataError, match="is neither HDF5 nor .npz"):
        read_result(tmp_path / "out.dat")
    with pytest.raises(DataError, match="is a folder"):
        read_result(tmp_path)


# --- streaming: a batch of samples at a time ---------------------------------------------


def five_samples():
    """N=5, Ta=2, O=2; sample 2 emits nothing; values 0..23 in value order."""
    lengths = [[2, 1], [0, 3], [0, 0], [1, 0], [2, 3]]
    return CascadeResult(np.arange(24, dtype=np.float32).reshape(12, 2), lengths)


def no_outer_steps():
    return CascadeResult(np.zeros((0, 2), np.float32), np.zeros((3, 0), np.int64))


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
@pytest.mark.parametrize(("layout", "time_major"), [("ragged", False), ("padded", False), ("padded", True)])
def test_pieces_are_batches_of_samples_that_concatenate_exactly(tmp_path, suffix, layout, time_major):
    path = tmp_path / f"r{suffix}"
    write_result(path, five_samples(), layout=layout, time_major=time_major)
    with open_result(path) as reader:
        assert (reader.n_samples, reader.outer_steps, reader.output_size) == (5, 2, 2)
        assert (reader.total, reader.max_length, reader.layout) == (12, 3, layout)
        assert reader.lengths.tolist() == [[2, 1], [0, 3], [0, 0], [1, 0], [2, 3]]
        pieces = list(reader.pieces(batch_samples=2))
    assert [piece.n_samples for piece in pieces] == [2, 2, 1]
    assert [piece.total for piece in pieces] == [6, 1, 5]  # (2+1+0+3), (0+0+1+0), (2+3)
    np.testing.assert_array_equal(pieces[1].values, [[12, 13]])  # sample 3's one step
    assert_same(CascadeResult.concatenate(pieces), five_samples())
    assert_same(CascadeResult.concatenate(iter_result(path, batch_samples=3)), five_samples())


@pytest.mark.parametrize("source_suffix", [".h5", ".npz"])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("out.h5", {}), ("out.npz", {}), ("out.h5", {"layout": "padded"}),
     ("out.npz", {"layout": "padded", "time_major": True, "pad_value": -1.0}),
     ("out.h5", {"layout": "padded", "time_major": True}), ("out.npz", {"layout": "padded"}),
     ("out.csv", {})],
)
def test_write_result_from_a_reader_equals_writing_the_whole_result(tmp_path, source_suffix, name, kwargs):
    source = tmp_path / f"source{source_suffix}"
    write_result(source, five_samples())
    (tmp_path / "streamed").mkdir()
    (tmp_path / "whole").mkdir()
    with open_result(source) as reader:
        write_result(tmp_path / "streamed" / name, reader, batch_samples=2, attrs={"seed": 3}, **kwargs)
    write_result(tmp_path / "whole" / name, five_samples(), attrs={"seed": 3}, **kwargs)
    streamed, whole = tmp_path / "streamed" / name, tmp_path / "whole" / name
    assert os.listdir(tmp_path / "streamed") == [name]  # no part files left
    if name.endswith(".csv"):
        assert streamed.read_text() == whole.read_text()
        assert streamed.read_text().splitlines()[7] == "3,0,0,12,13"  # sample 3 comes after the empty sample 2
        return
    assert_same(read_result(streamed), five_samples())
    assert read_result_attrs(streamed) == read_result_attrs(whole)
    if name.endswith(".npz"):
        with np.load(streamed, allow_pickle=False) as a, np.load(whole, allow_pickle=False) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in b.files:
                assert a[key].dtype == b[key].dtype, key
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_padded_npz_streamed_by_hand(tmp_path):
    source = tmp_path / "r.h5"
    write_result(source, five_samples())
    with open_result(source) as reader:
        write_result(tmp_path / "p.npz", reader, layout="padded", pad_value=-1.0, time_major=True, batch_samples=1)
    with np.load(tmp_path / "p.npz", allow_pickle=False) as archive:
        values, mask = archive["values"], archive["mask"]
    assert values.shape == (2, 3, 5, 2) and mask.shape == (2, 3, 5)
    # Sample 4, outer step 1: its three steps are values rows 9, 10, 11.
    assert values[1, :, 4].tolist() == [[18, 19], [20, 21], [22, 23]]
    # Sample 1, outer step 0 emitted nothing.
    assert values[0, :, 1].tolist() == [[-1, -1]] * 3
    assert mask[:, :, 2].tolist() == [[False] * 3, [False] * 3]


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
@pytest.mark.parametrize("make", [no_samples, all_zero, no_outer_steps])
@pytest.mark.parametrize(("layout", "time_major"), [("ragged", False), ("padded", False), ("padded", True)])
def test_empty_results_stream(tmp_path, suffix, make, layout, time_major):
    path = tmp_path / f"r{suffix}"
    write_result(path, make(), layout=layout, time_major=time_major)
    with open_result(path) as reader:
        assert (reader.n_samples, reader.outer_steps, reader.total) == (
            make().n_samples, make().outer_steps, 0)
        pieces = list(reader.pieces(batch_samples=2))
        assert sum(piece.n_samples for piece in pieces) == make().n_samples
        assert all(piece.total == 0 for piece in pieces)
        write_result(tmp_path / f"copy{suffix}", reader, layout=layout, time_major=time_major)
        write_result(tmp_path / "copy.csv", reader)
    assert_same(read_result(tmp_path / f"copy{suffix}"), make())
    assert (tmp_path / "copy.csv").read_text() == "sample,outer,inner,y0,y1\n"


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_reader_reads_the_values_one_batch_at_a_time(tmp_path, suffix, monkeypatch):
    path = tmp_path / f"r{suffix}"
    big = CascadeResult(np.arange(400, dtype=np.float64).reshape(200, 2), np.full((100, 2), 1))
    write_result(path, big)
    reads = []
    for reader_class in (results_io._H5Array, h5.NpyMember):
        original = reader_class.read

        def recording(self, start=None, stop=None, *, axis=0, original=original):
            array = original(self, start, stop, axis=axis)
            reads.append((self.key, array.shape))
            return array

        monkeypatch.setattr(reader_class, "read", recording)
    with open_result(path) as reader:
        opened = [key for key, _ in reads if key not in LAYOUT_ATTRS]
        assert opened == ["lengths", "row_splits_0", "row_splits_1"]  # no values on opening
        for piece in reader.pieces(batch_samples=7):
            assert reads[-1] == ("flat_values", (piece.total, 2)) and piece.n_samples <= 7
    assert max(shape[0] for key, shape in reads if key == "flat_values") == 14  # 7 samples of 2 steps


def test_streamed_mask_check_names_file_and_key(tmp_path):
    path = tmp_path / "out.npz"
    write_result(path, five_samples(), layout="padded")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["mask"][4, 1, 0] = False
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    with open_result(path) as reader:
        pieces = reader.pieces(batch_samples=2)
        assert next(pieces).n_samples == 2  # samples 0 and 1 are fine
        with pytest.raises(DataError, match=f"^{quoted(path)} key 'mask': expected shape"):
            list(pieces)
    with pytest.raises(DataError, match="key 'mask'"):
        with open_result(path) as reader:
            write_result(tmp_path / "copy.h5", reader, batch_samples=2)
    assert sorted(os.listdir(tmp_path)) == ["out.npz"]


def test_batch_samples_must_be_positive(tmp_path):
    write_result(tmp_path / "r.h5", five_samples())
    with open_result(tmp_path / "r.h5") as reader:
        with pytest.raises(DataError, match="^batch_samples: expected a positive integer, received 0$"):
            list(reader.pieces(batch_samples=0))
    with pytest.raises(DataError, match="closed"):
        list(reader.pieces())


def test_spec_names_every_key_once():
    assert LAYOUT_KEYS["ragged"] == ("flat_values", "row_splits_0", "row_splits_1", "lengths")
    assert LAYOUT_KEYS["padded"] == ("values", "lengths", "mask")
    assert LAYOUT_ATTRS == ("layout", "format_version", "pad_value", "time_major")
    assert results_io.OPTIONAL_KEYS == {"ragged": ("tokens",), "padded": ("tokens",)}
    assert RESERVED_ATTRS == {"layout", "format_version", "pad_value", "time_major", "flat_values",
                              "row_splits_0", "row_splits_1", "lengths", "values", "mask", "tokens"}
    assert run_attrs({"layout": "ragged", "format_version": 1, "pad_value": 0.0, "time_major": False,
                      "seed": 3, "state": "reset"}) == {"seed": 3, "state": "reset"}


def test_part_files_of_a_killed_npz_write_are_removed_by_the_next_write(tmp_path):
    code = (
        "import os, sys\n"
        "import numpy as np\n"
        "from cascade_cli import h5, results_io\n"
        "from cascade_cli.result import CascadeResult\n"
        "real = results_io._RawColumn.extend\n"
        "def extend(self, array):\n"
        "    real(self, array)\n"
        "    if self.rows >= 2:\n"
        "        os._exit(9)\n"
        "results_io._RawColumn.extend = extend\n"
        "result = CascadeResult(np.zeros((4, 1), np.float32), [[1, 1], [1, 1]])\n"
        "results_io.write_result(sys.argv[1], result, batch_samples=1)\n"
    )
    target = tmp_path / "out.npz"
    assert subprocess.run([sys.executable, "-c", code, str(target)]).returncode == 9
    left = sorted(os.listdir(tmp_path))
    assert left and all(name.startswith(".out.npz.cascade-tmp-") for name in left)
    assert any(name.endswith(".flat_values") for name in left)  # a part file, named after the temporary file
    write_result(target, hand_result())
    assert os.listdir(tmp_path) == ["out.npz"]


# --- writing safely: inputs, full disks, sizes ---------------------------------------------


def test_a_result_is_never_written_over_the_file_it_is_read_from(tmp_path, monkeypatch):
    write_result(tmp_path / "r.h5", hand_result())
    (tmp_path / "alias.h5").symlink_to(tmp_path / "r.h5")
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "r.h5").read_bytes()
    for spelling in ("r.h5", f"./../{tmp_path.name}/r.h5", "alias.h5"):
        with open_result("r.h5") as reader, pytest.raises(DataError, match="is one of this command's inputs"):
            write_result(spelling, reader, format="h5", overwrite=True)
    with pytest.raises(DataError, match=r"'x\.h5' \(the same file as 'r\.h5'\) is one of"):
        (tmp_path / "x.h5").hardlink_to(tmp_path / "r.h5")
        RaggedH5Writer("x.h5", outer_steps=2, output_size=2, overwrite=True, inputs=["r.h5"])
    assert (tmp_path / "r.h5").read_bytes() == before


def fail_writes_after(monkeypatch, target, count):
    """Makes the `count`-th write of bytes into HDF5 (a dataset assignment) or a file fail for want of space."""
    calls = {"n": 0}

    def no_space():
        calls["n"] += 1
        if calls["n"] >= count:
            raise OSError(errno.ENOSPC, "No space left on device")

    real_set = h5py.Dataset.__setitem__
    monkeypatch.setattr(h5py.Dataset, "__setitem__", lambda self, key, value: (no_space(), real_set(self, key, value)))
    real_column = results_io._RawColumn.extend
    monkeypatch.setattr(results_io._RawColumn, "extend", lambda self, array: (no_space(), real_column(self, array)))


@pytest.mark.parametrize("name, layout", [("r.h5", "ragged"), ("r.h5", "padded"), ("r.npz", "ragged"),
                                          ("r.npz", "padded")])
def test_a_full_disk_while_writing_is_one_data_error_and_leaves_nothing(tmp_path, monkeypatch, name, layout):
    out = tmp_path / "out"
    out.mkdir()
    fail_writes_after(monkeypatch, out / name, 2)
    with pytest.raises(DataError, match=f"^no space left on device writing {quoted(out / name)}$"):
        write_result(out / name, hand_result(), layout=layout, batch_samples=1)
    assert os.listdir(out) == []


def test_a_full_disk_while_streaming_is_one_data_error_and_leaves_nothing(tmp_path, monkeypatch):
    fail_writes_after(monkeypatch, tmp_path / "r.h5", 3)
    with pytest.raises(DataError, match=f"^no space left on device writing {quoted(tmp_path / 'r.h5')}$"):
        with RaggedH5Writer(tmp_path / "r.h5", outer_steps=2, output_size=2) as writer:
            for start in range(2):
                writer.append(hand_result().slice_samples(start, start + 1))
    assert os.listdir(tmp_path) == []


_FULL_DISK = """
import sys
import numpy as np
from cascade_cli.errors import DataError
from cascade_cli.result import CascadeResult
from cascade_cli.results_io import RaggedH5Writer, write_result
folder, kind = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
piece = CascadeResult(rng.normal(size=(200_000, 4)).astype(np.float32), np.full((1000, 2), 100))
try:
    if kind == "stream":
        with RaggedH5Writer(folder + "/s.h5", outer_steps=2, output_size=4) as writer:
            for _ in range(40):
                writer.append(piece)
    else:
        write_result(folder + "/r." + kind, CascadeResult.concatenate([piece] * 20), batch_samples=1000)
except DataError as error:
    print(error)
    sys.exit(1)
"""


@pytest.mark.parametrize("kind", ["h5", "stream", "npz", "csv"])
def test_a_really_full_file_system(tmp_path, kind):
    """A 24 MiB tmpfs (where root can mount one): HDF5 writing after ENOSPC used to end in a segfault."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        done = subprocess.run([sys.executable, "-c", _FULL_DISK, str(folder), kind], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 1, done.stderr[-2000:]
        assert done.stdout.startswith("no space left on device writing"), done.stdout
        assert done.stderr == ""
        assert os.listdir(folder) == []
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_result_files_are_sized_for_their_content(tmp_path):
    """303 float32 values (1.2 KB) used to make a 1.3 MB file (chunks of 65,536 rows, no compression)."""
    lengths = np.array([[1, 2, 0], [5, 93, 0]])
    small = CascadeResult(np.linspace(0, 1, 303, dtype=np.float32).reshape(101, 3), lengths)
    write_result(tmp_path / "small.h5", small)
    with RaggedH5Writer(tmp_path / "streamed.h5", outer_steps=3, output_size=3) as writer:
        writer.append(small.slice_samples(0, 1))
        writer.append(small.slice_samples(1, 2))
    write_result(tmp_path / "padded.h5", small, layout="padded")
    for name in ("small.h5", "streamed.h5", "padded.h5"):
        assert os.path.getsize(tmp_path / name) < 24_000, name
        assert_same(read_result(tmp_path / name), small)
    rng = np.random.default_rng(0)
    big_lengths = rng.integers(0, 20, size=(2000, 8))
    smooth = np.repeat(np.arange(int(big_lengths.sum()), dtype=np.float32)[:, None] % 7, 4, axis=1)
    write_result(tmp_path / "big.h5", CascadeResult(smooth, big_lengths))
    raw = smooth.nbytes + 3 * big_lengths.nbytes
    assert os.path.getsize(tmp_path / "big.h5") < raw / 4  # compressed
    with h5py.File(tmp_path / "big.h5") as file:
        assert file["flat_values"].compression == "gzip"
        assert file["flat_values"].chunks[0] * 16 <= 1 << 20


# --- reading defensively: attribute types, forged sizes, damaged files ----------------------


def set_attr(path, key, value):
    with h5py.File(path, "a") as file:
        file.attrs[key] = value


def test_time_major_must_be_a_boolean_not_the_string_false(tmp_path):
    """The string "false" used to be read as True and the values exported transposed, with exit 0."""
    path = tmp_path / "p.h5"
    write_result(path, hand_result(), layout="padded")
    set_attr(path, "time_major", "false")
    with pytest.raises(DataError, match=r"attribute 'time_major': expected a boolean .*, received 'false'"):
        open_result(path)
    set_attr(path, "time_major", np.bool_(False))
    assert_same(read_result(path), hand_result())


@pytest.mark.parametrize("key, value, words", [
    ("layout", np.array([b"ragged", b"ragged"]), "expected a string, received an array of shape (2,)"),
    ("format_version", np.array([1, 1]), "expected an integer, received an array of shape (2,)"),
    ("format_version", 1.5, "expected an integer, received 1.5"),
    ("run_id", np.arange(3), "expected a string, received an array of shape (3,)"),
    ("pad_value", "zero", "expected a number"),
])
def test_attributes_that_must_be_scalars_are_checked(tmp_path, key, value, words):
    path = tmp_path / "r.h5"
    write_result(path, hand_result(), layout="padded", attrs={"run_id": "abc"})
    set_attr(path, key, value)
    for read in (open_result, read_result_attrs):
        with pytest.raises(DataError, match=re.escape(f"'{path}' attribute '{key}': {words}")):
            read(path)


def test_an_npz_whose_layout_is_an_array_is_refused(tmp_path):
    path = tmp_path / "r.npz"
    write_result(path, hand_result())
    with np.load(path) as archive:
        members = dict(archive)
    members["layout"] = np.array(["ragged", "padded"])
    np.savez(path, **members)
    with pytest.raises(DataError, match=r"attribute 'layout': expected a string, received an array of shape \(2,\)"):
        open_result(path)


def forged(path, **shapes):
    """A small result whose datasets declare `shapes` (sparse: nothing of them is stored)."""
    write_result(path, hand_result())
    with h5py.File(path, "a") as file:
        for key, shape in shapes.items():
            dtype = file[key].dtype
            del file[key]
            file.create_dataset(key, shape=shape, dtype=dtype, chunks=True)
    return path


@pytest.mark.parametrize("key, shape, size", [("flat_values", (2**30, 1), "4.0 GiB"),
                                              ("lengths", (2**26, 8), "4.0 GiB"),
                                              ("row_splits_1", (3 * 2**30,), "24.0 GiB")])
def test_sizes_a_small_file_declares_are_refused_before_anything_is_allocated(tmp_path, key, shape, size):
    path = forged(tmp_path / "r.h5", **{key: shape})
    assert os.path.getsize(path) < 64_000
    code = ("import sys, resource\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "from cascade_cli.results_io import open_result\n"
            "from cascade_cli.errors import DataError\n"
            "try:\n    open_result(sys.argv[1])\n"
            "except DataError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert f"'{path}' key '{key}' declares shape {shape}, which would need about {size}" in done.stdout
    assert "the file holds only" in done.stdout


def test_an_npz_member_declaring_more_than_the_archive_holds_is_refused(tmp_path):
    path = tmp_path / "r.npz"
    write_result(path, hand_result())
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1073741824, 2), }"
    header += b" " * (118 - len(header)) + b"\n"
    members["flat_values.npy"] = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(48)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(DataError, match=r"key 'flat_values' declares shape \(1073741824, 2\),? \(?(which would need "
                                        r"about )?8\.0 GiB"):
        open_result(path)


def test_lengths_that_would_not_fit_in_memory_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "r.h5"
    write_result(path, hand_result())
    monkeypatch.setattr(h5, "memory_available", lambda: 100)
    with pytest.raises(DataError, match=r"reading key 'lengths' \(2, 2\) of .* would need about 192 bytes of memory"):
        open_result(path)


def test_hdf5_errors_of_a_damaged_file_name_the_file(tmp_path, monkeypatch):
    path = tmp_path / "r.h5"
    write_result(path, hand_result())

    def broken(self, selection):
        raise RuntimeError("Can't read data (incorrect checksum)")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", broken)
    with pytest.raises(DataError) as error:
        open_result(path)
    assert str(path) in str(error.value) and "'lengths'" in str(error.value)


def test_a_damaged_value_in_an_h5_result_is_an_error_not_other_values(tmp_path):
    """Every array carries a checksum (fletcher32), and the metadata too (HDF5 1.10 format)."""
    path = tmp_path / "r.h5"
    write_result(path, CascadeResult(np.full((6, 2), 0.25, np.float32), LENGTHS))
    data = bytearray(path.read_bytes())
    where = data.find(np.float32(0.25).tobytes() * 4)
    if where < 0:  # compressed: find it by reading the chunk's place
        with h5py.File(path) as file:
            where = file["flat_values"].id.get_chunk_info(0).byte_offset
    data[where + 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="'flat_values'.*(filter|checksum|damaged)"):
        read_result(path)


def test_csv_to_dash_streams_to_standard_output_and_other_formats_refuse_it(tmp_path):
    write_result(tmp_path / "r.h5", hand_result())
    write_result(tmp_path / "r.csv", hand_result())
    code = ("import sys\nfrom cascade_cli.results_io import open_result, write_result\n"
            "with open_result(sys.argv[1]) as reader:\n    write_result('-', reader, format='csv')\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.h5")], capture_output=True, cwd=tmp_path,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (tmp_path / "r.csv").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.h5"]  # never a file named '-'
    for format in ("h5", "npz"):
        with pytest.raises(DataError, match="^output '-': expected a file name"):
            write_result("-", hand_result(), format=format)


def test_a_batch_that_would_not_fit_in_memory_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "p.h5"
    write_result(path, hand_result(), layout="padded")  # one sample: Ta 2 x L 3 x O 2 float32 = 48 bytes
    with open_result(path) as reader:
        monkeypatch.setattr(h5, "memory_available", lambda: 47)
        with pytest.raises(DataError, match=r"reading 1 samples of .* at a time would need about 48 bytes"):
            next(reader.pieces(batch_samples=1))
        monkeypatch.setattr(h5, "memory_available", lambda: 48)
        assert next(reader.pieces(batch_samples=1)).n_samples == 1
