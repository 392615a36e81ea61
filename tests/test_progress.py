"""Tests for cascade_cli.progress: plain iteration when off, the training renderer on TrainCallbacks, tables."""

import inspect
import io
import subprocess
import sys

from rich.console import Console

from cascade_cli.options import TrainCallbacks
from cascade_cli.progress import TrainReport, epochs_table, format_loss, track, train_callbacks


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


def test_format_loss_by_hand():
    assert [format_loss(v) for v in (None, 0.123456, 1234567.0, float("nan"), float("inf"))] == [
        "-", "0.1235", "1.235e+06", "nan", "inf"]


def test_train_callbacks_is_a_train_callbacks_with_the_same_hooks():
    report = train_callbacks(plain_console())
    assert isinstance(report, TrainReport) and isinstance(report, TrainCallbacks)
    assert hooks(TrainReport) == hooks(TrainCallbacks)
    assert sorted(hooks(TrainCallbacks)) == ["batch_done", "epoch_done", "epoch_started", "resumed", "stopped_early"]


def test_train_report_prints_one_line_per_epoch_when_live_progress_is_off():
    console = plain_console()
    with train_callbacks(console) as report:
        assert report.enabled is False
        report.resumed(epoch=1)
        report.epoch_started(2, epochs=3, batches=2)
        report.batch_done(0.5)
        report.batch_done(0.25)
        report.epoch_done({"epoch": 2, "loss": 0.25, "val_loss": None, "seconds": 0.5})
        report.stopped_early(epoch=2, best_epoch=1)
    assert console.file.getvalue().splitlines() == [
        "Resuming from the checkpoint of epoch 1.",
        "epoch 2/3  loss 0.25  val_loss -  0.5 s",
        "Stopped after epoch 2: val_loss has not improved since epoch 1 (--patience); keeping the weights of "
        "epoch 1.",
    ]


def test_train_report_draws_bars_when_enabled():
    console = plain_console()
    with TrainReport(console, enabled=True) as report:
        report.epoch_started(1, epochs=1, batches=2)
        report.batch_done(0.5)
        report.batch_done(0.25)
        report.epoch_done({"epoch": 1, "loss": 0.25, "val_loss": 0.125, "seconds": 0.5})
    drawn = console.file.getvalue()
    assert "epoch 1/1" in drawn and "2/2" in drawn and "loss 0.25  val_loss 0.125" in drawn


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
        "from cascade_cli.progress import train_callbacks\n"
        "with train_callbacks(Console(file=io.StringIO())) as report:\n"
        "    report.epoch_started(1, epochs=1, batches=1)\n"
        "    report.epoch_done({'epoch': 1, 'loss': 0.5, 'val_loss': None, 'seconds': 0.1})\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
