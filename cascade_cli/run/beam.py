"""Beam search for each inner sequence of a feedback-form B (issue 33).

Every `(sample, outer step)` pair keeps the `width` best partial token
sequences (hypotheses). A hypothesis scores the sum over its steps of
`log_softmax(y_j)[token_j]` (in float64); at each inner step every live
hypothesis of a pair is extended by every token, and the `width` best
candidates of the pair (by that sum) are kept: those that end go to the
pair's pool of ended hypotheses, the others live on, each fed its own token's
one-hot. A candidate ends when its token is a stop token (the stop step is in
its score; `min_steps` holds the rule off as it does elsewhere) or when it
reaches the pair's cap (`max_steps`, or the given steps). The pool keeps the
`width` best ended hypotheses by `score / length ** length_penalty` (length
counts the stop step), earlier ones first on a tie. A pair is done when no
hypothesis lives, or, with `length_penalty == 0`, when its pool is full and
its best live score cannot beat the worst pooled one (scores only fall, so
nothing changes). Its result is the pool's best: the B outputs of its steps
as values and its tokens (`exclude_stop_step` leaves a stop step out).

Width 1 is greedy decoding (the one best candidate: the argmax token); a
width that keeps every live hypothesis (`O ** (max_steps - 1)`) is
exhaustive search.

How it runs (DESIGN section 3, the packed runner): every live hypothesis is a
row of one `tf.while_loop`; B is called once per inner step on the rows of
every pair still running (`rows = live pairs x live hypotheses`, never padded
over `Ta`), ended hypotheses and finished pairs leave the work. Pairs are
*groups*: in `reset` mode each running pair is a group; in `carry` mode (and
with `feedback_start="previous"`) a group is a sample walking its pairs in
order, and the next pair starts from the chosen hypothesis' state (`carry`)
and last token (`previous`). Each emitted candidate is a node of a tree
(its B output, token and parent); the chosen hypotheses are read back from
the tree after the loop.
"""

from __future__ import annotations

import tensorflow as tf

from cascade_cli.errors import ParameterError
from cascade_cli.options import check_int
from cascade_cli.run import packing
from cascade_cli.run.feedback import start_value
from cascade_cli.run.loop import call_b, initial_states

NOT_COMPILED = "beam search runs its own packed loop, which is not compiled under XLA"


def check_settings(cascade):
    """Refuses the `Cascade` settings a beam cannot run with; each error names the parameter.

    A beam needs a feedback-form B (`feedback=True`) whose outputs score at
    least two tokens, a token stop rule or none, and `jit_compile` other than
    True (its loop does not run under XLA).
    """
    if not cascade.feedback:
        raise ParameterError("sampler", "'beam' feeds each hypothesis its own token and needs a feedback-form B: "
                                        "give feedback=True; received feedback=False.")
    size = cascade.b_spec.output_size
    if size < 2:
        raise ParameterError("sampler", f"'beam' scores tokens with log_softmax(y) and needs B to emit one score per "
                                        f"token: expected O >= 2, received O={size}.")
    rule = cascade.stop_rule
    if rule is not None and rule.kind != "token":
        raise ParameterError("stop_rule", f"a beam ends hypotheses on stop tokens: expected StopRule.token or no stop "
                                          f"rule with sampler='beam', received {rule.describe()}.")
    if cascade.jit_compile is True:
        raise ParameterError("jit_compile", f"True, but {NOT_COMPILED}: pass jit_compile='auto' or False.")


def search(cascade, ir_flat, caps, *, training, ranks=None, return_tokens=False):
    """Runs the beam over every running pair: `Cascade._run`'s result for a beam sampler.

    Args:
        cascade: the `Cascade` (its B, settings and helpers).
        ir_flat: `(N * Ta, H)` each pair's IR vector.
        caps: `(N, Ta)` int32 each pair's most steps (0: the pair does not run).
        training: passed to B.
        ranks: `(N,)` int32, which hypothesis each sample returns (0 the
            best, clipped to the pool's last), or None for the best everywhere.
        return_tokens: also return the chosen tokens.

    Returns:
        `(values (total, O), lengths (N, Ta) int32)` in value order, plus
        `tokens (total,) int64` with `return_tokens`.
    """
    return BeamSearch(cascade, training=training).search(ir_flat, caps, ranks=ranks, return_tokens=return_tokens)


def best(cascade, inputs, steps=None, *, num_samples=1, training=False):
    """The `num_samples` best hypotheses of every input: result sample `n * K + k` holds input n's k-th best.

    In `carry` mode each of the K results is its own chain: at every outer
    step it takes its k-th best ended hypothesis, and the next outer step
    starts from that one's state (so each of the K chains runs its own beams).

    Args:
        cascade: a `Cascade` with `sampler=Sampler.beam(width, ...)`.
        inputs: `(N, Ta, F)` float.
        steps: `(Ta,)` or `(N, Ta)` caps, or None for `max_steps` everywhere.
        num_samples: K, an integer in [1, width].
        training: passed to both models.

    Returns:
        `(values (total, O), lengths (N * K, Ta) int32, tokens (total,) int64)`.
    """
    repeats = check_num_samples(cascade, num_samples)
    inputs, caps = cascade._checked(inputs, steps)
    inputs, caps = tf.repeat(inputs, repeats, axis=0), tf.repeat(caps, repeats, axis=0)
    ranks = tf.range(tf.shape(inputs)[0]) % repeats
    if not tf.executing_eagerly() or cascade.run_eagerly:
        return run_ranked(cascade, inputs, caps, ranks=ranks, training=training)
    key = ("beam.best", training, inputs.dtype, inputs.shape[2])  # called eagerly: traced once, as the runner is
    if key not in cascade._functions:
        cascade._functions[key] = tf.function(
            lambda inputs, caps, ranks: run_ranked(cascade, inputs, caps, ranks=ranks, training=training),
            input_signature=[tf.TensorSpec([None, *inputs.shape[1:]], inputs.dtype),
                             tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32)],
            autograph=False)
    return cascade._functions[key](inputs, caps, ranks)


def run_ranked(cascade, inputs, caps, *, ranks, training=False):
    """`(values, lengths, tokens)` of checked `inputs (N, Ta, F)` and `caps (N, Ta)` int32, sample n returning its
    `ranks[n]`-th best hypothesis (A as the runner runs it, under XLA where it chose to)."""
    ir, _ = cascade.run_a(inputs, training=training)  # A in either form, under XLA where the runner chose it
    ir_flat = tf.reshape(ir, [-1, cascade.a_spec.ir_size])
    return search(cascade, ir_flat, caps, training=training, ranks=ranks, return_tokens=True)


def check_num_samples(cascade, num_samples):
    """`num_samples` checked against the beam's width: the K best need K <= width hypotheses kept."""
    if cascade.sampler.kind != "beam":
        raise ParameterError("sampler", f"expected a beam sampler (Sampler.beam), received {cascade.sampler.kind!r}.")
    num_samples = check_int("num_samples", num_samples, minimum=1)
    if num_samples > cascade.sampler.width:
        raise ParameterError("num_samples", f"a beam returns at most the {cascade.sampler.width} hypotheses it keeps: "
                                            f"expected at most the beam width {cascade.sampler.width}, received "
                                            f"{num_samples}.")
    return num_samples


def _unknown_rows(tensor):
    """`tensor` with its first dimension unknown to TensorFlow's graph optimizer as well as to the trace."""
    return tf.compat.v1.placeholder_with_default(tensor, shape=[None, *tensor.shape[1:]])


class BeamSearch:
    """The beam sampler over the runner's rows: one method, `search`, as KerasHub's samplers have one `__call__`.

    Args:
        cascade: the `Cascade` whose B, sampler and settings it runs.
        training: passed to B.
    """

    def __init__(self, cascade, *, training):
        self.cascade = cascade
        self.training = training
        self.width = cascade.sampler.width
        self.length_penalty = cascade.sampler.length_penalty
        self.size = cascade.b_spec.output_size
        self.dtype = cascade._y_dtype
        self.stop_ids = cascade.stop_rule.token_ids if cascade.stop_rule is not None else ()
        self.walk = cascade.state == "carry" or cascade._start[0] == "previous"
        self.carry = cascade.state == "carry"

    def _step(self, x, y_prev, states):
        """B's step on whole blocks of rows (a row's values do not depend on the rows beside it)."""
        call = lambda x, y_prev, states: call_b(self.cascade, x, states, self.training, y_prev=y_prev)  # noqa: E731
        return call(x, y_prev, states) if self.training else packing.on_whole_blocks(call)(x, y_prev, states)

    def search(self, ir_flat, caps, *, ranks=None, return_tokens=False):
        """See `search` (the module function)."""
        cascade, width, size, dtype = self.cascade, self.width, self.size, self.dtype
        minus_inf = tf.constant(-float("inf"), tf.float64)
        outer = tf.shape(caps)[1]
        caps_flat = tf.reshape(caps, [-1])
        ranks = tf.zeros([tf.shape(caps)[0]], tf.int32) if ranks is None else tf.cast(ranks, tf.int32)
        start = start_value(cascade)
        previous = cascade._start[0] == "previous"
        running_pairs = tf.cast(tf.where(caps_flat > 0)[:, 0], tf.int32)  # ascending
        if self.walk:  # a group is a sample walking its pairs
            samples = tf.sort(packing.carry_rows(caps))
            pair = packing.next_running_pair(running_pairs, samples * outer, samples=samples, outer=outer)
        else:  # a group is a pair
            pair = running_pairs
        groups = tf.size(pair)
        group_rank = tf.gather(ranks, tf.math.floordiv(pair, outer))  # which hypothesis each group returns
        state_sizes = list(cascade.b_spec.state_sizes)
        states = ([tf.zeros([groups, s], ir_flat.dtype) for s in state_sizes] if self.carry
                  else initial_states(cascade, tf.gather(ir_flat, pair)))
        first = tf.zeros_like(start) if previous else start  # zeros before a sample's first pair
        # a row: (group, pair, inner steps run, score, its node in the tree, what it is fed)
        rows = (tf.range(groups), pair, tf.zeros_like(pair), tf.zeros([groups], tf.float64), tf.fill([groups], -1),
                tf.tile(first[None], [groups, 1]))
        # each group's pool of ended hypotheses: (ranked score, node, length, stopped by a token, last token)
        pool = (tf.fill([groups, width], minus_inf), tf.fill([groups, width], -1), tf.zeros([groups, width], tf.int32),
                tf.zeros([groups, width], tf.bool), tf.zeros([groups, width], tf.int32))
        pool_states = [tf.zeros([groups, width, s], ir_flat.dtype) for s in state_sizes] if self.carry else []
        pairs_total = tf.size(caps_flat)
        chosen = (tf.fill([pairs_total], -1), tf.zeros([pairs_total], tf.int32), tf.zeros([pairs_total], tf.bool))

        def array(dtype, shape):
            return tf.TensorArray(dtype, size=0, dynamic_size=True, infer_shape=False,
                                  element_shape=tf.TensorShape(shape))

        nodes = (array(dtype, [None, size]), array(tf.int64, [None]), array(tf.int32, [None]))

        def iterate(it, total, rows, states, pool, pool_states, chosen, nodes):
            group, pair, inner, score, node, fed = rows
            y, new_states = self._step(tf.gather(ir_flat, pair), fed, states)
            candidates = score[:, None] + tf.nn.log_softmax(tf.cast(y, tf.float64), axis=-1)
            # each group's rows are contiguous, best first: lay them out as (groups here, width x O) and keep the best
            active, segment = tf.unique(group)
            count = tf.size(active)
            row_start = tf.math.segment_min(tf.range(tf.size(group)), segment)  # each group's first row
            slot = tf.range(tf.size(group)) - tf.gather(row_start, segment)
            laid = tf.tensor_scatter_nd_update(tf.fill([count, width, size], minus_inf),
                                               tf.stack([segment, slot], axis=1), candidates)
            scores, best = tf.math.top_k(tf.reshape(laid, [count, width * size]), k=width)
            valid = scores > minus_inf
            parent = tf.where(valid, row_start[:, None] + best // size, 0)  # (count, width) rows
            token = best % size
            steps_run = tf.gather(inner, parent) + 1
            here = tf.gather(pair, row_start)  # each active group's pair
            ended = steps_run >= tf.gather(caps_flat, here)[:, None]
            hit = tf.zeros_like(ended)
            if self.stop_ids:
                hit = tf.reduce_any(token[..., None] == tf.constant(self.stop_ids, tf.int32), axis=-1)
                if cascade.min_steps > 1:
                    hit = tf.logical_and(hit, steps_run >= cascade.min_steps)
                ended = tf.logical_or(ended, hit)
            # the kept candidates become nodes of the tree: group after group, best first
            flat_valid = tf.reshape(valid, [-1])
            kept_parent = tf.boolean_mask(tf.reshape(parent, [-1]), flat_valid)
            kept = tf.size(kept_parent)
            node_id = tf.reshape(tf.scatter_nd(tf.where(flat_valid), total + tf.range(kept), [count * width]),
                                 [count, width])
            nodes = (nodes[0].write(it, tf.gather(y, kept_parent)),
                     nodes[1].write(it, tf.cast(tf.boolean_mask(tf.reshape(token, [-1]), flat_valid), tf.int64)),
                     nodes[2].write(it, tf.gather(node, kept_parent)))
            # the ended candidates join their group's pool, which keeps the `width` best, earlier ones first on a tie
            ranked = scores
            if self.length_penalty != 0:
                ranked = scores / tf.cast(steps_run, tf.float64) ** self.length_penalty
            ranked = tf.where(tf.logical_and(valid, ended), ranked, minus_inf)
            merged, pick = tf.math.top_k(tf.concat([tf.gather(pool[0], active), ranked], 1), k=width)
            at = active[:, None]

            def merge(old, new):
                return tf.tensor_scatter_nd_update(
                    old, at, tf.gather(tf.concat([tf.gather(old, active), new], 1), pick, batch_dims=1))

            pool = (tf.tensor_scatter_nd_update(pool[0], at, merged), merge(pool[1], node_id),
                    merge(pool[2], steps_run), merge(pool[3], hit), merge(pool[4], token))
            pool_states = [merge(old, tf.gather(s, parent)) for old, s in zip(pool_states, new_states)]
            # the live candidates go on, unless their best cannot beat the pool's worst (scores only fall)
            live = tf.logical_and(valid, tf.logical_not(ended))
            if self.length_penalty == 0:
                best_live = tf.reduce_max(tf.where(live, scores, minus_inf), axis=1)
                beaten = tf.logical_and(merged[:, -1] > minus_inf, best_live <= merged[:, -1])
                live = tf.logical_and(live, tf.logical_not(beaten)[:, None])
            flat_live = tf.reshape(live, [-1])
            live_parent = tf.boolean_mask(tf.reshape(parent, [-1]), flat_live)
            next_rows = (tf.gather(group, live_parent), tf.gather(pair, live_parent),
                         tf.boolean_mask(tf.reshape(steps_run, [-1]), flat_live),
                         tf.boolean_mask(tf.reshape(scores, [-1]), flat_live),
                         tf.boolean_mask(tf.reshape(node_id, [-1]), flat_live),
                         tf.one_hot(tf.boolean_mask(tf.reshape(token, [-1]), flat_live), size, dtype=dtype))
            next_states = [tf.gather(s, live_parent) for s in new_states]
            # a group with no live hypothesis left: its pair's result is chosen from the pool
            finished = tf.logical_not(tf.reduce_any(live, axis=1))
            done_group = tf.boolean_mask(active, finished)
            done_pair = tf.boolean_mask(here, finished)
            filled = tf.reduce_sum(tf.cast(tf.gather(pool[0], done_group) > minus_inf, tf.int32), axis=1)
            pick_at = tf.stack([done_group, tf.minimum(tf.gather(group_rank, done_group), filled - 1)], axis=1)
            at = done_pair[:, None]
            chosen = tuple(tf.tensor_scatter_nd_update(c, at, tf.gather_nd(p, pick_at))
                           for c, p in zip(chosen, (pool[1], pool[2], pool[3])))
            if self.walk:  # the group's next running pair starts from the chosen hypothesis
                following = packing.next_running_pair(running_pairs, done_pair + 1,
                                                      samples=tf.math.floordiv(done_pair, outer), outer=outer)
                goes_on = following >= 0
                fresh_group, fresh_pair = tf.boolean_mask(done_group, goes_on), tf.boolean_mask(following, goes_on)
                fresh_at = tf.boolean_mask(pick_at, goes_on)
                fresh = tf.size(fresh_group)
                if previous:  # fed the chosen hypothesis' last token
                    fed = tf.one_hot(tf.gather_nd(pool[4], fresh_at), size, dtype=dtype)
                else:
                    fed = tf.tile(start[None], [fresh, 1])
                if self.carry:
                    fresh_states = [tf.gather_nd(p, fresh_at) for p in pool_states]
                else:
                    fresh_states = initial_states(cascade, tf.gather(ir_flat, fresh_pair))
                empty = fresh_group[:, None]
                pool = (tf.tensor_scatter_nd_update(pool[0], empty, tf.fill([fresh, width], minus_inf)), *pool[1:])
                fresh_rows = (fresh_group, fresh_pair, tf.zeros_like(fresh_pair), tf.zeros([fresh], tf.float64),
                              tf.fill([fresh], -1), fed)
                joined = [tf.concat([a, b], 0) for a, b in zip(next_rows, fresh_rows)]
                order = tf.argsort(joined[0], stable=True)  # rows stay grouped, each group's best first
                next_rows = tuple(tf.gather(r, order) for r in joined)
                next_states = [tf.gather(tf.concat([a, b], 0), order) for a, b in zip(next_states, fresh_states)]
            return it + 1, total + kept, next_rows, next_states, pool, pool_states, chosen, nodes

        invariants = (
            tf.TensorShape([]), tf.TensorShape([]),
            tuple(tf.TensorShape([None]).concatenate(r.shape[1:]) for r in rows),
            [tf.TensorShape([None]).concatenate(s.shape[1:]) for s in states],
            tuple(p.shape for p in pool), [p.shape for p in pool_states],
            tuple(c.shape for c in chosen), tuple(tf.TensorShape(None) for _ in nodes),
        )
        # Grappler folds constant steps into the loop's first rows and would take their sizes for every
        # iteration's (which grow and shrink): an unknown-shape placeholder keeps the sizes dynamic
        rows, states = tf.nest.map_structure(_unknown_rows, (rows, states))
        it, _, _, _, _, _, chosen, nodes = tf.while_loop(
            lambda it, total, rows, *_: tf.size(rows[0]) > 0, iterate,
            (tf.constant(0), tf.constant(0), rows, list(states), pool, pool_states, chosen, nodes),
            shape_invariants=invariants)
        # a sentinel keeps concat() defined when nothing ran
        node_y = nodes[0].write(it, tf.zeros([0, size], dtype)).concat()
        node_token = nodes[1].write(it, tf.zeros([0], tf.int64)).concat()
        node_parent = nodes[2].write(it, tf.zeros([0], tf.int32)).concat()
        return self._read_back(caps, chosen, node_y, node_token, node_parent, return_tokens=return_tokens)

    def _read_back(self, caps, chosen, node_y, node_token, node_parent, *, return_tokens):
        """The chosen hypotheses' nodes, pair after pair, step after step: `search`'s result."""
        chosen_node, chosen_length, chosen_hit = chosen
        longest = tf.reduce_max(tf.concat([chosen_length, [0]], 0))
        # one more entry than steps: stack() of an empty array would have no known shape
        depth = tf.TensorArray(tf.int32, size=longest + 1, element_shape=tf.TensorShape([None]))

        def walk_up(d, current, depth):
            depth = depth.write(d, current)
            return d + 1, tf.where(current >= 0, tf.gather(node_parent, tf.maximum(current, 0)), -1), depth

        _, current, depth = tf.while_loop(lambda d, *_: d < longest, walk_up, (tf.constant(0), chosen_node, depth))
        from_last = tf.transpose(depth.write(longest, current).stack())[:, :longest]  # (pairs, longest): last first
        ordered = tf.reverse_sequence(from_last, tf.cast(chosen_length, tf.int64), seq_axis=1, batch_axis=0)
        emitted = chosen_length
        if self.cascade.exclude_stop_step:
            emitted = emitted - tf.cast(chosen_hit, tf.int32)
        ids = tf.boolean_mask(ordered, tf.range(longest)[None, :] < emitted[:, None])
        result = (tf.gather(node_y, ids), tf.reshape(emitted, tf.shape(caps)))
        return result + (tf.gather(node_token, ids),) if return_tokens else result
