"""Peak memory of `cascade generate --state carry` on a long input, whole and in windows (issue 32).

    python -m benchmarks.windows                     # Ta = 100,000, N = 4, the sample models: whole, --window 1000
    python -m benchmarks.windows --outer 10000 --windows 100,1000
    python -m benchmarks.windows --quick             # Ta = 2,000: checks the script works

Each run is one `cascade generate` process (its peak RSS read by a wrapper, `bench.peak_rss`) on the sample
models (`sample_data/`: a plain GRU A, a GRUCell B in step form) with `--state carry`, inputs `(N, Ta, 3)` drawn
like the sample task's features and steps uniform in 0..8. Every windowed result is compared with the whole
run's (values within 1e-6, lengths exactly). Not a test: the figures go to `benchmarks/RESULTS.md` by hand, with
the machine and its load.
"""

import argparse
import os
import platform
import tempfile
from pathlib import Path

import h5py
import numpy as np

from benchmarks.bench import cascade_command, peak_rss

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"


def write_inputs(folder, *, samples, outer, seed=0):
    """Writes `X.h5` (dataset `inputs`, `(samples, outer, 3)`) and `S.npy` (`(samples, outer)` steps in 0..8)."""
    rng = np.random.default_rng(seed)
    features = np.stack([rng.uniform(0.5, 1.5, (samples, outer)), rng.uniform(0.5, 1.5, (samples, outer)),
                         rng.uniform(-np.pi / 2, np.pi / 2, (samples, outer))], axis=-1).astype(np.float32)
    with h5py.File(folder / "X.h5", "w") as file:
        file.create_dataset("inputs", data=features)
    np.save(folder / "S.npy", rng.integers(0, 9, size=(samples, outer)).astype(np.int64))


def run(folder, out, window=None, *, state="carry"):
    """`(peak RSS MiB, seconds)` of one `cascade generate`, `--window` where given."""
    argv = [*cascade_command(), "generate", "--model-a", str(SAMPLES / "model_a.keras"),
            "--model-b", str(SAMPLES / "model_b.keras"), "--inputs", str(folder / "X.h5"),
            "--steps-file", str(folder / "S.npy"), "--state", state, "-o", str(out)]
    if window is not None:
        argv += ["--window", str(window)]
    return peak_rss(argv)


def same(whole, windowed):
    """Whether two results hold the same lengths and values within 1e-6 (and the same tokens)."""
    with h5py.File(whole, "r") as a, h5py.File(windowed, "r") as b:
        if sorted(a) != sorted(b):
            return False
        for key in a:
            x, y = a[key][...], b[key][...]
            if x.shape != y.shape:
                return False
            if x.dtype.kind == "f" and not np.allclose(x, y, rtol=0, atol=1e-6):
                return False
            if x.dtype.kind != "f" and not np.array_equal(x, y):
                return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--outer", type=int, default=100_000)
    parser.add_argument("--windows", default="1000", help="comma-separated window sizes")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole run (and the comparison)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.outer, args.windows = 2000, "500"
    windows = [int(w) for w in args.windows.split(",") if w]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f} at start; "
          f"N={args.samples}, Ta={args.outer:,}, --state carry, the sample models")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_inputs(folder, samples=args.samples, outer=args.outer)
        rows = []
        if not args.no_whole:
            peak, seconds = run(folder, folder / "whole.h5")
            rows.append(("whole", peak, seconds, "-"))
            print(f"whole: peak RSS {peak:,.0f} MiB, {seconds:.1f} s", flush=True)
        for window in windows:
            out = folder / f"w{window}.h5"
            peak, seconds = run(folder, out, window)
            equal = "-" if args.no_whole else ("yes" if same(folder / "whole.h5", out) else "NO")
            rows.append((f"--window {window}", peak, seconds, equal))
            print(f"--window {window}: peak RSS {peak:,.0f} MiB, {seconds:.1f} s, equals the whole run: {equal}",
                  flush=True)
        print(f"load {os.getloadavg()[0]:.1f} at the end")
        print("\n| run | peak RSS (MiB) | seconds | equals the whole run |\n| --- | --- | --- | --- |")
        for label, peak, seconds, equal in rows:
            print(f"| {label} | {peak:,.0f} | {seconds:.1f} | {equal} |")


if __name__ == "__main__":
    main()
