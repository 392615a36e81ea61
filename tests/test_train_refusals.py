"""Bad training input is refused before the first step (issue 30's adversary list).

`cascade train`: one `Error:` line naming the file, key or flag, exit 1, and no run folder left behind;
`CascadeModel.fit`: an error naming the argument.
"""

import tomllib
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import builders
from clitools import assert_error, assert_ok, invoke
from filetools import write_h5
from cascade_cli.errors import ParameterError
from cascade_cli.train.keras_model import CascadeModel

N, TA, O = 4, 3, 2
STEPS = np.array([[2, 0, 3], [0, 1, 0], [1, 1, 0], [3, 2, 1]])
QUICK = ("--epochs", 1, "--batch-size", 2, "--val-split", 0, "--no-xla")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refusals")
    builders.model_a().save(folder / "a.keras")
    builders.step_b(output_size=O).save(folder / "b.keras")
    builders.step_b(output_size=1).save(folder / "b1.keras")
    return folder


def data(path, *, steps=STEPS, targets=None, outer=TA):
    targets = np.zeros((int(steps.sum()), O), np.float32) if targets is None else targets
    return write_h5(path, inputs=builders.inputs(len(steps), outer), steps=steps, targets=targets)


def train(models, data_path, out, *extra, b="b.keras"):
    return invoke("train", "--model-a", models / "a.keras", "--model-b", models / b, "--data", data_path,
                  "--out-dir", out, *extra)


def test_a_file_with_nothing_to_learn_is_refused(models, tmp_path):
    zeros = data(tmp_path / "zeros.h5", steps=np.zeros((N, TA), int))
    assert_error(train(models, zeros, tmp_path / "run", *QUICK), 1, f"'{zeros}'", "key 'steps'", "all 0")
    empty = write_h5(tmp_path / "empty.h5", inputs=np.zeros((N, 0, 3), np.float32), steps=np.zeros((N, 0), int),
                     targets=np.zeros((0, O), np.float32))
    assert_error(train(models, empty, tmp_path / "run", *QUICK), 1, f"'{empty}'", "key 'steps'")
    assert not (tmp_path / "run").exists()
    # with an end token appended, every pair has a row to learn from (to emit nothing): trained
    assert_ok(train(models, zeros, tmp_path / "ends", *QUICK, "--append-end-token", 0, "--loss",
                    "categorical-crossentropy"))


def test_a_crossentropy_on_one_output_is_refused(models, tmp_path):
    path = data(tmp_path / "train.h5", targets=np.ones((int(STEPS.sum()), 1), np.float32))
    assert_error(train(models, path, tmp_path / "run", *QUICK, "--loss", "categorical-crossentropy", b="b1.keras"),
                 1, "--loss categorical-crossentropy", "O=1")
    assert not (tmp_path / "run").exists()


def test_sparse_crossentropy_on_float_targets_is_refused(models, tmp_path):
    path = data(tmp_path / "train.h5", targets=np.full((int(STEPS.sum()),), 0.5, np.float32))
    assert_error(train(models, path, tmp_path / "run", *QUICK, "--loss", "sparse-categorical-crossentropy"),
                 1, f"'{path}'", "key 'targets'", "integer token id", "float32")
    ids = data(tmp_path / "ids.h5", targets=np.full((int(STEPS.sum()),), 7, np.int64))
    assert_error(train(models, ids, tmp_path / "run", *QUICK, "--loss", "sparse-categorical-crossentropy"),
                 1, f"'{ids}'", "key 'targets'", "[0, 2)", "7")
    assert not (tmp_path / "run").exists()


def test_a_resume_on_another_file_of_the_same_shape_is_refused(models, tmp_path):
    first = data(tmp_path / "first.h5")
    other = data(tmp_path / "other.h5", targets=np.ones((int(STEPS.sum()), O), np.float32))
    assert_ok(train(models, first, tmp_path / "run", *QUICK))
    assert_error(train(models, other, tmp_path / "run", "--resume", "--epochs", 2), 1, "--resume", f"'{other}'",
                 "another training file")


def test_a_truncated_checkpoint_is_a_clear_error(models, tmp_path):
    path = data(tmp_path / "train.h5")
    assert_ok(train(models, path, tmp_path / "run", *QUICK))
    shard = tmp_path / "run" / "checkpoints" / "backup" / "latest.weights.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = train(models, path, tmp_path / "run", "--resume", "--epochs", 2)
    assert_error(result, 1, "--resume", "checkpoints/backup' cannot be read")
    assert "internal error" not in result.stderr


def test_tensorboard_is_a_runtime_dependency():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(dependency.split(">")[0].split("=")[0].split("<")[0].strip() == "tensorboard"
               for dependency in project["dependencies"])


def test_good_models_beside_a_checkpoints_folder_of_another_kind_load(models, tmp_path):
    folder = tmp_path / "mine"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "notes.txt").write_text("my own checkpoints")
    (folder / "model_a.keras").write_bytes((models / "a.keras").read_bytes())
    (folder / "model_b.keras").write_bytes((models / "b.keras").read_bytes())
    np.save(tmp_path / "x.npy", builders.inputs(2, TA))
    assert_ok(invoke("generate", "--model-a", folder / "model_a.keras", "--model-b", folder / "model_b.keras",
                     "--inputs", tmp_path / "x.npy", "--steps", "1,2,0", "-o", tmp_path / "r.h5"))


# ------------------------------------------------------------ CascadeModel.fit


def compiled():
    model = CascadeModel(builders.model_a(), builders.step_b(output_size=O), jit_compile=False)
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    return model


def padded(value=0.0, *, o=O):
    return np.full((N, TA, 3, o), value, np.float32)


@pytest.mark.parametrize("x_steps, y, words", [
    (STEPS, padded(o=3), r"^y: expected padded targets \(N, Ta, L, O=2\)"),
    (STEPS, padded(np.nan), r"^y: expected finite targets"),
    (STEPS + 0.5, padded(), r"^x: expected integer steps"),
])
def test_fit_refuses_bad_arrays_naming_the_argument(x_steps, y, words):
    with pytest.raises(ParameterError, match=words):
        compiled().fit((builders.inputs(N, TA), x_steps), y, epochs=1, verbose=0)
