"""Under a tape, A and a loop over B whose every input is known before it, as one XLA computation differentiated
by XLA (issue 29).

Where every input of B is known before the loop (`xla.known_inputs`: `carry`
or `reset` with given steps or `max_steps`, no feedback, sampler or stop rule;
teacher forcing without scheduled sampling or tokens, either mode), A and that
loop run as one `tf.function(jit_compile=True)` recorded by the tapes as one
operation, whose gradient is XLA's own of the same computation
(`compile_known`, `run_differentiable`): the plain loop's gradient without its
graph. Rows are samples walking their pairs in `carry` (`compiled_loop.known_values`),
pairs in `reset`; teacher forcing reads `y_prev` from the shifted targets
gathered before the loop (`teacher_fed`). Where a known cell's hand-written
gradient measured faster (`xla.known_gradient`), the plain path runs instead;
in `carry` that depends on the batch (`xla.XLA_GRADIENT_BELOW`), and a trace
that does not know its batch holds both and the batch chooses at run time
(`run_chosen_gradient`). Below that batch, `carry` through a known cell takes
the loop's gradient written by hand inside the same XLA computation
(`carry_gradient`, the cell's `cells.Backward`), not XLA's generic one; A's
gradient stays XLA's.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from cascade_cli.keras_internals import stop_recording
from cascade_cli.run import compiled, compiled_loop, feedback, xla
from cascade_cli.run.compiled_loop import known_plan, known_values, pack, trip
from cascade_cli.run.loop import initial_states

CARRY_GRADIENT_WRITTEN = True
"""`carry` through a known cell with a `cells.Backward` takes the loop's gradient written by hand inside XLA
(`carry_gradient`), not XLA's generic one of the loop: the peers' taped call in 0.35-0.38 of its time at N=1,
0.53 at N=8 (`benchmarks/carry_ab.py --gradient`). A switch for that A/B, read where the gradient is traced."""


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
        step: a `compiled_loop.Step`.
        xs: the rows of each of `step.tables`: each `(T, R, X_g)`, each row's input at each step, or `(R, X_g)`
            where a row's input is the same at every step (`reset`: read by every step, not gathered per step);
            `fed`: `(T, R, O)` its `y_prev`, or None.
        totals: `(R,)` each row's steps; the loop runs the most of them (a row past its own computes what
            nobody reads).
        states: B's initial states, each `(R, size)`.
        steps: `T`, the most steps a row may run.
    """
    def unstacked(t):
        return tf.TensorArray(t.dtype, size=steps, element_shape=t.shape[1:]).unstack(t)

    x_of = [(lambda j, x=x: x) if x.shape.rank == 2 else unstacked(x).read for x in xs]
    fed_of = None if fed is None else unstacked(fed).read
    ys = tf.TensorArray(xs[0].dtype if fed is None else fed.dtype, size=steps,
                        element_shape=tf.TensorShape([None, None]))

    def iterate(j, states, ys):
        y, states = step.step([read(j) for read in x_of], None if fed_of is None else fed_of(j), states)
        return j + 1, states, ys.write(j, y)

    _, _, ys = tf.while_loop(lambda j, *_: j < tf.reduce_max(totals), iterate,
                             (tf.constant(0), list(states), ys), maximum_iterations=steps)
    return tf.transpose(ys.stack(), [1, 0, 2])


def known_rows_values(cascade, step, table, caps, trip, targets, *, walk, quantum):
    """`reset` with given steps, or teacher forcing (`targets`), in either mode (traced inside XLA): `(values
    (R * T, O), count)` by `known_loop` over `known_layout`'s rows, each row's inputs gathered before the loop
    (`step`: a `compiled_loop.Step`)."""
    steps = tf.size(trip)
    pair, value, totals = known_layout(caps, steps, walk=walk, quantum=quantum)
    fed = None if targets is None else teacher_fed(cascade, caps, targets, pair, value, totals)
    rows = tf.shape(totals)[0]
    tables = step.tables(table)
    if walk:
        xs = [tf.gather(t, pair) for t in tables]
        states = [tf.zeros([rows, size], table.dtype) for size in cascade.b_spec.state_sizes]
    else:  # a row is one pair: the same input at every step
        xs = [tf.gather(t, pair[0]) for t in tables]
        states = initial_states(cascade, tf.gather(table, pair[0]))
    ys = known_loop(step, xs, fed, totals, states, steps)
    emitted = tf.cast(tf.sequence_mask(totals, tf.shape(ys)[1]), tf.int32)
    values, _, _, count = pack(ys, emitted, tf.zeros([rows, 0], tf.int64), 1)
    return values, count


def carry_gradient(split, step, table, caps, trip, upstream, *, state_sizes, quantum, training):
    """The gradient of `known_values` (`carry` through a known cell with a `cells.Backward`) written by hand (traced
    inside XLA): `(d_table (P, X), {id(variable): gradient})` for B's weights, given the values' `upstream`.

    XLA's gradient of the loop (TensorFlow's generic while-loop gradient) does, at every step, work that does
    not depend on the rows: it sums each loop-invariant tensor's gradient step by step (B's kernels, the whole
    table's, densified) and stacks every intermediate. Through few rows and many steps (`carry` at small
    batches: 1-8 rows, 400-900 steps) that is most of its time. Here the forward runs again keeping only each
    step's states, then a loop backwards over the steps does the recurrent part only: `inner = h_prev @ U` again,
    the gates' vector-Jacobian product (`cells.Backward.vjp`) and the gradient through `inner`, writing each
    step's gradients of the projected input and of `inner`. After it, one matmul per gate gives the recurrent
    weights' gradients, one segment sum over the steps' pairs the projected table's (then the input kernel's and
    the table's through `Backward.project`), and the head's gradient is taken once over every step's `h`. A row
    past its total steps on pair 0; its values are never read, so its upstream is zero and it adds nothing.
    """
    backward = split.backward
    index, totals = known_plan(caps, tf.size(trip), quantum=quantum)
    steps, rows = tf.shape(index)[0], tf.shape(index)[1]
    longest = tf.reduce_max(totals)
    width = tf.shape(upstream)[1]
    with tf.GradientTape() as tape:  # the values' gradient as each row's at each step, `(R, T, O)`
        ys = tf.zeros(tf.stack([rows, steps, width]), upstream.dtype)
        tape.watch(ys)
        values = pack(ys, tf.cast(tf.sequence_mask(totals, steps), tf.int32), tf.zeros([rows, 0], tf.int64), 1)[0]
    d_ys = tf.reshape(tf.transpose(tape.gradient(values, ys, output_gradients=upstream), [1, 0, 2]), [-1, width])

    # the forward again, keeping each step's states
    first = [tf.zeros([rows, size], table.dtype) for size in state_sizes]

    def forward(j, states, leaving):
        _, states = step(tf.gather(table, index[j]), None, states)
        return j + 1, states, [array.write(j, s) for array, s in zip(leaving, states)]

    leaving = [tf.TensorArray(table.dtype, size=steps, element_shape=s.shape) for s in first]
    _, _, leaving = tf.while_loop(lambda j, *_: j < longest, forward, (tf.constant(0), first, leaving),
                                  maximum_iterations=steps)
    leaving = [array.stack() for array in leaving]  # `(T, R, size)`; zeros from the longest row's end
    entering = [tf.concat([s[None], after[:-1]], 0) for s, after in zip(first, leaving)]
    units = split.cell.units
    h_all = tf.reshape(leaving[0], [-1, units])  # the cell's output is its first state

    by_variable = {}
    if split.head is None:
        d_h = d_ys
    else:
        with tf.GradientTape() as tape:
            tape.watch(h_all)
            y = split.head(h_all, training=training)
        head_weights = split.head.trainable_variables
        d_h, *grads = tape.gradient(y, [h_all, *head_weights], output_gradients=d_ys)
        by_variable.update((id(v), g) for v, g in zip(head_weights, grads) if g is not None)
    d_h = tf.reshape(d_h, tf.shape(leaving[0]))

    cell_weights = split.cell.trainable_variables
    with tf.GradientTape() as reads:  # the cell's weights read and the table projected, once; differentiated last
        reads.watch(table)
        weights = backward.weights()
        projected = backward.project(table)
    d_arrays = [tf.TensorArray(table.dtype, size=steps, element_shape=tf.TensorShape([None, units]))
                for _ in range(2 * backward.gates)]

    def step_back(j, carried, d_arrays):
        states = [s[j] for s in entering]
        inner = backward.inner(states[0], weights)
        d_new = [d_h[j] + carried[0], *carried[1:]]
        d_x, d_i, d_direct = backward.vjp([tf.gather(p, index[j]) for p in projected], inner, states, d_new)
        through = backward.through_inner(d_i, weights)
        carried = [through if d_direct[0] is None else through + d_direct[0]]
        carried += [tf.zeros_like(s) if d is None else d for s, d in zip(states[1:], d_direct[1:])]
        return j - 1, carried, [array.write(j, d) for array, d in zip(d_arrays, d_x + d_i)]

    _, _, d_arrays = tf.while_loop(lambda j, *_: j >= 0, step_back, (longest - 1, first, d_arrays),
                                   maximum_iterations=steps)
    d_all = [tf.reshape(array.stack(), [-1, units]) for array in d_arrays]  # zeros from the longest row's end
    d_x, d_i = d_all[:backward.gates], d_all[backward.gates:]
    d_projected = [tf.math.unsorted_segment_sum(d, tf.reshape(index, [-1]), tf.shape(table)[0]) for d in d_x]
    d_weights = backward.weight_grads(tf.reshape(entering[0], [-1, units]), d_i, weights)
    d_table, *grads = reads.gradient(projected + weights, [table, *cell_weights],
                                     output_gradients=d_projected + d_weights)
    by_variable.update((id(v), g) for v, g in zip(cell_weights, grads) if g is not None)
    return d_table, by_variable


def compile_known(values_of, a_call, *, inputs_spec, targets_spec, weights, gradient_of=None):
    """A loop with known inputs and XLA's own gradient of it, each one `tf.function(jit_compile=True)`:

    - `forward(inputs, caps, trip[, targets]) -> (values (R * T, O), count)`, A and `values_of(table, caps, trip,
      targets)`;
    - `gradient(inputs, caps, trip[, targets], upstream (R * T, O)) -> (d_inputs[, d_targets], *d_weights)`: the
      same forward again under a tape inside the same XLA computation (exact: no randomness where it runs);
      `upstream` is the values' gradient padded with zeros to the padded values' rows.

    `gradient_of(table, caps, trip, upstream) -> (d_table, {id(variable): gradient})`, where given, is the loop's
    gradient written by hand (`carry_gradient`): then only A runs under the tape, and its gradient is pulled from
    `d_table`; the variables `gradient_of` names get its gradients added.
    """

    def forward(inputs, caps, trip, *targets):
        ir = a_call(inputs)
        return values_of(tf.reshape(ir, [-1, ir.shape[-1]]), caps, trip, targets[0] if targets else None)

    def gradient(inputs, caps, trip, *rest):
        *targets, upstream = rest
        with tf.GradientTape() as tape:
            tape.watch([inputs, *targets])
            if gradient_of is None:
                values, _ = forward(inputs, caps, trip, *targets)
            else:
                ir = a_call(inputs)
        if gradient_of is None:
            return tape.gradient(values, [inputs, *targets, *weights], output_gradients=upstream,
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
        # the loop's gradient outside the tape: recorded, its loops would be differentiable ones (and slower)
        d_table, by_variable = gradient_of(tf.reshape(ir, [-1, ir.shape[-1]]), caps, trip, upstream)
        grads = tape.gradient(ir, [inputs, *targets, *weights], output_gradients=tf.reshape(d_table, tf.shape(ir)))
        grads = [tf.zeros_like(t) if g is None else g for t, g in zip([inputs, *targets], grads)] + [
            _summed(g, by_variable.get(id(w)), w) for w, g in zip(weights, grads[1 + len(targets):])]
        return grads

    signature = [inputs_spec, tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int8)]
    signature += [] if targets_spec is None else [targets_spec]
    values_spec = tf.TensorSpec([None, None], inputs_spec.dtype if targets_spec is None else targets_spec.dtype)
    return (tf.function(forward, input_signature=signature, jit_compile=True, autograph=False),
            tf.function(gradient, input_signature=signature + [values_spec], jit_compile=True, autograph=False))


def _summed(first, second, variable):
    """The sum of two gradients of `variable`, either None where it has none; zeros where neither is."""
    if first is None and second is None:  # (a Keras variable's dtype is a name: `tf.zeros_like` would not take it)
        return tf.zeros(variable.shape, tf.as_dtype(variable.dtype))
    return second if first is None else first if second is None else first + second


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


def run_known_gradient(cascade, inputs, caps, training, *, extras, plain_a, hand=False):
    """`Cascade._run`'s result under a tape from A and a loop with known inputs as one XLA computation, with XLA's
    own gradient of it (`compile_known`, `run_differentiable`), or None where it does not run.

    `hand`: the caller asks for the hand-written gradient where one applies (`xla.known_gradient`).

    It runs where `xla.known_gradient` says so, once a probe found it compiles and its values equal the plain
    path's to float rounding (`Cascade.gradient_fused`; `cascade._loops["gradient"]`,
    and `["gradient problem"]` why not).
    """
    kind = xla.known_gradient(cascade, inputs, training=training, extras=extras, plain_a=plain_a, hand=hand)
    if kind is None:
        return None
    written = kind == "carry" and CARRY_GRADIENT_WRITTEN and xla.hand_written(cascade, kind, training=training)
    key = ("known", kind, training, inputs.dtype, inputs.shape[2], written)
    walk = cascade.state == "carry"
    teacher = kind == "teacher"
    if key not in cascade._loops:
        step, quantum = cascade._b_step(training), cascade._row_quantum
        state_sizes = tuple(cascade.b_spec.state_sizes)
        gradient_of = functools.partial(carry_gradient, cascade._split, step, state_sizes=state_sizes,
                                        quantum=quantum, training=training) if written else None
        loop_step = xla.loop_step(cascade, training)  # a known cell's projection made once (`xla.loop_step`)
        if kind == "carry":
            def values_of(table, caps, trip, _):
                return known_values(loop_step, table, caps, trip, state_sizes=state_sizes, quantum=quantum)
        else:
            def values_of(table, caps, trip, targets):
                return known_rows_values(cascade, loop_step, table, caps, trip, targets, walk=walk,
                                         quantum=quantum)
        cascade._loops[key] = compile_known(
            values_of, lambda x: cascade.model_a(x, training=training),
            inputs_spec=tf.TensorSpec([None, cascade.a_spec.outer_steps, inputs.shape[2]], inputs.dtype),
            targets_spec=tf.TensorSpec([None, cascade.b_spec.output_size], cascade._y_dtype) if teacher else None,
            weights=compiled.trainable_weights(cascade), gradient_of=gradient_of)
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
                xla.traced_apart(gradient, probe, probe_caps, steps, *extra, tf.zeros_like(padded))
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
        return run_known_gradient(cascade, inputs, caps, training, extras=extras, plain_a=plain_a)
    samples = tf.shape(inputs)[0]
    below = samples * tf.cast(samples < xla.XLA_GRADIENT_BELOW, samples.dtype)  # all or none
    # (the slice's batch is unknown to the trace: `xla.known_gradient` takes XLA's gradient for it)
    by_xla = run_known_gradient(cascade, inputs[:below], caps[:below], training, extras=extras, plain_a=plain_a)
    if by_xla is None:  # its probe refused it: the plain path and its hand-written gradient for every batch
        return None
    by_hand = cascade._run(inputs[below:], caps[below:], training, plain_a=plain_a, extras=extras, loop="hand")
    return tuple(tf.concat(parts, axis=0) for parts in zip(by_xla, by_hand))
