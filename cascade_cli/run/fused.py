"""A forward call as one XLA computation: model A, the row plan, the loop over B and the packing (issue 29).

The compiled whole loop (`cascade_cli.run.compiled_loop`) left the small TensorFlow
ops around it outside XLA: A as its own XLA call, the row plan (`prepare`:
`tf.where`, `searchsorted`, padding), the compaction of the padded outputs and
the lengths. At N=1 they cost about 1 ms on an idle 2-core machine, more than
the loop itself. Here they all run in one `tf.function(jit_compile=True)`,
compiled once per input shape (as A's own XLA call is), so a forward call is
one XLA launch plus two small ops outside it:

- the trip count: XLA needs the `TensorArray`s' size as a constant, and it
  depends on the steps' values, so it arrives as the length of a `(T,)`
  placeholder (a bucket, `compiled_loop.bucket`, as in `prepare`; `max_steps`
  itself where it bounds every row);
- the values leave XLA padded to `rows * T` with their count: one slice cuts
  them.

The plan has static shapes: in `reset` every `(n, t)` pair is a row (a pair
with no steps is a row that never runs, -1), in `carry` (and feedback that
starts from the previous pair) every sample is; the rows are padded to a
multiple of B's row quantum (`run.packing.row_quantum`), so a row's values do not
depend on the rows beside it. Each row's next running pair comes from a list
of every sample's running pairs built by a scatter (no `searchsorted`). The
loop is `compiled_loop.masked_loop`, unchanged; its `(rows, T)` outputs are
already in value order row-major, and a cumulative sum places them.

It runs where A and the loop each run under XLA (`Cascade`'s probes decided
so) and a probe of its own found it equal to them bit for bit (`run_fused`),
on a forward call. Under a tape, where every input of B is known before the
loop, `run_fused` hands the call to `cascade_cli.run.known`: A and that loop as
one XLA computation differentiated by XLA.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from cascade_cli.keras_internals import tape_may_record
from cascade_cli.run import compiled_loop, feedback, known, xla
from cascade_cli.run.compiled_loop import known_values, pack, trip


def plan(caps, sample_index, *, walk, quantum):
    """The loop's integer inputs from caps `(N, Ta)`, with static shapes (traced inside XLA).

    Args:
        caps: `(N, Ta)` int32.
        sample_index: `(N,)` int64.
        walk: rows are samples walking their pairs (else `(n, t)` pairs).
        quantum: the rows are padded to a multiple of it.

    Returns:
        `(caps (P,), next_pair (P,), sample_of (P,) int64, outer_of (P,), row_pairs (R,))` as
        `compiled_loop.masked_loop` takes them, `P = N * Ta`.
    """
    n, outer = tf.shape(caps)[0], tf.shape(caps)[1]
    caps_flat = tf.reshape(caps, [-1])
    pair_ids = tf.range(tf.size(caps_flat))
    running = caps > 0
    if walk:
        # each sample's running pairs in order, then -1: `listed[n, k]` is sample n's k-th running pair
        ordinal = tf.cumsum(tf.cast(running, tf.int32), axis=1)  # inclusive: running pairs up to t
        column = tf.where(running, ordinal - 1, outer)  # the rest land on the last column, which stays -1
        rows_of = tf.broadcast_to(tf.range(n)[:, None], tf.shape(caps))
        listed = tf.tensor_scatter_nd_update(
            tf.fill(tf.stack([n, outer + 1]), -1), tf.stack([rows_of, column], axis=-1),
            tf.where(running, tf.reshape(pair_ids, tf.shape(caps)), -1))
        next_pair = tf.reshape(tf.gather(listed, ordinal, batch_dims=1), [-1])  # the running pair after each
        row_pairs = listed[:, 0]
    else:
        next_pair = tf.fill(tf.shape(caps_flat), -1)
        row_pairs = tf.where(caps_flat > 0, pair_ids, -1)
    rows = tf.size(row_pairs)
    row_pairs = tf.pad(row_pairs, [[0, (rows + quantum - 1) // quantum * quantum - rows]], constant_values=-1)
    sample_of = tf.gather(tf.cast(sample_index, tf.int64), pair_ids // outer)
    return caps_flat, next_pair, sample_of, pair_ids % outer, row_pairs


def compile_fused(spec, a_call, step, start, *, inputs_spec, quantum, indexed, knows_inputs=False):
    """The fused forward as one `tf.function(jit_compile=True)`: `(inputs, caps[, sample_index], trip)` ->
    `(values, lengths (N, Ta), tokens, count)`, padded as `pack` returns them.

    Args:
        spec: the loop's `compiled_loop.LoopSpec`.
        a_call: `inputs -> ir (N, Ta, H)`, model A.
        step: B's inner step, `(x, y_prev, states) -> (y, new_states)`.
        start: `() -> (O,)`, `y_prev` at a pair's first step (made inside the trace: a tensor of the caller's
            graph is out of scope where the first trace is a probe's, eager).
        inputs_spec: a `tf.TensorSpec` of the inputs.
        quantum: B's row quantum.
        indexed: the call passes `sample_index` (else `range(N)`).
        knows_inputs: `carry` with no stop rule and nothing fed back: `compiled_loop.known_inputs_loop` runs (no pair
            bookkeeping inside the loop), as the compiled loop's own call does.
    """

    def fused(inputs, caps, *rest):
        sample_index = rest[0] if indexed else tf.range(tf.shape(caps)[0], dtype=tf.int64)
        trip = rest[-1]
        ir = a_call(inputs)
        table = tf.reshape(ir, [-1, ir.shape[-1]])
        if knows_inputs:  # `carry`, no stop rule, nothing fed back: every row's input is known before the loop
            values, count = known_values(step, table, caps, trip, state_sizes=spec.state_sizes, quantum=quantum)
            return values, caps, tf.zeros([0], tf.int64), count
        caps_flat, next_pair, sample_of, outer_of, row_pairs = plan(caps, sample_index, walk=spec.walk,
                                                                     quantum=quantum)
        ys, emitted, tokens = compiled_loop.masked_loop(spec, step, start(), table, caps_flat, next_pair, sample_of,
                                                        outer_of, row_pairs, trip)
        values, lengths, tokens, count = pack(ys, emitted, tokens, tf.size(caps_flat))
        return values, tf.reshape(lengths, tf.shape(caps)), tokens, count

    signature = [inputs_spec, tf.TensorSpec([None, None], tf.int32)]
    signature += [tf.TensorSpec([None], tf.int64)] if indexed else []
    signature += [tf.TensorSpec([None], tf.int8)]
    return tf.function(fused, input_signature=signature, jit_compile=True, autograph=False)


def run(function, inputs, caps, sample_index, *, walk, max_steps, stopped, return_tokens):
    """`Cascade.run`'s result from the fused function: `(values, lengths[, tokens])`.

    `stopped`: a stop rule may end pairs early (else the lengths are the caps, as given).
    """
    arguments = [inputs, caps] + ([] if sample_index is None else [sample_index])
    values, lengths, tokens, count = compiled_loop.call(function, *arguments, trip(caps, walk=walk,
                                                                                    max_steps=max_steps))
    result = (values[:count], lengths if stopped else caps)
    return result + (tokens[:count],) if return_tokens else result


def difference(want, got):
    """Why `got` (the fused result) cannot stand in for `want`, or None: lengths and tokens exact, values bitwise."""
    for name, a, b in zip(("values", "lengths", "tokens"), want, got):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.tobytes() != b.tobytes():
            return f"its {name} differ from the compiled loop's on a probe input"
    return None


def run_fused(cascade, inputs, caps, training, *, extras, plain_a, loop):
    """`Cascade._run`'s result from one XLA computation (`compile_fused`), or None where it does not run.

    It runs where A and the whole loop each run under XLA (their probes), once a probe of its own found it
    equal to them bit for bit (`Cascade.loop_fused`; `cascade._loops["fused"]`, and `["fused problem"]` why
    not), on an untaped forward call. Under a tape, where every input of B is known before the loop
    (`xla.known_gradient`), A and that loop run as one XLA computation differentiated by XLA
    (`known.run_known_gradient`).
    """
    if loop is None and tape_may_record() and inputs.shape[0] is None:  # a trace for any batch, under a tape
        return known.run_chosen_gradient(cascade, inputs, caps, training, extras=extras, plain_a=plain_a)
    if loop is None:
        loop = not tape_may_record()
    if loop is False or loop == "hand":
        return known.run_known_gradient(cascade, inputs, caps, training, extras=extras, plain_a=plain_a,
                                        hand=loop == "hand")
    if (loop is not True or plain_a or cascade.a_spec.form != "plain" or cascade.b_spec.form != "step"
            or cascade.sampler.kind == "beam" or inputs.shape[1] == 0 or inputs.shape.rank != 3
            or (extras is not None and extras.targets is not None) or cascade._loops.get("fused") is False
            or not xla.a_under_xla(cascade, inputs, training=training)
            or not xla.loop_applies(cascade, inputs, training=training, extras=extras)):
        return None
    walk = xla.walks(cascade)
    return_tokens = extras is not None and extras.return_tokens
    key = ("fused", training, return_tokens, extras is not None, inputs.dtype, inputs.shape[2])
    inputs_spec = tf.TensorSpec([None, cascade.a_spec.outer_steps, inputs.shape[2]], inputs.dtype)

    def a_call(x):
        return cascade.model_a(x, training=training)

    if key not in cascade._loops:
        cascade._loops[key] = compile_fused(
            xla.loop_spec(cascade, walk=walk, return_tokens=return_tokens), a_call, xla.loop_step(cascade, training),
            lambda: feedback.start_value(cascade), inputs_spec=inputs_spec, quantum=cascade._row_quantum,
            indexed=extras is not None, knows_inputs=xla.knows_inputs(cascade))

    def call(inputs, caps, extras):
        return run(cascade._loops[key], inputs, caps, None if extras is None else extras.sample_index,
                   walk=walk, max_steps=cascade.max_steps, stopped=cascade.stop_rule is not None,
                   return_tokens=return_tokens)

    if "fused" not in cascade._loops:  # the probe: the same call as the compiled loop gives it, bit for bit
        with tf.init_scope():
            _, probe, probe_caps = xla.probe_arguments(cascade, inputs.shape)
            probe_extras = None if extras is None else feedback.Feed(
                None, tf.range(probe.shape[0], dtype=tf.int64), tf.constant(0.0, tf.float64), return_tokens, False)
            want = cascade._run(probe, probe_caps, training, extras=probe_extras, loop="probe")
            try:
                got = call(probe, probe_caps, probe_extras)
            except Exception as error:  # noqa: BLE001 - XLA raises several error types
                problem = f"it does not compile ({xla.first_line(error)})"
            else:
                problem = difference(want, got)
        cascade._loops["fused"] = problem is None
        cascade._loops["fused problem"] = problem
        if problem is not None:
            return None
    return call(inputs, caps, extras)
