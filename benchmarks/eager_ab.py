"""The README's eager call before and after issue 29's repeated-call lane, against the compiled call.

From the repository root, on an otherwise idle machine:

    python -m benchmarks.eager_ab                        # N = 1, 8, 64; reset and carry (a few minutes)
    python -m benchmarks.eager_ab --batches 1 --rounds 9 --calls 40
    python -m benchmarks.eager_ab --quick                # tiny shapes, to keep the script working
    python -m benchmarks.eager_ab --pieces --batches 1   # where one eager call's own time goes, old and new

The peers suite's models, data and calls (`benchmarks.peers`): `compiled` is
the default `Cascade(a, b, state=...)` called inside a `tf.function` traced
once (the suite's `cascade`, tensors given); `old` and `new` are the README's
call, `cascade(inputs, steps).flat_values` eagerly on numpy arrays (the
suite's `readme`). `new` is the code as it is; `old` is a cascade of the same
models whose eager lane is put back to main's (e45c6da, `MainLane`): no
repeated-call lane (`EagerLane.repeated`), the steps' least, greatest and
total taken apart, the ragged result built through RaggedTensor's factories.
Values are checked bit for bit (old against new) and close (against the
compiled call) before anything is timed.

Two conditions: `back to back` calls each method again and again, as a
user's loop does; `after a peer` runs the suite's `keras_padded` method (its
plain Keras GRU, untimed) before every timed call, as the suite runs other
methods between two calls of one: right after other work the eager call's
Python runs cold and costs several times more. Every round calls the three
in a rotating order, `--calls` calls each; the median of the rounds' medians
is printed in ms, with the ratios to the compiled call and `/proc/loadavg`
beside each row. Nothing is asserted about speed: it is a measurement, not
a test.
"""

import argparse
import statistics
import time

import numpy as np

from benchmarks import bench


def main_lane(max_steps):
    """An `EagerLane` as on main (e45c6da): no repeated-call lane, the steps' values taken apart in three
    reductions, the ragged result through `RaggedTensor._from_row_partition` and `RowPartition.from_row_splits`."""
    import tensorflow as tf

    from cascade_cli.options import STEPS_MAX
    from cascade_cli.run import eager

    class MainLane(eager.EagerLane):
        def repeated(self, cascade, kind, inputs, steps, training):
            return None

        def caps(self, array, n, ta):
            if array is None:
                return self.constant(("caps", n, ta),
                                     lambda: tf.fill([n, ta], tf.constant(self.max_steps, tf.int32)))
            if array.size and (array.min() < 0 or array.max() > self.limit
                               or int(array.sum(dtype=np.int64)) * (n if array.ndim == 1 else 1) > STEPS_MAX):
                return None
            if array.ndim == 1:
                array = np.broadcast_to(array, (n, ta))
            return tf.constant(np.ascontiguousarray(array, dtype=np.int32))

        def nested(self, parts, *, samples, outer):
            flats = (parts[0], *parts[2:])
            partition = self.constant(("outer", samples, outer), lambda: tf.RaggedTensor.from_uniform_row_length(
                tf.zeros([samples * outer], tf.int64), outer, nrows=samples, validate=False))
            nested = []
            for flat in flats:
                inner = tf.RaggedTensor._from_row_partition(
                    flat, tf.experimental.RowPartition.from_row_splits(parts[1], validate=False), validate=False)
                nested.append(tf.RaggedTensor._from_row_partition(inner, partition._row_partition, validate=False))
            return tuple(nested) if len(nested) > 1 else nested[0]

    return MainLane(max_steps)


def methods(model_a, model_b, *, state, run_plan, hidden):
    """`({name: (function, numpy_inputs)}, peer, {name: cascade})`: old, new and compiled; the peer run between
    calls; the old and new cascades."""
    from benchmarks import peers
    from cascade_cli.run.cascade import Cascade

    old, new = (Cascade(model_a, model_b, state=state) for _ in range(2))
    old._lane = main_lane(old.max_steps)
    compiled, _ = peers.make_method("cascade", model_a, model_b, state=state, direction="forward",
                                    run_plan=run_plan, hidden=hidden, shared={})
    peer, peer_numpy = peers.make_method("keras_padded", model_a, model_b, state=state, direction="forward",
                                         run_plan=run_plan, hidden=hidden, shared={})
    return ({"old": (lambda x, s: old(x, s).flat_values, True), "new": (lambda x, s: new(x, s).flat_values, True),
             "compiled": (compiled, False)}, (peer, peer_numpy), {"old": old, "new": new})


def timed(functions, peer, arrays, *, rounds, calls, between):
    """`{name: median of the rounds' medians (s)}`, every round in a rotating order."""
    from benchmarks import peers

    tensors = peers.inputs_as_tensors(arrays)
    given = {name: arrays if numpy_inputs else tensors for name, (_, numpy_inputs) in functions.items()}
    peer_given = arrays if peer[1] else tensors
    names = list(functions)
    medians = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        times = {name: [] for name in names}
        for _ in range(calls):
            for name in names[shift:] + names[:shift]:
                if between:
                    peer[0](*peer_given)
                start = time.perf_counter()
                functions[name][0](*given[name])
                times[name].append(time.perf_counter() - start)
        for name in names:
            medians[name].append(statistics.median(times[name]))
    return {name: statistics.median(values) for name, values in medians.items()}


def checked(functions, arrays):
    """Raises `AssertionError` unless old and new give the same bits and the compiled call close values."""
    from benchmarks import peers

    tensors = peers.inputs_as_tensors(arrays)
    got = {name: np.asarray(function(*(arrays if numpy_inputs else tensors)))
           for name, (function, numpy_inputs) in functions.items()}
    for _ in range(2):  # the second call of a signature is the repeated-call lane's
        again = np.asarray(functions["new"][0](*arrays))
        assert again.tobytes() == got["new"].tobytes(), "new: a repeated call differs from the first"
    assert got["old"].dtype == got["new"].dtype and got["old"].tobytes() == got["new"].tobytes(), "old != new"
    assert np.allclose(got["compiled"], got["new"], **peers.TOLERANCE), "compiled differs from new"


def run(run_plan, *, rounds, calls, log=print):
    """Times old, new and compiled for every case and state, back to back and after a peer; prints a table."""
    from benchmarks import peers

    log("| case | state | condition | old ms | new ms | compiled ms | old / compiled | new / compiled | "
        "new / old | load |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case, model_a, model_b, inputs, steps in peers.cases_with_data(run_plan):
        for state in peers.STATES:
            functions, peer, _ = methods(model_a, model_b, state=state, run_plan=run_plan, hidden=case.hidden)
            checked(functions, (inputs, steps))
            for name, between in (("back to back", False), ("after a peer", True)):
                median = timed(functions, peer, (inputs, steps), rounds=rounds, calls=calls, between=between)
                old, new, base = median["old"], median["new"], median["compiled"]
                log(f"| {case.name} | {state} | {name} | {old * 1e3:.2f} | {new * 1e3:.2f} | {base * 1e3:.2f} | "
                    f"{old / base:.3f} | {new / base:.3f} | {new / old:.3f} | {bench.load_average()} |")


def pieces(run_plan, *, calls, log=print):
    """Times the pieces of one eager call, old path and new, each right after a peer call (`after a peer`), in
    µs (medians of `calls`), `reset` only: where the eager call's own cost goes."""
    import tensorflow as tf

    from benchmarks import peers
    from cascade_cli.keras_internals import call_flat, call_untaped, ragged_from_parts, tape_may_record
    from cascade_cli.run import checks, compiled, eager

    for case, model_a, model_b, inputs, steps in peers.cases_with_data(run_plan):
        functions, peer, cascades = methods(model_a, model_b, state="reset", run_plan=run_plan, hidden=case.hidden)
        checked(functions, (inputs, steps))
        old, new = cascades["old"], cascades["new"]
        tensors = peers.inputs_as_tensors((inputs, steps))
        peer_given = (inputs, steps) if peer[1] else tensors
        repeat = next(iter(new._lane.repeats.values()))
        times = {}

        def mark(name, start):
            now = time.perf_counter()
            times.setdefault(name, []).append(now - start)
            return now

        for _ in range(calls):
            peer[0](*peer_given)
            t = time.perf_counter()
            x, caps = old._checked(inputs, steps)
            t = mark("old: checks (EagerLane.checked)", t)
            extras = old._extras(x, caps, steps, None, None, 0.0, False)
            t = mark("old: extras", t)
            compiled.compiles(old, x)
            t = mark("old: compiles", t)
            function = compiled.concrete(old, "ragged", x, training=False, extras=extras)
            t = mark("old: concrete (its key)", t)
            parts = call_flat(function, [x, caps])
            t = mark("old: call_flat", t)
            result = old._lane.nested(parts, samples=checks.dim(x, 0), outer=checks.dim(x, 1))
            t = mark("old: the ragged result", t)
            result.flat_values
            peer[0](*peer_given)
            t = time.perf_counter()
            eager.plain(None, None, 0.0, False, None, False)
            new._lane.repeats.get(("ragged", False, inputs.dtype, inputs.shape, (steps.dtype, steps.shape)))
            t = mark("new: defaults, key", t)
            new.run_eagerly or not tf.executing_eagerly() or tape_may_record()
            t = mark("new: eager, no tape", t)
            caps = new._lane.caps(steps, inputs.shape[0], inputs.shape[1])
            t = mark("new: steps' glance and tensor", t)
            x = tf.constant(inputs)
            t = mark("new: inputs' tensor", t)
            parts = call_untaped(repeat.function, [x, caps], repeat.captures)
            t = mark("new: call_untaped", t)
            ragged_from_parts(repeat.partition, parts[0], parts[1]).flat_values
            t = mark("new: the ragged result", t)
            peer[0](*peer_given)
            t = time.perf_counter()
            functions["compiled"][0](*tensors)
            mark("compiled: the whole call", t)
        log(f"{case.name}, reset, each right after a peer call; load {bench.load_average()}")
        for name, values in times.items():
            log(f"  {name:36s} {statistics.median(values) * 1e6:9.1f} µs")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eager_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="the peers cases' N to run")
    parser.add_argument("--rounds", type=int, default=7, help="rounds, each in a rotating order")
    parser.add_argument("--calls", type=int, default=30, help="timed calls of each method per round")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round of two calls")
    parser.add_argument("--pieces", action="store_true", help="the pieces of one eager call, old and new, in µs")
    args = parser.parse_args(argv)
    from benchmarks import peers

    run_plan = peers.plan(quick=args.quick, batches=None if args.quick else args.batches)
    if args.pieces:
        pieces(run_plan, calls=2 if args.quick else args.calls * args.rounds)
        return
    run(run_plan, rounds=1 if args.quick else args.rounds, calls=2 if args.quick else args.calls)


if __name__ == "__main__":
    main()
