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

The README's call (numpy inputs and steps, every other argument left at its
default, no tape) goes further (`EagerLane.repeated`): once its signature has
passed the full checks and the first choices are made, the lane keeps the
concrete function that call ran and the outer partition of its result, and a
later call of the signature is the steps' glance, two tensors, that function
and the result put together; nothing else of `Cascade.__call__` runs. At N=1
the compiled call takes about 1.3 ms and, right after other work (the peers
suite runs other methods between two calls), the general path's Python around
it cost 0.3 ms of it (`benchmarks/eager_ab.py`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from cascade_cli.keras_internals import call_flat, call_untaped, fixed_captures, ragged_from_parts, tape_may_record
from cascade_cli.options import STEPS_MAX
from cascade_cli.run import compiled, feedback

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
        self.repeats = {}  # (kind, training, inputs' dtype and shape, steps' dtype and shape) -> `Repeat`

    def repeated(self, cascade, kind, inputs, steps, training):
        """The result of a plain eager call, as `Cascade.__call__` (`kind` "ragged") or `Cascade.run` ("flat")
        returns it, where the call repeats a signature that ran before; else None, and the call takes the
        general path.

        The caller has checked that every other argument is at its default. A repeat is numpy inputs and
        numpy (or no) steps whose signature passed the full checks (`checked`), eagerly with no tape, in a
        plain run (no feedback, no sampler) whose first choices are made (`xla.first_choices`): what the
        general path does for it is then fixed but for the steps' values and the two tensors. Steps the
        glance cannot pass (`caps`) take the general path, whose full checks raise their error.
        """
        if (type(inputs) is not np.ndarray or (steps is not None and type(steps) is not np.ndarray)
                or (training is not False and training is not True)
                or cascade.run_eagerly or not tf.executing_eagerly() or tape_may_record()):
            return None
        key = (kind, training, inputs.dtype, inputs.shape, None if steps is None else (steps.dtype, steps.shape))
        repeat = self.repeats.get(key)
        if repeat is None:
            repeat = self.repeat(cascade, key, inputs, steps)
            if repeat is None:
                return None
        caps = self.caps(steps, inputs.shape[0], inputs.shape[1])
        if caps is None:
            return None
        # No trace can run here (a general call traced the function before the entry was made), so no
        # `CascadeError` can come out of TensorFlow's wrapping: `compiled.cascade_errors` has nothing to do.
        tensors = [tf.constant(inputs), caps]
        if repeat.partition is None:
            return call_flat(repeat.function, tensors)
        if repeat.captures is None:
            parts = call_flat(repeat.function, tensors)
        else:  # eagerly, no tape (checked above): what `_call_flat` runs, less its Python
            parts = call_untaped(repeat.function, tensors, repeat.captures)
        return ragged_from_parts(repeat.partition, parts[0], parts[1])

    def repeat(self, cascade, key, inputs, steps):
        """The `Repeat` of a call's `key` (as `repeated` makes it), kept; None where its calls must take the
        general path (every time, or until its signature has passed the full checks). `repeated` has checked
        that the call is eager, untaped and not `run_eagerly`."""
        kind, training = key[:2]
        if cascade._general:
            return None
        if cascade._xla is None or cascade._loop_choice is None:  # the first call's probes take its shape
            return None
        if signature(inputs, steps)[0] not in self.signatures or inputs.ndim != 3 or inputs.shape[1] == 0:
            return None
        # The function a call of this signature traced on the general path (None: none has yet, say under a
        # tape: the general path traces it, so that its errors reach the caller as the general path raises them).
        function = compiled.traced(cascade, kind, tf.constant(inputs), training=training)  # (the key reads F)
        if function is None:
            return None
        partition = self.outer(*inputs.shape[:2]) if kind == "ragged" else None
        if len(self.repeats) >= _SIGNATURES:
            self.repeats.clear()
        self.repeats[key] = repeat = Repeat(function, partition, fixed_captures(function))
        return repeat

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
        if array.size:
            copies = n if array.ndim == 1 else 1  # shared steps `(Ta,)` serve every sample
            peak = greatest(array)
            if peak > self.limit or (peak * array.size * copies > STEPS_MAX
                                     and int(array.sum(dtype=np.int64)) * copies > STEPS_MAX):
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
            partition = self.outer(samples, outer)
            nested = [ragged_from_parts(partition, flat, parts[1]) for flat in flats]
        else:
            nested = [tf.RaggedTensor.from_uniform_row_length(
                tf.RaggedTensor.from_row_splits(flat, parts[1], validate=False), outer, nrows=samples, validate=False)
                for flat in flats]
        return tuple(nested) if len(nested) > 1 else nested[0]

    def outer(self, samples, outer):
        """The outer partition `(samples, outer)` of an eager ragged result, as a `tf.RaggedTensor` over zeros
        (`ragged_from_parts` reads its `_row_partition`), made once per size."""
        return self.constant(("outer", samples, outer), lambda: tf.RaggedTensor.from_uniform_row_length(
            tf.zeros([samples * outer], tf.int64), outer, nrows=samples, validate=False))

    def constant(self, key, make):
        """The constant tensor `make()` made the first time under `key`, made eagerly (outside any trace); kept
        for the last `_SIGNATURES` keys' worth (a program calling with many shapes starts again)."""
        if key not in self.constants:
            if len(self.constants) >= _SIGNATURES:
                self.constants.clear()
            with tf.init_scope():
                self.constants[key] = make()
        return self.constants[key]


class Repeat:
    """What a repeated call of one signature runs: the concrete function its general path ran, its captured
    inputs, and the outer partition `(N, Ta)` of its ragged result.

    Attributes:
        function: `compiled.concrete`'s function for the call (plain run, its `training`, no tape).
        partition: a `tf.RaggedTensor` whose `_row_partition` is the result's outer partition; None for
            `run`'s flat result.
        captures: the function's captured inputs where they are fixed (`keras_internals.fixed_captures`),
            else None (read at each call).
    """

    __slots__ = ("function", "partition", "captures")

    def __init__(self, function, partition, captures):
        self.function = function
        self.partition = partition
        self.captures = captures


def plain(targets, sample_index, probability, return_tokens, initial_state, return_state):
    """Whether a call's arguments other than inputs, steps and `training` are all at their defaults."""
    return (targets is None and sample_index is None and type(probability) is float and probability == 0
            and return_tokens is False and initial_state is None and return_state is False)


def greatest(array):
    """The greatest value of integer `array` (not empty) as an int, any negative value counted as above
    int32's count (`STEPS_MAX`), so that one comparison refuses both.

    One reduction, not two (least and greatest): read as unsigned of its width, a negative integer of 4 or 8
    bytes is at least 2**31 > `STEPS_MAX`, and a non-negative one is itself. Narrower or non-native integers
    take the least and the greatest.
    """
    dtype = array.dtype
    if dtype.itemsize >= 4 and dtype.isnative:
        return int(array.view(f"u{dtype.itemsize}").max())
    return STEPS_MAX + 1 if array.min() < 0 else int(array.max())


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
