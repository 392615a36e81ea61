"""The house's rules (DESIGN section 6), as tests: what the engine may import, how big `Cascade` may grow, and which
modules stay free of TensorFlow."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cascade_cli"
ENGINE = sorted((PACKAGE / "run").glob("*.py"))
FILES = ("h5", "atomic", "steps", "data", "result", "results_io", "shards")


def imported(path):
    """Every module `path` imports, at its top or inside a function, as dotted names (`from a import b` gives
    `a` and `a.b`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_engine_has_its_own_package():
    names = {path.stem for path in ENGINE}
    assert {"cascade", "loop", "feedback", "compiled", "checks", "xla", "stopping", "packing", "cells", "recurrence",
            "sampling", "beam", "state", "compiled_loop", "models"} <= names
    assert not (PACKAGE / "runner.py").exists()  # no shim: nothing saved on disk names the old module


@pytest.mark.parametrize("path", ENGINE, ids=lambda path: path.name)
def test_the_engine_never_imports_training_commands_or_the_command_line(path):
    names = imported(path)
    outside = sorted(name for name in names if name.split(".")[:2] in (["cascade_cli", "train"],
                                                                     ["cascade_cli", "commands"],
                                                                     ["cascade_cli", "cli"]))
    assert outside == [], f"{path.name} imports {outside}"


@pytest.mark.parametrize("path", ENGINE, ids=lambda path: path.name)
def test_the_engine_reads_no_file_but_through_the_numpy_steps_checks(path):
    """Files come to the engine as arrays; the one files module it calls is `steps`' numpy-only checks."""
    names = imported(path)
    files = sorted(name for name in names if name.split(".")[:2] in [["cascade_cli", f] for f in FILES if f != "steps"])
    assert files == [], f"{path.name} imports {files}"


def test_training_imports_the_engine_never_the_reverse():
    for path in ENGINE:
        assert not any(name.startswith("cascade_cli.train") for name in imported(path)), path.name
    training = set().union(*(imported(path) for path in (PACKAGE / "train").glob("*.py")))
    assert any(name.startswith("cascade_cli.run") for name in training)


def test_a_command_imports_no_other_command():
    for path in (PACKAGE / "commands").glob("*.py"):
        others = sorted(name for name in imported(path) if name.startswith("cascade_cli.commands.")
                        and name != f"cascade_cli.commands.{path.stem}")
        assert others == [], f"commands/{path.name} imports {others}"


def test_the_cascade_class_stays_under_500_lines():
    tree = ast.parse((PACKAGE / "run" / "cascade.py").read_text())
    [cascade] = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Cascade"]
    lines = cascade.end_lineno - cascade.lineno + 1
    assert lines < 500, f"Cascade is {lines} lines: move a path, a check or a cache into its own module of run/"


def test_every_engine_module_says_what_it_holds():
    for path in ENGINE:
        assert ast.get_docstring(ast.parse(path.read_text())), f"run/{path.name} has no docstring"


def test_the_files_modules_import_no_tensorflow():
    code = ("import sys\n"
            + "".join(f"import cascade_cli.{name}\n" for name in FILES)
            + "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"], done.stdout + done.stderr



def test_cascade_reads_the_one_list_of_runner_settings():
    """`options.RUNNER_SETTINGS` is the one list: `Cascade`'s keywords and their defaults, and `get_config`, follow
    it (as do the flags' settings and the result's attributes, `options.resolve_runner_settings`, `runner_attrs`)."""
    import inspect

    import builders
    from cascade_cli.options import RUNNER_DEFAULTS
    from cascade_cli.run.cascade import Cascade

    keywords = {name: parameter.default for name, parameter in inspect.signature(Cascade).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == RUNNER_DEFAULTS
    cascade = Cascade(builders.model_a("gru"), builders.step_b("gru"), max_steps=4, seed=7, jit_compile=False)
    config = cascade.get_config()
    assert list(config) == list(RUNNER_DEFAULTS)
    assert config["max_steps"] == 4 and config["seed"] == 7 and config["jit_compile"] is False
    again = Cascade(cascade.model_a, cascade.model_b, **config)
    assert again.get_config() == config


def test_cascade_model_reads_the_one_list_of_runner_settings():
    """`CascadeModel` takes every runner setting with `Cascade`'s default, but `run_eagerly` (Keras' `compile` owns
    that switch for a model), plus its own `window`; its `settings` and `get_config` hold them in the list's order."""
    import inspect

    import builders
    from cascade_cli.options import RUNNER_DEFAULTS
    from cascade_cli.train.keras_model import CascadeModel

    runner = {name: value for name, value in RUNNER_DEFAULTS.items() if name != "run_eagerly"}
    keywords = {name: parameter.default for name, parameter in inspect.signature(CascadeModel).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == dict(runner, window=None)
    model = CascadeModel(builders.model_a("gru"), builders.step_b("gru"), max_steps=4, seed=7, jit_compile=False)
    assert list(model.settings) == list(runner)
    assert model.settings["max_steps"] == 4 and model.settings["seed"] == 7
    config = model.get_config()
    assert [name for name in config if name in RUNNER_DEFAULTS] == list(runner)
