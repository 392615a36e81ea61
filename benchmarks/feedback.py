"""Times feedback decoding: free-running greedy generation with a stop token (issues 13 and 16).

Run from the repository root, on an otherwise idle machine:

    python -m benchmarks.feedback               # full run, medians of 7 (minutes)
    python -m benchmarks.feedback --quick       # tiny shapes, 1 repeat (seconds)

The models are a GRU A and a feedback-form B (`[x (H), y_prev (O), state]
-> Concatenate -> GRUCell(H) -> Dense(O)`) whose weights are random except for
a few units set by hand so that each pair's length is chosen: A copies the
pair's chosen length `L[n, t]` (a one-hot among the inputs' first features)
into IR, and B counts the tokens it has emitted (token `c + 1` after `c`
steps) and emits the stop token `END = 0` at inner step `L - 1`. Lengths are
drawn uniform in `1..max_steps`, so rows finish at realistic, ragged steps
and the realised lengths are the drawn ones (checked). With margins of
several logits between the top token and the next, every method's greedy
tokens agree exactly.

The methods, on the same weights, inputs and lengths, values checked equal
(tokens and lengths equal, values and gradients allclose) before timing:

- `cascade`: the default `Cascade(a, b, feedback=True, sampler="greedy",
  max_steps=M, stop_rule=StopRule.token(END))` called inside a `tf.function`
  traced once for any batch (as `fit` and a custom train step call it, and as
  issue 29 judges it; the peers suite's `cascade` likewise); teacher-forced,
  `Cascade(a, b, feedback=True).run(inputs, lengths, targets=tokens,
  training=True)` and the loss under a `tf.GradientTape`, in such a function.
- `cascade_eager`: the same calls made eagerly on numpy inputs, as the README
  shows them (`eager / cascade` in the table: the eager call's own cost).
- `padded_decode`, `padded_decode_xla`: the TF Addons / KerasHub way, every pair
  decoded in one batch for `max_steps` steps, B called on all rows at every
  step, finished rows masked (they keep emitting END), the results cropped at
  each row's first END; the second under XLA. Teacher-forced: a masked
  `keras.layers.GRU` with B's cell weights over `Concatenate([IR repeated,
  y_prev = the targets shifted right])`, then B's Dense (XLA: padded to
  `max_steps`).
- `nested`: hand-written nested `tf.while_loop`s (the style of
  `benchmarks/nested.py`): one outer step after another, the inner loop
  decoding that outer step's pairs of the whole batch until every one has
  met END (teacher-forced: for that outer step's longest length), masked.
- `limit_xla` (forward only): the work no runner can avoid (`limit_decode`):
  told each pair's length beforehand, A and then B under XLA on exactly the
  rows still running at each step, nothing else. `best padded / limit_xla` is
  the highest `best padded / cascade` any runner could reach.

Forward + backward is the gradient of the teacher-forced cross-entropy (sum
over every value) with respect to every weight of A and B. Repeats are
interleaved across methods, medians reported; the run is merged into
`results.json` and `RESULTS.md` as its own suite, beside `benchmarks.bench`'s
and `benchmarks.peers`' runs.
"""

import dataclasses
import sys
import time

import numpy as np

from benchmarks import bench, peers

SUITE = "feedback"
METHODS = ("cascade", "cascade_eager", "padded_decode", "padded_decode_xla", "nested")
EAGER = "cascade_eager"  # the eager call on numpy arguments; every other method takes tensors
PEERS = ("padded_decode", "padded_decode_xla")
LIMIT = "limit_xla"  # forward only: `limit_decode`, told the lengths
DIRECTIONS = ("forward", "forward+backward")
STATE = "reset"
END = 0  # the stop token; token c + 1 means "c + 1 steps emitted so far"
SHARPNESS = 10.0  # the hand-set units' pre-activation scale: tanh(+-5) = +-0.9999
STOP_LOGIT, NEXT_LOGIT = 10.0, 5.0  # END beats the next counting token, which beats the rest (|noise| < 1)
NOISE_SCALE = 0.01  # the random units' readout weights: small enough never to move the argmax
TOLERANCE = {"atol": 2e-4, "rtol": 2e-4}  # float32, different summation orders (oneDNN, XLA)
GRADIENT_RTOL = 1e-3  # gradients: relative to each weight's largest entry


@dataclasses.dataclass(frozen=True)
class FeedbackPlan(bench.BasePlan):
    """What one feedback run does: its cases and the `bench.BasePlan` settings.

    Attributes:
        cases: `bench.Case` entries, smallest batch first.
    """

    cases: tuple


def plan(*, quick=False, repeats=None, batches=None):
    """Returns the plan (issue 16's feedback targets: N=8 and N=64; issue 29 adds N=1), or its tiny `quick` version.

    `batches` keeps only the cases of those `N` (a reduced run).
    """
    if quick:
        shapes, features, outputs, max_steps = ((2, 3, 8), (3, 4, 8)), 4, 4, 3
    else:
        shapes, features, outputs, max_steps = ((1, 200, 64), (8, 100, 64), (64, 50, 64)), 16, 16, 8
    cases = tuple(bench.Case(f"N={n} Ta={ta} H={h}", n, ta, h) for n, ta, h in shapes
                  if batches is None or n in batches)
    return FeedbackPlan(cases=cases, features=features, outputs=outputs, max_steps=max_steps,
                        repeats=repeats if repeats is not None else (1 if quick else 7), warmups=1, quick=quick)


# ---------------------------------------------------------------------------- the models


def check_sizes(*, features, hidden, outputs, max_steps):
    """Raises `ValueError` unless the hand-set units fit: F >= M, H >= 2M, O >= M + 1."""
    if features < max_steps or hidden < 2 * max_steps or outputs < max_steps + 1:
        raise ValueError(f"the length-choosing models need F >= max_steps, H >= 2 * max_steps and O >= max_steps + 1. "
                         f"Received: F={features}, H={hidden}, O={outputs}, max_steps={max_steps}")


def _pass_through(kernel, recurrent, bias, unit, units):
    """Makes GRU unit `unit` forget its state: update gate ~0, no recurrent input, so h = tanh(x_h)."""
    z, h = unit, 2 * units + unit
    kernel[:, z] = 0.0
    kernel[:, h] = 0.0
    recurrent[:, [z, units + unit, h]] = 0.0
    bias[0, z], bias[1, z], bias[0, h], bias[1, h] = -20.0, 0.0, 0.0, 0.0


def build_models(*, features, hidden, outputs, max_steps, seed=0):
    """Builds A (GRU) and a feedback-form B whose greedy decode stops at each pair's chosen length.

    A's units `0..M-1` read input feature `i` (1 where the pair's length is
    `i + 1`): `IR[i] = +1` there and `-1` elsewhere. B's units `c` ("the
    length is c + 1 and c tokens are out") and `M + c` ("c tokens are out",
    read from `y_prev`: token `c`, or zeros for `c = 0`) drive the head: END
    where the first holds, else token `c + 1`. Every other weight is Keras'
    random initialisation (the random units' readout scaled to `NOISE_SCALE`).

    Returns:
        `(model_a, model_b)`: A maps `(N, Ta, F)` to `(N, Ta, H)`; B maps
        `[x (batch, H), y_prev (batch, O), s (batch, H)]` to `[y (batch, O), s']`.
    """
    import keras

    check_sizes(features=features, hidden=hidden, outputs=outputs, max_steps=max_steps)
    keras.utils.set_random_seed(seed)
    sequence = keras.Input(shape=(None, features))
    model_a = keras.Model(sequence, keras.layers.GRU(hidden, return_sequences=True)(sequence), name="model_a")
    x, y_prev, state = keras.Input(shape=(hidden,)), keras.Input(shape=(outputs,)), keras.Input(shape=(hidden,))
    joined = keras.layers.Concatenate()([x, y_prev])
    h, new_states = keras.layers.GRUCell(hidden)(joined, [state])
    y = keras.layers.Dense(outputs)(h)
    model_b = keras.Model([x, y_prev, state], [y, *new_states], name="model_b")

    a_gru = next(layer for layer in model_a.layers if isinstance(layer, keras.layers.GRU))
    kernel, recurrent, bias = (w.copy() for w in a_gru.get_weights())
    for i in range(max_steps):
        _pass_through(kernel, recurrent, bias, i, hidden)
        kernel[i, 2 * hidden + i] = SHARPNESS
        bias[0, 2 * hidden + i] = -SHARPNESS / 2
    a_gru.set_weights([kernel, recurrent, bias])

    cell, head = peers.b_layers(model_b)
    kernel, recurrent, bias = (w.copy() for w in cell.get_weights())
    y_rows = hidden + np.arange(outputs)  # where y_prev enters the cell's input [x, y_prev]
    for c in range(max_steps):
        match, count = 2 * hidden + c, 2 * hidden + max_steps + c
        _pass_through(kernel, recurrent, bias, c, hidden)
        _pass_through(kernel, recurrent, bias, max_steps + c, hidden)
        # indicator "c tokens are out": y_prev[c] for c >= 1, 1 - sum(y_prev) for c = 0
        if c == 0:
            kernel[y_rows, match] = kernel[y_rows, count] = -SHARPNESS
            indicator_bias = SHARPNESS
        else:
            kernel[hidden + c, match] = kernel[hidden + c, count] = SHARPNESS
            indicator_bias = 0.0
        kernel[c, match] = SHARPNESS / 2  # (IR[c] + 1) / 2: the length is c + 1
        bias[0, match] = indicator_bias - SHARPNESS  # s * (len_is + indicator - 1.5)
        bias[0, count] = indicator_bias - SHARPNESS / 2  # s * (indicator - 0.5)
    cell.set_weights([kernel, recurrent, bias])
    head_kernel, head_bias = (w.copy() for w in head.get_weights())
    head_kernel *= NOISE_SCALE
    head_bias[:] = 0.0
    head_kernel[: 2 * max_steps] = 0.0
    for c in range(max_steps):  # a unit at +-1 reads as (u + 1) / 2 in {0, 1}
        head_kernel[c, END] = STOP_LOGIT / 2
        head_bias[END] += STOP_LOGIT / 2
        head_kernel[max_steps + c, c + 1] = NEXT_LOGIT / 2
        head_bias[c + 1] += NEXT_LOGIT / 2
    head.set_weights([head_kernel, head_bias])
    return model_a, model_b


def make_data(rng, batch, outer, *, features, max_steps):
    """`(inputs (N, Ta, F) float32, lengths (N, Ta) int32)`: lengths uniform in 1..max_steps, one-hot in the inputs."""
    lengths = rng.integers(1, max_steps + 1, size=(batch, outer)).astype(np.int32)
    inputs = rng.normal(size=(batch, outer, features)).astype(np.float32)
    inputs[..., :max_steps] = np.eye(max_steps, dtype=np.float32)[lengths - 1]
    return inputs, lengths


# -------------------------------------------------------------------------- the methods


def _state_sizes(model_b):
    return [int(spec.shape[-1]) for spec in model_b.inputs[2:]]


def _greedy_step(model_b, x, y_prev, states, *, training):
    """One call of B: `(y, token int32, fed one-hot, new_states)`."""
    import tensorflow as tf

    y, *states = model_b([x, y_prev, *states], training=training)
    token = tf.argmax(y, axis=-1, output_type=tf.int32)
    return y, token, tf.one_hot(token, tf.shape(y)[-1], dtype=y.dtype), states


def padded_decode_core(model_a, model_b, inputs, *, max_steps, end=END):
    """The padded decode loop: every pair for `max_steps` steps in one batch, finished rows masked.

    Returns:
        `(ys (P, M, O), tokens (P, M) int32)` with `P = N * Ta`: each row keeps
        emitting `end` once it has (KerasHub's padding); B still runs on it.
    """
    import tensorflow as tf

    ir = model_a(inputs, training=False)
    x = tf.reshape(ir, [-1, ir.shape[-1]])
    rows = tf.shape(x)[0]
    size = model_b.outputs[0].shape[-1]
    states = [tf.zeros(tf.stack([rows, s]), x.dtype) for s in _state_sizes(model_b)]
    ys = tf.TensorArray(x.dtype, size=max_steps, element_shape=tf.TensorShape([None, size]))
    tokens = tf.TensorArray(tf.int32, size=max_steps, element_shape=tf.TensorShape([None]))

    def body(j, y_prev, states, finished, ys, tokens):
        y, token, _, states = _greedy_step(model_b, x, y_prev, states, training=False)
        token = tf.where(finished, end, token)
        return (j + 1, tf.one_hot(token, size, dtype=y.dtype), states, tf.logical_or(finished, token == end),
                ys.write(j, y), tokens.write(j, token))

    start = (tf.constant(0), tf.zeros(tf.stack([rows, size]), x.dtype), states, tf.zeros([rows], tf.bool), ys, tokens)
    _, _, _, _, ys, tokens = tf.while_loop(lambda j, *_: j < max_steps, body, start)
    return tf.transpose(ys.stack(), [1, 0, 2]), tf.transpose(tokens.stack())


def limit_decode(model_a, model_b, lengths, *, max_steps):
    """The decode's limit: B under XLA on exactly the rows still running, told each pair's length beforehand.

    No runner can do less with A and B as they are: A under XLA, then B once
    per useful `(pair, step)` row and nothing else. The pairs are sorted
    longest first once (with the lengths given, not decoded), so the rows of
    inner step `j` are the first `counts[j]` (prefix slices, static shapes),
    and each row is fed the one-hot of its own greedy token. It still decodes:
    its tokens and values are checked against the others'.

    Returns:
        `function(inputs)` giving `(values (total, O), tokens (total,) int32,
        lengths (N, Ta))` in value order, for inputs with `lengths`' shape.
    """
    import tensorflow as tf

    flat = np.asarray(lengths, np.int32).ravel()
    order = np.argsort(-flat, kind="stable")
    counts = [int(np.sum(flat > j)) for j in range(max_steps)]
    starts = np.concatenate([[0], np.cumsum(flat)[:-1]])  # each pair's first value
    # value position of step-major row (j, i): pair order[i]'s start + j
    positions = np.concatenate([starts[order[:count]] + j for j, count in enumerate(counts)])
    value_order = tf.constant(np.argsort(positions, kind="stable").astype(np.int32))
    order = tf.constant(order.astype(np.int32))
    size = model_b.outputs[0].shape[-1]
    shape = tf.constant(np.asarray(lengths, np.int32))

    @tf.function(jit_compile=True)
    def decode(inputs):
        ir = model_a(inputs, training=False)
        x = tf.gather(tf.reshape(ir, [-1, ir.shape[-1]]), order)
        y_prev = tf.zeros([counts[0], size], x.dtype)
        states = [tf.zeros([counts[0], s], x.dtype) for s in _state_sizes(model_b)]
        ys, tokens = [], []
        for count in counts:
            if count == 0:
                break
            y, token, y_prev, states = _greedy_step(model_b, x[:count], y_prev[:count], [s[:count] for s in states],
                                                    training=False)
            ys.append(y)
            tokens.append(token)
        return tf.gather(tf.concat(ys, 0), value_order), tf.gather(tf.concat(tokens, 0), value_order)

    def function(inputs):
        values, tokens = decode(inputs)
        return values, tokens, shape

    return function


def crop_at_end(ys, tokens, *, shape, end=END):
    """`(values, tokens, lengths (N, Ta))` in value order: each row up to and with its first `end`."""
    import tensorflow as tf

    hit = tokens == end
    width = tf.shape(tokens)[1]
    lengths = tf.where(tf.reduce_any(hit, axis=1), tf.argmax(tf.cast(hit, tf.int32), axis=1, output_type=tf.int32) + 1,
                       width)
    mask = tf.sequence_mask(lengths, width)
    return tf.boolean_mask(ys, mask), tf.boolean_mask(tokens, mask), tf.reshape(lengths, shape)


def nested_generate(model_a, model_b, inputs, *, max_steps, end=END):
    """Nested loops, generating: outer over Ta, inner until every pair of that outer step met `end`.

    Returns:
        `(outputs (Ta, M, N, O), tokens (Ta, M, N), lengths (Ta, N))`: time-major, zero past each length.
    """
    import tensorflow as tf

    ir = model_a(inputs, training=False)
    ir_time_major = tf.transpose(ir, [1, 0, 2])
    num_outer, batch = tf.shape(ir)[1], tf.shape(ir)[0]
    size = model_b.outputs[0].shape[-1]
    zero_states = [tf.zeros(tf.stack([batch, s]), ir.dtype) for s in _state_sizes(model_b)]

    def inner_loop(x):
        def body(j, y_prev, states, finished, lengths, ys, tokens):
            y, token, fed, states = _greedy_step(model_b, x, y_prev, states, training=False)
            active = tf.logical_not(finished)
            ys = ys.write(j, tf.where(active[:, None], y, tf.zeros_like(y)))
            tokens = tokens.write(j, tf.where(active, token, 0))
            return (j + 1, fed, states, tf.logical_or(finished, token == end),
                    lengths + tf.cast(active, tf.int32), ys, tokens)

        start = (tf.constant(0), tf.zeros(tf.stack([batch, size]), ir.dtype), zero_states,
                 tf.zeros([batch], tf.bool), tf.zeros([batch], tf.int32),
                 tf.TensorArray(ir.dtype, size=0, dynamic_size=True, element_shape=tf.TensorShape([None, size])),
                 tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=tf.TensorShape([None])))
        j, _, _, _, lengths, ys, tokens = tf.while_loop(
            lambda j, _y, _s, finished, *_: tf.logical_and(j < max_steps, tf.logical_not(tf.reduce_all(finished))),
            body, start)
        pad = max_steps - j
        return (tf.pad(ys.stack(), [[0, pad], [0, 0], [0, 0]]), tf.pad(tokens.stack(), [[0, pad], [0, 0]]), lengths)

    def outer_body(t, blocks, token_blocks, all_lengths):
        block, token_block, lengths = inner_loop(ir_time_major[t])
        return t + 1, blocks.write(t, block), token_blocks.write(t, token_block), all_lengths.write(t, lengths)

    arrays = (tf.TensorArray(ir.dtype, size=num_outer, element_shape=tf.TensorShape([max_steps, None, size])),
              tf.TensorArray(tf.int32, size=num_outer, element_shape=tf.TensorShape([max_steps, None])),
              tf.TensorArray(tf.int32, size=num_outer, element_shape=tf.TensorShape([None])))
    _, blocks, token_blocks, all_lengths = tf.while_loop(lambda t, *_: t < num_outer, outer_body,
                                                         (tf.constant(0), *arrays))
    return blocks.stack(), token_blocks.stack(), all_lengths.stack()


def nested_teacher_forced(model_a, model_b, inputs, steps, padded_targets, *, training=True):
    """Nested loops, teacher-forced: outer over Ta, inner for that outer step's longest length, masked.

    `padded_targets (N, Ta, L)` holds each pair's token ids; `y_prev` at inner
    step `j > 0` is the one-hot of target `j - 1`, zeros at `j = 0`.

    Returns:
        `(outputs (Ta, L, N, O), mask (Ta, L, N))`, time-major.
    """
    import tensorflow as tf

    ir = model_a(inputs, training=training)
    ir_time_major = tf.transpose(ir, [1, 0, 2])
    steps_time_major = tf.transpose(steps)
    targets_time_major = tf.transpose(padded_targets, [1, 2, 0])  # (Ta, L, N)
    num_outer, batch = tf.shape(ir)[1], tf.shape(ir)[0]
    longest = tf.shape(padded_targets)[2]
    size = model_b.outputs[0].shape[-1]
    zero_states = [tf.zeros(tf.stack([batch, s]), ir.dtype) for s in _state_sizes(model_b)]

    def inner_loop(x, lengths, targets):
        inner_len = tf.reduce_max(lengths)
        written = tf.TensorArray(ir.dtype, size=inner_len, element_shape=tf.TensorShape([None, size]))

        def body(j, states, written):
            y_prev = tf.where(j > 0, tf.one_hot(targets[tf.maximum(j - 1, 0)], size, dtype=ir.dtype),
                              tf.zeros(tf.stack([batch, size]), ir.dtype))
            y, *new_states = model_b([x, y_prev, *states], training=training)
            active = (j < lengths)[:, None]
            states = [tf.where(active, new, old) for new, old in zip(new_states, states)]
            return j + 1, states, written.write(j, tf.where(active, y, tf.zeros_like(y)))

        _, _, written = tf.while_loop(lambda j, *_: j < inner_len, body, (tf.constant(0), zero_states, written))
        return tf.pad(written.stack(), [[0, longest - inner_len], [0, 0], [0, 0]])

    def outer_body(t, blocks):
        return t + 1, blocks.write(t, inner_loop(ir_time_major[t], steps_time_major[t], targets_time_major[t]))

    blocks = tf.TensorArray(ir.dtype, size=num_outer, element_shape=tf.TensorShape([None, None, size]))
    _, blocks = tf.while_loop(lambda t, *_: t < num_outer, outer_body, (tf.constant(0), blocks))
    mask = tf.range(longest)[None, :, None] < steps_time_major[:, None, :]
    return blocks.stack(), mask


def padded_targets(steps, targets, width):
    """Token ids `(N, Ta, width)` from ids in value order (zeros past each pair's length), and their mask."""
    import tensorflow as tf

    mask = tf.sequence_mask(steps, width)
    return tf.scatter_nd(tf.cast(tf.where(mask), tf.int32), targets, tf.concat([tf.shape(steps), [width]], 0)), mask


def teacher_loss(targets, values):
    """The sum over every value of the softmax cross-entropy of its target token id."""
    import tensorflow as tf

    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, values))


def make_method(method, model_a, model_b, *, direction, run_plan):
    """Returns `(function, weights)`.

    `forward`: `function(inputs)` returns `(values, tokens, lengths)` as the
    method gives them (`flat_results` puts them in value order).
    `forward+backward`: `function(inputs, steps, targets)` (targets: token ids
    in value order) returns the gradient of `teacher_loss` for `weights`.
    """
    import keras
    import tensorflow as tf

    from cascade_cli.options import StopRule
    from cascade_cli.run.cascade import Cascade

    max_steps, features = run_plan.max_steps, run_plan.features
    size = run_plan.outputs
    forward_signature = [tf.TensorSpec((None, None, features), tf.float32)]
    backward_signature = forward_signature + [tf.TensorSpec((None, None), tf.int32), tf.TensorSpec((None,), tf.int32)]
    weights = model_a.trainable_variables + model_b.trainable_variables
    if method in ("cascade", EAGER):
        if direction == "forward":
            generator = Cascade(model_a, model_b, feedback=True, sampler="greedy", max_steps=max_steps,
                                stop_rule=StopRule.token(END))

            def generate(inputs):
                return generator.run(inputs, return_tokens=True)

            return (generate if method == EAGER else tf.function(generate, input_signature=forward_signature)), weights
        trainer = Cascade(model_a, model_b, feedback=True)

        def train(inputs, steps, targets):
            with tf.GradientTape() as tape:
                values, _ = trainer.run(inputs, steps, targets=targets, training=True)
                loss = teacher_loss(targets, values)
            return tape.gradient(loss, weights)

        return (train if method == EAGER else tf.function(train, input_signature=backward_signature)), weights
    if method == "nested":
        if direction == "forward":
            return tf.function(lambda inputs: nested_generate(model_a, model_b, inputs, max_steps=max_steps),
                               input_signature=forward_signature), weights

        def nested_train(inputs, steps, targets):
            padded, _ = padded_targets(steps, targets, tf.reduce_max(steps))
            with tf.GradientTape() as tape:
                outputs, mask = nested_teacher_forced(model_a, model_b, inputs, steps, padded)
                values = tf.boolean_mask(tf.transpose(outputs, [2, 0, 1, 3]), tf.transpose(mask, [2, 0, 1]))
                loss = teacher_loss(targets, values)
            return tape.gradient(loss, weights)

        return tf.function(nested_train, input_signature=backward_signature), weights
    if method not in PEERS:
        raise ValueError(f"method must be one of {METHODS}. Received: method={method!r}")
    xla = method == "padded_decode_xla"
    if direction == "forward":
        core = lambda inputs: padded_decode_core(model_a, model_b, inputs, max_steps=max_steps)  # noqa: E731
        if xla:
            core = tf.function(core, jit_compile=True)

        def decode(inputs):
            ys, tokens = core(inputs)
            return crop_at_end(ys, tokens, shape=tf.shape(inputs)[:2])

        return tf.function(decode, input_signature=forward_signature), weights
    hidden = model_a.outputs[0].shape[-1]
    gru, dense = peers.keras_peer_layers(model_b, hidden + size)
    join = keras.layers.Concatenate()  # B's own join of [x, y_prev]
    weights = model_a.trainable_variables + gru.trainable_variables + dense.trainable_variables

    def padded_gradients(inputs, pairs, ids, mask):
        with tf.GradientTape() as tape:
            ir = model_a(inputs, training=True)
            width = tf.shape(mask)[1]
            x = tf.tile(tf.gather_nd(ir, pairs)[:, None, :], tf.stack([1, width, 1]))
            y_prev = tf.one_hot(ids[:, :-1], size, dtype=x.dtype)
            y_prev = tf.concat([tf.zeros_like(y_prev[:, :1]), y_prev], axis=1)  # the targets shifted right
            y = dense(gru(join([x, y_prev]), mask=mask, training=True))
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(ids, y)
            loss = tf.reduce_sum(tf.where(mask, losses, tf.zeros_like(losses)))
        return tape.gradient(loss, weights)

    core = tf.function(padded_gradients, jit_compile=True) if xla else padded_gradients

    def padded_train(inputs, steps, targets):
        pairs, lengths = peers.reset_pairs(steps)
        width = max_steps if xla else tf.reduce_max(lengths)
        mask = tf.sequence_mask(lengths, width)
        ids = tf.scatter_nd(tf.cast(tf.where(mask), tf.int32), targets, tf.stack([tf.shape(lengths)[0], width]))
        return core(inputs, pairs, ids, mask)

    return tf.function(padded_train, input_signature=backward_signature), weights


def flat_results(method, result):
    """A forward result as numpy `(values (total, O), tokens (total,), lengths (N, Ta))` in value order."""
    if method == "nested":
        outputs, tokens, lengths = (np.asarray(part) for part in result)  # (Ta, M, N, O), (Ta, M, N), (Ta, N)
        mask = np.arange(outputs.shape[1])[None, :, None] < lengths[:, None, :]
        order, token_order = (2, 0, 1, 3), (2, 0, 1)
        mask = np.transpose(mask, token_order)
        return (np.transpose(outputs, order)[mask], np.transpose(tokens, token_order)[mask], lengths.T)
    if method in ("cascade", EAGER):
        values, lengths, tokens = result
        return np.asarray(values), np.asarray(tokens), np.asarray(lengths)
    values, tokens, lengths = result
    return np.asarray(values), np.asarray(tokens), np.asarray(lengths)


def check_forward(functions, inputs, lengths, *, log=print):
    """Raises `AssertionError` unless every method decodes the chosen lengths, the same tokens and close values.

    Returns:
        `(tokens, lengths)` of the decode: the teacher-forced runs' targets and steps.
    """
    reference = None
    for method, function in functions.items():
        values, tokens, got_lengths = flat_results(method, function(inputs))
        if not np.array_equal(got_lengths, lengths):
            raise AssertionError(f"{method} decoded other lengths than the chosen ones "
                                 f"({int(np.sum(got_lengths != lengths))} of {lengths.size} pairs differ)")
        if reference is None:
            reference = (method, values, tokens)
            continue
        first, ref_values, ref_tokens = reference
        if not np.array_equal(tokens, ref_tokens):
            raise AssertionError(f"{method} decoded other tokens than {first}")
        if values.shape != ref_values.shape or not np.allclose(values, ref_values, **TOLERANCE):
            raise AssertionError(f"{method} values differ from {first}: max |difference| "
                                 f"{np.max(np.abs(values - ref_values)) if values.shape == ref_values.shape else 'n/a'}")
    log(f"  lengths, tokens and values equal across {', '.join(functions)}")
    return reference[2], lengths


def check_gradients(functions, arguments, *, log=print):
    """Raises `AssertionError` unless every method's teacher-forced gradients equal the first's."""
    reference = None
    for method, function in functions.items():
        gradients = [np.asarray(g) for g in function(*arguments)]
        if reference is None:
            reference = (method, gradients)
            continue
        first, ref = reference
        if len(gradients) != len(ref):
            raise AssertionError(f"{method} gives {len(gradients)} gradients, {first} {len(ref)}")
        for index, (got, want) in enumerate(zip(gradients, ref)):
            scale = max(float(np.max(np.abs(want))), 1e-6)
            if got.shape != want.shape or not np.allclose(got, want, rtol=GRADIENT_RTOL, atol=GRADIENT_RTOL * scale):
                raise AssertionError(f"{method} gradient {index} differs from {first}")
    log(f"  gradients equal across {', '.join(functions)}")


def run_feedback(run_plan, *, log=print):
    """Times every method of every case and direction; returns the timing dicts."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    timings, models = [], {}
    for case in run_plan.cases:
        if case.hidden not in models:
            models[case.hidden] = build_models(features=run_plan.features, hidden=case.hidden,
                                               outputs=run_plan.outputs, max_steps=run_plan.max_steps)
        model_a, model_b = models[case.hidden]
        inputs, lengths = make_data(rng, case.batch, case.outer, features=run_plan.features,
                                    max_steps=run_plan.max_steps)
        tensor_inputs = tf.constant(inputs)
        targets = None
        for direction in DIRECTIONS:
            functions = {method: make_method(method, model_a, model_b, direction=direction, run_plan=run_plan)[0]
                         for method in METHODS}
            log(f"{case.name}  {direction}: {', '.join(functions)}")
            if direction == "forward":
                functions[LIMIT] = limit_decode(model_a, model_b, lengths, max_steps=run_plan.max_steps)
                targets, lengths = check_forward({m: _numpy_first(m, f, tensor_inputs) for m, f in functions.items()},
                                                 inputs, lengths, log=log)
                calls = {m: _bound(f, (inputs,) if m == EAGER else (tensor_inputs,))
                         for m, f in functions.items()}
            else:
                numpy_arguments = (inputs, lengths, targets.astype(np.int32))
                tensor_arguments = tuple(tf.constant(a) for a in numpy_arguments)
                check_gradients({m: _numpy_first(m, f, tensor_arguments) for m, f in functions.items()},
                                numpy_arguments, log=log)
                calls = {m: _bound(f, numpy_arguments if m == EAGER else tensor_arguments)
                         for m, f in functions.items()}
            measured = bench.time_group(calls, None, None, repeats=run_plan.repeats, warmups=run_plan.warmups)
            for method, result in measured.items():
                timings.append({"name": case.name, "batch": case.batch, "outer": case.outer, "hidden": case.hidden,
                                "useful_rows": int(lengths.sum()), "mean_length": float(lengths.mean()),
                                "state": STATE, "direction": direction, "method": method, **result})
    return timings


def _numpy_first(method, function, tensors):
    """The call a check makes: the eager cascade on the numpy arrays it is given, the others on `tensors`."""
    if method == EAGER:
        return function
    return lambda *_: function(*(tensors if isinstance(tensors, tuple) else (tensors,)))


def _bound(function, arguments):
    return lambda _inputs, _steps: function(*arguments)


# ------------------------------------------------------------------------------ targets


def _median(timings, name, direction, method):
    for timing in timings:
        if (timing["name"], timing["direction"], timing["method"]) == (name, direction, method):
            return timing.get("median_s")
    return None


def best_peer(timings, name, direction):
    """`(peer, median_s)`: the faster padded decode of one case and direction (None where neither ran)."""
    found = [(seconds, peer) for peer in PEERS
             if (seconds := _median(timings, name, direction, peer)) is not None]
    if not found:
        return None, None
    seconds, peer = min(found)
    return peer, seconds


def _case_of(run_plan, batch):
    """The case of batch size `batch`, or the plan's largest (8 or 64) where a reduced or quick plan lacks it."""
    wanted = [case for case in run_plan.cases if case.batch == batch]
    if wanted:
        return wanted[0]
    return run_plan.cases[-1] if batch == 64 else run_plan.cases[0]


def evaluate_targets(run_plan, timings):
    """Issue 16's feedback-decoding targets (forward, free-running), each marked passed or not (None: not measured).

    - best padded decode / cascade >= 1.5 at N=64;
    - nested / cascade >= 5 at N=8.
    """
    case = _case_of(run_plan, 64)
    _, padded = best_peer(timings, case.name, "forward")
    targets = [bench._target("feedback decoding faster than the padded decode loop", "cascade", case.name, "forward",
                             STATE, bench._ratio(padded, _median(timings, case.name, "forward", "cascade")), 1.5,
                             ">=", "best of padded_decode, padded_decode_xla / cascade")]
    case = _case_of(run_plan, 8)
    targets.append(bench._target("feedback decoding faster than nested loops", "cascade", case.name, "forward", STATE,
                                 bench._ratio(_median(timings, case.name, "forward", "nested"),
                                              _median(timings, case.name, "forward", "cascade")),
                                 5.0, ">=", "nested / cascade"))
    return targets


# ------------------------------------------------------------------------------ reports


TIMING_HEADER = ["case", "direction", "mean length", "cascade ms", "cascade_eager ms", "padded_decode ms",
                 "padded_decode_xla ms", "nested ms", "limit_xla ms", "best padded", "best padded / cascade",
                 "nested / cascade", "best padded / limit_xla", "eager / cascade"]


def timing_rows(run_plan, timings):
    rows = []
    for case in run_plan.cases:
        for direction in DIRECTIONS:
            times = {method: _median(timings, case.name, direction, method) for method in (*METHODS, LIMIT)}
            peer, best = best_peer(timings, case.name, direction)
            mean = next((t["mean_length"] for t in timings if t["name"] == case.name and "mean_length" in t), None)
            rows.append([case.name, direction, "-" if mean is None else f"{mean:.2f}",
                         *(bench._format_seconds(seconds) for seconds in times.values()), peer or "-",
                         bench._format_ratio(bench._ratio(best, times["cascade"])),
                         bench._format_ratio(bench._ratio(times["nested"], times["cascade"])),
                         bench._format_ratio(bench._ratio(best, times[LIMIT])),
                         bench._format_ratio(bench._ratio(times[EAGER], times["cascade"]))])
    return rows


def render_run(run):
    """The Markdown section of one feedback run, for `RESULTS.md`."""
    machine, run_plan = run["machine"], plan_from_dict(run["plan"])
    title = f"## Feedback decoding, {run['device']}" + (" (quick: tiny shapes, checks the script, measures nothing)"
                                                        if run_plan.quick else "")
    if not run_plan.quick and len(run_plan.cases) < len(plan().cases):
        title += f" (reduced: only {', '.join(case.name for case in run_plan.cases)})"
    parts = [
        "", title, "",
        "Written by `python -m benchmarks.feedback` (issues 13 and 16; see `benchmarks/README.md`). Free-running",
        f"greedy generation with stop token {END}, each pair's length chosen uniform in 1..{run_plan.max_steps}; every",
        "method on the same weights and inputs, lengths and tokens checked equal and values and gradients close",
        "before timing; repeats interleaved; medians. `forward+backward` is teacher forcing on the decoded tokens:",
        "the gradient of the cross-entropy with respect to every weight. Ratios above 1 mean the cascade is faster.",
        "`limit_xla` (forward only) is told each pair's length and runs B under XLA on exactly the rows still",
        "running: `best padded / limit_xla` is the most `best padded / cascade` any runner could reach.",
        "",
        *bench.machine_lines(machine),
        f"- models: A = GRU(H) on F={run_plan.features} features; B = Concatenate([x, y_prev]) then GRUCell(H) then "
        f"Dense({run_plan.outputs}); reset; {run_plan.repeats} timed runs after {run_plan.warmups} warm-up"
        + (f"; the whole run took {run['seconds']:.0f} s" if "seconds" in run else ""),
    ]
    if run.get("note"):
        parts.append(f"- {run['note']}")
    parts += [
        "",
        "### Median times (ms)",
        "",
        bench._markdown_table(TIMING_HEADER, timing_rows(run_plan, run["timings"])),
        "",
        "### Targets",
        "",
        bench._markdown_table(bench.TARGET_HEADER, bench.target_rows(run["targets"])),
        "",
    ]
    parts += [f"- {line}" for line in bench.target_legend(run["targets"])]
    errors = bench.errors_of(run["timings"])
    if errors:
        parts += ["", "### Errors", ""] + [f"- {error}" for error in errors]
    return parts


def plan_from_dict(data):
    fields = dict(data)
    fields["cases"] = tuple(bench.Case(**case) for case in fields["cases"])
    return FeedbackPlan(**fields)


def print_tables(run_plan, timings, targets):
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=200)
    bench.print_table(console, "feedback decoding, median times (ms)", TIMING_HEADER, timing_rows(run_plan, timings))
    bench.print_table(console, "feedback targets of issue 16", bench.TARGET_HEADER, bench.target_rows(targets))
    for error in bench.errors_of(timings):
        console.print(f"[red]error[/red] {error}")


def main(argv=None):
    """Runs the feedback-decoding benchmark and merges it into the reports."""
    parser = bench.argument_parser("python -m benchmarks.feedback", __doc__.splitlines()[0], default_repeats=7,
                                   batches=True)
    parser.add_argument("--note", default=None, help="one line about the run (e.g. the machine's load) for RESULTS.md")
    args = bench.parse_arguments(parser, argv)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    run_plan = plan(quick=args.quick, repeats=args.repeats, batches=args.batches)
    machine = bench.describe_machine()
    started = time.perf_counter()
    timings = run_feedback(run_plan, log=lambda line: print(line, file=sys.stderr))
    targets = evaluate_targets(run_plan, timings)
    run = {"suite": SUITE, "device": bench.device_label(machine), "machine": machine,
           "plan": dataclasses.asdict(run_plan), "seconds": time.perf_counter() - started, "timings": timings,
           "targets": targets}
    if args.note:
        run["note"] = args.note
    print_tables(run_plan, timings, targets)
    bench.write_report(args.out, run=run)
    return run


if __name__ == "__main__":
    main()
