"""Stop rules: which rows of an inner step met the `StopRule`, and the checks of a rule against B.

A rule (`options.StopRule`: a norm threshold, stop tokens or a stop gate) is
read at every inner step of every running row, each kind by its class (`RULES`: one
method, `hits`); `min_steps` holds a pair off
stopping until it has run that many steps. The loops (`run.loop`,
`run.feedback`, `run.compiled_loop`, `run.beam`) call these; `Cascade` checks
a rule against B once, at construction (`check_stop_rule`).
"""

from __future__ import annotations

import tensorflow as tf

from cascade_cli.errors import ParameterError


class NormStop:
    """Stops a row once the L2 norm of its output reaches the rule's value."""

    def __init__(self, rule):
        self.value = rule.value

    def hits(self, y, tokens=None):
        """`(rows,)` bools: the rows of `y (rows, O)` that stop (`tokens` is not read)."""
        return tf.norm(y, axis=-1) >= tf.cast(self.value, y.dtype)


class GateStop:
    """Stops a row once `sigmoid` of its output's last column, the stop logit, reaches the rule's value."""

    def __init__(self, rule):
        self.value = rule.value

    def hits(self, y, tokens=None):
        """`(rows,)` bools: the rows of `y (rows, O)` that stop (`tokens` is not read)."""
        return tf.sigmoid(y[:, -1]) >= tf.cast(self.value, y.dtype)


class TokenStop:
    """Stops a row once its token is one of the rule's ids: the sampled id where given, else `argmax(y)`."""

    def __init__(self, rule):
        self.ids = rule.token_ids

    def hits(self, y, tokens=None):
        """`(rows,)` bools: the rows of `y (rows, O)` whose token (`tokens (rows,)`, else `argmax(y)`) stops."""
        if tokens is None:
            tokens = tf.argmax(y, axis=-1, output_type=tf.int32)
        if len(self.ids) == 1:
            return tokens == tf.cast(self.ids[0], tokens.dtype)
        return tf.reduce_any(tokens[:, None] == tf.constant(self.ids, tokens.dtype)[None, :], axis=1)


RULES = {"norm": NormStop, "gate": GateStop, "token": TokenStop}
"""Each `StopRule.kind`'s class: a new rule is a class here with one method, `hits(y, tokens)` (and its
`options.StopRule` constructor and flag)."""


def stop_hits(rule, y, tokens=None):
    """Returns a `(rows,)` bool tensor: which rows of `y (rows, O)` meet the `StopRule` (`RULES[rule.kind]`).

    A token rule reads `tokens (rows,)` (the sampled ids) where given, else
    `argmax(y)`; a gate reads `sigmoid` of `y`'s last column; a norm rule
    reads `y`. Only a token rule reads `tokens`.
    """
    return RULES[rule.kind](rule).hits(y, tokens)


def stop(rule):
    """The loops' `stop` hook: `(y, tokens) -> hit` (`stop_hits`), or None without a rule."""
    if rule is None:
        return None
    return lambda y, tokens=None: stop_hits(rule, y, tokens)


def held(inner, min_steps):
    """`(rows,)` bools: the rows at inner steps `inner` that `min_steps` keeps from stopping, or None."""
    return inner + 1 < min_steps if min_steps > 1 else None


def check_stop_rule(rule, *, b_spec, sampler, state):
    """Checks a `StopRule` against B (`models.BSpec`), the sampler and the state mode; raises a `ParameterError`."""
    if rule.kind == "gate":
        check_gate(rule, output_size=b_spec.output_size, sampler=sampler)
    outside = [i for i in rule.token_ids if i >= b_spec.output_size]
    if outside:
        raise ParameterError(
            "stop_rule",
            f"stop token {outside[0]} is outside B's outputs: expected an id in "
            f"[0, {b_spec.output_size}), received {rule.stored_value}.",
        )
    if b_spec.form == "sequence" and state == "carry":
        raise ParameterError(
            "stop_rule",
            "with state='carry' needs a step-form B: a sequence-form B cannot know where the next "
            "outer step starts before the previous one has stopped.",
        )


def check_gate(rule, *, output_size, sampler):
    """A gate needs an output beside the stop logit, and reads B's own output, not a sampled token."""
    if output_size < 2:
        raise ParameterError("stop_rule", f"a stop gate reads B's last output column as the stop logit and needs "
                                          f"at least one other: expected O >= 2, received O={output_size}.")
    if sampler.kind != "identity":
        raise ParameterError("stop_rule", f"a stop gate reads B's own output; the {sampler.kind} sampler "
                                          "would pick tokens among the gate column too: use sampler='identity'.")
