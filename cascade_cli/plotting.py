"""Pictures of what cascade made, as PNG files: a result, a training history, a result against its training file.

What `cascade plot` draws (TF-free; matplotlib is imported only when a picture
is drawn, with its Agg canvas and no pyplot state, so `cascade --help` stays
fast):

- a result (`.h5` or `.npz`, either layout): a heat map of its lengths
  `(N, Ta)`, then for each chosen sample its values as one line per feature
  and outer step, or, when the result holds sampled tokens, the tokens as a
  piano roll (token id against inner step);
- a training history (`history.csv`): loss and val_loss, then each metric
  beside its `val_` figure, `val_length_mae` on its own;
- a result against a training file: `|length - steps|` per outer step, as
  `inspect --against` prints it (`inspection.length_errors`).

Every picture is written atomically (`atomic.atomic_output`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cascade_cli.atomic import atomic_output
from cascade_cli.errors import DataError, ParameterError

PLOT_KINDS = ("result", "history")
WHAT = "expected a result (.h5, .npz) or a training history (history.csv)"
DEFAULT_SAMPLES = (0,)
MAX_FEATURE_LINES = 8
"""A sample's values show at most this many features (the first), so a wide O stays readable."""
DPI = 80


@dataclasses.dataclass(frozen=True)
class Picture:
    """What `plot_file` wrote.

    Attributes:
        output: the PNG file.
        kind: `"result"`, `"history"` or `"against"`.
        panels: the panels drawn, by title.
    """

    output: str
    kind: str
    panels: tuple


def plot_kind(path):
    """What `path` holds for `plot`: `"result"` or `"history"`.

    Raises:
        DataError: `path` is missing, or is neither a result nor a training history.
    """
    from cascade_cli import inspection

    kind = inspection.kind_of(path)
    if kind == "result":
        return "result"
    if kind == "csv":
        with open(path, encoding="utf-8", errors="replace") as handle:
            if inspection.is_history(handle.readline()):
                return "history"
    held = {"training": "training data", "steps": "a steps file", "model": "a model", "csv": "a csv export"}
    raise DataError(f"'{path}' holds {held.get(kind, kind)}: {WHAT}.")


def check_samples(samples, n_samples, *, path):
    """Checks sample indices against a result of `n_samples` samples; returns them as a tuple of ints.

    Raises:
        ParameterError: an index is not in `[0, n_samples)`.
    """
    samples = tuple(int(n) for n in samples)
    for n in samples:
        if not 0 <= n < n_samples:
            held = f"0 to {n_samples - 1}" if n_samples else "none"
            raise ParameterError("samples", f"sample {n} is out of range: '{path}' holds N={n_samples} "
                                            f"samples ({held}).")
    return samples


def _figure(rows, *, title, width=8.0, row_height=2.6):
    """A matplotlib `Figure` on the Agg canvas, titled `title`, with `rows` axes stacked; `(figure, axes)`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, row_height * rows + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=10)
    return figure, figure.subplots(rows, 1, squeeze=False)[:, 0]


def _save(figure, output, *, overwrite, inputs):
    with atomic_output(output, overwrite=overwrite, suffix=".png", inputs=inputs) as temp:
        figure.savefig(temp, format="png", dpi=DPI)


def _lengths_panel(axis, lengths, *, title):
    n, outer = lengths.shape
    axis.set_title(title)
    if not lengths.size:
        axis.text(0.5, 0.5, "no (n, t) pairs", ha="center", va="center", transform=axis.transAxes)
        return
    image = axis.imshow(lengths, aspect="auto", interpolation="nearest", cmap="viridis",
                        extent=(-0.5, outer - 0.5, n - 0.5, -0.5))
    axis.figure.colorbar(image, ax=axis, label="inner steps")
    axis.set_xlabel("outer step t")
    axis.set_ylabel("sample n")


def _outer_marks(axis, starts, lengths):
    """Dotted lines where each outer step that ran starts, labelled t above the axis (0-step ones have no room)."""
    ran = [t for t in range(len(starts)) if lengths[t]]
    for t in ran:
        axis.axvline(starts[t] - 0.5, color="0.8", linewidth=0.8, linestyle=":")
    if ran:
        top = axis.secondary_xaxis("top")
        top.set_xticks([starts[t] - 0.5 for t in ran], [str(t) for t in ran], fontsize=7)
        top.set_xlabel("outer step t (0-step ones left out)", fontsize=8)


def _values_panel(axis, result, n):
    """Sample `n`'s values: one line per feature and outer step, inner steps of all outer steps side by side."""
    lengths = result.lengths[n]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    features = min(result.output_size, MAX_FEATURE_LINES)
    colours = [f"C{i % 10}" for i in range(features)]
    for t, (start, length) in enumerate(zip(starts, lengths)):
        if not length:
            continue
        values = result.sequence(n, t)
        x = np.arange(start, start + length)
        for feature in range(features):
            axis.plot(x, values[:, feature], marker=".", color=colours[feature],
                      label=f"y{feature}" if t == int(np.flatnonzero(lengths)[0]) else None)
    _outer_marks(axis, starts, lengths)
    axis.set_xlabel("inner step, outer steps side by side")
    axis.set_ylabel("value")
    shown = "" if features == result.output_size else f" (first {features} of {result.output_size} features)"
    axis.set_title(f"sample {n}: values{shown}")
    if lengths.sum() and features > 1:
        axis.legend(fontsize=7, loc="upper right")


def _tokens_panel(axis, result, n):
    """Sample `n`'s sampled tokens as a piano roll: token id against inner step, outer steps side by side."""
    lengths = result.lengths[n]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    vocabulary = max(result.output_size, 1)
    roll = np.zeros((vocabulary, max(int(lengths.sum()), 1)))
    for t, (start, length) in enumerate(zip(starts, lengths)):
        if length:
            tokens = result.token_sequence(n, t)
            roll[np.clip(tokens, 0, vocabulary - 1), np.arange(start, start + length)] = 1.0
    axis.imshow(roll, aspect="auto", origin="lower", interpolation="nearest", cmap="Greys", vmin=0, vmax=1,
                extent=(-0.5, roll.shape[1] - 0.5, -0.5, vocabulary - 0.5))
    _outer_marks(axis, starts, lengths)
    axis.set_xlabel("inner step, outer steps side by side")
    axis.set_ylabel("token id")
    axis.set_yticks(range(vocabulary))
    axis.set_title(f"sample {n}: sampled tokens")


def plot_result(path, output, *, samples=None, overwrite=False):
    """Writes a PNG of a result: a heat map of its lengths, then the values or tokens of `samples`.

    Args:
        path: the result (`.h5` or `.npz`, either layout).
        output: the PNG to write.
        samples: sample indices to draw; None draws sample 0 (none of an empty result).
        overwrite: whether an existing `output` may be replaced.

    Returns:
        A `Picture`.

    Raises:
        ParameterError: a sample index is out of range (`samples`).
        DataError: the file is not a readable result.
    """
    from cascade_cli.results_io import read_result

    result = read_result(path)
    if samples is None:
        samples = DEFAULT_SAMPLES[:result.n_samples]
    samples = check_samples(samples, result.n_samples, path=path)
    figure, axes = _figure(1 + len(samples), title=f"'{path}'")
    title = (f"inner lengths: {result.n_samples:,} samples x {result.outer_steps} outer steps, "
             f"{result.total:,} inner steps")
    _lengths_panel(axes[0], result.lengths, title=title)
    draw = _tokens_panel if result.has_tokens else _values_panel
    for axis, n in zip(axes[1:], samples):
        draw(axis, result, n)
    _save(figure, output, overwrite=overwrite, inputs=(path,))
    return Picture(str(output), "result", tuple(axis.get_title() for axis in axes))


def plot_history(path, output, *, overwrite=False):
    """Writes a PNG of a training history: loss and val_loss, then each metric with its `val_` figure.

    Raises:
        DataError: a value of `path` is not a number.
    """
    from cascade_cli.inspection import read_history

    epochs, columns = read_history(path)
    columns.pop("seconds", None)
    groups = {}
    for name in columns:
        groups.setdefault(name.removeprefix("val_"), []).append(name)
    groups = dict(sorted(groups.items(), key=lambda item: item[0] != "loss"))  # loss first, the rest in file order
    from matplotlib.ticker import MaxNLocator

    figure, axes = _figure(max(1, len(groups)), title=f"'{path}': {len(epochs):,} epochs", row_height=2.2)
    x = np.arange(1, len(epochs) + 1)
    for axis, (base, names) in zip(axes, groups.items()):
        for name in names:
            axis.plot(x, columns[name], marker="." if len(x) < 40 else None, label=name,
                      linestyle="--" if name.startswith("val_") else "-")
        values = np.concatenate([columns[name] for name in names])
        values = values[np.isfinite(values)]
        if values.size and values.min() > 0 and values.max() > 10 * values.min():
            axis.set_yscale("log")  # a loss falling by decades
        axis.set_ylabel(base)
        axis.set_title(", ".join(names))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("epoch")
    _save(figure, output, overwrite=overwrite, inputs=(path,))
    return Picture(str(output), "history", tuple(axis.get_title() for axis in axes))


def plot_against(path, against, output, *, overwrite=False):
    """Writes a PNG of a result's length error against a training file, per outer step (`inspect --against`).

    Raises:
        DataError: the training file's steps are not shaped like the result's lengths, or a file is unreadable.
    """
    from cascade_cli.inspection import length_errors
    from cascade_cli.results_io import open_result

    with open_result(path) as result:
        lengths = result.lengths
    errors = length_errors(lengths, against)
    outer = errors.shape[1]
    per_step = errors.mean(axis=0) if len(errors) else np.zeros(outer)
    overall = float(errors.mean()) if errors.size else 0.0
    figure, axes = _figure(1, title=f"'{path}' against '{against}'")
    axis = axes[0]
    axis.bar(np.arange(outer), per_step, color="C0")
    axis.axhline(overall, color="C3", linestyle="--", label=f"mean over every pair {overall:.3f}")
    axis.set_xlabel("outer step t")
    axis.set_ylabel("mean |length - steps|")
    axis.set_title(f"length error per outer step, {errors.size:,} pairs")
    axis.legend(fontsize=7, loc="upper right")
    _save(figure, output, overwrite=overwrite, inputs=(path, against))
    return Picture(str(output), "against", (axis.get_title(),))
