"""Fixtures shared by the test files."""

import pytest


@pytest.fixture
def mixed_float16():
    """Runs a test under Keras' `mixed_float16` global dtype policy, and puts the one before back afterwards."""
    import keras  # here, not at the top: a conftest is imported by every test run, TF-free ones too

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


@pytest.fixture(autouse=True)
def _xla_only_where_asked(request, monkeypatch):
    """Cascades built by a test run A without XLA unless the test passes `jit_compile` or is marked `xla`.

    `jit_compile="auto"` (the runner's default) checks on a probe input that A compiles under XLA and equals
    its plain call, which costs seconds per `Cascade`: the tests of that choice (marked `xla`, and every test
    that passes `jit_compile`) run it; the others test everything else without paying for it.
    """
    import functools
    import sys

    if request.node.get_closest_marker("xla") is not None or "tensorflow" not in sys.modules:
        return  # a test run that imported no TensorFlow builds no Cascade
    from cascade_cli import runner

    init = runner.Cascade.__init__

    @functools.wraps(init)
    def without_xla(self, *args, **kwargs):
        kwargs.setdefault("jit_compile", False)
        init(self, *args, **kwargs)

    monkeypatch.setattr(runner.Cascade, "__init__", without_xla)
