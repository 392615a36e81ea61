"""`cascade generate --window W`: each batch in windows of W outer steps, the state carried, the same file.

The runner's windows are proven against the whole run in test_windows.py; here the command must write what the
whole run writes (the sample models: a plain A, which runs whole once, and B in windows).
"""

from pathlib import Path

import h5py
import numpy as np
import pytest

from clitools import assert_error, assert_ok, invoke

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"


def arrays(path):
    with h5py.File(path, "r") as file:
        return {key: file[key][...] for key in file}


def assert_same(whole, windowed):
    assert sorted(whole) == sorted(windowed)
    for key, value in whole.items():
        if value.dtype.kind == "f":
            np.testing.assert_allclose(windowed[key], value, rtol=0, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(windowed[key], value, err_msg=key)


def sine(out, *flags):
    return invoke("generate", "--model-a", SAMPLES / "model_a.keras", "--model-b", SAMPLES / "model_b.keras",
                  "--inputs", SAMPLES / "inputs.h5", "--steps-file", SAMPLES / "steps.txt", *flags, "-o", out)


def tokens(out, *flags):
    return invoke("generate", "--model-a", SAMPLES / "tokens" / "model_a.keras", "--model-b",
                  SAMPLES / "tokens" / "model_b.keras", "--inputs", SAMPLES / "tokens" / "inputs.h5", "--feedback",
                  "--feedback-start", "previous", "--sampler", "categorical", "--max-steps", "6", "--stop-token", "6",
                  "--seed", "5", *flags, "-o", out)


@pytest.mark.parametrize("state, windows", [("reset", (5,)), ("carry", (1, 5))])
def test_generate_in_windows_writes_the_whole_runs_file(tmp_path, state, windows):
    assert_ok(sine(tmp_path / "whole.h5", "--state", state, "--batch-size", "3"))
    whole = arrays(tmp_path / "whole.h5")
    for window in windows:
        out = tmp_path / f"w{window}.h5"
        assert_ok(sine(out, "--state", state, "--batch-size", "3", "--window", window))
        assert_same(whole, arrays(out))


@pytest.mark.parametrize("xla", [pytest.param((), marks=pytest.mark.xla), ("--no-xla",)], ids=["xla-auto", "no-xla"])
def test_a_sampled_generator_in_windows_draws_the_same_tokens(tmp_path, xla):
    assert_ok(tokens(tmp_path / "whole.h5", "--state", "carry", *xla))
    whole = arrays(tmp_path / "whole.h5")
    assert len(set(whole["tokens"].tolist())) > 1
    assert_ok(tokens(tmp_path / "w3.h5", "--state", "carry", "--window", "3", *xla))
    assert_same(whole, arrays(tmp_path / "w3.h5"))


def test_window_must_be_positive(tmp_path):
    assert_error(sine(tmp_path / "r.h5", "--window", "0"), 2, "--window")


def test_window_with_a_beam_is_a_usage_error(tmp_path):
    result = tokens(tmp_path / "r.h5", "--sampler", "beam", "--beam-width", "2", "--window", "3")
    assert_error(result, 2, "--window", "beam")


def test_an_a_in_state_form_generates_whole_and_in_windows(tmp_path):
    """An A saved in state form loads as one and gives the same file whole and with --window."""
    from cascade_cli.run.models import state_form
    from keras.saving import load_model

    state_a = state_form(load_model(SAMPLES / "model_a.keras", compile=False))
    state_a.save(tmp_path / "a_state.keras")

    def run(out, *flags):
        return invoke("generate", "--model-a", tmp_path / "a_state.keras", "--model-b", SAMPLES / "model_b.keras",
                      "--inputs", SAMPLES / "inputs.h5", "--steps-file", SAMPLES / "steps.txt", "--state", "carry",
                      *flags, "-o", out)

    assert_ok(run(tmp_path / "whole.h5"))
    assert_ok(sine(tmp_path / "plain.h5", "--state", "carry"))
    assert_same(arrays(tmp_path / "plain.h5"), arrays(tmp_path / "whole.h5"))  # the plain A's own file
    assert_ok(run(tmp_path / "w4.h5", "--window", "4"))
    assert_same(arrays(tmp_path / "whole.h5"), arrays(tmp_path / "w4.h5"))
