"""Times the default cascade's eager call under one tape, a persistent tape and nested tapes (issue 16).

Run from the repository root, on an otherwise idle machine:

    python -m benchmarks.tapes                 # medians of 7 (about two minutes on 2 cores)
    python -m benchmarks.tapes --quick         # tiny shapes, 1 repeat (seconds)

The README's call, `cascade(inputs, steps)` on numpy arrays with the default
`Cascade(a, b)`, forward + backward (the gradient of the sum of the outputs with
respect to every weight), `reset`, on `benchmarks.peers`' models and steps:

- `compiled`: the call and its gradient inside one explicit `tf.function`;
- `one_tape`: eagerly, under a `tf.GradientTape`;
- `persistent`: the same under `tf.GradientTape(persistent=True)`;
- `nested`: under two nested tapes (the inner one takes the gradient), as a
  gradient penalty's first half runs.

A persistent tape or a second tape makes TensorFlow prepare second-order
gradients of a function it records; the cascade does not let it record its
compiled call there, but runs the call again in its gradient. `first call`
is one measurement per method of a fresh `Cascade`'s first call and gradient
(its traces; A's XLA compiles are cached by then); the other times are
medians of interleaved repeats. The gradients of `persistent` and `nested`
are checked equal to `one_tape`'s before anything is timed.
"""

import contextlib
import dataclasses
import sys
import time

import numpy as np

from benchmarks import bench, peers

SUITE = "tapes"
TAPES = ("one_tape", "persistent", "nested")
METHODS = ("compiled",) + TAPES
TIMING_HEADER = ["case", *(f"{method} ms" for method in METHODS), "persistent / one_tape", "nested / one_tape",
                 *(f"first call, {tape} s" for tape in TAPES)]


def plan(*, quick=False, repeats=None):
    """`benchmarks.peers`' plan without its largest case (N=256, H=256), or its tiny `quick` version."""
    return peers.plan(quick=quick, repeats=repeats, batches=None if quick else (1, 8, 64))


def make_taped(tape, model_a, model_b):
    """`function(inputs, steps) -> gradients`: a fresh default `Cascade(a, b)` called eagerly under `tape`."""
    import tensorflow as tf

    from cascade_cli.run.cascade import Cascade

    cascade = Cascade(model_a, model_b)
    weights = model_a.trainable_variables + model_b.trainable_variables

    def run(inputs, steps):
        with contextlib.ExitStack() as stack:  # nested: an outer tape records too, as a gradient penalty's does
            tapes = [stack.enter_context(tf.GradientTape(persistent=tape == "persistent"))
                     for _ in range(2 if tape == "nested" else 1)]
            total = tf.reduce_sum(cascade(inputs, steps).flat_values)
        return tapes[-1].gradient(total, weights)

    return run


def run_tapes(run_plan, *, log=print):
    """Times every method of every case; returns the timing dicts, each with `first_call_s` for the taped ones."""
    timings = []
    for case, model_a, model_b, inputs, steps in peers.cases_with_data(run_plan):
        functions = {"compiled": peers.make_method("cascade", model_a, model_b, state="reset",
                                                   direction="forward+backward", run_plan=run_plan,
                                                   hidden=case.hidden, shared={})[0]}
        tensors = peers.inputs_as_tensors((inputs, steps))
        functions["compiled"](*tensors)  # A's XLA compiles, cached for the fresh cascades below: not in their firsts
        first_calls, grads = {}, {}
        for tape in TAPES:
            functions[tape] = make_taped(tape, model_a, model_b)
            start = time.perf_counter()
            grads[tape] = [np.asarray(g) for g in functions[tape](inputs, steps)]
            first_calls[tape] = time.perf_counter() - start
        for tape in TAPES[1:]:
            for got, want in zip(grads[tape], grads["one_tape"]):
                np.testing.assert_allclose(got, want, **peers.TOLERANCE, err_msg=tape)
        log(f"{case.name}: gradients equal under {', '.join(TAPES)}; first calls "
            + ", ".join(f"{tape} {seconds:.1f} s" for tape, seconds in first_calls.items()))
        calls = {method: (lambda _i, _s, f=function, given=(tensors if method == "compiled" else (inputs, steps)):
                          f(*given)) for method, function in functions.items()}
        measured = bench.time_group(calls, None, None, repeats=run_plan.repeats, warmups=run_plan.warmups)
        for method, result in measured.items():
            if method in first_calls:
                result["first_call_s"] = first_calls[method]
            timings.append({"name": case.name, "method": method, **result})
    return timings


def _lookup(timings, name, method, field="median_s"):
    return next((t.get(field) for t in timings if t["name"] == name and t["method"] == method), None)


def timing_rows(run_plan, timings):
    rows = []
    for case in run_plan.cases:
        times = {method: _lookup(timings, case.name, method) for method in METHODS}
        rows.append([case.name, *(bench._format_seconds(times[method]) for method in METHODS),
                     *(bench._format_ratio(bench._ratio(times[tape], times["one_tape"])) for tape in TAPES[1:]),
                     *(_format_first(_lookup(timings, case.name, tape, "first_call_s")) for tape in TAPES)])
    return rows


def _format_first(seconds):
    return "-" if seconds is None else f"{seconds:.1f}"


def render_run(run):
    """The Markdown section of one tapes run, for `RESULTS.md`."""
    machine, run_plan = run["machine"], peers.plan_from_dict(run["plan"])
    title = f"## Tapes, {run['device']}" + (" (quick: tiny shapes, checks the script, measures nothing)"
                                            if run_plan.quick else "")
    parts = [
        "", title, "",
        "Written by `python -m benchmarks.tapes` (issue 16; see `benchmarks/README.md`): the default",
        "`Cascade(a, b)`'s eager call and gradient under one tape, a persistent tape and nested tapes, beside",
        "the same inside one `tf.function`; gradients checked equal first; repeats interleaved; medians.",
        "`first call` is one measurement of a fresh `Cascade`'s first call and gradient (traces included).",
        "",
        *bench.machine_lines(machine),
        f"- models: A = GRU(H) on F={run_plan.features} features; B = GRUCell(H) then Dense({run_plan.outputs}); "
        f"reset; steps uniform in 0..{run_plan.max_steps}; {run_plan.repeats} timed runs after "
        f"{run_plan.warmups} warm-up" + (f"; the whole run took {run['seconds']:.0f} s" if "seconds" in run else ""),
        "",
        bench._markdown_table(TIMING_HEADER, timing_rows(run_plan, run["timings"])),
    ]
    errors = bench.errors_of(run["timings"])
    if errors:
        parts += ["", "### Errors", ""] + [f"- {error}" for error in errors]
    return parts


def main(argv=None):
    """Runs the tapes benchmark and merges it into the reports."""
    parser = bench.argument_parser("python -m benchmarks.tapes", __doc__.splitlines()[0], default_repeats=7)
    args = bench.parse_arguments(parser, argv)
    import tensorflow as tf
    from rich.console import Console

    tf.get_logger().setLevel("ERROR")
    run_plan = plan(quick=args.quick, repeats=args.repeats)
    machine = bench.describe_machine()
    started = time.perf_counter()
    timings = run_tapes(run_plan, log=lambda line: print(line, file=sys.stderr))
    run = {"suite": SUITE, "device": bench.device_label(machine), "machine": machine,
           "plan": dataclasses.asdict(run_plan), "seconds": time.perf_counter() - started, "timings": timings}
    console = Console() if sys.stdout.isatty() else Console(width=240)
    bench.print_table(console, "median times (ms); first calls (s)", TIMING_HEADER, timing_rows(run_plan, timings))
    bench.write_report(args.out, run=run)
    return run


if __name__ == "__main__":
    main()
