"""Shared helpers of the command-line tests: run a command, check its exit and its one error line."""

import os
import shlex

from click.testing import CliRunner

from cascade_cli.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_ok(result):
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def assert_error(result, code, *words):
    """Exit `code`, exactly one `Error: ...` line holding every one of `words`, no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert result.stdout == ""


def assert_nothing_in(folder):
    assert sorted(os.listdir(folder)) == [], "an output or temporary file was left behind"


def pretend_read_only(monkeypatch, folder):
    """Makes `os.access` report `folder` as read-only, as a read-only mount would, even to root (as CI runs).

    The folder is also `chmod 0o500`, so a non-root run sees the real refusal.
    """
    folder.chmod(0o500)
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if os.fspath(path) == os.fspath(folder)
                        else real(path, mode, **kw))


def command_lines(text):
    """The `cascade ...` command lines of a shell text, as argument lists (without `cascade`).

    Continuations are joined and comments dropped.
    """
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("cascade "):
            found.append(shlex.split(line)[1:])
    return found
