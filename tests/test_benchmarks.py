"""Checks the benchmark yardsticks against a plain eager reference, and the harness.

The nested loops are the well-known answer the runner must match value for
value, so they are checked first against the simplest possible reference: one
sample, one outer step, one inner step at a time, in eager Python.
"""

import dataclasses
import importlib.util
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks import bench, peers
from benchmarks.nested import limit, make_limit, make_nested_loops, nested_loops

FEATURES, HIDDEN, UNITS, OUTPUTS = 3, 4, 5, 2
HAS_RUNNER = importlib.util.find_spec("cascade_cli.run.cascade") is not None
needs_runner = pytest.mark.skipif(not HAS_RUNNER, reason="cascade_cli.run.cascade is not written yet")

# Zero steps at the start, in the middle, at the end, and a whole zero row.
STEPS = np.array(
    [
        [0, 2, 0, 3],
        [1, 0, 0, 2],
        [0, 0, 0, 0],
        [3, 1, 2, 0],
    ],
    dtype=np.int32,
)


def build_model_a(seed):
    """Returns a tiny `(N, Ta, F) -> (N, Ta, H)` GRU model A."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(None, FEATURES))
    return keras.Model(inputs, keras.layers.GRU(HIDDEN, return_sequences=True)(inputs))


def build_model_b(seed, *, cell="gru"):
    """Returns a tiny step-form model B: a GRU cell (one state) or an LSTM cell (two)."""
    keras.utils.set_random_seed(seed)
    x = keras.Input(shape=(HIDDEN,))
    states = [keras.Input(shape=(UNITS,)) for _ in range(1 if cell == "gru" else 2)]
    layer = keras.layers.GRUCell(UNITS) if cell == "gru" else keras.layers.LSTMCell(UNITS)
    h, new_states = layer(x, states)
    y = keras.layers.Dense(OUTPUTS)(h)
    return keras.Model([x, *states], [y, *new_states])


def reference(model_a, model_b, inputs, steps, *, state):
    """One sample, one outer step, one inner step at a time, eagerly.

    Returns:
        A nested list `[n][t]` of numpy arrays `(steps[n, t], O)`.
    """
    result = []
    for n in range(inputs.shape[0]):
        ir = model_a(inputs[n : n + 1]).numpy()[0]  # (Ta, H)
        states = [np.zeros((1, spec.shape[-1]), np.float32) for spec in model_b.inputs[1:]]
        row = []
        for t in range(inputs.shape[1]):
            if state == "reset":
                states = [np.zeros_like(s) for s in states]
            values = []
            for _ in range(steps[n, t]):
                y, *states = [v.numpy() for v in model_b([ir[t : t + 1], *states])]
                values.append(y[0])
            row.append(np.array(values, np.float32).reshape(-1, OUTPUTS))
        result.append(row)
    return result


def nested_to_lists(outputs, mask, steps):
    """Cuts time-major padded `(Ta, L, N, O)` outputs into the reference's nested lists."""
    outputs, mask = np.asarray(outputs), np.asarray(mask)
    for t in range(steps.shape[1]):
        for n in range(steps.shape[0]):
            np.testing.assert_array_equal(mask[t, :, n], np.arange(mask.shape[1]) < steps[n, t])
            np.testing.assert_array_equal(outputs[t, steps[n, t] :, n], 0.0)
    return [[outputs[t, : steps[n, t], n] for t in range(steps.shape[1])] for n in range(steps.shape[0])]


@pytest.fixture(scope="module")
def models():
    return build_model_a(1), build_model_b(2)


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(0).normal(size=(*STEPS.shape, FEATURES)).astype(np.float32)


@pytest.mark.parametrize("state", ["reset", "carry"])
def test_nested_loops_match_eager_reference(models, inputs, state):
    model_a, model_b = models
    expected = reference(model_a, model_b, inputs, STEPS, state=state)
    outputs, mask = make_nested_loops(model_a, model_b, state=state)(inputs, STEPS)
    assert outputs.shape == (4, 3, 4, OUTPUTS)
    assert mask.shape == (4, 3, 4)
    got = nested_to_lists(outputs, mask, STEPS)
    for n in range(STEPS.shape[0]):
        for t in range(STEPS.shape[1]):
            np.testing.assert_allclose(got[n][t], expected[n][t], rtol=1e-5, atol=1e-6)


def test_carry_differs_from_reset(models, inputs):
    """Guards the reference itself: with carried state, later outer steps change."""
    model_a, model_b = models
    reset = reference(model_a, model_b, inputs, STEPS, state="reset")
    carry = reference(model_a, model_b, inputs, STEPS, state="carry")
    np.testing.assert_allclose(carry[0][1], reset[0][1], rtol=1e-6)  # first outer step that runs
    assert not np.allclose(carry[0][3], reset[0][3])  # state flowed from outer step 1, over step 2


def test_nested_loops_eager_equals_tf_function(models, inputs):
    model_a, model_b = models
    eager, _ = nested_loops(model_a, model_b, inputs, STEPS, state="carry")
    graph, _ = make_nested_loops(model_a, model_b, state="carry")(inputs, STEPS)
    np.testing.assert_allclose(eager, graph, rtol=1e-5, atol=1e-6)


def test_nested_loops_two_states(inputs):
    model_a, model_b = build_model_a(3), build_model_b(4, cell="lstm")
    expected = reference(model_a, model_b, inputs, STEPS, state="carry")
    outputs, mask = make_nested_loops(model_a, model_b, state="carry")(inputs, STEPS)
    got = nested_to_lists(outputs, mask, STEPS)
    for n in range(STEPS.shape[0]):
        for t in range(STEPS.shape[1]):
            np.testing.assert_allclose(got[n][t], expected[n][t], rtol=1e-5, atol=1e-6)


def test_nested_loops_all_zero_steps(models, inputs):
    model_a, model_b = models
    outputs, mask = make_nested_loops(model_a, model_b, state="carry")(inputs, np.zeros_like(STEPS))
    assert outputs.shape == (4, 0, 4, OUTPUTS)
    assert mask.shape == (4, 0, 4)


def test_limit_is_first_inner_step_of_every_row(models, inputs):
    """With zero states, every row of the limit equals the first inner step of its pair."""
    model_a, model_b = models
    expected = reference(model_a, model_b, inputs, STEPS, state="reset")
    first_steps = [
        np.repeat(expected[n][t][:1], STEPS[n, t], axis=0) for n in range(STEPS.shape[0]) for t in range(STEPS.shape[1])
    ]
    got = make_limit(model_a, model_b)(inputs, STEPS)
    assert got.shape == (STEPS.sum(), OUTPUTS)
    np.testing.assert_allclose(got, np.concatenate(first_steps), rtol=1e-5, atol=1e-6)
    assert limit(model_a, model_b, inputs, np.zeros_like(STEPS)).shape == (0, OUTPUTS)


@needs_runner
@pytest.mark.parametrize("state", ["reset", "carry"])
def test_nested_loops_equal_cascade(models, inputs, state):
    """The strongest check of the runner's semantics: the nested-loop answer, value for value."""
    from cascade_cli.run.cascade import Cascade

    model_a, model_b = models
    outputs, mask = make_nested_loops(model_a, model_b, state=state)(inputs, STEPS)
    expected = np.transpose(np.asarray(outputs), (2, 0, 1, 3))[np.transpose(np.asarray(mask), (2, 0, 1))]
    cascade = Cascade(model_a, model_b, state=state)
    for run in (cascade, tf.function(cascade)):
        result = run(inputs, STEPS)
        np.testing.assert_array_equal(result.nested_row_lengths()[-1].numpy(), STEPS.reshape(-1))
        np.testing.assert_allclose(result.flat_values, expected, rtol=1e-5, atol=1e-6)


@needs_runner
@pytest.mark.parametrize("state", ["reset", pytest.param("carry", marks=pytest.mark.slow)])  # ~9 s each
def test_nested_loops_gradients_equal_cascade(models, inputs, state):
    from cascade_cli.run.cascade import Cascade

    model_a, model_b = models
    weights = model_a.trainable_variables + model_b.trainable_variables
    cascade = Cascade(model_a, model_b, state=state)
    with tf.GradientTape() as nested_tape:
        nested_total = tf.reduce_sum(nested_loops(model_a, model_b, inputs, STEPS, state=state)[0])
    with tf.GradientTape() as cascade_tape:
        cascade_total = tf.reduce_sum(cascade(inputs, STEPS).flat_values)
    for got, expected in zip(cascade_tape.gradient(cascade_total, weights), nested_tape.gradient(nested_total, weights)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_zero_fraction_steps_keep_max_length():
    rng = np.random.default_rng(0)
    for fraction in (0.0, 0.5, 0.9):
        steps = bench.make_steps(rng, 20, 10, max_steps=8, zero_fraction=fraction)
        assert steps.shape == (20, 10)
        assert steps.max() == 8
        assert (steps == 0).sum() == round(fraction * 200)
    assert bench.make_steps(rng, 0, 10, max_steps=8).shape == (0, 10)


@pytest.mark.slow
@needs_runner
def test_quick_benchmark_writes_every_case(tmp_path):
    bench.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    (run,) = report["runs"]
    timed = {(case["name"], case["direction"], case["state"], case["method"]) for case in run["timings"]}
    assert timed == set(bench.planned_timings(bench.plan(quick=True)))
    assert all(case["median_s"] > 0 and len(case["times_s"]) >= 1 for case in run["timings"])
    assert run["machine"]["cpu_count"] == __import__("os").cpu_count()
    assert {(target["name"], target["method"]) for target in run["targets"]} == {
        (name, method) for name in ("faster than nested loops", "close to the limit", "skipping is free") for method in bench.VARIANTS
    } | {("close to the XLA limit", "cascade_xla")}
    assert not [case for case in run["timings"] if "error" in case]
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Benchmark results")
    assert "| cascade_xla / limit_xla |" in text and "`limit_xla`: A under XLA" in text


def test_peak_rss_sees_the_child_alone():
    import sys

    small, _ = bench.peak_rss([sys.executable, "-c", "pass"])
    large, _ = bench.peak_rss([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert 290 <= large - small < 400  # the 300 MiB it touched, give or take the interpreter
    with pytest.raises(RuntimeError, match="exit code 3"):
        bench.peak_rss([sys.executable, "-c", "raise SystemExit(3)"])


# Stands in for `cascade generate`: checks its arguments and holds the whole input.
FAKE_GENERATE = """
import sys, h5py
args = sys.argv[1:]
assert args[0] == "generate", args
options = dict(zip(args[1::2], args[2::2]))
assert options["--batch-size"] == "256"
with h5py.File(options["--inputs"], "r") as file:
    inputs = file["inputs"][...]
steps = [line.split() for line in open(options["--steps-file"])]
assert len(steps) == len(inputs) and len(steps[0]) == inputs.shape[1]
open(options["-o"], "w").close()
"""


def test_memory_check_runs_the_command_on_both_sizes(tmp_path):
    import sys

    lines = []
    memory = bench.memory_check(
        small=10, large=40_000, outer=10, features=64, workdir=tmp_path, command=[sys.executable, "-c", FAKE_GENERATE], log=lines.append
    )
    assert (memory["small"]["samples"], memory["large"]["samples"]) == (10, 40_000)
    # 40,000 x 10 x 64 float32 = 98 MiB held by the stand-in: not streaming, so it must fail.
    assert memory["large"]["peak_rss_mib"] - memory["small"]["peak_rss_mib"] > 90
    assert memory["ratio"] > 1.15 and memory["passed"] is False
    assert len(lines) == 2
    assert list(tmp_path.iterdir()) == []


def fake_run(device, *, quick, value):
    run_plan = bench.plan(quick=True)
    return {
        "device": device,
        "machine": {"date": "d", "cpu_model": "c", "cpu_count": 2, "memory_gib": 1.0, "gpus": [], "python": "p",
                    "tensorflow": "t", "keras": "k", "numpy": "n"},
        "plan": {**__import__("dataclasses").asdict(run_plan), "quick": quick},
        "timings": [
            {"name": name, "direction": direction, "state": state, "method": method, "median_s": value, "times_s": [value]}
            for name, direction, state, method in bench.planned_timings(run_plan)
        ],
        "targets": bench.evaluate_targets(run_plan, []),
    }  # fmt: skip


def test_write_report_keeps_other_devices_and_notes(tmp_path):
    bench.write_report(tmp_path, run=fake_run("cpu", quick=False, value=1.0))
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text(markdown.read_text() + "We tried XLA: 1.3x.\n")
    bench.write_report(tmp_path, run=fake_run("gpu: H200", quick=False, value=2.0))
    report = bench.write_report(tmp_path, run=fake_run("cpu", quick=False, value=3.0))
    assert [(run["device"], run["timings"][0]["median_s"]) for run in report["runs"]] == [("gpu: H200", 2.0), ("cpu", 3.0)]
    text = markdown.read_text()
    assert "## gpu: H200" in text and "## cpu" in text
    assert text.endswith("We tried XLA: 1.3x.\n")
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(report))
    assert all(target["passed"] is None for target in report["runs"][0]["targets"])  # missing timings: n/a


def test_targets_are_judged_from_medians():
    run_plan = bench.plan(quick=True)
    medians = {
        "cascade": 1.0, "cascade_xla": 0.8, "nested": 4.0, "limit": 0.9, "limit_xla": 0.5, "model_a": 0.5, "model_a_xla": 0.1
    }  # fmt: skip
    timings = [
        {"name": name, "direction": direction, "state": state, "method": method, "median_s": medians[method]}
        for name, direction, state, method in bench.planned_timings(run_plan)
    ]
    # 90% zeros: cascade 0.55 -> (0.55 - 0.5) / (1.0 - 0.5) = 0.1; cascade_xla 0.3 -> (0.3 - 0.1) / (0.8 - 0.1)
    for timing in timings:
        if timing["name"] == run_plan.zero_cases[2].name and timing["method"] in bench.VARIANTS:
            timing["median_s"] = {"cascade": 0.55, "cascade_xla": 0.3}[timing["method"]]
    targets = bench.evaluate_targets(run_plan, timings)
    verdicts = [(t["name"], t["method"], t["threshold"], round(t["measured"], 3), t["passed"]) for t in targets]
    assert verdicts[:10] == [
        ("faster than nested loops", "cascade", 10.0, 4.0, False),
        ("faster than nested loops", "cascade_xla", 10.0, 5.0, False),
        ("faster than nested loops", "cascade", 5.0, 4.0, False),
        ("faster than nested loops", "cascade_xla", 5.0, 5.0, True),
        ("faster than nested loops", "cascade", 3.0, 4.0, True),
        ("faster than nested loops", "cascade_xla", 3.0, 5.0, True),
        ("faster than nested loops", "cascade", 4.0, 4.0, True),
        ("faster than nested loops", "cascade_xla", 4.0, 5.0, True),
        ("faster than nested loops", "cascade", 4.0, 4.0, True),
        ("faster than nested loops", "cascade_xla", 4.0, 5.0, True),
    ]
    # Every case and direction: each variant against the limit, then cascade_xla against limit_xla.
    first_case = verdicts[10:13]
    assert first_case == [
        ("close to the limit", "cascade", 1.2, round(1 / 0.9, 3), True),
        ("close to the limit", "cascade_xla", 1.2, round(0.8 / 0.9, 3), True),
        ("close to the XLA limit", "cascade_xla", 1.2, 1.6, False),
    ]
    close = [v for v in verdicts if v[0].startswith("close to the")]
    assert len(close) == 3 * 2 * len(run_plan.speed_cases + run_plan.zero_cases)
    assert ("close to the limit", "cascade", 1.2, round(0.55 / 0.9, 3), True) in close
    assert ("close to the XLA limit", "cascade_xla", 1.2, round(0.3 / 0.5, 3), True) in close
    assert verdicts[-8:] == [
        ("skipping is free", "cascade", 0.2, 0.1, True),
        ("skipping is free", "cascade_xla", 0.2, round(0.2 / 0.7, 3), False),
    ] * 4
    assert len({(t["name"], t["method"], t["case"], t["direction"], t["state"]) for t in targets}) == len(targets)


def test_target_rows_name_the_variant_and_read_old_runs():
    run_plan = bench.plan(quick=True)
    targets = bench.evaluate_targets(run_plan, [])
    rows = bench.target_rows(targets)
    assert [row[:2] for row in rows[:2]] == [["faster than nested loops", "cascade"], ["faster than nested loops", "cascade_xla"]]
    assert all(row[-1] == "n/a" for row in rows)
    old = {key: value for key, value in targets[0].items() if key != "method"}  # results.json before cascade_xla
    assert bench.target_rows([old])[0][1] == "cascade"
    assert "close to the XLA limit (cascade_xla): cascade_xla / limit_xla" in bench.target_legend(targets)
    assert len(bench.timing_rows(run_plan, [])[0]) == len(bench.TIMING_HEADER)


@needs_runner
@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=pytest.mark.slow) if m.endswith("_xla") else m for m in bench.METHODS]
)
def test_every_method_runs_the_models_in_inference_both_ways(method):
    """A with a Dropout(0.5) at its end gives the same gradients as A without it.

    Only with `training=False` is the Dropout the identity: with `training=True`
    it would drop half the IR, and its gradients, at random. (Forward alone
    always ran in inference; forward+backward is the direction to guard.)
    """
    keras.utils.set_random_seed(5)
    sequence = keras.Input(shape=(None, FEATURES))
    gru = keras.layers.GRU(HIDDEN, return_sequences=True)
    plain_a = keras.Model(sequence, gru(sequence))
    dropout_a = keras.Model(sequence, keras.layers.Dropout(0.5)(gru(sequence)))
    model_b = build_model_b(6)
    inputs = tf.constant(np.random.default_rng(1).normal(size=(*STEPS.shape, FEATURES)).astype(np.float32))
    steps = tf.constant(STEPS)
    state = "carry" if method in bench.STATEFUL_METHODS else "reset"
    expected = bench.make_function(method, plain_a, model_b, state=state, direction="forward+backward")(inputs, steps)
    got = bench.make_function(method, dropout_a, model_b, state=state, direction="forward+backward")(inputs, steps)
    weights = plain_a.trainable_variables + ([] if method.startswith("model_a") else model_b.trainable_variables)
    assert len(got) == len(expected) == len(weights)
    for value, reference_value in zip(got, expected):
        np.testing.assert_allclose(value, reference_value, rtol=1e-5, atol=1e-6)
    if method.endswith("_xla"):  # really the XLA call: it refuses training mode
        with pytest.raises(ValueError, match="inference only"):
            bench.xla_model(plain_a)(inputs, training=True)


# --------------------------------------------------------------------------- peers (issue 16)

needs_torch = pytest.mark.skipif(not peers.has_torch(), reason="torch is not installed (the optional bench extra)")
PEER_STEPS = np.array([[0, 2, 0, 3], [1, 0, 0, 2], [0, 0, 0, 0]], dtype=np.int32)  # zeros, and a whole zero row


REFERENCE_VALUES = {}  # state -> the README call's values on peer_models, computed once


@pytest.fixture(scope="module")
def peer_models():
    return bench.build_models(features=FEATURES, hidden=HIDDEN, outputs=OUTPUTS, seed=3)


def peer_function(method, peer_models, state, direction):
    model_a, model_b = peer_models
    run_plan = peers.plan(quick=True)
    return peers.make_method(method, model_a, model_b, state=state, direction=direction, run_plan=run_plan,
                             hidden=HIDDEN, shared={})


def peer_values(method, peer_models, state):
    function, numpy_inputs = peer_function(method, peer_models, state, "forward")
    arrays = (np.random.default_rng(2).normal(size=(*PEER_STEPS.shape, FEATURES)).astype(np.float32), PEER_STEPS)
    return peers.flat_values(method, function(*(arrays if numpy_inputs else peers.inputs_as_tensors(arrays))))


@needs_runner
@pytest.mark.parametrize("state", ["reset", "carry"])
@pytest.mark.parametrize("method", ["keras_padded", pytest.param("keras_padded_xla", marks=pytest.mark.slow),
                                    pytest.param("torch_packed", marks=needs_torch), "nested", "cascade_plain"])
def test_peer_values_equal_the_cascade(peer_models, state, method):
    """Every peer computes the cascade's values, in value order (the README's eager call is the reference)."""
    if state not in REFERENCE_VALUES:
        REFERENCE_VALUES[state] = peer_values("readme", peer_models, state)
    expected = REFERENCE_VALUES[state]
    assert expected.shape == (PEER_STEPS.sum(), OUTPUTS)
    np.testing.assert_allclose(peer_values(method, peer_models, state), expected, atol=1e-5)


@needs_runner
@pytest.mark.parametrize("state", ["reset", "carry"])
def test_keras_padded_gradients_equal_the_cascade(peer_models, state):
    """The padded peer's gradients, A's and its own GRU and Dense's, equal the cascade's for A and B."""
    arrays = peers.inputs_as_tensors((np.random.default_rng(2).normal(size=(*PEER_STEPS.shape, FEATURES))
                                      .astype(np.float32), PEER_STEPS))
    got = peer_function("keras_padded", peer_models, state, "forward+backward")[0](*arrays)
    want = peer_function("cascade", peer_models, state, "forward+backward")[0](*arrays)
    assert len(got) == len(want) == 3 + 3 + 2  # A's GRU, B's GRU cell, B's Dense
    for g, w in zip(got, want):
        np.testing.assert_allclose(tf.convert_to_tensor(g), tf.convert_to_tensor(w), rtol=1e-4, atol=1e-5)


def peer_timings(medians):
    """Timings for the quick plan's first case: `medians` is `(state, direction, method) -> seconds`."""
    case = peers.plan(quick=True).cases[0]
    return [{"name": case.name, "state": state, "direction": direction, "method": method, "median_s": seconds,
             "times_s": [seconds]} for (state, direction, method), seconds in medians.items()]


def test_peer_targets_and_the_ratio_to_the_best_peer():
    run_plan = peers.plan(quick=True)
    run_plan = dataclasses.replace(run_plan, cases=run_plan.cases[:1])
    medians = {}
    for state in peers.STATES:
        for direction in peers.DIRECTIONS:
            medians.update({(state, direction, "readme"): 1.05, (state, direction, "cascade"): 1.0,
                            (state, direction, "cascade_plain"): 1.5, (state, direction, "nested"): 5.0,
                            (state, direction, "keras_padded"): 2.0, (state, direction, "keras_padded_xla"): 1.25})
    medians[("carry", "forward+backward", "keras_padded_xla")] = 1.0  # the best carry peer ties the cascade
    timings = peer_timings(medians)  # no torch_packed: the best of the peers that ran
    assert peers.best_peer(timings, run_plan.cases[0].name, "reset", "forward") == ("keras_padded_xla", 1.25)
    targets = peers.evaluate_targets(run_plan, timings)
    verdicts = [(t["name"], t["state"], t["direction"], round(t["measured"], 3), t["passed"]) for t in targets]
    assert verdicts == [
        ("README's eager call near the compiled one", "reset", "forward", 1.05, True),
        ("README's eager call near the compiled one", "reset", "forward+backward", 1.05, True),
        ("README's eager call near the compiled one", "carry", "forward", 1.05, True),
        ("README's eager call near the compiled one", "carry", "forward+backward", 1.05, True),
        ("default settings beat the best peer", "reset", "forward", 0.8, True),  # 1.0 / 1.25
        ("default settings beat the best peer", "reset", "forward+backward", 0.8, True),
        ("carry faster than nested loops", "carry", "forward+backward", 5.0, True),
        ("carry beats the best carry peer", "carry", "forward+backward", 1.0, False),
    ]
    rows = peers.timing_rows(run_plan, timings)
    assert len(rows) == 4 and all(len(row) == len(peers.TIMING_HEADER) for row in rows)
    assert rows[0][3:] == ["1050.0", "1000.0", "1500.0", "5000.0", "2000.0", "1250.0", "-", "keras_padded_xla",
                           "1.05", "0.80", "1.20", "5.00"]


def test_peers_run_stands_beside_the_runner_run(tmp_path):
    """A peers run replaces only an earlier peers run of its device; both render into RESULTS.md."""
    run_plan = peers.plan(quick=True)
    timings = peer_timings({("reset", "forward", "cascade"): 0.002})
    peers_run = {"suite": "peers", "device": "cpu", "machine": fake_run("cpu", quick=False, value=1.0)["machine"],
                 "plan": dataclasses.asdict(run_plan), "timings": timings,
                 "targets": peers.evaluate_targets(run_plan, timings),
                 "a_choice": {"N=1 Ta=6 H=4": {"a_compiled": True, "a_compiled_in_training": True}}}
    bench.write_report(tmp_path, run=fake_run("cpu", quick=True, value=1.0))
    bench.write_report(tmp_path, run=peers_run)
    report = bench.write_report(tmp_path, run=peers_run)
    assert [run.get("suite", "runner") for run in report["runs"]] == ["runner", "peers"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## cpu (quick" in text and "## Peers, cpu (quick" in text
    assert "| N=1 Ta=6 H=4 | reset | forward | - | 2.0 |" in text
    assert "N=1 Ta=6 H=4: XLA in inference, XLA in training" in text
    assert "Feedback decoding's targets are in its own suite" in text


def test_keras_gru_weights_map_to_torch_gate_order():
    """Keras keeps gates (z, r, h) in column blocks; PyTorch wants rows (r, z, n): checked on block labels."""
    torch = pytest.importorskip("torch")
    units, features = 2, 3
    layer = keras.layers.GRUCell(units)
    layer.build((None, features))
    label = np.repeat(np.array([1.0, 2.0, 3.0], np.float32), units)  # z z r r h h
    layer.set_weights([np.tile(label, (features, 1)), np.tile(label, (units, 1)), np.stack([label, 10 * label])])
    gru = torch.nn.GRU(features, units, batch_first=True)
    peers.keras_gru_to_torch(layer, gru)
    assert gru.weight_ih_l0.detach().numpy()[:, 0].tolist() == [2, 2, 1, 1, 3, 3]  # r r z z n n
    assert gru.weight_hh_l0.detach().numpy()[:, 0].tolist() == [2, 2, 1, 1, 3, 3]
    assert gru.bias_hh_l0.detach().numpy().tolist() == [20, 20, 10, 10, 30, 30]
