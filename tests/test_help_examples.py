"""Every command's `--help` example runs as written.

The example lines are read from each command's help (the `Example:` block):
continuations joined, comments dropped, and `cascade CMD ...` given the
arguments of the first full line of the same command, less the options the
line gives itself. The fast test parses every line with click; the slow one
runs them, command by command, in a scratch folder holding the files the
examples name: the sine task of `sample_data/` as `A.keras`, `B.keras`,
`X.h5` (its first 3 outer steps, as `--steps 3,4,2` asks), `steps.txt` and
`train.h5`, or the token task where a line says `--feedback`; a packed
`generator.keras`, a `results.h5` of the training file's inputs and steps
(so `--against train.h5` fits), a training run `run1/` and the four shards
`part*.h5`. A line's `-o` output left by an earlier line is removed first, as
a user trying the lines one after another would pick a new name.
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from cascade_cli.cli import main
from clitools import command_lines

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
COMMANDS = [""] + sorted(main.commands)


def help_text(name):
    return (main if not name else main.commands[name]).help or ""


def example_lines(text):
    """The `cascade ...` lines of a help's `Example:` block, as argument lists (without `cascade`)."""
    return command_lines(text[text.index("Example:") + len("Example:"):])


def option_groups(argv):
    """Splits arguments into `[option, *values]` groups (a leading positional group has no option)."""
    groups = [[]]
    for token in argv:
        if token.startswith("-") and not token.lstrip("-").replace(".", "").isdigit():
            groups.append([token])
        else:
            groups[-1].append(token)
    return [group for group in groups if group]


def expanded_examples(name):
    """The example lines of command `name` (of the group when empty), `...` replaced by the first full line's
    arguments less the options the line gives itself."""
    full = {}
    lines = []
    for argv in example_lines(help_text(name)):
        command = argv[0]
        if "..." not in argv:
            full.setdefault(command, argv)
            lines.append(argv)
            continue
        at = argv.index("...")
        own = {token for token in argv[at + 1:] if token.startswith("--") or token == "-o"}
        kept = [token for group in option_groups(full[command][1:]) if group[0] not in own for token in group]
        lines.append([command, *argv[1:at], *kept, *argv[at + 1:]])
    return lines


@pytest.mark.parametrize("name", COMMANDS)
def test_every_help_example_parses_with_click(name):
    lines = expanded_examples(name)
    assert lines, f"cascade {name} --help has no example"
    for argv in lines:
        with main.make_context("cascade", list(argv), resilient_parsing=False) as group:
            command = main.get_command(group, argv[0])
            assert command is not None, argv
            command.make_context(argv[0], list(argv[1:]), parent=group)  # unknown flags, types, required options


# ------------------------------------------------------------ running them


def cascade(folder, *argv):
    done = subprocess.run([sys.executable, "-m", "cascade_cli", *map(str, argv)], cwd=folder, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, f"cascade {' '.join(map(str, argv))}\n{done.stderr}"


def put_task(folder, *, tokens):
    """Copies the sine task (or the token task) into `folder` under the names the examples use."""
    task = SAMPLE / "tokens" if tokens else SAMPLE
    for source, name in (("model_a.keras", "A.keras"), ("model_b.keras", "B.keras"), ("train.h5", "train.h5")):
        shutil.copy(task / source, folder / name)
    if tokens:
        shutil.copy(task / "inputs.h5", folder / "X.h5")
    else:
        with h5py.File(SAMPLE / "inputs.h5", "r") as source, h5py.File(folder / "X.h5", "w") as target:
            target["inputs"] = source["inputs"][:, :3]  # Ta=3, as --steps 3,4,2 asks
        (folder / "steps.txt").write_text("3 4 2\n")


@pytest.fixture(scope="module")
def example_files(tmp_path_factory):
    """The files the examples name, made once."""
    folder = tmp_path_factory.mktemp("example-files")
    put_task(folder, tokens=False)
    for name in ("model_a.keras", "model_b.keras"):
        shutil.copy(SAMPLE / name, folder / name)
    cascade(folder, "pack", "--model-a", "A.keras", "--model-b", "B.keras", "--max-steps", 8, "--stop-norm", 1.2,
            "-o", "generator.keras")
    cascade(folder, "generate", "--model-a", "A.keras", "--model-b", "B.keras", "--inputs", "train.h5",
            "--steps-file", "train.h5", "-o", "results.h5")
    cascade(folder, "train", "--model-a", "A.keras", "--model-b", "B.keras", "--data", "train.h5", "--out-dir", "run1",
            "--epochs", 1)
    for shard in range(4):
        cascade(folder, "generate", "--model-a", "A.keras", "--model-b", "B.keras", "--inputs", "X.h5",
                "--steps-file", "steps.txt", "--shard", f"{shard}/4", "-o", f"part{shard}.h5")
    return folder


@pytest.mark.slow  # every example of every command, two demos and four training runs among them: minutes
@pytest.mark.parametrize("name", COMMANDS)
def test_every_help_example_runs_as_written(name, example_files, tmp_path):
    folder = tmp_path / "work"
    keep_out = {"train": {"run1"}}.get(name, set())  # train's first example makes run1 itself
    shutil.copytree(example_files, folder, ignore=lambda where, names: keep_out & set(names))
    for argv in expanded_examples(name):
        put_task(folder, tokens="--feedback" in argv)
        if "-o" in argv:
            target = folder / argv[argv.index("-o") + 1]
            if target.is_file():
                target.unlink()
        line = " ".join(shlex.quote(token) if "*" not in token else token for token in argv)  # part*.h5: a glob
        script = f'cascade() {{ "{sys.executable}" -m cascade_cli "$@"; }}; cascade {line}'
        done = subprocess.run(["bash", "-c", script], cwd=folder, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, f"cascade {line}\n{done.stderr[-3000:]}"
