"""A model learns how many steps to emit, 0 included, from end tokens appended for it (slow: it trains)."""

import keras
import numpy as np
import pytest

from filetools import write_h5
from cascade_cli.data import TrainingData
from cascade_cli.options import StopRule, TrainConfig
from cascade_cli.run.cascade import Cascade
from cascade_cli.train.fit import fit

END = 1  # token 0: "go on", token 1: the end token, never in the file


def task(n, seed):
    """Inputs (n, 4, 1) holding 0..3; each pair's steps are its input (0 included); targets all token 0."""
    rng = np.random.default_rng(seed)
    steps = rng.integers(0, 4, size=(n, 4))
    inputs = steps[..., None].astype("float32")
    targets = np.tile(np.eye(2, dtype="float32")[0], (int(steps.sum()), 1))
    return inputs, steps, targets


def models():
    x = keras.Input(shape=(4, 1))
    a = keras.Model(x, keras.layers.Dense(8, activation="tanh")(keras.layers.Dense(16, activation="tanh")(x)))
    ir, state = keras.Input(shape=(8,)), keras.Input(shape=(16,))
    h, [new_state] = keras.layers.GRUCell(16)(ir, [state])
    return a, keras.Model([ir, state], [keras.layers.Dense(2)(h), new_state])


@pytest.mark.slow
def test_end_tokens_teach_the_lengths_zero_included(tmp_path):
    inputs, steps, targets = task(256, seed=0)
    path = write_h5(tmp_path / "train.h5", inputs=inputs, steps=steps, targets=targets)
    keras.utils.set_random_seed(0)
    model_a, model_b = models()
    with TrainingData(path) as data:
        fit(model_a, model_b, data, out_dir=tmp_path / "run",
            config=TrainConfig(epochs=40, batch_size=32, learning_rate=0.01, loss="categorical-crossentropy",
                               from_logits=True, val_split=0.0, append_end_token=END, jit_compile=False))
    held_inputs, held_steps, _ = task(64, seed=1)
    cascade = Cascade(model_a, model_b, max_steps=5, stop_rule=StopRule.token(END), exclude_stop_step=True,
                      jit_compile=False)
    lengths = cascade.run(held_inputs)[1].numpy()
    error = np.abs(lengths - held_steps).mean()
    baseline = np.abs(held_steps.mean() - held_steps).mean()  # predicting the mean length
    assert (lengths == 0).any()  # it learned to emit nothing where nothing is wanted
    assert error < 0.3 * baseline, (error, baseline)


def test_history_records_the_validation_length_error(tmp_path):
    import csv

    import builders
    import stopref
    from cascade_cli.data import split_indices

    inputs, steps, targets = task(8, seed=2)
    path = write_h5(tmp_path / "train.h5", inputs=inputs, steps=steps, targets=targets)
    a, b = builders.model_a(features=1), builders.step_b("gru", output_size=2)
    with TrainingData(path) as data:
        history = fit(a, b, data, out_dir=tmp_path / "run",
                      config=TrainConfig(epochs=1, batch_size=4, val_split=0.5, append_end_token=END,
                                         loss="categorical-crossentropy", jit_compile=False))
    _, val = split_indices(8, val_split=0.5, seed=0)
    # the eager reference: the trained models run free until token END, as cascade.keras does: up to the file's
    # longest + 1, the end step left out, the lengths against the file's steps
    _, lengths, _ = stopref.reference(a, b, inputs[val], steps.max() + 1, stop=lambda y: int(np.argmax(y)) == END,
                                      exclude_stop_step=True)
    expected = np.abs(lengths - steps[val]).mean()
    assert expected > 0 and history[0]["val_length_mae"] == pytest.approx(expected)
    with open(tmp_path / "run" / "history.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["val_length_mae"]) == pytest.approx(expected)


from test_cli import STEPS, files  # noqa: E402,F401 - `files` is test_cli's fixture
from clitools import assert_error, assert_ok, invoke  # noqa: E402


def test_inspect_against(files, tmp_path):  # noqa: F811
    assert_ok(invoke("generate", "--model-a", files["a.keras"], "--model-b", files["b.keras"], "--inputs",
                     files["x.h5"], "--steps-file", files["steps.txt"], "-o", tmp_path / "r.h5"))
    truth = np.array([[2, 1, 3], [0, 0, 0], [1, 1, 2], [3, 2, 1], [0, 0, 0]])  # lengths are STEPS
    train = write_h5(tmp_path / "train.h5", inputs=np.zeros((5, 3, 3), np.float32), steps=truth,
                     targets=np.zeros((int(truth.sum()), 2), np.float32))
    shown = invoke("inspect", tmp_path / "r.h5", "--against", train)
    assert_ok(shown)
    lines = shown.stdout.splitlines()
    # |STEPS - truth|: pair (0, 1) 1, (2, 2) 2, (4, 1) 4: 7 over 15 pairs; per outer step 0, 5 / 5, 2 / 5
    assert any("mean |length - steps| 0.467 over 15 pairs" in line for line in lines), shown.stdout
    for t, error in enumerate(["0.000", "1.000", "0.400"]):
        assert any(line.split()[-3:] == ["step", str(t), error] for line in lines), shown.stdout
    wrong = write_h5(tmp_path / "wrong.h5", inputs=np.zeros((4, 3, 3), np.float32), steps=np.zeros((4, 3), int),
                     targets=np.zeros((0, 2), np.float32))
    assert_error(invoke("inspect", tmp_path / "r.h5", "--against", wrong), 1, "--against", "(N, Ta) = (5, 3)")
    assert_error(invoke("inspect", train, "--against", train), 2, "--against needs PATH to be a result")
