"""`cascade export`: a result as npz, h5 or csv, in the ragged or the padded layout."""

from pathlib import Path

import click

from cascade_cli.cli import check_output, consoles, say


@click.command()
@click.argument("result", metavar="RESULT")
@click.option("--format", "format_", type=click.Choice(("npz", "h5", "csv")),
              help="Output format; taken from the suffix of --output when not given.")
@click.option("--layout", type=click.Choice(("ragged", "padded")),
              help="ragged (flat_values + row splits, the default) or padded (values + mask).")
@click.option("--pad-value", type=float, metavar="V", help="Value past each sequence's end (padded; default 0).")
@click.option("--time-major", is_flag=True, help="Padded values as (Ta, L, N, O) and mask as (Ta, L, N).")
@click.option("-o", "--output", required=True, metavar="OUT", help="The file to write.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.pass_context
def export(ctx, result, format_, layout, pad_value, time_major, output, overwrite):
    """Export a result to npz, h5 or csv (ragged or padded layout).

    \b
    Example:
      cascade export results.h5 --format npz --layout padded --pad-value -1 -o results.npz
      cascade export results.h5 -o results.csv
    """
    from cascade_cli.results_io import SUFFIX_FORMATS as RESULT_SUFFIXES

    suffix = Path(output).suffix.lower()
    fmt = format_ or RESULT_SUFFIXES.get(suffix)
    if fmt is None:
        raise click.UsageError(
            f"cannot tell the format of '{output}' from its suffix: pass --format npz, h5 or csv, "
            "or name the file .npz, .h5 or .csv.", ctx)
    if format_ is not None and suffix in RESULT_SUFFIXES and RESULT_SUFFIXES[suffix] != format_:
        raise click.UsageError(f"--format {format_} does not match the suffix of --output '{output}'.", ctx)
    if fmt == "csv" and (layout is not None or pad_value is not None or time_major):
        raise click.UsageError(
            "csv is written in long form (sample, outer, inner, y0, ...): --layout, --pad-value and "
            "--time-major do not apply.", ctx)
    layout = layout or "ragged"
    if layout == "ragged" and (pad_value is not None or time_major):
        raise click.UsageError("--pad-value and --time-major need --layout padded.", ctx)
    from cascade_cli.results_io import open_result, run_attrs, write_result

    check_output(output, overwrite=overwrite, inputs=(result,))
    console, _ = consoles()
    with open_result(result) as data:  # streamed: one batch of samples in memory at a time
        attrs = run_attrs(data.attrs) if fmt != "csv" else None
        write_result(output, data, format=fmt, layout=layout, pad_value=0.0 if pad_value is None else pad_value,
                     time_major=time_major, overwrite=overwrite, attrs=attrs)
    shape = f"{layout} layout" if fmt != "csv" else "long form"
    say(console, f"Wrote '{output}' ({fmt}, {shape}): {data.n_samples:,} samples, {data.outer_steps} outer "
                  f"steps, {data.total:,} inner steps of size {data.output_size}.")
