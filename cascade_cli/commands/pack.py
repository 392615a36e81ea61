"""`cascade pack`: model A, model B and the runner settings in one generator file."""

from pathlib import Path

import click

from cascade_cli.cli import check_output, consoles, load_tensorflow, model_options, runner_options, runner_usage, say


@click.command(short_help="Pack A, B and the runner settings into one generator.")
@model_options
@runner_options
@click.option("-o", "--output", required=True, metavar="GENERATOR.keras", help="The generator file to write.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.pass_context
def pack(ctx, models, runner, output, overwrite):
    """Pack model A, model B and the runner settings into one generator file.

    \b
    Example:
      cascade pack --model-a A.keras --model-b B.keras --max-steps 20 --stop-norm 1.2 -o generator.keras
      cascade generate --model generator.keras --inputs X.h5 -o results.h5
    """
    if Path(output).suffix.lower() != ".keras":
        raise click.BadParameter(f"expected a .keras name, received '{output}'.", ctx, param_hint="'-o' / '--output'")
    check_output(output, overwrite=overwrite, inputs=models.paths)
    console, _ = consoles()
    models.warn_unsafe(console)
    load_tensorflow()
    from cascade_cli.generators import pack_generator

    with runner_usage(ctx, runner):
        generator = pack_generator(models.model_a, models.model_b, output, settings=runner, overwrite=overwrite,
                                   safe_mode=not models.unsafe, allow_legacy_h5=models.allow_legacy_h5)
    from cascade_cli.inspection import nonfinite_weight_rows, settings_text

    say(console, f"Wrote '{output}': model A '{models.model_a}', model B '{models.model_b}', "
                 f"{settings_text(generator.settings)}.")
    for role, path, model in (("model A", models.model_a, generator.model_a),
                              ("model B", models.model_b, generator.model_b)):
        for _, text in nonfinite_weight_rows(model):
            say(console, f"Warning: {role} '{path}' has {text}.", style="yellow")
