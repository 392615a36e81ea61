"""cascade: chain two Keras recurrent models into a generator of ragged 2-D sequences."""

__version__ = "0.1.0"
