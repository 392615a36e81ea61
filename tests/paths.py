"""The two paths a reference test runs on: the shipped default and the plain loop.

`jit_compile="auto"` (the default) runs A and the whole loop over B under XLA where they compile
(`cascade_cli.run.compiled_loop`); `False` runs the plain packed loop. A reference test takes `jit` from
`BOTH` (or `both(cases)`) and builds its cascades with `jit_compile=jit`: the `"auto"` cases are marked
`xla`, so conftest leaves them the default, and fails them where a cascade fell back from XLA quietly.

A large grid keeps in the default suite a covering subset (`pairwise`): every value of each parameter and every
pair of values of two parameters, the path included, in at least one case; the others are marked `slow` and run
with `-m slow`. `both(cases, pairs=True)` and `covering(cases)` choose it; `quick(params, *ids)` keeps fewer
where that costs too much (the quick suite must stay well under 15 minutes on 2 cores).
"""

import pytest

AUTO = pytest.param("auto", marks=pytest.mark.xla, id="auto")
PLAIN = pytest.param(False, id="plain")
BOTH = [AUTO, PLAIN]


def pairwise(cases, *, keep=()):
    """The cases of `cases` (equal-length tuples) that the default suite keeps: a covering subset.

    Every value of each position and every pair of values at two positions that some case of the grid holds
    is held by at least one case kept. Greedy and deterministic: from the cases of `keep`, it adds the case
    that covers the most pairs not yet covered (the earliest on ties) until none is left. Returns the kept
    cases in the grid's order.
    """
    cases = [tuple(case) for case in cases]
    missing = [case for case in keep if tuple(case) not in cases]
    assert not missing, f"kept cases outside the grid: {missing}"

    def pairs(case):
        values = [(i, repr(value)) for i, value in enumerate(case)]  # repr: True and 1 are different values here
        return set(values) | {(first, second) for k, first in enumerate(values) for second in values[k + 1:]}

    kept = [tuple(case) for case in keep]
    left = set().union(*map(pairs, cases)) - set().union(set(), *map(pairs, kept))
    while left:
        best = max(cases, key=lambda case: len(pairs(case) & left))
        kept.append(best)
        left -= pairs(best)
    return [case for case in cases if case in kept]


def _param(case, *, label, default, marks=()):
    marks = list(marks) + ([] if default else [pytest.mark.slow])
    return pytest.param(*case, marks=marks, id=label)


def covering(cases, *, keep=()):
    """`pytest.param`s of every case of `cases` (tuples): those of `pairwise(cases, keep=keep)` in the default
    suite, the others marked `slow`."""
    cases = [tuple(case) for case in cases]
    kept = pairwise(cases, keep=keep)
    return [_param(case, label="-".join(str(value) for value in case), default=case in kept) for case in cases]


def both(cases, *, auto=None, pairs=False, keep=()):
    """Every case of `cases` (tuples) on the plain path, and those in `auto` (default: all) on the default too.

    Returns `pytest.param(*case, jit)`s for `parametrize("..., jit", ...)`: XLA compiles cost seconds per
    cascade on 2 cores, so a large grid runs whole on the plain path and in part on the default. With `pairs`,
    the default suite keeps `pairwise` of the cases with their `jit` (every value on both paths, every pair of
    values; `keep`: `(*case, jit)`s it keeps as well) and marks the others `slow`.
    """
    cases = [tuple(case) for case in cases]
    auto = cases if auto is None else [tuple(case) for case in auto]
    missing = [case for case in auto if case not in cases]
    assert not missing, f"auto cases outside the grid: {missing}"
    grid = [(*case, jit) for case in cases for jit in (("auto", False) if case in auto else (False,))]
    kept = pairwise(grid, keep=keep) if pairs else grid
    params = []
    for case in grid:
        label = "-".join(str(value) for value in case[:-1]) + ("-auto" if case[-1] == "auto" else "-plain")
        marks = [pytest.mark.xla] if case[-1] == "auto" else []
        params.append(_param(case, label=label, default=case in kept, marks=marks))
    return params


def quick(params, *kept):
    """`params` (`pytest.param`s, e.g. of `both` or `covering`) with the cases whose ids are in `kept` in the default
    suite and the others marked `slow`: a grid whose pairwise covering still costs too much keeps these few."""
    assert set(kept) <= {param.id for param in params}, kept
    return [pytest.param(*param.values, id=param.id, marks=[mark for mark in param.marks if mark.name != "slow"]
                         + ([] if param.id in kept else [pytest.mark.slow])) for param in params]


def assert_path(cascade, jit, *, loop=True):
    """The path `jit` ran: under `"auto"`, A compiled and the loop over B compiled where `loop` (else not)."""
    if jit == "auto":
        assert cascade.a_compiled is True
        assert cascade.loop_compiled is loop, cascade.loop_compile_problem
    else:
        assert cascade.a_compiled is False and cascade.loop_compiled is False
