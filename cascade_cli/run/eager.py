"""An eager call's own work around its compiled call, done once per input signature where it can be (issue 29).

Called eagerly, a cascade checks its arguments, then calls its cached concrete
function (`run.compiled`). At N=1 the checks cost about as much as a tenth of
the compiled call, and most of them look only at the arguments' types, dtypes
and shapes. So, as Keras traces once per input signature, `EagerLane` keeps the
signatures whose full checks passed (`checks.checked_inputs`,
`checks.checked_caps`): a later call of the same signature looks only at the
steps' values (their least, greatest and total, in numpy) and reuses the small
constant tensors the checks would make again (`max_steps` caps, the default
`sample_index`, a zero sampling probability, the ragged result's outer partition).

It is a screen, not a second home of the rules: a call it does not know, or
whose steps it cannot pass at a glance, goes through the full checks, which
raise their own errors. So the same bad arguments raise the same error, before
anything runs, whatever was called before; and where the screen passes a call,
the full checks would have passed it with the same tensors.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from cascade_cli.keras_internals import ragged_from_parts
from cascade_cli.options import STEPS_MAX
from cascade_cli.run import feedback

_FLOATS = frozenset(np.dtype(name) for name in ("float16", "float32", "float64"))
_SIGNATURES = 64  # the most signatures kept; past it the set starts again (a program calling with many shapes)


class EagerLane:
    """One cascade's passed signatures and reused constants.

    Args:
        max_steps: the cascade's `max_steps` (None: steps must be given).
    """

    def __init__(self, max_steps):
        self.max_steps = max_steps
        self.limit = STEPS_MAX if max_steps is None else min(max_steps, STEPS_MAX)
        self.signatures = set()
        self.constants = {}

    def checked(self, inputs, steps, full):
        """`(inputs, caps (N, Ta) int32)` as `full(inputs, steps)` returns them, without its checks where this
        signature passed them before and the steps' values pass at a glance; else `full`'s (which may raise)."""
        if not tf.executing_eagerly():
            return full(inputs, steps)
        key, array = signature(inputs, steps)
        if key in self.signatures:
            caps = self.caps(array, inputs.shape[0], inputs.shape[1])
            if caps is not None:
                return (tf.constant(inputs) if type(inputs) is np.ndarray else inputs), caps
        result = full(inputs, steps)
        if key is not None:
            if len(self.signatures) >= _SIGNATURES:
                self.signatures.clear()
            self.signatures.add(key)
        return result

    def caps(self, array, n, ta):
        """The caps of known-good steps `array` (None: `max_steps` each), or None where a value needs the full
        checks (negative, above `max_steps` or int32's count, or too many in all)."""
        if array is None:
            return self.constant(("caps", n, ta), lambda: tf.fill([n, ta], tf.constant(self.max_steps, tf.int32)))
        if array.size and (array.min() < 0 or array.max() > self.limit
                           or int(array.sum(dtype=np.int64)) * (n if array.ndim == 1 else 1) > STEPS_MAX):
            return None
        if array.ndim == 1:
            array = np.broadcast_to(array, (n, ta))
        return tf.constant(np.ascontiguousarray(array, dtype=np.int32))

    def extras(self, cascade, inputs, targets, sample_index, probability, return_tokens, full):
        """`checks.checked_extras`' result for a feedback or sampling run with the default arguments (no
        targets, no sample index, no sampling probability), with reused constants; else `full()`'s."""
        if (targets is None and sample_index is None and type(probability) is float and probability == 0
                and (return_tokens is False or (return_tokens is True and cascade.sampler.tokens))
                and cascade._general and tf.executing_eagerly() and isinstance(inputs.shape[0], int)):
            n = inputs.shape[0]
            return feedback.Feed(None, self.constant(("sample_index", n), lambda: tf.range(n, dtype=tf.int64)),
                                 self.constant("probability", lambda: tf.constant(0.0, tf.float64)),
                                 return_tokens, False)
        return full()

    def nested(self, parts, *, samples, outer):
        """`Cascade.__call__`'s result from the flat parts `(values, row_splits (N * Ta + 1,)[, tokens])`: a
        `tf.RaggedTensor` `(N, Ta, None, ...)` for each flat part (one, or a tuple).

        Where `N` and `Ta` are ints the result has the static shape `(N, Ta, None, O)`; eagerly, the outer
        partition of each `(N, Ta)` is made once and reused (building it costs more eager ops than anything else
        here). In a graph every part is built in it.
        """
        flats = (parts[0], *parts[2:])
        if isinstance(samples, int) and isinstance(outer, int) and tf.executing_eagerly():
            partition = self.constant(("outer", samples, outer), lambda: tf.RaggedTensor.from_uniform_row_length(
                tf.zeros([samples * outer], tf.int64), outer, nrows=samples, validate=False))
            nested = [ragged_from_parts(partition, flat, parts[1]) for flat in flats]
        else:
            nested = [tf.RaggedTensor.from_uniform_row_length(
                tf.RaggedTensor.from_row_splits(flat, parts[1], validate=False), outer, nrows=samples, validate=False)
                for flat in flats]
        return tuple(nested) if len(nested) > 1 else nested[0]

    def constant(self, key, make):
        """The constant tensor `make()` made the first time under `key`, made eagerly (outside any trace); kept
        for the last `_SIGNATURES` keys' worth (a program calling with many shapes starts again)."""
        if key not in self.constants:
            if len(self.constants) >= _SIGNATURES:
                self.constants.clear()
            with tf.init_scope():
                self.constants[key] = make()
        return self.constants[key]


def signature(inputs, steps):
    """`(key, steps as numpy)`: what the shape and dtype checks of a call depend on; key None where the lane
    does not take these arguments (a type or dtype it leaves to the full checks)."""
    if type(inputs) is np.ndarray:
        if inputs.dtype not in _FLOATS:
            return None, None
    elif not (isinstance(inputs, tf.Tensor) and hasattr(inputs, "numpy") and inputs.dtype.is_floating):
        return None, None
    if steps is None:
        array = None
    elif type(steps) is np.ndarray:
        array = steps
    elif isinstance(steps, tf.Tensor) and hasattr(steps, "numpy") and steps.dtype.is_integer:
        array = steps.numpy()
    elif type(steps) in (list, tuple):
        try:
            array = np.asarray(steps)
        except (ValueError, TypeError, OverflowError):
            return None, None
    else:
        return None, None
    if array is not None and array.dtype.kind not in "iu":
        return None, None
    steps_key = None if array is None else (array.dtype, array.shape)
    return (type(inputs), inputs.dtype, tuple(inputs.shape), steps_key), array
