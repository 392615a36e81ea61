"""Checks the feedback-decoding benchmark (`benchmarks/feedback.py`): its methods against a plain eager loop.

Every method must decode the same tokens and lengths with the same values as
an independent reference (one pair, one inner step at a time, in eager
Python), and give the same teacher-forced gradients; the targets are checked
on made-up timings, and the report on a results file holding other suites.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import bench, feedback

RUN_PLAN = feedback.plan(quick=True)  # F=4, O=4, max_steps=3, H=8
BATCH, OUTER = 3, 4


@pytest.fixture(scope="module")
def setup():
    """`(model_a, model_b, inputs, chosen lengths)` on the quick plan's sizes."""
    model_a, model_b = feedback.build_models(features=RUN_PLAN.features, hidden=8, outputs=RUN_PLAN.outputs,
                                             max_steps=RUN_PLAN.max_steps)
    inputs, lengths = feedback.make_data(np.random.default_rng(3), BATCH, OUTER, features=RUN_PLAN.features,
                                         max_steps=RUN_PLAN.max_steps)
    lengths[0, 0], lengths[-1, -1] = 1, RUN_PLAN.max_steps  # both ends of the range
    inputs[..., :RUN_PLAN.max_steps] = np.eye(RUN_PLAN.max_steps, dtype=np.float32)[lengths - 1]
    return model_a, model_b, inputs, lengths


def eager_decode(model_a, model_b, inputs):
    """Greedy decoding with stop token END, one pair and one inner step at a time, in eager Python.

    Returns:
        `(values (total, O), tokens (total,), lengths (N, Ta))` in value order.
    """
    ir = model_a(tf.constant(inputs)).numpy()
    size, units = model_b.outputs[0].shape[-1], model_b.inputs[2].shape[-1]
    values, tokens, lengths = [], [], np.zeros(inputs.shape[:2], np.int32)
    for n in range(inputs.shape[0]):
        for t in range(inputs.shape[1]):
            y_prev, state = np.zeros((1, size), np.float32), np.zeros((1, units), np.float32)
            for _ in range(RUN_PLAN.max_steps):
                y, state = model_b([tf.constant(ir[n, t][None]), tf.constant(y_prev), tf.constant(state)])
                token = int(np.argmax(y.numpy()[0]))
                state = state.numpy()
                values.append(y.numpy()[0])
                tokens.append(token)
                lengths[n, t] += 1
                if token == feedback.END:
                    break
                y_prev = np.eye(size, dtype=np.float32)[token][None]
    return np.array(values), np.array(tokens), lengths


def eager_teacher_gradients(model_a, model_b, inputs, steps, targets):
    """The teacher-forced cross-entropy's gradients, one pair and one inner step at a time, in eager Python."""
    size, units = model_b.outputs[0].shape[-1], model_b.inputs[2].shape[-1]
    weights = model_a.trainable_variables + model_b.trainable_variables
    with tf.GradientTape() as tape:
        ir = model_a(tf.constant(inputs), training=True)
        loss, position = 0.0, 0
        for n in range(inputs.shape[0]):
            for t in range(inputs.shape[1]):
                y_prev, state = tf.zeros((1, size)), tf.zeros((1, units))
                for _ in range(int(steps[n, t])):
                    y, state = model_b([ir[n, t][None], y_prev, state], training=True)
                    target = int(targets[position])
                    loss += -tf.nn.log_softmax(y[0])[target]
                    y_prev = tf.one_hot([target], size)
                    position += 1
    return [gradient.numpy() for gradient in tape.gradient(loss, weights)]


def test_the_models_stop_each_pair_at_its_chosen_length(setup):
    """The hand-set units count the tokens out (1, 2, ...) and emit END at step L - 1: lengths are the chosen ones."""
    model_a, model_b, inputs, lengths = setup
    _, tokens, got = eager_decode(model_a, model_b, inputs)
    np.testing.assert_array_equal(got, lengths)
    expected = np.concatenate([[*range(1, length), feedback.END] for length in lengths.ravel()])
    np.testing.assert_array_equal(tokens, expected)


def test_the_sizes_are_checked():
    with pytest.raises(ValueError, match="O >= max_steps \\+ 1"):
        feedback.build_models(features=4, hidden=8, outputs=3, max_steps=3)


@pytest.mark.parametrize("method", (*feedback.METHODS, feedback.LIMIT))
def test_each_method_decodes_as_the_eager_loop(setup, method):
    """The limit too: told the lengths, it still decodes its own tokens."""
    model_a, model_b, inputs, lengths = setup
    want_values, want_tokens, want_lengths = eager_decode(model_a, model_b, inputs)
    if method == feedback.LIMIT:
        function = feedback.limit_decode(model_a, model_b, lengths, max_steps=RUN_PLAN.max_steps)
    else:
        function, _ = feedback.make_method(method, model_a, model_b, direction="forward", run_plan=RUN_PLAN)
    given = inputs if method == feedback.EAGER else tf.constant(inputs)
    values, tokens, got_lengths = feedback.flat_results(method, function(given))
    np.testing.assert_array_equal(got_lengths, want_lengths)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_allclose(values, want_values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", feedback.METHODS)
def test_each_method_gives_the_eager_teacher_forced_gradients(setup, method):
    model_a, model_b, inputs, lengths = setup
    _, targets, _ = eager_decode(model_a, model_b, inputs)
    targets = targets.astype(np.int32)
    targets[::2] = (targets[::2] + 1) % RUN_PLAN.outputs  # not the model's own tokens: every loss term has a gradient
    want = eager_teacher_gradients(model_a, model_b, inputs, lengths, targets)
    function, weights = feedback.make_method(method, model_a, model_b, direction="forward+backward",
                                             run_plan=RUN_PLAN)
    arguments = (inputs, lengths, targets)
    got = function(*(arguments if method == feedback.EAGER else tuple(tf.constant(a) for a in arguments)))
    assert len(got) == len(want) == 8  # A: kernel, recurrent, bias; B: the same, then Dense kernel and bias
    # XLA's CPU tanh is an approximation; through the hand-set units' saturated tanh (1 - tanh^2 ~ 2e-4) that
    # moves their gradients by ~0.3%, within the benchmark's own check (GRADIENT_RTOL of the largest entry).
    rtol = feedback.GRADIENT_RTOL if method.endswith("xla") else 1e-4
    for index, (g, w) in enumerate(zip(got, want)):
        assert np.any(w != 0), index
        np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=rtol * np.max(np.abs(w)), err_msg=str(index))


def test_check_forward_refuses_other_lengths_and_tokens(setup):
    model_a, model_b, inputs, lengths = setup
    decoded = eager_decode(model_a, model_b, inputs)
    as_cascade = (decoded[0], decoded[2], decoded[1])  # run's order: values, lengths, tokens
    tokens, got = feedback.check_forward({"cascade": lambda _: as_cascade}, inputs, lengths, log=lambda _: None)
    np.testing.assert_array_equal(tokens, decoded[1])
    with pytest.raises(AssertionError, match="other lengths"):
        feedback.check_forward({"cascade": lambda _: as_cascade}, inputs, lengths + 1, log=lambda _: None)
    other = (decoded[0], decoded[1][::-1], decoded[2])
    with pytest.raises(AssertionError, match="other tokens"):
        feedback.check_forward({"cascade": lambda _: as_cascade, "padded_decode": lambda _: other}, inputs, lengths,
                               log=lambda _: None)


def timings_of(medians):
    """Made-up timing dicts for the full plan: `medians[(batch, direction, method)] = seconds`."""
    names = {case.batch: case.name for case in feedback.plan().cases}
    return [{"name": names[batch], "batch": batch, "direction": direction, "method": method, "state": "reset",
             "mean_length": 4.5, "median_s": seconds, "times_s": [seconds]}
            for (batch, direction, method), seconds in medians.items()]


def test_targets_by_hand():
    """N=64: the faster padded decode over the cascade (>= 1.5); N=8: nested over the cascade (>= 5)."""
    run_plan = feedback.plan()
    medians = {(64, "forward", "cascade"): 0.010, (64, "forward", "padded_decode"): 0.020,
               (64, "forward", "padded_decode_xla"): 0.014, (64, "forward", "nested"): 0.5,
               (8, "forward", "cascade"): 0.010, (8, "forward", "nested"): 0.060,
               (8, "forward", "padded_decode"): 0.001,  # a padded win at N=8 is no target
               (64, "forward", "limit_xla"): 0.008, (64, "forward", "cascade_eager"): 0.012}
    targets = feedback.evaluate_targets(run_plan, timings_of(medians))
    assert [(t["case"], round(t["measured"], 6), t["passed"]) for t in targets] == [
        ("N=64 Ta=50 H=64", 1.4, False), ("N=8 Ta=100 H=64", 6.0, True)]
    medians[(64, "forward", "padded_decode_xla")] = 0.016  # now padded_decode (0.020) is the faster: 2.0
    assert feedback.evaluate_targets(run_plan, timings_of(medians))[0]["passed"] is True
    assert feedback.best_peer(timings_of(medians), "N=64 Ta=50 H=64", "forward") == ("padded_decode_xla", 0.016)
    missing = feedback.evaluate_targets(run_plan, timings_of({(8, "forward", "cascade"): 0.01}))
    assert [t["passed"] for t in missing] == [None, None]
    rows = feedback.timing_rows(run_plan, timings_of(medians))
    assert len(rows) == 6 and all(len(row) == len(feedback.TIMING_HEADER) for row in rows)  # N=1, 8, 64
    # N=64 forward: 0.016 / 0.010, 0.5 / 0.010, 0.016 / 0.008, and the eager call 0.012 / 0.010
    assert rows[4][-4:] == ["1.60", "50.00", "2.00", "1.20"]
    assert rows[5][-2:] == ["-", "-"]  # the limit runs forward only; no eager time given


def test_the_report_renders_beside_the_other_suites(tmp_path):
    """A feedback run replaces only an earlier feedback run of its device; the other suites' runs stay."""
    shutil.copy(Path(bench.__file__).with_name("results.json"), tmp_path / "results.json")
    before = [run for run in json.loads((tmp_path / "results.json").read_text())["runs"]
              if (run.get("suite"), run["device"], run["plan"]["quick"]) != ("feedback", "cpu", False)]
    run_plan = feedback.plan()
    medians = {(64, "forward", "cascade"): 0.01, (64, "forward", "padded_decode"): 0.03,
               (8, "forward", "cascade"): 0.01, (8, "forward", "nested"): 0.02}
    machine = {"date": "d", "cpu_model": "c", "cpu_count": 2, "memory_gib": 1.0, "gpus": [], "python": "p",
               "tensorflow": "t", "keras": "k", "numpy": "n"}

    def run(seconds):
        timings = timings_of(medians)
        return {"suite": "feedback", "device": "cpu", "machine": machine,
                "plan": __import__("dataclasses").asdict(run_plan), "seconds": seconds, "timings": timings,
                "targets": feedback.evaluate_targets(run_plan, timings), "note": "the machine was shared"}

    bench.write_report(tmp_path, run=run(1.0))
    report = bench.write_report(tmp_path, run=run(2.0))
    assert report["runs"][:-1] == before and report["runs"][-1]["seconds"] == 2.0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Feedback decoding, cpu" in text and text.count("## Feedback decoding") == 1
    assert "the machine was shared" in text
    assert "| feedback decoding faster than the padded decode loop | cascade | N=64 Ta=50 H=64 |" in text
    assert "| N=8 Ta=100 H=64 | forward | 4.50 | 10.0 | - | - | - | 20.0 | - | - | - | 2.00 | - | - |" in text
    for other in before:  # every earlier suite still renders its own section
        heading = {"peers": "## Peers, ", "feedback": "## Feedback decoding, ", "tapes": "## Tapes, "}.get(
            other.get("suite"), f"## {other['device']}")
        assert heading in text
