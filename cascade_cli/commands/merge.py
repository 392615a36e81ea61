"""`cascade merge`: join the shards of one `generate --shard` run into one result."""

from pathlib import Path

import click

from cascade_cli.cli import check_output, consoles, say


@click.command()
@click.argument("parts", nargs=-1, required=True, metavar="PART...")
@click.option("-o", "--output", required=True, metavar="ALL.h5", help="The ragged HDF5 result to write.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.pass_context
def merge(ctx, parts, output, overwrite):
    """Join the shards of a generate --shard run into one result.

    The K files of one `generate --shard I/K` run are checked and streamed in
    shard order, whatever order they are given in.

    \b
    Example:
      cascade merge part*.h5 -o results.h5
    """
    if Path(output).suffix.lower() not in (".h5", ".hdf5"):
        raise click.BadParameter(f"merge writes a ragged HDF5 result, expected a .h5 name, received '{output}'.",
                                 ctx, param_hint="'-o' / '--output'")
    check_output(output, overwrite=overwrite, inputs=parts)
    from cascade_cli.shards import merge_shards

    console, _ = consoles()
    summary = merge_shards(parts, output, overwrite=overwrite)
    say(console, f"Wrote '{summary.output}': {summary.shards} shards of run {summary.run_id}, "
                 f"{summary.samples:,} samples, {summary.emitted:,} inner steps.")
