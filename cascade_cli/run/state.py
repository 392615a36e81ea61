"""`CascadeState`: where a run stopped, so that the next window continues the same sequences.

A long outer sequence can run a window of outer steps at a time
(`Cascade.run(inputs[:, a:b], steps[:, a:b], initial_state=state,
return_state=True)`): what one window hands the next is A's state (an A in
state form), B's carried state (`state="carry"`), each sample's last fed
value (`feedback_start="previous"`) and the outer offset reached, so that the
sampler's draws stay keyed on the absolute outer step `t`. Windows of any
size, one outer step included, give the values, lengths and tokens of the
whole run.

The state carries no gradient: the runner takes it in and hands it out
through `tf.stop_gradient`, so a gradient of one window's values stops at the
state that window started from (truncated backpropagation through time).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CascadeState:
    """A run's state at the end of its last outer step, per sample.

    Attributes:
        a_states: model A's states (an A in state form), each `(N, size)`;
            empty for a plain A, which starts from zeros in every call.
        b_states: B's carried states (`state="carry"`, step form), each
            `(N, size)`: the state after each sample's last inner step so far
            (zeros, or the state passed in, for a sample that ran none);
            empty in `reset` mode.
        previous: `(N, O)`, each sample's last fed value (the sampler's value
            of the last output B computed for it; zeros before any), with
            `feedback=True` and `feedback_start="previous"`; else None.
        offset: the outer steps run so far: the absolute outer index `t` of
            the next window's first step (an int, or a scalar tensor inside
            a `tf.function`).
    """

    a_states: tuple = ()
    b_states: tuple = ()
    previous: object = None
    offset: object = 0

    @property
    def samples(self):
        """`N`, the samples the state is for (None where it holds no tensor or `N` is not static)."""
        for tensor in (*self.a_states, *self.b_states, self.previous):
            if tensor is not None:
                return tensor.shape[0]
        return None


def carry_problem(cascade, *, targets=False):
    """Why `cascade` cannot carry its state from one call to the next, or None where it can.

    The one home of the rule: `Cascade.run(..., initial_state, return_state)`
    refuses these settings, and `CascadeModel(..., window=W)` refuses them
    when it is built.

    Args:
        cascade: a `Cascade`.
        targets: whether the calls give targets (teacher forcing; a
            feedback B in training).
    """
    if cascade.sampler.kind == "beam":
        return "sampler='beam' keeps hypotheses, not one state per sample"
    if targets and cascade.feedback_start == "previous":
        return ("teacher forcing (a feedback B fed its targets) with feedback_start='previous' does not continue "
                "from a state yet (the previous window's last target is not carried)")
    if cascade.b_spec.form == "sequence" and cascade.state == "carry":
        return "a sequence-form B in carry mode hands out no state"
    return None


def carries_b(cascade):
    """Whether a `CascadeState` holds B's states: `carry` mode, step form."""
    return cascade.state == "carry" and cascade.b_spec.form == "step"


def carries_previous(cascade):
    """Whether a `CascadeState` holds each sample's last fed value: feedback starting from the previous pair."""
    return cascade.feedback and cascade._start[0] == "previous"
