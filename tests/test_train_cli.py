"""Tests of `cascade train`'s flags (issue 15, 17) and of the one train step it shares with `CascadeModel`.

Every run is one or a few epochs on tiny seeded models, through click's
`CliRunner`. Steps are checked against an independent eager reference
(`builders.reference`, `w - lr * grad`), and `cascade train`'s step against
`CascadeModel.fit`'s, bit for bit.
"""

import csv
import math
import os
import shutil

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from clitools import assert_error, assert_ok, invoke
from filetools import write_h5
from test_training import penalty_by_hand, regularized_models
from cascade_cli.data import TrainingData, padded_targets, split_indices
from cascade_cli.train.keras_model import CascadeModel
from cascade_cli.run.cascade import Cascade

N, TA = 4, 3
STEPS = np.array([[2, 0, 3], [0, 1, 0], [1, 1, 0], [3, 2, 1]])
LR = 0.1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny models (plain and regularized) and a training file, written once for the module."""
    folder = tmp_path_factory.mktemp("train_files")
    paths = {name: folder / name for name in ("a.keras", "b.keras", "ra.keras", "rb.keras", "train.h5")}
    builders.model_a().save(paths["a.keras"])
    builders.step_b().save(paths["b.keras"])
    regular_a, regular_b = regularized_models()
    regular_a.save(paths["ra.keras"])
    regular_b.save(paths["rb.keras"])
    rng = np.random.default_rng(3)
    write_h5(paths["train.h5"], inputs=builders.inputs(N, TA, seed=1), steps=STEPS,
             targets=rng.normal(size=(int(STEPS.sum()), 2)).astype("float32"))
    return paths


def arrays(path):
    with h5py.File(path, "r") as f:
        return f["inputs"][()], f["steps"][()], f["targets"][()]


def train(files, out, *extra, a="a.keras", b="b.keras"):
    return invoke("train", "--model-a", files[a], "--model-b", files[b], "--data", files["train.h5"],
                  "--out-dir", out, *extra)


ONE_SGD_STEP = ("--optimizer", "sgd", "--learning-rate", LR, "--epochs", 1, "--batch-size", N, "--no-shuffle",
                "--val-split", 0)


def saved(out, name):
    return keras.saving.load_model(out / name, compile=False)


def history(out):
    with open(out / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def clipped(grad, clipnorm):
    """Keras' `clipnorm`, by hand: each gradient scaled to L2 norm `clipnorm` when longer."""
    norm = float(np.sqrt(np.sum(np.square(grad))))
    return grad if clipnorm is None or norm <= clipnorm else grad * (clipnorm / norm)


# ------------------------------------------------- one train step, two doors


@pytest.mark.parametrize("regularized, clipnorm", [(False, None), (True, 0.05)])
def test_cascade_train_s_step_is_cascade_model_fit_s_step_and_w_minus_lr_times_the_reference_gradient(
        files, tmp_path, regularized, clipnorm):
    a, b = ("ra.keras", "rb.keras") if regularized else ("a.keras", "b.keras")
    clip = () if clipnorm is None else ("--clipnorm", clipnorm)
    result = train(files, tmp_path / "run", *ONE_SGD_STEP, *clip, a=a, b=b)
    assert_ok(result)
    assert "epoch" in result.stderr and str(tmp_path / "run" / "model_a.keras") in result.stderr
    inputs, steps, targets = arrays(files["train.h5"])

    # the independent reference: plain eager loops, the masked mse by hand, plus the penalty by hand
    ref_a, ref_b = saved(files["train.h5"].parent, a), saved(files["train.h5"].parent, b)
    variables = ref_a.trainable_variables + ref_b.trainable_variables
    with tf.GradientTape() as tape:
        values, _ = builders.reference(ref_a, ref_b, inputs, steps)
        loss = tf.reduce_sum(tf.square(values - targets)) / targets.size
        if regularized:
            loss = loss + penalty_by_hand(ref_a, ref_b)
    grads = tape.gradient(loss, variables)
    expected = [v.numpy() - LR * clipped(g.numpy(), clipnorm) for v, g in zip(variables, grads)]
    if clipnorm is not None:  # the clip moves the step far past the tolerance below
        assert max(float(np.abs(g.numpy()).max()) for g in grads) * LR > 10 * 0.05 * LR

    cli_weights = [w.numpy() for name in ("model_a.keras", "model_b.keras")
                   for w in saved(tmp_path / "run", name).trainable_variables]
    for got, wanted, start in zip(cli_weights, expected, (v.numpy() for v in variables)):
        assert not np.allclose(start, wanted)
        np.testing.assert_allclose(got, wanted, rtol=1e-4, atol=1e-6)
    assert float(history(tmp_path / "run")[0]["loss"]) == pytest.approx(float(loss), rel=1e-5)

    # CascadeModel.fit on the same arrays, padded with NaN (which the loss must never see): the very same step, bit
    # for bit
    model = CascadeModel(saved(files["train.h5"].parent, a), saved(files["train.h5"].parent, b))
    model.compile(keras.optimizers.SGD(LR, clipnorm=clipnorm), loss="mse", jit_compile=False)
    model.fit((inputs, steps), padded_targets(steps, targets, pad_value=np.nan), batch_size=N, epochs=1,
              shuffle=False, verbose=0)
    fit_weights = [w.numpy() for w in model.trainable_variables]
    assert len(fit_weights) == len(cli_weights)
    for got, wanted in zip(fit_weights, cli_weights):
        np.testing.assert_array_equal(got, wanted)


# ------------------------------------------------------------- the generator


def test_train_writes_the_whole_generator_that_loads_in_safe_mode_and_predicts_as_the_pair(files, tmp_path):
    assert_ok(train(files, tmp_path / "run", "--epochs", 1, "--val-split", 0, "--state", "carry"))
    out = tmp_path / "run"
    assert sorted(os.listdir(out)) == ["cascade.keras", "checkpoints", "history.csv", "model_a.keras",
                                       "model_b.keras"]
    generator = keras.saving.load_model(out / "cascade.keras")  # safe mode: the default
    assert isinstance(generator, CascadeModel) and generator.settings["state"] == "carry"
    inputs, steps, _ = arrays(files["train.h5"])
    result = generator.predict(inputs, steps, return_result=True)
    values, lengths = Cascade(saved(out, "model_a.keras"), saved(out, "model_b.keras"), state="carry").run(
        inputs, steps)
    np.testing.assert_array_equal(result.values, values.numpy())
    np.testing.assert_array_equal(result.lengths, lengths.numpy())


# -------------------------------------------------- metrics and tensorboard


def scalars(folder):
    """`{tag: [(step, value), ...]}` read back from the event files in `folder` with TensorFlow's own reader."""
    found = {}
    for name in sorted(os.listdir(folder)):
        for event in tf.compat.v1.train.summary_iterator(str(folder / name)):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                found.setdefault(value.tag, []).append((event.step, number))
    return found


def board_scalars(board):
    """Keras' `TensorBoard` layout: `{"train": scalars(board/train), "validation": scalars(board/validation)}`."""
    return {part: scalars(board / part) for part in ("train", "validation") if (board / part).is_dir()}


def test_metrics_go_into_history_and_tensorboard_and_a_resume_keeps_them(files, tmp_path):
    out, board = tmp_path / "run", tmp_path / "logs" / "run"
    assert_ok(train(files, out, "--epochs", 1, "--val-split", 0.5, "--batch-size", 2, "--metrics", "mae,mse",
                    "--tensorboard", board, "--learning-rate", 0.01))
    rows = history(out)
    assert list(rows[0]) == ["epoch", "loss", "val_loss", "seconds", "mae", "val_mae", "mse", "val_mse"]
    row = {key: float(value) for key, value in rows[0].items()}
    assert row["mse"] == pytest.approx(row["loss"], rel=1e-6) and row["val_mse"] == pytest.approx(row["val_loss"],
                                                                                                  rel=1e-6)
    # val_mae by hand: the saved models (the epoch's end) on the held-out samples
    _, val = split_indices(N, val_split=0.5, seed=0)
    with TrainingData(files["train.h5"]) as data:
        batch = next(data.batches(val, batch_size=len(val)))
    values, _ = builders.reference(saved(out, "model_a.keras"), saved(out, "model_b.keras"), batch.inputs,
                                   batch.steps)
    assert row["val_mae"] == pytest.approx(float(np.mean(np.abs(values.numpy() - batch.targets))), rel=1e-5)
    assert 0 < row["mae"] and row["mae"] != row["val_mae"]

    assert_ok(train(files, out, "--epochs", 2, "--resume"))  # metrics, tensorboard, learning rate: the run's own
    rows = history(out)
    assert len(rows) == 2 and rows[1]["val_mae"] != ""
    logged = board_scalars(board)  # keras.callbacks.TensorBoard's: epochs from 0, val_ figures under validation/
    for tag in ("loss", "mae", "mse"):
        for part, column in (("train", tag), ("validation", f"val_{tag}")):
            assert logged[part][f"epoch_{tag}"] == [(k, pytest.approx(float(rows[k][column]), rel=1e-6))
                                                    for k in range(2)], (part, tag)
    assert logged["train"]["epoch_learning_rate"] == [(0, pytest.approx(0.01)), (1, pytest.approx(0.01))]


def test_a_cosine_schedule_with_warmup_logs_each_epoch_s_rate(files, tmp_path):
    board = tmp_path / "logs"
    # one step per epoch: steps 0, 1 warm up to LR, then cosine over the remaining 2 steps
    assert_ok(train(files, tmp_path / "run", "--epochs", 4, "--batch-size", N, "--val-split", 0, "--optimizer", "sgd",
                    "--learning-rate", LR, "--lr-schedule", "cosine", "--warmup-steps", 2, "--tensorboard", board))
    # Keras' TensorBoard logs the rate at each epoch's end: the rate of the next step, steps 1 to 4
    cosine = [LR * 0.5 * (1 + math.cos(math.pi * step / 2)) for step in (0, 1, 2)]
    wanted = [LR * 2 / 2, *cosine]
    assert [value for _, value in board_scalars(board)["train"]["epoch_learning_rate"]] == [
        pytest.approx(rate, rel=1e-6, abs=1e-12) for rate in wanted]
    assert_error(train(files, tmp_path / "run", "--epochs", 5, "--resume", "--lr-schedule", "constant"), 1,
                 "--resume:", "--lr-schedule cosine", "--lr-schedule constant")


# ------------------------------------------------------- mixed precision


def test_mixed_precision_trains_float16_copies_and_writes_float32_models(files, tmp_path):
    assert_ok(train(files, tmp_path / "run", *ONE_SGD_STEP, "--mixed-precision"))
    inputs, steps, targets = arrays(files["train.h5"])
    ref_a, ref_b = builders.model_a(), builders.step_b()
    variables = ref_a.trainable_variables + ref_b.trainable_variables
    with tf.GradientTape() as tape:
        values, _ = builders.reference(ref_a, ref_b, inputs, steps)
        loss = tf.reduce_sum(tf.square(values - targets)) / targets.size
    expected = [v.numpy() - LR * g.numpy() for v, g in zip(variables, tape.gradient(loss, variables))]
    trained = [w for name in ("model_a.keras", "model_b.keras") for w in saved(tmp_path / "run", name).weights]
    for weight, wanted in zip(trained, expected):
        assert weight.dtype == "float32"
        np.testing.assert_allclose(weight.numpy(), wanted, rtol=1e-2, atol=2e-3)  # float16 compute
    assert float(history(tmp_path / "run")[0]["loss"]) == pytest.approx(float(loss), rel=1e-2)
    assert saved(tmp_path / "run", "model_b.keras").layers[-1].dtype_policy.name == "float32"


# ------------------------------------------------------------ sparse targets


def test_sparse_crossentropy_trains_from_token_ids_stored_as_total(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, size=int(STEPS.sum()))
    write_h5(tmp_path / "tokens.h5", inputs=builders.inputs(N, TA, seed=1), steps=STEPS, targets=ids)
    builders.model_a().save(tmp_path / "a.keras")
    builders.step_b(output_size=3).save(tmp_path / "b.keras")
    result = invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data",
                    tmp_path / "tokens.h5", "--out-dir", tmp_path / "run", "--loss", "sparse-categorical-crossentropy",
                    "--metrics", "accuracy", *ONE_SGD_STEP)
    assert_ok(result)
    logits, _ = builders.reference(builders.model_a(), builders.step_b(output_size=3), builders.inputs(N, TA, seed=1),
                                   STEPS)
    by_hand = np.mean([np.log(np.sum(np.exp(row))) - row[k] for row, k in zip(logits.numpy(), ids)])
    row = history(tmp_path / "run")[0]
    assert float(row["loss"]) == pytest.approx(by_hand, rel=1e-5)
    assert float(row["accuracy"]) == pytest.approx(np.mean(np.argmax(logits.numpy(), axis=1) == ids))


# --------------------------------------------------------- out-dir rules


@pytest.fixture(scope="module")
def one_epoch_run(files, tmp_path_factory):
    """`(folder, out_dir)`: one epoch trained into `folder/a/b/c`, whose parents did not exist."""
    folder = tmp_path_factory.mktemp("one_epoch")
    assert_ok(train(files, folder / "a" / "b" / "c", "--epochs", 1, "--val-split", 0))
    return folder, folder / "a" / "b" / "c"


def test_out_dir_s_missing_parents_are_made_as_every_output_s_are_and_go_again_when_the_run_fails(
        files, tmp_path, one_epoch_run):
    folder, out = one_epoch_run
    assert (out / "model_b.keras").is_file() and sorted(os.listdir(folder)) == ["a"]
    assert_error(train(files, tmp_path / "x" / "y", "--epochs", 1, "--resume"), 1, "--resume")
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_an_earlier_run_and_without_it_the_run_is_refused(files, tmp_path, one_epoch_run):
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run[1], out)  # a run of `--epochs 1 --val-split 0`
    (out / "notes.txt").write_text("mine")
    assert_error(train(files, out, "--epochs", 1), 1, "--out-dir", "already holds a training run", "--resume",
                 "--overwrite")
    assert_ok(train(files, out, "--epochs", 2, "--val-split", 0, "--overwrite", "--metrics", "mae"))
    assert [row["epoch"] for row in history(out)] == ["1", "2"] and "mae" in history(out)[0]
    assert (out / "notes.txt").read_text() == "mine"
    assert_error(train(files, out, "--epochs", 3, "--resume", "--overwrite"), 2, "--overwrite", "--resume")


@pytest.mark.parametrize("args, code, words", [
    (("--metrics", "rmse"), 2, ["--metrics: expected one of mse, mae, accuracy, received 'rmse'"]),
    (("--metrics", "mae", "--loss", "sparse-categorical-crossentropy"), 2, ["--metrics", "'mae'", "token ids"]),
    (("--clipnorm", 0), 2, ["--clipnorm"]),
    (("--lr-schedule", "linear"), 2, ["--lr-schedule"]),
    (("--warmup-steps", -1), 2, ["--warmup-steps"]),
])
def test_bad_training_flags_are_one_error_line_naming_the_flag(files, tmp_path, args, code, words):
    assert_error(train(files, tmp_path / "run", *args), code, *words)
    assert os.listdir(tmp_path) == []


def test_a_tensorboard_path_that_is_a_file_is_refused_before_any_work(files, tmp_path):
    (tmp_path / "logs").write_text("")
    assert_error(train(files, tmp_path / "run", "--tensorboard", tmp_path / "logs"), 1,
                 "--tensorboard:", "is a file: expected a folder")
    assert sorted(os.listdir(tmp_path)) == ["logs"]
