"""Every private Keras / TensorFlow touch point cascade relies on, in one place.

Keras 3 has no public way to list a model's nested layers with their random
seed generators, to read how a layer was called in a functional graph, or to
run a function without the tape recording it. Each helper here wraps one such
private attribute; `tests/test_keras_internals.py` checks every assumption, so
a Keras or TensorFlow upgrade that breaks one fails loudly there first.
One touch point lives elsewhere because it is a method override, not a read:
`CascadeModel._maybe_symbolic_build` (`train/keras_model.py`), checked there too.
"""

import dataclasses


def flatten_layers(model, *, include_self=False):
    """Every layer nested in `model` (depth first), via `Layer._flatten_layers`."""
    return list(model._flatten_layers(include_self=include_self))


def seed_generators(models):
    """Every `keras.random.SeedGenerator` the layers of `models` draw from (e.g. dropout), once each."""
    found, seen = [], set()
    for model in models:
        for layer in flatten_layers(model, include_self=True):
            for generator in getattr(layer, "_seed_generators", ()):
                if id(generator) not in seen:
                    seen.add(id(generator))
                    found.append(generator)
    return found


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """How a layer was called once in a functional graph.

    Attributes:
        args: the positional arguments (symbolic tensors, or lists of them).
        kwargs: the keyword arguments.
        outputs: the flat list of symbolic tensors the call returned.
    """

    args: tuple
    kwargs: dict
    outputs: list


def inbound_calls(layer):
    """`[LayerCall]`: how `layer` was called in the functional graphs it belongs to.

    Reads `layer._inbound_nodes` and each node's `arguments.args`,
    `arguments.kwargs` and `outputs`.
    """
    return [LayerCall(tuple(node.arguments.args), dict(node.arguments.kwargs), list(node.outputs))
            for node in layer._inbound_nodes]


def stop_recording():
    """A context in which TensorFlow's tapes record nothing (`tensorflow.python.eager.record`)."""
    from tensorflow.python.eager import record  # no public way to call a function unrecorded

    return record.stop_recording()


def tape_may_record():
    """Whether a `tf.GradientTape` may be recording now (`tensorflow.python.eager.record.could_possibly_record`)."""
    from tensorflow.python.eager import record  # no public way to ask whether a tape is active

    return bool(record.could_possibly_record())


def tapes_may_take_higher_order(tensors):
    """Whether the tapes recording `tensors` may take a gradient of a gradient: a persistent tape, or several.

    The question a concrete function's call asks before it records itself
    (`tensorflow.python.ops.gradients_util.PossibleTapeGradientTypes`).
    """
    from tensorflow.python.ops import gradients_util  # no public way to ask what the active tapes may need

    kind = gradients_util.PossibleTapeGradientTypes(tensors)
    return kind == gradients_util.POSSIBLE_GRADIENT_TYPES_HIGHER_ORDER


def call_flat(function, tensors):
    """Calls a concrete function on the flat list of its arguments' tensors (`ConcreteFunction._call_flat`).

    Its `__call__` first binds the arguments to its signature, about 50 µs of
    an eager call (`run.eager`); the caller passes tensors of the signature's
    dtypes and shapes, in its order, already checked.
    """
    return function._call_flat(tensors, function.captured_inputs)


def ragged_from_parts(template, values, row_splits):
    """`template.with_values(tf.RaggedTensor.from_row_splits(values, row_splits, validate=False))`, built with
    the constructors RaggedTensor's own factories end in (`RaggedTensor(..., internal=True)`,
    `RowPartition(..., internal=...)`; `template._row_partition`), without the static shape checks and
    conversions of the factories, which cost half of it or more (`values` and `row_splits` are tensors
    already: int64 splits, as the template's)."""
    import tensorflow as tf
    from tensorflow.python.ops.ragged import row_partition  # no public way to build one without its checks

    inner = tf.RaggedTensor(values, tf.experimental.RowPartition(
        row_splits, internal=row_partition._row_partition_factory_key), internal=True)
    return tf.RaggedTensor(inner, template._row_partition, internal=True)
