"""CascadeModel with a feedback-form B: save / load, teacher-forced fit, sampled tokens in predict and serving.

Every check is against the independent eager loop of test_feedback (B called on one row and one inner step at
a time, fed its own sampled output or, teacher-forced, the target of the step before).
"""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from cascade_cli.train.keras_model import CascadeModel, export_saved_model
from cascade_cli.options import Sampler, StopRule
from test_feedback import O, STEPS, models, reference
from test_keras_model import SERVE, training_arrays

X = builders.inputs(3, 4)


def feedback_model(**settings):
    return CascadeModel(*models(), feedback=True, jit_compile=False, **settings)


SAVE_CASES = [
    dict(state="reset", sampler="greedy", feedback_start="token:1"),
    dict(state="carry", feedback_start="previous", sampler=Sampler.categorical(temperature=0.8, top_k=2), seed=7),
    dict(state="reset", feedback_start="previous", sampler="greedy", max_steps=5, stop_rule=StopRule.token(0),
         exclude_stop_step=True),
    dict(state="carry", sampler="identity", max_steps=3, stop_rule=StopRule.norm(1.5)),
]


# quick: the first three; the fourth (carry, identity, a norm stop) is test_keras_model's quick carry and norm stop case
# of test_save_and_load_in_safe_mode_give_the_same_predict_bytes with a feedback B, saved through the same settings
@pytest.mark.parametrize("settings", [*SAVE_CASES[:3], pytest.param(SAVE_CASES[3], marks=pytest.mark.slow)])
def test_save_and_load_in_safe_mode_give_the_same_predict_bytes_and_tokens(tmp_path, settings):
    model = feedback_model(**settings)
    steps = None if "max_steps" in settings else STEPS
    before = model.predict(X, steps, batch_size=2, return_result=True)
    assert before.total > 0
    model.save(tmp_path / "g.keras")
    loaded = keras.saving.load_model(tmp_path / "g.keras")  # safe mode, no custom_objects
    assert type(loaded) is CascadeModel and loaded.settings == model.settings
    assert loaded.cascade.feedback and loaded.cascade.sampler == model.cascade.sampler
    after = loaded.predict(X, steps, batch_size=2, return_result=True)
    assert after.values.tobytes() == before.values.tobytes()
    np.testing.assert_array_equal(after.lengths, before.lengths)
    if model.cascade.sampler.tokens:
        assert after.tokens.tobytes() == before.tokens.tobytes()
    else:
        assert after.tokens is None and before.tokens is None


@pytest.mark.parametrize("state", ["reset", "carry"])
def test_predict_carries_the_greedy_tokens_of_the_eager_reference(state):
    model = feedback_model(state=state, sampler="greedy", feedback_start="previous")
    result = model.predict(X, STEPS, batch_size=2, return_result=True)  # batches of 2 and 1
    values, lengths, tokens = reference(model.model_a, model.model_b, X, STEPS, state=state, start="previous",
                                        sampler="greedy")
    np.testing.assert_array_equal(result.lengths, lengths)
    np.testing.assert_allclose(result.values, values.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.tokens, tokens)
    assert result.tokens.dtype == np.int64
    ragged = model.predict(X, STEPS)  # the ragged tensor holds the values
    np.testing.assert_allclose(ragged.flat_values.numpy(), result.values, rtol=1e-6, atol=1e-7)


def test_categorical_draws_do_not_depend_on_the_batch_size():
    model = feedback_model(sampler=Sampler.categorical(), seed=3, feedback_start="previous", state="carry")
    x, steps = builders.inputs(7, 4, seed=1), np.full((7, 4), 3)
    results = [model.predict(x, steps, batch_size=size, return_result=True) for size in (1, 3, 7)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.tokens, results[0].tokens)
        np.testing.assert_array_equal(other.lengths, results[0].lengths)
        np.testing.assert_allclose(other.values, results[0].values, rtol=1e-5, atol=1e-6)  # matmul rounding
    reseeded = feedback_model(sampler=Sampler.categorical(), seed=4, feedback_start="previous", state="carry")
    assert not np.array_equal(reseeded.predict(x, steps, return_result=True).tokens, results[0].tokens)


def test_identity_feedback_predicts_no_tokens():
    result = feedback_model().predict(X, STEPS, return_result=True)
    values, _, _ = reference(*models(), X, STEPS)
    np.testing.assert_allclose(result.values, values.numpy(), rtol=1e-5, atol=1e-6)
    assert result.tokens is None


# ------------------------------------------------------------------- fit

SGD_CASES = [("reset", "zeros", "mse"), ("carry", "previous", "mse"), ("reset", "token:1", "sparse")]


@pytest.mark.parametrize("state, start, loss", SGD_CASES)
def test_one_teacher_forced_sgd_step_through_fit_is_w_minus_lr_times_the_reference_gradient(state, start, loss):
    inputs, steps, flat, padded = training_arrays(n=4, outer=3, output_size=O)
    if loss == "sparse":  # token ids, padded (N, Ta, L) with -1 past the steps; fed back as their one-hot
        ids = np.arange(len(flat)) % O
        flat = np.eye(O, dtype=np.float32)[ids]
        padded = np.full(steps.shape + (4,), -1, np.int64)
        padded[np.arange(4)[None, None, :] < steps[..., None]] = ids
    lr = 0.1
    ref_a, ref_b = models()
    variables = ref_a.trainable_variables + ref_b.trainable_variables
    with tf.GradientTape() as tape:
        values, _, _ = reference(ref_a, ref_b, inputs, steps, state=state, start=start, targets=flat)
        if loss == "mse":
            expected_loss = tf.reduce_mean(tf.square(values - flat))
        else:
            expected_loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=flat, logits=values))
    grads = tape.gradient(expected_loss, variables)
    expected = [v.numpy() - lr * g.numpy() for v, g in zip(variables, grads)]

    model = feedback_model(state=state, feedback_start=start, sampler="greedy")  # the sampler is not used
    model.compile(keras.optimizers.SGD(lr), loss="mse" if loss == "mse" else "sparse_categorical_crossentropy")
    before = [w.numpy() for w in model.trainable_variables]
    history = model.fit((inputs, steps), padded, batch_size=len(inputs), epochs=1, shuffle=False, verbose=0)
    assert history.history["loss"][0] == pytest.approx(float(expected_loss), rel=1e-5)
    assert len(expected) == len(model.trainable_variables)
    for start_value, variable, wanted in zip(before, model.trainable_variables, expected):
        assert not np.allclose(start_value, wanted)  # the step moved it
        np.testing.assert_allclose(variable.numpy(), wanted, rtol=1e-4, atol=1e-6)


def test_evaluate_teacher_forces_and_differs_from_free_running():
    inputs, steps, flat, padded = training_arrays(n=4, outer=3, output_size=O)
    model = feedback_model(state="carry", feedback_start="previous")
    model.compile("sgd", loss="mse")
    forced, _, _ = reference(model.model_a, model.model_b, inputs, steps, state="carry", start="previous",
                             targets=flat)
    free, _, _ = reference(model.model_a, model.model_b, inputs, steps, state="carry", start="previous")
    score = model.evaluate((inputs, steps), padded, batch_size=2, verbose=0)
    assert score == pytest.approx(float(np.mean(np.square(forced.numpy() - flat))), rel=1e-5)
    assert score != pytest.approx(float(np.mean(np.square(free.numpy() - flat))), rel=1e-3)


# --------------------------------------------------------------- serving

SERVING = [dict(sampler="greedy", feedback_start="previous", state="carry"),
           dict(sampler=Sampler.categorical(temperature=0.9), seed=2, max_steps=4, stop_rule=StopRule.token(0))]


def serving_request(settings):
    return ({"inputs": X} if "max_steps" in settings else {"inputs": X, "steps": STEPS.astype(np.int32)})


# quick: the categorical sampler; the greedy one's tokens take the same signature, and test_keras_model's quick
# test_the_saved_model_signature_maps_inputs_and_steps_to_flat_values_and_lengths serves given steps in carry
@pytest.mark.parametrize("settings", [pytest.param(SERVING[0], marks=pytest.mark.slow), SERVING[1]])
def test_the_saved_model_of_a_sampler_serves_its_tokens(tmp_path, settings):
    model = feedback_model(**settings)
    export_saved_model(model, tmp_path / "saved")
    serve = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    request = serving_request(settings)
    response = serve(**{key: tf.constant(value) for key, value in request.items()})
    assert sorted(response) == ["flat_values", "lengths", "tokens"]
    expected = model.predict(X, request.get("steps"), batch_size=2, return_result=True)
    assert expected.total > 0
    np.testing.assert_array_equal(response["lengths"].numpy(), expected.lengths)
    np.testing.assert_array_equal(response["tokens"].numpy(), expected.tokens)
    np.testing.assert_allclose(response["flat_values"].numpy(), expected.values, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # an export and a fresh TensorFlow process: about 10-20 s on 2 cores
def test_the_saved_model_of_a_sampler_serves_tokens_where_cascade_cli_cannot_be_imported(tmp_path):
    settings = SERVING[1]
    model = feedback_model(**settings)
    export_saved_model(model, tmp_path / "saved")
    request = serving_request(settings)
    np.savez(tmp_path / "request.npz", **request)
    done = subprocess.run([sys.executable, "-I", "-c", SERVE], cwd=tmp_path, capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    response = np.load(tmp_path / "response.npz")
    expected = model.predict(X, None, return_result=True)
    assert sorted(response) == ["flat_values", "lengths", "tokens"]
    np.testing.assert_array_equal(response["lengths"], expected.lengths)
    np.testing.assert_array_equal(response["tokens"], expected.tokens)
    np.testing.assert_allclose(response["flat_values"], expected.values, rtol=1e-6, atol=1e-7)
