"""Packing plans worked out by hand (pair ids are `n * Ta + t`)."""

import numpy as np
import pytest
import tensorflow as tf

from cascade_cli.run.packing import carry_plan, carry_rows, next_running_pair, prefix_counts, reset_plan, reset_rows


def as_lists(plan):
    return {field: getattr(plan, field).numpy().tolist() for field in plan.__dataclass_fields__}


def caps(rows, outer=None):
    return tf.constant(rows, tf.int32) if rows else tf.zeros([0, outer], tf.int32)


def test_prefix_counts():
    assert prefix_counts(tf.constant([4, 3, 2, 1])).numpy().tolist() == [4, 3, 2, 1, 0]
    assert prefix_counts(tf.constant([5, 5, 2, 0])).numpy().tolist() == [3, 3, 2, 2, 2, 0]
    assert prefix_counts(tf.constant([0, 0])).numpy().tolist() == [0]
    assert prefix_counts(tf.zeros([0], tf.int32)).numpy().tolist() == [0]


def test_reset_plan_by_hand():
    # Flat caps [3, 0, 2, 1, 4, 0]: pair 4 runs 4 steps, pair 0 3, pair 2 2, pair 3 1; pairs 1 and 5 never run.
    # Step 0 runs all four rows, step 1 the first three, step 2 the first two, step 3 pair 4 alone.
    # Step-major rows: [4, 0, 2, 3 | 4, 0, 2 | 4, 0 | 4].
    # Value order: pair 0 steps 0-2, pair 2 steps 0-1, pair 3 step 0, pair 4 steps 0-3, which are step-major
    # rows [1, 5, 8 | 2, 6 | 3 | 0, 4, 7, 9].
    assert as_lists(reset_plan(caps([[3, 0, 2], [1, 4, 0]]))) == {
        "pair_ids": [4, 0, 2, 3],
        "row_caps": [4, 3, 2, 1],
        "counts": [4, 3, 2, 1, 0],
        "step_pairs": [4, 0, 2, 3, 4, 0, 2, 4, 0, 4],
        "value_order": [1, 5, 8, 2, 6, 3, 0, 4, 7, 9],
    }


def test_reset_plan_ties_keep_pair_order():
    # Pairs 0, 1 and 3 run 2 steps each: ties stay in pair order. Step-major: [0, 1, 3 | 0, 1, 3].
    assert as_lists(reset_plan(caps([[2, 2], [0, 2]]))) == {
        "pair_ids": [0, 1, 3],
        "row_caps": [2, 2, 2],
        "counts": [3, 3, 0],
        "step_pairs": [0, 1, 3, 0, 1, 3],
        "value_order": [0, 3, 1, 4, 2, 5],
    }


@pytest.mark.parametrize("rows, outer", [([], 3), ([[0, 0], [0, 0]], 2)], ids=["no samples", "all zero"])
def test_reset_plan_with_nothing_to_run(rows, outer):
    assert as_lists(reset_plan(caps(rows, outer))) == {
        "pair_ids": [], "row_caps": [], "counts": [0], "step_pairs": [], "value_order": []}


def test_reset_plan_of_one_row():
    assert as_lists(reset_plan(caps([[2]]))) == {
        "pair_ids": [0], "row_caps": [2], "counts": [1, 1, 0], "step_pairs": [0, 0], "value_order": [0, 1]}


def test_reset_rows():
    pair_ids, row_caps = reset_rows(caps([[3, 0, 2], [1, 4, 0]]))
    assert (pair_ids.numpy().tolist(), row_caps.numpy().tolist()) == ([4, 0, 2, 3], [4, 3, 2, 1])


def test_carry_plan_by_hand_equal_totals():
    # Samples 0 and 1 both run 5 steps: sample 0 walks pairs [0, 0, 0, 2, 2], sample 1 pairs [3, 4, 4, 4, 4].
    # Step j runs sample 0's j-th value, then sample 1's.
    assert as_lists(carry_plan(caps([[3, 0, 2], [1, 4, 0]]))) == {
        "samples": [0, 1],
        "counts": [2, 2, 2, 2, 2, 0],
        "step_pairs": [0, 3, 0, 4, 0, 4, 2, 4, 2, 4],
        "value_order": [0, 2, 4, 6, 8, 1, 3, 5, 7, 9],
        "value_pairs": [0, 0, 0, 2, 2, 3, 4, 4, 4, 4],
    }


def test_carry_plan_by_hand_longest_first():
    # Totals 3, 4, 0: sample 1 (pairs [3, 3, 4, 4]) runs first, then sample 0 (pairs [0, 2, 2]); sample 2 never.
    # Step-major: [3, 0 | 3, 2 | 4, 2 | 4]; step starts 0, 2, 4, 6.
    # Values: sample 0 positions 0-2 are rows 1, 3, 5; sample 1 positions 0-3 are rows 0, 2, 4, 6.
    assert as_lists(carry_plan(caps([[1, 0, 2], [2, 2, 0], [0, 0, 0]]))) == {
        "samples": [1, 0],
        "counts": [2, 2, 2, 1, 0],
        "step_pairs": [3, 0, 3, 2, 4, 2, 4],
        "value_order": [1, 3, 5, 0, 2, 4, 6],
        "value_pairs": [0, 2, 2, 3, 3, 4, 4],
    }
    assert carry_rows(caps([[1, 0, 2], [2, 2, 0], [0, 0, 0]])).numpy().tolist() == [1, 0]


@pytest.mark.parametrize("rows, outer", [([], 3), ([[0, 0], [0, 0]], 2)], ids=["no samples", "all zero"])
def test_carry_plan_with_nothing_to_run(rows, outer):
    assert as_lists(carry_plan(caps(rows, outer))) == {
        "samples": [], "counts": [0], "step_pairs": [], "value_order": [], "value_pairs": []}


def test_carry_plan_of_one_row():
    assert as_lists(carry_plan(caps([[1, 0, 2]]))) == {
        "samples": [0], "counts": [1, 1, 1, 0], "step_pairs": [0, 2, 2], "value_order": [0, 1, 2],
        "value_pairs": [0, 2, 2]}


def test_plans_put_step_major_rows_in_value_order():
    """The same property on random caps: value_order maps step_pairs onto pairs in ascending order."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        rows = rng.integers(0, 4, size=(5, 3))
        expected = np.repeat(np.arange(rows.size), rows.ravel())
        for plan in (reset_plan(caps(rows.tolist())), carry_plan(caps(rows.tolist()))):
            got = tf.gather(plan.step_pairs, plan.value_order).numpy()
            np.testing.assert_array_equal(got, expected)


def test_next_running_pair():
    # Ta = 3; pairs 0, 2, 3, 4 run. From pair 1 of sample 0: pair 2; from pair 3 of sample 1: itself;
    # from pair 5 of sample 1: none; from pair 3 of sample 0 (past its end): none.
    running = tf.constant([0, 2, 3, 4])
    got = next_running_pair(running, tf.constant([1, 3, 5, 3]), samples=tf.constant([0, 1, 1, 0]), outer=3)
    assert got.numpy().tolist() == [2, 3, -1, -1]
