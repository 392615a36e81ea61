"""`Cascade`: the packed runner that chains model A and model B.

Pure TensorFlow: no I/O, no progress, no training loop. It runs eagerly, inside
`tf.function` and inside a caller's `tf.GradientTape` with the same values.
Called eagerly it compiles itself: the settings are checked eagerly, then the
work runs in a cached `tf.function` traced once for any batch and steps
(`run_eagerly=True` keeps it eager, for debugging). Model A runs under XLA
where it compiles and equals its plain call (`jit_compile="auto"`, checked once
on a probe input), and so does the loop over B in forward runs, whole, as one
XLA computation with static shapes (`cascade_cli.run.compiled_loop`: rows masked,
sizes bucketed); elsewhere (a tape recording the call, teacher forcing,
`reset` through a known cell's packed recurrence) the plain loop below runs.

How it stays fast (DESIGN section 3): A is called once; every inner sequence
that runs (a `(n, t)` pair in `reset` mode, a whole sample in `carry` mode) is a
*row*. Rows are sorted longest first, so at inner step `j` the rows still
running are a prefix and B is called once on that prefix. Rows with nothing to
emit never enter the loop, and B processes exactly `sum(steps)` rows. With a
run-time stopping rule the rows that stop are dropped with a boolean mask
instead. Each emitted row is tagged with its pair id; the value order puts the
step-major outputs in order at the end.

The work is split the way Keras splits its `RNN` layer from `backend.rnn`:
`cascade_cli.run.packing` turns the caps into a plan (pure functions),
`packed_loop` runs a plain `step(x, states) -> (y, states)` over the plan's
rows, and `Cascade` validates its settings and chooses the path.

A feedback-form B (`feedback=True`) is fed what it emitted: free running
(generation) it runs its own loop that calls B on the rows still running and
samples every step (`cascade_cli.run.sampling`; counter-based draws, so the
results do not depend on how the input is cut); teacher-forced through a
known cell, every row's input is known before the loop and the packed
recurrence with its hand-written gradient runs as above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from cascade_cli.run import beam, compiled_loop, packing, sampling
from cascade_cli.run.cells import fast_path_problem, split_b
from cascade_cli.errors import CascadeError, DataError, ModelError, ParameterError, received
from cascade_cli.keras_internals import (flatten_layers, seed_generators, stop_recording, tape_may_record,
                                         tapes_may_take_higher_order)
from cascade_cli.run.models import check_inputs_fit, check_pair
from cascade_cli.options import (RUNNER_DEFAULTS, STATE_INITS, STATE_MODES, STEPS_MAX, Sampler, StopRule,
                                  check_choice, check_int, check_number, check_runner_settings, parse_feedback_start)
from cascade_cli.run.recurrence import packed_recurrence
from cascade_cli.run.state import CascadeState
from cascade_cli.steps import check_steps

__all__ = ["Cascade", "CascadeState", "STATE_INITS", "STATE_MODES", "Sampler", "StopRule", "packed_loop", "stop_hits",
           "xla_inference", "xla_problem"]


def stop_hits(rule, y, tokens=None):
    """Returns a `(rows,)` bool tensor: which rows of `y (rows, O)` meet the `StopRule`.

    A token rule reads `tokens (rows,)` (the sampled ids) where given, else
    `argmax(y)`; a gate reads `sigmoid` of `y`'s last column.
    """
    if rule.kind == "norm":
        return tf.norm(y, axis=-1) >= tf.cast(rule.value, y.dtype)
    if rule.kind == "gate":
        return tf.sigmoid(y[:, -1]) >= tf.cast(rule.value, y.dtype)
    if tokens is None:
        tokens = tf.argmax(y, axis=-1, output_type=tf.int32)
    ids = rule.token_ids
    if len(ids) == 1:
        return tokens == tf.cast(ids[0], tokens.dtype)
    return tf.reduce_any(tokens[:, None] == tf.constant(ids, tokens.dtype)[None, :], axis=1)


def packed_loop(step, body, *, rows, states, output_size, dtype, counts=None, stop=None, held=None):
    """Runs `step` over packed rows until no row is left.

    At inner step `j`, `body(j, rows)` gives the step's input `x` and a
    `finish(y, hit) -> (pair_ids, keep, rows)` that names the pair each output
    row belongs to, which rows go on and their next values. The rows that go
    on are the first `counts[j + 1]` when `counts` is given (rows sorted
    longest first, no stopping), else those where `keep` is True.

    Args:
        step: `(x, states) -> (y, new_states)`: one inner step of every running row.
        body: `(j, rows) -> (x, finish)`, as above.
        rows: a tuple of per-row tensors, each `(rows, ...)`.
        states: the step's states for those rows, each `(rows, size)`.
        output_size: the size of `y`, `O`.
        dtype: the dtype of `y`.
        counts: `(longest + 1,)` int32, the rows running at each step, or None.
        stop: `y -> (hit, emit)`: `(rows,)` bools, the rows that met the stop
            rule and (or None for all) the rows whose `y` is emitted; None
            without a stop rule.
        held: `(j, rows) -> (rows,)` bools, the rows the stop rule may not
            stop yet (`min_steps`): they neither stop nor leave their `y`
            out; None holds no row.

    Returns:
        `(outputs (total, O), pairs (total,))`: every step's emitted outputs,
        step after step, and the pair id of each.
    """

    def iterate(j, rows, states, ys, pairs):
        x, finish = body(j, rows)
        y, states = step(x, states)
        hit, emit = (None, None) if stop is None else stop(y)
        if hit is not None and held is not None:
            waiting = held(j, rows)
            hit = tf.logical_and(hit, tf.logical_not(waiting))
            emit = None if emit is None else tf.logical_or(emit, waiting)
        pair_ids, keep, rows = finish(y, hit)
        if emit is None:
            ys, pairs = ys.write(j, y), pairs.write(j, pair_ids)
        else:
            ys = ys.write(j, tf.boolean_mask(y, emit))
            pairs = pairs.write(j, tf.boolean_mask(pair_ids, emit))
        if counts is not None:
            count = counts[j + 1]
            rows = tuple(r[:count] for r in rows)
            states = [s[:count] for s in states]
        else:
            rows = tuple(tf.boolean_mask(r, keep) for r in rows)
            states = [tf.boolean_mask(s, keep) for s in states]
        return j + 1, rows, states, ys, pairs

    ys = tf.TensorArray(dtype, size=0, dynamic_size=True, infer_shape=False,
                        element_shape=tf.TensorShape([None, output_size]))
    pairs = tf.TensorArray(tf.int32, size=0, dynamic_size=True, infer_shape=False,
                           element_shape=tf.TensorShape([None]))
    invariants = (
        tf.TensorShape([]),
        tuple(tf.TensorShape([None]).concatenate(r.shape[1:]) for r in rows),
        [tf.TensorShape([None]).concatenate(s.shape[1:]) for s in states],
        tf.TensorShape(None),
        tf.TensorShape(None),
    )
    j, _, _, ys, pairs = tf.while_loop(
        lambda j, rows, *_: tf.shape(rows[0])[0] > 0,
        iterate,
        (tf.constant(0), tuple(rows), list(states), ys, pairs),
        shape_invariants=invariants,
    )
    # A sentinel keeps concat() defined when nothing ran.
    ys = ys.write(j, tf.zeros([0, output_size], dtype)).concat()
    return ys, pairs.write(j, tf.zeros([0], tf.int32)).concat()


class Cascade:
    """Chains model A and model B into a generator of ragged sequences.

    `IR = A(inputs)`; for every sample `n` and outer step `t`, B runs
    `steps[n, t]` inner steps fed `IR[n, t]` and emits `(steps[n, t], O)`.

    Args:
        model_a: a `keras.Model` mapping `(batch, Ta, F)` to `(batch, Ta, H)`.
        model_b: a `keras.Model` in step form `[x, *states] -> [y, *states]` or
            causal sequence form `(batch, T, H) -> (batch, T, O)`.
        state: `"reset"` (every inner sequence starts from the initial state) or
            `"carry"` (one state per sample flows across outer steps).
        state_init: `"zeros"` or `"ir"` (each state set to `IR[n, t]`; needs
            every state size == H; `reset` and step form only).
        max_steps: the most inner steps a pair may run; required when no
            steps are given, and an upper bound for given steps.
        stop_rule: a `StopRule`; needs `max_steps`.
        exclude_stop_step: leave the step that met the stop rule out (for end tokens).
        min_steps: an integer in [0, max_steps]: no stop rule stops a pair
            before it has run `min_steps` inner steps, the stop step included
            (a hit at inner step `j` counts from `j + 1 >= min_steps` on; 0
            and 1 hold nothing off). Needs a stop rule when above 0.
        fast_cells: `"auto"` (default), True or False. When B is a Keras
            SimpleRNN/GRU/LSTM cell plus a head, the known-cell path computes
            the cell's input projection once per pair and the head once after
            the loop (`cascade_cli.run.cells`), and, with given steps and the usual
            activations, takes the loop's gradient by hand
            (`cascade_cli.run.recurrence`). One predicate
            (`cells.fast_path_problem`) says when it applies; `"auto"` uses it
            where it applies and calls B elsewhere, True raises a
            `ParameterError` saying why where it cannot apply, False always
            calls B itself and leaves the gradient to TensorFlow.
        jit_compile: `"auto"` (default, as in Keras 3), True or False: run
            model A under XLA. The first call checks it once on a probe input:
            A must compile and equal its plain call. `"auto"` uses XLA where
            that holds and A's plain call elsewhere, quietly; True raises a
            `ParameterError` at construction where it does not hold; False
            never compiles A. With `training=True` A runs under XLA only when
            its training call is its inference call (no dropout or noise, no
            statistics to update: checked on the same probe), because the
            compiled call runs in inference mode and its gradient recomputes
            it there; elsewhere A's plain call keeps dropout's randomness
            exactly as Keras draws it. `a_compiled` and
            `a_compiled_in_training` say which was chosen. The same switch
            runs the loop over B whole under XLA in forward runs where it
            compiles and equals the plain loop (checked once on a probe;
            True raises where it does not compile); `loop_compiled` and
            `loop_compile_problem` say which ran. Gradients, teacher forcing
            and `reset` with given steps through a known cell keep the
            plain loop.
        run_eagerly: False (default): called eagerly, the cascade runs in a
            cached `tf.function`, traced once per `training` value and input
            dtype for every batch size and steps. True keeps every call eager,
            for debugging (as Keras' `compile(run_eagerly=True)`), and then A
            is not compiled either. Inside a caller's `tf.function` the
            cascade is traced into it either way. Under a persistent tape or
            nested tapes, the compiled call's gradient runs it again (exact:
            seed generators and moving statistics are put back), rather than
            have TensorFlow prepare second-order gradients of the whole loop.
        feedback: B is in feedback form, `[x (batch, H), y_prev (batch, O),
            *states] -> [y (batch, O), *states]`: at inner step `j > 0` it is
            fed the sampler's value of its own output at `j - 1` (or, with
            `targets`, the target at `j - 1`: teacher forcing); with a gate
            stop rule, its last column, the stop logit, is fed as 0.
        feedback_start: what `y_prev` is at inner step 0: `"zeros"`,
            `"token:ID"` (the one-hot of ID, ID in [0, O)) or `"previous"`
            (from the same sample's previous outer step that ran: its last
            target with `targets`, else the sampler's value of the last output
            B computed for it, the stop step included; zeros before the
            first). Without targets, `"previous"` walks each sample's pairs in
            order even in `reset` mode (B's state still restarts at every pair).
        sampler: a `Sampler` or one of `SAMPLERS` (its defaults): what is fed
            back (`identity`: y itself; `greedy`, `categorical`: a token's
            one-hot). With `greedy` or `categorical` a token stop rule compares
            the sampled token, and `run(..., return_tokens=True)` returns the
            sampled ids. Works without feedback too (tokens and stopping only).
        seed: an integer in [0, 2**32): the draws (`categorical`, scheduled
            sampling) of row (sample n, outer t, inner j) depend only on
            (seed, `sample_index[n]`, t, j), never on the batch or on which
            rows stopped (`cascade_cli.run.sampling`).

    Raises:
        ParameterError: a setting has a value it cannot take.
        ModelError: the models do not fit together, or `state_init="ir"` with
            a state size other than H.

    Example:

    >>> cascade = Cascade(model_a, model_b)
    >>> out = cascade(inputs, [3, 0, 2])   # tf.RaggedTensor (N, 3, None, O)
    """

    def __init__(
        self,
        model_a,
        model_b,
        *,
        state=RUNNER_DEFAULTS["state"],
        state_init=RUNNER_DEFAULTS["state_init"],
        max_steps=RUNNER_DEFAULTS["max_steps"],
        stop_rule=RUNNER_DEFAULTS["stop_rule"],
        exclude_stop_step=RUNNER_DEFAULTS["exclude_stop_step"],
        min_steps=RUNNER_DEFAULTS["min_steps"],
        fast_cells=RUNNER_DEFAULTS["fast_cells"],
        jit_compile=RUNNER_DEFAULTS["jit_compile"],
        run_eagerly=RUNNER_DEFAULTS["run_eagerly"],
        feedback=RUNNER_DEFAULTS["feedback"],
        feedback_start=RUNNER_DEFAULTS["feedback_start"],
        sampler=RUNNER_DEFAULTS["sampler"],
        seed=RUNNER_DEFAULTS["seed"],
    ):
        for parameter, model in (("model_a", model_a), ("model_b", model_b)):  # before anything reads them
            if not isinstance(model, keras.Model):
                hint = "; load it with keras.saving.load_model" if isinstance(model, (str, os.PathLike)) else ""
                raise ParameterError(parameter, f"expected a keras.Model, received {received(model)}{hint}.")
        checked = check_runner_settings(dict(  # each setting's own check, and those that go without the models
            state=state, state_init=state_init, max_steps=max_steps, stop_rule=stop_rule,
            exclude_stop_step=exclude_stop_step, min_steps=min_steps, fast_cells=fast_cells, jit_compile=jit_compile,
            run_eagerly=run_eagerly, feedback=feedback, feedback_start=feedback_start, sampler=sampler, seed=seed))
        max_steps, min_steps = checked["max_steps"], checked["min_steps"]
        self.model_a = model_a
        self.model_b = model_b
        self.sampler = checked["sampler"]
        self.seed = checked["seed"]
        self._start = parse_feedback_start(feedback_start)
        self.feedback = feedback
        self.feedback_start = feedback_start
        self.a_spec, self.b_spec = check_pair(model_a, model_b, feedback=feedback)
        self._check_feedback_settings()
        self.state = state
        self.state_init = state_init
        if state_init == "ir":
            if self.b_spec.form != "step" or state != "reset":
                raise ParameterError(
                    "state_init",
                    f"'ir' needs a step-form B and state='reset', received a {self.b_spec.form}-form B and "
                    f"state={state!r}.",
                )
            sizes = self.b_spec.state_sizes
            if not sizes or any(size != self.a_spec.ir_size for size in sizes):
                raise ModelError(
                    f"state_init='ir' sets every state of B to the IR vector, so every state size "
                    f"must equal H={self.a_spec.ir_size}; B's state sizes are {list(sizes)}."
                )
        if stop_rule is not None:
            if stop_rule.kind == "gate":
                self._check_gate(stop_rule)
            outside = [i for i in stop_rule.token_ids if i >= self.b_spec.output_size]
            if outside:
                raise ParameterError(
                    "stop_rule",
                    f"stop token {outside[0]} is outside B's outputs: expected an id in "
                    f"[0, {self.b_spec.output_size}), received {stop_rule.stored_value}.",
                )
            if self.b_spec.form == "sequence" and state == "carry":
                raise ParameterError(
                    "stop_rule",
                    "with state='carry' needs a step-form B: a sequence-form B cannot know where the next "
                    "outer step starts before the previous one has stopped.",
                )
        self.max_steps = max_steps
        self.stop_rule = stop_rule
        self.min_steps = min_steps
        self.exclude_stop_step = exclude_stop_step
        self.fast_cells = fast_cells
        self._cells = [
            layer for layer in flatten_layers(model_b) if hasattr(layer, "reset_dropout_mask")
        ]
        self._split = (split_b(model_b, feedback=feedback) if fast_cells is not False and self.b_spec.form == "step"
                       else None)
        if fast_cells is True:  # raise now where it cannot apply (with feedback: where teacher forcing cannot)
            self._known_cell(ir_dtype=model_a.outputs[0].dtype, training=False, teacher_forced=feedback)
        self.jit_compile = jit_compile
        self.run_eagerly = run_eagerly
        self._functions = {}  # (kind, training, dtype, F, plain_a, layout) -> the tf.function of an eager call
        self._concrete = {}  # the same keys -> its one concrete function, which is what is called
        self._outer = None  # ((N, Ta), a ragged tensor with the outer partition of an eager result of that size)
        self._first_shape = None  # the shape of the eager call that makes the first choices (`_probe_shape`)
        compiles = jit_compile is not False and not run_eagerly
        self._xla_a = xla_inference(model_a) if compiles and self.a_spec.form == "plain" else None
        self._xla = None if self._xla_a else _XlaChoice(
            False, False, _STATE_FORM_A if compiles else "jit_compile=False or run_eagerly=True")
        self._loops = {}  # (training, return_tokens) -> the compiled whole loop (`cascade_cli.run.compiled_loop`)
        self._row_quantum = packing.row_quantum(model_b)  # its rows' blocks (a row's bits in any batch)
        self._loop_choice = None if compiles else _LoopChoice(False, "jit_compile=False or run_eagerly=True")
        if self.sampler.kind == "beam":  # beam search runs its own packed loop (`cascade_cli.run.beam`)
            beam.check_settings(self)
            self._loop_choice = _LoopChoice(False, beam.NOT_COMPILED)
        if self.b_spec.form == "sequence":  # known now: no probe to wait for
            self._loop_choice = _LoopChoice(False, "B is in sequence form: it runs in one padded call, not a loop")
        if jit_compile is True:
            if self._xla is None:
                self._choose_xla(shape=None)  # raise now where A cannot compile
            if self._loop_choice is None:
                self._choose_loop(shape=None)  # and where the loop cannot

    # ------------------------------------------------------------ properties

    @property
    def a_compiled(self):
        """Whether model A runs under XLA in inference (`training=False`); None before the first call decides."""
        return None if self._xla is None else self._xla.inference

    @property
    def a_compiled_in_training(self):
        """Whether model A runs under XLA with `training=True`; None before the first call decides."""
        return None if self._xla is None else self._xla.training

    @property
    def a_compile_problem(self):
        """Why model A does not run under XLA in inference (None where it does, or before the first call decides)."""
        return None if self._xla is None or self._xla.inference else self._xla.reason

    @property
    def loop_compiled(self):
        """Whether the packed loop over B runs whole under XLA where it applies; None before the first call decides.

        It applies forward (no tape recording the call), without targets, to a
        step-form B (`loop_compile_problem` says why not where it does not).
        """
        return None if self._loop_choice is None else self._loop_choice.compiled

    @property
    def loop_compile_problem(self):
        """Why the packed loop does not run under XLA (None where it does, or before the first call decides)."""
        return None if self._loop_choice is None else self._loop_choice.reason

    # ------------------------------------------------------------------ public

    def __call__(self, inputs, steps=None, *, training=False, targets=None, sample_index=None,
                 sampling_probability=0.0, return_tokens=False, initial_state=None, return_state=False):
        """Runs the cascade.

        Args:
            inputs: `(N, Ta, F)` float.
            steps: `(Ta,)` or `(N, Ta)` non-negative integers, or None when
                `max_steps` is set.
            training: passed to both models (dropout and the like).
            targets, sample_index, sampling_probability, return_tokens,
                initial_state, return_state: as for `run`.

        Returns:
            A `tf.RaggedTensor` `(N, Ta, None, O)`; with `return_tokens`,
            `(values, tokens)`, `tokens` a `tf.RaggedTensor` `(N, Ta, None)` int64;
            with `return_state`, the `CascadeState` after them.
        """
        inputs, caps = self._checked(inputs, steps)
        extras = self._checked_extras(inputs, caps, steps, targets, sample_index, sampling_probability,
                                      return_tokens)
        if initial_state is not None or return_state is not False:
            parts, state = self._stateful("ragged", inputs, caps, training=training, extras=extras,
                                          initial_state=initial_state, return_state=return_state)
            nested = self._nested(parts, samples=_size(inputs, 0), outer=_size(inputs, 1))
            if not return_state:
                return nested
            return (*nested, state) if isinstance(nested, tuple) else (nested, state)
        if self._compiles(inputs):
            parts = self._call_compiled("ragged", inputs, caps, training=training, extras=extras)
        else:
            parts = self._ragged_parts(inputs, caps, training, extras=extras)
        return self._nested(parts, samples=_size(inputs, 0), outer=_size(inputs, 1))

    def run(self, inputs, steps=None, *, training=False, targets=None, sample_index=None, sampling_probability=0.0,
            return_tokens=False, initial_state=None, return_state=False):
        """Runs the cascade and returns `(values (total, O), lengths (N, Ta) int32)`.

        `values` are in value order: sample, then outer step, then inner step.

        Args:
            inputs: `(N, Ta, F)` float.
            steps: `(Ta,)` or `(N, Ta)` non-negative integers, or None when
                `max_steps` is set.
            training: passed to both models (dropout and the like).
            targets: feedback only: `(sum(steps), O)` in value order (or
                integer token ids `(sum(steps),)`, fed as their one-hot), for
                teacher forcing (given steps, no stop rule): `y_prev` at inner
                step `j > 0` is the target at `j - 1` of the same pair.
            sample_index: `(N,)` non-negative integers, each sample's index in
                the whole input (default `arange(N)`); the draws depend on it,
                not on the sample's place in this batch.
            sampling_probability: with `targets`, scheduled sampling: each row
                at `j > 0` feeds the sampler's value of its own previous output
                instead, with this probability (a seeded draw per row; no
                gradient through the sample). A float in [0, 1] or a scalar
                tensor (a schedule's value per step: no retrace per value).
            return_tokens: also return the sampled ids (sampler `greedy` or
                `categorical`).
            initial_state: a `CascadeState` (from a call with `return_state=True`)
                to continue from: these inputs are the outer steps that follow
                that call's. None starts every state at zeros at outer step 0.
            return_state: also return the `CascadeState` at the end of this
                call. Running `inputs[:, :W]` then `inputs[:, W:]` with the
                state passed gives the values, lengths and tokens of running
                `inputs` whole (A's state is carried where A is in state form;
                a plain A starts from zeros in every call). The state carries
                no gradient (`cascade_cli.run.state`). With a state, a call runs
                the plain packed loop (not the compiled whole loop or the
                known-cell recurrence); it cannot take targets (teacher
                forcing), a beam sampler, or a sequence-form B in `carry` mode.

        Returns:
            `(values, lengths)`, or with `return_tokens` `(values, lengths,
            tokens (total,) int64)`: the sampled id of each value, in value
            order (the values stay B's outputs); with `return_state`, the
            `CascadeState` last.
        """
        inputs, caps = self._checked(inputs, steps)
        extras = self._checked_extras(inputs, caps, steps, targets, sample_index, sampling_probability,
                                      return_tokens)
        if initial_state is not None or return_state is not False:
            result, state = self._stateful("flat", inputs, caps, training=training, extras=extras,
                                           initial_state=initial_state, return_state=return_state)
            return (*result, state) if return_state else result
        if self._compiles(inputs):
            return self._call_compiled("flat", inputs, caps, training=training, extras=extras)
        return self._run(inputs, caps, training, extras=extras)

    # ------------------------------------------------------------- compiling

    def _compiles(self, inputs):
        """Whether this call goes through a cached `tf.function`: an eager call, unless `run_eagerly`."""
        # Ta == 0 runs no model at all, and needs the static shape to know it.
        return not self.run_eagerly and tf.executing_eagerly() and inputs.shape[1] != 0

    def _compiled(self, kind, inputs, *, training, extras=None, loop=True):
        """The concrete function of `_ragged_parts` or `_run`, traced once for any `N`, `Ta` and steps.

        Keyed on `training` (a Python value the trace depends on) and the
        inputs' dtype and `F`; steps always arrive as int32 caps `(N, Ta)`, so
        given steps, shared steps and `max_steps` share one trace. A feedback
        or sampling run (`extras`) also takes `sample_index` and the sampling
        probability as tensors (no retrace per value), and targets where given.
        """
        key = (*self._key(kind, inputs, training=training, plain_a=False, extras=extras), loop)
        if key not in self._functions:
            function, signature = self._traceable(kind, inputs, training=training, plain_a=False, extras=extras,
                                                  loop=loop)
            compiled = tf.function(function, input_signature=signature)
            # Called as a concrete function: a tf.function's own dispatch costs about as much as
            # the whole run at small N.
            self._concrete[key] = compiled.get_concrete_function()
            self._functions[key] = compiled
        return self._concrete[key]

    def _compiled_gradient(self, kind, inputs, *, training, plain_a, extras, values):
        """The concrete function `(*arguments, d_values) -> gradients`: the compiled call run again, differentiated.

        `arguments` are `_compiled`'s; the gradients are those of the
        differentiable arguments (`_differentiable`) then of `self._weights`.
        """
        key = ("gradient", *self._key(kind, inputs, training=training, plain_a=plain_a, extras=extras))
        if key not in self._concrete:
            function, signature = self._traceable(kind, inputs, training=training, plain_a=plain_a, extras=extras)
            watched = _differentiable(extras)

            def gradient(*arguments):
                *arguments, d_values = arguments
                sources = [arguments[i] for i in watched]
                with tf.GradientTape() as tape:
                    tape.watch(sources)
                    result = function(*arguments)[0]
                return tape.gradient(result, [*sources, *self._weights], output_gradients=d_values)

            signature = [*signature, tf.TensorSpec([None, *values.shape[1:]], values.dtype)]
            self._concrete[key] = tf.function(gradient, input_signature=signature).get_concrete_function()
        return self._concrete[key]

    @property
    def _weights(self):
        """A's then B's trainable variables, each once: what a recomputed call's gradient is taken of."""
        return list({id(v): v for v in self.model_a.trainable_variables + self.model_b.trainable_variables}.values())

    @property
    def _side_variables(self):
        """What a call may update besides its outputs: seed generators' states, then non-trainable variables."""
        models = [self.model_a, self.model_b]
        variables = [generator.state for generator in seed_generators(models)]
        variables += [v for model in models for v in model.non_trainable_variables]
        return list({id(v): v for v in variables}.values())

    @staticmethod
    def _key(kind, inputs, *, training, plain_a, extras):
        layout = None if extras is None else (extras.targets is not None, extras.return_tokens, extras.scheduled)
        return kind, training, inputs.dtype, inputs.shape[2], plain_a, layout

    def _traceable(self, kind, inputs, *, training, plain_a, extras, loop=False):
        """`(function, input_signature)`: the Python function `_compiled` traces, and its signature.

        `loop`: whether the trace may run the compiled whole loop (False where a tape records the call).
        """
        body = self._ragged_parts if kind == "ragged" else self._run
        signature = [tf.TensorSpec([None, self.a_spec.outer_steps, inputs.shape[2]], inputs.dtype),
                     tf.TensorSpec([None, None], tf.int32)]
        if extras is None:
            return (lambda inputs, caps: body(inputs, caps, training, plain_a=plain_a, loop=loop)), signature
        signature += [tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.float64)]
        if extras.targets is not None:
            signature.append(tf.TensorSpec([None, self.b_spec.output_size], self._y_dtype))
        return_tokens, scheduled = extras.return_tokens, extras.scheduled

        def function(inputs, caps, sample_index, probability, targets=None):
            feed = _Feed(targets, sample_index, probability, return_tokens, scheduled)
            return body(inputs, caps, training, plain_a=plain_a, extras=feed, loop=loop)

        return function, signature

    def _call_compiled(self, kind, inputs, caps, *, training, extras=None):
        """Calls `_compiled(...)`; a `CascadeError` raised while tracing reaches the caller as itself.

        (TensorFlow would wrap it in a `StagingError`; an eager call raises what the eager path raises.)
        """
        arguments = [inputs, caps]
        if extras is not None:
            arguments += [extras.sample_index, extras.probability]
            if extras.targets is not None:
                arguments.append(extras.targets)
        if self._xla is None or self._loop_choice is None:  # the probes take this call's shape (`_probe_shape`)
            self._first_shape = tuple(inputs.shape)
        with _cascade_errors():
            if tape_may_record():
                weights = [tf.convert_to_tensor(weight) for weight in self._weights]  # the tapes watch them
                if tapes_may_take_higher_order([*arguments, *weights]):
                    return self._recomputed(kind, inputs, arguments, weights, training=training, extras=extras)
            return self._compiled(kind, inputs, training=training, extras=extras,
                                  loop=not tape_may_record())(*arguments)

    def _recomputed(self, kind, inputs, arguments, weights, *, training, extras):
        """The compiled call under a persistent tape or nested tapes, with a gradient that runs it again.

        Recorded as it is, the call would make TensorFlow prepare second-order
        gradients of the whole concrete function, loops and all: nearly a
        minute of graph building at the first call, and 2.3-2.5x the time of
        a one-tape call after (`benchmarks/RESULTS.md`). Instead the call runs unrecorded and the
        tape records one operation whose gradient is a second compiled
        function: the same call again under its own tape. Around it every
        non-trainable variable (seed generators, moving statistics) is put
        back to what the first run started from, so that dropout draws the
        same masks, and then to what it is now, so that nothing is updated
        twice. Where a tape records that gradient (a gradient of a gradient),
        A runs its plain call, which TensorFlow can differentiate twice.
        """
        side = self._side_variables
        started = [variable.numpy() for variable in side]
        watched = _differentiable(extras)

        @tf.custom_gradient
        def call(*sources):
            with stop_recording():  # the plain loop, so that the gradient's run emits the very same rows
                outputs = self._compiled(kind, inputs, training=training, extras=extras, loop=False)(*arguments)

            def gradient(d_values, *_, variables=None):
                d_values = tf.zeros_like(outputs[0]) if d_values is None else d_values
                backward = self._compiled_gradient(kind, inputs, training=training, plain_a=tape_may_record(),
                                                   extras=extras, values=outputs[0])
                now = [variable.numpy() for variable in side]
                for variable, value in zip(side, started):
                    variable.assign(value)
                try:
                    grads = backward(*arguments, d_values)
                finally:
                    for variable, value in zip(side, now):
                        variable.assign(value)
                return list(grads), [None] * len(variables or ())

            return outputs, gradient

        return call(*[arguments[i] for i in watched], *weights)

    def _checked(self, inputs, steps):
        """`(inputs, caps (N, Ta) int32)`: the inputs and steps checked, before any model runs."""
        inputs = self._check_inputs(inputs)
        return inputs, self._check_steps(steps, inputs)

    def _ragged_parts(self, inputs, caps, training, *, plain_a=False, extras=None, loop=None):
        """`(values, row_splits (N * Ta + 1,) int64[, tokens])`: `_run`'s result as the flat parts of `__call__`'s.

        Plain tensors, so that a compiled call returns no composite tensor
        (whose packing costs more than the call itself at small N).
        """
        result = self._run(inputs, caps, training, plain_a=plain_a, extras=extras, loop=loop)
        lengths = tf.reshape(tf.cast(result[1], tf.int64), [-1])
        splits = tf.concat([tf.zeros([1], tf.int64), tf.cumsum(lengths)], 0)
        return (result[0], splits, *result[2:])

    def _nested(self, parts, *, samples, outer):
        """`__call__`'s result from `_ragged_parts`' parts: a `tf.RaggedTensor` `(N, Ta, None, ...)`, or two.

        Where `N` and `Ta` are ints the result has the static shape `(N, Ta,
        None, O)`; eagerly, the outer partition of the last `(N, Ta)` is kept
        and reused (building it costs more eager ops than anything else here).
        """
        if isinstance(samples, int) and isinstance(outer, int) and tf.executing_eagerly():
            if self._outer is None or self._outer[0] != (samples, outer):
                rows = tf.zeros([samples * outer], tf.int64)
                self._outer = ((samples, outer), tf.RaggedTensor.from_uniform_row_length(
                    rows, outer, nrows=samples, validate=False))
            template = self._outer[1]

            def nest(inner):
                return template.with_values(inner)
        else:
            def nest(inner):
                return tf.RaggedTensor.from_uniform_row_length(inner, outer, nrows=samples, validate=False)

        nested = [nest(tf.RaggedTensor.from_row_splits(flat, parts[1], validate=False))
                  for flat in (parts[0], *parts[2:])]
        return tuple(nested) if len(nested) > 1 else nested[0]

    def _run(self, inputs, caps, training, *, plain_a=False, extras=None, loop=None):
        """`run` on checked inputs and caps: A once, then the path for B's form and the state mode.

        `loop`: False keeps the plain loop; True or None (decide here: no tape
        recording) run the compiled whole loop where it applies (`_loop_applies`);
        `"probe"` runs it regardless (`_choose_loop`).
        """
        ir, _ = self._call_a(inputs, training=training, plain_a=plain_a)
        if ir.shape.rank != 3:
            raise ModelError(f"model A returned shape {tuple(ir.shape)}; expected (N, Ta, H).")
        ir_flat = tf.reshape(ir, [-1, self.a_spec.ir_size])
        if self.b_spec.form == "sequence":
            return self._run_sequence(ir_flat, caps, training)
        if self.sampler.kind == "beam" and (extras is None or extras.targets is None):
            return beam.search(self, ir_flat, caps, training=training, return_tokens=extras is not None
                               and extras.return_tokens)
        if loop is None:
            loop = not tape_may_record()
        if loop == "probe" or (loop and self._loop_applies(inputs, training=training, extras=extras)):
            return self._run_compiled_loop(ir_flat, caps, training, extras)
        if extras is not None:
            return self._run_feedback(ir_flat, caps, training, extras)
        split = self._known_cell(ir_dtype=ir.dtype, training=training)
        if split is None:
            step = _Step(lambda x: x, lambda x, states: self._call_b(x, states, training), self.b_spec.output_size)
        else:
            step = _Step(split.project, split.step, split.cell.units, split.backward)
        run = self._run_reset if self.state == "reset" else self._run_carry
        outputs, pairs, order = run(ir_flat, caps, step)  # step-major, each row tagged with its pair
        if split is not None and split.head is not None:
            outputs = split.head(outputs, training=training)
        values = _permute(outputs, order)  # value order: by pair, then step
        return values, self._lengths(caps, pairs)

    def run_a(self, inputs, *, training=False, states=None):
        """`(ir (N, Ta, H), states)`: model A alone on `inputs`, as the cascade runs it (under XLA where chosen).

        An A in state form starts from `states` (zeros where None) and returns
        its states at the end; a plain A starts from zeros and returns `[]`.
        """
        return self._call_a(tf.convert_to_tensor(inputs), training=training, states=states)

    def _call_a(self, inputs, *, training, plain_a=False, states=None):
        """`(ir (N, Ta, H), states)`: model A on `inputs`, under XLA where it was chosen (`_a_under_xla`).

        An A in state form starts from `states` (zeros where None) and returns
        its states at the end; a plain A starts from zeros and returns none.
        """
        if self.a_spec.form == "plain":
            if inputs.shape[1] == 0:  # Keras RNNs cannot run zero steps; there is nothing to emit anyway
                ir = tf.zeros([tf.shape(inputs)[0], 0, self.a_spec.ir_size], inputs.dtype)
            elif not plain_a and self._a_under_xla(inputs, training=training):
                ir = self._xla_a(inputs)
            else:
                ir = self.model_a(inputs, training=training)
            return ir, []
        if states is None:
            states = [tf.zeros([tf.shape(inputs)[0], size], self.model_a.inputs[1 + i].dtype)
                      for i, size in enumerate(self.a_spec.state_sizes)]
        if inputs.shape[1] == 0:
            return tf.zeros([tf.shape(inputs)[0], 0, self.a_spec.ir_size], inputs.dtype), list(states)
        outputs = self.model_a([inputs, *states], training=training)
        return outputs[0], list(outputs[1:])

    # --------------------------------------------------- windows: the state carried

    @property
    def _carries_b(self):
        """Whether a `CascadeState` holds B's states: `carry` mode, step form."""
        return self.state == "carry" and self.b_spec.form == "step"

    @property
    def _carries_previous(self):
        """Whether a `CascadeState` holds each sample's last fed value: feedback starting from the previous pair."""
        return self.feedback and self._start[0] == "previous"

    def _stateful(self, kind, inputs, caps, *, training, extras, initial_state, return_state):
        """`(result, CascadeState)` of a call that takes or returns a state: `run`'s (`kind="flat"`) or the
        flat parts of `__call__`'s (`"ragged"`).

        Every path that takes a state runs the plain packed loop over B
        (`_feedback_loop`), which hands out each sample's last states; called
        eagerly, it runs in a cached `tf.function` as other calls do.
        """
        check_choice("return_state", return_state, (True, False))
        problem = None
        if self.sampler.kind == "beam":
            problem = "sampler='beam' keeps hypotheses, not one state per sample"
        elif extras is not None and extras.targets is not None:
            problem = "targets (teacher forcing) are a training run's; windows in training come with train --window"
        elif self.b_spec.form == "sequence" and self.state == "carry":
            problem = "a sequence-form B in carry mode hands out no state"
        if problem is not None:
            name = "initial_state" if initial_state is not None else "return_state"
            raise ParameterError(name, f"a run cannot carry its state across calls with these settings yet: "
                                       f"{problem}; run the sequence whole instead.")
        if self.fast_cells is True and self.b_spec.form == "step":
            raise ParameterError("fast_cells", "True, but the known-cell path cannot apply: a call that carries its "
                                               "state runs the plain loop, which calls B itself; use "
                                               "fast_cells='auto'.")
        samples = _size(inputs, 0)
        a_states, b_states, previous, offset = self._checked_state(initial_state, inputs)
        if extras is None:
            extras = _Feed(None, tf.range(samples, dtype=tf.int64), tf.constant(0.0, tf.float64), False, False)
        arguments = [inputs, caps, extras.sample_index, extras.probability, offset, *a_states, *b_states,
                     *([] if previous is None else [previous])]
        if self._compiles(inputs):
            if self._xla is None:  # A's probe takes this call's shape (`_probe_shape`)
                self._first_shape = tuple(inputs.shape)
            key = ("state", kind, training, inputs.dtype, inputs.shape[2], extras.return_tokens)
            if key not in self._concrete:
                signature = [tf.TensorSpec([None, self.a_spec.outer_steps, inputs.shape[2]], inputs.dtype),
                             tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int64),
                             tf.TensorSpec([], tf.float64), tf.TensorSpec([], tf.int64),
                             *(tf.TensorSpec([None, *t.shape[1:]], t.dtype) for t in arguments[5:])]
                return_tokens = extras.return_tokens

                def function(inputs, caps, sample_index, probability, offset, *states):
                    feed = _Feed(None, sample_index, probability, return_tokens, False)
                    return self._run_state(kind, inputs, caps, training, feed, offset, states)

                self._concrete[key] = tf.function(function, input_signature=signature).get_concrete_function()
            with _cascade_errors():
                result, state = self._concrete[key](*arguments)
        else:
            result, state = self._run_state(kind, inputs, caps, training, extras, offset, arguments[5:])
        a_out, b_out, previous_out, offset_out = state
        if tf.executing_eagerly():
            offset_out = int(offset_out)
        return tuple(result), CascadeState(tuple(a_out), tuple(b_out), previous_out, offset_out)

    def _run_state(self, kind, inputs, caps, training, feed, offset, states):
        """`(result, (a_states, b_states, previous, offset))`: `_stateful`'s call on checked tensors."""
        states = [tf.stop_gradient(state) for state in states]  # no gradient through the state (truncated)
        n_a, n_b = len(self.a_spec.state_sizes), len(self.b_spec.state_sizes) if self._carries_b else 0
        a_states, b_states = states[:n_a], states[n_a:n_a + n_b]
        previous = states[n_a + n_b] if self._carries_previous else None
        ir, a_out = self._call_a(inputs, training=training, states=a_states)
        ir_flat = tf.reshape(ir, [-1, self.a_spec.ir_size])
        if self.b_spec.form == "sequence":  # reset mode: nothing of B's to carry
            result, b_out, previous_out = self._run_sequence(ir_flat, caps, training), [], None
        else:
            result, b_out, previous_out = self._feedback_loop(ir_flat, caps, training, feed,
                                                              carried=_Carried(b_states, previous, offset))
        if kind == "ragged":
            lengths = tf.reshape(tf.cast(result[1], tf.int64), [-1])
            result = (result[0], tf.concat([tf.zeros([1], tf.int64), tf.cumsum(lengths)], 0), *result[2:])
        outer = tf.cast(tf.shape(inputs)[1], tf.int64)
        state = ([tf.stop_gradient(s) for s in a_out], [tf.stop_gradient(s) for s in b_out],
                 None if previous_out is None else tf.stop_gradient(previous_out), offset + outer)
        return tuple(result), state

    def _checked_state(self, initial_state, inputs):
        """`(a_states, b_states, previous, offset ())` int64: `initial_state` checked against this cascade and
        inputs, or zeros where it is None."""
        samples = _size(inputs, 0)
        n = inputs.shape[0]
        dtype, y_dtype = tf.as_dtype(self.model_a.outputs[0].dtype), self._y_dtype
        b_sizes = tuple(self.b_spec.state_sizes) if self._carries_b else ()
        if initial_state is None:
            a_states = [tf.zeros([samples, size], self.model_a.inputs[1 + i].dtype)
                        for i, size in enumerate(self.a_spec.state_sizes)]
            b_states = [tf.zeros([samples, size], dtype) for size in b_sizes]
            previous = tf.zeros([samples, self.b_spec.output_size], y_dtype) if self._carries_previous else None
            return a_states, b_states, previous, tf.constant(0, tf.int64)
        if not isinstance(initial_state, CascadeState):
            raise ParameterError("initial_state", f"expected a CascadeState (returned by run(..., return_state=True)),"
                                                  f" received {received(initial_state)}.")
        expected = {"a_states": tuple(self.a_spec.state_sizes), "b_states": b_sizes,
                    "previous": (self.b_spec.output_size,) if self._carries_previous else ()}
        found = {"a_states": tuple(initial_state.a_states), "b_states": tuple(initial_state.b_states),
                 "previous": () if initial_state.previous is None else (initial_state.previous,)}
        checked = {}
        for name, sizes in expected.items():
            tensors = [tf.convert_to_tensor(t) for t in found[name]]
            shapes = [tuple(t.shape) for t in tensors]
            if len(tensors) != len(sizes) or any(
                    len(shape) != 2 or shape[1] != size or (n is not None and shape[0] not in (None, n))
                    for shape, size in zip(shapes, sizes)):
                want = ", ".join(f"({n if n is not None else 'N'}, {size})" for size in sizes) or "none"
                raise ParameterError("initial_state", f"does not fit this cascade and inputs: expected {name} "
                                                      f"{want}, received shapes {shapes or 'none'}; pass the state "
                                                      "a call of this cascade returned for the same samples.")
            checked[name] = tensors
        offset = initial_state.offset
        if tf.is_tensor(offset) and not hasattr(offset, "numpy"):
            offset = tf.cast(offset, tf.int64)
        else:
            offset = tf.constant(check_int("initial_state.offset", int(offset) if hasattr(offset, "numpy") else offset,
                                           minimum=0), tf.int64)
        a_states = [tf.cast(t, self.model_a.inputs[1 + i].dtype) for i, t in enumerate(checked["a_states"])]
        b_states = [tf.cast(t, dtype) for t in checked["b_states"]]
        previous = tf.cast(checked["previous"][0], y_dtype) if checked["previous"] else None
        return a_states, b_states, previous, offset

    # ------------------------------------------------------------------- XLA

    def _a_under_xla(self, inputs, *, training):
        """Whether this call runs A under XLA: decided once, on the first call (`_choose_xla`)."""
        if self._xla is None:
            self._choose_xla(shape=inputs.shape)
        return self._xla.inference if training is False else self._xla.training

    def plan_xla(self, *, samples, outer_steps, inner_steps=None):
        """Decides in advance, for a whole job, what runs without XLA because no compile can pay; no probe.

        A job of fewer than `XLA_PAYS_FROM` of A's time steps (`samples` x
        `outer_steps`) runs A's plain call: its XLA probe and compile would
        cost far more than they save. So does the loop over B for fewer than
        `XLA_PAYS_FROM` inner steps (`inner_steps`): it runs the plain loop.
        Larger jobs are left to the first call's probes (`_choose_xla`, and
        the loop's). Decided once: a choice made already (by `jit_compile`,
        `run_eagerly`, B's form, an earlier call or plan) stands. Give it the
        whole job, never a batch or a shard, so that every batch size and
        shard runs alike.

        Args:
            samples: the job's samples, all batches and shards together
                (with K draws per input, N x K).
            outer_steps: `Ta`.
            inner_steps: the inner steps the job may run, all pairs together
                (the sum of their caps: given steps, or `max_steps` each), or
                None to leave the loop to its probe.
        """
        def too_small(steps, what):
            return (f"the job is too small for XLA's compile to pay: {what} = {steps} steps, under "
                    f"{XLA_PAYS_FROM} (no probe)")

        steps = int(samples) * int(outer_steps)
        if self._xla is None and steps < XLA_PAYS_FROM:
            self._xla = _XlaChoice(False, False, too_small(
                steps, f"{samples} samples x {outer_steps} outer steps of A"))
        if self._loop_choice is None and inner_steps is not None and int(inner_steps) < XLA_PAYS_FROM:
            self._loop_choice = _LoopChoice(False, too_small(int(inner_steps), "the inner steps of B"))

    def _probe_shape(self, shape):
        """`(N, Ta, F)` of the probes: the first call's `shape` where it is small, so that what the probes compile
        under XLA serves that call too; else 2 samples of 3 outer steps (A's own Ta where it fixes one)."""
        if shape is None or None in tuple(shape):  # traced: the eager call that traces it knew its shape
            shape = self._first_shape or (None, None, None)
        n, outer, features = shape
        spec = self.a_spec
        n = n if n is not None and 0 < n <= _PROBE_SAMPLES else 2
        outer = spec.outer_steps or (outer if outer is not None and 0 < outer <= _PROBE_OUTER else 3)
        return n, outer, spec.features or features or 1

    def _choose_xla(self, *, shape):
        """Checks once whether A compiles under XLA and equals its plain call; sets `self._xla`.

        Runs eagerly (`tf.init_scope`) on a seeded probe input (`_probe_shape`
        of the first call's input `shape`, None before any call), so the first
        call may be eager or inside a caller's `tf.function` alike. Raises a
        `ParameterError` for `jit_compile=True` where A does not compile.
        """
        shape = self._probe_shape(shape)
        with tf.init_scope():
            problem, training = xla_problem(self.model_a, self._xla_a, shape)
        if problem is not None and self.jit_compile is True:
            raise ParameterError("jit_compile", f"True, but model A cannot run under XLA: {problem}.")
        self._xla = _XlaChoice(problem is None, problem is None and training is None, problem or training)

    # --------------------------------------------------------- the whole loop

    def _loop_applies(self, inputs, *, training, extras):
        """Whether this call runs the compiled whole loop: decided once (`_choose_loop`), then per call.

        Per call it needs no targets (teacher forcing keeps the known-cell
        recurrence and its hand-written gradient) and, in training, a B that
        draws nothing and updates nothing (XLA's random numbers are not
        TensorFlow's).
        """
        if self._loop_choice is not None and not self._loop_choice.compiled:
            return False
        if extras is not None and extras.targets is not None:
            return False
        if (self.state == "reset" and extras is None and self.stop_rule is None
                and self._known_cell(ir_dtype=self.model_a.outputs[0].dtype, training=training) is not None):
            if self._loop_choice is None:
                self._loop_choice = _LoopChoice(False, _RECURRENCE_WINS)
            return False
        if training is not False and (seed_generators([self.model_b]) or self.model_b.non_trainable_variables):
            return False
        if self._loop_choice is None:
            self._choose_loop(shape=inputs.shape)
        return self._loop_choice.compiled

    def _choose_loop(self, *, shape):
        """Checks once whether the whole loop compiles under XLA and equals the plain loop; sets `self._loop_choice`.

        Runs eagerly (`tf.init_scope`) on a seeded probe (`_probe_shape`),
        steps of 0 to 2 (or `min(max_steps, 4)`): short, so that its buckets
        are those of small calls, whose compile it then serves. Each path's
        values, lengths and tokens are compared. Raises a `ParameterError` for
        `jit_compile=True` where it does not hold.
        """
        with tf.init_scope():
            rng = np.random.default_rng(0)
            shape = self._probe_shape(shape)
            probe = tf.constant(rng.normal(size=shape), self.model_a.inputs[0].dtype)
            caps = tf.constant(rng.integers(0, 3, size=shape[:2]) if self.max_steps is None
                               else np.full(shape[:2], min(self.max_steps, 4)), tf.int32)
            extras = None
            if self._general:
                extras = _Feed(None, tf.range(shape[0], dtype=tf.int64), tf.constant(0.0, tf.float64),
                               self.sampler.tokens, False)
            plain = self._run(probe, caps, False, plain_a=True, extras=extras, loop=False)
            try:
                compiled = self._run(probe, caps, False, plain_a=True, extras=extras, loop="probe")
            except Exception as error:  # noqa: BLE001 - XLA raises several error types for ops it cannot compile
                problem = f"it does not compile ({_first_line(error)})"
            else:
                problem = _loop_difference(plain, compiled)
        if problem is not None and self.jit_compile is True:
            raise ParameterError("jit_compile", f"True, but the packed loop over B cannot run under XLA: {problem}.")
        self._loop_choice = _LoopChoice(problem is None, problem)

    def _run_compiled_loop(self, ir_flat, caps, training, extras):
        """The forward run of B as one XLA computation (`cascade_cli.run.compiled_loop`): `_run`'s result.

        Rows walk their sample's pairs in `carry` mode and where feedback
        starts from the previous pair; elsewhere each row is one pair. B is
        called whole at every step: under XLA its one recurrent matmul beat
        the known-cell path's matmul per gate (N=1 carry: 16-20 against 60-70
        ms for the loop alone, 733 steps, the shared 2-core machine).
        """
        if self.state == "carry" and not self._general and self.stop_rule is None:
            return self._run_known_inputs_loop(ir_flat, caps, training)
        walk = self.state == "carry" or (self.feedback and self._start[0] == "previous")
        return_tokens = extras is not None and extras.return_tokens
        key = (training, return_tokens, ir_flat.dtype)
        sample_index = extras.sample_index if extras is not None else tf.range(tf.shape(caps)[0], dtype=tf.int64)
        pairs, *integers = compiled_loop.prepare(caps, sample_index, walk=walk, max_steps=self.max_steps,
                                                 quantum=self._row_quantum)
        if key not in self._loops:
            rule = self.stop_rule
            stop = None if rule is None else (
                lambda y, token: stop_hits(rule, y, token if rule.kind == "token" else None))
            spec = compiled_loop.LoopSpec(
                walk=walk, carry=self.state == "carry", feedback=self.feedback,
                start_previous=self._start[0] == "previous", sampler=self.sampler, stop=stop,
                zero_gate=rule is not None and rule.kind == "gate", exclude_stop_step=self.exclude_stop_step, min_steps=self.min_steps, seed=self.seed,
                return_tokens=return_tokens, width=self.b_spec.output_size, dtype=self._y_dtype,
                state_sizes=tuple(self.b_spec.state_sizes), state_init=self.state_init, quantum=self._row_quantum)
            self._loops[key] = compiled_loop.compile_loop(
                spec, self._b_step(training), self._start_value(),
                table_spec=tf.TensorSpec([None, ir_flat.shape[1]], ir_flat.dtype))
        ys, emitted, tokens = compiled_loop.call(self._loops[key], compiled_loop.pad_table(ir_flat, pairs), *integers)
        values, pairs, tokens = compiled_loop.compact(ys, emitted, tokens if return_tokens else None)
        result = (values, self._lengths(caps, pairs))
        return result + (tokens,) if return_tokens else result

    def _run_known_inputs_loop(self, ir_flat, caps, training):
        """`carry` with given steps under XLA: every row's input is known before the loop (`known_inputs_loop`)."""
        key = ("known", training, ir_flat.dtype)
        if key not in self._loops:
            self._loops[key] = compiled_loop.compile_known_inputs_loop(
                self._b_step(training), state_sizes=tuple(self.b_spec.state_sizes),
                table_spec=tf.TensorSpec([None, ir_flat.shape[1]], ir_flat.dtype))
        pairs, index, totals = compiled_loop.lay_out_steps(caps, quantum=self._row_quantum)
        ys = compiled_loop.call(self._loops[key], compiled_loop.pad_table(ir_flat, pairs), index, totals)
        return compiled_loop.compact_known(ys, totals), caps

    def _b_step(self, training):
        """B's inner step as the compiled loops call it: `(x, y_prev, states) -> (y, new_states)`."""
        return lambda x, y_prev, states: self._call_b(x, states, training, y_prev=y_prev)

    # ------------------------------------------------------------ validation

    @property
    def _general(self):
        """Whether runs go through the feedback loop (`_run_feedback`): feedback, or a sampler other than identity."""
        return self.feedback or self.sampler.kind != "identity"

    @property
    def _y_dtype(self):
        return tf.as_dtype(self.model_b.outputs[0].dtype)

    def _check_feedback_settings(self):
        """The checks of `feedback`, `feedback_start` and `sampler` that need B's spec."""
        kind, token = self._start
        if not self.feedback and kind != "zeros":
            raise ParameterError("feedback_start", f"applies with feedback=True only; received "
                                                   f"feedback_start={self.feedback_start!r} with feedback=False.")
        size = self.b_spec.output_size
        if token is not None and token >= size:
            raise ParameterError("feedback_start", f"token {token} is outside B's outputs: expected token:ID with ID in "
                                                   f"[0, {size}), received {self.feedback_start!r}.")
        if self.sampler.kind != "identity" and self.b_spec.form != "step":
            raise ParameterError("sampler", f"{self.sampler.kind!r} samples every inner step's output and needs a "
                                            "step-form B; received a sequence-form B.")

    def _check_gate(self, rule):
        """A gate needs an output beside the stop logit, and reads B's own output, not a sampled token."""
        size = self.b_spec.output_size
        if size < 2:
            raise ParameterError("stop_rule", f"a stop gate reads B's last output column as the stop logit and needs "
                                              f"at least one other: expected O >= 2, received O={size}.")
        if self.sampler.kind != "identity":
            raise ParameterError("stop_rule", f"a stop gate reads B's own output; the {self.sampler.kind} sampler "
                                              "would pick tokens among the gate column too: use sampler='identity'.")

    def _checked_extras(self, inputs, caps, steps, targets, sample_index, probability, return_tokens):
        """The feedback and sampling arguments of a call, checked: a `_Feed`, or None for a plain run."""
        if (not self._general and targets is None and sample_index is None and return_tokens is False
                and isinstance(probability, float) and probability == 0):
            return None  # the defaults of a plain run: nothing to check (this runs on every eager call)
        check_choice("return_tokens", return_tokens, (True, False))
        if return_tokens and not self.sampler.tokens:
            raise ParameterError("return_tokens", f"needs a sampler that picks tokens (greedy or categorical); "
                                                  f"received sampler={self.sampler.kind!r}.")
        symbolic_p = tf.is_tensor(probability) and not hasattr(probability, "numpy")
        probability_given = tf.is_tensor(probability)  # a tensor may take any value: scheduled sampling runs
        if not symbolic_p:
            probability = check_number("sampling_probability", float(np.asarray(probability))
                                       if tf.is_tensor(probability) or isinstance(probability, np.ndarray)
                                       else probability, minimum=0, maximum=1, expected="a probability in [0, 1]")
        if targets is None:
            if symbolic_p or probability != 0:
                raise ParameterError("sampling_probability", "applies to teacher forcing only: give targets; "
                                                             f"received {probability!r} without targets.")
        else:
            if not self.feedback:
                raise ParameterError("targets", "teacher forcing needs feedback=True (a feedback-form B); "
                                                "received targets with feedback=False.")
            if steps is None or self.stop_rule is not None:
                raise ParameterError("targets", "teacher forcing needs given steps and no stop rule (the targets "
                                                "fix every pair's length); received "
                                                + ("steps=None." if steps is None else f"stop_rule {self.stop_rule}."))
        if not self._general:
            return None
        n = inputs.shape[0]
        if sample_index is None:
            sample_index = tf.range(_size(inputs, 0), dtype=tf.int64)
        elif tf.is_tensor(sample_index) and not hasattr(sample_index, "numpy"):
            if not sample_index.dtype.is_integer or sample_index.shape.rank != 1:
                raise ParameterError("sample_index", f"expected (N,) integers, received a tensor of shape "
                                                     f"{tuple(sample_index.shape)} and dtype {sample_index.dtype.name}.")
            sample_index = tf.cast(sample_index, tf.int64)
            check = tf.debugging.assert_non_negative(sample_index, message="sample_index must be >= 0")
            with tf.control_dependencies([check]):
                sample_index = tf.ensure_shape(tf.identity(sample_index), [n])
        else:
            array = np.asarray(sample_index)
            if (array.dtype.kind not in "iu" or array.shape != (n,) or (array.size and array.min() < 0)):
                raise ParameterError("sample_index", f"expected ({n},) non-negative integers, one per sample, "
                                                     f"received {array.dtype.name} values of shape {array.shape}.")
            sample_index = tf.constant(array.astype(np.int64))
        scheduled = bool(probability_given or probability != 0)
        probability = tf.cast(probability, tf.float64)
        if probability.shape.rank != 0:
            raise ParameterError("sampling_probability", f"expected a scalar, received shape {tuple(probability.shape)}.")
        if targets is not None:
            targets = self._checked_targets(targets, caps)
        return _Feed(targets, sample_index, probability, bool(return_tokens), scheduled)

    def _checked_targets(self, targets, caps):
        """Targets `(sum(steps), O)` in B's output dtype; their row count checked against the steps.

        Integer token ids `(sum(steps),)` (sparse targets) are fed as their one-hot.
        """
        size = self.b_spec.output_size
        targets = tf.convert_to_tensor(targets)
        if targets.dtype.is_integer and targets.shape.rank == 1:
            if hasattr(targets, "numpy"):
                ids = targets.numpy()
                if ids.size and (ids.min() < 0 or ids.max() >= size):
                    raise ParameterError("targets", f"token ids must be in [0, {size}) (B's outputs), received ids "
                                                    f"from {ids.min()} to {ids.max()}.")
            else:
                checks = [tf.debugging.assert_non_negative(targets, message="targets: token ids must be >= 0"),
                          tf.debugging.assert_less(targets, tf.cast(size, targets.dtype),
                                                   message="targets: token ids must be below O")]
                with tf.control_dependencies(checks):
                    targets = tf.identity(targets)
            targets = tf.one_hot(targets, size, dtype=self._y_dtype)
        elif not targets.dtype.is_floating:
            raise ParameterError("targets", f"expected float values of shape (sum(steps), {size}) or integer token "
                                            f"ids of shape (sum(steps),), received dtype {targets.dtype.name} and "
                                            f"shape {tuple(targets.shape)}.")
        targets = tf.cast(targets, self._y_dtype)
        if targets.shape.rank != 2 or targets.shape[1] != size:
            raise ParameterError("targets", f"expected shape (sum(steps), O={size}) in value order, received shape "
                                            f"{tuple(targets.shape)}.")
        total = tf.reduce_sum(caps)
        if hasattr(targets, "numpy") and hasattr(total, "numpy"):
            if int(total) != targets.shape[0]:
                raise ParameterError("targets", f"expected sum(steps)={int(total)} rows (one per emitted value, in "
                                                f"value order), received {targets.shape[0]}.")
            return targets
        check = tf.debugging.assert_equal(tf.shape(targets)[0], total,
                                          message="targets: expected sum(steps) rows, one per emitted value")
        with tf.control_dependencies([check]):
            return tf.identity(targets)

    def _known_cell(self, *, ir_dtype, training, teacher_forced=False):
        """B taken apart (`cells.SplitB`) where the known-cell path applies, else None."""
        if self.fast_cells is False:
            return None
        problem = fast_path_problem(self._split, form=self.b_spec.form, ir_dtype=ir_dtype, stop_rule=self.stop_rule,
                                    training=training, feedback=self.feedback, sampler=self.sampler.kind,
                                    teacher_forced=teacher_forced)
        if problem is None:
            return self._split
        if self.fast_cells is True:
            raise ParameterError("fast_cells", f"True, but the known-cell path cannot apply: {problem}.")
        return None

    def _check_inputs(self, inputs):
        if isinstance(inputs, (tf.RaggedTensor, tf.SparseTensor)):
            raise ParameterError("inputs", f"expected a dense array (N, Ta, F), received a {type(inputs).__name__}; "
                                           "pad it to one Ta first (e.g. inputs.to_tensor()).")
        if inputs is None:
            raise ParameterError("inputs", "expected a float array (N, Ta, F), received None.")
        try:
            inputs = tf.convert_to_tensor(inputs)
        except (ValueError, TypeError) as error:  # rows of different lengths, objects
            raise ParameterError("inputs", f"expected a float array (N, Ta, F) of one shape, received a "
                                           f"{type(inputs).__name__} that is not one "
                                           f"({str(error).splitlines()[0][:120]}).") from None
        if not (inputs.dtype.is_floating or inputs.dtype.is_integer or inputs.dtype == tf.bool):
            raise ParameterError("inputs", f"expected a float array (N, Ta, F), received dtype {inputs.dtype.name}.")
        if not inputs.dtype.is_floating:
            inputs = tf.cast(inputs, tf.float32)
        check_inputs_fit(self.a_spec, inputs.shape)
        return inputs

    def _check_steps(self, steps, inputs):
        """Returns the per-pair caps `(N, Ta)` int32: the steps, or `max_steps` where none are given.

        Eagerly (every size known) this is numpy and one `tf.constant`: it runs on every eager call.
        """
        n, ta = inputs.shape[0], inputs.shape[1]
        size = [_size(inputs, 0), _size(inputs, 1)]
        if steps is None:
            if self.max_steps is None:
                raise ParameterError("steps", "required unless max_steps is set; received steps=None.")
            return tf.fill(size, tf.constant(self.max_steps, tf.int32))
        if tf.is_tensor(steps) and not hasattr(steps, "numpy"):
            steps = self._check_symbolic_steps(steps)
        else:
            steps = check_steps(steps, n_samples=n, outer_steps=ta, max_steps=self.max_steps)
            total = int(steps.sum()) * (n if steps.ndim == 1 and n is not None else 1)
            if steps.size and (steps.max() > STEPS_MAX or total > STEPS_MAX):
                what = f"a step of {int(steps.max())}" if steps.max() > STEPS_MAX else f"{total} in all"
                raise ParameterError("steps", f"the runner counts inner steps in int32: expected at most "
                                              f"{STEPS_MAX} (2**31 - 2) per pair and per call, received {what}.")
            if steps.ndim == 1 and n is not None:
                steps = np.broadcast_to(steps, (n, steps.shape[0]))
            steps = tf.constant(np.ascontiguousarray(steps, dtype=np.int32))
            if steps.shape.rank == 2 and n is not None and ta is not None:
                return steps
        if steps.shape.rank == 1:
            steps = tf.broadcast_to(steps[None, :], size)
        return tf.ensure_shape(steps, [n, ta])

    def _check_symbolic_steps(self, steps):
        if not steps.dtype.is_integer:
            raise DataError(f"steps must be integers; received a tensor of dtype {steps.dtype.name}.")
        if steps.shape.rank not in (1, 2):
            raise DataError(f"steps must have shape (Ta,) or (N, Ta); received shape {tuple(steps.shape)}.")
        steps = tf.cast(steps, tf.int32)
        checks = [tf.debugging.assert_non_negative(steps, message="steps must be >= 0")]
        if self.max_steps is not None:
            checks.append(tf.debugging.assert_less_equal(steps, self.max_steps, message="steps above max_steps"))
        with tf.control_dependencies(checks):
            return tf.identity(steps)

    # ------------------------------------------------------- steps and rows

    def _call_b(self, x, states, training, *, y_prev=None):
        """One inner step of a step-form B: `(y, new_states)`; a feedback-form B is fed `y_prev` too."""
        for cell in self._cells:  # a cell outside keras.layers.RNN caches masks sized for one batch
            cell.reset_dropout_mask()
            if hasattr(cell, "reset_recurrent_dropout_mask"):
                cell.reset_recurrent_dropout_mask()
        if y_prev is not None:
            outputs = self.model_b([x, y_prev, *states], training=training)
            if not isinstance(outputs, (list, tuple)):
                return outputs, []
            return outputs[0], list(outputs[1:])
        if states:
            outputs = self.model_b([x, *states], training=training)
            return outputs[0], list(outputs[1:])
        outputs = self.model_b(x, training=training)
        if isinstance(outputs, (list, tuple)):
            outputs = outputs[0]
        return outputs, []

    def _initial_states(self, x):
        if self.state_init == "ir":
            return [tf.identity(x) for _ in self.b_spec.state_sizes]
        rows = tf.shape(x)[0]
        return [tf.zeros([rows, size], x.dtype) for size in self.b_spec.state_sizes]

    def _stop(self, y):
        """`(hit, emit)` for the rows of `y`."""
        hit = stop_hits(self.stop_rule, y)
        return hit, (tf.logical_not(hit) if self.exclude_stop_step else None)

    def _held(self, inner):
        """`(rows,)` bools: the rows at inner steps `inner` that `min_steps` keeps from stopping, or None."""
        return inner + 1 < self.min_steps if self.min_steps > 1 else None

    def _loop(self, step, body, rows, states, *, counts=None, held=None):
        return packed_loop(step.call, body, rows=rows, states=states, output_size=step.width,
                           dtype=self.model_b.outputs[0].dtype, counts=counts,
                           stop=None if self.stop_rule is None else self._stop,
                           held=held if self.min_steps > 1 else None)

    def _lengths(self, caps, pairs):
        if self.stop_rule is None:
            return caps
        counts = tf.math.bincount(pairs, minlength=tf.size(caps), maxlength=tf.size(caps), dtype=tf.int32)
        return tf.reshape(counts, tf.shape(caps))

    # ------------------------------------------------------------- the paths

    def _run_reset(self, ir_flat, caps, step):
        """Rows are `(n, t)` pairs, each fed its own IR vector from a fresh state."""

        def body(j, rows):
            pair_ids, x, row_caps = rows

            def finish(y, hit):
                keep = j + 1 < row_caps
                if hit is not None:
                    keep = tf.logical_and(keep, tf.logical_not(hit))
                return pair_ids, keep, rows

            return x, finish

        if self.stop_rule is not None:
            pair_ids, row_caps = packing.reset_rows(caps)
            ir_rows = tf.gather(ir_flat, pair_ids)
            rows = (pair_ids, step.project(ir_rows), row_caps)
            held = lambda j, rows: tf.fill(tf.shape(rows[0]), j + 1 < self.min_steps)  # noqa: E731
            outputs, pairs = self._loop(step, body, rows, self._initial_states(ir_rows), held=held)
            return outputs, pairs, tf.argsort(pairs, stable=True)
        plan = packing.reset_plan(caps)
        ir_rows = tf.gather(ir_flat, plan.pair_ids)
        states = self._initial_states(ir_rows)
        if step.backward is not None:  # each row's input is the same at every step: read a prefix of it
            outputs = packed_recurrence(step.backward, step.backward.project(ir_rows), counts=plan.counts,
                                        initial_states=states, prefix=True)[0]
        else:
            rows = (plan.pair_ids, step.project(ir_rows), plan.row_caps)
            outputs, _ = self._loop(step, body, rows, states, counts=plan.counts)
        return outputs, plan.step_pairs, plan.value_order

    def _run_carry(self, ir_flat, caps, step):
        """Rows are samples; each walks its pairs in order, carrying B's state across them."""
        if self.stop_rule is None:
            return self._run_carry_given(ir_flat, caps, step)
        outer = tf.shape(caps)[1]
        caps_flat = tf.reshape(caps, [-1])
        running_pairs = tf.cast(tf.where(caps_flat > 0)[:, 0], tf.int32)  # ascending
        features = step.project(ir_flat)
        samples = packing.carry_rows(caps)

        def body(j, rows):
            samples, pair_ids, inner = rows
            x = tf.gather(features, pair_ids)

            def finish(y, hit):
                done = tf.logical_or(inner + 1 >= tf.gather(caps_flat, pair_ids), hit)
                following = packing.next_running_pair(running_pairs, pair_ids + 1, samples=samples, outer=outer)
                keep = tf.logical_or(tf.logical_not(done), following >= 0)
                return pair_ids, keep, (samples, tf.where(done, following, pair_ids), tf.where(done, 0, inner + 1))

            return x, finish

        rows = (samples, packing.next_running_pair(running_pairs, samples * outer, samples=samples, outer=outer),
                tf.zeros_like(samples))
        states = [tf.zeros([tf.size(samples), size], ir_flat.dtype) for size in self.b_spec.state_sizes]
        outputs, pairs = self._loop(step, body, rows, states, held=lambda j, rows: self._held(rows[2]))
        return outputs, pairs, tf.argsort(pairs, stable=True)

    def _run_carry_given(self, ir_flat, caps, step):
        """`carry` with given steps: every row's input at every step is known before the loop.

        The inputs are laid out step-major once (step `j` holds the `counts[j]`
        samples still running, longest first) and read from a `TensorArray`; a
        gather from a captured tensor inside the loop would make its gradient
        dense at every step.
        """
        plan = packing.carry_plan(caps)
        counts, pairs = plan.counts, plan.step_pairs
        states = [tf.zeros([counts[0], size], ir_flat.dtype) for size in self.b_spec.state_sizes]
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

        def body(j, rows):
            return inputs.read(j), lambda y, hit: (pair_blocks.read(j), None, rows)

        outputs, _ = self._loop(step, body, (plan.samples,), states, counts=counts)
        return outputs, pairs, plan.value_order

    def _run_feedback(self, ir_flat, caps, training, feed):
        """The feedback and sampling loop: B is called at every inner step on the rows still running.

        Rows are `(n, t)` pairs in `reset` mode, or samples walking their
        pairs in order (`carry`, and `reset` with `feedback_start="previous"`
        without targets, where a pair's start depends on the previous pair's
        last output; B's state restarts at every pair in `reset` mode). A row
        leaves the work once it has no step left (or met the stop rule).

        Teacher forcing through a known cell runs `_run_teacher_forced`
        instead; with a sampling probability given as a tensor, a `tf.cond`
        takes it where the probability is 0 and this loop elsewhere.

        Returns:
            `(values, lengths)`, plus `tokens (total,)` int64 with `feed.return_tokens`.
        """
        teacher = feed.targets is not None
        if self.feedback:
            split = self._known_cell(ir_dtype=ir_flat.dtype, training=training,
                                     teacher_forced=teacher and not feed.return_tokens)
            if split is not None:
                if not feed.scheduled:
                    return self._run_teacher_forced(ir_flat, caps, training, feed, split)
                return tf.cond(feed.probability > 0, lambda: self._feedback_loop(ir_flat, caps, training, feed),
                               lambda: self._run_teacher_forced(ir_flat, caps, training, feed, split))
        return self._feedback_loop(ir_flat, caps, training, feed)

    def _feedback_loop(self, ir_flat, caps, training, feed, carried=None):
        """`_run_feedback`'s loop, which calls B itself at every inner step.

        `carried`: a `_Carried` to start from (a call that carries its state,
        `_run_state`); then it returns `(result, b_states, previous)`, each
        sample's states and last fed value after its last inner step.
        """
        size, dtype = self.b_spec.output_size, self._y_dtype
        outer = tf.shape(caps)[1]
        offset = 0 if carried is None else tf.cast(carried.offset, tf.int32)  # the outer index of pair % outer
        caps_flat = tf.reshape(caps, [-1])
        start_kind, start = self._start[0], self._start_value()
        teacher = feed.targets is not None
        walk = self.state == "carry" or (self.feedback and start_kind == "previous" and not teacher)
        sampler, rule = self.sampler, self.stop_rule
        if teacher:
            value_start, padded, has_previous = self._teacher_table(caps, feed.targets, start)

        def fed_back(pair, inner, previous):
            """`y_prev` of each row."""
            if not teacher:
                return previous
            read = tf.logical_or(inner > 0, tf.gather(has_previous, pair))
            target = tf.gather(padded, tf.where(read, tf.gather(value_start, pair) + inner, 0))
            u = sampling.row_uniforms(self.seed, _sample_of(pair), pair % outer + offset, inner,
                                      sampling.SCHEDULED_STREAM)
            own = tf.logical_and(inner > 0, u < feed.probability)  # scheduled sampling: the row's own sample
            return tf.where(own[:, None], tf.stop_gradient(previous), target)

        def _sample_of(pair):
            return tf.gather(feed.sample_index, pair // outer)

        def initial_states(pair):
            return self._initial_states(tf.gather(ir_flat, pair))

        def decide(x, y_prev, states, u):
            """B's step, the sampler and the stop rule: `(y, states, fed, token, hit)` of each row."""
            y, new_states = self._call_b(x, states, training, y_prev=y_prev)
            fed, token = sampling.sample(sampler, y, u)
            if rule is not None and rule.kind == "gate":  # fed its values and a 0 gate, as training feeds it
                fed = compiled_loop.without_gate(fed)
            hit = None if rule is None else stop_hits(rule, y, token if rule.kind == "token" else None)
            return y, new_states, fed, token, hit

        def iterate(j, rows, states, ys, pairs, tokens, finals):
            pair, inner, previous = rows[-3:]
            x = tf.gather(ir_flat, pair)
            y_prev = fed_back(pair, inner, previous) if self.feedback else None
            u = (sampling.row_uniforms(self.seed, _sample_of(pair), pair % outer + offset, inner,
                                       sampling.CATEGORICAL_STREAM) if sampler.draws else None)
            # whole blocks make a row's values independent of the batch; not in training, where the padded
            # rows would change the shape, hence the draws, of B's dropout masks
            y, new_states, fed, token, hit = (decide if training else packing.on_whole_blocks(decide))(
                x, y_prev, states, u)
            if rule is not None and self.min_steps > 1:
                hit = tf.logical_and(hit, tf.logical_not(self._held(inner)))
            emitted = [y, pair] + ([token] if feed.return_tokens else [])
            if hit is not None and self.exclude_stop_step:
                emitted = [tf.boolean_mask(t, tf.logical_not(hit)) for t in emitted]
            ys, pairs = ys.write(j, emitted[0]), pairs.write(j, emitted[1])
            if feed.return_tokens:
                tokens = tokens.write(j, emitted[2])
            done = inner + 1 >= tf.gather(caps_flat, pair)
            if hit is not None:
                done = tf.logical_or(done, hit)
            if walk:
                samples = rows[0]
                following = packing.next_running_pair(running_pairs, pair + 1, samples=samples, outer=outer)
                keep = tf.logical_or(tf.logical_not(done), following >= 0)
                next_pair = tf.where(done, following, pair)
                if finals:  # the rows that leave hand out their sample's last states and fed value
                    leaving = tf.logical_not(keep)
                    where = tf.boolean_mask(samples, leaving)[:, None]
                    last = ([*new_states] if carry_b else []) + ([fed] if carry_previous else [])
                    finals = tuple(tf.tensor_scatter_nd_update(final, where, tf.boolean_mask(value, leaving))
                                   for final, value in zip(finals, last))
                if self.state == "reset":
                    fresh = initial_states(tf.maximum(next_pair, 0))
                    new_states = [tf.where(done[:, None], f, s) for f, s in zip(fresh, new_states)]
                if self.feedback and not teacher and start_kind != "previous":
                    fed = tf.where(done[:, None], tf.broadcast_to(start, tf.shape(fed)), fed)
                rows = (samples, next_pair, tf.where(done, 0, inner + 1), fed)
            else:
                keep = tf.logical_not(done)
                rows = (pair, inner + 1, fed)
            rows = tuple(tf.boolean_mask(r, keep) for r in rows)
            new_states = [tf.boolean_mask(s, keep) for s in new_states]
            return j + 1, rows, new_states, ys, pairs, tokens, finals

        if walk:
            running_pairs = tf.cast(tf.where(caps_flat > 0)[:, 0], tf.int32)  # ascending
            samples = packing.carry_rows(caps)
            pair = packing.next_running_pair(running_pairs, samples * outer, samples=samples, outer=outer)
            rows = (samples, pair)
            if self.state == "reset":
                states = initial_states(pair)
            elif carried is not None:
                states = [tf.gather(state, samples) for state in carried.b_states]
            else:
                states = [tf.zeros([tf.size(samples), s], ir_flat.dtype) for s in self.b_spec.state_sizes]
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
        carry_b = walk and carried is not None and self.state == "carry"
        carry_previous = walk and carried is not None and carried.previous is not None
        finals = tuple(carried.b_states if carry_b else []) + ((carried.previous,) if carry_previous else ())

        def array(dtype, shape):
            return tf.TensorArray(dtype, size=0, dynamic_size=True, infer_shape=False,
                                  element_shape=tf.TensorShape(shape))

        ys, pairs, tokens = array(dtype, [None, size]), array(tf.int32, [None]), array(tf.int64, [None])
        invariants = (
            tf.TensorShape([]),
            tuple(tf.TensorShape([None]).concatenate(r.shape[1:]) for r in rows),
            [tf.TensorShape([None]).concatenate(s.shape[1:]) for s in states],
            tf.TensorShape(None), tf.TensorShape(None), tf.TensorShape(None),
            tuple(tf.TensorShape([None]).concatenate(f.shape[1:]) for f in finals),
        )
        j, _, _, ys, pairs, tokens, finals = tf.while_loop(
            lambda j, rows, *_: tf.size(rows[0]) > 0, iterate,
            (tf.constant(0), rows, list(states), ys, pairs, tokens, finals), shape_invariants=invariants)
        # A sentinel keeps concat() defined when nothing ran.
        outputs = ys.write(j, tf.zeros([0, size], dtype)).concat()
        pairs = pairs.write(j, tf.zeros([0], tf.int32)).concat()
        order = tf.argsort(pairs, stable=True)  # value order: by pair, then step
        result = (_permute(outputs, order), self._lengths(caps, pairs))
        if feed.return_tokens:
            result += (tf.gather(tokens.write(j, tf.zeros([0], tf.int64)).concat(), order),)
        if carried is None:
            return result
        finals = list(finals)
        b_out = [finals.pop(0) for _ in self.b_spec.state_sizes] if carry_b else list(carried.b_states)
        return result, b_out, (finals[0] if carry_previous else carried.previous)

    def _start_value(self):
        """`(O,)` in B's output dtype: `y_prev` at inner step 0 for `feedback_start` zeros or token:ID."""
        kind, token = self._start
        size, dtype = self.b_spec.output_size, self._y_dtype
        return tf.one_hot(token, size, dtype=dtype) if kind == "token" else tf.zeros([size], dtype)

    def _teacher_table(self, caps, targets, start):
        """`(value_start, padded, has_previous)`: where teacher forcing reads each row's `y_prev`.

        `padded[value_start[p] + j]` is pair `p`'s target `j - 1`; `padded[0]`
        is the start value, read at `j == 0` except where `has_previous[p]`
        (`feedback_start="previous"` after the sample's first running pair):
        there `padded[value_start[p]]` is the value just before the pair's
        first, the previous running pair's last target.
        """
        outer = tf.shape(caps)[1]
        caps_flat = tf.reshape(caps, [-1])
        value_start = tf.cumsum(caps_flat, exclusive=True)
        previous = self._start[0] == "previous"
        padded = tf.concat([(tf.zeros_like(start) if previous else start)[None], targets], 0)
        if previous:
            sample_start = tf.cumsum(tf.reduce_sum(caps, axis=1), exclusive=True)
            has_previous = value_start > tf.gather(sample_start, tf.range(tf.size(caps_flat)) // outer)
        else:
            has_previous = tf.zeros_like(caps_flat, tf.bool)
        return value_start, padded, has_previous

    def _run_teacher_forced(self, ir_flat, caps, training, feed, split):
        """Teacher forcing through a known cell: every row's input at every step is known before the loop.

        Each step-major row's input is `[IR of its pair, its y_prev]` (the
        target before it, or the start), projected for all rows in one matmul;
        `packed_recurrence` runs the cell with its hand-written gradient and
        the head runs once on every row after the loop.
        """
        value_start, padded, has_previous = self._teacher_table(caps, feed.targets, self._start_value())
        reset = self.state == "reset"
        plan = packing.reset_plan(caps) if reset else packing.carry_plan(caps)
        pairs = plan.step_pairs
        positions = tf.math.invert_permutation(plan.value_order)  # the value each step-major row emits
        inner = positions - tf.gather(value_start, pairs)
        read = tf.logical_or(inner > 0, tf.gather(has_previous, pairs))
        y_prev = tf.gather(padded, tf.where(read, positions, 0))
        features = tf.concat([tf.gather(ir_flat, pairs), tf.cast(y_prev, ir_flat.dtype)], axis=1)
        inputs = split.backward.project(features)
        if reset:
            states = self._initial_states(tf.gather(ir_flat, plan.pair_ids))
        else:
            states = [tf.zeros([plan.counts[0], s], ir_flat.dtype) for s in self.b_spec.state_sizes]
        outputs = packed_recurrence(split.backward, inputs, counts=plan.counts, initial_states=states)[0]
        if split.head is not None:
            outputs = split.head(outputs, training=training)
        return _permute(outputs, plan.value_order), caps

    def _run_sequence(self, ir_flat, caps, training):
        """A sequence-form B gets every row's repeated input in one padded call, then is cropped."""
        caps_flat = tf.reshape(caps, [-1])
        if self.state == "reset":
            pair_ids = tf.cast(tf.where(caps_flat > 0)[:, 0], tf.int32)
            row_caps = tf.gather(caps_flat, pair_ids)
            length = tf.maximum(tf.reduce_max(tf.concat([row_caps, [0]], 0)), 1)
            x = tf.tile(tf.gather(ir_flat, pair_ids)[:, None, :], [1, length, 1])
            y = self.model_b(x, training=training)
            valid = tf.range(length)[None, :] < row_caps[:, None]
            if self.stop_rule is not None:
                hit = tf.logical_and(tf.reshape(stop_hits(self.stop_rule, tf.reshape(y, [-1, y.shape[-1]])),
                                                tf.shape(valid)), valid)
                if self.min_steps > 1:
                    hit = tf.logical_and(hit, tf.range(length)[None, :] + 1 >= self.min_steps)
                first_hit = tf.where(tf.reduce_any(hit, axis=1), tf.argmax(tf.cast(hit, tf.int32), axis=1,
                                                                          output_type=tf.int32), length)
                emitted = tf.minimum(row_caps, first_hit + (0 if self.exclude_stop_step else 1))
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
        x = tf.scatter_nd(index, tf.gather(ir_flat, value_pairs), [n, length, self.a_spec.ir_size])
        y = self.model_b(x, training=training)
        return tf.gather_nd(y, index), caps


@contextlib.contextmanager
def _cascade_errors():
    """Raises the `CascadeError` a traced call in the block raised as itself, out of TensorFlow's wrapping
    (`StagingError`); any other error goes on unchanged."""
    try:
        yield
    except Exception as error:
        cause = error
        while cause is not None and not isinstance(cause, CascadeError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or cause is error:
            raise
        raise cause.with_traceback(None) from None


def _differentiable(extras):
    """Where the float tensors are among `_call_compiled`'s arguments (inputs, caps, sample_index, probability,
    targets): the inputs, and the targets where given."""
    return [0, 4] if extras is not None and extras.targets is not None else [0]


def _size(tensor, axis):
    """A dimension of `tensor`: a Python int where it is static, else a scalar int64 tensor."""
    size = tensor.shape[axis]
    return size if size is not None else tf.shape(tensor, out_type=tf.int64)[axis]


@tf.custom_gradient
def _permute(values, permutation):
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


def xla_inference(model):
    """`model(x, training=False)` compiled by XLA, with a gradient that recomputes it under XLA.

    XLA cannot hand the loop intermediates of a compiled RNN to TensorFlow's own
    gradient ("TensorList crossing the XLA/TF boundary"), so the forward call is
    made without recording and the backward pass runs the model again inside
    its own compiled function (exact: inference mode has no randomness).
    """
    forward = tf.function(lambda x: model(x, training=False), jit_compile=True)

    def vjp(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, training=False)
        return tape.gradient(y, [x, *model.trainable_variables], output_gradients=upstream)

    backward = tf.function(vjp, jit_compile=True)

    @tf.custom_gradient
    def call(x):
        with stop_recording():
            y = compiled_loop.call(forward, x)

        def gradient(upstream, variables=None):
            grads = compiled_loop.call(backward, x, upstream)
            by_variable = {id(v.value): g for v, g in zip(model.trainable_variables, grads[1:])}
            return grads[0], [by_variable.get(id(v)) for v in variables or []]

        return y, gradient

    return call


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

# The largest first call whose own shape the probes take (`Cascade._probe_shape`).
_PROBE_SAMPLES = 16
_PROBE_OUTER = 64

# How close A under XLA must come to its plain call, by the dtype of A's outputs.
_XLA_TOLERANCE = {2: 1e-2, 4: 1e-5, 8: 1e-9}


def xla_problem(model, compiled, shape):
    """Checks on a seeded probe input whether `compiled` can stand in for `model`.

    Args:
        model: model A.
        compiled: `xla_inference(model)`.
        shape: the probe's shape `(N, Ta, F)`.

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
        return f"its plain call fails on a probe input of shape {shape} ({_first_line(error)})", None
    try:
        xla = compiled(probe)
    except Exception as error:  # noqa: BLE001 - XLA raises several error types for ops it cannot compile
        return f"it does not compile ({_first_line(error)})", None
    plain, xla = np.asarray(plain), np.asarray(xla)
    tolerance = _XLA_TOLERANCE.get(plain.dtype.itemsize, 1e-5)
    scale = max(1.0, float(np.max(np.abs(plain)))) if plain.size else 1.0
    difference = float(np.max(np.abs(xla.astype(np.float64) - plain))) if plain.size else 0.0
    if not np.isfinite(difference) or difference > tolerance * scale:
        return (f"its compiled values differ from its plain call's by up to {difference:.3g} on a probe input "
                f"(allowed {tolerance * scale:.3g})"), None
    if model.non_trainable_weights:
        return None, "model A has non-trainable weights, which a training call may update (e.g. BatchNormalization)"
    generators = seed_generators([model])
    states = [generator.state.numpy() for generator in generators]
    try:
        draws = [np.asarray(model(probe, training=True)) for _ in range(2)]
    except Exception as error:  # noqa: BLE001
        return None, f"model A's training call fails on a probe input ({_first_line(error)})"
    finally:
        for generator, state in zip(generators, states):
            generator.state.assign(state)
    if any(not np.array_equal(draw, plain) for draw in draws):
        return None, "model A's training call differs from its inference call (dropout or noise)"
    return None, None


def _first_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


@dataclasses.dataclass(frozen=True)
class _XlaChoice:
    """Where A runs under XLA, and why not where it does not."""

    inference: bool
    training: bool
    reason: str | None


_STATE_FORM_A = "model A is in state form, whose calls run without XLA"

_RECURRENCE_WINS = ("reset mode with given steps through a known cell: its packed recurrence runs only the rows "
                    "still running, and measured faster than the masked loop under XLA")


@dataclasses.dataclass(frozen=True)
class _LoopChoice:
    """Whether the packed loop runs whole under XLA, and why not where it does not."""

    compiled: bool
    reason: str | None


def _loop_difference(plain, compiled):
    """Why the compiled loop's result cannot stand in for the plain loop's, or None (`_choose_loop`'s probe)."""
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


@dataclasses.dataclass(frozen=True)
class _Feed:
    """A feedback or sampling call's checked arguments (`Cascade.run`)."""

    targets: object  # (total, O) in B's output dtype, or None
    sample_index: object  # (N,) int64
    probability: object  # () float64, the scheduled sampling probability
    return_tokens: bool
    scheduled: bool = True  # False: the probability is a Python 0, so teacher forcing alone (the known-cell path)


@dataclasses.dataclass(frozen=True)
class _Carried:
    """What a call that carries its state starts from (`Cascade._run_state`), besides A's states."""

    b_states: list  # each (N, size): B's carried states (carry mode), else empty
    previous: object  # (N, O): each sample's last fed value (feedback_start="previous"), else None
    offset: object  # () int64: the absolute outer index of this call's first outer step


@dataclasses.dataclass(frozen=True)
class _Step:
    """One inner step: `project(x)` once per row, then `call(projected, states) -> (out, states)`."""

    project: object
    call: object
    width: int  # the size of `out`
    backward: object = None  # a known cell's `cells.Backward`: given steps run `packed_recurrence`
