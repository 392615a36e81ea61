"""`paths.pairwise`: the covering subset of a grid that the default suite keeps."""

import itertools

import paths


def pairs_of(cases):
    return {(i, case[i], j, case[j]) for case in cases for i, j in itertools.combinations(range(len(case)), 2)}


def test_every_value_and_every_pair_of_a_product_is_kept_in_fewer_cases():
    grid = list(itertools.product(("simple", "gru", "lstm"), ("reset", "carry"), ("zeros", "ir"), (False, True)))
    kept = paths.pairwise(grid)
    assert pairs_of(kept) == pairs_of(grid)
    assert len(kept) < len(grid) / 2
    assert kept == [case for case in grid if case in kept]  # the grid's order
    assert kept == paths.pairwise(grid)  # the same every time


def test_a_grid_that_is_not_a_product_is_covered_by_its_own_pairs_and_keeps_what_it_is_told():
    grid = [("gru", "reset", 0), ("gru", "carry", 0), ("sequence", "reset", 0), ("gru", "reset", 3), ("lstm", "carry", 3)]
    kept = paths.pairwise(grid, keep=[("gru", "carry", 0)])
    assert pairs_of(kept) == pairs_of(grid) and ("gru", "carry", 0) in kept
    assert paths.pairwise([(1,), (True,)]) == [(1,), (True,)]  # True and 1 are different values


def test_both_marks_the_cases_it_leaves_out_slow_and_keeps_each_value_on_both_paths():
    grid = [(s, m, f) for f in ("zeros", "token:2", "previous") for m in ("identity", "greedy") for s in ("reset", "carry")]
    params = paths.both(grid, pairs=True)
    kept = [p.values for p in params if not any(mark.name == "slow" for mark in p.marks)]
    assert len(params) == 2 * len(grid) and len(kept) < len(grid)
    assert pairs_of(kept) == pairs_of([p.values for p in params])
    assert all(any(mark.name == "xla" for mark in p.marks) == (p.values[-1] == "auto") for p in params)
