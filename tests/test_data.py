"""Tests for `cascade_cli.data`: inputs, training data, batches, splits and epoch order."""

import io
import os
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from cascade_cli import data
from cascade_cli.data import TrainingData, epoch_order, open_inputs, split_indices
from cascade_cli.errors import DataError
from filetools import quoted, write_h5, write_text


# ---------------------------------------------------------------------------
# Inputs


INPUTS = np.arange(5 * 2 * 3, dtype=np.float64).reshape(5, 2, 3) / 4.0


@pytest.mark.parametrize("fmt", ["h5", "npy", "npz"])
def test_open_inputs_formats(tmp_path, fmt):
    path = tmp_path / f"x.{fmt}"
    if fmt == "h5":
        write_h5(path, features=INPUTS)
        source = open_inputs(path, key="features")
    elif fmt == "npy":
        np.save(path, INPUTS)
        source = open_inputs(path)
    else:
        np.savez(path, inputs=INPUTS, other=np.zeros(2))
        source = open_inputs(path)
    with source:
        assert source.shape == (5, 2, 3)
        assert (source.n_samples, source.outer_steps, source.features) == (5, 2, 3)
        chunk = source.read(1, 3)
        assert chunk.dtype == np.float32
        np.testing.assert_array_equal(chunk, INPUTS[1:3].astype(np.float32))
        assert source.read(5, 5).shape == (0, 2, 3)
        source.check_finite(chunk=2)
        with pytest.raises(DataError, match=r"expected 0 <= start <= stop <= 5, received start=3, stop=6"):
            source.read(3, 6)
    with pytest.raises(DataError, match="closed"):
        source.read(0, 1)


def test_open_inputs_zero_samples_and_integer_inputs(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 4, 2), dtype=np.float32))
    with open_inputs(tmp_path / "empty.npy") as source:
        assert source.shape == (0, 4, 2)
        assert source.read(0, 0).shape == (0, 4, 2)
        source.check_finite()
    write_h5(tmp_path / "ints.h5", inputs=np.arange(6, dtype=np.int32).reshape(1, 3, 2))
    with open_inputs(tmp_path / "ints.h5") as source:
        np.testing.assert_array_equal(source.read(0, 1), [[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]])


def test_open_inputs_errors(tmp_path):
    with pytest.raises(DataError, match=r"suffix '\.csv': expected one of \.h5, \.hdf5, \.npy, \.npz"):
        open_inputs(write_text(tmp_path / "x.csv", "1,2"))
    np.save(tmp_path / "flat.npy", np.zeros((4, 3)))
    with pytest.raises(DataError, match=r"inputs in '.*flat\.npy' have 2 dimensions: expected 3 \(N, Ta, F\), received shape \(4, 3\)"):
        open_inputs(tmp_path / "flat.npy")
    np.save(tmp_path / "objects.npy", np.empty((1, 1, 1), dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"'.*objects\.npy' holds Python objects"):
        open_inputs(tmp_path / "objects.npy")
    np.save(tmp_path / "text.npy", np.array([[["a"]]]))
    with pytest.raises(DataError, match=r"dtype <U1: expected integers or floating-point numbers"):
        open_inputs(tmp_path / "text.npy")
    np.savez(tmp_path / "x.npz", features=np.zeros((1, 1, 1)))
    with pytest.raises(DataError, match=r"'.*x\.npz' has no array 'inputs': expected an array 'inputs', received arrays \['features'\]"):
        open_inputs(tmp_path / "x.npz")
    np.savez(tmp_path / "o.npz", inputs=np.empty((1, 1, 1), dtype=object))
    with pytest.raises(DataError, match="Python objects"):
        open_inputs(tmp_path / "o.npz")
    write_h5(tmp_path / "x.h5", inputs=np.zeros((2, 3)))
    with pytest.raises(DataError, match=r"dataset 'inputs' in '.*x\.h5' has 2 dimensions: expected 3"):
        open_inputs(tmp_path / "x.h5")
    with pytest.raises(DataError, match=r"'.*x\.h5' has no dataset 'feats'"):
        open_inputs(tmp_path / "x.h5", key="feats")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "flat.npy").read_bytes()[:100])
    with pytest.raises(DataError, match=r"'.*cut\.npy' is not readable as a \.npy array"):
        open_inputs(tmp_path / "cut.npy")


def test_inputs_check_finite_names_key_and_sample(tmp_path):
    values = np.zeros((7, 2, 2), dtype=np.float32)
    values[5, 1, 0] = np.nan
    values[6, 0, 0] = np.inf
    write_h5(tmp_path / "x.h5", inputs=values)
    with open_inputs(tmp_path / "x.h5") as source:
        with pytest.raises(DataError, match=r"^inputs in '.*x\.h5' \(key 'inputs'\) sample 5: expected finite values, received nan$"):
            source.check_finite(chunk=2)
    big = np.zeros((3, 1, 1))
    big[2, 0, 0] = 1e300  # finite in float64, infinite as the float32 read returns
    np.save(tmp_path / "big.npy", big)
    with open_inputs(tmp_path / "big.npy") as source:
        with pytest.raises(DataError, match=r"^inputs in '.*big\.npy' sample 2: expected finite values, received inf$"):
            source.check_finite()


# ---------------------------------------------------------------------------
# Training data

STEPS = np.array([[2, 0, 1], [0, 0, 0], [1, 3, 0], [0, 2, 2]], dtype=np.int64)
N, TA, F, O, L = 4, 3, 2, 2, 4


def target_value(n, t, j, o):
    return 100.0 * n + 10.0 * t + j + 0.5 * o


def flat_targets(steps):
    """Value order by plain loops: sample, then outer step, then inner step."""
    rows = [
        [target_value(n, t, j, o) for o in range(O)]
        for n in range(steps.shape[0])
        for t in range(steps.shape[1])
        for j in range(steps[n, t])
    ]
    return np.array(rows, dtype=np.float32).reshape(-1, O)


def padded_targets(steps, *, pad=np.nan):
    values = np.full((steps.shape[0], steps.shape[1], L, O), pad, dtype=np.float64)
    for n in range(steps.shape[0]):
        for t in range(steps.shape[1]):
            for j in range(steps[n, t]):
                values[n, t, j] = [target_value(n, t, j, o) for o in range(O)]
    return values


def inputs_array():
    return np.arange(N * TA * F, dtype=np.float64).reshape(N, TA, F)


def write_training(path, *, targets, steps=STEPS, inputs=None):
    return write_h5(path, inputs=inputs_array() if inputs is None else inputs, steps=steps, targets=targets)


@pytest.fixture
def flat_file(tmp_path):
    return write_training(tmp_path / "flat.h5", targets=flat_targets(STEPS))


@pytest.fixture
def padded_file(tmp_path):
    return write_training(tmp_path / "padded.h5", targets=padded_targets(STEPS))


def test_hand_built_value_order():
    # sample 2 has steps [1, 3, 0]: rows (t=0, j=0), (t=1, j=0..2), by hand.
    expected = [[200.0, 200.5], [210.0, 210.5], [211.0, 211.5], [212.0, 212.5]]
    rows = flat_targets(STEPS)
    np.testing.assert_array_equal(rows[3:7], expected)
    assert rows.shape == (STEPS.sum(), O)


def test_training_data_attributes(flat_file, padded_file):
    with TrainingData(flat_file) as flat, TrainingData(padded_file) as padded:
        for dataset in (flat, padded):
            assert (dataset.n_samples, dataset.outer_steps, dataset.features, dataset.output_size) == (N, TA, F, O)
            np.testing.assert_array_equal(dataset.steps, STEPS)
            assert dataset.steps.dtype == np.int64
            assert dataset.total_steps == 11
            dataset.check_finite(chunk=3)  # NaN padding is past the steps: fine
        assert flat.targets_layout == "flat"
        assert padded.targets_layout == "padded"


@pytest.mark.parametrize("indices", [[0, 1, 2, 3], [3, 0, 2, 1], [2, 2, 0], [1], []])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 10])
def test_flat_and_padded_batches_match_hand_built(flat_file, padded_file, indices, batch_size):
    with TrainingData(flat_file) as flat, TrainingData(padded_file) as padded:
        flat_batches = list(flat.batches(np.array(indices, dtype=np.int64), batch_size=batch_size))
        padded_batches = list(padded.batches(indices, batch_size=batch_size))
    expected_count = -(-len(indices) // batch_size)
    assert len(flat_batches) == len(padded_batches) == expected_count
    for k, (a, b) in enumerate(zip(flat_batches, padded_batches)):
        wanted = indices[k * batch_size : (k + 1) * batch_size]
        # Value order by plain loops over the requested samples, in their order.
        expected_targets = np.array(
            [
                [target_value(n, t, j, o) for o in range(O)]
                for n in wanted
                for t in range(TA)
                for j in range(STEPS[n, t])
            ],
            dtype=np.float32,
        ).reshape(-1, O)
        for batch in (a, b):
            assert batch.inputs.dtype == np.float32 and batch.targets.dtype == np.float32
            assert batch.steps.dtype == np.int64
            np.testing.assert_array_equal(batch.inputs, inputs_array()[wanted].astype(np.float32).reshape(-1, TA, F))
            np.testing.assert_array_equal(batch.steps, STEPS[wanted].reshape(-1, TA))
            np.testing.assert_array_equal(batch.targets, expected_targets)
        np.testing.assert_array_equal(a.targets, b.targets)


def test_batches_in_requested_order_by_hand(flat_file):
    with TrainingData(flat_file) as dataset:
        (batch,) = dataset.batches([3, 1, 0], batch_size=3)
    np.testing.assert_array_equal(batch.steps, [[0, 2, 2], [0, 0, 0], [2, 0, 1]])
    np.testing.assert_array_equal(batch.inputs[:, 0, 0], [18.0, 6.0, 0.0])
    expected = [
        [310.0, 310.5], [311.0, 311.5], [320.0, 320.5], [321.0, 321.5],  # sample 3
        [0.0, 0.5], [1.0, 1.5], [20.0, 20.5],  # sample 0; sample 1 has none
    ]
    np.testing.assert_array_equal(batch.targets, expected)


def test_batches_read_only_needed_rows(flat_file, monkeypatch):
    reads = []
    original = data.read_dataset

    def recording(dset, selection, *, path):
        reads.append((dset.name, selection))
        return original(dset, selection, path=path)

    with TrainingData(flat_file) as dataset:
        monkeypatch.setattr(data, "read_dataset", recording)
        list(dataset.batches([3, 2], batch_size=2))
    assert ("/inputs", (slice(2, 4),)) in reads  # neighbours read together
    # samples 2 and 3 own flat rows 3..10 (after 2 + 0 + 1 rows of sample 0 and 1 + 0 of sample 1).
    assert ("/targets", (slice(3, 11),)) in reads
    assert len(reads) == 2


def test_batches_with_zero_steps_and_bad_indices(flat_file):
    with TrainingData(flat_file) as dataset:
        (batch,) = dataset.batches([1, 1], batch_size=4)
        assert batch.targets.shape == (0, O)
        with pytest.raises(DataError, match=r"sample index 4 for '.*flat\.h5': expected 0 <= index < 4"):
            next(dataset.batches([0, 4], batch_size=2))
        with pytest.raises(DataError, match="expected a 1-D array of integers"):
            next(dataset.batches([0.5], batch_size=2))
        with pytest.raises(ValueError, match="batch_size"):
            next(dataset.batches([0], batch_size=0))
    with pytest.raises(DataError, match="closed"):
        next(dataset.batches([0], batch_size=1))


def test_training_data_zero_samples(tmp_path):
    path = write_h5(
        tmp_path / "empty.h5",
        inputs=np.zeros((0, 3, 2)),
        steps=np.zeros((0, 3), dtype=np.int64),
        targets=np.zeros((0, 5)),
    )
    with TrainingData(path) as dataset:
        assert (dataset.n_samples, dataset.output_size, dataset.targets_layout) == (0, 5, "flat")
        assert list(dataset.batches([], batch_size=2)) == []
        dataset.check_finite()


def test_flat_targets_wrong_row_count(tmp_path):
    path = write_training(tmp_path / "short.h5", targets=np.zeros((10, O)))
    with pytest.raises(DataError) as info:
        TrainingData(path)
    assert str(info.value) == f"targets in '{path}' have 10 rows, expected sum(steps) = 11"


def test_training_data_shape_and_steps_errors(tmp_path):
    short = padded_targets(STEPS)[:, :, :2]
    with pytest.raises(DataError, match=r"have L = 2 inner steps, expected L >= max\(steps\) = 3"):
        TrainingData(write_training(tmp_path / "a.h5", targets=short))
    with pytest.raises(DataError, match=r"padded targets .* have shape \(3, 3, 4, 2\): expected \(N, Ta, L, O\) with \(N, Ta\)=\(4, 3\)"):
        TrainingData(write_training(tmp_path / "b.h5", targets=padded_targets(STEPS)[:3]))
    with pytest.raises(DataError, match=r"shape \(11, 2, 1\): expected flat \(sum\(steps\), O\), \(sum\(steps\),\) "
                                        r"or padded \(N, Ta, L, O\)"):
        TrainingData(write_training(tmp_path / "c.h5", targets=np.zeros((11, 2, 1))))
    negative = STEPS.copy()
    negative[2, 1] = -3
    with pytest.raises(DataError, match=r"\(key 'steps'\) at index \(2, 1\): expected a non-negative integer, received -3"):
        TrainingData(write_training(tmp_path / "d.h5", targets=np.zeros((5, O)), steps=negative))
    with pytest.raises(DataError, match=r"steps in '.*e\.h5' have shape \(4, 2\): expected \(N, Ta\)=\(4, 3\) like inputs"):
        TrainingData(write_training(tmp_path / "e.h5", targets=np.zeros((0, O)), steps=np.zeros((4, 2), dtype=int)))
    with pytest.raises(DataError, match=r"'.*f\.h5' has no dataset 'targets'"):
        TrainingData(write_h5(tmp_path / "f.h5", inputs=inputs_array(), steps=STEPS))
    with pytest.raises(DataError, match=r"dataset 'inputs' .* has dtype \|S1"):
        TrainingData(write_training(tmp_path / "g.h5", targets=np.zeros((11, O)), inputs=np.full((N, TA, F), b"a")))


def test_nan_in_inputs_names_key_and_sample(tmp_path):
    inputs = inputs_array()
    inputs[2, 1, 1] = np.nan
    with TrainingData(write_training(tmp_path / "x.h5", targets=flat_targets(STEPS), inputs=inputs)) as dataset:
        with pytest.raises(DataError, match=r"^inputs in '.*x\.h5' \(key 'inputs'\) sample 2: expected finite values, received nan$"):
            dataset.check_finite(chunk=1)


def test_nan_in_targets_names_row_and_sample(tmp_path):
    flat = flat_targets(STEPS)
    flat[7, 1] = np.inf  # row 7 is the first row of sample 3
    with TrainingData(write_training(tmp_path / "flat.h5", targets=flat)) as dataset:
        with pytest.raises(DataError, match=r"targets in '.*flat\.h5' \(key 'targets'\) row 7 \(sample 3\): expected finite values, received inf"):
            dataset.check_finite(chunk=2)
    padded = padded_targets(STEPS, pad=0.0)
    padded[2, 1, 2, 0] = np.nan  # inner step 2 < steps[2, 1] = 3: a real value
    with TrainingData(write_training(tmp_path / "padded.h5", targets=padded)) as dataset:
        with pytest.raises(DataError, match=r"targets in '.*padded\.h5' \(key 'targets'\) sample 2: expected finite values, received nan"):
            dataset.check_finite(chunk=3)


def test_training_data_refuses_external_link(tmp_path):
    write_training(tmp_path / "real.h5", targets=flat_targets(STEPS))
    path = tmp_path / "link.h5"
    with h5py.File(path, "w") as f:
        f["inputs"] = h5py.ExternalLink("real.h5", "/inputs")
        f["steps"] = STEPS
        f["targets"] = flat_targets(STEPS)
    with pytest.raises(DataError, match="nothing outside the file is read"):
        TrainingData(path)


# ---------------------------------------------------------------------------
# Splits and epoch order


def test_split_indices_deterministic_and_sized():
    train, val = split_indices(10, val_split=0.25, seed=7)
    again_train, again_val = split_indices(10, val_split=0.25, seed=7)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    assert len(val) == 2  # round(2.5) == 2
    assert len(split_indices(10, val_split=0.26, seed=7)[1]) == 3
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(10))
    np.testing.assert_array_equal(val, np.sort(np.random.default_rng(7).permutation(10)[:2]))
    assert train.dtype == val.dtype == np.int64
    others = {tuple(split_indices(10, val_split=0.25, seed=s)[1]) for s in range(20)}
    assert len(others) > 1


def test_split_indices_edges():
    train, val = split_indices(5, val_split=0.0, seed=0)
    np.testing.assert_array_equal(train, np.arange(5))
    assert val.shape == (0,)
    train, val = split_indices(0, val_split=0.5, seed=0)
    assert train.shape == val.shape == (0,)
    with pytest.raises(DataError, match=r"expected a fraction in \[0, 1\), received 1.0"):
        split_indices(5, val_split=1.0, seed=0)
    with pytest.raises(DataError, match="received -0.1"):
        split_indices(5, val_split=-0.1, seed=0)
    with pytest.raises(DataError, match="expected at least one training sample"):
        split_indices(1, val_split=0.6, seed=0)


def test_epoch_order():
    indices = np.array([4, 8, 15, 16, 23, 42, 7, 9])
    first = epoch_order(indices, seed=3, epoch=0)
    np.testing.assert_array_equal(first, epoch_order(indices, seed=3, epoch=0))
    np.testing.assert_array_equal(np.sort(first), np.sort(indices))
    np.testing.assert_array_equal(first, np.random.default_rng([3, 0]).permutation(indices))
    orders = {tuple(epoch_order(indices, seed=3, epoch=e)) for e in range(5)}
    assert len(orders) == 5
    assert not np.array_equal(epoch_order(indices, seed=4, epoch=0), first)
    unchanged = epoch_order(indices, seed=3, epoch=1, shuffle=False)
    np.testing.assert_array_equal(unchanged, indices)
    unchanged[0] = -1
    assert indices[0] == 4  # a copy, not a view
    assert epoch_order([], seed=0, epoch=0).shape == (0,)


def test_inputs_fifo_is_refused_without_blocking(tmp_path):
    for name in ("x.h5", "x.npy", "x.npz"):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        with pytest.raises(DataError, match=rf"^{quoted(fifo)} is a FIFO \(named pipe\), not a regular file: expected "):
            open_inputs(fifo)
    fifo = tmp_path / "train.h5"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=rf"^{quoted(fifo)} is a FIFO \(named pipe\), not a regular file"):
        TrainingData(fifo)


def test_inputs_upper_case_suffixes(tmp_path):
    write_h5(tmp_path / "x.H5", inputs=INPUTS)
    np.savez(tmp_path / "x.npz", inputs=INPUTS)  # numpy adds ".npz" to any other name
    os.rename(tmp_path / "x.npz", tmp_path / "x.NPZ")
    np.save(tmp_path / "x.npy", INPUTS)
    os.rename(tmp_path / "x.npy", tmp_path / "x.Npy")
    for name in ("x.H5", "x.NPZ", "x.Npy"):
        with open_inputs(tmp_path / name) as source:
            np.testing.assert_array_equal(source.read(0, 5), INPUTS.astype(np.float32))


def test_training_data_refuses_steps_whose_sum_would_wrap(tmp_path):
    path = write_h5(tmp_path / "wrap.h5", inputs=np.zeros((1, 2, 1)), steps=np.array([[2**62, 2**62]]),
                    targets=np.zeros((0, 1)))
    with pytest.raises(DataError, match=rf"^steps from {quoted(path)} \(key 'steps'\) at index \(0, 0\): expected at "
                                        r"most 2\*\*31 - 1 = 2147483647 inner steps per pair, received 4611686018427387904$"):
        TrainingData(path)


def test_training_data_null_dataspace_and_soft_link_loop(tmp_path):
    path = write_h5(tmp_path / "null.h5", inputs=np.zeros((1, 2, 1)), targets=np.zeros((0, 1)))
    with h5py.File(path, "a") as f:
        f.create_dataset("steps", data=h5py.Empty("i8"))
    with pytest.raises(DataError, match=rf"^dataset 'steps' in {quoted(path)} has a null dataspace"):
        TrainingData(path)
    path = write_h5(tmp_path / "loop.h5", inputs=np.zeros((1, 2, 1)), steps=np.zeros((1, 2)))
    with h5py.File(path, "a") as f:
        f["targets"] = h5py.SoftLink("/targets")
    with pytest.raises(DataError, match=r"soft link 'targets' in .* does not resolve \(a loop of links\)"):
        TrainingData(path)


# ---------------------------------------------------------------------------
# Memory from tiny files: each trial runs under an address-space limit in a
# subprocess, so a regression fails (MemoryError, a kill) instead of taking the machine.

_LIMIT_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
import numpy as np
from cascade_cli.data import TrainingData, open_inputs
from cascade_cli.errors import DataError
{body}
"""


def _run_limited(body, *, limit=1536 << 20):
    script = _LIMIT_SCRIPT.format(limit=limit, body=body)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # thread buffers count as address space
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)


def _sparse_training_file(path, *, steps, targets_shape, layout_chunks):
    with h5py.File(path, "w") as f:
        f["inputs"] = np.zeros(steps.shape + (2,), dtype=np.float32)
        f["steps"] = steps
        f.create_dataset("targets", shape=targets_shape, dtype="f4", chunks=layout_chunks)  # sparse: never written
    return path


def test_padded_targets_declaring_a_huge_L_are_read_only_up_to_the_steps(tmp_path):
    # L = 5 * 10**7: one sample declares 4 * 5e7 * 4 * 4 bytes = 3.0 GiB, the file holds a few KiB.
    path = _sparse_training_file(tmp_path / "long.h5", steps=np.array([[1, 2, 0, 3]] * 3),
                                 targets_shape=(3, 4, 5 * 10**7, 4), layout_chunks=(1, 1, 1024, 4))
    assert path.stat().st_size < 64 << 10
    result = _run_limited(f"""
with TrainingData({str(path)!r}) as data:
    data.check_finite()
    batch = next(data.batches([2, 0], batch_size=2))
    print(batch.targets.shape, batch.inputs.shape)
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "(12, 4) (2, 4, 2)"  # 6 valid rows a sample, O = 4


def test_a_batch_that_cannot_fit_is_refused_before_reading(tmp_path):
    top = 2**31 - 1
    flat = _sparse_training_file(tmp_path / "flat.h5", steps=np.array([[top, top]] * 2),
                                 targets_shape=(4 * top, 1), layout_chunks=(1 << 20, 1))
    padded = _sparse_training_file(tmp_path / "padded.h5", steps=np.array([[top, 0]] * 2),
                                   targets_shape=(2, 2, top, 1), layout_chunks=(1, 1, 1 << 20, 1))
    # flat: a sample holds 2 * (2**31 - 1) rows of 4 bytes, read, cast and gathered (16 bytes a row);
    # padded: 2 * (2**31 - 1) inner steps read and cast (12 bytes each) plus 2**31 - 1 valid rows (4 bytes).
    for path, gib in ((flat, "64.0"), (padded, "56.0")):
        result = _run_limited(f"""
with TrainingData({str(path)!r}) as data:
    try:
        next(data.batches([0, 1], batch_size=1))
    except DataError as error:
        print(error)
""")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().startswith(
            f"a training batch of 1 samples of '{path}' would need about {gib} GiB of memory, more than the ")
        assert result.stdout.strip().endswith(" available; use a smaller batch_size")


def test_inputs_npz_whose_header_declares_more_than_the_archive_holds(tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3, 4), dtype=np.float32))
    real = buffer.getvalue()
    forged = real.replace(b"(2, 3, 4), }" + b" " * 9, b"(2000000000, 3, 4), }", 1)  # same header length
    assert forged != real and len(forged) == len(real)
    path = tmp_path / "x.npz"
    with zipfile.ZipFile(path, "w") as archive:  # a valid archive (CRC and sizes right) of a lying header
        archive.writestr("inputs.npy", forged)
    result = _run_limited(f"""
try:
    open_inputs({str(path)!r})
except DataError as error:
    print(error)
""")
    assert result.returncode == 0, result.stderr
    assert "key 'inputs' declares shape" in result.stdout and "but the archive holds 96 bytes of it" in result.stdout


def test_check_batch_size_estimates_by_hand(tmp_path, monkeypatch):
    # flat: inputs (2, 3, 1) float64 -> 3 * 1 * (8 + 8) = 48 bytes a sample; targets float32, O = 2:
    # sample 0 has 4 rows -> 4 * 2 * (4 + 12) = 128, sample 1 has 1 row -> 32.
    path = write_h5(tmp_path / "t.h5", inputs=np.zeros((2, 3, 1)), steps=np.array([[1, 3, 0], [0, 0, 1]]),
                    targets=np.zeros((5, 2), dtype=np.float32))
    with TrainingData(path) as training:
        np.testing.assert_array_equal(training.sample_bytes(), [48 + 128, 48 + 32])
        monkeypatch.setattr(data, "check_memory", lambda nbytes, **_: needed.append(nbytes))
        needed = []
        training.check_batch_size(1)
        training.check_batch_size(5)
        training.check_batch_size(1, indices=[1, 1])
        assert needed == [176, 256, 80]
    with pytest.raises(DataError, match="is closed"):
        training.check_batch_size(1)


# ---------------------------------------------------------------------------
# One value per step: integer token ids stored as (sum(steps),)


def test_token_ids_stored_flat_without_a_feature_axis_read_as_one_column(tmp_path):
    ids = (np.arange(STEPS.sum()) * 7 % 5).astype(np.int64)  # value order: sample, outer, inner
    path = write_training(tmp_path / "ids.h5", targets=ids)
    with TrainingData(path) as dataset:
        assert (dataset.targets_layout, dataset.output_size, dataset.total_steps) == ("flat", 1, 11)
        dataset.check_finite(chunk=2)
        (batch,) = dataset.batches([3, 1, 0], batch_size=3)
    # sample 3 holds rows 7..10 of the flat order, sample 1 none, sample 0 rows 0..2
    np.testing.assert_array_equal(batch.targets, ids[[7, 8, 9, 10, 0, 1, 2]].reshape(-1, 1).astype(np.float32))
    wrong = write_training(tmp_path / "short.h5", targets=ids[:-1])
    with pytest.raises(DataError, match=r"targets in .* have 10 rows, expected sum\(steps\) = 11"):
        TrainingData(wrong)
    bad = ids.astype(np.float64)
    bad[4] = np.nan
    with TrainingData(write_training(tmp_path / "nan.h5", targets=bad)) as dataset:
        with pytest.raises(DataError, match=r"key 'targets'\) row 4 \(sample 2\): expected finite values"):
            dataset.check_finite(chunk=3)


# ---------------------------------------------------------------------------
# tf.data


def test_dataset_streams_padded_batches_in_each_pass_s_seeded_order(flat_file):
    pieces = list(data.dataset(flat_file, batch_size=3, shuffle=False).as_numpy_iterator())
    assert [len(steps) for (_, steps), _ in pieces] == [3, 1]
    for k, ((inputs, steps), targets) in enumerate(pieces):
        wanted = list(range(N))[3 * k:3 * k + 3]
        assert inputs.dtype == np.float32 and steps.dtype == np.int32 and targets.dtype == np.float32
        np.testing.assert_array_equal(inputs, inputs_array()[wanted].astype(np.float32))
        np.testing.assert_array_equal(steps, STEPS[wanted])
        longest = STEPS[wanted].max()
        assert targets.shape == (len(wanted), TA, longest, O)
        for i, n in enumerate(wanted):  # by plain loops: each valid step its value, the rest the pad value
            for t in range(TA):
                for j in range(longest):
                    expected = [target_value(n, t, j, o) for o in range(O)] if j < STEPS[n, t] else [0.0] * O
                    np.testing.assert_array_equal(targets[i, t, j], expected)
    shuffled = data.dataset(flat_file, batch_size=10, shuffle=True, seed=5)
    for epoch in range(2):  # each pass (an epoch of fit) takes the next epoch's order
        ((inputs, _), _), = list(shuffled.as_numpy_iterator())
        order = epoch_order(np.arange(N), seed=5, epoch=epoch)
        np.testing.assert_array_equal(inputs[:, 0, 0], inputs_array()[order, 0, 0])
    with pytest.raises(DataError, match=r"expected 0 <= index < 4"):
        data.dataset(flat_file, indices=[0, 4])
