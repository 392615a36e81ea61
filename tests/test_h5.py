"""Tests for `cascade_cli.h5`: safe HDF5 opens and keyed reads."""

import io
import os
import re
import zipfile

import h5py
import numpy as np
import pytest

from cascade_cli.errors import DataError
from cascade_cli import h5 as h5_module
from cascade_cli.h5 import (NpyMember, _selection_count, check_file, h5_dataset, is_hdf5, np_load, open_h5, open_npz,
                            read_attr, read_dataset, scalar_value, size_text)
from filetools import quoted, write_h5


def test_open_h5_reads_a_plain_file(tmp_path):
    path = write_h5(tmp_path / "ok.h5", x=np.arange(3.0))
    with h5py.File(path, "a") as f:
        f["alias"] = h5py.SoftLink("/x")  # links inside the file are fine
    with open_h5(path) as f:
        np.testing.assert_array_equal(f["alias"][()], [0.0, 1.0, 2.0])
        assert f.mode == "r"


def test_open_h5_refuses_external_link(tmp_path):
    write_h5(tmp_path / "other.h5", data=np.arange(3.0))
    path = tmp_path / "linked.h5"
    with h5py.File(path, "w") as f:
        f.create_group("group")["inputs"] = h5py.ExternalLink("other.h5", "/data")
    with pytest.raises(DataError) as info:
        with open_h5(path):
            pass
    message = str(info.value)
    assert f"'{path}' links 'group/inputs' to another file ('other.h5:/data')" in message
    assert "nothing outside the file is read" in message


def test_open_h5_refuses_external_storage(tmp_path):
    (tmp_path / "raw.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    path = tmp_path / "external.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("inputs", shape=(4,), dtype="f4", external=[("raw.bin", 0, 16)])
    with pytest.raises(DataError, match=r"dataset 'inputs' in '.*external\.h5' keeps its data in external files \('raw\.bin'\).*nothing outside the file is read"):
        with open_h5(path):
            pass


def test_open_h5_refuses_virtual_dataset(tmp_path):
    source = write_h5(tmp_path / "source.h5", data=np.arange(6.0))
    path = tmp_path / "virtual.h5"
    layout = h5py.VirtualLayout(shape=(6,), dtype="f8")
    layout[:] = h5py.VirtualSource(str(source), "data", shape=(6,))
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("inputs", layout)
    with pytest.raises(DataError, match=r"dataset 'inputs' in '.*virtual\.h5' is a virtual dataset.*nothing outside the file is read"):
        with open_h5(path):
            pass


def test_open_h5_truncated_random_missing_and_directory(tmp_path):
    good = write_h5(tmp_path / "good.h5", x=np.arange(5000.0))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:3000])
    one_short = tmp_path / "one_short.h5"
    one_short.write_bytes(good.read_bytes()[:-1])
    noise = tmp_path / "noise.h5"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    for path in (truncated, one_short, noise, empty):
        with pytest.raises(DataError, match=f"^'{path}' is not a readable HDF5 file: "):
            with open_h5(path):
                pass
    with pytest.raises(DataError, match=r"'.*missing\.h5' does not exist: expected an HDF5 file"):
        with open_h5(tmp_path / "missing.h5"):
            pass
    with pytest.raises(DataError, match=r"is a directory: expected an HDF5 file"):
        with open_h5(tmp_path):
            pass


def test_h5_dataset_checks(tmp_path):
    path = write_h5(tmp_path / "d.h5", floats=np.zeros((2, 3)), ints=np.zeros(3, dtype=np.int16))
    with h5py.File(path, "a") as f:
        f.create_group("group")
        f.create_dataset("names", data=np.array([b"a", b"b"]))
    with open_h5(path) as f:
        assert h5_dataset(f, "floats", path=path, ndim=2, kind="float").shape == (2, 3)
        assert h5_dataset(f, "ints", path=path, ndim=1, kind="int").dtype == np.int16
        assert h5_dataset(f, "ints", path=path, kind="numeric").shape == (3,)
        with pytest.raises(DataError, match=r"'.*d\.h5' has no dataset 'inputs': expected a dataset 'inputs', received keys \['floats', 'group', 'ints', 'names'\]"):
            h5_dataset(f, "inputs", path=path)
        with pytest.raises(DataError, match=r"'group' in '.*d\.h5' is a group: expected a dataset"):
            h5_dataset(f, "group", path=path)
        with pytest.raises(DataError, match=r"dataset 'floats' in '.*d\.h5' has 2 dimensions: expected 3, received shape \(2, 3\)"):
            h5_dataset(f, "floats", path=path, ndim=3)
        with pytest.raises(DataError, match=r"dataset 'floats' in '.*d\.h5' has dtype float64: expected integers"):
            h5_dataset(f, "floats", path=path, kind="int")
        with pytest.raises(DataError, match=r"dataset 'names' .* expected integers or floating-point numbers"):
            h5_dataset(f, "names", path=path, kind="numeric")


def test_np_load_tells_the_kind_from_the_first_bytes(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([1, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"^'.*objects\.npy' holds Python objects or pickled data: expected an array"):
        np_load(tmp_path / "objects.npy", expected="an array")
    (tmp_path / "text.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"'.*text\.npz' is not readable as an array: it is neither a \.npy array "
                                        r"nor a \.npz archive$"):
        np_load(tmp_path / "text.npz", expected="an array")
    (tmp_path / "cut.npy").write_bytes(b"\x93NUMPY\x01")
    with pytest.raises(DataError, match=r"^'.*cut\.npy' is not readable as an array: "):
        np_load(tmp_path / "cut.npy", expected="an array")
    np.save(tmp_path / "ok.npy", np.arange(3))
    assert np_load(tmp_path / "ok.npy", mmap_mode="r", expected="an array").tolist() == [0, 1, 2]


def test_is_hdf5_and_keyed_read_errors(tmp_path):
    path = write_h5(tmp_path / "d.h5", x=np.arange(4.0))
    (tmp_path / "plain.bin").write_bytes(b"plain")
    assert is_hdf5(path) and not is_hdf5(tmp_path / "plain.bin")
    with open_h5(path) as f:
        dset = h5_dataset(f, "x", path=path)
        assert read_dataset(dset, slice(1, 3), path=path).tolist() == [1.0, 2.0]
    # A dataset whose chunk is damaged on disk: the read fails, naming file and key.
    damaged = tmp_path / "damaged.h5"
    with h5py.File(damaged, "w") as f:
        f.create_dataset("y", data=np.arange(1000.0), chunks=(1000,), compression="gzip")
        offset = f["y"].id.get_chunk_info(0).byte_offset
    data = bytearray(damaged.read_bytes())
    data[offset : offset + 64] = b"\0" * 64
    damaged.write_bytes(bytes(data))
    with open_h5(damaged) as f:
        with pytest.raises(DataError, match=r"^could not read dataset 'y' from '.*damaged\.h5': ") as info:
            read_dataset(h5_dataset(f, "y", path=damaged), (), path=damaged)
    assert isinstance(info.value.__cause__, OSError)


def test_npy_member_reads_blocks_along_any_axis(tmp_path):
    cube = np.arange(2 * 3 * 4, dtype=">i4").reshape(2, 3, 4)  # big-endian on purpose
    np.savez(tmp_path / "a.npz", cube=cube, scalar=np.array("ragged"), fortran=np.asfortranarray(cube))
    with open_npz(tmp_path / "a.npz", expected="an archive") as archive:
        member = NpyMember(archive, "cube", path=tmp_path / "a.npz")
        assert member.shape == (2, 3, 4) and member.dtype == np.dtype(">i4")
        assert member.read(1, 2).tolist() == [[[12, 13, 14, 15], [16, 17, 18, 19], [20, 21, 22, 23]]]
        assert member.read(1, 3, axis=1).tolist() == [[[4, 5, 6, 7], [8, 9, 10, 11]],
                                                      [[16, 17, 18, 19], [20, 21, 22, 23]]]
        assert member.read(2, 3, axis=2).tolist() == [[[2], [6], [10]], [[14], [18], [22]]]
        np.testing.assert_array_equal(member.read(), cube)
        assert str(NpyMember(archive, "scalar", path="a.npz").read()) == "ragged"
        np.testing.assert_array_equal(NpyMember(archive, "fortran", path="a.npz").read(0, 1, axis=1), cube[:, :1])


def test_npy_member_and_open_npz_errors(tmp_path):
    np.savez(tmp_path / "o.npz", o=np.array([1, None], dtype=object))
    with open_npz(tmp_path / "o.npz", expected="an archive") as archive:
        with pytest.raises(DataError, match=r"^'o\.npz' key 'o' cannot be read without pickle: it holds Python objects$"):
            NpyMember(archive, "o", path="o.npz")
        with pytest.raises(DataError, match=r"^'o\.npz' key 'missing' cannot be read: "):
            NpyMember(archive, "missing", path="o.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataError, match=r"'.*one\.npy' holds a single array; expected an archive$"):
        with open_npz(tmp_path / "one.npy", expected="an archive"):
            pass
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"'.*bad\.npz' is not a readable \.npz file: "):
        with open_npz(tmp_path / "bad.npz", expected="an archive"):
            pass


def test_check_file_requires_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    # Without the check, h5py and numpy would block forever opening a FIFO with no writer.
    for reader in (lambda: open_h5(fifo).__enter__(), lambda: np_load(fifo, expected="an array"),
                   lambda: open_npz(fifo, expected="an archive").__enter__(), lambda: is_hdf5(fifo)):
        with pytest.raises(DataError, match=rf"^{quoted(fifo)} is a FIFO \(named pipe\), not a regular file: expected "):
            reader()
    with pytest.raises(DataError, match=r"'/dev/null' is a character device, not a regular file: expected inputs"):
        check_file("/dev/null", expected="inputs")
    link = tmp_path / "link.h5"
    link.symlink_to(write_h5(tmp_path / "real.h5", x=np.arange(2)))
    check_file(link, expected="an HDF5 file")  # a symlink to a regular file is fine


def test_soft_link_loops_are_refused_on_opening(tmp_path):
    path = write_h5(tmp_path / "loop.h5", x=np.arange(3))
    with h5py.File(path, "a") as f:
        f["a"] = h5py.SoftLink("/b")
        f["b"] = h5py.SoftLink("/a")
        f["dangling"] = h5py.SoftLink("/nowhere")  # legal HDF5: refused only when read
    with pytest.raises(DataError, match=rf"^soft link 'a' in {quoted(path)} does not resolve \(a loop of links\): "
                                        "expected a self-contained HDF5 file"):
        with open_h5(path):
            pass
    self_loop = write_h5(tmp_path / "self.h5", x=np.arange(3))
    with h5py.File(self_loop, "a") as f:
        f["inputs"] = h5py.SoftLink("/inputs")
    with pytest.raises(DataError, match=r"soft link 'inputs' in .* does not resolve \(a loop of links\)"):
        with open_h5(self_loop):
            pass


def test_h5_dataset_refuses_null_dataspace_and_dangling_links(tmp_path):
    path = write_h5(tmp_path / "null.h5", x=np.arange(3))
    with h5py.File(path, "a") as f:
        f.create_dataset("steps", data=h5py.Empty("i8"))
        f["dangling"] = h5py.SoftLink("/nowhere")
    with open_h5(path) as f:
        with pytest.raises(DataError, match=rf"^dataset 'steps' in {quoted(path)} has a null dataspace \(no shape, "
                                            r"no values\): expected an array$"):
            h5_dataset(f, "steps", path=path)
        with pytest.raises(DataError, match=rf"^'{re.escape('dangling')}' in {quoted(path)} is a soft link to "
                                            r"'/nowhere', which does not exist: expected a dataset$"):
            h5_dataset(f, "dangling", path=path)


@pytest.mark.parametrize("error", [RuntimeError("Special link traversal failed"), SystemError("FastRLock"),
                                   TypeError("bad type"), ValueError("bad value"), KeyError("bad key"),
                                   OSError("bad chunk")])
def test_every_h5py_failure_of_a_read_is_a_keyed_data_error(tmp_path, error):
    class Broken:
        name, shape, dtype = "/targets", (3,), np.dtype("f4")

        def __getitem__(self, selection):
            raise error

    with pytest.raises(DataError, match=r"^could not read dataset 'targets' from 'f\.h5': ") as info:
        read_dataset(Broken(), (), path="f.h5")
    assert info.value.__cause__ is error


def test_read_attr_checks_the_type(tmp_path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update({"time_major": np.bool_(True), "text_bool": "false", "version": np.int64(1),
                        "layout": "ragged", "bytes_layout": np.bytes_(b"padded"), "pad": 0.5,
                        "pad_int": 2, "pair": np.array([1, 2]), "one": np.array([3]), "flag": 1,
                        "empty": h5py.Empty("f4")})
    with open_h5(path) as f:
        assert read_attr(f, "time_major", kind=bool, path=path) is True
        assert read_attr(f, "version", kind=int, path=path) == 1
        assert type(read_attr(f, "version", kind=int, path=path)) is int
        assert read_attr(f, "layout", kind=str, path=path) == "ragged"
        assert read_attr(f, "bytes_layout", kind=str, path=path) == "padded"
        assert read_attr(f, "pad", kind=float, path=path) == 0.5
        assert read_attr(f, "pad_int", kind=float, path=path) == 2.0
        assert read_attr(f, "missing", kind=int, path=path, default=None) is None
        where = rf"^{quoted(path)} attribute"
        with pytest.raises(DataError, match=where + r" 'text_bool': expected a bool \(True or False\), received 'false'$"):
            read_attr(f, "text_bool", kind=bool, path=path)
        with pytest.raises(DataError, match=where + r" 'flag': expected a bool \(True or False\), received 1$"):
            read_attr(f, "flag", kind=bool, path=path)
        with pytest.raises(DataError, match=where + r" 'time_major': expected an integer, received True$"):
            read_attr(f, "time_major", kind=int, path=path)
        with pytest.raises(DataError, match=where + r" 'pair': expected a single integer, received an array of shape \(2,\)$"):
            read_attr(f, "pair", kind=int, path=path)
        with pytest.raises(DataError, match=where + r" 'one': expected a single string, received an array of shape \(1,\)$"):
            read_attr(f, "one", kind=str, path=path)
        with pytest.raises(DataError, match=where + r" 'layout': expected a number, received 'ragged'$"):
            read_attr(f, "layout", kind=float, path=path)
        with pytest.raises(DataError, match=where + r" 'empty': expected a number, received Empty$"):
            read_attr(f, "empty", kind=float, path=path)
        with pytest.raises(DataError, match=where + r" 'missing' is missing$"):
            read_attr(f, "missing", kind=int, path=path)
    assert scalar_value(np.array(True), kind=bool, where="'r.npz' key 'time_major'") is True
    with pytest.raises(DataError, match=r"^'r\.npz' key 'time_major': expected a bool \(True or False\), received 'false'$"):
        scalar_value(np.array("false"), kind=bool, where="'r.npz' key 'time_major'")


def test_a_contiguous_dataset_cannot_declare_more_than_its_file(tmp_path):
    path = tmp_path / "forged.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("flat_values", shape=(10**9,), dtype="f4")  # contiguous, never written: 3.7 GiB declared
        f.create_dataset("sparse", shape=(10**9,), dtype="f4", chunks=(1024,))  # chunked: may be sparse
        f.create_dataset("small", shape=(10,), dtype="f4")
    with open_h5(path) as f:
        with pytest.raises(DataError, match=rf"^dataset 'flat_values' in {quoted(path)} declares shape \(1000000000,\) "
                                            r"\(3\.7 GiB\) stored contiguously, but the whole file holds [0-9.]+ KiB: "
                                            r"expected a dataset that fits in its file"):
            h5_dataset(f, "flat_values", path=path)
        assert h5_dataset(f, "sparse", path=path).shape == (10**9,)
        assert h5_dataset(f, "small", path=path).shape == (10,)


def test_a_large_read_is_weighed_against_free_memory(tmp_path, monkeypatch):
    path = tmp_path / "sparse.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("lengths", shape=(2**20, 2**10), dtype="i8", chunks=(1024, 1024))  # 8 GiB declared
    monkeypatch.setattr(h5_module, "memory_available", lambda: 3 << 30)
    with open_h5(path) as f:
        dset = h5_dataset(f, "lengths", path=path)
        with pytest.raises(DataError, match=rf"^reading dataset 'lengths' from {quoted(path)} would need about 8\.0 GiB "
                                            r"of memory, more than the 3\.0 GiB available$"):
            read_dataset(dset, (), path=path)
        with pytest.raises(DataError, match=r"would need about 4\.0 GiB"):
            read_dataset(dset, (slice(0, 2**19), Ellipsis), path=path)
        assert read_dataset(dset, (slice(0, 2), slice(None)), path=path).shape == (2, 1024)
        assert read_dataset(dset, 5, path=path).shape == (1024,)


def test_selection_count_and_size_text():
    assert _selection_count((4, 5), ()) == 20
    assert _selection_count((4, 5), slice(1, 3)) == 10
    assert _selection_count((4, 5, 6), (Ellipsis, slice(0, 2))) == 40
    assert _selection_count((4, 5), (2, slice(None, None, 2))) == 3
    assert _selection_count((4, 5), ([0, 1],)) is None
    assert size_text(13207024435) == "12.3 GiB" and size_text(96) == "96 bytes" and size_text(1536) == "1.5 KiB"


def test_npy_and_npz_headers_that_declare_more_than_the_file(tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3), dtype=np.float32))
    real = buffer.getvalue()
    forged = real.replace(b"(2, 3), }" + b" " * 9, b"(2000000000, 3), }", 1)  # the header keeps its length
    assert forged != real and len(forged) == len(real)
    (tmp_path / "x.npy").write_bytes(forged)
    for mmap_mode in (None, "r"):
        with pytest.raises(DataError, match=r"'.*x\.npy' declares shape \(2000000000, 3\) \(22\.4 GiB\) but holds "
                                            r"24 bytes of data: expected an array that fits in its file"):
            np_load(tmp_path / "x.npy", mmap_mode=mmap_mode, expected="an array")
    with zipfile.ZipFile(tmp_path / "x.npz", "w") as archive:
        archive.writestr("values.npy", forged)
    with open_npz(tmp_path / "x.npz", expected="an archive") as archive:
        with pytest.raises(DataError, match=r"^'x\.npz' key 'values' declares shape \(2000000000, 3\) \(22\.4 GiB\) but "
                                            r"the archive holds 24 bytes of it: expected an array that fits"):
            NpyMember(archive, "values", path="x.npz")


def test_an_npz_member_zipfile_cannot_open_is_a_keyed_data_error(tmp_path):
    path = tmp_path / "odd.npz"
    np.savez(path, inputs=np.zeros(3))
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 10 : central + 12] = (99).to_bytes(2, "little")  # a compression method zipfile lacks
    path.write_bytes(bytes(data))
    with open_npz(path, expected="an archive") as archive:
        with pytest.raises(DataError, match=rf"^{quoted(path)} key 'inputs' cannot be read: .*compression") as info:
            NpyMember(archive, "inputs", path=path)
    assert isinstance(info.value.__cause__, NotImplementedError)


def test_a_damaged_npy_header_is_a_data_error(tmp_path):
    np.save(tmp_path / "s.npy", np.array([[2, 0, 1], [3, 1, 0]]))
    data = bytearray((tmp_path / "s.npy").read_bytes())
    data[65] = 0  # inside the header's dict: numpy's tokenizer fails (tokenize.TokenError)
    (tmp_path / "s.npy").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"'.*s\.npy' is not readable as an array: "):
        np_load(tmp_path / "s.npy", expected="an array")
