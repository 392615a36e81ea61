"""The plain loop before and after it became one (issue 29), side by side in one process.

The loops of an older checkout (`--before DIR`: `git archive e4fa856 | tar -x -C DIR`, main before the
feedback loop went through `run.loop.packed_loop`) are loaded beside this tree's and each case runs
one `Cascade` with each, `jit_compile=False` (the plain loop): `reset` and `carry` forward (GRU A F=16 H=64,
B = GRUCell(64) + Dense(8), steps 0..8, `fast_cells=False` so that the packed loop runs, `carry` with a
stop rule that never fires) and a feedback greedy decode (the feedback suite's models, stop token,
`max_steps=8`), at N=1 (Ta=200) and N=8 (Ta=100). Outputs are checked byte-identical first; then the calls
alternate one by one and the median and the minimum of each are printed in ms, with the load average.
Nothing is asserted: it is a measurement, not a test.

    python -m benchmarks.one_loop_ab --before /tmp/main [--repeats 25] [--only feedback]
"""
import argparse
import importlib.util
import os
import sys
import time

import numpy as np


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def old_functions(before):
    """The older checkout's `run_reset`, `run_carry` and `run_feedback`, over its own loop, stop rules and
    sampling modules."""
    run = os.path.join(before, "cascade_cli", "run", "")
    old = {name: load(f"before_{name}", run + f"{name}.py")
           for name in ("stopping", "sampling", "compiled_loop")}
    old_loop = load("before_loop", run + "loop.py")
    old_loop.stopping = old["stopping"]
    old["compiled_loop"].sampling = old["sampling"]
    old_feedback = load("before_feedback", run + "feedback.py")
    old_feedback.loop, old_feedback.stopping = old_loop, old["stopping"]
    old_feedback.sampling, old_feedback.compiled_loop = old["sampling"], old["compiled_loop"]
    return {"run_reset": old_loop.run_reset, "run_carry": old_loop.run_carry,
            "run_feedback": old_feedback.run_feedback}


def use(functions):
    """Points `Cascade._run` at these paths (the next trace, or an eager call, runs them)."""
    from cascade_cli.run import cascade as runner

    for name, function in functions.items():
        setattr(runner, name, function)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a checkout of the code to compare with")
    parser.add_argument("--repeats", type=int, default=25, help="calls of each, x4, alternating")
    parser.add_argument("--only", default="", help="run only the cases whose name holds this")
    arguments = parser.parse_args()
    from benchmarks import bench, feedback
    from cascade_cli.options import StopRule
    from cascade_cli.run import cascade as runner

    NEW = {name: getattr(runner, name) for name in ("run_reset", "run_carry", "run_feedback")}
    OLD = old_functions(arguments.before)
    repeats = arguments.repeats
    rng = np.random.default_rng(0)
    cases = []
    # forward, plain loop: GRU A F=16 H=64, B = GRUCell(64)+Dense(8), steps 0..8; fast_cells=False: packed_loop
    a, b = bench.build_models(features=16, hidden=64, outputs=8)
    for n, ta in ((1, 200), (8, 100)):
        x = rng.normal(size=(n, ta, 16)).astype(np.float32)
        steps = rng.integers(0, 9, size=(n, ta)).astype(np.int32)
        for state, extra in (("reset", {}), ("carry", {"stop_rule": StopRule.norm(1e9), "max_steps": 8})):
            settings = dict(state=state, jit_compile=False, fast_cells=False, **extra)
            cases.append((f"{state} fwd N={n}" + (" (stop rule)" if extra else ""), a, b, settings,
                          (x, steps), {}))
    fa, fb = feedback.build_models(features=16, hidden=64, outputs=16, max_steps=8)
    for n, ta in ((1, 200), (8, 100)):
        x, _ = feedback.make_data(rng, n, ta, features=16, max_steps=8)
        settings = dict(feedback=True, sampler="greedy", max_steps=8, stop_rule=StopRule.token(feedback.END),
                        jit_compile=False)
        cases.append((f"feedback greedy N={n}", fa, fb, settings, (x,), {"return_tokens": True}))
    only = arguments.only
    for name, ma, mb, settings, args, kw in cases:
        if only not in name:
            continue
        made = {}
        for label, functions in (("before", OLD), ("one loop", NEW)):
            use(functions)
            cascade = runner.Cascade(ma, mb, **settings)
            out = cascade.run(*args, **kw)  # traces with these functions
            out = cascade.run(*args, **kw)
            made[label] = (cascade, [np.asarray(t) for t in out], functions)
        use(NEW)
        same = all(p.tobytes() == q.tobytes() for p, q in zip(made["before"][1], made["one loop"][1]))
        times = {label: [] for label in made}
        order = list(made)
        for i in range(4 * repeats):  # call by call, alternating which goes first
            for label in (order if i % 2 == 0 else order[::-1]):
                cascade, _, functions = made[label]
                use(functions)  # in case the call runs eagerly
                t0 = time.perf_counter()
                for part in cascade.run(*args, **kw):
                    np.asarray(part)
                times[label].append(time.perf_counter() - t0)
        mins = {k: 1e3 * min(v) for k, v in times.items()}
        old, new = (1e3 * np.median(times[k]) for k in ("before", "one loop"))
        load = bench.load_average()
        print(f"{name:32s} before {old:8.2f} ms  one loop {new:8.2f} ms  ratio {new / old:5.3f}  "
              f"(min {mins['before']:.2f} / {mins['one loop']:.2f})  byte-identical {same}  load {load}", flush=True)


if __name__ == "__main__":
    main()
