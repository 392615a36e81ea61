"""The packed loop compiled whole under XLA (`cascade_cli.run.compiled_loop`), the shipped default (`jit_compile="auto"`).

The reference tests of every mode, form, stop rule and feedback setting run on this path and on the plain loop
(`paths.BOTH` in test_runner, test_feedback, test_stopping, test_min_steps, test_stop_tokens, test_gate); here are
what only this path has: its buckets, its draws at any batch, a tape's fallback, `jit_compile=True`'s refusal and
the probes. Marked `xla`, so conftest leaves "auto" on.
"""

import io
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from cascade_cli.run import compiled_loop, packing, xla
from cascade_cli.errors import ParameterError
from cascade_cli.options import StopRule
from cascade_cli.run.cascade import Cascade
from test_runner import PER_SAMPLE, gradients, make_b


def test_buckets_are_multiples_of_16_at_most_a_quarter_above_the_size_by_hand():
    sizes = [0, 1, 15, 16, 17, 64, 65, 100, 128, 129, 1000, 5000]
    got = [int(compiled_loop.bucket(tf.constant(size))) for size in sizes]
    assert got == [16, 16, 16, 16, 32, 64, 80, 112, 128, 160, 1024, 5120]
    assert [int(compiled_loop.bucket(tf.constant(size), minimum=8)) for size in (0, 5, 9, 33)] == [8, 8, 16, 40]


@pytest.mark.xla
def test_categorical_draws_are_the_same_in_any_batch_bit_for_bit():
    a, b = builders.model_a(), builders.feedback_b("gru", output_size=3)
    cascade = Cascade(a, b, feedback=True, sampler="categorical", seed=7, max_steps=5,
                      stop_rule=StopRule.token(0))
    x = builders.inputs(4, 3)
    whole = cascade.run(x, return_tokens=True)
    assert cascade.loop_compiled is True
    # (batches of 2 and 4: A under XLA gives other last bits at a batch of 1, a matrix-vector product)
    parts = [cascade.run(x[i:i + 2], sample_index=np.arange(i, i + 2), return_tokens=True) for i in (0, 2)]
    for got, want in zip(zip(*parts), whole):
        np.testing.assert_array_equal(np.concatenate([g.numpy() for g in got]), want.numpy())
    plain = Cascade(a, b, feedback=True, sampler="categorical", seed=7, max_steps=5, stop_rule=StopRule.token(0),
                    jit_compile=False).run(x, return_tokens=True)
    np.testing.assert_array_equal(plain[2].numpy(), whole[2].numpy())  # the same draws as the plain loop
    np.testing.assert_allclose(plain[0].numpy(), whole[0].numpy(), atol=1e-5)


@pytest.mark.xla
@pytest.mark.parametrize("state", ["reset", pytest.param("carry", marks=pytest.mark.slow)])  # quick: reset; a taped
# carry call's gradients against the plain path's: test_fused's test_a_carry_call_takes_xlas_gradient_below_...
def test_a_tape_gets_the_plain_loops_gradients(state):
    cascade = Cascade(builders.model_a("gru"), make_b("gru"), state=state, fast_cells=False)
    x = builders.inputs(3, 4)
    cascade(x, PER_SAMPLE)  # decides, untaped: the compiled loop
    got, weights = gradients(cascade, x, PER_SAMPLE, lambda: cascade(x, PER_SAMPLE).flat_values)
    want, _ = gradients(cascade, x, PER_SAMPLE,
                        lambda: builders.reference(cascade.model_a, cascade.model_b, x, PER_SAMPLE, state=state)[0])
    for weight, g, w in zip(weights, got, want):
        np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(), tf.convert_to_tensor(w).numpy(),
                                   rtol=1e-4, atol=1e-5, err_msg=weight.path)
    assert cascade.loop_compiled is True  # decided on the first call; a tape still runs the plain loop


class HostHead(keras.layers.Layer):
    """`y + 1` computed on the host by `tf.numpy_function`, which XLA cannot compile."""

    def call(self, y):
        out = tf.numpy_function(lambda v: (v + 1).astype(v.dtype), [y], y.dtype, stateful=False)
        return tf.ensure_shape(out, y.shape)

    def compute_output_shape(self, input_shape):
        return input_shape


def host_b():
    x, s = keras.Input(shape=(4,)), keras.Input(shape=(3,))
    h, [s2] = keras.layers.GRUCell(3)(x, [s])
    return keras.Model([x, s], [HostHead()(keras.layers.Dense(2)(h)), s2])


@pytest.mark.xla
@pytest.mark.xla_fallback
def test_jit_compile_true_raises_where_the_loop_cannot_compile_and_auto_falls_back():
    a, b = builders.model_a(ir_size=4), host_b()
    with pytest.raises(ParameterError, match=r"^jit_compile: True, but the packed loop over B cannot run under XLA: "
                                             r"it does not compile \("):
        Cascade(a, b, jit_compile=True, max_steps=3, stop_rule=StopRule.norm(100.0))
    cascade = Cascade(a, b, max_steps=3, stop_rule=StopRule.norm(100.0))
    x = builders.inputs(3, 4)
    values = cascade.run(x)[0]
    assert cascade.loop_compiled is False and cascade.loop_compile_problem.startswith("it does not compile (")
    assert cascade.a_compiled is True
    np.testing.assert_allclose(values, Cascade(a, b, run_eagerly=True, max_steps=3,
                                               stop_rule=StopRule.norm(100.0)).run(x)[0], atol=1e-5)


@pytest.mark.slow  # 15-35 s on 2 cores; kept out of the default suite to hold it well under 15 minutes
@pytest.mark.xla
def test_building_several_cascades_prints_no_retracing_warning():
    a = builders.model_a()
    x = builders.inputs(2, 4)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    tf.get_logger().addHandler(handler)
    try:
        for _ in range(5):  # TensorFlow warns at 5 traces in its last 5 calls of one Python function
            cascade = Cascade(a, builders.step_b("gru"), state="carry")  # carry: the loop compiles too
            cascade(x, np.array([1, 2, 0, 1]))
    finally:
        tf.get_logger().removeHandler(handler)
    assert cascade.a_compiled is True and cascade.loop_compiled is True
    assert "retracing" not in stream.getvalue()


def test_rows_come_in_blocks_of_16_unless_every_width_of_b_is_a_multiple_of_16_by_hand():
    assert packing.row_quantum(builders.step_b("gru")) == 16  # units 5, O = 2
    assert packing.row_quantum(builders.step_b("gru", ir_size=16, units=16, output_size=16)) == 2  # never 1
    assert packing.row_quantum(builders.step_b("lstm", ir_size=16, units=32, output_size=8)) == 2
    assert packing.row_quantum(builders.step_b("gru", ir_size=16, units=16, output_size=4)) == 4
    assert packing.row_quantum(host_b()) == 16  # a layer from outside Keras


@pytest.mark.xla
def test_carry_rows_in_blocks_of_2_give_each_sample_the_same_bits_in_any_batch():
    """B's widths are multiples of 16: a sample's row is padded to 2 rows, not 16, and its values stay put."""
    a, b = builders.model_a(ir_size=16), builders.step_b("gru", ir_size=16, units=16, output_size=16)
    cascade = Cascade(a, b, state="carry")
    x = builders.inputs(12, 5, seed=3)
    steps = np.random.default_rng(2).integers(0, 6, size=(12, 5))
    values, lengths = (t.numpy() for t in cascade.run(x, steps))
    assert cascade.loop_compiled is True and cascade._row_quantum == 2
    splits = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))])
    for lo, hi in ((0, 2), (2, 4), (4, 12)):  # rows 2, 2 and 8
        part = cascade.run(x[lo:hi], steps[lo:hi])[0].numpy()
        assert part.tobytes() == values[splits[lo]:splits[hi]].tobytes(), (lo, hi)


@pytest.mark.xla
def test_the_known_inputs_loop_through_a_known_cell_gives_b_calls_values():
    """The forward known-inputs loop through a known cell (`xla.loop_step`: its projection once per pair, one
    table per gate, the head at every step) against the same loop calling B whole, and through the cascade against
    the eager reference."""
    a, b = builders.model_a(ir_size=16), builders.step_b("lstm", ir_size=16, units=16, output_size=16)
    cascade = Cascade(a, b, state="carry")
    known, called = xla.loop_step(cascade, False), compiled_loop.Step.called(cascade._b_step(False))
    caps = tf.constant(np.random.default_rng(5).integers(0, 4, size=(3, 5)), tf.int32)
    table = tf.constant(np.random.default_rng(6).normal(size=(15, 16)), tf.float32)
    assert len(known.tables(table)) == 4 and len(called.tables(table)) == 1
    index, totals = compiled_loop.known_plan(caps, 16, quantum=2)

    def loop(step):
        return tf.function(lambda table, index, totals: compiled_loop.known_inputs_loop(
            step, table, index, totals, [tf.zeros([tf.shape(index)[1], 16])] * 2), jit_compile=True)

    want, got = (loop(step)(table, index, totals).numpy() for step in (called, known))
    for row, total in enumerate(totals.numpy()):
        np.testing.assert_allclose(got[row, :total], want[row, :total], rtol=1e-6, atol=1e-6, err_msg=str(row))
    x = builders.inputs(4, 5)
    steps = np.random.default_rng(7).integers(0, 4, size=(4, 5))
    values = cascade.run(x, steps)[0].numpy()
    assert cascade.loop_compiled is True
    reference = builders.reference(a, b, x, steps, state="carry")[0]
    np.testing.assert_allclose(values, np.asarray(reference).reshape(values.shape), rtol=1e-5, atol=1e-5)


def test_the_loops_compiled_whole_run_a_known_cells_gated_step_where_it_applies_by_hand():
    """`xla.loop_step`: a known cell's projection by gate (feedback too: x's rows of the kernel), else B called
    whole: with `fast_cells=False`, through GRUCell(reset_after=False), and where the cell's dropout draws."""
    from test_cells import CELLS, wrapped

    a, table = builders.model_a(), tf.zeros([3, 4])

    def tables(b, training=False, **settings):
        return [t.shape for t in xla.loop_step(Cascade(a, b, **settings), training).tables(table)]

    assert tables(builders.step_b("lstm")) == [(3, 5)] * 4
    assert tables(builders.feedback_b("gru"), feedback=True, sampler="greedy", max_steps=3) == [(3, 5)] * 3
    assert tables(builders.step_b("lstm"), fast_cells=False) == [(3, 4)]
    assert tables(wrapped(CELLS["gru-reset-before"]())) == [(3, 4)]
    assert tables(builders.step_b("gru", dropout=0.5), training=True) == [(3, 4)]
    assert tables(builders.step_b("gru", dropout=0.5)) == [(3, 5)] * 3  # inference draws nothing


def test_compacted_sizes_are_quarters_and_halves_of_the_rows_in_whole_blocks_of_64_rows_or_more_by_hand():
    def sizes(rows, quantum):
        return [int(size) for size in compiled_loop.compacted_sizes(tf.constant(rows), quantum)]

    assert sizes(16, 2) == [16, 16, 16]  # never more than the rows
    assert sizes(224, 2) == [64, 112, 224]  # never fewer than 64 (a quarter: 56)
    assert sizes(896, 2) == [224, 448, 896]
    assert sizes(1000, 16) == [256, 512, 1000]


def test_a_compacted_step_runs_the_running_rows_on_the_smallest_size_that_holds_them_by_hand():
    """B sees the running rows only, in row order, on 4, 8 or 16 rows; every running row gets its own values."""

    def step(xs, y_prev, states):
        rows = tf.cast(tf.fill([tf.shape(xs[0])[0], 1], tf.shape(xs[0])[0]), xs[0].dtype)
        return tf.concat([xs[0] + y_prev, rows], 1), [states[0] * 2.0]

    @tf.function(jit_compile=True)
    def run(active):
        table = tf.reshape(tf.range(20, dtype=tf.float32), [20, 1])
        pair = tf.range(16) + 2
        fed = tf.fill([16, 1], 100.0)
        states = [tf.reshape(tf.range(16, dtype=tf.float32), [16, 1])]
        sizes = [tf.constant(4), tf.constant(8), tf.constant(16)]
        y, [state] = compiled_loop.compacted_step(step, sizes, active, [table], pair, fed, states)
        return y, state

    rng = np.random.default_rng(0)
    for count, size in ((0, 4), (3, 4), (4, 4), (5, 8), (9, 16), (16, 16)):
        active = np.zeros(16, bool)
        active[rng.choice(16, count, replace=False)] = True
        y, state = (t.numpy() for t in run(tf.constant(active)))
        rows = np.flatnonzero(active)
        np.testing.assert_array_equal(y[rows], np.stack([rows + 2 + 100.0, np.full(count, size)], 1))
        np.testing.assert_array_equal(state[rows, 0], 2.0 * rows)


def aligned_decoder(state, start, **kwargs):
    """The feedback suite's length-choosing models at widths of 16 (row quantum 2) and a greedy decode to END."""
    from benchmarks import feedback

    a, b = feedback.build_models(features=16, hidden=16, outputs=16, max_steps=6)
    x, _ = feedback.make_data(np.random.default_rng(4), 50 if state == "reset" else 130, 3, features=16, max_steps=6)
    return x, Cascade(a, b, feedback=True, state=state, feedback_start=start, sampler="greedy", max_steps=6,
                      stop_rule=StopRule.token(feedback.END), **kwargs)


@pytest.mark.slow  # 15-35 s on 2 cores; kept out of the default suite to hold it well under 15 minutes
@pytest.mark.xla
@pytest.mark.parametrize("state, start", [("reset", "zeros"), pytest.param("carry", "previous", marks=pytest.mark.slow)])
def test_a_decode_of_128_rows_or_more_runs_compacted_with_the_masked_loops_bits_in_any_batch(state, start, monkeypatch):
    """Compacted rows give the masked loop's bits (whose values the reference tests check), here and in any batch."""
    calls = []
    compacted_step = compiled_loop.compacted_step
    monkeypatch.setattr(compiled_loop, "compacted_step", lambda *args: calls.append(1) or compacted_step(*args))
    x, cascade = aligned_decoder(state, start)
    values, lengths, tokens = (t.numpy() for t in cascade.run(x, return_tokens=True))
    assert cascade.loop_compiled is True and cascade._row_quantum == 2 and calls  # 150 pairs or 130 samples
    assert 0 < lengths.min() < lengths.max()  # rows finished at different steps
    plain = Cascade(cascade.model_a, cascade.model_b, feedback=True, state=state, feedback_start=start,
                    sampler="greedy", max_steps=6, stop_rule=cascade.stop_rule, jit_compile=False)
    want = [t.numpy() for t in plain.run(x, return_tokens=True)]
    np.testing.assert_array_equal(lengths, want[1])
    np.testing.assert_array_equal(tokens, want[2])
    np.testing.assert_allclose(values, want[0], rtol=1e-5, atol=2e-5)  # values up to 5: float32 and oneDNN vs XLA
    splits = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))])
    # reset: 60 and 90 rows, masked; the whole 150 compacted. carry: 64 and 66 rows (samples); the whole 130
    for lo, hi in ((0, 20), (20, 50)) if state == "reset" else ((0, 64), (64, 130)):
        part = cascade.run(x[lo:hi])[0].numpy()
        assert part.tobytes() == values[splits[lo]:splits[hi]].tobytes(), (lo, hi)
    monkeypatch.setattr(compiled_loop, "COMPACT_ROWS", 10**9)  # a new cascade runs the masked loop only
    masked = aligned_decoder(state, start)[1].run(x)[0].numpy()
    assert masked.tobytes() == values.tobytes()


@pytest.mark.xla
def test_rows_are_not_compacted_where_a_width_of_b_is_not_a_multiple_of_16(monkeypatch):
    from test_feedback import models

    calls = []
    monkeypatch.setattr(compiled_loop, "compacted_step", lambda *args: calls.append(1))
    a, b = models()
    cascade = Cascade(a, b, feedback=True, sampler="greedy", max_steps=4, stop_rule=StopRule.token(1))
    cascade.run(builders.inputs(50, 3))
    assert cascade.loop_compiled is True and cascade._row_quantum == 16 and not calls


@pytest.mark.xla
def test_a_training_call_runs_the_compiled_loop_unless_b_draws():
    """A `carry` training call without a tape runs the loop over B under XLA where B's training call draws
    nothing (a Keras cell holds a seed generator it does not use: `xla.b_draws`) and equals the plain loop's; a
    B with dropout keeps the plain loop (XLA's random numbers are not TensorFlow's)."""
    x, steps = builders.inputs(3, 5), np.array([[2, 0, 3, 1, 2], [0, 0, 1, 3, 0], [3, 3, 3, 3, 3]], np.int32)
    a = builders.model_a()
    for dropout, compiled in [(0.0, True), (0.5, False)]:
        b = builders.step_b(dropout=dropout)
        cascade = Cascade(a, b, state="carry")
        assert xla.loop_applies(cascade, tf.constant(x), training=True, extras=None) is compiled
        if compiled:
            plain = Cascade(a, b, state="carry", jit_compile=False)
            np.testing.assert_allclose(cascade(x, steps, training=True).flat_values.numpy(),
                                       plain(x, steps, training=True).flat_values.numpy(), rtol=1e-5, atol=1e-6)


def test_a_batch_of_one_sample_runs_one_row_and_larger_batches_whole_blocks_by_hand():
    """One row is a matrix-vector product per step, about half the time of two rows' matrix product at N=1."""
    assert [int(compiled_loop.known_rows(tf.constant(n), quantum=2)) for n in (0, 1, 2, 3, 17)] == [0, 1, 2, 4, 18]
    assert [int(compiled_loop.known_rows(tf.constant(n), quantum=2, bucketed=True)) for n in (1, 3, 17)] == [1, 4, 20]
    one = tf.constant([[2, 0, 1]], tf.int32)  # values: pair 0 (0, 1), pair 2 (2)
    index, totals = (t.numpy() for t in compiled_loop.known_plan(one, 8, quantum=2))
    assert index.shape == (8, 1) and totals.tolist() == [3]
    np.testing.assert_array_equal(index[:3, 0], [0, 0, 2])
    _, index, totals = (t.numpy() for t in compiled_loop.lay_out_steps(one, quantum=2))
    assert index.shape == (8, 1) and totals.tolist() == [3]
    np.testing.assert_array_equal(index[:3, 0], [0, 0, 2])
    three = tf.constant([[1, 0], [0, 2], [1, 1]], tf.int32)
    assert compiled_loop.known_plan(three, 8, quantum=2)[0].shape == (8, 4)
    assert compiled_loop.lay_out_steps(three, quantum=2)[1].shape == (8, 4)


@pytest.mark.xla
def test_carry_on_one_sample_runs_one_row_fused_with_the_compiled_loops_bits_and_the_plain_loops_values():
    a, b = builders.model_a(ir_size=16), builders.step_b("gru", ir_size=16, units=16, output_size=16)
    x = builders.inputs(1, 5, seed=4)
    steps = np.array([[3, 0, 2, 4, 1]])
    cascade = Cascade(a, b, state="carry")
    got = [t.numpy() for t in cascade.run(x, steps)]
    assert cascade.loop_fused is True and cascade._row_quantum == 2
    apart = Cascade(a, b, state="carry")
    apart._loops["fused"] = False  # A and the loop as their own XLA calls
    for g, w in zip(got, apart.run(x, steps)):
        assert g.tobytes() == w.numpy().tobytes()
    assert apart.loop_compiled is True
    plain = Cascade(a, b, state="carry", jit_compile=False).run(x, steps)
    np.testing.assert_array_equal(got[1], plain[1].numpy())
    np.testing.assert_allclose(got[0], plain[0].numpy(), rtol=1e-6, atol=1e-6)
    want = builders.reference(a, b, x, steps, state="carry")[0]
    np.testing.assert_allclose(got[0], np.asarray(want).reshape(got[0].shape), rtol=1e-5, atol=1e-5)


def test_the_known_inputs_loop_gathers_its_inputs_first_within_the_bound_by_hand():
    def first(steps, rows, width):
        return bool(compiled_loop.gathers_first(tf.constant(steps), tf.constant(rows), width))

    assert first(256, 64, 64) and first(4096, 16, 64)  # N=64 Ta=50 of the peers suite; 4 Mi elements
    assert not first(256, 256, 256) and not first(4097, 16, 64)  # N=256 Ta=50 H=256: a gather by each step
    assert not first(1 << 16, 1 << 10, 1 << 10)  # 2**36 elements: no overflow to a small int32
    with tf.GradientTape():  # XLA's gradient of the loop: a gather by each step, the gradient's bits as they were
        assert not first(8, 2, 16)


@pytest.mark.xla
@pytest.mark.parametrize("gathered", ["first", "by step"])
@pytest.mark.parametrize("kind", ["called", "known cell"])
def test_the_known_inputs_loop_gives_the_per_step_gathers_bits(kind, gathered, monkeypatch):
    """Each row's inputs gathered before the loop give the bits of a gather by each step (the loop as it was),
    for B called whole and for a known cell's tables (one per gate: 16 steps of 4 rows, 16 or 48 wide)."""
    b = builders.step_b("gru", ir_size=16, units=16, output_size=16)
    cascade = Cascade(builders.model_a(ir_size=16), b, state="carry")
    step = xla.loop_step(cascade, False) if kind == "known cell" else compiled_loop.Step.called(cascade._b_step(False))
    width = 16 * (3 if kind == "known cell" else 1)
    monkeypatch.setattr(compiled_loop, "GATHERED_MAX", 16 * 4 * width - (gathered == "by step"))
    caps = tf.constant(np.random.default_rng(5).integers(0, 4, size=(3, 5)), tf.int32)
    table = tf.constant(np.random.default_rng(6).normal(size=(15, 16)), tf.float32)
    index, totals = compiled_loop.known_plan(caps, 16, quantum=2)

    def per_step(table, index, totals):  # the loop as it was: each step gathers its rows' inputs
        tables = step.tables(table)
        ys = tf.TensorArray(table.dtype, size=tf.shape(index)[0], element_shape=tf.TensorShape([None, None]))

        def iterate(j, states, ys):
            y, states = step.step([tf.gather(t, index[j]) for t in tables], None, states)
            return j + 1, states, ys.write(j, y)

        _, _, ys = tf.while_loop(lambda j, *_: j < tf.reduce_max(totals), iterate,
                                 (tf.constant(0), [tf.zeros([tf.shape(index)[1], 16])], ys),
                                 maximum_iterations=tf.shape(index)[0])
        return tf.transpose(ys.stack(), [1, 0, 2])

    def chunked(table, index, totals):
        return compiled_loop.known_inputs_loop(step, table, index, totals, [tf.zeros([tf.shape(index)[1], 16])])

    assert len(step.tables(table)) == width // 16
    want = tf.function(per_step, jit_compile=True)(table, index, totals).numpy()
    got = tf.function(chunked, jit_compile=True)(table, index, totals).numpy()
    assert got.shape == want.shape == (4, 16, 16)
    for row, total in enumerate(totals.numpy()):
        assert got[row, :total].tobytes() == want[row, :total].tobytes(), row
