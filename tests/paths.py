"""The two paths a reference test runs on: the shipped default and the plain loop.

`jit_compile="auto"` (the default) runs A and the whole loop over B under XLA where they compile
(`cascade_cli.run.compiled_loop`); `False` runs the plain packed loop. A reference test takes `jit` from
`BOTH` (or `both(cases)`) and builds its cascades with `jit_compile=jit`: the `"auto"` cases are marked
`xla`, so conftest leaves them the default, and fails them where a cascade fell back from XLA quietly.
"""

import pytest

AUTO = pytest.param("auto", marks=pytest.mark.xla, id="auto")
PLAIN = pytest.param(False, id="plain")
BOTH = [AUTO, PLAIN]


def both(cases, *, auto=None):
    """Every case of `cases` (tuples) on the plain path, and those in `auto` (default: all) on the default too.

    Returns `pytest.param(*case, jit)`s for `parametrize("..., jit", ...)`: XLA compiles cost seconds per
    cascade on 2 cores, so a large grid runs whole on the plain path and in part on the default.
    """
    auto = cases if auto is None else auto
    missing = [case for case in auto if case not in cases]
    assert not missing, f"auto cases outside the grid: {missing}"
    params = []
    for case in cases:
        label = "-".join(str(value) for value in case)
        if case in auto:
            params.append(pytest.param(*case, "auto", marks=pytest.mark.xla, id=f"{label}-auto"))
        params.append(pytest.param(*case, False, id=f"{label}-plain"))
    return params


def assert_path(cascade, jit, *, loop=True):
    """The path `jit` ran: under `"auto"`, A compiled and the loop over B compiled where `loop` (else not)."""
    if jit == "auto":
        assert cascade.a_compiled is True
        assert cascade.loop_compiled is loop, cascade.loop_compile_problem
    else:
        assert cascade.a_compiled is False and cascade.loop_compiled is False
