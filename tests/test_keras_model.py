"""Tests for cascade_cli.keras_model: CascadeModel's save / load, fit, callbacks and predict."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from cascade_cli.errors import ParameterError
from cascade_cli.keras_model import CascadeModel
from cascade_cli.options import StopRule
from cascade_cli.result import CascadeResult
from test_training import penalty_by_hand, regularized_models

STEPS = np.array([[2, 0, 3], [1, 2, 0], [0, 0, 1], [3, 1, 2]])  # a zero row and zero pairs


def flat_of(ragged):
    return ragged.flat_values.numpy()


# ------------------------------------------------------------- save and load


@pytest.mark.parametrize("settings, steps", [
    (dict(state="reset"), STEPS),
    (dict(state="carry", max_steps=4, stop_rule=StopRule.norm(1.0)), None),
    (dict(state="reset", state_init="ir", max_steps=5, stop_rule=StopRule.token(1), exclude_stop_step=True), None),
])
def test_save_and_load_in_safe_mode_give_the_same_predict_bytes(tmp_path, settings, steps):
    b = builders.step_b(units=4) if settings.get("state_init") == "ir" else builders.step_b()
    model = CascadeModel(builders.model_a(), b, **settings)
    x = builders.inputs(4, 3)
    before = model.predict(x, steps)
    model.save(tmp_path / "g.keras")
    loaded = keras.saving.load_model(tmp_path / "g.keras")  # safe mode, no custom_objects
    assert type(loaded) is CascadeModel
    assert loaded.settings == model.settings
    after = loaded.predict(x, steps)
    assert flat_of(after).tobytes() == flat_of(before).tobytes()
    np.testing.assert_array_equal(after.row_lengths(axis=2).numpy(), before.row_lengths(axis=2).numpy())


def test_predict_matches_the_eager_reference_and_keeps_ta_in_the_shape():
    model_a, model_b = builders.model_a(), builders.step_b("lstm")
    model = CascadeModel(model_a, model_b, state="carry")
    x = builders.inputs(4, 3)
    ragged = model.predict(x, STEPS, batch_size=3)  # batches of 3 and 1, unpadded
    assert ragged.shape.as_list() == [4, 3, None, 2]
    values, lengths = builders.reference(model_a, model_b, x, STEPS, state="carry")
    np.testing.assert_allclose(flat_of(ragged), values.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ragged.row_lengths(axis=2).numpy().reshape(4, 3), lengths)
    result = model.predict(x, STEPS[1], return_result=True)  # (Ta,) steps for every sample
    assert isinstance(result, CascadeResult)
    np.testing.assert_array_equal(result.lengths, np.broadcast_to(STEPS[1], (4, 3)))


def test_the_config_nests_both_models_and_the_stop_rule_as_a_dict():
    model = CascadeModel(builders.model_a(), builders.step_b(), max_steps=3, stop_rule=StopRule.token(0))
    config = model.get_config()
    assert config["stop_rule"] == {"kind": "token", "value": 0}
    assert config["model_a"]["class_name"] == "Functional" and config["model_b"]["class_name"] == "Functional"
    assert keras.saving.serialize_keras_object(model)["registered_name"] == "cascade_cli>CascadeModel"
    rebuilt = CascadeModel.from_config(config)
    assert rebuilt.settings["stop_rule"] == StopRule.token(0)


def test_a_lambda_inside_a_is_still_refused_in_safe_mode(tmp_path):
    inputs = keras.Input(shape=(None, 3))
    doubled = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    ir = keras.layers.GRU(4, return_sequences=True)(doubled)
    model = CascadeModel(keras.Model(inputs, ir), builders.step_b())
    model.save(tmp_path / "g.keras")
    with pytest.raises(ValueError, match="safe_mode"):
        keras.saving.load_model(tmp_path / "g.keras")
    loaded = keras.saving.load_model(tmp_path / "g.keras", safe_mode=False)
    x = builders.inputs(2, 3)
    assert flat_of(loaded.predict(x, [1, 2, 0])).tobytes() == flat_of(model.predict(x, [1, 2, 0])).tobytes()


def test_predict_refuses_missing_steps_and_bad_settings_by_their_python_names():
    model = CascadeModel(builders.model_a(), builders.step_b())
    with pytest.raises(ParameterError, match="^steps: required unless max_steps is set"):
        model.predict(builders.inputs(2, 3))
    with pytest.raises(ParameterError, match="^batch_size: expected a positive integer, received 0"):
        model.predict(builders.inputs(2, 3), [1, 1, 1], batch_size=0)


# ------------------------------------------------------------------- fit


def training_arrays(n=5, outer=3, output_size=2, longest=4, seed=0):
    """`(inputs, steps, flat targets, padded targets)`; the padding is NaN, which the loss must never see."""
    rng = np.random.default_rng(seed)
    inputs = builders.inputs(n, outer, seed=seed)
    steps = rng.integers(0, 4, size=(n, outer))
    steps[0, 1] = 0
    flat = rng.normal(size=(int(steps.sum()), output_size)).astype("float32")
    padded = np.full((n, outer, longest, output_size), np.nan, np.float32)
    padded[np.arange(longest)[None, None, :] < steps[..., None]] = flat  # C order = value order
    return inputs, steps, flat, padded


def reference_step(models, inputs, steps, targets, *, state="reset", penalty=None, lr=0.1):
    """`(loss, {id(variable): w - lr * grad})` of the eager reference, every valid element by hand."""
    model_a, model_b = models
    variables = model_a.trainable_variables + model_b.trainable_variables
    with tf.GradientTape() as tape:
        values, _ = builders.reference(model_a, model_b, inputs, steps, state=state)
        loss = tf.reduce_sum(tf.square(values - targets)) / targets.size
        if penalty is not None:
            loss = loss + penalty(model_a, model_b)
    grads = tape.gradient(loss, variables)
    return float(loss), [v.numpy() - lr * g.numpy() for v, g in zip(variables, grads)]


@pytest.mark.parametrize("kind, state, regularized", [("gru", "reset", False), ("lstm", "carry", False),
                                                      ("gru", "reset", True)])
def test_one_sgd_step_through_fit_is_w_minus_lr_times_the_reference_gradient(kind, state, regularized):
    inputs, steps, flat, padded = training_arrays()
    make = regularized_models if regularized else (lambda: (builders.model_a(), builders.step_b(kind)))
    loss, expected = reference_step(make(), inputs, steps, flat, state=state,
                                    penalty=penalty_by_hand if regularized else None)
    model = CascadeModel(*make(), state=state)
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    before = [w.numpy() for w in model.trainable_variables]
    history = model.fit((inputs, steps), padded, batch_size=len(inputs), epochs=1, shuffle=False, verbose=0)
    assert history.history["loss"][0] == pytest.approx(loss, rel=1e-5)
    assert len(expected) == len(model.trainable_variables)
    for start, variable, wanted in zip(before, model.trainable_variables, expected):
        assert not np.allclose(start, wanted)  # the step moved it
        np.testing.assert_allclose(variable.numpy(), wanted, rtol=1e-4, atol=1e-6)


def test_the_regularizers_move_the_step():
    inputs, steps, flat, _ = training_arrays()
    _, plain = reference_step(regularized_models(), inputs, steps, flat)
    _, penalized = reference_step(regularized_models(), inputs, steps, flat, penalty=penalty_by_hand)
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, penalized)) > 1e-2  # far past the tolerance


def test_a_dataset_a_loss_object_and_metrics_give_the_history_keras_users_expect():
    inputs, steps, flat, padded = training_arrays(n=6)
    histories, weights = [], []
    for data, loss in (("arrays", "mse"), ("dataset", keras.losses.MeanSquaredError())):
        model = CascadeModel(builders.model_a(), builders.step_b())
        model.compile(keras.optimizers.SGD(0.1), loss=loss, metrics=["mae"])
        if data == "arrays":
            history = model.fit((inputs[:4], steps[:4]), padded[:4], batch_size=2, epochs=2, shuffle=False,
                                validation_data=((inputs[4:], steps[4:]), padded[4:]), verbose=0)
        else:
            train = tf.data.Dataset.from_tensor_slices(((inputs[:4], steps[:4]), padded[:4])).batch(2)
            val = tf.data.Dataset.from_tensor_slices(((inputs[4:], steps[4:]), padded[4:])).batch(2)
            history = model.fit(train, epochs=2, validation_data=val, shuffle=False, verbose=0)
        histories.append(history.history)
        weights.append(model.get_weights())
    assert sorted(histories[0]) == ["loss", "mae", "val_loss", "val_mae"]
    for key in histories[0]:
        np.testing.assert_allclose(histories[0][key], histories[1][key], rtol=1e-6)
    for left, right in zip(*weights):
        np.testing.assert_allclose(left, right, rtol=1e-6)
    # val_loss after the last epoch: the loss of the trained models over the held-out valid elements
    model_a, model_b = model.model_a, model.model_b
    values, _ = builders.reference(model_a, model_b, inputs[4:], steps[4:])
    rows = flat[int(steps[:4].sum()):]
    assert histories[0]["val_loss"][-1] == pytest.approx(float(np.mean(np.square(values.numpy() - rows))), rel=1e-5)
    assert histories[0]["val_mae"][-1] == pytest.approx(float(np.mean(np.abs(values.numpy() - rows))), rel=1e-5)
    assert model.evaluate(val, verbose=0, return_dict=True)["loss"] == pytest.approx(histories[0]["val_loss"][-1],
                                                                                      rel=1e-5)


@pytest.mark.parametrize("loss, by_hand", [
    ("mae", lambda v, t: np.mean(np.abs(v - t))),
    ("categorical_crossentropy",
     lambda v, t: np.mean(-np.sum(t * (v - np.log(np.sum(np.exp(v), -1, keepdims=True))), -1))),
])
def test_evaluate_takes_the_named_loss_over_the_valid_elements(loss, by_hand):
    inputs, steps, flat, padded = training_arrays()
    if loss == "categorical_crossentropy":
        flat = np.eye(2, dtype=np.float32)[np.arange(len(flat)) % 2]
        padded[np.arange(4)[None, None, :] < steps[..., None]] = flat
    model = CascadeModel(builders.model_a(), builders.step_b())
    model.compile("sgd", loss=loss)
    values, _ = builders.reference(model.model_a, model.model_b, inputs, steps)
    score = model.evaluate((inputs, steps), padded, batch_size=2, verbose=0)
    assert score == pytest.approx(float(by_hand(values.numpy(), flat)), rel=1e-5)


def test_compile_refuses_an_unknown_loss_by_its_python_name():
    model = CascadeModel(builders.model_a(), builders.step_b())
    with pytest.raises(ParameterError, match="^loss: expected one of mse, mae, categorical_crossentropy"):
        model.compile("sgd", loss="hinge")
