"""The compiled call: the cache of traced functions an eager call runs, and how tapes see them.

Called eagerly, a cascade checks its settings eagerly, then runs the work in a
cached `tf.function` traced once for any batch and steps (`concrete`; its key
is `cache_key`), called as its one concrete function: a `tf.function`'s own
dispatch costs about as much as the whole run at small N. Under one tape the
concrete function is differentiated as TensorFlow records it; under a
persistent tape or nested tapes the call is recorded as one operation whose
gradient runs it again (`recomputed`), exact: seed generators and moving
statistics are put back around the second run. `cascade_errors` lets a
`CascadeError` raised while tracing reach the caller as itself.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from cascade_cli.errors import CascadeError
from cascade_cli.keras_internals import (call_flat, seed_generators, stop_recording, tape_may_record,
                                         tapes_may_take_higher_order)
from cascade_cli.run import feedback, xla


@contextlib.contextmanager
def cascade_errors():
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


def compiles(cascade, inputs):
    """Whether this call goes through a cached `tf.function`: an eager call, unless `run_eagerly`."""
    # Ta == 0 runs no model at all, and needs the static shape to know it.
    return not cascade.run_eagerly and tf.executing_eagerly() and inputs.shape[1] != 0


def concrete(cascade, kind, inputs, *, training, extras=None, loop=True):
    """The concrete function of `Cascade._ragged_parts` or `Cascade._run`, traced once for any `N`, `Ta` and steps.

    Keyed on `training` (a Python value the trace depends on) and the
    inputs' dtype and `F`; steps always arrive as int32 caps `(N, Ta)`, so
    given steps, shared steps and `max_steps` share one trace. A feedback
    or sampling run (`extras`) also takes `sample_index` and the sampling
    probability as tensors (no retrace per value), and targets where given.
    """
    key = (*cache_key(kind, inputs, training=training, plain_a=False, extras=extras), loop)
    if key not in cascade._functions:
        function, signature = traceable(cascade, kind, inputs, training=training, plain_a=False, extras=extras,
                                                 loop=loop)
        compiled = tf.function(function, input_signature=signature, autograph=False)
        # Called as a concrete function: a tf.function's own dispatch costs about as much as
        # the whole run at small N.
        cascade._concrete[key] = compiled.get_concrete_function()
        cascade._functions[key] = compiled
    return cascade._concrete[key]


def traced(cascade, kind, inputs, *, training, extras=None, loop=True):
    """`concrete(...)`'s function where a call traced it already, else None (nothing is traced here)."""
    return cascade._concrete.get((*cache_key(kind, inputs, training=training, plain_a=False, extras=extras), loop))


def concrete_gradient(cascade, kind, inputs, *, training, plain_a, extras, values):
    """The concrete function `(*arguments, d_values) -> gradients`: the compiled call run again, differentiated.

    `arguments` are `concrete`'s; the gradients are those of the
    differentiable arguments (`differentiable`) then of `trainable_weights(cascade)`.
    """
    key = ("gradient", *cache_key(kind, inputs, training=training, plain_a=plain_a, extras=extras))
    if key not in cascade._concrete:
        function, signature = traceable(cascade, kind, inputs, training=training, plain_a=plain_a, extras=extras)
        watched = differentiable(extras)

        def gradient(*arguments):
            *arguments, d_values = arguments
            sources = [arguments[i] for i in watched]
            with tf.GradientTape() as tape:
                tape.watch(sources)
                result = function(*arguments)[0]
            return tape.gradient(result, [*sources, *trainable_weights(cascade)], output_gradients=d_values)

        signature = [*signature, tf.TensorSpec([None, *values.shape[1:]], values.dtype)]
        traced = tf.function(gradient, input_signature=signature, autograph=False)
        cascade._concrete[key] = traced.get_concrete_function()
    return cascade._concrete[key]


def trainable_weights(cascade):
    """A's then B's trainable variables, each once: what a recomputed call's gradient is taken of."""
    return list({id(v): v for v in cascade.model_a.trainable_variables + cascade.model_b.trainable_variables}.values())


def side_variables(cascade):
    """What a call may update besides its outputs: seed generators' states, then non-trainable variables."""
    models = [cascade.model_a, cascade.model_b]
    variables = [generator.state for generator in seed_generators(models)]
    variables += [v for model in models for v in model.non_trainable_variables]
    return list({id(v): v for v in variables}.values())


def cache_key(kind, inputs, *, training, plain_a, extras):
    """What a trace depends on besides the cascade: the call's kind, `training`, the inputs' dtype and `F`, A's
    form of call and the feedback arguments' layout."""
    layout = None if extras is None else (extras.targets is not None, extras.return_tokens, extras.scheduled)
    return kind, training, inputs.dtype, inputs.shape[2], plain_a, layout


def traceable(cascade, kind, inputs, *, training, plain_a, extras, loop=False):
    """`(function, input_signature)`: the Python function `concrete` traces, and its signature.

    `loop`: whether the trace may run the compiled whole loop (False where a tape records the call).
    """
    body = cascade._ragged_parts if kind == "ragged" else cascade._run
    signature = [tf.TensorSpec([None, cascade.a_spec.outer_steps, inputs.shape[2]], inputs.dtype),
                 tf.TensorSpec([None, None], tf.int32)]
    if extras is None:
        return (lambda inputs, caps: body(inputs, caps, training, plain_a=plain_a, loop=loop)), signature
    signature += [tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.float64)]
    if extras.targets is not None:
        signature.append(tf.TensorSpec([None, cascade.b_spec.output_size], cascade._y_dtype))
    return_tokens, scheduled = extras.return_tokens, extras.scheduled

    def function(inputs, caps, sample_index, probability, *targets):  # no default: its binding cost 0.75 ms
        feed = feedback.Feed(targets[0] if targets else None, sample_index, probability, return_tokens, scheduled)
        return body(inputs, caps, training, plain_a=plain_a, extras=feed, loop=loop)

    return function, signature


def call_compiled(cascade, kind, inputs, caps, *, training, extras=None):
    """Calls `concrete(...)`; a `CascadeError` raised while tracing reaches the caller as itself.

    (TensorFlow would wrap it in a `StagingError`; an eager call raises what the eager path raises.)
    """
    arguments = [inputs, caps]
    if extras is not None:
        arguments += [extras.sample_index, extras.probability]
        if extras.targets is not None:
            arguments.append(extras.targets)
    if cascade._xla is None or cascade._loop_choice is None:  # the probes take this call's shape (`xla.probe_shape`)
        cascade._first_shape = tuple(inputs.shape)
    with cascade_errors():
        if tape_may_record():
            weights = [tf.convert_to_tensor(weight) for weight in trainable_weights(cascade)]  # the tapes watch them
            if tapes_may_take_higher_order([*arguments, *weights]):
                return recomputed(cascade, kind, inputs, arguments, weights, training=training, extras=extras)
        return call_flat(concrete(cascade, kind, inputs, training=training, extras=extras,
                                  loop=taped_loop(inputs) if tape_may_record() else True),
                         arguments)  # checked: no binding (`run.eager`)


def taped_loop(inputs):
    """`Cascade._run`'s `loop` for an eager call under a tape: False (XLA's gradient where `xla.known_gradient`
    says), or `"hand"` where the batch is too large for XLA's gradient to win (`xla.xla_gradient_wins`); each
    traced apart."""
    return False if xla.xla_gradient_wins(inputs.shape[0]) else "hand"


def recomputed(cascade, kind, inputs, arguments, weights, *, training, extras):
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
    side = side_variables(cascade)
    started = [variable.numpy() for variable in side]
    watched = differentiable(extras)

    @tf.custom_gradient
    def call(*sources):
        with stop_recording():  # the plain loop, so that the gradient's run emits the very same rows
            outputs = concrete(cascade, kind, inputs, training=training, extras=extras, loop=False)(*arguments)

        def gradient(d_values, *_, variables=None):
            d_values = tf.zeros_like(outputs[0]) if d_values is None else d_values
            backward = concrete_gradient(cascade, kind, inputs, training=training, plain_a=tape_may_record(),
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


def differentiable(extras):
    """Where the float tensors are among `call_compiled`'s arguments (inputs, caps, sample_index, probability,
    targets): the inputs, and the targets where given."""
    return [0, 4] if extras is not None and extras.targets is not None else [0]
