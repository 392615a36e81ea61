"""Where a small `cascade generate` spends its time (issue 31): a whole run, and its phases in one process.

From the repository root, on an otherwise idle machine:

    python -m benchmarks.startup            # 3 runs of each, about two minutes on 2 cores
    python -m benchmarks.startup --repeats 5

Prints, in seconds (the median of the runs, and every run):

- `python -c "import tensorflow"`: the floor no cascade run can go under;
- `cascade generate` on `sample_data/` (8 samples, 303 inner steps) as it
  comes (model A under XLA where it compiles, `jit_compile="auto"`), with
  `--no-xla`, and with XLA's persistent compilation cache
  (`TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR`; its first run fills
  DIR, the others read it);
- the phases of one run in one process: importing TensorFlow and Keras,
  loading the two models, building the `Cascade`, the first call (tracing,
  and with `jit_compile="auto"` A's XLA probe and compile) and a second call;
  as it comes, without XLA, and with the persistent cache.

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
from cascade_cli.models import load_pair
from cascade_cli.runner import Cascade
from cascade_cli.steps import read_steps
a, b = load_pair("{a}", "{b}")
marks["load A and B"] = time.perf_counter()
cascade = Cascade(a, b)
marks["Cascade(a, b): checks"] = time.perf_counter()
with open_inputs("{x}") as source:
    inputs = source.read(0, source.n_samples)
steps = read_steps("{s}")
cascade.run(inputs, steps)
marks["first call: trace, XLA probe and compile, run"] = time.perf_counter()
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


def generate_argv(output, *extra):
    return [sys.executable, "-m", "cascade_cli", "generate", "--model-a", str(SAMPLE / "model_a.keras"),
            "--model-b", str(SAMPLE / "model_b.keras"), "--inputs", str(SAMPLE / "inputs.h5"),
            "--steps-file", str(SAMPLE / "steps.txt"), "--overwrite", "-o", str(output), *extra]


def line(name, seconds):
    shown = ", ".join(f"{value:.2f}" for value in seconds)
    print(f"{name:<58} median {statistics.median(seconds):5.2f} s  ({shown})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {"PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "r.h5"
        cache = Path(folder) / "xla-cache"
        line('python -c "import tensorflow"',
             [timed([sys.executable, "-c", "import tensorflow"]) for _ in range(args.repeats)])
        line("cascade generate (as it comes, jit_compile=auto)",
             [timed(generate_argv(out), env=env) for _ in range(args.repeats)])
        line("cascade generate --no-xla", [timed(generate_argv(out, "--no-xla"), env=env) for _ in range(args.repeats)])
        flags = {**env, "TF_XLA_FLAGS": f"--tf_xla_persistent_cache_directory={cache}"}
        line("cascade generate, XLA persistent cache (first fills it)",
             [timed(generate_argv(out), env=flags) for _ in range(args.repeats)])
        print(f"  persistent cache: {sum(1 for _ in cache.rglob('*')) if cache.exists() else 0} files")
        code = PHASES.format(a=SAMPLE / "model_a.keras", b=SAMPLE / "model_b.keras", x=SAMPLE / "inputs.h5",
                             s=SAMPLE / "steps.txt")
        phases = {"auto": (code, {}),
                  "no XLA": (code.replace("Cascade(a, b)", "Cascade(a, b, jit_compile=False)"), {}),
                  "auto, XLA cache": (code, {"TF_XLA_FLAGS": f"--tf_xla_persistent_cache_directory={cache}-phases"})}
        print("phases of one run, in one process (s), the variants interleaved:")
        for repeat in range(args.repeats):
            for variant, (text, extra) in phases.items():
                done = subprocess.run([sys.executable, "-c", text], check=True, capture_output=True, text=True,
                                      env={**os.environ, **env, "TF_CPP_MIN_LOG_LEVEL": "3", **extra})
                rows = [row.split("\t") for row in done.stdout.splitlines()]
                shown = "  ".join(f"{name}: {float(seconds):.2f}" for name, seconds in rows)
                print(f"  run {repeat} {variant:<16}{shown}")


if __name__ == "__main__":
    main()
