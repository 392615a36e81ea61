"""Times the packed runner against hand-written nested loops and the compute limit.

Run from the repository root:

    python -m benchmarks.bench                 # full run, medians of 5 (minutes)
    python -m benchmarks.bench --quick         # tiny shapes, 1 repeat (seconds)
    python -m benchmarks.bench --memory        # peak RSS of `cascade generate`, 20,000 vs 2,000 samples

Every method runs in this one process on the same models, inputs and steps;
repeats are interleaved across methods so that a noisy neighbour slows them all
alike. Results go to `OUT/results.json` (runs of other devices already there are
kept) and `OUT/RESULTS.md`, and a table is printed.
"""

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
METHODS = ("cascade", "cascade_xla", "nested", "limit", "limit_xla", "model_a", "model_a_xla")
STATEFUL_METHODS = ("cascade", "cascade_xla", "nested")
# The two variants of the runner the targets judge, each with the A alone it is measured beyond.
VARIANTS = ("cascade", "cascade_xla")
A_OF_VARIANT = {"cascade": "model_a", "cascade_xla": "model_a_xla"}
STATES = ("reset", "carry")
DIRECTIONS = ("forward", "forward+backward")
NO_STATE = "-"
NOTES_MARKER = "<!-- notes: everything below this line is kept when the file is rewritten -->"


@dataclasses.dataclass(frozen=True)
class Case:
    """One set of shapes and steps to time every method on.

    Attributes:
        name: label in tables and results, e.g. `"N=64 Ta=50 H=64"`.
        batch: `N`, samples per call.
        outer: `Ta`, outer steps.
        hidden: `H`, A's output size; B's state size too.
        zero_fraction: when set, exactly this fraction of the pairs get 0 steps
            and the others are uniform in `1..max_steps` (one pair is forced to
            `max_steps`); when `None`, steps are uniform in `0..max_steps`.
    """

    name: str
    batch: int
    outer: int
    hidden: int
    zero_fraction: float | None = None


@dataclasses.dataclass(frozen=True)
class BasePlan:
    """What every benchmark plan fixes beside its cases (`Plan` here, `benchmarks.peers.PeerPlan`).

    Attributes:
        features: `F`, A's input size.
        outputs: `O`, B's output size.
        max_steps: the longest inner sequence (steps are at most this).
        repeats: timed runs per method, after `warmups` untimed ones.
        warmups: untimed runs first (traces and XLA compiles).
        quick: tiny shapes, only to keep the script working.
    """

    features: int
    outputs: int
    max_steps: int
    repeats: int
    warmups: int
    quick: bool


@dataclasses.dataclass(frozen=True)
class Plan(BasePlan):
    """Everything a benchmark run does: its cases, beside the `BasePlan` settings.

    Attributes:
        speed_cases: the `(N, Ta, H)` cases, smallest batch first (N=1, 8, 64, 256).
        zero_cases: one shape with 0%, 50% and 90% of pairs at 0 steps.
    """

    speed_cases: tuple
    zero_cases: tuple


def plan(*, quick=False, repeats=None):
    """Returns the plan of issue 7 (or its tiny `quick` version)."""
    if quick:
        shapes, zero_shape, features, outputs, max_steps = ((1, 10, 8), (2, 8, 8), (4, 6, 8), (8, 6, 8)), (4, 6, 8), 4, 4, 3
    else:
        shapes, zero_shape, features, outputs, max_steps = ((1, 200, 64), (8, 100, 64), (64, 50, 64), (256, 50, 256)), (64, 50, 64), 16, 16, 8
    speed_cases = tuple(Case(f"N={n} Ta={ta} H={h}", n, ta, h) for n, ta, h in shapes)
    n, ta, h = zero_shape
    zero_cases = tuple(Case(f"N={n} Ta={ta} H={h} zeros={round(f * 100)}%", n, ta, h, f) for f in (0.0, 0.5, 0.9))
    return Plan(
        speed_cases=speed_cases,
        zero_cases=zero_cases,
        features=features,
        outputs=outputs,
        max_steps=max_steps,
        repeats=repeats if repeats is not None else (1 if quick else 5),
        warmups=1,
        quick=quick,
    )


def planned_timings(run_plan):
    """Yields the `(case name, direction, state, method)` of every timing a plan makes."""
    for case in run_plan.speed_cases + run_plan.zero_cases:
        for direction in DIRECTIONS:
            for method in METHODS:
                for state in STATES if method in STATEFUL_METHODS else (NO_STATE,):
                    yield case.name, direction, state, method


def make_steps(rng, batch, outer, *, max_steps, zero_fraction=None):
    """Draws an int32 steps array `(batch, outer)`.

    Args:
        rng: a `numpy.random.Generator`.
        batch: `N`.
        outer: `Ta`.
        max_steps: the longest inner sequence.
        zero_fraction: when `None`, steps are uniform in `0..max_steps`. Else
            exactly `round(zero_fraction * batch * outer)` pairs are 0 and the
            others uniform in `1..max_steps`, with one of them set to
            `max_steps` so that every fraction has the same longest sequence.

    Returns:
        int32 array `(batch, outer)`.
    """
    if zero_fraction is None:
        return rng.integers(0, max_steps + 1, size=(batch, outer), dtype=np.int32)
    size = batch * outer
    steps = rng.integers(1, max_steps + 1, size=size, dtype=np.int32)
    order = rng.permutation(size)
    zeros = round(zero_fraction * size)
    steps[order[:zeros]] = 0
    if zeros < size:
        steps[order[zeros]] = max_steps
    return steps.reshape(batch, outer)


def build_models(*, features, hidden, outputs, seed=0):
    """Builds model A (GRU) and a step-form model B (GRUCell then Dense).

    Returns:
        `(model_a, model_b)`: A maps `(N, Ta, F)` to `(N, Ta, H)`; B maps
        `[x (batch, H), s (batch, H)]` to `[y (batch, O), s' (batch, H)]`.
    """
    import keras

    keras.utils.set_random_seed(seed)
    sequence = keras.Input(shape=(None, features))
    model_a = keras.Model(sequence, keras.layers.GRU(hidden, return_sequences=True)(sequence), name="model_a")
    x, state = keras.Input(shape=(hidden,)), keras.Input(shape=(hidden,))
    h, new_states = keras.layers.GRUCell(hidden)(x, [state])
    y = keras.layers.Dense(outputs)(h)
    model_b = keras.Model([x, state], [y, *new_states], name="model_b")
    return model_a, model_b


def xla_model(model):
    """Returns `model` run under XLA as the runner's `jit_compile=True` runs A.

    The same compiled call `Cascade(..., jit_compile=True)` uses for A (forward
    under XLA, gradient recomputed under XLA), so `model_a_xla` and `limit_xla`
    measure exactly what `cascade_xla` does with A. Inference only: the
    returned `call(inputs, training=False)` refuses `training=True`.
    """
    from cascade_cli.run.xla import xla_inference

    compiled = xla_inference(model)

    def call(inputs, training=False):
        if training is not False:
            raise ValueError(f"{model.name} under XLA runs in inference only. Received: training={training!r}")
        return compiled(inputs)

    return call


def _shared_xla_a(shared, model_a):
    """The XLA-compiled A the functions in `shared` use, compiled once."""
    if "model_a_xla" not in shared:
        shared["model_a_xla"] = xla_model(model_a)
    return shared["model_a_xla"]


def make_function(method, model_a, model_b, *, state, direction, shared=None):
    """Returns the `tf.function(inputs, steps)` to time for one method.

    Every function is traced once, for inputs `(None, None, F)` float32 and
    steps `(None, None)` int32, so the cases share one graph per method (the
    XLA parts compile once per input shape, during the warm-up).

    Every method runs both models with `training=False` in both directions:
    the comparison is like for like, and XLA (inference only) is really used.

    `forward` returns the method's outputs; `forward+backward` returns the
    gradient of the sum of its outputs with respect to every trainable weight
    of A and B (A's only, for `model_a` and `model_a_xla`).

    `shared`, a dict kept across calls for the same models, lets functions
    reuse one runner per method and state and one XLA-compiled A: each XLA
    instance compiles again for every input shape, which is slow to warm up.
    """
    import tensorflow as tf

    from benchmarks.nested import limit, nested_loops

    shared = {} if shared is None else shared
    if method in ("cascade", "cascade_xla"):
        from cascade_cli.run.cascade import Cascade

        key = (method, state)
        if key not in shared:
            # The two variants issue 7 judges, named explicitly: "auto" (the default since issue 16) picks
            # XLA for these models, which is cascade_xla.
            shared[key] = Cascade(model_a, model_b, state=state, jit_compile=method == "cascade_xla")
        cascade = shared[key]

        def run(inputs, steps, training):
            return cascade(inputs, steps, training=training)

        def flat(result):
            return result.flat_values

    elif method == "nested":

        def run(inputs, steps, training):
            return nested_loops(model_a, model_b, inputs, steps, state=state, training=training)

        def flat(result):
            return result[0]

    elif method == "limit":

        def run(inputs, steps, training):
            return limit(model_a, model_b, inputs, steps, training=training)

        def flat(result):
            return result

    elif method == "limit_xla":
        model_a_xla = _shared_xla_a(shared, model_a)

        def run(inputs, steps, training):
            return limit(model_a_xla, model_b, inputs, steps, training=training)

        def flat(result):
            return result

    elif method == "model_a":

        def run(inputs, steps, training):
            return model_a(inputs, training=training)

        def flat(result):
            return result

    elif method == "model_a_xla":
        model_a_xla = _shared_xla_a(shared, model_a)

        def run(inputs, steps, training):
            return model_a_xla(inputs, training=training)

        def flat(result):
            return result

    else:
        raise ValueError(f"method must be one of {METHODS}. Received: method={method!r}")

    # One trace per function serves every case: all methods see the same dynamic shapes.
    signature = [
        tf.TensorSpec((None, None, model_a.inputs[0].shape[-1]), tf.float32),
        tf.TensorSpec((None, None), tf.int32),
    ]
    if direction == "forward":
        return tf.function(
            lambda inputs, steps: run(inputs, steps, False), input_signature=signature, reduce_retracing=True
        )
    weights = model_a.trainable_variables + ([] if method.startswith("model_a") else model_b.trainable_variables)

    def forward_backward(inputs, steps):
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(flat(run(inputs, steps, False)))
        return tape.gradient(total, weights)

    return tf.function(forward_backward, input_signature=signature, reduce_retracing=True)


def _finish(result):
    """Waits until `result` is computed (a GPU runs asynchronously)."""
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        tf.test.experimental.sync_devices()
    return result


def time_group(functions, inputs, steps, *, repeats, warmups):
    """Times functions on the same inputs, interleaving their repeats in a rotating order.

    Args:
        functions: dict `key -> callable(inputs, steps)`.
        inputs: float tensor `(N, Ta, F)`.
        steps: int tensor `(N, Ta)`.
        repeats: timed calls of each function.
        warmups: untimed calls of each function first.

    Returns:
        dict `key -> {"times_s": [...]}` or `key -> {"error": "..."}` for a
        function that raised (the others still run).
    """
    results = {}
    live = {}
    for key, function in functions.items():
        try:
            for _ in range(warmups):
                _finish(function(inputs, steps))
        except Exception as error:  # a failing method must not sink a long run
            results[key] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        else:
            results[key] = {"times_s": []}
            live[key] = function
    order = list(live.items())
    for repeat in range(repeats):  # each repeat starts one method later: none always runs after the same one
        shift = repeat % len(order) if order else 0
        for key, function in order[shift:] + order[:shift]:
            start = time.perf_counter()
            _finish(function(inputs, steps))
            results[key]["times_s"].append(time.perf_counter() - start)
    for result in results.values():
        if "times_s" in result:
            result["median_s"] = statistics.median(result["times_s"])
    return results


def ab_parser(prog, description, *, batches_help):
    """An argument parser with the A/B scripts' shared options, as `rounds_ms` times: `--repeats`, `--rounds`,
    `--batches` and `--quick` (`ab_counts` reads them)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per round (default 7)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --repeats calls (default 3)")
    parser.add_argument("--batches", default=None, help=batches_help)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round of one call")
    return parser


def ab_counts(args):
    """`(batches, repeats, rounds)` from `ab_parser`'s options: the set of `N` to run (None: every case), and one
    round of one call with `--quick`."""
    batches = None if args.batches is None else {int(n) for n in args.batches.split(",")}
    return (batches, 1, 1) if args.quick else (batches, args.repeats, args.rounds)


def rounds_ms(calls, *, repeats, rounds):
    """`{key: ms}`: the median over `rounds` rounds of each call's median of `repeats` calls (`time_group`, each
    round interleaved): the A/B scripts' figure, steadier on a shared machine than one long round."""
    medians = {key: [] for key in calls}
    for _ in range(rounds):
        timed = time_group(calls, None, None, repeats=repeats, warmups=1)
        for key in calls:
            medians[key].append(timed[key]["median_s"] * 1e3)
    return {key: float(statistics.median(values)) for key, values in medians.items()}


def load_average():
    """The 1, 5 and 15 minute load averages (`/proc/loadavg`) as one string, printed beside an A/B's figures."""
    try:
        with open("/proc/loadavg") as file:
            return " ".join(file.read().split()[:3])
    except OSError:
        return "?"


def describe_machine():
    """Returns the machine and library versions as a dict."""
    import keras
    import tensorflow as tf

    def read(path):
        try:
            return Path(path).read_text()
        except OSError:
            return ""

    memory = next((line.split()[1] for line in read("/proc/meminfo").splitlines() if line.startswith("MemTotal:")), None)
    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in read("/proc/cpuinfo").splitlines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append(details.get("device_name", gpu.name))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(int(memory) / 2**20, 1) if memory else None,
        "gpus": gpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def device_label(machine):
    """Returns `"cpu"` or `"gpu: NAME"`: the key a run is stored under."""
    return f"gpu: {machine['gpus'][0]}" if machine["gpus"] else "cpu"


def run_benchmark(run_plan, *, log=print):
    """Times every case of a plan.

    Returns:
        A list of timing dicts: `name`, `batch`, `outer`, `hidden`,
        `zero_fraction`, `useful_rows` (sum of steps), `direction`, `state`,
        `method`, and `times_s` + `median_s` or `error`.
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    models = {}
    functions = {}
    shared = {}  # per H: the runners and XLA-compiled A the functions share
    timings = []
    for case in run_plan.speed_cases + run_plan.zero_cases:
        if case.hidden not in models:
            models[case.hidden] = build_models(features=run_plan.features, hidden=case.hidden, outputs=run_plan.outputs)
        model_a, model_b = models[case.hidden]
        inputs = tf.constant(rng.normal(size=(case.batch, case.outer, run_plan.features)).astype(np.float32))
        steps_array = make_steps(
            rng, case.batch, case.outer, max_steps=run_plan.max_steps, zero_fraction=case.zero_fraction
        )
        steps = tf.constant(steps_array)
        for direction in DIRECTIONS:
            group = {}
            for name, group_direction, state, method in planned_timings(run_plan):
                if name != case.name or group_direction != direction:
                    continue
                key = (case.hidden, direction, state, method)
                if key not in functions:
                    try:
                        functions[key] = make_function(
                            method,
                            model_a,
                            model_b,
                            state=state if state != NO_STATE else "reset",
                            direction=direction,
                            shared=shared.setdefault(case.hidden, {}),
                        )
                    except Exception as error:  # e.g. the runner is missing: time the others
                        functions[key] = _raiser(error)
                group[(state, method)] = functions[key]
            log(f"{case.name}  {direction}: {', '.join(f'{m}/{s}' for s, m in group)}")
            measured = time_group(group, inputs, steps, repeats=run_plan.repeats, warmups=run_plan.warmups)
            for (state, method), result in measured.items():
                timings.append(
                    {
                        "name": case.name,
                        "batch": case.batch,
                        "outer": case.outer,
                        "hidden": case.hidden,
                        "zero_fraction": case.zero_fraction,
                        "useful_rows": int(steps_array.sum()),
                        "direction": direction,
                        "state": state,
                        "method": method,
                        **result,
                    }
                )
    return timings


def _raiser(error):
    """Returns a function that raises `error`: a method that could not be built."""

    def raise_error(inputs, steps):
        raise error

    return raise_error


def _median(timings, name, direction, state, method):
    for timing in timings:
        if (timing["name"], timing["direction"], timing["state"], timing["method"]) == (name, direction, state, method):
            return timing.get("median_s")
    return None


def _target(name, method, case, direction, state, measured, threshold, comparison, detail):
    """Builds one target record; `measured` is `None` when a timing is missing."""
    if measured is None:
        passed = None
    else:
        passed = measured >= threshold if comparison == ">=" else measured <= threshold
    return {
        "name": name,
        "method": method,
        "case": case,
        "direction": direction,
        "state": state,
        "measured": measured,
        "threshold": threshold,
        "comparison": comparison,
        "passed": passed,
        "detail": detail,
    }


def _ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def evaluate_targets(run_plan, timings):
    """Returns the targets of issue 7, each measured and marked passed or not.

    Every target is judged for each variant of the runner, `cascade` (the
    default) and `cascade_xla` (`jit_compile=True`), one record each, named in
    its `method`:

    - forward, reset: nested / variant >= 10 at N=1, 5 at N=8, 3 at N=64;
    - forward+backward at N=64: nested / variant >= 4 (judged for both states);
    - reset: variant / limit <= 1.2 at every case and direction, `limit` being
      the issue's (A's plain call + one B call); for `cascade_xla` also
      cascade_xla / limit_xla (A under XLA + the same B call), the runner's own
      overhead when A gets XLA too, as "close to the XLA limit";
    - skipping is free: (variant - its A) at 90% zeros / (variant - its A) at
      0% zeros <= 0.2, for each state and direction; "its A" is `model_a` for
      `cascade` and `model_a_xla` for `cascade_xla`.
    """
    targets = []
    for case, threshold in zip(run_plan.speed_cases[:3], (10.0, 5.0, 3.0)):
        for method in VARIANTS:
            speedup = _ratio(
                _median(timings, case.name, "forward", "reset", "nested"),
                _median(timings, case.name, "forward", "reset", method),
            )
            targets.append(
                _target(
                    "faster than nested loops", method, case.name, "forward", "reset", speedup, threshold, ">=", f"nested / {method}"
                )
            )
    case = run_plan.speed_cases[2]
    for state in STATES:
        for method in VARIANTS:
            speedup = _ratio(
                _median(timings, case.name, "forward+backward", state, "nested"),
                _median(timings, case.name, "forward+backward", state, method),
            )
            targets.append(
                _target(
                    "faster than nested loops", method, case.name, "forward+backward", state, speedup, 4.0, ">=", f"nested / {method}"
                )
            )
    for case in run_plan.speed_cases + run_plan.zero_cases:
        for direction in DIRECTIONS:
            limit = _median(timings, case.name, direction, NO_STATE, "limit")
            for method in VARIANTS:
                ratio = _ratio(_median(timings, case.name, direction, "reset", method), limit)
                targets.append(
                    _target("close to the limit", method, case.name, direction, "reset", ratio, 1.2, "<=", f"{method} / limit")
                )
            ratio = _ratio(
                _median(timings, case.name, direction, "reset", "cascade_xla"),
                _median(timings, case.name, direction, NO_STATE, "limit_xla"),
            )
            targets.append(
                _target(
                    "close to the XLA limit", "cascade_xla", case.name, direction, "reset", ratio, 1.2, "<=", "cascade_xla / limit_xla"
                )
            )
    none_zero, _, most_zero = run_plan.zero_cases
    for direction in DIRECTIONS:
        for state in STATES:
            for method in VARIANTS:

                def beyond_a(case):
                    variant = _median(timings, case.name, direction, state, method)
                    model_a = _median(timings, case.name, direction, NO_STATE, A_OF_VARIANT[method])
                    return None if variant is None or model_a is None else variant - model_a

                ratio = _ratio(beyond_a(most_zero), beyond_a(none_zero))
                targets.append(
                    _target(
                        "skipping is free",
                        method,
                        f"N={most_zero.batch} Ta={most_zero.outer} H={most_zero.hidden} zeros=90% vs 0%",
                        direction,
                        state,
                        ratio,
                        0.2,
                        "<=",
                        f"({method} - {A_OF_VARIANT[method]}) at 90% zeros / ({method} - {A_OF_VARIANT[method]}) at 0% zeros",
                    )
                )
    return targets


def _format_seconds(value):
    return "-" if value is None else f"{value * 1000:.1f}"


def _format_ratio(value):
    return "-" if value is None else f"{value:.2f}"


def _verdict(target):
    return {True: "PASS", False: "MISS", None: "n/a"}[target["passed"]]


def timing_rows(run_plan, timings):
    """Returns the rows of the main table: one per case, direction and state."""
    rows = []
    for case in run_plan.speed_cases + run_plan.zero_cases:
        for direction in DIRECTIONS:
            shared = {
                method: _median(timings, case.name, direction, NO_STATE, method)
                for method in ("limit", "limit_xla", "model_a", "model_a_xla")
            }
            for state in STATES:
                cascade, cascade_xla, nested = (
                    _median(timings, case.name, direction, state, method) for method in STATEFUL_METHODS
                )
                rows.append(
                    [
                        case.name,
                        direction,
                        state,
                        *(_format_seconds(value) for value in (cascade, cascade_xla, nested)),
                        *(_format_seconds(shared[method]) for method in ("limit", "limit_xla", "model_a", "model_a_xla")),
                        _format_ratio(_ratio(nested, cascade)),
                        _format_ratio(_ratio(nested, cascade_xla)),
                        _format_ratio(_ratio(cascade, shared["limit"])),
                        _format_ratio(_ratio(cascade_xla, shared["limit"])),
                        _format_ratio(_ratio(cascade_xla, shared["limit_xla"])),
                    ]
                )
    return rows


TIMING_HEADER = [
    "case", "direction", "state",
    "cascade ms", "cascade_xla ms", "nested ms", "limit ms", "limit_xla ms", "A ms", "A_xla ms",
    "nested / cascade", "nested / cascade_xla", "cascade / limit", "cascade_xla / limit", "cascade_xla / limit_xla",
]  # fmt: skip
TARGET_HEADER = ["target", "variant", "case", "direction", "state", "measured", "needs", "verdict"]


def target_rows(targets):
    return [
        [
            target["name"],
            target.get("method", "cascade"),  # runs from before cascade_xla judged the default runner only
            target["case"],
            target["direction"],
            target["state"],
            _format_ratio(target["measured"]),
            f"{target['comparison']} {target['threshold']:g}",
            _verdict(target),
        ]
        for target in targets
    ]


def target_legend(targets):
    """Returns one line per kind of target and variant: what its measured number is."""
    details = dict(((target["name"], target.get("method", "cascade")), target["detail"]) for target in targets)
    return [f"{name} ({method}): {detail}" for (name, method), detail in details.items()]


def errors_of(timings):
    return [f"{t['name']} {t['direction']} {t['state']} {t['method']}: {t['error']}" for t in timings if "error" in t]


def argument_parser(prog, description, *, default_repeats, batches=False):
    """The options every benchmark script takes: `--quick`, `--repeats`, `--out` (and `--batches`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 1 repeat: checks the script works")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per method (default {default_repeats}; 1 with --quick)")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder for results.json and RESULTS.md")
    if batches:
        parser.add_argument("--batches", type=int, nargs="+", default=None, metavar="N",
                            help="only the cases of these batch sizes (a reduced run, labelled as such)")
    return parser


def parse_arguments(parser, argv):
    """`parser.parse_args(argv)`, refusing fewer than one repeat."""
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1. Received: {args.repeats}")
    return args


def print_table(console, title, header, rows):
    """Prints one rich table of `rows` under `header`."""
    from rich.table import Table

    table = Table(title=title)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_tables(run_plan, timings, targets):
    """Prints the timing and target tables with rich."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=220)  # a pipe or a log: do not squeeze the tables into 80 columns
    table = Table(title="median times (ms)")
    for column in TIMING_HEADER:
        table.add_column(column, justify="left" if column in ("case", "direction", "state") else "right")
    for row in timing_rows(run_plan, timings):
        table.add_row(*row)
    console.print(table)
    table = Table(title="targets of issue 7")
    for column in TARGET_HEADER:
        table.add_column(column)
    for row, target in zip(target_rows(targets), targets):
        style = {True: "green", False: "red", None: "yellow"}[target["passed"]]
        table.add_row(*row[:-1], f"[{style}]{row[-1]}[/{style}]")
    console.print(table)
    for line in target_legend(targets):
        console.print(line)
    for error in errors_of(timings):
        console.print(f"[red]error[/red] {error}")


def machine_lines(machine, *, software=""):
    """The Markdown list lines that describe a run's machine (`describe_machine`); `software` extends the last."""
    return [
        f"- date: {machine['date']}",
        f"- CPU: {machine['cpu_model']}, {machine['cpu_count']} cores; memory {machine['memory_gib']} GiB",
        f"- GPU: {', '.join(machine['gpus']) or 'none'}",
        f"- python {machine['python']}, tensorflow {machine['tensorflow']}, keras {machine['keras']}, "
        f"numpy {machine['numpy']}{software}",
    ]


def _markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render_markdown(report, notes=""):
    """Renders every run (and memory check) of a results report as `RESULTS.md`."""
    parts = [
        "# Benchmark results",
        "",
        "Written by `python -m benchmarks.bench` (see `benchmarks/README.md`); medians of the",
        "timed runs after a warm-up, all methods in one process on the same models, inputs",
        "and steps, every one with `training=False` in both directions. `limit`, `limit_xla`,",
        "`A` and `A_xla` do not depend on the state mode. Ratios, not times, are what the",
        "targets of issue 7 judge.",
        "",
        "Which is which:",
        "",
        "- `cascade`: the packed runner with A's plain call, `Cascade(model_a, model_b, state=...,",
        "  jit_compile=False)` (the default before issue 16; the default now, `\"auto\"`, is `cascade_xla` here).",
        "- `cascade_xla`: the same with `jit_compile=True`: model A runs under XLA (the packed",
        "  loop over B stays outside XLA). Every target is judged for both, one row each.",
        "- `limit`: the issue's limit, the work no runner can avoid with A as it is: A's plain",
        "  Keras call plus one non-recurrent call of B on every useful `(pair, step)` row.",
        "  \"close to the limit\" divides each variant by this one.",
        "- `limit_xla`: A under XLA (the runner's own compiled call) plus the same single B",
        "  call. With XLA on A the fair limit has XLA on A too, so \"close to the XLA limit\"",
        "  (`cascade_xla / limit_xla`) is the runner's own overhead beyond that work.",
        "- `A`, `A_xla`: model A alone, plain and under XLA; \"skipping is free\" measures each",
        "  variant beyond its own A (`cascade - A`, `cascade_xla - A_xla`).",
    ]
    for run in report.get("runs", []):
        if run.get("suite", "runner") != "runner":  # benchmarks.peers', .feedback's and .tapes' runs
            parts += importlib.import_module(f"benchmarks.{run['suite']}").render_run(run)
            continue
        machine = run["machine"]
        run_plan = plan_from_dict(run["plan"])
        title = f"## {run['device']}" + (" (quick: tiny shapes, checks the script, measures nothing)" if run_plan.quick else "")
        parts += [
            "",
            title,
            "",
            *machine_lines(machine),
            f"- models: A = GRU(H) on F={run_plan.features} features; B = GRUCell(H) then Dense({run_plan.outputs});"
            f" steps uniform in 0..{run_plan.max_steps}; {run_plan.repeats} timed runs after {run_plan.warmups} warm-up"
            + (f"; the whole run took {run['seconds']:.0f} s" if "seconds" in run else ""),
            "",
            "### Median times (ms)",
            "",
            _markdown_table(TIMING_HEADER, timing_rows(run_plan, run["timings"])),
            "",
            "### Targets",
            "",
            _markdown_table(TARGET_HEADER, target_rows(run["targets"])),
            "",
        ]
        parts += [f"- {line}" for line in target_legend(run["targets"])]
        errors = errors_of(run["timings"])
        if errors:
            parts += ["", "### Errors", ""] + [f"- {error}" for error in errors]
    for device, memory in report.get("memory", {}).items():
        verdict = "PASS" if memory["passed"] else "MISS"
        parts += [
            "",
            f"## Memory ({device})",
            "",
            f"`cascade generate --batch-size {memory['batch_size']}` peak RSS: "
            f"{memory['small']['samples']} samples {memory['small']['peak_rss_mib']:.0f} MiB, "
            f"{memory['large']['samples']} samples {memory['large']['peak_rss_mib']:.0f} MiB; "
            f"ratio {memory['ratio']:.3f} (needs <= 1.15): {verdict}. Measured {memory['date']}.",
        ]
    parts += ["", NOTES_MARKER, notes.rstrip("\n") if notes else ""]
    return "\n".join(parts).rstrip("\n") + "\n"


def plan_from_dict(data):
    """Rebuilds a `Plan` from its JSON form."""
    fields = dict(data)
    for key in ("speed_cases", "zero_cases"):
        fields[key] = tuple(Case(**case) for case in fields[key])
    return Plan(**fields)


def write_report(out_dir, *, run=None, memory=None):
    """Merges a run or a memory check into `out_dir/results.json` and rewrites `RESULTS.md`.

    A run replaces an earlier one of the same suite (`benchmarks.bench`'s or
    `benchmarks.peers`'), device and kind (quick or full);
    runs of other devices are kept, so CPU and GPU tables stand side by side.
    Notes below the marker line of an existing `RESULTS.md` are kept.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path, markdown_path = out_dir / "results.json", out_dir / "RESULTS.md"
    report = {"format_version": FORMAT_VERSION, "runs": [], "memory": {}}
    if results_path.exists():
        try:
            old = json.loads(results_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("format_version") == FORMAT_VERSION:
            report["runs"] = old.get("runs", [])
            report["memory"] = old.get("memory", {})
    if run is not None:
        report["runs"] = [old for old in report["runs"] if _run_kind(old) != _run_kind(run)] + [run]
    if memory is not None:
        report["memory"][memory["device"]] = memory
    notes = ""
    if markdown_path.exists():
        text = markdown_path.read_text()
        if NOTES_MARKER in text:
            notes = text.split(NOTES_MARKER, 1)[1].strip("\n")
    _write_atomically(results_path, json.dumps(report, indent=1) + "\n")
    _write_atomically(markdown_path, render_markdown(report, notes))
    return report


def _run_kind(run):
    """What a new run replaces: the earlier run of the same suite, device and kind (quick or full)."""
    return run.get("suite", "runner"), run["device"], run["plan"]["quick"]


def _write_atomically(path, text):
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# --- memory ------------------------------------------------------------------------------

_PEAK_WRAPPER = textwrap.dedent(
    """
    import resource, subprocess, sys, time
    start = time.perf_counter()
    done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        sys.exit(done.returncode)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, seconds)
    """
)


def cascade_command():
    """Returns the argv prefix that runs the `cascade` command line."""
    found = shutil.which("cascade")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from cascade_cli.cli import main; sys.argv[0] = 'cascade'; sys.exit(main())"]


def peak_rss(argv):
    """Runs `argv` in a fresh wrapper process; returns `(peak RSS in MiB, seconds)`.

    The wrapper's `RUSAGE_CHILDREN` sees only this one command, so each
    measurement is clean (Linux reports `ru_maxrss` in KiB).
    """
    done = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *argv], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed with exit code {done.returncode}:\n{done.stderr}")
    kib, seconds = done.stdout.split()
    return int(kib) / 1024, float(seconds)


def memory_check(
    *,
    small=2000,
    large=20000,
    outer=50,
    features=16,
    hidden=64,
    outputs=16,
    max_steps=8,
    batch_size=256,
    workdir=None,
    command=None,
    log=print,
):
    """Measures the peak RSS of `cascade generate` on `large` vs `small` samples.

    Builds and saves A and B, writes inputs `.h5` (dataset `inputs`) and a steps
    `.txt` (one line per sample) for both sizes, and runs
    `cascade generate --model-a A --model-b B --inputs X.h5 --steps-file S.txt
    -o out.h5 --batch-size B` for each, smallest first, each in its own process.

    Args:
        small: samples of the first run.
        large: samples of the second run.
        outer: `Ta`.
        features: `F`.
        hidden: `H` (and B's state size).
        outputs: `O`.
        max_steps: steps are uniform in `0..max_steps`.
        batch_size: passed as `--batch-size`.
        workdir: folder for the temporary files (default: the system's).
        command: argv prefix that runs the command line (default: `cascade`).
        log: called with one line per run.

    Returns:
        dict with `small` and `large` (`samples`, `peak_rss_mib`, `seconds`),
        `ratio` (large / small peak), `passed` (ratio <= 1.15), `batch_size`,
        `device` and `date`.
    """
    import h5py

    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        folder = Path(folder)
        model_a, model_b = build_models(features=features, hidden=hidden, outputs=outputs)
        model_a.save(folder / "A.keras")
        model_b.save(folder / "B.keras")
        rng = np.random.default_rng(0)
        measured = {}
        for label, samples in (("small", small), ("large", large)):
            inputs_path, steps_path, out_path = folder / f"X{samples}.h5", folder / f"S{samples}.txt", folder / f"out{samples}.h5"
            with h5py.File(inputs_path, "w") as file:
                dataset = file.create_dataset("inputs", shape=(samples, outer, features), dtype="float32")
                for start in range(0, samples, 4096):
                    stop = min(start + 4096, samples)
                    dataset[start:stop] = rng.normal(size=(stop - start, outer, features)).astype(np.float32)
            steps = make_steps(rng, samples, outer, max_steps=max_steps)
            np.savetxt(steps_path, steps, fmt="%d")
            argv = list(command or cascade_command()) + [
                "generate",
                "--model-a", str(folder / "A.keras"),
                "--model-b", str(folder / "B.keras"),
                "--inputs", str(inputs_path),
                "--steps-file", str(steps_path),
                "-o", str(out_path),
                "--batch-size", str(batch_size),
            ]  # fmt: skip
            peak, seconds = peak_rss(argv)
            measured[label] = {"samples": samples, "peak_rss_mib": peak, "seconds": seconds}
            log(f"{samples} samples: peak RSS {peak:.0f} MiB in {seconds:.1f} s")
            out_path.unlink(missing_ok=True)
    ratio = measured["large"]["peak_rss_mib"] / measured["small"]["peak_rss_mib"]
    return {
        **measured,
        "ratio": ratio,
        "passed": ratio <= 1.15,
        "batch_size": batch_size,
        "device": device_label(describe_machine()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv=None):
    """Runs the benchmark (or the memory check) and writes the reports."""
    parser = argument_parser("python -m benchmarks.bench", __doc__.splitlines()[0], default_repeats=5)
    parser.add_argument("--memory", action="store_true", help="only the memory check of `cascade generate`")
    parser.add_argument("--memory-samples", type=int, nargs=2, default=(2000, 20000), metavar=("SMALL", "LARGE"))
    args = parse_arguments(parser, argv)
    if args.memory:
        small, large = args.memory_samples
        memory = memory_check(small=small, large=large)
        print(f"peak RSS ratio {memory['ratio']:.3f} (needs <= 1.15): {'PASS' if memory['passed'] else 'MISS'}")
        write_report(args.out, memory=memory)
        return memory
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one trace per function is intended; spare the retracing warnings
    run_plan = plan(quick=args.quick, repeats=args.repeats)
    machine = describe_machine()
    started = time.perf_counter()
    timings = run_benchmark(run_plan, log=lambda line: print(line, file=sys.stderr))
    targets = evaluate_targets(run_plan, timings)
    run = {
        "device": device_label(machine),
        "machine": machine,
        "plan": dataclasses.asdict(run_plan),
        "seconds": time.perf_counter() - started,
        "timings": timings,
        "targets": targets,
    }
    print_tables(run_plan, timings, targets)
    write_report(args.out, run=run)
    return run


if __name__ == "__main__":
    main()
