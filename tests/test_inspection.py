"""Tests of `cascade_cli.inspection`: the facts `cascade inspect` prints about a file."""

import numpy as np
import pytest

from cascade_cli import h5, inspection, results_io
from cascade_cli.errors import DataError
from cascade_cli.result import CascadeResult
from cascade_cli.results_io import write_result

LENGTHS = [[3, 0], [1, 2]]


def hand_result():
    return CascadeResult(np.arange(12, dtype=np.float32).reshape(6, 2), LENGTHS)


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_describe_result_reads_the_header_and_lengths_only(tmp_path, suffix, monkeypatch):
    path = tmp_path / f"r{suffix}"
    write_result(path, hand_result(), layout="padded", pad_value=-1.0,
                 attrs={"state": "reset", "stop_rule": "norm", "stop_value": 0.5, "max_steps": 3})

    def refuse(self, start=None, stop=None, *, axis=0):
        if self.key in ("values", "mask", "flat_values"):
            raise AssertionError(f"read {self.key}")
        return original[type(self)](self, start, stop, axis=axis)

    original = {cls: cls.read for cls in (results_io._H5Array, h5.NpyMember)}
    for cls in original:
        monkeypatch.setattr(cls, "read", refuse)
    report = inspection.describe_result(path)
    rows = dict(report.rows)
    assert rows["layout"] == "padded (format_version 1)"
    assert (rows["samples N"], rows["outer steps Ta"], rows["output size O"]) == ("2", 2, 2)
    assert rows["inner steps"] == "6 emitted, longest 3"
    assert rows["padding"] == "pad_value -1.0, time_major False"
    assert rows["state"] == "reset" and "pad_value" not in rows
    assert rows["stop rule"].startswith("norm >= 0.5: 1 of 4 pairs reached")  # only (0, 0) has 3 steps
    assert report.lengths.tolist() == LENGTHS


def test_kind_of_tells_results_from_inputs_and_training(tmp_path):
    write_result(tmp_path / "r.npz", hand_result())
    write_result(tmp_path / "r.h5", hand_result())
    write_result(tmp_path / "r.csv", hand_result())
    np.savez(tmp_path / "x.npz", inputs=np.zeros((2, 3, 4)))
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4)))
    np.save(tmp_path / "s.npy", np.zeros((2, 3)))
    (tmp_path / "s.csv").write_text("1,2,3\n")
    kinds = {name: inspection.kind_of(tmp_path / name)
             for name in ("r.npz", "r.h5", "r.csv", "x.npz", "x.npy", "s.npy", "s.csv")}
    assert kinds == {"r.npz": "result", "r.h5": "result", "r.csv": "csv", "x.npz": "inputs",
                     "x.npy": "inputs", "s.npy": "steps", "s.csv": "steps"}


def test_kind_of_errors_name_the_file(tmp_path):
    (tmp_path / "cut.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(DataError, match=r"'.*cut\.npy' is not readable as a \.npy array"):
        inspection.kind_of(tmp_path / "cut.npy")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"'.*bad\.npz' is not readable as a \.npz archive"):
        inspection.kind_of(tmp_path / "bad.npz")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"'.*bad\.h5' is not a readable HDF5 file"):
        inspection.kind_of(tmp_path / "bad.h5")
    with pytest.raises(DataError, match="does not exist"):
        inspection.kind_of(tmp_path / "nope.h5")


def test_run_attrs_leave_the_layout_out():
    attrs = {"layout": "padded", "format_version": 1, "pad_value": 0.0, "time_major": True, "seed": 2}
    assert inspection.run_attrs(attrs) == {"seed": 2}
