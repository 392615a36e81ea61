"""Tests of `cascade_cli.generation`: streaming inputs through the runner into a result file."""

import os

import numpy as np
import pytest
import tensorflow as tf

import builders
from cascade_cli.data import open_inputs
from cascade_cli.errors import CascadeError, DataError, ParameterError
from cascade_cli.generation import BatchRange, batch_ranges, generate_to_file, resolve_steps, identify_run
from cascade_cli.options import StopRule
from cascade_cli.result import CascadeResult
from cascade_cli.results_io import read_result, read_result_attrs
from cascade_cli.run.cascade import Cascade

N, TA, F = 7, 3, 3
STEPS = np.array([[2, 0, 3], [0, 0, 0], [1, 1, 0], [3, 2, 1], [0, 4, 0], [1, 0, 0], [0, 0, 2]])


@pytest.fixture(scope="module")
def models():
    return builders.model_a(), builders.step_b()


@pytest.fixture()
def inputs_file(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, builders.inputs(N, TA))
    return path


def test_batch_ranges_start_at_multiples_of_the_batch_size_by_hand():
    assert batch_ranges(0, 0, batch_size=4, n_samples=10) == []
    assert batch_ranges(0, 10, batch_size=4, n_samples=10) == [
        BatchRange(0, 4, (0, 4)), BatchRange(4, 8, (0, 4)), BatchRange(8, 10, (0, 2))]
    # a shard of samples 3:9 runs the batches an unsharded run does and keeps its own rows
    assert batch_ranges(3, 9, batch_size=4, n_samples=10) == [BatchRange(0, 4, (3, 4)), BatchRange(4, 8, (0, 4)),
                                                              BatchRange(8, 10, (0, 1))]
    assert [batch.samples for batch in batch_ranges(3, 9, batch_size=4, n_samples=10)] == [1, 4, 1]


def test_the_file_holds_what_the_runner_returns(models, inputs_file, tmp_path):
    cascade = Cascade(*models)
    with open_inputs(inputs_file) as source:
        summary = generate_to_file(cascade, source, STEPS, output=tmp_path / "r.h5", batch_size=3,
                                   attrs={"state": "reset"})
    values, lengths = cascade.run(np.load(inputs_file), STEPS)
    got = read_result(tmp_path / "r.h5")
    np.testing.assert_array_equal(got.lengths, STEPS)
    np.testing.assert_allclose(got.values, values.numpy(), rtol=1e-5, atol=1e-6)
    assert read_result_attrs(tmp_path / "r.h5")["state"] == "reset"
    running = int((STEPS > 0).sum())
    assert (summary.samples, summary.emitted, summary.pairs, summary.at_cap) == (N, int(STEPS.sum()), running, running)
    assert sorted(os.listdir(tmp_path)) == ["r.h5", "x.npy"]


def test_shards_hold_exactly_the_rows_of_the_whole_run(models, inputs_file, tmp_path):
    cascade = Cascade(*models)
    with open_inputs(inputs_file) as source:
        generate_to_file(cascade, source, STEPS, output=tmp_path / "all.h5", batch_size=2)
        for index in range(3):
            generate_to_file(cascade, source, STEPS, output=tmp_path / f"part{index}.h5", batch_size=2,
                             shard=(index, 3))
    whole = read_result(tmp_path / "all.h5")
    parts = CascadeResult.concatenate([read_result(tmp_path / f"part{index}.h5") for index in range(3)])
    np.testing.assert_array_equal(parts.lengths, whole.lengths)
    assert parts.values.tobytes() == whole.values.tobytes()


def test_a_stop_rule_runs_to_max_steps_and_the_summary_counts_the_pairs_it_ended(models, inputs_file, tmp_path):
    cascade = Cascade(*models, max_steps=4, stop_rule=StopRule.norm(1.2))
    with open_inputs(inputs_file) as source:
        summary = generate_to_file(cascade, source, output=tmp_path / "r.h5")
    _, lengths = cascade.run(np.load(inputs_file))
    lengths = lengths.numpy()
    np.testing.assert_array_equal(read_result(tmp_path / "r.h5").lengths, lengths)
    assert summary.pairs == N * TA and summary.at_cap == int((lengths == 4).sum())
    assert summary.at_first == int((lengths == 1).sum())
    assert 0 < summary.at_cap < summary.pairs  # the rule fired, and not everywhere


def test_progress_wraps_every_batch(models, inputs_file, tmp_path):
    seen = []

    def progress(batches):
        seen.extend(batches)
        return iter(batches)

    with open_inputs(inputs_file) as source:
        generate_to_file(Cascade(*models), source, [1, 0, 2], output=tmp_path / "r.h5", batch_size=3,
                         progress=progress)
    assert [(batch.start, batch.stop) for batch in seen] == [(0, 3), (3, 6), (6, 7)]
    assert sum(batch.samples for batch in seen) == N


def test_a_model_failing_inside_tensorflow_is_named_and_nothing_is_left(models, inputs_file, tmp_path, monkeypatch):
    cascade = Cascade(*models)

    def failing(inputs, caps, **kwargs):
        raise tf.errors.InvalidArgumentError(None, None, f"{{{{node {models[1].name}/dense/MatMul}}}} bad shapes")

    monkeypatch.setattr(cascade, "run", failing)
    with open_inputs(inputs_file) as source, pytest.raises(CascadeError) as caught:
        generate_to_file(cascade, source, STEPS, output=tmp_path / "r.h5", batch_size=4)
    assert f"model B ('{models[1].name}') failed on samples 0:4" in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]


def test_bad_settings_and_inputs_are_refused_before_any_work(models, inputs_file, tmp_path):
    cascade = Cascade(*models, max_steps=3)
    with open_inputs(inputs_file) as source:
        with pytest.raises(ParameterError, match=r"^batch_size: expected a positive integer, received 0\.$"):
            generate_to_file(cascade, source, STEPS, output=tmp_path / "r.h5", batch_size=0)
        with pytest.raises(DataError, match=r"at index \(0, 2\): expected at most max_steps=3, received 4"):
            generate_to_file(cascade, source, np.array([[1, 1, 4]] * N), output=tmp_path / "r.h5")
        with pytest.raises(DataError, match=r"shape \(2,\)"):
            resolve_steps([1, 2], source)
    np.save(tmp_path / "wide.npy", builders.inputs(2, TA, features=F + 1))
    with open_inputs(tmp_path / "wide.npy") as source, pytest.raises(DataError, match="F=4 features per step"):
        generate_to_file(Cascade(*models), source, [1, 1, 1], output=tmp_path / "r.h5")
    assert sorted(os.listdir(tmp_path)) == ["wide.npy", "x.npy"]


def test_run_attrs_identify_the_run_and_the_shard(models, inputs_file, tmp_path):
    for model, name in zip(models, ("a.keras", "b.keras")):
        model.save(tmp_path / name)
    files = (tmp_path / "a.keras", tmp_path / "b.keras")
    with open_inputs(inputs_file) as source:
        whole = identify_run({"state": "reset"}, model_files=files, source=source, steps=STEPS, batch_size=4)
        shard = identify_run({"state": "reset"}, model_files=files, source=source, steps=STEPS, batch_size=4,
                          shard=(1, 3))
        other = identify_run({"state": "reset"}, model_files=files, source=source, steps=STEPS, batch_size=5)
    assert whole["run_id"] == shard["run_id"] != other["run_id"]  # the batch size is part of the run
    assert (shard["shard_index"], shard["shard_count"], shard["sample_start"], shard["sample_stop"]) == (1, 3, 3, 5)
    assert "shard_index" not in whole


def test_a_batch_that_cannot_fit_in_memory_is_refused_by_hand(models):
    cascade = Cascade(*models)  # O=2, H=4, one state of 5: 11 float32 per row, 4 copies: 176 bytes a row
    steps = np.array([[1, 2], [3, 0], [0, 0]])
    ranges = batch_ranges(0, 3, batch_size=2, n_samples=3)  # rows 0:2 emit 6 rows, row 2 none
    from cascade_cli.generation import check_batch_memory

    check_batch_memory(cascade, steps, ranges, outer_steps=2, available=6 * 176)
    with pytest.raises(DataError, match=r"a batch of 2 samples \(6 inner steps\).*smaller batch_size or max_steps"):
        check_batch_memory(cascade, steps, ranges, outer_steps=2, available=6 * 176 - 1)
    stopper = Cascade(*models, max_steps=10, stop_rule=StopRule.norm(1.0))
    with pytest.raises(DataError, match=r"\(40 inner steps\)"):  # 2 samples x 2 outer steps x max_steps 10
        check_batch_memory(stopper, None, ranges, outer_steps=2, available=40 * 176 - 1)


def test_the_run_id_depends_on_what_the_files_hold_not_how_their_paths_are_spelled(models, inputs_file, tmp_path,
                                                                                  monkeypatch):
    for model, name in zip(models, ("a.keras", "b.keras")):
        model.save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    ids = []
    for inputs, model_a in (("x.npy", "a.keras"), ("./x.npy", f"../{tmp_path.name}/a.keras")):
        attrs = {"inputs": inputs, "model_a": model_a}
        with open_inputs(inputs) as source:
            ids.append(identify_run(attrs, model_files=(model_a, "b.keras"), source=source, steps=STEPS,
                                    batch_size=4)["run_id"])
    np.save(tmp_path / "x.npy", builders.inputs(N, TA, seed=5))  # other values, same shape
    with open_inputs("x.npy") as source:
        ids.append(identify_run({"inputs": "x.npy", "model_a": "a.keras"}, model_files=("a.keras", "b.keras"),
                                source=source, steps=STEPS, batch_size=4)["run_id"])
    assert ids[0] == ids[1] != ids[2]


def test_with_a_window_only_the_joined_outputs_grow_with_the_outer_steps_by_hand(models):
    from cascade_cli.generation import check_batch_memory

    cascade = Cascade(*models)  # O=2 and 11 values a row (O + H + state), float32
    steps = np.array([[1, 2, 3, 0, 4], [0, 0, 5, 1, 1]])  # 10 + 7 rows; windows of 2: busiest [4] and [5, 1]
    ranges = batch_ranges(0, 2, batch_size=2, n_samples=2)
    needed = (17 * 2 * 3 + (4 + 6) * 11 * 4) * 4  # the joined outputs 3 times, one window's rows 4 times
    check_batch_memory(cascade, steps, ranges, outer_steps=5, window=2, available=needed)
    with pytest.raises(DataError, match=r"windows of 2 outer steps\).*smaller batch_size or window"):
        check_batch_memory(cascade, steps, ranges, outer_steps=5, window=2, available=needed - 1)
    whole = 17 * 11 * 4 * 4
    assert needed < whole  # the window's bound is below the whole run's
    check_batch_memory(cascade, steps, ranges, outer_steps=5, window=5, available=whole)  # one window: as whole
    with pytest.raises(DataError):
        check_batch_memory(cascade, steps, ranges, outer_steps=5, window=5, available=whole - 1)
    shared = steps[0]  # (Ta,) steps for every sample: 10 rows each, busiest window [4]
    needed = (2 * 10 * 2 * 3 + 2 * 4 * 11 * 4) * 4
    check_batch_memory(cascade, shared, ranges, outer_steps=5, window=2, available=needed)
    with pytest.raises(DataError):
        check_batch_memory(cascade, shared, ranges, outer_steps=5, window=2, available=needed - 1)
    stopper = Cascade(*models, max_steps=10, stop_rule=StopRule.norm(1.0))
    needed = (2 * 5 * 10 * 2 * 3 + 2 * 2 * 10 * 11 * 4) * 4
    with pytest.raises(DataError):
        check_batch_memory(stopper, None, ranges, outer_steps=5, window=2, available=needed - 1)
    check_batch_memory(stopper, None, ranges, outer_steps=5, window=2, available=needed)
