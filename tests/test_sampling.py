"""Samplers, seeded draws that do not depend on how the work is cut, and their settings."""

import math

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import builders
from cascade_cli.run import sampling
from cascade_cli.errors import ParameterError
from cascade_cli.options import Sampler, SamplingSchedule, StopRule, parse_feedback_start
from cascade_cli.run.cascade import Cascade

O = 6


def logits(rows=64, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(scale=2.0, size=(rows, O)), tf.float32)


def uniforms(rows, seed=1):
    return sampling.row_uniforms(seed, tf.range(rows), 0, 0, sampling.CATEGORICAL_STREAM)


def softmax(y, temperature=1.0):
    z = np.asarray(y, np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def test_top_k_1_and_a_tiny_temperature_equal_greedy():
    y, u = logits(), uniforms(64)
    greedy_fed, greedy_tokens = sampling.sample(Sampler.greedy(), y)
    np.testing.assert_array_equal(greedy_tokens.numpy(), np.argmax(y.numpy(), axis=-1))
    np.testing.assert_array_equal(greedy_fed.numpy(), np.eye(O, dtype=np.float32)[greedy_tokens.numpy()])
    for sampler in (Sampler.categorical(top_k=1), Sampler.categorical(temperature=1e-6),
                    Sampler.categorical(top_p=1e-9)):
        fed, tokens = sampling.sample(sampler, y, u)
        np.testing.assert_array_equal(tokens.numpy(), greedy_tokens.numpy())
        np.testing.assert_array_equal(fed.numpy(), greedy_fed.numpy())
    fed, tokens = sampling.sample(Sampler.identity(), y)
    assert tokens is None and fed is y


def test_categorical_draws_differ_from_greedy_somewhere():
    _, tokens = sampling.sample(Sampler.categorical(), logits(), uniforms(64))
    assert not np.array_equal(tokens.numpy(), np.argmax(logits().numpy(), axis=-1))


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("top_k", [None, 2])
def test_top_p_never_emits_a_token_outside_the_nucleus(top_p, top_k):
    rows = 4000
    y = logits(rows, seed=2)
    _, tokens = sampling.sample(Sampler.categorical(temperature=0.8, top_k=top_k, top_p=top_p), y, uniforms(rows))
    probabilities = softmax(y.numpy(), 0.8)
    tokens = tokens.numpy()
    used = set()
    for row, token in enumerate(tokens):
        order = np.argsort(-probabilities[row], kind="stable")
        before = np.cumsum(probabilities[row][order]) - probabilities[row][order]
        nucleus = order[before < top_p]
        if top_k is not None:
            nucleus = nucleus[:top_k]
        assert token in nucleus, (row, token, nucleus)
        used.add(len(nucleus))
    assert max(used) > 1  # the nucleus was more than one token somewhere: the check could fail


@pytest.mark.parametrize("sampler", [Sampler.categorical(temperature=0.7), Sampler.categorical(top_k=3)])
def test_first_step_draws_follow_the_softmax(sampler):
    """20,000 seeded first-step draws through the runner (the same input for every sample) pass a chi-square test."""
    draws = 20000
    a, b = builders.model_a(), builders.feedback_b(output_size=O)
    cascade = Cascade(a, b, feedback=True, sampler=sampler, seed=11, jit_compile=False)
    x = np.repeat(builders.inputs(1, 1), draws, axis=0)
    values, _, tokens = cascade.run(x, [1], return_tokens=True)
    y = values.numpy()
    np.testing.assert_allclose(y, np.repeat(y[:1], draws, axis=0), rtol=1e-6)  # one distribution for every draw
    expected = softmax(y[0], sampler.temperature)
    if sampler.top_k is not None:
        expected[np.argsort(-expected, kind="stable")[sampler.top_k:]] = 0.0
        expected /= expected.sum()
    counts = np.bincount(tokens.numpy(), minlength=O)
    assert np.all(counts[expected == 0] == 0)
    kept = expected > 0
    result = scipy.stats.chisquare(counts[kept], expected[kept] * draws)
    assert result.pvalue > 0.001, (counts, expected * draws)
    # the test can fail: the same draws against a flat distribution
    assert scipy.stats.chisquare(counts[kept], np.full(kept.sum(), draws / kept.sum())).pvalue < 0.001


def test_row_uniforms_are_uniform_and_depend_on_every_field():
    base = sampling.row_uniforms(7, tf.range(20000), 0, 0, 0).numpy()
    assert base.dtype == np.float64 and base.min() >= 0 and base.max() < 1
    assert scipy.stats.kstest(base, "uniform").pvalue > 0.001
    for changed in (sampling.row_uniforms(8, tf.range(20000), 0, 0, 0), sampling.row_uniforms(7, tf.range(20000), 1, 0, 0),
                    sampling.row_uniforms(7, tf.range(20000), 0, 1, 0), sampling.row_uniforms(7, tf.range(20000), 0, 0, 1),
                    sampling.row_uniforms(7, tf.range(20000, dtype=tf.int64) + 2**32, 0, 0, 0)):
        changed = changed.numpy()
        assert np.mean(changed == base) < 0.001
        assert abs(np.corrcoef(changed, base)[0, 1]) < 0.05
    # a row's draw is its own, whatever the others
    some = sampling.row_uniforms(7, tf.constant([5, 19999]), 0, 0, 0).numpy()
    np.testing.assert_array_equal(some, base[[5, 19999]])


STEPS = np.array([[3, 0, 2], [1, 4, 0], [0, 0, 0], [2, 2, 2], [4, 1, 3], [1, 0, 1], [3, 3, 0], [0, 2, 5],
                  [2, 1, 1], [5, 0, 2], [1, 1, 1]])


def cut_runs(cascade, x, steps, cut):
    """The run in batches of `cut` samples (sample_index: their place in the whole input), joined."""
    parts = [cascade.run(x[i:i + cut], None if steps is None else steps[i:i + cut], return_tokens=True,
                         sample_index=np.arange(i, min(i + cut, len(x))))
             for i in range(0, len(x), cut)]
    return [np.concatenate([p[k].numpy().reshape(-1, *p[k].shape[1:]) for p in parts]) for k in range(3)]


def assert_same_run(got, want):
    """The same lengths and tokens, bit for bit; values to float64 rounding.

    (Keras' matmuls on CPU round differently for different batch sizes, model
    A's alone included, so values agree to rounding, not bit for bit; the draws
    depend on (seed, sample index, t, j) only, so the tokens agree exactly.)
    """
    values, lengths, tokens = (np.asarray(part) for part in want)
    np.testing.assert_array_equal(got[1].reshape(lengths.shape), lengths)
    np.testing.assert_array_equal(got[2], tokens)
    np.testing.assert_allclose(got[0], values, rtol=1e-12, atol=1e-13)


def float64_models():
    return builders.model_a(dtype="float64"), builders.feedback_b(output_size=O, dtype="float64")


@pytest.mark.parametrize("state", ["reset", "carry"])
@pytest.mark.parametrize("start", ["zeros", "previous"])
def test_the_same_seed_gives_the_same_bits_however_the_input_is_cut(state, start):
    a, b = float64_models()
    x = builders.inputs(len(STEPS), 3, seed=4).astype("float64")
    cascade = Cascade(a, b, feedback=True, state=state, feedback_start=start, seed=3, jit_compile=False,
                      sampler=Sampler.categorical(temperature=1.5))
    whole = [t.numpy() for t in cascade.run(x, STEPS, return_tokens=True)]
    assert len(set(whole[2].tolist())) > 2  # the draws vary
    for cut in (1, 7):
        assert_same_run(cut_runs(cascade, x, STEPS, cut), whole)
    # the draws depend on the sample's index, not its place in the batch
    shifted = cascade.run(x, STEPS, return_tokens=True, sample_index=np.arange(len(x)) + 1)[2].numpy()
    assert not np.array_equal(shifted, whole[2])


def test_rows_that_stop_early_leave_the_others_draws_alone():
    """With a stop token, every pair emits the prefix of its unstopped tokens up to the first stop token.

    (`reset` mode: in `carry` a pair that stops changes the state the next one starts from.)
    """
    a, b = float64_models()
    x = builders.inputs(len(STEPS), 3, seed=4).astype("float64")
    settings = dict(feedback=True, seed=3, jit_compile=False, max_steps=6,
                    sampler=Sampler.categorical(temperature=1.5))
    free = Cascade(a, b, **settings).run(x, return_tokens=True)
    stopper = Cascade(a, b, stop_rule=StopRule.token(2), **settings)
    stopped = stopper.run(x, return_tokens=True)
    free_tokens = np.split(free[2].numpy(), np.cumsum(free[1].numpy().ravel())[:-1])
    stopped_tokens = np.split(stopped[2].numpy(), np.cumsum(stopped[1].numpy().ravel())[:-1])
    early = 0
    for full, cut in zip(free_tokens, stopped_tokens):
        hits = np.flatnonzero(full == 2)
        expected = full if not hits.size else full[:hits[0] + 1]
        np.testing.assert_array_equal(cut, expected)
        early += len(cut) < len(full)
    assert early > 0
    for cut in (1, 7):
        assert_same_run(cut_runs(stopper, x, None, cut), stopped)


def test_carry_stops_cut_independently():
    a, b = float64_models()
    x = builders.inputs(len(STEPS), 3, seed=4).astype("float64")
    stopper = Cascade(a, b, feedback=True, state="carry", seed=3, jit_compile=False, max_steps=6,
                      feedback_start="previous", sampler=Sampler.categorical(temperature=1.5),
                      stop_rule=StopRule.token(2))
    whole = [t.numpy() for t in stopper.run(x, return_tokens=True)]
    assert whole[1].min() < 6
    for cut in (1, 7):
        assert_same_run(cut_runs(stopper, x, None, cut), whole)


def test_greedy_token_stop_rule_and_sampler_without_feedback():
    """A sampler works with a plain step-form B too: tokens and the stop rule, nothing fed back."""
    a, b = builders.model_a(), builders.step_b(output_size=O)
    x = builders.inputs(4, 3)
    plain = Cascade(a, b, max_steps=5, stop_rule=StopRule.token(1), jit_compile=False)
    greedy = Cascade(a, b, max_steps=5, stop_rule=StopRule.token(1), sampler="greedy", jit_compile=False)
    values, lengths = plain.run(x)
    g_values, g_lengths, tokens = greedy.run(x, return_tokens=True)
    np.testing.assert_array_equal(g_lengths.numpy(), lengths.numpy())
    np.testing.assert_allclose(g_values.numpy(), values.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tokens.numpy(), np.argmax(values.numpy(), axis=-1))


# ------------------------------------------------------------- settings


def test_sampler_settings_are_checked():
    for kwargs, parameter in (({"temperature": 0}, "temperature"), ({"temperature": -1.0}, "temperature"),
                              ({"temperature": float("inf")}, "temperature"), ({"top_k": 0}, "top_k"),
                              ({"top_k": 1.5}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p")):
        with pytest.raises(ParameterError) as error:
            Sampler.categorical(**kwargs)
        assert error.value.parameter == parameter
    for kind in ("identity", "greedy"):
        for kwargs in ({"temperature": 0.5}, {"top_k": 3}, {"top_p": 0.9}):
            with pytest.raises(ParameterError, match=rf"applies to sampler='categorical' only.*sampler='{kind}'"):
                Sampler(kind, **kwargs)
    with pytest.raises(ParameterError, match=r"^sampler: expected one of identity, greedy, categorical, beam"):
        Sampler("nucleus")
    assert Sampler.coerce("greedy") == Sampler.greedy()
    assert Sampler.categorical(0.5, 5, 0.9).describe() == "categorical (temperature 0.5, top-k 5, top-p 0.9)"
    assert Sampler.identity().describe() == "identity"
    assert Sampler.categorical(top_p=1).as_attrs() == {"sampler": "categorical", "temperature": 1.0, "top_k": -1,
                                                       "top_p": 1.0}
    assert Sampler.greedy().as_attrs() == {"sampler": "greedy", "temperature": 1.0, "top_k": -1, "top_p": 1.0}


def test_parse_feedback_start():
    assert parse_feedback_start("zeros") == ("zeros", None)
    assert parse_feedback_start("previous") == ("previous", None)
    assert parse_feedback_start("token:12") == ("token", 12)
    for bad in ("token:", "token:-1", "token:x", "ones", "token:1.5", None, 3):
        with pytest.raises(ParameterError, match=r"^feedback_start: expected zeros, previous or token:ID"):
            parse_feedback_start(bad)


def test_sampling_schedules():
    schedule = SamplingSchedule.parse("inverse-sigmoid:10")
    for step in (0, 5, 40, 100):
        assert schedule.probability(step) == pytest.approx(1 - 10 / (10 + math.exp(step / 10)), rel=1e-12)
    assert schedule.probability(10**9) == 1.0
    assert SamplingSchedule.constant(0.25).probability(123) == 0.25
    assert SamplingSchedule.parse("constant:0.5") == SamplingSchedule.constant(0.5)
    assert schedule.describe() == "inverse-sigmoid:10"
    for bad in ("inverse-sigmoid", "inverse-sigmoid:0", "inverse-sigmoid:-3", "linear:3", "inverse-sigmoid:nan"):
        with pytest.raises(ParameterError, match=r"^sampling_schedule: expected inverse-sigmoid:K"):
            SamplingSchedule.parse(bad)
    with pytest.raises(ParameterError, match=r"^sampling_probability: expected a probability in \[0, 1\]"):
        SamplingSchedule.constant(1.5)
