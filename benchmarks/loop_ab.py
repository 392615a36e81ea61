"""The loop over B compiled whole (issue 29) against the plain loop, side by side in one process.

From the repository root, on an otherwise idle machine:

    python -m benchmarks.loop_ab             # under a minute on 2 cores
    python -m benchmarks.loop_ab --repeats 9
    python -m benchmarks.loop_ab --compaction  # compacted rows vs masked rows vs the padded XLA decode

The feedback suite's models and data (`benchmarks.feedback`): greedy decoding
with the stop token `END`, `max_steps = 8`, in `reset` and in `carry`, at the
feedback suite's three cases. Each case runs one default `Cascade` (with
`jit_compile="auto"` the loop over B runs under XLA where it compiles) and
one whose loop is held on the plain path; model A runs under XLA in both, so
the ratio is the loop's alone. Lengths and tokens are checked equal and values
close before anything is timed; the timings are interleaved (three rounds of
`--repeats` calls each) and the median of the rounds' medians is printed, in
milliseconds. Nothing is asserted about speed: it is a measurement, not a test.
"""

import argparse
import os
import time

import numpy as np

CASES = ((1, 200, 64), (8, 100, 64), (64, 50, 64))


def _median_ms(function, inputs, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for part in function(inputs):
            np.asarray(part)
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times))


def _generators(model_a, model_b, *, state):
    """`{"compiled": run, "plain": run}`: the default loop choice, and the plain loop with A still under XLA."""
    from benchmarks.feedback import END
    from cascade_cli.run import cascade as runner, xla
    from cascade_cli.options import StopRule

    made = {}
    for name in ("compiled", "plain"):
        cascade = runner.Cascade(model_a, model_b, state=state, feedback=True, sampler="greedy", max_steps=8,
                                 stop_rule=StopRule.token(END))
        if name == "plain":
            cascade._loop_choice = xla.LoopChoice(False, "held on the plain loop by benchmarks.loop_ab")
        made[name] = lambda inputs, cascade=cascade: cascade.run(inputs, return_tokens=True)
    return made


def compaction(repeats):
    """`reset` greedy decode, the feedback suite's cases: the compiled loop with compacted rows (the default), with
    masked rows (`COMPACT_ROWS` out of reach) and the feedback suite's `padded_decode_xla`, in ms and as a ratio."""
    import tensorflow as tf

    from benchmarks import feedback
    from cascade_cli.run import compiled_loop

    rng = np.random.default_rng(0)
    print("case              compacted ms  masked ms  padded XLA ms  compacted / masked  compacted / padded  "
          "masked / padded")
    for n, ta, hidden in CASES:
        model_a, model_b = feedback.build_models(features=16, hidden=hidden, outputs=16, max_steps=8)
        inputs = tf.constant(feedback.make_data(rng, n, ta, features=16, max_steps=8)[0])
        made = {}
        for name, rows in (("compacted", compiled_loop.COMPACT_ROWS), ("masked", 10**9)):
            default, compiled_loop.COMPACT_ROWS = compiled_loop.COMPACT_ROWS, rows  # read when the loop is traced
            try:
                made[name] = _generators(model_a, model_b, state="reset")["compiled"]
                results = [np.asarray(part) for part in made[name](inputs)]
            finally:
                compiled_loop.COMPACT_ROWS = default
            made[name + " result"] = results
        first, second = made.pop("compacted result"), made.pop("masked result")
        assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second)), "compacted and masked rows differ"
        padded = feedback.make_method("padded_decode_xla", model_a, model_b, direction="forward",
                                      run_plan=feedback.plan())[0]
        made["padded"] = padded
        rounds = {name: [] for name in made}
        for _ in range(3):
            for name, function in made.items():
                rounds[name].append(_median_ms(function, inputs, repeats))
        compacted, masked, padded = (float(np.median(rounds[name])) for name in ("compacted", "masked", "padded"))
        print(f"N={n:<3} Ta={ta:<4} H={hidden}  {compacted:12.1f}  {masked:9.1f}  {padded:13.1f}  "
              f"{compacted / masked:18.2f}  {compacted / padded:18.2f}  {masked / padded:15.2f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loop_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per round (default 7)")
    parser.add_argument("--compaction", action="store_true",
                        help="compacted rows against masked rows and the padded XLA decode (reset, greedy)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.compaction:
        return compaction(args.repeats)
    import tensorflow as tf

    from benchmarks import feedback

    rng = np.random.default_rng(0)
    print("state  case              compiled ms  plain ms  compiled / plain  loop compiled")
    for state in ("reset", "carry"):
        for n, ta, hidden in CASES:
            model_a, model_b = feedback.build_models(features=16, hidden=hidden, outputs=16, max_steps=8)
            inputs = tf.constant(feedback.make_data(rng, n, ta, features=16, max_steps=8)[0])
            made = _generators(model_a, model_b, state=state)
            plain, compiled = ([np.asarray(part) for part in made[name](inputs)] for name in ("plain", "compiled"))
            assert all(np.array_equal(p, c) for p, c in zip(plain[1:], compiled[1:])), "lengths or tokens differ"
            assert np.allclose(plain[0], compiled[0], rtol=1e-4, atol=1e-4), "values differ"
            rounds = {name: [] for name in made}
            for _ in range(3):
                for name, function in made.items():
                    rounds[name].append(_median_ms(function, inputs, args.repeats))
            fast, slow = (float(np.median(rounds[name])) for name in ("compiled", "plain"))
            chosen = made["compiled"].__defaults__[0].loop_compiled
            print(f"{state:6} N={n:<3} Ta={ta:<4} H={hidden}  {fast:11.1f}  {slow:8.1f}  {fast / slow:16.2f}  {chosen}",
                  flush=True)


if __name__ == "__main__":
    main()
