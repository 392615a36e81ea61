"""Peak memory and time of one epoch of `CascadeModel.fit`, whole and in windows (issue 32, truncated BPTT).

    python -m benchmarks.tbptt                          # Ta = 2,000, N = 4: whole, window=500, window=100
    python -m benchmarks.tbptt --outer 1000 --windows 100,20
    python -m benchmarks.tbptt --quick                  # Ta = 200, windows 50 and 10: checks the script works

Each run is one process (its peak RSS read by a wrapper, `bench.peak_rss`) training one epoch, one batch of
N = 4 samples, on the sample models (`sample_data/`: the plain GRU A turned into its state form by
`models.state_form`, the GRUCell B) with `state="carry"`, SGD, mse against random targets, inputs drawn like the
sample task's features and steps uniform in 0..8. The seconds include tracing the step, which unrolls one
copy of the window's graph per window. Not a test: the figures go to `benchmarks/RESULTS.md` by hand, with the
machine and its load.
"""

import argparse
import platform
import sys
from pathlib import Path

from benchmarks.bench import peak_rss

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"


def one(outer, window, samples=4):
    """Trains one epoch (one batch) in this process."""
    import keras
    import numpy as np

    from cascade_cli.run.models import state_form
    from cascade_cli.train.keras_model import CascadeModel

    a = state_form(keras.saving.load_model(SAMPLES / "model_a.keras", compile=False))
    b = keras.saving.load_model(SAMPLES / "model_b.keras", compile=False)
    rng = np.random.default_rng(0)
    inputs = np.stack([rng.uniform(0.5, 1.5, (samples, outer)), rng.uniform(0.5, 1.5, (samples, outer)),
                       rng.uniform(-np.pi / 2, np.pi / 2, (samples, outer))], axis=-1).astype(np.float32)
    steps = rng.integers(0, 9, size=(samples, outer))
    targets = rng.normal(size=(samples, outer, 8, b.outputs[0].shape[-1])).astype(np.float32)
    model = CascadeModel(a, b, state="carry", window=window)
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    model.fit((inputs, steps), targets, batch_size=samples, epochs=1, shuffle=False, verbose=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outer", type=int, default=2000)
    parser.add_argument("--windows", default="500,100")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child run: 0 is whole
    args = parser.parse_args(argv)
    if args.one is not None:
        one(args.outer, args.one or None)
        return
    outer = 200 if args.quick else args.outer
    windows = [None, *(int(w) for w in ("50,10" if args.quick else args.windows).split(","))]
    print(f"Ta = {outer}, N = 4, {platform.machine()}, {platform.processor() or 'cpu'}")
    print("| run | peak RSS (MiB) | seconds (process) |")
    print("| --- | --- | --- |")
    for window in windows:
        mib, seconds = peak_rss([sys.executable, "-m", "benchmarks.tbptt", "--outer", str(outer),
                                 "--one", str(window or 0)])
        print(f"| {'whole' if window is None else f'window={window}'} | {mib:,.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
