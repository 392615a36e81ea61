"""The known-cell fast path: detection, and equality with calling B itself."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
import paths
from cascade_cli.run.cells import backward_problem, fast_path_problem, gated_problem, split_b
from cascade_cli.errors import ModelError, ParameterError
from cascade_cli.options import StopRule
from cascade_cli.run.cascade import Cascade

STEPS = np.array([[3, 0, 2, 1], [0, 0, 0, 0], [1, 4, 0, 2]])


def wrapped(cell, *, ir_size=4, head=True):
    x = keras.Input(shape=(ir_size,))
    states = [keras.Input(shape=(size,)) for size in np.atleast_1d(cell.state_size)]
    h, new_states = cell(x, states)
    y = keras.layers.Dense(2, kernel_initializer=builders.init(7))(h) if head else h
    return keras.Model([x, *states], [y, *new_states])


def seeded(cell_type, **kwargs):
    return cell_type(5, kernel_initializer=builders.init(1), recurrent_initializer=builders.init(2),
                     **({"bias_initializer": builders.init(3)} if kwargs.get("use_bias", True) else {}), **kwargs)


CELLS = {
    "simple": lambda: seeded(keras.layers.SimpleRNNCell),
    "simple-linear-nobias": lambda: seeded(keras.layers.SimpleRNNCell, activation=None, use_bias=False),
    "simple-relu": lambda: seeded(keras.layers.SimpleRNNCell, activation="relu"),  # TensorFlow's own gradient
    "gru": lambda: seeded(keras.layers.GRUCell),
    "gru-reset-before": lambda: seeded(keras.layers.GRUCell, reset_after=False),
    "gru-nobias": lambda: seeded(keras.layers.GRUCell, use_bias=False),
    "lstm": lambda: seeded(keras.layers.LSTMCell),
}


# the default suite keeps 7 of 28: each cell once, between them both states, with and without a head, and each
# (state, head) pair; the other 21 (the rest of the pairwise covering: each cell in the other state) run with -m slow
GRID = [(name, state, head) for name in sorted(CELLS) for state in ("reset", "carry") for head in (True, False)]


@pytest.mark.parametrize("name, state, head", paths.quick(
    paths.covering(GRID), "gru-reset-True", "gru-nobias-carry-False", "gru-reset-before-reset-False", "lstm-carry-True",
    "simple-carry-False", "simple-linear-nobias-reset-True", "simple-relu-carry-False"))
def test_fast_path_equals_calling_b(name, state, head):
    b = wrapped(CELLS[name](), head=head)
    split = split_b(b)
    assert split is not None and (split.head is not None) == head
    a = builders.model_a()
    # jit_compile=False: A under XLA is not what this compares (test_runner tests it)
    fast, slow = (Cascade(a, b, state=state, jit_compile=False),
                  Cascade(a, b, state=state, fast_cells=False, jit_compile=False))
    x = builders.inputs(3, 4)
    weights = a.trainable_weights + b.trainable_weights
    results = []
    for cascade in (fast, slow):
        with tf.GradientTape() as tape:
            values = cascade(x, STEPS).flat_values
            loss = tf.reduce_sum(tf.sin(values))
        results.append((values.numpy(), tape.gradient(loss, weights)))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-6)
    for weight, g_fast, g_slow in zip(weights, results[0][1], results[1][1]):
        np.testing.assert_allclose(tf.convert_to_tensor(g_fast), tf.convert_to_tensor(g_slow), rtol=1e-5,
                                   atol=1e-6, err_msg=weight.path)
    expected, _ = builders.reference(a, b, x, STEPS, state=state)
    np.testing.assert_allclose(results[0][0], expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_a_gated_step_on_the_projection_by_gate_gives_b_calls_values(name):
    """`Gated.step` on `Gated.project`'s tables (what the loops compiled whole read: `compiled_loop.Step`) against
    calling B, three steps on: Keras' own recurrent matmul, so the values agree to float rounding. Only
    GRUCell(reset_after=False), whose candidate's matmul reads the reset gate, has none."""
    b = wrapped(CELLS[name](), head=False)
    split = split_b(b)
    if name == "gru-reset-before":
        assert split.gated is None
        assert gated_problem(split, ir_dtype="float32", training=False).startswith("GRUCell(reset_after=False)")
        return
    assert gated_problem(split, ir_dtype="float32", training=False) is None
    rng = np.random.default_rng(4)
    states = [tf.constant(rng.normal(size=(6, 5)), tf.float32) for _ in b.inputs[1:]]
    want = list(states)
    gates = {"simple": 1, "gru": 3, "lstm": 4}[name.split("-")[0]]
    for t in range(3):
        x = tf.constant(rng.normal(size=(6, 4)), tf.float32)
        projected = split.gated.project(x)
        assert [p.shape for p in projected] == [(6, 5)] * gates
        h, states = split.gated.step(projected, None, states)
        y, *want = b([x, *want])
        np.testing.assert_allclose(h.numpy(), y.numpy(), rtol=1e-6, atol=1e-6, err_msg=f"step {t}")
        for got, expected in zip(states, want):
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6, err_msg=f"step {t}")


@pytest.mark.parametrize("kind", ["simple", "gru", "lstm"])
def test_a_gated_feedback_step_adds_what_y_prev_projects_at_each_step(kind):
    """With feedback the projection of B's IR input is made apart (the rows of the kernel that x reads) and
    `y_prev`'s part joins it at every step: B's call on `Concatenate()([x, y_prev])`, to float rounding."""
    b = builders.feedback_b(kind, ir_size=4, units=5, output_size=3)
    split = split_b(b, feedback=True)
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=(6, 4)), tf.float32)
    projected = split.gated.project(x)  # once, for every step
    states = [tf.constant(rng.normal(size=(6, 5)), tf.float32) for _ in b.inputs[2:]]
    want, y_prev = list(states), tf.constant(rng.normal(size=(6, 3)), tf.float32)
    for t in range(3):
        h, states = split.gated.step(projected, y_prev, states)
        y, *want = b([x, y_prev, *want])
        np.testing.assert_allclose(split.head(h).numpy(), y.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
        for got, expected in zip(states, want):
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6, err_msg=f"step {t}")
        y_prev = y


def test_models_that_are_not_a_cell_plus_head_are_not_split():
    x, s = keras.Input(shape=(4,)), keras.Input(shape=(5,))
    cell = keras.layers.GRUCell(5)
    h, [s2] = cell(x, [s])
    reads_x = keras.Model([x, s], [keras.layers.Dense(2)(keras.layers.Concatenate()([h, x])), s2])
    assert split_b(reads_x) is None
    pre = keras.layers.Dense(4)(x)
    h2, [s3] = keras.layers.GRUCell(5)(pre, [s])
    assert split_b(keras.Model([x, s], [h2, s3])) is None
    assert split_b(builders.sequence_b()) is None
    a = builders.model_a()
    values = Cascade(a, reads_x)(builders.inputs(3, 4), STEPS).flat_values
    np.testing.assert_allclose(values, builders.reference(a, reads_x, builders.inputs(3, 4), STEPS)[0], atol=1e-5)


# ------------------------------------------------------- fast_cells and its one predicate


def problem(b, *, a=None, stop_rule=None, training=False):
    a = a or builders.model_a()
    form = "sequence" if len(b.inputs) == 1 and len(b.inputs[0].shape) == 3 else "step"
    return fast_path_problem(split_b(b) if form == "step" else None, form=form, ir_dtype=a.outputs[0].dtype,
                             stop_rule=stop_rule, training=training)


def reads_x_b():
    x, s = keras.Input(shape=(4,)), keras.Input(shape=(5,))
    h, [s2] = keras.layers.GRUCell(5)(x, [s])
    return keras.Model([x, s], [keras.layers.Dense(2)(keras.layers.Concatenate()([h, x])), s2])


def test_the_predicate_lets_a_known_cell_plus_head_through():
    for kind in ("simple", "gru", "lstm"):
        assert problem(builders.step_b(kind)) is None
    assert problem(builders.step_b("gru", dropout=0.5), training=False) is None  # inference ignores dropout


REASONS = {  # name: (B, Cascade settings, what the predicate says)
    "sequence form": (builders.sequence_b, {}, "B is in sequence form"),
    "not a cell plus head": (reads_x_b, {}, "B is not one SimpleRNNCell, GRUCell or LSTMCell called on"),
    "stop rule": (builders.step_b, {"max_steps": 4, "stop_rule": StopRule.norm(1.0)},
                  "a stop rule reads B's output at every inner step"),
}


@pytest.mark.parametrize("name", sorted(REASONS))
def test_fast_cells_true_raises_saying_why_and_auto_falls_back(name):
    make, settings, why = REASONS[name]
    a, b = builders.model_a(), make()
    assert problem(b, stop_rule=settings.get("stop_rule")).startswith(why)
    with pytest.raises(ParameterError, match=r"^fast_cells: True, but the known-cell path cannot apply: "
                                             + re.escape(why)) as caught:
        Cascade(a, b, fast_cells=True, **settings)
    assert caught.value.parameter == "fast_cells"
    x = builders.inputs(3, 4)
    auto = Cascade(a, b, **settings)(x, STEPS)
    plain = Cascade(a, b, fast_cells=False, **settings)(x, STEPS)
    np.testing.assert_array_equal(auto.flat_values.numpy(), plain.flat_values.numpy())


def test_a_cell_fed_another_dtype_than_a_emits_is_not_fast():
    a = builders.model_a(dtype="float64")
    why = "model A emits float64 but the cell computes in float32"
    assert problem(builders.step_b(), a=a) == why
    with pytest.raises(ModelError, match="float64"):  # refused on load, before any path is chosen
        Cascade(a, builders.step_b(), fast_cells=True)


def test_dropout_in_training_is_refused_by_fast_cells_true_at_call_time():
    a, b = builders.model_a(), builders.step_b("gru", dropout=0.5)
    assert problem(b, training=True) == "the cell's dropout draws its own masks in training"
    cascade = Cascade(a, b, fast_cells=True)  # inference can use it
    x = builders.inputs(3, 4)
    np.testing.assert_allclose(cascade(x, STEPS).flat_values, Cascade(a, b, fast_cells=False)(x, STEPS).flat_values,
                               atol=1e-6)
    with pytest.raises(ParameterError, match="the cell's dropout draws its own masks in training"):
        cascade(x, STEPS, training=True)
    assert Cascade(a, b)(x, STEPS, training=True).flat_values.shape == (int(STEPS.sum()), 2)  # auto: B itself


@pytest.mark.parametrize("name, why", [
    ("simple", None),
    ("gru", None),
    ("lstm", None),
    ("simple-linear-nobias", None),
    ("simple-relu", "its activation relu has no hand-written derivative (tanh, sigmoid and linear do)"),
    ("gru-reset-before", "GRUCell(reset_after=False) applies its reset gate before the recurrent matmul"),
])
def test_backward_problem_says_why_the_gradient_is_not_hand_written(name, why):
    cell = CELLS[name]()
    assert backward_problem(cell) == why
    b = wrapped(cell)
    split = split_b(b)
    assert split.backward_problem == why and (split.backward is None) == (why is not None)
    Cascade(builders.model_a(), b, fast_cells=True)  # TensorFlow's gradient serves: no error


def test_lstm_with_a_relu_recurrent_activation_has_no_hand_written_gradient():
    cell = seeded(keras.layers.LSTMCell, recurrent_activation="relu")
    assert backward_problem(cell) == ("its recurrent_activation relu has no hand-written derivative "
                                      "(tanh, sigmoid and linear do)")


@pytest.mark.parametrize("state", ["reset", "carry"])
def test_mixed_precision_runs_the_default_path(mixed_float16, state):
    """Under mixed_float16, `Cascade(a, b)` runs (it raised InvalidArgumentError in a raw matmul) and equals B."""
    a, b = builders.model_a(dtype=None), builders.step_b("gru", dtype=None)
    assert b.layers[-1].compute_dtype == "float16"
    x = builders.inputs(3, 4)
    weights = a.trainable_weights + b.trainable_weights
    results = []
    for fast_cells in ("auto", False):
        cascade = Cascade(a, b, state=state, fast_cells=fast_cells)
        with tf.GradientTape() as tape:
            values = cascade(x, STEPS).flat_values
            loss = tf.reduce_sum(tf.sin(tf.cast(values, tf.float32)))
        results.append((values.numpy(), [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, weights)]))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for weight, g_auto, g_plain in zip(weights, results[0][1], results[1][1]):
        np.testing.assert_allclose(g_auto, g_plain, rtol=1e-3, atol=1e-3, err_msg=weight.path)
    expected, _ = builders.reference(a, b, x, STEPS, state=state)
    np.testing.assert_allclose(results[0][0], expected.numpy(), atol=1e-2)  # fp16 rounding
    with pytest.raises(ParameterError, match="dtype policy mixed_float16"):
        Cascade(a, b, fast_cells=True)
