"""`cascade export-model`: a packed generator as a TensorFlow SavedModel for serving."""

from pathlib import Path

import click

from cascade_cli.cli import ModelFiles, consoles, load_options, make_output_parents, say


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
    files = ModelFiles(None, None, unsafe=unsafe, allow_legacy_h5=allow_legacy_h5, packed=generator)
    model_a, model_b, settings = files.load_generator(console)
    from cascade_cli.train.keras_model import CascadeModel, export_saved_model

    module = export_saved_model(CascadeModel(model_a, model_b, **settings), directory, overwrite=overwrite)
    inputs = "inputs" if settings.get("max_steps") is not None else "inputs, steps"
    outputs = ", ".join(module.serve.get_concrete_function().structured_outputs)  # traced by the export
    say(console, f"Wrote the SavedModel '{directory}': serving_default maps {inputs} to {outputs}.")
