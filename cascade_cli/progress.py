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
from rich.table import Column, Table
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


BAR_WIDTH = 40  # the bar's width where the line has room; it narrows to MIN_BAR_WIDTH before a column goes
MIN_BAR_WIDTH = 10


class FittingProgress(Progress):
    """A `Progress` whose rows keep to one line of the console, however narrow.

    Every column but the bar is drawn whole (never wrapped or cut); the bar
    narrows from `BAR_WIDTH` to `MIN_BAR_WIDTH`, and when the line is still
    too long the columns in `drop` are left out, first to last (then the bar),
    so that what stays (the description and the count) stays readable.

    Args:
        *columns: the columns, as for `Progress`; one may be a `BarColumn`.
        drop: the columns that may be left out, least needed first.
        **kwargs: passed to `Progress`.
    """

    def __init__(self, *columns, drop=(), **kwargs):
        self._drop = tuple(drop)
        super().__init__(*columns, **kwargs)

    def _fitting_columns(self, tasks):
        """The columns to draw `tasks` with at the console's width, and the bar's width."""
        console = self.console
        widths = {id(column): max((console.measure(column(task)).maximum for task in tasks), default=0)
                  for column in self.columns if not isinstance(column, BarColumn)}
        columns = list(self.columns)

        def spare():
            texts = sum(widths[id(column)] for column in columns if not isinstance(column, BarColumn))
            return console.width - texts - (len(columns) - 1)  # one space between columns

        for dropped in (*self._drop, *(column for column in columns if isinstance(column, BarColumn))):
            bars = any(isinstance(column, BarColumn) for column in columns)
            if spare() >= (MIN_BAR_WIDTH if bars else 0):
                break
            columns.remove(dropped)
        return columns, max(MIN_BAR_WIDTH, min(BAR_WIDTH, spare()))

    def make_tasks_table(self, tasks):
        """The table of `tasks`' rows, one line each (see the class docstring)."""
        tasks = [task for task in tasks if task.visible]
        if not tasks or not hasattr(self, "live"):  # nothing to draw yet (Progress draws once while it starts)
            return Table.grid()
        columns, bar_width = self._fitting_columns(tasks)
        table = Table.grid(*(Column(no_wrap=True, width=bar_width if isinstance(column, BarColumn) else None)
                             for column in columns), padding=(0, 1), expand=False)
        for task in tasks:
            table.add_row(*(_bar(column, task, bar_width) if isinstance(column, BarColumn) else column(task)
                            for column in columns))
        return table


def _bar(column, task, width):
    """`column`'s bar for `task`, `width` cells wide."""
    bar = column(task)
    bar.width = width
    return bar


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


def track_progress(console, *, unit, **kwargs):
    """Returns the `FittingProgress` that `track` draws: description, bar, count, unit, rate and times.

    Where the line is too narrow, the remaining time goes first, then the
    elapsed time, the rate and the unit; the description and the count stay.

    Args:
        console: where to draw.
        unit: what the count and the rate count.
        **kwargs: passed to `Progress`.
    """
    unit_column, rate, elapsed, remaining = TextColumn(unit), RateColumn(unit), TimeElapsedColumn(), TimeRemainingColumn()
    return FittingProgress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           unit_column, rate, elapsed, remaining, drop=(remaining, elapsed, rate, unit_column),
                           console=console, **kwargs)


def _tracked(iterable, *, total, description, console, unit, weight):
    with track_progress(console, unit=unit) as progress:
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


LOSS_WIDTH = 10  # `1.2346e-01`: every loss in a training row has this width and 5 significant digits


def fixed_loss(value):
    """Formats a loss at a fixed width and precision for the rows of training: `1.2346e-01`, `-` for None."""
    if value is None:
        text = "-"
    elif not math.isfinite(value):
        text = str(value)
    else:
        text = f"{value:.4e}"
    return f"{text:>{LOSS_WIDTH}}"


BEST_MARK = "*"
BEST_LEGEND = f"{BEST_MARK} lowest val_loss so far"


def run_header(info, *, words=str):
    """The lines that open a training run's output: what it trains on, where, and how (`options.RunInfo`).

    `words` rewrites each warning (the CLI's `flag_text` names its flags).
    """
    replicas = f"{info.replicas} replica{'' if info.replicas == 1 else 's'}"
    val = f"{info.val_samples:,} validation sample{'' if info.val_samples == 1 else 's'}"
    lines = [
        f"Training on {info.train_samples:,} sample{'' if info.train_samples == 1 else 's'}, {val}; "
        f"{info.device}, {replicas} ({info.strategy} strategy).",
    ]
    loss = info.loss if info.from_logits is None else (
        f"{info.loss} on {'logits' if info.from_logits else 'probabilities (B ends in a softmax)'}")
    if info.resumed:
        lines.append(f"Resuming at epoch {info.first_epoch} of {info.epochs}, learning rate {info.learning_rate:g}, "
                     f"loss {loss}.")
    else:
        lines.append(f"Epochs 1 to {info.epochs}, learning rate {info.learning_rate:g}, loss {loss}.")
    lines.extend(f"Warning: {words(warning)}" for warning in info.warnings)
    return lines


def epoch_columns(epochs):
    """The heading of the epoch rows, as wide as the rows `epoch_row` makes for a run of `epochs` epochs."""
    width = 2 * len(str(epochs)) + 1
    return (f"{'epoch':>{max(width, 5)}}  {'loss':>{LOSS_WIDTH}}  {'val_loss':>{LOSS_WIDTH}}  "
            f"{'seconds':>8}")


def epoch_row(logs, *, epochs, best):
    """One fixed-width row of a finished epoch: `  3/20  1.2346e-01  2.3457e-01 *    0.4`.

    Args:
        logs: the epoch's `{"epoch", "loss", "val_loss", "seconds"}`, then any
            other figures (`--metrics`, `val_length_mae`), shown by name after them.
        epochs: the epoch the run trains up to (fixes the width of the first column).
        best: whether this epoch's val_loss is the lowest so far (marked with `*`).
    """
    width = max(2 * len(str(epochs)) + 1, 5)
    mark = f" {BEST_MARK}" if best else "  "
    extras = "".join(f"  {name} {fixed_loss(value).strip()}" for name, value in logs.items()
                     if name not in _ROW_FIELDS)  # --metrics and val_length_mae, by name
    return (f"{str(logs['epoch']) + '/' + str(epochs):>{width}}  {fixed_loss(logs['loss'])}  "
            f"{fixed_loss(logs.get('val_loss'))}{mark}{logs['seconds']:>8.1f}{extras}")


_ROW_FIELDS = ("epoch", "loss", "val_loss", "seconds")  # the columns every epoch row has


class TrainReport(TrainCallbacks):
    """Renders training on a console: a header, one fixed-width row per epoch, and one live bar for the epoch running.

    It implements the hooks of `cascade_cli.options.TrainCallbacks` that
    `training.fit` calls. Finished epochs are printed above the bar as rows
    of fixed width and precision; the lowest val_loss so far is marked `*`
    and explained at the end. Use it as a context manager so the live display
    stops even when training fails. When live progress is off, only the rows
    are printed.

    Args:
        console: where to draw (stderr).
        enabled: force live bars on or off; None draws them only on a terminal.
        words: rewrites the library's warnings (the CLI's `flag_text` names its flags).
    """

    def __init__(self, console, *, enabled=None, words=str):
        self.console = console
        self.words = words
        self.enabled = progress_enabled(console) if enabled is None else bool(enabled)
        self._progress = None
        self._task = None
        self._epochs = 0
        self._best = None  # (val_loss, epoch)
        self._heading = False

    def __enter__(self):
        if self.enabled:
            unit, percent, loss, elapsed = (TextColumn("batches"), TaskProgressColumn(),
                                            TextColumn("{task.fields[loss]}"), TimeElapsedColumn())
            self._progress = FittingProgress(
                TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                unit, percent, loss, elapsed,
                drop=(elapsed, percent, unit, loss), console=self.console, transient=True,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc_info):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _print(self, text):
        console = self._progress.console if self._progress is not None else self.console
        console.print(text, markup=False, highlight=False, soft_wrap=True)  # whole lines for pipes and greps

    def run_started(self, info):
        """Prints the header: sample counts, device, replicas, the epochs and learning rate, warnings."""
        self._epochs = info.epochs
        self._best = None  # a new run (the demo trains two with one report)
        for line in run_header(info, words=self.words):
            self._print(line)

    def resumed(self, *, epoch, history=()):
        """Says which epoch a resumed run continues after; the lowest val_loss so far counts `history`'s epochs."""
        for row in history:
            val_loss = row.get("val_loss")
            if val_loss is not None and math.isfinite(val_loss) and (self._best is None or val_loss < self._best[0]):
                self._best = (val_loss, row["epoch"])
        self._print(f"Continuing from the checkpoint of epoch {epoch}.")

    def epoch_started(self, epoch, *, epochs, batches):
        """Starts the bar of epoch `epoch` of `epochs` (`batches` batches), the only bar on screen."""
        self._epochs = epochs
        if not self._heading:
            self._print(epoch_columns(epochs))
            self._heading = True
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(f"epoch {epoch}/{epochs}", total=batches, loss="loss -")

    def batch_done(self, loss):
        """Advances the bar and shows the epoch's running loss."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, loss=f"loss {fixed_loss(loss).strip()}")

    def epoch_done(self, logs):
        """Prints the epoch's row, `*` when its val_loss is the lowest so far."""
        val_loss = logs.get("val_loss")
        best = val_loss is not None and math.isfinite(val_loss) and (self._best is None or val_loss < self._best[0])
        if best:
            self._best = (val_loss, logs["epoch"])
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        self._print(epoch_row(logs, epochs=self._epochs, best=best))

    def stopped_early(self, *, epoch, best_epoch):
        """Says that patience stopped the run and which epoch's weights are kept."""
        self._print(
            f"Stopped after epoch {epoch}: val_loss has not improved since epoch {best_epoch} "
            f"(patience); keeping the weights of epoch {best_epoch}."
        )

    def run_finished(self, history):
        """Explains the `*`: the epoch of the lowest val_loss."""
        if self._best is not None:
            self._print(f"{BEST_LEGEND}; the lowest is epoch {self._best[1]}'s, {fixed_loss(self._best[0]).strip()}.")


def train_callbacks(console, *, enabled=None, words=str):
    """Returns the `TrainCallbacks` that render training on `console` (a `TrainReport`).

    Args:
        console: where to draw (stderr).
        enabled: force live bars on or off; None draws them only on a terminal.
        words: rewrites the library's warnings (the CLI's `flag_text` names its flags).
    """
    return TrainReport(console, enabled=enabled, words=words)
