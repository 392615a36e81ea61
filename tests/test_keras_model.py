"""Tests for cascade_cli.keras_model: CascadeModel's save / load, fit, callbacks and predict."""

import keras
import numpy as np
import pytest

import builders
from cascade_cli.errors import ParameterError
from cascade_cli.keras_model import CascadeModel
from cascade_cli.options import StopRule
from cascade_cli.result import CascadeResult

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
