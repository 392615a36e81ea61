"""`cascade demo`: train, generate and export on sample_data/, and show what came out."""

import time

import click

from cascade_cli.cli import consoles, flag_text, load_tensorflow, print_generation, print_rows, progress_bar, say
from cascade_cli.options import DEMO_EPOCHS, INT32_MAX


def _vector_text(row):
    return ", ".join(f"{value:+.3f}" for value in row)


def _sequences_table(result, targets, *, pairs):
    from rich.table import Table

    table = Table(title="Generated beside the targets (held-out inputs)", title_justify="left")
    for name in ("sample", "outer", "inner", "generated", "target"):
        table.add_column(name, justify="right")
    for n, t in pairs:
        generated, wanted = result.sequence(n, t), targets.sequence(n, t)
        for j in range(len(generated)):
            table.add_row(str(n), str(t), str(j), _vector_text(generated[j]), _vector_text(wanted[j]))
        table.add_section()
    return table


def _patterns_table(tokens, *, samples):
    """The token demo's patterns of `samples`: rule, the true tokens and the sampled ones."""
    from rich.table import Table

    from cascade_cli.result import CascadeResult
    from cascade_cli.sample import TOKEN_RULES, follows_pattern

    truth = CascadeResult(tokens.targets[:, None].astype(float), tokens.steps)
    table = Table(title="Sampled by the feedback generator (--sampler categorical --stop-token 0), beside a target",
                  title_justify="left")
    for name in ("sample", "outer", "rule", "notes", "a target", "sampled", "keeps the rule"):
        table.add_column(name, justify="right")
    for n in samples:
        for t in range(tokens.steps.shape[1]):
            if tokens.steps[n, t] == 0:
                continue
            rule, length = TOKEN_RULES[tokens.rules[n, t]], int(tokens.steps[n, t]) - 1
            sampled = tokens.result.token_sequence(n, t)
            table.add_row(str(n), str(t), rule, str(length), " ".join(str(int(v)) for v in truth.sequence(n, t)[:, 0]),
                          " ".join(str(int(v)) for v in sampled), "yes" if follows_pattern(sampled, rule, length)
                          else "no")
    return table


@click.command(short_help="Train, generate and export on sample_data/ in under a minute.")
@click.option("--out-dir", default="cascade-demo", show_default=True, metavar="DIR",
              help="Where the trained models, the result and its exports go.")
@click.option("--epochs", type=click.IntRange(1, INT32_MAX), default=DEMO_EPOCHS, show_default=True,
              help="Training epochs.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier demo in --out-dir.")
def demo(out_dir, epochs, overwrite):
    """Train, generate and export on sample_data/ in under a minute.

    \b
    Example:
      cascade demo --out-dir my-demo --epochs 10
    """
    from cascade_cli.demo import demo_paths

    paths = demo_paths(out_dir, overwrite=overwrite)
    console, report = consoles()
    started = time.perf_counter()
    load_tensorflow()
    from cascade_cli.demo import run_demo
    from cascade_cli.progress import train_callbacks

    with train_callbacks(console, words=flag_text) as callbacks:
        done = run_demo(paths, epochs=epochs, overwrite=overwrite, callbacks=callbacks,
                        progress=progress_bar(console, "generating"), say=lambda text: say(console, text))
    print_generation(console, done.summary, stop_rule=None)
    shown = [(0, t) for t in range(done.result.outer_steps) if done.result.lengths[0, t]][:3]
    report.print(_sequences_table(done.result, done.targets, pairs=shown))
    say(report, f"Held-out mse {done.mse:.4g} (predicting the mean of the targets gives {done.baseline:.4g}).")
    tokens = done.tokens
    report.print(_patterns_table(tokens, samples=(0, 1)))
    say(report, f"{tokens.followed} of {tokens.patterns} sampled patterns keep to their rule and length and end with "
                 f"END, from {tokens.starts} different first notes (the start is not in the inputs: B keeps to the "
                 "rule from the note it drew because it sees what it emitted).")
    rows = [("trained model A", done.paths["model_a"]), ("trained model B", done.paths["model_b"]),
            ("training history", done.paths["history"]), ("ragged result", done.paths["result"]),
            ("padded export", done.paths["padded"]), ("csv export", done.paths["csv"]),
            ("token generator", done.paths["tokens_generator"]), ("sampled tokens", done.paths["tokens_result"])]
    print_rows(report, rows)
    say(report, f"Done in {time.perf_counter() - started:.1f} s. Next: cascade inspect {done.paths['result']}")
