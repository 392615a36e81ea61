"""`cascade generate`: run the cascade on an inputs file and write a ragged HDF5 result."""

from pathlib import Path

import click

from cascade_cli.cli import (check_output, consoles, generator_options, load_tensorflow, print_generation,
                             progress_bar, runner_options, runner_usage, say)
from cascade_cli.errors import CascadeError, one_line
from cascade_cli.options import GENERATE_BATCH_SIZE, INT32_MAX, SEED_MAX


def _shard_option(ctx, param, value):
    """Parses `--shard I/K` into `(index, count)`; a malformed value is a usage error."""
    if value is None:
        return None
    from cascade_cli.shards import parse_shard

    try:
        return parse_shard(value)
    except CascadeError as error:
        raise click.BadParameter(one_line(error), ctx, param) from None


@click.command()
@generator_options
@click.option("--inputs", "inputs_path", required=True, metavar="X.h5",
              help="Inputs (N, Ta, F): .h5 (dataset --inputs-key), .npy or .npz (key --inputs-key).")
@click.option("--inputs-key", default="inputs", show_default=True, help="Dataset or array name in --inputs.")
@click.option("--steps-file", metavar="S",
              help="Inner steps: .txt/.csv (one line for all samples or one per sample), .npy, .json or .h5.")
@click.option("--steps", "steps_text", metavar="3,4,2", help="Inner steps per outer step, the same for every sample.")
@runner_options
@click.option("--batch-size", type=click.IntRange(1, INT32_MAX), default=GENERATE_BATCH_SIZE, show_default=True,
              help="Samples per call.")
@click.option("-o", "--output", required=True, metavar="RESULT.h5", help="The ragged HDF5 result to write.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True,
              help="Random seed: the categorical draw of (sample n, outer t, inner j) depends only on it and on "
                   "(n, t, j), whatever the batch size or shards.")
@click.option("--num-samples", type=click.IntRange(1), default=1, show_default=True, metavar="K",
              help="Draw K samples per input, in sample order n, then k (result sample n * K + k); streamed, one "
                   "--batch-size at a time. At most what a result holds: N x K x Ta + 1 row splits in int64.")
@click.option("--shard", metavar="I/K", callback=_shard_option,
              help="Run only the I-th of K contiguous slices of the samples, I counted from 0 (0 <= I < K, as "
                   "JOB_COMPLETION_INDEX); join the K results with cascade merge.")
@click.option("--keep-gate", is_flag=True, help="--stop-gate: keep B's stop-logit column in the written values.")
@click.option("--window", type=click.IntRange(1), metavar="W",
              help="Run each batch W outer steps at a time, the state carried: the same result, memory bounded by "
                   "the window instead of Ta (for long sequences). Model A runs in the windows too where it is in "
                   "state form or has one (a chain of recurrent and per-step layers), else whole once.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Write NaN and Inf values; by default a model that produces one stops the run (exit 1), naming "
                   "the model and the first (sample, outer, inner) that went non-finite.")
@click.pass_context
def generate(ctx, models, inputs_path, inputs_key, steps_file, steps_text, runner, batch_size, output, overwrite,
             seed, num_samples, shard, keep_gate, window, allow_nonfinite):
    """Run the cascade on inputs and write a ragged HDF5 result.

    \b
    Example:
      cascade generate --model-a A.keras --model-b B.keras --inputs X.h5 \\
          --steps-file steps.txt -o results.h5
      cascade generate --model-a A.keras --model-b B.keras --inputs X.h5 \\
          --max-steps 50 --stop-token 0 --exclude-stop-step -o results.h5
      cascade generate --model generator.keras --inputs X.h5 --steps 3,4,2 -o results.h5
      cascade generate --model-a A.keras --model-b B.keras --inputs X.h5 --feedback \\
          --sampler categorical --temperature 0.8 --max-steps 8 --stop-token 0 --seed 1 -o results.h5
      cascade generate --model-a A.keras --model-b B.keras --inputs X.h5 --feedback \\
          --sampler beam --beam-width 4 --max-steps 8 --stop-token 0 --num-samples 2 -o best2.h5
      cascade generate ... --shard 0/4 -o part0.h5   # then part1..part3, and cascade merge
      cascade generate ... --state carry --window 1000 -o long.h5   # a long Ta, 1,000 outer steps at a time
    """
    if steps_file is not None and steps_text is not None:
        raise click.UsageError("--steps and --steps-file both give the inner steps; use one of them.", ctx)
    if Path(output).suffix.lower() not in (".h5", ".hdf5"):
        raise click.BadParameter(
            f"generate writes a ragged HDF5 result, expected a .h5 name, received '{output}'; "
            "convert it afterwards with cascade export.", ctx, param_hint="'-o' / '--output'")
    check_output(output, overwrite=overwrite, inputs=(*models.paths, inputs_path, steps_file))
    console, _ = consoles()
    steps, where = _read_steps_option(steps_file=steps_file, steps_text=steps_text)
    models.warn_unsafe(console)
    load_tensorflow()
    from cascade_cli.generation import generate_files

    settings = {**runner, "seed": seed}
    with runner_usage(ctx, runner, "keep_gate", "steps", "window", steps="--steps-file or --steps",
                      window="--window"):
        done = generate_files(inputs_path, output, model_a=models.model_a, model_b=models.model_b,
                              model=models.packed, inputs_key=inputs_key, steps=steps, steps_source=where,
                              settings=settings, batch_size=batch_size, num_samples=num_samples, shard=shard,
                              keep_gate=keep_gate, allow_nonfinite=allow_nonfinite, overwrite=overwrite,
                              safe_mode=not models.unsafe, allow_legacy_h5=models.allow_legacy_h5,
                              progress=progress_bar(console, "generating"), window=window)
    print_generation(console, done.summary, stop_rule=done.settings["stop_rule"])
    if shard is not None:
        attrs = done.attrs
        say(console, f"Shard {shard[0]}/{shard[1]} of run {attrs['run_id']}: samples "
                     f"{attrs['sample_start']}:{attrs['sample_stop']} of {attrs['total_samples']:,}; "
                     f"join the {shard[1]} shards with cascade merge.")


def _read_steps_option(*, steps_file, steps_text):
    """Reads `--steps-file` or `--steps`: `(steps, where)`, or `(None, "none")` when neither is given."""
    from cascade_cli.steps import parse_steps, read_steps

    if steps_file is not None:
        return read_steps(steps_file), f"'{steps_file}'"
    if steps_text is not None:
        try:
            return parse_steps(steps_text, flag="--steps"), f"--steps {steps_text}"
        except CascadeError as error:  # a malformed flag value is a usage error, as --stop-token's is
            raise click.UsageError(one_line(error)) from None
    return None, "none"
