"""Fixtures shared by the test files."""

import pytest


@pytest.fixture
def mixed_float16():
    """Runs a test under Keras' `mixed_float16` global dtype policy, and puts the one before back afterwards."""
    import keras  # here, not at the top: a conftest is imported by every test run, TF-free ones too

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
