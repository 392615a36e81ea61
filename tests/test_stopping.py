"""Run-time stopping rules against the eager reference: step, test the rule, stop."""

import numpy as np
import pytest

import builders
import paths
import stopref
from cascade_cli.errors import DataError, ParameterError
from cascade_cli.run.cascade import Cascade, StopRule
from test_runner import counting_b, make_b

MAX_STEPS = 6
CAPS = np.array([[6, 0, 2, 1, 6], [0, 0, 0, 0, 0], [3, 6, 6, 0, 1], [6, 6, 6, 6, 6]])


def norms(cascade, x):
    """Every output norm the cascade can produce at up to MAX_STEPS steps (reset and carry alike)."""
    out = Cascade(cascade.model_a, cascade.model_b, state=cascade.state, run_eagerly=True)(
        x, np.full(x.shape[:2], MAX_STEPS))
    return np.linalg.norm(out.flat_values.numpy(), axis=-1)


def python_rule(rule):
    if rule.kind == "norm":
        return lambda y: np.linalg.norm(y) >= rule.value
    return lambda y: int(np.argmax(y)) == rule.value


def check(cascade, x, steps):
    out = cascade(x, steps)
    expected, lengths = builders.reference(
        cascade.model_a, cascade.model_b, x, steps, state=cascade.state, max_steps=cascade.max_steps,
        stop=python_rule(cascade.stop_rule), exclude_stop_step=cascade.exclude_stop_step)
    np.testing.assert_array_equal(out.row_lengths(axis=2).numpy(), lengths)
    np.testing.assert_allclose(out.flat_values.numpy(), expected.numpy(), atol=1e-5)
    return lengths


FORMS_AND_STATES = [("gru", "reset"), ("gru", "carry"), ("lstm", "reset"), ("lstm", "carry"), ("sequence", "reset")]


# quick: one case on the default, two plain ones (each state, exclude and form of B between them); the rest run
# with -m slow. Sequence + carry is refused, tested below.
@pytest.mark.parametrize("b_kind, state, exclude, jit", paths.quick(paths.both(
    [(b, s, e) for e in (False, True) for b, s in FORMS_AND_STATES],
    auto=[("gru", "reset", False), ("lstm", "carry", True), ("sequence", "reset", True)]),
    "gru-reset-False-auto", "lstm-carry-True-plain", "sequence-reset-False-plain"))
def test_norm_rule_equals_reference(b_kind, state, exclude, jit):
    a, b = builders.model_a(), make_b(b_kind, output_size=3)
    x = builders.inputs(4, 5)
    probe = Cascade(a, b, state=state, jit_compile=False)
    threshold = float(np.quantile(norms(probe, x), 0.8))
    cascade = Cascade(a, b, state=state, max_steps=MAX_STEPS, stop_rule=StopRule.norm(threshold),
                      exclude_stop_step=exclude, jit_compile=jit)
    for steps in (None, CAPS):
        lengths = check(cascade, x, steps)
        if steps is None:
            assert lengths.max() == MAX_STEPS  # some pairs never stop
            assert np.any(lengths < MAX_STEPS - 1)  # and some do
    paths.assert_path(cascade, jit, loop=b_kind != "sequence")


# quick: gru carry on the default, sequence reset on the plain path; the plain gru cases run with -m slow
@pytest.mark.parametrize("b_kind, state, jit", paths.quick(
    paths.both([("gru", "reset"), ("gru", "carry"), ("sequence", "reset")], auto=[("gru", "carry")]),
    "gru-carry-auto", "sequence-reset-plain"))
def test_token_rule_equals_reference(b_kind, state, jit):
    a, b = builders.model_a(), make_b(b_kind, output_size=3)
    x = builders.inputs(4, 5)
    plain = Cascade(a, b, state=state, jit_compile=False)
    tokens = np.argmax(plain(x, np.full((4, 5), MAX_STEPS)).flat_values.numpy(), axis=-1)
    token = int(np.bincount(tokens, minlength=3).argmin())  # the rarest token: some pairs never stop
    for exclude in (False, True):
        cascade = Cascade(a, b, state=state, max_steps=MAX_STEPS, stop_rule=StopRule.token(token),
                          exclude_stop_step=exclude, jit_compile=jit)
        check(cascade, x, None)
        check(cascade, x, CAPS)
        paths.assert_path(cascade, jit, loop=b_kind != "sequence")


def test_stop_at_first_step_and_never():
    a, b = builders.model_a(), builders.step_b("gru", output_size=3)
    x = builders.inputs(3, 4)
    always = Cascade(a, b, max_steps=4, stop_rule=StopRule.norm(0.0))
    assert check(always, x, None).tolist() == [[1] * 4] * 3
    excluded = Cascade(a, b, max_steps=4, stop_rule=StopRule.norm(0.0), exclude_stop_step=True)
    assert excluded(x).flat_values.shape == (0, 3)
    never = Cascade(a, b, state="carry", max_steps=4, stop_rule=StopRule.norm(1e9))
    assert check(never, x, None).tolist() == [[4] * 4] * 3


@pytest.mark.parametrize("state", ["reset", "carry"])
def test_rows_processed_equal_emitted_lengths(state):
    b, counter = counting_b(units=5)
    a = builders.model_a()
    x = builders.inputs(4, 5)
    threshold = float(np.quantile(norms(Cascade(a, b, state=state), x), 0.6))
    cascade = Cascade(a, b, state=state, max_steps=MAX_STEPS, stop_rule=StopRule.norm(threshold))
    stopref.assert_rows_processed_equal_emitted(cascade, counter, x, CAPS)


@pytest.mark.parametrize("state", ["reset", "carry"])
def test_eager_and_tf_function_agree(state):
    a, b = builders.model_a(), builders.step_b("lstm", output_size=3)
    x = builders.inputs(4, 5)
    threshold = float(np.quantile(norms(Cascade(a, b, state=state), x), 0.7))
    cascade = Cascade(a, b, state=state, max_steps=MAX_STEPS, stop_rule=StopRule.norm(threshold))
    stopref.assert_eager_equals_compiled(cascade, x, CAPS)


def test_bad_stop_settings():
    a, b = builders.model_a(), builders.step_b("gru", output_size=3)
    with pytest.raises(ParameterError, match=r"^stop_rule: needs max_steps, the most inner steps a pair may run; "
                       r"received max_steps=None\.$"):
        Cascade(a, b, stop_rule=StopRule.norm(1.0))
    with pytest.raises(ParameterError, match=r"^stop_rule: stop token 3 is outside B's outputs: expected an id in "
                       r"\[0, 3\), received 3\.$"):
        Cascade(a, b, max_steps=3, stop_rule=StopRule.token(3))
    with pytest.raises(ParameterError, match=r"^max_steps: expected a positive integer, received 0\.$"):
        Cascade(a, b, max_steps=0)
    with pytest.raises(ParameterError, match="non-negative integer"):
        StopRule.token(-1)
    with pytest.raises(DataError, match=r"at index \(0, 1\): expected at most max_steps=6, received 7"):
        Cascade(a, b, max_steps=MAX_STEPS)(builders.inputs(1, 3), np.array([[1, 7, 0]]))
    with pytest.raises(ParameterError, match=r"^steps: required unless max_steps is set; received steps=None\.$"):
        Cascade(a, b)(builders.inputs(1, 3))


def test_sequence_form_carry_with_a_stop_rule_is_refused():
    with pytest.raises(ParameterError, match=r"^stop_rule: with state='carry' needs a step-form B"):
        Cascade(builders.model_a(), builders.sequence_b(), state="carry", max_steps=3,
                stop_rule=StopRule.norm(1.0))


def test_max_steps_alone_runs_every_pair_to_max_steps():
    a, b = builders.model_a(), builders.step_b()
    out = Cascade(a, b, max_steps=3)(builders.inputs(2, 4))
    assert out.row_lengths(axis=2).numpy().tolist() == [[3] * 4] * 2
