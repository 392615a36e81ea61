"""`cascade train` on the shipped sample_data/ learns the task: validation loss far below the mean's."""

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cascade_cli.cli import main
from cascade_cli.data import split_indices

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


def mean_baseline(val_split, seed):
    """The masked mse of predicting the training targets' mean on the validation samples."""
    with h5py.File(SAMPLE / "train.h5", "r") as f:
        steps, targets = f["steps"][()], f["targets"][()]
    train, val = split_indices(len(steps), val_split=val_split, seed=seed)
    starts = np.concatenate([[0], np.cumsum(steps.sum(axis=1))])
    rows = lambda samples: np.concatenate([targets[starts[n]:starts[n + 1]] for n in samples])
    return float(np.mean((rows(val) - rows(train).mean(axis=0)) ** 2))


def test_training_on_sample_data_beats_predicting_the_mean(tmp_path):
    result = CliRunner().invoke(main, [
        "train", "--model-a", str(SAMPLE / "model_a.keras"), "--model-b", str(SAMPLE / "model_b.keras"),
        "--data", str(SAMPLE / "train.h5"), "--out-dir", str(tmp_path / "run"), "--epochs", "8",
        "--learning-rate", "0.01", "--val-split", "0.2", "--seed", "0"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "run" / "history.csv", newline="") as file:
        history = list(csv.DictReader(file))
    assert len(history) == 8
    first, last = float(history[0]["val_loss"]), float(history[-1]["val_loss"])
    baseline = mean_baseline(0.2, 0)
    assert 0.3 < baseline < 1.0  # amplitudes in [0.5, 1.5]: the sine's spread
    assert last < 0.1 * baseline, (last, baseline)
    assert last < first


@pytest.mark.slow  # quick: test_first_hour's test_a_mirrored_run_on_one_device_says_it_trains_on_one_replica runs
# `cascade train --strategy mirrored` to its end (exit 0) and reads what it said
def test_train_with_the_mirrored_strategy_runs_from_the_command_line(tmp_path):
    result = CliRunner().invoke(main, [
        "train", "--model-a", str(SAMPLE / "model_a.keras"), "--model-b", str(SAMPLE / "model_b.keras"),
        "--data", str(SAMPLE / "train.h5"), "--out-dir", str(tmp_path / "run"), "--epochs", "1",
        "--strategy", "mirrored"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model_b.keras").is_file()
    assert len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 2
