"""The known-cell fast path: detection, and equality with calling B itself."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from cascade_cli.cells import split_b
from cascade_cli.runner import Cascade

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


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("state", ["reset", "carry"])
@pytest.mark.parametrize("head", [True, False])
def test_fast_path_equals_calling_b(name, state, head):
    b = wrapped(CELLS[name](), head=head)
    split = split_b(b)
    assert split is not None and (split.head is not None) == head
    a = builders.model_a()
    fast, slow = Cascade(a, b, state=state), Cascade(a, b, state=state, fast_cells=False)
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
