"""Shared helpers of the file tests: write small HDF5 and text files, quote paths for messages, a dead pid,
and what the fuzz tests (`test_fuzz_results`, `test_fuzz_training`) share: the seed, the mutants, the outcome."""

import os
import re
import subprocess
import sys
import time

import h5py


def write_h5(path, **datasets):
    """Writes each keyword as a dataset of a new HDF5 file at `path`; returns `path`."""
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
    return path


def write_text(path, text):
    """Writes `text` as UTF-8; returns `path`."""
    path.write_text(text, encoding="utf-8")
    return path


def quoted(path):
    """Returns `'path'` escaped for `pytest.raises(match=...)`."""
    return re.escape(f"'{path}'")


def dead_pid():
    """The id of a process that has just ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------ fuzzing

FUZZ_TIME_LIMIT_S = 30  # a fuzzed command that runs longer hangs
FUZZ_MEMORY_LIMIT = 3 << 30  # the address space a fuzzed command may take


def fuzz_seed():
    """The seed of a fuzz run: `CASCADE_FUZZ_SEED` to replay one, else a new one; printed either way."""
    seed = int(os.environ.get("CASCADE_FUZZ_SEED", time.time_ns() % 2**32))
    print(f"fuzz seed {seed} (CASCADE_FUZZ_SEED={seed} replays it)")
    return seed


def mutate(data, rng):
    """Returns `data` with 1-16 random bytes flipped, zeroed or set to 0xFF, and what was done."""
    data = bytearray(data)
    count = int(rng.integers(1, 17))
    where = rng.integers(0, len(data), size=count)
    kind = ("flip", "zero", "0xff")[int(rng.integers(3))]
    for position in where:
        data[position] = {"flip": data[position] ^ 0xFF, "zero": 0, "0xff": 0xFF}[kind]
    return bytes(data), f"{kind} at {sorted(int(p) for p in where)}"


def mutants(folder, originals, count, rng):
    """Writes `count` mutants of the `originals` (`{name: bytes}`, taken in turn by name) into `folder`.

    Returns:
        `(path, name, how)` per mutant: its file, the original's name and what `mutate` did.
    """
    names = sorted(originals)
    cases = []
    for index in range(count):
        name = names[index % len(names)]
        data, how = mutate(originals[name], rng)
        path = folder / f"m{index}-{name}"
        path.write_bytes(data)
        cases.append((path, name, how))
    return cases


def fuzz_outcome(done):
    """How one fuzzed command ended: `("ok" | "error", None)` when cleanly, or `("bad", what is wrong)`.

    Clean is exit 0 (`"ok"`: the caller checks what it wrote) or exit 1 with
    exactly one `Error:` line that is not an internal error (`"error"`);
    a hang (`returncode == "hang"`), a signal, a traceback or another exit
    code is bad.
    """
    output = f"{done.stdout}\n{done.stderr}"
    if done.returncode == "hang":
        return "bad", f"no answer in {FUZZ_TIME_LIMIT_S} s"
    if done.returncode < 0:
        return "bad", f"killed by signal {-done.returncode}"
    if "Traceback" in output or "Exception ignored" in output:
        return "bad", "a traceback: " + output[-1500:]
    if done.returncode == 1:
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
        if len(errors) != 1:
            return "bad", f"expected one Error: line, received {len(errors)}: {done.stderr[-800:]}"
        if "internal error" in errors[0]:
            return "bad", errors[0]
        return "error", None
    if done.returncode != 0:
        return "bad", f"exit {done.returncode}: {output[-800:]}"
    return "ok", None
