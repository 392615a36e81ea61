"""Several stop tokens: `StopRule.token(0, 5)` / `--stop-token 0,5`, against an eager reference."""

import functools
import hashlib

import numpy as np
import pytest

import builders
import paths
import stopref
from clitools import assert_error, assert_nothing_in, assert_ok, invoke
from cascade_cli.errors import ParameterError
from cascade_cli.options import StopRule
from cascade_cli.results_io import read_result, read_result_attrs
from cascade_cli.run.cascade import Cascade
from test_cli import STEPS, direct, files, generate  # noqa: F401 - `files` is test_cli's fixture
from test_runner import make_b

MAX_STEPS = 6
CAPS = np.array([[6, 0, 2, 1, 6], [0, 0, 0, 0, 0], [3, 6, 6, 0, 1], [6, 6, 6, 6, 6]])
O = 4


def test_stop_rule_of_several_tokens():
    rule = StopRule.token(0, 5)
    assert (rule.kind, rule.value, rule.token_ids) == ("token", (0, 5), (0, 5))
    assert (rule.describe(), rule.stored_value) == ("token in {0, 5}", "0,5")
    assert StopRule("token", [0, 5]) == StopRule("token", "0,5") == rule  # a config's list, a result's text
    one = StopRule.token(3)  # one token reads as it always did
    assert (one.value, one.token_ids, one.describe(), one.stored_value) == (3, (3,), "token == 3", 3)
    assert StopRule("token", [3]) == one
    assert StopRule.norm(1.5).token_ids == ()
    with pytest.raises(ParameterError, match=r"^token_id: token 0 is repeated: expected distinct ids, received "
                                             r"0,5,0\.$"):
        StopRule.token(0, 5, 0)
    with pytest.raises(ParameterError, match=r"^token_id: expected a non-negative integer, received -1\.$"):
        StopRule.token(0, -1)
    with pytest.raises(ParameterError, match=r"^token_id: expected at least one token id, received none\.$"):
        StopRule.token()


def two_tokens(a, b, x, state, **settings):
    """Two ids that each stop some pair the other does not (so a set differs from either alone).

    Found once per process for the same models (their weights), inputs and settings: cases that differ only in
    what they then check (exclude_stop_step, the path) share the search."""
    digest = hashlib.sha256(np.asarray(x).tobytes())
    for weight in a.get_weights() + b.get_weights():
        digest.update(weight.tobytes())
    key = (digest.hexdigest(), state, tuple(sorted(settings.items())))
    if key not in _FOUND:
        _FOUND[key] = _search_two_tokens(a, b, x, state, **settings)
    return list(_FOUND[key])


_FOUND = {}  # two_tokens' answers in this process


def _search_two_tokens(a, b, x, state, **settings):
    @functools.cache  # each id alone is asked about once, not once per pair
    def lengths(*ids):
        # eager: up to 10 runs (4 ids alone, 6 pairs), each a trace of its own if compiled
        cascade = Cascade(a, b, state=state, max_steps=MAX_STEPS, stop_rule=StopRule.token(*ids), run_eagerly=True,
                          **settings)
        return cascade.run(x, CAPS, return_tokens=False)[1].numpy()

    for first in range(O):
        for second in range(first + 1, O):
            both = lengths(first, second)
            if (both < lengths(first)).any() and (both < lengths(second)).any() and (both < CAPS).any():
                return [second, first]  # out of order on purpose
    raise AssertionError("no two tokens stop different pairs")


# quick: one case on the default, two plain ones (each form of B, state and exclude between them); the rest run
# with -m slow
@pytest.mark.parametrize("b_kind, state, exclude, jit", paths.quick(paths.both(
    [(b, s, e) for e in (False, True) for b, s in [("gru", "reset"), ("lstm", "carry"), ("sequence", "reset")]],
    auto=[("gru", "reset", True), ("lstm", "carry", False)]),
    "gru-reset-True-auto", "lstm-carry-True-plain", "sequence-reset-False-plain"))
def test_several_tokens_equal_reference(b_kind, state, exclude, jit):
    a, b = builders.model_a(), make_b(b_kind, output_size=O)
    x = builders.inputs(4, 5)
    ids = two_tokens(a, b, x, state)
    cascade = Cascade(a, b, state=state, max_steps=MAX_STEPS, stop_rule=StopRule.token(*ids),
                      exclude_stop_step=exclude, jit_compile=jit)
    values, lengths = cascade.run(x, CAPS)
    expected, expected_lengths, _ = stopref.reference(a, b, x, CAPS, state=state, exclude_stop_step=exclude,
                                                      stop=lambda y: int(np.argmax(y)) in ids)
    np.testing.assert_array_equal(lengths.numpy(), expected_lengths)
    np.testing.assert_allclose(values.numpy(), expected, atol=1e-5)
    paths.assert_path(cascade, jit, loop=b_kind != "sequence")


# quick: one case per path, each state once; carry on the plain path runs with -m slow
@pytest.mark.parametrize("state, jit", paths.quick(paths.both([("reset",), ("carry",)], auto=[("carry",)]),
                                              "carry-auto", "reset-plain"))
def test_several_sampled_tokens_with_feedback_equal_reference(state, jit):
    a, b = builders.model_a(), builders.feedback_b("gru", output_size=O)
    x = builders.inputs(4, 5)
    ids = two_tokens(a, b, x, state, feedback=True, sampler="greedy")
    cascade = Cascade(a, b, state=state, feedback=True, sampler="greedy", max_steps=MAX_STEPS, min_steps=2,
                      stop_rule=StopRule.token(*ids), jit_compile=jit)
    values, lengths, tokens = cascade.run(x, CAPS, return_tokens=True)
    expected, expected_lengths, expected_tokens = stopref.reference(
        a, b, x, CAPS, state=state, feedback=True, sampler="greedy", min_steps=2,
        stop=lambda y, token: token in ids)
    np.testing.assert_array_equal(lengths.numpy(), expected_lengths)
    np.testing.assert_allclose(values.numpy(), expected, atol=1e-5)
    assert tokens.numpy().tolist() == expected_tokens
    paths.assert_path(cascade, jit)


def test_a_stop_token_outside_b_is_refused_naming_it():
    a, b = builders.model_a(), builders.step_b("gru", output_size=3)
    with pytest.raises(ParameterError, match=r"^stop_rule: stop token 3 is outside B's outputs: expected an id in "
                                             r"\[0, 3\), received 0,3\.$"):
        Cascade(a, b, max_steps=3, stop_rule=StopRule.token(0, 3))


# ------------------------------------------------------------ the command line


def test_generate_with_several_stop_tokens_records_them(files, tmp_path):  # noqa: F811
    assert_ok(generate(files, tmp_path / "r.h5", "--max-steps", 4, "--stop-token", "1,0", "--steps-file",
                       files["steps.txt"]))
    values, lengths = direct(files, STEPS, max_steps=4, stop_rule=StopRule.token(1, 0))
    assert (lengths == np.minimum(STEPS, 1)).all()  # B has 2 outputs: every step meets {1, 0}
    got = read_result(tmp_path / "r.h5")
    np.testing.assert_array_equal(got.lengths, lengths)
    np.testing.assert_allclose(got.values, values, rtol=1e-5, atol=1e-6)
    attrs = read_result_attrs(tmp_path / "r.h5")
    assert (attrs["stop_rule"], attrs["stop_value"]) == ("token", "1,0")
    shown = invoke("inspect", tmp_path / "r.h5")
    assert_ok(shown)
    assert "token in {1, 0}" in shown.stdout


def test_pack_keeps_several_stop_tokens(files, tmp_path):  # noqa: F811
    generator = tmp_path / "g.keras"
    assert_ok(invoke("pack", "--model-a", files["a.keras"], "--model-b", files["b.keras"], "--max-steps", 4,
                     "--stop-token", "0,1", "-o", generator))
    assert_ok(invoke("generate", "--model", generator, "--inputs", files["x.h5"], "-o", tmp_path / "r.h5"))
    attrs = read_result_attrs(tmp_path / "r.h5")
    assert (attrs["stop_rule"], attrs["stop_value"]) == ("token", "0,1")
    assert (read_result(tmp_path / "r.h5").lengths == 1).all()


@pytest.mark.parametrize("value, words", [
    ("1,1", ["--stop-token", "token 1 is repeated: expected distinct ids, received 1,1."]),
    ("0,x", ["--stop-token", "'x' is not a valid integer"]),
    ("0,-1", ["--stop-token", "-1 is not in the range 0<=x<="]),
])
def test_bad_stop_tokens_exit_2(files, tmp_path, value, words):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    assert_error(generate(files, out / "r.h5", "--max-steps", 3, "--stop-token", value), 2, *words)
    assert_nothing_in(out)
