"""Tests for cascade_cli.train.keras_model: CascadeModel's save / load, fit, callbacks and predict."""

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from cascade_cli.errors import DataError, ParameterError
from cascade_cli.train.keras_model import CascadeModel, export_saved_model
from cascade_cli.options import StopRule
from cascade_cli.result import CascadeResult
from test_training import penalty_by_hand, regularized_models

STEPS = np.array([[2, 0, 3], [1, 2, 0], [0, 0, 1], [3, 1, 2]])  # a zero row and zero pairs


def flat_of(ragged):
    return ragged.flat_values.numpy()


# ------------------------------------------------------------- save and load


@pytest.mark.parametrize("settings, steps", [
    pytest.param(dict(state="reset"), STEPS, marks=pytest.mark.slow),
    (dict(state="carry", max_steps=4, stop_rule=StopRule.norm(1.0)), None),
    (dict(state="reset", max_steps=4, stop_rule=StopRule.gate(0.6), min_steps=1), None),  # B's last column a gate
    pytest.param(dict(state="reset", state_init="ir", max_steps=5, stop_rule=StopRule.token(1),
                      exclude_stop_step=True), None, marks=pytest.mark.slow),
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


def test_the_defaults_are_the_runner_s_and_jit_compile_none_of_an_older_file_means_auto(tmp_path):
    import json
    import zipfile

    from cascade_cli.options import RUNNER_DEFAULTS, Sampler

    model = CascadeModel(builders.model_a(), builders.step_b())
    settings = model.settings
    assert settings["sampler"] == Sampler.coerce(RUNNER_DEFAULTS["sampler"])
    assert {name: value for name, value in settings.items() if name != "sampler"} == {
        name: RUNNER_DEFAULTS[name] for name in settings if name != "sampler"}
    assert settings["jit_compile"] == "auto"
    model.save(tmp_path / "new.keras")
    with zipfile.ZipFile(tmp_path / "new.keras") as new, zipfile.ZipFile(tmp_path / "old.keras", "w") as old:
        for item in new.infolist():  # a generator written when CascadeModel's default was jit_compile=None
            data = new.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                assert config["config"]["jit_compile"] == "auto"
                config["config"]["jit_compile"] = None
                data = json.dumps(config).encode("utf-8")
            old.writestr(item, data)
    loaded = keras.saving.load_model(tmp_path / "old.keras")
    assert loaded.settings["jit_compile"] == "auto"
    x = builders.inputs(4, 3)
    assert flat_of(loaded.predict(x, STEPS)).tobytes() == flat_of(model.predict(x, STEPS)).tobytes()


FRESH_LOAD = """
import sys
import keras
{imports}
try:
    model = keras.saving.load_model(sys.argv[1])  # safe mode, no custom_objects
except TypeError as error:
    print("refused:", str(error).split(".")[0])
else:
    print(type(model).__name__)
"""


@pytest.mark.slow  # 15-35 s on 2 cores; kept out of the default suite to hold it well under 15 minutes
@pytest.mark.parametrize("imports, expected", [
    ("from cascade_cli import CascadeModel", "CascadeModel"),
    ("import cascade_cli  # lazy: nothing registered", "refused: Could not locate class 'CascadeModel'"),
])
def test_a_fresh_process_loads_a_generator_once_cascade_model_is_imported(tmp_path, imports, expected):
    CascadeModel(builders.model_a(), builders.step_b(), fast_cells=False).save(tmp_path / "g.keras")
    done = subprocess.run([sys.executable, "-c", FRESH_LOAD.format(imports=imports), str(tmp_path / "g.keras")],
                          capture_output=True, text=True, check=False, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == expected


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


def test_calling_the_model_runs_the_cascade_on_inputs_and_steps():
    model = CascadeModel(builders.model_a(), builders.step_b())
    x = builders.inputs(4, 3)
    ragged = model((x, STEPS))
    assert isinstance(ragged, tf.RaggedTensor) and ragged.shape.as_list() == [4, 3, None, 2]
    np.testing.assert_allclose(flat_of(ragged), flat_of(model.predict(x, STEPS)), rtol=1e-6, atol=1e-7)


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


# Slow: in the default suite test_train_cli's test_cascade_train_s_step_is_cascade_model_fit_s_step_and_w_minus_lr_
# times_the_reference_gradient[False-None] and [True-0.05] check CascadeModel.fit's one SGD step on NaN-padded
# arrays (gru A and B, reset; plain, and regularized with clipnorm) bit for bit against the command's step,
# whose loss and weights they check against this same eager reference
@pytest.mark.slow
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


def test_a_frozen_a_keeps_its_weights_the_keras_way():
    inputs, steps, _, padded = training_arrays()
    model = CascadeModel(builders.model_a(), builders.step_b())
    model.model_a.trainable = False
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    a_before, b_before = model.model_a.get_weights(), model.model_b.get_weights()
    model.fit((inputs, steps), padded, batch_size=len(inputs), epochs=1, shuffle=False, verbose=0)
    for before, after in zip(a_before, model.model_a.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert all(not np.array_equal(before, after) for before, after in zip(b_before, model.model_b.get_weights()))


def test_the_regularizers_move_the_step():
    inputs, steps, flat, _ = training_arrays()
    _, plain = reference_step(regularized_models(), inputs, steps, flat)
    _, penalized = reference_step(regularized_models(), inputs, steps, flat, penalty=penalty_by_hand)
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, penalized)) > 1e-2  # far past the tolerance


@pytest.mark.slow  # four fits and evaluations: about 15-25 s on 2 cores
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


@pytest.mark.slow  # two fits, a save and a load: about 15-25 s on 2 cores
@pytest.mark.parametrize("loss", ["mae", keras.losses.MeanSquaredError()])
def test_a_saved_compiled_model_loads_compiled_and_trains_on_as_the_original(tmp_path, loss):
    inputs, steps, _, padded = training_arrays()
    model = CascadeModel(builders.model_a(), builders.step_b())
    model.compile(keras.optimizers.Adam(0.01), loss=loss, metrics=["mse"])
    model.fit((inputs, steps), padded, batch_size=2, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "g.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras warns when it cannot compile a custom compile()
        loaded = keras.saving.load_model(tmp_path / "g.keras")
    assert type(loaded.optimizer) is keras.optimizers.Adam and int(loaded.optimizer.iterations) == 3
    again = [m.fit((inputs, steps), padded, batch_size=2, epochs=1, shuffle=False, verbose=0).history
             for m in (model, loaded)]
    assert again[0] == again[1]  # the optimizer's slots came back too
    for left, right in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(left, right)


def test_sparse_crossentropy_reads_padded_token_ids_and_detects_a_softmax_b():
    inputs, steps, flat, _ = training_arrays()
    ids = np.arange(len(flat)) % 2
    padded = np.full(steps.shape + (4,), -1, np.int64)  # ids past steps are never read
    padded[np.arange(4)[None, None, :] < steps[..., None]] = ids
    model_b = builders.step_b()
    softmax_b = keras.Model(model_b.inputs, [keras.layers.Softmax()(model_b.outputs[0]), *model_b.outputs[1:]])
    for b, to_probabilities in ((model_b, lambda v: np.exp(v) / np.exp(v).sum(-1, keepdims=True)),
                                (softmax_b, lambda v: np.clip(v, 1e-7, 1 - 1e-7))):
        model = CascadeModel(builders.model_a(), b)
        model.compile("sgd", loss="sparse_categorical_crossentropy")  # from_logits detected from B
        values, _ = builders.reference(model.model_a, b, inputs, steps)
        by_hand = -np.mean(np.log(to_probabilities(values.numpy())[np.arange(len(ids)), ids]))
        score = model.evaluate((inputs, steps), padded, batch_size=len(inputs), verbose=0)
        assert score == pytest.approx(float(by_hand), rel=1e-5)


def test_compile_refuses_an_unknown_loss_by_its_python_name():
    model = CascadeModel(builders.model_a(), builders.step_b())
    with pytest.raises(ParameterError, match="^loss: expected one of mse, mae, categorical_crossentropy, "
                                             "sparse_categorical_crossentropy or a keras.losses.Loss"):
        model.compile("sgd", loss="hinge")


# ------------------------------------------------------------- callbacks


def fit_tiny(callbacks, *, epochs=3, model=None, validate=False):
    """A fresh seeded CascadeModel fit on 4 samples in batches of 2 (validated on 2); returns `(model, history)`."""
    inputs, steps, _, padded = training_arrays(n=6)
    model = model or CascadeModel(builders.model_a(), builders.step_b())
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    validation = ((inputs[4:], steps[4:]), padded[4:]) if validate else None
    history = model.fit((inputs[:4], steps[:4]), padded[:4], batch_size=2, epochs=epochs, shuffle=False,
                        validation_data=validation, callbacks=callbacks, verbose=0)
    return model, history


def test_one_epoch_on_a_streamed_dataset_equals_the_same_epoch_on_the_arrays(tmp_path):
    from cascade_cli.data import dataset
    from filetools import write_h5

    inputs, steps, flat, padded = training_arrays(n=5)
    path = write_h5(tmp_path / "train.h5", inputs=inputs, steps=steps, targets=flat)
    weights = []
    for data in ("arrays", "dataset"):
        model = CascadeModel(builders.model_a(), builders.step_b())
        model.compile(keras.optimizers.Adam(0.05), loss="mse", jit_compile=False)
        if data == "arrays":  # padded to the longest steps of all, NaN past them
            history = model.fit((inputs, steps), padded, batch_size=2, epochs=1, shuffle=False, verbose=0)
        else:  # padded to each batch's own longest steps, read a batch at a time
            history = model.fit(dataset(path, batch_size=2, shuffle=False), epochs=1, shuffle=False, verbose=0)
        weights.append(([w.numpy() for w in model.weights], history.history["loss"]))
    (arrays_weights, arrays_loss), (dataset_weights, dataset_loss) = weights
    assert arrays_loss == dataset_loss
    assert not np.array_equal(arrays_weights[0], builders.model_a().get_weights()[0])  # three steps moved it
    for left, right in zip(arrays_weights, dataset_weights):
        np.testing.assert_array_equal(left, right)


def test_early_stopping_restores_the_best_weights():
    kept = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: kept.append(model.get_weights()))
    # mode="max" on a falling training loss: epoch 1 is the best, epoch 2 runs out of patience
    stop = keras.callbacks.EarlyStopping(monitor="loss", mode="max", patience=1, restore_best_weights=True)
    model = CascadeModel(builders.model_a(), builders.step_b())
    _, history = fit_tiny([record, stop], epochs=5, model=model)
    assert len(history.history["loss"]) == 2 and history.history["loss"][1] < history.history["loss"][0]
    assert stop.stopped_epoch == 1
    for now, best, last in zip(model.get_weights(), kept[0], kept[1]):
        np.testing.assert_array_equal(now, best)
    assert any(not np.array_equal(best, last) for best, last in zip(kept[0], kept[1]))


@pytest.fixture(scope="module")
def logged_fit(tmp_path_factory):
    """One validated 2-epoch `fit_tiny` with ModelCheckpoint, TensorBoard and CSVLogger: `(folder, model, history)`.

    The three callbacks' tests read what this one fit wrote (one fit, not three; they watch different files)."""
    folder = tmp_path_factory.mktemp("logged_fit")
    callbacks = [keras.callbacks.ModelCheckpoint(str(folder / "checkpoints" / "epoch{epoch}.keras"))]
    if importlib.util.find_spec("tensorboard") is not None:  # tf.summary needs it
        callbacks.append(keras.callbacks.TensorBoard(str(folder / "logs")))
    callbacks.append(keras.callbacks.CSVLogger(str(folder / "history.csv")))
    model, history = fit_tiny(callbacks, epochs=2, validate=True)
    return folder, model, history


def test_model_checkpoint_writes_a_whole_generator_each_epoch_that_loads_in_safe_mode(logged_fit):
    folder, model, _ = logged_fit
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["epoch1.keras", "epoch2.keras"]
    loaded = keras.saving.load_model(folder / "checkpoints" / "epoch2.keras")
    x = builders.inputs(3, 3)
    assert flat_of(loaded.predict(x, STEPS[:3])).tobytes() == flat_of(model.predict(x, STEPS[:3])).tobytes()
    first = keras.saving.load_model(folder / "checkpoints" / "epoch1.keras")
    assert any(not np.array_equal(a, b) for a, b in zip(first.get_weights(), model.get_weights()))


@pytest.mark.slow  # three fits: about 12-35 s on 2 cores
def test_backup_and_restore_after_an_interruption_reaches_the_weights_of_an_unbroken_run(tmp_path):
    unbroken, _ = fit_tiny([], epochs=3)
    backup = str(tmp_path / "backup")
    with pytest.raises(KeyboardInterrupt):
        fit_tiny([keras.callbacks.BackupAndRestore(backup), builders.KillAfterEpoch(1)], epochs=3)
    epochs_run = []
    count = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: epochs_run.append(epoch))
    resumed, _ = fit_tiny([keras.callbacks.BackupAndRestore(backup), count], epochs=3)
    assert epochs_run == [2]  # only the epoch the interruption lost
    for left, right in zip(resumed.get_weights(), unbroken.get_weights()):
        np.testing.assert_array_equal(left, right)



@pytest.mark.slow  # three fits: about 15-30 s on 2 cores
def test_backup_and_restore_on_a_shuffled_dataset_resumes_with_the_epoch_s_own_order(tmp_path):
    """A resumed process streams a new `data.dataset`: its epoch 2 must visit epoch 2's order, not its first pass's."""
    from cascade_cli.data import dataset
    from filetools import write_h5

    inputs, steps, flat, _ = training_arrays(n=6)
    path = write_h5(tmp_path / "train.h5", inputs=inputs, steps=steps, targets=flat)

    def fit_streamed(callbacks):
        model = CascadeModel(builders.model_a(), builders.step_b())
        model.compile(keras.optimizers.Adam(0.05), loss="mse", jit_compile=False)
        model.fit(dataset(path, batch_size=2, seed=3), epochs=3, shuffle=False, callbacks=callbacks, verbose=0)
        return model

    unbroken = fit_streamed([])
    backup = str(tmp_path / "backup")
    with pytest.raises(KeyboardInterrupt):
        fit_streamed([keras.callbacks.BackupAndRestore(backup), builders.KillAfterEpoch(1)])
    resumed = fit_streamed([keras.callbacks.BackupAndRestore(backup)])  # a new dataset, as a new process makes
    for left, right in zip(resumed.get_weights(), unbroken.get_weights()):
        np.testing.assert_array_equal(left, right)

def test_tensorboard_event_files_hold_the_logged_scalars(logged_fit):
    pytest.importorskip("tensorboard")  # tf.summary needs it
    folder, _, history = logged_fit
    logged = {}
    for run in ("train", "validation"):
        for path in sorted((folder / "logs" / run).glob("events.out.tfevents.*")):
            for event in tf.compat.v1.train.summary_iterator(str(path)):
                for value in event.summary.value:
                    logged.setdefault((run, value.tag), []).append(float(tf.make_ndarray(value.tensor)))
    np.testing.assert_allclose(logged[("train", "epoch_loss")], history.history["loss"], rtol=1e-6)
    np.testing.assert_allclose(logged[("validation", "epoch_loss")], history.history["val_loss"], rtol=1e-6)


def test_csv_logger_writes_the_history(logged_fit):
    folder, _, history = logged_fit
    rows = np.genfromtxt(folder / "history.csv", delimiter=",", names=True)
    assert list(rows["epoch"]) == [0, 1]
    np.testing.assert_allclose(rows["loss"], history.history["loss"], rtol=1e-6)
    np.testing.assert_allclose(rows["val_loss"], history.history["val_loss"], rtol=1e-6)


def test_learning_rate_scheduler_sets_each_epochs_rate():
    scheduler = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 * 0.5 ** epoch)
    model, history = fit_tiny([scheduler], epochs=3)
    np.testing.assert_allclose(history.history["learning_rate"], [0.1, 0.05, 0.025], rtol=1e-6)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.025)


# --------------------------------------------------------------- serving

SERVE = """
import sys
sys.modules["cascade_cli"] = None  # as if cascade_cli were not installed
import numpy as np
import tensorflow as tf
arrays = dict(np.load("request.npz"))
serve = tf.saved_model.load("saved").signatures["serving_default"]
print(sorted(serve.structured_input_signature[1]))
out = serve(**{key: tf.constant(value) for key, value in arrays.items()})
np.savez("response.npz", **{key: value.numpy() for key, value in out.items()})
"""


SERVING_CASES = [(dict(state="carry"), STEPS), (dict(max_steps=4, stop_rule=StopRule.norm(1.0)), None)]


@pytest.mark.parametrize("settings, steps", [SERVING_CASES[0], pytest.param(*SERVING_CASES[1], marks=pytest.mark.slow)])
def test_the_saved_model_signature_maps_inputs_and_steps_to_flat_values_and_lengths(tmp_path, settings, steps):
    model = CascadeModel(builders.model_a(), builders.step_b(), **settings)
    x = builders.inputs(4, 3)
    export_saved_model(model, tmp_path / "saved")
    serve = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    request = {"inputs": tf.constant(x)}
    if steps is not None:
        request["steps"] = tf.constant(steps, tf.int32)
    assert sorted(serve.structured_input_signature[1]) == sorted(request)
    response = serve(**request)
    expected = model.predict(x, steps, return_result=True)
    np.testing.assert_array_equal(response["lengths"].numpy(), expected.lengths)
    np.testing.assert_allclose(response["flat_values"].numpy(), expected.values, rtol=1e-6, atol=1e-7)


def test_export_saved_model_refuses_a_folder_with_files_unless_overwrite(tmp_path):
    model = CascadeModel(builders.model_a(), builders.step_b())
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="already holds files; pass overwrite=True"):
        export_saved_model(model, tmp_path / "saved")
    with pytest.raises(ParameterError, match="^model: expected a CascadeModel, received Functional"):
        export_saved_model(model.model_a, tmp_path / "other")


@pytest.mark.slow
@pytest.mark.parametrize("settings, steps", SERVING_CASES)
def test_the_saved_model_serves_predicts_values_where_cascade_cli_cannot_be_imported(tmp_path, settings, steps):
    model = CascadeModel(builders.model_a(), builders.step_b(), **settings)
    x = builders.inputs(4, 3)
    export_saved_model(model, tmp_path / "saved")
    request = {"inputs": x} if steps is None else {"inputs": x, "steps": steps.astype(np.int32)}
    np.savez(tmp_path / "request.npz", **request)
    done = subprocess.run([sys.executable, "-I", "-c", SERVE], cwd=tmp_path, capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(sorted(request))
    response = np.load(tmp_path / "response.npz")
    expected = model.predict(x, steps, return_result=True)
    assert sorted(response) == ["flat_values", "lengths"]
    np.testing.assert_array_equal(response["lengths"], expected.lengths)
    np.testing.assert_allclose(response["flat_values"], expected.values, rtol=1e-6, atol=1e-7)


# ------------------------------------------------- mixed precision, strategies


def test_mixed_precision_follows_the_policy_and_takes_the_loss_in_float32(mixed_float16):
    inputs, steps, flat, padded = training_arrays()
    make = lambda: (builders.model_a(dtype=None), builders.step_b(dtype=None))
    ref_a, ref_b = make()
    values, _ = builders.reference(ref_a, ref_b, inputs, steps)
    assert values.dtype == tf.float16
    in_float32 = float(tf.reduce_mean(tf.square(tf.cast(values, tf.float32) - flat)))
    _, expected = reference_step((ref_a, ref_b), inputs, steps, flat)
    model = CascadeModel(*make())
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # Keras' own choice for the policy
    history = model.fit((inputs, steps), padded, batch_size=len(inputs), epochs=1, shuffle=False, verbose=0)
    assert history.history["loss"][0] == pytest.approx(in_float32, rel=1e-3)
    for variable, wanted in zip(model.trainable_variables, expected):
        assert variable.dtype == "float32"
        np.testing.assert_allclose(variable.numpy(), wanted, rtol=1e-2, atol=2e-3)


MIRRORED = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from test_keras_model import fit_mirrored_case
loss, weights = fit_mirrored_case(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), batch_size=int(sys.argv[2]))
np.savez(sys.argv[1], loss=loss, *weights)
"""


def fit_mirrored_case(strategy, *, batch_size=4):
    """One epoch of SGD on 12 samples in global batches of `batch_size` (4: 2 per replica; 5: 3 and 2, the last
    batch 1 and 1; unequal valid counts, one sample emitting nothing), regularized models built in
    `strategy.scope()`; returns `(loss, weights)`."""
    inputs, steps, _, padded = training_arrays(n=12)
    steps[3] = 0
    padded[3] = np.nan
    with strategy.scope():
        model = CascadeModel(*regularized_models())
        model.compile(keras.optimizers.SGD(0.1), loss="mse")
    history = model.fit((inputs, steps), padded, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return history.history["loss"][0], model.get_weights()


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [4, 5])  # 5: the first global batch splits 3 and 2 (Keras 3.15 refused it)
def test_a_mirrored_fit_over_two_replicas_equals_one_device_the_loss_over_the_global_count(tmp_path, batch_size):
    loss, weights = fit_mirrored_case(tf.distribute.get_strategy(), batch_size=batch_size)
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    done = subprocess.run([sys.executable, "-c", MIRRORED, str(tmp_path / "mirrored.npz"), str(batch_size)], env=env,
                          capture_output=True, text=True, check=False, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    mirrored = np.load(tmp_path / "mirrored.npz")
    assert float(mirrored["loss"]) == pytest.approx(loss, rel=1e-5)
    assert len(weights) == len(mirrored) - 1
    for i, expected in enumerate(weights):
        np.testing.assert_allclose(mirrored[f"arr_{i}"], expected, rtol=0, atol=1e-5)
