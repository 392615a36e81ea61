"""Where a small `cascade generate` spends its time (issue 31): whole runs, first and repeated, and phases.

From the repository root, on an otherwise idle machine:

    python -m benchmarks.startup                      # this checkout, 3 rounds
    python -m benchmarks.startup --base /tmp/before   # and a checkout of the code before, interleaved
    python -m benchmarks.startup --phases             # also the phases of one run in one process

Prints, in seconds (the median of the rounds, and every round):

- `python -c "import tensorflow"`: the floor no cascade run can go under;
- `cascade generate` on `sample_data/` (8 samples, 303 inner steps) as it
  comes (`jit_compile="auto"`: since issue 31's plan, a job this small, 96 of
  A's steps, runs A's plain call with no XLA probe, `run.xla.XLA_PAYS_FROM`;
  before it, A was probed and compiled): the first run, with an empty XLA
  cache (`CASCADE_XLA_CACHE` pointed at a new folder), then the same run
  repeated, which reads what the first wrote; the same two without the
  cache (`CASCADE_XLA_CACHE=off`); with `--base`, the same two runs of the
  code in that folder (code that predates the cache runs both alike); each
  whole, and less the import's median, then again in one process with the
  import timed apart (wall and CPU seconds of the rest);
- with `--phases`, the phases of one run in one process: importing
  TensorFlow and Keras, loading the two models, building the `Cascade` (and
  its plan for the job, where the code has one), the first call (tracing,
  and where A is probed its XLA probe and compile) and a second call; as it
  comes and without XLA.

Nothing here is asserted: it is a measurement, not a test.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
PHASES = r"""
import time
started = time.perf_counter()
marks = {{}}
import keras, tensorflow as tf
marks["import tensorflow, keras"] = time.perf_counter()
from cascade_cli.data import open_inputs
from cascade_cli.model_files import load_pair
from cascade_cli.run.cascade import Cascade
from cascade_cli.steps import read_steps
a, b = load_pair("{a}", "{b}")
marks["load A and B"] = time.perf_counter()
cascade = Cascade(a, b)
with open_inputs("{x}") as source:
    inputs = source.read(0, source.n_samples)
if hasattr(cascade, "plan_xla"):  # as generate plans the whole job (code before issue 31's plan has none)
    cascade.plan_xla(samples=inputs.shape[0], outer_steps=inputs.shape[1])
marks["Cascade(a, b): checks, plan"] = time.perf_counter()
steps = read_steps("{s}")
cascade.run(inputs, steps)
marks["first call: trace (XLA probe and compile where A is probed), run"] = time.perf_counter()
cascade.run(inputs, steps)
marks["second call"] = time.perf_counter()
last = started
for name, at in marks.items():
    print(f"{{name}}\t{{at - last:.2f}}")
    last = at
"""


def timed(argv, *, env=None, cwd=None):
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, **(env or {})}, cwd=cwd)
    return time.perf_counter() - started


SPLIT = r"""
import resource, sys, time
started = time.perf_counter()
from cascade_cli import cli
(getattr(cli, "load_tensorflow", None) or cli._load_tensorflow)()  # as the command does (before: _load_tensorflow)
imported = time.perf_counter()
cpu = resource.getrusage(resource.RUSAGE_SELF)
main = cli.main
try:
    main(sys.argv[1:], prog_name="cascade")
except SystemExit as done:
    assert not done.code, done.code
done = resource.getrusage(resource.RUSAGE_SELF)
print(imported - started, time.perf_counter() - imported, done.ru_utime + done.ru_stime - cpu.ru_utime - cpu.ru_stime)
"""


def split(argv, *, env, cwd):
    """Runs `cascade ARGV` in one process: `(importing TensorFlow and Keras, the rest, the rest's CPU)` in seconds."""
    done = subprocess.run([sys.executable, "-c", SPLIT, *argv], check=True, capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=cwd)
    imported, rest, cpu = (float(value) for value in done.stdout.split()[-3:])
    return imported, rest, cpu


def generate_argv(output, *extra):
    return [sys.executable, "-m", "cascade_cli", "generate", "--model-a", str(SAMPLE / "model_a.keras"),
            "--model-b", str(SAMPLE / "model_b.keras"), "--inputs", str(SAMPLE / "inputs.h5"),
            "--steps-file", str(SAMPLE / "steps.txt"), "--overwrite", "-o", str(output), *extra]


def line(name, seconds, floor=None):
    shown = ", ".join(f"{value:.2f}" for value in seconds)
    median = statistics.median(seconds)
    above = "" if floor is None else f"  import + {median - floor:5.2f} s"
    print(f"{name:<52} median {median:5.2f} s{above}  ({shown})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each of every run interleaved")
    parser.add_argument("--base", type=Path, help="a checkout of the code before, run beside this one")
    parser.add_argument("--phases", action="store_true", help="also time the phases of one run in one process")
    args = parser.parse_args()
    variants = {"this": (ROOT, True), "this, no XLA cache": (ROOT, False),
                **({"base": (args.base.resolve(), False)} if args.base else {})}
    times = {"import": []}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "r.h5"
        argv = generate_argv(out)[3:]  # the arguments after `python -m cascade_cli`
        for repeat in range(args.repeats):
            times["import"].append(timed([sys.executable, "-c", "import tensorflow"]))
            for name, (root, cached) in variants.items():
                cache = str(Path(folder) / f"xla-{len(times['import'])}-{name}") if cached else "off"
                env = {"PYTHONPATH": str(root), "CASCADE_XLA_CACHE": cache, "TF_XLA_FLAGS": ""}
                # in the code's own folder: `python -m` and `-c` put the working folder before PYTHONPATH
                for run in ("first", "repeated"):
                    times.setdefault(f"{name} {run}", []).append(timed(generate_argv(out), env=env, cwd=root))
                env = {**env, "CASCADE_XLA_CACHE": cache + "-split" if cached else "off"}
                for run in ("first", "repeated"):  # the same two runs again, the import timed apart
                    imported, rest, cpu = split(argv, env=env, cwd=root)
                    times.setdefault(f"{name} {run} import", []).append(imported)
                    times.setdefault(f"{name} {run} rest", []).append(rest)
                    times.setdefault(f"{name} {run} cpu", []).append(cpu)
        floor = statistics.median(times["import"])
        line('python -c "import tensorflow"', times["import"])
        for name in variants:
            for run in ("first", "repeated"):
                what = "first run (empty XLA cache)" if run == "first" else "repeated run"
                line(f"cascade generate, {name}: {what}", times[f"{name} {run}"], floor)
                line("  in one process: importing TensorFlow, Keras", times[f"{name} {run} import"])
                line("  in one process: the rest of the command", times[f"{name} {run} rest"])
                line("  in one process: the rest's CPU time", times[f"{name} {run} cpu"])
        if args.phases:
            phases(args.repeats)


def phases(repeats):
    """Prints the phases of one run in one process, as it comes and without XLA, interleaved."""
    code = PHASES.format(a=SAMPLE / "model_a.keras", b=SAMPLE / "model_b.keras", x=SAMPLE / "inputs.h5",
                         s=SAMPLE / "steps.txt")
    variants = {"auto": code, "no XLA": code.replace("Cascade(a, b)", "Cascade(a, b, jit_compile=False)")}
    print("phases of one run, in one process (s), the variants interleaved:")
    for repeat in range(repeats):
        for variant, text in variants.items():
            done = subprocess.run([sys.executable, "-c", text], check=True, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"})
            rows = [row.split("\t") for row in done.stdout.splitlines()]
            shown = "  ".join(f"{name}: {float(seconds):.2f}" for name, seconds in rows)
            print(f"  run {repeat} {variant:<8}{shown}")


if __name__ == "__main__":
    main()
