"""What `cascade train` does: check the run, then `CascadeModel.fit` with Keras' callbacks, then write the files.

The command builds a `CascadeModel` over A and B (their replicas under a
strategy, their `mixed_float16` copies with `mixed_precision`), compiles it
with the run's loss, metrics, stop gate, end token and scheduled sampling,
and calls `fit` on `data.dataset` streams of the training and validation
samples. The callbacks are Keras' own where Keras has them: `BackupAndRestore`
(in `checkpoints/backup/`, the weights, the optimizer and the epoch, two
copies kept), `EarlyStopping(restore_best_weights=True)` with `patience`,
`TensorBoard`; and cascade's own for the rest: `ReseedEachEpoch` (every epoch
re-seeded from `(seed, epoch)`), `RunState` (the history, `history.csv`, the
settings and what a resume needs), `ShowProgress` (the rich display).
`CascadeModel.fit` refuses a non-finite step or validation loss before any
callback keeps it. A run is reproducible: the data order is `epoch_order(seed,
epoch)`, TensorFlow's deterministic ops are on, so a killed run resumed with
the same settings reaches exactly the weights of an unbroken one; settings a
resume does not give come from its state (`resolve_config`). Ctrl-C ends
`fit` with `TrainingInterrupted`, naming the epoch saved. At the end the
models, `cascade.keras` and `history.csv` are written as one set
(`checkpoints.save_models`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cascade_cli.atomic import is_no_space, no_space_error
from cascade_cli.data import dataset, split_indices
from cascade_cli.errors import CascadeError, DataError, ModelError, ParameterError
from cascade_cli.options import CROSSENTROPY_LOSSES, RunInfo, StopRule, TrainCallbacks, TrainConfig
from cascade_cli.run.cascade import Cascade
from cascade_cli.run.models import check_inputs_fit
from cascade_cli.train import distribute
from cascade_cli.train.callbacks import RunState, ShowProgress
from cascade_cli.train.checkpoints import (
    BACKUP_DIR,
    CHECKPOINT_DIR,
    HISTORY_FILE,
    RestoredBackup,
    backed_up_epoch,
    check_out_dir,
    check_settings,
    prepare_out_dir,
    run_settings,
    save_models,
    saved_settings,
    trained_pair,
    write_history,
)
from cascade_cli.train.keras_model import CascadeModel, ReseedEachEpoch
from cascade_cli.train.losses import check_regularizers, resolve_from_logits
from cascade_cli.train.optimizers import learning_rate_schedule, make_optimizer
from cascade_cli.train.step import NonFiniteStep, non_finite_error


def _keras_metric(name, *, loss):
    """The Keras metric `--metrics NAME` records over the valid rows: `mse`, `mae` or `accuracy` (the target's argmax
    or, for token ids, the id), named as the command names it."""
    if name == "accuracy":
        if loss == "sparse-categorical-crossentropy":
            return keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        return keras.metrics.CategoricalAccuracy(name="accuracy")
    kind = {"mse": keras.metrics.MeanSquaredError, "mae": keras.metrics.MeanAbsoluteError}[name]
    return kind(name=name)


def evaluate(model_a, model_b, data, *, indices=None, loss="mse", from_logits=None, state="reset",
             state_init="zeros", batch_size=32):
    """Returns the loss of the two models over samples of a training file, as `fit` reports `val_loss`.

    Args:
        model_a: a `keras.Model`, `(batch, Ta, F) -> (batch, Ta, H)`.
        model_b: a step- or sequence-form `keras.Model`.
        data: an open `TrainingData`.
        indices: the samples to score (all when None).
        loss: one of `LOSSES`.
        from_logits: how a cross-entropy reads B's outputs; None detects it
            (`resolve_from_logits`).
        state: the runner's state mode.
        state_init: B's initial state, one of `STATE_INITS`.
        batch_size: samples per call.

    Returns:
        The loss averaged over every valid element of those samples (0.0 when
        they emit nothing) plus the models' regularization loss, or None for
        no samples.
    """
    model = CascadeModel(model_a, model_b, state=state, state_init=state_init)
    _check_fits(model.cascade, data, loss=loss)
    check_regularizers((model_a, model_b))
    indices = np.arange(data.n_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return None
    model.compile("sgd", loss=loss, from_logits=from_logits)
    stream = dataset(data.path, batch_size=batch_size, shuffle=False, indices=indices)
    return float(model.evaluate(stream, verbose=0, return_dict=True)["loss"])


# ------------------------------------------------------------ checks, seeds


def _check_fits(cascade, data, *, loss, gate=False):
    """Raises `DataError` when the training file does not fit the two models (and the loss's targets)."""
    name = f"'{data.path}'"
    check_inputs_fit(cascade.a_spec, (data.n_samples, data.outer_steps, data.features),
                     where=f"inputs in {name} (key 'inputs')")
    emits = cascade.b_spec.output_size
    scored = emits - int(gate)  # the columns the loss reads
    if loss in CROSSENTROPY_LOSSES and scored < 2:
        raise ParameterError(
            "loss", f"loss={loss!r} is a softmax over B's outputs, but B emits O={scored} "
            f"{'beside the stop gate ' if gate else ''}per step: one output makes the loss 0 whatever B emits; "
            "expected O >= 2 token scores, or loss='mse'.")
    if loss == "sparse-categorical-crossentropy":
        if data.output_size != 1 or data.targets_dtype.kind not in "iu":
            raise DataError(
                f"targets in {name} (key 'targets') have {data.output_size} {data.targets_dtype} value"
                f"{'' if data.output_size == 1 else 's'} per step: sparse-categorical-crossentropy expects one "
                f"integer token id per step, (sum(steps), 1) or (N, Ta, L, 1), each in [0, {emits})."
            )
        return
    if gate and data.output_size != emits - 1:
        raise DataError(
            f"targets in {name} (key 'targets') have O={data.output_size} values per step but model B emits "
            f"O={emits}, the last a stop gate: expected O - 1 = {emits - 1} (--stop-gate)."
        )
    if not gate and data.output_size != emits:
        raise DataError(
            f"targets in {name} (key 'targets') have O={data.output_size} values per step but model B "
            f"emits O={emits}."
        )


def training_stop_rule(config):
    """The stop rule a run's model is meant to generate with, or None: the gate with `stop_gate`, else the end token."""
    if config.stop_gate:
        return StopRule.gate()
    if config.append_end_token is not None:
        return StopRule.token(config.append_end_token)
    return None


def generator_settings(config, *, b_form, longest):
    """The runner settings the run's `cascade.keras` generates with: one home for `val_length_mae` and the file.

    A run that implies a stop (`append_end_token`, `stop_gate`) generates
    with it: the end token's rule with `exclude_stop_step` (the end token is
    not a value) or the gate, up to `max_steps = longest + 1`, and the
    `greedy` sampler for a token loss (a step-form B fed back the token it
    picked, as it was trained on one-hot targets); `config.max_steps`, when
    given, instead of `longest + 1`. Else the runner settings.

    Args:
        config: a resolved `TrainConfig`.
        b_form: B's form, `"step"` or `"sequence"`.
        longest: the longest inner sequence of the training file (end rows not counted).
    """
    settings = runner_settings(config)
    rule = training_stop_rule(config)
    if rule is None:
        return settings
    tokens = config.loss in CROSSENTROPY_LOSSES and rule.kind == "token" and b_form == "step"
    max_steps = longest + 1 if config.max_steps is None else config.max_steps
    return {**settings, "stop_rule": rule, "exclude_stop_step": rule.kind == "token", "max_steps": max_steps,
            "sampler": "greedy" if tokens else "identity"}


def _end_token(cascade, data, config):
    """Applies `append_end_token` to `data` (`TrainingData.with_end_token`) once the id is checked against B."""
    token, size = config.append_end_token, cascade.b_spec.output_size - int(bool(config.stop_gate))
    if token is not None and token >= size:
        where = "beside the stop gate" if config.stop_gate else f"B emits O={size}"
        raise ParameterError("append_end_token", f"expected a token id in [0, {size}) ({where}), received {token}.")
    data.with_end_token(token, ids=config.loss == "sparse-categorical-crossentropy")


def split_warning(n_samples, *, train_samples, val_samples, val_split):
    """The warning a split deserves, or None: fewer than 2 training samples, or no validation sample.

    Args:
        n_samples: the samples in the training file.
        train_samples: how many the split trains on.
        val_samples: how many it holds out.
        val_split: the fraction asked for.

    Returns:
        One sentence naming `val_split`, or None when the split is sensible.
    """
    if n_samples and train_samples < 2:
        return (f"val_split={val_split:g} of {n_samples} samples leaves {train_samples} sample"
                f"{'' if train_samples == 1 else 's'} to train on: lower val_split.")
    if val_split > 0 and val_samples == 0:
        return (f"val_split={val_split:g} of {n_samples} samples holds out no validation sample: val_loss is not "
                "measured; raise val_split, or pass val_split=0.")
    return None


def _trained_variables(model_a, model_b, *, freeze_a):
    return list(model_b.trainable_variables if freeze_a else model_a.trainable_variables + model_b.trainable_variables)


# ------------------------------------------------------------------- fit


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (`KeyboardInterrupt`) during `fit`, after nothing half-written was left behind.

    A `KeyboardInterrupt` still, so code that catches that catches this too.

    Attributes:
        epoch: the last epoch saved in a checkpoint (0: none; the run starts
            afresh then).
        epochs: the epoch the run was training up to.
        out_dir: the run's folder, a `Path`.
        models_written: whether `model_a.keras` and `model_b.keras` are a
            complete pair of the run's last epoch.
    """

    def __init__(self, *, epoch, epochs, out_dir, models_written):
        self.epoch, self.epochs, self.out_dir, self.models_written = epoch, epochs, Path(out_dir), models_written
        super().__init__(self.message)

    @property
    def message(self):
        """What was kept and how to go on, in Python names."""
        if self.epoch == 0:
            return f"training was interrupted before its first epoch was saved; nothing was kept in '{self.out_dir}'."
        models = "" if self.models_written else " (no model files yet)"
        return (f"training was interrupted: epoch {self.epoch} of {self.epochs} is saved in "
                f"'{self.out_dir / CHECKPOINT_DIR}'{models}; continue it with resume=True.")


@dataclasses.dataclass
class _Run:
    """Everything one prepared training run holds: the model `fit` trains, its streams and its callbacks."""

    given: tuple  # the models passed to fit
    model: CascadeModel  # over the models trained: `given`, their replicas, or their mixed_float16 copies
    out_dir: Path
    chief: bool
    config: TrainConfig  # resolved: every setting set
    info: RunInfo
    train: tf.data.Dataset
    validation: tf.data.Dataset  # None without validation samples
    settings: dict  # `run_settings`: recorded in the state, checked on resume
    generation: dict  # `generator_settings`: what cascade.keras runs
    a_trainable: bool = True  # model A's `trainable` as given (`freeze_a` sets it False while training)
    scratch: Path = None  # a non-chief worker's backup folder, removed at the end


def resolve_config(config, model_b, *, out_dir):
    """Returns `config` with every setting filled in: from the checkpoint in `out_dir` on resume, else the defaults.

    `from_logits` is resolved against B (`resolve_from_logits`). Nothing is
    written.

    Returns:
        `(resolved, epochs_done)`: the `TrainConfig` and the epochs the
        checkpoint holds (0 for a new run).

    Raises:
        ParameterError: (`resume`) no checkpoint, an unreadable one, or one
            made with other `RESUME_SETTINGS`; (`epochs`) a resumed run asked
            to end at an epoch it has passed, or that it has finished.
    """
    saved = saved_settings(out_dir) if config.resume else {}
    resolved = config.resolved(saved)
    resolved = dataclasses.replace(
        resolved, from_logits=resolve_from_logits(model_b, resolved.from_logits, loss=resolved.loss))
    done = int(saved.get("epochs_done", 0))
    if config.resume:
        wanted = run_settings(resolved, _NoData)
        del wanted["samples"]  # the data are compared once the models are restored
        check_settings(Path(out_dir) / CHECKPOINT_DIR, saved, wanted)
        finished = trained_pair(out_dir)
        if resolved.epochs < done or (resolved.epochs == done and finished and finished.get("epoch") == done):
            raise ParameterError(
                "epochs", f"the run in '{out_dir}' has trained {done} epoch{'' if done == 1 else 's'} already "
                f"(its models are those of epoch {done}): expected epochs > {done} to train on, received "
                f"epochs={resolved.epochs}."
            )
    return resolved, done


class _NoData:
    """Stands for the data in `run_settings` when only the settings are compared."""

    n_samples = outer_steps = features = output_size = 0


def _device_text(strategy):
    """Where the run computes: `"GPU (name)"`, `"2 GPUs"` or `"CPU"`."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    if len(gpus) > 1:
        return f"{len(gpus)} GPUs"
    try:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name")
    except (ValueError, RuntimeError):
        name = None
    return f"GPU ({name})" if name else "GPU"


def _run_warnings(config, data, *, train_indices, val_indices, replicas):
    warnings = []
    split = split_warning(data.n_samples, train_samples=len(train_indices), val_samples=len(val_indices),
                          val_split=config.val_split)
    if split:
        warnings.append(split)
    if config.strategy == "mirrored" and replicas == 1:
        warnings.append("strategy='mirrored' found one device, so it trains on 1 replica, as the default "
                        "strategy does; make more logical CPU devices or use more GPUs to mirror.")
    return tuple(warnings)


def _prepare(model_a, model_b, data, *, out_dir, config, strategy, done):
    """Checks the models, the data and the settings, then builds the run; nothing is written before the checks.

    Returns:
        `(run, folder)`: the `_Run` and the locked `RunFolder` (None on a
        non-chief worker of a new run).
    """
    cascade = Cascade(model_a, model_b, **runner_settings(config))
    _check_fits(cascade, data, loss=config.loss, gate=bool(config.stop_gate))
    _end_token(cascade, data, config)
    check_regularizers((model_a, model_b))
    if data.n_samples == 0:
        raise DataError(f"'{data.path}' holds no samples: expected at least one to train on.")
    if not data.steps.any():
        raise DataError(f"steps in '{data.path}' (key 'steps') are all 0 (shape {data.steps.shape}): there is no "
                        "target to learn from; expected at least one inner step (or --append-end-token to learn to "
                        "emit nothing).")
    train_indices, val_indices = split_indices(data.n_samples, val_split=config.val_split, seed=config.seed)
    if config.patience is not None and len(val_indices) == 0:
        raise ParameterError("patience", f"needs a validation set, but val_split={config.val_split} of "
                                         f"{data.n_samples} samples keeps none: raise val_split.")
    if not _trained_variables(model_a, model_b, freeze_a=config.freeze_a):
        raise CascadeError("there is nothing to train: the models have no trainable weights.")
    if config.tensorboard is not None:
        check_out_dir(config.tensorboard, parameter="tensorboard", holding=" for the event files")
    strategy = distribute.strategy_for(config.strategy, strategy)
    chief = distribute.is_chief(strategy)
    trained = mixed_precision_pair(model_a, model_b, **runner_settings(config)) if config.mixed_precision else None
    sparse = config.loss == "sparse-categorical-crossentropy"
    data.check_finite(token_ids=cascade.b_spec.output_size if sparse else None)  # bad data leaves no out dir
    folder = (prepare_out_dir(out_dir, resume=config.resume, lock=chief, overwrite=config.overwrite)
              if chief or config.resume else None)
    try:
        run = _build(model_a, model_b, data, cascade, out_dir=Path(out_dir), config=config, strategy=strategy,
                     chief=chief, train_indices=train_indices, val_indices=val_indices, done=done, trained=trained)
    except BaseException:
        if folder is not None:
            folder.__exit__(CascadeError, None, None)
        raise
    return run, folder


def runner_settings(config):
    """The `Cascade` settings of a resolved `TrainConfig`: one home for what training runs the runner with."""
    settings = {"state": config.state, "state_init": config.state_init, "feedback": config.feedback,
                "feedback_start": config.feedback_start}
    return settings if config.jit_compile is None else {**settings, "jit_compile": config.jit_compile}


def mixed_precision_pair(model_a, model_b, **settings):
    """Copies of A and B built under the `mixed_float16` policy (float16 compute, float32 weights), holding their weights.

    Each layer is rebuilt from its config with `dtype="mixed_float16"` (the
    inputs stay as they are), as a model made under
    `keras.mixed_precision.set_global_policy("mixed_float16")` would be.

    Raises:
        ModelError: a model that cannot be rebuilt from its config, or a pair
            the runner cannot run in mixed precision (its reason).
    """
    def mixed(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = "mixed_float16"
        return type(layer).from_config(config)

    copies = []
    for name, model in zip("AB", (model_a, model_b)):
        try:
            copy = keras.models.clone_model(model, clone_function=mixed)
            copy.set_weights(model.get_weights())
        except (TypeError, ValueError, NotImplementedError, AttributeError) as exc:
            raise ModelError(
                f"model {name} cannot be rebuilt under the mixed_float16 policy for mixed_precision=True: "
                f"expected a functional or Sequential model of built-in layers; {_first_line(exc)} Train it "
                "without mixed_precision.") from exc
        copies.append(copy)
    try:
        Cascade(*copies, **settings)
    except (ModelError, ParameterError) as exc:
        raise ModelError(f"the two models cannot run in mixed precision (mixed_precision=True): {exc} Train "
                         "them without mixed_precision.") from exc
    return tuple(copies)


def _first_line(exc):
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__).rstrip(".") + "."


def _build(model_a, model_b, data, cascade, *, out_dir, config, strategy, chief, train_indices, val_indices, done,
           trained=None):
    """The `CascadeModel` the run fits, compiled with the run's settings, and the streams it reads."""
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    given, a_trainable = (model_a, model_b), model_a.trainable
    if trained is not None:  # mixed precision: the copies train, the models given get their weights at the end
        model_a, model_b = trained
    batches_per_epoch = math.ceil(len(train_indices) / config.batch_size)
    rate = learning_rate_schedule(config.lr_schedule, learning_rate=config.learning_rate,
                                  total_steps=config.epochs * batches_per_epoch, warmup_steps=config.warmup_steps)
    generation = generator_settings(config, b_form=cascade.b_spec.form, longest=int(data.file_steps.max(initial=0)))
    gate = {"stop_gate": True, "stop_weight": float(config.stop_weight if config.stop_weight is not None else 1.0),
            "stop_pos_weight": float(config.stop_pos_weight if config.stop_pos_weight is not None else 1.0)}
    with strategy.scope():
        if config.strategy != "default":
            model_a, model_b = distribute.replicate(model_a, name="A"), distribute.replicate(model_b, name="B")
        if config.freeze_a:  # Keras' rule: a frozen model trains nothing and its weight penalties drop out
            model_a.trainable = False
        model = CascadeModel(model_a, model_b, **generation, window=config.window)
        optimizer = make_optimizer(config.optimizer, learning_rate=rate, clipnorm=config.clipnorm,
                                   mixed_precision=config.mixed_precision)
        scheduled = config.sampling_schedule is not None
        model.compile(optimizer, loss=config.loss, from_logits=config.from_logits,
                      metrics=[_keras_metric(name, loss=config.loss) for name in config.metrics],
                      **(gate if config.stop_gate else {}), append_end_token=config.append_end_token,
                      sampling_probability=config.sampling_schedule,
                      training_sampler="identity" if scheduled else None, jit_compile=False)
    stream = dict(batch_size=config.batch_size)
    replicas = int(strategy.num_replicas_in_sync)
    info = RunInfo(train_samples=len(train_indices), val_samples=len(val_indices), device=_device_text(strategy),
                   replicas=replicas, strategy=config.strategy, epochs=config.epochs, first_epoch=done + 1,
                   learning_rate=float(config.learning_rate), loss=config.loss, from_logits=config.from_logits,
                   resumed=config.resume,
                   warnings=_run_warnings(config, data, train_indices=train_indices, val_indices=val_indices,
                                          replicas=replicas))
    settings = run_settings(config, data)
    if config.resume:  # the data too, now that they are open: a resume on another file is refused
        check_settings(out_dir / CHECKPOINT_DIR, saved_settings(out_dir), settings)
    validation = dataset(data.path, shuffle=False, indices=val_indices, **stream) if len(val_indices) else None
    return _Run(given=given, model=model, out_dir=out_dir, chief=chief, config=config, info=info,
                train=dataset(data.path, shuffle=config.shuffle, seed=config.seed, indices=train_indices, **stream),
                validation=validation, settings=settings, generation=generation, a_trainable=a_trainable)


def _callbacks(run, display):
    """The callbacks `fit` is given, in the order they are told of each epoch.

    `ReseedEachEpoch`; with `patience`, Keras' `EarlyStopping` on `val_loss`
    with `restore_best_weights`; `RunState` (the history and what a resume
    needs, written before the backup: never behind it); Keras'
    `BackupAndRestore` (`checkpoints.RestoredBackup`); `history.csv`, after
    the backup, so one always goes with a backup; Keras' `TensorBoard`; the
    display (`ShowProgress`). A non-chief worker of a multi-worker run backs
    up into a temporary folder and writes nothing else.
    """
    config = run.config
    folder = run.out_dir / CHECKPOINT_DIR
    stop = None
    if config.patience is not None:
        stop = keras.callbacks.EarlyStopping(patience=config.patience, restore_best_weights=True)
    state = RunState(folder, settings=run.settings, early_stopping=stop, write=run.chief)
    backup = folder
    if not run.chief:
        run.scratch = Path(tempfile.mkdtemp(prefix="cascade-worker-backup-"))
        if config.resume:  # the chief's backup, read by every worker
            shutil.copytree(folder / BACKUP_DIR, run.scratch / BACKUP_DIR)
        backup = run.scratch
    callbacks = [ReseedEachEpoch(config.seed), *([stop] if stop is not None else []), state, RestoredBackup(backup)]
    if run.chief:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: write_history(run.out_dir / HISTORY_FILE, state.history)))
        if config.tensorboard is not None:
            callbacks.append(keras.callbacks.TensorBoard(str(config.tensorboard), write_graph=False))
    callbacks.append(ShowProgress(display, run_state=state))
    return callbacks, state, stop


def _finish(run, history):
    """Copies trained copies' weights back into the models given; the chief writes the pair and `history.csv` as one.

    The chief also writes `cascade.keras`, the whole generator (`CascadeModel`
    with the run's generation settings).
    """
    trained = (run.model.model_a, run.model.model_b)
    trained[0].trainable = run.a_trainable  # as it was given: freezing was the run's, not the model's
    if trained != run.given:
        for copy, model in zip(trained, run.given):
            model.set_weights(copy.get_weights())
    if run.chief:
        generator = CascadeModel(*run.given, **run.generation)
        save_models(run.given, run.out_dir, history=history, generator=generator)


def fit(model_a, model_b, data, *, out_dir, config, callbacks=None, strategy=None):
    """Trains A and B jointly on a training file and writes the results into `out_dir`.

    Builds a `CascadeModel` over the two models, compiles it with the run's
    settings and calls its `fit` (`_callbacks` lists what it is given): each
    batch is `CascadeModel.train_step`, the masked loss plus the models' weight
    regularization losses (a frozen A's drop out, as Keras drops a frozen
    layer's) and one optimizer step over the trainable weights (B's only with
    `freeze_a`). After every epoch the validation loss is taken over the
    held-out samples and the run is backed up; with `patience`, the run stops
    once the validation loss has not improved for that many epochs, and the
    best weights are the ones kept and saved. The models passed in end with
    the final weights. The two models, `cascade.keras` (the whole generator,
    a `CascadeModel` with the run's generation settings) and `history.csv`
    are written as one set at the end (`checkpoints.save_models`). A step
    whose loss or gradients are not finite is not taken, and the run stops
    there (`CascadeError`, naming the last good backup). With
    `mixed_precision`, copies of the models built under `mixed_float16` train
    (`mixed_precision_pair`, with Keras' `LossScaleOptimizer`) and the models
    given get their weights at the end; with `tensorboard`, Keras'
    `TensorBoard` callback writes each epoch's figures there.

    Settings not given (None) come from the run's state on resume and from
    `TRAIN_DEFAULTS` otherwise (`resolve_config`). The run holds a lock on
    `out_dir` throughout; a run that fails before its first backup removes
    the folder it created.

    With a `mirrored` or `multi-worker` strategy the models are cloned inside
    `strategy.scope()` (their variables must belong to the strategy), trained
    there by Keras' `fit` (each global batch split over the replicas), and
    their weights copied back at the end. Only the chief writes into
    `out_dir`; the other workers back up into a temporary folder they remove.

    Args:
        model_a: a `keras.Model`, `(batch, Ta, F) -> (batch, Ta, H)`; trained in place.
        model_b: a step- or sequence-form `keras.Model`; trained in place.
        data: an open `TrainingData`.
        out_dir: the folder for `checkpoints/`, `history.csv`, `model_a.keras`,
            `model_b.keras` and `cascade.keras`; created if missing (with
            its missing parents); with `config.overwrite` an earlier run in it
            is replaced.
        config: a `TrainConfig`.
        callbacks: a `TrainCallbacks` (progress), or None.
        strategy: the strategy `distribute.make_strategy(config.strategy)`
            returned, or None to make it here (too late for `multi-worker`,
            which must be made before any other TensorFlow work).

    Returns:
        The history, one dict per epoch (earlier epochs of a resumed run
        included): `{"epoch" (1-based), "loss", "val_loss" (None without a
        validation set), then each metric and its `val_` figure, "seconds"}`. Both losses include the regularization
        losses, as Keras' do.

    Raises:
        ParameterError: `out_dir` holds an earlier run (without `resume`) or
            no backup (with it), or is in use by another training run; a
            backup made with other settings, data or models; a resumed run
            whose `epochs` it has already reached; `patience` without
            validation samples; a strategy that does not match `config.strategy`.
        CascadeError: a loss that is not finite (nothing of that epoch is
            saved), or nothing to train.
        DataError: the training file does not fit the models or holds
            non-finite values; the disk filled up.
        ModelError: the two models do not fit together, use an activity
            regularizer, or cannot be cloned for a distribution strategy.
        TrainingInterrupted: Ctrl-C; it says which epoch is saved.
    """
    callbacks = callbacks or TrainCallbacks()
    config, done = resolve_config(config, model_b, out_dir=out_dir)
    run, folder = _prepare(model_a, model_b, data, out_dir=out_dir, config=config, strategy=strategy, done=done)
    with folder or contextlib.nullcontext():
        try:
            return _train(run, callbacks)
        except KeyboardInterrupt as exc:
            if isinstance(exc, TrainingInterrupted):
                raise
            raise TrainingInterrupted(epoch=backed_up_epoch(run.out_dir / CHECKPOINT_DIR) or 0, epochs=config.epochs,
                                      out_dir=run.out_dir,
                                      models_written=trained_pair(run.out_dir) is not None) from None


def _train(run, display):
    config, model = run.config, run.model
    folder = run.out_dir / CHECKPOINT_DIR
    callbacks, state, stop = _callbacks(run, display)
    display.run_started(run.info)
    done = backed_up_epoch(folder) if config.resume else 0
    if config.resume:
        display.resumed(epoch=done, history=state.resume(done))
    stopped_before = stop is not None and stop.wait >= stop.patience  # the run had stopped early already
    try:
        model.fit(run.train, validation_data=run.validation, epochs=done if stopped_before else config.epochs,
                  callbacks=callbacks, verbose=0, shuffle=False)  # the streams shuffle themselves
    except NonFiniteStep as exc:  # the command's wording: which backup the run can resume from
        kept = (f"the last good backup (epoch {exc.epoch - 1}) is in '{folder / BACKUP_DIR}'" if exc.epoch > 1
                else "no backup was written")
        raise non_finite_error(exc.what, exc.value, epoch=exc.epoch, batch=exc.batch,
                               kept=f"this epoch was not saved and {kept}") from None
    except OSError as exc:
        if is_no_space(exc):
            raise no_space_error(folder) from exc
        raise
    finally:
        if run.scratch is not None:
            shutil.rmtree(run.scratch, ignore_errors=True)
    if stopped_before:
        state.resume(done)
        model.set_weights(stop.best_weights)
    history = list(state.history)
    if stop is not None and (stop.stopped_epoch > 0 or stopped_before):
        display.stopped_early(epoch=len(history), best_epoch=stop.best_epoch + 1)
    _finish(run, history)
    display.run_finished(list(history))
    return history
