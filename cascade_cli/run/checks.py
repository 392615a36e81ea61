"""The checks of a call's arguments and of the settings that need the models: one home for each rule.

Each setting's own check (its type, range, choices) is `options`'s
(`check_runner_settings`); A's and B's forms and fit are `run.models`'s; a
stop rule against B is `run.stopping`'s. Here: the settings that need B's
spec (`state_init`, feedback), and every call's inputs, steps, targets,
sampling arguments and carried state, checked before any model runs (eagerly
where the values are known, else with graph assertions).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from cascade_cli.errors import DataError, ModelError, ParameterError, received
from cascade_cli.options import STEPS_MAX, check_choice, check_int, check_number
from cascade_cli.run import feedback
from cascade_cli.run.models import check_inputs_fit
from cascade_cli.run.state import CascadeState, carries_b, carries_previous
from cascade_cli.steps import check_steps


def check_state_init(state_init, *, state, a_spec, b_spec):
    """`state_init="ir"` needs a step-form B in `reset` mode whose every state size is H."""
    if state_init != "ir":
        return
    if b_spec.form != "step" or state != "reset":
        raise ParameterError(
            "state_init",
            f"'ir' needs a step-form B and state='reset', received a {b_spec.form}-form B and "
            f"state={state!r}.",
        )
    sizes = b_spec.state_sizes
    if not sizes or any(size != a_spec.ir_size for size in sizes):
        raise ModelError(
            f"state_init='ir' sets every state of B to the IR vector, so every state size "
            f"must equal H={a_spec.ir_size}; B's state sizes are {list(sizes)}."
        )


def check_feedback_settings(cascade):
    """The checks of `feedback`, `feedback_start` and `sampler` that need B's spec."""
    kind, token = cascade._start
    if not cascade.feedback and kind != "zeros":
        raise ParameterError("feedback_start", f"applies with feedback=True only; received "
                                               f"feedback_start={cascade.feedback_start!r} with feedback=False.")
    size = cascade.b_spec.output_size
    if token is not None and token >= size:
        raise ParameterError("feedback_start", f"token {token} is outside B's outputs: expected token:ID with ID in "
                                               f"[0, {size}), received {cascade.feedback_start!r}.")
    if cascade.sampler.kind != "identity" and cascade.b_spec.form != "step":
        raise ParameterError("sampler", f"{cascade.sampler.kind!r} samples every inner step's output and needs a "
                                        "step-form B; received a sequence-form B.")


def checked_inputs(inputs, a_spec):
    """The inputs as a float tensor `(N, Ta, F)` that fits A (`a_spec`)."""
    if isinstance(inputs, (tf.RaggedTensor, tf.SparseTensor)):
        raise ParameterError("inputs", f"expected a dense array (N, Ta, F), received a {type(inputs).__name__}; "
                                       "pad it to one Ta first (e.g. inputs.to_tensor()).")
    if inputs is None:
        raise ParameterError("inputs", "expected a float array (N, Ta, F), received None.")
    try:
        inputs = tf.convert_to_tensor(inputs)
    except (ValueError, TypeError) as error:  # rows of different lengths, objects
        raise ParameterError("inputs", f"expected a float array (N, Ta, F) of one shape, received a "
                                       f"{type(inputs).__name__} that is not one "
                                       f"({str(error).splitlines()[0][:120]}).") from None
    if not (inputs.dtype.is_floating or inputs.dtype.is_integer or inputs.dtype == tf.bool):
        raise ParameterError("inputs", f"expected a float array (N, Ta, F), received dtype {inputs.dtype.name}.")
    if not inputs.dtype.is_floating:
        inputs = tf.cast(inputs, tf.float32)
    check_inputs_fit(a_spec, inputs.shape)
    return inputs


def checked_caps(steps, inputs, *, max_steps):
    """Returns the per-pair caps `(N, Ta)` int32: the steps, or `max_steps` where none are given.

    Eagerly (every size known) this is numpy and one `tf.constant`: it runs on every eager call.
    """
    n, ta = inputs.shape[0], inputs.shape[1]
    size = [dim(inputs, 0), dim(inputs, 1)]
    if steps is None:
        if max_steps is None:
            raise ParameterError("steps", "required unless max_steps is set; received steps=None.")
        return tf.fill(size, tf.constant(max_steps, tf.int32))
    if tf.is_tensor(steps) and not hasattr(steps, "numpy"):
        steps = checked_symbolic_steps(steps, max_steps=max_steps)
    else:
        steps = check_steps(steps, n_samples=n, outer_steps=ta, max_steps=max_steps)
        total = int(steps.sum()) * (n if steps.ndim == 1 and n is not None else 1)
        if steps.size and (steps.max() > STEPS_MAX or total > STEPS_MAX):
            what = f"a step of {int(steps.max())}" if steps.max() > STEPS_MAX else f"{total} in all"
            raise ParameterError("steps", f"the runner counts inner steps in int32: expected at most "
                                          f"{STEPS_MAX} (2**31 - 2) per pair and per call, received {what}.")
        if steps.ndim == 1 and n is not None:
            steps = np.broadcast_to(steps, (n, steps.shape[0]))
        steps = tf.constant(np.ascontiguousarray(steps, dtype=np.int32))
        if steps.shape.rank == 2 and n is not None and ta is not None:
            return steps
    if steps.shape.rank == 1:
        steps = tf.broadcast_to(steps[None, :], size)
    return tf.ensure_shape(steps, [n, ta])


def checked_symbolic_steps(steps, *, max_steps):
    """Symbolic steps as int32, with graph assertions: non-negative, at most `max_steps`."""
    if not steps.dtype.is_integer:
        raise DataError(f"steps must be integers; received a tensor of dtype {steps.dtype.name}.")
    if steps.shape.rank not in (1, 2):
        raise DataError(f"steps must have shape (Ta,) or (N, Ta); received shape {tuple(steps.shape)}.")
    steps = tf.cast(steps, tf.int32)
    checks = [tf.debugging.assert_non_negative(steps, message="steps must be >= 0")]
    if max_steps is not None:
        checks.append(tf.debugging.assert_less_equal(steps, max_steps, message="steps above max_steps"))
    with tf.control_dependencies(checks):
        return tf.identity(steps)


def checked_extras(cascade, inputs, caps, steps, targets, sample_index, probability, return_tokens):
    """The feedback and sampling arguments of a call, checked: a `feedback.Feed`, or None for a plain run."""
    if (not cascade._general and targets is None and sample_index is None and return_tokens is False
            and isinstance(probability, float) and probability == 0):
        return None  # the defaults of a plain run: nothing to check (this runs on every eager call)
    check_choice("return_tokens", return_tokens, (True, False))
    if return_tokens and not cascade.sampler.tokens:
        raise ParameterError("return_tokens", f"needs a sampler that picks tokens (greedy or categorical); "
                                              f"received sampler={cascade.sampler.kind!r}.")
    symbolic_p = tf.is_tensor(probability) and not hasattr(probability, "numpy")
    probability_given = tf.is_tensor(probability)  # a tensor may take any value: scheduled sampling runs
    if not symbolic_p:
        probability = check_number("sampling_probability", float(np.asarray(probability))
                                   if tf.is_tensor(probability) or isinstance(probability, np.ndarray)
                                   else probability, minimum=0, maximum=1, expected="a probability in [0, 1]")
    if targets is None:
        if symbolic_p or probability != 0:
            raise ParameterError("sampling_probability", "applies to teacher forcing only: give targets; "
                                                         f"received {probability!r} without targets.")
    else:
        if not cascade.feedback:
            raise ParameterError("targets", "teacher forcing needs feedback=True (a feedback-form B); "
                                            "received targets with feedback=False.")
        if steps is None or cascade.stop_rule is not None:
            raise ParameterError("targets", "teacher forcing needs given steps and no stop rule (the targets "
                                            "fix every pair's length); received "
                                            + ("steps=None." if steps is None else f"stop_rule {cascade.stop_rule}."))
    if not cascade._general:
        return None
    n = inputs.shape[0]
    if sample_index is None:
        sample_index = tf.range(dim(inputs, 0), dtype=tf.int64)
    elif tf.is_tensor(sample_index) and not hasattr(sample_index, "numpy"):
        if not sample_index.dtype.is_integer or sample_index.shape.rank != 1:
            raise ParameterError("sample_index", f"expected (N,) integers, received a tensor of shape "
                                                 f"{tuple(sample_index.shape)} and dtype {sample_index.dtype.name}.")
        sample_index = tf.cast(sample_index, tf.int64)
        check = tf.debugging.assert_non_negative(sample_index, message="sample_index must be >= 0")
        with tf.control_dependencies([check]):
            sample_index = tf.ensure_shape(tf.identity(sample_index), [n])
    else:
        array = np.asarray(sample_index)
        if (array.dtype.kind not in "iu" or array.shape != (n,) or (array.size and array.min() < 0)):
            raise ParameterError("sample_index", f"expected ({n},) non-negative integers, one per sample, "
                                                 f"received {array.dtype.name} values of shape {array.shape}.")
        sample_index = tf.constant(array.astype(np.int64))
    scheduled = bool(probability_given or probability != 0)
    probability = tf.cast(probability, tf.float64)
    if probability.shape.rank != 0:
        raise ParameterError("sampling_probability", f"expected a scalar, received shape {tuple(probability.shape)}.")
    if targets is not None:
        targets = checked_targets(targets, caps, size=cascade.b_spec.output_size, dtype=cascade._y_dtype)
    return feedback.Feed(targets, sample_index, probability, bool(return_tokens), scheduled)


def checked_targets(targets, caps, *, size, dtype):
    """Targets `(sum(steps), O=size)` in B's output `dtype`; their row count checked against the steps.

    Integer token ids `(sum(steps),)` (sparse targets) are fed as their one-hot.
    """
    targets = tf.convert_to_tensor(targets)
    if targets.dtype.is_integer and targets.shape.rank == 1:
        if hasattr(targets, "numpy"):
            ids = targets.numpy()
            if ids.size and (ids.min() < 0 or ids.max() >= size):
                raise ParameterError("targets", f"token ids must be in [0, {size}) (B's outputs), received ids "
                                                f"from {ids.min()} to {ids.max()}.")
        else:
            checks = [tf.debugging.assert_non_negative(targets, message="targets: token ids must be >= 0"),
                      tf.debugging.assert_less(targets, tf.cast(size, targets.dtype),
                                               message="targets: token ids must be below O")]
            with tf.control_dependencies(checks):
                targets = tf.identity(targets)
        targets = tf.one_hot(targets, size, dtype=dtype)
    elif not targets.dtype.is_floating:
        raise ParameterError("targets", f"expected float values of shape (sum(steps), {size}) or integer token "
                                        f"ids of shape (sum(steps),), received dtype {targets.dtype.name} and "
                                        f"shape {tuple(targets.shape)}.")
    targets = tf.cast(targets, dtype)
    if targets.shape.rank != 2 or targets.shape[1] != size:
        raise ParameterError("targets", f"expected shape (sum(steps), O={size}) in value order, received shape "
                                        f"{tuple(targets.shape)}.")
    total = tf.reduce_sum(caps)
    if hasattr(targets, "numpy") and hasattr(total, "numpy"):
        if int(total) != targets.shape[0]:
            raise ParameterError("targets", f"expected sum(steps)={int(total)} rows (one per emitted value, in "
                                            f"value order), received {targets.shape[0]}.")
        return targets
    check = tf.debugging.assert_equal(tf.shape(targets)[0], total,
                                      message="targets: expected sum(steps) rows, one per emitted value")
    with tf.control_dependencies([check]):
        return tf.identity(targets)


def checked_state(cascade, initial_state, inputs):
    """`(a_states, b_states, previous, offset ())` int64: `initial_state` checked against this cascade and
    inputs, or zeros where it is None."""
    samples = dim(inputs, 0)
    n = inputs.shape[0]
    dtype, y_dtype = tf.as_dtype(cascade.model_a.outputs[0].dtype), cascade._y_dtype
    b_sizes = tuple(cascade.b_spec.state_sizes) if carries_b(cascade) else ()
    if initial_state is None:
        a_states = [tf.zeros([samples, size], cascade.model_a.inputs[1 + i].dtype)
                    for i, size in enumerate(cascade.a_spec.state_sizes)]
        b_states = [tf.zeros([samples, size], dtype) for size in b_sizes]
        previous = tf.zeros([samples, cascade.b_spec.output_size], y_dtype) if carries_previous(cascade) else None
        return a_states, b_states, previous, tf.constant(0, tf.int64)
    if not isinstance(initial_state, CascadeState):
        raise ParameterError("initial_state", f"expected a CascadeState (returned by run(..., return_state=True)),"
                                              f" received {received(initial_state)}.")
    expected = {"a_states": tuple(cascade.a_spec.state_sizes), "b_states": b_sizes,
                "previous": (cascade.b_spec.output_size,) if carries_previous(cascade) else ()}
    found = {"a_states": tuple(initial_state.a_states), "b_states": tuple(initial_state.b_states),
             "previous": () if initial_state.previous is None else (initial_state.previous,)}
    checked = {}
    for name, sizes in expected.items():
        tensors = [tf.convert_to_tensor(t) for t in found[name]]
        shapes = [tuple(t.shape) for t in tensors]
        if len(tensors) != len(sizes) or any(
                len(shape) != 2 or shape[1] != size or (n is not None and shape[0] not in (None, n))
                for shape, size in zip(shapes, sizes)):
            want = ", ".join(f"({n if n is not None else 'N'}, {size})" for size in sizes) or "none"
            raise ParameterError("initial_state", f"does not fit this cascade and inputs: expected {name} "
                                                  f"{want}, received shapes {shapes or 'none'}; pass the state "
                                                  "a call of this cascade returned for the same samples.")
        checked[name] = tensors
    offset = initial_state.offset
    if tf.is_tensor(offset) and not hasattr(offset, "numpy"):
        offset = tf.cast(offset, tf.int64)
    else:
        offset = tf.constant(check_int("initial_state.offset", int(offset) if hasattr(offset, "numpy") else offset,
                                       minimum=0), tf.int64)
    a_states = [tf.cast(t, cascade.model_a.inputs[1 + i].dtype) for i, t in enumerate(checked["a_states"])]
    b_states = [tf.cast(t, dtype) for t in checked["b_states"]]
    previous = tf.cast(checked["previous"][0], y_dtype) if checked["previous"] else None
    return a_states, b_states, previous, offset


def dim(tensor, axis):
    """A dimension of `tensor`: a Python int where it is static, else a scalar int64 tensor."""
    size = tensor.shape[axis]
    return size if size is not None else tf.shape(tensor, out_type=tf.int64)[axis]
