"""Tests for cascade_cli.train (fit, losses, step, optimizers): the masked loss, one exact SGD step, resume, seeds, NaN, patience."""

import csv
import json
import math
import shutil

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from cascade_cli.data import TrainingData, split_indices
from cascade_cli.errors import CascadeError, DataError, ModelError, ParameterError
from cascade_cli.train.checkpoints import prepare_out_dir, trained_pair
from cascade_cli.options import LOSSES, TRAIN_DEFAULTS, TrainCallbacks, TrainConfig
from cascade_cli.train.fit import TrainingInterrupted, evaluate, fit, resolve_config, split_warning
from cascade_cli.train.keras_model import CascadeModel
from cascade_cli.train.losses import masked_loss, resolve_from_logits


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


def arrays(path):
    with h5py.File(path, "r") as f:
        return f["inputs"][()], f["steps"][()], f["targets"][()]


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
                                             "sparse-categorical-crossentropy, received 'hinge'"):
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
        ({"seed": -1}, r"^seed: expected an integer in \[0, 4294967295\], received -1"),
        ({"patience": -1}, "^patience: expected a non-negative integer"),
        ({"state_init": "ones"}, "^state_init: expected one of zeros, ir, received 'ones'"),
        ({"state_init": "ir", "state": "carry"}, "^state_init: 'ir' sets every inner sequence's state from its "
                                                 "own IR vector, which needs state='reset'; received state='carry'"),
        ({"from_logits": 1}, "^from_logits: expected one of True, False, received 1"),
        ({"from_logits": True, "loss": "mse"}, "^from_logits: applies to the cross-entropy losses only; "
                                               "received loss='mse'"),
        ({"patience": 2, "val_split": 0.0}, "^patience: needs a validation set"),
    ],
)
def test_config_rejects_bad_settings_naming_the_python_parameter(settings, words):
    with pytest.raises(ParameterError, match=words) as caught:
        TrainConfig(**settings)
    assert "--" not in str(caught.value)


def test_make_optimizer_makes_every_name_in_options_and_only_those(monkeypatch):
    import cascade_cli.options as options
    from cascade_cli.train.optimizers import make_optimizer

    kinds = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    assert set(options.OPTIMIZERS) == set(kinds)
    for name, kind in kinds.items():
        optimizer = make_optimizer(name, learning_rate=0.25)
        assert type(optimizer) is kind and float(optimizer.learning_rate) == 0.25
    with pytest.raises(ParameterError, match="^optimizer: expected one of adam, sgd, rmsprop, received 'adagrad'"):
        make_optimizer("adagrad", learning_rate=0.1)
    # a new optimizer is one more name in options.OPTIMIZERS (Keras' own name), nothing else
    monkeypatch.setattr(options, "OPTIMIZERS", (*options.OPTIMIZERS, "adagrad"))
    monkeypatch.setattr("cascade_cli.train.optimizers.OPTIMIZERS", options.OPTIMIZERS)
    assert type(make_optimizer("adagrad", learning_rate=0.1)) is keras.optimizers.Adagrad


# ------------------------------------------------------------ exact SGD step


def model_b(kind):
    return builders.sequence_b() if kind == "sequence" else builders.step_b(kind)


# quick: LSTM in carry and a sequence-form B; the GRU step B in reset, frozen A or not, is the regularized step's below
# (test_one_sgd_step_with_regularizers_is_w_minus_lr_times_the_gradient_of_loss_plus_penalty): the same step and more
@pytest.mark.parametrize("kind, state, freeze_a", [pytest.param("gru", "reset", False, marks=pytest.mark.slow),
                                                   pytest.param("gru", "reset", True, marks=pytest.mark.slow),
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


def test_a_file_with_nothing_to_learn_is_refused_before_the_first_step(tmp_path):
    """Issue 30: all-zero steps trained 'successfully' with loss 0.0; now they are refused, and nothing is written."""
    path = write_data(tmp_path / "train.h5", builders.inputs(4, 3), np.zeros((4, 3), np.int64),
                      np.zeros((0, 2), np.float32))
    with pytest.raises(DataError, match=r"^steps in .*train\.h5' \(key 'steps'\) are all 0 \(shape \(4, 3\)\)"):
        train(path, tmp_path / "out", epochs=2, batch_size=2, val_split=0.5)
    assert not (tmp_path / "out").exists()


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
    a_penalty = A_L2 * tf.reduce_sum(tf.square(ref_a.layers[1].cell.kernel))
    reported = loss - a_penalty if freeze_a else loss  # Keras' rule: a frozen model's penalties drop out of the loss
    expected = {id(v): v.numpy() - 0.1 * g.numpy() for v, g in zip(variables, tape.gradient(loss, variables))}
    unregularized = [v.numpy() - 0.1 * g.numpy() for v, g in zip(variables, tape.gradient(data_loss, variables))]
    # the penalty moves the step well past the tolerance below (the defect: it was ignored)
    assert max(float(np.abs(expected[id(v)] - u).max()) for v, u in zip(variables, unregularized)) > 1e-2

    history = train(path, tmp_path / "out", models=regularized_models(), optimizer="sgd", learning_rate=0.1,
                    epochs=1, batch_size=n, shuffle=False, val_split=0.0, freeze_a=freeze_a)
    assert history[0]["loss"] == pytest.approx(float(reported), rel=1e-5)  # the gradients above are loss's either way
    saved_a, saved_b = (keras.saving.load_model(tmp_path / "out" / name, compile=False)
                        for name in ("model_a.keras", "model_b.keras"))
    for model, saved in ((ref_a, saved_a), (ref_b, saved_b)):
        for v, w in zip(model.trainable_variables, saved.trainable_variables):
            if id(v) in expected:
                np.testing.assert_allclose(w.numpy(), expected[id(v)], rtol=1e-4, atol=1e-6)
            else:
                np.testing.assert_array_equal(w.numpy(), v.numpy())  # frozen A


def test_the_epoch_loss_weighs_each_step_s_penalty_by_its_valid_elements_in_train_as_in_fit(tmp_path):
    """The epoch's loss is the mean of its steps' losses (errors / count + penalty), each weighed by its count of
    valid elements, as the steps' data errors are: the command's history and `CascadeModel.fit`'s both equal the
    sum worked out from each step's weights (the command averaged the penalty over the steps)."""
    from cascade_cli.data import dataset
    from cascade_cli.train.keras_model import CascadeModel

    inputs, steps = builders.inputs(4, 3, seed=1), np.array([[3, 3, 2], [1, 3, 2], [1, 0, 0], [0, 1, 0]])
    targets = np.random.default_rng(4).normal(size=(int(steps.sum()), 2)).astype("float32")  # 14 rows, then 2
    path = write_data(tmp_path / "train.h5", inputs, steps, targets)
    history = train(path, tmp_path / "out", models=regularized_models(), optimizer="sgd", learning_rate=0.5,
                    epochs=1, batch_size=2, shuffle=False, val_split=0.0)

    model = CascadeModel(*regularized_models(), jit_compile=False)
    model.compile(keras.optimizers.SGD(0.5), loss="mse", jit_compile=False)
    terms = []  # each step's (errors, count, penalty), from the weights before it

    def before(batch, logs):
        rows = slice(int(steps[:2 * batch].sum()), int(steps[:2 * batch + 2].sum()))
        values, _ = builders.reference(model.model_a, model.model_b, inputs[2 * batch:2 * batch + 2],
                                       steps[2 * batch:2 * batch + 2])
        errors = float(tf.reduce_sum(tf.square(values - targets[rows])))
        terms.append((errors, targets[rows].size, float(penalty_by_hand(model.model_a, model.model_b))))

    fitted = model.fit(dataset(path, batch_size=2, shuffle=False), epochs=1, verbose=0,
                       callbacks=[keras.callbacks.LambdaCallback(on_train_batch_begin=before)]).history
    assert [count for _, count, _ in terms] == [28, 4]
    assert abs(terms[0][2] - terms[1][2]) > 1e-2  # the first step moved the penalty: the weighings differ
    by_hand = sum(errors + count * penalty for errors, count, penalty in terms) / 32
    assert fitted["loss"][0] == pytest.approx(by_hand, rel=1e-5)
    assert history[0]["loss"] == pytest.approx(by_hand, rel=1e-5)


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


@pytest.fixture(scope="module")
def unbroken_run(tmp_path_factory):
    """An unbroken `RUN` on 12 samples (dropout, shuffling, validation): `(data path, out_dir, history)`.

    The resume test resumes to its weights; the seed test trains the same run again, and with another seed."""
    folder = tmp_path_factory.mktemp("unbroken_run")
    path = random_data(folder / "train.h5", n=12)
    return path, folder / "unbroken", train(path, folder / "unbroken", **RUN)


def test_resume_after_a_stop_mid_epoch_gives_the_weights_of_an_unbroken_run(tmp_path, unbroken_run):
    path, unbroken_dir, unbroken = unbroken_run

    with pytest.raises(Interrupt):
        train(path, tmp_path / "broken", callbacks=StopAt(2, 2), **RUN)
    assert not (tmp_path / "broken" / "model_a.keras").exists()
    resumed = train(path, tmp_path / "broken", resume=True, **RUN)  # fresh models, as a new process has

    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    assert [(r["loss"], r["val_loss"]) for r in resumed] == [(r["loss"], r["val_loss"]) for r in unbroken]
    assert_same(saved_weights(tmp_path / "broken"), saved_weights(unbroken_dir))
    with open(tmp_path / "broken" / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["val_loss"]) for row in rows] == [row["val_loss"] for row in unbroken]

    with pytest.raises(ParameterError, match=r"^resume: the checkpoints in '.*checkpoints' were made with "
                                             r"shuffle=True, batch_size=4; this run has shuffle=False, "
                                             r"batch_size=8\. Resume with the same settings, or choose "
                                             r"another out_dir\.$"):
        train(path, tmp_path / "broken", resume=True, **{**RUN, "batch_size": 8, "shuffle": False})
    with pytest.raises(ParameterError, match=r"^out_dir: '.*broken' already holds a training run "
                                             r"\(checkpoints, model_a.keras, model_b.keras, cascade.keras, "
                                             r"history.csv\); pass resume=True to continue it, overwrite=True to "
                                             r"replace it, or choose another out_dir\.$"):
        train(path, tmp_path / "broken", **RUN)


def test_the_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path, unbroken_run):
    path, first_dir, _ = unbroken_run  # RUN: 3 epochs, dropout, shuffling: each epoch draws again
    train(path, tmp_path / "second", **RUN)
    train(path, tmp_path / "other", **{**RUN, "seed": 8})
    first = saved_weights(first_dir)
    assert_same(saved_weights(tmp_path / "second"), first)
    assert not all(np.array_equal(a, b) for a, b in zip(saved_weights(tmp_path / "other")[0], first[0]))


def test_resume_without_a_checkpoint_says_so(tmp_path):
    path = random_data(tmp_path / "train.h5", n=4)
    with pytest.raises(ParameterError,
                       match="^resume: no backup to resume from in .*to start training, leave out resume=True"):
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
                                           r"backup \(epoch 1\) is in '.*checkpoints/backup'"):
        train(path, out, models=(model_a, model_b), callbacks=poison, epochs=3, batch_size=4, val_split=0.0)
    assert not (out / "model_a.keras").exists() and not (out / "model_b.keras").exists()
    assert (out / "history.csv").read_text().splitlines()[1].startswith("1,")
    assert json.loads((out / "checkpoints" / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    restored = builders.step_b()
    CascadeModel(builders.model_a(), restored).load_weights(out / "checkpoints" / "backup" / "latest.weights.h5")
    assert_same([restored.get_weights()], [poison.kept[0]])


def test_a_loss_that_overflows_in_the_first_epoch_writes_nothing(tmp_path):
    path = random_data(tmp_path / "train.h5", n=8)
    out = tmp_path / "out"
    with pytest.raises(CascadeError, match=r"epoch 1, batch 2: the training loss became inf.*no backup was written"):
        train(path, out, optimizer="sgd", learning_rate=1e30, epochs=2, batch_size=4, shuffle=False,
              val_split=0.0)
    assert not out.exists()  # the folder the run created went with it


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


PATIENCE_RUN = dict(epochs=10, batch_size=3, optimizer="adam", learning_rate=0.05, val_split=0.25, patience=2, seed=0)


@pytest.fixture(scope="module")
def patience_run(tmp_path_factory):
    """A `PATIENCE_RUN` whose val_loss only rises: `(data path, validation indices, out_dir, history, stopped)`.

    Training pulls every output towards +2 while the held-out samples want -2. Both patience tests read this run
    (the second copies it before resuming it)."""
    folder = tmp_path_factory.mktemp("patience_run")
    n = 8
    rng = np.random.default_rng(3)
    inputs, steps = builders.inputs(n, 2, seed=3), rng.integers(1, 3, size=(n, 2))
    _, val = split_indices(n, val_split=0.25, seed=0)
    sign = np.where(np.isin(np.arange(n), val), -2.0, 2.0)
    targets = np.repeat(sign, steps.sum(axis=1))[:, None] * np.ones((1, 2))
    path = write_data(folder / "train.h5", inputs, steps, targets.astype(np.float32))

    class Watch(TrainCallbacks):
        stopped = None

        def stopped_early(self, *, epoch, best_epoch):
            self.stopped = (epoch, best_epoch)

    watch = Watch()
    history = train(path, folder / "out", callbacks=watch, **PATIENCE_RUN)
    return path, val, folder / "out", history, watch.stopped


def test_patience_stops_and_restores_the_best_weights(patience_run):
    path, val, out, history, stopped = patience_run
    val_losses = [row["val_loss"] for row in history]
    assert len(history) == 3 and stopped == (3, 1)
    assert val_losses[0] < val_losses[1] < val_losses[2]
    model_a, model_b = (keras.saving.load_model(out / name, compile=False)
                        for name in ("model_a.keras", "model_b.keras"))
    with TrainingData(path) as data:
        restored = evaluate(model_a, model_b, data, indices=val, batch_size=3)
    assert restored == pytest.approx(val_losses[0], rel=1e-6)


def test_patience_counts_the_epochs_before_a_resume_and_restores_their_best_weights(tmp_path, patience_run):
    """Killed in epoch 3 of a run whose val_loss only rises, the resumed run stops where the unbroken one does (after
    epoch 3, EarlyStopping's wait carried over in run_state.json) and keeps epoch 1's weights, not its own best."""
    path, _, out, unbroken, _ = patience_run
    shutil.copytree(out, tmp_path / "unbroken")  # resumed below: the other patience test reads the run as it ended
    run = PATIENCE_RUN
    assert len(unbroken) == 3
    with pytest.raises(Interrupt):
        train(path, tmp_path / "broken", callbacks=StopAt(3, 1), **run)
    resumed = train(path, tmp_path / "broken", resume=True, **run)
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in resumed] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in unbroken]
    assert_same(saved_weights(tmp_path / "broken"), saved_weights(tmp_path / "unbroken"))
    kept = saved_weights(tmp_path / "unbroken")
    again = train(path, tmp_path / "unbroken", resume=True, **run)  # it stopped early: nothing more to train
    assert [row["epoch"] for row in again] == [1, 2, 3]
    assert_same(saved_weights(tmp_path / "unbroken"), kept)  # still epoch 1's


@pytest.mark.slow  # 12 epochs. Quick: learning in test_sample_training (validation loss under a tenth of the mean's)
# and test_a_softmax_b_trains_with_probabilities_detected (loss from ln 3 to under 0.3)
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


# ------------------------------------------------------- the cross-entropies


def test_crossentropies_by_hand_from_logits_and_from_probabilities():
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]], np.float32)  # softmax: (1/2, 1/2), (3/4, 1/4)
    probabilities = np.array([[0.5, 0.5], [0.75, 0.25]], np.float32)
    one_hot = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    expected = (np.log(2.0) + np.log(4.0)) / 2  # -(ln 1/2 + ln 1/4) / 2 rows = 1.0397
    for name, targets in (("categorical-crossentropy", one_hot), ("sparse-categorical-crossentropy",
                                                                  np.array([0, 1])),
                          ("sparse-categorical-crossentropy", np.array([[0.0], [1.0]], np.float32))):
        assert float(masked_loss(name)(logits, targets)) == pytest.approx(expected, rel=1e-6)
        assert float(masked_loss(name, from_logits=False)(probabilities, targets)) == pytest.approx(expected, rel=1e-6)
    # probabilities read as logits: softmax twice, the defect of issue 17.3
    assert float(masked_loss("categorical-crossentropy")(probabilities, one_hot)) == pytest.approx(
        (np.log(1 + np.exp(0.0)) + np.log(1 + np.exp(0.5))) / 2, rel=1e-6)
    assert float(masked_loss("sparse-categorical-crossentropy")(np.zeros((0, 3)), np.zeros((0,)))) == 0.0


def softmax_b(*, activation_layer=False, output_size=3):
    x, state = keras.Input(shape=(4,)), keras.Input(shape=(5,))
    h, new_state = keras.layers.GRUCell(5, kernel_initializer=builders.init(10),
                                        recurrent_initializer=builders.init(11))(x, state)
    if activation_layer:
        y = keras.layers.Activation("softmax")(keras.layers.Dense(output_size, kernel_initializer=builders.init(12))(h))
    else:
        y = keras.layers.Dense(output_size, activation="softmax", kernel_initializer=builders.init(12))(h)
    return keras.Model([x, state], [y, new_state])


def test_resolve_from_logits_detects_a_softmax_output():
    for model, detected in ((softmax_b(), False), (softmax_b(activation_layer=True), False),
                            (builders.step_b(), True), (builders.sequence_b(), True)):
        assert resolve_from_logits(model, None, loss="categorical-crossentropy") is detected
        assert resolve_from_logits(model, None, loss="sparse-categorical-crossentropy") is detected
        assert resolve_from_logits(model, True, loss="categorical-crossentropy") is True  # given wins
        assert resolve_from_logits(model, None, loss="mse") is None


def token_data(path, *, n, sparse):
    """Every inner step's target is token 0 of 3: a softmax B can learn it to a loss near 0."""
    rng = np.random.default_rng(2)
    steps = rng.integers(1, 3, size=(n, 2))
    total = int(steps.sum())
    targets = np.zeros((total, 1), np.int64) if sparse else np.tile([[1.0, 0.0, 0.0]], (total, 1)).astype(np.float32)
    return write_data(path, builders.inputs(n, 2, seed=2), steps, targets)  # sparse: integer ids (issue 30)


# quick: the one-hot targets; a softmax B's sparse ids are detected in test_resolve_from_logits_detects_a_softmax_output
# and trained from in test_train_cli's test_sparse_crossentropy_trains_from_token_ids_stored_as_total
@pytest.mark.parametrize("loss", ["categorical-crossentropy",
                                  pytest.param("sparse-categorical-crossentropy", marks=pytest.mark.slow)])
def test_a_softmax_b_trains_with_probabilities_detected(tmp_path, loss):
    path = token_data(tmp_path / "train.h5", n=16, sparse=loss.startswith("sparse"))
    model_a, model_b = builders.model_a(), softmax_b()
    with TrainingData(path) as data:
        inputs, steps, _ = arrays(path)
        values, _ = builders.reference(model_a, model_b, inputs, steps)
        by_hand = float(-np.mean(np.log(values.numpy()[:, 0])))
        assert evaluate(model_a, model_b, data, loss=loss) == pytest.approx(by_hand, rel=1e-5)

        class Info(TrainCallbacks):
            def run_started(self, info):
                self.info = info

        watch = Info()
        history = fit(model_a, model_b, data, out_dir=tmp_path / "out", callbacks=watch,
                      config=TrainConfig(loss=loss, epochs=8, batch_size=4, learning_rate=0.05, val_split=0.25))
    assert watch.info.from_logits is False
    # softmax read as logits again could not go below -ln(e / (e + 2)) = 0.551; ln 3 = 1.099 is a guess
    assert history[-1]["loss"] < 0.3 < np.log(3.0)


def test_sparse_targets_must_be_one_id_per_step(tmp_path):
    path = token_data(tmp_path / "train.h5", n=4, sparse=False)  # one-hot (total, 3)
    with pytest.raises(DataError, match=r"have 3 float32 values per step: sparse-categorical-crossentropy expects one "
                                        r"integer token id per step, \(sum\(steps\), 1\) or \(N, Ta, L, 1\), "
                                        r"each in \[0, 3\)"):
        train(path, tmp_path / "out", models=(builders.model_a(), softmax_b()),
              loss="sparse-categorical-crossentropy")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------- state_init


def test_state_init_ir_is_what_training_runs(tmp_path):
    path = random_data(tmp_path / "train.h5", n=8)
    model_a, model_b = builders.model_a(), builders.step_b(units=4)  # state size == H
    history = train(path, tmp_path / "out", models=(model_a, model_b), state_init="ir", epochs=1, val_split=0.5)
    _, val = split_indices(8, val_split=0.5, seed=0)
    with TrainingData(path) as data:
        ir = evaluate(model_a, model_b, data, indices=val, state_init="ir")
        zeros = evaluate(model_a, model_b, data, indices=val)
        inputs, steps, targets = arrays(path)
        values, _ = builders.reference(model_a, model_b, inputs, steps, state_init="ir")
        by_hand = float(np.mean((values.numpy() - targets) ** 2))
        assert evaluate(model_a, model_b, data, state_init="ir") == pytest.approx(by_hand, rel=1e-5)
    assert history[0]["val_loss"] == pytest.approx(ir, rel=1e-6) and ir != pytest.approx(zeros, rel=1e-3)
    with pytest.raises(ParameterError, match=r"^resume: the checkpoints in .* were made with state_init='ir'; "
                                             r"this run has state_init='zeros'"):
        train(path, tmp_path / "out", models=(model_a, model_b), resume=True, state_init="zeros", epochs=2)


# ------------------------------------------------ settings on resume, Ctrl-C


def test_config_resolved_takes_the_checkpoint_then_the_defaults():
    assert {name: getattr(TrainConfig().resolved(), name) for name in TRAIN_DEFAULTS} == TRAIN_DEFAULTS
    saved = {"learning_rate": 0.01, "epochs": 41, "patience": 3, "loss": "categorical-crossentropy",
             "from_logits": False}
    resolved = TrainConfig(resume=True, epochs=50).resolved(saved)
    assert (resolved.learning_rate, resolved.epochs, resolved.patience, resolved.from_logits) == (0.01, 50, 3, False)
    assert resolved.batch_size == 32 and TrainConfig(resume=True, patience=0).resolved(saved).patience is None
    assert TrainConfig(epochs=3, seed=1).given == ("epochs", "seed")


SGD = dict(optimizer="sgd", batch_size=4, shuffle=False, val_split=0.25, seed=3)


@pytest.mark.slow  # three trainings. Quick: a resume reaches an unbroken run's weights (test_resume_after_a_stop_mid_
# epoch_gives_the_weights_of_an_unbroken_run), keeps the run's learning rate, metrics and board when not given
# (test_train_cli's test_metrics_go_into_history_and_tensorboard_and_a_resume_keeps_them), and is refused an epoch
# the run has passed (test_first_hour's test_resume_to_an_epoch_the_run_has_passed_is_an_error_naming_epochs)
def test_resume_keeps_the_run_s_own_settings_and_refuses_an_epoch_it_has_passed(tmp_path):
    path = random_data(tmp_path / "train.h5", n=8)
    unbroken = train(path, tmp_path / "unbroken", epochs=3, learning_rate=0.01, **SGD)
    train(path, tmp_path / "run", epochs=2, learning_rate=0.01, **SGD)
    model_b = builders.step_b()
    config, done = resolve_config(TrainConfig(resume=True, epochs=3), model_b, out_dir=tmp_path / "run")
    assert (config.learning_rate, config.optimizer, config.batch_size, done) == (0.01, "sgd", 4, 2)

    class Info(TrainCallbacks):
        def run_started(self, info):
            self.info = info

    watch = Info()
    resumed = train(path, tmp_path / "run", resume=True, epochs=3, callbacks=watch)  # learning_rate not given
    assert (watch.info.first_epoch, watch.info.epochs, watch.info.learning_rate, watch.info.resumed) == (3, 3, 0.01,
                                                                                                          True)
    assert [row["loss"] for row in resumed] == [row["loss"] for row in unbroken]
    assert_same(saved_weights(tmp_path / "run"), saved_weights(tmp_path / "unbroken"))
    for epochs in (2, 3):
        with pytest.raises(ParameterError) as caught:
            train(path, tmp_path / "run", resume=True, epochs=epochs)
        assert str(caught.value) == (
            f"epochs: the run in '{tmp_path / 'run'}' has trained 3 epochs already (its models are those of epoch "
            f"3): expected epochs > 3 to train on, received epochs={epochs}.")


class InterruptAt(TrainCallbacks):
    """Ctrl-C in epoch `epoch` after its first batch."""

    def __init__(self, epoch):
        self.stop, self.epoch = epoch, 0

    def epoch_started(self, epoch, *, epochs, batches):
        self.epoch = epoch

    def batch_done(self, loss):
        if self.epoch == self.stop:
            raise KeyboardInterrupt


def test_ctrl_c_says_which_epoch_is_saved_and_the_run_resumes_from_it(tmp_path):
    path = random_data(tmp_path / "train.h5", n=8)
    with pytest.raises(TrainingInterrupted) as caught:
        train(path, tmp_path / "first", epochs=3, callbacks=InterruptAt(1), **SGD)
    assert isinstance(caught.value, KeyboardInterrupt) and caught.value.epoch == 0
    assert caught.value.message == (f"training was interrupted before its first epoch was saved; nothing was kept "
                                    f"in '{tmp_path / 'first'}'.")
    assert not (tmp_path / "first").exists()

    with pytest.raises(TrainingInterrupted) as caught:
        train(path, tmp_path / "run", epochs=3, callbacks=InterruptAt(3), **SGD)
    assert (caught.value.epoch, caught.value.epochs, caught.value.models_written) == (2, 3, False)
    assert caught.value.message == (f"training was interrupted: epoch 2 of 3 is saved in "
                                    f"'{tmp_path / 'run' / 'checkpoints'}' (no model files yet); continue it with "
                                    "resume=True.")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "history.csv"]  # no lock left
    assert len(train(path, tmp_path / "run", resume=True)) == 3  # epochs=3 from the checkpoint


def test_a_kill_while_the_models_are_written_is_finished_by_a_resume(tmp_path, monkeypatch):
    path = random_data(tmp_path / "train.h5", n=8)
    import cascade_cli.train.fit as training

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_models", killed)
    with pytest.raises(TrainingInterrupted) as caught:
        train(path, tmp_path / "run", epochs=2, **SGD)
    assert (caught.value.epoch, caught.value.models_written) == (2, False)
    monkeypatch.undo()
    assert trained_pair(tmp_path / "run") is None
    train(path, tmp_path / "run", resume=True)  # epochs == 2 == done: writes the pair it did not write
    assert trained_pair(tmp_path / "run")["epoch"] == 2


def test_the_run_holds_its_out_dir_and_tells_its_callbacks_the_split(tmp_path):
    path = random_data(tmp_path / "train.h5", n=8)

    class Probe(TrainCallbacks):
        def run_started(self, info):
            self.info = info

        def epoch_done(self, logs):
            with pytest.raises(ParameterError, match=r"is in use by another training run \(pid \d+\)"):
                prepare_out_dir(tmp_path / "run", resume=True)

    probe = Probe()
    train(path, tmp_path / "run", epochs=1, val_split=0.25, callbacks=probe)
    info = probe.info
    assert (info.train_samples, info.val_samples, info.replicas, info.strategy, info.first_epoch) == (6, 2, 1,
                                                                                                   "default", 1)
    assert info.device.startswith(("CPU", "GPU")) and info.warnings == () and info.from_logits is None


def test_split_warning_by_hand():
    assert split_warning(64, train_samples=1, val_samples=63, val_split=0.99) == (
        "val_split=0.99 of 64 samples leaves 1 sample to train on: lower val_split.")
    assert split_warning(4, train_samples=4, val_samples=0, val_split=0.1) == (
        "val_split=0.1 of 4 samples holds out no validation sample: val_loss is not measured; raise val_split, or "
        "pass val_split=0.")
    assert split_warning(4, train_samples=4, val_samples=0, val_split=0.0) is None
    assert split_warning(64, train_samples=57, val_samples=7, val_split=0.1) is None


# ------------------------------------------------ schedules, mixed precision


def test_learning_rate_schedules_by_hand():
    from cascade_cli.train.optimizers import learning_rate_schedule

    assert learning_rate_schedule("constant", learning_rate=0.5, total_steps=10) == 0.5
    exponential = learning_rate_schedule("exponential", learning_rate=2.0, total_steps=10)
    assert [float(exponential(step)) for step in (0, 5, 10)] == pytest.approx([2.0, 2.0 * 0.1 ** 0.5, 0.2])
    warm = learning_rate_schedule("constant", learning_rate=1.0, total_steps=10, warmup_steps=4)
    assert [float(warm(step)) for step in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    cosine = learning_rate_schedule("cosine", learning_rate=1.0, total_steps=6, warmup_steps=2)
    assert [float(cosine(step)) for step in range(6)] == pytest.approx(
        [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)], abs=1e-6)
    config = keras.optimizers.schedules.serialize(cosine)  # a saved optimizer's schedule comes back
    restored = keras.optimizers.schedules.deserialize(config)
    assert [float(restored(step)) for step in range(6)] == [float(cosine(step)) for step in range(6)]
    with pytest.raises(ParameterError, match="^lr_schedule: expected one of constant, cosine, exponential"):
        learning_rate_schedule("linear", learning_rate=1.0, total_steps=1)


def test_mixed_precision_pair_computes_in_float16_with_the_weights_given():
    from cascade_cli.train.fit import mixed_precision_pair

    model_a, model_b = builders.model_a(), builders.step_b()
    mixed_a, mixed_b = mixed_precision_pair(model_a, model_b)
    assert {layer.dtype_policy.name for layer in mixed_b.layers if not isinstance(layer, keras.layers.InputLayer)} == {
        "mixed_float16"}
    assert_same([mixed_a.get_weights(), mixed_b.get_weights()], [model_a.get_weights(), model_b.get_weights()])
    assert all(w.dtype == "float32" for w in mixed_a.weights + mixed_b.weights)
    assert mixed_a(builders.inputs(2, 3)).dtype == "float16"

    class Opaque(keras.Model):  # no get_config: cannot be rebuilt
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(4)

        def call(self, x):
            return self.dense(x)

    opaque = Opaque()
    opaque(builders.inputs(1, 3))
    with pytest.raises(ModelError, match="^model A cannot be rebuilt under the mixed_float16 policy for "
                                         "mixed_precision=True"):
        mixed_precision_pair(opaque, model_b)


def test_the_train_step_gives_a_feedback_cascade_the_flat_targets_and_the_sampling_probability():
    from cascade_cli.train.losses import loss_terms
    from cascade_cli.train.step import batch_loss

    class Recorder:  # stands for a feedback Cascade: what the step hands the runner
        feedback = False
        calls = []

        def run(self, inputs, steps, **options):
            self.calls.append(options)
            return tf.constant([[1.0, 2.0]]), None

    cascade = Recorder()
    loss = batch_loss(cascade, loss_terms("mse"), models=())
    targets, probability = tf.constant([[0.0, 0.0]]), tf.constant(0.25)
    assert float(loss(None, None, targets, sampling_probability=probability).loss) == pytest.approx(2.5)
    cascade.feedback = True
    loss(None, None, targets, sampling_probability=probability)
    loss(None, None, targets, training=False)
    plain, forced, scored = cascade.calls
    assert plain == {"training": True}  # no feedback: the runner's own defaults
    assert forced["training"] is True and forced["targets"] is targets and forced["sampling_probability"] is probability
    assert scored["training"] is False and scored["targets"] is targets and "sampling_probability" not in scored


def test_the_best_epoch_line_after_a_resume_counts_the_epochs_before_it(tmp_path):
    """Issue 30, defect 4: the lowest val_loss named at the end is the run's, not only this process' epochs'."""
    import io

    from rich.console import Console

    from cascade_cli.progress import fixed_loss, train_callbacks

    path = random_data(tmp_path / "train.h5", n=8)
    first = train(path, tmp_path / "run", epochs=1, learning_rate=0.01, **SGD)
    console = Console(file=io.StringIO(), width=200)
    with train_callbacks(console, enabled=False) as report:
        # a rate that overshoots: epoch 2's val_loss is worse than epoch 1's
        history = train(path, tmp_path / "run", resume=True, epochs=2, learning_rate=50.0, callbacks=report)
    assert history[0] == first[0] and history[1]["val_loss"] > first[0]["val_loss"]
    shown = console.file.getvalue()
    assert f"the lowest is epoch 1's, {fixed_loss(first[0]['val_loss']).strip()}." in shown, shown
    assert " *" not in shown.splitlines()[-2]  # epoch 2's row: not the lowest so far
