"""What `cascade inspect` says about a file: its kind, `(name, value)` rows and lengths to histogram.

Facts only; `cli.py` renders them.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from cascade_cli import results_io
from cascade_cli.errors import DataError, ModelError, one_line
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
    """`("norm", 1.5)` -> `"norm >= 1.5"`; `("token", 0)` -> `"token == 0"`."""
    kind, value = rule
    return f"norm >= {value:g}" if kind == "norm" else f"token == {value}"


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


def _tensor_list(tensors):
    return "; ".join(f"{getattr(t, 'name', '?')} {shape_text(tuple(t.shape))}" for t in tensors)


def describe_model(model, path):
    """Inspects one loaded model: `(rows, a_spec or None, b_spec or None)`."""
    from cascade_cli.models import inspect_a, inspect_b

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
    return rows, a_spec, b_spec


def describe_pair(models, paths, specs):
    """Says which of two models is A and which is B, and checks they fit: one `("pair", ...)` row.

    The first is B when only it can be B and the second can be A; otherwise the first is A.
    """
    from cascade_cli.models import check_pair

    (a_first, b_first), (a_second, _) = specs
    if b_first is not None and a_first is None and a_second is not None:
        model_a, model_b, names = models[1], models[0], (paths[1], paths[0])
    else:
        model_a, model_b, names = models[0], models[1], (paths[0], paths[1])
    a_spec, b_spec = check_pair(model_a, model_b)
    return [("pair", f"A='{names[0]}' and B='{names[1]}' fit: IR size H={a_spec.ir_size}, "
                     f"B emits O={b_spec.output_size} ({b_spec.form} form)")]


def describe_result(path):
    """Inspects a result file from its header and lengths; its values are never read."""
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
    rows += [(key, value) for key, value in sorted(run_attrs(attrs).items())]
    rule = attrs.get("stop_rule")
    max_steps = attrs.get("max_steps")
    if rule not in (None, "none") and max_steps is not None:
        reached = int((result.lengths == int(max_steps)).sum())
        pairs = result.lengths.size
        rows.append(("stop rule",
                     f"{rule_text((rule, attrs.get('stop_value')))}: {reached:,} of {pairs:,} pairs reached "
                     f"--max-steps {max_steps} (the rule did not end them sooner); the other "
                     f"{pairs - reached:,} stopped earlier, by the rule or by a smaller steps cap"))
    return Report(rows, result.lengths, "inner lengths per (n, t) pair", "pairs")


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


def describe_csv(path):
    with open(path, encoding="utf-8", errors="replace") as handle:
        header = handle.readline().strip()
        rows = sum(1 for _ in handle)
    return Report([("csv export", f"'{path}'"), ("columns", header), ("emitted steps", f"{rows:,}")])


def kind_of(path):
    """What `path` holds: `model`, `result`, `training`, `inputs`, `steps` or `csv`."""
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
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return "model"
    if suffix in (".txt", ".json"):
        return "steps"
    if suffix == ".csv":
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
        return "csv" if first.startswith(",".join(results_io.CSV_INDEX_COLUMNS)) else "steps"
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
