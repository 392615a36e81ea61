"""The eager call's own work around its compiled call (`cascade_cli.run.eager`, issue 29).

An eager call checks the types, dtypes and shapes of its arguments once per
signature, then only the steps' values, and reuses its small constant tensors.
It must return exactly what the full checks' call returns (bit for bit, in
every mode, and what the same cascade returns inside a `tf.function`), and
raise exactly the error the full checks raise for the same bad arguments,
whatever was called before. The `xla` cases keep the shipped default
(`jit_compile="auto"`: the fused XLA call).
"""

import numpy as np
import pytest
import tensorflow as tf

import builders
from cascade_cli.errors import CascadeError
from cascade_cli.keras_internals import call_flat, call_untaped, fixed_captures, ragged_from_parts
from cascade_cli.options import StopRule
from cascade_cli.run import checks, compiled, eager
from cascade_cli.run.cascade import Cascade

X = builders.inputs(5, 3)
STEPS = np.array([[2, 0, 3], [0, 0, 0], [1, 1, 0], [3, 2, 1], [0, 4, 0]], np.int32)


def parts(result):
    """A call's result as a flat list of numpy arrays: values, splits and static shapes of ragged tensors."""
    if isinstance(result, (tuple, list)):
        return [array for item in result for array in parts(item)]
    if isinstance(result, tf.RaggedTensor):
        return [result.flat_values.numpy(), *(s.numpy() for s in result.nested_row_splits),
                np.array(result.shape.as_list()[:2])]
    return [np.asarray(result)]


def assert_same_bits(want, got):
    want, got = parts(want), parts(got)
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def fb():
    return builders.feedback_b()


# name: (B, settings, call, positional arguments, keyword arguments)
MODES = {
    "reset": (builders.step_b, {}, "__call__", (X, STEPS), {}),
    "reset, shared steps": (builders.step_b, {}, "run", (X, [1, 0, 2]), {}),
    "carry": (builders.step_b, dict(state="carry"), "__call__", (X, STEPS), {}),
    "carry, max_steps": (builders.step_b, dict(state="carry", max_steps=4), "run", (X, None), {}),
    "norm stop": (builders.step_b, dict(max_steps=5, stop_rule=StopRule.norm(1.0)), "__call__", (X, None), {}),
    "greedy feedback, token stop": (fb, dict(feedback=True, sampler="greedy", max_steps=5,
                                             stop_rule=StopRule.token(0)), "run", (X,), dict(return_tokens=True)),
    "categorical, sample_index": (fb, dict(feedback=True, sampler="categorical", seed=7, max_steps=5,
                                           stop_rule=StopRule.token(0)), "run", (X,),
                                  dict(return_tokens=True, sample_index=np.array([9, 8, 7, 6, 5]))),
    "categorical, default sample_index": (fb, dict(feedback=True, sampler="categorical", seed=7, max_steps=5,
                                                   stop_rule=StopRule.token(0)), "__call__", (X,),
                                          dict(return_tokens=True)),
}


# "carry, max_steps" runs with -m slow: "carry" calls carry and "norm stop" calls with max_steps and no steps
@pytest.mark.xla
@pytest.mark.parametrize("mode", [pytest.param(mode, marks=pytest.mark.slow) if mode == "carry, max_steps" else mode
                                  for mode in MODES])
def test_every_eager_call_of_a_signature_gives_the_full_checks_bits_and_the_tf_function_ones(mode):
    make_b, settings, method, args, kwargs = MODES[mode]
    call = getattr(Cascade(builders.model_a(), make_b(), **settings), method)
    first = call(*args, **kwargs)  # the full checks
    assert_same_bits(first, call(*args, **kwargs))  # the fast lane
    tensors = [tf.constant(a) if a is not None and not isinstance(a, list) else a for a in args]
    assert_same_bits(first, call(*tensors, **kwargs))
    traced = tf.function(lambda *a: call(*a, **kwargs))
    assert_same_bits(first, traced(*[tf.constant(a) for a in args if a is not None]))


def test_other_signatures_and_constants_of_other_sizes_are_not_mixed_up():
    model_a, model_b = builders.model_a(), builders.feedback_b()
    settings = dict(feedback=True, sampler="categorical", seed=3, max_steps=4, stop_rule=StopRule.token(0))
    cascade = Cascade(model_a, model_b, **settings)
    calls = [(X, {}), (X[:2], {}), (X[:2].astype(np.float64), {}), (tf.constant(X[1:4]), {}),
             (X, dict(return_tokens=True)), (X[:2], dict(return_tokens=True))]
    wants = [Cascade(model_a, model_b, **settings).run(inputs, **kwargs) for inputs, kwargs in calls]
    for (inputs, kwargs), want in zip(calls * 2, wants * 2):
        assert_same_bits(want, cascade.run(inputs, **kwargs))


def test_only_a_calls_first_signature_runs_the_full_checks(monkeypatch):
    cascade = Cascade(builders.model_a(), builders.step_b())
    seen = []
    full = checks.checked_inputs
    monkeypatch.setattr(checks, "checked_inputs", lambda *a, **k: seen.append(1) or full(*a, **k))
    cascade.run(X, STEPS)
    cascade.run(X, STEPS + 1)
    cascade.run(tf.constant(X), STEPS)
    assert len(seen) == 2  # numpy inputs once, a tensor once
    cascade.run(X[:2], STEPS[:2])
    assert len(seen) == 3  # another shape
    with pytest.raises(CascadeError):
        cascade.run(X, -STEPS)  # a value the lane cannot pass: the full checks run and raise
    assert len(seen) == 4


def error(cascade, method, *args, **kwargs):
    with pytest.raises(CascadeError) as raised:
        getattr(cascade, method)(*args, **kwargs)
    return type(raised.value), str(raised.value)


BIG = np.full((5, 3), 2**30, np.int64)  # each pair within int32's count, all of them together above it

# name: (settings, a good call's arguments, the bad call's arguments of the same signature)
BAD = {
    "a negative step": ({}, (X, STEPS), (X, STEPS - 1)),
    "a step above max_steps": (dict(max_steps=4), (X, STEPS), (X, STEPS + 1)),
    "a step above int32's count": ({}, (X, STEPS.astype(np.int64)), (X, STEPS.astype(np.int64) + 2**31)),
    "too many steps in all": ({}, (X, np.ones((5, 3), np.int64)), (X, BIG)),
    "too many shared steps in all": ({}, (X, np.ones(3, np.int64)), (X, BIG[0] * 2)),
    "a negative shared step": ({}, (X, [1, 2, 3]), (X, [1, -2, 3])),
    "a negative tensor step": ({}, (X, tf.constant(STEPS)), (X, tf.constant(-STEPS))),
    "steps of another shape": ({}, (X, STEPS), (X, STEPS[:, :2])),
    "float steps": ({}, (X, STEPS), (X, STEPS.astype(np.float32) + 0.5)),
    "no steps, no max_steps": ({}, (X, STEPS), (X, None)),
    "inputs of another F": ({}, (X, STEPS), (X[:, :, :2], STEPS)),
    "inputs of two dims": ({}, (X, STEPS), (X[:, :, 0], STEPS)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_call_raises_the_full_checks_error_after_good_calls_of_its_signature(case):
    settings, good, bad = BAD[case]
    model_a, model_b = builders.model_a(), builders.step_b()
    want = error(Cascade(model_a, model_b, **settings), "run", *bad)
    cascade = Cascade(model_a, model_b, **settings)
    for _ in range(2):  # the full checks, then the repeated-call lane where it takes the call (numpy arguments)
        cascade.run(*good)
        cascade(*good)
    assert error(cascade, "run", *bad) == want
    assert error(cascade, "__call__", *bad) == want


@pytest.mark.parametrize("kwargs", [dict(return_tokens=1), dict(return_tokens="yes"), dict(sampling_probability=0.5),
                                    dict(sample_index=[0, 1]), dict(targets=np.zeros((3, 3), np.float32))])
def test_bad_feedback_arguments_raise_the_full_checks_error_after_good_calls(kwargs):
    model_a, model_b = builders.model_a(), builders.feedback_b()
    settings = dict(feedback=True, sampler="greedy", max_steps=3, stop_rule=StopRule.token(0))
    want = error(Cascade(model_a, model_b, **settings), "run", X, **kwargs)
    cascade = Cascade(model_a, model_b, **settings)
    cascade.run(X)
    cascade.run(X, return_tokens=True)
    assert error(cascade, "run", X, **kwargs) == want


def test_tokens_of_an_identity_sampler_are_refused_after_good_calls():
    model_a, model_b = builders.model_a(), builders.feedback_b()
    cascade = Cascade(model_a, model_b, feedback=True, max_steps=3)
    cascade.run(X)
    assert error(cascade, "run", X, return_tokens=True) == error(
        Cascade(model_a, model_b, feedback=True, max_steps=3), "run", X, return_tokens=True)


def test_call_flat_calls_a_concrete_function_as_its_call_does():
    function = tf.function(lambda x, n: (x * 2.0, n + 1), input_signature=[
        tf.TensorSpec([None, 2], tf.float32), tf.TensorSpec([], tf.int64)]).get_concrete_function()
    x, n = tf.constant([[1.0, 2.0]]), tf.constant(3, tf.int64)
    assert_same_bits(function(x, n), call_flat(function, [x, n]))


def test_ragged_from_parts_is_with_values_of_from_row_splits():
    template = tf.RaggedTensor.from_uniform_row_length(tf.zeros([6], tf.int64), 3, nrows=2, validate=False)
    values, splits = tf.reshape(tf.range(14.0), [7, 2]), tf.constant([0, 2, 2, 3, 5, 5, 7], tf.int64)
    want = template.with_values(tf.RaggedTensor.from_row_splits(values, splits, validate=False))
    got = ragged_from_parts(template, values, splits)
    assert got.shape.as_list() == want.shape.as_list() == [2, 3, None, 2]
    assert got._type_spec == want._type_spec
    assert got.uniform_row_length is not None
    assert_same_bits(want, got)
    assert got.row_lengths().shape.as_list() == [2] and got.values.row_lengths().numpy().tolist() == [2, 0, 1, 2, 0, 2]
    # the private constructors set these attributes and no other (what `ragged_from_parts` sets by hand)
    assert sorted(vars(got)) == sorted(vars(want)) == ["_row_partition", "_values"]
    assert sorted(vars(got.values)) == sorted(vars(want.values))
    assert sorted(vars(got.values._row_partition)) == sorted(vars(want.values._row_partition))


def test_fixed_captures_and_call_untaped_call_a_concrete_function_as_its_call_does():
    weight = tf.Variable([[2.0, 1.0]])
    function = tf.function(lambda x: (x * weight, tf.reduce_sum(x)), input_signature=[
        tf.TensorSpec([None, 2], tf.float32)]).get_concrete_function()
    x = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    captures = fixed_captures(function)
    assert captures is not None
    assert_same_bits(list(function(x)), call_untaped(function, [x], captures))
    weight.assign([[0.5, 3.0]])  # a captured variable's handle: its value read at the call
    assert_same_bits(list(function(x)), call_untaped(function, [x], captures))



# The README's call repeated (`EagerLane.repeated`): numpy inputs and steps, defaults, no tape.

# name: (settings, call, positional arguments, keyword arguments); each called three times, the last two repeats
REPEATS = {
    "reset": ({}, "__call__", (X, STEPS), {}),
    "reset, run": ({}, "run", (X, STEPS), {}),
    "reset, shared int64 steps": ({}, "__call__", (X, STEPS[0].astype(np.int64)), {}),
    "carry": (dict(state="carry"), "__call__", (X, STEPS), {}),
    "carry, max_steps, no steps": (dict(state="carry", max_steps=4), "__call__", (X, None), {}),
    "carry, run, uint16 steps": (dict(state="carry"), "run", (X, STEPS.astype(np.uint16)), {}),
    "reset, training": ({}, "__call__", (X, STEPS), dict(training=True)),
    "reset, float64 inputs": ({}, "run", (X.astype(np.float64), STEPS), {}),
    "reset, no samples": ({}, "__call__", (X[:0], STEPS[:0]), {}),
}


# these four repeat what the others and the steps glance's dtype test cover: three cascades compile per case
REPEATS_SLOW = {"reset, shared int64 steps", "carry, max_steps, no steps", "carry, run, uint16 steps",
                "reset, float64 inputs"}


@pytest.mark.xla
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in REPEATS_SLOW else case
                                  for case in REPEATS])
def test_a_repeated_readme_call_gives_the_general_paths_bits_and_runs_only_its_concrete_function(case, monkeypatch):
    settings, method, args, kwargs = REPEATS[case]
    model_a, model_b = builders.model_a(), builders.step_b()
    want = getattr(Cascade(model_a, model_b, **settings), method)(*args, **kwargs)
    steps = None if args[1] is None else args[1][::-1].copy()  # other steps of the same signature
    want_other = getattr(Cascade(model_a, model_b, **settings), method)(args[0], steps, **kwargs)
    cascade = Cascade(model_a, model_b, **settings)
    assert_same_bits(want, getattr(cascade, method)(*args, **kwargs))  # the general path: full checks
    general = []
    for name in ("checked_inputs", "checked_caps", "checked_extras"):
        full = getattr(checks, name)
        monkeypatch.setattr(checks, name, lambda *a, full=full, **k: general.append(1) or full(*a, **k))
    call_compiled = compiled.call_compiled
    monkeypatch.setattr(compiled, "call_compiled", lambda *a, **k: general.append(1) or call_compiled(*a, **k))
    for _ in range(2):
        got = getattr(cascade, method)(*args, **kwargs)
        assert_same_bits(want, got)
        if method == "__call__":
            assert got.shape.as_list() == want.shape.as_list() == [*args[0].shape[:2], None, 2]
    assert not general  # neither the checks nor the general compiled call ran again
    assert_same_bits(want_other, getattr(cascade, method)(args[0].copy(), steps, **kwargs))
    assert not general


def test_a_readme_call_under_a_tape_or_in_a_trace_after_repeats_takes_the_general_path():
    model_a, model_b = builders.model_a(), builders.step_b()
    reference = Cascade(model_a, model_b)
    weights = model_a.trainable_variables + model_b.trainable_variables
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(reference(X, STEPS).flat_values)
    want = tape.gradient(total, weights)
    cascade = Cascade(model_a, model_b)
    for _ in range(3):
        cascade(X, STEPS)
    assert cascade._lane.repeats  # the lane holds the call
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(cascade(X, STEPS).flat_values)
    for a, b in zip(want, tape.gradient(total, weights)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    traced = tf.function(lambda: cascade(X, STEPS).flat_values)  # numpy arguments, a graph being built
    np.testing.assert_array_equal(traced().numpy(), reference(X, STEPS).flat_values.numpy())


def test_a_first_call_under_a_tape_leaves_the_plain_calls_trace_to_the_general_path():
    model_a, model_b = builders.model_a(), builders.step_b()
    want = Cascade(model_a, model_b)(X, STEPS)
    cascade = Cascade(model_a, model_b)
    with tf.GradientTape():
        cascade(X, STEPS)  # the full checks pass; the call traces the taped call's function only
    assert_same_bits(want, cascade(X, STEPS))  # the lane has no traced function for it: the general path
    assert not cascade._lane.repeats
    assert_same_bits(want, cascade(X, STEPS))
    assert cascade._lane.repeats


def test_a_cascade_run_eagerly_never_takes_the_lane():
    cascade = Cascade(builders.model_a(), builders.step_b(), run_eagerly=True)
    want = cascade(X, STEPS)
    for _ in range(2):
        assert_same_bits(want, cascade(X, STEPS))
    assert not cascade._lane.repeats


@pytest.mark.parametrize("max_steps", [None, 4])
def test_the_lanes_glance_at_steps_passes_exactly_what_the_full_checks_pass(max_steps):
    inputs = tf.constant(np.zeros((3, 2, 3), np.float32))
    lane = eager.EagerLane(max_steps)
    arrays = [np.array(values, dtype) for dtype in ("int8", "int16", "int32", "int64", "uint8", "uint16",
                                                    "uint32", "uint64", ">i4", ">i8", "<i8")
              for values in ([[0, 1], [4, 3], [2, 0]], [[0, 1], [5, 3], [2, 0]], [[0, -1], [4, 3], [2, 0]],
                             [1, 2], [4, 0], [0, 5], [-1, 2], [[0, 0], [0, 0], [0, 0]])
              if np.dtype(dtype).kind == "i" or min(np.ravel(values)) >= 0]
    arrays += [np.full((3, 2), 2**31 - 2, np.int64), np.array([[2**31 - 2, 0], [0, 0], [0, 0]], np.int64),
               np.array([[2**30, 2**30], [0, 0], [0, 0]], np.int64), np.array([2**30, 0], np.uint32),
               np.array([2**31 - 1, 0], np.uint32), np.array([2**31, 0], np.uint32),
               np.array([[2**63, 0], [0, 0], [0, 0]], np.uint64), np.array([[-2**63, 0], [0, 0], [0, 0]], np.int64),
               np.array([[1, 2], [3, 4], [5, 6]], np.int32)[:, ::-1]]
    for array in arrays:
        try:
            want = checks.checked_caps(array, inputs, max_steps=max_steps).numpy()
        except CascadeError:
            want = None
        got = lane.caps(array, 3, 2)
        assert (got is None) == (want is None), array
        if got is not None:
            np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "uint32", "uint64", ">i4", ">i8"])
def test_greatest_counts_a_negative_step_above_int32s_count(dtype):
    from cascade_cli.options import STEPS_MAX

    array = np.array([[3, 0], [7, 2]], dtype)
    assert eager.greatest(array) == 7
    if np.dtype(dtype).kind == "i":
        array[0, 1] = -1
        assert eager.greatest(array) > STEPS_MAX
