"""The feedback and sampling loop, and teacher forcing: B fed what it emitted (or the targets).

A feedback-form B (`feedback=True`) is fed what it emitted: free running
(generation) its loop (`feedback_loop`: `run.loop.packed_loop` with hooks that
feed back, sample and walk pairs) calls B on the rows still running and
samples every step (`run.sampling`; counter-based draws, so the results do not
depend on how the input is cut); teacher-forced through a known cell, every
row's input is known before the loop and the packed recurrence with its
hand-written gradient runs (`run_teacher_forced`). A sampler other than
identity without feedback runs here too (tokens and stopping only). A call
that carries its state across windows (`run.carried`) runs `feedback_loop`
from a `Carried`.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from cascade_cli.run import loop, packing, sampling, stopping
from cascade_cli.run.recurrence import packed_recurrence


@dataclasses.dataclass(frozen=True)
class Feed:
    """A feedback or sampling call's checked arguments (`Cascade.run`)."""

    targets: object  # (total, O) in B's output dtype, or None
    sample_index: object  # (N,) int64
    probability: object  # () float64, the scheduled sampling probability
    return_tokens: bool
    scheduled: bool = True  # False: the probability is a Python 0, so teacher forcing alone (the known-cell path)


@dataclasses.dataclass(frozen=True)
class Carried:
    """What a call that carries its state starts from (`carried.run_state`), besides A's states."""

    b_states: list  # each (N, size): B's carried states (carry mode), else empty
    previous: object  # (N, O): each sample's last fed value (feedback_start="previous"), else None
    offset: object  # () int64: the absolute outer index of this call's first outer step


def run_feedback(cascade, ir_flat, caps, training, feed):
    """The feedback and sampling loop: B is called at every inner step on the rows still running.

    Rows are `(n, t)` pairs in `reset` mode, or samples walking their
    pairs in order (`carry`, and `reset` with `feedback_start="previous"`
    without targets, where a pair's start depends on the previous pair's
    last output; B's state restarts at every pair in `reset` mode). A row
    leaves the work once it has no step left (or met the stop rule).

    Teacher forcing through a known cell runs `run_teacher_forced`
    instead; with a sampling probability given as a tensor, a `tf.cond`
    takes it where the probability is 0 and this loop elsewhere.

    Returns:
        `(values, lengths)`, plus `tokens (total,)` int64 with `feed.return_tokens`.
    """
    teacher = feed.targets is not None
    if cascade.feedback:
        split = cascade._known_cell(ir_dtype=ir_flat.dtype, training=training,
                                    teacher_forced=teacher and not feed.return_tokens)
        if split is not None:
            if not feed.scheduled:
                return run_teacher_forced(cascade, ir_flat, caps, training, feed, split)
            return tf.cond(feed.probability > 0, lambda: feedback_loop(cascade, ir_flat, caps, training, feed),
                           lambda: run_teacher_forced(cascade, ir_flat, caps, training, feed, split))
    return feedback_loop(cascade, ir_flat, caps, training, feed)


def feedback_loop(cascade, ir_flat, caps, training, feed, carried=None):
    """`run_feedback`'s loop, which calls B itself at every inner step.

    `carried`: a `Carried` to start from (a call that carries its state,
    `carried.run_state`); then it returns `(result, b_states, previous)`, each
    sample's states and last fed value after its last inner step.
    """
    size, dtype = cascade.b_spec.output_size, cascade._y_dtype
    outer = tf.shape(caps)[1]
    offset = 0 if carried is None else tf.cast(carried.offset, tf.int32)  # the outer index of pair % outer
    caps_flat = tf.reshape(caps, [-1])
    start_kind, start = cascade._start[0], start_value(cascade)
    teacher = feed.targets is not None
    walk = cascade.state == "carry" or (cascade.feedback and start_kind == "previous" and not teacher)
    sampler, rule = cascade.sampler, cascade.stop_rule
    if teacher:
        value_start, padded, has_previous = teacher_table(caps, feed.targets, start, previous=start_kind == "previous")

    def fed_back(pair, inner, previous):
        """`y_prev` of each row."""
        if not teacher:
            return previous
        read = tf.logical_or(inner > 0, tf.gather(has_previous, pair))
        target = tf.gather(padded, tf.where(read, tf.gather(value_start, pair) + inner, 0))
        u = sampling.row_uniforms(cascade.seed, _sample_of(pair), pair % outer + offset, inner,
                                  sampling.SCHEDULED_STREAM)
        own = tf.logical_and(inner > 0, u < feed.probability)  # scheduled sampling: the row's own sample
        return tf.where(own[:, None], tf.stop_gradient(previous), target)

    def _sample_of(pair):
        return tf.gather(feed.sample_index, pair // outer)

    def initial_states(pair):
        return loop.initial_states(cascade, tf.gather(ir_flat, pair))

    def inputs(j, rows):
        """Each row's `(x, y_prev, u)`: its IR vector, what it is fed and its draw (None where unused)."""
        pair, inner, previous = rows[-3:]
        y_prev = fed_back(pair, inner, previous) if cascade.feedback else None
        u = sampling.draws(sampler, cascade.seed, pair, inner, sample_of=_sample_of,
                           outer_of=lambda pair: pair % outer + offset)
        return tf.gather(ir_flat, pair), y_prev, u

    def step(inputs, states):
        """B's step and the sampler: `(y, states, fed, token)` of each row."""
        x, y_prev, u = inputs
        y, new_states = loop.call_b(cascade, x, states, training, y_prev=y_prev)
        fed, token = sampling.feed_back(sampler, y, u, zero_gate=rule is not None and rule.kind == "gate")
        return y, new_states, fed, token

    def advance(j, rows, new_states, fed, hit, finals):
        pair, inner = rows[-3], rows[-2]
        if not walk:
            done = inner + 1 >= tf.gather(caps_flat, pair)
            if hit is not None:
                done = tf.logical_or(done, hit)
            return pair, tf.logical_not(done), (pair, inner + 1, fed), new_states, finals
        samples = rows[0]
        done, keep, next_pair, next_inner = loop.walk_on(samples, pair, inner, hit, caps_flat=caps_flat,
                                                         running_pairs=running_pairs, outer=outer)
        if finals:  # the rows that leave hand out their sample's last states and fed value
            leaving = tf.logical_not(keep)
            where = tf.boolean_mask(samples, leaving)[:, None]
            last = ([*new_states] if carry_b else []) + ([fed] if carry_previous else [])
            finals = tuple(tf.tensor_scatter_nd_update(final, where, tf.boolean_mask(value, leaving))
                           for final, value in zip(finals, last))
        if cascade.state == "reset":
            fresh = initial_states(tf.maximum(next_pair, 0))
            new_states = [tf.where(done[:, None], f, s) for f, s in zip(fresh, new_states)]
        if cascade.feedback and not teacher and start_kind != "previous":
            fed = tf.where(done[:, None], tf.broadcast_to(start, tf.shape(fed)), fed)
        return pair, keep, (samples, next_pair, next_inner, fed), new_states, finals

    if walk:
        running_pairs, samples, pair = loop.walk_rows(caps)
        rows = (samples, pair)
        if cascade.state == "reset":
            states = initial_states(pair)
        elif carried is not None:
            states = [tf.gather(state, samples) for state in carried.b_states]
        else:
            states = [tf.zeros([tf.size(samples), s], ir_flat.dtype) for s in cascade.b_spec.state_sizes]
    else:
        pair = tf.cast(tf.where(caps_flat > 0)[:, 0], tf.int32)
        rows = (pair,)
        states = initial_states(pair)
    first = tf.zeros_like(start) if start_kind == "previous" else start  # zeros before the first pair
    if walk and carried is not None and carried.previous is not None:
        first_fed = tf.gather(carried.previous, samples)  # the previous window's last fed value
    else:
        first_fed = tf.tile(first[None], [tf.size(pair), 1])
    rows = rows + (tf.zeros_like(pair), first_fed)
    carry_b = walk and carried is not None and cascade.state == "carry"
    carry_previous = walk and carried is not None and carried.previous is not None
    finals = tuple(carried.b_states if carry_b else []) + ((carried.previous,) if carry_previous else ())
    # whole blocks make a row's values independent of the batch; not in training, where the padded
    # rows would change the shape, hence the draws, of B's dropout masks
    outputs, pairs, *rest = loop.packed_loop(
        step, inputs, advance, rows=rows, states=states, output_size=size, dtype=dtype, stop=stopping.stop(rule),
        held=(lambda j, rows: stopping.held(rows[-2], cascade.min_steps)) if cascade.min_steps > 1 else None,
        exclude_stop_step=cascade.exclude_stop_step, whole_blocks=not training,
        return_tokens=feed.return_tokens, finals=finals)
    order = tf.argsort(pairs, stable=True)  # value order: by pair, then step
    result = (loop.permute(outputs, order), loop.lengths(caps, pairs, cascade.stop_rule))
    if feed.return_tokens:
        result += (tf.gather(rest.pop(0), order),)
    if carried is None:
        return result
    finals = list(rest[0]) if finals else []
    b_out = [finals.pop(0) for _ in cascade.b_spec.state_sizes] if carry_b else list(carried.b_states)
    return result, b_out, (finals[0] if carry_previous else carried.previous)


def start_value(cascade):
    """`(O,)` in B's output dtype: `y_prev` at inner step 0 for `feedback_start` zeros or token:ID."""
    kind, token = cascade._start
    size, dtype = cascade.b_spec.output_size, cascade._y_dtype
    return tf.one_hot(token, size, dtype=dtype) if kind == "token" else tf.zeros([size], dtype)


def teacher_table(caps, targets, start, *, previous):
    """`(value_start, padded, has_previous)`: where teacher forcing reads each row's `y_prev`.

    `padded[value_start[p] + j]` is pair `p`'s target `j - 1`; `padded[0]`
    is the start value, read at `j == 0` except where `has_previous[p]`
    (`previous`: `feedback_start="previous"`, after the sample's first running pair):
    there `padded[value_start[p]]` is the value just before the pair's
    first, the previous running pair's last target.
    """
    outer = tf.shape(caps)[1]
    caps_flat = tf.reshape(caps, [-1])
    value_start = tf.cumsum(caps_flat, exclusive=True)
    padded = tf.concat([(tf.zeros_like(start) if previous else start)[None], targets], 0)
    if previous:
        sample_start = tf.cumsum(tf.reduce_sum(caps, axis=1), exclusive=True)
        has_previous = value_start > tf.gather(sample_start, tf.range(tf.size(caps_flat)) // outer)
    else:
        has_previous = tf.zeros_like(caps_flat, tf.bool)
    return value_start, padded, has_previous


def run_teacher_forced(cascade, ir_flat, caps, training, feed, split):
    """Teacher forcing through a known cell: every row's input at every step is known before the loop.

    Each step-major row's input is `[IR of its pair, its y_prev]` (the
    target before it, or the start), projected for all rows in one matmul;
    `packed_recurrence` runs the cell with its hand-written gradient and
    the head runs once on every row after the loop.
    """
    value_start, padded, has_previous = teacher_table(caps, feed.targets, start_value(cascade),
                                                       previous=cascade._start[0] == "previous")
    reset = cascade.state == "reset"
    plan = packing.reset_plan(caps) if reset else packing.carry_plan(caps)
    pairs = plan.step_pairs
    positions = tf.math.invert_permutation(plan.value_order)  # the value each step-major row emits
    inner = positions - tf.gather(value_start, pairs)
    read = tf.logical_or(inner > 0, tf.gather(has_previous, pairs))
    y_prev = tf.gather(padded, tf.where(read, positions, 0))
    features = tf.concat([tf.gather(ir_flat, pairs), tf.cast(y_prev, ir_flat.dtype)], axis=1)
    inputs = split.backward.project(features)
    if reset:
        states = loop.initial_states(cascade, tf.gather(ir_flat, plan.pair_ids))
    else:
        states = [tf.zeros([plan.counts[0], s], ir_flat.dtype) for s in cascade.b_spec.state_sizes]
    outputs = packed_recurrence(split.backward, inputs, counts=plan.counts, initial_states=states)[0]
    if split.head is not None:
        outputs = split.head(outputs, training=training)
    return loop.permute(outputs, plan.value_order), caps
