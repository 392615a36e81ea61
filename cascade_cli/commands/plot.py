"""`cascade plot`: a PNG of a result, a training history or a result's length error."""

from pathlib import Path

import click

from cascade_cli.cli import IntList, check_output, consoles, error_text, say
from cascade_cli.errors import ParameterError


@click.command()
@click.argument("path", metavar="PATH")
@click.option("--against", metavar="TRAIN.h5",
              help="With a result: draw its length error per outer step against this training file's steps, as "
                   "inspect --against prints it.")
@click.option("--samples", type=IntList(), metavar="0,3",
              help="With a result: the samples whose values (or sampled tokens, as a piano roll) are drawn. [0]")
@click.option("-o", "--output", required=True, metavar="PICTURE.png", help="The PNG to write.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.pass_context
def plot(ctx, path, against, samples, output, overwrite):
    """Draw a result, a training history or a result's length error as a PNG.

    A result: a heat map of its lengths (N x Ta), then each chosen sample's
    values per outer step, or its tokens as a piano roll. A history.csv: loss,
    val_loss and each metric by epoch.

    \b
    Example:
      cascade plot results.h5 --samples 0,3 -o results.png
      cascade plot run1/history.csv -o history.png
      cascade plot results.h5 --against train.h5 -o length-error.png
    """
    if Path(output).suffix.lower() != ".png":
        raise click.BadParameter(f"plot writes a PNG, expected a .png name, received '{output}'.", ctx,
                                 param_hint="'-o' / '--output'")
    from cascade_cli import plotting

    kind = plotting.plot_kind(path)
    if against is not None and kind != "result":
        raise click.UsageError(f"--against needs PATH to be a result; '{path}' holds a training history.", ctx)
    if samples is not None and (kind != "result" or against is not None):
        raise click.UsageError("--samples chooses the samples of a result's picture; it does not apply to "
                               + ("--against." if against is not None else f"'{path}', a training history."), ctx)
    check_output(output, overwrite=overwrite, inputs=(path, against))
    console, _ = consoles()
    try:
        if against is not None:
            picture = plotting.plot_against(path, against, output, overwrite=overwrite)
        elif kind == "result":
            picture = plotting.plot_result(path, output, samples=samples, overwrite=overwrite)
        else:
            picture = plotting.plot_history(path, output, overwrite=overwrite)
    except ParameterError as error:
        raise click.ClickException(error_text(error, {"samples": "--samples"})) from None
    say(console, f"Wrote '{picture.output}': " + "; ".join(picture.panels) + ".")
