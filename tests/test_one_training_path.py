"""`cascade train` and `CascadeModel.fit` on `data.dataset(...)` reach the same weights (issue 30).

Two epochs of SGD on a shuffled file, in reset, carry and feedback modes, with an end token appended, with a
stop gate, with token ids and with scheduled sampling: the command's weights and `fit`'s agree to 1e-6.

`cascade train` is `CascadeModel.fit` now, so this checks the command's wiring (each flag reaches `compile`,
`data.dataset` and the callbacks as a Keras user would give them), not the arithmetic twice. The arithmetic
is checked against independent eager loops, one exact SGD step of the command each: `test_training`
(reset, regularizers, frozen A), `test_train_feedback` (teacher forcing), `test_end_token`, `test_gate`.
"""

import keras
import numpy as np
import pytest

import builders
from clitools import assert_ok, invoke
from filetools import write_h5
from cascade_cli.data import dataset
from cascade_cli.train.keras_model import CascadeModel

N, TA = 6, 3
STEPS = np.array([[2, 0, 3], [0, 1, 0], [1, 1, 0], [3, 2, 1], [0, 0, 2], [1, 3, 1]])
COMMON = ("--optimizer", "sgd", "--learning-rate", 0.1, "--epochs", 2, "--batch-size", 4, "--val-split", 0,
          "--seed", 5, "--no-xla")

CASES = {  # name: (B, the targets' O, train flags, CascadeModel settings, compile settings, dataset settings)
    "reset": ("step", 2, (), {}, {}, {}),
    "carry": ("step", 2, ("--state", "carry"), {"state": "carry"}, {}, {}),
    "feedback": ("feedback", 2, ("--feedback",), {"feedback": True}, {}, {}),
    "end token": ("feedback", 2, ("--feedback", "--loss", "categorical-crossentropy", "--append-end-token", 1),
                  {"feedback": True}, {"loss": "categorical_crossentropy"}, {"append_end_token": 1}),
    "end token, appended by compile": ("feedback", 2, ("--feedback", "--loss", "categorical-crossentropy",
                                                       "--append-end-token", 0),
                                       {"feedback": True}, {"loss": "categorical_crossentropy",
                                                            "append_end_token": 0}, {}),
    "stop gate": ("feedback", 2, ("--feedback", "--stop-gate", "--stop-weight", 0.5, "--stop-pos-weight", 2),
                  {"feedback": True}, {"stop_gate": True, "stop_weight": 0.5, "stop_pos_weight": 2.0}, {}),
    "sparse ids": ("feedback", 2, ("--feedback", "--loss", "sparse-categorical-crossentropy"), {"feedback": True},
                   {"loss": "sparse_categorical_crossentropy"}, {}),
    "scheduled sampling": ("feedback", 2, ("--feedback", "--sampling-probability", 0.5), {"feedback": True},
                           {"sampling_probability": 0.5}, {}),
}


def trained_weights(out_dir):
    """The weights `cascade train` wrote into `out_dir`: A's, then B's."""
    return [w for name in ("model_a.keras", "model_b.keras")
            for w in keras.saving.load_model(out_dir / name, compile=False).get_weights()]


def assert_same_weights(model, trained):
    """A fitted `CascadeModel`'s weights (A's, then B's) equal `trained` to 1e-6."""
    fitted = model.model_a.get_weights() + model.model_b.get_weights()
    assert len(fitted) == len(trained)
    for got, wanted in zip(fitted, trained):
        np.testing.assert_allclose(got, wanted, rtol=0, atol=1e-6)


def models(kind, output_size):
    b = builders.feedback_b(output_size=output_size) if kind == "feedback" else builders.step_b(
        output_size=output_size)
    return builders.model_a(), b


# what the other cases show, by another door; "reset": test_dropout_draws_the_same_in_train_and_in_fit_reseeded_
# each_epoch runs the same flags (reset, a step B, COMMON) with a dropout B, and checks that it trained;
# "scheduled sampling" (about 10 s) and "feedback": test_a_sampling_schedule_is_read_at_the_optimizer_s_step_count_in_
# train_as_in_fit trains a feedback B under scheduled sampling through both doors to the same weights ("end token"
# and "stop gate" pass --feedback too)
SLOW = ("sparse ids", "end token, appended by compile", "reset", "scheduled sampling", "feedback")


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in SLOW else case
                                  for case in CASES])
def test_cascade_train_and_cascade_model_fit_reach_the_same_weights(case, tmp_path):
    kind, o, flags, settings, compiled, streamed = CASES[case]
    emits = o + int("--stop-gate" in flags)
    rng = np.random.default_rng(1)
    targets = rng.normal(size=(int(STEPS.sum()), o)).astype("float32")
    if "categorical-crossentropy" in flags:
        targets = np.eye(o, dtype="float32")[rng.integers(0, o, size=int(STEPS.sum()))]
    if "sparse-categorical-crossentropy" in flags:
        targets = rng.integers(0, o, size=int(STEPS.sum())).astype(np.int64)  # token ids, fed back as one-hots
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(N, TA, seed=2), steps=STEPS, targets=targets)
    a, b = models(kind, emits)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    assert_ok(invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
                     "--out-dir", tmp_path / "run", *COMMON, *flags))
    trained = trained_weights(tmp_path / "run")

    model = CascadeModel(*models(kind, emits), jit_compile=False, **settings)
    model.compile(keras.optimizers.SGD(0.1), **{"loss": "mse", **compiled}, jit_compile=False)
    model.fit(dataset(path, batch_size=4, shuffle=True, seed=5, **streamed), epochs=2, verbose=0,
              shuffle=False)  # the dataset shuffles itself (seed 5), as cascade train does
    fitted = model.model_a.get_weights() + model.model_b.get_weights()
    start = models(kind, emits)
    assert not np.allclose(start[1].get_weights()[0], fitted[len(a.get_weights())])  # it trained
    assert_same_weights(model, trained)


def test_compile_checks_the_gate_and_sampling_settings_as_train_does():
    from cascade_cli.errors import ParameterError

    model = CascadeModel(*models("feedback", 3), feedback=True, jit_compile=False)
    with pytest.raises(ParameterError, match=r"^stop_weight: weighs the stop gate's loss: give stop_gate=True"):
        model.compile("sgd", loss="mse", stop_weight=2.0)
    with pytest.raises(ParameterError, match=r"^sampling_schedule: a row fed its own sample would be fed its stop"):
        model.compile("sgd", loss="mse", stop_gate=True, sampling_probability=0.5)
    with pytest.raises(ParameterError, match=r"^sampling_schedule: applies to a feedback-form B only"):
        CascadeModel(*models("step", 2), jit_compile=False).compile("sgd", loss="mse", sampling_probability=0.5)
    with pytest.raises(ParameterError, match=r"^training_sampler: applies to scheduled sampling only \(teacher "
                                             r"forcing feeds the targets\): give sampling_probability too"):
        model.compile("sgd", loss="mse", training_sampler="identity")


def test_the_training_sampler_is_saved_with_the_compile_settings(tmp_path):
    """A generator (greedy) compiled to train with `identity` under scheduled sampling loads compiled the same."""
    model = CascadeModel(*models("feedback", 3), feedback=True, sampler="greedy", jit_compile=False)
    model.compile("sgd", loss="mse", sampling_probability=0.5, training_sampler="identity", jit_compile=False)
    model.save(tmp_path / "g.keras")
    loaded = keras.saving.load_model(tmp_path / "g.keras")
    assert (loaded.training_cascade.sampler.kind, loaded.cascade.sampler.kind) == ("identity", "greedy")


@pytest.mark.slow  # two trainings with validation: about 30 s on 2 cores
def test_val_length_mae_of_fit_is_the_command_s(tmp_path):
    """A generator model (greedy, end token 0 left out, max_steps the longest + 1) reports the command's
    val_length_mae as `fit`'s validation `val_length_mae`."""
    import csv

    from cascade_cli.data import split_indices
    from cascade_cli.options import StopRule

    rng = np.random.default_rng(3)
    targets = np.eye(3, dtype="float32")[rng.integers(1, 3, size=int(STEPS.sum()))]
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(N, TA, seed=2), steps=STEPS, targets=targets)
    a, b = models("feedback", 3)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    flags = ("--optimizer", "sgd", "--learning-rate", 0.5, "--epochs", 2, "--batch-size", 2, "--val-split", 0.5,
             "--seed", 5, "--no-xla", "--feedback", "--loss", "categorical-crossentropy", "--append-end-token", 0)
    assert_ok(invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
                     "--out-dir", tmp_path / "run", *flags))
    with open(tmp_path / "run" / "history.csv", newline="") as file:
        rows = list(csv.DictReader(file))

    model = CascadeModel(*models("feedback", 3), feedback=True, sampler="greedy", stop_rule=StopRule.token(0),
                         exclude_stop_step=True, max_steps=int(STEPS.max()) + 1, jit_compile=False)
    model.compile(keras.optimizers.SGD(0.5), loss="categorical_crossentropy", append_end_token=0, jit_compile=False)
    train, val = split_indices(N, val_split=0.5, seed=5)
    history = model.fit(dataset(path, batch_size=2, seed=5, indices=train), epochs=2, verbose=0,
                        validation_data=dataset(path, batch_size=2, shuffle=False, indices=val)).history
    assert "length_mae" not in history  # measured on validation only
    assert history["val_length_mae"] == pytest.approx([float(row["val_length_mae"]) for row in rows], abs=1e-6)
    assert history["val_loss"] == pytest.approx([float(row["val_loss"]) for row in rows], rel=1e-5)


@pytest.mark.slow  # two trainings with validation: about 30 s on 2 cores
def test_val_length_mae_of_fit_with_a_stop_gate_is_the_command_s(tmp_path):
    """A gated generator model (gate rule, max_steps the longest + 1) reports the command's `--stop-gate`
    val_length_mae as `fit`'s validation `val_length_mae`."""
    import csv

    from cascade_cli.data import split_indices
    from cascade_cli.options import StopRule

    rng = np.random.default_rng(3)
    targets = rng.normal(size=(int(STEPS.sum()), 2)).astype("float32")
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(N, TA, seed=2), steps=STEPS, targets=targets)
    a, b = models("step", 3)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    flags = ("--optimizer", "sgd", "--learning-rate", 0.5, "--epochs", 2, "--batch-size", 2, "--val-split", 0.5,
             "--seed", 5, "--no-xla", "--stop-gate")
    assert_ok(invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
                     "--out-dir", tmp_path / "run", *flags))
    with open(tmp_path / "run" / "history.csv", newline="") as file:
        rows = list(csv.DictReader(file))

    model = CascadeModel(*models("step", 3), stop_rule=StopRule.gate(), max_steps=int(STEPS.max()) + 1,
                         jit_compile=False)
    model.compile(keras.optimizers.SGD(0.5), loss="mse", stop_gate=True, jit_compile=False)
    train, val = split_indices(N, val_split=0.5, seed=5)
    history = model.fit(dataset(path, batch_size=2, seed=5, indices=train), epochs=2, verbose=0,
                        validation_data=dataset(path, batch_size=2, shuffle=False, indices=val)).history
    assert history["val_length_mae"] == pytest.approx([float(row["val_length_mae"]) for row in rows], abs=1e-6)
    assert history["val_loss"] == pytest.approx([float(row["val_loss"]) for row in rows], rel=1e-5)


def test_fit_refuses_a_non_finite_step_as_cascade_train_does():
    """Batch 2 of an SGD run at lr 1e30 overflows: `fit` stops there with the command's words, and that step
    never reaches the weights (they are those batch 1 left)."""
    from cascade_cli.errors import CascadeError

    rng = np.random.default_rng(0)
    inputs, steps = builders.inputs(8, TA), np.ones((8, TA), np.int64)
    targets = rng.normal(size=(8, TA, 1, 2)).astype("float32")
    model = CascadeModel(*models("step", 2))
    model.compile(keras.optimizers.SGD(1e30), loss="mse")
    kept = []
    keep = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: kept.append(model.get_weights()))
    with pytest.raises(CascadeError, match=r"^training stopped at epoch 1, batch 2: the training loss became inf "
                                           r"\(expected a finite number\); the step was not applied"):
        model.fit((inputs, steps), targets, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[keep])
    assert len(kept) == 2  # the step of batch 2 ran, and was refused
    for after_first, now in zip(kept[0], model.get_weights()):
        np.testing.assert_array_equal(after_first, now)
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_fit_refuses_a_non_finite_validation_loss_before_any_callback_takes_the_epoch(tmp_path):
    """Validation targets of 1e30 overflow the float32 mse: `fit` stops at epoch 1 with the command's words, and
    the BackupAndRestore given never saw the epoch end."""
    from cascade_cli.errors import CascadeError

    rng = np.random.default_rng(0)
    inputs, steps = builders.inputs(8, TA), np.ones((8, TA), np.int64)
    targets = rng.normal(size=(8, TA, 1, 2)).astype("float32")
    huge = np.full_like(targets[4:], 1e30)
    model = CascadeModel(*models("step", 2))
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(CascadeError, match=r"^training stopped at epoch 1: the validation loss became inf "
                                           r"\(expected a finite number\); no callback was told the epoch ended"):
        model.fit((inputs[:4], steps[:4]), targets[:4], batch_size=4, epochs=2, shuffle=False, verbose=0,
                  validation_data=((inputs[4:], steps[4:]), huge), callbacks=[backup])
    assert not (tmp_path / "backup").exists()


@pytest.mark.slow  # quick: test_a_sampling_schedule_is_read_at_the_optimizer_s_step_count_in_train_as_in_fit trains
# on a batch that emits nothing in both doors, to the same weights, with two steps an epoch of three batches
def test_a_batch_that_emits_nothing_takes_no_step_in_fit_as_in_cascade_train():
    """The command skips a batch with no valid element; `fit`'s step is the same step: Adam does not move on it and
    its step count stays, so the run equals one without that batch."""
    rng = np.random.default_rng(1)
    inputs, steps = builders.inputs(4, TA), np.ones((4, TA), np.int64)
    steps[2:] = 0  # the second batch emits nothing
    targets = rng.normal(size=(4, TA, 1, 2)).astype("float32")
    runs = []
    for n in (4, 2):
        model = CascadeModel(*models("step", 2))
        model.compile(keras.optimizers.Adam(0.1), loss="mse")
        model.fit((inputs[:n], steps[:n]), targets[:n], batch_size=2, epochs=2, shuffle=False, verbose=0)
        runs.append(model)
    assert int(runs[0].optimizer.iterations.numpy()) == 2  # one step an epoch
    for with_empty, without in zip(*(run.get_weights() for run in runs)):
        np.testing.assert_array_equal(with_empty, without)


def test_a_sampling_schedule_is_read_at_the_optimizer_s_step_count_in_train_as_in_fit(tmp_path):
    """The schedule's step is the optimizer's step count in both: a batch that emits nothing takes no step, so it
    does not move the schedule on (the command counted every batch; `fit` counts the steps taken)."""
    steps = np.array([[2, 1, 3], [1, 1, 2], [0, 0, 0], [0, 0, 0], [3, 2, 1], [1, 3, 1]])  # batch 2 emits nothing
    rng = np.random.default_rng(1)
    targets = rng.normal(size=(int(steps.sum()), 2)).astype("float32")
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(N, TA, seed=2), steps=steps, targets=targets)
    a, b = models("feedback", 2)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    assert_ok(invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
                     "--out-dir", tmp_path / "run", "--optimizer", "sgd", "--learning-rate", 0.1, "--epochs", 2,
                     "--batch-size", 2, "--val-split", 0, "--seed", 5, "--no-xla", "--no-shuffle", "--feedback",
                     "--sampling-schedule", "inverse-sigmoid:2"))
    trained = trained_weights(tmp_path / "run")

    model = CascadeModel(*models("feedback", 2), feedback=True, jit_compile=False)
    model.compile(keras.optimizers.SGD(0.1), loss="mse", sampling_probability="inverse-sigmoid:2", jit_compile=False)
    model.fit(dataset(path, batch_size=2, shuffle=False), epochs=2, verbose=0, shuffle=False)
    assert int(model.optimizer.iterations.numpy()) == 4  # two steps an epoch
    assert_same_weights(model, trained)


def test_dropout_draws_the_same_in_train_and_in_fit_reseeded_each_epoch(tmp_path):
    """Each epoch's random numbers are a function of (seed, epoch): the command reseeds with `ReseedEachEpoch`, the
    callback a `fit` takes too, so a B with dropout trains to the same weights in both."""
    from cascade_cli.train.keras_model import ReseedEachEpoch

    rng = np.random.default_rng(1)
    targets = rng.normal(size=(int(STEPS.sum()), 2)).astype("float32")
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(N, TA, seed=2), steps=STEPS, targets=targets)
    builders.model_a().save(tmp_path / "a.keras")
    builders.step_b(dropout=0.5).save(tmp_path / "b.keras")
    assert_ok(invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
                     "--out-dir", tmp_path / "run", *COMMON))
    trained = trained_weights(tmp_path / "run")

    model = CascadeModel(builders.model_a(), builders.step_b(dropout=0.5), jit_compile=False)
    model.compile(keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    model.fit(dataset(path, batch_size=4, seed=5), epochs=2, verbose=0, shuffle=False,
              callbacks=[ReseedEachEpoch(5)])
    assert not np.allclose(builders.step_b(dropout=0.5).get_weights()[0], model.model_b.get_weights()[0])  # trained
    assert_same_weights(model, trained)


def _history(path):
    import csv

    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow  # two trainings with validation: about 25 s on 2 cores
def test_fit_s_metrics_leave_the_stop_gate_s_column_out_as_the_command_s_do(tmp_path):
    """`--metrics mse,mae` with `--stop-gate` measure the value columns only; `fit`'s compiled metrics are the same
    figures, in training and validation (they took the gate's logit against its 0/1 target as a value column)."""
    from cascade_cli.data import split_indices

    rng = np.random.default_rng(3)
    targets = rng.normal(size=(int(STEPS.sum()), 2)).astype("float32")
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(N, TA, seed=2), steps=STEPS, targets=targets)
    a, b = models("step", 3)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    assert_ok(invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
                     "--out-dir", tmp_path / "run", "--optimizer", "sgd", "--learning-rate", 0.1, "--epochs", 2,
                     "--batch-size", 2, "--val-split", 0.5, "--seed", 5, "--no-xla", "--stop-gate",
                     "--metrics", "mse,mae"))
    rows = _history(tmp_path / "run" / "history.csv")

    model = CascadeModel(*models("step", 3), jit_compile=False)
    model.compile(keras.optimizers.SGD(0.1), loss="mse", stop_gate=True, metrics=["mse", "mae"], jit_compile=False)
    train, val = split_indices(N, val_split=0.5, seed=5)
    history = model.fit(dataset(path, batch_size=2, seed=5, indices=train), epochs=2, verbose=0,
                        validation_data=dataset(path, batch_size=2, shuffle=False, indices=val)).history
    for name in ("mse", "mae", "val_mse", "val_mae", "loss", "val_loss"):
        assert history[name] == pytest.approx([float(row[name]) for row in rows], rel=1e-5), name


@pytest.mark.slow  # three trainings: about 15 s on 2 cores
def test_a_resume_with_a_new_learning_rate_trains_at_it_in_fit_as_in_cascade_train(tmp_path):
    """`cascade train --resume --learning-rate 0.05` after an epoch at 0.1 trains epoch 2 at 0.05; a `fit` resumed
    by `BackupAndRestore` with SGD(0.05) compiled does too (the backup held the old rate, 0.1, and put it back)."""
    rng = np.random.default_rng(1)
    targets = rng.normal(size=(int(STEPS.sum()), 2)).astype("float32")
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(N, TA, seed=2), steps=STEPS, targets=targets)
    a, b = models("step", 2)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    common = [flag if flag != 2 else 1 for flag in COMMON]  # one epoch first
    train = ("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
             "--out-dir", tmp_path / "run")
    assert_ok(invoke(*train, *common))
    assert_ok(invoke(*train, "--resume", "--epochs", 2, "--learning-rate", 0.05))
    trained = trained_weights(tmp_path / "run")

    backup = str(tmp_path / "backup")
    for rate, epochs in ((0.1, 1), (0.05, 2)):  # a fresh process would build the model again: so does this
        model = CascadeModel(*models("step", 2), jit_compile=False)
        model.compile(keras.optimizers.SGD(rate), loss="mse", jit_compile=False)
        model.fit(dataset(path, batch_size=4, seed=5), epochs=epochs, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)])
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.05)
    assert int(model.optimizer.iterations.numpy()) == 4  # epoch 1's steps were restored, epoch 2's taken
    assert_same_weights(model, trained)


@pytest.mark.slow  # three trainings: about 20 s on 2 cores
def test_scheduled_sampling_of_a_generator_model_draws_with_the_training_sampler_given(tmp_path):
    """A model built with cascade.keras's settings (greedy, end token 0) trains, under scheduled sampling, with the
    sampler `compile(training_sampler=...)` names: `identity`, the command's `--sampler`, reaches the command's
    weights; left out, the model's own greedy sampler feeds its one-hots and trains elsewhere."""
    from cascade_cli.options import StopRule

    rng = np.random.default_rng(3)
    targets = np.eye(3, dtype="float32")[rng.integers(1, 3, size=int(STEPS.sum()))]
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(N, TA, seed=2), steps=STEPS, targets=targets)
    a, b = models("feedback", 3)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    assert_ok(invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
                     "--out-dir", tmp_path / "run", *COMMON, "--feedback", "--loss", "categorical-crossentropy",
                     "--append-end-token", 0, "--sampling-probability", 0.5))
    trained = trained_weights(tmp_path / "run")
    generator = keras.saving.load_model(tmp_path / "run" / "cascade.keras", compile=False).settings
    assert generator["sampler"].kind == "greedy"

    runs = {}
    for training_sampler in ("identity", None):
        model = CascadeModel(*models("feedback", 3), feedback=True, sampler="greedy", stop_rule=StopRule.token(0),
                             exclude_stop_step=True, max_steps=int(STEPS.max()) + 1, jit_compile=False)
        model.compile(keras.optimizers.SGD(0.1), loss="categorical_crossentropy", sampling_probability=0.5,
                      **({} if training_sampler is None else {"training_sampler": training_sampler}),
                      jit_compile=False)
        model.fit(dataset(path, batch_size=4, seed=5, append_end_token=0), epochs=2, verbose=0)
        runs[training_sampler] = model.model_a.get_weights() + model.model_b.get_weights()
    for got, wanted in zip(runs["identity"], trained):
        np.testing.assert_allclose(got, wanted, rtol=0, atol=1e-6)
    assert max(float(np.abs(got - wanted).max()) for got, wanted in zip(runs[None], trained)) > 1e-4
