"""A small run that starts fast (issue 31): one trace without AutoGraph, and XLA's persistent compilation cache.

Speed itself is measured in `benchmarks/startup.py`, not here; these tests
check that the ways to it keep every value.
"""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
from cascade_cli.run import xla
from cascade_cli.cli import XLA_CACHE_ENV, _use_xla_cache, xla_cache_folder
from cascade_cli.data import open_inputs
from cascade_cli.errors import ParameterError
from cascade_cli.generation import _batch_function, generate_to_file
from cascade_cli.inspection import _result_xla
from cascade_cli.options import Sampler, StopRule
from cascade_cli.result import CascadeResult
from cascade_cli.results_io import read_result, read_result_attrs
from cascade_cli.run.cascade import Cascade

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"


# ------------------------------------------------------------- the trace


def test_the_batch_function_runs_plain_graph_code():
    run = _batch_function(lambda x: tf.where(x > 0, x * 2.0, x), [tf.TensorSpec([None], tf.float32)])
    np.testing.assert_array_equal(run(tf.constant([1.0, -1.0])).numpy(), [2.0, -1.0])


def test_the_batch_function_falls_back_to_autograph_for_code_that_branches_on_a_tensor():
    def branches(x):
        if tf.reduce_sum(x) > 0:  # a Python `if` on a tensor: traceable only with AutoGraph
            return x * 2.0
        return x

    run = _batch_function(branches, [tf.TensorSpec([None], tf.float32)])
    np.testing.assert_array_equal(run(tf.constant([1.0, 2.0])).numpy(), [2.0, 4.0])
    np.testing.assert_array_equal(run(tf.constant([-1.0, -2.0])).numpy(), [-1.0, -2.0])


# ------------------------------------------------------------- no probe where the job is too small

N, TA = 8, 3
STEPS = np.array([[2, 0, 3], [0, 0, 0], [1, 1, 0], [3, 2, 1], [0, 4, 0], [1, 0, 0], [0, 0, 2], [1, 2, 3]])


@pytest.fixture(scope="module")
def models():
    return builders.model_a("gru"), builders.step_b("gru")


@pytest.fixture()
def inputs_file(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, builders.inputs(N, TA))
    return path


@pytest.fixture()
def probes(monkeypatch):
    """Counts the XLA probes of model A (`xla.xla_problem`) and of the loop over B while the test runs."""
    calls = []
    probe, choose_loop = xla.xla_problem, xla.choose_loop

    def counted(*args, **kwargs):
        calls.append(("A", args[2]))
        return probe(*args, **kwargs)

    def counted_loop(cascade, *, shape):
        calls.append(("loop", shape))
        return choose_loop(cascade, shape=shape)

    monkeypatch.setattr(xla, "xla_problem", counted)
    monkeypatch.setattr(xla, "choose_loop", counted_loop)
    return calls


def generate(cascade, inputs_file, output, **kwargs):
    with open_inputs(inputs_file) as source:
        generate_to_file(cascade, source, STEPS, output=output, **kwargs)
    return read_result(output), read_result_attrs(output)


@pytest.mark.xla
def test_a_small_generate_runs_a_plainly_with_no_probe_and_says_why(models, inputs_file, tmp_path, probes):
    cascade = Cascade(*models)  # jit_compile="auto"
    result, attrs = generate(cascade, inputs_file, tmp_path / "r.h5")
    assert probes == []
    assert cascade.a_compiled is False and cascade.a_compiled_in_training is False
    assert bool(attrs["a_compiled"]) is False
    assert attrs["a_compile_problem"] == (
        f"the job is too small for XLA's compile to pay: {N} samples x {TA} outer steps of A = {N * TA} steps, "
        f"under {xla.XLA_PAYS_FROM} (no probe)")
    assert bool(attrs["loop_compiled"]) is False and attrs["loop_compile_problem"] == (
        f"the job is too small for XLA's compile to pay: the inner steps of B = {STEPS.sum()} steps, "
        f"under {xla.XLA_PAYS_FROM} (no probe)")
    assert _result_xla({**attrs, "jit_compile": "auto"}) == [  # as inspect says it
        ("model A ran", f"without XLA (jit_compile=auto): {attrs['a_compile_problem']}")]
    # A's plain call: the very values of jit_compile=False, on the same rows (`generate` pads a batch, and on some
    # CPUs a matrix product's last bits depend on its number of rows)
    plain, _ = generate(Cascade(*models, jit_compile=False), inputs_file, tmp_path / "plain.h5")
    assert result.values.tobytes() == plain.values.tobytes()


@pytest.mark.xla
@pytest.mark.parametrize("pays_from", [10**9, 1], ids=["plain", "xla"])
def test_the_choice_is_the_whole_jobs_at_any_batch_size_and_in_every_shard(
        models, inputs_file, tmp_path, monkeypatch, probes, pays_from):
    """The job's N x Ta decides, on either side of the line: batches of 1, 3 and 8 and 3 shards choose alike,
    and the shards merge into the very bytes of the whole run."""
    monkeypatch.setattr(xla, "XLA_PAYS_FROM", pays_from)
    for size in (1, 3, 8):
        _, attrs = generate(Cascade(*models), inputs_file, tmp_path / f"b{size}.h5", batch_size=size)
        assert bool(attrs["a_compiled"]) is (pays_from == 1), size
    parts = [generate(Cascade(*models), inputs_file, tmp_path / f"s{index}.h5", batch_size=3, shard=(index, 3))
             for index in range(3)]
    assert all(bool(attrs["a_compiled"]) is (pays_from == 1) for _, attrs in parts)  # a shard's 2 or 3 samples too
    merged = CascadeResult.concatenate([part for part, _ in parts])
    assert merged.values.tobytes() == read_result(tmp_path / "b3.h5").values.tobytes()
    kinds = [kind for kind, _ in probes]  # one probe of A per cascade where XLA may pay, none elsewhere
    assert kinds == ([] if pays_from > 1 else ["A"] * 6)  # (the loop: reset through a known cell keeps it plain)


@pytest.mark.xla
def test_a_small_sampled_job_writes_the_same_bytes_at_any_batch_size(tmp_path, probes):
    """With feedback and a sampler a result is byte-identical at any batch size: still so without XLA's probes."""
    np.save(tmp_path / "x.npy", builders.inputs(N, TA))
    a, b = builders.model_a(), builders.feedback_b(output_size=4)
    results = {}
    for size in (1, 3, 8):
        cascade = Cascade(a, b, feedback=True, max_steps=4, stop_rule=StopRule.token(0),
                          sampler=Sampler.categorical(temperature=2.0), seed=7)
        with open_inputs(tmp_path / "x.npy") as source:
            generate_to_file(cascade, source, output=tmp_path / f"b{size}.h5", batch_size=size)
        assert cascade.a_compiled is False and cascade.loop_compiled is False
        results[size] = read_result(tmp_path / f"b{size}.h5")
    assert probes == [] and results[1].tokens.size > 0  # neither A nor the loop over B was probed
    for size in (3, 8):
        for key in ("values", "lengths", "tokens"):
            assert getattr(results[size], key).tobytes() == getattr(results[1], key).tobytes(), (size, key)


@pytest.mark.xla
@pytest.mark.xla_fallback
def test_jit_compile_true_still_compiles_a_small_job_and_still_raises_where_a_cannot_compile(
        models, inputs_file, tmp_path, probes):
    cascade = Cascade(*models, jit_compile=True)  # probed at construction, so the plan leaves it be
    _, attrs = generate(cascade, inputs_file, tmp_path / "r.h5")
    assert cascade.a_compiled is True and bool(attrs["a_compiled"]) and "a_compile_problem" not in attrs
    assert [kind for kind, _ in probes].count("A") == 1
    inputs = keras.Input(shape=(None, 3))
    host = keras.Model(inputs, HostDoubling()(inputs))
    with pytest.raises(ParameterError, match=r"^jit_compile: True, but model A cannot run under XLA: it does not "
                                             r"compile \("):
        Cascade(host, builders.step_b("gru", ir_size=3), jit_compile=True)


class HostDoubling(keras.layers.Layer):
    """`2 * x` computed on the host by `tf.numpy_function`, which XLA cannot compile."""

    def call(self, x):
        return tf.ensure_shape(tf.numpy_function(lambda v: 2 * v, [x], x.dtype, stateful=False), x.shape)

    def compute_output_shape(self, input_shape):
        return input_shape


def test_a_plan_never_overrides_a_choice_made(models):
    cascade = Cascade(*models, jit_compile=False)
    cascade.plan_xla(samples=10**6, outer_steps=10**3)
    assert cascade.a_compiled is False and cascade.a_compile_problem == "jit_compile=False or run_eagerly=True"


# ------------------------------------------------------------- the cache


@pytest.mark.parametrize("environ, expected", [
    ({"HOME": "/home/u"}, "/home/u/.cache/cascade/xla"),
    ({"HOME": "/home/u", "XDG_CACHE_HOME": "/c"}, "/c/cascade/xla"),
    ({"HOME": "/home/u", XLA_CACHE_ENV: "/elsewhere"}, "/elsewhere"),
    ({"HOME": "/home/u", XLA_CACHE_ENV: "off"}, None),
    ({"HOME": "/home/u", XLA_CACHE_ENV: ""}, None),
])
def test_the_cache_folder(monkeypatch, environ, expected):
    monkeypatch.setenv("HOME", environ["HOME"])
    folder = xla_cache_folder(environ)
    assert (None if folder is None else str(folder)) == expected


def test_the_cache_is_named_in_tf_xla_flags_unless_the_user_named_one(tmp_path):
    environ = {XLA_CACHE_ENV: str(tmp_path / "xla"), "TF_XLA_FLAGS": "--tf_xla_auto_jit=0"}
    _use_xla_cache(environ)
    assert environ["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=0 --tf_xla_persistent_cache_directory={tmp_path / 'xla'}"
    assert (tmp_path / "xla").is_dir()
    own = {XLA_CACHE_ENV: str(tmp_path / "other"), "TF_XLA_FLAGS": "--tf_xla_persistent_cache_directory=/mine"}
    _use_xla_cache(own)
    assert own["TF_XLA_FLAGS"] == "--tf_xla_persistent_cache_directory=/mine"
    off = {XLA_CACHE_ENV: "off"}
    _use_xla_cache(off)
    assert "TF_XLA_FLAGS" not in off


def test_a_cache_that_cannot_be_made_is_no_cache(tmp_path):
    (tmp_path / "file").write_text("")
    environ = {XLA_CACHE_ENV: str(tmp_path / "file" / "xla")}
    _use_xla_cache(environ)
    assert "TF_XLA_FLAGS" not in environ


@pytest.mark.slow
def test_a_repeated_generate_reads_the_cache_and_writes_the_same_bytes(tmp_path):
    """Three runs of sample_data/: without the cache, filling it, reading it; the values are the same bytes.

    Drawn K times, enough for A's compile to pay (`xla.XLA_PAYS_FROM`): sample_data/ alone runs A plainly."""
    draws = -(-xla.XLA_PAYS_FROM // (8 * 12))  # sample_data/ holds 8 samples of 12 outer steps
    argv = [sys.executable, "-m", "cascade_cli", "generate", "--model-a", str(SAMPLE / "model_a.keras"),
            "--model-b", str(SAMPLE / "model_b.keras"), "--inputs", str(SAMPLE / "inputs.h5"),
            "--steps-file", str(SAMPLE / "steps.txt"), "--num-samples", str(draws)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TF_XLA_FLAGS", None)
    cache = tmp_path / "xla"
    for name, folder in (("none.h5", "off"), ("fill.h5", str(cache)), ("read.h5", str(cache))):
        subprocess.run([*argv, "-o", str(tmp_path / name)], check=True, capture_output=True,
                       env={**env, XLA_CACHE_ENV: folder})
        if name == "fill.h5":
            assert any(cache.iterdir()), "the first run with the cache wrote no executable"
    with h5py.File(tmp_path / "none.h5") as none, h5py.File(tmp_path / "fill.h5") as fill, \
            h5py.File(tmp_path / "read.h5") as read:
        assert bool(none.attrs["a_compiled"])  # A ran under XLA: the cache had something to hold
        for key in ("flat_values", "row_splits_0", "row_splits_1", "lengths"):
            assert none[key][()].tobytes() == fill[key][()].tobytes() == read[key][()].tobytes(), key
