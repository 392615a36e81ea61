"""`cascade train` and `CascadeModel.fit` on `data.dataset(...)` reach the same weights (issue 30).

Two epochs of SGD on a shuffled file, in reset, carry and feedback modes, with an end token appended, with a
stop gate, with token ids and with scheduled sampling: the command's weights and `fit`'s agree to 1e-6.
"""

import keras
import numpy as np
import pytest

import builders
from clitools import assert_ok, invoke
from filetools import write_h5
from cascade_cli.data import dataset
from cascade_cli.keras_model import CascadeModel

N, TA = 6, 3
STEPS = np.array([[2, 0, 3], [0, 1, 0], [1, 1, 0], [3, 2, 1], [0, 0, 2], [1, 3, 1]])
COMMON = ("--optimizer", "sgd", "--learning-rate", 0.1, "--epochs", 2, "--batch-size", 4, "--val-split", 0,
          "--seed", 5, "--no-xla")

CASES = {  # name: (B, the targets' O, train flags, CascadeModel settings, compile settings, dataset settings)
    "reset": ("step", 2, (), {}, {}, {}),
    "carry": ("step", 2, ("--state", "carry"), {"state": "carry"}, {}, {}),
    "feedback": ("feedback", 2, ("--feedback",), {"feedback": True}, {}, {}),
    "end token": ("feedback", 2, ("--feedback", "--loss", "categorical-crossentropy", "--append-end-token", 1),
                  {"feedback": True}, {"loss": "categorical_crossentropy"}, {"append_end_token": 1}),
    "stop gate": ("feedback", 2, ("--feedback", "--stop-gate", "--stop-weight", 0.5, "--stop-pos-weight", 2),
                  {"feedback": True}, {"stop_gate": True, "stop_weight": 0.5, "stop_pos_weight": 2.0}, {}),
    "sparse ids": ("feedback", 2, ("--feedback", "--loss", "sparse-categorical-crossentropy"), {"feedback": True},
                   {"loss": "sparse_categorical_crossentropy"}, {}),
    "scheduled sampling": ("feedback", 2, ("--feedback", "--sampling-probability", 0.5), {"feedback": True},
                           {"sampling_probability": 0.5}, {}),
}


def models(kind, output_size):
    b = builders.feedback_b(output_size=output_size) if kind == "feedback" else builders.step_b(
        output_size=output_size)
    return builders.model_a(), b


@pytest.mark.parametrize("case", list(CASES))
def test_cascade_train_and_cascade_model_fit_reach_the_same_weights(case, tmp_path):
    kind, o, flags, settings, compiled, streamed = CASES[case]
    emits = o + int("--stop-gate" in flags)
    rng = np.random.default_rng(1)
    targets = rng.normal(size=(int(STEPS.sum()), o)).astype("float32")
    if "categorical-crossentropy" in flags:
        targets = np.eye(o, dtype="float32")[rng.integers(0, o, size=int(STEPS.sum()))]
    if "sparse-categorical-crossentropy" in flags:
        targets = rng.integers(0, o, size=int(STEPS.sum())).astype(np.int64)  # token ids, fed back as one-hots
    path = write_h5(tmp_path / "train.h5", inputs=builders.inputs(N, TA, seed=2), steps=STEPS, targets=targets)
    a, b = models(kind, emits)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    assert_ok(invoke("train", "--model-a", tmp_path / "a.keras", "--model-b", tmp_path / "b.keras", "--data", path,
                     "--out-dir", tmp_path / "run", *COMMON, *flags))
    trained = [w for name in ("model_a.keras", "model_b.keras")
               for w in keras.saving.load_model(tmp_path / "run" / name, compile=False).get_weights()]

    model = CascadeModel(*models(kind, emits), jit_compile=False, **settings)
    model.compile(keras.optimizers.SGD(0.1), **{"loss": "mse", **compiled}, jit_compile=False)
    model.fit(dataset(path, batch_size=4, shuffle=True, seed=5, **streamed), epochs=2, verbose=0)
    fitted = model.model_a.get_weights() + model.model_b.get_weights()
    start = models(kind, emits)
    assert not np.allclose(start[1].get_weights()[0], fitted[len(a.get_weights())])  # it trained
    for got, wanted in zip(fitted, trained):
        np.testing.assert_allclose(got, wanted, rtol=0, atol=1e-6)


def test_compile_checks_the_gate_and_sampling_settings_as_train_does():
    from cascade_cli.errors import ParameterError

    model = CascadeModel(*models("feedback", 3), feedback=True, jit_compile=False)
    with pytest.raises(ParameterError, match=r"^stop_weight: weighs the stop gate's loss: give stop_gate=True"):
        model.compile("sgd", loss="mse", stop_weight=2.0)
    with pytest.raises(ParameterError, match=r"^sampling_schedule: a row fed its own sample would be fed its stop"):
        model.compile("sgd", loss="mse", stop_gate=True, sampling_probability=0.5)
    with pytest.raises(ParameterError, match=r"^sampling_schedule: applies to a feedback-form B only"):
        CascadeModel(*models("step", 2), jit_compile=False).compile("sgd", loss="mse", sampling_probability=0.5)
