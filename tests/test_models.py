"""Model checks: B's form, and the refusal of a sequence-form B that looks ahead."""

import re

import keras
import pytest

import builders
from cascade_cli.errors import ModelError
from cascade_cli.models import check_pair, inspect_b
from cascade_cli.runner import Cascade

NOT_CAUSAL = ("model B (sequence form) is not causal: changing inputs at steps >= 4 changed its outputs at "
              "steps < 4. A generator must not look ahead (no Bidirectional, no non-causal convolution).")


def sequence_b(middle):
    inputs = keras.Input(shape=(None, 4))
    return keras.Model(inputs, keras.layers.Dense(2)(middle(inputs)))


def test_a_bidirectional_sequence_b_is_refused_on_load():
    b = sequence_b(keras.layers.Bidirectional(keras.layers.GRU(3, return_sequences=True)))
    with pytest.raises(ModelError, match="^" + re.escape(NOT_CAUSAL) + "$"):
        inspect_b(b)
    with pytest.raises(ModelError, match=re.escape(NOT_CAUSAL)):
        Cascade(builders.model_a(), b)


def test_a_same_padded_convolution_is_refused_and_a_causal_one_accepted():
    with pytest.raises(ModelError, match=re.escape(NOT_CAUSAL)):
        inspect_b(sequence_b(keras.layers.Conv1D(3, 3, padding="same")))
    assert inspect_b(sequence_b(keras.layers.Conv1D(3, 3, padding="causal"))).form == "sequence"


def test_a_causal_sequence_b_is_accepted():
    spec = inspect_b(builders.sequence_b())
    assert (spec.form, spec.input_size, spec.output_size, spec.state_sizes) == ("sequence", 4, 2, ())
    a_spec, b_spec = check_pair(builders.model_a(), builders.sequence_b())
    assert (a_spec.ir_size, b_spec.input_size) == (4, 4)


def test_the_causality_check_can_be_skipped():
    b = sequence_b(keras.layers.Bidirectional(keras.layers.GRU(3, return_sequences=True)))
    assert inspect_b(b, check_causal=False).form == "sequence"
