"""A known cell inside the loops compiled whole: B called whole at every step against the cell's projection made
once per pair and read by gate (issue 29, session 12), each against its padded XLA peer.

From the repository root, on an otherwise idle machine:

    python -m benchmarks.cell_ab                    # carry forward (peers suite) and the greedy decode (feedback)
    python -m benchmarks.cell_ab --batches 8,64 --rounds 5
    python -m benchmarks.cell_ab --quick            # tiny shapes, to keep the script working
    python -m benchmarks.cell_ab --gradient         # forward+backward under XLA's gradient: reset, teacher forcing

`old` is the default cascade traced with `xla.loop_step` set to B called
whole (`b_called`), `new` the code as it is; each is traced (its first call)
under its rule, so both programs live in one process. Two suites' forward
cases, with their models, data and calls:

- `carry`: `benchmarks.peers`' `Cascade(a, b, state="carry")` inside a
  `tf.function`, against `keras_padded_xla`;
- `decode`: `benchmarks.feedback`'s greedy decode with a stop token inside a
  `tf.function`, against `padded_decode_xla`.

`--gradient` times forward+backward where XLA's gradient runs the loop
(`xla.hand_written` set to False while each traces): `reset` (peers suite)
and teacher forcing (feedback suite), `old` and `new` as above, beside `hand`
(the default: the plain path's hand-written gradient) and the padded XLA peer.
Gradients are checked close to `hand`'s first.

Values (and the decode's tokens and lengths) are checked against the peer's
before anything is timed; timings are interleaved (`--rounds` rounds of
`--repeats` calls, `bench.rounds_ms`) and printed in milliseconds with
`/proc/loadavg`. Nothing is asserted about speed: it is a measurement, not a test.
"""

import contextlib
import os

import numpy as np

from benchmarks import bench


@contextlib.contextmanager
def b_called():
    """`xla.loop_step` as before a known cell's projection left the loop: B called whole at every step."""
    from cascade_cli.run import compiled_loop, xla

    saved = xla.loop_step
    xla.loop_step = lambda cascade, training: compiled_loop.Step.called(cascade._b_step(training))
    try:
        yield
    finally:
        xla.loop_step = saved


@contextlib.contextmanager
def xla_gradient():
    """`xla.hand_written` False: a call under a tape takes XLA's gradient of the loop where it can."""
    from cascade_cli.run import xla

    saved = xla.hand_written
    xla.hand_written = lambda *args, **kwargs: False
    try:
        yield
    finally:
        xla.hand_written = saved


RULES = {"old": (b_called,), "new": (), "hand": ()}
"""What each variant is traced under; `--gradient` adds `xla_gradient` to old and new (`traced`)."""


def traced(make, arguments, *, gradient=False):
    """`{name: f}` from `make()`, each traced by a first call under its rules, and its first results."""
    made, results = {}, {}
    for name, rules in RULES.items():
        if name == "hand" and not gradient:
            continue
        with contextlib.ExitStack() as stack:
            for rule in rules + ((xla_gradient,) if gradient and name != "hand" else ()):
                stack.enter_context(rule())
            made[name] = make()
            results[name] = made[name](*arguments)
    return made, results


def check_gradients(results):
    for name in ("old", "new"):
        for got, want in zip(results[name], results["hand"]):
            got, want = np.asarray(got), np.asarray(want)
            assert np.allclose(got, want, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(want).max())), name


def peers_cases(state, direction, batches, *, quick, repeats, rounds, log):
    """`benchmarks.peers`' cases in `state` and `direction`, against `keras_padded_xla`."""
    from benchmarks import peers

    gradient = direction != "forward"
    run_plan = peers.plan(quick=quick, repeats=repeats, batches=batches)
    for case, model_a, model_b, inputs, steps in peers.cases_with_data(run_plan):
        tensors = peers.inputs_as_tensors((inputs, steps))
        made, results = traced(lambda: peers.make_method(  # noqa: B023 - called at once
            "cascade", model_a, model_b, state=state, direction=direction, run_plan=run_plan, hidden=case.hidden,
            shared={})[0], tensors, gradient=gradient)
        made["peer"], _ = peers.make_keras_padded(model_a, model_b, state=state, direction=direction, xla=True,
                                                  max_steps=run_plan.max_steps, hidden=case.hidden)
        if gradient:
            check_gradients(results)
        else:
            peer = np.asarray(made["peer"](*tensors))
            for name, got in results.items():
                assert np.allclose(np.asarray(got), peer, **peers.TOLERANCE), f"{name} differs from the peer"
        report(state, case.name, made, tensors, repeats=run_plan.repeats, rounds=rounds, log=log)


def feedback_cases(direction, batches, *, quick, repeats, rounds, log):
    """`benchmarks.feedback`'s cases: the greedy decode (`forward`) or teacher forcing on its tokens, against
    `padded_decode_xla`."""
    import tensorflow as tf

    from benchmarks import feedback

    gradient = direction != "forward"
    run_plan = feedback.plan(quick=quick, repeats=repeats, batches=batches)
    rng = np.random.default_rng(0)
    for case in run_plan.cases:
        model_a, model_b = feedback.build_models(features=run_plan.features, hidden=case.hidden,
                                                 outputs=run_plan.outputs, max_steps=run_plan.max_steps)
        inputs, _ = feedback.make_data(rng, case.batch, case.outer, features=run_plan.features,
                                       max_steps=run_plan.max_steps)
        tensors = (tf.constant(inputs),)
        if gradient:  # teacher forcing on the decoded tokens, as the feedback suite does
            decode = feedback.make_method("cascade", model_a, model_b, direction="forward", run_plan=run_plan)[0]
            _, lengths, tokens = decode(*tensors)
            tensors += (tf.constant(lengths), tf.cast(tokens, tf.int32))
        made, results = traced(lambda: feedback.make_method(  # noqa: B023 - called at once
            "cascade", model_a, model_b, direction=direction, run_plan=run_plan)[0], tensors, gradient=gradient)
        made["peer"], _ = feedback.make_method("padded_decode_xla", model_a, model_b, direction=direction,
                                               run_plan=run_plan)
        if gradient:
            check_gradients(results)
        else:
            flat = {name: feedback.flat_results("cascade", result) for name, result in results.items()}
            peer = feedback.flat_results("padded_decode_xla", made["peer"](*tensors))
            for name in ("old", "new"):
                for got, want in zip(flat[name], peer):
                    assert np.allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4), f"{name} differs"
        report("teacher" if gradient else "decode", case.name, made, tensors, repeats=run_plan.repeats,
               rounds=rounds, log=log)


def report(kind, name, made, tensors, *, repeats, rounds, log):
    calls = {key: (lambda _i, _s, f=function: f(*tensors)) for key, function in made.items()}
    ms = bench.rounds_ms(calls, repeats=repeats, rounds=rounds)
    old, new, peer, hand = ms["old"], ms["new"], ms["peer"], ms.get("hand", float("nan"))
    log(f"{kind:7} {name:18} {old:8.2f} {new:8.2f} {hand:8.2f} {peer:8.2f} {new / old:8.2f} {new / peer:9.2f} "
        f"{old / peer:9.2f} {hand / peer:9.2f}  {bench.load_average()}")


def main(argv=None):
    parser = bench.ab_parser("python -m benchmarks.cell_ab", __doc__.splitlines()[0],
                             batches_help="the N of the cases to run (default: every suite's)")
    parser.add_argument("--gradient", action="store_true",
                        help="forward+backward under XLA's gradient: reset (peers) and teacher forcing (feedback)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    batches, repeats, rounds = bench.ab_counts(args)
    print("suite   case                 old ms   new ms  hand ms  peer ms  new/old  new/peer  old/peer hand/peer  load")
    settings = dict(quick=args.quick, repeats=repeats, rounds=rounds, log=print)
    if args.gradient:
        peers_cases("reset", "forward+backward", batches, **settings)
        feedback_cases("forward+backward", batches, **settings)
    else:
        peers_cases("carry", "forward", batches, **settings)
        feedback_cases("forward", batches, **settings)


if __name__ == "__main__":
    main()
