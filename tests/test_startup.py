"""A small run that starts fast (issue 31): one trace without AutoGraph, and XLA's persistent compilation cache.

Speed itself is measured in `benchmarks/startup.py`, not here; these tests
check that the ways to it keep every value.
"""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorflow as tf

from cascade_cli.cli import XLA_CACHE_ENV, _use_xla_cache, xla_cache_folder
from cascade_cli.generation import _batch_function

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
    """Three runs of sample_data/: without the cache, filling it, reading it; the values are the same bytes."""
    argv = [sys.executable, "-m", "cascade_cli", "generate", "--model-a", str(SAMPLE / "model_a.keras"),
            "--model-b", str(SAMPLE / "model_b.keras"), "--inputs", str(SAMPLE / "inputs.h5"),
            "--steps-file", str(SAMPLE / "steps.txt")]
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
