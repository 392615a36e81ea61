"""`min_steps`: no stop rule stops a pair before it has run that many steps (against an eager reference)."""

import numpy as np
import pytest

import builders
import paths
import stopref
from cascade_cli.errors import ParameterError
from cascade_cli.options import StopRule
from cascade_cli.run.cascade import Cascade
from test_runner import counting_b, make_b

MAX_STEPS = 6
CAPS = np.array([[6, 0, 2, 1, 6], [0, 0, 0, 0, 0], [3, 6, 6, 0, 1], [6, 6, 6, 6, 6]])


def low_threshold(a, b, x, state, quantile=0.2):
    """A norm most outputs meet: without min_steps most pairs stop at their first step."""
    values = Cascade(a, b, state=state, run_eagerly=True).run(x, np.full(x.shape[:2], MAX_STEPS))[0].numpy()
    return float(np.quantile(np.linalg.norm(values, axis=-1), quantile))


def check(cascade, x, caps, **kwargs):
    values, lengths = cascade.run(x, caps)[:2]
    rule = cascade.stop_rule
    expected, expected_lengths, _ = stopref.reference(
        cascade.model_a, cascade.model_b, x, caps, state=cascade.state, min_steps=cascade.min_steps,
        exclude_stop_step=cascade.exclude_stop_step, stop=lambda y: np.linalg.norm(y) >= rule.value, **kwargs)
    np.testing.assert_array_equal(lengths.numpy(), expected_lengths)
    np.testing.assert_allclose(values.numpy(), expected, atol=1e-5)
    return expected_lengths


# quick: one case on the default, two plain ones (each state, exclude and form of B on the plain path); the rest
# run with -m slow
@pytest.mark.parametrize("b_kind, state, exclude, jit", paths.quick(paths.both(
    [(b, s, e) for e in (False, True) for b, s in [("gru", "reset"), ("gru", "carry"), ("sequence", "reset")]],
    auto=[("gru", "reset", True), ("gru", "carry", False)]),
    "gru-reset-True-auto", "gru-carry-True-plain", "sequence-reset-False-plain"))
def test_min_steps_equals_reference(b_kind, state, exclude, jit):
    a, b = builders.model_a(), make_b(b_kind, output_size=3)
    x = builders.inputs(4, 5)
    rule = StopRule.norm(low_threshold(a, b, x, state))
    free = check(Cascade(a, b, state=state, max_steps=MAX_STEPS, stop_rule=rule, exclude_stop_step=exclude,
                         jit_compile=False), x, CAPS)
    cascade = Cascade(a, b, state=state, max_steps=MAX_STEPS, stop_rule=rule, exclude_stop_step=exclude,
                      min_steps=3, jit_compile=jit)
    held = check(cascade, x, CAPS)
    paths.assert_path(cascade, jit, loop=b_kind != "sequence")
    floor = np.minimum(CAPS, 3 - int(exclude))  # what min_steps=3 guarantees where the cap allows
    assert (held >= floor).all() and not (free >= floor).all()  # min_steps changed the lengths


# quick: one case per path, each state once (greedy: a min_steps step must not stop on the sampled token); the
# identity sampler's cases run with -m slow
@pytest.mark.parametrize("state, sampler, jit", paths.quick(paths.both(
    [(s, m) for m in ("identity", "greedy") for s in ("reset", "carry")],
    auto=[("reset", "greedy"), ("carry", "identity")]), "reset-greedy-auto", "carry-greedy-plain"))
def test_min_steps_with_feedback_equals_reference(state, sampler, jit):
    a, b = builders.model_a(), builders.feedback_b("gru", output_size=3)
    x = builders.inputs(4, 5)
    free = Cascade(a, b, state=state, feedback=True, sampler=sampler, jit_compile=False)
    result = free.run(x, np.full(x.shape[:2], MAX_STEPS), return_tokens=sampler == "greedy")
    if sampler == "greedy":
        token = int(np.bincount(result[2].numpy()).argmax())  # the token most steps emit
        rule, stop = StopRule.token(token), (lambda y, sampled: sampled == token)
    else:
        norms = np.linalg.norm(result[0].numpy(), axis=-1)
        rule = StopRule.norm(float(np.quantile(norms, 0.2)))
        stop = lambda y: np.linalg.norm(y) >= rule.value  # noqa: E731
    lengths = {}
    for min_steps in (0, 4):
        cascade = Cascade(a, b, state=state, feedback=True, sampler=sampler, max_steps=MAX_STEPS, stop_rule=rule,
                          min_steps=min_steps, jit_compile=jit if min_steps else False)
        got = cascade.run(x, CAPS, return_tokens=sampler == "greedy")
        expected, lengths[min_steps], tokens = stopref.reference(a, b, x, CAPS, state=state, feedback=True,
                                                                 sampler=sampler, stop=stop, min_steps=min_steps)
        np.testing.assert_array_equal(got[1].numpy(), lengths[min_steps])
        np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-5)
        if sampler == "greedy":
            assert got[2].numpy().tolist() == tokens
    paths.assert_path(cascade, jit)
    assert (lengths[4] >= np.minimum(CAPS, 4)).all() and not (lengths[0] >= np.minimum(CAPS, 4)).all()


@pytest.mark.parametrize("state", ["reset", "carry"])
def test_rows_processed_equal_emitted_lengths_with_min_steps(state):
    b, counter = counting_b(units=5)
    a = builders.model_a()
    x = builders.inputs(4, 5)
    cascade = Cascade(a, b, state=state, max_steps=MAX_STEPS, stop_rule=StopRule.norm(low_threshold(a, b, x, state)),
                      min_steps=2, jit_compile=False)
    stopref.assert_rows_processed_equal_emitted(cascade, counter, x, CAPS)


def test_eager_and_tf_function_agree_with_min_steps():
    a, b = builders.model_a(), builders.step_b("lstm", output_size=3)
    x = builders.inputs(4, 5)
    cascade = Cascade(a, b, state="carry", max_steps=MAX_STEPS, min_steps=3, jit_compile=False,
                      stop_rule=StopRule.norm(low_threshold(a, b, x, "carry")))
    stopref.assert_eager_equals_compiled(cascade, x, CAPS)


def test_bad_min_steps():
    a, b = builders.model_a(), builders.step_b("gru", output_size=3)
    rule = StopRule.norm(1.0)
    with pytest.raises(ParameterError, match=r"^min_steps: expected at most max_steps=4, received 5\.$"):
        Cascade(a, b, max_steps=4, stop_rule=rule, min_steps=5)
    with pytest.raises(ParameterError, match=r"^min_steps: holds a stop rule off for the first steps and needs one "
                                             r"\(stop_rule\); received min_steps=2 with stop_rule=None\.$"):
        Cascade(a, b, max_steps=4, min_steps=2)
    with pytest.raises(ParameterError, match=r"^min_steps: expected a non-negative integer, received -1\.$"):
        Cascade(a, b, max_steps=4, stop_rule=rule, min_steps=-1)
    assert Cascade(a, b, max_steps=4, stop_rule=rule, min_steps=4, jit_compile=False).min_steps == 4


# ------------------------------------------------------------ the command line

from clitools import assert_error, assert_nothing_in, assert_ok, invoke  # noqa: E402
from test_cli import direct, files, generate  # noqa: E402,F401 - `files` is the module's fixture


def test_generate_min_steps_writes_the_runner_values(files, tmp_path):  # noqa: F811
    import h5py

    from cascade_cli.results_io import read_result

    assert_ok(generate(files, tmp_path / "r.h5", "--max-steps", 4, "--stop-norm", 0.0, "--min-steps", 3))
    values, lengths = direct(files, None, max_steps=4, stop_rule=StopRule.norm(0.0), min_steps=3, jit_compile=False)
    assert (lengths == 3).all()  # every output meets norm >= 0: each pair stops at its third step
    got = read_result(tmp_path / "r.h5")
    np.testing.assert_array_equal(got.lengths, lengths)
    np.testing.assert_allclose(got.values, values, rtol=1e-5, atol=1e-6)
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert f.attrs["min_steps"] == 3


@pytest.mark.parametrize("args, words", [
    (["--max-steps", "3", "--stop-norm", "1", "--min-steps", "4"], ["--min-steps: expected at most --max-steps 3, received 4."]),
    (["--max-steps", "3", "--min-steps", "2"], ["--min-steps", "needs one"]),
])
def test_bad_min_steps_flags_exit_2(files, tmp_path, args, words):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    assert_error(generate(files, out / "r.h5", *args), 2, *words)
    assert_nothing_in(out)


def test_pack_keeps_min_steps(files, tmp_path):  # noqa: F811
    import h5py

    from cascade_cli.results_io import read_result

    generator = tmp_path / "g.keras"
    assert_ok(invoke("pack", "--model-a", files["a.keras"], "--model-b", files["b.keras"], "--max-steps", 4,
                     "--stop-norm", 0.0, "--min-steps", 2, "-o", generator))
    assert_ok(invoke("generate", "--model", generator, "--inputs", files["x.h5"], "-o", tmp_path / "r.h5"))
    assert (read_result(tmp_path / "r.h5").lengths == 2).all()
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert f.attrs["min_steps"] == 2
