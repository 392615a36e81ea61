"""Issue 17 through the command line: what a new user hit in the first hour, each checked where it was hit.

The library sides have their own tests (test_training, test_shards); these run the commands: cross-entropy on
a softmax B (#3), `train --state-init ir` (#4), shards of one input spelled two ways (#5), Ctrl-C during
`train` (#6). Steps are checked against `builders.reference`, the eager loop.
"""

import contextlib
import re

import numpy as np
import pytest
import tensorflow as tf

import builders
from clitools import assert_ok, invoke
from filetools import write_h5
from test_train_cli import LR, N, ONE_SGD_STEP, STEPS, TA, history, saved
from cascade_cli.results_io import read_result, read_result_attrs

O = 3


def softmax_b():
    """`builders.step_b` with a softmax on its output: B emits probabilities."""
    import keras

    b = builders.step_b(output_size=O)
    return keras.Model(b.inputs, [keras.layers.Softmax()(b.outputs[0]), *b.outputs[1:]], name="b_softmax")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("first_hour")
    builders.model_a().save(folder / "a.keras")
    softmax_b().save(folder / "softmax_b.keras")
    builders.step_b(units=4).save(folder / "b4.keras")  # state size == H: state_init='ir' applies
    rng = np.random.default_rng(2)
    one_hot = np.eye(O, dtype=np.float32)[rng.integers(0, O, size=int(STEPS.sum()))]
    write_h5(folder / "tokens.h5", inputs=builders.inputs(N, TA, seed=1), steps=STEPS, targets=one_hot)
    write_h5(folder / "train.h5", inputs=builders.inputs(N, TA, seed=1), steps=STEPS,
             targets=rng.normal(size=(int(STEPS.sum()), 2)).astype("float32"))
    write_h5(folder / "x.h5", inputs=builders.inputs(5, TA, seed=4))
    return folder


def train(files, out, data, b, *extra):
    return invoke("train", "--model-a", files / "a.keras", "--model-b", files / b, "--data", files / data,
                  "--out-dir", out, *extra)


# ------------------------------------------------- #3: a softmax B's cross-entropy


# quick: detected and --from-logits; --no-from-logits tells what is detected, and takes the same loss
@pytest.mark.parametrize("flag", [None, pytest.param("--no-from-logits", marks=pytest.mark.slow), "--from-logits"])
def test_categorical_crossentropy_of_a_softmax_b_takes_its_probabilities_unless_told(files, tmp_path, flag):
    result = train(files, tmp_path / "run", "tokens.h5", "softmax_b.keras", "--loss", "categorical-crossentropy",
                   *ONE_SGD_STEP, *([flag] if flag else []))
    assert_ok(result)
    said = " ".join(result.output.split())
    with h5_arrays(files / "tokens.h5") as (inputs, steps, targets):
        probabilities, _ = builders.reference(saved(files, "a.keras"), saved(files, "softmax_b.keras"), inputs, steps)
    p = probabilities.numpy()
    if flag == "--from-logits":  # as told: the softmax again (the old silent default, stuck near ln O)
        by_hand = np.mean(-np.sum(targets * np.log(np.exp(p) / np.exp(p).sum(-1, keepdims=True)), -1))
        assert "categorical-crossentropy on logits" in said, said
    else:  # detected (or told): B's own probabilities
        by_hand = np.mean(-np.sum(targets * np.log(np.clip(p, 1e-7, 1 - 1e-7)), -1))
        assert "categorical-crossentropy on probabilities" in said, said
    assert float(history(tmp_path / "run")[0]["loss"]) == pytest.approx(float(by_hand), rel=1e-5)


@contextlib.contextmanager
def h5_arrays(path):
    import h5py

    with h5py.File(path, "r") as f:
        yield f["inputs"][()], f["steps"][()], f["targets"][()]


# ------------------------------------------------------------ #4: --state-init


def test_train_state_init_ir_takes_the_step_of_the_ir_started_reference(files, tmp_path):
    assert_ok(train(files, tmp_path / "run", "train.h5", "b4.keras", "--state-init", "ir", *ONE_SGD_STEP))
    ref_a, ref_b = saved(files, "a.keras"), saved(files, "b4.keras")
    variables = ref_a.trainable_variables + ref_b.trainable_variables
    with h5_arrays(files / "train.h5") as (inputs, steps, targets):
        with tf.GradientTape() as tape:
            values, _ = builders.reference(ref_a, ref_b, inputs, steps, state_init="ir")
            loss = tf.reduce_mean(tf.square(values - targets))
        zeros, _ = builders.reference(ref_a, ref_b, inputs, steps)
    assert not np.allclose(values.numpy(), zeros.numpy())  # the IR start is what was trained
    expected = [v.numpy() - LR * g.numpy() for v, g in zip(variables, tape.gradient(loss, variables))]
    trained = [w.numpy() for name in ("model_a.keras", "model_b.keras")
               for w in saved(tmp_path / "run", name).trainable_variables]
    assert len(trained) == len(expected)
    for got, wanted in zip(trained, expected):
        np.testing.assert_allclose(got, wanted, rtol=1e-4, atol=1e-6)
    assert float(history(tmp_path / "run")[0]["loss"]) == pytest.approx(float(loss), rel=1e-5)


# ------------------------------------------- #5: one input file, spelled two ways


def test_shards_of_one_inputs_file_spelled_two_ways_are_one_run_and_merge(files, tmp_path, monkeypatch):
    monkeypatch.chdir(files)
    common = ("--model-a", "a.keras", "--model-b", "b4.keras", "--steps", "2,0,1", "--batch-size", 2)
    parts = []
    for index, spelling in enumerate(("x.h5", "./x.h5")):
        parts.append(tmp_path / f"part{index}.h5")
        assert_ok(invoke("generate", *common, "--inputs", spelling, "--shard", f"{index}/2", "-o", parts[-1]))
    assert len({read_result_attrs(part)["run_id"] for part in parts}) == 1
    assert_ok(invoke("merge", *parts, "-o", tmp_path / "merged.h5"))
    assert_ok(invoke("generate", *common, "--inputs", files / "x.h5", "-o", tmp_path / "whole.h5"))
    assert read_result_attrs(tmp_path / "whole.h5")["run_id"] == read_result_attrs(parts[0])["run_id"]
    merged, whole = read_result(tmp_path / "merged.h5"), read_result(tmp_path / "whole.h5")
    np.testing.assert_array_equal(merged.lengths, whole.lengths)
    np.testing.assert_array_equal(merged.values, whole.values)


# ------------------------------------------------------------- #6: Ctrl-C


def test_ctrl_c_during_train_exits_130_naming_the_saved_epoch_and_how_to_resume(files, tmp_path, monkeypatch):
    import cascade_cli.progress as progress
    from cascade_cli.options import TrainCallbacks

    class CtrlC(TrainCallbacks):
        """Ctrl-C after the first batch of epoch 2 (of 2)."""

        epoch = 0

        def epoch_started(self, epoch, *, epochs, batches):
            self.epoch = epoch

        def batch_done(self, loss):
            if self.epoch == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(progress, "train_callbacks", lambda console, **_: contextlib.nullcontext(CtrlC()))
    out = tmp_path / "run"
    result = train(files, out, "train.h5", "b4.keras", "--epochs", 2, "--batch-size", 2, "--val-split", 0,
                   "--learning-rate", 0.01)
    assert result.exit_code == 130, result.output
    said = " ".join(result.stderr.split())
    assert re.search(rf"epoch 1 of 2 is saved in '{re.escape(str(out / 'checkpoints'))}'", said), said
    assert "--resume" in said and "Traceback" not in result.output
    monkeypatch.undo()
    resumed = train(files, out, "train.h5", "b4.keras", "--resume")  # no --learning-rate: the run's own
    assert_ok(resumed)
    assert "Resuming at epoch 2 of 2, learning rate 0.01," in " ".join(resumed.output.split()), resumed.output
    assert [int(row["epoch"]) for row in history(out)] == [1, 2]


def test_resume_to_an_epoch_the_run_has_passed_is_an_error_naming_epochs(files, tmp_path):
    # #7: `--resume --epochs 30` after 41 epochs used to exit 0 with an empty table
    out = tmp_path / "run"
    assert_ok(train(files, out, "train.h5", "b4.keras", "--epochs", 2, "--batch-size", 4, "--val-split", 0))
    for epochs in (1, 2):
        result = train(files, out, "train.h5", "b4.keras", "--resume", "--epochs", epochs)
        assert result.exit_code == 1, result.output
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert "--epochs" in line and "trained 2 epochs already" in line, line
    assert [int(row["epoch"]) for row in history(out)] == [1, 2]  # nothing trained, nothing lost


def test_a_mirrored_run_on_one_device_says_it_trains_on_one_replica(files, tmp_path):
    # #10: --strategy mirrored on a CPU silently ran 1 replica
    result = train(files, tmp_path / "run", "train.h5", "b4.keras", "--strategy", "mirrored", "--epochs", 1,
                   "--batch-size", 4, "--val-split", 0)
    assert_ok(result)
    said = " ".join(result.stderr.split())
    assert "1 replica (mirrored strategy)" in said, said
    assert "Warning: --strategy mirrored found one device, so it trains on 1 replica" in said, said  # its flag


def test_a_split_that_leaves_one_training_sample_is_warned_about(files, tmp_path):
    # README list: --val-split 0.99 on 64 samples trained on one sample without a warning
    result = train(files, tmp_path / "run", "train.h5", "b4.keras", "--val-split", 0.75, "--epochs", 1)
    assert_ok(result)
    said = " ".join(result.stderr.split())
    assert "Training on 1 sample, 3 validation samples" in said, said
    assert re.search(r"Warning: --val-split 0\.75 of 4 samples leaves 1 sample to train on", said), said
