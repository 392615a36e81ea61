"""`train --append-end-token ID`: every pair, 0-step pairs included, ends with the one-hot of ID."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from clitools import assert_error, invoke
from filetools import write_h5
from cascade_cli.data import TrainingData, append_end_token
from cascade_cli.errors import ParameterError
from cascade_cli.options import TrainConfig
from cascade_cli.train.fit import fit

STEPS = np.array([[2, 0], [0, 1]])  # (0, 1) and (1, 0) emit nothing
ROWS = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]], np.float32)
END = [0.0, 0.0, 1.0]  # the one-hot of token 2, O = 3
# By hand: pair (0, 0)'s two rows and its end, the ends of the two empty pairs, pair (1, 1)'s row and its end.
EXPECTED_STEPS = [[3, 1], [1, 2]]
EXPECTED = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], END, END, END, [0.7, 0.8, 0.9], END]


def test_append_end_token_by_hand():
    steps, targets = append_end_token(STEPS, ROWS, 2, output_size=3)
    assert steps.tolist() == EXPECTED_STEPS
    np.testing.assert_array_equal(targets, np.array(EXPECTED, np.float32))
    steps, ids = append_end_token(STEPS, np.array([[4], [5], [6]]), 2, output_size=7, ids=True)
    assert steps.tolist() == EXPECTED_STEPS and ids[:, 0].tolist() == [4, 5, 2, 2, 2, 6, 2]
    steps, targets = append_end_token(np.zeros((2, 3), int), np.zeros((0, 3), np.float32), 0, output_size=3)
    assert steps.tolist() == [[1] * 3] * 2 and targets.tolist() == [[1.0, 0.0, 0.0]] * 6


@pytest.mark.parametrize("layout", ["flat", "padded"])
def test_training_batches_get_the_end_rows(tmp_path, layout):
    inputs = builders.inputs(2, 2)
    if layout == "flat":
        targets = ROWS
    else:
        targets = np.full((2, 2, 2, 3), np.nan, np.float32)  # L = 2 = max(steps): the end row is past L
        targets[0, 0, :2], targets[1, 1, 0] = ROWS[:2], ROWS[2]
    path = write_h5(tmp_path / "train.h5", inputs=inputs, steps=STEPS, targets=targets)
    with TrainingData(path) as data:
        assert data.with_end_token(2) is data
        data.check_finite()  # the file's own steps: the NaN pad stays outside them
        assert data.steps.tolist() == EXPECTED_STEPS
        (batch,) = data.batches(np.array([0, 1]), batch_size=2)
        assert batch.steps.tolist() == EXPECTED_STEPS
        np.testing.assert_array_equal(batch.targets, np.array(EXPECTED, np.float32))
        second, first = data.batches(np.array([1, 0]), batch_size=1)  # one sample at a time, out of order
        assert second.steps.tolist() == [[1, 2]] and second.targets.tolist() == np.float32([END, ROWS[2], END]).tolist()
        assert first.steps.tolist() == [[3, 1]]
        data.with_end_token(None)
        assert data.steps.tolist() == STEPS.tolist()
        (batch,) = data.batches(np.array([0, 1]), batch_size=2)
        np.testing.assert_array_equal(batch.targets, ROWS)


def test_one_sgd_step_trains_on_the_end_rows(tmp_path):
    n, o = 4, 3
    rng = np.random.default_rng(1)
    inputs = builders.inputs(n, 3)
    steps = rng.integers(0, 3, size=(n, 3))
    steps[0] = 0  # a sample with nothing but end tokens
    targets = rng.normal(size=(int(steps.sum()), o)).astype("float32")
    path = write_h5(tmp_path / "train.h5", inputs=inputs, steps=steps, targets=targets)
    # the reference: its own end rows, written pair by pair
    rows, offset = [], 0
    for count in steps.reshape(-1):
        rows.extend(targets[offset:offset + count])
        rows.append(np.eye(o, dtype="float32")[1])
        offset += count
    expected_targets = np.stack(rows)
    ref_a, ref_b = builders.model_a(), builders.step_b("gru", output_size=o)
    variables = ref_a.trainable_variables + ref_b.trainable_variables
    with tf.GradientTape() as tape:
        values, _ = builders.reference(ref_a, ref_b, inputs, steps + 1)
        loss = tf.reduce_sum(tf.square(values - expected_targets)) / expected_targets.size
    grads = tape.gradient(loss, variables)
    expected = [v.numpy() - 0.1 * g.numpy() for v, g in zip(variables, grads)]
    model_a, model_b = builders.model_a(), builders.step_b("gru", output_size=o)
    with TrainingData(path) as data:
        history = fit(model_a, model_b, data, out_dir=tmp_path / "out",
                      config=TrainConfig(optimizer="sgd", learning_rate=0.1, epochs=1, batch_size=n, shuffle=False,
                                         val_split=0.0, append_end_token=1, jit_compile=False))
    assert history[0]["loss"] == pytest.approx(float(loss), rel=1e-5)
    saved = [keras.saving.load_model(tmp_path / "out" / name, compile=False) for name in ("model_a.keras",
                                                                                          "model_b.keras")]
    got = saved[0].trainable_variables + saved[1].trainable_variables
    for w, e, v in zip(got, expected, variables):
        assert not np.allclose(e, v.numpy())
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-4, atol=1e-6)


def test_an_end_token_outside_b_is_refused(tmp_path):
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(2, 2), steps=STEPS, targets=ROWS)
    with TrainingData(path) as data, pytest.raises(ParameterError, match=r"^append_end_token: expected a token id in "
                                                                         r"\[0, 3\) \(B emits O=3\), received 3\.$"):
        fit(builders.model_a(), builders.step_b("gru", output_size=3), data, out_dir=tmp_path / "out",
            config=TrainConfig(append_end_token=3, epochs=1, jit_compile=False))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ParameterError, match=r"^append_end_token: expected an integer in \[0, 2147483647\], received -1\.$"):
        TrainConfig(append_end_token=-1)


def test_train_flag(tmp_path):
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(2, 2), steps=STEPS, targets=ROWS)
    builders.model_a().save(tmp_path / "a.keras")
    builders.step_b("gru", output_size=3).save(tmp_path / "b.keras")
    common = ["train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
              "--epochs", 1, "--val-split", 0, "--no-xla"]
    result = invoke(*common, "--out-dir", tmp_path / "bad", "--append-end-token", 3)
    assert_error(result, 1, "--append-end-token: expected a token id in [0, 3)", "received 3")
    assert not (tmp_path / "bad").exists()
    result = invoke(*common, "--out-dir", tmp_path / "run", "--append-end-token", 2)
    assert result.exit_code == 0, result.output
