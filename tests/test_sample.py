"""Tests of `cascade_cli.sample`: the deterministic `sample_data/` builder."""

import math

import h5py
import keras
import numpy as np
import pytest

from cascade_cli import sample


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds the sample data twice with seed 0 and once with seed 1."""
    first = sample.build_sample_data(tmp_path_factory.mktemp("first"), seed=0)
    second = sample.build_sample_data(tmp_path_factory.mktemp("second"), seed=0)
    other = sample.build_sample_data(tmp_path_factory.mktemp("other"), seed=1)
    return first, second, other


def read_h5(path):
    """Returns every dataset and attribute of a flat HDF5 file."""
    with h5py.File(path, "r") as file:
        datasets = {key: file[key][...] for key in file}
        attrs = {key: file.attrs[key] for key in file.attrs}
    return datasets, attrs


def load(path):
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def weights(path):
    return [np.asarray(weight) for weight in load(path).get_weights()]


def reference_targets(inputs, steps):
    """Recomputes the flat targets with plain loops, in value order."""
    rows = []
    for n in range(steps.shape[0]):
        for t in range(steps.shape[1]):
            freq, amp, phase = (float(value) for value in inputs[n, t])
            for j in range(int(steps[n, t])):
                rows.append([amp * math.sin(freq * (j + 1) + phase)])
    return np.array(rows, dtype=np.float64).reshape(-1, 1)


def test_returns_every_file(built):
    paths = built[0]
    assert sorted(paths) == ["inputs", "model_a", "model_b", "steps", "tokens_inputs", "tokens_model_a",
                             "tokens_model_b", "tokens_train", "train"]
    folder = paths["train"].parent
    assert {str(path.relative_to(folder)) for path in paths.values()} == {
        "model_a.keras",
        "model_b.keras",
        "train.h5",
        "inputs.h5",
        "steps.txt",
        "tokens/model_a.keras",
        "tokens/model_b.keras",
        "tokens/train.h5",
        "tokens/inputs.h5",
    }
    # Nothing else (no temporary files) is left behind.
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert written == sorted(str(p.relative_to(folder)) for p in paths.values())
    assert sum(path.stat().st_size for path in paths.values()) < 2_000_000


def test_same_seed_gives_identical_files(built):
    first, second, _ = built
    for key in ("train", "inputs", "tokens_train", "tokens_inputs"):
        data_1, attrs_1 = read_h5(first[key])
        data_2, attrs_2 = read_h5(second[key])
        assert data_1.keys() == data_2.keys()
        for name in data_1:
            np.testing.assert_array_equal(data_1[name], data_2[name])
            assert data_1[name].dtype == data_2[name].dtype
        assert attrs_1.keys() == attrs_2.keys()
    assert first["train"].read_bytes() == second["train"].read_bytes()
    assert first["tokens_train"].read_bytes() == second["tokens_train"].read_bytes()
    assert first["steps"].read_text() == second["steps"].read_text()
    for key in ("model_a", "model_b", "tokens_model_a", "tokens_model_b"):
        weights_1, weights_2 = weights(first[key]), weights(second[key])
        assert len(weights_1) == len(weights_2) > 0
        for weight_1, weight_2 in zip(weights_1, weights_2):
            np.testing.assert_array_equal(weight_1, weight_2)


def test_other_seed_gives_other_data_and_weights(built):
    first, _, other = built
    inputs_0 = read_h5(first["train"])[0]["inputs"]
    inputs_1 = read_h5(other["train"])[0]["inputs"]
    assert not np.array_equal(inputs_0, inputs_1)
    kernel_0 = weights(first["model_b"])[0]
    kernel_1 = weights(other["model_b"])[0]
    assert not np.array_equal(kernel_0, kernel_1)


def test_train_file_shapes_and_dtypes(built):
    data, attrs = read_h5(built[0]["train"])
    assert sorted(data) == ["inputs", "steps", "targets"]
    assert data["inputs"].shape == (512, 12, 3)
    assert data["inputs"].dtype == np.float32
    assert data["steps"].shape == (512, 12)
    assert data["steps"].dtype == np.int64
    assert data["targets"].dtype == np.float32
    assert data["targets"].shape == (int(data["steps"].sum()), 1)
    assert attrs["task"] == "sine"
    assert attrs["state_mode"] == "reset"
    assert attrs["state_init"] == "zeros"
    assert attrs["targets_layout"] == "flat"


def test_steps_range_and_zero_fraction(built):
    steps = read_h5(built[0]["train"])[0]["steps"]
    assert steps.min() == 0
    assert steps.max() == 8
    zero_fraction = float(np.mean(steps == 0))
    assert 0.15 < zero_fraction < 0.25
    # Every count 1..8 occurs.
    assert set(np.unique(steps).tolist()) == set(range(9))


def test_inputs_within_ranges(built):
    inputs = read_h5(built[0]["train"])[0]["inputs"]
    freq, amp, phase = inputs[..., 0], inputs[..., 1], inputs[..., 2]
    assert 0.5 <= freq.min() and freq.max() <= 1.5
    assert 0.5 <= amp.min() and amp.max() <= 1.5
    assert -math.pi / 2 <= phase.min() and phase.max() <= math.pi / 2


def test_targets_are_the_sine_formula(built):
    data, _ = read_h5(built[0]["train"])
    expected = reference_targets(data["inputs"], data["steps"])
    np.testing.assert_allclose(data["targets"], expected, rtol=0, atol=1e-6)


def test_sine_targets_by_hand():
    inputs = np.array([[[1.0, 2.0, 0.0], [0.5, 1.0, math.pi / 2]]], dtype=np.float32)
    steps = np.array([[2, 1]])
    expected = [[2 * math.sin(1.0)], [2 * math.sin(2.0)], [math.sin(0.5 + math.pi / 2)]]
    np.testing.assert_allclose(sample.sine_targets(inputs, steps), expected, atol=1e-6)


def test_sine_targets_zero_steps_and_empty():
    inputs = np.ones((2, 3, 3), dtype=np.float32)
    empty = sample.sine_targets(inputs, np.zeros((2, 3), dtype=np.int64))
    assert empty.shape == (0, 1)
    assert empty.dtype == np.float32
    no_samples = sample.sine_targets(np.ones((0, 3, 3)), np.zeros((0, 3), dtype=np.int64))
    assert no_samples.shape == (0, 1)
    # A zero-step pair in the middle is skipped, the others keep their order.
    inputs = np.array([[[1.0, 1.0, 0.0], [9.0, 9.0, 9.0], [2.0, 1.0, 0.0]]])
    values = sample.sine_targets(inputs, np.array([[1, 0, 1]]))
    np.testing.assert_allclose(values[:, 0], [math.sin(1.0), math.sin(2.0)], atol=1e-6)


def test_heldout_inputs_and_steps_file(built):
    paths = built[0]
    data, _ = read_h5(paths["inputs"])
    assert sorted(data) == ["inputs"]
    assert data["inputs"].shape == (8, 12, 3)
    assert data["inputs"].dtype == np.float32
    lines = paths["steps"].read_text().splitlines()
    assert len(lines) == 8
    steps = np.array([[int(word) for word in line.split()] for line in lines])
    assert steps.shape == (8, 12)
    assert steps.min() >= 0 and steps.max() <= 8
    # Held-out samples are not copies of training samples.
    train_inputs = read_h5(paths["train"])[0]["inputs"]
    assert not any(np.array_equal(row, data["inputs"][0]) for row in train_inputs)


def test_model_a_shapes(built):
    model_a = load(built[0]["model_a"])
    assert tuple(model_a.inputs[0].shape) == (None, None, 3)
    assert tuple(model_a.outputs[0].shape) == (None, None, 16)
    for batch, outer in ((2, 5), (1, 12), (3, 1)):
        ir = model_a(np.zeros((batch, outer, 3), dtype=np.float32))
        assert tuple(ir.shape) == (batch, outer, 16)


def test_model_b_step_form(built):
    model_b = load(built[0]["model_b"])
    assert len(model_b.inputs) == 2
    assert len(model_b.outputs) == 2
    x_spec, state_spec = (tuple(tensor.shape) for tensor in model_b.inputs)
    y_spec, new_state_spec = (tuple(tensor.shape) for tensor in model_b.outputs)
    assert x_spec == (None, 16)
    assert state_spec == new_state_spec == (None, 32)
    assert y_spec == (None, 1)
    ir = np.ones((4, 16), dtype=np.float32)
    y, state = model_b([ir, np.zeros((4, 32), dtype=np.float32)])
    assert tuple(y.shape) == (4, 1)
    assert tuple(state.shape) == (4, 32)
    # The state really carries: a second step from it differs from a fresh one.
    y_again, _ = model_b([ir, np.asarray(state)])
    assert not np.allclose(np.asarray(y), np.asarray(y_again))


def test_main_usage_error(capsys):
    assert sample.main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_main_builds_into_folder(tmp_path, capsys):
    assert sample.main([str(tmp_path / "made")]) == 0
    assert (tmp_path / "made" / "train.h5").is_file()
    assert "train.h5" in capsys.readouterr().err


def test_files_are_written_through_atomic_output(tmp_path, monkeypatch):
    from cascade_cli import atomic

    seen = []
    real = atomic.atomic_output

    def recording(path, **kwargs):
        seen.append((path.name, kwargs))
        return real(path, **kwargs)

    monkeypatch.setattr(sample, "atomic_output", recording)
    (tmp_path / "steps.txt").write_text("old\n")
    stale = tmp_path / ".train.h5.cascade-tmp-999999999-abcd1234.h5"  # no such pid
    stale.write_bytes(b"half")
    paths = sample.build_sample_data(tmp_path, seed=0)
    assert [name for name, _ in seen] == ["model_a.keras", "model_b.keras", "train.h5", "inputs.h5", "steps.txt",
                                          "model_a.keras", "model_b.keras", "train.h5", "inputs.h5"]
    assert all(kwargs == {"overwrite": True, "suffix": f".{name.split('.')[-1]}"} for name, kwargs in seen)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(paths.values())
    assert (tmp_path / "steps.txt").read_text() != "old\n"


# ------------------------------------------------------------ the token task


def reference_pattern(rule, length, start):
    """The notes by hand: a walk over 1..6 that wraps around, then END (0)."""
    notes, note = [], start
    for _ in range(length):
        notes.append(note)
        note = {"up": note % 6 + 1, "down": (note - 2) % 6 + 1, "repeat": note}[rule]
    return notes + [0]


@pytest.mark.parametrize("rule", sample.TOKEN_RULES)
@pytest.mark.parametrize("start", range(1, 7))
def test_pattern_tokens_by_hand(rule, start):
    for length in range(1, 5):
        tokens = sample.pattern_tokens(rule, length, start)
        assert tokens == reference_pattern(rule, length, start)
        assert sample.follows_pattern(tokens, rule, length)
    assert sample.pattern_tokens("up", 3, 5) == [5, 6, 1, 0]
    assert sample.pattern_tokens("down", 2, 1) == [1, 6, 0]


def test_follows_pattern_refuses_what_breaks_the_rule():
    assert not sample.follows_pattern([5, 6, 2, 0], "up", 3)  # a wrong note
    assert not sample.follows_pattern([5, 6, 1], "up", 3)  # no END
    assert not sample.follows_pattern([5, 6, 1, 2, 0], "up", 3)  # too long
    assert not sample.follows_pattern([0, 1, 2, 0], "up", 3)  # END is not a start
    assert not sample.follows_pattern([3, 3, 0], "up", 2)


def test_token_files_hold_the_task(built):
    paths = built[0]
    for key, samples in (("tokens_train", 256), ("tokens_inputs", 8)):
        data, attrs = read_h5(paths[key])
        assert sorted(data) == ["inputs", "rules", "steps", "targets"]
        inputs, steps, targets, rules = data["inputs"], data["steps"], data["targets"], data["rules"]
        assert inputs.shape == (samples, 8, 5) and inputs.dtype == np.float32
        assert steps.shape == (samples, 8) and targets.shape == (int(steps.sum()), 7)
        np.testing.assert_array_equal(targets.sum(axis=1), 1.0)  # one-hot rows
        tokens = targets.argmax(axis=1)
        offset = 0
        for n in range(samples):
            for t in range(8):
                count = int(steps[n, t])
                rule = sample.TOKEN_RULES[rules[n, t]]
                if count == 0:  # a rest: no features at all
                    np.testing.assert_array_equal(inputs[n, t], 0.0)
                    continue
                length = count - 1
                assert 1 <= length <= 4
                np.testing.assert_array_equal(inputs[n, t, :3], np.eye(3)[rules[n, t]])
                assert inputs[n, t, 3] == pytest.approx(length / 4) and inputs[n, t, 4] == 1.0
                assert tokens[offset:offset + count].tolist() == reference_pattern(rule, length, tokens[offset])
                offset += count
        assert offset == len(tokens)
        assert attrs["task"] == "tokens" and attrs["end_token"] == 0
    rests = read_h5(paths["tokens_train"])[0]["steps"] == 0
    assert 0.15 < rests.mean() < 0.25
    starts = read_h5(paths["tokens_train"])[0]["targets"].argmax(axis=1)
    assert len(set(starts.tolist())) == 7  # every note starts somewhere, and END ends


def test_token_model_b_is_in_feedback_form(built):
    model_b = load(built[0]["tokens_model_b"])
    assert [tuple(tensor.shape) for tensor in model_b.inputs] == [(None, 16), (None, 7), (None, 32)]
    assert [tuple(tensor.shape) for tensor in model_b.outputs] == [(None, 7), (None, 32)]
    model_a = load(built[0]["tokens_model_a"])
    assert tuple(model_a(np.zeros((2, 3, 5), np.float32)).shape) == (2, 3, 16)
    x, state = np.ones((2, 16), np.float32), np.zeros((2, 32), np.float32)
    first = np.asarray(model_b([x, np.eye(7, dtype=np.float32)[[1, 1]], state])[0])
    second = np.asarray(model_b([x, np.eye(7, dtype=np.float32)[[1, 2]], state])[0])
    np.testing.assert_array_equal(first[0], second[0])
    assert not np.allclose(first[1], second[1])  # what it was fed back changes its output
