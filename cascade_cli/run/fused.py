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
so) and a probe of its own found it equal to them bit for bit (`run_fused`):
forward, and under a tape for `carry` with given steps, where XLA's own
gradient of the same computation replaces the plain loop's
(`compile_known_gradient`, `run_differentiable`). Through a known cell
that gradient runs below `xla.XLA_GRADIENT_BELOW` samples and the hand-written
one from there; a trace that does not know its batch holds both, and the batch
chooses at run time (`run_chosen_gradient`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from cascade_cli.keras_internals import stop_recording, tape_may_record
from cascade_cli.run import compiled, compiled_loop, feedback, xla
from cascade_cli.run.loop import initial_states


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


def known_plan(caps, steps, *, quantum):
    """`compiled_loop.known_inputs_loop`'s inputs from caps `(N, Ta)`, with static shapes (traced inside XLA):
    `(index (T, R), totals (R,))`, `T = steps` and the rows `R` the samples padded to a multiple of `quantum`.

    Sample `n`'s step `p` reads the pair whose values hold position `p` of the
    sample's sequence: each running pair adds, at its first position, how far
    its outer step is from the previous running pair's, and a cumulative sum
    over the positions gives each position's outer step.
    """
    n, outer = tf.shape(caps)[0], tf.shape(caps)[1]
    running = caps > 0
    ordinal = tf.cumsum(tf.cast(running, tf.int32), axis=1)
    outer_steps = tf.broadcast_to(tf.range(outer)[None], tf.shape(caps))
    rows_of = tf.broadcast_to(tf.range(n)[:, None], tf.shape(caps))
    listed = tf.tensor_scatter_nd_update(  # `listed[n, k + 1]`: sample n's k-th running outer step; 0 before
        tf.zeros(tf.stack([n, outer + 1]), tf.int32),
        tf.stack([rows_of, tf.where(running, ordinal, 0)], axis=-1), tf.where(running, outer_steps, 0))
    delta = tf.where(running, outer_steps - tf.gather(listed, tf.maximum(ordinal - 1, 0), batch_dims=1), 0)
    first = tf.cumsum(caps, axis=1, exclusive=True)  # each pair's first position
    marks = tf.tensor_scatter_nd_add(
        tf.zeros(tf.stack([n, steps + 1]), tf.int32),
        tf.stack([rows_of, tf.where(running, tf.minimum(first, steps), steps)], axis=-1), delta)
    index = tf.cumsum(marks[:, :steps], axis=1) + tf.range(n)[:, None] * outer  # (N, T) pair ids
    rows = (n + quantum - 1) // quantum * quantum
    totals = tf.pad(tf.reduce_sum(caps, axis=1), [[0, rows - n]])
    return tf.transpose(tf.pad(index, [[0, rows - n], [0, 0]])), totals


def known_values(step, table, caps, trip, *, state_sizes, quantum):
    """`carry` with given steps (traced inside XLA): `(values (R * T, W), count)`, the first `count` values the
    result, by `compiled_loop.known_inputs_loop` on `known_plan`'s inputs."""
    index, totals = known_plan(caps, tf.size(trip), quantum=quantum)
    rows = tf.shape(index)[1]
    ys = compiled_loop.known_inputs_loop(step, table, index, totals,
                                         [tf.zeros([rows, size], table.dtype) for size in state_sizes])
    emitted = tf.cast(tf.sequence_mask(totals, tf.shape(ys)[1]), tf.int32)
    values, _, _, count = pack(ys, emitted, tf.zeros([rows, 0], tf.int64), 1)
    return values, count


def known_layout(caps, steps, *, walk, quantum):
    """The rows of a loop whose every input is known before it (traced inside XLA): `(pair (T, R), value (T, R),
    totals (R,))`, the pair and the value each row's step reads and writes, and each row's steps.

    `walk`: rows are samples walking their pairs (`known_plan`), else each row is one `(n, t)` pair (all
    `N * Ta` of them, padded to a multiple of `quantum`). `value[j, r]` is the value order's index of row `r`'s
    step `j` where `j < totals[r]`, and anything past it.
    """
    if walk:
        pair, totals = known_plan(caps, steps, quantum=quantum)
        starts = tf.cumsum(tf.reduce_sum(caps, axis=1), exclusive=True)
    else:
        caps_flat = tf.reshape(caps, [-1])
        pairs = tf.size(caps_flat)
        rows = (pairs + quantum - 1) // quantum * quantum
        totals = tf.pad(caps_flat, [[0, rows - pairs]])
        pair = tf.tile(tf.minimum(tf.range(rows), tf.maximum(pairs - 1, 0))[None], tf.stack([steps, 1]))
        starts = tf.cumsum(caps_flat, exclusive=True)
    starts = tf.pad(starts, [[0, tf.size(totals) - tf.size(starts)]])
    return pair, starts[None] + tf.range(steps)[:, None], totals


def teacher_fed(cascade, caps, targets, pair, value, totals):
    """`y_prev (T, R, O)` of every row at every step under teacher forcing (traced inside XLA): the target before
    the step's value, or the start, as `feedback.teacher_table` lays them out."""
    value_start, padded, has_previous = feedback.teacher_table(caps, targets, feedback.start_value(cascade),
                                                                previous=cascade._start[0] == "previous")
    live = tf.range(tf.shape(pair)[0])[:, None] < totals[None]
    read = tf.logical_or(value > tf.gather(value_start, pair), tf.gather(has_previous, pair))
    return tf.gather(padded, tf.where(tf.logical_and(read, live), value, 0))


def known_loop(step, xs, fed, totals, states, steps):
    """B over rows whose inputs at every step are known (traced inside XLA): `ys (R, T, O)`.

    Args:
        step: `(x, y_prev, states) -> (y, new_states)`.
        xs: `(T, R, X)` each row's input at each step, or `(R, X)` where a row's input is the same at every
            step (`reset`: read by every step, not gathered per step); `fed`: `(T, R, O)` its `y_prev`, or None.
        totals: `(R,)` each row's steps; the loop runs the most of them (a row past its own computes what
            nobody reads).
        states: B's initial states, each `(R, size)`.
        steps: `T`, the most steps a row may run.
    """
    def unstacked(t):
        return tf.TensorArray(t.dtype, size=steps, element_shape=t.shape[1:]).unstack(t)

    x_of = (lambda j: xs) if xs.shape.rank == 2 else unstacked(xs).read
    fed_of = None if fed is None else unstacked(fed).read
    ys = tf.TensorArray(xs.dtype if fed is None else fed.dtype, size=steps, element_shape=tf.TensorShape([None, None]))

    def iterate(j, states, ys):
        y, states = step(x_of(j), None if fed_of is None else fed_of(j), states)
        return j + 1, states, ys.write(j, y)

    _, _, ys = tf.while_loop(lambda j, *_: j < tf.reduce_max(totals), iterate,
                             (tf.constant(0), list(states), ys), maximum_iterations=steps)
    return tf.transpose(ys.stack(), [1, 0, 2])


def known_rows_values(cascade, step, table, caps, trip, targets, *, walk, quantum):
    """`reset` with given steps, or teacher forcing (`targets`), in either mode (traced inside XLA): `(values
    (R * T, O), count)` by `known_loop` over `known_layout`'s rows, each row's inputs gathered before the loop."""
    steps = tf.size(trip)
    pair, value, totals = known_layout(caps, steps, walk=walk, quantum=quantum)
    fed = None if targets is None else teacher_fed(cascade, caps, targets, pair, value, totals)
    rows = tf.shape(totals)[0]
    if walk:
        xs = tf.gather(table, pair)
        states = [tf.zeros([rows, size], table.dtype) for size in cascade.b_spec.state_sizes]
    else:  # a row is one pair: the same input at every step
        xs = tf.gather(table, pair[0])
        states = initial_states(cascade, xs)
    ys = known_loop(step, xs, fed, totals, states, steps)
    emitted = tf.cast(tf.sequence_mask(totals, tf.shape(ys)[1]), tf.int32)
    values, _, _, count = pack(ys, emitted, tf.zeros([rows, 0], tf.int64), 1)
    return values, count


def compile_known(values_of, a_call, *, inputs_spec, targets_spec, weights):
    """A loop with known inputs and XLA's own gradient of it, each one `tf.function(jit_compile=True)`:

    - `forward(inputs, caps, trip[, targets]) -> (values (R * T, O), count)`, A and `values_of(table, caps, trip,
      targets)`;
    - `gradient(inputs, caps, trip[, targets], upstream (R * T, O)) -> (d_inputs[, d_targets], *d_weights)`: the
      same forward again under a tape inside the same XLA computation (exact: no randomness where it runs);
      `upstream` is the values' gradient padded with zeros to the padded values' rows.
    """

    def forward(inputs, caps, trip, *targets):
        ir = a_call(inputs)
        return values_of(tf.reshape(ir, [-1, ir.shape[-1]]), caps, trip, targets[0] if targets else None)

    def gradient(inputs, caps, trip, *rest):
        *targets, upstream = rest
        with tf.GradientTape() as tape:
            tape.watch([inputs, *targets])
            values, _ = forward(inputs, caps, trip, *targets)
        return tape.gradient(values, [inputs, *targets, *weights], output_gradients=upstream,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)

    signature = [inputs_spec, tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int8)]
    signature += [] if targets_spec is None else [targets_spec]
    values_spec = tf.TensorSpec([None, None], inputs_spec.dtype if targets_spec is None else targets_spec.dtype)
    return (tf.function(forward, input_signature=signature, jit_compile=True, autograph=False),
            tf.function(gradient, input_signature=signature + [values_spec], jit_compile=True, autograph=False))


def run_differentiable(forward, gradient, inputs, caps, targets, steps, *, weights):
    """`(values, caps)` of a loop with known inputs (`compile_known`), recorded by the tapes as one operation whose
    gradient is XLA's (`gradient`): the plain loop's gradient without its graph, in XLA. `steps`: the trip's
    `(T,)` placeholder."""
    extra = [] if targets is None else [targets]

    @tf.custom_gradient
    def call(*sources):
        with stop_recording():
            padded, count = compiled_loop.call(forward, inputs, caps, steps, *extra)

        def backward(d_values, variables=None):
            d_values = tf.zeros_like(padded[:count]) if d_values is None else d_values
            upstream = tf.pad(d_values, [[0, tf.shape(padded)[0] - count], [0, 0]])
            grads = compiled_loop.call(gradient, inputs, caps, steps, *extra, upstream)
            by_variable = {id(getattr(v, "value", v)): g for v, g in zip(weights, grads[len(sources):])}
            return list(grads[:len(sources)]), [by_variable.get(id(v)) for v in variables or []]

        return padded[:count], backward

    return call(inputs, *extra), caps


def pack(ys, emitted, tokens, pairs):
    """The loop's padded outputs in value order, still padded (traced inside XLA).

    Returns:
        `(values (R * T, W), lengths (P,) int32, tokens (R * T,) or (0,), count ())`: the first `count` values
        (and tokens) are the result.
    """
    width = tf.shape(ys)[2]
    mask = tf.reshape(emitted > 0, [-1])
    size = tf.size(mask)
    place = tf.where(mask, tf.cumsum(tf.cast(mask, tf.int32)) - 1, size)  # the rest go to a spare last slot
    source = tf.tensor_scatter_nd_update(tf.zeros([size + 1], tf.int32), place[:, None], tf.range(size))[:size]
    values = tf.gather(tf.reshape(ys, [-1, width]), source)
    lengths = tf.math.unsorted_segment_sum(tf.cast(mask, tf.int32), tf.maximum(tf.reshape(emitted, [-1]) - 1, 0),
                                           pairs)
    tokens = tf.gather(tf.reshape(tokens, [-1]), source) if tokens.shape[1] != 0 else tf.zeros([0], tf.int64)
    return values, lengths, tokens, tf.reduce_sum(tf.cast(mask, tf.int32))


def compile_fused(spec, a_call, step, start, *, inputs_spec, quantum, indexed, known=False):
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
        known: `carry` with no stop rule and nothing fed back: `compiled_loop.known_inputs_loop` runs (no pair
            bookkeeping inside the loop), as the compiled loop's own call does.
    """

    def fused(inputs, caps, *rest):
        sample_index = rest[0] if indexed else tf.range(tf.shape(caps)[0], dtype=tf.int64)
        trip = rest[-1]
        ir = a_call(inputs)
        table = tf.reshape(ir, [-1, ir.shape[-1]])
        if known:  # `carry`, no stop rule, nothing fed back: every row's input is known before the loop
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


def trip(caps, *, walk, max_steps):
    """The `(T,)` placeholder whose length is the most steps a row runs, bucketed as `compiled_loop.prepare`'s
    (plain TensorFlow, outside XLA: it depends on the steps' values)."""
    if max_steps is not None and not walk:
        return tf.zeros([max_steps], tf.int8)
    longest = tf.reduce_sum(caps, axis=1) if walk else caps
    return tf.zeros([compiled_loop.bucket(tf.reduce_max(longest), minimum=8)], tf.int8)


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
    (`run_known_gradient`).
    """
    if loop is None and tape_may_record() and inputs.shape[0] is None:  # a trace for any batch, under a tape
        return run_chosen_gradient(cascade, inputs, caps, training, extras=extras, plain_a=plain_a)
    if loop is None:
        loop = not tape_may_record()
    if loop is False or loop == "hand":
        return run_known_gradient(cascade, inputs, caps, training, extras=extras, plain_a=plain_a,
                                  samples=inputs.shape[0] if loop is False else xla.XLA_GRADIENT_BELOW)
    known = xla.knows_inputs(cascade)
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
            xla.loop_spec(cascade, walk=walk, return_tokens=return_tokens), a_call, cascade._b_step(training),
            lambda: feedback.start_value(cascade), inputs_spec=inputs_spec, quantum=cascade._row_quantum,
            indexed=extras is not None, known=known)

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


def run_known_gradient(cascade, inputs, caps, training, *, extras, plain_a, samples):
    """`Cascade._run`'s result under a tape from A and a loop with known inputs as one XLA computation, with XLA's
    own gradient of it (`compile_known`, `run_differentiable`), or None where it does not run.

    `samples`: the batch's samples, or None where the trace does not know them (`xla.known_gradient`).

    It runs where `xla.known_gradient` says so, once a probe found it compiles and its values equal the plain
    path's to float rounding (`Cascade.gradient_fused`; `cascade._loops["gradient"]`,
    and `["gradient problem"]` why not).
    """
    kind = xla.known_gradient(cascade, inputs, training=training, extras=extras, plain_a=plain_a, samples=samples)
    if kind is None:
        return None
    key = ("known", kind, training, inputs.dtype, inputs.shape[2])
    walk = cascade.state == "carry"
    teacher = kind == "teacher"
    if key not in cascade._loops:
        step, quantum = cascade._b_step(training), cascade._row_quantum
        if kind == "carry":
            def values_of(table, caps, trip, _):
                return known_values(step, table, caps, trip, state_sizes=tuple(cascade.b_spec.state_sizes),
                                    quantum=quantum)
        else:
            def values_of(table, caps, trip, targets):
                return known_rows_values(cascade, step, table, caps, trip, targets, walk=walk, quantum=quantum)
        cascade._loops[key] = compile_known(
            values_of, lambda x: cascade.model_a(x, training=training),
            inputs_spec=tf.TensorSpec([None, cascade.a_spec.outer_steps, inputs.shape[2]], inputs.dtype),
            targets_spec=tf.TensorSpec([None, cascade.b_spec.output_size], cascade._y_dtype) if teacher else None,
            weights=compiled.trainable_weights(cascade))
    forward, gradient = cascade._loops[key]

    def call(inputs, caps, targets):
        steps = trip(caps, walk=walk, max_steps=cascade.max_steps)
        return run_differentiable(forward, gradient, inputs, caps, targets, steps,
                                  weights=compiled.trainable_weights(cascade))

    # The probe: it compiles and gives the plain path's values. (Not the gradient: the probe runs in `init_scope`,
    # which stops the tapes, so a tape traced there records nothing.)
    if "gradient" not in cascade._loops:
        with tf.init_scope():
            rng, probe, probe_caps = xla.probe_arguments(cascade, inputs.shape)
            probe_extras, targets = extras, None
            if teacher:
                targets = tf.constant(rng.normal(size=(int(np.sum(probe_caps)), cascade.b_spec.output_size)),
                                      cascade._y_dtype)
                probe_extras = feedback.Feed(targets, tf.range(probe.shape[0], dtype=tf.int64),
                                             tf.constant(0.0, tf.float64), False, False)
            want = cascade._run(probe, probe_caps, training, plain_a=True, extras=probe_extras, loop=False)
            try:
                steps = trip(probe_caps, walk=walk, max_steps=cascade.max_steps)
                extra = [] if targets is None else [targets]
                padded, count = compiled_loop.call(forward, probe, probe_caps, steps, *extra)
            except Exception as error:  # noqa: BLE001 - XLA raises several error types
                problem = f"it does not compile ({xla.first_line(error)})"
            else:
                problem = xla.loop_difference(want, (padded[:count], probe_caps))
        cascade._loops["gradient"] = problem is None
        cascade._loops["gradient problem"] = problem
        if problem is not None:
            return None
    return call(inputs, caps, None if extras is None else extras.targets)


def run_chosen_gradient(cascade, inputs, caps, training, *, extras, plain_a):
    """`Cascade._run`'s result under a tape in a trace that does not know its batch, where the batch chooses the
    gradient at run time (`xla.chooses_gradient`: `carry` through a known cell), else `run_known_gradient`'s.

    Both paths are in the trace and each runs on a slice of the batch: XLA's gradient (`run_known_gradient`) on
    all of it below `xla.XLA_GRADIENT_BELOW` samples, the plain path and its hand-written gradient on all of it
    from there; the other on none. No `tf.cond`: TensorFlow cannot differentiate one around the compiled
    gradient, whose function captures the variables' handles. The empty path costs one small call each way.
    """
    if not xla.chooses_gradient(cascade, inputs, training=training, extras=extras, plain_a=plain_a):
        return run_known_gradient(cascade, inputs, caps, training, extras=extras, plain_a=plain_a, samples=None)
    samples = tf.shape(inputs)[0]
    below = samples * tf.cast(samples < xla.XLA_GRADIENT_BELOW, samples.dtype)  # all or none
    by_xla = run_known_gradient(cascade, inputs[:below], caps[:below], training, extras=extras, plain_a=plain_a,
                                samples=0)
    if by_xla is None:  # its probe refused it: the plain path and its hand-written gradient for every batch
        return None
    by_hand = cascade._run(inputs[below:], caps[below:], training, plain_a=plain_a, extras=extras, loop="hand")
    return tuple(tf.concat(parts, axis=0) for parts in zip(by_xla, by_hand))
