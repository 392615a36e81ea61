"""The exceptions the library raises.

Every message says what is wrong, what was expected and what was received, so
the command line can show it as one `Error: ...` line without a traceback.
Library messages name Python parameters (`batch_size: ...`); only `cli.py`
turns a `ParameterError`'s parameter into the flag a user typed.
"""


class CascadeError(Exception):
    """Base class of every error cascade raises on purpose."""


class ModelError(CascadeError):
    """A model file cannot be loaded, or the two models do not fit together."""


class DataError(CascadeError):
    """Inputs, steps, targets or a result file are missing, malformed or inconsistent."""


class ParameterError(CascadeError, ValueError):
    """A setting has a value it cannot take.

    The message reads `"{parameter}: {problem}"`, e.g. `batch_size: expected a
    positive integer, received 0`; the command line shows the flag instead.

    Attributes:
        parameter: the Python name of the setting, e.g. `"batch_size"`.
        problem: what is wrong, what was expected and what was received.
    """

    def __init__(self, parameter, problem):
        super().__init__(f"{parameter}: {problem}")
        self.parameter = parameter
        self.problem = problem


def one_line(text):
    """Joins a message's lines so it prints as one `Error: ...` line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "unknown error"


def received(value):
    """A received argument as messages show it, the Keras way: `None`, or `'a.keras' (a str)`."""
    return "None" if value is None else f"{str(value)[:80]!r} (a {type(value).__name__})"
