"""`cascade train --feedback`: teacher forcing through the command line, checked against an eager loop.

The exact SGD step equals `w - lr * grad` of an independent reference: plain Python loops over samples, pairs
and inner steps, B called directly on `[x, y_prev, state]` with `y_prev` the target of the step before.
"""

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from clitools import assert_error, assert_ok, invoke

N, TA, O = 4, 3, 3
STEPS = np.array([[2, 0, 3], [0, 1, 0], [1, 1, 0], [3, 2, 1]])
LR = 0.1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_feedback")
    builders.model_a(ir_size=4).save(folder / "a.keras")
    builders.feedback_b(output_size=O).save(folder / "b.keras")
    builders.step_b(output_size=O).save(folder / "plain_b.keras")
    rng = np.random.default_rng(5)
    with h5py.File(folder / "train.h5", "w") as file:
        file["inputs"] = builders.inputs(N, TA)
        file["steps"] = STEPS
        file["targets"] = rng.normal(size=(int(STEPS.sum()), O)).astype("float32")
    return folder


def train(files, out, *extra, b="b.keras"):
    return invoke("train", "--model-a", files / "a.keras", "--model-b", files / b, "--data", files / "train.h5",
                  "--out-dir", out, *extra)


ONE_SGD_STEP = ("--feedback", "--optimizer", "sgd", "--learning-rate", LR, "--epochs", 1, "--batch-size", N,
                "--no-shuffle", "--val-split", 0)


def reference_loss(model_a, model_b, inputs, steps, targets, *, start=None, sparse=False):
    """The loss over every valid element, teacher forced, one sample, pair and inner step at a time (reset).

    The mse; with `sparse`, the cross-entropy of token ids `(total, 1)` on B's logits, each id's one-hot fed back.
    """
    ir = model_a(inputs)
    errors, row = [], 0
    for n in range(steps.shape[0]):
        for t in range(steps.shape[1]):
            state = tf.zeros([1, 5])
            previous = tf.zeros([1, O]) if start is None else start
            for _ in range(int(steps[n, t])):
                y, state = model_b([ir[n:n + 1, t], previous, state])
                if sparse:
                    errors.append(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets[row], logits=y)[0])
                    target = tf.one_hot(targets[row], O)
                else:
                    target = tf.constant(targets[row:row + 1])
                    errors.append(tf.reduce_sum((y - target) ** 2))
                previous, row = target, row + 1
    return tf.add_n(errors) / (row if sparse else row * O)


def assert_one_sgd_step(files, out, inputs, steps, targets, **reference):
    """The weights `cascade train` wrote to `out` equal `w - lr * grad` of `reference_loss`, and moved."""
    model_a = keras.saving.load_model(files / "a.keras", compile=False)
    model_b = keras.saving.load_model(files / "b.keras", compile=False)
    variables = model_a.trainable_weights + model_b.trainable_weights
    with tf.GradientTape() as tape:
        loss = reference_loss(model_a, model_b, inputs, steps, targets, **reference)
    grads = tape.gradient(loss, variables)
    expected = [np.asarray(v) - LR * np.asarray(g) for v, g in zip(variables, grads)]
    got = weights(out)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
    untrained = [np.asarray(v) for v in variables]
    assert any(not np.allclose(g, u) for g, u in zip(got, untrained))  # the step moved the weights


def read(files):
    with h5py.File(files / "train.h5", "r") as file:
        return file["inputs"][...], file["steps"][...], file["targets"][...]


def weights(out):
    return [np.asarray(w) for name in ("model_a.keras", "model_b.keras")
            for w in keras.saving.load_model(out / name, compile=False).get_weights()]


@pytest.mark.parametrize("start", ["zeros", pytest.param("token:2", marks=pytest.mark.slow)])
def test_one_sgd_step_equals_w_minus_lr_times_the_reference_gradient(files, tmp_path, start):
    assert_ok(train(files, tmp_path / "run", *ONE_SGD_STEP, "--feedback-start", start))
    fed = None if start == "zeros" else tf.one_hot([2], O)
    assert_one_sgd_step(files, tmp_path / "run", *read(files), start=fed)


def test_sparse_token_ids_are_fed_back_as_their_one_hot(files, tmp_path):
    """--loss sparse-categorical-crossentropy with --feedback: y_prev is the one-hot of the id before (exact SGD)."""
    inputs, steps, _ = read(files)
    ids = np.random.default_rng(8).integers(0, O, size=(int(steps.sum()), 1))
    data = tmp_path / "ids.h5"
    with h5py.File(data, "w") as file:
        file["inputs"], file["steps"], file["targets"] = inputs, steps, ids
    assert_ok(invoke("train", "--model-a", files / "a.keras", "--model-b", files / "b.keras", "--data", data,
                     "--out-dir", tmp_path / "run", *ONE_SGD_STEP, "--loss", "sparse-categorical-crossentropy",
                     "--from-logits"))
    assert_one_sgd_step(files, tmp_path / "run", inputs, steps, ids, sparse=True)


@pytest.mark.slow  # three trainings: about 20 s on 2 cores
def test_sampling_probability_zero_is_teacher_forcing_and_a_schedule_changes_the_step(files, tmp_path):
    flags = ("--feedback", "--optimizer", "sgd", "--learning-rate", LR, "--epochs", 2, "--batch-size", 2,
             "--no-shuffle", "--val-split", 0)
    assert_ok(train(files, tmp_path / "forced", *flags))
    assert_ok(train(files, tmp_path / "zero", *flags, "--sampling-probability", 0))
    for a, b in zip(weights(tmp_path / "forced"), weights(tmp_path / "zero")):
        np.testing.assert_array_equal(a, b)
    assert_ok(train(files, tmp_path / "sampled", *flags, "--sampling-schedule", "inverse-sigmoid:0.5"))
    assert any(not np.array_equal(a, b) for a, b in zip(weights(tmp_path / "forced"), weights(tmp_path / "sampled")))


@pytest.mark.slow  # three trainings: about 20 s on 2 cores
def test_a_resume_keeps_feedback_and_the_schedule_and_equals_an_unbroken_run(files, tmp_path):
    flags = ("--feedback", "--sampling-schedule", "inverse-sigmoid:2", "--batch-size", 2, "--val-split", 0,
             "--learning-rate", 0.01)
    assert_ok(train(files, tmp_path / "whole", *flags, "--epochs", 2))
    assert_ok(train(files, tmp_path / "parts", *flags, "--epochs", 1))
    assert_ok(invoke("train", "--model-a", files / "a.keras", "--model-b", files / "b.keras", "--data",
                     files / "train.h5", "--out-dir", tmp_path / "parts", "--epochs", 2, "--resume"))
    for a, b in zip(weights(tmp_path / "whole"), weights(tmp_path / "parts")):
        np.testing.assert_array_equal(a, b)
    generator = keras.saving.load_model(tmp_path / "whole" / "cascade.keras")
    assert generator.settings["feedback"] is True


@pytest.mark.parametrize("extra, words", [
    (("--feedback", "--sampling-probability", 1.5), ("--sampling-probability", "[0, 1]")),
    (("--feedback", "--sampling-schedule", "linear:3"), ("--sampling-schedule", "inverse-sigmoid:K")),
    (("--feedback", "--sampling-schedule", "inverse-sigmoid:0"), ("--sampling-schedule", "K > 0")),
    (("--sampling-probability", 0.5), ("--sampling-probability", "--feedback")),
    (("--feedback-start", "previous"), ("--feedback-start", "--feedback")),
    (("--feedback", "--feedback-start", "token:x"), ("--feedback-start", "token:ID")),
    (("--feedback", "--sampling-probability", 0.5, "--sampling-schedule", "inverse-sigmoid:3"),
     ("--sampling-probability", "--sampling-schedule")),
])
def test_bad_feedback_flags_are_one_usage_error(files, tmp_path, extra, words):
    assert_error(train(files, tmp_path / "run", *extra), 2, *words)
    assert not (tmp_path / "run").exists()


def test_feedback_needs_a_feedback_form_b(files, tmp_path):
    assert_error(train(files, tmp_path / "run", "--feedback", b="plain_b.keras"), 1, "plain_b.keras", "feedback")
    assert_error(train(files, tmp_path / "run2"), 1, "b.keras", "--feedback")  # a feedback B without the flag


# ------------------------------------------- issue 30: the trained generator stops as it was taught


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    """One epoch on the token sample task with its END rows taken out and put back by --append-end-token 0."""
    from cascade_cli.sample import END_TOKEN, build_token_model_a, build_token_model_b, make_token_task, \
        one_hot_targets

    folder = tmp_path_factory.mktemp("token_run")
    inputs, steps, tokens, _, _ = make_token_task(np.random.default_rng(0), 16)
    steps = steps - (steps > 0)  # the file holds no END rows
    tokens = tokens[tokens != END_TOKEN]
    with h5py.File(folder / "train.h5", "w") as file:
        file["inputs"], file["steps"], file["targets"] = inputs, steps, one_hot_targets(tokens)
    keras.utils.set_random_seed(0)
    build_token_model_a().save(folder / "a.keras")
    build_token_model_b().save(folder / "b.keras")
    assert_ok(invoke("train", "--model-a", folder / "a.keras", "--model-b", folder / "b.keras", "--data",
                     folder / "train.h5", "--out-dir", folder / "run", "--feedback", "--loss",
                     "categorical-crossentropy", "--append-end-token", END_TOKEN, "--epochs", 2, "--batch-size", 8,
                     "--val-split", 0.5, "--learning-rate", 0.05, "--no-xla"))
    return folder, inputs, steps


def test_the_trained_generator_records_its_sampler_stop_rule_and_max_steps(token_run):
    from cascade_cli.train.keras_model import load_generator
    from cascade_cli.options import Sampler, StopRule

    folder, _, steps = token_run
    settings = load_generator(folder / "run" / "cascade.keras").settings
    assert settings["sampler"] == Sampler.greedy() and settings["stop_rule"] == StopRule.token(0)
    assert settings["exclude_stop_step"] and settings["max_steps"] == steps.max() + 1


def test_val_length_mae_is_the_length_error_of_greedy_generation_with_cascade_keras(token_run, tmp_path):
    from cascade_cli.data import split_indices
    from cascade_cli.results_io import read_result

    folder, inputs, steps = token_run
    _, val = split_indices(len(inputs), val_split=0.5, seed=0)
    np.save(tmp_path / "x.npy", inputs[val])
    assert_ok(invoke("generate", "--model", folder / "run" / "cascade.keras", "--inputs", tmp_path / "x.npy",
                     "-o", tmp_path / "r.h5"))  # no other flag: the generator knows how it stops
    lengths = read_result(tmp_path / "r.h5").lengths
    with open(folder / "run" / "history.csv") as file:
        rows = file.read().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert float(last[header.index("val_length_mae")]) == pytest.approx(np.abs(lengths - steps[val]).mean())
