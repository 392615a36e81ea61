"""Fixtures shared by the test files."""

import os

import pytest

# The commands keep XLA's persistent compilation cache under the user's cache folder (`cli.xla_cache_folder`); the
# tests' runs write nothing there (tests/test_startup.py points it at tmp_path where it tests the cache itself).
os.environ["CASCADE_XLA_CACHE"] = "off"


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
_BUILT = []  # the cascades the `xla` test running now has built (`_no_quiet_fallback_from_xla`)


@pytest.fixture(scope="session", autouse=True)
def _xla_only_where_asked():
    """Cascades run A without XLA unless they ask for `jit_compile=True` or are built while an `xla` test runs.

    `jit_compile="auto"` (the runner's and the command line's default) checks on a probe input that A and the
    loop over B compile under XLA and equal their plain runs, then compiles them: seconds per `Cascade`. The
    tests of that path (marked `xla`: the reference tests run on both paths with `paths.BOTH`) run it; the
    others test everything else without paying for it. The switch holds for the whole session, so a
    module-scoped fixture's cascades run as its tests' do.
    """
    import functools
    import sys

    if "tensorflow" not in sys.modules:  # a test run that imported no TensorFlow builds no Cascade
        yield
        return
    from cascade_cli.run import cascade as runner

    init = runner.Cascade.__init__

    @functools.wraps(init)
    def without_xla(self, *args, **kwargs):
        if not _XLA_MARKED[0] and kwargs.get("jit_compile", "auto") == "auto":
            kwargs["jit_compile"] = False
        init(self, *args, **kwargs)
        if _XLA_MARKED[0]:
            _BUILT.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner.Cascade, "__init__", without_xla)
        yield


# How a probe's failure reads (`Cascade.loop_compile_problem`, and A's): the other reasons are by design.
PROBE_FAILURES = ("it does not compile", "its ")


@pytest.fixture(autouse=True)
def _xla_where_marked(request):
    """Lets the cascades a test marked `xla` builds keep `jit_compile="auto"`, and fails it where one fell back.

    `"auto"` falls back to the plain path quietly where a probe finds that A or the loop over B does not
    compile or does not equal its plain run: a test of the shipped default would then pass on the plain
    path. Such a fallback fails the test, unless it is marked `xla_fallback` (it is what the test is about).
    """
    _XLA_MARKED[0] = request.node.get_closest_marker("xla") is not None
    _BUILT.clear()
    yield
    _XLA_MARKED[0] = False
    built, _BUILT[:] = list(_BUILT), []
    if request.node.get_closest_marker("xla_fallback") is not None:
        return
    for cascade in built:
        reasons = [cascade.loop_compile_problem]
        if cascade._xla is not None and not cascade._xla.inference:
            reasons.append(cascade._xla.reason)
        for reason in reasons:
            assert not (reason or "").startswith(PROBE_FAILURES), (
                f"a cascade built by this `xla` test fell back from XLA quietly: {reason}")
