"""Every private Keras / TensorFlow assumption cascade makes, one test each.

A failure here means a Keras or TensorFlow upgrade changed an attribute that
`cascade_cli.keras_internals` reads: fix the helper there, nowhere else.
"""

import keras
import tensorflow as tf

from cascade_cli.keras_internals import LayerCall, flatten_layers, inbound_calls, seed_generators, stop_recording


def gru_step_model():
    x, s = keras.Input(shape=(3,)), keras.Input(shape=(4,))
    cell = keras.layers.GRUCell(4)
    h, [s2] = cell(x, [s])
    dense = keras.layers.Dense(2)
    return keras.Model([x, s], [dense(h), s2]), cell, dense, (x, s)


def test_flatten_layers_finds_a_cell_inside_a_functional_model():
    model, cell, dense, _ = gru_step_model()
    assert hasattr(model, "_flatten_layers"), "keras.Model no longer has Layer._flatten_layers"
    layers = flatten_layers(model)
    assert any(layer is cell for layer in layers), "Layer._flatten_layers did not list the GRUCell"
    assert any(layer is dense for layer in layers), "Layer._flatten_layers did not list the Dense head"
    assert model not in layers and model in flatten_layers(model, include_self=True), (
        "Layer._flatten_layers(include_self=...) changed meaning")


def test_flatten_layers_reaches_layers_of_a_nested_model():
    inner, cell, _, _ = gru_step_model()
    x, s = keras.Input(shape=(3,)), keras.Input(shape=(4,))
    outer = keras.Model([x, s], inner([x, s]))
    assert any(layer is cell for layer in flatten_layers(outer)), (
        "Layer._flatten_layers no longer descends into a nested model")


def test_inbound_calls_give_the_tensors_a_layer_was_called_with():
    model, cell, _, (x, s) = gru_step_model()
    assert hasattr(cell, "_inbound_nodes"), "keras.layers.Layer no longer has _inbound_nodes"
    calls = inbound_calls(cell)
    assert len(calls) == 1 and isinstance(calls[0], LayerCall), "Layer._inbound_nodes: expected one node per call"
    call = calls[0]
    assert call.args[0] is x, "Node.arguments.args[0] is no longer the symbolic input the layer was called on"
    states = call.args[1] if len(call.args) > 1 else call.kwargs.get("states")
    assert list(states) == [s] and list(states)[0] is s, "Node.arguments no longer holds the states passed"
    assert call.outputs[1] is model.outputs[1], "Node.outputs is no longer the flat list of the call's outputs"
    assert len(call.outputs) == 2, "Node.outputs: expected [h, new_state] for a GRUCell"


def test_seed_generators_find_a_dropout_layers_generator():
    x = keras.Input(shape=(3,))
    dropout = keras.layers.Dropout(0.5, seed=1)
    model = keras.Model(x, dropout(keras.layers.Dense(3)(x)))
    assert hasattr(dropout, "_seed_generators"), "keras.layers.Layer no longer has _seed_generators"
    found = seed_generators([model, model])
    assert len(found) == 1, "Layer._seed_generators: expected the Dropout's one generator, once"
    assert isinstance(found[0], keras.random.SeedGenerator), "Layer._seed_generators holds no SeedGenerator"
    before = found[0].state.numpy().copy()
    model(tf.ones([2, 3]), training=True)
    assert (found[0].state.numpy() != before).any(), "the found SeedGenerator is not the one Dropout draws from"


def test_seed_generators_find_a_cells_dropout_generator():
    cell = keras.layers.GRUCell(4, dropout=0.5, recurrent_dropout=0.5, seed=3)
    x, s = keras.Input(shape=(3,)), keras.Input(shape=(4,))
    h, [s2] = cell(x, [s])
    assert seed_generators([keras.Model([x, s], [h, s2])]), "a GRUCell's dropout SeedGenerator was not found"


def test_stop_recording_really_stops_a_tape():
    v = tf.Variable(2.0)
    with tf.GradientTape(persistent=True) as tape:
        with stop_recording():
            hidden = v * v
        seen = v * v
    assert tape.gradient(hidden, v) is None, "tensorflow.python.eager.record.stop_recording no longer stops a tape"
    assert float(tape.gradient(seen, v)) == 4.0, "the tape stopped recording after stop_recording() ended"


def test_tape_may_record_sees_an_active_tape():
    import tensorflow as tf

    from cascade_cli.keras_internals import tape_may_record

    assert tape_may_record() is False
    with tf.GradientTape():
        assert tape_may_record() is True
    with tf.GradientTape(persistent=True):
        assert tape_may_record() is True
    assert tape_may_record() is False


def test_tapes_may_take_higher_order_only_for_a_persistent_tape_or_several():
    import tensorflow as tf

    from cascade_cli.keras_internals import tapes_may_take_higher_order

    v = tf.Variable(2.0)
    with tf.GradientTape():
        assert tapes_may_take_higher_order([tf.convert_to_tensor(v)]) is False  # one tape: first order only
        with tf.GradientTape():
            assert tapes_may_take_higher_order([tf.convert_to_tensor(v)]) is True
    with tf.GradientTape(persistent=True):
        assert tapes_may_take_higher_order([tf.convert_to_tensor(v)]) is True
        assert tapes_may_take_higher_order([tf.constant(1.0)]) is False  # a tensor no tape watches


def test_keras_builds_a_model_from_its_first_batch_through_maybe_symbolic_build():
    # `CascadeModel._maybe_symbolic_build` overrides this private method (a distributed first batch that does not
    # split evenly): it must still exist, take these arguments, and be what `fit` calls before the first step.
    import inspect

    from cascade_cli.train.keras_model import CascadeModel

    assert list(inspect.signature(keras.Model._maybe_symbolic_build).parameters) == ["self", "iterator", "data_batch"]
    from keras.src.backend.tensorflow import trainer

    assert "_maybe_symbolic_build" in inspect.getsource(trainer.TensorFlowTrainer.fit)
    assert CascadeModel._maybe_symbolic_build is not keras.Model._maybe_symbolic_build
