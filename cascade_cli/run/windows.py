"""Run a cascade over a long outer sequence a window of outer steps at a time, the state carried.

`Windows(cascade, window)` runs each batch as windows of `window` outer steps
(`Cascade.run(..., initial_state=state, return_state=True)` one after the
other), so that the runner's working memory grows with the window instead of
`Ta`, and joins their results into the whole run's: the same values, lengths
and tokens (`cascade generate --window`).

An A in state form runs in the windows, its state carried. A plain A is run
through its state form (`models.state_form`: a chain of Keras recurrent and
per-step layers, rebuilt with `return_state=True` and checked on a probe)
where it has one; elsewhere it hands out no state and cannot be cut, so it
runs over the whole batch once (its IR `(N, Ta, H)` is held, as the inputs
are) and B runs in windows over that IR.
"""

from __future__ import annotations

import numpy as np

from cascade_cli.errors import ParameterError
from cascade_cli.run.models import state_form
from cascade_cli.options import check_int


class Windows:
    """`cascade.run` over windows of `window` outer steps, joined: `(values, lengths[, tokens])` as tensors.

    Args:
        cascade: a `runner.Cascade` whose settings can carry a state
            (not `sampler="beam"`, not a sequence-form B in `carry` mode).
        window: outer steps per window, an integer >= 1.
    """

    def __init__(self, cascade, window):
        self.window = check_int("window", window, minimum=1)
        if cascade.sampler.kind == "beam":
            raise ParameterError("window", "cannot run with sampler='beam' yet: a beam keeps hypotheses, not one "
                                           "state per sample to carry; run without a window.")
        if cascade.b_spec.form == "sequence" and cascade.state == "carry":
            raise ParameterError("window", "cannot run a sequence-form B in carry mode: it hands out no state to "
                                           "carry; use a step-form B or run without a window.")
        self.cascade = cascade
        model_a = None if cascade.a_spec.form == "state" else state_form(cascade.model_a)
        # a plain A without a state form runs over the whole batch at once, B in the windows
        self.a_whole = cascade.a_spec.form == "plain" and model_a is None
        if self.a_whole:
            self._runner = _over_ir(cascade)
        else:
            self._runner = cascade if model_a is None else _with_a(cascade, model_a)

    def __call__(self, inputs, caps, sample_index=None, *, return_tokens=False):
        """Runs checked `inputs (N, Ta, F)` and `caps (N, Ta)` int32 window by window; `run`'s result."""
        import tensorflow as tf

        if self.a_whole:
            inputs = self.cascade.run_a(inputs)[0]
        outer = int(inputs.shape[1])
        caps = np.asarray(caps)
        state, parts = None, []
        for start in range(0, outer, self.window):
            stop = min(start + self.window, outer)
            *result, state = self._runner.run(inputs[:, start:stop], caps[:, start:stop], sample_index=sample_index,
                                              return_tokens=return_tokens, initial_state=state, return_state=True)
            parts.append([np.asarray(part) for part in result])
        if not parts:  # Ta == 0
            return self._runner.run(inputs, caps, sample_index=sample_index, return_tokens=return_tokens)
        lengths = np.concatenate([part[1] for part in parts], axis=1)
        # value order is sample, then outer step: each window's values of sample n go after its earlier windows'
        owner = np.concatenate([np.repeat(np.arange(len(caps)), part[1].sum(axis=1)) for part in parts])
        order = np.argsort(owner, kind="stable")
        joined = [np.concatenate([part[i] for part in parts])[order] for i in (0, *range(2, len(parts[0])))]
        result = (joined[0], lengths, *joined[1:])
        return tuple(tf.convert_to_tensor(part) for part in result)


def _with_a(cascade, model_a):
    """A cascade with `model_a` for A and the same B and settings."""
    from cascade_cli.run.cascade import Cascade

    return Cascade(model_a, cascade.model_b, **cascade.get_config())


def _over_ir(cascade):
    """A cascade with the same B and settings whose A is the identity: it runs B over IR computed beforehand."""
    import keras

    size, dtype = cascade.a_spec.ir_size, cascade.model_a.outputs[0].dtype
    identity = keras.Sequential([keras.Input((None, size), dtype=dtype), keras.layers.Identity(dtype=dtype)],
                                name="ir")
    return _with_a(cascade, identity)
