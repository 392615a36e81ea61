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
    """`template.with_values(tf.RaggedTensor.from_row_splits(values, row_splits, validate=False))`, eagerly, made
    as RaggedTensor's and RowPartition's private constructors make them: their attributes set
    (`RaggedTensor._values`, `._row_partition`; `RowPartition._row_splits` and its cached encodings, none here),
    without the factories' conversions nor `__init__`'s static shape checks.

    Those checks cannot fail for a compiled call's parts, which is what it is given: `values` an eager tensor
    `(total, ...)`, `row_splits` an eager int64 vector `(rows + 1,)`, the template's splits int64. Right after
    the compiled call the checks' Python ran cold and cost about 0.1 ms of an eager call at N=1
    (`benchmarks/eager_ab.py`); `tests/test_eager_call.py` checks the result is `with_values`' in type, shape
    and bits, and that the constructors set no other attribute.
    """
    import tensorflow as tf

    partition = tf.experimental.RowPartition.__new__(tf.experimental.RowPartition)
    partition._row_splits = row_splits
    partition._row_lengths = partition._value_rowids = partition._nrows = None
    partition._uniform_row_length = partition._nvals = None
    inner = tf.RaggedTensor.__new__(tf.RaggedTensor)
    inner._values, inner._row_partition = values, partition
    outer = tf.RaggedTensor.__new__(tf.RaggedTensor)
    outer._values, outer._row_partition = inner, template._row_partition
    return outer


def fixed_captures(function):
    """A concrete function's captured inputs (`ConcreteFunction.captured_inputs`) where they are fixed tensors
    (variables' handles, constants), to pass to `call_untaped` on every call; None where one is a deferred
    capture (a callable, read anew at each call)."""
    if any(callable(capture) for capture in function._captured_inputs):
        return None
    return function.captured_inputs


def call_untaped(function, tensors, captures):
    """`call_flat(function, tensors)` where it executes eagerly and no tape may record (the caller checked
    both), as its `_call_flat` then runs it: its inference function (`_inference_function.call_flat`) on the
    tensors and `captures` (`fixed_captures`). Returns the flat list of its outputs, not their structure."""
    return function._inference_function.call_flat(*tensors, *captures)