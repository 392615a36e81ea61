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
    """Cascades built by a test run A without XLA unless the test asks for `jit_compile=True` or is marked `xla`.

    `jit_compile="auto"` (the runner's and the command line's default) checks on a probe input that A compiles
    under XLA and equals its plain call, then compiles it: seconds per `Cascade`. The tests of that choice
    (marked `xla`) run it; the others test everything else without paying for it. The switch is per test: a
    module-scoped fixture is built before it, so its cascades keep "auto" (pass `--no-xla` or `jit_compile=False`
    where a fixture's results are compared with a test's bit for bit).
    """
    import functools
    import sys

    if request.node.get_closest_marker("xla") is not None or "tensorflow" not in sys.modules:
        return  # a test run that imported no TensorFlow builds no Cascade
    from cascade_cli import runner

    init = runner.Cascade.__init__

    @functools.wraps(init)
    def without_xla(self, *args, **kwargs):
        if kwargs.get("jit_compile", "auto") == "auto":
            kwargs["jit_compile"] = False
        init(self, *args, **kwargs)

    monkeypatch.setattr(runner.Cascade, "__init__", without_xla)
