"""A call that carries its state across calls: `run(..., initial_state=..., return_state=True)`.

Running `inputs[:, :W]` then `inputs[:, W:]` with the state passed gives the
values, lengths and tokens of running `inputs` whole (`run.windows` runs a
batch so, window by window). The state (`run.state.CascadeState`) holds A's
states where A is in state form, B's (`carry` mode), each sample's last fed
value (`feedback_start="previous"`) and the outer offset reached; it carries no
gradient. Every such call runs the plain feedback loop (`feedback.feedback_loop`,
which hands out each sample's last states); called eagerly, it runs in a
cached `tf.function` as other calls do (`run.compiled`).
"""

from __future__ import annotations

import tensorflow as tf

from cascade_cli.errors import ParameterError
from cascade_cli.options import check_choice
from cascade_cli.run import checks, compiled, feedback, loop
from cascade_cli.run.state import CascadeState, carries_b, carries_previous, carry_problem


def stateful(cascade, kind, inputs, caps, *, training, extras, initial_state, return_state):
    """`(result, CascadeState)` of a call that takes or returns a state: `run`'s (`kind="flat"`) or the
    flat parts of `__call__`'s (`"ragged"`).

    Every path that takes a state runs the plain packed loop over B
    (`feedback.feedback_loop`), which hands out each sample's last states; called
    eagerly, it runs in a cached `tf.function` as other calls do, except
    with targets (teacher forcing, as `CascadeModel(..., window=W)` trains
    inside its own `tf.function`), which run eagerly.
    """
    check_choice("return_state", return_state, (True, False))
    problem = carry_problem(cascade, targets=extras is not None and extras.targets is not None)
    if problem is not None:
        name = "initial_state" if initial_state is not None else "return_state"
        raise ParameterError(name, f"a run cannot carry its state across calls with these settings yet: "
                                   f"{problem}; run the sequence whole instead.")
    if cascade.fast_cells is True and cascade.b_spec.form == "step":
        raise ParameterError("fast_cells", "True, but the known-cell path cannot apply: a call that carries its "
                                           "state runs the plain loop, which calls B itself; use "
                                           "fast_cells='auto'.")
    samples = checks.dim(inputs, 0)
    a_states, b_states, previous, offset = checks.checked_state(cascade, initial_state, inputs)
    if extras is None:
        extras = feedback.Feed(None, tf.range(samples, dtype=tf.int64), tf.constant(0.0, tf.float64), False, False)
    arguments = [inputs, caps, extras.sample_index, extras.probability, offset, *a_states, *b_states,
                 *([] if previous is None else [previous])]
    if extras.targets is None and compiled.compiles(cascade, inputs):  # with targets (teacher forcing): eager
        if cascade._xla is None:  # A's probe takes this call's shape (`xla.probe_shape`)
            cascade._first_shape = tuple(inputs.shape)
        key = ("state", kind, training, inputs.dtype, inputs.shape[2], extras.return_tokens)
        if key not in cascade._concrete:
            signature = [tf.TensorSpec([None, cascade.a_spec.outer_steps, inputs.shape[2]], inputs.dtype),
                         tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int64),
                         tf.TensorSpec([], tf.float64), tf.TensorSpec([], tf.int64),
                         *(tf.TensorSpec([None, *t.shape[1:]], t.dtype) for t in arguments[5:])]
            return_tokens = extras.return_tokens

            def function(inputs, caps, sample_index, probability, offset, *states):
                feed = feedback.Feed(None, sample_index, probability, return_tokens, False)
                return run_state(cascade, kind, inputs, caps, training, feed, offset, states)

            traced = tf.function(function, input_signature=signature, autograph=False)
            cascade._concrete[key] = traced.get_concrete_function()
        with compiled.cascade_errors():
            result, state = cascade._concrete[key](*arguments)
    else:
        result, state = run_state(cascade, kind, inputs, caps, training, extras, offset, arguments[5:])
    a_out, b_out, previous_out, offset_out = state
    if tf.executing_eagerly():
        offset_out = int(offset_out)
    return tuple(result), CascadeState(tuple(a_out), tuple(b_out), previous_out, offset_out)


def run_state(cascade, kind, inputs, caps, training, feed, offset, states):
    """`(result, (a_states, b_states, previous, offset))`: `stateful`'s call on checked tensors."""
    states = [tf.stop_gradient(state) for state in states]  # no gradient through the state (truncated)
    n_a, n_b = len(cascade.a_spec.state_sizes), len(cascade.b_spec.state_sizes) if carries_b(cascade) else 0
    a_states, b_states = states[:n_a], states[n_a:n_a + n_b]
    previous = states[n_a + n_b] if carries_previous(cascade) else None
    ir, a_out = cascade._call_a(inputs, training=training, states=a_states)
    ir_flat = tf.reshape(ir, [-1, cascade.a_spec.ir_size])
    if cascade.b_spec.form == "sequence":  # reset mode: nothing of B's to carry
        result, b_out, previous_out = loop.run_sequence(cascade, ir_flat, caps, training), [], None
    else:
        result, b_out, previous_out = feedback.feedback_loop(cascade, ir_flat, caps, training, feed,
                                                             carried=feedback.Carried(b_states, previous, offset))
    if kind == "ragged":
        lengths = tf.reshape(tf.cast(result[1], tf.int64), [-1])
        result = (result[0], tf.concat([tf.zeros([1], tf.int64), tf.cumsum(lengths)], 0), *result[2:])
    outer = tf.cast(tf.shape(inputs)[1], tf.int64)
    state = ([tf.stop_gradient(s) for s in a_out], [tf.stop_gradient(s) for s in b_out],
             None if previous_out is None else tf.stop_gradient(previous_out), offset + outer)
    return tuple(result), state
