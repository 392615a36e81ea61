"""The `cascade` command line: parse, build a config, call the library, render.

Commands: `generate`, `merge`, `export`, `train`, `inspect` and `demo` (DESIGN
section 5). Each is a thin skin over the Python API. This is the only place where
errors become exit codes: a `CascadeError` from the library becomes one
`Error: ...` line and exit code 1, a bad combination of flags is a click usage
error (exit code 2), and no traceback reaches a user for either.

TensorFlow is imported inside the commands that need it, quietly (its C++ start-up
chatter is dropped, `TF_CPP_MIN_LOG_LEVEL` defaults to 3), so `cascade --help`
and the inspection of a data file stay fast. Progress and summaries go to
stderr, so stdout stays clean for pipes; `inspect` and `demo` print their
report on stdout.
"""

import contextlib
import dataclasses
import functools
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402 (after the environment TensorFlow reads)

from cascade_cli import __version__  # noqa: E402
from cascade_cli.errors import CascadeError, ParameterError, one_line as _one_line  # noqa: E402
from cascade_cli.options import (  # noqa: E402
    DEMO_EPOCHS, GENERATE_BATCH_SIZE, INT32_MAX, JIT_COMPILE, LOSSES, LR_SCHEDULES, METRICS, OPTIMIZERS, SAMPLERS,
    SEED_MAX, STATE_INITS, STATE_MODES, STRATEGIES, TrainConfig,
)
from cascade_cli.results_io import SUFFIX_FORMATS as RESULT_SUFFIXES  # noqa: E402

HISTOGRAM_WIDTH = 40


# ----------------------------------------------------------------- the edge


# Each library parameter and the flag a user types for it. Library messages
# name parameters (`batch_size`, `overwrite=True`); `flag_text` shows flags.
FLAGS = {
    "batch_size": "--batch-size", "epochs": "--epochs", "learning_rate": "--learning-rate",
    "optimizer": "--optimizer", "loss": "--loss", "val_split": "--val-split", "freeze_a": "--freeze-a",
    "state": "--state", "state_init": "--state-init", "seed": "--seed", "patience": "--patience",
    "strategy": "--strategy", "resume": "--resume", "out_dir": "--out-dir", "overwrite": "--overwrite",
    "max_steps": "--max-steps", "exclude_stop_step": "--exclude-stop-step", "shard": "--shard",
    "threshold": "--stop-norm", "token_id": "--stop-token", "inputs_key": "--inputs-key",
    "pad_value": "--pad-value", "time_major": "--time-major", "layout": "--layout", "format": "--format",
    "allow_legacy_h5": "--allow-legacy-h5", "from_logits": "--from-logits",
    "clipnorm": "--clipnorm", "lr_schedule": "--lr-schedule", "warmup_steps": "--warmup-steps", "metrics": "--metrics",
    "mixed_precision": "--mixed-precision", "tensorboard": "--tensorboard",
    "feedback": "--feedback", "feedback_start": "--feedback-start", "sampler": "--sampler",
    "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "num_samples": "--num-samples",
    "width": "--beam-width", "length_penalty": "--length-penalty",
    "sampling_probability": "--sampling-probability", "sampling_schedule": "--sampling-schedule",
    "min_steps": "--min-steps", "append_end_token": "--append-end-token",
    "gate_threshold": "--gate-threshold", "keep_gate": "--keep-gate", "stop_gate": "--stop-gate",
    "stop_weight": "--stop-weight", "stop_pos_weight": "--stop-pos-weight", "allow_nonfinite": "--allow-nonfinite",
}
_BOOLEAN_FLAGS = {"shuffle": ("--shuffle", "--no-shuffle"), "freeze_a": ("--freeze-a", "--no-freeze-a"),
                  "from_logits": ("--from-logits", "--no-from-logits"), "safe_mode": ("no --unsafe", "--unsafe"),
                  "mixed_precision": ("--mixed-precision", "--no-mixed-precision"),
                  "jit_compile": ("jit_compile=True", "--no-xla")}  # --no-xla sets False; 'auto' and True have no flag
# `name=value` (the value quoted or up to a space, comma, semicolon, bracket or final stop), or quoted text.
_TOKENS = re.compile(r"(?P<name>\b[a-z][a-z0-9_]*)=(?P<value>'[^']*'|[^\s,;)']+?)(?=[\s,;)]|\.?$|\.\s)"
                     r"|(?P<quoted>'[^']*')")


def flag_text(message, *, parameter=None, flags=None):
    """Turns a library message's parameter names into the flags of the command line.

    `batch_size: expected ...` becomes `--batch-size: expected ...`,
    `overwrite=True` becomes `--overwrite`, `batch_size=16` `--batch-size 16`,
    `max_steps=None` (or `=False`) `no --max-steps`, and a bare `max_steps`
    `--max-steps`; quoted text (file names) is left alone. A Python value is
    never shown as a flag's value.

    Args:
        message: the library's message.
        parameter: the `ParameterError`'s parameter, when there is one.
        flags: this command's own names for some parameters, over `FLAGS`.
    """
    flags = {**FLAGS, **(flags or {})}
    message = _one_line(message)
    if parameter is not None and message.startswith(f"{parameter}:"):
        message = f"{flags.get(parameter, parameter)}:" + message[len(parameter) + 1:]

    def token(match):
        if match.group("quoted"):
            return match.group("quoted")
        name, value = match.group("name"), match.group("value").strip("'")
        if name in _BOOLEAN_FLAGS and value in ("True", "False"):
            return _BOOLEAN_FLAGS[name][value == "False"]
        if name not in flags:
            return match.group(0)
        if value in ("None", "False"):  # not given: the flag is absent
            return f"no {flags[name]}"
        return flags[name] if value == "True" else f"{flags[name]} {value}"

    def bare(text):
        for name, flag in flags.items():
            if "_" in name:
                text = re.sub(rf"(?<![\w-]){name}(?![\w=])", flag, text)
        return text

    pieces, done = [], 0
    for match in _TOKENS.finditer(message):
        pieces += [bare(message[done:match.start()]), token(match)]
        done = match.end()
    return "".join(pieces + [bare(message[done:])])

def _error_text(error, flags=None):
    """One line for a library error, in the command line's words."""
    return flag_text(str(error), parameter=getattr(error, "parameter", None), flags=flags)


def _os_error_message(error):
    """Describes an `OSError` the way the library describes its errors."""
    name = getattr(error, "filename", None)
    reason = error.strerror or str(error)
    if name:
        return f"'{name}': {reason}."
    return f"{reason}."


class CascadeGroup(click.Group):
    """A click group that turns every error into one `Error: ...` line and exit code 1.

    Library errors (`CascadeError`), files (`OSError`), memory and TensorFlow
    errors get a sentence each; anything else is a bug in cascade, shown as one
    line that asks for `--debug`, which shows the traceback instead.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, BrokenPipeError):
            raise
        except KeyboardInterrupt:  # Ctrl-C: what was being written has been removed on the way out
            click.echo("Interrupted.", err=True)
            raise click.exceptions.Exit(130) from None
        except Exception as error:
            if ctx.params.get("debug"):
                raise
            if _SIGNAL in ctx.meta:  # a library turned the signal's SystemExit into an error of its own
                raise click.exceptions.Exit(128 + ctx.meta[_SIGNAL]) from None
            raise click.ClickException(_describe_failure(error)) from None


def _describe_failure(error):
    """The one line a failure shows without `--debug`."""
    from cascade_cli.errors import ModelError

    if isinstance(error, ModelError) and str(error).startswith("could not load "):
        return _one_line(error)  # a file's own settings (config.json) keep their names, not the flags' words
    if isinstance(error, CascadeError):
        return _error_text(error)
    from cascade_cli.atomic import is_no_space

    if is_no_space(error):  # before memory: TensorFlow reports a full disk as ResourceExhaustedError
        name = getattr(error, "filename", None)
        return f"no space left on device writing '{name}'." if name else _one_line(
            f"no space left on device ({type(error).__name__}: {getattr(error, 'message', None) or error})")[:400]
    if isinstance(error, MemoryError):
        return "ran out of memory; try a smaller --batch-size."
    if isinstance(error, OSError):
        return _one_line(_os_error_message(error))
    name = type(error).__name__
    message = _one_line(getattr(error, "message", error))[:300]
    if name == "ResourceExhaustedError":  # TensorFlow out of memory
        return f"ran out of memory: {message}; try a smaller --batch-size."
    if type(error).__module__.startswith("tensorflow"):
        return f"TensorFlow failed while running the models ({name}): {message}"
    return f"internal error ({name}: {message}); run again with cascade --debug for the traceback and report it."


_SIGNAL = "cascade.signal"  # ctx.meta key: the signal that is ending the command


def _end_on_signals(ctx):
    """Makes SIGTERM and SIGHUP end the command as Ctrl-C does: files being written are removed, exit 128 + N.

    The handlers raise `SystemExit` in the main thread, so every `atomic_output`
    on the way out removes its temporary file; they are restored when the command ends.
    The signal is recorded too: code that catches the `SystemExit` and raises an
    error of its own instead (a library's cleanup) still ends the run with 128 + N.
    """

    def end(signum, frame):
        ctx.meta[_SIGNAL] = signum
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous = signal.signal(signum, end)
        except ValueError:  # not the main thread (an embedding program): its own handlers stay
            return
        ctx.call_on_close(functools.partial(signal.signal, signum, previous))


@contextlib.contextmanager
def _usage(ctx, **flags):
    """Turns a `ParameterError` raised in the block into a usage error (exit 2) naming the flag."""
    try:
        yield
    except ParameterError as error:
        raise click.UsageError(_error_text(error, flags), ctx) from None


@contextlib.contextmanager
def _quiet_fd(fd):
    """Sends what is written to file descriptor `fd` to the null device while the block runs."""
    saved = os.dup(fd)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(null)


def _load_tensorflow():
    """Imports TensorFlow and Keras once, without their start-up log lines.

    TensorFlow's C++ side logs (oneDNN, CUDA stubs) while it loads, before
    `TF_CPP_MIN_LOG_LEVEL` is honoured; those lines go to the null device.
    A failing import still raises its Python error, so real problems show.
    """
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    with _quiet_fd(2):
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)


def _say(console, text, **style):
    """Prints plain text (no markup, no wrapping) on a rich console."""
    console.print(text, markup=False, highlight=False, soft_wrap=True, **style)


def _consoles():
    from cascade_cli.progress import stderr_console, stdout_console

    return stderr_console(), stdout_console()


# ------------------------------------------------------------ shared options


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """The two model files and how to load them (`--model-a`, `--model-b`, `--unsafe`, `--allow-legacy-h5`)."""

    model_a: str | None
    model_b: str | None
    unsafe: bool = False
    allow_legacy_h5: bool = False
    packed: str | None = None  # a generator from `cascade pack`, instead of the two files

    @property
    def paths(self):
        """The model files read: the packed generator, or A and B."""
        return (self.packed,) if self.packed is not None else (self.model_a, self.model_b)

    def load_generator(self, console, *, feedback=False):
        """Loads `(model_a, model_b, settings)`: the two files (no settings), or a packed generator's."""
        if self.packed is None:
            return (*self.load(console, feedback=feedback), {})
        _warn_unsafe(console, [self.packed], unsafe=self.unsafe)
        _load_tensorflow()
        from cascade_cli.train.keras_model import load_generator

        generator = load_generator(self.packed, safe_mode=not self.unsafe)
        return generator.model_a, generator.model_b, generator.settings

    def load(self, console, *, feedback=False):
        """Loads `(model_a, model_b)` and checks that they fit (B in feedback form with `feedback`), naming the
        files; warns when safe mode is off."""
        _warn_unsafe(console, [self.model_a, self.model_b], unsafe=self.unsafe)
        _load_tensorflow()
        from cascade_cli.models import load_pair

        return load_pair(self.model_a, self.model_b, safe_mode=not self.unsafe, allow_legacy_h5=self.allow_legacy_h5,
                         feedback=feedback)


def _warn_unsafe(console, paths, *, unsafe):
    if unsafe:
        names = ", ".join(f"'{path}'" for path in paths)
        _say(
            console,
            f"WARNING: --unsafe turns Keras safe mode off: code stored in {names} (Lambda layers) "
            "will run on this machine. Use it only for files you trust.",
            style="bold red",
        )


def load_models(paths, roles, *, console, unsafe, allow_legacy_h5):
    """Loads model files with `models.load_model`, warning on `console` when `unsafe`."""
    _warn_unsafe(console, paths, unsafe=unsafe)
    _load_tensorflow()
    from cascade_cli.models import load_model

    return [
        load_model(path, role=role, safe_mode=not unsafe, allow_legacy_h5=allow_legacy_h5)
        for path, role in zip(paths, roles)
    ]


_LOAD_OPTIONS = (
    click.option("--unsafe", is_flag=True,
                 help="Load models with Keras safe mode off, running code stored in them (Lambda "
                      "layers). Only for files you trust."),
    click.option("--allow-legacy-h5", is_flag=True, help="Also load legacy Keras .h5 model files."),
)

_MODEL_A_HELP = "Model A, (batch, Ta, F) -> (batch, Ta, H): a local .keras file."
_MODEL_B_HELP = ("Model B, step form [x, *states] -> [y, *states] or causal sequence form (batch, T, H) -> "
                 "(batch, T, O): a local .keras file.")
_MODEL_OPTIONS = (
    click.option("--model-a", "model_a", required=True, metavar="A.keras", help=_MODEL_A_HELP),
    click.option("--model-b", "model_b", required=True, metavar="B.keras", help=_MODEL_B_HELP),
) + _LOAD_OPTIONS


def _apply(options, function):
    for option in reversed(options):
        function = option(function)
    return function


def load_options(command):
    """Adds `--unsafe` and `--allow-legacy-h5` to a command."""
    return _apply(_LOAD_OPTIONS, command)


def generator_options(command):
    """Like `model_options`, with `--model GENERATOR.keras` (from `cascade pack`) in place of the two files."""

    @functools.wraps(command)
    def wrapper(*args, model, model_a, model_b, unsafe, allow_legacy_h5, **kwargs):
        ctx = click.get_current_context()
        if model is not None and (model_a is not None or model_b is not None):
            raise click.UsageError("--model is a packed generator: give it, or --model-a and --model-b, not both.",
                                   ctx)
        if model is None and (model_a is None or model_b is None):
            raise click.UsageError("give --model-a A.keras and --model-b B.keras, or --model GENERATOR.keras.", ctx)
        files = ModelFiles(model_a, model_b, unsafe=unsafe, allow_legacy_h5=allow_legacy_h5, packed=model)
        return command(*args, models=files, **kwargs)

    options = (click.option("--model", metavar="GENERATOR.keras",
                            help="A generator packed by cascade pack (A, B and the runner settings; flags given "
                                 "here override its settings)."),
               click.option("--model-a", "model_a", metavar="A.keras", help=_MODEL_A_HELP),
               click.option("--model-b", "model_b", metavar="B.keras", help=_MODEL_B_HELP),
               ) + _LOAD_OPTIONS
    return _apply(options, wrapper)


def model_options(command):
    """Adds `--model-a`, `--model-b`, `--unsafe` and `--allow-legacy-h5`, passed on as `models: ModelFiles`."""

    @functools.wraps(command)
    def wrapper(*args, model_a, model_b, unsafe, allow_legacy_h5, **kwargs):
        files = ModelFiles(model_a, model_b, unsafe=unsafe, allow_legacy_h5=allow_legacy_h5)
        return command(*args, models=files, **kwargs)

    return _apply(_MODEL_OPTIONS, wrapper)


def _make_parents(path):
    """Creates the missing folders of an output (`atomic.make_parents`); they go again if the command fails."""
    from cascade_cli.atomic import make_parents, remove_made_folders

    made = make_parents(path)
    if made:  # emptied again by a failed write's cleanup; a written output keeps its folders
        click.get_current_context().call_on_close(functools.partial(remove_made_folders, made))


def _check_output(path, *, overwrite, inputs):
    """Checks `-o` before any work: its folders made, writable, not existing unless `--overwrite`, none of `inputs`."""
    from cascade_cli.atomic import check_output_path

    if os.fspath(path) != "-":
        _make_parents(path)
    return check_output_path(path, overwrite=overwrite, inputs=inputs)


# ------------------------------------------------------------------ the group


@click.group("cascade", cls=CascadeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cascade")
@click.option("--debug", is_flag=True, help="Show the full traceback of an unexpected error.")
def main(debug):
    """Chain two Keras recurrent models into a generator of ragged sequences.

    Model A reads (N, Ta, F) inputs and emits one IR vector per outer step;
    model B runs steps[n, t] inner steps from each and emits (N, Ta, None, O).

    \b
    Example:
      cascade demo
      cascade generate --model-a A.keras --model-b B.keras --inputs X.h5 --steps 3,4,2 -o out.h5
    """
    _end_on_signals(click.get_current_context())


# ------------------------------------------------------------------ generate


@dataclasses.dataclass(frozen=True)
class RunnerFlags:
    """The runner settings given on the command line; None (False for the switch) where not given."""

    state: str | None = None
    state_init: str | None = None
    max_steps: int | None = None
    stop_rule: tuple | None = None  # (kind, value): a threshold, or a tuple of token ids
    exclude_stop_step: bool = False
    min_steps: int | None = None
    feedback: bool = False
    feedback_start: str | None = None
    sampler: object = None  # an `options.Sampler`
    no_xla: bool = False

    def settings(self, saved=None):
        """The `Cascade` settings: each flag given, else the saved one (a packed generator's), else the default."""
        from cascade_cli.options import StopRule

        saved = dict(saved or {})
        rule = self.stop_rule
        stop_rule = saved.get("stop_rule") if rule is None else StopRule(*rule)
        jit_compile = JIT_COMPILE if saved.get("jit_compile") is None else saved["jit_compile"]
        return {"state": self.state or saved.get("state", "reset"),
                "state_init": self.state_init or saved.get("state_init", "zeros"),
                "max_steps": self.max_steps if self.max_steps is not None else saved.get("max_steps"),
                "stop_rule": stop_rule,
                "exclude_stop_step": self.exclude_stop_step or saved.get("exclude_stop_step", False),
                "min_steps": self.min_steps if self.min_steps is not None else saved.get("min_steps", 0),
                "feedback": self.feedback or saved.get("feedback", False),
                "feedback_start": self.feedback_start or saved.get("feedback_start", "zeros"),
                "sampler": self.sampler or saved.get("sampler", "identity"),
                "jit_compile": False if self.no_xla else jit_compile}


def _sampler_flag(ctx, *, sampler, temperature, top_k, top_p, beam_width=None, length_penalty=None):
    """The `Sampler` the flags give, or None when none of them is given; a bad value is a usage error."""
    given = (("--temperature", temperature, "categorical"), ("--top-k", top_k, "categorical"),
             ("--top-p", top_p, "categorical"), ("--beam-width", beam_width, "beam"),
             ("--length-penalty", length_penalty, "beam"))
    if sampler is None and all(value is None for _, value, _ in given):
        return None
    if sampler is None:  # the sampler may be a packed generator's: name the flag to add, not a sampler
        flag, value, kind = next(item for item in given if item[1] is not None)
        raise click.UsageError(f"{flag} applies to --sampler {kind} only: give --sampler {kind} "
                               f"{flag} {value}; received {flag} without --sampler.", ctx)
    if sampler == "beam" and beam_width is None:
        raise click.UsageError("--sampler beam needs --beam-width K, the hypotheses kept per inner sequence "
                               "(1 is greedy).", ctx)
    from cascade_cli.options import Sampler

    with _usage(ctx):
        beam = {} if beam_width is None and length_penalty is None else {
            "width": 1 if beam_width is None else beam_width,
            "length_penalty": 0.0 if length_penalty is None else length_penalty}
        return Sampler(sampler or "identity", 1.0 if temperature is None else temperature, top_k, top_p, **beam)


def _runner_flags(ctx, *, max_steps, stop_norm, stop_token, exclude_stop_step, state, state_init, feedback,
                  feedback_start, sampler, temperature, top_k, top_p, no_xla, min_steps=None, stop_gate=False,
                  gate_threshold=None, beam_width=None, length_penalty=None):
    if stop_norm is not None and stop_token is not None:
        raise click.UsageError("--stop-norm and --stop-token are two stop rules; use one of them.", ctx)
    if stop_gate and (stop_norm is not None or stop_token is not None):
        other = "--stop-norm" if stop_norm is not None else "--stop-token"
        raise click.UsageError(f"--stop-gate and {other} are two stop rules; use one of them.", ctx)
    if gate_threshold is not None and not stop_gate:
        raise click.UsageError("--gate-threshold applies to --stop-gate only; give --stop-gate too.", ctx)
    if stop_norm is not None and not math.isfinite(stop_norm):
        raise click.BadParameter(f"expected a finite threshold, received {stop_norm}.", ctx, param_hint="'--stop-norm'")
    rule = ("norm", float(stop_norm)) if stop_norm is not None else None
    rule = ("token", stop_token) if stop_token is not None else rule
    if stop_gate:
        from cascade_cli.options import GATE_THRESHOLD, StopRule

        with _usage(ctx):
            rule = ("gate", StopRule.gate(GATE_THRESHOLD if gate_threshold is None else gate_threshold).value)
    return RunnerFlags(state=state, state_init=state_init, max_steps=max_steps, stop_rule=rule,
                       exclude_stop_step=exclude_stop_step, min_steps=min_steps, feedback=feedback,
                       feedback_start=feedback_start,
                       sampler=_sampler_flag(ctx, sampler=sampler, temperature=temperature, top_k=top_k, top_p=top_p,
                                             beam_width=beam_width, length_penalty=length_penalty),
                       no_xla=no_xla)


class _IntList(click.ParamType):
    """`--samples 0,3`: one or more integers, each in [0, 2**31), as a tuple."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        each = click.IntRange(0, INT32_MAX)
        return tuple(each.convert(part.strip(), param, ctx) for part in str(value).split(","))


class _TokenIds(_IntList):
    """`--stop-token 0,5`: one or more distinct token ids, each in [0, 2**31), as a tuple."""

    name = "ID[,ID...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        ids = super().convert(value, param, ctx)
        from cascade_cli.options import StopRule

        try:
            return StopRule.token(*ids).token_ids  # the one check of repeated ids
        except ParameterError as error:
            self.fail(error.problem, param, ctx)


_RUNNER_OPTIONS = (
    click.option("--max-steps", type=click.IntRange(1, INT32_MAX), metavar="M",
                 help="The most inner steps a pair may run: the length a stop rule runs to (given steps above M "
                      "are an error)."),
    click.option("--stop-norm", type=float, metavar="T", help="Stop a pair after the first output with L2 norm >= T."),
    click.option("--stop-token", type=_TokenIds(), metavar="ID[,ID...]",
                 help="Stop a pair after the first output whose argmax is ID, or one of several distinct IDs given "
                      "as 0,5 (with --sampler greedy or categorical: the first sampled token among them)."),
    click.option("--stop-gate", is_flag=True,
                 help="B's last output column is a learned stop logit: stop a pair after the first step where "
                      "sigmoid(logit) >= --gate-threshold. Results leave the column out (generate --keep-gate)."),
    click.option("--gate-threshold", type=float, metavar="G", help="--stop-gate: the threshold, in (0, 1). [0.5]"),
    click.option("--exclude-stop-step", is_flag=True, help="Leave out the step that met the stop rule (end tokens)."),
    click.option("--min-steps", type=click.IntRange(0, INT32_MAX), metavar="M",
                 help="No stop rule stops a pair before it has run M inner steps, the stop step included "
                      "(M <= --max-steps)."),
    click.option("--state", type=click.Choice(STATE_MODES), show_default="reset",
                 help="reset: every (n, t) starts fresh; carry: B's state flows across outer steps."),
    click.option("--state-init", type=click.Choice(STATE_INITS), show_default="zeros",
                 help="B's initial state: zeros, or the IR vector itself (needs state size == H)."),
    click.option("--feedback", is_flag=True,
                 help="B is in feedback form, [x, y_prev, states...] -> [y, states...]: it is fed what it emitted "
                      "at the step before (the sampler's value of it)."),
    click.option("--feedback-start", metavar="zeros|token:ID|previous",
                 help="y_prev at each pair's first inner step: zeros (the default), the one-hot of token ID, or "
                      "the value fed back at the last step of the sample's previous outer step that ran."),
    click.option("--sampler", type=click.Choice(SAMPLERS),
                 help="What is fed back and which token each step emits: identity (y itself, the default), greedy "
                      "(one-hot of argmax y), categorical (one-hot of a seeded draw from softmax(y / T)), beam "
                      "(beam search: the best token sequence of --beam-width kept per inner sequence)."),
    click.option("--temperature", type=float, metavar="T", help="categorical: draw from softmax(y / T) (T > 0; 1)."),
    click.option("--top-k", type=int, metavar="K", help="categorical: draw among the K most likely tokens only."),
    click.option("--top-p", type=float, metavar="P",
                 help="categorical: draw from the smallest set of tokens whose probability reaches P (0 < P <= 1)."),
    click.option("--beam-width", type=int, metavar="K",
                 help="beam: the hypotheses kept per inner sequence (K >= 1; 1 is greedy); with --num-samples, "
                      "at most K."),
    click.option("--length-penalty", type=float, metavar="A",
                 help="beam: ended hypotheses compare by score / length ** A (0: the plain sum of log-probabilities)."),
    click.option("--no-xla", is_flag=True,
                 help="Run model A without XLA (by default it runs under XLA where it compiles and equals its plain "
                      "call, as Keras' jit_compile='auto')."),
)


def runner_options(command):
    """Adds the runner flags (`--max-steps`, the stop rules, `--state`, `--state-init`, the feedback and sampler
    flags, `--no-xla`), passed on as `runner: RunnerFlags`."""

    @functools.wraps(command)
    def wrapper(*args, max_steps, stop_norm, stop_token, stop_gate, gate_threshold, exclude_stop_step, min_steps, state,
                state_init, feedback, feedback_start, sampler, temperature, top_k, top_p, beam_width, length_penalty,
                no_xla, **kwargs):
        flags = _runner_flags(click.get_current_context(), max_steps=max_steps, stop_norm=stop_norm,
                              stop_token=stop_token, exclude_stop_step=exclude_stop_step, min_steps=min_steps,
                              stop_gate=stop_gate, gate_threshold=gate_threshold, state=state,
                              state_init=state_init, feedback=feedback, feedback_start=feedback_start,
                              sampler=sampler, temperature=temperature, top_k=top_k, top_p=top_p,
                              beam_width=beam_width, length_penalty=length_penalty, no_xla=no_xla)
        return command(*args, runner=flags, **kwargs)

    return _apply(_RUNNER_OPTIONS, wrapper)


def _make_cascade(ctx, model_a, model_b, settings, *, cls=None):
    """Builds the runner (or `cls`, e.g. `CascadeModel`) from `settings`; a bad setting is a usage error."""
    if settings["exclude_stop_step"] and settings["stop_rule"] is None:
        raise click.UsageError("--exclude-stop-step needs a stop rule: --stop-norm T or --stop-token ID.", ctx)
    if cls is None:
        from cascade_cli.runner import Cascade as cls
    rule = settings["stop_rule"]
    flag = {"token": "--stop-token", "gate": "--stop-gate", "norm": "--stop-norm"}.get(
        getattr(rule, "kind", None), "--stop-norm, --stop-token or --stop-gate")
    with _usage(ctx, stop_rule=flag):
        return cls(model_a, model_b, **settings)


def _read_steps_option(*, steps_file, steps_text):
    """Reads `--steps-file` or `--steps`: `(steps, where)`, or `(None, "none")` when neither is given."""
    from cascade_cli.steps import parse_steps, read_steps

    if steps_file is not None:
        return read_steps(steps_file), f"'{steps_file}'"
    if steps_text is not None:
        try:
            return parse_steps(steps_text, flag="--steps"), f"--steps {steps_text}"
        except CascadeError as error:  # a malformed flag value is a usage error, as --stop-token's is
            raise click.UsageError(_one_line(error)) from None
    return None, "none"


def _progress(console, description):
    """A progress bar over `generation.BatchRange`s, weighted by the samples each writes."""
    from cascade_cli.progress import track

    def wrap(batches):
        total = getattr(batches, "samples", None)  # a generation's `BatchRanges` knows it without a walk
        total = sum(batch.samples for batch in batches) if total is None else total
        return track(batches, total=total, description=description,
                     console=console, unit="samples", weight=lambda batch: batch.samples)

    return wrap


def _print_generation(console, summary, *, stop_rule):
    seconds = max(summary.seconds, 1e-9)
    _say(
        console,
        f"Wrote '{summary.output}': {summary.samples:,} samples, {summary.emitted:,} inner steps in "
        f"{summary.seconds:.2f} s ({summary.samples / seconds:,.1f} samples/s, "
        f"{summary.emitted / seconds:,.1f} inner steps/s).",
    )
    if stop_rule is not None:
        from cascade_cli.inspection import stop_rule_lines

        sentence, warning = stop_rule_lines((stop_rule.kind, stop_rule.value), pairs=summary.pairs,
                                            at_cap=summary.at_cap, at_first=summary.at_first)
        _say(console, sentence)
        if warning is not None:
            _say(console, f"Warning: {warning}", style="yellow")


def _shard_option(ctx, param, value):
    """Parses `--shard I/K` into `(index, count)`; a malformed value is a usage error."""
    if value is None:
        return None
    from cascade_cli.shards import parse_shard

    try:
        return parse_shard(value)
    except CascadeError as error:
        raise click.BadParameter(_one_line(error), ctx, param) from None


@main.command()
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
@click.option("--allow-nonfinite", is_flag=True,
              help="Write NaN and Inf values; by default a model that produces one stops the run (exit 1), naming "
                   "the model and the first (sample, outer, inner) that went non-finite.")
@click.pass_context
def generate(ctx, models, inputs_path, inputs_key, steps_file, steps_text, runner, batch_size, output, overwrite,
             seed, num_samples, shard, keep_gate, allow_nonfinite):
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
    """
    if steps_file is not None and steps_text is not None:
        raise click.UsageError("--steps and --steps-file both give the inner steps; use one of them.", ctx)
    if Path(output).suffix.lower() not in (".h5", ".hdf5"):
        raise click.BadParameter(
            f"generate writes a ragged HDF5 result, expected a .h5 name, received '{output}'; "
            "convert it afterwards with cascade export.", ctx, param_hint="'-o' / '--output'")
    _check_output(output, overwrite=overwrite, inputs=(*models.paths, inputs_path, steps_file))
    console, _ = _consoles()
    steps, where = _read_steps_option(steps_file=steps_file, steps_text=steps_text)
    from cascade_cli.data import open_inputs

    with open_inputs(inputs_path, key=inputs_key) as source:
        model_a, model_b, saved = models.load_generator(console, feedback=runner.feedback)
        settings = runner.settings(saved)
        if keep_gate and getattr(settings["stop_rule"], "kind", None) != "gate":
            raise click.UsageError("--keep-gate keeps the stop gate's column in the values: it needs --stop-gate "
                                   "(or a generator packed with it).", ctx)
        cascade = _make_cascade(ctx, model_a, model_b, {**settings, "seed": seed})
        if steps is None and settings["max_steps"] is None:
            raise click.UsageError(
                "no inner steps given: use --steps-file S or --steps 3,4,2, or --max-steps M "
                "(with a stop rule, --stop-norm T or --stop-token ID).", ctx)
        from cascade_cli.generation import generate_to_file, identify_run, resolve_steps

        steps = resolve_steps(steps, source, max_steps=settings["max_steps"], where=where)
        import keras

        keras.utils.set_random_seed(seed)
        rule = settings["stop_rule"]
        attrs = {
            **({"model": str(models.packed)} if models.packed else
               {"model_a": str(models.model_a), "model_b": str(models.model_b)}),
            "inputs": str(inputs_path), "inputs_key": str(inputs_key), "steps": where.strip("'"),
            "state": settings["state"], "state_init": settings["state_init"],
            "stop_rule": "none" if rule is None else rule.kind, "exclude_stop_step": settings["exclude_stop_step"],
            "feedback": cascade.feedback, "feedback_start": str(cascade.feedback_start), **cascade.sampler.as_attrs(),
            "jit_compile": str(settings["jit_compile"]), "num_samples": int(num_samples),
            "seed": int(seed), "cascade_version": __version__,
            **({} if rule is None else {"stop_value": rule.stored_value}),
            **({"min_steps": int(settings["min_steps"])} if settings["min_steps"] else {}),
            **({"keep_gate": bool(keep_gate)} if rule is not None and rule.kind == "gate" else {}),
            **({} if settings["max_steps"] is None else {"max_steps": int(settings["max_steps"])}),
        }
        attrs = identify_run(attrs, model_files=models.paths, source=source, steps=steps, batch_size=batch_size,
                             shard=shard, num_samples=num_samples)
        summary = generate_to_file(cascade, source, steps, output=output, batch_size=batch_size, attrs=attrs,
                                   shard=shard, num_samples=num_samples, overwrite=overwrite,
                                   progress=_progress(console, "generating"), keep_gate=keep_gate,
                                   allow_nonfinite=allow_nonfinite)
    _print_generation(console, summary, stop_rule=rule)
    if shard is not None:
        _say(console, f"Shard {shard[0]}/{shard[1]} of run {attrs['run_id']}: samples "
                      f"{attrs['sample_start']}:{attrs['sample_stop']} of {attrs['total_samples']:,}; "
                      f"join the {shard[1]} shards with cascade merge.")


@main.command()
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
    _check_output(output, overwrite=overwrite, inputs=parts)
    from cascade_cli.shards import merge_shards

    console, _ = _consoles()
    summary = merge_shards(parts, output, overwrite=overwrite)
    _say(console, f"Wrote '{summary.output}': {summary.shards} shards of run {summary.run_id}, "
                  f"{summary.samples:,} samples, {summary.emitted:,} inner steps.")


# ----------------------------------------------------------------- generators


@main.command(short_help="Pack A, B and the runner settings into one generator.")
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
    _check_output(output, overwrite=overwrite, inputs=models.paths)
    console, _ = _consoles()
    model_a, model_b = models.load(console, feedback=runner.feedback)
    from cascade_cli.atomic import atomic_output
    from cascade_cli.train.keras_model import CascadeModel

    settings = runner.settings()
    generator = _make_cascade(ctx, model_a, model_b, settings, cls=CascadeModel)
    with atomic_output(output, overwrite=overwrite, suffix=".keras", inputs=models.paths) as temp:
        generator.save(temp)
    from cascade_cli.inspection import nonfinite_weight_rows, settings_text

    _say(console, f"Wrote '{output}': model A '{models.model_a}', model B '{models.model_b}', "
                  f"{settings_text(generator.settings)}.")
    for role, path, model in (("model A", models.model_a, model_a), ("model B", models.model_b, model_b)):
        for _, text in nonfinite_weight_rows(model):
            _say(console, f"Warning: {role} '{path}' has {text}.", style="yellow")


@main.command("export-model", short_help="Export a packed generator as a TensorFlow SavedModel.")
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
    _make_parents(directory)
    console, _ = _consoles()
    files = ModelFiles(None, None, unsafe=unsafe, allow_legacy_h5=allow_legacy_h5, packed=generator)
    model_a, model_b, settings = files.load_generator(console)
    from cascade_cli.train.keras_model import CascadeModel, export_saved_model

    module = export_saved_model(CascadeModel(model_a, model_b, **settings), directory, overwrite=overwrite)
    inputs = "inputs" if settings.get("max_steps") is not None else "inputs, steps"
    outputs = ", ".join(module.serve.get_concrete_function().structured_outputs)  # traced by the export
    _say(console, f"Wrote the SavedModel '{directory}': serving_default maps {inputs} to {outputs}.")


# -------------------------------------------------------------------- export


@main.command()
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

    _check_output(output, overwrite=overwrite, inputs=(result,))
    console, _ = _consoles()
    with open_result(result) as data:  # streamed: one batch of samples in memory at a time
        attrs = run_attrs(data.attrs) if fmt != "csv" else None
        write_result(output, data, format=fmt, layout=layout, pad_value=0.0 if pad_value is None else pad_value,
                     time_major=time_major, overwrite=overwrite, attrs=attrs)
    shape = f"{layout} layout" if fmt != "csv" else "long form"
    _say(console, f"Wrote '{output}' ({fmt}, {shape}): {data.n_samples:,} samples, {data.outer_steps} outer "
                  f"steps, {data.total:,} inner steps of size {data.output_size}.")


# --------------------------------------------------------------------- train


def _print_training(console, out_dir):
    out_dir = Path(out_dir)
    for what, name in (("model A", "model_a.keras"), ("model B", "model_b.keras"), ("generator", "cascade.keras"),
                       ("history", "history.csv"), ("checkpoints", "checkpoints")):
        _say(console, f"{what:>11}: {out_dir / name}")


def _default(name):
    """The `[default: ...]` `--help` shows for a training flag left unset (None: not given)."""
    from cascade_cli.options import TRAIN_DEFAULTS

    value = TRAIN_DEFAULTS[name]
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return str(value)


@main.command()
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
@click.option("--overwrite", is_flag=True, help="Replace an earlier run in --out-dir (without --resume).")
@click.pass_context
def train(ctx, models, data_path, out_dir, epochs, batch_size, learning_rate, optimizer, loss, from_logits, val_split,
          shuffle, freeze_a, state, state_init, seed, resume, patience, strategy, clipnorm, lr_schedule, warmup_steps,
          metrics, mixed_precision, tensorboard, feedback, feedback_start, sampling_probability, sampling_schedule,
          no_xla, append_end_token, stop_gate, stop_weight, stop_pos_weight, max_steps, overwrite):
    """Train model A and model B jointly on an HDF5 training file.

    \b
    Example:
      cascade train --model-a A.keras --model-b B.keras --data train.h5 --out-dir run1 \\
          --epochs 20 --learning-rate 0.01
      cascade train ... --out-dir run1 --epochs 40 --resume   # the run's own settings, 20 more epochs
      cascade train ... --out-dir run2 --lr-schedule cosine --warmup-steps 100 --metrics mae --tensorboard logs/run2
      cascade train ... --out-dir run3 --feedback --loss categorical-crossentropy \\
          --sampling-schedule inverse-sigmoid:200
    """
    if sampling_probability is not None and sampling_schedule is not None:
        raise click.UsageError("--sampling-probability and --sampling-schedule both set scheduled sampling; use one "
                               "of them.", ctx)
    if sampling_probability is not None:
        sampling_schedule = f"constant:{sampling_probability!r}"
    names = {} if sampling_probability is None else {"sampling_schedule": "--sampling-probability"}
    with _usage(ctx, **names):
        config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer,
                             loss=loss, from_logits=from_logits, val_split=val_split, shuffle=shuffle,
                             freeze_a=freeze_a, state=state, state_init=state_init, seed=seed, patience=patience,
                             resume=resume, strategy=strategy, clipnorm=clipnorm, lr_schedule=lr_schedule,
                             warmup_steps=warmup_steps, metrics=metrics, mixed_precision=mixed_precision,
                             tensorboard=tensorboard, feedback=feedback, feedback_start=feedback_start,
                             sampling_schedule=sampling_schedule, jit_compile=False if no_xla else None,
                             append_end_token=append_end_token, stop_gate=stop_gate or None, stop_weight=stop_weight,
                             stop_pos_weight=stop_pos_weight, max_steps=max_steps, overwrite=overwrite)
    console, _ = _consoles()
    _load_tensorflow()
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
        _say(console, text[:1].upper() + text[1:])
        raise click.exceptions.Exit(130) from None
    finally:  # a save that never finished (a full disk, a signal) leaves no ckpt-N_temp behind
        from cascade_cli.atomic import remove_unfinished_folders
        from cascade_cli.train.checkpoints import CHECKPOINT_DIR, LOCK_FILE

        remove_unfinished_folders(Path(out_dir) / CHECKPOINT_DIR, suffix="_temp", lock=Path(out_dir) / LOCK_FILE)
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


# ------------------------------------------------------------------- inspect


def _print_rows(console, rows):
    """Prints `(name, value)` rows as aligned plain lines, never wrapped, so pipes and greps see whole values."""
    width = max((len(name) for name, _ in rows), default=0)
    for name, value in rows:
        _say(console, f"{name:<{width}}  {value}")


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
    from cascade_cli.inspection import describe_generator, describe_model, describe_pair

    paths = [path] + ([partner] if partner is not None else [])
    roles = ["model"] + (["partner"] if partner is not None else [])
    _load_tensorflow()
    from cascade_cli.train.keras_model import CascadeModel  # registers the class a packed generator names

    loaded = load_models(paths, roles, console=console, unsafe=unsafe, allow_legacy_h5=allow_legacy_h5)
    generators = [name for model, name in zip(loaded, paths) if isinstance(model, CascadeModel)]
    if generators and partner is not None:
        raise click.UsageError(f"'{generators[0]}' is a packed generator, which holds model A and model B: "
                               "inspect it without --partner.")
    if generators:
        _print_rows(report, describe_generator(loaded[0], path))
        return
    described = [describe_model(model, name) for model, name in zip(loaded, paths)]
    for rows, _, _ in described:
        _print_rows(report, rows)
    if partner is not None:
        _print_rows(report, describe_pair(loaded, paths, [specs for _, *specs in described]))


@main.command()
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

    console, report = _consoles()
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
    _print_rows(report, described.rows + compared)
    if described.lengths is not None:
        report.print(_histogram(described))


# ---------------------------------------------------------------------- demo


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


@main.command(short_help="Train, generate and export on sample_data/ in under a minute.")
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
    console, report = _consoles()
    started = time.perf_counter()
    _load_tensorflow()
    from cascade_cli.demo import run_demo
    from cascade_cli.progress import train_callbacks

    with train_callbacks(console, words=flag_text) as callbacks:
        done = run_demo(paths, epochs=epochs, overwrite=overwrite, callbacks=callbacks,
                        progress=_progress(console, "generating"), say=lambda text: _say(console, text))
    _print_generation(console, done.summary, stop_rule=None)
    shown = [(0, t) for t in range(done.result.outer_steps) if done.result.lengths[0, t]][:3]
    report.print(_sequences_table(done.result, done.targets, pairs=shown))
    _say(report, f"Held-out mse {done.mse:.4g} (predicting the mean of the targets gives {done.baseline:.4g}).")
    tokens = done.tokens
    report.print(_patterns_table(tokens, samples=(0, 1)))
    _say(report, f"{tokens.followed} of {tokens.patterns} sampled patterns keep to their rule and length and end with "
                 f"END, from {tokens.starts} different first notes (the start is not in the inputs: B keeps to the "
                 "rule from the note it drew because it sees what it emitted).")
    rows = [("trained model A", done.paths["model_a"]), ("trained model B", done.paths["model_b"]),
            ("training history", done.paths["history"]), ("ragged result", done.paths["result"]),
            ("padded export", done.paths["padded"]), ("csv export", done.paths["csv"]),
            ("token generator", done.paths["tokens_generator"]), ("sampled tokens", done.paths["tokens_result"])]
    _print_rows(report, rows)
    _say(report, f"Done in {time.perf_counter() - started:.1f} s. Next: cascade inspect {done.paths['result']}")


# ---------------------------------------------------------------------- plot


@main.command()
@click.argument("path", metavar="PATH")
@click.option("--against", metavar="TRAIN.h5",
              help="With a result: draw its length error per outer step against this training file's steps, as "
                   "inspect --against prints it.")
@click.option("--samples", type=_IntList(), metavar="0,3",
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
    _check_output(output, overwrite=overwrite, inputs=(path, against))
    console, _ = _consoles()
    try:
        if against is not None:
            picture = plotting.plot_against(path, against, output, overwrite=overwrite)
        elif kind == "result":
            picture = plotting.plot_result(path, output, samples=samples, overwrite=overwrite)
        else:
            picture = plotting.plot_history(path, output, overwrite=overwrite)
    except ParameterError as error:
        raise click.ClickException(_error_text(error, {"samples": "--samples"})) from None
    _say(console, f"Wrote '{picture.output}': " + "; ".join(picture.panels) + ".")


if __name__ == "__main__":  # python -m cascade_cli.cli
    main()
