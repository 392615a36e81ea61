"""The stop gate: B's last output column is a stop logit (`StopRule.gate`, `--stop-gate`), against an eager reference."""

import numpy as np
import pytest
import tensorflow as tf

import builders
import paths
import stopref
from clitools import assert_error, assert_nothing_in, assert_ok, invoke
from cascade_cli.errors import ParameterError
from cascade_cli.options import StopRule
from cascade_cli.results_io import read_result, read_result_attrs
from cascade_cli.run.cascade import Cascade
from test_cli import direct, files, generate  # noqa: F401 - `files` is test_cli's fixture
from test_runner import counting_b, make_b

MAX_STEPS = 6
CAPS = np.array([[6, 0, 2, 1, 6], [0, 0, 0, 0, 0], [3, 6, 6, 0, 1], [6, 6, 6, 6, 6]])
O = 3  # two outputs and the gate


def gate_threshold(a, b, x, state, quantile=0.6, feedback=False):
    """A threshold some steps' gates reach and others do not (a feedback B fed its values and a 0 gate)."""
    if feedback:
        values = stopref.reference(a, b, x, MAX_STEPS, state=state, feedback=True, fed=stopref.without_gate)[0]
    else:
        values = Cascade(a, b, state=state, run_eagerly=True).run(x, np.full(x.shape[:2], MAX_STEPS))[0].numpy()
    return float(np.quantile(stopref.sigmoid(values[:, -1]), quantile))


def gate(threshold):
    return lambda y, *token: stopref.sigmoid(y[-1]) >= threshold


# quick: one case on the default, three plain ones (each form of B, state and min_steps on the plain path); the
# rest run with -m slow
@pytest.mark.parametrize("b_kind, state, min_steps, jit", paths.quick(paths.both(
    [(b, s, m) for m in (0, 3) for b, s in [("gru", "reset"), ("gru", "carry"), ("lstm", "carry"), ("sequence", "reset")]],
    auto=[("gru", "reset", 3), ("lstm", "carry", 0)]),
    "gru-reset-3-auto", "gru-carry-0-plain", "lstm-carry-3-plain", "sequence-reset-0-plain"))
def test_gate_equals_reference(b_kind, state, min_steps, jit):
    a, b = builders.model_a(), make_b(b_kind, output_size=O)
    x = builders.inputs(4, 5)
    threshold = gate_threshold(a, b, x, state)
    cascade = Cascade(a, b, state=state, max_steps=MAX_STEPS, stop_rule=StopRule.gate(threshold),
                      min_steps=min_steps, jit_compile=jit)
    for caps in (CAPS, None):
        values, lengths = cascade.run(x, caps)
        expected, expected_lengths, _ = stopref.reference(a, b, x, MAX_STEPS if caps is None else caps, state=state,
                                                          stop=gate(threshold), min_steps=min_steps)
        np.testing.assert_array_equal(lengths.numpy(), expected_lengths)
        np.testing.assert_allclose(values.numpy(), expected, atol=1e-5)
        assert (expected_lengths < MAX_STEPS).any() and (expected_lengths == MAX_STEPS).any()
    paths.assert_path(cascade, jit, loop=b_kind != "sequence")


# quick: one case per path, each state and min_steps once; the other four run with -m slow
@pytest.mark.parametrize("state, min_steps, jit", paths.quick(paths.both(
    [(s, m) for m in (0, 2) for s in ("reset", "carry")], auto=[("reset", 0), ("carry", 2)]),
    "reset-0-auto", "carry-2-plain"))
def test_gate_with_feedback_equals_reference(state, min_steps, jit):
    a, b = builders.model_a(), builders.feedback_b("gru", output_size=O)
    x = builders.inputs(4, 5)
    threshold = gate_threshold(a, b, x, state, feedback=True)
    cascade = Cascade(a, b, state=state, feedback=True, max_steps=MAX_STEPS, stop_rule=StopRule.gate(threshold),
                      min_steps=min_steps, jit_compile=jit)
    values, lengths = cascade.run(x, CAPS)
    expected, expected_lengths, _ = stopref.reference(a, b, x, CAPS, state=state, feedback=True,
                                                      stop=gate(threshold), min_steps=min_steps,
                                                      fed=stopref.without_gate)
    np.testing.assert_array_equal(lengths.numpy(), expected_lengths)
    np.testing.assert_allclose(values.numpy(), expected, atol=1e-5)
    assert (expected_lengths < CAPS).any()
    paths.assert_path(cascade, jit)


@pytest.mark.parametrize("state", ["reset", "carry"])
def test_rows_processed_equal_emitted_lengths_with_a_gate(state):
    b, counter = counting_b(units=5)  # O = 2: one output and the gate
    a = builders.model_a()
    x = builders.inputs(4, 5)
    cascade = Cascade(a, b, state=state, max_steps=MAX_STEPS, stop_rule=StopRule.gate(gate_threshold(a, b, x, state)),
                      jit_compile=False)
    stopref.assert_rows_processed_equal_emitted(cascade, counter, x, CAPS)


def test_bad_gates():
    a = builders.model_a()
    with pytest.raises(ParameterError, match=r"^stop_rule: a stop gate reads B's last output column as the stop logit "
                                             r"and needs at least one other: expected O >= 2, received O=1\.$"):
        Cascade(a, builders.step_b("gru", output_size=1), max_steps=3, stop_rule=StopRule.gate())
    for threshold in (0, 1, -0.5, float("nan")):
        with pytest.raises(ParameterError, match=r"^gate_threshold: expected a probability in \(0, 1\), received"):
            StopRule.gate(threshold)
    with pytest.raises(ParameterError, match=r"^stop_rule: a stop gate reads B's own output; the greedy sampler"):
        Cascade(a, builders.feedback_b("gru", output_size=O), feedback=True, sampler="greedy", max_steps=3,
                stop_rule=StopRule.gate())
    rule = StopRule.gate()
    assert (rule.kind, rule.value, rule.describe(), rule.stored_value) == ("gate", 0.5, "gate >= 0.5", 0.5)


# ------------------------------------------------------------ the command line


def test_generate_with_a_gate_leaves_the_gate_column_out(files, tmp_path):  # noqa: F811
    settings = dict(max_steps=4, stop_rule=StopRule.gate(0.4), jit_compile=False)
    values, lengths = direct(files, None, **settings)  # B of test_cli emits O = 2: one output and the gate
    assert (lengths < 4).any() or (lengths == 4).all()
    assert_ok(generate(files, tmp_path / "r.h5", "--max-steps", 4, "--stop-gate", "--gate-threshold", 0.4))
    got = read_result(tmp_path / "r.h5")
    np.testing.assert_array_equal(got.lengths, lengths)
    np.testing.assert_allclose(got.values, values[:, :-1], rtol=1e-5, atol=1e-6)
    attrs = read_result_attrs(tmp_path / "r.h5")
    assert (attrs["stop_rule"], attrs["stop_value"], attrs["keep_gate"]) == ("gate", 0.4, False)
    assert_ok(generate(files, tmp_path / "kept.h5", "--max-steps", 4, "--stop-gate", "--gate-threshold", 0.4,
                       "--keep-gate"))
    np.testing.assert_allclose(read_result(tmp_path / "kept.h5").values, values, rtol=1e-5, atol=1e-6)
    shown = invoke("inspect", tmp_path / "r.h5")
    assert_ok(shown)
    assert "gate >= 0.4" in shown.stdout


@pytest.mark.parametrize("args, words", [
    (["--max-steps", "3", "--stop-gate", "--gate-threshold", "1"],
     ["--gate-threshold: expected a probability in (0, 1), received 1.0."]),
    (["--max-steps", "3", "--stop-gate", "--gate-threshold", "0"], ["--gate-threshold", "(0, 1)"]),
    (["--max-steps", "3", "--gate-threshold", "0.3"], ["--gate-threshold applies to --stop-gate only"]),
    (["--max-steps", "3", "--stop-gate", "--stop-token", "1"], ["--stop-gate and --stop-token are two stop rules"]),
    (["--steps", "1,2,3", "--stop-gate"], ["--stop-gate: needs --max-steps"]),
])
def test_bad_gate_flags_exit_2(files, tmp_path, args, words):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    assert_error(generate(files, out / "r.h5", *args), 2, *words)
    assert_nothing_in(out)


def test_a_gate_on_a_one_output_b_is_one_error(files, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    one = tmp_path / "b1.keras"
    builders.step_b("gru", output_size=1).save(one)
    result = invoke("generate", "--model-a", files["a.keras"], "--model-b", one, "--inputs", files["x.h5"],
                    "--max-steps", 3, "--stop-gate", "-o", out / "r.h5")
    assert_error(result, 2, "--stop-gate", "expected O >= 2, received O=1")
    assert_nothing_in(out)


# ------------------------------------------------------------ training the gate

import math  # noqa: E402

import keras  # noqa: E402

from filetools import write_h5  # noqa: E402
from cascade_cli.data import TrainingData, append_gate_targets  # noqa: E402
from cascade_cli.options import TrainConfig  # noqa: E402
from cascade_cli.train.fit import fit
from cascade_cli.train.losses import gate_terms, loss_terms  # noqa: E402


def test_gate_targets_by_hand():
    steps = np.array([[2, 0], [0, 1]])
    targets = append_gate_targets(steps, np.array([[5.0], [6.0], [7.0]], np.float32))
    assert targets.tolist() == [[5.0, 0.0], [6.0, 1.0], [7.0, 1.0]]  # 1 at each pair's last step
    assert append_gate_targets(np.zeros((1, 2), int), np.zeros((0, 3), np.float32)).shape == (0, 4)


def test_stop_loss_equals_a_hand_worked_bce_on_two_pairs():
    # pair 1: two steps (gate targets 0, 1); pair 2: one step (1). O = 2: one output and the gate logit.
    predictions = tf.constant([[1.0, 0.0], [2.0, 2.0], [0.5, -1.0]])
    targets = tf.constant([[0.0, 0.0], [1.0, 1.0], [1.5, 1.0]])
    terms = gate_terms(loss_terms("mse"), elements_per_row=1, stop_weight=0.5, stop_pos_weight=2.0)
    total, count = terms(predictions, targets)
    mse = (1.0 + 1.0 + 1.0) / 3  # (1 - 0)^2, (2 - 1)^2, (0.5 - 1.5)^2
    bce = (math.log(2.0)  # z = 0, logit 0: -log(1 - sigmoid(0))
           + 2.0 * math.log(1 + math.exp(-2.0))  # z = 1, logit 2, weighted 2: -2 log(sigmoid(2))
           + 2.0 * math.log(1 + math.exp(1.0))) / 3  # z = 1, logit -1: -2 log(sigmoid(-1))
    assert float(count) == 3.0
    assert float(total / count) == pytest.approx(mse + 0.5 * bce, rel=1e-6)
    assert float(total / count) == pytest.approx(1.5955877629, rel=1e-6)  # the same, worked out


def test_one_sgd_step_with_a_stop_gate_is_w_minus_lr_times_the_reference_gradient(tmp_path):
    n, o = 4, 3  # two outputs and the gate
    rng = np.random.default_rng(2)
    inputs = builders.inputs(n, 3)
    steps = rng.integers(0, 3, size=(n, 3))
    steps[0, 0] = 0
    targets = rng.normal(size=(int(steps.sum()), o - 1)).astype("float32")
    path = write_h5(tmp_path / "train.h5", inputs=inputs, steps=steps, targets=targets)
    end = 1  # with an end token too: the gate's target is 1 at each end row
    rows, stops, offset = [], [], 0
    for count in steps.reshape(-1):
        rows.extend(targets[offset:offset + count])
        rows.append(np.eye(o - 1, dtype="float32")[end])
        stops.extend([0.0] * count + [1.0])
        offset += count
    rows, stops = np.stack(rows), np.array(stops, np.float32)
    ref_a, ref_b = builders.model_a(), builders.step_b("gru", output_size=o)
    variables = ref_a.trainable_variables + ref_b.trainable_variables
    with tf.GradientTape() as tape:
        values, _ = builders.reference(ref_a, ref_b, inputs, steps + 1)
        mse = tf.reduce_sum(tf.square(values[:, :-1] - rows)) / rows.size
        logits = values[:, -1]
        bce = -(3.0 * stops * tf.math.log_sigmoid(logits) + (1 - stops) * tf.math.log_sigmoid(-logits))
        loss = mse + 0.5 * tf.reduce_mean(bce)
    grads = tape.gradient(loss, variables)
    expected = [v.numpy() - 0.1 * g.numpy() for v, g in zip(variables, grads)]
    with TrainingData(path) as data:
        history = fit(builders.model_a(), builders.step_b("gru", output_size=o), data, out_dir=tmp_path / "out",
                      config=TrainConfig(optimizer="sgd", learning_rate=0.1, epochs=1, batch_size=n, shuffle=False,
                                         val_split=0.0, append_end_token=end, stop_gate=True, stop_weight=0.5,
                                         stop_pos_weight=3.0, jit_compile=False))
    assert history[0]["loss"] == pytest.approx(float(loss), rel=1e-5)
    saved = [keras.saving.load_model(tmp_path / "out" / name, compile=False)
             for name in ("model_a.keras", "model_b.keras")]
    for w, e, v in zip(saved[0].trainable_variables + saved[1].trainable_variables, expected, variables):
        assert not np.allclose(e, v.numpy())
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-4, atol=1e-6)


def test_bad_gate_training_settings(tmp_path):
    with pytest.raises(ParameterError, match=r"^stop_weight: weighs the stop gate's loss: give stop_gate=True"):
        TrainConfig(stop_weight=2.0)
    with pytest.raises(ParameterError, match=r"^stop_pos_weight: expected a finite number > 0, received 0\.$"):
        TrainConfig(stop_gate=True, stop_pos_weight=0)
    with pytest.raises(ParameterError, match=r"^sampling_schedule: a row fed its own sample would be fed its stop "
                                             r"logit"):
        TrainConfig(stop_gate=True, feedback=True, sampling_schedule="constant:0.5")
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(2, 2), steps=np.ones((2, 2), int),
                    targets=np.zeros((4, 3), np.float32))
    builders.model_a().save(tmp_path / "a.keras")
    builders.step_b("gru", output_size=3).save(tmp_path / "b.keras")
    result = invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
                    "--out-dir", tmp_path / "run", "--epochs", 1, "--stop-gate", "--no-xla")
    assert_error(result, 1, "have O=3 values per step but model B emits O=3, the last a stop gate: expected O - 1 = 2")
    result = invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
                    "--out-dir", tmp_path / "run", "--epochs", 1, "--stop-weight", 2)
    assert_error(result, 2, "--stop-weight: weighs the stop gate's loss: give --stop-gate")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------ issue 30, defect 3: a stop gate on a feedback B


def test_a_feedback_b_with_a_stop_gate_is_fed_its_value_columns_and_a_zero_gate(tmp_path):
    """One SGD step of --feedback --stop-gate equals `w - lr * grad` of an eager loop in which `y_prev` is the
    target of the step before with the gate column 0 (`previous`: the sample's last target, across pairs)."""
    n, o = 3, 3  # two values and the gate
    rng = np.random.default_rng(4)
    inputs = builders.inputs(n, 3)
    steps = np.array([[2, 0, 1], [0, 1, 3], [1, 2, 0]])
    values_file = rng.normal(size=(int(steps.sum()), o - 1)).astype("float32")
    path = write_h5(tmp_path / "train.h5", inputs=inputs, steps=steps, targets=values_file)
    ref_a, ref_b = builders.model_a(), builders.feedback_b(output_size=o)
    variables = ref_a.trainable_variables + ref_b.trainable_variables
    with tf.GradientTape() as tape:
        ir = ref_a(inputs)
        squared, bce, row = [], [], 0
        for i in range(n):
            fed = tf.zeros([1, o])
            for t in range(3):
                state = tf.zeros([1, 5])
                for j in range(int(steps[i, t])):
                    y, state = ref_b([ir[i:i + 1, t], fed, state])
                    stop = float(j == steps[i, t] - 1)
                    squared.append(tf.reduce_sum(tf.square(y[0, :-1] - values_file[row])))
                    bce.append(-(stop * tf.math.log_sigmoid(y[0, -1]) + (1 - stop) * tf.math.log_sigmoid(-y[0, -1])))
                    fed = tf.constant(np.append(values_file[row], 0.0)[None], tf.float32)  # never the 0/1 target
                    row += 1
        loss = tf.add_n(squared) / values_file.size + tf.add_n(bce) / row
    grads = tape.gradient(loss, variables)
    expected = [v.numpy() - 0.1 * g.numpy() for v, g in zip(variables, grads)]
    builders.model_a().save(tmp_path / "a.keras")
    builders.feedback_b(output_size=o).save(tmp_path / "b.keras")
    assert_ok(invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
                     "--out-dir", tmp_path / "run", "--feedback", "--feedback-start", "previous", "--stop-gate",
                     "--optimizer", "sgd", "--learning-rate", 0.1, "--epochs", 1, "--batch-size", n, "--no-shuffle",
                     "--val-split", 0, "--no-xla"))
    saved = [keras.saving.load_model(tmp_path / "run" / name, compile=False) for name in ("model_a.keras",
                                                                                          "model_b.keras")]
    for w, e in zip(saved[0].trainable_variables + saved[1].trainable_variables, expected):
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("state", ["reset", "carry"])
def test_generation_with_a_gate_feeds_back_the_values_and_a_zero_gate(state):
    a, b = builders.model_a(), builders.feedback_b("gru", output_size=O)
    x = builders.inputs(4, 5)
    threshold = gate_threshold(a, b, x, state, feedback=True)
    cascade = Cascade(a, b, state=state, feedback=True, max_steps=MAX_STEPS, stop_rule=StopRule.gate(threshold),
                      jit_compile=False)
    values, lengths = cascade.run(x, CAPS)
    expected, expected_lengths, _ = stopref.reference(a, b, x, CAPS, state=state, feedback=True,
                                                      stop=gate(threshold), fed=stopref.without_gate)
    np.testing.assert_array_equal(lengths.numpy(), expected_lengths)
    np.testing.assert_allclose(values.numpy(), expected, atol=1e-5)


def test_a_gate_run_writes_a_generator_that_stops_with_the_gate_up_to_max_steps(tmp_path):
    """Issue 30, defect 2: DIR/cascade.keras generates as trained: the gate, identity, --max-steps (or longest + 1)."""
    from cascade_cli.train.keras_model import load_generator

    steps = np.array([[2, 0, 1], [1, 3, 0]])
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(2, 3), steps=steps,
                    targets=np.zeros((int(steps.sum()), 2), np.float32))
    builders.model_a().save(tmp_path / "a.keras")
    builders.step_b("gru", output_size=3).save(tmp_path / "b.keras")
    common = ("--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path, "--epochs", 1,
              "--val-split", 0, "--no-xla", "--stop-gate")
    for extra, wanted in (((), 4), (("--max-steps", 9), 9)):
        assert_ok(invoke("train", *common, "--out-dir", tmp_path / f"run{wanted}", *extra))
        settings = load_generator(tmp_path / f"run{wanted}" / "cascade.keras").settings
        assert settings["stop_rule"] == StopRule.gate() and settings["max_steps"] == wanted
        assert settings["sampler"].kind == "identity" and not settings["exclude_stop_step"]
    result = invoke("train", *common[:-1], "--out-dir", tmp_path / "plain", "--max-steps", 9)
    assert_error(result, 2, "--max-steps", "--append-end-token or --stop-gate")
