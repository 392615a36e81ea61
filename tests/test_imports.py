"""The TF-free modules import without TensorFlow, so `cascade --help`, `inspect` of a file and numpy users stay fast."""

import subprocess
import sys

import pytest

TF_FREE = ("cascade_cli", "cascade_cli.errors", "cascade_cli.options", "cascade_cli.steps", "cascade_cli.h5",
           "cascade_cli.atomic", "cascade_cli.result", "cascade_cli.results_io", "cascade_cli.shards",
           "cascade_cli.inspection", "cascade_cli.progress", "cascade_cli.data", "cascade_cli.cli",
           "cascade_cli.plotting", "cascade_cli.model_files", "cascade_cli.run")


@pytest.mark.parametrize("module", TF_FREE)
def test_a_tf_free_module_does_not_import_tensorflow(module):
    code = (f"import sys, {module}; "
            "print(sorted(name for name in ('tensorflow', 'keras') if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", f"importing {module} imported {done.stdout.strip()}"


def test_the_command_line_imports_matplotlib_only_to_draw():
    code = "import sys, cascade_cli.cli, cascade_cli.plotting; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_package_names_the_library_without_importing_it():
    code = ("import sys, cascade_cli; names = [cascade_cli.StopRule.__name__, cascade_cli.TrainConfig.__name__]; "
            "print(names, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['StopRule', 'TrainConfig'] False"


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "cascade_cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: cascade")
