"""Beam search (issue 33): against an eager exhaustive search, greedy, a case worked out by hand, and the CLI.

`beamref.exhaustive` enumerates every token sequence of every pair (O = 3, at most 4 steps: 120 B calls a pair)
and picks the best by the contract's score; a beam wide enough to keep every live hypothesis
(`O ** (max_steps - 1)` = 27) must find the very same sequences, values and lengths.
"""

import h5py
import numpy as np
import pytest
import tensorflow as tf

import beamref
import builders
from clitools import assert_error, assert_ok, invoke
from cascade_cli.run import beam
from cascade_cli.errors import ParameterError
from cascade_cli.train.keras_model import CascadeModel
from cascade_cli.options import Sampler, StopRule
from cascade_cli.results_io import read_result, read_result_attrs
from cascade_cli.run.cascade import Cascade

N, TA, O, MAX = 3, 3, 3, 4
WIDE = O ** (MAX - 1)  # keeps every live hypothesis
END = (0,)


def scaled_b(seed=31, stop_shift=1.0, states=True):
    """A feedback B with sharper random outputs and a rarer stop token, so that the best sequences are not greedy's."""
    b = builders.feedback_b(output_size=O, units=5, seed=seed, states=states)
    dense = b.layers[-1]
    kernel, bias = dense.get_weights()
    bias = bias.copy()
    bias[0] -= stop_shift
    dense.set_weights([kernel * 3, bias])
    return b


@pytest.fixture(scope="module")
def models():
    return builders.model_a(features=3, ir_size=4), scaled_b()


@pytest.fixture(scope="module")
def x():
    return builders.inputs(N, TA, seed=1)


def cascade(models, sampler, **settings):
    settings = {"feedback": True, "max_steps": MAX, "stop_rule": StopRule.token(0), **settings}
    return Cascade(*models, sampler=sampler, **settings)


def assert_same(got, want):
    values, lengths, tokens = (np.asarray(t) for t in got)
    np.testing.assert_array_equal(lengths, want[1])
    np.testing.assert_array_equal(tokens, want[2])
    np.testing.assert_allclose(values, want[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ against the exhaustive search


# quick: each state and start once; the other two run with -m slow
@pytest.mark.parametrize("state, start", [("reset", "zeros"), pytest.param("carry", "zeros", marks=pytest.mark.slow),
                                          pytest.param("reset", "previous", marks=pytest.mark.slow),
                                          ("carry", "previous")])
def test_a_wide_beam_is_the_exhaustive_search(models, x, state, start):
    want = beamref.exhaustive(*models, x, MAX, stop_ids=END, state=state, start=start)
    got = cascade(models, Sampler.beam(WIDE), state=state, feedback_start=start).run(x, return_tokens=True)
    assert_same(got, want)
    greedy = cascade(models, "greedy", state=state, feedback_start=start).run(x, return_tokens=True)
    differs = greedy[1].numpy().tolist() != want[1].tolist() or greedy[2].numpy().tolist() != want[2].tolist()
    assert differs, "the models must make the exhaustive choice differ from greedy's somewhere"
    assert len(set(want[1].ravel().tolist())) > 1  # pairs end at several lengths


def test_without_a_stop_rule_every_hypothesis_runs_the_given_steps(models, x):
    steps = np.array([[3, 0, 2], [1, 4, 3], [2, 2, 0]])
    want = beamref.exhaustive(*models, x, steps)
    got = cascade(models, Sampler.beam(WIDE), stop_rule=None).run(x, steps, return_tokens=True)
    assert_same(got, want)
    greedy = cascade(models, "greedy", stop_rule=None).run(x, steps, return_tokens=True)
    assert greedy[2].numpy().tolist() != want[2].tolist()


def test_min_steps_and_exclude_stop_step_as_elsewhere(models, x):
    want = beamref.exhaustive(*models, x, MAX, stop_ids=END, min_steps=2, exclude_stop_step=True)
    got = cascade(models, Sampler.beam(WIDE), min_steps=2, exclude_stop_step=True).run(x, return_tokens=True)
    assert_same(got, want)


# quick: reset; carry runs with -m slow (test_a_wide_beam_is_the_exhaustive_search[carry-previous] runs the beam
# in carry)
@pytest.mark.parametrize("state", ["reset", pytest.param("carry", marks=pytest.mark.slow)])
def test_the_k_best_come_best_first(models, x, state):
    k = 3
    values, lengths, tokens = beam.best(cascade(models, Sampler.beam(WIDE), state=state), x, num_samples=k)
    splits = np.concatenate([[0], np.cumsum(lengths.numpy().reshape(N, k, TA).sum(axis=2).ravel())])
    for n in range(N):
        for rank in range(k):
            want = beamref.exhaustive(*models, x[n:n + 1], MAX, stop_ids=END, state=state, rank=rank)
            part = slice(splits[n * k + rank], splits[n * k + rank + 1])
            assert_same((values[part], lengths[n * k + rank][None], tokens[part]), want)
    # reset: each pair's K results are its K best sequences, in order
    if state == "reset":
        ranked = beamref.ranked_list(*models, x, MAX, 0, 0, stop_ids=END)
        firsts = [tokens[splits[n]:splits[n] + lengths[n, 0]].numpy().tolist() for n in range(k)]
        assert firsts == [hypothesis for _, hypothesis in ranked[:k]]


def test_num_samples_above_the_width_is_refused(models, x):
    with pytest.raises(ParameterError, match=r"num_samples: .*beam width 2, received 3"):
        beam.best(cascade(models, Sampler.beam(2)), x, num_samples=3)


# ------------------------------------------------------------------ greedy, and a case worked by hand


@pytest.mark.parametrize("settings", [{}, {"state": "carry"}, {"feedback_start": "previous"},
                                      {"exclude_stop_step": True, "min_steps": 2}, {"stop_rule": None}],
                         ids=["reset", "carry", "previous", "exclude-min", "no-stop"])
def test_width_one_is_greedy_exactly(models, x, settings):
    steps = None if settings.get("stop_rule", True) is not None else np.array([3, 1, 4])
    greedy = cascade(models, "greedy", **settings).run(x, steps, return_tokens=True)
    one = cascade(models, Sampler.beam(1), **settings).run(x, steps, return_tokens=True)
    for got, want in zip(one, greedy):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


# Probabilities chosen by hand: from the start, P(END, 1, 2) = (0.5, 0.4, 0.1); after token 1 or 2, (0.8, 0.1, 0.1).
START_P, AFTER_P = np.array([0.5, 0.4, 0.1]), np.array([0.8, 0.1, 0.1])


def hand_b():
    """A stateless feedback B whose logits are `log` of the probabilities above (B ignores x)."""
    b = builders.feedback_b(ir_size=4, output_size=O, states=False)
    kernel = np.zeros((4 + O, O), np.float32)
    kernel[4 + 1] = kernel[4 + 2] = np.log(AFTER_P) - np.log(START_P)  # y_prev one-hot of token 1 or 2
    b.layers[-1].set_weights([kernel, np.log(START_P).astype(np.float32)])
    return b


@pytest.mark.parametrize("penalty, want_tokens", [(0.0, [0]), (1.0, [1, 0])])
def test_a_length_penalty_changes_the_choice_worked_by_hand(penalty, want_tokens):
    # [END]: log 0.5 = -0.693; [1, END]: log 0.4 + log 0.8 = -1.139, / 2 = -0.570; every other sequence is below
    # -2.3 (/ 2: -1.15). Without a penalty [END] wins; dividing by the length, [1, END] does.
    models = (builders.model_a(features=3, ir_size=4), hand_b())
    x = builders.inputs(1, 1)
    run = cascade(models, Sampler.beam(2, length_penalty=penalty), max_steps=2).run(x, return_tokens=True)
    values, lengths, tokens = (t.numpy() for t in run)
    assert tokens.tolist() == want_tokens and lengths.tolist() == [[len(want_tokens)]]
    expected = np.log([START_P, AFTER_P][:len(want_tokens)])
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert beamref.exhaustive(*models, x, 2, stop_ids=END, length_penalty=penalty)[2].tolist() == want_tokens


def test_width_one_cannot_see_past_its_first_choice_even_with_a_penalty():
    # greedy ends at once (END is the likeliest first token); a beam of 1 does too, whatever the penalty
    models = (builders.model_a(features=3, ir_size=4), hand_b())
    tokens = cascade(models, Sampler.beam(1, length_penalty=1.0), max_steps=2).run(builders.inputs(1, 1),
                                                                                    return_tokens=True)[2]
    assert tokens.numpy().tolist() == [0]


@pytest.mark.slow  # 15-35 s on 2 cores; kept out of the default suite to hold it well under 15 minutes
def test_runs_inside_a_tf_function_and_on_a_zero_step_batch(models, x):
    runner = cascade(models, Sampler.beam(4), stop_rule=None)
    steps = np.zeros((N, TA), np.int32)
    values, lengths, tokens = tf.function(lambda x, s: runner.run(x, s, return_tokens=True))(x, steps)
    assert values.shape == (0, O) and tokens.shape == (0,) and lengths.numpy().sum() == 0
    eager = runner.run(x, np.array([2, 0, 1]), return_tokens=True)
    traced = tf.function(lambda x: runner.run(x, np.array([2, 0, 1]), return_tokens=True))(x)
    for got, want in zip(traced, eager):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
    ragged = runner(x, np.array([2, 0, 1]))
    np.testing.assert_allclose(ragged.flat_values.numpy(), eager[0].numpy(), rtol=1e-6)


# ------------------------------------------------------------------ refusals


def test_bad_settings_name_the_parameter(models):
    a, b = models
    for width in (0, -1, 2.5, True):
        with pytest.raises(ParameterError, match="^width: "):
            Sampler.beam(width)
    with pytest.raises(ParameterError, match="^length_penalty: expected a finite number"):
        Sampler.beam(2, length_penalty=float("inf"))
    with pytest.raises(ParameterError, match="^width: applies to sampler='beam' only"):
        Sampler("greedy", width=2)
    with pytest.raises(ParameterError, match="^sampler: 'beam' .* feedback=True"):
        Cascade(a, builders.step_b(output_size=O), sampler=Sampler.beam(2), max_steps=3)
    one_output = builders.feedback_b(output_size=1)
    with pytest.raises(ParameterError, match=r"^sampler: 'beam' .* O >= 2, received O=1"):
        Cascade(a, one_output, feedback=True, sampler=Sampler.beam(2), max_steps=3)
    with pytest.raises(ParameterError, match="^stop_rule: .*StopRule.token"):
        Cascade(a, b, feedback=True, sampler=Sampler.beam(2), max_steps=3, stop_rule=StopRule.norm(1.0))
    with pytest.raises(ParameterError, match="^jit_compile: True, but beam search"):
        Cascade(a, b, feedback=True, sampler=Sampler.beam(2), max_steps=3, jit_compile=True)


# ------------------------------------------------------------------ the command line, pack, export


@pytest.fixture(scope="module")
def files(tmp_path_factory, models, x):
    folder = tmp_path_factory.mktemp("beam")
    models[0].save(folder / "a.keras")
    models[1].save(folder / "b.keras")
    builders.step_b(output_size=O).save(folder / "plain_b.keras")
    builders.feedback_b(output_size=1).save(folder / "one_b.keras")
    np.save(folder / "x.npy", x)
    return folder


def generate(files, out, *flags, b="b.keras"):
    return invoke("generate", "--model-a", files / "a.keras", "--model-b", files / b, "--inputs", files / "x.npy",
                  *flags, "-o", out)


BEAM = ("--feedback", "--sampler", "beam", "--beam-width", str(WIDE), "--max-steps", str(MAX), "--stop-token", "0")


def test_generate_writes_the_exhaustive_choice_and_records_the_beam(files, models, x, tmp_path):
    assert_ok(generate(files, tmp_path / "r.h5", *BEAM, "--batch-size", "2"))
    got = read_result(tmp_path / "r.h5")
    assert_same((got.values, got.lengths, got.tokens), beamref.exhaustive(*models, x, MAX, stop_ids=END))
    attrs = read_result_attrs(tmp_path / "r.h5")
    assert (attrs["sampler"], attrs["beam_width"], attrs["length_penalty"]) == ("beam", WIDE, 0.0)


def test_generate_num_samples_gives_the_k_best_per_input(files, models, x, tmp_path):
    assert_ok(generate(files, tmp_path / "r.h5", *BEAM, "--num-samples", "2", "--batch-size", "3"))
    got = read_result(tmp_path / "r.h5")
    assert got.lengths.shape == (N * 2, TA)
    for rank in range(2):
        want = beamref.exhaustive(*models, x, MAX, stop_ids=END, rank=rank)
        np.testing.assert_array_equal(got.lengths[rank::2], want[1])
        tokens = [got.token_sequence(n * 2 + rank, t).tolist() for n in range(N) for t in range(TA)]
        splits = np.concatenate([[0], np.cumsum(want[1].ravel())])
        assert tokens == [want[2][splits[i]:splits[i + 1]].tolist() for i in range(N * TA)]


def test_pack_keeps_the_beam_and_the_export_serves_it(files, models, x, tmp_path):
    assert_ok(invoke("pack", "--model-a", files / "a.keras", "--model-b", files / "b.keras", "--feedback",
                     "--sampler", "beam", "--beam-width", "5", "--length-penalty", "0.5", "--max-steps", str(MAX),
                     "--stop-token", "0", "-o", tmp_path / "g.keras"))
    assert_ok(invoke("generate", "--model", tmp_path / "g.keras", "--inputs", files / "x.npy", "-o",
                     tmp_path / "r.h5"))
    got = read_result(tmp_path / "r.h5")
    want = cascade(models, Sampler.beam(5, length_penalty=0.5)).run(x, return_tokens=True)
    assert_same((got.values, got.lengths, got.tokens), [t.numpy() for t in want])
    model = CascadeModel.from_config(CascadeModel(*models, feedback=True, max_steps=MAX, stop_rule=StopRule.token(0),
                                                  sampler=Sampler.beam(5, 0.5)).get_config())
    assert model.cascade.sampler == Sampler.beam(5, length_penalty=0.5)


def test_the_saved_model_export_runs_the_beam(files, models, x, tmp_path):
    from cascade_cli.train.keras_model import export_saved_model

    model = CascadeModel(*models, feedback=True, max_steps=MAX, stop_rule=StopRule.token(0),
                         sampler=Sampler.beam(WIDE))
    export_saved_model(model, tmp_path / "served")
    served = tf.saved_model.load(str(tmp_path / "served")).signatures["serving_default"](inputs=tf.constant(x))
    assert_same((served["flat_values"], served["lengths"], served["tokens"]),
                beamref.exhaustive(*models, x, MAX, stop_ids=END))


@pytest.mark.parametrize("flags, code, words", [
    (("--feedback", "--sampler", "beam", "--beam-width", "0"), 2, ("--beam-width", "received 0")),
    (("--feedback", "--sampler", "beam"), 2, ("--sampler beam needs --beam-width",)),
    (("--feedback", "--beam-width", "3"), 2, ("--beam-width applies to --sampler beam only",)),
    (("--feedback", "--sampler", "greedy", "--length-penalty", "1"), 2, ("--length-penalty", "applies to --sampler beam only")),
    (("--sampler", "beam", "--beam-width", "2"), 2, ("--sampler", "feedback")),
    (("--feedback", "--sampler", "beam", "--beam-width", "2", "--num-samples", "3"), 1,
     ("--num-samples", "beam width 2")),
    (("--feedback", "--sampler", "beam", "--beam-width", "2", "--stop-norm", "1"), 2, ("--stop-norm",)),
    (("one_b.keras", "--feedback", "--sampler", "beam", "--beam-width", "2"), 2, ("--sampler", "O >= 2, received O=1")),
])
def test_bad_beam_flags_are_one_error_line(files, tmp_path, flags, code, words):
    b = "b.keras" if "--feedback" in flags else "plain_b.keras"
    if flags[0] == "one_b.keras":  # a feedback B with one output: nothing to score tokens with
        b, flags = flags[0], flags[1:]
    rule = () if "--stop-norm" in flags else ("--stop-token", "0")
    result = generate(files, tmp_path / "r.h5", *flags, "--max-steps", "3", *rule, b=b)
    assert_error(result, code, *words)
    assert not (tmp_path / "r.h5").exists()


@pytest.mark.slow  # XLA compiles the padded loop: about a minute on the shared 2 cores
def test_the_benchmarks_padded_beam_is_the_same_search():
    from benchmarks import beam as bench_beam, feedback

    plan = feedback.plan(quick=True)
    case = plan.cases[-1]
    model_a, model_b = feedback.build_models(features=plan.features, hidden=case.hidden, outputs=plan.outputs,
                                             max_steps=plan.max_steps)
    inputs, _ = feedback.make_data(np.random.default_rng(0), case.batch, case.outer, features=plan.features,
                                   max_steps=plan.max_steps)
    functions = bench_beam.methods(model_a, model_b, max_steps=plan.max_steps, features=plan.features)
    results = {name: [np.asarray(t) for t in function(tf.constant(inputs))] for name, function in functions.items()}
    bench_beam.check_equal(results)
