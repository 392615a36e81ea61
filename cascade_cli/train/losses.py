"""The masked losses and metrics of training: `(predictions, targets) -> (sum, count)` over the valid rows.

Predictions and targets are flat in value order, so every row is a valid
`(sample, outer, inner)` step and no mask is ever materialised; the mean is
`sum / count` (DESIGN section 5). The stop gate's loss (`gate_terms`), how a
cross-entropy reads B's outputs (`resolve_from_logits`) and the models'
weight regularization losses live here too. `cascade train` and
`CascadeModel` both take their loss from here.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from cascade_cli.errors import ModelError
from cascade_cli.keras_internals import flatten_layers
from cascade_cli.options import CROSSENTROPY_LOSSES, LOSSES, check_choice

def loss_terms(name, *, from_logits=True):
    """Returns `terms(predictions, targets) -> (sum, count)` over the valid elements (one of `LOSSES`).

    The mean is `sum / count`: `mse` and `mae` count every element, the
    cross-entropies every row. `training` and `CascadeModel` both take their loss from here.
    """
    check_choice("loss", name, LOSSES)

    def elements(errors):
        return tf.reduce_sum(errors), tf.cast(tf.size(errors), errors.dtype)

    if name == "mse":
        return lambda predictions, targets: elements(tf.square(predictions - tf.cast(targets, predictions.dtype)))
    if name == "mae":
        return lambda predictions, targets: elements(tf.abs(predictions - tf.cast(targets, predictions.dtype)))

    def rows(per_row):
        return tf.reduce_sum(per_row), tf.cast(tf.shape(per_row)[0], per_row.dtype)

    if name == "categorical-crossentropy":
        def crossentropy(predictions, targets):
            targets = tf.cast(targets, predictions.dtype)
            if from_logits:
                return rows(tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=predictions))
            return rows(keras.losses.categorical_crossentropy(targets, predictions, from_logits=False))

        return crossentropy

    def sparse_crossentropy(predictions, targets):
        ids = tf.cast(tf.reshape(targets, [-1]), tf.int64)  # (rows,) or (rows, 1) token ids
        if from_logits:
            return rows(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=ids, logits=predictions))
        return rows(keras.losses.sparse_categorical_crossentropy(ids, predictions, from_logits=False))

    return sparse_crossentropy


def gate_terms(terms, *, elements_per_row, stop_weight=1.0, stop_pos_weight=1.0):
    """The loss terms of a B whose last output column is a stop logit (`TrainConfig.stop_gate`).

    Targets carry the gate's target as their last column (`data.append_gate_targets`).
    `terms` takes the other columns; the gate adds a binary cross-entropy
    per row, `-(stop_pos_weight * z * log(sigmoid(l)) + (1 - z) * log(1 - sigmoid(l)))`,
    so that `sum / count` is `terms`' mean plus `stop_weight` times the
    gate's mean over the valid rows.

    Args:
        terms: `(predictions, targets) -> (sum, count)` of the other columns (`loss_terms`).
        elements_per_row: what `terms` counts per row: `O - 1` for `mse` and `mae`, 1 for the cross-entropies.
        stop_weight, stop_pos_weight: the gate loss's weight and its positives' weight.
    """

    def combined(predictions, targets):
        targets = tf.cast(targets, predictions.dtype)
        total, count = terms(predictions[:, :-1], targets[:, :-1])
        logits, stops = predictions[:, -1], targets[:, -1]
        bce = -(stop_pos_weight * stops * tf.math.log_sigmoid(logits) + (1 - stops) * tf.math.log_sigmoid(-logits))
        return total + (stop_weight * elements_per_row) * tf.reduce_sum(bce), count

    return combined


def without_gate(terms):
    """`terms` (a metric's) over every column but the last, the stop gate's, of predictions and targets."""
    return lambda predictions, targets: terms(predictions[:, :-1], targets[:, :-1])


def masked_loss(name, *, from_logits=True):
    """Returns the loss `name` averaged over the valid elements only.

    Predictions and targets are flat in value order, so every row is a valid
    `(sample, outer, inner)` step. `mse` and `mae` average over every valid
    element (rows x features); the cross-entropies average over the valid
    rows: `categorical-crossentropy` against one-hot (or soft) targets
    `(total, O)`, `sparse-categorical-crossentropy` against integer token ids
    `(total,)` (or `(total, 1)`). An empty batch gives 0, not NaN.

    Args:
        name: one of `LOSSES`.
        from_logits: for the cross-entropies, whether predictions are logits
            (else probabilities, clipped to `[1e-7, 1 - 1e-7]` as Keras does).

    Returns:
        `loss(predictions (total, O), targets) -> scalar` tensor.

    Raises:
        ParameterError: an unknown loss name.
    """
    terms = loss_terms(name, from_logits=from_logits)

    def loss(predictions, targets):
        predictions = tf.convert_to_tensor(predictions)
        total, count = terms(predictions, targets)
        return tf.math.divide_no_nan(total, count)

    return loss


def _output_layer(model_b):
    """The layer that computes B's output `y` (its first output), or None when it cannot be told."""
    output = model_b.outputs[0]
    for layer in reversed(model_b.layers):
        try:
            if layer.output is output:
                return layer
        except (AttributeError, ValueError, RuntimeError):  # a layer called more than once
            continue
    return None


def ends_in_softmax(model_b):
    """Whether B's output `y` comes out of a softmax (a layer's `activation="softmax"`, `Softmax` or `Activation`)."""
    layer = _output_layer(model_b)
    if layer is None:
        return False
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None) == "softmax"


def resolve_from_logits(model_b, from_logits, *, loss):
    """How a cross-entropy reads B's outputs: the given `from_logits`, or detected when None.

    Detection: probabilities (False) when B's output layer ends in a softmax,
    logits (True) otherwise.

    Args:
        model_b: the B model.
        from_logits: True, False or None (detect).
        loss: one of `LOSSES`.

    Returns:
        True or False for a cross-entropy loss; None for the other losses.
    """
    if loss not in CROSSENTROPY_LOSSES:
        return None
    if from_logits is not None:
        return bool(from_logits)
    return not ends_in_softmax(model_b)


def regularization_loss(models):
    """Returns the sum of the weight regularization losses of `models`, or None when they have none.

    These are the terms Keras adds to a model's training loss
    (`model.losses`): `regularizer(weight)` for every trainable weight made
    with a regularizer (`kernel_regularizer=keras.regularizers.L2(1e-4)`, ...).

    Args:
        models: Keras models, e.g. `(model_a, model_b)`.

    Returns:
        A scalar `float32` tensor, or None.
    """
    terms = [
        tf.cast(weight.regularizer(weight), tf.float32)
        for model in models
        for weight in model.trainable_weights
        if getattr(weight, "regularizer", None) is not None
    ]
    return tf.add_n(terms) if terms else None


def check_regularizers(models):
    """Raises `ModelError` for an activity regularizer, a loss training cannot collect."""
    for name, model in zip("AB", models):
        for layer in flatten_layers(model, include_self=True):
            if getattr(layer, "activity_regularizer", None) is not None:
                raise ModelError(
                    f"model {name}: layer '{layer.name}' has an activity_regularizer, which cascade's training "
                    "does not add to the loss (the runner calls the layers inside its loop, or not at all on the "
                    "fast path); expected weight regularizers only (kernel_regularizer, bias_regularizer, ...): "
                    "remove it, or train with an L2 on the weights instead."
                )
