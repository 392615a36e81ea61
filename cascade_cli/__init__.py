"""cascade: chain two Keras recurrent models into a generator of ragged 2-D sequences.

>>> from cascade_cli import Cascade, StopRule
>>> cascade = Cascade(model_a, model_b, max_steps=20, stop_rule=StopRule.norm(0.9))

Importing the package does not import TensorFlow; `Cascade` and
`generate_to_file` bring it in when first used.
"""

__version__ = "0.1.0"

_LAZY = {
    "Cascade": "cascade_cli.run.cascade",
    "generate_to_file": "cascade_cli.generation",
    "StopRule": "cascade_cli.options",
    "Sampler": "cascade_cli.options",
    "TrainConfig": "cascade_cli.options",
    "CascadeResult": "cascade_cli.result",
    "CascadeState": "cascade_cli.run.state",
    "CascadeError": "cascade_cli.errors",
    "CascadeModel": "cascade_cli.train.keras_model",
    "export_saved_model": "cascade_cli.train.keras_model",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cascade_cli' has no attribute {name!r}")
