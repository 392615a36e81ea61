"""`Cascade`: the packed runner that chains model A and model B: its settings, their checks, the choice of path.

Pure TensorFlow: no I/O, no progress, no training loop. It runs eagerly, inside
`tf.function` and inside a caller's `tf.GradientTape` with the same values.
Called eagerly it compiles itself: the settings are checked eagerly, then the
work runs in a cached `tf.function` traced once for any batch and steps
(`run.compiled`; `run_eagerly=True` keeps it eager, for debugging). Model A
runs under XLA where it compiles and equals its plain call
(`jit_compile="auto"`, checked once on a probe input), and so does the loop
over B in forward runs, whole, as one XLA computation with static shapes
(`run.xla`, `run.compiled_loop`: rows masked, sizes bucketed); elsewhere (a
tape recording the call, teacher forcing, `reset` through a known cell's
packed recurrence) the plain packed loop runs (`run.loop`; the feedback and
sampling loop and teacher forcing: `run.feedback`).

The engine, `cascade_cli.run`, module by module:

- `cascade.py`: `Cascade`, its settings and the choice of path (`_run`).
- `checks.py`: a call's inputs, steps, targets, sampling arguments and state, and the settings that need B.
- `eager.py`: an eager call's checks of types, dtypes and shapes once per signature; its reused constants; the
  README's call repeated, straight to its concrete function.
- `models.py`: A's and B's forms, specs and fit.
- `packing.py`: the plans (which rows run at each inner step, the value order); pure functions.
- `loop.py`: `packed_loop` and the paths over it (`reset`, `carry`, given steps, a sequence-form B).
- `feedback.py`: the feedback and sampling loop, teacher forcing.
- `stopping.py`: stop rules (`stop_hits`, `min_steps`) and their checks.
- `sampling.py`, `beam.py`: the samplers and their counter-based draws; beam search.
- `cells.py`, `recurrence.py`: the known-cell path and its hand-written gradient.
- `compiled.py`: the compiled call's cache, and tapes (the recomputed gradient).
- `xla.py`, `compiled_loop.py`: A under XLA, the loop compiled whole, and the choice of each.
- `fused.py`: a forward call as one XLA computation (A, the plan, the loop, the packing).
- `known.py`: under a tape, A and a loop with known inputs as one XLA computation, differentiated by XLA.
- `carried.py`, `state.py`, `windows.py`: a call that carries its state (`CascadeState`); windows.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from cascade_cli.errors import ModelError, ParameterError, received
from cascade_cli.keras_internals import flatten_layers, tape_may_record
from cascade_cli.options import (RUNNER_DEFAULTS, STATE_INITS, STATE_MODES, Sampler, StopRule, check_runner_settings,
                                 parse_feedback_start)
from cascade_cli.run import beam, carried, checks, compiled, eager, fused, packing, stopping, xla
from cascade_cli.run.cells import fast_path_problem, split_b
from cascade_cli.run.feedback import run_feedback
from cascade_cli.run.loop import Step, call_b, lengths, permute, run_carry, run_reset, run_sequence
from cascade_cli.run.models import check_pair
from cascade_cli.run.state import CascadeState

__all__ = ["Cascade", "CascadeState", "STATE_INITS", "STATE_MODES", "Sampler", "StopRule"]


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
            the loop (`cascade_cli.run.cells`; under XLA by gate, the head at each
            step: `cells.Gated`), and, with given steps and the usual activations,
            takes the loop's gradient by hand (`cascade_cli.run.recurrence`). One predicate
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
        checks.check_feedback_settings(self)
        self.state = state
        self.state_init = state_init
        checks.check_state_init(state_init, state=state, a_spec=self.a_spec, b_spec=self.b_spec)
        if stop_rule is not None:
            stopping.check_stop_rule(stop_rule, b_spec=self.b_spec, sampler=self.sampler, state=state)
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
        self._first_shape = None  # the shape of the eager call that makes the first choices (`xla.probe_shape`)
        self._lane = eager.EagerLane(max_steps)  # the eager call's signatures checked and constants (`run.eager`)
        self._loops = {}  # (training, return_tokens) -> the compiled whole loop (`cascade_cli.run.compiled_loop`)
        self._row_quantum = packing.row_quantum(model_b)  # its rows' blocks (a row's bits in any batch)
        if self.sampler.kind == "beam":  # beam search runs its own packed loop (`cascade_cli.run.beam`)
            beam.check_settings(self)
        xla.first_choices(self)  # A's XLA call; what is known now (raises now for `jit_compile=True`)

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

    @property
    def loop_fused(self):
        """Whether forward calls run A, the plan, the loop over B and the packing as one XLA computation
        (`run.fused`); None before a call decides."""
        return self._loops.get("fused")

    @property
    def gradient_fused(self):
        """Whether calls under a tape whose inputs to B are all known run A and that loop as one XLA computation
        with XLA's own gradient (`run.known.run_known_gradient`); None before such a call decides."""
        return self._loops.get("gradient")

    # The runner is plain graph code (`tf.while_loop`, `tf.cond`): traced without AutoGraph, as Keras' own `fit`
    # traces a model, also from a caller's `tf.function`. AutoGraph's rewriting of the runner's functions was most
    # of a first trace and adds no op.
    @tf.autograph.experimental.do_not_convert
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
        if eager.plain(targets, sample_index, sampling_probability, return_tokens, initial_state, return_state):
            result = self._lane.repeated(self, "ragged", inputs, steps, training)  # the README's call, repeated
            if result is not None:
                return result
        inputs, caps = self._checked(inputs, steps)
        extras = self._extras(inputs, caps, steps, targets, sample_index, sampling_probability, return_tokens)
        if initial_state is not None or return_state is not False:
            parts, state = carried.stateful(self, "ragged", inputs, caps, training=training, extras=extras,
                                            initial_state=initial_state, return_state=return_state)
            nested = self._lane.nested(parts, samples=checks.dim(inputs, 0), outer=checks.dim(inputs, 1))
            if not return_state:
                return nested
            return (*nested, state) if isinstance(nested, tuple) else (nested, state)
        if compiled.compiles(self, inputs):
            parts = compiled.call_compiled(self, "ragged", inputs, caps, training=training, extras=extras)
        else:
            parts = self._ragged_parts(inputs, caps, training, extras=extras)
        return self._lane.nested(parts, samples=checks.dim(inputs, 0), outer=checks.dim(inputs, 1))

    @tf.autograph.experimental.do_not_convert  # as `__call__`
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
        if eager.plain(targets, sample_index, sampling_probability, return_tokens, initial_state, return_state):
            result = self._lane.repeated(self, "flat", inputs, steps, training)
            if result is not None:
                return result
        inputs, caps = self._checked(inputs, steps)
        extras = self._extras(inputs, caps, steps, targets, sample_index, sampling_probability, return_tokens)
        if initial_state is not None or return_state is not False:
            result, state = carried.stateful(self, "flat", inputs, caps, training=training, extras=extras,
                                             initial_state=initial_state, return_state=return_state)
            return (*result, state) if return_state else result
        if compiled.compiles(self, inputs):
            return compiled.call_compiled(self, "flat", inputs, caps, training=training, extras=extras)
        return self._run(inputs, caps, training, extras=extras)

    def get_config(self):
        """The runner settings, `{name: value}`, one per `options.RUNNER_SETTINGS` in its order: what
        `Cascade(model_a, model_b, **cascade.get_config())` takes to run alike."""
        return {name: getattr(self, name) for name in RUNNER_DEFAULTS}

    def plan_xla(self, *, samples, outer_steps, inner_steps=None):
        """Decides in advance, for a whole job, what runs without XLA because no compile can pay; no probe.

        A job of fewer than `XLA_PAYS_FROM` of A's time steps (`samples` x
        `outer_steps`) runs A's plain call: its XLA probe and compile would
        cost far more than they save. So does the loop over B for fewer than
        `XLA_PAYS_FROM` inner steps (`inner_steps`): it runs the plain loop.
        Larger jobs are left to the first call's probes (`choose_xla`, and
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
        xla.plan_xla(self, samples=samples, outer_steps=outer_steps, inner_steps=inner_steps)

    def run_a(self, inputs, *, training=False, states=None):
        """`(ir (N, Ta, H), states)`: model A alone on `inputs`, as the cascade runs it (under XLA where chosen).

        An A in state form starts from `states` (zeros where None) and returns
        its states at the end; a plain A starts from zeros and returns `[]`.
        """
        return self._call_a(tf.convert_to_tensor(inputs), training=training, states=states)

    def _checked(self, inputs, steps):
        """`(inputs, caps (N, Ta) int32)`: the inputs and steps checked, before any model runs (eagerly, the
        type, dtype and shape checks once per signature: `run.eager`)."""
        return self._lane.checked(inputs, steps, self._checked_fully)

    def _checked_fully(self, inputs, steps):
        inputs = checks.checked_inputs(inputs, self.a_spec)
        return inputs, checks.checked_caps(steps, inputs, max_steps=self.max_steps)

    def _extras(self, inputs, caps, steps, targets, sample_index, probability, return_tokens):
        """The feedback and sampling arguments checked (`checks.checked_extras`; eagerly, the defaults' tensors
        reused: `run.eager`)."""
        return self._lane.extras(self, inputs, targets, sample_index, probability, return_tokens, lambda: (
            checks.checked_extras(self, inputs, caps, steps, targets, sample_index, probability, return_tokens)))

    def _run(self, inputs, caps, training, *, plain_a=False, extras=None, loop=None):
        """`run` on checked inputs and caps: A once, then the path for B's form and the state mode.

        `loop`: False keeps the plain loop (under a tape, XLA's gradient where
        `xla.known_gradient` says); `"hand"` the plain loop and its gradient;
        True or None (decide here: no tape recording) run the compiled whole
        loop where it applies (`xla.loop_applies`); `"probe"` runs it
        regardless (`xla.choose_loop`).
        """
        result = fused.run_fused(self, inputs, caps, training, extras=extras, plain_a=plain_a, loop=loop)
        if result is not None:  # A, the plan, the loop over B and the packing as one XLA call
            return result
        ir, _ = self._call_a(inputs, training=training, plain_a=plain_a)
        if ir.shape.rank != 3:
            raise ModelError(f"model A returned shape {tuple(ir.shape)}; expected (N, Ta, H).")
        ir_flat = tf.reshape(ir, [-1, self.a_spec.ir_size])
        if self.b_spec.form == "sequence":
            return run_sequence(self, ir_flat, caps, training)
        if self.sampler.kind == "beam" and (extras is None or extras.targets is None):
            return beam.search(self, ir_flat, caps, training=training, return_tokens=extras is not None
                               and extras.return_tokens)
        if loop is None:
            loop = not tape_may_record()
        if loop == "probe" or (loop is True and xla.loop_applies(self, inputs, training=training, extras=extras)):
            return xla.run_compiled_loop(self, ir_flat, caps, training, extras)
        if extras is not None:
            return run_feedback(self, ir_flat, caps, training, extras)
        split = self._known_cell(ir_dtype=ir.dtype, training=training)
        if split is None:
            step = Step(lambda x: x, lambda x, states: call_b(self, x, states, training), self.b_spec.output_size)
        else:
            step = Step(split.project, split.step, split.cell.units, split.backward)
        run = run_reset if self.state == "reset" else run_carry
        outputs, pairs, order = run(self, ir_flat, caps, step)  # step-major, each row tagged with its pair
        if split is not None and split.head is not None:
            outputs = split.head(outputs, training=training)
        values = permute(outputs, order)  # value order: by pair, then step
        return values, lengths(caps, pairs, self.stop_rule)

    def _ragged_parts(self, inputs, caps, training, *, plain_a=False, extras=None, loop=None):
        """`(values, row_splits (N * Ta + 1,) int64[, tokens])`: `_run`'s result as the flat parts of `__call__`'s.

        Plain tensors, so that a compiled call returns no composite tensor
        (whose packing costs more than the call itself at small N).
        """
        result = self._run(inputs, caps, training, plain_a=plain_a, extras=extras, loop=loop)
        counts = tf.reshape(tf.cast(result[1], tf.int64), [-1])
        splits = tf.concat([tf.zeros([1], tf.int64), tf.cumsum(counts)], 0)
        return (result[0], splits, *result[2:])

    def _call_a(self, inputs, *, training, plain_a=False, states=None):
        """`(ir (N, Ta, H), states)`: model A on `inputs`, under XLA where it was chosen (`xla.a_under_xla`).

        An A in state form starts from `states` (zeros where None) and returns
        its states at the end; a plain A starts from zeros and returns none.
        """
        if self.a_spec.form == "plain":
            if inputs.shape[1] == 0:  # Keras RNNs cannot run zero steps; there is nothing to emit anyway
                ir = tf.zeros([tf.shape(inputs)[0], 0, self.a_spec.ir_size], inputs.dtype)
            elif not plain_a and xla.a_under_xla(self, inputs, training=training):
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

    @property
    def _general(self):
        """Whether runs go through the feedback loop (`run_feedback`): feedback, or a sampler other than identity."""
        return self.feedback or self.sampler.kind != "identity"

    @property
    def _y_dtype(self):
        return tf.as_dtype(self.model_b.outputs[0].dtype)

    def _b_step(self, training):
        """B's inner step as the compiled loops call it: `(x, y_prev, states) -> (y, new_states)`."""
        return lambda x, y_prev, states: call_b(self, x, states, training, y_prev=y_prev)
