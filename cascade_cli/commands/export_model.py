"""`cascade export-model`: a packed generator as a TensorFlow SavedModel for serving."""

from pathlib import Path

import click

from cascade_cli.cli import ModelFiles, consoles, load_options, load_tensorflow, make_output_parents, say


@click.command("export-model", short_help="Export a packed generator as a TensorFlow SavedModel.")
@click.argument("generator", metavar="GENERATOR.keras")
@click.option("--saved-model", "directory", required=True, metavar="DIR",
              help="The TensorFlow SavedModel folder to write (serving_default: inputs, steps -> flat_values, "
                   "lengths, and tokens with a token sampler).")
@click.option("--overwrite", is_flag=True, help="Replace DIR if it holds files.")
@load_options
@click.pass_context
def export_model(ctx, generator, directory, overwrite, unsafe, allow_legacy_h5):
    """Export a packed generator as a TensorFlow SavedModel for serving.

    \b
    Example:
      cascade export-model generator.keras --saved-model serving/cascade/1
    """
    if Path(directory).exists() and not Path(directory).is_dir():  # before the models load
        raise click.BadParameter(f"a SavedModel is a folder: expected a folder name, received '{directory}', "
                                 "which is a file.", ctx, param_hint="'--saved-model'")
    from cascade_cli.atomic import check_not_holding_inputs

    check_not_holding_inputs(directory, [generator], what="--saved-model")
    make_output_parents(directory)
    console, _ = consoles()
    ModelFiles(None, None, unsafe=unsafe, packed=generator).warn_unsafe(console)
    load_tensorflow()
    from cascade_cli.generators import export_generator

    inputs, outputs = export_generator(generator, directory, overwrite=overwrite, safe_mode=not unsafe)
    say(console, f"Wrote the SavedModel '{directory}': serving_default maps {', '.join(inputs)} to "
                 f"{', '.join(outputs)}.")
