"""Tests for cascade_cli.progress: plain iteration when off, the training renderer on TrainCallbacks, tables."""

import dataclasses
import inspect
import io
import subprocess
import sys

import pytest
from rich.console import Console

from cascade_cli.options import RunInfo, TrainCallbacks
from cascade_cli.progress import (
    TrainReport,
    epochs_table,
    fixed_loss,
    format_loss,
    run_header,
    track,
    track_progress,
    train_callbacks,
)


def plain_console():
    return Console(file=io.StringIO(), width=120)


def hooks(cls):
    return {name: inspect.signature(getattr(cls, name)) for name in vars(TrainCallbacks) if not name.startswith("_")}


def test_track_is_plain_iteration_when_off():
    items = [1, 2, 3]
    tracked = track(items, total=3, description="x", console=plain_console())
    assert type(tracked) is type(iter(items))
    assert list(tracked) == items
    console = plain_console()
    assert list(track(items, total=6, description="x", console=console, weight=lambda i: i, enabled=True)) == items
    assert "6/6" in console.file.getvalue()


def drawn_lines(console):
    return [line for line in console.file.getvalue().splitlines() if line.strip()]


@pytest.mark.parametrize("width", [30, 60, 80])
def test_a_bar_keeps_to_one_line_with_its_description_and_count_whole_at_any_width(width):
    console = Console(file=io.StringIO(), width=width)
    items = list(track(range(4), total=20000, description="generating", console=console, unit="samples",
                       weight=lambda item: 5000, enabled=True))
    assert items == [0, 1, 2, 3]
    (line,) = drawn_lines(console)  # the bar's last state, on one line
    assert line.startswith("generating ") and "20000/20000" in line, line
    assert "…" not in line and len(line.rstrip()) <= width, line
    if width >= 60:
        assert "20000/20000 samples" in line, line


def test_a_bar_drops_its_least_needed_columns_first_and_shows_them_all_where_they_fit():
    def line(width, speed):
        console = Console(file=io.StringIO(), width=width)
        bar = track_progress(console, unit="samples", auto_refresh=False)  # never started: drawn once, by hand
        task = bar.add_task("generating", total=20000)
        bar.update(task, completed=2468)
        bar.tasks[0].finished_speed = speed
        console.print(bar.get_renderable())
        (drawn,) = drawn_lines(console)
        return drawn

    wide = line(120, 1234.0)
    assert "2468/20000 samples 1,234 samples/s" in wide and wide.count(":") == 4  # elapsed and remaining
    narrow = line(60, 1234.0)
    assert "2468/20000 samples" in narrow and ":" not in narrow  # the times go first, then the rate
    assert "━" in narrow  # the bar stays


def test_the_training_bar_keeps_the_epoch_and_the_batch_count_at_60_columns():
    console = Console(file=io.StringIO(), width=60)
    with TrainReport(console, enabled=True) as report:
        report.epoch_started(3, epochs=200, batches=1000)
        for _ in range(10):
            report.batch_done(0.123)
        shown = Console(file=io.StringIO(), width=60)
        shown.print(report._progress.get_renderable())
    (line,) = drawn_lines(shown)
    assert line.startswith("epoch 3/200 ") and "10/1000 batches" in line and "…" not in line, line
    assert len(line.rstrip()) <= 60


def test_format_loss_by_hand():
    assert [format_loss(v) for v in (None, 0.123456, 1234567.0, float("nan"), float("inf"))] == [
        "-", "0.1235", "1.235e+06", "nan", "inf"]


def test_train_callbacks_is_a_train_callbacks_with_the_same_hooks():
    report = train_callbacks(plain_console())
    assert isinstance(report, TrainReport) and isinstance(report, TrainCallbacks)
    assert hooks(TrainReport) == hooks(TrainCallbacks)
    assert sorted(hooks(TrainCallbacks)) == ["batch_done", "epoch_done", "epoch_started", "resumed", "run_finished",
                                             "run_started", "stopped_early"]


INFO = RunInfo(train_samples=57, val_samples=7, device="CPU", replicas=1, strategy="mirrored", epochs=12,
               first_epoch=1, learning_rate=0.01, loss="mse",
               warnings=("strategy='mirrored' found one device, so it trains on 1 replica.",))


def test_fixed_loss_has_one_width_and_precision():
    assert [fixed_loss(v) for v in (None, 0.123456, 1234567.0, 1e-9, float("nan"), float("inf"))] == [
        "         -", "1.2346e-01", "1.2346e+06", "1.0000e-09", "       nan", "       inf"]


def test_train_report_prints_a_header_and_one_fixed_width_row_per_epoch_when_live_progress_is_off():
    console = Console(file=io.StringIO(), width=40)  # narrow: lines stay whole all the same
    history = [{"epoch": 1, "loss": 0.5, "val_loss": 0.25, "seconds": 0.5},
               {"epoch": 2, "loss": 0.25, "val_loss": 0.375, "seconds": 10.25},
               {"epoch": 3, "loss": 0.125, "val_loss": 0.0625, "seconds": 1.0}]
    with train_callbacks(console) as report:
        assert report.enabled is False
        report.run_started(INFO)
        for logs in history:
            report.epoch_started(logs["epoch"], epochs=12, batches=2)
            report.batch_done(0.5)
            report.epoch_done(dict(logs))
        report.stopped_early(epoch=3, best_epoch=3)
        report.run_finished(history)
    assert console.file.getvalue().splitlines() == [
        "Training on 57 samples, 7 validation samples; CPU, 1 replica (mirrored strategy).",
        "Epochs 1 to 12, learning rate 0.01, loss mse.",
        "Warning: strategy='mirrored' found one device, so it trains on 1 replica.",
        "epoch        loss    val_loss   seconds",
        " 1/12  5.0000e-01  2.5000e-01 *     0.5",
        " 2/12  2.5000e-01  3.7500e-01      10.2",
        " 3/12  1.2500e-01  6.2500e-02 *     1.0",
        "Stopped after epoch 3: val_loss has not improved since epoch 3 (patience); keeping the weights of epoch 3.",
        "* lowest val_loss so far; the lowest is epoch 3's, 6.2500e-02.",
    ]
    rows = console.file.getvalue().splitlines()[4:7]
    assert len({len(row) for row in rows}) == 1


def test_the_header_of_a_resumed_run_and_of_a_cross_entropy():
    resumed = dataclasses.replace(INFO, resumed=True, first_epoch=42, epochs=50, warnings=(), replicas=2,
                                  loss="categorical-crossentropy", from_logits=False, val_samples=1)
    assert run_header(resumed) == [
        "Training on 57 samples, 1 validation sample; CPU, 2 replicas (mirrored strategy).",
        "Resuming at epoch 42 of 50, learning rate 0.01, loss categorical-crossentropy on probabilities (B ends in "
        "a softmax).",
    ]


def test_train_report_draws_one_bar_and_the_rows_when_enabled():
    console = plain_console()
    with TrainReport(console, enabled=True) as report:
        report.run_started(INFO)
        for epoch in (1, 2):
            report.epoch_started(epoch, epochs=2, batches=2)
            report.batch_done(0.5)
            assert len(report._progress.tasks) == 1  # one live bar: the epoch running
            report.batch_done(0.25)
            report.epoch_done({"epoch": epoch, "loss": 0.25, "val_loss": 0.125, "seconds": 0.5})
        assert report._progress.tasks == []
    drawn = console.file.getvalue()
    assert "  1/2  2.5000e-01  1.2500e-01 *     0.5" in drawn
    assert drawn.count("2/2  2.5000e-01") == 1  # each row once: no table again


def test_epochs_table_stars_the_best_val_loss_only_when_there_is_a_choice():
    def rows(history):
        console = plain_console()
        console.print(epochs_table(history))
        return [line.replace("│", " ").split() for line in console.file.getvalue().splitlines()
                if line.replace("│", " ").split()[:1] in (["1"], ["2"], ["3"])]

    assert rows([{"epoch": 1, "loss": 0.5, "val_loss": 0.25, "seconds": 1.0},
                 {"epoch": 2, "loss": 0.4, "val_loss": 0.125, "seconds": 2.25},
                 {"epoch": 3, "loss": 0.3, "val_loss": None, "seconds": 1.0}]) == [
        ["1", "0.5", "0.25", "1.0"], ["2", "0.4", "0.125", "*", "2.2"], ["3", "0.3", "-", "1.0"]]
    assert rows([{"epoch": 1, "loss": 0.5, "val_loss": 0.25, "seconds": 1.0}]) == [["1", "0.5", "0.25", "1.0"]]


def test_rendering_training_progress_does_not_import_tensorflow():
    code = (
        "import io, sys\n"
        "from rich.console import Console\n"
        "from cascade_cli.options import RunInfo\n"
        "from cascade_cli.progress import train_callbacks\n"
        "with train_callbacks(Console(file=io.StringIO())) as report:\n"
        "    report.run_started(RunInfo(train_samples=2, val_samples=0, device='CPU', replicas=1, strategy='default',"
        " epochs=1, first_epoch=1, learning_rate=0.1, loss='mse'))\n"
        "    report.epoch_started(1, epochs=1, batches=1)\n"
        "    report.epoch_done({'epoch': 1, 'loss': 0.5, 'val_loss': None, 'seconds': 0.1})\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_an_epoch_row_shows_the_metrics_and_the_length_error_by_name_after_the_loss_columns():
    from cascade_cli.progress import epoch_row

    plain = epoch_row({"epoch": 3, "loss": 0.5, "val_loss": 0.25, "seconds": 1.5}, epochs=20, best=False)
    assert plain == " 3/20  5.0000e-01  2.5000e-01       1.5"  # the columns as before
    row = epoch_row({"epoch": 3, "loss": 0.5, "val_loss": 0.25, "seconds": 1.5, "mae": 0.125, "val_mae": 0.0625,
                     "val_length_mae": 1.5}, epochs=20, best=True)
    assert row == (" 3/20  5.0000e-01  2.5000e-01 *     1.5  mae 1.2500e-01  val_mae 6.2500e-02  "
                   "val_length_mae 1.5000e+00")
