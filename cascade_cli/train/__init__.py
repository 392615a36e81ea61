"""Training: `CascadeModel` (the cascade as a `keras.Model`), the masked losses, the one train step, strategies,
the backup and state of a run, and what `cascade train` does around `CascadeModel.fit` (`fit.py`).

Modules import downwards only: `losses` <- `step` <- `keras_model` <- `fit`; `checkpoints` <- `callbacks` <- `fit`;
`distribute` and `optimizers` stand alone. Training imports the engine (`cascade_cli.run`), never the reverse.
"""
