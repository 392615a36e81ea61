"""The README's commands and Python snippets run as written, on the models `cascade demo` trains.

The commands of the "Commands" block run in a scratch folder holding a copy of
`sample_data/`, in the order written; a `cascade generate ...` line reuses the
arguments of the full `generate` line above it. Then the command blocks of the
feedback and generator sections run (training the token task, sampling it,
packing, `generate --model`, `export-model`). Each generated result must be
non-empty and finite. Then every Python block of the README runs, in order, in
one namespace.
"""

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cascade_cli.results_io import read_result
from clitools import command_lines

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CASCADE = [sys.executable, "-m", "cascade_cli"]


def section(heading):
    """The text of the README section under `## heading`."""
    start = README.index(f"## {heading}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def blocks(text, language):
    """The code blocks of `language` in `text` (indented blocks are dedented)."""
    pattern = re.compile(rf"^( *)```{language}\n(.*?)^\1```", re.S | re.M)
    return [textwrap.dedent(match.group(2)) for match in pattern.finditer(text)]


def run_command(argv):
    """Runs `cascade argv` as a user would; exit 0 and no warning. Returns the result it generated, or None."""
    done = subprocess.run(CASCADE + argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"cascade {' '.join(argv)}\n{done.stderr}"
    assert "Warning" not in done.stderr, f"cascade {' '.join(argv)}\n{done.stderr}"
    if argv[0] != "generate":
        return None
    result = read_result(argv[argv.index("-o") + 1])
    assert result.total > 0 and np.isfinite(result.values).all(), f"cascade {' '.join(argv)}"  # non-empty, sensible
    return result


# The sections whose command blocks run after "Commands", in the README's order.
MORE_SECTIONS = ("A generator that sees what it emitted", "Generators: A, B and the settings in one file")


def test_the_quick_start_names_the_python_and_tensorflow_versions_pyproject_pins():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    quick = " ".join(section("Quick start").split())
    assert project["requires-python"] == ">=3.11,<3.13" and "Python 3.11 or 3.12" in quick
    assert "tensorflow>=2.21,<2.22" in project["dependencies"] and "TensorFlow is pinned to the 2.21 line" in quick
    assert "python3 -m venv .venv" in quick  # a virtual environment first


def quick_start_lines():
    """The shell lines of the quick start, comments dropped."""
    (block,) = blocks(section("Quick start"), "bash")
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_quick_starts_install_and_test_commands_word_for_word_in_a_fresh_venv():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    venv, _, test = quick_start_lines()
    assert test.startswith("pip install -e '.[test]' && python -m pytest ") and test in ci
    assert test in " ".join(section("Testing").split())  # the Testing section says the same
    made = venv.replace(".venv", ".venv-ci")  # its own folder, so a developer's .venv survives a local run
    assert made.startswith("python3 -m venv ") and made in ci
    assert ci.index(made) < ci.index(test) and "set -euo pipefail" in ci
    if shutil.which("git") is not None and (ROOT / ".git").exists():
        assert subprocess.run(["git", "check-ignore", "-q", ".venv-ci/bin/python"], cwd=ROOT).returncode == 0


def test_git_ignores_what_the_demo_writes_into_the_checkout_by_default():
    import shutil as which

    from cascade_cli.cli import main

    (default,) = [option.default for option in main.commands["demo"].params if option.name == "out_dir"]
    assert default == "cascade-demo"
    if which.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", f"{default}/trained/model_a.keras"], cwd=ROOT)
    assert done.returncode == 0, f"{default}/ is not ignored by git"


def expanded(argv, full):
    """Replaces `...` in `argv` with the arguments of the last full line of the same command."""
    if "..." not in argv:
        full[argv[0]] = argv
        return argv
    base = full[argv[0]]
    keep = base[1:]
    replaces = {"-o": "-o", "--out-dir": "--out-dir", "--epochs": "--epochs", "--steps": "--steps-file"}
    for given, dropped in replaces.items():  # the line gives its own
        if given in argv and dropped in keep:
            at = keep.index(dropped)
            keep = keep[:at] + keep[at + 2:]
    at = argv.index("...")
    return [argv[0], *keep, *argv[at + 1:]]


def test_the_worked_example_comes_first_and_works_in_a_scratch_folder():
    assert README.index("## A worked example") < README.index("## Python API") < README.index("## Commands")
    (block,) = blocks(section("A worked example"), "bash")
    first = block.splitlines()[0]
    assert first.startswith("mkdir -p /tmp/") and "cp -r sample_data" in first and "&& cd /tmp/" in first
    assert [argv[0] for argv in command_lines(block)] == ["train", "pack", "generate", "plot", "plot", "export",
                                                     "export-model"]


def imported_or_bound(tree):
    """The names a Python block imports, assigns or binds."""
    import ast

    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def test_every_python_snippet_imports_what_it_uses():
    import ast

    snippets = [ast.parse(code) for code in blocks(README, "python")]
    imported = set()
    for tree in snippets:
        imported |= {(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    for code, tree in zip(blocks(README, "python"), snippets):
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        missing = (used & imported) - imported_or_bound(tree)
        assert not missing, f"this README snippet uses {sorted(missing)} without importing it:\n{code}"


@pytest.mark.slow  # the worked example, the demo, two trainings and a dozen commands: a few minutes on 2 cores
def test_the_readme_commands_and_snippets_run_as_written(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    monkeypatch.chdir(tmp_path)
    worked = [argv for argv in command_lines(blocks(section("A worked example"), "bash")[0])]
    for argv in worked:
        result = run_command(argv)
        if result is not None:  # the sampled notes, their ids kept
            assert result.tokens is not None and len(result.tokens) == result.total
    assert (tmp_path / "notes.png").is_file() and (tmp_path / "serving" / "tokens" / "1" / "saved_model.pb").is_file()
    full = {}
    ran = []
    for argv in command_lines(blocks(section("Commands"), "bash")[0]):
        if argv[0] == "merge":  # its parts come from the Scaling out loop, tested in test_shards.py
            continue
        if "--stop-token" in argv:  # needs a B whose outputs score tokens; the sample B emits one value
            continue
        argv = expanded(argv, full)
        result = run_command(argv)
        ran.append(argv[0])
        if result is not None:
            assert np.abs(result.values).max() < 3  # the sine task's targets lie in [-1.5, 1.5]
    assert ran.count("generate") == 3 and {"demo", "export", "train", "inspect"} <= set(ran)

    more = []
    for heading in MORE_SECTIONS:
        for block in blocks(section(heading), "bash"):
            for argv in command_lines(block):
                result = run_command(argv)
                more.append(argv[0])
                if result is not None and "--sampler" in argv:  # the token task: the sampled ids are kept
                    assert result.tokens is not None and len(result.tokens) == result.total
    assert more.count("generate") == 5 and {"train", "pack", "export-model", "export"} <= set(more)
    assert (tmp_path / "cascade-demo" / "serving" / "saved_model.pb").is_file()

    namespace = {}
    for code in blocks(README, "python"):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["out"].shape[:2] == (8, 12)  # the uniform-row-length rebuild
    assert namespace["generated"].shape.as_list() == [8, 12, None, 1]  # CascadeModel.predict
    np.testing.assert_allclose(namespace["generated"].flat_values.numpy(),
                               namespace["cascade"](namespace["inputs"], namespace["steps"]).flat_values.numpy(),
                               rtol=1e-5, atol=1e-6)
