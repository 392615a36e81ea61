"""`cascade plot` and `cascade_cli.plotting`: a valid PNG for each kind of input, one `Error:` line for a bad one."""

import os

import numpy as np
import pytest

from cascade_cli import plotting
from cascade_cli.errors import DataError, ParameterError
from cascade_cli.result import CascadeResult
from cascade_cli.results_io import write_result
from clitools import assert_error, assert_ok, invoke
from filetools import write_h5, write_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LENGTHS = [[3, 0, 2], [1, 2, 0]]  # N=2, Ta=3, 8 inner steps
HISTORY = ("epoch,loss,val_loss,seconds,mae,val_mae,val_length_mae\n"
           "1,0.9,1.0,0.5,0.7,0.8,1.5\n2,0.5,0.6,0.4,0.5,0.6,1.0\n3,0.3,0.4,0.4,0.4,0.5,0.5\n")


def values_result(path, *, layout="ragged"):
    values = np.arange(16, dtype=np.float32).reshape(8, 2) / 10
    write_result(path, CascadeResult(values, LENGTHS), layout=layout)
    return path


def tokens_result(path):
    tokens = np.array([1, 2, 0, 3, 0, 4, 1, 0], np.int64)
    write_result(path, CascadeResult(np.eye(5, dtype=np.float32)[tokens], LENGTHS, tokens))
    return path


def training_file(path, steps=((2, 1, 2), (1, 2, 1))):
    steps = np.array(steps, np.int64)
    return write_h5(path, inputs=np.zeros((*steps.shape, 1), np.float32), steps=steps,
                    targets=np.zeros((int(steps.sum()), 2), np.float32))


def png_size(path):
    """Checks the PNG signature and reads the picture with matplotlib: `(width, height)`."""
    from matplotlib.image import imread

    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    picture = imread(path)
    assert picture.ndim == 3 and picture.shape[2] in (3, 4)
    return picture.shape[1], picture.shape[0]


def size_of(rows, row_height):
    """The size `plotting._figure` gives `rows` panels: 8 inches wide, `row_height * rows + 0.4` high, at 80 dpi."""
    return 8 * plotting.DPI, round((row_height * rows + 0.4) * plotting.DPI)


@pytest.mark.parametrize("suffix, layout", [(".h5", "ragged"), (".npz", "padded")])
def test_a_result_is_drawn_as_a_heat_map_and_each_chosen_samples_values(tmp_path, suffix, layout):
    result = values_result(tmp_path / f"r{suffix}", layout=layout)
    done = invoke("plot", result, "--samples", "0,1", "-o", tmp_path / "r.png")
    assert_ok(done)
    assert png_size(tmp_path / "r.png") == size_of(3, 2.6) == (640, 656)  # the heat map and two samples
    assert "sample 0: values; sample 1: values." in done.stderr and done.stdout == ""


def test_a_result_with_tokens_is_drawn_as_a_piano_roll(tmp_path):
    done = invoke("plot", tokens_result(tmp_path / "t.h5"), "-o", tmp_path / "t.png")
    assert_ok(done)
    assert png_size(tmp_path / "t.png") == size_of(2, 2.6) == (640, 448)  # sample 0 by default
    assert "sample 0: sampled tokens." in done.stderr


def test_a_training_history_is_drawn_loss_first_then_each_metric(tmp_path):
    history = write_text(tmp_path / "history.csv", HISTORY)
    picture = plotting.plot_history(history, tmp_path / "h.png")
    assert picture.panels == ("loss, val_loss", "mae, val_mae", "val_length_mae")  # seconds left out
    assert png_size(tmp_path / "h.png") == size_of(3, 2.2) == (640, 560)
    assert_ok(invoke("plot", history, "-o", tmp_path / "cli.png"))
    assert png_size(tmp_path / "cli.png") == (640, 560)


def test_a_result_against_a_training_file_is_drawn_per_outer_step(tmp_path, monkeypatch):
    result, train = values_result(tmp_path / "r.h5"), training_file(tmp_path / "train.h5")
    drawn = {}
    real_bar = __import__("matplotlib.axes", fromlist=["Axes"]).Axes.bar

    def bar(self, x, heights, *args, **kwargs):
        drawn["heights"] = np.asarray(heights).tolist()
        return real_bar(self, x, heights, *args, **kwargs)

    monkeypatch.setattr("matplotlib.axes.Axes.bar", bar)
    done = invoke("plot", result, "--against", train, "-o", tmp_path / "a.png")
    assert_ok(done)
    assert png_size(tmp_path / "a.png") == size_of(1, 2.6) == (640, 240)
    # |[[3, 0, 2], [1, 2, 0]] - [[2, 1, 2], [1, 2, 1]]| = [[1, 1, 0], [0, 0, 1]]: per outer step 0.5, 0.5, 0.5
    assert drawn["heights"] == [0.5, 0.5, 0.5]


def assert_refused(tmp_path, done, code, *words, keep):
    assert_error(done, code, *words)
    assert sorted(os.listdir(tmp_path)) == sorted(keep), "a picture or temporary file was left behind"


def test_a_missing_file_is_refused(tmp_path):
    done = invoke("plot", tmp_path / "none.h5", "-o", tmp_path / "p.png")
    assert_refused(tmp_path, done, 1, "none.h5' does not exist", keep=[])


@pytest.mark.parametrize("name, make, holds", [
    ("train.h5", lambda path: training_file(path), "holds training data"),
    ("steps.txt", lambda path: write_text(path, "1 2 3\n"), "holds a steps file"),
    ("export.csv", lambda path: write_text(path, "sample,outer,inner,y0\n0,0,0,1.0\n"), "holds a csv export"),
])
def test_a_file_that_is_neither_a_result_nor_a_history_is_refused(tmp_path, name, make, holds):
    make(tmp_path / name)
    done = invoke("plot", tmp_path / name, "-o", tmp_path / "p.png")
    assert_refused(tmp_path, done, 1, name, holds, "expected a result (.h5, .npz) or a training history",
                   keep=[name])


def test_a_sample_out_of_range_is_refused(tmp_path):
    values_result(tmp_path / "r.h5")
    done = invoke("plot", tmp_path / "r.h5", "--samples", "0,2", "-o", tmp_path / "p.png")
    assert_refused(tmp_path, done, 1, "--samples: sample 2 is out of range", "'", "r.h5' holds N=2 samples (0 to 1)",
                   keep=["r.h5"])


def test_against_a_training_file_of_another_shape_is_refused(tmp_path):
    values_result(tmp_path / "r.h5")
    training_file(tmp_path / "train.h5", np.ones((3, 3)))
    done = invoke("plot", tmp_path / "r.h5", "--against", tmp_path / "train.h5", "-o", tmp_path / "p.png")
    assert_refused(tmp_path, done, 1, "train.h5' (--against) have shape (3, 3)", "(N, Ta) = (2, 3)",
                   keep=["r.h5", "train.h5"])


@pytest.mark.parametrize("args, words", [
    (["--samples", "1,,2"], ["--samples"]),
    (["--samples", "-1"], ["--samples"]),
    (["-o", "p.jpg"], ["'-o' / '--output'", "expected a .png name"]),
])
def test_a_malformed_flag_is_a_usage_error(tmp_path, monkeypatch, args, words):
    values_result(tmp_path / "r.h5")
    monkeypatch.chdir(tmp_path)
    argv = ["plot", "r.h5", *args] + ([] if "-o" in args else ["-o", "p.png"])
    assert_refused(tmp_path, invoke(*argv), 2, *words, keep=["r.h5"])


def test_flags_that_do_not_apply_to_a_history_are_usage_errors(tmp_path):
    write_text(tmp_path / "history.csv", HISTORY)
    values_result(tmp_path / "r.h5")
    done = invoke("plot", tmp_path / "history.csv", "--samples", "0", "-o", tmp_path / "p.png")
    assert_refused(tmp_path, done, 2, "--samples", "a training history", keep=["history.csv", "r.h5"])
    done = invoke("plot", tmp_path / "history.csv", "--against", tmp_path / "r.h5", "-o", tmp_path / "p.png")
    assert_refused(tmp_path, done, 2, "--against needs PATH to be a result", keep=["history.csv", "r.h5"])


def test_an_existing_picture_is_kept_without_overwrite(tmp_path):
    values_result(tmp_path / "r.h5")
    write_text(tmp_path / "p.png", "old")
    done = invoke("plot", tmp_path / "r.h5", "-o", tmp_path / "p.png")
    assert_refused(tmp_path, done, 1, "p.png' already exists", keep=["r.h5", "p.png"])
    assert (tmp_path / "p.png").read_text() == "old"
    assert_ok(invoke("plot", tmp_path / "r.h5", "-o", tmp_path / "p.png", "--overwrite"))
    assert png_size(tmp_path / "p.png") == (640, 448)


def test_a_drawing_that_fails_leaves_nothing_behind(tmp_path, monkeypatch):
    values_result(tmp_path / "r.h5")

    def fail(self, *args, **kwargs):
        with open(args[0], "wb") as handle:  # half a file under the temporary name, then the failure
            handle.write(PNG_SIGNATURE)
        raise DataError("the disk went away")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", fail)
    with pytest.raises(DataError, match="the disk went away"):
        plotting.plot_result(tmp_path / "r.h5", tmp_path / "p.png")
    assert sorted(os.listdir(tmp_path)) == ["r.h5"]


def test_check_samples_names_the_parameter():
    assert plotting.check_samples([1, 0], 2, path="r.h5") == (1, 0)
    with pytest.raises(ParameterError) as raised:
        plotting.check_samples([0], 0, path="r.h5")
    assert raised.value.parameter == "samples" and "holds N=0 samples (none)" in str(raised.value)


def test_an_empty_result_draws_its_heat_map_only(tmp_path):
    write_result(tmp_path / "e.h5", CascadeResult(np.zeros((0, 2), np.float32), np.zeros((0, 3), np.int64)))
    picture = plotting.plot_result(tmp_path / "e.h5", tmp_path / "e.png")
    assert len(picture.panels) == 1 and png_size(tmp_path / "e.png") == size_of(1, 2.6)
