"""The packed loop over B and the paths that run it (`reset`, `carry`, given steps, a sequence-form B).

How it stays fast (DESIGN section 3): A is called once; every inner sequence
that runs (a `(n, t)` pair in `reset` mode, a whole sample in `carry` mode) is a
*row*. Rows are sorted longest first, so at inner step `j` the rows still
running are a prefix and B is called once on that prefix. Rows with nothing to
emit never enter the loop, and B processes exactly `sum(steps)` rows. With a
run-time stopping rule the rows that stop are dropped with a boolean mask
instead. Each emitted row is tagged with its pair id; the value order puts the
step-major outputs in order at the end.

The work is split the way Keras splits its `RNN` layer from `backend.rnn`:
`run.packing` turns the caps into a plan (pure functions), `packed_loop` runs
a plain `step(x, states) -> (y, states)` over the plan's rows, and the paths
below lay out each mode's rows for it. `packed_loop` is the one plain loop:
the feedback and sampling loop (`run.feedback`: samplers, teacher forcing,
scheduled sampling, a call carried across windows) is the same loop with its
own hooks (`inputs`, a `step` that samples, `advance`, `finals`). Stop rules
and `min_steps` are its `stop` and `held` hooks (`run.stopping`). A path
takes the `Cascade` whose settings it reads (`state`, `stop_rule`,
`min_steps`, B and its spec) and checked tensors; it never chooses a path
itself (`Cascade._run` does). The loop compiled whole under XLA is
`run.compiled_loop`.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from cascade_cli.run import packing, stopping
from cascade_cli.run.recurrence import packed_recurrence


def packed_loop(step, inputs, advance, *, rows, states, output_size, dtype, counts=None, stop=None, held=None,
                exclude_stop_step=False, whole_blocks=False, return_tokens=False, finals=()):
    """Runs `step` over packed rows until no row is left: the one loop of every plain path.

    Every mode is this loop with its own hooks (as Keras' `backend.rnn` takes a
    `step_function`): the reset, carry and given-steps paths (`run_reset`,
    `run_carry`, `run_carry_given`) and the feedback and sampling loop with
    teacher forcing (`run.feedback.feedback_loop`). At inner step `j`:
    `step` runs B on the running rows, fed `inputs(j, rows)`; `stop` and
    `held` say which rows stop;
    the output of every row (of those not stopped, with `exclude_stop_step`)
    is written with its pair id; `advance` gives each row's next values and
    which rows go on. The rows that go on are the first `counts[j + 1]` when
    `counts` is given (rows sorted longest first, no stopping), else those
    where `keep` is True.

    Args:
        step: `(x, states) -> (y, new_states)`, one inner step of every
            running row, or `-> (y, new_states, fed, token)` where a sampler
            runs in the step: `fed` what it feeds back, `token` `(rows,)` its id.
        inputs: `(j, rows) -> x`, each row's input to `step` (a tensor or a
            tuple of them, all `(rows, ...)`).
        advance: `(j, rows, states, fed, hit, finals) -> (pair_ids, keep,
            rows, states, finals)`: the pair each row's output belongs to,
            which rows go on (None with `counts`), the rows' next values and
            states, and `finals` updated (`hit` is None without a stop rule).
        rows: a tuple of per-row tensors, each `(rows, ...)`; `rows[0]` is 1-D.
        states: the step's states for those rows, each `(rows, size)`.
        output_size: the size of `y`, `O`.
        dtype: the dtype of `y`.
        counts: `(longest + 1,)` int32, the rows running at each step, or None.
        stop: `(y, token) -> hit`: `(rows,)` bools, the rows that met the stop
            rule; None without one.
        held: `(j, rows) -> (rows,)` bools, the rows the stop rule may not
            stop yet (`min_steps`); None holds no row.
        exclude_stop_step: a row's output at the step it stops is not emitted.
        whole_blocks: `step` and `stop` run on the inputs and states padded to whole
            blocks (`packing.on_whole_blocks`), so that a row's values do not
            depend on how many rows ran beside it.
        return_tokens: the `token` of every emitted output is returned too.
        finals: a tuple of tensors `advance` updates as rows leave (each
            sample's last states), returned after the loop.

    Returns:
        `(outputs (total, O), pairs (total,))`: every step's emitted outputs,
        step after step, and the pair id of each; then `tokens (total,)`
        int64 with `return_tokens`, then `finals` where any were given.
    """

    def decide(x, states):
        y, new_states, fed, token = (*step(x, states), None, None)[:4]
        return y, new_states, fed, token, (None if stop is None else stop(y, token))

    def iterate(j, rows, states, outputs, finals):
        y, new_states, fed, token, hit = (packing.on_whole_blocks(decide) if whole_blocks else decide)(
            inputs(j, rows), states)
        if hit is not None and held is not None:
            hit = tf.logical_and(hit, tf.logical_not(held(j, rows)))
        pair_ids, keep, rows, new_states, finals = advance(j, rows, new_states, fed, hit, finals)
        emitted = (y, pair_ids) + ((token,) if return_tokens else ())
        if hit is not None and exclude_stop_step:
            emitted = tuple(tf.boolean_mask(t, tf.logical_not(hit)) for t in emitted)
        outputs = tuple(array.write(j, t) for array, t in zip(outputs, emitted))
        if counts is not None:
            count = counts[j + 1]
            rows = tuple(r[:count] for r in rows)
            new_states = [s[:count] for s in new_states]
        else:
            rows = tuple(tf.boolean_mask(r, keep) for r in rows)
            new_states = [tf.boolean_mask(s, keep) for s in new_states]
        return j + 1, rows, new_states, outputs, finals

    def array(dtype, shape):
        return tf.TensorArray(dtype, size=0, dynamic_size=True, infer_shape=False,
                              element_shape=tf.TensorShape(shape))

    outputs = (array(dtype, [None, output_size]), array(tf.int32, [None]))
    outputs += (array(tf.int64, [None]),) if return_tokens else ()
    finals = tuple(finals)
    invariants = (
        tf.TensorShape([]),
        tuple(tf.TensorShape([None]).concatenate(r.shape[1:]) for r in rows),
        [tf.TensorShape([None]).concatenate(s.shape[1:]) for s in states],
        tuple(tf.TensorShape(None) for _ in outputs),
        tuple(tf.TensorShape([None]).concatenate(f.shape[1:]) for f in finals),
    )
    j, _, _, outputs, finals = tf.while_loop(
        lambda j, rows, *_: tf.shape(rows[0])[0] > 0,
        iterate,
        (tf.constant(0), tuple(rows), list(states), outputs, finals),
        shape_invariants=invariants,
    )
    # A sentinel keeps concat() defined when nothing ran.
    sentinels = (tf.zeros([0, output_size], dtype), tf.zeros([0], tf.int32), tf.zeros([0], tf.int64))
    result = tuple(array.write(j, sentinel).concat() for array, sentinel in zip(outputs, sentinels))
    return result + ((finals,) if finals else ())


def walk_rows(caps):
    """Rows that walk their sample's pairs in order (`carry`; feedback from the previous pair's value).

    Returns:
        `(running_pairs, samples, pairs)`: the pairs with steps > 0,
        ascending; each row's sample (`packing.carry_rows`) and its first
        such pair.
    """
    outer = tf.shape(caps)[1]
    running_pairs = tf.cast(tf.where(tf.reshape(caps, [-1]) > 0)[:, 0], tf.int32)  # ascending
    samples = packing.carry_rows(caps)
    return running_pairs, samples, packing.next_running_pair(running_pairs, samples * outer, samples=samples,
                                                             outer=outer)


def walk_on(samples, pairs, inner, hit, *, caps_flat, running_pairs, outer):
    """One step of walking rows: `(done, keep, next_pairs, next_inner)`.

    A row is done with its pair at its cap or where `hit` (None: no stop
    rule); it goes on (`keep`) while its pair is not done or its sample has
    a next running pair, which it then starts at inner step 0.
    """
    done = inner + 1 >= tf.gather(caps_flat, pairs)
    if hit is not None:
        done = tf.logical_or(done, hit)
    following = packing.next_running_pair(running_pairs, pairs + 1, samples=samples, outer=outer)
    keep = tf.logical_or(tf.logical_not(done), following >= 0)
    return done, keep, tf.where(done, following, pairs), tf.where(done, 0, inner + 1)


@dataclasses.dataclass(frozen=True)
class Step:
    """One inner step: `project(x)` once per row, then `call(projected, states) -> (out, states)`."""

    project: object
    call: object
    width: int  # the size of `out`
    backward: object = None  # a known cell's `cells.Backward`: given steps run `packed_recurrence`


def call_b(cascade, x, states, training, *, y_prev=None):
    """One inner step of a step-form B: `(y, new_states)`; a feedback-form B is fed `y_prev` too."""
    for cell in cascade._cells:  # a cell outside keras.layers.RNN caches masks sized for one batch
        cell.reset_dropout_mask()
        if hasattr(cell, "reset_recurrent_dropout_mask"):
            cell.reset_recurrent_dropout_mask()
    if y_prev is not None:
        outputs = cascade.model_b([x, y_prev, *states], training=training)
        if not isinstance(outputs, (list, tuple)):
            return outputs, []
        return outputs[0], list(outputs[1:])
    if states:
        outputs = cascade.model_b([x, *states], training=training)
        return outputs[0], list(outputs[1:])
    outputs = cascade.model_b(x, training=training)
    if isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    return outputs, []


def initial_states(cascade, x):
    """B's initial states for rows fed `x`: zeros, or `x` itself (`state_init="ir"`)."""
    if cascade.state_init == "ir":
        return [tf.identity(x) for _ in cascade.b_spec.state_sizes]
    rows = tf.shape(x)[0]
    return [tf.zeros([rows, size], x.dtype) for size in cascade.b_spec.state_sizes]


def run_packed(cascade, step, inputs, advance, rows, states, *, counts=None, held=None):
    """`packed_loop` over a step-form B's `Step`, with the cascade's stop rule and `min_steps`."""
    return packed_loop(step.call, inputs, advance, rows=rows, states=states, output_size=step.width,
                       dtype=cascade.model_b.outputs[0].dtype, counts=counts,
                       stop=stopping.stop(cascade.stop_rule), held=held if cascade.min_steps > 1 else None,
                       exclude_stop_step=cascade.exclude_stop_step)


def lengths(caps, pairs, stop_rule):
    """`(N, Ta)` int32: each pair's emitted steps, its cap unless a stop rule may end it sooner."""
    if stop_rule is None:
        return caps
    counts = tf.math.bincount(pairs, minlength=tf.size(caps), maxlength=tf.size(caps), dtype=tf.int32)
    return tf.reshape(counts, tf.shape(caps))


def run_reset(cascade, ir_flat, caps, step):
    """Rows are `(n, t)` pairs, each fed its own IR vector from a fresh state."""

    def advance(j, rows, states, fed, hit, finals):
        pair_ids, _, row_caps = rows
        keep = j + 1 < row_caps
        if hit is not None:
            keep = tf.logical_and(keep, tf.logical_not(hit))
        return pair_ids, keep, rows, states, finals

    inputs = lambda j, rows: rows[1]  # noqa: E731
    if cascade.stop_rule is not None:
        pair_ids, row_caps = packing.reset_rows(caps)
        ir_rows = tf.gather(ir_flat, pair_ids)
        rows = (pair_ids, step.project(ir_rows), row_caps)
        held = lambda j, rows: tf.fill(tf.shape(rows[0]), j + 1 < cascade.min_steps)  # noqa: E731
        outputs, pairs = run_packed(cascade, step, inputs, advance, rows, initial_states(cascade, ir_rows),
                                    held=held)
        return outputs, pairs, tf.argsort(pairs, stable=True)
    plan = packing.reset_plan(caps)
    ir_rows = tf.gather(ir_flat, plan.pair_ids)
    states = initial_states(cascade, ir_rows)
    if step.backward is not None:  # each row's input is the same at every step: read a prefix of it
        outputs = packed_recurrence(step.backward, step.backward.project(ir_rows), counts=plan.counts,
                                    initial_states=states, prefix=True)[0]
    else:
        rows = (plan.pair_ids, step.project(ir_rows), plan.row_caps)
        outputs, _ = run_packed(cascade, step, inputs, advance, rows, states, counts=plan.counts)
    return outputs, plan.step_pairs, plan.value_order


def run_carry(cascade, ir_flat, caps, step):
    """Rows are samples; each walks its pairs in order, carrying B's state across them."""
    if cascade.stop_rule is None:
        return run_carry_given(cascade, ir_flat, caps, step)
    outer = tf.shape(caps)[1]
    caps_flat = tf.reshape(caps, [-1])
    running_pairs, samples, first = walk_rows(caps)
    features = step.project(ir_flat)

    def advance(j, rows, states, fed, hit, finals):
        samples, pair_ids, inner = rows
        _, keep, next_pairs, next_inner = walk_on(samples, pair_ids, inner, hit, caps_flat=caps_flat,
                                                  running_pairs=running_pairs, outer=outer)
        return pair_ids, keep, (samples, next_pairs, next_inner), states, finals

    inputs = lambda j, rows: tf.gather(features, rows[1])  # noqa: E731
    rows = (samples, first, tf.zeros_like(samples))
    states = [tf.zeros([tf.size(samples), size], ir_flat.dtype) for size in cascade.b_spec.state_sizes]
    outputs, pairs = run_packed(cascade, step, inputs, advance, rows, states,
                                held=lambda j, rows: stopping.held(rows[2], cascade.min_steps))
    return outputs, pairs, tf.argsort(pairs, stable=True)


def run_carry_given(cascade, ir_flat, caps, step):
    """`carry` with given steps: every row's input at every step is known before the loop.

    The inputs are laid out step-major once (step `j` holds the `counts[j]`
    samples still running, longest first) and read from a `TensorArray`; a
    gather from a captured tensor inside the loop would make its gradient
    dense at every step.
    """
    plan = packing.carry_plan(caps)
    counts, pairs = plan.counts, plan.step_pairs
    states = [tf.zeros([counts[0], size], ir_flat.dtype) for size in cascade.b_spec.state_sizes]
    if step.backward is not None:
        inputs = [_gather_sorted_gradient(gate, pairs, plan.value_order, plan.value_pairs)
                  for gate in step.backward.project(ir_flat)]
        outputs = packed_recurrence(step.backward, inputs, counts=counts, initial_states=states)[0]
        return outputs, pairs, plan.value_order
    longest = tf.size(counts) - 1
    # counts[longest] == 0: an empty last block keeps split() defined when nothing runs
    features = tf.gather(step.project(ir_flat), pairs)
    inputs = tf.TensorArray(features.dtype, size=longest + 1, infer_shape=False,
                            element_shape=tf.TensorShape([None]).concatenate(features.shape[1:]))
    inputs = inputs.split(features, counts)
    pair_blocks = tf.TensorArray(tf.int32, size=longest + 1, infer_shape=False,
                                 element_shape=tf.TensorShape([None])).split(pairs, counts)

    def advance(j, rows, states, fed, hit, finals):
        return pair_blocks.read(j), None, rows, states, finals

    outputs, _ = run_packed(cascade, step, lambda j, rows: inputs.read(j), advance, (plan.samples,), states,
                            counts=counts)
    return outputs, pairs, plan.value_order


def run_sequence(cascade, ir_flat, caps, training):
    """A sequence-form B gets every row's repeated input in one padded call, then is cropped."""
    caps_flat = tf.reshape(caps, [-1])
    if cascade.state == "reset":
        pair_ids = tf.cast(tf.where(caps_flat > 0)[:, 0], tf.int32)
        row_caps = tf.gather(caps_flat, pair_ids)
        length = tf.maximum(tf.reduce_max(tf.concat([row_caps, [0]], 0)), 1)
        x = tf.tile(tf.gather(ir_flat, pair_ids)[:, None, :], [1, length, 1])
        y = cascade.model_b(x, training=training)
        valid = tf.range(length)[None, :] < row_caps[:, None]
        if cascade.stop_rule is not None:
            hit = tf.logical_and(tf.reshape(stopping.stop_hits(cascade.stop_rule, tf.reshape(y, [-1, y.shape[-1]])),
                                            tf.shape(valid)), valid)
            if cascade.min_steps > 1:
                hit = tf.logical_and(hit, tf.range(length)[None, :] + 1 >= cascade.min_steps)
            first_hit = tf.where(tf.reduce_any(hit, axis=1), tf.argmax(tf.cast(hit, tf.int32), axis=1,
                                                                       output_type=tf.int32), length)
            emitted = tf.minimum(row_caps, first_hit + (0 if cascade.exclude_stop_step else 1))
            valid = tf.range(length)[None, :] < emitted[:, None]
            lengths = tf.scatter_nd(pair_ids[:, None], emitted, tf.shape(caps_flat))
            return tf.boolean_mask(y, valid), tf.reshape(lengths, tf.shape(caps))
        return tf.boolean_mask(y, valid), caps
    # carry: each sample's inner steps flattened into one sequence
    n, outer = tf.shape(caps)[0], tf.shape(caps)[1]
    total = tf.reduce_sum(caps_flat)
    value_pairs = tf.repeat(tf.range(n * outer), caps_flat)
    samples = tf.math.floordiv(value_pairs, outer)
    totals = tf.reduce_sum(caps, axis=1)
    starts = tf.cumsum(totals, exclusive=True)
    positions = tf.range(total) - tf.gather(starts, samples)
    index = tf.stack([samples, positions], axis=1)
    length = tf.maximum(tf.reduce_max(tf.concat([totals, [0]], 0)), 1)
    x = tf.scatter_nd(index, tf.gather(ir_flat, value_pairs), [n, length, cascade.a_spec.ir_size])
    y = cascade.model_b(x, training=training)
    return tf.gather_nd(y, index), caps


@tf.custom_gradient
def permute(values, permutation):
    """`tf.gather(values, permutation)` whose gradient is a gather too, not a scatter-add."""

    def gradient(upstream):
        return tf.gather(upstream, tf.math.invert_permutation(permutation)), None

    return tf.gather(values, permutation), gradient


def _gather_sorted_gradient(params, indices, order, sorted_indices):
    """`tf.gather(params, indices)` whose gradient is a sorted segment sum, not an unsorted one.

    `order` sorts `indices`: `tf.gather(indices, order) == sorted_indices`, ascending.
    """

    @tf.custom_gradient
    def gather(params):
        def gradient(upstream):
            summed = tf.math.segment_sum(tf.gather(upstream, order), sorted_indices)
            return tf.pad(summed, [[0, tf.shape(params)[0] - tf.shape(summed)[0]], [0, 0]])  # unused last rows

        return tf.gather(params, indices), gradient

    return gather(params)
