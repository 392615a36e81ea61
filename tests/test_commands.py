"""The layout of the command line: one module per command, cheap to import, over one list of runner settings.

Each command lives in `cascade_cli/commands/` and imports the library, never
another command; `cascade --help` imports neither TensorFlow nor h5py; the
runner's settings have one home (`options.RUNNER_SETTINGS`), which the runner,
the flags and a result's attributes read.
"""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import builders
from clitools import assert_ok, invoke
from filetools import write_h5
from cascade_cli import cli
from cascade_cli.cli import COMMANDS, main
from cascade_cli.errors import ParameterError
from cascade_cli.options import (RUNNER_DEFAULTS, RUNNER_SETTINGS, Sampler, StopRule, resolve_runner_settings,
                                 runner_attrs)

COMMANDS_DIR = Path(cli.__file__).parent / "commands"


# ------------------------------------------------------------------ layout


def test_every_command_lives_in_its_own_module_of_commands():
    modules = sorted(path.stem for path in COMMANDS_DIR.glob("*.py") if path.stem != "__init__")
    assert modules == sorted(COMMANDS.values())
    for name, module in COMMANDS.items():
        command = main.commands[name]
        assert command.name == name
        assert command.callback.__module__ == f"cascade_cli.commands.{module}"


def test_cli_py_defines_no_command():
    tree = ast.parse(Path(cli.__file__).read_text())
    decorated = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                 for decorator in node.decorator_list
                 if ast.unparse(decorator).startswith(("click.command", "main.command"))]
    assert decorated == []


@pytest.mark.parametrize("module", sorted(COMMANDS.values()))
def test_a_command_imports_no_other_command(module):
    tree = ast.parse((COMMANDS_DIR / f"{module}.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name.startswith("cascade_cli.commands")}


_LOADED = ("import sys; from cascade_cli.cli import main\n"
           "try:\n    main({args!r}, prog_name='cascade')\nexcept SystemExit as done:\n    assert done.code == 0\n"
           "print(sorted(name for name in ('tensorflow', 'keras', 'h5py') if name in sys.modules))")


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["train", "--help"], ["export", "--help"]])
def test_help_imports_neither_tensorflow_nor_h5py(args):
    done = subprocess.run([sys.executable, "-c", _LOADED.format(args=args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("module", sorted(COMMANDS.values()))
def test_a_command_module_imports_neither_tensorflow_nor_h5py(module):
    code = (f"import sys, cascade_cli.commands.{module}; "
            "print(sorted(name for name in ('tensorflow', 'keras', 'h5py') if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------- runner settings


def test_the_runner_reads_its_defaults_from_the_one_list():
    from cascade_cli.run.cascade import Cascade

    parameters = inspect.signature(Cascade.__init__).parameters
    defaults = {name: parameter.default for name, parameter in parameters.items()
                if parameter.kind is parameter.KEYWORD_ONLY}
    assert defaults == RUNNER_DEFAULTS
    assert [setting.name for setting in RUNNER_SETTINGS] == list(defaults)


def test_settings_not_given_take_the_saved_then_the_default():
    saved = {"state": "carry", "max_steps": 7, "stop_rule": StopRule.norm(1.5), "jit_compile": None}
    settings = resolve_runner_settings({"state": None, "max_steps": 4, "jit_compile": None}, saved)
    assert (settings["state"], settings["max_steps"], settings["stop_rule"]) == ("carry", 4, StopRule.norm(1.5))
    assert settings["jit_compile"] == "auto"  # a generator saved without one takes the runner's default
    assert settings["sampler"] == Sampler("identity")


def test_exclude_stop_step_without_a_stop_rule_is_refused_beside_the_setting():
    with pytest.raises(ParameterError, match=r"^exclude_stop_step: leaves out the step that met the stop rule, so "
                                             r"it needs a stop rule; received stop_rule=None\.$") as caught:
        resolve_runner_settings({"exclude_stop_step": True})
    assert caught.value.parameter == "exclude_stop_step"
    rule = StopRule.token(0)
    assert resolve_runner_settings({"exclude_stop_step": True, "stop_rule": rule, "max_steps": 3})["stop_rule"] == rule


@pytest.mark.parametrize("given, problem", [
    ({"state": "sideways"}, "state: expected one of reset, carry, received 'sideways'."),
    ({"max_steps": 2**31 - 1}, "max_steps: the runner counts inner steps in int32"),
    ({"stop_rule": StopRule.norm(1.0)}, "stop_rule: needs max_steps"),
    ({"min_steps": 2, "max_steps": 3}, "min_steps: holds a stop rule off"),
    ({"jit_compile": True, "run_eagerly": True}, "jit_compile: True cannot apply with run_eagerly=True"),
])
def test_each_check_lives_beside_its_setting(given, problem):
    with pytest.raises(ParameterError, match="^" + problem.replace("(", r"\(").replace(".", r"\.")):
        resolve_runner_settings(given)


def test_the_attributes_a_result_records_of_the_settings_worked_out_by_hand():
    settings = resolve_runner_settings({"max_steps": 9, "stop_rule": StopRule.token(0, 5), "min_steps": 2,
                                        "jit_compile": False, "sampler": Sampler.categorical(0.5, top_k=3)})
    assert runner_attrs(settings) == {
        "state": "reset", "state_init": "zeros", "max_steps": 9, "stop_rule": "token", "stop_value": "0,5",
        "exclude_stop_step": False, "min_steps": 2, "jit_compile": "False", "feedback": False,
        "feedback_start": "zeros", "sampler": "categorical", "temperature": 0.5, "top_k": 3, "top_p": 1.0,
        "seed": 0}
    plain = runner_attrs(resolve_runner_settings({}))
    assert "min_steps" not in plain and "max_steps" not in plain and plain["stop_rule"] == "none"


def test_a_generated_result_records_what_the_library_says(tmp_path):
    from cascade_cli.generation import generation_attrs
    from cascade_cli.results_io import read_result_attrs

    builders.model_a().save(tmp_path / "a.keras")
    builders.step_b().save(tmp_path / "b.keras")
    write_h5(tmp_path / "x.h5", inputs=builders.inputs(3, 3))
    out = tmp_path / "r.h5"
    assert_ok(invoke("generate", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--inputs",
                     tmp_path / "x.h5", "--max-steps", 4, "--stop-norm", 0.5, "--min-steps", 2, "--seed", 3,
                     "--no-xla", "-o", out))
    settings = resolve_runner_settings({"max_steps": 4, "stop_rule": StopRule.norm(0.5), "min_steps": 2, "seed": 3,
                                        "jit_compile": False})
    files = {"model_a": str(tmp_path / "a.keras"), "model_b": str(tmp_path / "b.keras"),
             "inputs": str(tmp_path / "x.h5"), "inputs_key": "inputs", "steps": "none"}
    expected = generation_attrs(settings, files=files)
    recorded = read_result_attrs(out)
    assert {key: recorded[key] for key in expected} == expected
    assert recorded["min_steps"] == 2 and recorded["stop_value"] == 0.5


# ------------------------------------------------------------ one library call per command


def test_export_model_makes_one_library_call_and_renders_what_it_returns(tmp_path, monkeypatch):
    from cascade_cli import generators

    calls = []

    def export_generator(generator, directory, **kwargs):
        calls.append((str(generator), str(directory), kwargs))
        return ("inputs", "steps"), ("flat_values", "lengths")

    monkeypatch.setattr(generators, "export_generator", export_generator)
    (tmp_path / "g.keras").write_bytes(b"")
    result = invoke("export-model", tmp_path / "g.keras", "--saved-model", tmp_path / "serving" / "1", "--overwrite")
    assert_ok(result)
    assert calls == [(str(tmp_path / "g.keras"), str(tmp_path / "serving" / "1"),
                      {"overwrite": True, "safe_mode": True})]
    assert " ".join(result.output.split()) == (
        f"Wrote the SavedModel '{tmp_path / 'serving' / '1'}': serving_default maps inputs, steps to flat_values, "
        "lengths.")


def test_export_generator_writes_the_saved_model_and_names_its_signature(tmp_path):
    import tensorflow as tf

    from cascade_cli.generators import export_generator, pack_generator

    builders.model_a().save(tmp_path / "a.keras")
    builders.step_b().save(tmp_path / "b.keras")
    pack_generator(tmp_path / "a.keras", tmp_path / "b.keras", tmp_path / "g.keras", settings={"max_steps": 3})
    names = export_generator(tmp_path / "g.keras", tmp_path / "served")
    assert names == (("inputs",), ("flat_values", "lengths"))
    served = tf.saved_model.load(str(tmp_path / "served")).signatures["serving_default"]
    out = served(inputs=tf.constant(builders.inputs(2, 3)))
    assert out["lengths"].numpy().tolist() == [[3, 3, 3], [3, 3, 3]]
