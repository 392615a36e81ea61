"""`cascade inspect`: describe a model, a dataset, a steps file or a result."""

import functools

import click

from cascade_cli.cli import consoles, load_models, load_options, load_tensorflow, print_rows, usage_errors

HISTOGRAM_WIDTH = 40


def _histogram(report):
    from rich.table import Table

    from cascade_cli.inspection import histogram_rows

    rows = histogram_rows(report.lengths)
    most = max((count for _, count in rows), default=0)
    table = Table(title=report.title, title_justify="left", box=None, padding=(0, 1))
    table.add_column(report.label, justify="right")
    table.add_column(report.unit, justify="right")
    table.add_column("")
    for label, count in rows:
        bar = "█" * (round(HISTOGRAM_WIDTH * count / most) if most else 0)
        table.add_row(label, f"{count:,}", bar or ("▏" if count else ""))
    return table


def _inspect_models(report, console, path, partner, *, unsafe, allow_legacy_h5):
    from cascade_cli.inspection import describe_models

    paths = [path] + ([partner] if partner is not None else [])
    roles = ["model"] + (["partner"] if partner is not None else [])
    load_tensorflow()
    import cascade_cli.train.keras_model  # noqa: F401  registers the class a packed generator names

    loaded = load_models(paths, roles, console=console, unsafe=unsafe, allow_legacy_h5=allow_legacy_h5)
    with usage_errors(click.get_current_context(), _only=("partner",), partner="--partner"):
        rows = describe_models(loaded, paths)
    print_rows(report, rows)


@click.command()
@click.argument("path", metavar="PATH")
@click.option("--partner", metavar="OTHER.keras", help="With a model: the other model, to check that A and B fit.")
@click.option("--inputs-key", default="inputs", show_default=True, help="Dataset or array name of an inputs file.")
@click.option("--against", metavar="TRAIN.h5",
              help="With a result: the mean absolute error of its lengths against this training file's steps, "
                   "overall and per outer step.")
@load_options
def inspect(path, partner, inputs_key, against, unsafe, allow_legacy_h5):
    """Describe a model, a dataset, a steps file or a result.

    \b
    Example:
      cascade inspect model_b.keras --partner model_a.keras
      cascade inspect results.h5        # layout, sizes and a histogram of inner lengths
    """
    from cascade_cli import inspection

    console, report = consoles()
    kind = inspection.kind_of(path)
    if partner is not None and kind != "model":
        raise click.UsageError(f"--partner needs PATH to be a model; '{path}' holds {kind}.")
    if against is not None and kind != "result":
        raise click.UsageError(f"--against needs PATH to be a result; '{path}' holds {kind}.")
    if kind == "model":
        _inspect_models(report, console, path, partner, unsafe=unsafe, allow_legacy_h5=allow_legacy_h5)
        return
    describe = {
        "result": inspection.describe_result,
        "training": inspection.describe_training,
        "inputs": functools.partial(inspection.describe_inputs, key=inputs_key),
        "csv": inspection.describe_csv,
        "steps": inspection.describe_steps,
    }[kind]
    described = describe(path)
    compared = [] if against is None else inspection.length_error_rows(described.lengths, against)  # before output
    print_rows(report, described.rows + compared)
    if described.lengths is not None:
        report.print(_histogram(described))
