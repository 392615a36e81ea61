"""`cascade generate` with a feedback-form B and a sampler: flags, seeded cut-independent files, bad input.

The runner's values are proven against an eager reference in test_feedback.py and test_sampling.py; here the
command line must hand the runner the right settings, write what it returns (tokens included), record every
setting, and give the same file whatever the batch size or the shards.
"""

import h5py
import numpy as np
import pytest

import builders
from cascade_cli.run import xla as run_xla
from clitools import assert_error, assert_ok, invoke
from cascade_cli.options import Sampler, StopRule
from cascade_cli.results_io import read_result, read_result_attrs
from cascade_cli.run.cascade import Cascade

N, TA, O = 9, 3, 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feedback")
    a, b = builders.model_a(), builders.feedback_b(output_size=O)
    a.save(folder / "a.keras")
    b.save(folder / "b.keras")
    builders.step_b(output_size=O).save(folder / "plain_b.keras")
    builders.sequence_b(output_size=O).save(folder / "sequence_b.keras")
    np.save(folder / "x.npy", builders.inputs(N, TA))
    return folder


def generate(files, out, *flags):
    return invoke("generate", "--model-a", files / "a.keras", "--model-b", files / "b.keras", "--inputs",
                  files / "x.npy", "--feedback", *flags, "-o", out)


SAMPLED = ("--sampler", "categorical", "--temperature", "2", "--max-steps", "5", "--stop-token", "0", "--seed", "7")


def arrays(path):
    with h5py.File(path, "r") as file:
        return {key: file[key][...] for key in file}


def test_the_file_holds_what_the_runner_gives_tokens_included(files, tmp_path):
    assert_ok(generate(files, tmp_path / "r.h5", *SAMPLED, "--batch-size", "4"))
    got = read_result(tmp_path / "r.h5")
    cascade = Cascade(builders.model_a(), builders.feedback_b(output_size=O), feedback=True, max_steps=5,
                      stop_rule=StopRule.token(0), sampler=Sampler.categorical(temperature=2.0), seed=7)
    values, lengths, tokens = cascade.run(builders.inputs(N, TA), return_tokens=True)
    np.testing.assert_array_equal(got.lengths, lengths.numpy())
    np.testing.assert_array_equal(got.tokens, tokens.numpy())
    np.testing.assert_allclose(got.values, values.numpy(), rtol=1e-5, atol=1e-6)
    # a token stop rule reads the sampled token: every pair ends at its first sampled 0 or at the cap
    for n in range(N):
        for t in range(TA):
            sequence = got.token_sequence(n, t).tolist()
            assert 0 not in sequence[:-1] and (sequence[-1] == 0 or len(sequence) == 5)
    assert len(set(got.tokens.tolist())) > 1


# quick: --no-xla (about 6 s; under XLA about 20 s, each generate compiling again). Under XLA, the same bytes at any
# batch size and through shards: test_startup's test_the_choice_is_the_whole_jobs_at_any_batch_size_and_in_every_shard
# [xla]; feedback's categorical draws under XLA, bit for bit in any batch: test_fused's and test_compiled_loop's
# test_categorical_draws_..._are_the_same_in_any_batch_bit_for_bit
@pytest.mark.parametrize("xla", [pytest.param((), marks=[pytest.mark.xla, pytest.mark.slow]), ("--no-xla",)],
                         ids=["xla-auto", "no-xla"])
def test_the_same_seed_gives_identical_bytes_at_any_batch_size_and_through_shards(files, tmp_path, xla, monkeypatch):
    """Values included: generate runs whole blocks of rows (`generation._whole_blocks`), so no kernel sees
    a batch whose size changes a row's last bits. A job this small runs without XLA as it comes
    (`run.xla.XLA_PAYS_FROM`, tests/test_startup.py); here the line is lowered so that XLA runs."""
    monkeypatch.setattr(run_xla, "XLA_PAYS_FROM", 1)
    # every runner call gets 64 rows (`generation.MIN_BATCH_ROWS`): under XLA batch 1 runs the program batch 7
    # runs, in 9 calls rather than 2; each generate compiles it again (seconds), so batch 1 is checked plainly
    sizes = (7, 64) if not xla else (1, 7, 64)
    for size in sizes:
        assert_ok(generate(files, tmp_path / f"b{size}.h5", *SAMPLED, *xla, "--batch-size", str(size)))
    whole = arrays(tmp_path / "b64.h5")
    assert whole["tokens"].size > 0
    with h5py.File(tmp_path / "b64.h5", "r") as file:  # the loop over B ran whole under XLA by default
        assert bool(file.attrs["loop_compiled"]) is (not xla)
    for size in sizes[:-1]:
        part = arrays(tmp_path / f"b{size}.h5")
        assert part.keys() == whole.keys()
        for key in whole:
            assert part[key].tobytes() == whole[key].tobytes(), (size, key)
    # each generate under XLA compiles again (about 10 s on 2 cores): 2 shards there (5 and 4 samples), 3 plainly
    shards = [tmp_path / f"s{i}.h5" for i in range(3 if xla else 2)]
    for index, shard in enumerate(shards):
        assert_ok(generate(files, shard, *SAMPLED, *xla, "--batch-size", "64", "--shard", f"{index}/{len(shards)}"))
    assert_ok(invoke("merge", *reversed(shards), "-o", tmp_path / "merged.h5"))
    merged = arrays(tmp_path / "merged.h5")
    for key in whole:
        assert merged[key].tobytes() == whole[key].tobytes(), key
    if xla:  # the seed reaches the sampler as it does on either path: checked once, plainly
        assert_ok(generate(files, tmp_path / "other.h5", *SAMPLED[:-1], "8", *xla))
        assert arrays(tmp_path / "other.h5")["tokens"].tobytes() != whole["tokens"].tobytes()  # another seed


def test_every_sampler_setting_and_the_seed_are_recorded_and_name_the_run(files, tmp_path):
    assert_ok(generate(files, tmp_path / "r.h5", "--sampler", "categorical", "--top-k", "2", "--top-p", "0.9",
                       "--feedback-start", "token:1", "--steps", "2,1,3", "--no-xla"))
    attrs = read_result_attrs(tmp_path / "r.h5")
    assert (attrs["feedback"], attrs["feedback_start"], attrs["sampler"]) == (True, "token:1", "categorical")
    assert (attrs["temperature"], attrs["top_k"], attrs["top_p"], attrs["seed"]) == (1.0, 2, 0.9, 0)
    assert (attrs["jit_compile"], attrs["a_compiled"], attrs["num_samples"]) == ("False", False, 1)
    assert_ok(generate(files, tmp_path / "t.h5", "--sampler", "categorical", "--top-k", "3", "--top-p", "0.9",
                       "--feedback-start", "token:1", "--steps", "2,1,3", "--no-xla"))
    assert read_result_attrs(tmp_path / "t.h5")["run_id"] != attrs["run_id"]
    assert_ok(generate(files, tmp_path / "g.h5", "--steps", "2,1,3"))  # identity: no tokens, the defaults
    plain = read_result_attrs(tmp_path / "g.h5")
    assert (plain["sampler"], plain["feedback_start"], plain["jit_compile"]) == ("identity", "zeros", "auto")
    assert read_result(tmp_path / "g.h5").tokens is None


def test_num_samples_draws_k_samples_per_input_in_sample_then_k_order(files, tmp_path):
    assert_ok(generate(files, tmp_path / "k.h5", *SAMPLED, "--num-samples", "3", "--batch-size", "5"))
    got = read_result(tmp_path / "k.h5")
    assert got.n_samples == 3 * N
    cascade = Cascade(builders.model_a(), builders.feedback_b(output_size=O), feedback=True, max_steps=5,
                      stop_rule=StopRule.token(0), sampler=Sampler.categorical(temperature=2.0), seed=7)
    repeated = np.repeat(builders.inputs(N, TA), 3, axis=0)  # result sample n * 3 + k is input n
    values, lengths, tokens = cascade.run(repeated, return_tokens=True)
    np.testing.assert_array_equal(got.lengths, lengths.numpy())
    np.testing.assert_array_equal(got.tokens, tokens.numpy())
    assert not all(np.array_equal(got.lengths[3 * n], got.lengths[3 * n + 1]) for n in range(N))  # draws differ
    assert read_result_attrs(tmp_path / "k.h5")["num_samples"] == 3


@pytest.mark.parametrize("flags, code, words", [
    (("--sampler", "categorical", "--top-p", "0"), 2, ("--top-p", "(0, 1]")),
    (("--sampler", "categorical", "--top-p", "1.5"), 2, ("--top-p", "(0, 1]")),
    (("--sampler", "categorical", "--top-k", "0"), 2, ("--top-k",)),
    (("--sampler", "categorical", "--temperature", "0"), 2, ("--temperature", "> 0")),
    (("--temperature", "0.5"), 2, ("--temperature", "categorical")),
    (("--sampler", "greedy", "--top-k", "2"), 2, ("--top-k", "categorical")),
    (("--sampler", "greedy", "--max-steps", "3", "--stop-token", "4"), 2, ("--stop-token", "4")),
    (("--feedback-start", "token:4"), 2, ("--feedback-start", "token:4")),
    (("--feedback-start", "one"), 2, ("--feedback-start", "token:ID")),
])
def test_bad_sampler_and_feedback_flags_are_one_error_line(files, tmp_path, flags, code, words):
    steps = () if "--max-steps" in flags else ("--steps", "2,1,3")
    assert_error(generate(files, tmp_path / "r.h5", *flags, *steps), code, *words)
    assert not (tmp_path / "r.h5").exists()


def test_feedback_needs_a_b_in_feedback_form(files, tmp_path):
    for b, words in (("plain_b.keras", ("plain_b.keras", "feedback")), ("sequence_b.keras", ("feedback",))):
        result = invoke("generate", "--model-a", files / "a.keras", "--model-b", files / b, "--inputs",
                        files / "x.npy", "--feedback", "--steps", "2,1,3", "-o", tmp_path / "r.h5")
        assert result.exit_code in (1, 2), result.output
        assert_error(result, result.exit_code, *words)
    # and a feedback-form B without --feedback is refused too (it has one input more than a step-form B)
    result = invoke("generate", "--model-a", files / "a.keras", "--model-b", files / "b.keras", "--inputs",
                    files / "x.npy", "--steps", "2,1,3", "-o", tmp_path / "r.h5")
    assert result.exit_code == 1 and "--feedback" in result.stderr, result.output


def test_pack_keeps_the_feedback_and_sampler_settings(files, tmp_path):
    assert_ok(invoke("pack", "--model-a", files / "a.keras", "--model-b", files / "b.keras", "--feedback",
                     "--sampler", "categorical", "--temperature", "2", "--max-steps", "5", "--stop-token", "0",
                     "-o", tmp_path / "g.keras"))
    assert_ok(invoke("generate", "--model", tmp_path / "g.keras", "--inputs", files / "x.npy", "--seed", "7",
                     "-o", tmp_path / "from_pack.h5"))
    assert_ok(generate(files, tmp_path / "direct.h5", *SAMPLED))
    packed, direct = read_result(tmp_path / "from_pack.h5"), read_result(tmp_path / "direct.h5")
    np.testing.assert_array_equal(packed.tokens, direct.tokens)
    np.testing.assert_array_equal(packed.lengths, direct.lengths)
