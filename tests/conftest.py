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


_XLA_MARKED = [False]  # whether the test running now is marked `xla`


@pytest.fixture(scope="session", autouse=True)
def _xla_only_where_asked():
    """Cascades run A without XLA unless they ask for `jit_compile=True` or are built while an `xla` test runs.

    `jit_compile="auto"` (the runner's and the command line's default) checks on a probe input that A compiles
    under XLA and equals its plain call, then compiles it: seconds per `Cascade`. The tests of that choice
    (marked `xla`) run it; the others test everything else without paying for it. The switch holds for the
    whole session, so a module-scoped fixture's cascades run as its tests' do.
    """
    import functools
    import sys

    if "tensorflow" not in sys.modules:  # a test run that imported no TensorFlow builds no Cascade
        yield
        return
    from cascade_cli import runner

    init = runner.Cascade.__init__

    @functools.wraps(init)
    def without_xla(self, *args, **kwargs):
        if not _XLA_MARKED[0] and kwargs.get("jit_compile", "auto") == "auto":
            kwargs["jit_compile"] = False
        init(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner.Cascade, "__init__", without_xla)
        yield


@pytest.fixture(autouse=True)
def _xla_where_marked(request):
    """Lets the cascades a test marked `xla` builds keep `jit_compile="auto"`."""
    _XLA_MARKED[0] = request.node.get_closest_marker("xla") is not None
    yield
    _XLA_MARKED[0] = False
