"""The exceptions the library raises.

Every message says what is wrong, what was expected and what was received, so
the command line can show it as one `Error: ...` line without a traceback.
"""


class CascadeError(Exception):
    """Base class of every error cascade raises on purpose."""


class ModelError(CascadeError):
    """A model file cannot be loaded, or the two models do not fit together."""


class DataError(CascadeError):
    """Inputs, steps, targets or a result file are missing, malformed or inconsistent."""


def one_line(text):
    """Joins a message's lines so it prints as one `Error: ...` line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "unknown error"
