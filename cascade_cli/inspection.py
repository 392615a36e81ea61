"""What `cascade inspect` says about a file: its kind, `(name, value)` rows and lengths to histogram.

Facts only; `cli.py` renders them. `stop_rule_lines` is the one description of
a stop-rule run, for `generate`'s summary and `inspect` of its result alike;
a training history (`history.csv`) is described with a text plot of its
losses (`text_plot`). Models' inputs and outputs are named by their layers.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from cascade_cli import results_io
from cascade_cli.errors import DataError, ModelError, ParameterError, one_line
from cascade_cli.options import STOP_RULES
from cascade_cli.results_io import run_attrs  # noqa: F401  (what an export carries; cli.py reads it here)

HISTOGRAM_ROWS = 16
WHAT = ("expected a model (.keras), training data, inputs or a result (.h5, .npz, .npy) "
        "or a steps file (.txt, .csv, .json)")


@dataclasses.dataclass(frozen=True)
class Report:
    """Rows to print, then optionally a histogram of `lengths`.

    Attributes:
        rows: `(name, value)` pairs.
        lengths: non-negative integers to histogram, or None.
        title, unit, label: how to caption the histogram.
    """

    rows: list
    lengths: object = None
    title: str = ""
    unit: str = ""
    label: str = "length"


def rule_text(rule):
    """`StopRule.describe` of `(kind, value)`; the value may be a result file's `stop_value`.

    `("norm", 1.5)` -> `"norm >= 1.5"`; `("token", 0)` -> `"token == 0"`; `("token", "0,5")` -> `"token in {0, 5}"`.
    """
    from cascade_cli.options import StopRule

    try:
        return StopRule(*rule).describe()
    except ParameterError:  # a file's value this version cannot read as a rule: shown as it is
        return f"{rule[0]} {rule[1]}"


def stop_rule_lines(rule, *, pairs, at_cap, at_first=0):
    """The one description of a stop-rule run, for `generate`'s summary and `inspect` alike.

    Args:
        rule: `(kind, value)`, as `rule_text` takes it.
        pairs: `(n, t)` pairs that could run (cap > 0).
        at_cap: pairs that ran to their cap (given steps or `max_steps`).
        at_first: pairs with a cap above 1 that the rule ended at their first step.

    Returns:
        `(sentence, warning)`: the warning is None unless the rule never fired
        or always fired at once.
    """
    sentence = (f"Stop rule {rule_text(rule)}: {at_cap:,} of {pairs:,} pairs reached their cap; "
                f"the rule ended the other {pairs - at_cap:,} earlier.")
    warning = None
    if pairs and at_cap == pairs:
        warning = ("the stop rule never fired, so every pair ran to its cap; check its value against what "
                   "model B emits (is B trained?).")
    elif at_first and at_first == pairs:
        warning = ("the stop rule fired at the first step of every pair; check its value against what model B "
                   "emits (is B trained?).")
    return sentence, warning


def _result_stop_rule(attrs, lengths):
    """`stop_rule_lines` of a result file, from its attributes and lengths; rows."""
    rule, max_steps = attrs.get("stop_rule"), attrs.get("max_steps")
    if rule not in STOP_RULES or not isinstance(max_steps, int) or "stop_value" not in attrs:
        return []
    counted = [attrs.get(key) for key in results_io.STOP_SUMMARY_ATTRS]
    if all(isinstance(value, int) and not isinstance(value, bool) for value in counted):
        pairs, at_cap, at_first = counted  # what generate counted, with the caps of its steps
        given = False
    else:  # an older result: the caps are max_steps unless steps were given too
        first_length = 0 if attrs.get("exclude_stop_step") is True else 1
        given = attrs.get("steps", "none") != "none"
        pairs = int(lengths.size) if max_steps > 0 else 0
        at_cap = int((lengths == max_steps).sum())
        at_first = 0 if given or max_steps < 2 else int((lengths == first_length).sum())
    sentence, warning = stop_rule_lines((rule, attrs["stop_value"]), pairs=pairs, at_cap=at_cap, at_first=at_first)
    rows = [("stop rule", sentence)]
    if given:
        rows.append(("", f"(caps: max_steps {max_steps}; the steps given as caps, {attrs['steps']}, are not in "
                         "the file, so pairs they capped count as ended by the rule)"))
    elif warning:
        rows.append(("warning", warning))
    return rows


XLA_ATTRS = ("a_compiled", "a_compile_problem", "jit_compile", "loop_compiled", "loop_compile_problem", "loop_fused")
"""What a result records of how the models ran: `a_compiled` (bool: A under XLA) and, where it was not,
`a_compile_problem` (why), the `jit_compile` asked for ("auto"/True/False as text), `loop_compiled` (bool: the
loop over B under XLA, whole) and, where it was not, `loop_compile_problem` (why); `loop_fused` (bool: A, the
row plan, the loop and the packing as one XLA call, `cascade_cli.run.fused`)."""


def _result_xla(attrs):
    """The `("model A ran", ...)` row saying whether A ran under XLA; none for a file that does not record it."""
    compiled, asked = attrs.get("a_compiled"), attrs.get("jit_compile")
    if not isinstance(compiled, bool) and asked is None:
        return []
    setting = "" if asked is None else f"jit_compile={asked}"
    if compiled is True:
        text = "under XLA" + (f" ({setting})" if setting else "")
    elif compiled is False:
        text = "without XLA" + (f" ({setting})" if setting else "")
        problem = attrs.get("a_compile_problem")
        if problem:
            text += f": {problem}"
        elif str(asked) == "auto":  # a file from before the reason was recorded
            text += ": A did not compile, or its XLA call differed from its plain call"
    else:
        text = f"{setting} (whether it ran under XLA is not recorded)"
    return [("model A ran", text)]


def _result_loop(attrs):
    """The `("the loop over B ran", ...)` row saying whether B's loop ran whole under XLA; none where not recorded."""
    compiled = attrs.get("loop_compiled")
    if not isinstance(compiled, bool):
        return []
    if compiled:
        fused = " and fused with model A in one XLA call" if attrs.get("loop_fused") is True else ""
        return [("the loop over B ran", f"under XLA, whole{fused}")]
    problem = attrs.get("loop_compile_problem")
    return [("the loop over B ran", "without XLA" + (f": {problem}" if problem else ""))]


def shape_text(shape):
    text = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({text},)" if len(shape) == 1 else f"({text})"


def histogram_rows(values, *, max_rows=HISTOGRAM_ROWS):
    """Counts non-negative integers in at most `max_rows` equal bins.

    Returns:
        A list of `(label, count)`: one row per value `0 .. max` when they
        fit, else bins `"a-b"` of equal width; empty for no values.
    """
    values = np.asarray(values, dtype=np.int64).ravel()
    if values.size == 0:
        return []
    top = int(values.max())
    width = max(1, math.ceil((top + 1) / max_rows))
    counts = np.bincount(values // width, minlength=top // width + 1)
    rows = []
    for index, count in enumerate(counts):
        low, high = index * width, min((index + 1) * width - 1, top)
        rows.append((str(low) if low == high else f"{low}-{high}", int(count)))
    return rows


def steps_rows(steps):
    """Statistics of a steps array `(Ta,)` or `(N, Ta)` as `(name, value)` rows."""
    steps = np.asarray(steps)
    pairs = int(steps.size)
    zero = int((steps == 0).sum())
    rows = [
        ("pairs (n, t)", f"{pairs:,}"),
        ("inner steps", f"{int(steps.sum()):,}"),
        ("per pair", "-" if not pairs else
         f"min {int(steps.min())}, mean {float(steps.mean()):.2f}, max {int(steps.max())}"),
        ("zero-step pairs", f"{zero:,}" + (f" ({100 * zero / pairs:.1f} %)" if pairs else "")),
    ]
    if steps.ndim == 2 and steps.shape[0]:
        totals = steps.sum(axis=1)
        rows.append(("per sample", f"min {int(totals.min())}, mean {float(totals.mean()):.2f}, "
                                   f"max {int(totals.max())}"))
    return rows


def _tensor_name(tensor):
    """A stable name for a model's input or output: its layer's name (never `keras_tensor_5`, which changes)."""
    history = getattr(tensor, "_keras_history", None)
    operation = getattr(history, "operation", None)
    return getattr(operation, "name", None) or getattr(tensor, "name", "?")


def _tensor_list(tensors):
    return "; ".join(f"{_tensor_name(t)} {shape_text(tuple(t.shape))}" for t in tensors)


def describe_model(model, path):
    """Inspects one loaded model: `(rows, a_spec or None, b_spec or None)`."""
    from cascade_cli.run.models import inspect_a, inspect_b

    trainable = sum(int(math.prod(w.shape)) for w in model.trainable_weights)
    total = sum(int(math.prod(w.shape)) for w in model.weights)
    rows = [
        ("model", f"'{path}' ({model.name})"),
        ("inputs", _tensor_list(model.inputs)),
        ("outputs", _tensor_list(model.outputs)),
        ("parameters", f"{total:,} ({trainable:,} trainable)"),
        ("layers", ", ".join(f"{layer.name} ({type(layer).__name__})" for layer in model.layers
                             if type(layer).__name__ != "InputLayer")),
    ]
    try:
        a_spec = inspect_a(model)
        ta = "any Ta" if a_spec.outer_steps is None else f"fixed Ta={a_spec.outer_steps}"
        if a_spec.form == "state":
            ta += f", state form, states [{', '.join(map(str, a_spec.state_sizes))}] (windows carry them)"
        rows.append(("as model A", f"yes: F={a_spec.features}, H={a_spec.ir_size}, {ta}"))
    except ModelError as error:
        a_spec = None
        rows.append(("as model A", f"no: {one_line(error)}"))
    try:
        b_spec = inspect_b(model)
        states = ", ".join(str(size) for size in b_spec.state_sizes) or "none"
        detail = f"H={b_spec.input_size}, O={b_spec.output_size}"
        detail += f", states [{states}]" if b_spec.form == "step" else ", causal"
        rows.append(("as model B", f"yes: {b_spec.form} form, {detail}"))
    except ModelError as error:
        b_spec = None
        rows.append(("as model B", f"no: {one_line(error)}"))
    rows += _feedback_rows(model, b_spec)
    rows += nonfinite_weight_rows(model)
    return rows, a_spec, b_spec


def nonfinite_weight_rows(model):
    """A `("warning", ...)` row when a model's weights hold NaN or Inf (naming the first weights), else none."""
    bad, total, names = 0, 0, []
    for weight in model.weights:
        values = np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight)
        if not np.issubdtype(values.dtype, np.floating):
            continue
        count = int(values.size - np.count_nonzero(np.isfinite(values)))
        total += int(values.size)
        if count:
            bad += count
            names.append(getattr(weight, "path", None) or weight.name)
    if not bad:
        return []
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return [("warning", f"non-finite weights: {bad:,} of {total:,} are NaN or Inf (in {shown}); every output "
                        "they reach will be too (generate stops on them unless --allow-nonfinite)")]


def nonfinite_value_rows(result_path):
    """A `("warning", ...)` row when a result's values hold NaN or Inf (the count and the first), else none.

    The values are read a batch of samples at a time.
    """
    bad = total = seen = 0
    first = None
    for piece in results_io.iter_result(result_path):
        rows = ~np.isfinite(piece.values).reshape(len(piece.values), -1).all(axis=1)
        if first is None and rows.any():
            row = int(np.argmax(rows))
            ends = np.cumsum(piece.lengths.reshape(-1))
            pair = int(np.searchsorted(ends, row, side="right"))
            n, t = divmod(pair, piece.lengths.shape[1])
            first = (seen + n, t, row - (int(ends[pair - 1]) if pair else 0))
        bad += int(rows.sum())
        total += len(rows)
        seen += piece.n_samples
    if not bad:
        return []
    return [("warning", f"{bad:,} of {total:,} inner steps hold NaN or Inf values (the first at sample {first[0]}, "
                        f"outer step {first[1]}, inner step {first[2]})")]


def _feedback_rows(model, b_spec):
    """The `("feedback", ...)` row (does B fit the feedback form?) of a step-form B, or of a model that fits only the feedback form; else none."""
    from cascade_cli.run.models import feedback_problem, inspect_b

    problem = feedback_problem(model)
    if problem is None:
        spec = inspect_b(model, check_causal=False, feedback=True)
        states = ", ".join(str(size) for size in spec.state_sizes)
        form = (f"[x (H={spec.input_size}), y_prev (O={spec.output_size}), states [{states}]] -> [y, states]"
                if states else f"[x (H={spec.input_size}), y_prev (O={spec.output_size})] -> y")
        return [("feedback", f"form yes: {form}; use it with --feedback")]
    if b_spec is not None and b_spec.form == "step":
        return [("feedback", f"form no ({problem.rstrip('.')})")]
    return []


def settings_text(settings):
    """A generator's runner settings as `name=value, ...`: those at None left out, a stop rule as `norm >= 1.2`."""
    shown = [f"{name}={value.describe() if hasattr(value, 'describe') else value}"
             for name, value in settings.items() if value is not None]
    return ", ".join(shown) or "the defaults"


def describe_models(models, paths):
    """`inspect`'s rows for loaded model files: a packed generator; or each model, and with a partner the pair.

    Args:
        models: the loaded `[PATH]` or `[PATH, partner]`.
        paths: their file names, in the same order.

    Raises:
        ParameterError: naming `partner` where one of them is a packed
            generator, which holds both models already.
    """
    from cascade_cli.train.keras_model import CascadeModel

    generators = [path for model, path in zip(models, paths) if isinstance(model, CascadeModel)]
    if generators and len(models) > 1:
        raise ParameterError("partner", f"'{generators[0]}' is a packed generator, which holds model A and model B: "
                                        "inspect it without a partner.")
    if generators:
        return describe_generator(models[0], paths[0])
    described = [describe_model(model, path) for model, path in zip(models, paths)]
    rows = [row for model_rows, _, _ in described for row in model_rows]
    if len(models) > 1:
        rows += describe_pair(models, paths, [specs for _, *specs in described])
    return rows


def describe_generator(model, path):
    """Inspects a packed generator (a `CascadeModel` file from `cascade pack`): its two models and its settings."""
    total = sum(int(math.prod(w.shape)) for w in model.weights)
    rows = [("generator", f"'{path}' ({model.name}), model A and model B with the runner settings")]
    for role, part in (("model A", model.model_a), ("model B", model.model_b)):
        rows.append((role, f"{part.name}: inputs {_tensor_list(part.inputs)}; outputs {_tensor_list(part.outputs)}"))
    rows += [("parameters", f"{total:,}"), ("settings", settings_text(model.settings)),
             ("use", f"cascade generate --model '{path}' --inputs X.h5 -o results.h5 (flags given override settings)")]
    return rows + nonfinite_weight_rows(model)


def describe_pair(models, paths, specs):
    """Says which of two models is A and which is B, and checks they fit: one `("pair", ...)` row.

    `models`, `paths` and `specs` (`(a_spec, b_spec)` of each, None where it
    does not qualify) are `[PATH, --partner]`. The order the README documents,
    `inspect B --partner A`, is tried first, then the other; an order is tried
    only where each model qualifies for its role. A B qualifies in step or
    sequence form (its `b_spec`) or in feedback form (`models.feedback_problem`
    finds nothing), and the pair says which form fits. When none fits, the
    error names both files.
    """
    from cascade_cli.run.models import check_pair, feedback_problem

    forms = [([False] if b_spec is not None else []) + ([True] if feedback_problem(model) is None else [])
             for model, (_, b_spec) in zip(models, specs)]
    orders = [(a, b, feedback) for a, b in ((1, 0), (0, 1)) if specs[a][0] is not None for feedback in forms[b]]
    problem = None
    for a, b, feedback in orders or [(1, 0, False)]:
        try:
            a_spec, b_spec = check_pair(models[a], models[b], names=(str(paths[a]), str(paths[b])),
                                        feedback=feedback)
        except ModelError as error:
            problem = problem or error
            continue
        form = "feedback form; use it with --feedback" if feedback else f"{b_spec.form} form"
        return [("pair", f"A='{paths[a]}' and B='{paths[b]}' fit: IR size H={a_spec.ir_size}, "
                         f"B emits O={b_spec.output_size} ({form})")]
    raise problem


def describe_result(path):
    """Inspects a result file from its header and lengths, and its values for NaN and Inf (streamed)."""
    with results_io.open_result(path) as result:
        attrs = result.attrs
    rows = [
        ("result", f"'{path}'"),
        ("layout", f"{result.layout} (format_version {attrs[results_io.FORMAT_VERSION_ATTR]})"),
        ("samples N", f"{result.n_samples:,}"),
        ("outer steps Ta", result.outer_steps),
        ("output size O", result.output_size),
        ("inner steps", f"{result.total:,} emitted, longest {result.max_length}"),
    ]
    if result.layout == "padded":
        rows.append(("padding", f"pad_value {attrs.get(results_io.PAD_VALUE)}, "
                                f"time_major {attrs.get(results_io.TIME_MAJOR)}"))
    rows += [(key, value) for key, value in sorted(run_attrs(attrs).items())
             if key not in (*results_io.STOP_SUMMARY_ATTRS, *XLA_ATTRS)]
    rows += _result_xla(attrs) + _result_loop(attrs)
    rows += _result_stop_rule(attrs, result.lengths)
    rows += nonfinite_value_rows(path)
    return Report(rows, result.lengths, "inner lengths per (n, t) pair", "pairs")


def length_errors(lengths, against):
    """`|length - steps|` per pair, `(N, Ta)` int64: a result's `lengths` against the training file `against`'s steps.

    Raises:
        DataError: the training file's steps are not shaped like the lengths.
    """
    from cascade_cli.data import TrainingData

    with TrainingData(against) as data:
        truth = data.steps
    lengths = np.asarray(lengths)
    if truth.shape != lengths.shape:
        raise DataError(f"steps in '{against}' (--against) have shape {tuple(truth.shape)}: expected the result's "
                        f"(N, Ta) = {tuple(lengths.shape)}.")
    return np.abs(lengths.astype(np.int64) - truth)


def length_error_rows(lengths, against):
    """Rows comparing a result's `lengths (N, Ta)` with the steps of the training file `against`.

    The mean absolute error over every pair, then per outer step (`length_errors`).

    Raises:
        DataError: the training file's steps are not shaped like the lengths.
    """
    errors = length_errors(lengths, against)
    rows = [("length error", f"mean |length - steps| {errors.mean() if errors.size else 0.0:.3f} over "
                             f"{errors.size:,} pairs, against '{against}'")]
    rows += [(f"  outer step {t}", f"{errors[:, t].mean() if len(errors) else 0.0:.3f}") for t in range(errors.shape[1])]
    return rows


def describe_training(path):
    from cascade_cli.data import TrainingData

    with TrainingData(path) as data:
        rows = [
            ("training data", f"'{path}'"),
            ("samples N", f"{data.n_samples:,}"),
            ("outer steps Ta", data.outer_steps),
            ("features F", data.features),
            ("output size O", data.output_size),
            ("targets", f"{data.targets_layout} ({data.total_steps:,} valid rows)"),
        ]
        steps = data.steps
    return Report(rows + steps_rows(steps), steps, "steps per (n, t) pair", "pairs", "steps")


def describe_inputs(path, *, key):
    from cascade_cli.data import open_inputs

    with open_inputs(path, key=key) as source:
        return Report([("inputs", source.name), ("shape (N, Ta, F)", shape_text(source.shape)),
                       ("dtype", str(source.dtype))])


def describe_steps(path):
    from cascade_cli.steps import read_steps

    steps = read_steps(path)
    form = "(Ta,), the same for every sample" if steps.ndim == 1 else "(N, Ta), one row per sample"
    unit = "outer steps" if steps.ndim == 1 else "pairs"
    rows = [("steps", f"'{path}'"), ("shape", f"{shape_text(steps.shape)}: {form}")] + steps_rows(steps)
    return Report(rows, steps, f"steps per {unit[:-1]}", unit, "steps")


_HISTORY_HEADER = "epoch,loss"
PLOT_WIDTH = 60
PLOT_HEIGHT = 10


def is_history(header):
    """Whether a csv header line is that of a training history (`epoch,loss,val_loss,seconds`)."""
    return header.strip().lower().startswith(_HISTORY_HEADER)


def describe_csv(path):
    """A csv export (its columns and emitted steps), or a training history (`describe_history`)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        header = handle.readline().strip()
        if is_history(header):
            return describe_history(path)
        rows = sum(1 for _ in handle)
    return Report([("csv export", f"'{path}'"), ("columns", header), ("emitted steps", f"{rows:,}")])


def _history_column(rows, key, path):
    values = []
    for line, row in enumerate(rows, start=2):
        text = (row.get(key) or "").strip()
        if not text:
            values.append(math.nan)
            continue
        try:
            values.append(float(text))
        except ValueError:
            raise DataError(f"'{path}' line {line} column '{key}': expected a number, received {text!r}") from None
    return np.asarray(values, dtype=np.float64)


def read_history(path):
    """Reads a training history (`history.csv`): `(epochs, columns)`, each column a float64 array (NaN where empty).

    `columns` holds every column but `epoch`, in the file's order.

    Raises:
        DataError: a value is not a number, naming the line and column.
    """
    import csv

    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        names = [name for name in reader.fieldnames or [] if name != "epoch"]
    return [row.get("epoch", "") for row in rows], {name: _history_column(rows, name, path) for name in names}


def describe_history(path):
    """A training history (`history.csv`): epochs, the last and best losses, and a text plot of loss and val_loss."""
    epochs, columns = read_history(path)
    loss = columns.get("loss", np.full(len(epochs), np.nan))
    val = columns.get("val_loss", np.full(len(epochs), np.nan))
    report = [("training history", f"'{path}'"), ("epochs", f"{len(epochs):,}")]
    if epochs:
        report.append(("last", f"epoch {epochs[-1]}: loss {loss[-1]:.6g}"
                               + ("" if math.isnan(val[-1]) else f", val_loss {val[-1]:.6g}")))
    if np.isfinite(val).any():
        best = int(np.nanargmin(np.where(np.isfinite(val), val, np.nan)))
        report.append(("best val_loss", f"{val[best]:.6g} at epoch {epochs[best]} (the weights kept)"))
    elif np.isfinite(loss).any():
        best = int(np.nanargmin(np.where(np.isfinite(loss), loss, np.nan)))
        report.append(("best loss", f"{loss[best]:.6g} at epoch {epochs[best]} (no validation split)"))
    plot = text_plot({"loss": loss, "val_loss": val})
    if plot:
        report.append(("plot", "o loss, x val_loss, * both; epochs left to right"))
        report += [("", line) for line in plot]
    return Report(report)


def text_plot(series, *, width=PLOT_WIDTH, height=PLOT_HEIGHT):
    """Plots series of one length as lines of text: `o` the first, `x` the second, `*` where both fall.

    Longer series are averaged into `width` columns; the y axis runs from the
    smallest to the largest finite value, labelled on the left.

    Returns:
        The plot's lines (none when no value is finite).
    """
    marks = "ox"
    arrays = [np.asarray(values, dtype=np.float64) for values in series.values()]
    finite = np.concatenate([values[np.isfinite(values)] for values in arrays]) if arrays else np.zeros(0)
    if finite.size == 0:
        return []
    low, high = float(finite.min()), float(finite.max())
    span = high - low or 1.0
    length = len(arrays[0])
    columns = min(width, length)
    grid = [[" "] * columns for _ in range(height)]
    edges = np.linspace(0, length, columns + 1).astype(int)
    for mark, values in zip(marks, arrays):
        for column in range(columns):
            part = values[edges[column]:max(edges[column + 1], edges[column] + 1)]
            part = part[np.isfinite(part)]
            if not part.size:
                continue
            row = height - 1 - int(math.floor((float(part.mean()) - low) / span * (height - 1) + 0.5))
            cell = grid[row][column]
            grid[row][column] = mark if cell in (" ", mark) else "*"
    labels = [f"{high - span * i / (height - 1):.4g}" for i in range(height)]
    label_width = max(len(label) for label in labels)
    lines = [f"{label:>{label_width}} |{''.join(cells)}" for label, cells in zip(labels, grid)]
    lines.append(f"{'':>{label_width}} +{'-' * columns}")
    return lines


def kind_of(path):
    """What `path` holds: `model`, `result`, `training`, `inputs`, `steps` or `csv` (an export or a training history)."""
    from cascade_cli import h5

    text = str(path)
    if "://" in text:
        return "model"
    path = Path(text)
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return "model"
        raise DataError(f"'{path}' is a folder: {WHAT}.")
    if not path.exists():
        raise DataError(f"'{path}' does not exist: {WHAT}.")
    h5.check_file(path, expected=WHAT.removeprefix("expected "))  # a FIFO or a device would block the reads below
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return "model"
    if suffix in (".txt", ".json"):
        return "steps"
    if suffix == ".csv":
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
        export = first.startswith(",".join(results_io.CSV_INDEX_COLUMNS))
        return "csv" if export or is_history(first) else "steps"  # a history is described by describe_csv
    if suffix == ".npy":
        array = h5.np_load(path, mmap_mode="r", expected="a .npy array")
        return "inputs" if getattr(array, "ndim", 0) == 3 else "steps"
    if suffix == ".npz":
        archive = h5.np_load(path, expected="a .npz archive")
        files = list(getattr(archive, "files", []))
        if isinstance(archive, np.lib.npyio.NpzFile):
            archive.close()
        return "result" if results_io.is_result(files) else "inputs"
    if suffix in h5.HDF5_SUFFIXES:
        with results_io.reading(path), h5.open_h5(path) as file:
            names = set(file.attrs)
            if results_io.is_result(names):
                return "result"
            if "model_config" in names or "keras_version" in names:
                return "model"
            keys = sorted(str(key) for key in file.keys())
        if "targets" in keys:
            return "training"
        if "inputs" in keys:
            return "inputs"
        if "steps" in keys:
            return "steps"
        raise DataError(
            f"'{path}' holds keys {keys}: expected a result (attribute '{results_io.LAYOUT}'), training data "
            "('inputs', 'steps', 'targets'), inputs ('inputs') or steps ('steps')."
        )
    raise DataError(f"'{path}' has suffix '{suffix}': {WHAT}.")
