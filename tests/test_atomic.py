"""Tests of `cascade_cli.atomic`: temporary name, rename, refusal of existing outputs, stale temps."""

import os
import subprocess
import sys

import pytest

from cascade_cli.atomic import atomic_output, check_output_path
from cascade_cli.errors import DataError
from filetools import dead_pid, quoted


def write_atomic(path, data, *, overwrite=False):
    with atomic_output(path, overwrite=overwrite) as temp:
        temp.write_bytes(data)


def test_atomic_output_success_renames(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_output(target) as temp:
        assert temp.parent == tmp_path
        assert temp.name.startswith(f".out.bin.cascade-tmp-{os.getpid()}-")
        temp.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_output_removes_temp_when_body_raises(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(target) as temp:
            temp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_output_keeps_old_file_when_body_raises(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target, overwrite=True) as temp:
            temp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_output_refuses_existing_path(tmp_path):
    target = tmp_path / "out.h5"
    target.write_bytes(b"old")
    message = f"output '{target}' already exists; pass overwrite=True to replace it"
    with pytest.raises(DataError) as error:
        with atomic_output(target):
            pytest.fail("the body must not run")
    assert str(error.value) == message
    assert target.read_bytes() == b"old"
    write_atomic(target, b"new", overwrite=True)
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.h5"]


def test_atomic_output_refuses_path_created_meanwhile(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(DataError, match="already exists"):
        with atomic_output(target) as temp:
            temp.write_bytes(b"new")
            target.write_bytes(b"other")
    assert target.read_bytes() == b"other"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_output_refuses_an_empty_body(tmp_path):
    with pytest.raises(DataError, match=f"^output {quoted(tmp_path / 'out.bin')}: nothing was written$"):
        with atomic_output(tmp_path / "out.bin"):
            pass
    assert os.listdir(tmp_path) == []


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "new.h5") == tmp_path / "new.h5"
    with pytest.raises(DataError, match=f"output folder {quoted(tmp_path / 'missing')} does not exist"):
        check_output_path(tmp_path / "missing" / "out.h5")
    with pytest.raises(DataError, match="is a folder"):
        check_output_path(tmp_path, overwrite=True)
    with pytest.raises(DataError, match="does not exist"):
        write_atomic(tmp_path / "missing" / "out.npz", b"data")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DataError, match="already exists"):  # a dangling link is still in the way
        check_output_path(tmp_path / "link")


def test_check_output_path_read_only_folder(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # root writes anywhere: report the folder as a read-only mount would
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if os.fspath(path) == os.fspath(folder)
                            else real(path, mode, **kw))
    try:
        with pytest.raises(DataError, match=f"output folder {quoted(folder)} is not writable"):
            check_output_path(folder / "out.h5")
        with pytest.raises(DataError, match="is not writable"):
            write_atomic(folder / "out.h5", b"data")
    finally:
        folder.chmod(0o700)
    assert os.listdir(folder) == []


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "out.npz"
    stale = tmp_path / f".out.npz.cascade-tmp-{dead_pid()}-0badf00d"
    live = tmp_path / f".out.npz.cascade-tmp-{os.getpid()}-12345678"
    other_target = tmp_path / f".other.npz.cascade-tmp-{dead_pid()}-0badf00d"
    for path in (stale, live, other_target):
        path.write_bytes(b"half")
    write_atomic(target, b"data")
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, live.name, other_target.name])


def test_killed_run_leaves_no_stray_file_after_next_run(tmp_path):
    target = tmp_path / "out.h5"
    code = (
        "import os, sys\n"
        "from cascade_cli.atomic import atomic_output\n"
        "with atomic_output(sys.argv[1]) as temp:\n"
        "    temp.write_bytes(b'half')\n"
        "    os._exit(9)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code, str(target)])
    assert completed.returncode == 9
    leftovers = os.listdir(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.h5.cascade-tmp-")
    write_atomic(target, b"data")
    assert os.listdir(tmp_path) == ["out.h5"]


def test_atomic_output_suffix_and_its_stale_temps(tmp_path):
    target = tmp_path / "model.keras"
    with atomic_output(target, suffix=".keras") as temp:
        assert temp.name.endswith(".keras") and temp.name.startswith(".model.keras.cascade-tmp-")
        temp.write_bytes(b"first")
    stale = tmp_path / ".model.keras.cascade-tmp-999999999-abcd1234.keras"  # no such pid
    stale.write_bytes(b"half")
    with atomic_output(target, overwrite=True, suffix=".keras") as temp:
        temp.write_bytes(b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]
