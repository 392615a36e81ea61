"""Fuzzing training files and inputs: corrupted bytes must end in exit 0 or one `Error:` line.

A small training `.h5` with flat targets, one with padded targets, an inputs
`.npz` and a steps `.npy` are mutated (1 to 16 random bytes flipped, zeroed or set to
0xFF) and each mutant is run as `cascade inspect F` in a subprocess under a
time and an address-space limit (forked from one process that imported the
CLI, so hundreds of cases take seconds). Every outcome must be exit 0 (describing the
file as what it is) or exit 1 with exactly one `Error:` line; never a signal,
a hang, a traceback or an internal error. Training files carry no checksums,
so a mutated value may read back as another value: that is not an error. The
seed is printed; set `CASCADE_FUZZ_SEED` to replay a run. The default run
tries `FAST` mutations; the `slow` one tries `LONG`.
"""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from filetools import FUZZ_MEMORY_LIMIT, FUZZ_TIME_LIMIT_S, fuzz_outcome, fuzz_seed, mutants

FAST = 60
LONG = 300
NAMES = ("flat.h5", "padded.h5", "inputs.npz", "steps.npy")
DESCRIPTIONS = ("training data", "inputs", "steps", "result")  # the first row of `inspect` for each kind


def originals(folder):
    """The files to corrupt, as bytes: flat and padded training `.h5` files and an inputs `.npz`."""
    rng = np.random.default_rng(0)
    steps = np.array([[2, 0, 1], [3, 1, 0], [0, 0, 0], [1, 2, 3]])
    inputs = rng.normal(size=(4, 3, 2)).astype(np.float32)
    flat = rng.normal(size=(int(steps.sum()), 2)).astype(np.float32)
    padded = np.full((4, 3, 3, 2), np.nan, dtype=np.float32)
    padded[np.arange(3) < steps[:, :, None]] = flat
    with h5py.File(folder / "flat.h5", "w") as f:
        f["inputs"], f["steps"], f["targets"] = inputs, steps, flat
    with h5py.File(folder / "padded.h5", "w") as f:
        f["inputs"], f["steps"] = inputs, steps
        f.create_dataset("targets", data=padded, chunks=(1, 3, 3, 2))
    np.savez(folder / "inputs.npz", inputs=inputs)
    np.save(folder / "steps.npy", steps)
    return {name: (folder / name).read_bytes() for name in NAMES}


# Runs each case as `cascade inspect F` in a child forked from one process that
# has imported the CLI once (a fresh interpreter per case costs about a second):
# the child gets the address-space limit, its own stdout and stderr files and is
# killed past the time limit.
_DRIVER = """
import json, os, resource, signal, sys, time
from cascade_cli.cli import main
import cascade_cli.data, cascade_cli.inspection, cascade_cli.results_io, cascade_cli.steps  # what inspect imports
cases, limit_s, memory = json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
for case in cases:
    out, err = os.open(case["out"], os.O_WRONLY | os.O_CREAT, 0o600), os.open(case["err"], os.O_WRONLY | os.O_CREAT, 0o600)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(out, 1); os.dup2(err, 2)
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            sys.argv = ["cascade", *case["args"]]
            try:
                main()
                code = 0
            except SystemExit as end:
                code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    os.close(out); os.close(err)
    deadline = time.monotonic() + limit_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
            code = "hang"
            break
        time.sleep(0.002)
    print(json.dumps(code), flush=True)
"""


def run_all(cases, folder):
    """Runs `cascade ARGS` for each `ARGS` in `cases` under the limits: one `CompletedProcess` each."""
    specs = [{"args": [str(a) for a in args], "out": str(folder / f"out{i}"), "err": str(folder / f"err{i}")}
             for i, args in enumerate(cases)]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    driver = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(specs), str(FUZZ_TIME_LIMIT_S),
                             str(FUZZ_MEMORY_LIMIT)],
                            capture_output=True, text=True, env=env, timeout=60 + len(cases) * (FUZZ_TIME_LIMIT_S + 1))
    assert driver.returncode == 0, driver.stderr[-2000:]
    codes = [json.loads(line) for line in driver.stdout.splitlines()]
    assert len(codes) == len(cases), driver.stdout[-2000:]
    return [subprocess.CompletedProcess(spec["args"], code, open(spec["out"]).read(), open(spec["err"]).read())
            for spec, code in zip(specs, codes)]


def outcome(done):
    """`("ok" | "error", None)` for a clean outcome (`filetools.fuzz_outcome`) that describes the file when it
    exits 0, or `("bad", what is wrong)`."""
    kind, wrong = fuzz_outcome(done)
    if kind != "ok":
        return kind, wrong
    first = (done.stdout.splitlines() or [""])[0]
    if not first.startswith(DESCRIPTIONS):  # a mutated key may make training data read as inputs
        return "bad", f"exit 0 without describing the file: {done.stdout[-800:]}"
    return "ok", None


def fuzz(tmp_path, count):
    seed = fuzz_seed()
    cases = mutants(tmp_path, originals(tmp_path), count, np.random.default_rng(seed))

    outcomes = run_all([["inspect", path] for path, _, _ in cases], tmp_path)
    results = []
    for (path, name, how), done in zip(cases, outcomes):
        kind, wrong = outcome(done)
        results.append((kind, f"inspect {path.name} ({how}): {wrong}" if wrong else None))
    tally = {kind: sum(1 for k, _ in results if k == kind) for kind in ("ok", "error", "bad")}
    print(f"{count} mutations: {tally['ok']} exit 0, {tally['error']} one Error: line, {tally['bad']} bad")
    failures = [line for _, line in results if line]
    assert not failures, f"seed {seed}: {len(failures)} bad outcomes in {count} mutations:\n" + "\n".join(failures[:20])


def test_corrupted_training_files_and_inputs_end_cleanly(tmp_path):
    fuzz(tmp_path, FAST)


@pytest.mark.slow
def test_corrupted_training_files_and_inputs_end_cleanly_long(tmp_path):
    fuzz(tmp_path, LONG)
