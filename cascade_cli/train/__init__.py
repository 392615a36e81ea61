"""Training: `CascadeModel` (the cascade as a `keras.Model`), the masked losses, the one train step, strategies,
checkpoints, and what `cascade train` does around them (`fit.py`).

Modules import downwards only: `losses` <- `step` <- `keras_model`, `distribute` <- `fit`; `checkpoints` and
`optimizers` stand alone. Training imports the engine (`cascade_cli.runner`), never the reverse.
"""
