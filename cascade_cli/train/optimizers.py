"""The optimizer of a training run: Keras' own, by name, with a learning-rate schedule and warmup."""

from __future__ import annotations

import keras
import tensorflow as tf

from cascade_cli.options import EXPONENTIAL_FINAL_FRACTION, LR_SCHEDULES, OPTIMIZERS, check_choice


@keras.saving.register_keras_serializable(package="cascade_cli")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """`after(step - warmup_steps)`, preceded by `warmup_steps` steps rising linearly to `after(0)`.

    Step `s < warmup_steps` (0-based) takes `(s + 1) / warmup_steps * after(0)`,
    so the first step already moves and step `warmup_steps - 1` takes the full rate.

    Args:
        after: a learning rate (float) or a `LearningRateSchedule`.
        warmup_steps: a positive integer.
    """

    def __init__(self, after, warmup_steps):
        if isinstance(after, dict):
            after = keras.optimizers.schedules.deserialize(after)
        self.after = after
        self.warmup_steps = int(warmup_steps)

    def _after(self, step):
        if isinstance(self.after, keras.optimizers.schedules.LearningRateSchedule):
            return tf.cast(self.after(step), tf.float32)
        return tf.constant(float(self.after), tf.float32)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = float(self.warmup_steps)
        rising = (step + 1.0) / warmup * self._after(tf.zeros((), tf.float32))
        return tf.where(step < warmup, rising, self._after(tf.maximum(step - warmup, 0.0)))

    def get_config(self):
        after = self.after
        if isinstance(after, keras.optimizers.schedules.LearningRateSchedule):
            after = keras.optimizers.schedules.serialize(after)
        return {"after": after, "warmup_steps": self.warmup_steps}


def learning_rate_schedule(name, *, learning_rate, total_steps, warmup_steps=0):
    """Returns the learning rate `make_optimizer` takes: a float, or a Keras `LearningRateSchedule`.

    Args:
        name: one of `LR_SCHEDULES`: `"constant"`, `"cosine"` (Keras'
            `CosineDecay` to 0 by the last step) or `"exponential"` (Keras'
            `ExponentialDecay`, to `EXPONENTIAL_FINAL_FRACTION` of the rate by
            the last step).
        learning_rate: the peak rate.
        total_steps: the optimizer steps of the whole run (warmup included).
        warmup_steps: steps of linear warmup first (`LinearWarmup`); 0: none.

    Raises:
        ParameterError: an unknown name.
    """
    check_choice("lr_schedule", name, LR_SCHEDULES)
    learning_rate = float(learning_rate)
    decay_steps = max(1, int(total_steps) - int(warmup_steps))
    if name == "constant":
        rate = learning_rate
    elif name == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps, alpha=0.0)
    else:
        rate = keras.optimizers.schedules.ExponentialDecay(learning_rate, decay_steps,
                                                           decay_rate=EXPONENTIAL_FINAL_FRACTION)
    return LinearWarmup(rate, warmup_steps) if warmup_steps else rate


def make_optimizer(name, *, learning_rate, clipnorm=None, mixed_precision=False):
    """Returns a new Keras optimizer `name` (one of `OPTIMIZERS`, Keras' own names) with `learning_rate`.

    Args:
        name: one of `OPTIMIZERS`.
        learning_rate: a float or a `LearningRateSchedule` (`learning_rate_schedule`).
        clipnorm: Keras' `clipnorm` (each gradient clipped to this L2 norm), or None.
        mixed_precision: wrap it in Keras' `LossScaleOptimizer` (dynamic loss
            scaling, as `Model.compile` does under `mixed_float16`).

    Raises:
        ParameterError: an unknown optimizer name.
    """
    check_choice("optimizer", name, OPTIMIZERS)
    if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        learning_rate = float(learning_rate)
    config = {"learning_rate": learning_rate}
    if clipnorm is not None:
        config["clipnorm"] = float(clipnorm)
    optimizer = keras.optimizers.get(name)
    optimizer = type(optimizer)(**config)
    return keras.optimizers.LossScaleOptimizer(optimizer) if mixed_precision else optimizer


def has_schedule(optimizer):
    """Whether `optimizer`'s rate is a `LearningRateSchedule` (rebuilt from the settings on resume)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return isinstance(inner._learning_rate, keras.optimizers.schedules.LearningRateSchedule)

