"""`--temperature`, `--top-k` and `--top-p` without `--sampler` (issue 30, defect 5): the error names no sampler
the user did not choose, e.g. a generator packed with `sampler=greedy` is not told "with --sampler identity"."""

import numpy as np
import pytest

import builders
from clitools import assert_error, assert_ok, invoke

N, TA, O = 3, 3, 4


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    builders.model_a().save(folder / "a.keras")
    builders.feedback_b(output_size=O).save(folder / "b.keras")
    np.save(folder / "x.npy", builders.inputs(N, TA))
    assert_ok(invoke("pack", "--model-a", folder / "a.keras", "--model-b", folder / "b.keras", "--feedback",
                     "--sampler", "greedy", "--max-steps", "3", "--stop-token", "0", "-o", folder / "g.keras"))
    return folder


@pytest.mark.parametrize("flag, value", [("--temperature", "0.5"), ("--top-k", "2"), ("--top-p", "0.9")])
def test_a_categorical_flag_without_sampler_names_the_flag_to_add(packed, tmp_path, flag, value):
    result = invoke("generate", "--model", packed / "g.keras", "--inputs", packed / "x.npy", flag, value,
                    "-o", tmp_path / "r.h5")
    assert_error(result, 2, flag, "--sampler categorical")
    assert "identity" not in result.stderr
