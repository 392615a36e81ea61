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
from cascade_cli.keras_internals import call_flat, ragged_from_parts
from cascade_cli.options import StopRule
from cascade_cli.run import checks
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


@pytest.mark.xla
@pytest.mark.parametrize("mode", list(MODES))
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

