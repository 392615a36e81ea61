"""The packed loop compiled whole under XLA (`cascade_cli.compiled_loop`), the shipped default (`jit_compile="auto"`).

The same eager references as the plain loop's tests (tests/builders.py, stopref.py, test_feedback.py), a few cases of
each mode and form, stop rule and feedback setting: the plain loop's own tests run every case with
`jit_compile=False`. Marked `xla`, so conftest leaves "auto" on; each builds one or two cascades (the probes and the
compiles are most of their time).
"""

import io
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
import stopref
from cascade_cli import compiled_loop
from cascade_cli.errors import ParameterError
from cascade_cli.options import StopRule
from cascade_cli.runner import Cascade
from test_feedback import STEPS, assert_equal_reference
from test_runner import PER_SAMPLE, SHARED, assert_matches_reference, gradients, make_b


def test_buckets_are_multiples_of_16_at_most_a_quarter_above_the_size_by_hand():
    sizes = [0, 1, 15, 16, 17, 64, 65, 100, 128, 129, 1000, 5000]
    got = [int(compiled_loop.bucket(tf.constant(size))) for size in sizes]
    assert got == [16, 16, 16, 16, 32, 64, 80, 112, 128, 160, 1024, 5120]
    assert [int(compiled_loop.bucket(tf.constant(size), minimum=8)) for size in (0, 5, 9, 33)] == [8, 8, 16, 40]


@pytest.mark.xla
@pytest.mark.parametrize("b_kind, state, fast_cells", [("gru", "reset", False), ("lstm", "reset", False),
                                                       ("gru", "carry", "auto"), ("lstm", "carry", "auto")])
def test_values_equal_reference(b_kind, state, fast_cells):
    cascade = Cascade(builders.model_a(), make_b(b_kind), state=state, fast_cells=fast_cells)
    x = builders.inputs(3, 4)
    assert_matches_reference(cascade, x, PER_SAMPLE)
    assert_matches_reference(cascade, x, SHARED)
    assert cascade.loop_compiled is True and cascade.loop_compile_problem is None
    assert cascade.a_compiled is True  # the existing attribute still says how A ran


@pytest.mark.xla
def test_reset_through_a_known_cell_keeps_its_packed_recurrence_and_says_so():
    cascade = Cascade(builders.model_a(), make_b("gru"))
    assert_matches_reference(cascade, builders.inputs(3, 4), PER_SAMPLE)
    assert cascade.loop_compiled is False
    assert cascade.loop_compile_problem.startswith("reset mode with given steps through a known cell")
    assert cascade.a_compiled is True


@pytest.mark.xla
def test_state_init_ir_and_an_all_zero_batch():
    cascade = Cascade(builders.model_a(ir_size=5), builders.step_b("gru", ir_size=5, units=5), state_init="ir",
                      fast_cells=False)
    x = builders.inputs(3, 4)
    assert_matches_reference(cascade, x, PER_SAMPLE)
    out = assert_matches_reference(cascade, x, np.zeros((3, 4), np.int64))
    assert out.flat_values.shape == (0, 2)
    assert cascade.loop_compiled is True


@pytest.mark.xla
@pytest.mark.parametrize("state, exclude, min_steps", [("reset", False, 0), ("carry", True, 3)])
def test_norm_stop_rule_and_min_steps_equal_reference(state, exclude, min_steps):
    a, b = builders.model_a(), make_b("gru", output_size=3)
    x = builders.inputs(4, 5)
    plain = Cascade(a, b, state=state, jit_compile=False).run(x, np.full((4, 5), 6))[0].numpy()
    rule = StopRule.norm(float(np.quantile(np.linalg.norm(plain, axis=-1), 0.5)))
    cascade = Cascade(a, b, state=state, max_steps=6, stop_rule=rule, exclude_stop_step=exclude,
                      min_steps=min_steps)
    caps = np.array([[6, 0, 2, 1, 6], [0, 0, 0, 0, 0], [3, 6, 6, 0, 1], [6, 6, 6, 6, 6]])
    for steps in (None, caps):
        values, lengths = cascade.run(x, steps)
        expected, expected_lengths, _ = stopref.reference(
            a, b, x, caps if steps is not None else np.full((4, 5), 6), state=state, min_steps=min_steps,
            exclude_stop_step=exclude, stop=lambda y: np.linalg.norm(y) >= rule.value)
        np.testing.assert_array_equal(lengths.numpy(), expected_lengths)
        np.testing.assert_allclose(values.numpy(), expected, atol=1e-5)
        assert 0 < int(lengths.numpy().sum()) < 6 * int((caps > 0).sum() if steps is not None else 20)
    assert cascade.loop_compiled is True


@pytest.mark.xla
@pytest.mark.parametrize("state, sampler, start", [("reset", "greedy", "zeros"), ("carry", "greedy", "previous"),
                                                   ("reset", "identity", "previous"), ("carry", "identity", "token:2")])
def test_free_running_feedback_equals_reference(state, sampler, start):
    a, b = builders.model_a(), builders.feedback_b("gru", output_size=3)
    cascade = Cascade(a, b, feedback=True, state=state, feedback_start=start, sampler=sampler)
    assert_equal_reference(cascade, builders.inputs(3, 4), STEPS)
    assert cascade.loop_compiled is True


@pytest.mark.xla
@pytest.mark.parametrize("state, exclude", [("reset", False), ("carry", True)])
def test_feedback_stop_token_equals_reference(state, exclude):
    a, b = builders.model_a(), builders.feedback_b("gru", output_size=3)
    free = Cascade(a, b, feedback=True, state=state, sampler="greedy", jit_compile=False)
    tokens = free.run(builders.inputs(3, 4), np.full((3, 4), 4), return_tokens=True)[2].numpy()
    token = int(np.bincount(tokens).argmax())  # the token most steps emit: most pairs stop early
    cascade = Cascade(a, b, feedback=True, state=state, sampler="greedy", max_steps=4,
                      stop_rule=StopRule.token(token), exclude_stop_step=exclude)
    values = assert_equal_reference(cascade, builders.inputs(3, 4), None, stop_token=token, exclude_stop_step=exclude)
    assert 0 < values.shape[0] < 4 * 12
    assert cascade.loop_compiled is True


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
@pytest.mark.parametrize("state", ["reset", "carry"])
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
