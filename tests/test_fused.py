"""A forward call as one XLA computation (`cascade_cli.run.fused`): model A, the row plan, the loop over B, the packing.

It must give what the compiled loop gives (A and the loop as their own XLA calls) bit for bit, lengths and tokens
exactly, and the plain loop's lengths and tokens exactly and its values to float32 rounding. Marked `xla`, so
conftest leaves `jit_compile="auto"` on.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import builders
from cascade_cli import inspection
from cascade_cli.options import StopRule
from cascade_cli.run import compiled_loop, fused, known, xla
from cascade_cli.run.cascade import Cascade

STEPS = np.array([[2, 0, 3, 1], [0, 0, 0, 0], [4, 1, 0, 2]], np.int32)


def test_the_plan_lists_each_samples_next_running_pair_by_hand():
    caps = tf.constant([[2, 0, 3, 1], [0, 0, 0, 0], [0, 1, 0, 0]], tf.int32)
    caps_flat, next_pair, sample_of, outer_of, row_pairs = (
        t.numpy() for t in fused.plan(caps, tf.constant([5, 6, 7], tf.int64), walk=True, quantum=2))
    #  pairs 0..3: sample 0 (0, 2, 3 run), 4..7: sample 1 (none), 8..11: sample 2 (9 runs)
    np.testing.assert_array_equal(next_pair, [2, 2, 3, -1, -1, -1, -1, -1, 9, -1, -1, -1])
    np.testing.assert_array_equal(row_pairs, [0, -1, 9, -1])  # one row per sample, padded to 2 rows
    np.testing.assert_array_equal(sample_of, [5] * 4 + [6] * 4 + [7] * 4)
    np.testing.assert_array_equal(outer_of, [0, 1, 2, 3] * 3)
    np.testing.assert_array_equal(caps_flat, caps.numpy().ravel())
    _, next_pair, _, _, row_pairs = (t.numpy() for t in fused.plan(caps, tf.range(3, dtype=tf.int64), walk=False,
                                                                   quantum=16))
    np.testing.assert_array_equal(next_pair, [-1] * 12)
    np.testing.assert_array_equal(row_pairs, [0, -1, 2, 3, -1, -1, -1, -1, -1, 9, -1, -1] + [-1] * 4)


def test_packing_puts_the_emitted_values_in_row_then_step_order_and_counts_each_pair_by_hand():
    ys = tf.reshape(tf.range(2 * 3 * 2, dtype=tf.float32), [2, 3, 2])  # (rows, steps, width)
    emitted = tf.constant([[3, 3, 0], [1, 2, 2]])  # pair + 1 per step; 0: nothing emitted
    tokens = tf.constant([[7, 8, 9], [10, 11, 12]], tf.int64)
    values, lengths, got_tokens, count = (t.numpy() for t in compiled_loop.pack(ys, emitted, tokens, 4))
    assert count == 5
    np.testing.assert_array_equal(values[:count], [[0, 1], [2, 3], [6, 7], [8, 9], [10, 11]])
    np.testing.assert_array_equal(got_tokens[:count], [7, 8, 10, 11, 12])
    np.testing.assert_array_equal(lengths, [1, 2, 2, 0])
    assert compiled_loop.pack(ys, emitted, tf.zeros([2, 0], tf.int64), 4)[2].shape == (0,)


CASES = {
    "reset token stop, given steps": (dict(stop_rule=StopRule.token(0), max_steps=5), "step", STEPS),
    "reset exclude stop step, norm stop": (
        dict(stop_rule=StopRule.norm(1.0), max_steps=5, exclude_stop_step=True), "step", STEPS),
    "reset given steps, no known cell": (dict(fast_cells=False), "step", STEPS),
    "carry given steps": (dict(state="carry"), "step", STEPS),
    "carry token stop": (dict(state="carry", stop_rule=StopRule.token(1), max_steps=5), "step", STEPS),
    "greedy feedback, min steps": (
        dict(feedback=True, sampler="greedy", max_steps=5, min_steps=2, stop_rule=StopRule.token(0)), "fb", None),
    "categorical feedback from the previous pair": (
        dict(feedback=True, sampler="categorical", seed=3, max_steps=5, stop_rule=StopRule.token(0),
             feedback_start="previous"), "fb", None),
    "carry greedy feedback": (
        dict(feedback=True, state="carry", sampler="greedy", max_steps=4, stop_rule=StopRule.token(0)), "fb", None),
}


SLOW = {"reset exclude stop step, norm stop", "reset given steps, no known cell", "carry token stop",
        "carry greedy feedback",  # three cascades compile per case; these four repeat what the others cover
        "categorical feedback from the previous pair"}  # quick: feedback's fused path in "greedy feedback, min
# steps"; the fused call's categorical draws against the plain loop's in test_compiled_loop's
# test_categorical_draws_are_the_same_in_any_batch_bit_for_bit (its cascade runs the fused call, the default)


@pytest.mark.xla
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in SLOW else case
                                  for case in CASES])
def test_the_fused_call_gives_the_compiled_loops_bits_and_the_plain_loops_lengths_tokens_and_values(case):
    settings, kind, steps = CASES[case]
    a = builders.model_a()
    b = builders.step_b(output_size=3) if kind == "step" else builders.feedback_b("gru", output_size=3)
    x = builders.inputs(3, 4)
    tokens = kind == "fb"

    def run(cascade):
        result = cascade.run(x, steps, return_tokens=True) if tokens else cascade.run(x, steps)
        return [t.numpy() for t in result]

    cascade = Cascade(a, b, **settings)
    got = run(cascade)
    assert cascade.loop_fused is True and cascade.loop_compiled is True
    apart = Cascade(a, b, **settings)
    apart._loops["fused"] = False  # A and the loop as their own XLA calls
    for g, w in zip(got, run(apart)):
        assert g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes()
    plain = run(Cascade(a, b, jit_compile=False, **settings))
    for g, w in zip(got[1:], plain[1:]):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_allclose(got[0], plain[0], rtol=1e-6, atol=1e-6)
    ragged = cascade(x, steps, return_tokens=True) if tokens else cascade(x, steps)  # __call__ runs fused too
    ragged = ragged if tokens else (ragged,)
    assert ragged[0].flat_values.numpy().tobytes() == got[0].tobytes()


@pytest.mark.slow  # quick: test_compiled_loop's test_categorical_draws_are_the_same_in_any_batch_bit_for_bit runs
# this cascade on these inputs (the fused call, the default), checks the same bits, and the plain loop's draws too
@pytest.mark.xla
def test_categorical_draws_of_the_fused_call_are_the_same_in_any_batch_bit_for_bit():
    a, b = builders.model_a(), builders.feedback_b("gru", output_size=3)
    cascade = Cascade(a, b, feedback=True, sampler="categorical", seed=7, max_steps=5, stop_rule=StopRule.token(0))
    x = builders.inputs(4, 3)
    whole = cascade.run(x, return_tokens=True)
    assert cascade.loop_fused is True
    parts = [cascade.run(x[i:i + 2], sample_index=np.arange(i, i + 2), return_tokens=True) for i in (0, 2)]
    for got, want in zip(zip(*parts), whole):
        assert np.concatenate([g.numpy() for g in got]).tobytes() == want.numpy().tobytes()


@pytest.mark.xla
def test_inside_a_tf_function_the_call_runs_fused_with_the_eager_calls_bits():
    a, b = builders.model_a(), builders.step_b(output_size=3)
    cascade = Cascade(a, b, state="carry")
    x = builders.inputs(3, 4)
    eager = cascade(x, STEPS).flat_values.numpy()
    traced = tf.function(lambda x, steps: cascade(x, steps).flat_values)(tf.constant(x), tf.constant(STEPS))
    assert cascade.loop_fused is True and traced.numpy().tobytes() == eager.tobytes()


def _gradients(cascade, x, steps, targets=None, training=False):
    """The values and the gradients of a weighted sum of them for the inputs, the targets and every weight."""
    weights = cascade.model_a.trainable_variables + cascade.model_b.trainable_variables
    sources = [x] + ([] if targets is None else [targets])
    with tf.GradientTape() as tape:
        tape.watch(sources)
        if targets is None:
            values = cascade(x, steps, training=training).flat_values
        else:
            values = cascade.run(x, steps, targets=targets, training=training)[0]
        rows = tf.cast(tf.shape(values)[0], tf.float32)
        loss = tf.reduce_sum(values * tf.range(1.0, 1.0 + rows)[:, None] / rows)  # a weight per value
    return values.numpy(), [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, [*sources, *weights])]


GRADIENT_CASES = {  # (settings, B, steps, teacher forcing, training); reset and teacher forcing through a known
    # cell keep its hand-written gradient (measured faster), so these take B as it is (`fast_cells=False`)
    "carry given steps": (dict(state="carry"), "step", STEPS, False, False),
    "reset given steps": (dict(fast_cells=False), "step", STEPS, False, False),
    "reset max_steps, state_init ir, training": (dict(max_steps=3, state_init="ir", fast_cells=False), "step ir",
                                                 None, False, True),
    "teacher forcing, reset, training": (dict(feedback=True, fast_cells=False), "fb gru", STEPS, True, True),
    "teacher forcing from the previous pair, LSTM": (dict(feedback=True, feedback_start="previous",
                                                          fast_cells=False), "fb lstm", STEPS, True, False),
    "teacher forcing, carry, a start token": (dict(feedback=True, state="carry", feedback_start="token:1",
                                                   fast_cells=False), "fb gru", STEPS, True, True),
    "teacher forcing, a B without states": (dict(feedback=True), "fb dense", STEPS, True, False),
}
GRADIENT_SLOW = {"reset max_steps, state_init ir, training", "teacher forcing from the previous pair, LSTM",
                 "teacher forcing, a B without states", "reset given steps",
                 "teacher forcing, carry, a start token",  # the quick suite keeps one case of reset (teacher forcing)
                 "carry given steps"}  # quick: carry's XLA gradient against the plain path's, values, inputs and
# every weight, in test_a_carry_call_takes_xlas_gradient_below_xla_gradient_below_samples_eagerly_and_in_a_trace_...
B_KINDS = {"step": lambda: builders.step_b(output_size=3), "step ir": lambda: builders.step_b(units=4, output_size=3),
           "fb gru": lambda: builders.feedback_b("gru", output_size=3),
           "fb lstm": lambda: builders.feedback_b("lstm", output_size=3),
           "fb dense": lambda: builders.feedback_b(output_size=3, states=False)}


def _targets(teacher, total=int(STEPS.sum())):
    return tf.constant(np.random.default_rng(1).normal(size=(total, 3)), tf.float32) if teacher else None


def _assert_equal_gradients(got, want, names):
    for name, g, w in zip(names, got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.xla
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in GRADIENT_SLOW else case
                                  for case in GRADIENT_CASES])
def test_under_a_tape_known_inputs_take_xlas_gradient_of_one_xla_call_equal_to_the_plain_paths(case):
    settings, kind, steps, teacher, training = GRADIENT_CASES[case]
    a, b = builders.model_a(), B_KINDS[kind]()
    x = tf.constant(builders.inputs(3, 4))
    targets = _targets(teacher)
    cascade = Cascade(a, b, **settings)
    values, got = _gradients(cascade, x, steps, targets, training)
    assert cascade.gradient_fused is True, cascade._loops.get("gradient problem")
    plain = Cascade(a, b, **{**settings, "jit_compile": False})
    plain_values, want = _gradients(plain, x, steps, targets, training)
    assert plain.gradient_fused is None
    np.testing.assert_allclose(values, plain_values, rtol=1e-6, atol=1e-6)
    names = ["inputs"] + (["targets"] if teacher else []) + [v.path for v in a.trainable_variables + b.trainable_variables]
    _assert_equal_gradients(got, want, names)


@pytest.mark.xla
def test_xlas_gradient_of_the_loop_is_traced_where_no_tape_records():
    """Traced in the backward pass that first calls it, TensorFlow wrapped its loops for a gradient of the gradient
    (`cflow_gradient_wrapper` functions), which ran slower; traced apart (`xla.traced_apart`), it holds none."""
    a, b = builders.model_a(), B_KINDS["fb gru"]()
    cascade = Cascade(a, b, feedback=True, fast_cells=False)
    x, targets = tf.constant(builders.inputs(3, 4)), _targets(True)
    _gradients(cascade, x, STEPS, targets)
    assert cascade.gradient_fused is True
    _, gradient = next(value for key, value in cascade._loops.items() if key[0] == "known")
    traces = gradient.__dict__["_cascade_concrete"].values()  # `compiled_loop.call`'s: the one every call runs
    functions = [f.signature.name for inner, _ in traces for f in inner.graph.as_graph_def().library.function]
    assert functions and not [name for name in functions if "cflow_gradient_wrapper" in name]


@pytest.mark.xla
def test_reset_and_teacher_forcing_through_a_known_cell_keep_the_hand_written_gradient():
    a = builders.model_a()
    x = tf.constant(builders.inputs(3, 4))
    for settings, kind, teacher in ((dict(), "step", False), (dict(feedback=True), "fb gru", True)):
        cascade = Cascade(a, B_KINDS[kind](), **settings)
        _gradients(cascade, x, STEPS, _targets(teacher), False)
        assert cascade.gradient_fused is None and xla.hand_written(
            cascade, "teacher" if teacher else "reset", training=False)


@pytest.mark.xla
def test_a_carry_call_takes_xlas_gradient_below_xla_gradient_below_samples_eagerly_and_in_a_trace_for_any_batch(
        monkeypatch):
    """The hand-written gradient from `XLA_GRADIENT_BELOW` samples, XLA's below, each equal to the plain path's.

    An eager call knows its batch. In a caller's `tf.function` traced for any batch the batch chooses at run time
    (`known.run_chosen_gradient`), so the values and B's gradients are bit for bit the eager call's of the same
    batch. (A's gradients, taken in the caller's graph instead of the eager call's concrete function, may differ
    in their last bits.)
    """
    a, b = builders.model_a(), builders.step_b(output_size=3)
    x = tf.constant(builders.inputs(3, 4))
    upstream = tf.constant(np.random.default_rng(2).normal(size=(int(STEPS.sum()), 3)), tf.float32)
    monkeypatch.setattr(xla, "XLA_GRADIENT_BELOW", 3)
    cascade = Cascade(a, b, state="carry")
    plain = Cascade(a, b, state="carry", jit_compile=False)
    weights = a.trainable_variables + b.trainable_variables
    names = ["values", "inputs", *(v.path for v in weights)]

    def gradients(cascade, x, steps, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            values = cascade(x, steps).flat_values
        return [values, *tape.gradient(values, [x, *weights], output_gradients=upstream)]

    traced = tf.function(lambda x, steps, upstream: gradients(cascade, x, steps, upstream), input_signature=[
        tf.TensorSpec([None, 4, 3]), tf.TensorSpec([None, 4], tf.int32), tf.TensorSpec([None, 3])])

    def numpy(results):
        return [tf.convert_to_tensor(t).numpy() for t in results]

    def bits(results):  # the values' and B's weights' gradients
        return [t.tobytes() for t in [results[0], *results[-len(b.trainable_variables):]]]

    eager = {}
    for n, fused_gradient in ((3, None), (2, True)):  # 3 samples: the hand-written gradient; 2: XLA's
        d_values = upstream[:int(STEPS[:n].sum())]
        eager[n] = numpy(gradients(cascade, x[:n], STEPS[:n], d_values))
        assert cascade.gradient_fused is fused_gradient
        want = numpy(gradients(plain, x[:n], STEPS[:n], d_values))
        _assert_equal_gradients(eager[n], want, names)
        got = numpy(traced(x[:n], STEPS[:n], d_values))
        _assert_equal_gradients(got, want, names)
        assert bits(got) == bits(eager[n]), n
    monkeypatch.setattr(xla, "XLA_GRADIENT_BELOW", 4)  # the eager call of 3 samples takes XLA's: other bits
    assert bits(numpy(gradients(cascade, x, STEPS, upstream))) != bits(eager[3])


CARRY_WRITTEN_CASES = {  # (B, settings, steps (N, Ta) or None for max_steps alone, training): a sample of no
    # steps, caps of 0 between others, `max_steps`
    "GRU": ("gru", dict(), np.array([[2, 0, 3, 1], [0, 0, 0, 0], [4, 1, 0, 2], [0, 3, 0, 0]], np.int32), False),
    "LSTM, training": ("lstm", dict(), np.array([[0, 2, 0, 3], [1, 0, 0, 0], [0, 0, 0, 0], [3, 3, 1, 0]], np.int32),
                       True),
    "SimpleRNN, no head": ("simple none", dict(), np.array([[3, 0, 2, 1], [0, 1, 0, 0], [2, 0, 0, 4], [0, 0, 0, 0]],
                                                           np.int32), False),
    "GRU, max_steps": ("gru", dict(max_steps=4), np.array([[3, 0, 1, 2], [0, 0, 0, 0], [1, 4, 0, 0], [2, 0, 3, 0]],
                                                           np.int32), False),
    "LSTM, max_steps alone": ("lstm", dict(max_steps=2), None, False),
}


@pytest.mark.xla
@pytest.mark.slow  # about 20-50 s a case on 2 cores. Quick: carry's gradient written inside XLA (2 samples, below
# XLA_GRADIENT_BELOW) equals the plain path's in test_a_carry_call_takes_xlas_gradient_below_xla_gradient_below_...
@pytest.mark.parametrize("case", list(CARRY_WRITTEN_CASES))
def test_carry_through_a_known_cell_takes_the_gradient_written_inside_xla_equal_to_tensorflows_own(case):
    """`known.carry_gradient`, at 1, 2 and 4 samples: every weight's and the inputs' gradients equal the plain
    path's through B itself (TensorFlow's generic gradient, no known cell) to float rounding."""
    kind, settings, steps, training = CARRY_WRITTEN_CASES[case]
    kind, _, head = kind.partition(" ")
    a, b = builders.model_a(), builders.step_b(kind, output_size=None if head == "none" else 3)
    cascade = Cascade(a, b, state="carry", **settings)
    oracle = Cascade(a, b, state="carry", jit_compile=False, fast_cells=False, **settings)
    names = ["inputs"] + [v.path for v in a.trainable_variables + b.trainable_variables]
    for n in (1, 2, 4):
        x = tf.constant(builders.inputs(n, 4, seed=n))
        given = None if steps is None else steps[:n]
        values, got = _gradients(cascade, x, given, training=training)
        assert cascade.gradient_fused is True, cascade._loops.get("gradient problem")
        assert any(key[0] == "known" and key[-1] is True for key in cascade._loops), "not the written gradient"
        want_values, want = _gradients(oracle, x, given, training=training)
        np.testing.assert_allclose(values, want_values, rtol=1e-6, atol=1e-6)
        _assert_equal_gradients(got, want, [f"{name} (N={n})" for name in names])


MIRRORED_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
cpu, = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import builders
from cascade_cli.run import xla
from cascade_cli.run.cascade import Cascade
xla.XLA_GRADIENT_BELOW = 3
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    a, b = builders.model_a(), builders.step_b(output_size=3)
    cascade = Cascade(a, b, state="carry")
plain = Cascade(a, b, state="carry", jit_compile=False)
weights = a.trainable_variables + b.trainable_variables
def gradients(cascade, x, steps):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(cascade(x, steps).flat_values ** 2)
    return tape.gradient(loss, weights)
def step(x, steps):
    grads = strategy.run(lambda x, steps: gradients(cascade, x, steps), args=(x, steps))
    return [strategy.reduce("SUM", g, axis=None) for g in grads]
report, traced = {}, None
for n in (8, 4):  # 4 samples a replica (the hand-written gradient), then 2 (XLA's)
    x = builders.inputs(n, 4, seed=n)
    steps = np.random.default_rng(n).integers(0, 4, size=(n, 4)).astype(np.int32)
    batches = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, steps)).batch(n))
    traced = traced or tf.function(step, input_signature=list(batches.element_spec))  # a replica's batch: None
    got = traced(*next(iter(batches)))
    want = [sum(parts) for parts in zip(*(gradients(plain, x[half], steps[half])
                                         for half in (slice(0, n // 2), slice(n // 2, n))))]
    report[n] = max(float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) for g, w in zip(got, want))
report["traces"] = traced.experimental_get_tracing_count()
report["gradient_fused"] = cascade.gradient_fused
json.dump(report, sys.stdout)
"""


@pytest.mark.slow  # a subprocess with TensorFlow: about 30 s on 2 cores
@pytest.mark.xla
def test_under_a_mirrored_strategy_a_trace_for_any_replica_batch_chooses_carrys_gradient_equal_to_the_plain_paths():
    from test_distribute import TIMEOUT, worker_env

    done = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], env=worker_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["traces"] == 1 and report["gradient_fused"] is True, report
    assert report["8"] < 1e-4 and report["4"] < 1e-4, report


@pytest.mark.xla
def test_a_b_that_draws_in_training_and_scheduled_sampling_keep_the_plain_paths_gradient():
    a = builders.model_a()
    x = tf.constant(builders.inputs(3, 4))
    dropout = Cascade(a, builders.step_b(output_size=3, dropout=0.5), fast_cells=False)
    with tf.GradientTape() as tape:
        values = dropout(x, STEPS, training=True).flat_values
    assert tape.gradient(values, a.trainable_variables)[0] is not None
    assert dropout.gradient_fused is None and xla.b_draws(dropout) is True
    assert xla.b_draws(Cascade(a, builders.step_b(output_size=3))) is False  # a cell's seed generator, unused
    teacher = Cascade(a, builders.feedback_b("gru", output_size=3), feedback=True, fast_cells=False)
    targets = _targets(True)
    with tf.GradientTape() as tape:
        values = teacher.run(x, STEPS, targets=targets, sampling_probability=tf.constant(0.0))[0]
    assert tape.gradient(values, a.trainable_variables)[0] is not None
    assert teacher.gradient_fused is None  # a probability as a tensor may be above 0: not known inputs


def test_known_layout_lists_each_rows_pair_and_value_by_hand():
    caps = tf.constant([[2, 0, 1], [0, 3, 0]], tf.int32)  # values: pair 0 (0, 1), pair 2 (2), pair 4 (3, 4, 5)
    pair, value, totals = (t.numpy() for t in known.known_layout(caps, 3, walk=True, quantum=2))
    np.testing.assert_array_equal(totals, [3, 3])
    np.testing.assert_array_equal(pair[:, 0], [0, 0, 2])
    np.testing.assert_array_equal(pair[:, 1], [4, 4, 4])
    np.testing.assert_array_equal(value[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(value[:, 1], [3, 4, 5])
    pair, value, totals = (t.numpy() for t in known.known_layout(caps, 3, walk=False, quantum=4))
    np.testing.assert_array_equal(totals, [2, 0, 1, 0, 3, 0, 0, 0])  # six pairs, padded to 8 rows
    np.testing.assert_array_equal(pair[0], [0, 1, 2, 3, 4, 5, 5, 5])
    np.testing.assert_array_equal(value[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(value[0, [2, 4]], [2, 3])


@pytest.mark.xla
def test_a_tape_runs_the_plain_loop_in_reset_and_a_probe_that_differs_keeps_the_compiled_loop(monkeypatch):
    a, b = builders.model_a(), builders.step_b(output_size=3)
    x = builders.inputs(3, 4)
    cascade = Cascade(a, b, stop_rule=StopRule.token(0), max_steps=5)
    with tf.GradientTape() as tape:
        values = cascade(x, STEPS).flat_values
    assert tape.gradient(values, a.trainable_variables)[0] is not None
    assert cascade.loop_fused is None  # a taped call in reset does not decide
    monkeypatch.setattr(fused, "difference", lambda want, got: "its values differ (made up by the test)")
    values = cascade.run(x, STEPS)[0].numpy()
    assert cascade.loop_fused is False and cascade.loop_compiled is True
    want = Cascade(a, b, stop_rule=StopRule.token(0), max_steps=5, jit_compile=False).run(x, STEPS)[0].numpy()
    np.testing.assert_allclose(values, want, rtol=1e-6, atol=1e-6)


def test_inspect_says_where_the_loop_ran_fused_with_model_a():
    assert inspection._result_loop({"loop_compiled": True, "loop_fused": True}) == [
        ("the loop over B ran", "under XLA, whole and fused with model A in one XLA call")]
    assert inspection._result_loop({"loop_compiled": True, "loop_fused": False}) == [
        ("the loop over B ran", "under XLA, whole")]
