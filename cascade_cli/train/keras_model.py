"""`CascadeModel(keras.Model)`: the cascade as a Keras model, with compile / fit / predict / save and a serving export.

A Keras user gets the usual workflow: `compile(optimizer, loss, metrics)`,
`fit` with any stock callback, `predict`, `save("g.keras")` and
`keras.saving.load_model("g.keras")` in safe mode (no `custom_objects` once
this module is imported: the class is registered as
`"cascade_cli>CascadeModel"`, and A and B are nested in its config, so a
`Lambda` inside either is still refused in safe mode).

Data: `x = (inputs (N, Ta, F), steps (N, Ta))` and `y` = padded targets
`(N, Ta, L, O)`, entries past `steps` ignored (numpy arrays, or a
`tf.data.Dataset` yielding `((inputs, steps), targets)`). Each step runs the
packed runner (`cascade_cli.run.cascade.Cascade`) on the given steps; the loss is
DESIGN section 5's, averaged over the valid elements only
(`loss_terms`), in float32, plus the models' weight regularization
losses (`regularization_loss`). The step itself is `cascade
train`'s (`step.train_step`): a step whose loss or gradients are not finite
is not taken, and `fit` stops there with a `CascadeError`, as the command does.
`cascade_cli.data.dataset(path, ...)` streams an HDF5 training file into `fit`. Under a
`tf.distribute` strategy each replica divides its errors by the global count
of valid elements and adds `1 / replicas` of the penalty, so the replicas'
gradients add up to the global batch's. Build (and compile) the model inside
`strategy.scope()`. Any global batch splits over the replicas, as `cascade
train` splits it (Keras 3.15 averaged the first distributed batch over the
replicas to build the model, which needed an even split; `CascadeModel`
builds from one replica's part).

`export_saved_model` writes a TensorFlow SavedModel that runs without
`cascade_cli` (or Keras) installed.
"""

from __future__ import annotations

import functools
import random

import keras
import numpy as np
import tensorflow as tf

from cascade_cli.atomic import atomic_directory
from cascade_cli.errors import ParameterError
from cascade_cli.keras_internals import seed_generators
from cascade_cli.run.models import check_inputs_fit
from cascade_cli.options import LOSSES, RUNNER_DEFAULTS, Sampler, SamplingSchedule, StopRule, TrainConfig, check_int
from cascade_cli.result import CascadeResult
from cascade_cli.run.cascade import Cascade
from cascade_cli.steps import check_steps
from cascade_cli.train import windows
from cascade_cli.train.losses import check_regularizers, gate_terms, loss_terms, resolve_from_logits
from cascade_cli.train.optimizers import has_schedule
from cascade_cli.train.step import batch_loss, non_finite_error, replica_context, train_step

__all__ = ["CascadeModel", "ReseedEachEpoch", "export_saved_model", "load_generator"]

# Keras' spellings of the losses cascade knows (`categorical_crossentropy`), beside cascade's own (`options.LOSSES`).
_LOSS_NAMES = {**{name.replace("-", "_"): name for name in LOSSES}, **{name: name for name in LOSSES}}


def _loss_terms_of(loss, *, model_b, from_logits):
    """`terms(predictions, targets) -> (sum, count)` for a loss name or a `keras.losses.Loss`."""
    if isinstance(loss, keras.losses.Loss):
        def terms(predictions, targets):  # the Loss' own per-row values, averaged over the valid rows
            per_row = loss.call(targets, predictions)
            return tf.reduce_sum(tf.cast(per_row, tf.float32)), tf.cast(tf.size(per_row), tf.float32)

        return terms
    if isinstance(loss, str) and loss in _LOSS_NAMES:
        name = _LOSS_NAMES[loss]
        return loss_terms(name, from_logits=resolve_from_logits(model_b, from_logits, loss=name))
    names = ", ".join(name.replace("-", "_") for name in LOSSES)
    raise ParameterError("loss", f"expected one of {names} or a keras.losses.Loss, received {loss!r}.")


def _stop_rule_config(rule):
    return None if rule is None else {"kind": rule.kind, "value": rule.value}


def _sampler_config(sampler):
    return Sampler.coerce(sampler).config()


@keras.saving.register_keras_serializable(package="cascade_cli")
class CascadeModel(keras.Model):
    """Model A and model B chained by the packed runner, as one `keras.Model`.

    The runner settings default to `Cascade`'s (`options.RUNNER_DEFAULTS`).

    Args:
        model_a: a `keras.Model` mapping `(batch, Ta, F)` to `(batch, Ta, H)`.
        model_b: a step-form or causal sequence-form `keras.Model`.
        state: `"reset"` or `"carry"` (see `Cascade`).
        state_init: `"zeros"` or `"ir"`.
        max_steps: the most inner steps a pair may run when generating;
            required by `stop_rule` and by `predict` without steps.
        stop_rule: a `StopRule` (or its dict, `{"kind", "value"}`), used by
            `predict` and the serving export; training runs the given steps.
        exclude_stop_step: leave the step that met the stop rule out.
        min_steps: no stop rule stops a pair before it has run this many steps (see `Cascade`).
        fast_cells: `"auto"`, True or False (see `Cascade`).
        jit_compile: `Cascade`'s XLA switch for A when not training: `"auto"`
            (Keras' convention: XLA where it compiles and is exact), True or
            False; None (what generators saved before held) means `"auto"`.
        feedback, feedback_start, sampler, seed: `Cascade`'s feedback
            settings (a feedback-form B fed its own outputs). `fit` and
            `evaluate` teacher-force it on the targets (`batch_loss`);
            `predict` and the serving export run it free, drawing with
            `sampler` and `seed`.
        window: truncated backpropagation through time (`train.windows`):
            `fit` cuts each batch's outer sequences into windows of this
            many outer steps and takes one optimizer step per window, the
            state carried from one window to the next without a gradient;
            `evaluate` runs the windows too. None (the default): one step
            per batch over the whole sequence. `predict` is not affected.
        **kwargs: `keras.Model`'s own (`name`, ...).

    Raises:
        ParameterError, ModelError: as `Cascade` does.

    Example:

    >>> model = CascadeModel(model_a, model_b, state="carry")
    >>> model.compile(keras.optimizers.SGD(0.1), loss="mse")
    >>> model.fit((inputs, steps), padded_targets, epochs=2)
    >>> model.save("g.keras")
    >>> keras.saving.load_model("g.keras").predict(inputs, steps)   # tf.RaggedTensor (N, Ta, None, O)
    """

    def __init__(self, model_a, model_b, *, state=RUNNER_DEFAULTS["state"], state_init=RUNNER_DEFAULTS["state_init"],
                 max_steps=RUNNER_DEFAULTS["max_steps"], stop_rule=RUNNER_DEFAULTS["stop_rule"],
                 exclude_stop_step=RUNNER_DEFAULTS["exclude_stop_step"], min_steps=RUNNER_DEFAULTS["min_steps"],
                 fast_cells=RUNNER_DEFAULTS["fast_cells"], jit_compile=RUNNER_DEFAULTS["jit_compile"],
                 feedback=RUNNER_DEFAULTS["feedback"], feedback_start=RUNNER_DEFAULTS["feedback_start"],
                 sampler=RUNNER_DEFAULTS["sampler"], seed=RUNNER_DEFAULTS["seed"], window=None, **kwargs):
        super().__init__(**kwargs)
        if jit_compile is None:  # what a generator saved before "auto" was CascadeModel's default holds
            jit_compile = RUNNER_DEFAULTS["jit_compile"]
        if isinstance(stop_rule, dict):
            stop_rule = StopRule(**stop_rule)
        if isinstance(sampler, dict):
            sampler = Sampler(**sampler)
        self.model_a = model_a
        self.model_b = model_b
        # `options.RUNNER_SETTINGS`' order (tests/test_layout.py); `run_eagerly` is Keras' `compile`'s switch here
        self._settings = dict(state=state, state_init=state_init, max_steps=max_steps, stop_rule=stop_rule,
                              exclude_stop_step=exclude_stop_step, min_steps=min_steps, fast_cells=fast_cells,
                              jit_compile=jit_compile, feedback=feedback, feedback_start=feedback_start,
                              sampler=Sampler.coerce(sampler), seed=seed)
        self.cascade = Cascade(model_a, model_b, **self._settings)
        self.training_cascade = self._training_runner(None)
        self.window = windows.check_window(window, self.cascade)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self._terms = None
        self._stop_gate, self._sampling, self._end_token = False, None, None
        self.length_tracker = keras.metrics.Mean(name="length_mae")
        self._loss = None  # step.batch_loss of the compiled loss: the one cascade train runs too
        self._compiled_loss = None
        self._predict_functions = {}
        object.__setattr__(self, "_refused_steps", None)  # fit's count of refused steps (`fit`)
        self.built = True  # A and B come built

    # ------------------------------------------------------------- config

    def get_config(self):
        """The settings and both models, nested (`keras.saving.serialize_keras_object`)."""
        settings = dict(self._settings, stop_rule=_stop_rule_config(self._settings["stop_rule"]),
                        sampler=_sampler_config(self._settings["sampler"]))
        return {"name": self.name, "trainable": self.trainable,
                "model_a": keras.saving.serialize_keras_object(self.model_a),
                "model_b": keras.saving.serialize_keras_object(self.model_b), **settings, "window": self.window}

    @classmethod
    def from_config(cls, config):
        """Rebuilds the model; A and B are deserialized in the caller's safe mode."""
        config = dict(config)
        model_a = keras.saving.deserialize_keras_object(config.pop("model_a"))
        model_b = keras.saving.deserialize_keras_object(config.pop("model_b"))
        return cls(model_a, model_b, **config)

    @property
    def settings(self):
        """The runner settings, a dict (`state`, `state_init`, `max_steps`, `stop_rule`, ...)."""
        return dict(self._settings)

    # --------------------------------------------------------------- call

    def call(self, inputs, training=False):
        """Runs the cascade on `(inputs, steps)` (or `inputs` alone with `max_steps`).

        Returns:
            A `tf.RaggedTensor` `(N, Ta, None, O)`.
        """
        inputs, steps = inputs if isinstance(inputs, (tuple, list)) else (inputs, None)
        return self.cascade(inputs, steps, training=bool(training))

    def _training_runner(self, sampler):
        """The runner training runs: the given steps (no stop rule, no `max_steps` bound), and under scheduled
        sampling `sampler` (None: the model's)."""
        settings = self._settings
        if settings["stop_rule"] is None and settings["max_steps"] is None and sampler is None:
            return self.cascade
        sampler = settings["sampler"] if sampler is None else sampler
        return Cascade(self.model_a, self.model_b, **{**settings, "max_steps": None, "stop_rule": None,
                                                      "min_steps": 0, "sampler": sampler})

    # ------------------------------------------------------------- compile

    def compile(self, optimizer="rmsprop", loss="mse", metrics=None, *, from_logits=None, stop_gate=False,
                stop_weight=1.0, stop_pos_weight=1.0, sampling_probability=None, training_sampler=None,
                append_end_token=None, **kwargs):
        """Configures training, as `keras.Model.compile` does.

        Args:
            optimizer: a Keras optimizer or its name.
            loss: `"mse"`, `"mae"`, `"categorical_crossentropy"` (one-hot
                targets), `"sparse_categorical_crossentropy"` (token ids, padded
                `(N, Ta, L)` or `(N, Ta, L, 1)`), cascade's own spellings of
                them (`options.LOSSES`), or a `keras.losses.Loss`; averaged
                over the valid elements only.
            metrics: Keras metrics, computed on the valid rows `(total, O)` (with
                `stop_gate`, on their value columns only, as `cascade train --metrics`).
            from_logits: for the cross-entropies, whether B's outputs are
                logits; None detects it (`resolve_from_logits`:
                probabilities when B ends in a softmax).
            stop_gate: B's last output column is a stop logit (`cascade
                train --stop-gate`): the targets hold the other `O - 1`
                columns, the gate's target (1 at each pair's last valid step)
                is made from the steps, and the loss adds `stop_weight` times
                its binary cross-entropy (`gate_terms`, the
                positives weighted by `stop_pos_weight`). A feedback B is fed
                the targets' columns and a 0 gate.
            stop_weight, stop_pos_weight: the gate loss's weight and its positives' weight.
            append_end_token: a token id: every pair of every batch, 0-step
                pairs included, ends with one more target row, that token
                (its one-hot, or the id for token-id targets), and runs one
                more step (`cascade train --append-end-token`; give it here or
                to `data.dataset`, not both). With it (or `stop_gate`), and a
                model that generates with a stop rule and `max_steps`,
                `evaluate` and `fit`'s validation report `length_mae`: the
                mean absolute error of the lengths `predict` gives against the
                steps given.
            sampling_probability: scheduled sampling of a feedback B (`cascade
                train --sampling-probability`/`--sampling-schedule`): a
                probability, or a `SamplingSchedule` (or its text,
                `"inverse-sigmoid:K"`) read at the optimizer's step count.
            training_sampler: the sampler (a `Sampler`, its name or its
                dict) a row fed its own output draws with under scheduled
                sampling (`cascade train --sampler`); None: the model's own
                `sampler`, the one `predict` generates with (a generator
                saved by `cascade train` for a token loss holds `greedy`,
                while the command trained with its `--sampler`, `identity`
                unless given).
            **kwargs: `keras.Model.compile`'s others; `jit_compile` defaults
                to False (the packed loop's shapes change every step).

        Raises:
            ParameterError: an unknown loss; gate or sampling settings that do
                not go together (as `TrainConfig` checks them).
            ModelError: a layer with an activity regularizer.
        """
        schedule = sampling_probability
        if schedule is not None and not isinstance(schedule, (str, SamplingSchedule)):
            schedule = SamplingSchedule.constant(schedule)
        schedule = SamplingSchedule.parse(schedule) if isinstance(schedule, str) else schedule
        name = _LOSS_NAMES.get(loss) if isinstance(loss, str) else None
        TrainConfig(loss=name, feedback=bool(self._settings["feedback"]), stop_gate=bool(stop_gate),  # the checks
                    stop_weight=stop_weight, stop_pos_weight=stop_pos_weight, append_end_token=append_end_token,
                    sampling_schedule=None if schedule is None else schedule.describe())
        tokens = self.cascade.b_spec.output_size - int(bool(stop_gate))
        if append_end_token is not None and append_end_token >= tokens:
            raise ParameterError("append_end_token", f"expected a token id in [0, {tokens}) (B's outputs"
                                                     f"{' beside the stop gate' if stop_gate else ''}), received "
                                                     f"{append_end_token}.")
        self._end_token = append_end_token
        self._terms = _loss_terms_of(loss, model_b=self.model_b, from_logits=from_logits)
        if stop_gate:
            output_size = self.cascade.b_spec.output_size
            self._terms = gate_terms(self._terms, elements_per_row=output_size - 1 if name in ("mse", "mae") else 1,
                                     stop_weight=float(stop_weight), stop_pos_weight=float(stop_pos_weight))
        if training_sampler is not None and schedule is None:
            raise ParameterError("training_sampler", "applies to scheduled sampling only (teacher forcing feeds the "
                                                     "targets): give sampling_probability too, or leave it out; "
                                                     f"received training_sampler={training_sampler!r}.")
        if isinstance(training_sampler, dict):
            training_sampler = Sampler(**training_sampler)
        training_sampler = None if training_sampler is None else Sampler.coerce(training_sampler)
        self.training_cascade = self._training_runner(training_sampler)
        self._stop_gate, self._sampling = bool(stop_gate), schedule
        check_regularizers((self.model_a, self.model_b))
        self._loss = batch_loss(self.training_cascade, self._terms, models=(self.model_a, self.model_b),
                                gate=self._stop_gate)
        kwargs.setdefault("jit_compile", False)
        super().compile(optimizer=optimizer, loss=None, metrics=metrics, **kwargs)
        self._compiled_loss, self._from_logits = loss, from_logits
        self._training_options = {
            **({"stop_gate": True, "stop_weight": float(stop_weight), "stop_pos_weight": float(stop_pos_weight)}
               if stop_gate else {}),
            **({} if schedule is None else {"sampling_probability": schedule.describe()}),
            **({} if training_sampler is None else {"training_sampler": _sampler_config(training_sampler)}),
            **({} if append_end_token is None else {"append_end_token": int(append_end_token)})}

    def get_compile_config(self):
        """`keras.Model`'s compile config, with this model's loss (saved in `.keras` files)."""
        config = super().get_compile_config()
        if config is not None and self._compiled_loss is not None:
            loss = self._compiled_loss
            config["loss"] = loss if isinstance(loss, str) else keras.saving.serialize_keras_object(loss)
            config["from_logits"] = self._from_logits
            config.update(self._training_options)
        return config

    def compile_from_config(self, config):
        """Compiles as the saved model was (called by `keras.saving.load_model`), optimizer built for its state."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        """The loss tracker first, then the compiled metrics (Keras' own loss tracker is replaced), then
        `length_mae` when it is measured (`_measures_lengths`)."""
        metrics = [self.loss_tracker, *(metric for metric in super().metrics
                                        if metric.name not in ("loss", "length_mae"))]
        return metrics + ([self.length_tracker] if self._measures_lengths else [])

    @property
    def _measures_lengths(self):
        """Whether `test_step` measures `length_mae`: a stop learned (end tokens appended by `compile`, or the stop
        gate) and a stop rule to generate with, as `cascade train` measures `val_length_mae`."""
        learned = getattr(self, "_end_token", None) is not None or getattr(self, "_stop_gate", False)
        return learned and self._settings["stop_rule"] is not None and self._settings["max_steps"] is not None

    # --------------------------------------------------------------- steps

    def fit(self, x=None, y=None, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, refusing bad arrays before the first step and a non-finite step as `cascade train` does.

        Arrays `x = (inputs, steps)` and `y` are checked first
        (`check_training_arrays`). A step whose loss or gradients are not
        finite never reaches the weights: `fit` raises `CascadeError` naming
        the epoch and batch, and the model keeps the weights of the step
        before. A validation loss that is not finite stops `fit` with a
        `CascadeError` too, before any callback is told the epoch ended (no
        `BackupAndRestore` or `ModelCheckpoint` keeps it). A `data.dataset` is told which epoch begins, so an epoch
        resumed by `BackupAndRestore` visits that epoch's order. A constant
        learning rate is the one the optimizer holds as `fit` is called: a
        `BackupAndRestore` puts back the weights, the step count and the
        optimizer's moments, not the rate it saved (`cascade train --resume
        --learning-rate` trains at the rate given too); a schedule goes on
        from the step count restored. Everything else is Keras' own `fit`.
        """
        if isinstance(x, (tuple, list)) and len(x) == 2 and y is not None and not tf.is_tensor(y):
            check_training_arrays(x, y, output_size=self.cascade.b_spec.output_size)
        if self._refused_steps is None:  # made once, before the train function is first traced
            with self.distribute_strategy.scope():
                refused = tf.Variable(0.0, trainable=False, name="refused_steps",
                                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            object.__setattr__(self, "_refused_steps", refused)  # not a weight: kept out of Keras' tracking
        callbacks = [_RefuseNonFiniteValidation(), *(callbacks or []), _RefuseNonFiniteSteps(self._refused_steps)]
        if getattr(self, "optimizer", None) is not None and not has_schedule(self.optimizer):  # after a backup given
            callbacks.append(_KeepLearningRate(float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))))
        passes = getattr(x, "epoch_of_next_pass", None)  # a `data.dataset`: each epoch visits its own order
        if passes is not None:
            tell = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: passes.__setitem__(0, epoch))
            callbacks.append(tell)
        return super().fit(x, y, *args, callbacks=callbacks, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras' build from the first batch (`keras.src.backend.tensorflow.trainer`, private), given one replica's
        part of a distributed first batch instead of the replicas' mean, which Keras 3.15 takes and which fails
        unless the global batch splits evenly (3 and 2 samples cannot be averaged). Only shapes are read from it,
        and every replica's step takes its own part whatever its size (`step.train_step`: the global count)."""
        strategy = self._distribute_strategy
        if iterator is not None and data_batch is None and strategy is not None:
            for _, _, batches in iterator:
                first = next(batches)
                break
            else:
                first = None
            if first is not None:
                data_batch = tf.nest.map_structure(
                    lambda value: strategy.experimental_local_results(value)[0]
                    if isinstance(value, tf.distribute.DistributedValues) else value, first)
                iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _unpack(self, data):
        """`(inputs, steps, flat targets)` of one batch: padded targets `(N, Ta, L, O)` taken in value order."""
        x, targets, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ParameterError("sample_weight", "is not supported: every valid element weighs the same; "
                                                  "received a sample_weight.")
        if not isinstance(x, (tuple, list)) or len(x) != 2:
            raise ParameterError("x", "expected (inputs (N, Ta, F), steps (N, Ta)).")
        inputs, steps = x
        steps = tf.cast(steps, tf.int32)
        targets = tf.convert_to_tensor(targets)
        check = tf.debugging.assert_less_equal(
            tf.reduce_max(tf.concat([tf.reshape(steps, [-1]), [0]], 0)), tf.shape(targets)[2],
            message="targets (N, Ta, L, O): L is shorter than the longest steps")
        if self._end_token is not None:
            with tf.control_dependencies([check]):
                targets, steps = self._with_end_token(targets, steps)
        with tf.control_dependencies([check]):
            flat_targets = tf.boolean_mask(targets, tf.sequence_mask(steps, tf.shape(targets)[2]))
        if targets.dtype.is_integer:  # token ids (total,) or (total, 1): kept as ids, which teacher forcing feeds
            if flat_targets.shape.rank == 2 and flat_targets.shape[1] == 1:
                flat_targets = flat_targets[:, 0]
            return inputs, steps, tf.cast(flat_targets, tf.int64)
        size = self.cascade.b_spec.output_size - int(self._stop_gate)
        if targets.shape.rank is not None and targets.shape[-1] is not None and targets.shape[-1] != size:
            gate = " beside the stop gate" if self._stop_gate else ""
            raise ParameterError("y", f"expected padded targets (N, Ta, L, O={size}) (B emits O={size}{gate}), "
                                      f"received shape {tuple(targets.shape)}.")
        flat_targets = tf.cast(flat_targets, tf.float32)
        if self._stop_gate:  # the gate's target: 1 at each pair's last valid step (`data.append_gate_targets`)
            counts = tf.reshape(steps, [-1])
            ends = tf.boolean_mask(tf.cumsum(counts), counts > 0) - 1
            gate = tf.scatter_nd(ends[:, None], tf.ones_like(ends, tf.float32), tf.shape(flat_targets)[:1])
            flat_targets = tf.concat([flat_targets, gate[:, None]], axis=1)
        return inputs, steps, flat_targets

    def _with_end_token(self, targets, steps):
        """Padded targets and steps with one more row per pair, the end token (`data.append_end_token`, in-graph)."""
        ends = tf.equal(tf.range(tf.shape(targets)[2] + 1)[None, None, :], steps[..., None])  # (N, Ta, L + 1)
        targets = tf.pad(targets, [[0, 0], [0, 0], [0, 1]] + [[0, 0]] * (targets.shape.rank - 3))
        if targets.dtype.is_integer:
            row = tf.constant(self._end_token, targets.dtype)
        else:
            row = tf.one_hot(self._end_token, targets.shape[-1], dtype=targets.dtype)
        ends = ends if targets.shape.rank == 3 else ends[..., None]
        return tf.where(ends, row, targets), steps + 1

    def _replica_options(self):
        """`batch_loss`'s options on one of several replicas: the global count of valid elements, the penalty shared."""
        context = replica_context()
        if context is None:
            return {}
        return {"reduce_count": functools.partial(context.all_reduce, tf.distribute.ReduceOp.SUM),
                "replicas": context.num_replicas_in_sync}

    def _report(self, x, result):
        """Updates the loss tracker (this batch's own mean, weighed by its count) and the compiled metrics.

        With the stop gate the metrics see the value columns only, as `cascade train --metrics` measures them
        (`losses.without_gate`): the gate's logit is no value.
        """
        mean = tf.math.divide_no_nan(result.total, result.local_count) + result.penalty
        self.loss_tracker.update_state(mean, sample_weight=result.local_count)
        targets, values = result.targets, result.values
        if self._stop_gate:
            targets, values = targets[:, :-1], values[:, :-1]
        return self.compute_metrics(x, targets, values)

    def train_step(self, data):
        """One optimizer step on one batch: `step.train_step`, `cascade train`'s step.

        A step whose loss or gradients are not finite is not taken; inside
        `fit` it is counted, and `fit` stops there with a `CascadeError`
        (`_RefuseNonFiniteSteps`), taking no step after it.
        """
        if self._loss is None:
            raise ParameterError("loss", "not set: call compile() before fit().")
        logs = self._step(self._loss, data) if self.window is None else windows.train_step(self, data)
        return self._across_workers({name: value for name, value in logs.items() if name != "length_mae"})

    def _step(self, loss, data):
        """One optimizer step of `loss` (`step.batch_loss`) on `data`, a batch or one window of it; the metrics
        after it. After a step that was not finite no step is taken (`_refused_steps` counts it)."""
        refused = self._refused_steps
        result, finite = train_step(loss, self._unpack(data), variables=self.trainable_variables,
                                    optimizer=self.optimizer,
                                    only_if=None if refused is None else tf.equal(refused, 0.0),
                                    sampling=self._sampling)
        if refused is not None:
            refused.assign_add(1.0 - tf.cast(finite, tf.float32))
        return self._report(data[0], result)

    def test_step(self, data):
        """Scores one batch with `training=False`; returns the metrics so far."""
        if self._loss is None:
            raise ParameterError("loss", "not set: call compile() before evaluate().")
        result = None if self.window is not None else self._loss(*self._unpack(data), training=False,
                                                                 **self._replica_options())
        if self._measures_lengths:  # free-running generation, as predict runs it, against the steps given
            inputs, steps = keras.utils.unpack_x_y_sample_weight(data)[0]
            lengths = self.cascade.run(inputs, None, training=False)[1]
            errors = tf.abs(tf.cast(lengths, tf.float32) - tf.cast(steps, tf.float32))
            self.length_tracker.update_state(tf.reduce_mean(errors), sample_weight=tf.cast(tf.size(errors), tf.float32))
        if self.window is not None:  # the windows in order, state carried (`train.windows`)
            return self._across_workers(windows.test_step(self, data, **self._replica_options()))
        return self._across_workers(self._report(data[0], result))

    def _across_workers(self, logs):
        """`logs` as Keras 3.15 can reduce them over several workers: each a `(1,)` tensor there (its multi-worker
        `fit` takes the mean of the replicas' logs along axis 0, which a scalar lacks), as they are elsewhere."""
        strategy = self.distribute_strategy
        if not (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
                and strategy.extended._in_multi_worker_mode()):
            return logs
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}

    # ------------------------------------------------------------- predict

    def _predict_function(self, given):
        """The cached `tf.function` of one predict batch: `(inputs[, steps], sample_index) -> run's outputs`."""
        if given not in self._predict_functions:
            cascade = self.cascade
            options = {"training": False, "return_tokens": cascade.sampler.tokens}
            if given:
                function = tf.function(lambda inputs, steps, index: cascade.run(inputs, steps, sample_index=index,
                                                                                **options), reduce_retracing=True)
            else:
                function = tf.function(lambda inputs, index: cascade.run(inputs, None, sample_index=index, **options),
                                       reduce_retracing=True)
            self._predict_functions[given] = function
        return self._predict_functions[given]

    def predict(self, x, steps=None, *, batch_size=32, return_result=False, verbose=None, **kwargs):
        """Generates the ragged result, one batch after another.

        Each batch's `(values, lengths)` is kept as it is (no padding across
        batches), and the result is built from them. Sample `n` is drawn as
        sample `n` of the whole input (the runner's `sample_index`), so a
        sampler's draws do not depend on `batch_size`.

        Args:
            x: inputs `(N, Ta, F)`.
            steps: `(Ta,)` or `(N, Ta)` non-negative integers, or None when
                `max_steps` is set.
            batch_size: samples per runner call.
            return_result: return a `CascadeResult` instead.
            verbose: ignored (Keras' own setting; nothing is printed).
            **kwargs: refused: Keras' other `predict` settings do not apply.

        Returns:
            A `tf.RaggedTensor` `(N, Ta, None, O)`, or a `CascadeResult`,
            which holds the sampled token ids too when the sampler picks
            tokens (`greedy`, `categorical`).

        Raises:
            ParameterError: a bad `batch_size`, or `steps=None` without `max_steps`.
            DataError: inputs or steps that do not fit the models.
        """
        del verbose
        if kwargs:
            raise ParameterError(min(kwargs), "is not a setting of CascadeModel.predict.")
        batch_size = check_int("batch_size", batch_size, minimum=1)
        inputs = np.asarray(x)
        if not np.issubdtype(inputs.dtype, np.floating):
            inputs = inputs.astype(np.float32)
        check_inputs_fit(self.cascade.a_spec, inputs.shape)  # before any work
        n = inputs.shape[0]
        if steps is None:
            if self._settings["max_steps"] is None:
                raise ParameterError("steps", "required unless max_steps is set; received steps=None.")
        else:
            steps = check_steps(steps, n_samples=n, outer_steps=inputs.shape[1],
                                max_steps=self._settings["max_steps"])
            steps = np.broadcast_to(steps, (n, inputs.shape[1])).astype(np.int32)
        function = self._predict_function(steps is not None)
        values, lengths, tokens = [], [], []
        for start in range(0, n, batch_size):
            batch = tf.constant(inputs[start:start + batch_size])
            index = tf.range(start, start + batch.shape[0], dtype=tf.int64)
            args = (batch,) if steps is None else (batch, tf.constant(steps[start:start + batch_size]))
            out = function(*args, index)
            values.append(out[0].numpy())
            lengths.append(out[1].numpy())
            tokens.extend(out[2:3])
        output_size = self.cascade.b_spec.output_size
        result = CascadeResult(
            np.concatenate(values) if values else np.zeros((0, output_size), np.float32),
            np.concatenate(lengths) if lengths else np.zeros((0, inputs.shape[1]), np.int32),
            (np.concatenate([t.numpy() for t in tokens]) if tokens else np.zeros((0,), np.int64))
            if self.cascade.sampler.tokens else None,
        )
        return result if return_result else _ragged(result)


class ReseedEachEpoch(keras.callbacks.Callback):
    """Seeds Python, NumPy and every `SeedGenerator` of the model's layers from `(seed, epoch)` as each epoch begins.

    Keras layers draw their randomness (dropout, noise) from their own
    `SeedGenerator`s, so resetting those makes an epoch's random numbers a
    function of `(seed, epoch)`, whatever ran before it: an epoch resumed by
    `BackupAndRestore` in a new process draws what the unbroken run drew.
    `cascade train` reseeds with it (its `--seed`); give it to
    `CascadeModel.fit` to draw as the command does. TensorFlow's global seed
    is not touched: setting it again would clear TensorFlow's kernel cache
    and re-optimise every function each epoch.

    Args:
        seed: a non-negative integer.
    """

    def __init__(self, seed):
        super().__init__()
        self.seed = check_int("seed", seed, minimum=0)

    def on_epoch_begin(self, epoch, logs=None):
        entropy = np.random.SeedSequence([self.seed, epoch])
        generators = seed_generators([self.model])
        values = entropy.generate_state(1 + len(generators)) & 0x7FFFFFFF
        random.seed(int(values[0]))
        np.random.seed(int(values[0]))
        for generator, value in zip(generators, values[1:]):
            generator.state.assign(tf.constant([int(value), 0], dtype=generator.state.dtype))


class _RefuseNonFiniteValidation(keras.callbacks.Callback):
    """Stops `CascadeModel.fit` at an epoch whose validation loss is not finite, as `cascade train`; given first, so
    no callback after it (a backup, a checkpoint, early stopping) takes that epoch."""

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_loss")
        if value is not None and not np.isfinite(float(value)):
            raise non_finite_error("validation loss", float(value), epoch=epoch + 1, batch=None,
                                   kept="no callback was told the epoch ended, so no backup holds it")


class _KeepLearningRate(keras.callbacks.Callback):
    """Sets the optimizer's constant rate back to `rate` as `fit` begins, after a `BackupAndRestore` (given before it)
    restored the rate it saved: a resumed `fit` trains at the rate compiled, as `cascade train --resume` does."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def on_train_begin(self, logs=None):
        self.model.optimizer.learning_rate = self.rate


class _RefuseNonFiniteSteps(keras.callbacks.Callback):
    """Stops `CascadeModel.fit` at a step its train step refused (a loss or gradient not finite), as `cascade train`."""

    def __init__(self, refused):
        super().__init__()
        self.refused, self.epoch = refused, 0

    def on_train_begin(self, logs=None):
        self.refused.assign(0.0)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if float(self.refused.numpy()) == 0.0:
            return
        loss = float((logs or {}).get("loss", float("nan")))
        what, value = ("training loss", loss) if not np.isfinite(loss) else ("gradient", "non-finite")
        raise non_finite_error(what, value, epoch=self.epoch + 1, batch=batch + 1,
                               kept="the step was not applied, so the model holds the weights of the step before")


def check_training_arrays(x, y, *, output_size):
    """Refuses training arrays that would train on something else than meant: before the first step.

    Args:
        x: `(inputs (N, Ta, F), steps (N, Ta))`.
        y: padded targets `(N, Ta, L, O)` floats, or token ids `(N, Ta, L)` / `(N, Ta, L, 1)` integers.
        output_size: B's `O`.

    Raises:
        ParameterError: (`x`) steps that are not whole numbers >= 0; (`y`)
            float targets whose last axis is not `O` (they would broadcast),
            or a valid target (inner step < steps) that is not finite.
    """
    steps = np.asarray(x[1])
    if steps.dtype.kind not in "iu":
        fraction = ~(np.isfinite(steps) & (steps == np.floor(steps))) if steps.dtype.kind == "f" else None
        if fraction is None or fraction.any():
            bad = steps.dtype if fraction is None else steps[fraction].flat[0]
            raise ParameterError("x", f"expected integer steps (N, Ta) as x[1], received {steps.dtype} values such "
                                      f"as {bad} (a fraction would be cut off).")
    if steps.size and steps.min() < 0:
        raise ParameterError("x", f"expected steps >= 0 as x[1], received {steps.min()}.")
    targets = np.asarray(y)
    if targets.dtype.kind in "iu":
        return
    if targets.ndim != 4 or targets.shape[-1] != output_size:
        raise ParameterError("y", f"expected padded targets (N, Ta, L, O={output_size}) (B emits O={output_size}), "
                                  f"received shape {targets.shape}.")
    if steps.ndim == 2 and targets.shape[:2] == steps.shape:
        valid = np.arange(targets.shape[2]) < steps.astype(np.int64)[..., None]
        bad = ~np.isfinite(targets).all(axis=-1) & valid
        if bad.any():
            n, t, j = (int(i[0]) for i in np.nonzero(bad))
            raise ParameterError("y", f"expected finite targets where inner step < steps, received "
                                      f"{targets[n, t, j].tolist()} at sample {n}, outer step {t}, inner step {j}.")


def _ragged(result):
    """`result` as a `tf.RaggedTensor` `(N, Ta, None, O)` with `Ta` uniform (known in its shape)."""
    inner = tf.RaggedTensor.from_row_lengths(result.values, result.lengths.reshape(-1).astype(np.int64),
                                             validate=False)
    return tf.RaggedTensor.from_uniform_row_length(inner, result.outer_steps, nrows=result.n_samples,
                                                   validate=False)


def export_saved_model(model, directory, *, overwrite=False):
    """Writes `model` as a TensorFlow SavedModel that runs without cascade_cli or Keras.

    Its `serving_default` signature maps `inputs (N, Ta, F) float32` and
    `steps (N, Ta) int32` (only `inputs` when the model has `max_steps`) to
    `flat_values (total, O)` in value order and `lengths (N, Ta) int32`;
    `tf.RaggedTensor.from_row_lengths` rebuilds the ragged result from them.
    With a sampler that picks tokens (`greedy`, `categorical`) it also
    returns `tokens (total,) int64`, the sampled id of each value row. A
    request's samples are drawn as samples `0..N-1` (what `predict` draws for
    the same `N` samples, at any batch size), with the model's `seed`.

    Args:
        model: a `CascadeModel`.
        directory: the folder to write.
        overwrite: whether a folder that holds files may be written over.

    Returns:
        The `tf.Module` saved (its `serve` is the signature's function).

    Raises:
        ParameterError: `model` is not a `CascadeModel`.
        DataError: `directory` is a file, or a folder with files in it
            without `overwrite` (`atomic.atomic_directory`).
    """
    if not isinstance(model, CascadeModel):
        raise ParameterError("model", f"expected a CascadeModel, received {type(model).__name__}.")
    cascade = model.cascade
    a_spec = cascade.a_spec
    inputs_spec = tf.TensorSpec([None, a_spec.outer_steps, a_spec.features], tf.float32, name="inputs")
    module = tf.Module()
    module.model_a, module.model_b = model.model_a, model.model_b  # tracks their variables

    tokens = cascade.sampler.tokens

    def outputs(inputs, steps):
        out = cascade.run(inputs, steps, training=False, return_tokens=tokens)  # sample_index: 0..N-1
        return {"flat_values": out[0], "lengths": out[1], **({"tokens": out[2]} if tokens else {})}

    if model.settings["max_steps"] is None:
        @tf.function(input_signature=[inputs_spec, tf.TensorSpec([None, a_spec.outer_steps], tf.int32,
                                                                   name="steps")])
        def serve(inputs, steps):
            return outputs(inputs, steps)
    else:
        @tf.function(input_signature=[inputs_spec])
        def serve(inputs):
            return outputs(inputs, None)

    module.serve = serve
    # Serving needs no gradient: the runner's custom gradients stay out of the file.
    with atomic_directory(directory, overwrite=overwrite) as temp:  # a killed export leaves no half folder
        tf.saved_model.save(module, str(temp), signatures={"serving_default": serve},
                            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
    return module


def load_generator(path, *, safe_mode=True):
    """Loads a `CascadeModel` saved as one `.keras` file (`cascade pack`, `model.save`), safely.

    The file goes through `model_files.load_model`'s checks (a local regular
    `.keras` file, no oversized archive members, safe mode unless told).

    Raises:
        ModelError: the file cannot be loaded, or holds a Keras model that is
            not a `CascadeModel`.
    """
    from cascade_cli.errors import ModelError
    from cascade_cli.model_files import load_model

    model = load_model(path, role="generator", safe_mode=safe_mode)
    if not isinstance(model, CascadeModel):
        raise ModelError(f"generator '{path}' holds a {type(model).__name__}, not a CascadeModel: expected a file "
                         "written by cascade pack or CascadeModel.save.")
    return model
