"""The feedback form of B against an independent eager reference (one sample, one inner step at a time)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import builders
import paths
from cascade_cli.errors import ModelError, ParameterError
from cascade_cli.run.models import feedback_problem, inspect_b
from cascade_cli.options import Sampler, StopRule
from cascade_cli.run.cascade import Cascade

STEPS = np.array([[3, 0, 2, 1], [0, 0, 0, 0], [1, 4, 0, 2]])  # zeros, a whole zero row
O = 3


def one_hot(index, size=O):
    row = np.zeros(size)
    row[index] = 1.0
    return row


def reference(model_a, model_b, x, steps, *, state="reset", start="zeros", sampler="identity", targets=None,
              max_steps=None, stop_token=None, exclude_stop_step=False, own_samples=False, keep_gradient=False):
    """Plain Python loops calling B directly on one row at a time.

    `own_samples` (with targets): every inner step after the first feeds the
    sampler's value of the previous output, without its gradient (scheduled
    sampling with probability 1); the first still reads the targets.

    Returns `(values (total, O) tf.Tensor, lengths (N, Ta), tokens list)`;
    `tokens` are the argmax ids of each emitted value (greedy).
    """
    ir = model_a(tf.convert_to_tensor(x))
    n_samples, outer = x.shape[0], x.shape[1]
    caps = np.broadcast_to(np.asarray(steps if steps is not None else max_steps), (n_samples, outer))
    sizes = [int(s.shape[-1]) for s in model_b.inputs[2:]]
    dtype = ir.dtype
    values, tokens, lengths = [], [], np.zeros((n_samples, outer), np.int64)
    offset = 0  # where the next pair's targets start (value order)

    def fed_value(y):
        if sampler == "identity":
            return y
        return tf.constant(one_hot(int(np.argmax(y.numpy()[0])))[None], dtype)

    for n in range(n_samples):
        carried = [tf.zeros([1, size], dtype) for size in sizes]
        last = tf.zeros([1, O], dtype)  # what "previous" starts the next pair with
        for t in range(outer):
            cap = int(caps[n, t])
            if cap == 0:
                continue
            states = carried if state == "carry" else [tf.zeros([1, size], dtype) for size in sizes]
            if start == "zeros":
                y_prev = tf.zeros([1, O], dtype)
            elif start == "previous":
                y_prev = last
            else:
                y_prev = tf.constant(one_hot(int(start.split(":")[1]))[None], dtype)
            emitted = 0
            for j in range(cap):
                out = model_b([ir[n, t][None], y_prev, *states])
                if not isinstance(out, (list, tuple)):
                    out = [out]
                y, states = out[0], list(out[1:])
                token = int(np.argmax(y.numpy()[0]))
                hit = stop_token is not None and token == stop_token
                if not (hit and exclude_stop_step):
                    values.append(y[0])
                    tokens.append(token)
                    emitted += 1
                if targets is not None and own_samples:
                    y_prev = fed_value(y) if keep_gradient else tf.stop_gradient(fed_value(y))
                elif targets is not None:
                    y_prev = tf.constant(targets[offset + j][None], dtype)
                else:
                    y_prev = fed_value(y)
                if hit:
                    break
            last = y_prev if targets is None else tf.constant(targets[offset + cap - 1][None], dtype)
            offset += cap
            lengths[n, t] = emitted
            carried = states
    values = tf.stack(values) if values else tf.zeros([0, O], dtype)
    return values, lengths, tokens


def models(kind="gru", dtype="float32", **kwargs):
    return builders.model_a(dtype=dtype), builders.feedback_b(kind, dtype=dtype, output_size=O, **kwargs)


def targets_for(steps, seed=3, dtype="float32"):
    return np.random.default_rng(seed).normal(size=(int(np.sum(steps)), O)).astype(dtype)


def assert_equal_reference(cascade, x, steps, **kwargs):
    tokens = cascade.sampler.kind != "identity"
    result = cascade.run(x, steps, return_tokens=tokens, targets=kwargs.get("targets"))
    values, lengths = result[:2]
    expected, expected_lengths, expected_tokens = reference(
        cascade.model_a, cascade.model_b, x, steps, state=cascade.state, start=cascade.feedback_start,
        sampler=cascade.sampler.kind, max_steps=cascade.max_steps, **kwargs)
    np.testing.assert_array_equal(lengths.numpy(), expected_lengths)
    np.testing.assert_allclose(values.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    if tokens:
        np.testing.assert_array_equal(result[2].numpy(), expected_tokens)
        assert result[2].dtype == tf.int64
    return values


FREE_GRID = [(s, m, f) for f in ("zeros", "token:2", "previous") for m in ("identity", "greedy") for s in ("reset", "carry")]
# every state, sampler and start on the default, each pair of them at least once
FREE_AUTO = [("reset", "greedy", "zeros"), ("carry", "identity", "zeros"), ("reset", "identity", "token:2"),
             ("carry", "greedy", "token:2"), ("reset", "identity", "previous"), ("carry", "greedy", "previous")]


# quick: one case on the default and three plain ones (each state, sampler and start); the rest run with -m slow
@pytest.mark.parametrize("state, sampler, start, jit", paths.quick(
    paths.both(FREE_GRID, auto=FREE_AUTO), "carry-greedy-token:2-auto", "reset-identity-zeros-plain",
    "reset-identity-token:2-plain", "carry-greedy-previous-plain"))
def test_free_running_equals_reference(state, sampler, start, jit):
    a, b = models()
    cascade = Cascade(a, b, feedback=True, state=state, feedback_start=start, sampler=sampler, jit_compile=jit)
    assert_equal_reference(cascade, builders.inputs(3, 4), STEPS)
    paths.assert_path(cascade, jit)


# quick: one case on the default, two plain ones (each state; each start on one path or the other); the rest
# run with -m slow
@pytest.mark.parametrize("state, start, jit", paths.quick(paths.both(
    [(s, f) for f in ("zeros", "token:1", "previous") for s in ("reset", "carry")],
    auto=[("reset", "token:1"), ("carry", "previous")]),
    "reset-token:1-auto", "carry-zeros-plain", "reset-previous-plain"))
def test_teacher_forcing_equals_reference(state, start, jit):
    a, b = models()
    cascade = Cascade(a, b, feedback=True, state=state, feedback_start=start, jit_compile=jit)
    targets = targets_for(STEPS)
    forced = assert_equal_reference(cascade, builders.inputs(3, 4), STEPS, targets=targets)
    free = cascade.run(builders.inputs(3, 4), STEPS)[0]
    assert not np.allclose(forced.numpy(), free.numpy())  # the targets are what is fed
    paths.assert_path(cascade, jit)  # teacher forcing keeps the known cell's recurrence; the free run compiles


# quick: each cell once, each state on the plain path, one case on the default; the other cells and states run
# with -m slow
@pytest.mark.parametrize("kind, state, jit", paths.quick(paths.both(
    [(k, s) for s in ("reset", "carry") for k in ("simple", "gru", "lstm")],
    auto=[("simple", "carry"), ("lstm", "reset")]), "simple-carry-auto", "gru-reset-plain",
    "lstm-carry-plain"))
def test_cells_equal_reference(kind, state, jit):
    a, b = models(kind)
    cascade = Cascade(a, b, feedback=True, state=state, sampler="greedy", feedback_start="previous",
                      jit_compile=jit)
    assert_equal_reference(cascade, builders.inputs(3, 4), STEPS)
    assert_equal_reference(cascade, builders.inputs(3, 4), STEPS, targets=targets_for(STEPS))
    paths.assert_path(cascade, jit)


@pytest.mark.parametrize("jit", paths.BOTH)
def test_stateless_feedback_b(jit):
    a, b = models(states=False)
    cascade = Cascade(a, b, feedback=True, sampler="greedy", jit_compile=jit)
    assert cascade.b_spec.state_sizes == () and cascade.b_spec.feedback
    assert_equal_reference(cascade, builders.inputs(3, 4), STEPS)
    paths.assert_path(cascade, jit)


# quick: one case per path, between them each state, start and exclude; the rest run with -m slow
@pytest.mark.parametrize("state, start, exclude, jit", paths.quick(paths.both(
    [(s, f, e) for e in (False, True) for f in ("zeros", "previous") for s in ("reset", "carry")],
    auto=[("reset", "zeros", False), ("carry", "previous", True)]),  # each state, start, exclude once
    "reset-zeros-False-auto", "carry-previous-True-plain"))
def test_token_stop_rule_equals_reference(state, start, exclude, jit):
    a, b = models()
    x = builders.inputs(4, 3, seed=5)
    # a token that stops some rows early and not others
    free, _, tokens = reference(a, b, x, None, max_steps=6, sampler="greedy", start=start, state=state)
    stop = int(np.bincount(tokens, minlength=O)[1:].argmax()) + 1 if len(set(tokens)) > 1 else tokens[0]
    cascade = Cascade(a, b, feedback=True, state=state, feedback_start=start, sampler="greedy", max_steps=6,
                      stop_rule=StopRule.token(stop), exclude_stop_step=exclude, jit_compile=jit)
    assert_equal_reference(cascade, x, None, stop_token=stop, exclude_stop_step=exclude)
    lengths = cascade.run(x)[1].numpy()
    assert lengths.min() < 6 - exclude  # some rows stopped early
    given = np.array([[2, 6, 1], [0, 3, 5], [6, 6, 6], [1, 0, 2]])  # steps cap the stop rule
    assert_equal_reference(cascade, x, given, stop_token=stop, exclude_stop_step=exclude)
    paths.assert_path(cascade, jit)


# quick: carry (its state carried between pairs as well); reset runs with -m slow
@pytest.mark.parametrize("state", [pytest.param("reset", marks=pytest.mark.slow), "carry"])
def test_eager_equals_tf_function(state):
    a, b = models()
    x, targets = builders.inputs(3, 4), targets_for(STEPS)
    compiled = Cascade(a, b, feedback=True, state=state, feedback_start="previous", sampler="greedy",
                       jit_compile=False)
    eager = Cascade(a, b, feedback=True, state=state, feedback_start="previous", sampler="greedy",
                    run_eagerly=True)
    for kwargs in ({}, {"targets": targets, "sampling_probability": 0.5}):
        one = compiled.run(x, STEPS, return_tokens=True, **kwargs)
        two = eager.run(x, STEPS, return_tokens=True, **kwargs)
        for left, right in zip(one, two):
            np.testing.assert_array_equal(left.numpy(), right.numpy())

    @tf.function
    def inside(x):  # traced into the caller's function
        return compiled(x, STEPS, return_tokens=True)

    values, tokens = inside(tf.constant(x))
    np.testing.assert_array_equal(values.flat_values.numpy(), compiled.run(x, STEPS)[0].numpy())
    np.testing.assert_array_equal(tokens.flat_values.numpy(), compiled.run(x, STEPS, return_tokens=True)[2].numpy())
    assert values.shape[-1] == O


# half of the 16 settings: every pair and every three of the four factors, but not all four (8 runs)
HALF = [(kind, state, start, fast_cells) for kind in ("gru", "lstm") for state in ("reset", "carry")
        for start in ("zeros", "previous") for fast_cells in ("auto", False)
        if (kind == "lstm") ^ (state == "carry") ^ (start == "previous") ^ (fast_cells is False)]


# quick: one case on the default, two plain ones (each kind, state, start and fast_cells on the plain path); the
# rest run with -m slow
@pytest.mark.parametrize("kind, state, start, fast_cells, jit", paths.quick(paths.both(
    HALF, auto=[("gru", "reset", "zeros", False), ("lstm", "carry", "previous", "auto")]),
    "lstm-carry-previous-auto-auto", "lstm-reset-previous-False-plain", "gru-carry-zeros-auto-plain"))
def test_teacher_forced_gradients_equal_reference(kind, state, start, fast_cells, jit):
    a, b = models(kind, dtype="float64")
    x = builders.inputs(3, 4).astype("float64")
    targets = targets_for(STEPS, dtype="float64")
    cascade = Cascade(a, b, feedback=True, state=state, feedback_start=start, jit_compile=jit,
                      fast_cells=fast_cells)
    weights = a.trainable_variables + b.trainable_variables
    upstream = tf.constant(np.random.default_rng(1).normal(size=(int(STEPS.sum()), O)))

    with tf.GradientTape() as tape:
        values = cascade.run(x, STEPS, targets=targets, training=True)[0]
        loss = tf.reduce_sum(values * upstream)
    grads = tape.gradient(loss, weights)
    with tf.GradientTape() as tape:
        expected = reference(a, b, x, STEPS, state=state, start=start, targets=targets)[0]
        expected_loss = tf.reduce_sum(expected * upstream)
    expected_grads = tape.gradient(expected_loss, weights)
    for weight, got, want in zip(weights, grads, expected_grads):
        assert got is not None, weight.path
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-10, err_msg=weight.path)
    assert cascade.a_compiled is (jit == "auto")


# quick: carry; reset, which feeds the same values, runs with -m slow
@pytest.mark.parametrize("state", [pytest.param("reset", marks=pytest.mark.slow), "carry"])
def test_sampling_probability_zero_is_teacher_forcing_and_one_feeds_the_samplers_values(state):
    a, b = models()
    x, targets = builders.inputs(3, 4), targets_for(STEPS)
    cascade = Cascade(a, b, feedback=True, state=state, sampler="greedy", jit_compile=False, fast_cells=False)
    forced = cascade.run(x, STEPS, targets=targets)[0].numpy()
    fast = Cascade(a, b, feedback=True, state=state, sampler="greedy", jit_compile=False)  # the known-cell path
    np.testing.assert_allclose(fast.run(x, STEPS, targets=targets)[0].numpy(), forced, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cascade.run(x, STEPS, targets=targets, sampling_probability=0.0)[0].numpy(), forced)
    np.testing.assert_array_equal(
        cascade.run(x, STEPS, targets=targets, sampling_probability=tf.constant(0.0))[0].numpy(), forced)
    # p = 1: every j > 0 feeds the sampler's value of the previous output, j = 0 still the start
    free = cascade.run(x, STEPS)[0].numpy()
    np.testing.assert_allclose(cascade.run(x, STEPS, targets=targets, sampling_probability=1.0)[0].numpy(), free,
                               rtol=1e-6, atol=1e-7)
    # in between: some rows fed their own samples, some the targets; a tensor does not retrace
    traces = len(cascade._functions)
    half = cascade.run(x, STEPS, targets=targets, sampling_probability=tf.constant(0.5, tf.float64))[0].numpy()
    cascade.run(x, STEPS, targets=targets, sampling_probability=tf.constant(0.25, tf.float64))
    assert len(cascade._functions) == traces
    functions = list(cascade._functions.values())
    for n in (1, 2):  # nor per batch size
        cascade.run(x[:n], STEPS[:n], targets=targets[:int(STEPS[:n].sum())], sampling_probability=tf.constant(0.5))
    assert [f.experimental_get_tracing_count() for f in functions] == [1] * len(functions)
    assert not np.allclose(half, forced) and not np.allclose(half, free)


# quick: one case per path, each state once; carry on the plain path runs with -m slow
@pytest.mark.parametrize("state, jit", paths.quick(paths.both([("reset",), ("carry",)], auto=[("carry",)]),
                                              "carry-auto", "reset-plain"))
def test_scheduled_sampling_gradient_skips_the_fed_samples(state, jit):
    a, b = models(dtype="float64")
    x, targets = builders.inputs(3, 4).astype("float64"), targets_for(STEPS, dtype="float64")
    cascade = Cascade(a, b, feedback=True, state=state, feedback_start="previous",
                      jit_compile=jit)  # identity: y itself fed, without its gradient
    weights = a.trainable_variables + b.trainable_variables
    with tf.GradientTape() as tape:
        values = cascade.run(x, STEPS, targets=targets, sampling_probability=1.0)[0]
        loss = tf.reduce_sum(values)
    grads = tape.gradient(loss, weights)
    with tf.GradientTape() as tape:
        expected = reference(a, b, x, STEPS, state=state, start="previous", targets=targets, own_samples=True)[0]
        expected_loss = tf.reduce_sum(expected)
    np.testing.assert_allclose(values.numpy(), expected.numpy(), rtol=1e-10)
    for weight, got, want in zip(weights, grads, tape.gradient(expected_loss, weights)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-10, err_msg=weight.path)
    with tf.GradientTape() as tape:  # the same values with the gradient through what is fed: a different gradient
        through = reference(a, b, x, STEPS, state=state, start="previous", targets=targets, own_samples=True,
                            keep_gradient=True)[0]
        through_loss = tf.reduce_sum(through)
    np.testing.assert_allclose(through.numpy(), expected.numpy(), rtol=1e-10)
    assert any(not np.allclose(g, f) for g, f in zip(grads, tape.gradient(through_loss, weights)))


def test_bad_input_is_refused():
    a, b = models()
    with pytest.raises(ModelError, match=r"size 4 but B emits O=3"):
        x = keras.Input((4,)); prev = keras.Input((4,)); s = keras.Input((5,))
        h, [s2] = keras.layers.GRUCell(5)(keras.layers.Concatenate()([x, prev]), [s])
        Cascade(a, keras.Model([x, prev, s], [keras.layers.Dense(3)(h), s2]), feedback=True)
    with pytest.raises(ParameterError, match=r"^feedback: needs a step-form B"):
        Cascade(a, builders.sequence_b(), feedback=True)
    with pytest.raises(ParameterError, match=r"^feedback_start: token 3 is outside B's outputs"):
        Cascade(a, b, feedback=True, feedback_start="token:3")
    with pytest.raises(ParameterError, match=r"^feedback_start: expected zeros, previous or token:ID"):
        Cascade(a, b, feedback=True, feedback_start="token:-1")
    with pytest.raises(ParameterError, match=r"^feedback_start: applies with feedback=True only"):
        Cascade(a, builders.step_b(), feedback_start="previous")
    with pytest.raises(ModelError, match=r"needs feedback=True"):
        Cascade(a, b)  # a feedback-form B without feedback
    with pytest.raises(ParameterError, match=r"^fast_cells: True, but .*Concatenate\(\)\(\[x, y_prev\]\)"):
        Cascade(a, models(states=False)[1], feedback=True, fast_cells=True)
    with pytest.raises(ParameterError, match=r"^fast_cells: True, but .*teacher forcing only"):
        Cascade(a, b, feedback=True, fast_cells=True, jit_compile=False).run(builders.inputs(3, 4), STEPS)
    cascade = Cascade(a, b, feedback=True, jit_compile=False)
    x = builders.inputs(3, 4)
    with pytest.raises(ParameterError, match=r"^targets: expected sum\(steps\)=13 rows"):
        cascade.run(x, STEPS, targets=np.zeros((12, O), np.float32))
    with pytest.raises(ParameterError, match=r"^targets: expected shape \(sum\(steps\), O=3\)"):
        cascade.run(x, STEPS, targets=np.zeros((13, 2), np.float32))
    with pytest.raises(ParameterError, match=r"^sampling_probability: applies to teacher forcing"):
        cascade.run(x, STEPS, sampling_probability=0.5)
    with pytest.raises(ParameterError, match=r"^sampling_probability: expected a probability in \[0, 1\]"):
        cascade.run(x, STEPS, targets=targets_for(STEPS), sampling_probability=1.5)
    with pytest.raises(ParameterError, match=r"^return_tokens: needs a sampler"):
        cascade.run(x, STEPS, return_tokens=True)
    with pytest.raises(ParameterError, match=r"^sample_index: expected \(3,\) non-negative integers"):
        cascade.run(x, STEPS, sample_index=[0, 1])
    with pytest.raises(ParameterError, match=r"^targets: teacher forcing needs feedback=True"):
        Cascade(a, builders.step_b(output_size=O), jit_compile=False).run(x, STEPS, targets=targets_for(STEPS))
    stopper = Cascade(a, b, feedback=True, max_steps=4, stop_rule=StopRule.token(0), jit_compile=False)
    with pytest.raises(ParameterError, match=r"^targets: teacher forcing needs given steps and no stop rule"):
        stopper.run(x, STEPS, targets=targets_for(STEPS))
    with pytest.raises(ParameterError, match=r"^sampler: expected a Sampler"):
        Cascade(a, b, feedback=True, sampler="nucleus")


def test_inspect_b_feedback_form():
    b = builders.feedback_b(output_size=O)
    spec = inspect_b(b, feedback=True)
    assert (spec.form, spec.input_size, spec.output_size, spec.state_sizes, spec.feedback) == ("step", 4, O, (5,), True)
    assert feedback_problem(b) is None
    assert "sequence form" in feedback_problem(builders.sequence_b())
    assert feedback_problem(builders.step_b()) is not None  # [x, state] -> [y, state]: no y_prev
    assert not inspect_b(builders.step_b()).feedback


def test_sampler_object_and_categorical_run():
    a, b = models()
    cascade = Cascade(a, b, feedback=True, sampler=Sampler.categorical(temperature=0.7, top_k=2), seed=5,
                      jit_compile=False)
    x = builders.inputs(3, 4)
    one = cascade.run(x, STEPS, return_tokens=True)
    two = cascade.run(x, STEPS, return_tokens=True)
    for left, right in zip(one, two):
        np.testing.assert_array_equal(left.numpy(), right.numpy())  # seeded: the same draws every call
    other = Cascade(a, b, feedback=True, sampler=Sampler.categorical(temperature=0.7, top_k=2), seed=6,
                    jit_compile=False).run(x, STEPS, return_tokens=True)
    assert not np.array_equal(one[2].numpy(), other[2].numpy())


# the default suite keeps 3 of 18: each cell once, between them each start and both states; the other 15 (the
# pairwise covering's other cell-start pairs among them) run with -m slow
CELL_STARTS = [(kind, state, start) for kind in ("simple", "gru", "lstm") for state in ("reset", "carry")
               for start in ("zeros", "token:1", "previous")]


@pytest.mark.parametrize("kind, state, start", paths.quick(
    paths.covering(CELL_STARTS), "simple-carry-previous", "gru-reset-zeros", "lstm-reset-token:1"))
def test_teacher_forcing_takes_the_known_cell_path(kind, state, start, monkeypatch):
    from cascade_cli.run import feedback as module

    calls = []
    original = module.packed_recurrence
    monkeypatch.setattr(module, "packed_recurrence", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    a, b = models(kind)
    cascade = Cascade(a, b, feedback=True, state=state, feedback_start=start, jit_compile=False, fast_cells=True)
    assert_equal_reference(cascade, builders.inputs(3, 4), STEPS, targets=targets_for(STEPS))
    assert calls  # the hand-written recurrence ran
    calls.clear()
    auto = Cascade(a, b, feedback=True, state=state, feedback_start=start, run_eagerly=True)
    auto.run(builders.inputs(3, 4), STEPS)  # free running calls B itself
    assert not calls
    # a probability given as a tensor: the known-cell path where it is 0, exactly; B's own loop elsewhere
    forced = cascade.run(builders.inputs(3, 4), STEPS, targets=targets_for(STEPS))[0].numpy()
    for value in (0.0, 0.5):
        scheduled = cascade.run(builders.inputs(3, 4), STEPS, targets=targets_for(STEPS),
                                sampling_probability=tf.constant(value))[0].numpy()
        assert np.array_equal(scheduled, forced) == (value == 0)
    empty = cascade.run(builders.inputs(3, 4), np.zeros((3, 4), int), targets=np.zeros((0, O), np.float32))[0]
    assert empty.shape == (0, O)


@pytest.mark.xla
def test_call_returns_ragged_values_and_tokens_and_a_under_xla_by_default():
    a, b = models()
    x = builders.inputs(3, 4)
    cascade = Cascade(a, b, feedback=True, sampler="greedy", feedback_start="previous")  # jit_compile="auto"
    values, tokens = cascade(x, STEPS, return_tokens=True)
    assert cascade.a_compiled is True
    assert values.shape[:2] == (3, 4) and tokens.shape[:2] == (3, 4) and tokens.dtype == tf.int64
    np.testing.assert_array_equal(values.row_lengths(axis=2).numpy().reshape(3, 4), STEPS)
    expected, _, expected_tokens = reference(a, b, x, STEPS, start="previous", sampler="greedy")
    np.testing.assert_allclose(values.flat_values.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tokens.flat_values.numpy(), expected_tokens)
    assert isinstance(cascade(x, STEPS), tf.RaggedTensor)


def test_integer_token_targets_are_fed_as_one_hot():
    a, b = models()
    x = builders.inputs(3, 4)
    ids = np.random.default_rng(0).integers(0, O, size=int(STEPS.sum()))
    cascade = Cascade(a, b, feedback=True, feedback_start="previous", jit_compile=False)
    np.testing.assert_array_equal(cascade.run(x, STEPS, targets=ids)[0].numpy(),
                                  cascade.run(x, STEPS, targets=np.eye(O, dtype=np.float32)[ids])[0].numpy())
    with pytest.raises(ParameterError, match=r"^targets: token ids must be in \[0, 3\)"):
        cascade.run(x, STEPS, targets=np.full(int(STEPS.sum()), O))


# quick: carry; reset, which takes the same known-cell path, runs with -m slow
@pytest.mark.parametrize("state", [pytest.param("reset", marks=pytest.mark.slow), "carry"])
def test_a_zero_probability_tensor_gives_teacher_forcings_values_and_gradients(state):
    """As the training loop calls it: a scheduled probability of 0, as a tensor, takes the known-cell path."""
    a, b = models("gru", dtype="float64")
    x, targets = builders.inputs(3, 4).astype("float64"), targets_for(STEPS, dtype="float64")
    cascade = Cascade(a, b, feedback=True, state=state, feedback_start="previous", jit_compile=False)
    weights = a.trainable_variables + b.trainable_variables
    results = []
    for probability in (0.0, tf.constant(0.0, tf.float32)):
        with tf.GradientTape() as tape:
            values = cascade.run(x, STEPS, targets=targets, training=True, sampling_probability=probability)[0]
            loss = tf.reduce_sum(values * values)
        results.append((values.numpy(), tape.gradient(loss, weights)))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for weight, got, want in zip(weights, results[1][1], results[0][1]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-14, err_msg=weight.path)
