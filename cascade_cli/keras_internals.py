"""Every private Keras / TensorFlow touch point cascade relies on, in one place.

Keras 3 has no public way to list a model's nested layers with their random
seed generators, to read how a layer was called in a functional graph, or to
run a function without the tape recording it. Each helper here wraps one such
private attribute; `tests/test_keras_internals.py` checks every assumption, so
a Keras or TensorFlow upgrade that breaks one fails loudly there first.
"""


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


def inbound_calls(layer):
    """`[(args, kwargs)]`: how `layer` was called in the functional graphs it belongs to (`_inbound_nodes`)."""
    return [(node.arguments.args, node.arguments.kwargs) for node in layer._inbound_nodes]


def stop_recording():
    """A context in which TensorFlow's tapes record nothing (`tensorflow.python.eager.record`)."""
    from tensorflow.python.eager import record  # no public way to call a function unrecorded

    return record.stop_recording()
