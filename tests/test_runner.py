"""The packed runner against an independent eager reference (tests/builders.py)."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
import paths
from cascade_cli.errors import DataError, ModelError, ParameterError
from cascade_cli.keras_internals import seed_generators
from cascade_cli.run.cascade import Cascade
from cascade_cli.run.loop import packed_loop
from cascade_cli.run.xla import xla_inference, xla_problem

PER_SAMPLE = np.array([[3, 0, 2, 1], [0, 0, 0, 0], [1, 4, 0, 2]])  # zeros and a whole zero row
SHARED = np.array([2, 0, 3, 1])
ALL_ZERO = np.zeros((3, 4), np.int64)


def make_b(kind, **kwargs):
    return builders.sequence_b(**kwargs) if kind == "sequence" else builders.step_b(kind, **kwargs)


def assert_matches_reference(cascade, x, steps, **reference_kwargs):
    out = cascade(x, steps)
    expected, lengths = builders.reference(cascade.model_a, cascade.model_b, x, steps,
                                           state=cascade.state, state_init=cascade.state_init,
                                           **reference_kwargs)
    assert isinstance(out, tf.RaggedTensor)
    assert out.shape[0] == x.shape[0] and out.shape[1] == x.shape[1]
    assert out.shape[-1] == cascade.b_spec.output_size
    np.testing.assert_array_equal(out.row_lengths(axis=2).numpy().reshape(lengths.shape), lengths)
    np.testing.assert_allclose(out.flat_values.numpy(), expected.numpy(), atol=1e-5)
    return out


VALUE_GRID = [(a, b, s) for s in ("reset", "carry") for b in ("gru", "lstm", "sequence") for a in ("simple", "gru", "lstm")]
# the default on every form of B in both states, each kind of A twice; the default suite keeps a pairwise covering
# (10 of 24: every A with every B, every B and A in both states and on both paths), the rest run with -m slow
VALUE_AUTO = [("simple", "gru", "reset"), ("gru", "lstm", "reset"), ("lstm", "sequence", "reset"),
              ("lstm", "gru", "carry"), ("simple", "lstm", "carry"), ("gru", "sequence", "carry")]


# quick: two cases per path: between them every form of B, each state on each path; the rest run with -m slow
@pytest.mark.parametrize("a_kind, b_kind, state, jit", paths.quick(
    paths.both(VALUE_GRID, auto=VALUE_AUTO), "simple-gru-reset-auto", "gru-sequence-carry-auto",
    "lstm-sequence-reset-plain", "gru-lstm-carry-plain"))
def test_values_equal_reference(a_kind, b_kind, state, jit):
    cascade = Cascade(builders.model_a(a_kind), make_b(b_kind), state=state, jit_compile=jit)
    x = builders.inputs(3, 4)
    for steps in (PER_SAMPLE, SHARED, ALL_ZERO):
        assert_matches_reference(cascade, x, steps)
    # reset through a known cell keeps its packed recurrence, a sequence-form B its one padded call
    paths.assert_path(cascade, jit, loop=state == "carry" and b_kind != "sequence")
    if jit and state == "reset" and b_kind != "sequence":
        assert cascade.loop_compile_problem.startswith("reset mode with given steps through a known cell")


# quick: one cell per path, each cell once; the other two run with -m slow
@pytest.mark.parametrize("b_kind, jit", paths.quick(paths.both([("gru",), ("lstm",)]), "lstm-auto", "gru-plain"))
def test_reset_through_b_itself_equals_reference(b_kind, jit):
    """`fast_cells=False`: B is called at every step, under XLA the masked loop of `(n, t)` pairs."""
    cascade = Cascade(builders.model_a(), make_b(b_kind), fast_cells=False, jit_compile=jit)
    x = builders.inputs(3, 4)
    for steps in (PER_SAMPLE, SHARED, ALL_ZERO):
        assert_matches_reference(cascade, x, steps)
    paths.assert_path(cascade, jit)


# quick: each form of B once, both states; the other three run with -m slow
@pytest.mark.parametrize("state, b_kind", paths.quick(
    paths.covering([(state, b_kind) for state in ("reset", "carry") for b_kind in ("gru", "lstm", "sequence")]),
    "reset-gru", "carry-lstm", "carry-sequence"))
def test_all_zero_batch_gives_empty_result_of_the_right_shape(state, b_kind):
    cascade = Cascade(builders.model_a(), make_b(b_kind), state=state)
    out = assert_matches_reference(cascade, builders.inputs(3, 4), ALL_ZERO)
    assert out.flat_values.shape == (0, 2)
    assert out.bounding_shape().numpy().tolist() == [3, 4, 0, 2]


@pytest.mark.parametrize("b_kind", ["gru", "sequence"])
@pytest.mark.parametrize("state", ["reset", "carry"])
def test_zero_outer_steps(b_kind, state):
    out = Cascade(builders.model_a(), make_b(b_kind), state=state)(np.zeros((2, 0, 3), np.float32), np.zeros(0, int))
    assert out.bounding_shape().numpy().tolist() == [2, 0, 0, 2]


# quick: lstm on the default, gru with both fast_cells on the plain path; the other plain lstm cases run with -m slow
@pytest.mark.parametrize("b_kind, fast_cells, jit", paths.quick(paths.both(
    [("gru", "auto"), ("lstm", "auto"), ("gru", False), ("lstm", False)], auto=[("lstm", False)]),
    "lstm-False-auto", "gru-auto-plain", "gru-False-plain"))
def test_state_init_ir(b_kind, fast_cells, jit):
    b = builders.step_b(b_kind, units=4)  # state size == H == 4
    cascade = Cascade(builders.model_a(), b, state_init="ir", fast_cells=fast_cells, jit_compile=jit)
    out = assert_matches_reference(cascade, builders.inputs(3, 4), PER_SAMPLE)
    paths.assert_path(cascade, jit, loop=fast_cells is False)
    zeros_out = Cascade(builders.model_a(), b, jit_compile=False)(builders.inputs(3, 4), PER_SAMPLE)
    assert not np.allclose(out.flat_values.numpy(), zeros_out.flat_values.numpy())  # the init matters


def test_state_init_ir_needs_state_size_h():
    with pytest.raises(ModelError, match=r"H=4.*\[5\]"):
        Cascade(builders.model_a(), builders.step_b("gru", units=5), state_init="ir")
    with pytest.raises(ParameterError, match=r"^state_init: 'ir' needs a step-form B and state='reset', received a "
                       r"step-form B and state='carry'\.$"):
        Cascade(builders.model_a(), builders.step_b("gru", units=4), state="carry", state_init="ir")


@pytest.mark.parametrize("jit", paths.BOTH)
def test_classic_small_case_carry(jit):
    """Batch 2, Ta 3, 4 features, SimpleRNN(4) A, SimpleRNNCell(4) B, steps [3, 4, 2], carry."""
    a = builders.model_a("simple", features=4, ir_size=4)
    b = builders.step_b("simple", ir_size=4, units=4, output_size=None)
    x = builders.inputs(2, 3, features=4)
    cascade = Cascade(a, b, state="carry", jit_compile=jit)
    out = assert_matches_reference(cascade, x, np.array([3, 4, 2]))
    paths.assert_path(cascade, jit)
    assert out.row_lengths(axis=2).numpy().tolist() == [[3, 4, 2], [3, 4, 2]]
    # carry differs from reset from the second outer step on
    reset = Cascade(a, b, jit_compile=False)(x, np.array([3, 4, 2]))
    np.testing.assert_allclose(out[:, 0].flat_values, reset[:, 0].flat_values, atol=1e-6)
    assert not np.allclose(out[:, 1].flat_values, reset[:, 1].flat_values)


@pytest.mark.parametrize("jit", paths.BOTH)
def test_hand_worked_values(jit):
    """Ones everywhere, SimpleRNNCell(1, linear) B: y_j = (j + 1) * ir, worked out by hand."""
    inputs = keras.Input(shape=(None, 1))
    a = keras.Model(inputs, keras.layers.Identity()(inputs))
    x_in, s_in = keras.Input(shape=(1,)), keras.Input(shape=(1,))
    cell = keras.layers.SimpleRNNCell(1, activation=None, kernel_initializer="ones",
                                      recurrent_initializer="ones", bias_initializer="zeros")
    h, [s_out] = cell(x_in, [s_in])
    b = keras.Model([x_in, s_in], [h, s_out])
    x = np.array([[[2.0], [5.0]]], np.float32)
    reset = Cascade(a, b, jit_compile=jit, fast_cells=False)
    assert reset(x, [3, 2]).flat_values.numpy().ravel().tolist() == [2, 4, 6, 5, 10]
    carry = Cascade(a, b, state="carry", jit_compile=jit)  # state 6 carries into the second outer step
    assert carry(x, [3, 2]).flat_values.numpy().ravel().tolist() == [2, 4, 6, 11, 16]
    paths.assert_path(reset, jit)
    paths.assert_path(carry, jit)


FORMS_STATES = [(b, s) for s in ("reset", "carry") for b in ("gru", "lstm", "sequence")]


# quick: one case on the default, two plain ones (every form of B and each state between them); the rest run with
# -m slow
@pytest.mark.parametrize("b_kind, state, jit", paths.quick(
    paths.both(FORMS_STATES, auto=[("lstm", "reset"), ("gru", "carry")]),
    "lstm-reset-auto", "gru-reset-plain", "sequence-carry-plain"))
def test_eager_and_tf_function_agree(b_kind, state, jit):
    """The eager path (`run_eagerly=True`), the compiled eager call and a caller's tf.function agree."""
    a, b = builders.model_a(), make_b(b_kind)
    cascade = Cascade(a, b, state=state, jit_compile=jit)
    x = builders.inputs(3, 4)
    eager = Cascade(a, b, state=state, run_eagerly=True)(x, PER_SAMPLE)
    compiled = tf.function(lambda x, steps: cascade(x, steps))
    for steps in (PER_SAMPLE, np.array([[1, 0, 0, 5], [2, 2, 2, 2], [0, 0, 0, 0]])):
        got = compiled(tf.constant(x), tf.constant(steps))
        want = cascade(x, steps)
        np.testing.assert_allclose(got.flat_values.numpy(), want.flat_values.numpy(), atol=1e-6)
        np.testing.assert_array_equal(got.row_lengths(axis=2).numpy(), want.row_lengths(axis=2).numpy())
    np.testing.assert_allclose(compiled(tf.constant(x), tf.constant(PER_SAMPLE)).flat_values.numpy(),
                               eager.flat_values.numpy(), atol=1e-6)
    paths.assert_path(cascade, jit, loop=state == "carry" and b_kind != "sequence")


def gradients(cascade, x, steps, compute):
    weights = cascade.model_a.trainable_weights + cascade.model_b.trainable_weights
    with tf.GradientTape() as tape:
        values = compute()
        probe = tf.cast(tf.reshape(tf.range(tf.size(values)) % 7 - 3, tf.shape(values)), values.dtype)
        loss = tf.reduce_sum(values * probe) + tf.reduce_sum(values**2)
    return tape.gradient(loss, weights), weights


GRADIENT_GRID = [(b, s, c) for c in (False, True) for s in ("reset", "carry") for b in ("gru", "lstm", "sequence")]


# quick: two cases per path, each state and compiled on each path, every form of B; the rest run with -m slow
@pytest.mark.parametrize("b_kind, state, compiled, jit", paths.quick(paths.both(
    GRADIENT_GRID, auto=[("gru", "carry", True), ("lstm", "reset", True), ("sequence", "carry", False)]),
    "lstm-reset-True-auto", "gru-carry-True-auto", "lstm-carry-False-plain", "sequence-reset-True-plain"))
def test_gradients_equal_reference(b_kind, state, compiled, jit):
    cascade = Cascade(builders.model_a("lstm"), make_b(b_kind), state=state, jit_compile=jit)
    x = builders.inputs(3, 4)

    def run():
        return cascade(x, PER_SAMPLE, training=True).flat_values

    got, weights = gradients(cascade, x, PER_SAMPLE, tf.function(run) if compiled else run)
    want, _ = gradients(cascade, x, PER_SAMPLE,
                        lambda: builders.reference(cascade.model_a, cascade.model_b, x, PER_SAMPLE, state=state)[0])
    assert len(got) == len(weights) > 0
    for weight, g, w in zip(weights, got, want):
        assert g is not None, weight.path
        np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(), tf.convert_to_tensor(w).numpy(),
                                   rtol=1e-4, atol=1e-5, err_msg=weight.path)
    assert cascade.a_compiled is (jit == "auto")


# quick: one case per path, each state once; carry on the plain path runs with -m slow
@pytest.mark.parametrize("state, jit", paths.quick(paths.both([("reset",), ("carry",)], auto=[("carry",)]),
                                              "carry-auto", "reset-plain"))
def test_finite_differences(state, jit):
    """Central differences in float64 on a tiny cascade agree with the tape (on the default: the differences
    from the loop compiled whole, the tape's gradient from the plain loop)."""
    a = builders.model_a("simple", features=2, ir_size=2, dtype="float64")
    b = builders.step_b("gru", ir_size=2, units=2, output_size=1, dtype="float64")
    cascade = Cascade(a, b, state=state, jit_compile=jit)
    x = builders.inputs(2, 3, features=2).astype("float64")
    steps = np.array([[2, 0, 3], [1, 2, 0]])

    def loss():
        values = cascade(x, steps).flat_values
        return tf.reduce_sum(tf.sin(values * 3.0))

    weights = a.trainable_weights + b.trainable_weights
    with tf.GradientTape() as tape:
        value = loss()
    analytic = tape.gradient(value, weights)
    eps = 1e-6
    for weight, grad in zip(weights, analytic):
        flat = weight.numpy().ravel()
        for index in range(0, flat.size, max(1, flat.size // 3)):
            original = flat.copy()
            plus, minus = original.copy(), original.copy()
            plus[index] += eps
            minus[index] -= eps
            weight.assign(plus.reshape(weight.shape))
            up = loss().numpy()
            weight.assign(minus.reshape(weight.shape))
            down = loss().numpy()
            weight.assign(original.reshape(weight.shape))
            numeric = (up - down) / (2 * eps)
            assert numeric == pytest.approx(np.ravel(grad)[index], rel=1e-5, abs=1e-8), weight.path
    paths.assert_path(cascade, jit, loop=state == "carry")


def identity_a(ir_size):
    inputs = keras.Input(shape=(None, ir_size))
    return keras.Model(inputs, keras.layers.Identity()(inputs))


@pytest.mark.parametrize("b_kind", ["gru", "sequence"])
def test_gradient_isolation(b_kind):
    """reset: d Out[n, t] / d IR[n, k] == 0 exactly for k != t; carry: non-zero for some k < t."""
    steps = np.array([[2, 0, 3, 1]])
    ir = tf.constant(builders.inputs(1, 4, features=4))
    for state in ("reset", "carry"):
        cascade = Cascade(identity_a(4), make_b(b_kind), state=state)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(ir)
            out = cascade(ir, steps)
            sums = [tf.reduce_sum(out[0, t]) for t in range(4)]
        for t in (0, 2, 3):
            grad = tape.gradient(sums[t], ir).numpy()[0]
            others = np.delete(grad, t, axis=0)
            if state == "reset":
                assert np.all(others == 0.0), (t, grad)
                assert np.any(grad[t] != 0.0)
            elif t == 3:
                assert np.any(grad[:3] != 0.0), grad  # earlier outer steps reach it through the state
                assert np.all(grad[1] == 0.0)  # outer step 1 runs no inner step
        del tape


def test_fixed_batch_b_runs_at_any_batch(tmp_path):
    b = builders.step_b("gru", batch_size=2)
    path = tmp_path / "b.keras"
    b.save(path)
    loaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    cascade = Cascade(builders.model_a(), loaded)
    x = builders.inputs(7, 4)
    steps = np.random.default_rng(1).integers(0, 4, size=(7, 4))
    assert_matches_reference(cascade, x, steps)
    assert_matches_reference(Cascade(builders.model_a(), loaded, state="carry"), x, steps)


def test_fixed_ta_a_refuses_other_ta():
    cascade = Cascade(builders.model_a(outer_steps=5), builders.step_b())
    with pytest.raises(DataError, match=r"fixed Ta=5.*Ta=4"):
        cascade(builders.inputs(2, 4), [1, 1, 1, 1])
    assert cascade(builders.inputs(2, 5), [1, 0, 1, 0, 2]).shape[:2] == (2, 5)


def test_dropout_b_runs_twice_under_tf_function_in_training():
    cascade = Cascade(builders.model_a(), builders.step_b("gru", dropout=0.5))
    run = tf.function(lambda x, steps: cascade(x, steps, training=True).flat_values)
    x, steps = tf.constant(builders.inputs(3, 4)), tf.constant(PER_SAMPLE)
    first, second = run(x, steps), run(x, steps)
    assert first.shape == second.shape == (int(PER_SAMPLE.sum()), 2)
    assert not np.allclose(first.numpy(), second.numpy())  # fresh masks each run
    inference = cascade(x, PER_SAMPLE, training=False)  # and the cell still works outside
    assert_matches_reference(cascade, builders.inputs(3, 4), PER_SAMPLE)
    assert inference.flat_values.shape[0] == PER_SAMPLE.sum()


class RowCounter(keras.layers.Layer):
    """Adds the number of rows it sees to a counter."""

    def build(self, input_shape):
        self.rows = self.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False)

    def call(self, x):
        self.rows.assign_add(tf.cast(tf.shape(x)[0], "int64"))
        return x


def counting_b(ir_size=4, units=5):
    x, s = keras.Input(shape=(ir_size,)), keras.Input(shape=(units,))
    counter = RowCounter()
    h, [s2] = keras.layers.GRUCell(units)(counter(x), [s])
    return keras.Model([x, s], [keras.layers.Dense(2)(h), s2]), counter


@pytest.mark.parametrize("state", ["reset", "carry"])
@pytest.mark.parametrize("compiled", [False, True])
def test_rows_processed_equal_sum_of_steps(state, compiled):
    b, counter = counting_b()
    cascade = Cascade(builders.model_a(), b, state=state)
    steps = np.array([[0, 7, 0, 1], [0, 0, 0, 0], [3, 0, 0, 0]])
    run = tf.function(lambda x: cascade(x, steps)) if compiled else (lambda x: cascade(x, steps))
    x = builders.inputs(3, 4)
    run(x)  # traces once under tf.function: counted rows are those the graph runs
    counter.rows.assign(0)
    run(x)
    assert int(counter.rows.numpy()) == steps.sum() == 11


@pytest.mark.parametrize(
    "steps, words",
    [
        (np.array([1, -2, 0, 1]), r"at index 1: expected a non-negative integer, received -2"),
        (np.array([1.5, 2, 0, 1]), r"at index 0: expected a non-negative integer, received 1.5"),
        (np.array([[1, 2, 3]]), r"shape \(1, 3\), expected \(Ta,\)=\(4,\) or \(N, Ta\)=\(3, 4\)"),
        (np.ones((3, 4, 1), int), r"shape \(3, 4, 1\), expected \(Ta,\)=\(4,\) or \(N, Ta\)=\(3, 4\)"),
        (np.array(["a", "b", "c", "d"]), r"have dtype <U1: expected integers"),
        (np.ones((2, 4), int), r"shape \(2, 4\), expected"),
    ],
)
def test_bad_steps(steps, words):
    cascade = Cascade(builders.model_a(), builders.step_b())
    with pytest.raises(DataError, match=words):
        cascade(builders.inputs(3, 4), steps)


def test_integer_valued_float_steps_are_accepted():
    cascade = Cascade(builders.model_a(), builders.step_b())
    out = cascade(builders.inputs(3, 4), np.array([1.0, 0.0, 2.0, 1.0]))
    assert out.flat_values.shape[0] == 12


@pytest.mark.parametrize(
    "x, words",
    [
        (np.zeros((3, 4), np.float32), r"the inputs have shape \(3, 4\): expected \(N, Ta, F\)\."),
        (np.zeros((3, 4, 2), np.float32), r"F=2 features per step but model A expects F=3"),
    ],
)
def test_bad_inputs(x, words):
    cascade = Cascade(builders.model_a(), builders.step_b())
    with pytest.raises(DataError, match=words):
        cascade(x, [1, 1, 1, 1])


def test_symbolic_steps_are_checked_under_tf_function():
    cascade = Cascade(builders.model_a(), builders.step_b())
    with pytest.raises(DataError, match="integers; received a tensor of dtype float32"):
        tf.function(lambda s: cascade(builders.inputs(3, 4), s))(tf.constant([1.0, 1, 1, 1]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="steps must be >= 0"):
        tf.function(lambda s: cascade(builders.inputs(3, 4), s).flat_values)(tf.constant([1, -1, 1, 1]))


def test_bad_settings():
    a, b = builders.model_a(), builders.step_b()
    with pytest.raises(ParameterError, match=r"^state: expected one of reset, carry, received 'keep'\.$") as caught:
        Cascade(a, b, state="keep")
    assert caught.value.parameter == "state"
    with pytest.raises(ParameterError, match=r"^state_init: expected one of zeros, ir, received 'ones'\.$"):
        Cascade(a, b, state_init="ones")
    with pytest.raises(ParameterError, match=r"^max_steps: expected a positive integer, received 2\.5\.$"):
        Cascade(a, b, max_steps=2.5)
    with pytest.raises(ParameterError, match=r"^fast_cells: expected one of auto, True, False, received 'yes'\.$"):
        Cascade(a, b, fast_cells="yes")
    with pytest.raises(ParameterError, match=r"^stop_rule: expected a StopRule or None, received 'norm'\.$"):
        Cascade(a, b, max_steps=3, stop_rule="norm")
    with pytest.raises(ModelError, match=r"size 4 but model B expects inputs of size 6"):
        Cascade(a, builders.step_b(ir_size=6))


@pytest.mark.slow  # 15-20 s each on 2 cores; A under XLA in a tf.function under a tape, reset and carry, is checked
# against the eager reference by test_gradients_equal_reference[lstm-reset-True-auto] and [gru-carry-True-auto]
@pytest.mark.parametrize("state", ["reset", "carry"])
def test_jit_compiled_a_gives_the_same_values_and_gradients(state):
    a, b = builders.model_a("gru"), builders.step_b("lstm")
    x = builders.inputs(3, 4)
    results = []
    for jit in (False, True):
        cascade = Cascade(a, b, state=state, jit_compile=jit)
        with tf.GradientTape() as tape:
            values = tf.function(lambda: cascade(x, PER_SAMPLE).flat_values)()
            loss = tf.reduce_sum(values**2)
        results.append((values.numpy(), tape.gradient(loss, a.trainable_weights)))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)
    for g_plain, g_jit in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(g_plain, g_jit, rtol=1e-4, atol=1e-6)


def test_the_runner_imports_no_file_reading_module():
    """The runner is pure TensorFlow: steps come through `cascade_cli.steps` (numpy only), never h5 or data.

    (`'h5py' not in sys.modules` cannot hold: TensorFlow itself imports h5py.)
    """
    code = ("import sys, cascade_cli.run.cascade; "
            "print(sorted(m for m in ('cascade_cli.h5', 'cascade_cli.data', 'cascade_cli.cli', 'click') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_packed_loop_runs_a_plain_step_over_a_prefix_by_hand():
    # Rows for pairs 7 (x = 1, 3 steps) and 3 (x = 10, 1 step): step 0 runs both, steps 1 and 2 pair 7 alone.
    rows = (tf.constant([7, 3]), tf.constant([[1.0], [10.0]]), tf.constant([3, 1]))
    outputs, pairs = packed_loop(builders.accumulate, builders.pair_inputs, builders.pair_advance, rows=rows,
                                 states=[tf.zeros([2, 1])], output_size=1, dtype=tf.float32,
                                 counts=tf.constant([2, 1, 1, 0]))
    assert outputs.numpy().ravel().tolist() == [1, 10, 2, 3]
    assert pairs.numpy().tolist() == [7, 3, 7, 7]


@pytest.mark.parametrize("exclude, values, emitted_pairs", [(False, [1, 10, 2], [7, 3, 7]), (True, [1], [7])])
def test_packed_loop_drops_rows_that_stop_by_hand(exclude, values, emitted_pairs):
    # Stop once y >= 2: pair 3 stops at its step 0 (y = 10), pair 7 at its step 1 (y = 2).
    def stop(y, token):
        return y[:, 0] >= 2

    rows = (tf.constant([7, 3]), tf.constant([[1.0], [10.0]]), tf.constant([3, 3]))
    outputs, pairs = packed_loop(builders.accumulate, builders.pair_inputs, builders.pair_advance, rows=rows,
                                 states=[tf.zeros([2, 1])], output_size=1, dtype=tf.float32, stop=stop,
                                 exclude_stop_step=exclude)
    assert outputs.numpy().ravel().tolist() == values
    assert pairs.numpy().tolist() == emitted_pairs


def test_packed_loop_with_no_rows_returns_empty_outputs():
    rows = (tf.zeros([0], tf.int32), tf.zeros([0, 1]), tf.zeros([0], tf.int32))
    outputs, pairs = packed_loop(builders.accumulate, builders.pair_inputs, builders.pair_advance, rows=rows,
                                 states=[tf.zeros([0, 1])], output_size=1, dtype=tf.float32, counts=tf.constant([0]))
    assert outputs.shape == (0, 1) and pairs.shape == (0,)


# ---------------------------------------------------------------- compiled by default, XLA on A


class CallCounter(keras.layers.Layer):
    """Passes its input through and counts its Python calls: one per trace, or one per eager call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, x):
        self.calls += 1
        return x


def counting_a():
    inputs = keras.Input(shape=(None, 3))
    counter = CallCounter()
    ir = keras.layers.GRU(4, return_sequences=True, kernel_initializer=builders.init(0))(counter(inputs))
    return keras.Model(inputs, ir), counter


FIVE_CALLS = [  # (N, steps): different batch sizes, shared and per-sample steps, zeros, steps left to max_steps
    (1, [2, 0, 1, 3]),
    (3, PER_SAMPLE),
    (5, np.zeros((5, 4), int)),
    (2, np.array([[1, 5, 0, 2], [0, 0, 4, 1]])),
    (4, None),
]


@pytest.mark.parametrize("jit_compile", [False, "auto"])
def test_eager_calls_trace_once(jit_compile):
    """Five eager calls, each a new N and steps pattern: one trace (counted by TensorFlow and by A's Python calls)."""
    a, counter = counting_a()
    cascade = Cascade(a, builders.step_b(), max_steps=5, jit_compile=jit_compile)

    def traces():
        return sum(function.experimental_get_tracing_count() for function in cascade._functions.values())

    seen = []
    for n, steps in FIVE_CALLS:
        out = cascade(builders.inputs(n, 4), steps)
        assert out.shape[:2] == (n, 4)
        seen.append(counter.calls)
    assert traces() == 1
    assert seen[0] > 0 and seen == [seen[0]] * 5  # A's Python code ran while tracing only
    cascade.run(builders.inputs(3, 4), PER_SAMPLE)  # run has its own trace, once
    values, _ = cascade.run(builders.inputs(6, 4), np.ones((6, 4), int))
    assert traces() == 2 and values.shape == (24, 2)


def test_eager_results_of_alternating_sizes_each_keep_their_own_partition():
    """The eager call reuses the outer partition of the last (N, Ta): a new size builds its own, values unchanged."""
    a, b = builders.model_a(), builders.step_b()
    compiled, eager = Cascade(a, b, max_steps=5), Cascade(a, b, max_steps=5, run_eagerly=True)
    for n, steps in [(2, PER_SAMPLE[:2]), (3, PER_SAMPLE), (2, PER_SAMPLE[1:]), (3, PER_SAMPLE[::-1])]:
        x = builders.inputs(n, 4)
        got, want = compiled(x, steps), eager(x, steps)
        assert got.shape[:2] == (n, 4) and got.shape[:2] == want.shape[:2]
        np.testing.assert_array_equal(got.row_lengths(axis=2).numpy(), np.asarray(steps))
        np.testing.assert_allclose(got.flat_values.numpy(), want.flat_values.numpy(), rtol=1e-5, atol=1e-6)


def test_run_eagerly_runs_every_call_eagerly():
    a, counter = counting_a()
    cascade = Cascade(a, builders.step_b(), max_steps=5, run_eagerly=True)
    seen = []
    for n, steps in FIVE_CALLS:
        cascade(builders.inputs(n, 4), steps)
        seen.append(counter.calls)
    assert all(later > earlier for earlier, later in zip(seen, seen[1:]))  # A's Python code ran every call
    assert not cascade._functions  # nothing traced
    assert cascade.a_compiled is False and cascade.a_compiled_in_training is False


# quick: each state and each form of B once; carry with gru and reset with sequence run with -m slow
@pytest.mark.parametrize("state, b_kind", [("reset", "gru"), pytest.param("reset", "sequence", marks=pytest.mark.slow),
                                           pytest.param("carry", "gru", marks=pytest.mark.slow), ("carry", "sequence")])
def test_eager_call_under_a_tape_equals_the_eager_path(state, b_kind):
    """The compiled eager call gives the values and gradients of `run_eagerly=True`, which the reference checks."""
    a, b = builders.model_a("lstm"), make_b(b_kind)
    x = builders.inputs(3, 4)
    results = []
    for run_eagerly in (True, False):
        cascade = Cascade(a, b, state=state, run_eagerly=run_eagerly)
        got, weights = gradients(cascade, x, PER_SAMPLE, lambda: cascade(x, PER_SAMPLE).flat_values)
        results.append((cascade(x, PER_SAMPLE).flat_values.numpy(), got))
    np.testing.assert_allclose(results[1][0], results[0][0], atol=1e-5)
    for weight, compiled, eager in zip(weights, results[1][1], results[0][1]):
        assert compiled is not None, weight.path
        np.testing.assert_allclose(tf.convert_to_tensor(compiled), tf.convert_to_tensor(eager), rtol=1e-4,
                                   atol=1e-5, err_msg=weight.path)


def gru_a_then(layer):
    """Model A: a GRU, then `layer` on its outputs."""
    inputs = keras.Input(shape=(None, 3))
    ir = keras.layers.GRU(4, return_sequences=True, kernel_initializer=builders.init(0))(inputs)
    return keras.Model(inputs, layer(ir))


def taped_twice(cascade, x, steps, **kwargs):
    """Values, the states the seed generators are left in, and the gradients of two losses under one persistent tape."""
    x = tf.constant(x)
    sources = [x, *cascade.model_a.trainable_weights, *cascade.model_b.trainable_weights]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        values = cascade(x, steps, training=True, **kwargs).flat_values
        losses = tf.reduce_sum(values), tf.reduce_sum(tf.sin(values) * values)
    states = [generator.state.numpy() for generator in seed_generators([cascade.model_a, cascade.model_b])]
    grads = [[tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, sources)] for loss in losses]
    return values.numpy(), states, grads


# quick: carry; reset, whose seed generators are put back the same way, runs with -m slow
@pytest.mark.parametrize("state", [pytest.param("reset", marks=pytest.mark.slow), "carry"])
def test_a_persistent_tape_gets_the_eager_paths_gradients_with_dropout_drawn_once(state):
    """Under a persistent tape the compiled call runs unrecorded and its gradient runs it again: with the seed
    generators put back, so that A's and B's dropout masks are the forward's, and left where the forward left them."""
    a, b = gru_a_then(keras.layers.Dropout(0.5, seed=3)), builders.step_b("gru", dropout=0.5)
    x = builders.inputs(3, 4)
    generators = seed_generators([a, b])
    start = [generator.state.numpy() for generator in generators]
    results = []
    for run_eagerly in (True, False):
        for generator, value in zip(generators, start):
            generator.state.assign(value)
        results.append(taped_twice(Cascade(a, b, state=state, run_eagerly=run_eagerly), x, PER_SAMPLE))
    (eager_values, eager_states, eager_grads), (values, states, grads) = results
    np.testing.assert_allclose(values, eager_values, atol=1e-6)
    assert not np.allclose(values, Cascade(a, b, state=state)(x, PER_SAMPLE).flat_values, atol=1e-3)  # dropout acted
    for got, want in zip(states, eager_states):
        np.testing.assert_array_equal(got, want)  # the recomputation drew nothing more
    for loss_grads, eager_loss_grads in zip(grads, eager_grads):
        for got, want in zip(loss_grads, eager_loss_grads):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_persistent_tape_updates_moving_statistics_once():
    """BatchNormalization in A, training=True, another call between the taped one and its gradient: the
    recomputing gradient leaves the moving statistics where that call left them, and gives the eager path's
    gradients."""
    normalization = keras.layers.BatchNormalization(momentum=0.5)
    a = gru_a_then(normalization)
    b = builders.step_b("gru")
    x = tf.constant(builders.inputs(3, 4))
    weights = a.trainable_weights + b.trainable_weights
    moving = [normalization.moving_mean, normalization.moving_variance]
    start = [v.numpy() for v in moving]
    results = []
    for run_eagerly in (True, False):
        for variable, value in zip(moving, start):
            variable.assign(value)
        cascade = Cascade(a, b, run_eagerly=run_eagerly)
        with tf.GradientTape(persistent=True) as tape:
            loss = tf.reduce_sum(tf.sin(cascade(x, PER_SAMPLE, training=True).flat_values))
        between = [v.numpy() for v in moving]
        cascade(2.0 * x, PER_SAMPLE, training=True)  # moves the statistics on
        after = [v.numpy() for v in moving]
        grads = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, weights)]
        results.append((between, after, [v.numpy() for v in moving], grads))
    (eager_between, eager_after, _, eager_grads), (between, after, final, grads) = results
    assert not np.allclose(eager_after[0], eager_between[0])  # the second call did move them
    for got, want in zip(between + after + final, eager_between + eager_after + eager_after):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for weight, got, want in zip(weights, grads, eager_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=weight.path)


def test_a_persistent_tape_gets_the_targets_gradient_of_teacher_forcing():
    a, b = builders.model_a(), builders.feedback_b("gru")
    x, steps = builders.inputs(3, 4), PER_SAMPLE
    targets = tf.constant(np.random.default_rng(5).normal(size=(int(steps.sum()), 3)), tf.float32)
    results = []
    for run_eagerly in (True, False):
        cascade = Cascade(a, b, feedback=True, run_eagerly=run_eagerly)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(targets)
            values = cascade(x, steps, targets=targets).flat_values
            loss = tf.reduce_sum(tf.sin(values) * values)
        results.append([tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, [targets, *b.trainable_weights])])
    assert np.any(results[0][0] != 0.0)
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # 15-35 s on 2 cores; kept out of the default suite to hold it well under 15 minutes
@pytest.mark.xla
def test_nested_tapes_take_a_gradient_of_a_gradient_with_a_under_xla():
    """A gradient penalty: d/dw sum((d loss / d x)^2), the compiled call (A under XLA) against the eager path."""
    a, b = builders.model_a("gru"), builders.step_b("gru")
    weights = a.trainable_weights + b.trainable_weights
    x = tf.constant(builders.inputs(3, 4))
    results = []
    for cascade in (Cascade(a, b, run_eagerly=True), Cascade(a, b)):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(tf.sin(cascade(x, PER_SAMPLE).flat_values))
            penalty = tf.reduce_sum(inner.gradient(loss, x) ** 2)
        results.append([tf.convert_to_tensor(g).numpy() for g in outer.gradient(penalty, weights)])
    assert cascade.a_compiled is True
    for weight, got, want in zip(weights, results[1], results[0]):
        assert np.any(want != 0.0), weight.path
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=weight.path)


class HostDoubling(keras.layers.Layer):
    """`2 * x` computed on the host by `tf.numpy_function`, which XLA cannot compile."""

    def call(self, x):
        y = tf.numpy_function(lambda v: (2 * v).astype(v.dtype), [x], x.dtype, stateful=False)
        return tf.ensure_shape(y, x.shape)

    def compute_output_shape(self, input_shape):
        return input_shape


def host_a():
    return gru_a_then(HostDoubling())


@pytest.mark.xla
def test_jit_compile_auto_compiles_a_where_it_compiles():
    a, b = builders.model_a("gru"), builders.step_b("lstm")
    x = builders.inputs(3, 4)
    cascade = Cascade(a, b)  # jit_compile="auto" by default
    assert cascade.a_compiled is None and cascade.a_compiled_in_training is None  # nothing decided before use
    values = cascade(x, PER_SAMPLE).flat_values
    assert cascade.a_compiled is True and cascade.a_compiled_in_training is True  # no dropout: exact in training
    plain = Cascade(a, b, jit_compile=False)
    np.testing.assert_allclose(values, plain(x, PER_SAMPLE).flat_values, atol=1e-5)
    assert plain.a_compiled is False
    inside = Cascade(a, b)  # first use inside a caller's tf.function decides the same way
    tf.function(lambda x: inside(x, PER_SAMPLE).flat_values)(tf.constant(x))
    assert inside.a_compiled is True


@pytest.mark.xla
@pytest.mark.xla_fallback
def test_jit_compile_auto_falls_back_quietly_where_a_does_not_compile():
    a, b = host_a(), builders.step_b()
    x = builders.inputs(3, 4)
    cascade = Cascade(a, b)
    values = cascade(x, PER_SAMPLE).flat_values
    assert cascade.a_compiled is False and cascade.a_compiled_in_training is False
    np.testing.assert_allclose(values, Cascade(a, b, run_eagerly=True)(x, PER_SAMPLE).flat_values, atol=1e-6)
    with pytest.raises(ParameterError, match=r"^jit_compile: True, but model A cannot run under XLA: it does not "
                                             r"compile \(") as caught:
        Cascade(a, b, jit_compile=True)
    assert caught.value.parameter == "jit_compile"


@pytest.mark.xla
def test_jit_compile_in_training_keeps_dropout_as_keras_draws_it():
    """A with dropout: XLA in inference only; training=True values equal the uncompiled A's under the same seeds."""
    a = gru_a_then(keras.layers.Dropout(0.5, seed=3))
    b = builders.step_b()
    x = builders.inputs(3, 4)
    generators = seed_generators([a, b])
    start = [generator.state.numpy() for generator in generators]
    cascade = Cascade(a, b)
    trained = cascade(x, PER_SAMPLE, training=True).flat_values.numpy()  # decides (probing A), then runs
    assert cascade.a_compiled is True and cascade.a_compiled_in_training is False
    for generator, state in zip(generators, start):  # the same seeds again
        generator.state.assign(state)
    plain = Cascade(a, b, jit_compile=False)(x, PER_SAMPLE, training=True).flat_values.numpy()
    np.testing.assert_allclose(trained, plain, atol=1e-6)  # the probe drew nothing the run could see
    inference = Cascade(a, b, jit_compile=False)(x, PER_SAMPLE).flat_values.numpy()
    assert not np.allclose(trained, inference)  # dropout did act
    np.testing.assert_allclose(cascade(x, PER_SAMPLE).flat_values, inference, atol=1e-5)


def test_xla_problem_names_what_does_not_hold():
    a = builders.model_a("gru")
    off_by_one = lambda x: a(x, training=False) + 1.0  # noqa: E731
    problem, training = xla_problem(a, off_by_one, (2, 3, 3))
    assert problem.startswith("its compiled values differ from its plain call's by up to 1 on a probe input")
    assert training is None
    assert xla_problem(a, xla_inference(a), (2, 3, 3)) == (None, None)
    inputs = keras.Input(shape=(None, 3))
    normed = keras.Model(inputs, keras.layers.BatchNormalization()(keras.layers.GRU(4, return_sequences=True)(inputs)))
    assert xla_problem(normed, xla_inference(normed), (2, 3, 3)) == (
        None, "model A has non-trainable weights, which a training call may update (e.g. BatchNormalization)")


@pytest.mark.slow  # 15-35 s on 2 cores; kept out of the default suite to hold it well under 15 minutes
@pytest.mark.xla
def test_a_cascade_made_after_a_trainable_change_takes_a_s_gradient_as_it_is_now():
    """A's XLA gradient must follow `trainable`: a guard for any cache of A's compiled call across cascades."""
    a, b = builders.model_a("gru"), make_b("gru")
    x = tf.constant(builders.inputs(3, 4))

    def a_gradients(cascade):  # of the inputs too (not `gradients`), so that A's gradient runs while A is frozen
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(cascade(x, PER_SAMPLE).flat_values)
        return tape.gradient(total, [x, *a.weights])[1:]

    a.trainable = False
    assert all(g is None for g in a_gradients(Cascade(a, b)))
    a.trainable = True
    cascade = Cascade(a, b)
    got, want = a_gradients(cascade), a_gradients(Cascade(a, b, jit_compile=False))
    assert cascade.a_compiled
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_bad_compile_settings():
    a, b = builders.model_a(), builders.step_b()
    with pytest.raises(ParameterError, match=r"^jit_compile: expected one of auto, True, False, received 'yes'\.$"):
        Cascade(a, b, jit_compile="yes")
    with pytest.raises(ParameterError, match=r"^run_eagerly: expected one of True, False, received 1\.$"):
        Cascade(a, b, run_eagerly=1)
    with pytest.raises(ParameterError, match=r"^jit_compile: True cannot apply with run_eagerly=True, which "
                                             r"compiles nothing; pass jit_compile='auto' or False\.$"):
        Cascade(a, b, jit_compile=True, run_eagerly=True)
