"""Tests for cascade_cli.training: the masked loss, one exact SGD step, resume, seeds, NaN, patience."""

import csv
import math

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from cascade_cli.data import TrainingData, split_indices
from cascade_cli.errors import CascadeError, DataError, ModelError, ParameterError
from cascade_cli.options import LOSSES, TrainCallbacks, TrainConfig
from cascade_cli.training import evaluate, fit, masked_loss


def write_data(path, inputs, steps, targets):
    with h5py.File(path, "w") as f:
        f.create_dataset("inputs", data=inputs)
        f.create_dataset("steps", data=steps)
        f.create_dataset("targets", data=targets)
    return path


def random_data(path, *, n, outer=3, output_size=2, seed=0):
    rng = np.random.default_rng(seed)
    inputs = builders.inputs(n, outer, seed=seed)
    steps = rng.integers(0, 4, size=(n, outer))
    steps[0, 1] = 0  # a zero row in every file
    targets = rng.normal(size=(int(steps.sum()), output_size)).astype("float32")
    return write_data(path, inputs, steps, targets)


def saved_weights(out_dir):
    return [
        [np.asarray(w) for w in keras.saving.load_model(out_dir / name, compile=False).get_weights()]
        for name in ("model_a.keras", "model_b.keras")
    ]


def train(path, out_dir, *, dropout=0.0, callbacks=None, models=None, **settings):
    model_a, model_b = models or (builders.model_a(), builders.step_b(dropout=dropout))
    with TrainingData(path) as data:
        return fit(model_a, model_b, data, out_dir=out_dir, config=TrainConfig(**settings), callbacks=callbacks)


def assert_same(left, right):
    for model_left, model_right in zip(left, right):
        assert len(model_left) == len(model_right)
        for a, b in zip(model_left, model_right):
            np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------- the loss


def test_masked_loss_by_hand():
    predictions = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    targets = tf.constant([[0.0, 2.0], [5.0, 1.0]])
    # errors 1, 0, -2, 3 over 4 valid elements
    assert float(masked_loss("mse")(predictions, targets)) == pytest.approx((1 + 0 + 4 + 9) / 4)
    assert float(masked_loss("mae")(predictions, targets)) == pytest.approx((1 + 0 + 2 + 3) / 4)
    # one-hot targets [0, 1] and [1, 0] on logits: -log softmax = log(1 + e^(other - own))
    onehot = tf.constant([[0.0, 1.0], [1.0, 0.0]])
    expected = (math.log1p(math.exp(1 - 2)) + math.log1p(math.exp(4 - 3))) / 2
    assert float(masked_loss("categorical-crossentropy")(predictions, onehot)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_masked_loss_of_an_empty_batch_is_zero_with_zero_gradient(name):
    predictions = tf.Variable(tf.zeros([0, 3]))
    with tf.GradientTape() as tape:
        loss = masked_loss(name)(predictions, tf.zeros([0, 3]))
    assert float(loss) == 0.0
    assert tape.gradient(loss, predictions).shape == (0, 3)


def test_masked_loss_rejects_an_unknown_name():
    with pytest.raises(ParameterError, match="^loss: expected one of mse, mae, categorical-crossentropy, "
                                             "received 'hinge'"):
        masked_loss("hinge")


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"epochs": 0}, "^epochs: expected a positive integer, received 0"),
        ({"batch_size": 2.5}, "^batch_size: expected a positive integer"),
        ({"learning_rate": float("nan")}, "^learning_rate: expected a finite number > 0"),
        ({"optimizer": "adagrad"}, "^optimizer: expected one of adam, sgd, rmsprop, received 'adagrad'"),
        ({"loss": "hinge"}, "^loss: expected one of"),
        ({"val_split": 1.0}, r"^val_split: expected a fraction in \[0, 1\)"),
        ({"state": "keep"}, "^state: expected one of reset, carry"),
        ({"seed": -1}, "^seed: expected a non-negative integer"),
        ({"patience": 0}, "^patience: expected a positive integer"),
        ({"patience": 2, "val_split": 0.0}, "^patience: needs a validation set"),
    ],
)
def test_config_rejects_bad_settings_naming_the_python_parameter(settings, words):
    with pytest.raises(ParameterError, match=words) as caught:
        TrainConfig(**settings)
    assert "--" not in str(caught.value)


def test_make_optimizer_makes_every_name_in_options_and_only_those(monkeypatch):
    import cascade_cli.options as options
    from cascade_cli.training import make_optimizer

    kinds = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    assert set(options.OPTIMIZERS) == set(kinds)
    for name, kind in kinds.items():
        optimizer = make_optimizer(name, learning_rate=0.25)
        assert type(optimizer) is kind and float(optimizer.learning_rate) == 0.25
    with pytest.raises(ParameterError, match="^optimizer: expected one of adam, sgd, rmsprop, received 'adagrad'"):
        make_optimizer("adagrad", learning_rate=0.1)
    # a new optimizer is one more name in options.OPTIMIZERS (Keras' own name), nothing else
    monkeypatch.setattr(options, "OPTIMIZERS", (*options.OPTIMIZERS, "adagrad"))
    monkeypatch.setattr("cascade_cli.training.OPTIMIZERS", options.OPTIMIZERS)
    assert type(make_optimizer("adagrad", learning_rate=0.1)) is keras.optimizers.Adagrad


# ------------------------------------------------------------ exact SGD step


def model_b(kind):
    return builders.sequence_b() if kind == "sequence" else builders.step_b(kind)


@pytest.mark.parametrize("kind, state, freeze_a", [("gru", "reset", False), ("gru", "reset", True),
                                                   ("lstm", "carry", False), ("sequence", "reset", False)])
def test_one_sgd_step_is_w_minus_lr_times_the_reference_gradient(tmp_path, kind, state, freeze_a):
    n = 5
    path = random_data(tmp_path / "train.h5", n=n)
    with h5py.File(path, "r") as f:
        inputs, steps, targets = f["inputs"][()], f["steps"][()], f["targets"][()]

    ref_a, ref_b = builders.model_a(), model_b(kind)
    variables = ref_b.trainable_variables if freeze_a else ref_a.trainable_variables + ref_b.trainable_variables
    with tf.GradientTape() as tape:
        values, _ = builders.reference(ref_a, ref_b, inputs, steps, state=state)
        loss = tf.reduce_sum(tf.square(values - targets)) / targets.size  # every valid element, by hand
    grads = tape.gradient(loss, variables)
    expected = {id(v): v.numpy() - 0.1 * g.numpy() for v, g in zip(variables, grads)}

    history = train(path, tmp_path / "out", models=(builders.model_a(), model_b(kind)), optimizer="sgd",
                    learning_rate=0.1, epochs=1, batch_size=n, shuffle=False, val_split=0.0, state=state,
                    freeze_a=freeze_a)
    assert history[0]["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert history[0]["val_loss"] is None
    saved_a, saved_b = (keras.saving.load_model(tmp_path / "out" / name, compile=False)
                        for name in ("model_a.keras", "model_b.keras"))
    for model, saved in ((ref_a, saved_a), (ref_b, saved_b)):
        for v, w in zip(model.trainable_variables, saved.trainable_variables):
            if id(v) in expected:
                assert not np.allclose(expected[id(v)], v.numpy())  # the step moved it
                np.testing.assert_allclose(w.numpy(), expected[id(v)], rtol=1e-4, atol=1e-6)
            else:
                np.testing.assert_array_equal(w.numpy(), v.numpy())  # frozen A


def test_nothing_to_learn_leaves_the_weights_and_gives_loss_zero(tmp_path):
    path = write_data(tmp_path / "train.h5", builders.inputs(4, 3), np.zeros((4, 3), np.int64),
                      np.zeros((0, 2), np.float32))
    model_a, model_b = builders.model_a(), builders.step_b()
    before = [model_a.get_weights(), model_b.get_weights()]
    history = train(path, tmp_path / "out", models=(model_a, model_b), epochs=2, batch_size=2, val_split=0.5)
    assert [(row["loss"], row["val_loss"]) for row in history] == [(0.0, 0.0), (0.0, 0.0)]
    assert_same(saved_weights(tmp_path / "out"), before)


# ------------------------------------------------------ regularization


A_L2, B_L1, B_L2 = 0.01, 0.02, 0.5  # factors, written again by hand in `penalty_by_hand`


def regularized_models(*, activity=False):
    """builders' A and GRU step B (same seeds), with weight regularizers on A's kernel, B's recurrent
    kernel and B's Dense kernel (and an activity regularizer on the Dense when `activity`)."""
    init = builders.init
    inputs = keras.Input(shape=(None, 3))
    ir = keras.layers.GRU(4, return_sequences=True, kernel_initializer=init(0), recurrent_initializer=init(1),
                          bias_initializer=init(2), kernel_regularizer=keras.regularizers.L2(A_L2))(inputs)
    model_a = keras.Model(inputs, ir, name="a_regularized")
    x, state = keras.Input(shape=(4,)), keras.Input(shape=(5,))
    h, new_state = keras.layers.GRUCell(5, kernel_initializer=init(10), recurrent_initializer=init(11),
                                        bias_initializer=init(12),
                                        recurrent_regularizer=keras.regularizers.L1(B_L1))(x, state)
    dense = keras.layers.Dense(2, kernel_initializer=init(13), bias_initializer=init(14),
                               kernel_regularizer=keras.regularizers.L2(B_L2),
                               activity_regularizer=keras.regularizers.L2(1.0) if activity else None)
    model_b = keras.Model([x, state], [dense(h), new_state], name="b_regularized")
    return model_a, model_b


def penalty_by_hand(model_a, model_b):
    """The regularization terms of `regularized_models`, from the weights themselves."""
    a_kernel = model_a.layers[1].cell.kernel
    cell, dense = model_b.layers[2], model_b.layers[3]
    return (A_L2 * tf.reduce_sum(tf.square(a_kernel)) + B_L1 * tf.reduce_sum(tf.abs(cell.recurrent_kernel))
            + B_L2 * tf.reduce_sum(tf.square(dense.kernel)))


def test_regularized_models_match_builders_without_their_regularizers():
    plain_a, plain_b = builders.model_a(), builders.step_b()
    model_a, model_b = regularized_models()
    assert_same([model_a.get_weights(), model_b.get_weights()], [plain_a.get_weights(), plain_b.get_weights()])
    assert len(model_a.losses) == 1 and len(model_b.losses) == 2
    assert float(tf.add_n(model_a.losses + model_b.losses)) == pytest.approx(
        float(penalty_by_hand(model_a, model_b)), rel=1e-6)


@pytest.mark.parametrize("freeze_a", [False, True])
def test_one_sgd_step_with_regularizers_is_w_minus_lr_times_the_gradient_of_loss_plus_penalty(tmp_path, freeze_a):
    n = 5
    path = random_data(tmp_path / "train.h5", n=n)
    with h5py.File(path, "r") as f:
        inputs, steps, targets = f["inputs"][()], f["steps"][()], f["targets"][()]

    ref_a, ref_b = regularized_models()
    variables = ref_b.trainable_variables if freeze_a else ref_a.trainable_variables + ref_b.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        values, _ = builders.reference(ref_a, ref_b, inputs, steps)
        data_loss = tf.reduce_sum(tf.square(values - targets)) / targets.size
        penalty = penalty_by_hand(ref_a, ref_b)
        loss = data_loss + penalty
    expected = {id(v): v.numpy() - 0.1 * g.numpy() for v, g in zip(variables, tape.gradient(loss, variables))}
    unregularized = [v.numpy() - 0.1 * g.numpy() for v, g in zip(variables, tape.gradient(data_loss, variables))]
    # the penalty moves the step well past the tolerance below (the defect: it was ignored)
    assert max(float(np.abs(expected[id(v)] - u).max()) for v, u in zip(variables, unregularized)) > 1e-2

    history = train(path, tmp_path / "out", models=regularized_models(), optimizer="sgd", learning_rate=0.1,
                    epochs=1, batch_size=n, shuffle=False, val_split=0.0, freeze_a=freeze_a)
    assert history[0]["loss"] == pytest.approx(float(loss), rel=1e-5)  # A's penalty counts even when frozen
    saved_a, saved_b = (keras.saving.load_model(tmp_path / "out" / name, compile=False)
                        for name in ("model_a.keras", "model_b.keras"))
    for model, saved in ((ref_a, saved_a), (ref_b, saved_b)):
        for v, w in zip(model.trainable_variables, saved.trainable_variables):
            if id(v) in expected:
                np.testing.assert_allclose(w.numpy(), expected[id(v)], rtol=1e-4, atol=1e-6)
            else:
                np.testing.assert_array_equal(w.numpy(), v.numpy())  # frozen A


def test_the_validation_loss_counts_the_penalty_as_keras_does(tmp_path):
    path = random_data(tmp_path / "train.h5", n=8)
    history = train(path, tmp_path / "out", models=regularized_models(), optimizer="sgd", learning_rate=0.1,
                    epochs=1, batch_size=4, val_split=0.25)
    model_a, model_b = (keras.saving.load_model(tmp_path / "out" / name, compile=False)
                        for name in ("model_a.keras", "model_b.keras"))
    _, val = split_indices(8, val_split=0.25, seed=0)
    with h5py.File(path, "r") as f:
        inputs, steps, targets = f["inputs"][()], f["steps"][()], f["targets"][()]
    starts = np.concatenate([[0], np.cumsum(steps.sum(axis=1))])
    rows = np.concatenate([targets[starts[i]:starts[i + 1]] for i in val])
    values, _ = builders.reference(model_a, model_b, inputs[val], steps[val])
    by_hand = float(tf.reduce_sum(tf.square(values - rows))) / rows.size + float(penalty_by_hand(model_a, model_b))
    assert history[0]["val_loss"] == pytest.approx(by_hand, rel=1e-5)
    with TrainingData(path) as data:
        assert evaluate(model_a, model_b, data, indices=val) == pytest.approx(by_hand, rel=1e-5)


def test_an_activity_regularizer_is_refused_before_any_work(tmp_path):
    path = random_data(tmp_path / "train.h5", n=4)
    with pytest.raises(ModelError, match=r"^model B: layer '.*' has an activity_regularizer, which cascade's "
                                         r"training does not add to the loss"):
        train(path, tmp_path / "out", models=regularized_models(activity=True), epochs=1)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------ resume and the seed


class Interrupt(Exception):
    pass


class StopAt(TrainCallbacks):
    """Raises `Interrupt` in the given epoch after the given batch, as a kill would."""

    def __init__(self, epoch, batch):
        self.stop_epoch, self.stop_batch, self.epoch, self.batch = epoch, batch, 0, 0

    def epoch_started(self, epoch, *, epochs, batches):
        self.epoch, self.batch = epoch, 0

    def batch_done(self, loss):
        self.batch += 1
        if (self.epoch, self.batch) == (self.stop_epoch, self.stop_batch):
            raise Interrupt


RUN = dict(epochs=3, batch_size=4, optimizer="adam", learning_rate=0.01, val_split=0.25, shuffle=True, seed=7,
           dropout=0.3)


def test_resume_after_a_stop_mid_epoch_gives_the_weights_of_an_unbroken_run(tmp_path):
    path = random_data(tmp_path / "train.h5", n=12)
    unbroken = train(path, tmp_path / "unbroken", **RUN)

    with pytest.raises(Interrupt):
        train(path, tmp_path / "broken", callbacks=StopAt(2, 2), **RUN)
    assert not (tmp_path / "broken" / "model_a.keras").exists()
    resumed = train(path, tmp_path / "broken", resume=True, **RUN)  # fresh models, as a new process has

    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    assert [(r["loss"], r["val_loss"]) for r in resumed] == [(r["loss"], r["val_loss"]) for r in unbroken]
    assert_same(saved_weights(tmp_path / "broken"), saved_weights(tmp_path / "unbroken"))
    with open(tmp_path / "broken" / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["val_loss"]) for row in rows] == [row["val_loss"] for row in unbroken]

    with pytest.raises(ParameterError, match=r"^resume: the checkpoints in '.*checkpoints' were made with "
                                             r"shuffle=True, batch_size=4; this run has shuffle=False, "
                                             r"batch_size=8\. Resume with the same settings, or choose "
                                             r"another out_dir\.$"):
        train(path, tmp_path / "broken", resume=True, **{**RUN, "batch_size": 8, "shuffle": False})
    with pytest.raises(ParameterError, match=r"^out_dir: '.*broken' already holds a training run "
                                             r"\(checkpoints, model_a.keras, model_b.keras, history.csv\); "
                                             r"pass resume=True to continue it, or choose another out_dir\.$"):
        train(path, tmp_path / "broken", **RUN)


def test_the_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path):
    path = random_data(tmp_path / "train.h5", n=8)
    settings = {**RUN, "epochs": 2}
    train(path, tmp_path / "first", **settings)
    train(path, tmp_path / "second", **settings)
    train(path, tmp_path / "other", **{**settings, "seed": 8})
    first = saved_weights(tmp_path / "first")
    assert_same(saved_weights(tmp_path / "second"), first)
    assert not all(np.array_equal(a, b) for a, b in zip(saved_weights(tmp_path / "other")[0], first[0]))


def test_resume_without_a_checkpoint_says_so(tmp_path):
    path = random_data(tmp_path / "train.h5", n=4)
    with pytest.raises(ParameterError, match="^resume: no checkpoint to resume from in .*set resume=False"):
        train(path, tmp_path / "out", resume=True)


# -------------------------------------------------------- bad numbers, data


class PoisonAt(TrainCallbacks):
    """Sets B's output kernel to NaN when the given epoch starts; keeps the weights each epoch ends with."""

    def __init__(self, model_b, epoch):
        self.model_b, self.poison_epoch, self.kept = model_b, epoch, []

    def epoch_started(self, epoch, *, epochs, batches):
        if epoch == self.poison_epoch:
            kernel = self.model_b.layers[-1].kernel
            kernel.assign(np.full(kernel.shape, np.nan, np.float32))

    def epoch_done(self, logs):
        self.kept.append(self.model_b.get_weights())


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    path = random_data(tmp_path / "train.h5", n=8)
    out = tmp_path / "out"
    model_a, model_b = builders.model_a(), builders.step_b()
    poison = PoisonAt(model_b, epoch=2)
    with pytest.raises(CascadeError, match=r"epoch 2, batch 1: the training loss became nan .*last good "
                                           r"checkpoint \(epoch 1\)"):
        train(path, out, models=(model_a, model_b), callbacks=poison, epochs=3, batch_size=4, val_split=0.0)
    assert not (out / "model_a.keras").exists() and not (out / "model_b.keras").exists()
    assert (out / "history.csv").read_text().splitlines()[1].startswith("1,")
    latest = tf.train.latest_checkpoint(str(out / "checkpoints"))
    assert latest.endswith("ckpt-1")
    restored = builders.step_b()
    tf.train.Checkpoint(model_b=restored).restore(latest).expect_partial()
    assert_same([restored.get_weights()], [poison.kept[0]])


def test_a_loss_that_overflows_in_the_first_epoch_writes_nothing(tmp_path):
    path = random_data(tmp_path / "train.h5", n=8)
    out = tmp_path / "out"
    with pytest.raises(CascadeError, match=r"epoch 1, batch 2: the training loss became inf.*no checkpoint"):
        train(path, out, optimizer="sgd", learning_rate=1e30, epochs=2, batch_size=4, shuffle=False,
              val_split=0.0)
    assert tf.train.latest_checkpoint(str(out / "checkpoints")) is None
    assert sorted(p.name for p in out.iterdir()) == []


def test_data_is_checked_before_any_work(tmp_path):
    inputs, steps = builders.inputs(4, 3), np.ones((4, 3), np.int64)
    targets = np.zeros((12, 2), np.float32)
    targets[5, 1] = np.nan
    path = write_data(tmp_path / "nan.h5", inputs, steps, targets)
    with pytest.raises(DataError, match=r"targets in .*nan.h5' \(key 'targets'\) row 5"):
        train(path, tmp_path / "out", epochs=1)
    assert not (tmp_path / "out" / "checkpoints").exists()

    path = write_data(tmp_path / "wide.h5", inputs, steps, np.zeros((12, 3), np.float32))
    with pytest.raises(DataError, match="O=3 values per step but model B emits O=2"):
        train(path, tmp_path / "out", epochs=1)
    path = random_data(tmp_path / "train.h5", n=4)
    with pytest.raises(ParameterError, match=r"^patience: needs a validation set, but val_split=0.1 of 4 "
                                             r"samples keeps none: raise val_split\.$"):
        train(path, tmp_path / "out", patience=2, val_split=0.1)


# ------------------------------------------------------ patience, learning


def test_patience_stops_and_restores_the_best_weights(tmp_path):
    n = 8
    rng = np.random.default_rng(3)
    inputs, steps = builders.inputs(n, 2, seed=3), rng.integers(1, 3, size=(n, 2))
    _, val = split_indices(n, val_split=0.25, seed=0)
    # Training pulls every output towards +2 while the held-out samples want -2: val loss only rises.
    sign = np.where(np.isin(np.arange(n), val), -2.0, 2.0)
    targets = np.repeat(sign, steps.sum(axis=1))[:, None] * np.ones((1, 2))
    path = write_data(tmp_path / "train.h5", inputs, steps, targets.astype(np.float32))

    class Watch(TrainCallbacks):
        stopped = None

        def stopped_early(self, *, epoch, best_epoch):
            self.stopped = (epoch, best_epoch)

    watch = Watch()
    history = train(path, tmp_path / "out", callbacks=watch, epochs=10, batch_size=3, optimizer="adam",
                    learning_rate=0.05, val_split=0.25, patience=2, seed=0)
    val_losses = [row["val_loss"] for row in history]
    assert len(history) == 3 and watch.stopped == (3, 1)
    assert val_losses[0] < val_losses[1] < val_losses[2]
    model_a, model_b = (keras.saving.load_model(tmp_path / "out" / name, compile=False)
                        for name in ("model_a.keras", "model_b.keras"))
    with TrainingData(path) as data:
        restored = evaluate(model_a, model_b, data, indices=val, batch_size=3)
    assert restored == pytest.approx(val_losses[0], rel=1e-6)


def test_training_learns_a_toy_task(tmp_path):
    # Each outer step asks B to emit (x0, -x0) for its inner steps, x0 the step's first input feature.
    n, outer = 48, 2
    rng = np.random.default_rng(1)
    inputs = rng.uniform(-1, 1, size=(n, outer, 3)).astype(np.float32)
    steps = rng.integers(0, 4, size=(n, outer))
    first = np.repeat(inputs[:, :, 0].reshape(-1), steps.reshape(-1))
    targets = np.stack([first, -first], axis=1).astype(np.float32)
    path = write_data(tmp_path / "train.h5", inputs, steps, targets)

    history = train(path, tmp_path / "out", epochs=12, batch_size=8, optimizer="adam", learning_rate=0.03,
                    val_split=0.25, seed=0)
    _, val = split_indices(n, val_split=0.25, seed=0)
    val_rows = np.concatenate([targets[int(steps[:i].sum()):int(steps[:i + 1].sum())] for i in val])
    mean_baseline = float(np.mean((val_rows - targets.mean(axis=0)) ** 2))
    assert history[-1]["val_loss"] < 0.25 * mean_baseline
    assert history[-1]["loss"] < history[0]["loss"]
