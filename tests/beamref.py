"""An eager, exhaustive reference for beam search: every token sequence of every pair enumerated (tests only).

Independent of `cascade_cli.run.beam`: plain numpy and eager calls of A and B, a
pair's hypotheses grown one level at a time (each level's live hypotheses in
one eager call of B). Every hypothesis ends when its token is a stop token
(from `min_steps` on) or when it reaches the pair's cap; its score is the sum
of `log_softmax(y_j)[token_j]` in float64, ranked by `score / length **
length_penalty`. Only for tiny vocabularies: `O ** cap` hypotheses per pair.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass
class Hypothesis:
    tokens: list
    ys: list
    score: float
    states: list  # B's states after the last step, each (size,)
    stopped: bool  # ended by a stop token

    def ranked(self, length_penalty):
        return self.score / len(self.tokens) ** length_penalty if length_penalty else self.score


def log_softmax(y):
    y = np.asarray(y, np.float64)
    shifted = y - y.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def enumerate_pair(model_b, x, fed, states, *, cap, stop_ids=(), min_steps=0):
    """Every ended hypothesis of one pair, in enumeration order (level by level)."""
    size = model_b.outputs[0].shape[-1]
    live = [Hypothesis([], [], 0.0, [np.asarray(s) for s in states], False)]
    feds = [np.asarray(fed)]
    ended = []
    for step in range(cap):
        if not live:
            break
        call = model_b([np.repeat(np.asarray(x)[None], len(live), 0), np.stack(feds),
                        *[np.stack([h.states[i] for h in live]) for i in range(len(states))]], training=False)
        y, new_states = (call, []) if not isinstance(call, (list, tuple)) else (call[0], list(call[1:]))
        y = np.asarray(y)
        new_states = [np.asarray(s) for s in new_states]
        scores = log_softmax(y)
        grown, grown_feds = [], []
        for r, hypothesis in enumerate(live):
            for token in range(size):
                child = Hypothesis(hypothesis.tokens + [token], hypothesis.ys + [y[r]],
                                   hypothesis.score + scores[r, token], [s[r] for s in new_states], False)
                child.stopped = token in stop_ids and step + 1 >= min_steps
                if child.stopped or step + 1 == cap:
                    ended.append(child)
                else:
                    grown.append(child)
                    grown_feds.append(np.eye(size, dtype=y.dtype)[token])
        live, feds = grown, grown_feds
    return ended


def exhaustive(model_a, model_b, inputs, caps, *, stop_ids=(), state="reset", start="zeros", length_penalty=0.0,
               rank=0, min_steps=0, exclude_stop_step=False):
    """`(values (total, O), lengths (N, Ta), tokens (total,))`: each pair's `rank`-th best hypothesis, in value order.

    `start`: `"zeros"`, `("token", ID)` or `"previous"` (the chosen hypothesis' last token of the
    sample's previous pair that ran). In `carry` mode the next pair starts from the chosen one's states.
    """
    ir = np.asarray(model_a(np.asarray(inputs), training=False))
    size = model_b.outputs[0].shape[-1]
    state_sizes = [int(spec.shape[-1]) for spec in model_b.inputs[2:]]
    caps = np.broadcast_to(np.asarray(caps), ir.shape[:2])
    values, tokens, lengths = [], [], np.zeros(caps.shape, np.int32)
    start_fed = np.zeros(size, np.float32)
    if isinstance(start, tuple):
        start_fed = np.eye(size, dtype=np.float32)[start[1]]
    for n in range(caps.shape[0]):
        carried = [np.zeros(s, np.float32) for s in state_sizes]
        last = np.zeros(size, np.float32)
        for t in range(caps.shape[1]):
            if caps[n, t] == 0:
                continue
            states = carried if state == "carry" else [np.zeros(s, np.float32) for s in state_sizes]
            fed = last if start == "previous" else start_fed
            ended = enumerate_pair(model_b, ir[n, t], fed, states, cap=int(caps[n, t]), stop_ids=stop_ids,
                                   min_steps=min_steps)
            order = sorted(range(len(ended)), key=lambda i: -ended[i].ranked(length_penalty))  # stable
            best = ended[order[min(rank, len(order) - 1)]]
            keep = len(best.tokens) - int(exclude_stop_step and best.stopped)
            values.extend(best.ys[:keep])
            tokens.extend(best.tokens[:keep])
            lengths[n, t] = keep
            carried = best.states
            last = np.eye(size, dtype=np.float32)[best.tokens[-1]]
    values = np.asarray(values, np.float32).reshape(-1, size)
    return values, lengths, np.asarray(tokens, np.int64)


def ranked_list(model_a, model_b, inputs, caps, n, t, *, stop_ids=(), length_penalty=0.0):
    """Every ended hypothesis of pair (n, t) in `reset` mode, best first: `[(ranked score, tokens)]`."""
    ir = np.asarray(model_a(np.asarray(inputs), training=False))
    size = model_b.outputs[0].shape[-1]
    state_sizes = [int(spec.shape[-1]) for spec in model_b.inputs[2:]]
    ended = enumerate_pair(model_b, ir[n, t], np.zeros(size, np.float32), [np.zeros(s, np.float32) for s in state_sizes],
                           cap=int(np.broadcast_to(caps, ir.shape[:2])[n, t]), stop_ids=stop_ids)
    return sorted(((h.ranked(length_penalty), h.tokens) for h in ended), key=lambda item: -item[0])
