"""Windows with the state carried (issue 32, inference): A in state form, `run(..., initial_state, return_state)`.

The oracle for windows is the whole run; the whole run itself is checked against the independent eager
reference (`stopref.reference`) where it has one.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cascade_cli import CascadeState
from cascade_cli.errors import ModelError, ParameterError
from cascade_cli.run.models import inspect_a, state_form
from cascade_cli.options import Sampler, StopRule
from cascade_cli.run.cascade import Cascade
from cascade_cli.run.windows import Windows
from tests import builders, paths, stopref

N, TA = 3, 5


def state_a(*, features=3, units=4, seed=0, kind="gru"):
    """A in state form: `[x (batch, Ta, F), *states] -> [ir (batch, Ta, H), *states]` (a GRU or LSTM)."""
    layer = {"gru": keras.layers.GRU, "lstm": keras.layers.LSTM}[kind]
    x = keras.Input(shape=(None, features))
    states = [keras.Input(shape=(units,)) for _ in range(2 if kind == "lstm" else 1)]
    ir, *new_states = layer(units, return_sequences=True, return_state=True, kernel_initializer=builders.init(seed),
                            recurrent_initializer=builders.init(seed + 1),
                            bias_initializer=builders.init(seed + 2))(x, initial_state=states)
    return keras.Model([x, *states], [ir, *new_states], name=f"a_state_{kind}")


def plain_view(model_a):
    """A state-form A called as a plain A (zero states): what the eager reference feeds on."""
    sizes = [int(t.shape[-1]) for t in model_a.inputs[1:]]
    return lambda x: model_a([x, *(tf.zeros([x.shape[0], size]) for size in sizes)])[0]


def in_windows(cascade, x, steps, window, **kwargs):
    """`(values, lengths[, tokens], state)`: `cascade.run` window after window, joined by sample (numpy)."""
    state, parts = None, []
    for start in range(0, x.shape[1], window):
        *result, state = cascade.run(x[:, start:start + window], steps[:, start:start + window],
                                     initial_state=state, return_state=True, **kwargs)
        parts.append([np.asarray(r) for r in result])
    owner = np.concatenate([np.repeat(np.arange(len(x)), part[1].sum(axis=1)) for part in parts])
    order = np.argsort(owner, kind="stable")
    joined = [np.concatenate([part[i] for part in parts])[order] for i in range(len(parts[0])) if i != 1]
    return (joined[0], np.concatenate([part[1] for part in parts], axis=1), *joined[1:], state)


# ------------------------------------------------------------------ A's forms


def test_state_form_detected():
    assert inspect_a(state_a()).state_sizes == (4,)
    assert inspect_a(state_a(kind="lstm")).state_sizes == (4, 4)
    assert inspect_a(builders.model_a()).form == "plain"


def test_state_form_with_a_state_output_of_another_shape_is_refused():
    x, s = keras.Input(shape=(None, 3)), keras.Input(shape=(4,))
    ir, h = keras.layers.GRU(4, return_sequences=True, return_state=True)(x, initial_state=[s])
    model = keras.Model([x, s], [ir, keras.layers.Dense(2)(h)])
    with pytest.raises(ModelError, match=r"state form .* si' shaped like si; received inputs"):
        inspect_a(model)


def test_stateful_a_is_refused_pointing_to_the_state_form():
    x = keras.Input(batch_shape=(2, None, 3))
    model = keras.Model(x, keras.layers.GRU(4, return_sequences=True, stateful=True, name="memory")(x))
    with pytest.raises(ModelError, match=r"stateful=True layers \('memory'\).*Save A in state form instead"):
        Cascade(model, builders.step_b())


def test_plain_a_gives_the_same_results_on_a_second_call():
    cascade = Cascade(builders.model_a(), builders.step_b(), state="carry")
    x, steps = builders.inputs(N, TA), np.full((N, TA), 2)
    first, second = cascade.run(x, steps), cascade.run(x, steps)
    np.testing.assert_array_equal(first[0], second[0])


def test_state_form_a_starts_from_zeros_in_a_whole_run():
    model = state_a()
    cascade = Cascade(model, builders.step_b(), state="carry")
    x, steps = builders.inputs(N, TA), np.full((N, TA), 2)
    values, lengths = cascade.run(x, steps)
    want, want_lengths = builders.reference(plain_view(model), builders.step_b(), x, steps, state="carry")
    np.testing.assert_allclose(values, want, atol=1e-5)
    np.testing.assert_array_equal(lengths, want_lengths)


# ------------------------------------------------------- windows equal the whole run

CASES = {
    "given": dict(),
    "stop": dict(max_steps=4, stop_rule=StopRule.norm(1.2)),
    "feedback": dict(feedback=True, feedback_start="previous", sampler=Sampler.categorical(), max_steps=4,
                     stop_rule=StopRule.token(0), seed=3),
}


def _case(case, mode):
    settings = CASES[case]
    b = builders.feedback_b(output_size=3) if settings.get("feedback") else builders.step_b()
    cascade = Cascade(state_a(), b, state=mode, **settings)
    steps = np.random.default_rng(1).integers(0, 4, size=(N, TA))
    if "max_steps" in settings:
        steps = np.where(steps > 0, 4, 0)
    return cascade, b, steps


# quick: each case once, carry (a state across windows) for two of them; the other three run with -m slow
@pytest.mark.parametrize("case, mode", paths.quick(
    paths.covering([(case, mode) for case in sorted(CASES) for mode in ("reset", "carry")]),
    "feedback-carry", "given-carry", "stop-reset"))
def test_windows_equal_the_whole_run(case, mode):
    cascade, b, steps = _case(case, mode)
    x = builders.inputs(N, TA)
    tokens = cascade.sampler.tokens
    whole = cascade.run(x, steps, return_tokens=tokens)
    if case != "feedback":  # the whole run against the independent eager reference
        rule = CASES[case].get("stop_rule")
        stop = None if rule is None else (lambda y: np.linalg.norm(y) >= 1.2)
        want, want_lengths, _ = stopref.reference(plain_view(cascade.model_a), b, x, steps, state=mode, stop=stop)
        np.testing.assert_allclose(whole[0], want, atol=1e-5)
        np.testing.assert_array_equal(whole[1], want_lengths)
    for window in (1, 3, TA):
        *windowed, state = in_windows(cascade, x, steps, window, return_tokens=tokens)
        np.testing.assert_array_equal(windowed[1], whole[1])
        np.testing.assert_allclose(windowed[0], whole[0], atol=1e-5)
        if tokens:
            np.testing.assert_array_equal(windowed[2], whole[2])
        assert isinstance(state, CascadeState) and state.offset == TA
        assert len(state.a_states) == 1 and state.a_states[0].shape == (N, 4)
        assert len(state.b_states) == (1 if mode == "carry" else 0)
        assert (state.previous is not None) == (case == "feedback")


def causal_conv_a():
    """A plain A that mixes outer steps (a causal convolution over time): it has no state form."""
    x = keras.Input(shape=(None, 3))
    h = keras.layers.Conv1D(4, 2, padding="causal", kernel_initializer=builders.init(5))(x)
    return keras.Model(x, keras.layers.GRU(4, return_sequences=True, kernel_initializer=builders.init(6))(h))


def test_state_form_of_a_plain_a_equals_it_in_windows():
    for model in (builders.model_a(), builders.model_a("lstm"), builders.model_a("simple")):
        converted = state_form(model)
        assert converted is not None and inspect_a(converted).form == "state"
        x = builders.inputs(N, 7)
        zeros = [tf.zeros((N, int(t.shape[-1]))) for t in converted.inputs[1:]]
        first = converted([tf.constant(x[:, :3]), *zeros])
        second = converted([tf.constant(x[:, 3:]), *first[1:]])
        np.testing.assert_allclose(np.concatenate([first[0], second[0]], axis=1), model(x), atol=1e-5)
    sequential = keras.Sequential([keras.Input((None, 3)), keras.layers.GRU(4, return_sequences=True),
                                   keras.layers.Dense(2, activation="tanh")])
    assert state_form(sequential) is not None
    assert state_form(causal_conv_a()) is None  # mixes outer steps: windows would differ
    bidirectional = keras.Sequential([keras.Input((None, 3)), keras.layers.Bidirectional(
        keras.layers.GRU(2, return_sequences=True))])
    assert state_form(bidirectional) is None


# quick: the state form on the default, whole on the plain path; the state form on the plain path runs with -m slow
@pytest.mark.parametrize("kind, jit", paths.quick(paths.both([("state form",), ("whole",)], auto=[("state form",)]),
                                             "state form-auto", "whole-plain"))
def test_windows_of_a_plain_a(kind, jit):
    """`Windows` (generate --window): a plain A runs through its state form, or else whole once, B in windows.

    The whole run as the oracle, on the shipped default (A and the loop over B under XLA) and the plain loop.
    """
    b = builders.feedback_b(output_size=3)
    model_a = builders.model_a() if kind == "state form" else causal_conv_a()
    cascade = Cascade(model_a, b, state="carry", jit_compile=jit, **CASES["feedback"])
    x, caps = builders.inputs(N, 7), np.full((N, 7), 4, np.int32)
    whole = cascade.run(x, caps, return_tokens=True)
    paths.assert_path(cascade, jit)
    for window in (1, 3, 10):
        windows = Windows(cascade, window)
        assert windows.a_whole is (kind == "whole")
        values, lengths, tokens = windows(x, caps, return_tokens=True)
        np.testing.assert_array_equal(lengths, whole[1])
        np.testing.assert_allclose(values, whole[0], atol=1e-5)
        np.testing.assert_array_equal(tokens, whole[2])


def test_call_returns_the_state_too():
    cascade = Cascade(state_a(), builders.step_b(), state="carry")
    x, steps = builders.inputs(N, TA), np.full((N, TA), 2)
    first, state = cascade(x[:, :2], steps[:, :2], return_state=True)
    second = cascade(x[:, 2:], steps[:, 2:], initial_state=state)
    whole = cascade(x, steps)
    np.testing.assert_allclose(tf.concat([first, second], axis=1).flat_values, whole.flat_values, atol=1e-5)


def test_state_inside_a_tf_function_equals_eager():
    cascade = Cascade(state_a(), builders.step_b(), state="carry", run_eagerly=True)
    x, steps = builders.inputs(N, TA), np.full((N, TA), 2, np.int32)

    @tf.function
    def two_windows(x, steps):
        *first, state = cascade.run(x[:, :2], steps[:, :2], return_state=True)
        *second, state = cascade.run(x[:, 2:], steps[:, 2:], initial_state=state, return_state=True)
        return first, second, state.offset

    first, second, offset = two_windows(tf.constant(x), tf.constant(steps))
    whole = cascade.run(x, steps)
    joined = np.concatenate([np.reshape(first[0], (N, 4, -1)), np.reshape(second[0], (N, 6, -1))], axis=1)
    np.testing.assert_allclose(joined.reshape(-1, joined.shape[-1]), whole[0], atol=1e-5)  # 2 steps everywhere
    assert int(offset) == TA


def test_no_gradient_flows_through_the_state():
    cascade = Cascade(state_a(), builders.step_b(), state="carry")
    x, steps = tf.constant(builders.inputs(N, TA)), np.full((N, TA), 2)
    _, _, state = cascade.run(x[:, :2], steps[:, :2], return_state=True)
    carried = [tf.Variable(s) for s in (*state.a_states, *state.b_states)]
    with tf.GradientTape() as tape:
        tape.watch(x)
        passed = CascadeState(tuple(carried[:1]), tuple(carried[1:]), None, state.offset)
        values, _ = cascade.run(x[:, 2:], steps[:, 2:], initial_state=passed)
        loss = tf.reduce_sum(values)
    grads = tape.gradient(loss, [x, *carried])
    assert grads[1] is None and grads[2] is None  # stopped at the state, as documented
    assert np.all(np.isfinite(grads[0])) and np.any(grads[0][:, 2:] != 0)


# ------------------------------------------------------------------ refusals


def test_a_state_that_does_not_fit_is_refused():
    cascade = Cascade(state_a(), builders.step_b(), state="carry")
    x, steps = builders.inputs(N, TA), np.full((N, TA), 2)
    with pytest.raises(ParameterError, match="initial_state: expected a CascadeState"):
        cascade.run(x, steps, initial_state=[np.zeros((N, 4))])
    _, _, state = cascade.run(x[:2], steps[:2], return_state=True)
    with pytest.raises(ParameterError, match=r"expected a_states \(3, 4\), received shapes \[\(2, 4\)\]"):
        cascade.run(x, steps, initial_state=state)


@pytest.mark.parametrize("what", ["beam", "targets", "sequence carry"])
def test_settings_that_cannot_carry_a_state_are_refused(what):
    x, steps = builders.inputs(N, TA), np.full((N, TA), 2)
    kwargs = {}
    if what == "beam":
        cascade = Cascade(builders.model_a(), builders.feedback_b(output_size=3), feedback=True,
                          sampler=Sampler.beam(2), max_steps=3, stop_rule=StopRule.token(0))
        steps = None
    elif what == "targets":
        cascade = Cascade(builders.model_a(), builders.feedback_b(output_size=3), feedback=True,
                          feedback_start="previous")  # teacher forcing from zeros or a token carries a state
        kwargs = dict(targets=np.zeros((int(steps.sum()), 3), np.float32))
    else:
        cascade = Cascade(builders.model_a(), builders.sequence_b(), state="carry")
    with pytest.raises(ParameterError, match="return_state: a run cannot carry its state across calls"):
        cascade.run(x, steps, return_state=True, **kwargs)


def test_fast_cells_true_refuses_a_state():
    cascade = Cascade(state_a(), builders.step_b(), fast_cells=True)
    x, steps = builders.inputs(N, TA), np.full((N, TA), 2)
    with pytest.raises(ParameterError, match="fast_cells: True, but the known-cell path cannot apply"):
        cascade.run(x, steps, return_state=True)


def test_an_empty_window_hands_the_state_on_unchanged():
    cascade = Cascade(state_a(), builders.feedback_b(output_size=3), state="carry", **CASES["feedback"])
    x, steps = builders.inputs(N, TA), np.full((N, TA), 4)
    *_, state = cascade.run(x[:, :2], steps[:, :2], return_state=True)
    values, lengths, after = cascade.run(x[:, 2:2], steps[:, 2:2], initial_state=state, return_state=True)
    assert values.shape[0] == 0 and lengths.shape == (N, 0) and after.offset == 2
    for got, want in zip((*after.a_states, *after.b_states, after.previous),
                         (*state.a_states, *state.b_states, state.previous)):
        np.testing.assert_array_equal(got, want)


def test_a_state_form_a_trains_as_its_plain_twin():
    """A whole run with A in state form (zero states) has the values and gradients of the same A as a plain model."""
    plain = builders.model_a()
    twin = state_form(plain)
    b = builders.step_b()
    x, steps = tf.constant(builders.inputs(N, TA)), np.full((N, TA), 2)
    grads = []
    for model in (plain, twin):
        cascade = Cascade(model, b, state="carry")
        with tf.GradientTape() as tape:
            values, _ = cascade.run(x, steps, training=True)
            loss = tf.reduce_sum(values ** 2)
        grads.append([np.asarray(g) for g in tape.gradient(loss, model.trainable_variables + b.trainable_variables)])
    assert len(grads[0]) == len(grads[1])
    for want, got in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_inspect_names_a_s_form_and_its_states():
    from cascade_cli.inspection import describe_model

    rows = dict(describe_model(state_a(kind="lstm"), "a.keras")[0])
    assert rows["as model A"] == "yes: F=3, H=4, any Ta, state form, states [4, 4] (windows carry them)"
    rows = dict(describe_model(builders.model_a(), "a.keras")[0])
    assert rows["as model A"].endswith(", any Ta") and "state form" not in rows["as model A"]
