"""The settings vocabulary: modes, losses, optimizers, strategies, `TrainConfig`, `RunInfo`, `StopRule`, `Sampler`.

One home for every name a setting can take and for the checks of those
settings, importable without TensorFlow (the command line builds its choices
from here). Errors are `ParameterError`s that name the Python parameter
(`batch_size: expected a positive integer, received 0`); `cli.py` shows the
flag instead.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from cascade_cli.errors import ParameterError

STATE_MODES = ("reset", "carry")
STATE_INITS = ("zeros", "ir")
LOSSES = ("mse", "mae", "categorical-crossentropy", "sparse-categorical-crossentropy")
CROSSENTROPY_LOSSES = ("categorical-crossentropy", "sparse-categorical-crossentropy")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
LR_SCHEDULES = ("constant", "cosine", "exponential")
EXPONENTIAL_FINAL_FRACTION = 0.1  # an exponential schedule falls to this fraction of the learning rate by the last step
METRICS = ("mse", "mae", "accuracy")  # what `--metrics` may record beside the loss, over the valid elements
STRATEGIES = ("default", "mirrored", "multi-worker")
STOP_RULES = ("norm", "token", "gate")
GATE_THRESHOLD = 0.5  # a stop gate's default: stop once sigmoid(logit) >= 0.5
FAST_CELLS = ("auto", True, False)
JIT_COMPILE = "auto"  # the runner's jit_compile default (one of FAST_CELLS' switches), Keras 3's
INT32_MAX = 2**31 - 1  # the largest count (steps, batch size, epochs) a setting may take
STEPS_MAX = INT32_MAX - 1  # the most inner steps of a pair, and of one call in all: the runner counts j + 1 in int32
SEED_MAX = 2**32 - 1  # Keras seeds take 32 bits
GENERATE_BATCH_SIZE = 256  # samples per runner call when generating into a file
DEMO_EPOCHS = 20  # `cascade demo` trains this long by default: about a minute on 2 cores


# ------------------------------------------------------------------ checks


def is_int(value):
    """Whether `value` is an integer (Python or numpy), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_choice(parameter, value, choices):
    """Returns `value` when it is one of `choices`, else raises `ParameterError`."""
    if not any(value is choice or (type(value) is type(choice) and value == choice) for choice in choices):
        shown = ", ".join(repr(choice) if not isinstance(choice, str) else choice for choice in choices)
        raise ParameterError(parameter, f"expected one of {shown}, received {value!r}.")
    return value


def check_int(parameter, value, *, minimum=0, maximum=None, allow_none=False):
    """Returns `int(value)` when it is an integer in `[minimum, maximum]`, else raises `ParameterError`."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        if maximum is not None:
            expected = f"an integer in [{minimum}, {maximum}]"
        else:
            expected = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ParameterError(parameter, f"expected {expected}, received {value!r}.")
    return int(value)


def check_number(parameter, value, *, minimum=None, maximum=None, min_open=False, max_open=False,
                 expected="a finite number"):
    """Returns `float(value)` when it is a finite real number in range, else raises `ParameterError`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"
    ok = ok and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if min_open else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if max_open else value <= maximum
    if not ok:
        raise ParameterError(parameter, f"expected {expected}, received {value!r}.")
    return float(value)


# -------------------------------------------------------------- stop rules


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When a generated inner sequence stops.

    A sequence stops after the first inner step whose output `y` meets the
    rule. The runner evaluates it (`cascade_cli.run.stopping.stop_hits`).

    Attributes:
        kind: `"norm"` (L2 norm of `y` >= `value`), `"token"` (`argmax(y)`
            is one of the ids) or `"gate"` (B's last output column is a stop
            logit: `sigmoid(y[-1]) >= value`; the other columns are the output).
        value: the threshold, the token id, or a tuple of several distinct
            token ids (also given as a list or as text `"0,5"`; one id is kept
            as an int, as before); for a gate the threshold, in (0, 1).
    """

    kind: str
    value: float

    @classmethod
    def norm(cls, threshold):
        """Stops once `||y||_2 >= threshold`."""
        return cls("norm", check_number("threshold", threshold))

    @classmethod
    def gate(cls, threshold=GATE_THRESHOLD):
        """Stops once `sigmoid(y[-1]) >= threshold`, `threshold` in (0, 1): B's last column is a learned stop logit."""
        return cls("gate", threshold)

    @classmethod
    def token(cls, *token_ids):
        """Stops once `argmax(y)` is one of `token_ids` (one or more distinct ids)."""
        if not token_ids:
            raise ParameterError("token_id", "expected at least one token id, received none.")
        return cls("token", token_ids[0] if len(token_ids) == 1 else tuple(token_ids))

    def __post_init__(self):
        check_choice("kind", self.kind, STOP_RULES)
        if self.kind == "token":
            object.__setattr__(self, "value", _token_value(self.value))
        elif self.kind == "gate":
            object.__setattr__(self, "value", check_number("gate_threshold", self.value, minimum=0, maximum=1,
                                                           min_open=True, max_open=True,
                                                           expected="a probability in (0, 1)"))
        else:
            check_number("threshold", self.value)

    @property
    def token_ids(self):
        """The stop token ids, a tuple (`"token"` rules; empty for others)."""
        if self.kind != "token":
            return ()
        return self.value if isinstance(self.value, tuple) else (self.value,)

    @property
    def stored_value(self):
        """The value as result files store it (`stop_value`): the number, or several ids as text `"0,5"`."""
        return ",".join(str(i) for i in self.value) if isinstance(self.value, tuple) else self.value

    def describe(self):
        """The rule as text, e.g. `"norm >= 1.2"`, `"token == 0"`, `"token in {0, 5}"` or `"gate >= 0.5"`."""
        if self.kind == "norm":
            return f"norm >= {self.value:g}"
        if self.kind == "gate":
            return f"gate >= {self.value:g}"
        if isinstance(self.value, tuple):
            return "token in {" + ", ".join(str(i) for i in self.value) + "}"
        return f"token == {int(self.value)}"


def _token_value(value):
    """A token rule's value: one id as an int, several as a tuple; repeated ids raise `ParameterError("token_id")`."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        if not all(part.lstrip("-").isdigit() for part in parts):
            raise ParameterError("token_id", f"expected token ids as integers separated by commas, such as 0,5; "
                                             f"received {value!r}.")
        value = [int(part) for part in parts]
    if isinstance(value, (list, tuple)):
        ids = tuple(check_int("token_id", i) for i in value)
        if not ids:
            raise ParameterError("token_id", "expected at least one token id, received none.")
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ParameterError("token_id", f"token {repeated[0]} is repeated: expected distinct ids, received "
                                             f"{','.join(str(i) for i in ids)}.")
        return ids[0] if len(ids) == 1 else ids
    return check_int("token_id", value)


# ------------------------------------------------- feedback and sampling


SAMPLERS = ("identity", "greedy", "categorical", "beam")
FEEDBACK_STARTS = ("zeros", "token:ID", "previous")
SAMPLING_SCHEDULES = ("constant", "inverse-sigmoid")


@dataclasses.dataclass(frozen=True)
class Sampler:
    """What a feedback-form B is fed back from its output `y` (and which token a row emits).

    The runner draws with it (`cascade_cli.run.sampling.sample`).

    Attributes:
        kind: one of `SAMPLERS`: `"identity"` feeds `y` itself (regression),
            `"greedy"` the one-hot of `argmax(y)`, `"categorical"` the one-hot
            of a seeded draw from `softmax(y / temperature)`, restricted to the
            `top_k` most likely tokens and/or the smallest set whose
            probability reaches `top_p` (the nucleus), renormalised; `"beam"`
            keeps the `width` best token sequences of each inner sequence
            (`cascade_cli.run.beam`) and feeds each its own token's one-hot.
        temperature: > 0 (`"categorical"` only).
        top_k: an integer >= 1, or None for every token (`"categorical"` only).
        top_p: in (0, 1], or None for 1 (`"categorical"` only).
        width: the hypotheses a beam keeps, an integer >= 1 (`"beam"` only).
        length_penalty: a finite number: ended hypotheses compare by their
            score divided by `length ** length_penalty` (`"beam"` only).
    """

    kind: str = "identity"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    width: int = 1
    length_penalty: float = 0.0

    @classmethod
    def identity(cls):
        """Feeds `y` itself."""
        return cls("identity")

    @classmethod
    def greedy(cls):
        """Feeds the one-hot of `argmax(y)`."""
        return cls("greedy")

    @classmethod
    def categorical(cls, temperature=1.0, top_k=None, top_p=None):
        """Feeds the one-hot of a draw from `softmax(y / temperature)`, cut to `top_k` and/or `top_p`."""
        return cls("categorical", temperature, top_k, top_p)

    @classmethod
    def beam(cls, width, length_penalty=0.0):
        """Beam search: keeps the `width` best token sequences of each inner sequence (`cascade_cli.run.beam`).

        A hypothesis scores the sum of `log_softmax(y_j)[token_j]` over its
        steps; ended ones compare by that score divided by `length **
        length_penalty`. Width 1 is greedy.
        """
        return cls("beam", width=width, length_penalty=length_penalty)

    @classmethod
    def coerce(cls, value):
        """A `Sampler` from a `Sampler` or one of `SAMPLERS` (its defaults), else `ParameterError("sampler")`."""
        if isinstance(value, Sampler):
            return value
        if isinstance(value, str) and value in SAMPLERS:
            return cls(value)
        raise ParameterError("sampler", f"expected a Sampler or one of {', '.join(SAMPLERS)}, received {value!r}.")

    def __post_init__(self):
        check_choice("sampler", self.kind, SAMPLERS)
        temperature = check_number("temperature", self.temperature, minimum=0, min_open=True,
                                   expected="a finite number > 0")
        object.__setattr__(self, "temperature", temperature)
        top_k = check_int("top_k", self.top_k, minimum=1, maximum=INT32_MAX, allow_none=True)
        object.__setattr__(self, "top_k", top_k)
        if self.top_p is not None:
            top_p = check_number("top_p", self.top_p, minimum=0, maximum=1, min_open=True,
                                 expected="a probability in (0, 1]")
            object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "width", check_int("width", self.width, minimum=1, maximum=INT32_MAX))
        object.__setattr__(self, "length_penalty", check_number("length_penalty", self.length_penalty))
        for kind, settings in (("categorical", (("temperature", 1.0), ("top_k", None), ("top_p", None))),
                               ("beam", (("width", 1), ("length_penalty", 0.0)))):
            if self.kind != kind:
                for name, default in settings:
                    value = getattr(self, name)
                    if value != default:
                        raise ParameterError(name, f"applies to sampler={kind!r} only; received {name}={value!r} "
                                                   f"with sampler={self.kind!r}.")

    @property
    def draws(self):
        """Whether the sampler is random (needs seeded draws)."""
        return self.kind == "categorical"

    @property
    def tokens(self):
        """Whether the sampler picks a token per row (greedy, categorical)."""
        return self.kind != "identity"

    def describe(self):
        """The sampler as text, e.g. `"categorical (temperature 0.8, top-k 5)"` or `"beam (width 4)"`."""
        if self.kind == "beam":
            penalty = f", length penalty {self.length_penalty:g}" if self.length_penalty else ""
            return f"beam (width {self.width}{penalty})"
        if self.kind != "categorical":
            return self.kind
        parts = [f"temperature {self.temperature:g}"]
        if self.top_k is not None:
            parts.append(f"top-k {self.top_k}")
        if self.top_p is not None:
            parts.append(f"top-p {self.top_p:g}")
        return f"categorical ({', '.join(parts)})"

    def as_attrs(self):
        """Plain values for a result's attributes.

        Returns `{"sampler": kind, "temperature": float, "top_k": int,
        "top_p": float}`, where `top_k` -1 means every token and `top_p` 1.0
        no nucleus cut (the values that cut nothing); a beam adds
        `beam_width` and `length_penalty`.
        """
        attrs = {"sampler": self.kind, "temperature": float(self.temperature),
                 "top_k": -1 if self.top_k is None else int(self.top_k),
                 "top_p": 1.0 if self.top_p is None else float(self.top_p)}
        if self.kind == "beam":
            attrs.update(beam_width=int(self.width), length_penalty=float(self.length_penalty))
        return attrs

    def config(self):
        """The settings a saved generator records (`CascadeModel.get_config`): `Sampler(**config)` rebuilds it.

        A beam's `width` and `length_penalty` appear only for a beam, so
        other samplers' configs read as they always have.
        """
        config = {"kind": self.kind, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        if self.kind == "beam":
            config.update(width=self.width, length_penalty=self.length_penalty)
        return config


def parse_feedback_start(text):
    """Reads a feedback start: `"zeros"`, `"previous"` or `"token:ID"`.

    Returns:
        `(kind, token)`: `("zeros", None)`, `("previous", None)` or
        `("token", ID)`. Whether ID is below B's output size O is the
        runner's check.

    Raises:
        ParameterError: `feedback_start`, naming what was expected.
    """
    if isinstance(text, str):
        if text in ("zeros", "previous"):
            return text, None
        kind, _, token = text.partition(":")
        if kind == "token" and token.strip().isdigit() and int(token) <= INT32_MAX:
            return "token", int(token)
    raise ParameterError("feedback_start", f"expected zeros, previous or token:ID with ID a non-negative integer, "
                                           f"received {text!r}.")


@dataclasses.dataclass(frozen=True)
class SamplingSchedule:
    """Scheduled sampling: the probability that a teacher-forced row feeds its own sample instead.

    Attributes:
        kind: one of `SAMPLING_SCHEDULES`.
        value: the constant probability in [0, 1], or the inverse sigmoid's
            `k` > 0: at global step `i` the probability is
            `1 - k / (k + exp(i / k))` (MusicVAE's schedule; it rises from
            `1 / (k + 1)` towards 1, the faster the smaller `k`).
    """

    kind: str
    value: float

    @classmethod
    def constant(cls, probability):
        """The same probability at every step."""
        return cls("constant", probability)

    @classmethod
    def inverse_sigmoid(cls, k):
        """MusicVAE's inverse sigmoid decay of teacher forcing, with rate `k`."""
        return cls("inverse-sigmoid", k)

    @classmethod
    def parse(cls, text):
        """Reads `"inverse-sigmoid:K"` or `"constant:P"`; else `ParameterError("sampling_schedule")`."""
        kind, _, value = str(text).partition(":")
        try:
            number = float(value)
        except ValueError:
            number = None
        if kind not in SAMPLING_SCHEDULES or number is None:
            raise ParameterError("sampling_schedule", f"expected inverse-sigmoid:K (K > 0) or constant:P "
                                                      f"(P in [0, 1]), received {text!r}.")
        return cls(kind, number)

    def __post_init__(self):
        check_choice("sampling_schedule", self.kind, SAMPLING_SCHEDULES)
        if self.kind == "constant":
            value = check_number("sampling_probability", self.value, minimum=0, maximum=1,
                                 expected="a probability in [0, 1]")
        else:
            value = check_number("sampling_schedule", self.value, minimum=0, min_open=True,
                                 expected="inverse-sigmoid:K with a finite K > 0")
        object.__setattr__(self, "value", value)

    def probability(self, step):
        """The sampling probability at global step `step` (0-based), a float in [0, 1]."""
        if self.kind == "constant":
            return self.value
        k = self.value
        exponent = step / k
        if exponent > 700:  # exp would overflow; the probability is 1 to double precision long before
            return 1.0
        return 1.0 - k / (k + math.exp(exponent))

    def describe(self):
        """The schedule as text, e.g. `"inverse-sigmoid:1000"`."""
        return f"{self.kind}:{self.value:g}"


# ---------------------------------------------------------- runner settings


@dataclasses.dataclass(frozen=True)
class RunnerSetting:
    """One setting of the runner (`Cascade`): its name, default, check and what a result records of it.

    Attributes:
        name: the `Cascade` parameter, e.g. `"max_steps"`.
        default: the value a run takes when the setting is not given.
        check: `check(value)` returns the value as the runner keeps it (e.g.
            a sampler's name as a `Sampler`), or raises `ParameterError(name)`.
        attrs: `attrs(value)` returns the result attributes that record it
            (`{}` for a setting a result does not record).
    """

    name: str
    default: object
    check: object
    attrs: object


def _check_max_steps(value):
    value = check_int("max_steps", value, minimum=1, allow_none=True)
    if value is not None and value > STEPS_MAX:
        raise ParameterError("max_steps", f"the runner counts inner steps in int32: expected at most {STEPS_MAX} "
                                          f"(2**31 - 2), received {value}.")
    return value


def _check_stop_rule(value):
    if value is not None and not isinstance(value, StopRule):
        raise ParameterError("stop_rule", f"expected a StopRule or None, received {value!r}.")
    return value


def _check_feedback_start(value):
    parse_feedback_start(value)
    return value


def _one_of(name, choices):
    return lambda value: check_choice(name, value, choices)


def _recorded(name, *, skip=None, kind=None):
    """`attrs` of a setting recorded under its own name (as `kind`), left out when it equals `skip`."""
    return lambda value: {} if skip is not None and value == skip else {name: value if kind is None else kind(value)}


def _stop_rule_attrs(rule):
    return {"stop_rule": "none"} if rule is None else {"stop_rule": rule.kind, "stop_value": rule.stored_value}


RUNNER_SETTINGS = (
    RunnerSetting("state", "reset", _one_of("state", STATE_MODES), _recorded("state")),
    RunnerSetting("state_init", "zeros", _one_of("state_init", STATE_INITS), _recorded("state_init")),
    RunnerSetting("max_steps", None, _check_max_steps,
                  lambda value: {} if value is None else {"max_steps": int(value)}),
    RunnerSetting("stop_rule", None, _check_stop_rule, _stop_rule_attrs),
    RunnerSetting("exclude_stop_step", False, _one_of("exclude_stop_step", (True, False)),
                  _recorded("exclude_stop_step")),
    RunnerSetting("min_steps", 0, lambda value: check_int("min_steps", value),
                  _recorded("min_steps", skip=0, kind=int)),
    RunnerSetting("fast_cells", "auto", _one_of("fast_cells", FAST_CELLS), lambda value: {}),
    RunnerSetting("jit_compile", JIT_COMPILE, _one_of("jit_compile", FAST_CELLS), _recorded("jit_compile", kind=str)),
    RunnerSetting("run_eagerly", False, _one_of("run_eagerly", (True, False)), lambda value: {}),
    RunnerSetting("feedback", False, _one_of("feedback", (True, False)), _recorded("feedback")),
    RunnerSetting("feedback_start", "zeros", _check_feedback_start, _recorded("feedback_start", kind=str)),
    RunnerSetting("sampler", "identity", lambda value: Sampler.coerce(value), lambda value: value.as_attrs()),
    RunnerSetting("seed", 0, lambda value: check_int("seed", value, maximum=SEED_MAX),
                  _recorded("seed", kind=int)),
)
"""The runner's settings, in `Cascade`'s order: the one list the runner's defaults and checks, the command line's
runner flags and a result's attributes read."""

RUNNER_DEFAULTS = {setting.name: setting.default for setting in RUNNER_SETTINGS}
"""Each runner setting's default, by name (`Cascade`'s keyword defaults)."""


def check_runner_settings(settings):
    """Checks runner settings one by one and together, as far as they go without the models.

    Args:
        settings: `{name: value}` for some of `RUNNER_SETTINGS`.

    Returns:
        The settings as the runner keeps them (`Setting.check`'s values).

    Raises:
        ParameterError: a value a setting cannot take, or settings that do not
            go together (`run_eagerly` with `jit_compile=True`, a stop rule
            without `max_steps`, `min_steps` without a stop rule or above
            `max_steps`).
    """
    checked = {setting.name: setting.check(settings[setting.name])
               for setting in RUNNER_SETTINGS if setting.name in settings}
    unknown = sorted(set(settings) - set(checked))
    if unknown:
        raise ParameterError(unknown[0], f"is not a runner setting: expected one of "
                                         f"{', '.join(RUNNER_DEFAULTS)}.")
    get = lambda name: checked.get(name, RUNNER_DEFAULTS[name])  # noqa: E731
    if get("jit_compile") is True and get("run_eagerly"):
        raise ParameterError("jit_compile", "True cannot apply with run_eagerly=True, which compiles nothing; "
                                            "pass jit_compile='auto' or False.")
    if get("stop_rule") is not None and get("max_steps") is None:
        raise ParameterError("stop_rule", "needs max_steps, the most inner steps a pair may run; received "
                                          "max_steps=None.")
    if get("min_steps") and get("stop_rule") is None:
        raise ParameterError("min_steps", f"holds a stop rule off for the first steps and needs one (stop_rule); "
                                          f"received min_steps={get('min_steps')} with stop_rule=None.")
    if get("min_steps") and get("min_steps") > get("max_steps"):
        raise ParameterError("min_steps", f"expected at most max_steps={get('max_steps')}, received "
                                          f"{get('min_steps')}.")
    return checked


def resolve_runner_settings(given, saved=None):
    """The settings of a run: each given one, else the saved one (a packed generator's), else the default.

    Unlike `Cascade`, which also builds the cascade that trains without a
    stop rule, a run that generates needs a stop rule for
    `exclude_stop_step`.

    Args:
        given: `{name: value}`, None for a setting not given.
        saved: the settings a generator was packed with, or None.

    Returns:
        Every runner setting, checked (`check_runner_settings`).

    Raises:
        ParameterError: as `check_runner_settings`, and `exclude_stop_step`
            without a stop rule.
    """
    saved = {name: value for name, value in (saved or {}).items() if value is not None}
    values = {}
    for name, default in RUNNER_DEFAULTS.items():
        value = given.get(name)
        values[name] = value if value is not None else saved.get(name, default)
    settings = check_runner_settings(values)
    if settings["exclude_stop_step"] and settings["stop_rule"] is None:
        raise ParameterError("exclude_stop_step", "leaves out the step that met the stop rule, so it needs a stop "
                                                  "rule; received stop_rule=None.")
    return settings


def runner_attrs(settings):
    """The result attributes that record runner `settings` (a full set, as `resolve_runner_settings` gives)."""
    attrs = {}
    for setting in RUNNER_SETTINGS:
        attrs.update(setting.attrs(settings[setting.name]))
    return attrs


# ---------------------------------------------------------------- training


TRAIN_DEFAULTS = {
    "epochs": 10,
    "batch_size": 32,
    "learning_rate": 1e-3,
    "optimizer": "adam",
    "loss": "mse",
    "from_logits": None,
    "val_split": 0.1,
    "shuffle": True,
    "freeze_a": False,
    "state": RUNNER_DEFAULTS["state"],
    "state_init": RUNNER_DEFAULTS["state_init"],
    "seed": 0,
    "patience": None,
    "strategy": "default",
    "clipnorm": None,
    "lr_schedule": "constant",
    "warmup_steps": 0,
    "metrics": (),
    "mixed_precision": False,
    "tensorboard": None,
    "feedback": RUNNER_DEFAULTS["feedback"],
    "feedback_start": RUNNER_DEFAULTS["feedback_start"],
    "sampling_schedule": None,
    "jit_compile": None,
    "append_end_token": None,
    "stop_gate": False,
    "stop_weight": 1.0,
    "stop_pos_weight": 1.0,
    "max_steps": None,
    "window": None,
}
"""What each `TrainConfig` setting left at None means in a new run (`from_logits` None: detect; `patience` None: off;
`clipnorm` None: no clipping; `tensorboard` None: no event files; `sampling_schedule` None: pure teacher forcing; `jit_compile` None: the runner's default, `JIT_COMPILE`; `append_end_token` None: the targets as the file holds them; `max_steps` None: the file's longest inner sequence + 1; `window` None: one step per batch over the whole sequence)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of one training run (each is also a `cascade train` flag).

    Every setting defaults to None, "not given": a new run takes the value of
    `TRAIN_DEFAULTS`, a resumed run (`resume=True`) the value its checkpoint
    was made with (`resolved` does both). A setting given on resume may change
    `epochs`, `learning_rate`, `patience` and `strategy`; the others
    (`RESUME_SETTINGS`) must equal the checkpoint's.

    Attributes:
        epochs: the epoch to train up to (a resumed run continues to it).
        batch_size: samples per step.
        learning_rate: the optimizer's step size.
        optimizer: one of `OPTIMIZERS`.
        loss: one of `LOSSES`. The cross-entropies read B's outputs as logits
            or probabilities (`from_logits`); `sparse-categorical-crossentropy`
            takes integer token ids as targets, one per inner step.
        from_logits: whether B's outputs are logits (cross-entropy losses
            only); None detects it: probabilities when B's output layer ends
            in a softmax, logits otherwise (`training.resolve_from_logits`).
        val_split: fraction of the samples held out for validation, in `[0, 1)`.
        shuffle: visit the training samples in a new seeded order every epoch.
        freeze_a: train B only; A's weights stay as they are.
        state: the runner's state mode, one of `STATE_MODES`.
        state_init: B's initial state, one of `STATE_INITS` (`"ir"` needs
            `state="reset"` and a state size equal to H).
        seed: seeds the split, the order and every random op (e.g. dropout).
        patience: stop after this many epochs without a better validation loss
            and keep the best weights; None (or 0) trains every epoch.
        resume: continue from the last checkpoint in `out_dir`.
        strategy: one of `STRATEGIES`: `"default"` (one device), `"mirrored"`
            (every local GPU, else every logical CPU device) or
            `"multi-worker"` (the cluster in `TF_CONFIG`; build it with
            `distribute.make_strategy` before any other TensorFlow work).
        clipnorm: clip each gradient to this L2 norm before the step (Keras'
            optimizer `clipnorm`, per weight); None: no clipping.
        lr_schedule: one of `LR_SCHEDULES`: `"constant"`, `"cosine"` (to 0
            by the last step) or `"exponential"` (to
            `EXPONENTIAL_FINAL_FRACTION` of the rate by the last step), over
            the run's `epochs` after the warmup.
        warmup_steps: optimizer steps of linear warmup, from
            `learning_rate / warmup_steps` up to `learning_rate`, before the schedule.
        metrics: names in `METRICS`, recorded beside the loss (training and
            validation) over the valid elements.
        mixed_precision: train copies of the models built under the
            `mixed_float16` policy (float16 compute, float32 weights, the loss
            in float32, dynamic loss scaling); the models written stay float32.
        tensorboard: a folder for TensorBoard event files (loss, val_loss,
            learning_rate and the metrics, once per epoch); None: none.
        feedback: B is in feedback form and trains with teacher forcing: at
            inner step j > 0 it is fed the target of step j - 1.
        feedback_start: what B is fed at each pair's first step (feedback
            only): `"zeros"`, `"token:ID"` or `"previous"` (see `FEEDBACK_STARTS`).
        sampling_schedule: scheduled sampling (feedback only), as
            `SamplingSchedule.parse` reads it: `"constant:P"` or
            `"inverse-sigmoid:K"`, the probability that a row is fed its own
            sample instead of the target at each optimizer step; None: none.
        jit_compile: run model A under XLA where it compiles and is exact in
            training: `"auto"`, True or False (the runner's `jit_compile`);
            None leaves the runner's default (`JIT_COMPILE`).
        append_end_token: a token id in `[0, O)`: every pair, 0-step pairs
            included, gets one more target row, the one-hot of the id (the id
            itself for token-id targets), and one more step
            (`TrainingData.with_end_token`); None: the targets as the file
            holds them.
        stop_gate: B's last output column is a stop logit (`StopRule.gate`):
            the loss adds `stop_weight` times the mean over valid steps of a
            binary cross-entropy on it, target 1 at each pair's last valid
            step and 0 before (`data.append_gate_targets`), the positives
            weighted by `stop_pos_weight`; the other `O - 1` columns take
            the usual loss against targets with `O - 1` columns.
        stop_weight: the gate loss's weight, >= 0 (`stop_gate` only).
        stop_pos_weight: the weight of the gate's positive (stop) steps, > 0
            (`stop_gate` only).
        max_steps: the most inner steps the run's `cascade.keras` (and
            `val_length_mae`) generates, with a stop implied
            (`append_end_token`, `stop_gate`); None: the training file's
            longest inner sequence + 1.
        window: truncated backpropagation through time: each batch trains
            this many outer steps at a time, one optimizer step per window,
            the state carried without gradient (`CascadeModel(...,
            window=W)`, `train.windows`); None: one step per batch.
        overwrite: replace an earlier run in `out_dir` (without `resume`).
    """

    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    optimizer: str | None = None
    loss: str | None = None
    from_logits: bool | None = None
    val_split: float | None = None
    shuffle: bool | None = None
    freeze_a: bool | None = None
    state: str | None = None
    state_init: str | None = None
    seed: int | None = None
    patience: int | None = None
    resume: bool = False
    strategy: str | None = None
    clipnorm: float | None = None
    lr_schedule: str | None = None
    warmup_steps: int | None = None
    metrics: tuple | None = None
    mixed_precision: bool | None = None
    tensorboard: str | None = None
    feedback: bool | None = None
    feedback_start: str | None = None
    sampling_schedule: str | None = None
    jit_compile: object = None
    append_end_token: int | None = None
    stop_gate: bool | None = None
    stop_weight: float | None = None
    stop_pos_weight: float | None = None
    max_steps: int | None = None
    window: int | None = None
    overwrite: bool = False

    # Settings a resumed run must share with the checkpoint it continues: they
    # fix the data split and order, the optimizer's slots and what each step
    # computes. `epochs`, `learning_rate`, `patience`, `strategy`, `clipnorm`, `warmup_steps`, `metrics` and
    # `tensorboard` may change on resume.
    RESUME_SETTINGS = ("seed", "val_split", "shuffle", "batch_size", "optimizer", "loss", "from_logits", "freeze_a",
                       "state", "state_init", "lr_schedule", "mixed_precision", "feedback", "feedback_start",
                       "sampling_schedule", "append_end_token", "stop_gate", "stop_weight", "stop_pos_weight",
                       "window")
    # What a checkpoint records, so that a resumed run continues with the run's own settings.
    SAVED_SETTINGS = RESUME_SETTINGS + ("epochs", "learning_rate", "patience", "clipnorm", "warmup_steps", "metrics",
                                        "tensorboard", "jit_compile", "max_steps")
    # Switches of one invocation, not settings of the run: never recorded, never taken from a checkpoint.
    SWITCHES = ("resume", "overwrite")

    def __post_init__(self):
        check_int("epochs", self.epochs, minimum=1, allow_none=True)
        check_int("batch_size", self.batch_size, minimum=1, allow_none=True)
        if self.learning_rate is not None:
            check_number("learning_rate", self.learning_rate, minimum=0, min_open=True,
                         expected="a finite number > 0")
        _check_optional_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_optional_choice("loss", self.loss, LOSSES)
        _check_optional_choice("from_logits", self.from_logits, (True, False))
        if self.val_split is not None:
            check_number("val_split", self.val_split, minimum=0, maximum=1, max_open=True,
                         expected="a fraction in [0, 1)")
        _check_optional_choice("shuffle", self.shuffle, (True, False))
        _check_optional_choice("freeze_a", self.freeze_a, (True, False))
        _check_optional_choice("state", self.state, STATE_MODES)
        _check_optional_choice("state_init", self.state_init, STATE_INITS)
        check_int("seed", self.seed, maximum=SEED_MAX, allow_none=True)
        _check_optional_choice("resume", self.resume, (True, False))
        _check_optional_choice("strategy", self.strategy, STRATEGIES)
        check_int("patience", self.patience, minimum=0, allow_none=True)
        if self.clipnorm is not None:
            check_number("clipnorm", self.clipnorm, minimum=0, min_open=True, expected="a finite number > 0")
        _check_optional_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_int("warmup_steps", self.warmup_steps, allow_none=True, maximum=INT32_MAX)
        if self.metrics is not None:
            object.__setattr__(self, "metrics", _check_metrics(self.metrics))
        _check_optional_choice("mixed_precision", self.mixed_precision, (True, False))
        if self.tensorboard is not None and (not isinstance(self.tensorboard, str) or not self.tensorboard):
            raise ParameterError("tensorboard", f"expected a folder name, received {self.tensorboard!r}.")
        _check_optional_choice("feedback", self.feedback, (True, False))
        if self.feedback_start is not None:
            parse_feedback_start(self.feedback_start)
        if self.sampling_schedule is not None:
            SamplingSchedule.parse(self.sampling_schedule)
        _check_optional_choice("jit_compile", self.jit_compile, FAST_CELLS)
        check_int("append_end_token", self.append_end_token, maximum=INT32_MAX, allow_none=True)
        _check_optional_choice("stop_gate", self.stop_gate, (True, False))
        if self.stop_weight is not None:
            check_number("stop_weight", self.stop_weight, minimum=0, expected="a finite number >= 0")
        if self.stop_pos_weight is not None:
            check_number("stop_pos_weight", self.stop_pos_weight, minimum=0, min_open=True,
                         expected="a finite number > 0")
        check_int("max_steps", self.max_steps, minimum=1, maximum=INT32_MAX, allow_none=True)
        check_int("window", self.window, minimum=1, maximum=INT32_MAX, allow_none=True)
        _check_optional_choice("overwrite", self.overwrite, (True, False))
        self._check_together()

    def _check_together(self):
        """Checks the settings that depend on each other, as far as they are given."""
        if self.patience and self.val_split == 0:
            raise ParameterError(
                "patience", "needs a validation set to watch: expected val_split > 0, received val_split=0."
            )
        if self.state_init == "ir" and self.state == "carry":
            raise ParameterError(
                "state_init", "'ir' sets every inner sequence's state from its own IR vector, which needs "
                "state='reset'; received state='carry'."
            )
        if self.feedback is False or (self.feedback is None and not self.resume):  # a resume may have it saved
            for name in ("sampling_schedule", "feedback_start"):
                value = getattr(self, name)
                if value is not None and (name != "feedback_start" or value != "zeros"):
                    raise ParameterError(name, f"applies to a feedback-form B only: give feedback=True; received "
                                               f"{name}={value!r} without it.")
        if self.stop_gate is False or (self.stop_gate is None and not self.resume):
            for name in ("stop_weight", "stop_pos_weight"):
                if getattr(self, name) not in (None, TRAIN_DEFAULTS[name]):  # a resolved config holds the default
                    raise ParameterError(name, f"weighs the stop gate's loss: give stop_gate=True; received "
                                               f"{name}={getattr(self, name)!r} without it.")
        if self.stop_gate:
            if self.feedback and self.sampling_schedule is not None:
                raise ParameterError("sampling_schedule", "a row fed its own sample would be fed its stop logit, "
                                                          "but a feedback B with a stop gate is fed its values and "
                                                          "a 0 gate: expected no sampling_schedule with "
                                                          "stop_gate=True.")
            if self.loss == "sparse-categorical-crossentropy":
                raise ParameterError("stop_gate", "needs targets with O - 1 columns beside the gate: expected a loss "
                                                  "other than 'sparse-categorical-crossentropy'.")
        if self.max_steps is not None and not self.resume and self.append_end_token is None and not self.stop_gate:
            raise ParameterError("max_steps", "bounds the generation of a run that implies a stop: give "
                                              f"append_end_token or stop_gate=True; received max_steps={self.max_steps} "
                                              "without them.")
        if self.overwrite and self.resume:
            raise ParameterError("overwrite", "replaces an earlier run, resume=True continues it: expected one of "
                                              "them, received both.")
        if self.metrics and self.loss == "sparse-categorical-crossentropy":
            regression = [name for name in self.metrics if name != "accuracy"]
            if regression:
                raise ParameterError(
                    "metrics", f"{regression[0]!r} compares values with targets, but "
                    "loss='sparse-categorical-crossentropy' has token ids as targets: expected metrics='accuracy'.")
        if self.from_logits is not None and self.loss is not None and self.loss not in CROSSENTROPY_LOSSES:
            raise ParameterError(
                "from_logits", f"applies to the cross-entropy losses only; received loss={self.loss!r}: leave "
                "from_logits=None."
            )

    @property
    def given(self):
        """The names of the settings given (not None), `resume` aside, in field order."""
        return tuple(field.name for field in dataclasses.fields(self)
                     if field.name not in self.SWITCHES and getattr(self, field.name) is not None)

    def resolved(self, saved=None):
        """Returns this config with every setting not given filled in.

        Args:
            saved: the settings a checkpoint recorded (a resumed run), as
                `{name: value}`; each setting not given takes its value there,
                else (a new run, or a checkpoint that predates the setting)
                the value of `TRAIN_DEFAULTS`.

        Returns:
            A `TrainConfig` whose settings are all set, except `from_logits`
            (None until B is known: `training.resolve_from_logits`) and
            `patience` (None: off).

        Raises:
            ParameterError: the filled-in settings do not go together (e.g.
                `patience` from a checkpoint with `val_split=0` given).
        """
        saved = saved or {}
        values = {}
        for name, default in TRAIN_DEFAULTS.items():
            value = getattr(self, name)
            if value is None:
                value = saved.get(name, default)
            values[name] = value
        if values["patience"] == 0:
            values["patience"] = None
        values["metrics"] = tuple(values["metrics"] or ())
        if values["loss"] not in CROSSENTROPY_LOSSES:
            values["from_logits"] = None
        return dataclasses.replace(self, **values)


def _check_metrics(metrics):
    """`metrics` (a sequence of names, or one string `"mae,mse"`) as a tuple of names in `METRICS`, each once."""
    if isinstance(metrics, str):
        metrics = [name.strip() for name in metrics.split(",") if name.strip()]
    if not isinstance(metrics, (list, tuple)):
        raise ParameterError("metrics", f"expected a list of names from {', '.join(METRICS)}, received {metrics!r}.")
    for name in metrics:
        check_choice("metrics", name, METRICS)
    return tuple(dict.fromkeys(metrics))


def _check_optional_choice(parameter, value, choices):
    if value is not None:
        check_choice(parameter, value, choices)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a starting training run tells its callbacks, for a header (`TrainCallbacks.run_started`).

    Attributes:
        train_samples: samples trained on each epoch.
        val_samples: samples held out for validation.
        device: where the run computes, e.g. `"CPU"` or `"GPU (NVIDIA H200)"`.
        replicas: the number of model replicas each batch is split over.
        strategy: the distribution strategy's name, one of `STRATEGIES`.
        epochs: the epoch the run trains up to.
        first_epoch: the first epoch this run trains (1-based; > 1 when resumed).
        learning_rate: the optimizer's step size.
        loss: the loss's name.
        from_logits: how a cross-entropy reads B's outputs (None for other losses).
        resumed: whether the run continues a checkpoint.
        warnings: sentences to show before training (e.g. a split that leaves
            no validation samples).
    """

    train_samples: int
    val_samples: int
    device: str
    replicas: int
    strategy: str
    epochs: int
    first_epoch: int
    learning_rate: float
    loss: str
    from_logits: bool | None = None
    resumed: bool = False
    warnings: tuple = ()


class TrainCallbacks:
    """Hooks `fit` calls as it goes; every hook does nothing here. Subclass to show progress."""

    def run_started(self, info):
        """Called once before the first epoch with a `RunInfo` (sample counts, device, replicas, settings)."""

    def resumed(self, *, epoch, history=()):
        """Called once when a run continues after `epoch` completed epochs, with their history rows."""

    def epoch_started(self, epoch, *, epochs, batches):
        """Called before epoch `epoch` (1-based) of `epochs`, which has `batches` batches."""

    def batch_done(self, loss):
        """Called after each batch with the epoch's running training loss (a float)."""

    def epoch_done(self, logs):
        """Called after each epoch with `{"epoch", "loss", "val_loss" (or None), "seconds"}`."""

    def stopped_early(self, *, epoch, best_epoch):
        """Called when `patience` stops the run after `epoch`; the weights of `best_epoch` are kept."""

    def run_finished(self, history):
        """Called once after the models are written, with `fit`'s history (earlier epochs of a resume included)."""
