"""What `cascade train` does: check the run, train A and B jointly epoch after epoch, write the files; `evaluate`.

One `tf.GradientTape` covers both models (B alone with `freeze_a`); the loss is
averaged over the valid elements only (DESIGN section 5), which in value order
are exactly the rows the runner emits, so no mask is ever materialised. The
models' weight regularization losses (`kernel_regularizer=...`) are added to
it, as Keras' `Model.fit` adds `model.losses`.

A run is reproducible: every epoch is re-seeded from `(seed, epoch)` (Python,
NumPy and every `SeedGenerator` inside the two models, e.g. dropout:
`ReseedEachEpoch`, the callback a `CascadeModel.fit` takes too) and
visits the samples in `epoch_order(seed, epoch)`, with TensorFlow's
deterministic ops on. A checkpoint is written after every epoch
(`checkpoints.py`), so a killed run resumed with the same settings reaches
exactly the weights of an unbroken one; settings a resume does not give come
from that checkpoint (`resolve_config`). Ctrl-C ends `fit` with
`TrainingInterrupted`, naming the epoch saved. The cross-entropies read B's
outputs as logits or, when B ends in a softmax, as probabilities
(`resolve_from_logits`). Past one device, `distribute.py` replicates the
models and splits each global batch over the replicas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from cascade_cli.data import epoch_order, split_indices
from cascade_cli.errors import CascadeError, DataError, ModelError, ParameterError
from cascade_cli.run.models import check_inputs_fit
from cascade_cli.options import CROSSENTROPY_LOSSES, RunInfo, SamplingSchedule, StopRule, TrainCallbacks, TrainConfig
from cascade_cli.run.cascade import Cascade
from cascade_cli.train import distribute
from cascade_cli.train.callbacks import RunState
from cascade_cli.train.checkpoints import (
    CHECKPOINT_DIR,
    HISTORY_FILE,
    Checkpoints,
    check_out_dir,
    check_settings,
    latest_checkpoint,
    prepare_out_dir,
    run_settings,
    save_models,
    saved_settings,
    trained_pair,
    write_history,
)
from cascade_cli.train.keras_model import CascadeModel, ReseedEachEpoch
from cascade_cli.train.losses import (check_regularizers, gated_terms, loss_terms, metric_terms, regularization_loss,
                                      resolve_from_logits)
from cascade_cli.train.optimizers import has_schedule, learning_rate_schedule, make_optimizer
from cascade_cli.train.step import batch_loss, batch_signature, non_finite_error, step_function


def _evaluation_step(cascade, terms, data, *, models=(), metrics=(), ids=False, gate=False):
    """Returns a `tf.function` `(inputs, steps, targets) -> (sum, count, metrics)` with `training=False`."""
    loss = batch_loss(cascade, terms, models=models, metrics=metrics, ids=ids, gate=gate)

    @tf.function(input_signature=batch_signature(data), reduce_retracing=True)
    def evaluate(inputs, steps, targets):
        result = loss(inputs, steps, targets, training=False)
        return result.total, result.local_count, result.metrics

    return evaluate


def _penalty_now(models):
    """The models' regularization loss at their current weights, as a float, or None without regularizers."""
    penalty = regularization_loss(models)
    return None if penalty is None else float(penalty)


def _scores_over(step, data, indices, *, batch_size, penalty=None):
    """`(loss, [metric, ...])` over the valid elements of `indices` (loss plus `penalty`), or None for no samples."""
    if len(indices) == 0:
        return None
    total, count, sums = 0.0, 0.0, None
    for batch in data.batches(indices, batch_size=batch_size):
        batch_total, batch_count, measured = step(batch.inputs, batch.steps.astype(np.int64), batch.targets)
        total += float(batch_total)
        count += float(batch_count)
        pairs = [(float(pair[0]), float(pair[1])) for pair in measured]
        sums = pairs if sums is None else [(a + x, b + y) for (a, b), (x, y) in zip(sums, pairs)]
    loss = total / count if count else 0.0
    metrics = [a / b if b else 0.0 for a, b in (sums or [])]
    return (loss if penalty is None else loss + penalty), metrics


def _loss_over(step, data, indices, *, batch_size, penalty=None):
    """The mean loss over the valid elements of `indices` (plus `penalty`), or None when there are no samples."""
    scores = _scores_over(step, data, indices, batch_size=batch_size, penalty=penalty)
    return None if scores is None else scores[0]


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
    cascade = Cascade(model_a, model_b, state=state, state_init=state_init)
    _check_fits(cascade, data, loss=loss)
    check_regularizers((model_a, model_b))
    indices = np.arange(data.n_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    terms = loss_terms(loss, from_logits=resolve_from_logits(model_b, from_logits, loss=loss))
    step = _evaluation_step(cascade, terms, data)
    return _loss_over(step, data, indices, batch_size=batch_size, penalty=_penalty_now((model_a, model_b)))


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


def _length_error(run, data):
    """`val_length_mae`: the mean absolute error, over the validation pairs, of the lengths the run's generator gives.

    The models generate as `cascade.keras` does (`generator_settings`: its
    sampler, stop rule, `exclude_stop_step` and `max_steps`), and the lengths
    are compared with the file's steps (end rows not counted). None without a
    stop rule or a validation split.
    """
    if training_stop_rule(run.config) is None or len(run.val_indices) == 0:
        return None
    cascade = Cascade(*run.models, **{**run.generation, "jit_compile": False})
    errors = pairs = 0
    for batch in data.batches(run.val_indices, batch_size=run.config.batch_size):
        lengths = cascade.run(batch.inputs)[1].numpy()
        errors += int(np.abs(lengths - (batch.steps - int(data.end_token is not None))).sum())
        pairs += lengths.size
    return errors / pairs if pairs else None


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
    """Everything one prepared training run holds between epochs."""

    given: tuple  # the models passed to fit
    models: tuple  # the models trained: `given`, or their replicas under a strategy
    distributed: bool
    out_dir: Path
    chief: bool
    config: TrainConfig  # resolved: every setting set
    info: RunInfo
    optimizer: keras.optimizers.Optimizer
    step: Callable  # (inputs, steps, targets) -> (sum, count, penalty, metrics, finite): `step_function`
    evaluation: Callable  # (inputs, steps, targets) -> (sum, count, metrics), training=False
    epoch_batches: Callable  # (order) -> iterator of (emits, (inputs, steps, targets))
    train_indices: np.ndarray
    val_indices: np.ndarray
    keras_callbacks: keras.callbacks.CallbackList = None  # Keras' own (`_keras_callbacks`), driven each epoch
    state: RunState = None  # the history, settings and patience state, in `checkpoints/run_state.json`
    early_stopping: keras.callbacks.EarlyStopping = None  # with `patience`
    generation: dict = dataclasses.field(default_factory=dict)  # `generator_settings`: what cascade.keras runs

    @property
    def weights(self):
        return [*self.models[0].weights, *self.models[1].weights]


class _RunningLoss:
    """An epoch's training loss so far: the mean of its steps' losses (errors / count + penalty), each weighed by its
    count of valid elements, as `CascadeModel`'s loss tracker weighs them (the errors' mean is the epoch's own)."""

    def __init__(self, metrics=0):
        self.total, self.count, self.penalty = 0.0, 0.0, 0.0
        self.sums = [[0.0, 0.0] for _ in range(metrics)]

    def add(self, total, count, penalty, metrics=()):
        self.total += float(total)
        self.count += float(count)
        self.penalty += float(penalty) * float(count)
        for kept, pair in zip(self.sums, metrics):
            kept[0] += float(pair[0])
            kept[1] += float(pair[1])

    @property
    def metrics(self):
        """Each metric over the valid elements of the steps taken (0.0 before any)."""
        return [total / count if count else 0.0 for total, count in self.sums]

    @property
    def value(self):
        return (self.total + self.penalty) / self.count if self.count else 0.0


def _not_finite(what, value, *, epoch, batch, checkpoints, done):
    kept = f"the last good checkpoint (epoch {done}) is in '{checkpoints}'" if done else "no checkpoint was written"
    return non_finite_error(what, value, epoch=epoch, batch=batch, kept=f"this epoch was not saved and {kept}")


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
    data.with_stop_gate(bool(config.stop_gate))
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
        run.keras_callbacks = _keras_callbacks(run, data, tensorboard=config.tensorboard if chief else None)
        run.generation = generator_settings(config, b_form=cascade.b_spec.form,
                                            longest=int(data.file_steps.max(initial=0)))
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
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    distributed = config.strategy != "default"
    given = (model_a, model_b)
    if trained is not None:  # mixed precision: the copies train, the models given get their weights at the end
        model_a, model_b = trained
        cascade = Cascade(model_a, model_b, **runner_settings(config))
    batches_per_epoch = math.ceil(len(train_indices) / config.batch_size)
    rate = learning_rate_schedule(config.lr_schedule, learning_rate=config.learning_rate,
                                  total_steps=config.epochs * batches_per_epoch, warmup_steps=config.warmup_steps)
    with strategy.scope():
        if distributed:
            model_a, model_b = distribute.replicate(model_a, name="A"), distribute.replicate(model_b, name="B")
            cascade = Cascade(model_a, model_b, **runner_settings(config))
        variables = _trained_variables(model_a, model_b, freeze_a=config.freeze_a)
        optimizer = make_optimizer(config.optimizer, learning_rate=rate, clipnorm=config.clipnorm,
                                   mixed_precision=config.mixed_precision)
        optimizer.build(variables)  # before the first step: a lazily built Adam fails inside strategy.run
    terms = loss_terms(config.loss, from_logits=config.from_logits)
    metrics = tuple(metric_terms(name, loss=config.loss) for name in config.metrics)
    terms, metrics = gated_terms(config, terms, metrics, cascade.b_spec.output_size)
    ids = config.loss == "sparse-categorical-crossentropy"
    gate = bool(config.stop_gate)
    loss = batch_loss(cascade, terms, models=(model_a, model_b), metrics=metrics, ids=ids, gate=gate)
    sampling = None if config.sampling_schedule is None else SamplingSchedule.parse(config.sampling_schedule)
    if distributed:
        spec, epoch_batches = distribute.batches(strategy, data, batch_size=config.batch_size,
                                                 signature=batch_signature(data))
        step = step_function(loss, signature=spec, variables=variables, optimizer=optimizer, strategy=strategy,
                             sampling=sampling)
    else:
        step = step_function(loss, signature=batch_signature(data), variables=variables, optimizer=optimizer,
                             sampling=sampling)
        epoch_batches = functools.partial(_default_batches, data, batch_size=config.batch_size)
    replicas = int(strategy.num_replicas_in_sync)
    info = RunInfo(train_samples=len(train_indices), val_samples=len(val_indices), device=_device_text(strategy),
                   replicas=replicas, strategy=config.strategy, epochs=config.epochs, first_epoch=done + 1,
                   learning_rate=float(config.learning_rate), loss=config.loss, from_logits=config.from_logits,
                   resumed=config.resume,
                   warnings=_run_warnings(config, data, train_indices=train_indices, val_indices=val_indices,
                                          replicas=replicas))
    return _Run(given=given, models=(model_a, model_b), distributed=distributed or trained is not None,
                out_dir=out_dir, chief=chief, config=config, info=info, optimizer=optimizer, step=step,
                evaluation=_evaluation_step(cascade, terms, data, metrics=metrics, ids=ids, gate=gate),
                epoch_batches=epoch_batches, train_indices=train_indices, val_indices=val_indices)


def _keras_callbacks(run, data, *, tensorboard):
    """The callbacks of the run, told of each epoch as `Model.fit` tells them.

    `ReseedEachEpoch`; with `patience`, Keras' `EarlyStopping` on `val_loss`
    with `restore_best_weights`; `RunState` (the history and what a resume
    needs, written before each checkpoint; `history.csv` follows it); Keras'
    `TensorBoard`. They see a `CascadeModel` over the models trained, with
    the run's optimizer (TensorBoard logs its learning rate at each epoch's end).
    """
    config = run.config
    model = CascadeModel(*run.models, **runner_settings(config))
    model.optimizer = run.optimizer
    callbacks = [ReseedEachEpoch(config.seed)]
    if config.patience is not None:
        run.early_stopping = keras.callbacks.EarlyStopping(patience=config.patience, restore_best_weights=True)
        callbacks.append(run.early_stopping)
    run.state = RunState(run.out_dir / CHECKPOINT_DIR, settings=run_settings(config, data),
                         early_stopping=run.early_stopping, write=run.chief)
    callbacks.append(run.state)
    if tensorboard is not None:
        callbacks.append(keras.callbacks.TensorBoard(str(tensorboard), write_graph=False))
    return keras.callbacks.CallbackList(callbacks, model=model)


def _epoch_logs(row):
    """The logs `Model.fit` gives callbacks at an epoch's end: an epoch's figures, less `epoch` and those not taken."""
    return {key: float(value) for key, value in row.items() if key not in ("epoch", "seconds") and value is not None}


def _default_batches(data, order, *, batch_size):
    """Yields `(emits, (inputs, steps, targets))` for each batch of `order`, read on the host."""
    for batch in data.batches(order, batch_size=batch_size):
        yield len(batch.targets) > 0, (batch.inputs, batch.steps.astype(np.int64), batch.targets)


def _run_epoch(run, data, epoch, *, callbacks, checkpoints):
    """Trains epoch `epoch` (0-based) and takes its validation loss; returns its figures (`RunState` makes the row)."""
    config = run.config
    number = epoch + 1
    order = epoch_order(run.train_indices, seed=config.seed, epoch=epoch, shuffle=config.shuffle)
    callbacks.epoch_started(number, epochs=config.epochs,
                            batches=math.ceil(len(run.train_indices) / config.batch_size))
    running = _RunningLoss(len(config.metrics))
    for batch_number, (emits, batch) in enumerate(run.epoch_batches(order), start=1):
        if emits:  # a batch that emits nothing has nothing to learn from
            total, count, penalty, measured, finite = run.step(*batch)  # a non-finite step is not taken
            if not bool(finite):
                loss = float(total) / float(count) + float(penalty)
                what, value = ("training loss", loss) if not math.isfinite(loss) else ("gradient", "non-finite")
                raise _not_finite(what, value, epoch=number, batch=batch_number, checkpoints=checkpoints,
                                  done=epoch)
            running.add(total, count, penalty, measured)
        callbacks.batch_done(running.value)
    scores = _scores_over(run.evaluation, data, run.val_indices, batch_size=config.batch_size,
                          penalty=_penalty_now(run.models))
    val_loss, val_metrics = (None, [None] * len(config.metrics)) if scores is None else scores
    if val_loss is not None and not math.isfinite(val_loss):
        raise _not_finite("validation loss", val_loss, epoch=number, batch=None, checkpoints=checkpoints, done=epoch)
    row = {"epoch": number, "loss": running.value, "val_loss": val_loss}
    for name, value, val_value in zip(config.metrics, running.metrics, val_metrics):
        row[name], row[f"val_{name}"] = value, val_value
    length_error = _length_error(run, data)
    if length_error is not None:
        row["val_length_mae"] = length_error
    return row


def _finish(run, history):
    """Copies trained copies' weights back into the models given; the chief writes the pair and `history.csv` as one.

    The chief also writes `cascade.keras`, the whole generator (`CascadeModel`
    with the run's runner settings).
    """
    if run.distributed:
        for trained, model in zip(run.models, run.given):
            model.set_weights(trained.get_weights())
    if run.chief:
        generator = CascadeModel(*run.given, **run.generation)
        save_models(run.given, run.out_dir, history=history, generator=generator)


def _saved_epoch(out_dir):
    latest = latest_checkpoint(Path(out_dir) / CHECKPOINT_DIR)
    return 0 if latest is None else int(latest.rsplit("-", 1)[1])


def fit(model_a, model_b, data, *, out_dir, config, callbacks=None, strategy=None):
    """Trains A and B jointly on a training file and writes the results into `out_dir`.

    Each batch runs the cascade under one `tf.GradientTape`, takes the masked
    loss plus the models' weight regularization losses and one optimizer step
    over both models' trainable weights (B's only with `freeze_a`). After
    every epoch the validation loss is taken over the held-out samples and a
    checkpoint is written; with `patience`, the run stops once the validation
    loss has not improved for that many epochs, and the best weights are the
    ones kept and saved. The models passed in end with the final weights.
    The two models, `cascade.keras` (the whole generator, a `CascadeModel`
    with the run's `state` and `state_init`) and `history.csv` are written as
    one set at the end (`checkpoints.save_models`). Each step is
    `step.train_step`, the step `CascadeModel.train_step` takes too; a step
    whose loss or gradients are not finite is not taken, and the run stops
    there (`CascadeError`). With `mixed_precision`, copies of
    the models built under `mixed_float16` train (`mixed_precision_pair`)
    and the models given get their weights at the end; with `tensorboard`,
    Keras' `TensorBoard` callback writes each epoch's figures there, as
    `Model.fit` would (`train/` and `validation/`, tags `epoch_loss`, ...).

    Settings not given (None) come from the checkpoint on resume and from
    `TRAIN_DEFAULTS` otherwise (`resolve_config`). The run holds a lock on
    `out_dir` throughout; a run that fails before its first checkpoint removes
    the folder it created.

    With a `mirrored` or `multi-worker` strategy the models are cloned inside
    `strategy.scope()` (their variables must belong to the strategy), trained
    there, and their weights copied back at the end. Every global batch is the
    one the default strategy takes, split across the replicas, and a step
    means the same on any number of replicas. Every worker checkpoints each
    epoch (the chief into `out_dir`, the others into a temporary folder they
    remove); only the chief writes `history.csv` and the models. Validation
    runs whole on every worker.

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
            no checkpoint (with it), or is in use by another training run; a
            checkpoint made with other settings or models; a resumed run
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
            history = _train(run, data, callbacks=callbacks)
        except KeyboardInterrupt as exc:
            if isinstance(exc, TrainingInterrupted):
                raise
            raise TrainingInterrupted(epoch=_saved_epoch(run.out_dir), epochs=config.epochs, out_dir=run.out_dir,
                                      models_written=trained_pair(run.out_dir) is not None) from None
    return history


def _train(run, data, *, callbacks):
    config, stop = run.config, run.early_stopping
    callbacks.run_started(run.info)
    with Checkpoints(run.out_dir, models=run.models, optimizer=run.optimizer,
                     settings=run.state.settings, chief=run.chief) as checkpoints:
        done = 0
        if config.resume:
            checkpoints.restore()
            done = _saved_epoch(run.out_dir)
            if not has_schedule(run.optimizer):  # a schedule is rebuilt from the settings; a constant rate is set
                run.optimizer.learning_rate = float(config.learning_rate)
        run.keras_callbacks.on_train_begin()
        try:
            history = run.state.resume(done)  # after EarlyStopping's on_train_begin: its state of those epochs
            if config.resume:
                callbacks.resumed(epoch=done, history=list(history))
            stopped = stop is not None and stop.wait >= stop.patience
            for epoch in range(done, config.epochs if not stopped else 0):
                run.keras_callbacks.on_epoch_begin(epoch)
                row = _run_epoch(run, data, epoch, callbacks=callbacks, checkpoints=checkpoints.folder)
                run.keras_callbacks.on_epoch_end(epoch, _epoch_logs(row))  # the state first
                checkpoints.save(epoch + 1)
                if run.chief:  # after the checkpoint: a history.csv always goes with one
                    write_history(run.out_dir / HISTORY_FILE, run.state.history)
                callbacks.epoch_done(dict(run.state.history[-1]))
                stopped = bool(getattr(run.keras_callbacks.model, "stop_training", False))
                if stopped:
                    break
        finally:
            run.keras_callbacks.on_train_end()  # EarlyStopping puts the best weights back
    history = list(run.state.history)
    if stopped:
        callbacks.stopped_early(epoch=len(history), best_epoch=stop.best_epoch + 1)
    _finish(run, history)
    callbacks.run_finished(list(history))
    return history
