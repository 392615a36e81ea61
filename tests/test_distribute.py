"""Tests for cascade_cli.train.distribute: mirrored and multi-worker training runs match default.

Logical CPU devices and `TF_CONFIG` only take effect before TensorFlow starts, so
every distributed run happens in a fresh subprocess (bounded by a timeout) that
imports this module for the cases; the `default` references run here.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
import cascade_cli
from cascade_cli.data import TrainingData
from cascade_cli.train.distribute import make_strategy
from cascade_cli.errors import CascadeError, ParameterError
from cascade_cli.options import TrainConfig
from cascade_cli.train.checkpoints import backed_up_epoch
from cascade_cli.train.fit import fit
from test_training import regularized_models

TESTS = Path(__file__).resolve().parent
PACKAGE_ROOT = Path(cascade_cli.__file__).resolve().parent.parent  # subprocesses import this very package
TIMEOUT = 300  # seconds, for each subprocess (about 35 s alone on 2 cores; 150 s when the cores are shared)
MODEL_FILES = ("model_a.keras", "model_b.keras")

# 12 samples; batch 5 splits 3+2, 3+2, 1+1 over two replicas. With val_split 0.25, 9 samples
# train in batches of 4: 2+2, 2+2 and 1+0 (one replica gets an empty slice).
CASES = {
    "sgd-mse": dict(optimizer="sgd", learning_rate=0.1, loss="mse", batch_size=5, val_split=0.0, epochs=1),
    # metrics: each replica's (sum, count) all-reduced, as the loss's
    "adam-mse": dict(optimizer="adam", learning_rate=0.05, loss="mse", batch_size=4, val_split=0.25, epochs=2,
                     metrics=("mae", "mse")),
    "sgd-mae-lstm-carry": dict(optimizer="sgd", learning_rate=0.1, loss="mae", batch_size=5, val_split=0.0,
                               epochs=1, state="carry"),
    "sgd-crossentropy-sequence": dict(optimizer="sgd", learning_rate=0.1, loss="categorical-crossentropy",
                                      batch_size=5, val_split=0.0, epochs=1),
    # weight regularizers: each replica adds 1/replicas of the penalty, so a step adds it once
    "sgd-mse-regularized": dict(optimizer="sgd", learning_rate=0.1, loss="mse", batch_size=5, val_split=0.25,
                                epochs=1),
}


def case_models(name):
    """The two (seeded, so identical in every process) models a case starts from."""
    if "lstm" in name:
        return builders.model_a(), builders.step_b("lstm")
    if "sequence" in name:
        return builders.model_a(), builders.sequence_b()
    if "regularized" in name:
        return regularized_models()
    return builders.model_a(), builders.step_b()


def run_case(name, data_path, out_dir, *, strategy_name="default", strategy=None, callbacks=None):
    """Trains case `name`; returns `(history, weights of A + B after training)`."""
    model_a, model_b = case_models(name)
    config = TrainConfig(**CASES[name], shuffle=True, seed=3, strategy=strategy_name)
    with TrainingData(data_path) as data:
        history = fit(model_a, model_b, data, out_dir=out_dir, config=config, callbacks=callbacks,
                      strategy=strategy)
    return history, model_a.get_weights() + model_b.get_weights()


def write_data(path, *, n=12, outer=3, output_size=2, seed=5):
    rng = np.random.default_rng(seed)
    steps = rng.integers(0, 4, size=(n, outer))
    steps[1] = 0  # a sample that emits nothing
    steps[2, 1] = 0
    with h5py.File(path, "w") as f:
        f.create_dataset("inputs", data=builders.inputs(n, outer, seed=seed))
        f.create_dataset("steps", data=steps)
        f.create_dataset("targets", data=rng.normal(size=(int(steps.sum()), output_size)).astype("float32"))
    return path


def saved_weights(out_dir):
    return [w for name in MODEL_FILES for w in keras.saving.load_model(out_dir / name, compile=False).get_weights()]


def assert_close(left, right, *, atol=1e-5):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def assert_moved(before, after):
    assert max(float(np.abs(a - b).max()) for a, b in zip(before, after)) > 1e-3  # training did something


def worker_env(**extra):
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    pythonpath = [str(PACKAGE_ROOT), str(TESTS), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(p for p in pythonpath if p), CUDA_VISIBLE_DEVICES="",
               TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def run_processes(commands):
    """Runs `(argv, env)` pairs side by side; returns their `(returncode, output)`, killing any past TIMEOUT."""
    processes = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for argv, env in commands]
    results = []
    try:
        for process in processes:
            try:
                output, _ = process.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
                output += f"\n[killed after {TIMEOUT} s]"
            results.append((process.returncode, output))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def free_ports(count):
    """Ports on 127.0.0.1 that were free a moment ago (bound, then closed)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data") / "train.h5")


# ------------------------------------------------------------- in-process


def test_config_and_make_strategy_reject_bad_settings(monkeypatch, tmp_path, data_path):
    assert make_strategy(None) is tf.distribute.get_strategy()  # not given: the default strategy
    for bad in (lambda: TrainConfig(strategy="tpu"), lambda: make_strategy("tpu")):
        with pytest.raises(ParameterError, match="^strategy: expected one of default, mirrored, multi-worker, "
                                                 "received 'tpu'"):
            bad()
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ParameterError, match="^strategy: 'multi-worker' reads the cluster from the TF_CONFIG "
                                             "environment variable: expected JSON such as .*received no TF_CONFIG"):
        make_strategy("multi-worker")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": ')
    with pytest.raises(CascadeError, match=r"^TF_CONFIG: expected JSON with a 'cluster' and a 'task'.*received "
                                             r"'\{\"cluster\": '"):
        make_strategy("multi-worker")
    with pytest.raises(ParameterError, match=r"^strategy: the config says 'mirrored': expected a strategy made by "
                                             r"make_strategy\('mirrored'\), received _DefaultDistributionStrategy"):
        run_case("sgd-mse", data_path, tmp_path / "out", strategy_name="mirrored",
                 strategy=tf.distribute.get_strategy())
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------- mirrored

MIRRORED_SCRIPT = """
import json, os, socket, sys
import tensorflow as tf
cpu, = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from cascade_cli.errors import CascadeError
from cascade_cli.train.distribute import make_strategy
from test_distribute import CASES, run_case, free_ports
data, out = sys.argv[1], sys.argv[2]
strategy = make_strategy("mirrored")
report = {"replicas": strategy.num_replicas_in_sync, "history": {}}
for name in CASES:
    history, weights = run_case(name, data, os.path.join(out, name), strategy_name="mirrored", strategy=strategy)
    report["history"][name] = history
# Too late for a multi-worker strategy: TensorFlow is running.
port, = free_ports(1)
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}"]},
                                      "task": {"type": "worker", "index": 0}})
try:
    make_strategy("multi-worker")
except CascadeError as exc:
    report["too_late"] = str(exc)
with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f)
"""


@pytest.mark.slow  # a subprocess with TensorFlow: about 20-35 s on 2 cores
def test_mirrored_on_two_logical_cpus_takes_the_steps_of_default(tmp_path, data_path):
    out = tmp_path / "mirrored"
    out.mkdir()
    [(code, output)] = run_processes([([sys.executable, "-c", MIRRORED_SCRIPT, str(data_path), str(out)],
                                       worker_env())])
    assert code == 0, output[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["replicas"] == 2
    assert "TensorFlow was already running" in report["too_late"]
    assert "make_strategy('multi-worker') before loading the models" in report["too_late"]

    (tmp_path / "default").mkdir()
    for name in CASES:
        history, weights = run_case(name, data_path, tmp_path / "default" / name)
        start_a, start_b = case_models(name)
        assert_moved(start_a.get_weights() + start_b.get_weights(), weights)
        assert_close(saved_weights(out / name), weights)  # the saved models carry the trained weights
        mirrored = report["history"][name]
        assert [row["epoch"] for row in mirrored] == [row["epoch"] for row in history]
        for left, right in zip(mirrored, history):
            assert left["loss"] == pytest.approx(right["loss"], rel=1e-5)
            assert (left["val_loss"] is None) == (right["val_loss"] is None)
            if right["val_loss"] is not None:
                assert left["val_loss"] == pytest.approx(right["val_loss"], rel=1e-5)
            metrics = [key for key in right if key not in ("epoch", "loss", "val_loss", "seconds")]
            assert sorted(metrics) == sorted(key for key in left if key not in ("epoch", "loss", "val_loss", "seconds"))
            for key in metrics:
                assert left[key] == pytest.approx(right[key], rel=1e-5), key
        assert sorted(p.name for p in (out / name).iterdir()) == ["cascade.keras", "checkpoints", "history.csv", *MODEL_FILES]


# ---------------------------------------------------------- multi-worker

WORKER_SCRIPT = """
import json, os, sys, tempfile
from cascade_cli.train.distribute import make_strategy
strategy = make_strategy("multi-worker")  # before any other TensorFlow work
import numpy as np
from cascade_cli.options import TrainCallbacks
from test_distribute import run_case
data, out, result = sys.argv[1], sys.argv[2], sys.argv[3]

class Watch(TrainCallbacks):
    seen = []
    def epoch_done(self, logs):  # after the epoch's backup: what this worker has in its temp folder
        root = tempfile.gettempdir()
        self.seen.append(sorted(f"{d}/{f}" for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                                for f in os.listdir(os.path.join(root, d))))

watch = Watch()
history, weights = run_case("adam-mse", data, out, strategy_name="multi-worker", strategy=strategy,
                            callbacks=watch)
np.savez(result + ".npz", *weights)
with open(result + ".json", "w") as f:
    json.dump({"chief": bool(strategy.extended.should_checkpoint), "replicas": strategy.num_replicas_in_sync,
               "history": history, "seen": watch.seen}, f)
"""


@pytest.mark.slow  # a subprocess with TensorFlow: about 20-35 s on 2 cores
def test_multi_worker_with_two_local_workers_matches_default(tmp_path, data_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    commands = []
    for index in range(2):
        (tmp_path / f"tmp{index}").mkdir()
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        argv = [sys.executable, "-c", WORKER_SCRIPT, str(data_path), str(tmp_path / f"out{index}"),
                str(tmp_path / f"worker{index}")]
        commands.append((argv, worker_env(TF_CONFIG=config, TMPDIR=str(tmp_path / f"tmp{index}"))))
    results = run_processes(commands)
    for index, (code, output) in enumerate(results):
        assert code == 0, f"worker {index}:\n{output[-4000:]}"

    reports = [json.loads((tmp_path / f"worker{index}.json").read_text()) for index in range(2)]
    assert [report["chief"] for report in reports] == [True, False]
    assert [report["replicas"] for report in reports] == [2, 2]
    assert [[(row["loss"], row["val_loss"]) for row in report["history"]] for report in reports] == [
        [(row["loss"], row["val_loss"]) for row in reports[0]["history"]]] * 2
    weights = []
    for index in range(2):
        with np.load(tmp_path / f"worker{index}.npz", allow_pickle=False) as f:
            weights.append([f[f"arr_{i}"] for i in range(len(f.files))])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)

    # Only the chief wrote out_dir; the other worker backed up into a temporary folder, then removed it.
    assert sorted(p.name for p in (tmp_path / "out0").iterdir()) == ["cascade.keras", "checkpoints", "history.csv", *MODEL_FILES]
    assert backed_up_epoch(tmp_path / "out0" / "checkpoints") == 2
    assert not (tmp_path / "out1").exists()
    assert [[name.split("/")[1] for name in seen if name.startswith("cascade-worker-backup-")]
            for seen in reports[1]["seen"]] == [["backup"], ["backup"]]
    assert reports[0]["seen"] == [[], []]
    assert [p for p in (tmp_path / "tmp1").iterdir() if p.is_dir()] == []

    history, reference = run_case("adam-mse", data_path, tmp_path / "default")
    assert_close(weights[0], reference)
    assert_close(saved_weights(tmp_path / "out0"), reference)
    for left, right in zip(reports[0]["history"], history):
        assert left["loss"] == pytest.approx(right["loss"], rel=1e-5)
        assert left["val_loss"] == pytest.approx(right["val_loss"], rel=1e-5)
