"""XLA: model A compiled (`xla_inference`), the loop over B compiled whole, and the choice of each.

With `jit_compile="auto"` (the default) A runs under XLA where it compiles and
equals its plain call, checked once on a seeded probe input (`xla_problem`,
`choose_xla`), and so does the loop over B in forward runs, whole, as one XLA
computation with static shapes (`run.compiled_loop`, called by
`run_compiled_loop`; checked once by `choose_loop`). A job too small for a
compile to pay runs neither (`plan_xla`, `XLA_PAYS_FROM`). `XlaChoice` and
`LoopChoice` record what was chosen and why, for the result's attributes and
`inspect`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import numpy as np
import tensorflow as tf

from cascade_cli.errors import ParameterError
from cascade_cli.keras_internals import seed_generators, stop_recording, tape_may_record
from cascade_cli.run import beam, compiled_loop, feedback, loop, stopping
from cascade_cli.run.cells import gated_problem


def xla_inference(model):
    """`model(x, training=False)` compiled by XLA, with a gradient that recomputes it under XLA.

    XLA cannot hand the loop intermediates of a compiled RNN to TensorFlow's own
    gradient ("TensorList crossing the XLA/TF boundary"), so the forward call is
    made without recording and the backward pass runs the model again inside
    its own compiled function (exact: inference mode has no randomness).
    """
    forward = tf.function(lambda x: model(x, training=False), jit_compile=True, autograph=False)

    def vjp(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=False)
        return tape.gradient(y, [x, *model.trainable_variables], output_gradients=upstream)

    backward = tf.function(vjp, jit_compile=True, autograph=False)

    @tf.custom_gradient
    def call(x):
        with stop_recording():
            y = compiled_loop.call(forward, x)

        def gradient(upstream, variables=None):
            grads = compiled_loop.call(backward, x, upstream)
            by_variable = {id(v.value): g for v, g in zip(model.trainable_variables, grads[1:])}
            return grads[0], [by_variable.get(id(v)) for v in variables or []]

        return y, gradient

    call.backward = backward  # `choose_xla` traces it apart (`traced_apart`) where the first call is under a tape
    return call


def traced_apart(function, *tensors):
    """Calls `compiled_loop.call(function, *tensors)` once, eagerly, on a thread of its own, where no tape is active
    nor stopped: the trace `compiled_loop.call` keeps for every later call, any shape. Raises what it raised.

    XLA's gradients (of A, `xla_inference`; of A and a loop with known inputs, `run.known`) are otherwise first
    called, so traced, in the backward pass that needs them. There TensorFlow wrapped the known loop's while
    loops for a gradient of the gradient (`control_flow_util_v2.run_as_function_for_tape_gradients`), and both
    ran slower for a reason not pinned down for A's: an eager teacher-forced call under a tape took about 0.85
    of its time at N=1 and 0.9 at N=8 traced apart, with either gradient (`benchmarks/loop_ab.py --apart`,
    `benchmarks/RESULTS.md`). `tf.init_scope` stops the tapes, so the tape inside `function` would record
    nothing. A probe calls it on the probe's shape, the first call's where that is small (`probe_shape`).
    """
    raised = []

    def run():
        try:
            compiled_loop.call(function, *tensors)
        except Exception as error:  # noqa: BLE001 - raised again on the caller's thread
            raised.append(error)

    thread = threading.Thread(target=run, name="cascade-trace")
    thread.start()
    thread.join()
    if raised:
        raise raised[0]


XLA_PAYS_FROM = 4096
"""The fewest steps in a job for which `Cascade.plan_xla` lets A (samples x outer steps) or the loop over B (its
inner steps) compile under XLA.

A heuristic on the job's size alone, so that it never depends on the batch
or the shard. Measured on sample_data/'s one-GRU A (32 units) on the 2-core
VM: the probe and compile cost 0.3-0.5 s of CPU, and XLA saved about 0.7 ms
per call of 64 rows (a generation batch's least) of 12 steps. Below 4096 steps
even batches of one sample (341 calls at Ta = 12) save less than that. The
loop over B costs more to probe and compile: 2.3-2.6 s of CPU for a feedback
GRU B sampling tokens, 8 samples x 12 outer steps x max_steps 8."""

# The largest first call whose own shape the probes take (`probe_shape`).
_PROBE_SAMPLES = 16
_PROBE_OUTER = 64

# How close A under XLA must come to its plain call, by the dtype of A's outputs.
_XLA_TOLERANCE = {2: 1e-2, 4: 1e-5, 8: 1e-9}


STATE_FORM_A = "model A is in state form, whose calls run without XLA"

RECURRENCE_WINS = ("reset mode with given steps through a known cell: its packed recurrence runs only the rows "
                   "still running, and measured faster than the masked loop under XLA")


NOT_ASKED = "jit_compile=False or run_eagerly=True"


def first_choices(cascade):
    """What `Cascade.__init__` knows of the XLA paths before any call: A's compiled call (`cascade._xla_a`), and
    the choices made without a probe (`cascade._xla`, `cascade._loop_choice`; None: the first call probes).

    With `jit_compile=True` the probes run now, so that a model or loop that cannot compile raises a
    `ParameterError` at construction.
    """
    compiles = cascade.jit_compile is not False and not cascade.run_eagerly
    cascade._xla_a = xla_inference(cascade.model_a) if compiles and cascade.a_spec.form == "plain" else None
    cascade._xla = None if cascade._xla_a else XlaChoice(False, False, STATE_FORM_A if compiles else NOT_ASKED)
    cascade._loop_choice = None if compiles else LoopChoice(False, NOT_ASKED)
    if cascade.sampler.kind == "beam":
        cascade._loop_choice = LoopChoice(False, beam.NOT_COMPILED)
    if cascade.b_spec.form == "sequence":
        cascade._loop_choice = LoopChoice(False, "B is in sequence form: it runs in one padded call, not a loop")
    if cascade.jit_compile is True:
        if cascade._xla is None:
            choose_xla(cascade, shape=None)
        if cascade._loop_choice is None:
            choose_loop(cascade, shape=None)


def a_under_xla(cascade, inputs, *, training):
    """Whether this call runs A under XLA: decided once, on the first call (`choose_xla`)."""
    if cascade._xla is None:
        choose_xla(cascade, shape=inputs.shape)
    return cascade._xla.inference if training is False else cascade._xla.training


def plan_xla(cascade, *, samples, outer_steps, inner_steps=None):
    """`Cascade.plan_xla`: A and the loop over B without XLA for a job too small for a compile to pay."""
    def too_small(steps, what):
        return (f"the job is too small for XLA's compile to pay: {what} = {steps} steps, under "
                f"{XLA_PAYS_FROM} (no probe)")

    steps = int(samples) * int(outer_steps)
    if cascade._xla is None and steps < XLA_PAYS_FROM:
        cascade._xla = XlaChoice(False, False, too_small(
            steps, f"{samples} samples x {outer_steps} outer steps of A"))
    if cascade._loop_choice is None and inner_steps is not None and int(inner_steps) < XLA_PAYS_FROM:
        cascade._loop_choice = LoopChoice(False, too_small(int(inner_steps), "the inner steps of B"))


def probe_shape(cascade, shape):
    """`(N, Ta, F)` of the probes: the first call's `shape` where it is small, so that what the probes compile
    under XLA serves that call too; else 2 samples of 3 outer steps (A's own Ta where it fixes one)."""
    if shape is None or None in tuple(shape):  # traced: the eager call that traces it knew its shape
        shape = cascade._first_shape or (None, None, None)
    n, outer, features = shape
    spec = cascade.a_spec
    n = n if n is not None and 0 < n <= _PROBE_SAMPLES else 2
    outer = spec.outer_steps or (outer if outer is not None and 0 < outer <= _PROBE_OUTER else 3)
    return n, outer, spec.features or features or 1


def probe_arguments(cascade, shape):
    """`(rng, inputs, caps)` of a probe call (`probe_shape` of `shape`): seeded normal inputs and steps of 0 to 2
    (or `min(max_steps, 4)`): short, so that its buckets are those of small calls, whose compile it then serves.
    Call it eagerly (`tf.init_scope`); `rng` draws what else the probe needs."""
    rng = np.random.default_rng(0)
    shape = probe_shape(cascade, shape)
    inputs = tf.constant(rng.normal(size=shape), cascade.model_a.inputs[0].dtype)
    caps = tf.constant(rng.integers(0, 3, size=shape[:2]) if cascade.max_steps is None
                       else np.full(shape[:2], min(cascade.max_steps, 4)), tf.int32)
    return rng, inputs, caps


def choose_xla(cascade, *, shape):
    """Checks once whether A compiles under XLA and equals its plain call; sets `cascade._xla`.

    Runs eagerly (`tf.init_scope`) on a seeded probe input (`probe_shape`
    of the first call's input `shape`, None before any call), so the first
    call may be eager or inside a caller's `tf.function` alike. Raises a
    `ParameterError` for `jit_compile=True` where A does not compile.
    """
    shape = probe_shape(cascade, shape)
    taped = tape_may_record()
    with tf.init_scope():
        problem, training = xla_problem(cascade.model_a, cascade._xla_a, shape, backward=taped)
    if problem is not None and cascade.jit_compile is True:
        raise ParameterError("jit_compile", f"True, but model A cannot run under XLA: {problem}.")
    cascade._xla = XlaChoice(problem is None, problem is None and training is None, problem or training)


def loop_applies(cascade, inputs, *, training, extras):
    """Whether this call runs the compiled whole loop: decided once (`choose_loop`), then per call.

    Per call it needs no targets (teacher forcing keeps the known-cell
    recurrence and its hand-written gradient) and, in training, a B that
    draws nothing and updates nothing (`b_draws`: XLA's random numbers are
    not TensorFlow's).
    """
    if cascade._loop_choice is not None and not cascade._loop_choice.compiled:
        return False
    if extras is not None and extras.targets is not None:
        return False
    if (cascade.state == "reset" and extras is None and cascade.stop_rule is None
            and cascade._known_cell(ir_dtype=cascade.model_a.outputs[0].dtype, training=training) is not None):
        if cascade._loop_choice is None:
            cascade._loop_choice = LoopChoice(False, RECURRENCE_WINS)
        return False
    if training is not False and b_draws(cascade):
        return False
    if cascade._loop_choice is None:
        choose_loop(cascade, shape=inputs.shape)
    return cascade._loop_choice.compiled


def choose_loop(cascade, *, shape):
    """Checks once whether the whole loop compiles under XLA and equals the plain loop; sets `cascade._loop_choice`.

    Runs eagerly (`tf.init_scope`) on a seeded probe (`probe_arguments`).
    Each path's values, lengths and tokens are compared. Raises a
    `ParameterError` for `jit_compile=True` where it does not hold.
    """
    with tf.init_scope():
        _, probe, caps = probe_arguments(cascade, shape)
        extras = None
        if cascade._general:
            extras = feedback.Feed(None, tf.range(probe.shape[0], dtype=tf.int64), tf.constant(0.0, tf.float64),
                                   cascade.sampler.tokens, False)
        plain = cascade._run(probe, caps, False, plain_a=True, extras=extras, loop=False)
        try:
            compiled = cascade._run(probe, caps, False, plain_a=True, extras=extras, loop="probe")
        except Exception as error:  # noqa: BLE001 - XLA raises several error types for ops it cannot compile
            problem = f"it does not compile ({first_line(error)})"
        else:
            problem = loop_difference(plain, compiled)
    if problem is not None and cascade.jit_compile is True:
        raise ParameterError("jit_compile", f"True, but the packed loop over B cannot run under XLA: {problem}.")
    cascade._loop_choice = LoopChoice(problem is None, problem)


def run_compiled_loop(cascade, ir_flat, caps, training, extras):
    """The forward run of B as one XLA computation (`cascade_cli.run.compiled_loop`): `Cascade._run`'s result.

    Rows walk their sample's pairs in `carry` mode and where feedback
    starts from the previous pair; elsewhere each row is one pair. B's
    step is `loop_step`'s.
    """
    if knows_inputs(cascade):
        return run_known_inputs_loop(cascade, ir_flat, caps, training)
    walk = walks(cascade)
    return_tokens = extras is not None and extras.return_tokens
    key = (training, return_tokens, ir_flat.dtype)
    sample_index = extras.sample_index if extras is not None else tf.range(tf.shape(caps)[0], dtype=tf.int64)
    pairs, *integers = compiled_loop.prepare(caps, sample_index, walk=walk, max_steps=cascade.max_steps,
                                             quantum=cascade._row_quantum)
    if key not in cascade._loops:
        cascade._loops[key] = compiled_loop.compile_loop(
            loop_spec(cascade, walk=walk, return_tokens=return_tokens), loop_step(cascade, training),
            feedback.start_value(cascade),
            table_spec=tf.TensorSpec([None, ir_flat.shape[1]], ir_flat.dtype))
    ys, emitted, tokens = compiled_loop.call(cascade._loops[key], compiled_loop.pad_table(ir_flat, pairs), *integers)
    values, pairs, tokens = compiled_loop.compact(ys, emitted, tokens if return_tokens else None)
    result = (values, loop.lengths(caps, pairs, cascade.stop_rule))
    return result + (tokens,) if return_tokens else result


def knows_inputs(cascade):
    """Whether every row's input to B is known before the loop (`carry`, no feedback, no stop rule): the compiled
    loop and the fused call run the known-inputs loop."""
    return known_inputs(cascade, None) == "carry"


def known_inputs(cascade, extras):
    """Which loop over B has every input of every row known before it runs, or None: `"carry"` or `"reset"`
    (given steps or `max_steps`, no feedback, no sampler, no stop rule), `"teacher"` (teacher forcing, no
    scheduled sampling, no tokens asked for; either mode)."""
    if cascade.b_spec.form != "step" or cascade.stop_rule is not None:
        return None
    if extras is not None:
        return "teacher" if extras.targets is not None and not extras.scheduled and not extras.return_tokens else None
    return None if cascade._general else cascade.state


def known_gradient(cascade, inputs, *, training, plain_a, extras, hand=False):
    """Which loop with known inputs (`known_inputs`) a call under a tape runs fused with A in one XLA computation,
    differentiated by XLA (`run.known.run_known_gradient`), or None where the plain path and its gradient run.

    It needs A under XLA (in training: A's training call is its inference call), a B that draws nothing and
    updates nothing in training, no hand-written gradient that wins (`hand_written`; `fast_cells=True` asks for
    it), and the loop over B not refused XLA (by `jit_compile`, `run_eagerly`,
    `plan_xla` or its probe; the forward recurrence winning in `reset` does not count), nor this path by its
    own probe. In `carry` the hand-written gradient wins by the batch's size (`xla_gradient_wins` of
    `inputs.shape[0]`, None where the trace does not know it); `hand` asks for it regardless. Below that
    batch, `carry` through a known cell differentiates the loop by the cell's `cells.Backward` inside XLA
    (`run.known.carry_gradient`), A by XLA.
    """
    kind = known_inputs(cascade, extras)
    choice = cascade._loop_choice
    if (kind is None or plain_a or cascade.fast_cells is True or cascade.jit_compile is False or cascade.run_eagerly
            or cascade.a_spec.form != "plain" or inputs.shape.rank != 3 or inputs.shape[1] == 0
            or cascade._loops.get("gradient") is False
            or (choice is not None and not choice.compiled and choice.reason != RECURRENCE_WINS)):
        return None
    if training is not False and b_draws(cascade):
        return None
    if hand_written(cascade, kind, training=training) and (
            hand or kind != "carry" or not xla_gradient_wins(inputs.shape[0])):
        return None  # measured faster (`benchmarks/loop_ab.py --gradient`)
    return kind if a_under_xla(cascade, inputs, training=training) else None


XLA_GRADIENT_BELOW = 32
"""`carry` with a known cell's hand-written gradient: the gradient inside XLA (A's XLA's, the loop's written by
hand there: `run.known.carry_gradient`) runs for batches of fewer samples, the plain path's hand-written one
from there (`xla_gradient_wins`). Measured with `benchmarks/carry_ab.py --gradient` (the peers suite's
forward+backward, loaded 2-core VM, inside XLA / plain path's): 0.14 at N=1, 0.40 at N=8, 1.03 at N=64, 1.58
at N=256."""


def xla_gradient_wins(samples):
    """Whether the gradient inside XLA of `carry` beats the plain path's hand-written one for a batch of `samples`
    (`XLA_GRADIENT_BELOW`).

    Inside XLA the loop runs every row to the longest row's end, where the plain path shrinks its rows step by
    step: through a known cell the two tie at N=64 and the plain path's wins 1.6x at N=256, where the one
    inside XLA wins 2.5-7x at N=1 and 8 (`XLA_GRADIENT_BELOW`). An eager call knows its batch:
    `run.compiled.call_compiled` traces the hand-written gradient apart for large batches. `samples` is None
    where a caller's `tf.function` traces the call for any batch: XLA's then, unless the trace holds both and
    the batch chooses at run time (`chooses_gradient`).
    """
    return samples is None or samples < XLA_GRADIENT_BELOW


def chooses_gradient(cascade, inputs, *, training, extras, plain_a):
    """Whether a call under a tape whose batch the trace does not know chooses XLA's gradient or the hand-written
    one at run time by its batch (`run.known.run_chosen_gradient`): where both apply, `carry` through a known
    cell (`xla_gradient_wins`)."""
    return (known_gradient(cascade, inputs, training=training, plain_a=plain_a, extras=extras) == "carry"
            and hand_written(cascade, "carry", training=training))


def hand_written(cascade, kind, *, training):
    """Whether the plain path of a loop with known inputs (`known_inputs`) takes a known cell's hand-written
    gradient (`run.recurrence`): measured faster than XLA's in `reset` (1.2-1.5x) and teacher forcing (1.0-1.6x),
    and in `carry` from `XLA_GRADIENT_BELOW` samples."""
    if cascade.fast_cells is False or cascade._split is None:
        return False
    split = cascade._known_cell(ir_dtype=cascade.model_a.outputs[0].dtype, training=training,
                                teacher_forced=kind == "teacher")
    return split is not None and split.backward is not None


def b_draws(cascade):
    """Whether B's training call draws random numbers (dropout, noise) or has statistics to update (XLA's random
    numbers are not TensorFlow's): checked once, eagerly, on a probe step whose draws are put back.

    Keras' recurrent cells hold a seed generator even without dropout, so having one is not drawing from it.
    """
    if "b draws" not in cascade._loops:
        generators = seed_generators([cascade.model_b])
        states = {id(generator.state) for generator in generators}
        draws = any(id(variable) not in states for variable in cascade.model_b.non_trainable_variables)
        if generators and not draws:
            with tf.init_scope(), draws_put_back(generators) as drew:
                x, *rest = [tf.zeros([2, *tensor.shape[1:]], tensor.dtype) for tensor in cascade.model_b.inputs]
                y_prev = rest.pop(0) if cascade.feedback else None
                loop.call_b(cascade, x, rest, True, y_prev=y_prev)
                draws = drew()
        cascade._loops["b draws"] = draws
    return cascade._loops["b draws"]


@contextlib.contextmanager
def draws_put_back(generators):
    """Runs a probe's training calls and then puts the seed `generators`' states back, so that a probe draws
    nothing a later call would; yields `drew()`: whether any of them has drawn since."""
    started = [generator.state.numpy() for generator in generators]
    try:
        yield lambda: any(not np.array_equal(generator.state.numpy(), state)
                          for generator, state in zip(generators, started))
    finally:
        for generator, state in zip(generators, started):
            generator.state.assign(state)


def walks(cascade):
    """Whether a compiled row walks its sample's pairs (`carry`, or feedback starting from the previous pair)
    instead of being one pair."""
    return cascade.state == "carry" or (cascade.feedback and cascade._start[0] == "previous")


def loop_spec(cascade, *, walk, return_tokens):
    """The `compiled_loop.LoopSpec` of the cascade's loop over B: the compiled loop's and the fused call's
    (`run.fused`)."""
    rule = cascade.stop_rule
    stop = stopping.stop(rule)
    return compiled_loop.LoopSpec(
        walk=walk, carry=cascade.state == "carry", feedback=cascade.feedback,
        start_previous=cascade._start[0] == "previous", sampler=cascade.sampler, stop=stop,
        zero_gate=rule is not None and rule.kind == "gate", exclude_stop_step=cascade.exclude_stop_step,
        min_steps=cascade.min_steps, seed=cascade.seed,
        return_tokens=return_tokens, width=cascade.b_spec.output_size, dtype=cascade._y_dtype,
        state_sizes=tuple(cascade.b_spec.state_sizes), state_init=cascade.state_init,
        quantum=cascade._row_quantum)


def loop_step(cascade, training):
    """B's inner step in a loop compiled whole (`compiled_loop.Step`; forward, and under a tape where XLA
    differentiates it): a known cell's `cells.Gated` where it applies (`cells.gated_problem`; not with
    `fast_cells=False`), its input projection made once per pair and read as one table per gate; else B called
    whole.

    `benchmarks/RESULTS.md` ("a known cell inside XLA"): in `carry` with given steps the loop alone ran 0.70-0.81 of
    B's call at N = 8, 64 and 256 of the peers suite; XLA's gradient of `reset` and teacher forcing 0.86-0.99.
    """
    if gated_problem(cascade._split, ir_dtype=cascade.model_a.outputs[0].dtype, training=training) is None:
        return compiled_loop.Step.known_cell(cascade._split, training)
    return compiled_loop.Step.called(cascade._b_step(training))


def run_known_inputs_loop(cascade, ir_flat, caps, training):
    """`carry` with given steps under XLA: every row's input is known before the loop (`known_inputs_loop`)."""
    key = ("known", training, ir_flat.dtype)
    if key not in cascade._loops:
        cascade._loops[key] = compiled_loop.compile_known_inputs_loop(
            loop_step(cascade, training), state_sizes=tuple(cascade.b_spec.state_sizes),
            table_spec=tf.TensorSpec([None, ir_flat.shape[1]], ir_flat.dtype))
    pairs, index, totals = compiled_loop.lay_out_steps(caps, quantum=cascade._row_quantum)
    ys = compiled_loop.call(cascade._loops[key], compiled_loop.pad_table(ir_flat, pairs), index, totals)
    return compiled_loop.compact_known(ys, totals), caps


def xla_problem(model, compiled, shape, *, backward=False):
    """Checks on a seeded probe input whether `compiled` can stand in for `model`.

    Args:
        model: model A.
        compiled: `xla_inference(model)`.
        shape: the probe's shape `(N, Ta, F)`.
        backward: also run its gradient once on the probe (`traced_apart`): the first call is under a tape.

    Returns:
        `(problem, training_problem)`: why the compiled call cannot replace
        `model(x, training=False)` (it fails to compile, or its values differ),
        or None; and, where it can, why it cannot replace `model(x,
        training=True)` too, or None. The training call is probed only where
        it has no side effect to undo but the seed generators' states, which
        are put back.
    """
    probe = tf.constant(np.random.default_rng(0).normal(size=shape), model.inputs[0].dtype)
    try:
        plain = model(probe, training=False)
    except Exception as error:  # noqa: BLE001 - any failure means: do not compile
        return f"its plain call fails on a probe input of shape {shape} ({first_line(error)})", None
    try:
        xla = compiled(probe)
        if backward:
            traced_apart(compiled.backward, probe, tf.zeros_like(xla))
    except Exception as error:  # noqa: BLE001 - XLA raises several error types for ops it cannot compile
        return f"it does not compile ({first_line(error)})", None
    plain, xla = np.asarray(plain), np.asarray(xla)
    tolerance = _XLA_TOLERANCE.get(plain.dtype.itemsize, 1e-5)
    scale = max(1.0, float(np.max(np.abs(plain)))) if plain.size else 1.0
    difference = float(np.max(np.abs(xla.astype(np.float64) - plain))) if plain.size else 0.0
    if not np.isfinite(difference) or difference > tolerance * scale:
        return (f"its compiled values differ from its plain call's by up to {difference:.3g} on a probe input "
                f"(allowed {tolerance * scale:.3g})"), None
    if model.non_trainable_weights:
        return None, "model A has non-trainable weights, which a training call may update (e.g. BatchNormalization)"
    try:
        with draws_put_back(seed_generators([model])):
            draws = [np.asarray(model(probe, training=True)) for _ in range(2)]
    except Exception as error:  # noqa: BLE001
        return None, f"model A's training call fails on a probe input ({first_line(error)})"
    if any(not np.array_equal(draw, plain) for draw in draws):
        return None, "model A's training call differs from its inference call (dropout or noise)"
    return None, None


def first_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


@dataclasses.dataclass(frozen=True)
class XlaChoice:
    """Where A runs under XLA, and why not where it does not."""

    inference: bool
    training: bool
    reason: str | None


@dataclasses.dataclass(frozen=True)
class LoopChoice:
    """Whether the packed loop runs whole under XLA, and why not where it does not."""

    compiled: bool
    reason: str | None


def loop_difference(plain, compiled):
    """Why the compiled loop's result cannot stand in for the plain loop's, or None (`choose_loop`'s probe)."""
    names = ("values", "lengths", "tokens")
    for name, want, got in zip(names, plain, compiled):
        want, got = np.asarray(want), np.asarray(got)
        if want.shape != got.shape:
            return f"its {name} have shape {got.shape} on a probe input, the plain loop's {want.shape}"
        if name != "values":
            if not np.array_equal(want, got):
                return f"its {name} differ from the plain loop's on a probe input"
            continue
        tolerance = _XLA_TOLERANCE.get(want.dtype.itemsize, 1e-5)
        scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
        difference = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
        if not np.isfinite(difference) or difference > tolerance * scale:
            return (f"its values differ from the plain loop's by up to {difference:.3g} on a probe input "
                    f"(allowed {tolerance * scale:.3g})")
    return None
