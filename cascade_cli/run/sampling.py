"""Samplers and the counter-based, cut-independent random draws of a feedback run.

Pure TensorFlow, no state: the draw for row (sample `n`, outer step `t`,
inner step `j`) is a hash of `(seed, index of n in the whole input, t, j,
stream)` in 32-bit integer ops, turned into one uniform `u` in [0, 1). It
does not depend on the batch a row ran in, on which other rows ran beside it
or stopped early, nor on the order rows are visited: the same seed gives the
same bits whatever the batch size, shards or slicing.

`sample(sampler, y, u)` turns B's outputs into what is fed back and the token
each row emits: `identity` feeds `y` (no token), `greedy` the one-hot of
`argmax(y)` (so does `beam` where a single row samples: beam search
itself is `cascade_cli.run.beam`), `categorical` the one-hot of a draw by inverse CDF over
`softmax(y / temperature)`, its probabilities sorted descending (ties in
index order), cut to the top-k and/or the top-p nucleus and renormalised.
The CDF is computed in float64.
"""

from __future__ import annotations

import tensorflow as tf

# Streams keep independent draws of the same row apart.
CATEGORICAL_STREAM = 0  # the categorical sampler's draw
SCHEDULED_STREAM = 1  # scheduled sampling: does the row feed its own sample?

_GOLDEN = 0x9E3779B9  # separates the hashed fields


def _mix(x):
    """A 32-bit integer finaliser (lowbias32: good avalanche, every output bit depends on every input bit)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(15, tf.uint32)))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))


def _word(value):
    """The low 32 bits of an integer tensor (or Python int) as uint32."""
    value = tf.convert_to_tensor(value)
    if value.dtype != tf.int64:
        value = tf.cast(value, tf.int64)
    return tf.cast(tf.bitwise.bitwise_and(value, tf.constant(0xFFFFFFFF, tf.int64)), tf.uint32)


def row_hash(seed, sample_index, outer, inner, stream):
    """`(rows,)` uint32: the hash of each row's `(seed, sample_index, outer, inner, stream)`.

    Every argument is an integer scalar or a `(rows,)` integer tensor (they
    broadcast). `sample_index` may take 64 bits: both halves are hashed.
    """
    index = tf.cast(tf.convert_to_tensor(sample_index), tf.int64)
    high = tf.bitwise.right_shift(index, tf.constant(32, tf.int64))
    h = _mix(_word(seed) + tf.constant(_GOLDEN, tf.uint32))
    for field in (_word(stream), _word(high), _word(index), _word(outer), _word(inner)):
        h = _mix(tf.bitwise.bitwise_xor(h, field) + tf.constant(_GOLDEN, tf.uint32))
    return h


def row_uniforms(seed, sample_index, outer, inner, stream):
    """`(rows,)` float64 uniforms in [0, 1), one per row: `row_hash(...) / 2**32` (exact).

    Args:
        seed: the run's seed, an integer in [0, 2**32).
        sample_index: `(rows,)` each row's sample's index in the whole input.
        outer: `(rows,)` each row's outer step `t`.
        inner: `(rows,)` each row's inner step `j`.
        stream: which draw of the row (`CATEGORICAL_STREAM`, `SCHEDULED_STREAM`).
    """
    return tf.cast(row_hash(seed, sample_index, outer, inner, stream), tf.float64) / 2.0**32


def draws(sampler, seed, pair, inner, *, sample_of, outer_of):
    """`(rows,)` float64: the sampler's draw of each row, at pair `pair (rows,)` and inner step `inner (rows,)`,
    keyed on `(seed, sample_of(pair), outer_of(pair), inner)` (`row_uniforms`, `CATEGORICAL_STREAM`); None for
    a sampler that draws nothing. The plain loop (`run.feedback`) and the compiled loop (`run.compiled_loop`)
    both draw here."""
    if not sampler.draws:
        return None
    return row_uniforms(seed, sample_of(pair), outer_of(pair), inner, CATEGORICAL_STREAM)


def feed_back(sampler, y, uniforms=None, *, zero_gate=False):
    """`sample`'s `(fed, tokens)`, with `fed`'s last column, a stop gate's logit, set to 0 where `zero_gate` (a
    gated B is fed its values and a 0 gate, as training feeds it: `without_gate`). The one home of what a
    sampling loop, plain or compiled, feeds back."""
    fed, tokens = sample(sampler, y, uniforms)
    return (without_gate(fed) if zero_gate else fed), tokens


def without_gate(fed):
    """`fed (rows, O)` with its last column, a stop gate's logit, set to 0."""
    return tf.concat([fed[:, :-1], tf.zeros_like(fed[:, -1:])], axis=1)


def sample(sampler, y, uniforms=None):
    """What each row feeds back and the token it emits.

    Args:
        sampler: an `options.Sampler`.
        y: `(rows, O)` B's outputs (logits for `categorical`).
        uniforms: `(rows,)` float64 in [0, 1), one draw per row
            (`row_uniforms`); needed by `categorical` only.

    Returns:
        `(fed (rows, O) in y's dtype, tokens (rows,) int64)`; `tokens` is None
        for `identity`, which feeds `y` itself (`KINDS[sampler.kind]`).
    """
    return KINDS[sampler.kind](sampler).get_next_token(y, uniforms)


class IdentitySampler:
    """Feeds `y` itself back; emits no token."""

    def __init__(self, sampler):
        del sampler  # no setting

    def get_next_token(self, y, uniforms=None):
        """`(y, None)`."""
        return y, None


class GreedySampler:
    """Feeds the one-hot of `argmax(y)` back and emits that token."""

    def __init__(self, sampler):
        del sampler  # no setting

    def get_next_token(self, y, uniforms=None):
        """`(one_hot (rows, O) in y's dtype, tokens (rows,) int64)`."""
        tokens = tf.argmax(y, axis=-1, output_type=tf.int64)
        return tf.one_hot(tokens, tf.shape(y)[-1], dtype=y.dtype), tokens


class CategoricalSampler:
    """Draws each row's token by inverse CDF (`categorical_tokens`) and feeds its one-hot back."""

    def __init__(self, sampler):
        self.temperature, self.top_k, self.top_p = sampler.temperature, sampler.top_k, sampler.top_p

    def get_next_token(self, y, uniforms=None):
        """`(one_hot (rows, O) in y's dtype, tokens (rows,) int64)`; `uniforms (rows,)` are the rows' draws."""
        tokens = categorical_tokens(y, uniforms, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return tf.one_hot(tokens, tf.shape(y)[-1], dtype=y.dtype), tokens


KINDS = {"identity": IdentitySampler, "greedy": GreedySampler, "categorical": CategoricalSampler,
         "beam": GreedySampler}  # a beam's row fed its own sample (scheduled sampling) takes greedy's
"""Each `Sampler.kind`'s class: a new sampler is a class here with one method, `get_next_token(y, uniforms)`
(KerasHub's `Sampler.get_next_token` shape), and its `options.Sampler` setting. Beam search itself is
`cascade_cli.run.beam`."""


def categorical_tokens(y, uniforms, *, temperature=1.0, top_k=None, top_p=None):
    """`(rows,)` int64: each row's token drawn by inverse CDF from `softmax(y / temperature)`, cut and renormalised.

    The probabilities are sorted descending (ties in index order); the top-k
    cut keeps the first `top_k`, the nucleus cut the shortest prefix whose
    probability reaches `top_p` (at least one token). The draw is the first
    kept position whose cumulative probability exceeds `u` times the kept
    total.
    """
    logits = tf.cast(y, tf.float64) / tf.constant(temperature, tf.float64)
    order = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
    sorted_logits = tf.gather(logits, order, batch_dims=1)
    probabilities = tf.nn.softmax(sorted_logits, axis=-1)
    size = tf.shape(y)[-1]
    kept = tf.ones_like(probabilities, dtype=tf.bool)
    if top_k is not None:
        kept = tf.logical_and(kept, tf.range(size)[None, :] < top_k)
    if top_p is not None:
        before = tf.cumsum(probabilities, axis=-1, exclusive=True)
        kept = tf.logical_and(kept, before < top_p)
        kept = tf.logical_or(kept, tf.range(size)[None, :] == 0)  # rounding: the likeliest token always stays
    probabilities = tf.where(kept, probabilities, tf.zeros_like(probabilities))
    cumulative = tf.cumsum(probabilities, axis=-1)
    total = cumulative[:, -1:]
    target = tf.cast(uniforms, tf.float64)[:, None] * total
    position = tf.reduce_sum(tf.cast(cumulative <= target, tf.int32), axis=-1)
    last_kept = tf.reduce_sum(tf.cast(kept, tf.int32), axis=-1) - 1  # rounding never picks a cut token
    position = tf.minimum(position, last_kept)
    return tf.cast(tf.gather(order, position[:, None], batch_dims=1)[:, 0], tf.int64)
