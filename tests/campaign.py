"""A seeded adversarial campaign against what issue 34 built: bad files, kills, odd outputs, flags, API misuse.

Run from the repository root (not collected by pytest):

    PYTHONPATH=$PWD python -m tests.campaign --seed 1 --trials 160 --out /tmp/campaign

Every trial is one real `cascade` process (or a Python snippet using the API)
under `timeout` and `prlimit` (address space, file size), in a folder of its
own, on tiny models made once in `OUT/fixtures`. Each trial is classified:

- `clean`: it did what it should (a refusal with one `Error:` line, or a
  correct result), and every file it read is intact;
- `traceback`: a Python traceback reached the user;
- `hang`: it ran past its time limit;
- `signal`: it died of a signal nobody sent it (or a sent one was not honoured
  as `128 + N`);
- `file lost`: an input, or an output that was to be kept, changed or vanished;
- `half file`: a temporary or partial file was left where the next writer
  should have cleaned it, or an output is unreadable;
- `silently wrong`: exit 0 where it must refuse, or a result whose values are
  wrong, or a message that names the wrong cause (memory for a full disk);
- `unexpected error`: a refusal where it should have worked.

The table and one line per trial (its command and class) are written to
`OUT/campaign.md` and `OUT/trials.jsonl`. Full-disk trials mount a small tmpfs
and run only as root; elsewhere they are skipped.
"""

import argparse
import collections
import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASCADE = [sys.executable, "-c", "from cascade_cli.cli import main; main()"]
TIME_LIMIT = 90  # seconds a trial may run before it counts as a hang
MEMORY_LIMIT = 12 << 30  # prlimit --as: TensorFlow reserves much address space it never touches
FILE_LIMIT = 1 << 30  # prlimit --fsize
CLASSES = ("clean", "traceback", "hang", "signal", "file lost", "half file", "silently wrong", "unexpected error")
N, TA, F = 5, 3, 3
STEPS = np.array([[2, 0, 3], [0, 0, 0], [1, 1, 0], [3, 2, 1], [0, 4, 0]])


# ---------------------------------------------------------------- fixtures


def make_fixtures(folder):
    """Tiny models and files, made once: `{name: path}`."""
    sys.path.insert(0, str(HERE))
    import builders
    import h5py
    import keras

    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("a.keras", "b.keras", "nan_b.keras", "exp_a.keras", "g.keras",
                                              "x.h5", "big_x.h5", "steps.txt", "r.h5", "train.h5", "fb.keras",
                                              "part0.h5", "part1.h5")}
    if all(path.exists() for path in paths.values()):
        return paths
    builders.model_a().save(paths["a.keras"])
    builders.step_b().save(paths["b.keras"])
    builders.feedback_b(output_size=3).save(paths["fb.keras"])
    nan = builders.step_b()
    weights = nan.get_weights()
    weights[-1] = np.full_like(weights[-1], np.nan)
    nan.set_weights(weights)
    nan.save(paths["nan_b.keras"])
    inputs = keras.Input(shape=(TA, F))
    keras.Model(inputs, keras.layers.Dense(4, activation="exponential", kernel_initializer="ones")(inputs)).save(
        paths["exp_a.keras"])
    with h5py.File(paths["x.h5"], "w") as f:
        f["inputs"] = builders.inputs(N, TA)
    with h5py.File(paths["big_x.h5"], "w") as f:
        f["inputs"] = builders.inputs(400, TA, seed=5)
    paths["steps.txt"].write_text("\n".join(" ".join(map(str, row)) for row in STEPS) + "\n")
    with h5py.File(paths["train.h5"], "w") as f:
        f["inputs"] = builders.inputs(N, TA, seed=3)
        f["steps"] = STEPS
        f["targets"] = np.random.default_rng(3).normal(size=(int(STEPS.sum()), 2)).astype("float32")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    models = ["--model-a", paths["a.keras"], "--model-b", paths["b.keras"]]
    for args in (["generate", *models, "--inputs", paths["x.h5"], "--steps-file", paths["steps.txt"], "--no-xla",
                  "-o", paths["r.h5"]],
                 ["pack", *models, "--max-steps", 3, "-o", paths["g.keras"]],
                 *(["generate", *models, "--inputs", paths["big_x.h5"], "--steps", "3,1,2", "--no-xla", "--shard",
                    f"{i}/2", "-o", paths[f"part{i}.h5"]] for i in (0, 1))):
        subprocess.run(CASCADE + [str(arg) for arg in args], env=env, check=True, capture_output=True)
    return paths


def digest(path):
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        return {str(p.relative_to(path)): digest(p) for p in sorted(path.rglob("*")) if p.is_file()}
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        return f"mode {stat.S_IFMT(mode):o}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ running


class Run:
    """One process: its exit code, output and whether it hit the time limit."""

    def __init__(self, returncode, stdout, stderr, hung, seconds):
        self.returncode, self.stdout, self.stderr, self.hung, self.seconds = returncode, stdout, stderr, hung, seconds

    @property
    def error_lines(self):
        return [line for line in self.stderr.splitlines() if line.startswith("Error:")]


def limited(argv, *, limit=TIME_LIMIT, memory=MEMORY_LIMIT):
    return ["timeout", "-s", "KILL", str(limit), "prlimit", f"--as={memory}", f"--fsize={FILE_LIMIT}", "--",
            *map(str, argv)]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
            "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def run(args, cwd, *, limit=TIME_LIMIT, memory=MEMORY_LIMIT, python=None):
    argv = [sys.executable, "-c", python] if python is not None else CASCADE + list(args)
    started = time.monotonic()
    done = subprocess.run(limited(argv, limit=limit, memory=memory), cwd=cwd, env=env(), capture_output=True,
                          text=True)
    seconds = time.monotonic() - started
    return Run(done.returncode, done.stdout, done.stderr, done.returncode == 137 and seconds >= limit - 1, seconds)


def start(args, cwd):
    return subprocess.Popen(limited(CASCADE + list(args)), cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_at(process, delay, signum):
    """Waits `delay` seconds, sends `signum` to the process (the cascade under timeout/prlimit), and waits."""
    time.sleep(delay)
    sent = time.monotonic()
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError, ValueError):
            # `timeout` runs prlimit, which execs cascade: signal cascade itself, as a user's kill would
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            os.kill(int(children[0]) if children else process.pid, signum)
    try:
        stdout, stderr = process.communicate(timeout=TIME_LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return Run(-9, stdout, stderr, True, time.monotonic() - sent)
    return Run(process.returncode, stdout, stderr, False, time.monotonic() - sent)


def basic_class(result, *, expect, words=(), not_words=(), sent=None):
    """Classifies a run by its exit alone: the common part of every trial's check."""
    if result.hung:
        return "hang", "ran past its time limit"
    if "Traceback" in result.stderr or "Traceback" in result.stdout:
        return "traceback", result.stderr.strip().splitlines()[-1][:200]
    code = result.returncode
    if sent is not None:
        if code in (0, 128 + sent, -sent, 1) or (sent == signal.SIGKILL and code in (-9, 137)):
            return None, ""
        return "signal", f"exit {code} after signal {sent}"
    if code < 0 or code > 128:
        return "signal", f"exit {code}"
    if expect == "ok" and code != 0:
        return "unexpected error", (result.error_lines or [f"exit {code}"])[0][:200]
    if expect == "error":
        if code == 0:
            return "silently wrong", "exit 0 where it must refuse"
        if len(result.error_lines) != 1:
            return "silently wrong", f"exit {code} without one Error line: {result.stderr[-200:]!r}"
        line = result.error_lines[0]
        missing = [word for word in words if word not in line]
        present = [word for word in not_words if word in line]
        if missing or present:
            return "silently wrong", f"message {line[:200]!r} lacks {missing} or holds {present}"
    return None, ""


def temporaries(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if ".cascade-tmp-" in p.name)


# ------------------------------------------------------------------ trials


class Trial:
    """One trial's folder, fixtures and what it must leave intact."""

    def __init__(self, folder, fixtures, rng):
        self.folder, self.fixtures, self.rng = folder, fixtures, rng
        folder.mkdir(parents=True)
        self.keep = {}

    def copy(self, name, target=None, *, keep=True):
        target = self.folder / (target or name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.fixtures[name], target)
        if keep:
            self.keep[target] = digest(target)
        return target

    def protect(self, path):
        self.keep[Path(path)] = digest(path)

    def lost(self):
        gone = []
        for path, before in self.keep.items():
            if not os.path.lexists(path) or digest(path) != before:
                gone.append(str(path.relative_to(self.folder)))
        return gone


def finish(trial, result, **kwargs):
    category, detail = basic_class(result, **kwargs)
    if category is None and trial.lost():
        category, detail = "file lost", f"changed or gone: {trial.lost()}"
    if category is None and temporaries(trial.folder):
        category, detail = "half file", f"left: {temporaries(trial.folder)}"
    return category or "clean", detail


def t_special_output(trial):
    """A FIFO, a character device or a socket as -o (with or without --overwrite): refused, kept."""
    rng = trial.rng
    kind = rng.choice(["fifo", "chardev", "socket"])
    command = rng.choice(["export-csv", "export-npz", "export-h5", "generate", "pack", "merge"])
    suffix = {"export-csv": ".csv", "export-npz": ".npz", "pack": ".keras"}.get(command, ".h5")
    target = trial.folder / f"node{suffix}"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "chardev":
        os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own, in the trial folder
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
        sock.close()
    trial.protect(target)
    r, a, b, x, p0, p1 = (trial.copy(name) for name in ("r.h5", "a.keras", "b.keras", "x.h5", "part0.h5", "part1.h5"))
    args = {"export-csv": ["export", r], "export-npz": ["export", r], "export-h5": ["export", r],
            "generate": ["generate", "--model-a", a, "--model-b", b, "--inputs", x, "--steps", "2,0,3", "--no-xla"],
            "pack": ["pack", "--model-a", a, "--model-b", b, "--max-steps", 3], "merge": ["merge", p0, p1]}[command]
    overwrite = ["--overwrite"] if rng.random() < 0.7 else []
    result = run([*args, "-o", target, *overwrite], trial.folder)
    return f"{command} -o {kind} {' '.join(overwrite)}", *finish(trial, result, expect="error",
                                                                  words=["not a regular file"])


def t_input_inside_output(trial):
    """An output folder (export-model, train) or file that holds or is an input: refused, never --overwrite."""
    rng = trial.rng
    case = rng.choice(["export-model", "train-model", "train-data", "generate-link", "generate-dotdot"])
    overwrite = ["--overwrite"] if rng.random() < 0.7 else []
    d = trial.folder / "d"
    d.mkdir()
    if case == "export-model":
        g = trial.copy("g.keras", "d/g.keras")
        args = ["export-model", g, "--saved-model", d if rng.random() < 0.5 else trial.folder / "d" / ".." / "d"]
    elif case.startswith("train"):
        a = trial.copy("a.keras", "d/model_a.keras" if case == "train-model" else "a.keras")
        data = trial.copy("train.h5", "d/checkpoints/data.h5" if case == "train-data" else "train.h5")
        b = trial.copy("b.keras")
        args = ["train", "--model-a", a, "--model-b", b, "--data", data, "--out-dir", d, "--epochs", 1, "--no-xla"]
    else:
        x, a, b = trial.copy("x.h5", "d/x.h5"), trial.copy("a.keras"), trial.copy("b.keras")
        out = d / "link.h5"
        if case == "generate-link":
            out.symlink_to(x)
        else:
            out = d / ".." / "d" / "x.h5"
        overwrite = ["--overwrite"]
        args = ["generate", "--model-a", a, "--model-b", b, "--inputs", x, "--steps", "1,1,1", "--no-xla", "-o", out]
    result = run([*args, *overwrite], trial.folder)
    return f"{case} {' '.join(overwrite)}", *finish(trial, result, expect="error", words=["one of this command's "
                                                                                          "inputs"],
                                                    not_words=["--overwrite"] if case[:3] != "gen" else [])


def t_killed_writer(trial):
    """A writer killed (SIGKILL, SIGTERM or SIGHUP) at a random moment; the next writer of the target cleans up."""
    rng = trial.rng
    command = rng.choice(["export-model", "export-csv", "export-npz", "generate", "pack"])
    signum = int(rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGHUP]))
    delay = float(rng.uniform(0.5, 12.0))
    had_old = rng.random() < 0.5
    g, r, a, b, x = (trial.copy(name) for name in ("g.keras", "r.h5", "a.keras", "b.keras", "big_x.h5"))
    name = {"export-model": "sm", "export-csv": "out.csv", "export-npz": "out.npz", "generate": "out.h5",
            "pack": "out.keras"}[command]
    target = trial.folder / name
    args = {"export-model": ["export-model", g, "--saved-model", target],
            "export-csv": ["export", r, "-o", target], "export-npz": ["export", r, "--layout", "padded", "-o", target],
            "generate": ["generate", "--model-a", a, "--model-b", b, "--inputs", x, "--steps", "2,1,3", "--no-xla",
                         "--num-samples", 40, "--batch-size", 64, "-o", target],
            "pack": ["pack", "--model-a", a, "--model-b", b, "--max-steps", 3, "-o", target]}[command]
    overwrite = ["--overwrite"] if command != "export-model" or had_old else []
    if had_old:  # an earlier output must survive the killed run whole (old or new, never half)
        done = run([*args, *overwrite], trial.folder)
        if done.returncode != 0:
            return f"{command} (first write)", *finish(trial, done, expect="ok")
    before = digest(target) if had_old else None
    killed = kill_at(start([*args, *overwrite], trial.folder), delay, signum)
    category, detail = basic_class(killed, expect="ok", sent=signum)
    label = f"{command} killed by {signal.Signals(signum).name} after {delay:.1f}s{' over an old output' if had_old else ''}"
    if category:
        return label, category, detail
    if killed.returncode not in (0, -9, 137) and killed.returncode != 128 + signum:
        return label, "signal", f"exit {killed.returncode} after {signal.Signals(signum).name}"
    if os.path.lexists(target) and not had_old and killed.returncode != 0 and not complete(target, trial.folder):
        return label, "half file", f"an incomplete {name} exists after a killed first write"
    if had_old and killed.returncode != 0 and digest(target) != before:
        return label, "file lost", f"the old {name} changed though the run was killed"
    if signum != signal.SIGKILL and temporaries(trial.folder):
        return label, "half file", f"a {signal.Signals(signum).name} left {temporaries(trial.folder)}"
    again = run([*args, "--overwrite"] if command != "export-model" else [*args, "--overwrite"], trial.folder)
    category, detail = finish(trial, again, expect="ok")
    if category == "clean" and command == "export-model" and not (target / "saved_model.pb").is_file():
        category, detail = "half file", "no saved_model.pb after the next export"
    return label + ", then written again", category, detail


def complete(target, cwd):
    """Whether an output is whole (the kill came after its rename): a SavedModel folder, or what inspect reads."""
    if Path(target).is_dir():
        return (Path(target) / "saved_model.pb").is_file() and (Path(target) / "variables").is_dir()
    if Path(target).suffix == ".csv":
        lines = Path(target).read_text().splitlines()
        return bool(lines) and lines[0].startswith("sample,") and Path(target).read_text().endswith("\n")
    return run(["inspect", target], cwd).returncode == 0


def t_nonfinite(trial):
    """NaN weights in B or an A that overflows: generate stops naming the model unless --allow-nonfinite."""
    rng = trial.rng
    which = rng.choice(["nan_b", "exp_a"])
    sampler = rng.choice(["", "greedy", "categorical"]) if which == "nan_b" else ""
    allow = rng.random() < 0.3
    a = trial.copy("exp_a.keras" if which == "exp_a" else "a.keras")
    b = trial.copy("nan_b.keras" if which == "nan_b" else "b.keras")
    x = trial.folder / "x.h5"
    import h5py

    inputs = np.zeros((N, TA, F), "float32")
    n, t = int(rng.integers(0, N)), int(rng.choice([0, 2]))
    inputs[n, t, 0] = 1000.0
    with h5py.File(x, "w") as f:
        f["inputs"] = inputs
    trial.protect(x)
    extra = ["--sampler", sampler] if sampler else []
    out = trial.folder / "r.h5"
    result = run(["generate", "--model-a", a, "--model-b", b, "--inputs", x, "--steps", "2,0,3", "--no-xla",
                  "--batch-size", int(rng.integers(1, 6)), *extra, *(["--allow-nonfinite"] if allow else []),
                  "-o", out], trial.folder)
    label = f"generate with {which} {sampler} {'--allow-nonfinite' if allow else ''}"
    if allow:
        category, detail = finish(trial, result, expect="ok")
        if category == "clean":
            shown = run(["inspect", out], trial.folder)
            if "NaN or Inf" not in shown.stdout:
                return label, "silently wrong", "inspect of the result says nothing of its NaN values"
        return label, category, detail
    words = ["model B", "sample 0, outer step 0, inner step 0"] if which == "nan_b" else [
        "model A", f"sample {n}, outer step {t}, inner step 0"]
    category, detail = finish(trial, result, expect="error", words=words)
    if category == "clean" and os.path.lexists(out):
        return label, "half file", "an output was written"
    return label, category, detail


def t_inspect_nonfinite(trial):
    """inspect of a model with NaN weights, or of a result holding NaN, says so; a clean one does not."""
    which = trial.rng.choice(["nan_b.keras", "b.keras", "r.h5"])
    path = trial.copy(which)
    result = run(["inspect", path], trial.folder)
    category, detail = finish(trial, result, expect="ok")
    said = "NaN or Inf" in result.stdout
    if category == "clean" and said != (which == "nan_b.keras"):
        return f"inspect {which}", "silently wrong", f"non-finite warning shown: {said}"
    return f"inspect {which}", category, detail


def t_num_samples(trial):
    """A huge --num-samples with per-sample steps, sharded: runs in the shard's time and little memory."""
    rng = trial.rng
    k = int(rng.choice([10**6, 5 * 10**7, 2**31 - 1, int(rng.integers(2, 10**9))]))
    total = N * k
    count = int(max(total // int(rng.integers(50, 400)), 1))
    index = int(rng.integers(0, count))
    x, a, b, steps = (trial.copy(name) for name in ("x.h5", "a.keras", "b.keras", "steps.txt"))
    out = trial.folder / "r.h5"
    result = run(["generate", "--model-a", a, "--model-b", b, "--inputs", x, "--steps-file", steps, "--no-xla",
                  "--num-samples", k, "--shard", f"{index}/{count}", "-o", out], trial.folder, memory=8 << 30)
    label = f"--num-samples {k} --shard {index}/{count}"
    category, detail = finish(trial, result, expect="ok")
    if category != "clean":
        return label, category, detail
    sys.path.insert(0, str(ROOT))
    from cascade_cli.results_io import read_result
    from cascade_cli.shards import shard_range

    first, last = shard_range(total, index=index, count=count)
    lengths = read_result(out).lengths
    if not np.array_equal(lengths, STEPS[np.arange(first, last) // k]):
        return label, "silently wrong", "lengths are not the steps of input i // K"
    return label, "clean", f"{last - first} samples in {result.seconds:.1f}s"


def t_sigterm_huge(trial):
    """A SIGTERM during a --num-samples 2**31-1 run ends it promptly (128 + 15) and leaves nothing."""
    x, a, b = (trial.copy(name) for name in ("x.h5", "a.keras", "b.keras"))
    delay = float(trial.rng.uniform(3, 12))
    process = start(["generate", "--model-a", a, "--model-b", b, "--inputs", x, "--steps", "1,2,1", "--no-xla",
                     "--num-samples", 2**31 - 1, "-o", trial.folder / "r.h5"], trial.folder)
    killed = kill_at(process, delay, signal.SIGTERM)
    label = f"--num-samples 2**31-1, SIGTERM after {delay:.1f}s"
    category, detail = basic_class(killed, expect="ok", sent=signal.SIGTERM)
    if category:
        return label, category, detail
    if killed.seconds > 5:
        return label, "hang", f"took {killed.seconds:.1f}s to end after SIGTERM"
    if killed.returncode not in (128 + signal.SIGTERM, 1):
        return label, "signal", f"exit {killed.returncode}"
    return label, *finish(trial, Run(0, "", "", False, 0), expect="ok")


def t_num_samples_limit(trial):
    x, a, b = (trial.copy(name) for name in ("x.h5", "a.keras", "b.keras"))
    k = int(trial.rng.choice([2**61, 2**62, 2**63, 10**30]))
    result = run(["generate", "--model-a", a, "--model-b", b, "--inputs", x, "--steps", "1,1,1", "--no-xla",
                  "--num-samples", k, "-o", trial.folder / "r.h5"], trial.folder)
    return f"--num-samples {k}", *finish(trial, result, expect="error", words=["--num-samples: expected at most"])


_CONFIG_CHANGES = [("exclude_stop_step", "false", "error"), ("exclude_stop_step", "no", "error"),
                   ("exclude_stop_step", 0, "error"), ("exclude_stop_step", 1, "error"),
                   ("exclude_stop_step", None, "error"), ("exclude_stop_step", True, "error"),  # this generator has no stop rule
                   ("feedback", "false", "error"), ("max_steps", "3", "error"), ("max_steps", 3.0, "error"),
                   ("seed", "1", "error"), ("seed", True, "error"), ("state", 1, "error"), ("jit_compile", "false", "error"),
                   ("min_steps", -1, "error"), ("max_steps", 2**31 - 1, "error")]


def t_config_json(trial):
    """A packed generator whose config.json holds a mistyped setting: refused, never reinterpreted."""
    key, value, expect = _CONFIG_CHANGES[int(trial.rng.integers(len(_CONFIG_CHANGES)))]
    g = trial.folder / "g.keras"
    with zipfile.ZipFile(trial.fixtures["g.keras"]) as source, zipfile.ZipFile(g, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"][key] = value
                data = json.dumps(config).encode()
            target.writestr(item, data)
    trial.protect(g)
    x = trial.copy("x.h5")
    result = run(["generate", "--model", g, "--inputs", x, "--no-xla", "-o", trial.folder / "r.h5"], trial.folder)
    words = ["needs a stop rule"] if value is True and key == "exclude_stop_step" else [key]
    return f"config.json {key}={value!r}", *finish(trial, result, expect=expect,
                                                   words=words if key != "max_steps" or value != 3.0 else [])


_API = [
    ("Cascade('a.keras', b)", "model_a: expected a keras.Model, received 'a.keras' (a str); load it with"),
    ("Cascade(None, b)", "model_a: expected a keras.Model, received None"),
    ("Cascade(a, [b])", "model_b: expected a keras.Model"),
    ("Cascade(a, b, exclude_stop_step='no', max_steps=3)", "exclude_stop_step: expected one of True, False"),
    ("CascadeModel(a, b, exclude_stop_step='false')", "exclude_stop_step: expected one of True, False"),
    ("Cascade(a, b, max_steps=2**31 - 1)", "max_steps:"),
    ("Cascade(a, b, feedback='yes')", "feedback:"),
    ("Cascade(a, b, seed=True)", "seed:"),
    ("Cascade(a, b, max_steps='3')", "max_steps:"),
    ("c.run(x, [[1, 2], [3]])", "steps from the call are ragged"),
    ("c.run(x, [[1, 2, 3], [3, 1]])", "steps from the call are ragged"),
    ("c.run([[[1.0, 2, 3]], [[1.0, 2, 3], [1, 2, 3]]], [1])", "inputs: expected a float array"),
    ("c.run(tf.ragged.constant([[[1.0, 2, 3]], [[1.0, 2, 3], [4, 5, 6]]], ragged_rank=1), [1])", "inputs: expected a dense array"),
    ("c.run(np.array([[['a', 'b', 'c']] * 3] * 2), [1, 1, 1])", "inputs: expected a float array"),
    ("c.run(None, [1, 1, 1])", "inputs: expected a float array"),
    ("c.run(x[:1, :1], [[2**31 - 1]])", "steps: the runner counts inner steps in int32"),
    ("c.run(x[:1, :2], [[2**30, 2**30]])", "steps: the runner counts inner steps in int32"),
    ("c.run(x, '1,2,3')", "received a str"),
    ("c.run(x, {'a': 1})", "received a dict"),
    ("c.run(x, [1.5, 1, 1])", "expected a non-negative integer"),
    ("c.run(x, [-1, 1, 1])", "expected a non-negative integer"),
    ("generate_to_file(c, None, [1, 1, 1], output='o.h5')", "source: expected an open InputSource"),
    ("generate_to_file('c', src, [1, 1, 1], output='o.h5')", "cascade: expected a cascade_cli.Cascade"),
    ("generate_to_file(c, src, [1, 1, 1], output='o.h5', num_samples=0)", "num_samples:"),
    ("generate_to_file(c, src, [1, 1, 1], output='o.h5', allow_nonfinite='no')", "allow_nonfinite:"),
    ("generate_to_file(c, src, [1, 1, 1], output='o.h5', num_samples=2**62)", "num_samples: expected at most"),
]


def t_api(trial):
    """Python API misuse: a cascade error naming the parameter, never another library's."""
    call, words = _API[int(trial.rng.integers(len(_API)))]
    a, b, x = (trial.copy(name) for name in ("a.keras", "b.keras", "x.h5"))
    code = f"""
import sys, numpy as np, tensorflow as tf, keras
from cascade_cli import Cascade
from cascade_cli.errors import CascadeError
from cascade_cli.train.keras_model import CascadeModel
from cascade_cli.generation import generate_to_file
from cascade_cli.data import open_inputs
a = keras.saving.load_model({str(a)!r}); b = keras.saving.load_model({str(b)!r})
c = Cascade(a, b, jit_compile=False)
x = np.random.default_rng(0).normal(size=(2, 3, 3)).astype('float32')
src = open_inputs({str(x)!r})
try:
    {call}
except CascadeError as error:
    print('CASCADE', type(error).__name__, error)
    code = 1
except Exception as error:
    print('OTHER', type(error).__name__, error)
    code = 3
else:
    print('NO ERROR')
    code = 0
src.close()
sys.exit(code)
"""
    result = run([], trial.folder, python=code)
    category, detail = basic_class(result, expect="ok")
    if category in ("hang", "signal"):
        return call, category, detail
    out = result.stdout.strip()
    if out.startswith("OTHER") or "Traceback" in result.stderr:
        return call, "traceback", out[:200] or result.stderr[-200:]
    if out.startswith("NO ERROR"):
        return call, "silently wrong", "no error"
    if words not in out:
        return call, "silently wrong", out[:200]
    return call, *finish(trial, Run(0, "", "", False, 0), expect="ok")


def t_full_disk(trial):
    """A writer on a nearly full file system: 'no space left on device', the old output kept, nothing left."""
    rng = trial.rng
    command = rng.choice(["export-csv", "export-npz", "export-h5", "generate", "pack", "export-model", "merge"])
    size = int(rng.choice([16, 64, 128, 256, 512, 1024, 4096])) << 10
    disk = trial.folder / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        return f"{command} on a {size >> 10} KiB disk", "skipped", "cannot mount a tmpfs here"
    try:
        g, r, a, b, x, p0, p1 = (trial.copy(name) for name in ("g.keras", "r.h5", "a.keras", "b.keras", "big_x.h5",
                                                               "part0.h5", "part1.h5"))
        name = {"export-model": "sm", "export-csv": "o.csv", "export-npz": "o.npz", "export-h5": "o.h5",
                "generate": "o.h5", "pack": "o.keras", "merge": "o.h5"}[command]
        target = disk / name
        old = rng.random() < 0.4 and command != "export-model"
        if old:
            with contextlib.suppress(OSError):
                target.write_bytes(b"old output")
            if target.exists() and target.read_bytes() == b"old output":
                trial.protect(target)
            else:
                old = False
        args = {"export-model": ["export-model", g, "--saved-model", target],
                "export-csv": ["export", r, "-o", target], "export-npz": ["export", r, "-o", target],
                "export-h5": ["export", r, "--layout", "padded", "-o", target], "merge": ["merge", p0, p1, "-o", target],
                "generate": ["generate", "--model-a", a, "--model-b", b, "--inputs", x, "--steps", "3,2,3",
                             "--no-xla", "--num-samples", int(rng.integers(1, 30)), "-o", target],
                "pack": ["pack", "--model-a", a, "--model-b", b, "--max-steps", 3, "-o", target]}[command]
        result = run([*args, "--overwrite"] if old else args, trial.folder)
        label = f"{command} on a {size >> 10} KiB disk{' over an old output' if old else ''}"
        if result.returncode == 0:
            trial.keep.pop(target, None)
            return label, *finish(trial, result, expect="ok")
        category, detail = finish(trial, result, expect="error", words=["no space left on device"],
                                  not_words=["memory"])
        if category == "clean" and old and target.read_bytes() != b"old output":
            category, detail = "file lost", "the old output changed"
        leftovers = [p.name for p in disk.iterdir() if p.name not in (name, "lost+found")]
        if category == "clean" and (leftovers or (not old and os.path.lexists(target))):
            category, detail = "half file", f"left on the full disk: {leftovers or [name]}"
        return label, category, detail
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def t_flags(trial):
    """Random generate flag combinations: exit 0 with a readable result, or one Error line (exit 1 or 2)."""
    rng = trial.rng
    feedback = rng.random() < 0.4
    a, b, x = trial.copy("a.keras"), trial.copy("fb.keras" if feedback else "b.keras"), trial.copy("x.h5")
    args = ["generate", "--model-a", a, "--model-b", b, "--inputs", x, "--no-xla"]
    args += ["--feedback"] if feedback else []
    choices = [
        lambda: ["--steps", ",".join(str(int(v)) for v in rng.integers(0, 4, size=int(rng.choice([3, 3, 2]))))],
        lambda: ["--max-steps", int(rng.integers(1, 6))],
        lambda: ["--stop-norm", float(rng.choice([0.5, 1.0, float("nan"), -1.0]))],
        lambda: ["--stop-token", int(rng.integers(0, 4))],
        lambda: ["--exclude-stop-step"],
        lambda: ["--min-steps", int(rng.integers(0, 4))],
        lambda: ["--state", rng.choice(["reset", "carry"])],
        lambda: ["--sampler", rng.choice(["identity", "greedy", "categorical"])],
        lambda: ["--temperature", float(rng.choice([0.5, 0.0, -1.0, 2.0]))],
        lambda: ["--top-k", int(rng.integers(-1, 4))],
        lambda: ["--top-p", float(rng.choice([0.5, 1.0, 0.0, 1.5]))],
        lambda: ["--batch-size", int(rng.choice([1, 2, 3, 256]))],
        lambda: ["--num-samples", int(rng.choice([1, 2, 7]))],
        lambda: ["--shard", rng.choice(["0/2", "1/2", "2/2", "0/0", "x"])],
        lambda: ["--seed", int(rng.integers(0, 5))],
        lambda: ["--allow-nonfinite"],
        lambda: ["--feedback-start", rng.choice(["zeros", "token:1", "previous", "token:9"])],
    ]
    picked = [choices[i]() for i in rng.choice(len(choices), size=int(rng.integers(1, 6)), replace=False)]
    extra = [str(item) for group in picked for item in group]
    out = trial.folder / "r.h5"
    result = run([*args, *extra, "-o", out], trial.folder)
    label = "generate " + " ".join(extra) + (" --feedback" if feedback else "")
    category, detail = basic_class(result, expect="ok")
    if category in ("hang", "signal", "traceback"):
        return label, category, detail
    if result.returncode != 0:
        if len(result.error_lines) != 1 or result.returncode not in (1, 2):
            return label, "silently wrong", f"exit {result.returncode}: {result.stderr[-200:]!r}"
        if os.path.lexists(out):
            return label, "half file", "an output was left by a refused run"
        return label, *finish(trial, Run(0, "", "", False, 0), expect="ok")
    shown = run(["inspect", out], trial.folder)
    if shown.returncode != 0:
        return label, "half file", "its result cannot be inspected: " + (shown.error_lines or [""])[0][:150]
    return label, *finish(trial, result, expect="ok")


def t_bad_result(trial):
    """A truncated or byte-flipped result given to export, inspect or merge: one Error line or a true answer."""
    rng = trial.rng
    r = trial.folder / "r.h5"
    data = bytearray(trial.fixtures["r.h5"].read_bytes())
    if rng.random() < 0.5:
        data = data[: int(len(data) * rng.uniform(0.1, 0.95))]
    else:
        for _ in range(int(rng.integers(1, 20))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
    r.write_bytes(bytes(data))
    trial.protect(r)
    command = rng.choice(["export", "inspect", "merge"])
    args = {"export": ["export", r, "-o", trial.folder / rng.choice(["o.csv", "o.npz", "o.h5"])],
            "inspect": ["inspect", r], "merge": ["merge", r, "-o", trial.folder / "o.h5"]}[command]
    result = run(args, trial.folder)
    category, detail = basic_class(result, expect="ok")
    if category in ("hang", "signal", "traceback"):
        return f"{command} of a damaged result", category, detail
    if result.returncode != 0 and len(result.error_lines) != 1:
        return f"{command} of a damaged result", "silently wrong", result.stderr[-200:]
    return f"{command} of a damaged result", *finish(trial, Run(0, "", "", False, 0), expect="ok")


KINDS = [(t_special_output, 16), (t_input_inside_output, 14), (t_killed_writer, 22), (t_nonfinite, 16),
         (t_inspect_nonfinite, 6), (t_num_samples, 10), (t_sigterm_huge, 5), (t_num_samples_limit, 4),
         (t_config_json, 14), (t_api, 22), (t_full_disk, 18), (t_flags, 20), (t_bad_result, 8)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--trials", type=int, default=160)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", help="run only the trial kind of this name (e.g. t_api)")
    options = parser.parse_args(argv)
    rng = np.random.default_rng(options.seed)
    fixtures = make_fixtures(options.out / "fixtures")
    kinds = [(kind, weight) for kind, weight in KINDS if options.only in (None, kind.__name__)]
    weights = np.array([weight for _, weight in kinds], float)
    counts = collections.Counter()
    by_kind = collections.defaultdict(collections.Counter)
    log = (options.out / "trials.jsonl").open("a")
    for number in range(options.trials):
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))][0]
        folder = options.out / f"seed{options.seed}" / f"trial{number:04d}-{kind.__name__[2:]}"
        shutil.rmtree(folder, ignore_errors=True)
        trial = Trial(folder, fixtures, np.random.default_rng([options.seed, number]))
        started = time.monotonic()
        try:
            label, category, detail = kind(trial)
        except Exception as error:  # the campaign's own failure, not cascade's
            label, category, detail = kind.__name__, "campaign error", f"{type(error).__name__}: {error}"
        counts[category] += 1
        by_kind[kind.__name__[2:]][category] += 1
        record = {"seed": options.seed, "trial": number, "kind": kind.__name__[2:], "what": label,
                  "class": category, "detail": detail, "seconds": round(time.monotonic() - started, 1)}
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(f"{number:4d} {category:16s} {kind.__name__[2:]:20s} {label} {detail}", flush=True)
        if category == "clean":
            shutil.rmtree(folder, ignore_errors=True)
    columns = [c for c in (*CLASSES, "skipped", "campaign error") if c in CLASSES or counts[c]]
    lines = ["| kind | trials | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 2)]
    for name, counter in sorted(by_kind.items()):
        lines.append(f"| {name} | {sum(counter.values())} | " + " | ".join(str(counter[c]) for c in columns) + " |")
    lines.append(f"| **all** | {sum(counts.values())} | " + " | ".join(str(counts[c]) for c in columns) + " |")
    table = "\n".join(lines)
    (options.out / f"campaign-seed{options.seed}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
