"""The settings vocabulary: modes, losses, optimizers, strategies, `TrainConfig`, `StopRule`.

One home for every name a setting can take and for the checks of those
settings, importable without TensorFlow (the command line builds its choices
from here). Errors are `ParameterError`s that name the Python parameter
(`batch_size: expected a positive integer, received 0`); `cli.py` shows the
flag instead.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from cascade_cli.errors import ParameterError

STATE_MODES = ("reset", "carry")
STATE_INITS = ("zeros", "ir")
LOSSES = ("mse", "mae", "categorical-crossentropy")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
STRATEGIES = ("default", "mirrored", "multi-worker")
STOP_RULES = ("norm", "token")
FAST_CELLS = ("auto", True, False)
INT32_MAX = 2**31 - 1  # the largest count (steps, batch size, epochs) a setting may take
SEED_MAX = 2**32 - 1  # Keras seeds take 32 bits
GENERATE_BATCH_SIZE = 256  # samples per runner call when generating into a file
DEMO_EPOCHS = 20  # `cascade demo` trains this long by default: about a minute on 2 cores


# ------------------------------------------------------------------ checks


def is_int(value):
    """Whether `value` is an integer (Python or numpy), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_choice(parameter, value, choices):
    """Returns `value` when it is one of `choices`, else raises `ParameterError`."""
    if not any(value is choice or (type(value) is type(choice) and value == choice) for choice in choices):
        shown = ", ".join(repr(choice) if not isinstance(choice, str) else choice for choice in choices)
        raise ParameterError(parameter, f"expected one of {shown}, received {value!r}.")
    return value


def check_int(parameter, value, *, minimum=0, maximum=None, allow_none=False):
    """Returns `int(value)` when it is an integer in `[minimum, maximum]`, else raises `ParameterError`."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        if maximum is not None:
            expected = f"an integer in [{minimum}, {maximum}]"
        else:
            expected = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ParameterError(parameter, f"expected {expected}, received {value!r}.")
    return int(value)


def check_number(parameter, value, *, minimum=None, maximum=None, min_open=False, max_open=False,
                 expected="a finite number"):
    """Returns `float(value)` when it is a finite real number in range, else raises `ParameterError`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"
    ok = ok and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if min_open else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if max_open else value <= maximum
    if not ok:
        raise ParameterError(parameter, f"expected {expected}, received {value!r}.")
    return float(value)


# -------------------------------------------------------------- stop rules


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When a generated inner sequence stops.

    A sequence stops after the first inner step whose output `y` meets the
    rule. The runner evaluates it (`cascade_cli.runner.stop_hits`).

    Attributes:
        kind: `"norm"` (L2 norm of `y` >= `value`) or `"token"` (`argmax(y) == value`).
        value: the threshold or the token id.
    """

    kind: str
    value: float

    @classmethod
    def norm(cls, threshold):
        """Stops once `||y||_2 >= threshold`."""
        return cls("norm", check_number("threshold", threshold))

    @classmethod
    def token(cls, token_id):
        """Stops once `argmax(y) == token_id`."""
        return cls("token", check_int("token_id", token_id))

    def __post_init__(self):
        check_choice("kind", self.kind, STOP_RULES)
        if self.kind == "token":
            check_int("token_id", self.value)
        else:
            check_number("threshold", self.value)

    def describe(self):
        """The rule as text, e.g. `"norm >= 1.2"` or `"token == 0"`."""
        return f"norm >= {self.value:g}" if self.kind == "norm" else f"token == {int(self.value)}"


# ---------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of one training run (each is also a `cascade train` flag).

    Attributes:
        epochs: the epoch to train up to (a resumed run continues to it).
        batch_size: samples per step.
        learning_rate: the optimizer's step size.
        optimizer: one of `OPTIMIZERS`.
        loss: one of `LOSSES`; `categorical-crossentropy` reads B's outputs as logits.
        val_split: fraction of the samples held out for validation, in `[0, 1)`.
        shuffle: visit the training samples in a new seeded order every epoch.
        freeze_a: train B only; A's weights stay as they are.
        state: the runner's state mode, one of `STATE_MODES`.
        seed: seeds the split, the order and every random op (e.g. dropout).
        patience: stop after this many epochs without a better validation loss
            and keep the best weights; None trains every epoch.
        resume: continue from the last checkpoint in `out_dir`.
        strategy: one of `STRATEGIES`: `"default"` (one device), `"mirrored"`
            (every local GPU, else every logical CPU device) or
            `"multi-worker"` (the cluster in `TF_CONFIG`; build it with
            `distribute.make_strategy` before any other TensorFlow work).
    """

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    loss: str = "mse"
    val_split: float = 0.1
    shuffle: bool = True
    freeze_a: bool = False
    state: str = "reset"
    seed: int = 0
    patience: int | None = None
    resume: bool = False
    strategy: str = "default"

    # Settings a resumed run must share with the checkpoint it continues: they
    # fix the data split and order, the optimizer's slots and what each step
    # computes. `epochs`, `learning_rate` and `patience` may change on resume.
    RESUME_SETTINGS = ("seed", "val_split", "shuffle", "batch_size", "optimizer", "loss", "freeze_a", "state")

    def __post_init__(self):
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_number("learning_rate", self.learning_rate, minimum=0, min_open=True,
                     expected="a finite number > 0")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("loss", self.loss, LOSSES)
        check_number("val_split", self.val_split, minimum=0, maximum=1, max_open=True,
                     expected="a fraction in [0, 1)")
        check_choice("state", self.state, STATE_MODES)
        check_int("seed", self.seed)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_int("patience", self.patience, minimum=1, allow_none=True)
        if self.patience is not None and self.val_split == 0:
            raise ParameterError(
                "patience", "needs a validation set to watch: expected val_split > 0, received val_split=0."
            )


class TrainCallbacks:
    """Hooks `fit` calls as it goes; every hook does nothing here. Subclass to show progress."""

    def resumed(self, *, epoch):
        """Called once when a run continues after `epoch` completed epochs."""

    def epoch_started(self, epoch, *, epochs, batches):
        """Called before epoch `epoch` (1-based) of `epochs`, which has `batches` batches."""

    def batch_done(self, loss):
        """Called after each batch with the epoch's running training loss (a float)."""

    def epoch_done(self, logs):
        """Called after each epoch with `{"epoch", "loss", "val_loss" (or None), "seconds"}`."""

    def stopped_early(self, *, epoch, best_epoch):
        """Called when `patience` stops the run after `epoch`; the weights of `best_epoch` are kept."""
