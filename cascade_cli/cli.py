"""The `cascade` command line: the group, the shared options, the flags' words and the error edge.

Each command lives in its own module of `cascade_cli.commands` (DESIGN section
5): it parses, calls one library function and renders. This module holds what
they share: the group, which imports a command's module only when the command
runs or `--help` lists it; the model, runner and output options; the rewriting
of library parameter names into flags (`flag_text`); and the edge, the only
place where errors become exit codes: a `CascadeError` from the library
becomes one `Error: ...` line and exit code 1, a bad combination of flags is a
click usage error (exit code 2), and no traceback reaches a user for either.

TensorFlow is imported inside the commands that need it, quietly (its C++
start-up chatter is dropped, `TF_CPP_MIN_LOG_LEVEL` defaults to 3), so
`cascade --help` and the inspection of a data file stay fast: neither this
module nor a command's imports TensorFlow or h5py (a test checks). Progress
and summaries go to stderr, so stdout stays clean for pipes; `inspect` and
`demo` print their report on stdout.
"""

import collections.abc
import contextlib
import dataclasses
import functools
import importlib
import math
import os
import re
import signal
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402 (after the environment TensorFlow reads)

from cascade_cli import __version__  # noqa: E402
from cascade_cli.errors import CascadeError, ParameterError, one_line as _one_line  # noqa: E402
from cascade_cli.options import INT32_MAX, RUNNER_DEFAULTS, SAMPLERS, STATE_INITS, STATE_MODES  # noqa: E402

COMMANDS = {"generate": "generate", "merge": "merge", "pack": "pack", "export-model": "export_model",
            "export": "export", "train": "train", "inspect": "inspect", "demo": "demo", "plot": "plot"}
"""Each command's name and its module in `cascade_cli.commands`, whose command object has the module's name."""


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
    "window": "--window",
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

def error_text(error, flags=None):
    """One line for a library error, in the command line's words."""
    return flag_text(str(error), parameter=getattr(error, "parameter", None), flags=flags)


def _os_error_message(error):
    """Describes an `OSError` the way the library describes its errors."""
    name = getattr(error, "filename", None)
    reason = error.strerror or str(error)
    if name:
        return f"'{name}': {reason}."
    return f"{reason}."


class _Commands(collections.abc.Mapping):
    """The group's commands by name, each module imported the first time its command is looked up."""

    def __init__(self, modules):
        self._modules = dict(modules)
        self._loaded = {}

    def __getitem__(self, name):
        if name not in self._loaded:
            module = self._modules[name]  # KeyError: not a command
            self._loaded[name] = getattr(importlib.import_module(f"cascade_cli.commands.{module}"), module)
        return self._loaded[name]

    def __iter__(self):
        return iter(self._modules)

    def __len__(self):
        return len(self._modules)


class CascadeGroup(click.Group):
    """A click group of `COMMANDS`, which turns every error into one `Error: ...` line and exit code 1.

    Library errors (`CascadeError`), files (`OSError`), memory and TensorFlow
    errors get a sentence each; anything else is a bug in cascade, shown as one
    line that asks for `--debug`, which shows the traceback instead.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commands = _Commands(COMMANDS)

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
        return error_text(error)
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
def usage_errors(ctx, _only=None, **flags):
    """Turns a `ParameterError` raised in the block (naming one of `_only`, when given) into a usage error (exit 2)
    naming the flag."""
    try:
        yield
    except ParameterError as error:
        if _only is not None and error.parameter not in _only:
            raise
        raise click.UsageError(error_text(error, flags), ctx) from None


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


XLA_CACHE_ENV = "CASCADE_XLA_CACHE"
"""The environment variable that moves XLA's persistent compilation cache (a folder), or turns it off (`off`)."""


def xla_cache_folder(environ):
    """The folder of XLA's persistent compilation cache for the command line, or None when it is off.

    `$CASCADE_XLA_CACHE` when set (`off`, `0` or empty: none), else
    `$XDG_CACHE_HOME/cascade/xla`, else `~/.cache/cascade/xla`.
    """
    given = environ.get(XLA_CACHE_ENV)
    if given is not None:
        return None if given.strip().lower() in ("", "0", "off") else Path(given)
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cascade" / "xla"


def _use_xla_cache(environ):
    """Points XLA's persistent compilation cache at `xla_cache_folder`, before TensorFlow reads `TF_XLA_FLAGS`.

    A repeated run then loads model A's compiled executables (and the loop's)
    instead of compiling them again; the values are those of the same
    executable. A `TF_XLA_FLAGS` that already names a cache is left alone, and
    a folder that cannot be made means no cache, not a failure.
    """
    flags = environ.get("TF_XLA_FLAGS", "")
    folder = xla_cache_folder(environ)
    if folder is None or "tf_xla_persistent_cache_directory" in flags:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return
    environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={folder}".strip()


def load_tensorflow():
    """Imports TensorFlow and Keras once, without their start-up log lines.

    TensorFlow's C++ side logs (oneDNN, CUDA stubs) while it loads, before
    `TF_CPP_MIN_LOG_LEVEL` is honoured; those lines go to the null device.
    A failing import still raises its Python error, so real problems show.
    """
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _use_xla_cache(os.environ)
    sys.stderr.flush()
    with _quiet_fd(2):
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)


def say(console, text, **style):
    """Prints plain text (no markup, no wrapping) on a rich console."""
    console.print(text, markup=False, highlight=False, soft_wrap=True, **style)


def consoles():
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

    def warn_unsafe(self, console):
        """Warns on `console` when safe mode is off: the files may run code."""
        _warn_unsafe(console, self.paths, unsafe=self.unsafe)

    def load(self, console, *, feedback=False):
        """Loads `(model_a, model_b)` and checks that they fit (B in feedback form with `feedback`), naming the
        files; warns when safe mode is off."""
        _warn_unsafe(console, [self.model_a, self.model_b], unsafe=self.unsafe)
        load_tensorflow()
        from cascade_cli.model_files import load_pair

        return load_pair(self.model_a, self.model_b, safe_mode=not self.unsafe, allow_legacy_h5=self.allow_legacy_h5,
                         feedback=feedback)


def _warn_unsafe(console, paths, *, unsafe):
    if unsafe:
        names = ", ".join(f"'{path}'" for path in paths)
        say(
            console,
            f"WARNING: --unsafe turns Keras safe mode off: code stored in {names} (Lambda layers) "
            "will run on this machine. Use it only for files you trust.",
            style="bold red",
        )


def load_models(paths, roles, *, console, unsafe, allow_legacy_h5):
    """Loads model files with `model_files.load_model`, warning on `console` when `unsafe`."""
    _warn_unsafe(console, paths, unsafe=unsafe)
    load_tensorflow()
    from cascade_cli.model_files import load_model

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


def make_output_parents(path):
    """Creates the missing folders of an output (`atomic.make_parents`); they go again if the command fails."""
    from cascade_cli.atomic import make_parents, remove_made_folders

    made = make_parents(path)
    if made:  # emptied again by a failed write's cleanup; a written output keeps its folders
        click.get_current_context().call_on_close(functools.partial(remove_made_folders, made))


def check_output(path, *, overwrite, inputs):
    """Checks `-o` before any work: its folders made, writable, not existing unless `--overwrite`, none of `inputs`."""
    from cascade_cli.atomic import check_output_path

    if os.fspath(path) != "-":
        make_output_parents(path)
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


# ------------------------------------------------------------ runner flags


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

    with usage_errors(ctx):
        beam = {} if beam_width is None and length_penalty is None else {
            "width": 1 if beam_width is None else beam_width,
            "length_penalty": 0.0 if length_penalty is None else length_penalty}
        return Sampler(sampler or "identity", 1.0 if temperature is None else temperature, top_k, top_p, **beam)


def _runner_flags(ctx, *, max_steps, stop_norm, stop_token, exclude_stop_step, state, state_init, feedback,
                  feedback_start, sampler, temperature, top_k, top_p, no_xla, min_steps=None, stop_gate=False,
                  gate_threshold=None, beam_width=None, length_penalty=None):
    """The runner settings the flags give, `{name: value}` (`options.RUNNER_SETTINGS`), None where not given."""
    if stop_norm is not None and stop_token is not None:
        raise click.UsageError("--stop-norm and --stop-token are two stop rules; use one of them.", ctx)
    if stop_gate and (stop_norm is not None or stop_token is not None):
        other = "--stop-norm" if stop_norm is not None else "--stop-token"
        raise click.UsageError(f"--stop-gate and {other} are two stop rules; use one of them.", ctx)
    if gate_threshold is not None and not stop_gate:
        raise click.UsageError("--gate-threshold applies to --stop-gate only; give --stop-gate too.", ctx)
    if stop_norm is not None and not math.isfinite(stop_norm):
        raise click.BadParameter(f"expected a finite threshold, received {stop_norm}.", ctx, param_hint="'--stop-norm'")
    from cascade_cli.options import GATE_THRESHOLD, StopRule

    rule = StopRule.norm(stop_norm) if stop_norm is not None else None
    rule = StopRule.token(*stop_token) if stop_token is not None else rule
    if stop_gate:
        with usage_errors(ctx):
            rule = StopRule.gate(GATE_THRESHOLD if gate_threshold is None else gate_threshold)
    return {"state": state, "state_init": state_init, "max_steps": max_steps, "stop_rule": rule,
            "exclude_stop_step": exclude_stop_step or None, "min_steps": min_steps, "feedback": feedback or None,
            "feedback_start": feedback_start,
            "sampler": _sampler_flag(ctx, sampler=sampler, temperature=temperature, top_k=top_k, top_p=top_p,
                                     beam_width=beam_width, length_penalty=length_penalty),
            "jit_compile": False if no_xla else None}


class IntList(click.ParamType):
    """`--samples 0,3`: one or more integers, each in [0, 2**31), as a tuple."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        each = click.IntRange(0, INT32_MAX)
        return tuple(each.convert(part.strip(), param, ctx) for part in str(value).split(","))


class TokenIds(IntList):
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
    click.option("--stop-token", type=TokenIds(), metavar="ID[,ID...]",
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
    click.option("--state", type=click.Choice(STATE_MODES), show_default=RUNNER_DEFAULTS["state"],
                 help="reset: every (n, t) starts fresh; carry: B's state flows across outer steps."),
    click.option("--state-init", type=click.Choice(STATE_INITS), show_default=RUNNER_DEFAULTS["state_init"],
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
    flags, `--no-xla`), passed on as `runner`: the settings given, `{name: value}`, None where not given."""

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


def runner_usage(ctx, settings, *parameters, **flags):
    """Turns a `ParameterError` naming a runner setting (or one of `parameters`) into a usage error (exit 2).

    `settings` are the run's (or the flags'): a bad stop rule names the flag
    of its kind. Other errors go on to the edge (exit 1).
    """
    from cascade_cli.options import RUNNER_DEFAULTS

    rule = settings.get("stop_rule")
    flag = {"token": "--stop-token", "gate": "--stop-gate", "norm": "--stop-norm"}.get(
        getattr(rule, "kind", None), "--stop-norm, --stop-token or --stop-gate")
    return usage_errors(ctx, _only=(*RUNNER_DEFAULTS, *parameters), **{"stop_rule": flag, **flags})


def print_rows(console, rows):
    """Prints `(name, value)` rows as aligned plain lines, never wrapped, so pipes and greps see whole values."""
    width = max((len(name) for name, _ in rows), default=0)
    for name, value in rows:
        say(console, f"{name:<{width}}  {value}")


def progress_bar(console, description):
    """A progress bar over `generation.BatchRange`s, weighted by the samples each writes."""
    from cascade_cli.progress import track

    def wrap(batches):
        total = getattr(batches, "samples", None)  # a generation's `BatchRanges` knows it without a walk
        total = sum(batch.samples for batch in batches) if total is None else total
        return track(batches, total=total, description=description,
                     console=console, unit="samples", weight=lambda batch: batch.samples)

    return wrap


def print_generation(console, summary, *, stop_rule):
    seconds = max(summary.seconds, 1e-9)
    say(
        console,
        f"Wrote '{summary.output}': {summary.samples:,} samples, {summary.emitted:,} inner steps in "
        f"{summary.seconds:.2f} s ({summary.samples / seconds:,.1f} samples/s, "
        f"{summary.emitted / seconds:,.1f} inner steps/s).",
    )
    if stop_rule is not None:
        from cascade_cli.inspection import stop_rule_lines

        sentence, warning = stop_rule_lines((stop_rule.kind, stop_rule.value), pairs=summary.pairs,
                                            at_cap=summary.at_cap, at_first=summary.at_first)
        say(console, sentence)
        if warning is not None:
            say(console, f"Warning: {warning}", style="yellow")




if __name__ == "__main__":  # python -m cascade_cli.cli
    main()
