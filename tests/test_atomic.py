"""Tests of `cascade_cli.atomic`: temporary name, rename, refusal of existing outputs, stale temps."""

import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cascade_cli import atomic
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
    other_target = tmp_path / f".other.npz.cascade-tmp-{dead_pid()}-0badf00d"
    for path in (stale, other_target):
        path.write_bytes(b"half")
    write_atomic(target, b"data")
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, other_target.name])


def held_lock(path):
    """Opens and flocks `path` as another writer would (a new open file description); returns the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_cleanup_decides_by_lock_not_by_pid(tmp_path):
    """A writer in another PID namespace has a pid that is dead here: its held lock keeps its files."""
    target = tmp_path / "out.npz"
    pid = dead_pid()
    live = tmp_path / f".out.npz.cascade-tmp-{pid}-12345678"
    live_part = tmp_path / f"{live.name}.flat_values"
    gone = tmp_path / f".out.npz.cascade-tmp-{os.getpid()}-0badf00d"  # a live pid, but no writer holds its lock
    gone_lock = tmp_path / f"{gone.name}.lock"
    for path in (live, live_part, gone, gone_lock):
        path.write_bytes(b"half")
    fd = held_lock(tmp_path / f"{live.name}.lock")
    try:
        write_atomic(target, b"data")
        assert sorted(os.listdir(tmp_path)) == sorted([target.name, live.name, live_part.name, f"{live.name}.lock"])
    finally:
        os.close(fd)
    write_atomic(target, b"again", overwrite=True)  # the writer is gone now: its lock can be taken
    assert os.listdir(tmp_path) == ["out.npz"]


def test_a_writer_holds_a_lock_while_it_writes(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_output(target, overwrite=True) as temp:
        lock = tmp_path / f"{temp.name}.lock"
        assert sorted(os.listdir(tmp_path)) == [lock.name]
        other = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        temp.write_bytes(b"data")
        write_atomic(tmp_path / "out.bin.other", b"x")  # another target's cleanup leaves it alone
        with atomic_output(target, overwrite=True) as second:  # a second writer of the same target too
            second.write_bytes(b"second")
        assert temp.exists() and lock.exists()
    assert target.read_bytes() == b"data"
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.bin.other"]


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt()])
def test_atomic_output_removes_its_files_on_exit_and_interrupt(tmp_path, error):
    with pytest.raises(type(error)):
        with atomic_output(tmp_path / "out.bin") as temp:
            temp.write_bytes(b"half")
            raise error
    assert os.listdir(tmp_path) == []


def test_a_full_file_system_is_one_data_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(DataError, match=f"^no space left on device writing {quoted(target)}$"):
        with atomic_output(target) as temp:
            temp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert os.listdir(tmp_path) == []


def test_long_names_get_temporary_names_within_the_limit(tmp_path):
    name = "r" * 240 + ".h5"  # 243 bytes: a valid name; with the temporary mark it would exceed 255
    with atomic_output(tmp_path / name, suffix=".keras") as temp:
        assert len(os.fsencode(temp.name)) <= 255 - len(".row_splits_1")
        temp.write_bytes(b"data")
    assert os.listdir(tmp_path) == [name]
    accented = "é" * 121 + ".h5"  # 245 bytes in UTF-8, cut inside a character
    other = "r" * 239 + "s.h5"  # the same start: another hash
    for target in (accented, other):
        write_atomic(tmp_path / target, b"data")
    assert sorted(os.listdir(tmp_path)) == sorted([name, accented, other])
    stale = tmp_path / (atomic._temp_prefix(tmp_path / name) + f"{dead_pid()}-0badf00d.keras")
    stale.write_bytes(b"half")
    write_atomic(tmp_path / name, b"new", overwrite=True)
    assert not stale.exists()
    assert atomic._temp_prefix(tmp_path / name) != atomic._temp_prefix(tmp_path / other)


def test_an_output_that_is_one_of_the_inputs_is_refused_whatever_its_spelling(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    folder.mkdir()
    source = folder / "x.h5"
    source.write_bytes(b"inputs")
    (tmp_path / "link.h5").symlink_to(source)
    os.link(source, tmp_path / "hard.h5")
    monkeypatch.chdir(tmp_path)
    for spelling in ("./d/../d/x.h5", "link.h5", "hard.h5", source):
        for overwrite in (False, True):
            with pytest.raises(DataError, match="is one of this command's inputs") as error:
                with atomic_output(spelling, overwrite=overwrite, inputs=[Path("models/a.keras"), source]):
                    pytest.fail("the body must not run")
            assert str(source) in str(error.value) and str(spelling) in str(error.value)
    assert source.read_bytes() == b"inputs"
    write_atomic(folder / "y.h5", b"other")  # another name in the same folder is fine
    check_output_path("d/x2.h5", inputs=[source])


def test_dash_is_not_a_file_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="^output '-': expected a file name"):
        check_output_path("-", overwrite=True)
    assert os.listdir(tmp_path) == []


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
    leftovers = sorted(os.listdir(tmp_path))  # the temporary file and its (no longer held) lock
    assert len(leftovers) == 2 and leftovers[1] == leftovers[0] + ".lock"
    assert leftovers[0].startswith(".out.h5.cascade-tmp-")
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


def test_atomic_directory_renames_a_complete_folder_into_place_or_leaves_nothing(tmp_path):
    from cascade_cli.atomic import atomic_directory

    target = tmp_path / "model"
    with atomic_directory(target) as temp:
        (temp / "a.txt").write_text("first")
        saved_model_folder(temp, "first")
        assert not target.exists()  # nothing at the target while it is written
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(DataError, match="already holds files; pass overwrite=True"):
        with atomic_directory(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as temp:
            (temp / "b.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["model"] and sorted(os.listdir(target)) == ["a.txt", "saved_model.pb"]
    with atomic_directory(target, overwrite=True) as temp:
        (temp / "b.txt").write_text("second")
        saved_model_folder(temp, "second")
    assert sorted(os.listdir(target)) == ["b.txt", "saved_model.pb"] and sorted(os.listdir(tmp_path)) == ["model"]


# ------------------------------------------- issue 34: nothing but regular files, temporary folders


@pytest.mark.parametrize("make", ["fifo", "socket"])
def test_a_fifo_or_socket_output_is_never_replaced_even_with_overwrite(tmp_path, make):
    import socket
    import stat

    target = tmp_path / "out.csv"
    if make == "fifo":
        os.mkfifo(target)
    else:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(target))
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a regular file; cascade replaces only regular files, even with "
                                            "overwrite=True"):
            write_atomic(target, b"data", overwrite=overwrite)
    assert not stat.S_ISREG(os.lstat(target).st_mode)
    assert os.listdir(tmp_path) == ["out.csv"]


def test_a_link_to_a_fifo_is_refused_and_a_fifo_made_while_writing_is_kept(tmp_path):
    import stat

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "link.csv").symlink_to(fifo)
    with pytest.raises(DataError, match="is a named pipe"):
        check_output_path(tmp_path / "link.csv", overwrite=True)
    target = tmp_path / "late.csv"
    with pytest.raises(DataError, match="is a named pipe"):
        with atomic_output(target, overwrite=True) as temp:
            temp.write_bytes(b"data")
            os.mkfifo(target)
    assert stat.S_ISFIFO(os.lstat(target).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["late.csv", "link.csv", "pipe"]


def test_check_not_holding_inputs(tmp_path):
    from cascade_cli.atomic import check_not_holding_inputs

    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "g.keras").write_bytes(b"model")
    (tmp_path / "link").symlink_to(folder)
    check_not_holding_inputs(folder, [tmp_path / "other.keras", None])
    for source in (folder / "sub" / "g.keras", tmp_path / "link" / "sub" / "g.keras", folder):
        with pytest.raises(DataError) as error:
            check_not_holding_inputs(tmp_path / "link", [source])
        assert "one of this command's inputs" in str(error.value) and "overwrite" not in str(error.value)


def saved_model_folder(folder, text):
    (folder / "saved_model.pb").write_text(text)


def test_atomic_directory_never_replaces_a_folder_it_did_not_make(tmp_path):
    from cascade_cli.atomic import atomic_directory

    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    with pytest.raises(DataError, match="no 'saved_model.pb': it is not a folder this writer made, and it is never "
                                        "replaced, even with overwrite=True"):
        with atomic_directory(target, overwrite=True) as temp:
            saved_model_folder(temp, "new")
    assert os.listdir(target) == ["notes.txt"] and os.listdir(tmp_path) == ["mine"]
    with pytest.raises(DataError, match="holds .*one of this command's inputs"):
        with atomic_directory(target, overwrite=True, inputs=[target / "notes.txt"]):
            pytest.fail("the body must not run")


def test_temporary_folders_of_a_killed_writer_are_removed_by_the_next_one(tmp_path):
    """A SIGKILL leaves `.sm.cascade-tmp-*` (and its lock); the next writer of `sm` removes both."""
    script = (
        "import os, sys\n"
        "from cascade_cli.atomic import atomic_directory\n"
        "with atomic_directory(sys.argv[1]) as temp:\n"
        "    (temp / 'variables').mkdir()\n"
        "    (temp / 'variables' / 'half').write_bytes(b'x')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    target = tmp_path / "sm"
    subprocess.run([sys.executable, "-c", script, str(target)], env={**os.environ, "PYTHONPATH": os.getcwd()})
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and all(name.startswith(".sm.cascade-tmp-") for name in left), left
    from cascade_cli.atomic import atomic_directory

    with atomic_directory(target) as temp:
        saved_model_folder(temp, "done")
    assert os.listdir(tmp_path) == ["sm"]
    # a folder without a lock (an older cascade's) goes too, and one moved aside by a writer killed between its
    # two renames is put back where it was
    (tmp_path / f".sm.cascade-tmp-{dead_pid()}-0badf00d").mkdir()
    os.replace(target, tmp_path / f".sm.cascade-tmp-{dead_pid()}-12345678-old")
    with pytest.raises(DataError, match="already holds files"):
        with atomic_directory(target):
            pass
    assert os.listdir(tmp_path) == ["sm"] and (target / "saved_model.pb").read_text() == "done"


def test_a_live_writers_temporary_folder_is_kept(tmp_path):
    from cascade_cli.atomic import atomic_directory

    target = tmp_path / "sm"
    with atomic_directory(target) as first:
        (first / "part").write_text("writing")
        with atomic_directory(tmp_path / "sm2") as other:
            saved_model_folder(other, "x")
        assert first.is_dir()  # another target's writer leaves it alone
        assert (first / "part").exists()
        saved_model_folder(first, "done")
    assert sorted(os.listdir(tmp_path)) == ["sm", "sm2"]


def test_is_no_space_reads_tensorflow_messages_and_causes():
    from cascade_cli.atomic import is_no_space

    class ResourceExhaustedError(Exception):
        message = "sm/variables/variables.data-00000-of-00001.tempstate123; No space left on device"

    assert is_no_space(ResourceExhaustedError())
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("could not close")
    except RuntimeError as error:
        assert is_no_space(error)
    assert not is_no_space(MemoryError()) and not is_no_space(RuntimeError("out of memory"))


