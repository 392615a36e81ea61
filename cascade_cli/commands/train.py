"""`cascade train`: train model A and model B jointly on an HDF5 training file."""

from pathlib import Path

import click

from cascade_cli.cli import consoles, flag_text, load_tensorflow, model_options, say, usage_errors
from cascade_cli.errors import CascadeError
from cascade_cli.options import (INT32_MAX, LOSSES, LR_SCHEDULES, METRICS, OPTIMIZERS, SEED_MAX, STATE_INITS,
                                 STATE_MODES, STRATEGIES, TrainConfig)


def _print_training(console, out_dir):
    out_dir = Path(out_dir)
    for what, name in (("model A", "model_a.keras"), ("model B", "model_b.keras"), ("generator", "cascade.keras"),
                       ("history", "history.csv"), ("checkpoints", "checkpoints")):
        say(console, f"{what:>11}: {out_dir / name}")


def _default(name):
    """The `[default: ...]` `--help` shows for a training flag left unset (None: not given)."""
    from cascade_cli.options import TRAIN_DEFAULTS

    value = TRAIN_DEFAULTS[name]
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return str(value)


@click.command()
@model_options
@click.option("--data", "data_path", required=True, metavar="TRAIN.h5",
              help="HDF5 with inputs (N, Ta, F), steps (N, Ta) and targets, flat (sum(steps), O) or padded.")
@click.option("--out-dir", required=True, metavar="DIR",
              help="Where model_a.keras, model_b.keras, history.csv and checkpoints/ go.")
@click.option("--epochs", type=click.IntRange(1, INT32_MAX), show_default=_default("epochs"),
              help="Epochs to train up to.")
@click.option("--batch-size", type=click.IntRange(1, INT32_MAX), show_default=_default("batch_size"),
              help="Samples per step.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), show_default=_default("learning_rate"),
              metavar="LR", help="The optimizer's step size.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), show_default=_default("optimizer"))
@click.option("--loss", type=click.Choice(LOSSES), show_default=_default("loss"),
              help="Averaged over valid elements only. sparse-categorical-crossentropy takes integer token ids.")
@click.option("--from-logits/--no-from-logits", default=None,
              help="Whether B's outputs are logits (cross-entropy losses); by default detected: probabilities "
                   "when B ends in a softmax, logits otherwise.")
@click.option("--val-split", type=click.FloatRange(0, 1, max_open=True), show_default=_default("val_split"),
              metavar="F", help="Fraction of the samples held out for validation.")
@click.option("--shuffle/--no-shuffle", default=None, show_default="shuffle", help="A new seeded order every epoch.")
@click.option("--freeze-a/--no-freeze-a", default=None, help="Train model B only.")
@click.option("--state", type=click.Choice(STATE_MODES), show_default=_default("state"),
              help="reset: every (n, t) starts fresh; carry: B's state flows across outer steps.")
@click.option("--state-init", type=click.Choice(STATE_INITS), show_default=_default("state_init"),
              help="B's initial state: zeros, or the IR vector itself (needs --state reset and state size == H).")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), show_default=_default("seed"),
              help="Seeds the split, the order and every random op.")
@click.option("--resume", is_flag=True,
              help="Continue from the last checkpoint in --out-dir, with the run's own settings unless given.")
@click.option("--patience", type=click.IntRange(0, INT32_MAX), metavar="P",
              help="Stop after P epochs without a better val_loss and keep the best weights (0: off).")
@click.option("--strategy", type=click.Choice(STRATEGIES), show_default=_default("strategy"),
              help="tf.distribute strategy: mirrored uses every local GPU; multi-worker reads TF_CONFIG.")
@click.option("--clipnorm", type=click.FloatRange(min=0, min_open=True), metavar="C",
              help="Clip each gradient to L2 norm C before the step (Keras' clipnorm). [default: off]")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), show_default=_default("lr_schedule"),
              help="constant; cosine (to 0 by the last step); exponential (to a tenth by the last step).")
@click.option("--warmup-steps", type=click.IntRange(0, INT32_MAX), metavar="W", show_default=_default("warmup_steps"),
              help="Steps of linear warmup up to --learning-rate before the schedule.")
@click.option("--metrics", metavar="mae,mse,...", show_default=_default("metrics"),
              help=f"Recorded in history.csv beside the loss (and val_ each): any of {', '.join(METRICS)}.")
@click.option("--mixed-precision/--no-mixed-precision", default=None,
              help="Train under the mixed_float16 policy (float16 compute, float32 weights and loss). [default: off]")
@click.option("--tensorboard", metavar="DIR", help="Write TensorBoard event files (loss, val_loss, learning_rate, "
                                                   "metrics) per epoch into DIR.")
@click.option("--feedback/--no-feedback", default=None,
              help="B is in feedback form, [x, y_prev, states...] -> [y, states...]; train it with teacher forcing "
                   "(fed the target of the step before). [default: off]")
@click.option("--feedback-start", metavar="zeros|token:ID|previous",
              help="--feedback: what B is fed at each pair's first step: zeros, the one-hot of token ID, or the "
                   "last target of the sample's previous outer step that ran. [default: zeros]")
@click.option("--sampling-probability", type=float, metavar="P",
              help="--feedback: scheduled sampling at a constant rate: each row is fed its own sample instead of "
                   "the target with probability P.")
@click.option("--sampling-schedule", metavar="inverse-sigmoid:K",
              help="--feedback: scheduled sampling whose rate rises with the step i as 1 - K / (K + exp(i / K)) "
                   "(MusicVAE's), or constant:P.")
@click.option("--no-xla", is_flag=True, help="Run model A without XLA (by default it runs under XLA where it compiles "
                                             "and is exact in training).")
@click.option("--append-end-token", type=click.IntRange(0, INT32_MAX), metavar="ID",
              help="End every pair, 0-step pairs included, with one more target row, the one-hot of token ID (the "
                   "file need not hold end tokens); generate with --stop-token ID --exclude-stop-step.")
@click.option("--stop-gate", is_flag=True, default=None,
              help="B's last output column is a stop logit: train it with a binary cross-entropy, target 1 at each "
                   "pair's last valid step (the targets hold the other O - 1 columns).")
@click.option("--stop-weight", type=float, metavar="W", help="--stop-gate: the gate loss's weight (>= 0). [1]")
@click.option("--stop-pos-weight", type=float, metavar="W",
              help="--stop-gate: the weight of the gate's stop steps (> 0). [1]")
@click.option("--max-steps", type=click.IntRange(1, INT32_MAX), metavar="M",
              help="--append-end-token / --stop-gate: the most inner steps DIR/cascade.keras (and val_length_mae) "
                   "generates. [default: the file's longest inner sequence + 1]")
@click.option("--window", type=click.IntRange(1, INT32_MAX), metavar="W",
              help="Truncated backpropagation through time: train each batch W outer steps at a time, one optimizer "
                   "step per window, the state carried from the window before without a gradient (an A in state "
                   "form carries its own state; see README, Long sequences). [default: the whole sequence]")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run in --out-dir (without --resume).")
@click.pass_context
def train(ctx, models, data_path, out_dir, epochs, batch_size, learning_rate, optimizer, loss, from_logits, val_split,
          shuffle, freeze_a, state, state_init, seed, resume, patience, strategy, clipnorm, lr_schedule, warmup_steps,
          metrics, mixed_precision, tensorboard, feedback, feedback_start, sampling_probability, sampling_schedule,
          no_xla, append_end_token, stop_gate, stop_weight, stop_pos_weight, max_steps, window, overwrite):
    """Train model A and model B jointly on an HDF5 training file.

    \b
    Example:
      cascade train --model-a A.keras --model-b B.keras --data train.h5 --out-dir run1 \\
          --epochs 20 --learning-rate 0.01
      cascade train ... --out-dir run1 --epochs 40 --resume   # the run's own settings, 20 more epochs
      cascade train ... --out-dir run2 --lr-schedule cosine --warmup-steps 100 --metrics mae --tensorboard logs/run2
      cascade train ... --out-dir run3 --feedback --loss categorical-crossentropy \\
          --sampling-schedule inverse-sigmoid:200
      cascade train ... --out-dir run4 --state carry --window 100   # long sequences, 100 outer steps a step
    """
    if sampling_probability is not None and sampling_schedule is not None:
        raise click.UsageError("--sampling-probability and --sampling-schedule both set scheduled sampling; use one "
                               "of them.", ctx)
    if sampling_probability is not None:
        sampling_schedule = f"constant:{sampling_probability!r}"
    names = {} if sampling_probability is None else {"sampling_schedule": "--sampling-probability"}
    with usage_errors(ctx, **names):
        config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer,
                             loss=loss, from_logits=from_logits, val_split=val_split, shuffle=shuffle,
                             freeze_a=freeze_a, state=state, state_init=state_init, seed=seed, patience=patience,
                             resume=resume, strategy=strategy, clipnorm=clipnorm, lr_schedule=lr_schedule,
                             warmup_steps=warmup_steps, metrics=metrics, mixed_precision=mixed_precision,
                             tensorboard=tensorboard, feedback=feedback, feedback_start=feedback_start,
                             sampling_schedule=sampling_schedule, jit_compile=False if no_xla else None,
                             append_end_token=append_end_token, stop_gate=stop_gate or None, stop_weight=stop_weight,
                             stop_pos_weight=stop_pos_weight, max_steps=max_steps, window=window,
                             overwrite=overwrite)
    console, _ = consoles()
    load_tensorflow()
    from cascade_cli.train.checkpoints import check_out_dir
    from cascade_cli.data import TrainingData
    from cascade_cli.train.distribute import make_strategy
    from cascade_cli.progress import train_callbacks
    from cascade_cli.train.fit import TrainingInterrupted, fit
    from cascade_cli.atomic import check_not_holding_inputs

    check_not_holding_inputs(out_dir, (*models.paths, data_path), what="out_dir")  # whatever overwrite says
    check_out_dir(out_dir)
    distribution = make_strategy(strategy or _default("strategy"))  # before TensorFlow runs anything
    try:
        with TrainingData(data_path) as data:
            model_a, model_b = models.load(console, feedback=_trains_feedback(config, out_dir))
            with train_callbacks(console, words=flag_text) as callbacks:
                fit(model_a, model_b, data, out_dir=out_dir, config=config, callbacks=callbacks, strategy=distribution)
    except TrainingInterrupted as stopped:
        text = flag_text(stopped.message)
        say(console, text[:1].upper() + text[1:])
        raise click.exceptions.Exit(130) from None
    _print_training(console, out_dir)


def _trains_feedback(config, out_dir):
    """Whether the run trains a feedback-form B: `--feedback`, or on `--resume` what the run was started with."""
    if config.feedback is not None or not config.resume:
        return bool(config.feedback)
    from cascade_cli.train.checkpoints import saved_settings

    try:
        return bool(saved_settings(out_dir).get("feedback"))
    except CascadeError:
        return False  # training says what is wrong with the checkpoint
