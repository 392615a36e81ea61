"""Truncated backpropagation through time (issue 32, training): `CascadeModel(..., window=W).fit`.

The oracle is an eager reference written here, independent of cascade's runner: a plain Python loop over the
windows of each batch that calls the state-form model A on the window with A's carried states, then B step by step
per (sample, outer step, inner step) with B's carried state (carry mode), takes the masked mean squared error of
the window under a `tf.GradientTape` and a plain SGD update (`var.assign_sub(lr * g)`); the carried states are
numpy copies (no gradient through them), and a window without a valid element takes no step.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cascade_cli.errors import ModelError, ParameterError
from cascade_cli.train.keras_model import CascadeModel
from tests import builders

LR = 0.1
N, TA, F, H, O = 5, 7, 3, 4, 2


def state_a(*, units=H, seed=0):
    """A in state form: `[x (batch, Ta, F), s] -> [ir (batch, Ta, H), s']` (a GRU)."""
    x = keras.Input(shape=(None, F))
    s = keras.Input(shape=(units,))
    ir, s_out = keras.layers.GRU(units, return_sequences=True, return_state=True,
                                 kernel_initializer=builders.init(seed), recurrent_initializer=builders.init(seed + 1),
                                 bias_initializer=builders.init(seed + 2))(x, initial_state=[s])
    return keras.Model([x, s], [ir, s_out], name="a_state")


def models():
    return state_a(), builders.step_b(ir_size=H, output_size=O)


def arrays(seed=0):
    """`(inputs (N, TA, F), steps (N, TA), padded targets (N, TA, 4, O))`; padding NaN, which no loss may see.

    Samples 0 and 1 (the first batch of 2) run no inner step in outer steps 3..5: with `window=3` their second
    window has no valid element.
    """
    rng = np.random.default_rng(seed)
    inputs = builders.inputs(N, TA, F, seed=seed)
    steps = rng.integers(0, 4, size=(N, TA))
    steps[:2, 3:6] = 0
    steps[4, 6] = 1  # the last batch (sample 4 alone) has an element in its last window
    padded = np.full((N, TA, 4, O), np.nan, np.float32)
    valid = np.arange(4)[None, None, :] < steps[..., None]
    padded[valid] = rng.normal(size=(int(steps.sum()), O)).astype(np.float32)
    return inputs, steps, padded


def reference_fit(model_a, model_b, inputs, steps, padded, *, window, batch_size, lr=LR, feedback=False):
    """Trains `model_a` and `model_b` in place, one epoch, batches in order.

    `feedback`: B is in feedback form, teacher-forced: fed zeros at each pair's first inner step, then the
    target of the step before.

    Returns:
        `(loss, elements)` of each window that took a step (an SGD update).
    """
    variables = model_a.trainable_variables + model_b.trainable_variables
    a_size, b_size = int(model_a.inputs[1].shape[-1]), int(model_b.inputs[-1].shape[-1])
    taken = []
    for first in range(0, len(inputs), batch_size):
        x, s, y = (array[first:first + batch_size] for array in (inputs, steps, padded))
        a_state = np.zeros((len(x), a_size), np.float32)
        b_states = [np.zeros((1, b_size), np.float32) for _ in range(len(x))]  # carry mode: one per sample
        for start in range(0, x.shape[1], window):
            stop = min(start + window, x.shape[1])
            with tf.GradientTape() as tape:
                ir, a_out = model_a([tf.constant(x[:, start:stop]), tf.constant(a_state)])
                total, rows, b_out = tf.constant(0.0), 0, []
                for n in range(len(x)):
                    state = tf.constant(b_states[n])
                    for t in range(start, stop):
                        for j in range(s[n, t]):
                            prev = np.zeros((1, O), np.float32) if j == 0 else y[n, t, j - 1][None]
                            fed = [tf.constant(prev)] if feedback else []
                            out, state = model_b([ir[n:n + 1, t - start], *fed, state])
                            total += tf.reduce_sum(tf.square(out[0] - y[n, t, j]))
                            rows += 1
                    b_out.append(state.numpy())
                loss = total / (rows * O) if rows else None
            if rows:  # a window without a valid element takes no step
                for variable, grad in zip(variables, tape.gradient(loss, variables)):
                    variable.assign_sub(lr * grad)
                taken.append((float(loss), rows * O))
            a_state, b_states = a_out.numpy(), b_out  # carried on, detached
    return taken


def window_fit(window, *, batch_size=2, epochs=1, optimizer=None, callbacks=(), data=None, **settings):
    model = CascadeModel(*models(), state="carry", window=window, **settings)
    model.compile(optimizer or keras.optimizers.SGD(LR), loss="mse")
    inputs, steps, padded = arrays() if data is None else data
    model.fit((inputs, steps), padded, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0,
              callbacks=list(callbacks))
    return model


def assert_weights_close(got, want, rtol=1e-4):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1.0, float(np.abs(w).max())))


# ------------------------------------------------------------------ the reference


def trained(model_a, model_b):
    return [v.numpy() for v in model_a.trainable_variables + model_b.trainable_variables]


@pytest.fixture(scope="module")
def reference():
    """`(weights before, weights after, windows taken)` of the reference's epoch, windows of 3, batches of 2."""
    model_a, model_b = models()
    before = trained(model_a, model_b)
    taken = reference_fit(model_a, model_b, *arrays(), window=3, batch_size=2)
    return before, trained(model_a, model_b), taken


@pytest.fixture(scope="module")
def whole():
    """The weights of one epoch of the ordinary fit (no window)."""
    model = window_fit(None)
    return trained(model.model_a, model.model_b)


def test_the_reference_takes_a_step_per_window_with_valid_elements(reference):
    """3 batches (2, 2, 1 samples) in windows [0, 3), [3, 6), [6, 7): 9 windows, the first batch's second empty."""
    before, after, taken = reference
    assert len(taken) == 8
    assert not np.allclose(np.concatenate([w.ravel() for w in after]), np.concatenate([b.ravel() for b in before]))


def test_one_epoch_in_windows_equals_the_eager_reference(reference):
    _, want, taken = reference
    model = window_fit(3)
    assert int(model.optimizer.iterations.numpy()) == 8  # the empty window took no step
    losses, elements = np.array(taken).T  # the epoch's loss: the windows' losses weighed by their elements
    np.testing.assert_allclose(model.history.history["loss"][0], np.sum(losses * elements) / np.sum(elements),
                               rtol=1e-5)
    assert_weights_close(trained(model.model_a, model.model_b), want)


def test_whole_batch_steps_differ_from_windows(reference, whole):
    """The test above can fail: one step per batch (no window) is not what the reference takes."""
    assert not all(np.allclose(g, w, rtol=1e-3) for g, w in zip(whole, reference[1]))


def test_a_window_as_long_as_the_sequence_equals_the_ordinary_fit(whole):
    windowed = window_fit(TA)
    assert_weights_close(trained(windowed.model_a, windowed.model_b), whole, rtol=1e-5)


def test_the_loss_reported_is_the_mean_of_the_windows_weighed_by_their_elements():
    """Evaluate with a window: the loss over the whole sequence, each window run with the state carried."""
    inputs, steps, padded = arrays()
    model = CascadeModel(*models(), state="carry", window=3)
    model.compile(keras.optimizers.SGD(LR), loss="mse", metrics=["mae"])
    whole = CascadeModel(model.model_a, model.model_b, state="carry")
    whole.compile(keras.optimizers.SGD(LR), loss="mse", metrics=["mae"])
    got = model.evaluate((inputs, steps), padded, batch_size=2, verbose=0, return_dict=True)
    want = whole.evaluate((inputs, steps), padded, batch_size=2, verbose=0, return_dict=True)
    assert sorted(got) == sorted(want) == ["loss", "mae"]
    np.testing.assert_allclose([got["loss"], got["mae"]], [want["loss"], want["mae"]], rtol=1e-5)


def test_reset_mode_trains_in_windows():
    """Reset mode: only A's state is carried; one epoch equals a reference with B restarting at every pair."""
    inputs, steps, padded = arrays()
    model_a, model_b = models()
    b_size = int(model_b.inputs[1].shape[-1])
    variables = model_a.trainable_variables + model_b.trainable_variables
    for first in range(0, N, 2):
        x, s, y = (array[first:first + 2] for array in (inputs, steps, padded))
        a_state = np.zeros((len(x), H), np.float32)
        for start in range(0, TA, 4):
            stop = min(start + 4, TA)
            with tf.GradientTape() as tape:
                ir, a_out = model_a([tf.constant(x[:, start:stop]), tf.constant(a_state)])
                total, rows = tf.constant(0.0), 0
                for n in range(len(x)):
                    for t in range(start, stop):
                        state = tf.zeros((1, b_size))
                        for j in range(s[n, t]):
                            out, state = model_b([ir[n:n + 1, t - start], state])
                            total += tf.reduce_sum(tf.square(out[0] - y[n, t, j]))
                            rows += 1
                loss = total / max(rows * O, 1)
            if rows:
                for variable, grad in zip(variables, tape.gradient(loss, variables)):
                    variable.assign_sub(LR * grad)
            a_state = a_out.numpy()
    model = CascadeModel(*models(), state="reset", window=4)
    model.compile(keras.optimizers.SGD(LR), loss="mse")
    model.fit((inputs, steps), padded, batch_size=2, epochs=1, shuffle=False, verbose=0)
    assert_weights_close(model.model_a.trainable_variables + model.model_b.trainable_variables,
                         [v.numpy() for v in variables])


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("bad", [0, -2, 2.5, "3", True])
def test_bad_windows_are_refused(bad):
    with pytest.raises(ParameterError, match=r"^window: expected a positive integer"):
        CascadeModel(*models(), state="carry", window=bad)


def test_train_config_holds_a_window_for_the_command():
    from cascade_cli.options import TRAIN_DEFAULTS, TrainConfig

    assert TrainConfig(window=5).window == 5 and TRAIN_DEFAULTS["window"] is None
    assert TrainConfig().resolved().window is None
    with pytest.raises(ParameterError, match=r"^window: expected an integer in \[1, "):
        TrainConfig(window=0)


def test_settings_windows_cannot_train_are_refused_by_name():
    with pytest.raises(ParameterError, match=r"^window: .*sequence-form B in carry mode"):
        CascadeModel(state_a(), builders.sequence_b(ir_size=H), state="carry", window=3)
    with pytest.raises(ParameterError, match=r"^window: .*teacher forcing .* with feedback_start='previous'"):
        CascadeModel(state_a(), builders.feedback_b(ir_size=H), feedback=True, feedback_start="previous", window=3)


def test_a_stateful_a_is_still_refused():
    x = keras.Input(batch_shape=(2, None, F))
    stateful = keras.Model(x, keras.layers.GRU(H, return_sequences=True, stateful=True, name="memory")(x))
    with pytest.raises(ModelError, match=r"stateful=True layers \('memory'\).*state form"):
        CascadeModel(stateful, builders.step_b(ir_size=H), state="carry", window=3)


def test_the_window_round_trips_through_the_config_and_a_file(tmp_path):
    model = CascadeModel(*models(), state="carry", window=3)
    assert model.get_config()["window"] == 3 and model.window == 3
    assert CascadeModel.from_config(model.get_config()).window == 3
    assert CascadeModel(*models()).get_config()["window"] is None
    model.compile(keras.optimizers.SGD(LR), loss="mse")
    model.save(tmp_path / "g.keras")
    assert keras.saving.load_model(tmp_path / "g.keras").window == 3


# ------------------------------------------------------------------ resume


@pytest.mark.slow  # three fits of two epochs, each traced anew: about 40 s on 2 cores
def test_a_killed_windowed_fit_resumes_to_the_weights_of_an_unbroken_one(tmp_path):
    data = tuple(array[:4] for array in arrays())  # two batches of 2: one trace per fit

    def fit(callbacks=()):
        return window_fit(3, epochs=2, optimizer=keras.optimizers.Adam(0.05), data=data, callbacks=callbacks)

    unbroken = fit()
    backup = str(tmp_path / "backup")
    with pytest.raises(KeyboardInterrupt):
        fit([keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False), builders.KillAfterEpoch(0)])
    epochs = []
    resumed = fit([keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False),
                   keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: epochs.append(epoch))])
    assert epochs == [1]  # it went on from the backup of epoch 0
    assert int(resumed.optimizer.iterations.numpy()) == int(unbroken.optimizer.iterations.numpy()) == 10
    for got, want in zip(resumed.get_weights(), unbroken.get_weights()):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ feedback: teacher forcing in windows


@pytest.mark.parametrize("state, start", [  # carry: about 19 s (the whole teacher-forced run's gradient path)
    pytest.param("carry", "zeros", marks=pytest.mark.slow), ("reset", "token:1")])
def test_teacher_forced_windows_equal_the_whole_teacher_forced_run(state, start):
    from cascade_cli.run.cascade import Cascade

    inputs, steps, padded = arrays()
    cascade = Cascade(state_a(), builders.feedback_b(ir_size=H, output_size=O), state=state, feedback=True,
                      feedback_start=start)
    flat = padded[np.arange(4)[None, None, :] < steps[..., None]]
    whole, whole_lengths = cascade.run(inputs, steps, targets=flat)

    @tf.function  # as fit runs it (called eagerly with targets, a call with a state runs eagerly: slow)
    def in_windows():
        state_in, parts = None, []
        for first in range(0, TA, 3):
            s = steps[:, first:first + 3]
            window_flat = padded[:, first:first + 3][np.arange(4)[None, None, :] < s[..., None]]
            values, lengths, state_in = cascade.run(tf.constant(inputs[:, first:first + 3]), tf.constant(s),
                                                    targets=tf.constant(window_flat), initial_state=state_in,
                                                    return_state=True)
            parts.append((values, lengths))
        return parts

    parts = [(values.numpy(), lengths.numpy()) for values, lengths in in_windows()]
    owner = np.concatenate([np.repeat(np.arange(N), lengths.sum(axis=1)) for _, lengths in parts])
    joined = np.concatenate([values for values, _ in parts])[np.argsort(owner, kind="stable")]
    np.testing.assert_allclose(joined, whole, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([lengths for _, lengths in parts], axis=1), whole_lengths)


def test_a_teacher_forced_feedback_b_trains_in_windows_as_the_reference():
    inputs, steps, padded = arrays()
    model_a, model_b = state_a(), builders.feedback_b(ir_size=H, output_size=O)
    taken = reference_fit(model_a, model_b, inputs, steps, padded, window=3, batch_size=2, feedback=True)
    want = [v.numpy() for v in model_a.trainable_variables + model_b.trainable_variables]
    model = CascadeModel(state_a(), builders.feedback_b(ir_size=H, output_size=O), state="carry", feedback=True,
                         window=3)
    model.compile(keras.optimizers.SGD(LR), loss="mse")
    model.fit((inputs, steps), padded, batch_size=2, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == len(taken) == 8
    assert_weights_close(model.model_a.trainable_variables + model.model_b.trainable_variables, want)


def test_a_window_whose_loss_is_not_finite_takes_no_step_and_stops_fit():
    from cascade_cli.errors import CascadeError

    inputs, steps, padded = arrays()
    padded[1, 6, 0] = np.nan  # a valid target of the first batch's third window (a dataset is not checked first)
    data = tf.data.Dataset.from_tensor_slices(((inputs, steps), padded)).batch(2)
    model = CascadeModel(*models(), state="carry", window=3)
    model.compile(keras.optimizers.SGD(LR), loss="mse")
    with pytest.raises(CascadeError, match="training stopped at epoch 1, batch 1: the training loss became nan"):
        model.fit(data, epochs=1, verbose=0, shuffle=False)
    assert int(model.optimizer.iterations.numpy()) == 1  # the first window's step; the second had nothing
    assert all(np.isfinite(w).all() for w in model.get_weights())


MIRRORED_SCRIPT = """
import sys
import tensorflow as tf
cpu, = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from cascade_cli.train.keras_model import CascadeModel
from tests.test_tbptt import LR, arrays, models
strategy = tf.distribute.MirroredStrategy()
with strategy.scope():
    model = CascadeModel(*models(), state="carry", window=3)
    model.compile(keras.optimizers.SGD(LR), loss="mse")
inputs, steps, padded = arrays()
history = model.fit((inputs[:4], steps[:4]), padded[:4], batch_size=2, epochs=1, shuffle=False, verbose=0).history
np.savez(sys.argv[1], *model.get_weights(), loss=history["loss"][0], replicas=strategy.num_replicas_in_sync,
         iterations=int(model.optimizer.iterations.numpy()))
"""


@pytest.mark.slow  # a subprocess with TensorFlow: about 20-40 s on 2 cores
def test_windows_under_a_mirrored_strategy_take_the_steps_of_one_device(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    done = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(tmp_path / "m.npz")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    mirrored = np.load(tmp_path / "m.npz")
    assert int(mirrored["replicas"]) == 2
    model = window_fit(3, data=tuple(array[:4] for array in arrays()))
    assert int(mirrored["iterations"]) == int(model.optimizer.iterations.numpy()) == 5
    np.testing.assert_allclose(float(mirrored["loss"]), model.history.history["loss"][0], rtol=1e-5)
    assert_weights_close([mirrored[f"arr_{i}"] for i in range(len(model.get_weights()))], model.get_weights(),
                         rtol=1e-5)


# ------------------------------------------------------------------ the command


def test_cascade_train_window_equals_the_eager_reference(tmp_path, reference):
    """`cascade train --window 3 --optimizer sgd` in carry mode with an A in state form: one epoch is the reference's
    truncated-BPTT steps (relative 1e-4), on the same batches (no shuffle, no validation)."""
    from tests.clitools import assert_ok, invoke
    from tests.filetools import write_h5

    inputs, steps, padded = arrays()
    targets = padded[np.arange(4)[None, None, :] < steps[..., None]]  # (sum(steps), O) in (n, t, j) order
    path = write_h5(tmp_path / "train.h5", inputs=inputs, steps=steps, targets=targets)
    for model, name in zip(models(), ("a.keras", "b.keras")):
        model.save(tmp_path / name)
    assert_ok(invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
                     "--out-dir", tmp_path / "run", "--state", "carry", "--window", 3, "--optimizer", "sgd",
                     "--learning-rate", LR, "--epochs", 1, "--batch-size", 2, "--val-split", 0, "--no-shuffle"))
    got = [w for name in ("model_a.keras", "model_b.keras")
           for w in keras.saving.load_model(tmp_path / "run" / name, compile=False).trainable_weights]
    before, after, _ = reference
    assert_weights_close([w.numpy() for w in got], after)
    assert not np.allclose(got[0].numpy(), before[0])  # it trained


def test_cascade_train_refuses_a_bad_window_naming_the_flag_and_writes_nothing(tmp_path):
    from tests.clitools import assert_error, assert_nothing_in, invoke
    from tests.filetools import write_h5

    inputs, steps, padded = arrays()
    path = write_h5(tmp_path / "train.h5", inputs=inputs, steps=steps,
                    targets=padded[np.arange(4)[None, None, :] < steps[..., None]])
    for model, name in zip(models(), ("a.keras", "b.keras")):
        model.save(tmp_path / name)
    out = tmp_path / "out"
    out.mkdir()
    common = ("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
              "--out-dir", out / "run", "--state", "carry", "--epochs", 1)
    assert_error(invoke(*common, "--window", 0), 2, "'--window'", "0")
    assert_nothing_in(out)
    feedback_b = builders.feedback_b(ir_size=H, output_size=O)
    feedback_b.save(tmp_path / "fb.keras")
    fed = list(common)
    fed[fed.index(tmp_path / "b.keras")] = tmp_path / "fb.keras"
    assert_error(invoke(*fed, "--feedback", "--feedback-start", "previous", "--window", 3), 1, "--window:",
                 "--feedback-start previous", "no --window")
    assert_nothing_in(out)
