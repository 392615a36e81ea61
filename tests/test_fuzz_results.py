"""Fuzzing result files: corrupted bytes must end in exit 0 with a correct result or one `Error:` line.

Small ragged and padded `.h5` results and a result `.npz` are mutated (1 to 16
random bytes flipped, zeroed or set to 0xFF) and each mutant is run as
`cascade inspect F` and `cascade export F -o F.csv` in a subprocess under a time
and an address-space limit. Every outcome must be exit 0 (with the export
equal to the original's where the format detects corruption: HDF5 results
carry checksums) or exit 1 with exactly one `Error:` line; never a signal, a
hang, a traceback or an internal error. The seed is printed; set
`CASCADE_FUZZ_SEED` to replay a run. The default run tries `FAST` mutations;
the `slow` one tries `LONG`.
"""

import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from filetools import FUZZ_MEMORY_LIMIT, FUZZ_TIME_LIMIT_S, fuzz_outcome, fuzz_seed, mutants
from cascade_cli.result import CascadeResult
from cascade_cli.results_io import write_result

FAST = 8
LONG = 400
ATTRS = {"stop_rule": "norm", "stop_value": 1.5, "max_steps": 4, "run_id": "0123456789abcdef", "seed": 3}


def originals(folder):
    """The files to corrupt: a ragged and a time-major padded `.h5`, a ragged `.npz`, a ragged `.h5` with sampled
    tokens; with their csv exports."""
    lengths = np.array([[2, 0, 1], [3, 4, 0], [0, 0, 0], [1, 1, 4]])
    result = CascadeResult(np.arange(int(lengths.sum()) * 3, dtype=np.float32).reshape(-1, 3) / 7, lengths)
    files = {
        "ragged.h5": dict(format="h5"),
        "padded.h5": dict(format="h5", layout="padded", pad_value=-1.0, time_major=True),
        "ragged.npz": dict(format="npz"),
        "tokens.h5": dict(format="h5"),
    }
    with_tokens = CascadeResult(result.values, lengths, np.arange(result.total) % 5)
    made = {}
    for name, options in files.items():
        path = folder / name
        write_result(path, with_tokens if name.startswith("tokens") else result, attrs=ATTRS, **options)
        made[name] = (path.read_bytes(), run(["export", path, "-o", folder / f"{name}.csv"]).stdout)
        assert (folder / f"{name}.csv").exists()
        made[name] = (path.read_bytes(), (folder / f"{name}.csv").read_text())
    return made


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (FUZZ_MEMORY_LIMIT, FUZZ_MEMORY_LIMIT))


def run(args, *, cwd=None):
    """Runs `cascade ARGS` in a subprocess under the time and memory limits."""
    command = [sys.executable, "-c", "from cascade_cli.cli import main; main()", *map(str, args)]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=FUZZ_TIME_LIMIT_S, cwd=cwd, env=env,
                              preexec_fn=_limits)
    except subprocess.TimeoutExpired as error:
        return subprocess.CompletedProcess(command, "hang", error.stdout or "", error.stderr or "")


def problem(done, *, expected_csv=None, csv_path=None, exact=False):
    """What is wrong with one run's outcome, or None."""
    kind, wrong = fuzz_outcome(done)
    if kind != "ok":
        return wrong
    if csv_path is not None:
        text = csv_path.read_text()
        if exact and text != expected_csv:
            return "exit 0 with a csv that differs from the original's (HDF5 checksums should catch it)"
        if text.splitlines()[0] != expected_csv.splitlines()[0]:
            return "exit 0 with another csv header"
    return None


def fuzz(tmp_path, count):
    seed = fuzz_seed()
    made = originals(tmp_path)
    cases = mutants(tmp_path, {name: data for name, (data, _) in made.items()}, count, np.random.default_rng(seed))

    def one(case):
        path, name, how = case
        csv = path.with_name(path.name + ".csv")
        found = []
        for args, check in ((["inspect", path], {}),
                            (["export", path, "-o", csv], {"csv_path": csv, "expected_csv": made[name][1],
                                                           "exact": name.endswith(".h5")})):
            done = run(args)
            if done.returncode != 0:
                check = {}
            wrong = problem(done, **check)
            if wrong:
                found.append(f"{args[0]} {path.name} ({how}): {wrong}")
        leftovers = [entry for entry in os.listdir(tmp_path) if entry.startswith(f".{csv.name}")]
        if leftovers:
            found.append(f"export {path.name} left {leftovers}")
        return found

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [line for found in pool.map(one, cases) for line in found]
    assert not failures, f"seed {seed}: {len(failures)} bad outcomes in {count} mutations:\n" + "\n".join(failures[:20])


def test_corrupted_results_end_cleanly(tmp_path):
    fuzz(tmp_path, FAST)


@pytest.mark.slow
def test_corrupted_results_end_cleanly_long(tmp_path):
    fuzz(tmp_path, LONG)
