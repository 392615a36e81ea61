"""Progress bars, reports and tables, rendered with rich.

Progress and summaries go to one `Console(stderr=True)` per command
(`stderr_console`), so stdout stays clean for pipes; a command whose output
*is* a report (`inspect`) prints it to `stdout_console`. Progress is a wrapper
around an iterable (`track`): when it is off, as when stderr is not a
terminal, the wrapper is plain `iter`, so the loops it wraps never ask about
the UI. Only rich (and the TF-free `options`) is imported here: the training
renderer (`train_callbacks`) builds on `options.TrainCallbacks`, so drawing
progress never loads TensorFlow.
"""

import math

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cascade_cli.options import TrainCallbacks


def stderr_console():
    """Returns the console that progress, warnings and summaries go to (stderr)."""
    return Console(stderr=True, highlight=False)


def stdout_console():
    """Returns a console on stdout, for a command whose output is the report itself."""
    return Console(highlight=False)


def progress_enabled(console):
    """Whether to draw live progress on `console`: only on an interactive terminal."""
    return console.is_terminal and not console.is_dumb_terminal


class RateColumn(ProgressColumn):
    """Shows a task's speed as `1,234 <unit>/s`."""

    def __init__(self, unit):
        super().__init__()
        self.unit = unit

    def render(self, task):
        speed = task.finished_speed or task.speed
        if speed is None and task.completed and task.elapsed:
            speed = task.completed / task.elapsed  # too few updates for rich's windowed speed
        if speed is None:
            return Text(f"-- {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {self.unit}/s", style="progress.data.speed")


def track(iterable, *, total, description, console=None, unit="items", weight=None, enabled=None):
    """Iterates over `iterable` while drawing a progress bar with a rate on `console`.

    Args:
        iterable: what to iterate over.
        total: the sum of the weights of all items (the bar's 100 %).
        description: the label left of the bar.
        console: where to draw; a new `stderr_console()` when None.
        unit: what the rate counts, e.g. `"samples"`.
        weight: `item -> int`, how much one item advances the bar once the
            loop body has handled it; 1 per item when None.
        enabled: force the bar on or off; None draws it only on a terminal.

    Returns:
        An iterator over the items of `iterable`: `iter(iterable)` itself when
        the bar is off.
    """
    console = console or stderr_console()
    if enabled is None:
        enabled = progress_enabled(console)
    if not enabled:
        return iter(iterable)
    return _tracked(iterable, total=total, description=description, console=console, unit=unit, weight=weight)


def _tracked(iterable, *, total, description, console, unit, weight):
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task, 1 if weight is None else weight(item))


def format_loss(value):
    """Formats a loss for tables and progress: 4 significant digits, `-` for None."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def epochs_table(history, *, title="Training"):
    """Returns a table of `fit`'s history: epoch, loss, val_loss, seconds; the best val_loss starred.

    Args:
        history: a list of `{"epoch", "loss", "val_loss", "seconds"}` dicts.
        title: the table's title.
    """
    table = Table(title=title, title_justify="left")
    table.add_column("epoch", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("val_loss", justify="right")
    table.add_column("seconds", justify="right")
    scored = [row["val_loss"] for row in history if row.get("val_loss") is not None]
    best = min(scored) if scored else None
    for row in history:
        val_loss = row.get("val_loss")
        mark = " *" if best is not None and val_loss == best and len(scored) > 1 else ""
        table.add_row(
            str(row["epoch"]),
            format_loss(row["loss"]),
            format_loss(val_loss) + mark,
            f"{row['seconds']:.1f}",
        )
    return table


class TrainReport(TrainCallbacks):
    """Renders training on a console: one bar per epoch with the running loss.

    It implements the hooks of `cascade_cli.options.TrainCallbacks` that
    `training.fit` calls. Use it as a context manager so the live display
    stops even when training fails. When live progress is off, it prints one
    line per epoch instead.

    Args:
        console: where to draw (stderr).
        enabled: force live bars on or off; None draws them only on a terminal.
    """

    def __init__(self, console, *, enabled=None):
        self.console = console
        self.enabled = progress_enabled(console) if enabled is None else bool(enabled)
        self._progress = None
        self._task = None
        self._label = ""

    def __enter__(self):
        if self.enabled:
            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("batches"),
                TaskProgressColumn(),
                TextColumn("{task.fields[loss]}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc_info):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def resumed(self, *, epoch):
        """Says which epoch a resumed run continues after."""
        self.console.print(f"Resuming from the checkpoint of epoch {epoch}.")

    def epoch_started(self, epoch, *, epochs, batches):
        """Starts the bar of epoch `epoch` of `epochs` (`batches` batches)."""
        self._label = f"epoch {epoch}/{epochs}"
        if self._progress is not None:
            self._task = self._progress.add_task(self._label, total=batches, loss="loss -")

    def batch_done(self, loss):
        """Advances the bar and shows the epoch's running loss."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, loss=f"loss {format_loss(loss)}")

    def epoch_done(self, logs):
        """Shows the epoch's loss and val_loss on its bar, or prints them as a line."""
        text = f"loss {format_loss(logs['loss'])}  val_loss {format_loss(logs.get('val_loss'))}"
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, loss=text)
        else:
            self.console.print(f"{self._label}  {text}  {logs['seconds']:.1f} s")

    def stopped_early(self, *, epoch, best_epoch):
        """Says that `--patience` stopped the run and which epoch's weights are kept."""
        self.console.print(
            f"Stopped after epoch {epoch}: val_loss has not improved since epoch {best_epoch} "
            f"(--patience); keeping the weights of epoch {best_epoch}."
        )


def train_callbacks(console, *, enabled=None):
    """Returns the `TrainCallbacks` that render training on `console` (a `TrainReport`).

    Args:
        console: where to draw (stderr).
        enabled: force live bars on or off; None draws them only on a terminal.
    """
    return TrainReport(console, enabled=enabled)
