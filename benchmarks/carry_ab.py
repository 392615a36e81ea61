"""`carry` with given steps before and after issue 29's known-inputs loop changes, against the padded XLA peer.

From the repository root, on an otherwise idle machine:

    python -m benchmarks.carry_ab                        # the peers suite's four cases (minutes on 2 cores)
    python -m benchmarks.carry_ab --batches 1,64 --repeats 9
    python -m benchmarks.carry_ab --quick                # tiny shapes, to keep the script working
    python -m benchmarks.carry_ab --gradient             # forward+backward: the three gradients of carry

The peers suite's models, data and calls (`benchmarks.peers`): the default
`Cascade(a, b, state="carry")` called inside a `tf.function`, `forward` and
`forward+backward` (the gradient of the values' sum), against
`keras_padded_xla`. `old` is the same cascade traced with
`compiled_loop`'s two rules set back to main's (19d9013): every row's input
gathered by each step (`GATHERED_MAX = 0`) and a batch of one sample run as
2 rows (`known_rows` without its one-row case); `new` is the code as it is.
Each is traced (its first call) with its rules in place, so both programs
live in one process. Values are checked close before anything is timed; the
timings are interleaved (`--rounds` rounds of `--repeats` calls each, every
round in a rotating order) and the median of the rounds' medians is printed
in milliseconds, with `/proc/loadavg` beside each case. Nothing is asserted
about speed: it is a measurement, not a test.

`--gradient` times forward+backward only, the same call traced three ways, each
at every batch: `xla` XLA's generic gradient of A and the loop
(`known.CARRY_GRADIENT_WRITTEN` off), `written` the loop's gradient written by
hand inside XLA (`known.carry_gradient`), `hand` the plain path with its
hand-written gradient (`run.recurrence`); `xla.XLA_GRADIENT_BELOW` is set while
each traces, so that one gradient runs at every batch. Gradients are checked
close to `hand`'s first.
"""

import contextlib
import os

import numpy as np

from benchmarks import bench


@contextlib.contextmanager
def main_rules():
    """`compiled_loop`'s rules as on main (19d9013) while a cascade traces: a gather by each step, 2 rows for one
    sample."""
    from cascade_cli.run import compiled_loop

    saved = compiled_loop.GATHERED_MAX, compiled_loop.known_rows

    def known_rows(samples, *, quantum, bucketed=False):
        if bucketed:
            return compiled_loop.bucket(samples, minimum=quantum)
        return (samples + quantum - 1) // quantum * quantum

    compiled_loop.GATHERED_MAX, compiled_loop.known_rows = 0, known_rows
    try:
        yield
    finally:
        compiled_loop.GATHERED_MAX, compiled_loop.known_rows = saved


GRADIENTS = {"xla": (False, 10**9), "written": (True, 10**9), "hand": (True, 0)}
"""`--gradient`'s variants: `(known.CARRY_GRADIENT_WRITTEN, xla.XLA_GRADIENT_BELOW)` while each traces."""


@contextlib.contextmanager
def gradient_rules(name):
    """`known.CARRY_GRADIENT_WRITTEN` and `xla.XLA_GRADIENT_BELOW` as `GRADIENTS[name]` says while a cascade
    traces."""
    from cascade_cli.run import known, xla

    saved = known.CARRY_GRADIENT_WRITTEN, xla.XLA_GRADIENT_BELOW
    known.CARRY_GRADIENT_WRITTEN, xla.XLA_GRADIENT_BELOW = GRADIENTS[name]
    try:
        yield
    finally:
        known.CARRY_GRADIENT_WRITTEN, xla.XLA_GRADIENT_BELOW = saved


def run_gradients(run_plan, *, rounds, log=print):
    """`--gradient`: times the three gradients and the peer for every case, forward+backward; one line each."""
    from benchmarks import peers

    log("case               xla ms  written ms  hand ms  peer ms  written/xla  written/hand  written/peer  "
        "best/peer  load")
    for case, model_a, model_b, inputs, steps in peers.cases_with_data(run_plan):
        tensors = peers.inputs_as_tensors((inputs, steps))
        made, grads = {}, {}
        for name in GRADIENTS:
            with gradient_rules(name):
                made[name], _ = peers.make_method("cascade", model_a, model_b, state="carry",
                                                  direction="forward+backward", run_plan=run_plan,
                                                  hidden=case.hidden, shared={})
                grads[name] = [np.asarray(g) for g in made[name](*tensors)]  # traces under its rules
        for name in ("xla", "written"):
            for got, want in zip(grads[name], grads["hand"]):
                assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want))), f"{name} differs"
        made["peer"], _ = peers.make_keras_padded(model_a, model_b, state="carry", direction="forward+backward",
                                                  xla=True, max_steps=run_plan.max_steps, hidden=case.hidden)
        medians = interleaved(made, tensors, rounds=rounds, repeats=run_plan.repeats)
        xla_ms, written, hand, peer = (medians[name] for name in ("xla", "written", "hand", "peer"))
        log(f"{case.name:18} {xla_ms:7.2f} {written:11.2f} {hand:8.2f} {peer:8.2f} {written / xla_ms:12.2f} "
            f"{written / hand:13.2f} {written / peer:13.2f} {min(written, hand) / peer:10.2f}  {bench.load_average()}")


def interleaved(functions, tensors, *, rounds, repeats):
    """`name -> ms` of each function called on `tensors` (`bench.rounds_ms`)."""

    calls = {name: (lambda _i, _s, f=function: f(*tensors)) for name, function in functions.items()}
    return bench.rounds_ms(calls, repeats=repeats, rounds=rounds)


def run(run_plan, *, rounds, log=print):
    """Times old, new and the peer for every case and direction; prints one line each."""
    from benchmarks import peers

    log("case               direction         old ms   new ms  peer ms  new/old  new/peer  old/peer  load")
    for case, model_a, model_b, inputs, steps in peers.cases_with_data(run_plan):
        arrays = (inputs, steps)
        tensors = peers.inputs_as_tensors(arrays)
        for direction in peers.DIRECTIONS:
            made = {}
            for name in ("old", "new"):
                with main_rules() if name == "old" else contextlib.nullcontext():
                    function, _ = peers.make_method("cascade", model_a, model_b, state="carry", direction=direction,
                                                    run_plan=run_plan, hidden=case.hidden, shared={})
                    result = function(*tensors)  # traces (and compiles) under its rules
                made[name] = function
                if direction == "forward":
                    made.setdefault("_values", {})[name] = np.asarray(result)
            made["peer"], _ = peers.make_keras_padded(model_a, model_b, state="carry", direction=direction, xla=True,
                                                      max_steps=run_plan.max_steps, hidden=case.hidden)
            values = made.pop("_values", None)
            if values is not None:
                peer = np.asarray(made["peer"](*tensors))
                for name, got in values.items():
                    assert np.allclose(got, peer, **peers.TOLERANCE), f"{name} differs from the peer"
            medians = interleaved(made, tensors, rounds=rounds, repeats=run_plan.repeats)
            old, new, peer = (medians[name] for name in ("old", "new", "peer"))
            log(f"{case.name:18} {direction:16} {old:8.2f} {new:8.2f} {peer:8.2f} {new / old:8.2f} {new / peer:9.2f}"
                f" {old / peer:9.2f}  {bench.load_average()}")


def main(argv=None):
    parser = bench.ab_parser("python -m benchmarks.carry_ab", __doc__.splitlines()[0],
                             batches_help="the N of the cases to run (default: all four)")
    parser.add_argument("--gradient", action="store_true",
                        help="forward+backward: XLA's generic gradient, the one written inside XLA, the plain path's")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from benchmarks import peers

    batches, repeats, rounds = bench.ab_counts(args)
    run_plan = peers.plan(quick=args.quick, repeats=repeats, batches=batches)
    (run_gradients if args.gradient else run)(run_plan, rounds=rounds)


if __name__ == "__main__":
    main()
