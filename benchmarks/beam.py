"""Times beam search (issue 33): the packed beam against a padded beam loop under XLA.

Run from the repository root:

    python -m benchmarks.beam               # N = 8 and 64, width 4, medians of 5 (minutes)
    python -m benchmarks.beam --quick       # tiny shapes, 1 repeat (seconds)

The models are the feedback suite's (`benchmarks.feedback.build_models`: a GRU
A, a feedback-form B `[x, y_prev, state] -> GRUCell(H) -> Dense(O)` that emits
END = 0 at each pair's drawn length), on its shapes (N=8 Ta=100 and N=64 Ta=50,
H=64, F=O=16, max_steps 8). The methods, values checked equal first (tokens
and lengths equal, values allclose):

- `cascade`: `Cascade(a, b, feedback=True, sampler=Sampler.beam(4),
  max_steps=8, stop_rule=StopRule.token(END))` as it comes (`run` compiles
  itself; its beam loop is not under XLA): rows are the live hypotheses of the
  pairs still running.
- `padded_beam_xla`: `padded_beam`, the plain TF way under
  `tf.function(jit_compile=True)`: every `N x Ta` pair times `width` beams in
  one batch for `max_steps` steps (or until no beam lives), dead beams masked
  with a score of -inf, each beam's token and output history gathered by its
  parent at every step (KerasHub's shape), the same scores, pool and ties.

Repeats are interleaved across methods; medians are printed, and written with
`--record` into `RESULTS.md`'s notes by hand.
"""

import argparse
import statistics
import sys
import time

import numpy as np

from benchmarks import feedback

WIDTH = 4
END = feedback.END


def padded_beam(model_a, model_b, inputs, *, width, max_steps, end=END):
    """Beam search over every pair at once, padded: `(values (total, O), tokens (total,), lengths (N, Ta))`.

    The contract of `cascade_cli.run.beam` (sum of log-softmax scores, the `width`
    best candidates of a pair kept, ended ones pooled, the best ended one
    returned; a pair stops once its pool is full and no live score can beat
    its worst), written as one loop over `(N x Ta x width)` rows.
    """
    import tensorflow as tf

    ir = model_a(inputs, training=False)
    pairs = tf.shape(ir)[0] * tf.shape(ir)[1]
    x = tf.repeat(tf.reshape(ir, [-1, ir.shape[-1]]), width, axis=0)  # (P * W, H): pair-major
    size = model_b.outputs[0].shape[-1]
    sizes = feedback._state_sizes(model_b)
    minus_inf = tf.constant(-np.inf, tf.float64)
    rows = pairs * width
    states = [tf.zeros([rows, s], x.dtype) for s in sizes]
    score = tf.concat([tf.zeros([pairs, 1], tf.float64), tf.fill([pairs, width - 1], minus_inf)], 1)  # one beam
    fed = tf.zeros([rows, size], x.dtype)
    history_y = tf.zeros([pairs, width, max_steps, size], x.dtype)
    history_token = tf.zeros([pairs, width, max_steps], tf.int32)
    pool = (tf.fill([pairs, width], minus_inf), tf.zeros([pairs, width, max_steps, size], x.dtype),
            tf.zeros([pairs, width, max_steps], tf.int32), tf.zeros([pairs, width], tf.int32))

    def body(j, score, fed, states, history_y, history_token, pool):
        y, *new_states = model_b([x, fed, *states], training=False)
        logp = tf.nn.log_softmax(tf.cast(y, tf.float64), axis=-1)
        candidates = tf.reshape(score[:, :, None] + tf.reshape(logp, [pairs, width, size]), [pairs, width * size])
        scores, best = tf.math.top_k(candidates, k=width)
        valid = scores > minus_inf
        parent = best // size  # (P, W) beam of each kept candidate
        token = best % size
        steps_run = j + 1
        ended = tf.logical_and(valid, tf.logical_or(token == end, steps_run >= max_steps))
        # each kept candidate's history: its parent's, plus this step
        y_rows = tf.gather(tf.reshape(y, [pairs, width, size]), parent, batch_dims=1)
        step_mask = tf.one_hot(j, max_steps, dtype=x.dtype)[None, None, :, None]
        history_y = tf.gather(history_y, parent, batch_dims=1) * (1 - step_mask) + y_rows[:, :, None, :] * step_mask
        token_mask = tf.one_hot(j, max_steps, dtype=tf.int32)[None, None, :]
        history_token = (tf.gather(history_token, parent, batch_dims=1) * (1 - token_mask)
                         + token[:, :, None] * token_mask)
        ranked = tf.where(ended, scores, minus_inf)
        merged, pick = tf.math.top_k(tf.concat([pool[0], ranked], 1), k=width)
        pool = (merged,
                tf.gather(tf.concat([pool[1], history_y], 1), pick, batch_dims=1),
                tf.gather(tf.concat([pool[2], history_token], 1), pick, batch_dims=1),
                tf.gather(tf.concat([pool[3], tf.fill([pairs, width], steps_run)], 1), pick, batch_dims=1))
        live = tf.logical_and(valid, tf.logical_not(ended))
        best_live = tf.reduce_max(tf.where(live, scores, minus_inf), axis=1)
        beaten = tf.logical_and(merged[:, -1] > minus_inf, best_live <= merged[:, -1])
        live = tf.logical_and(live, tf.logical_not(beaten)[:, None])
        score = tf.where(live, scores, minus_inf)
        rows_of = tf.reshape(parent + tf.range(pairs)[:, None] * width, [-1])
        states = [tf.gather(s, rows_of) for s in new_states]
        fed = tf.one_hot(tf.reshape(token, [-1]), size, dtype=x.dtype)
        return j + 1, score, fed, states, history_y, history_token, pool

    *_, pool = tf.while_loop(
        lambda j, score, *_: tf.logical_and(j < max_steps, tf.reduce_any(score > minus_inf)), body,
        (tf.constant(0), score, fed, states, history_y, history_token, pool))
    lengths = pool[3][:, 0]
    mask = tf.sequence_mask(lengths, max_steps)
    return (tf.boolean_mask(pool[1][:, 0], mask), tf.boolean_mask(pool[2][:, 0], mask),
            tf.reshape(lengths, tf.shape(ir)[:2]))


def methods(model_a, model_b, *, max_steps, features):
    """`{name: function(inputs) -> (values, tokens, lengths)}`."""
    import tensorflow as tf

    from cascade_cli.options import Sampler, StopRule
    from cascade_cli.run.cascade import Cascade

    cascade = Cascade(model_a, model_b, feedback=True, sampler=Sampler.beam(WIDTH), max_steps=max_steps,
                      stop_rule=StopRule.token(END))

    def run_cascade(inputs):
        values, lengths, tokens = cascade.run(inputs, return_tokens=True)
        return values, tokens, lengths

    padded = tf.function(lambda inputs: padded_beam(model_a, model_b, inputs, width=WIDTH, max_steps=max_steps),
                         jit_compile=True, input_signature=[tf.TensorSpec([None, None, features], tf.float32)])
    return {"cascade": run_cascade, "padded_beam_xla": padded}


def check_equal(results):
    """Raises unless every method's tokens and lengths equal the first's and its values are allclose."""
    first, (values, tokens, lengths) = next(iter(results.items()))
    for name, (v, t, n) in results.items():
        if not (np.array_equal(np.asarray(n), np.asarray(lengths)) and np.array_equal(
                np.asarray(t, np.int64), np.asarray(tokens, np.int64))):
            raise AssertionError(f"{name}'s tokens or lengths differ from {first}'s")
        np.testing.assert_allclose(np.asarray(v), np.asarray(values), **feedback.TOLERANCE)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    import tensorflow as tf

    run_plan = feedback.plan(quick=args.quick, batches=None if args.quick else (8, 64))
    repeats = args.repeats or (1 if args.quick else 5)
    rng = np.random.default_rng(0)
    rows = []
    for case in run_plan.cases:
        model_a, model_b = feedback.build_models(features=run_plan.features, hidden=case.hidden,
                                                 outputs=run_plan.outputs, max_steps=run_plan.max_steps)
        inputs, _ = feedback.make_data(rng, case.batch, case.outer, features=run_plan.features,
                                       max_steps=run_plan.max_steps)
        functions = methods(model_a, model_b, max_steps=run_plan.max_steps, features=run_plan.features)
        tensor = tf.constant(inputs)
        results = {name: [np.asarray(t) for t in function(inputs if name == "cascade" else tensor)]
                   for name, function in functions.items()}  # the first call: traces and compiles
        check_equal(results)
        lengths = results["cascade"][2]
        print(f"{case.name}: values equal; mean length {lengths.mean():.2f}", file=sys.stderr)
        times = {name: [] for name in functions}
        for _ in range(repeats):
            for name, function in functions.items():
                start = time.perf_counter()
                out = function(inputs if name == "cascade" else tensor)
                np.asarray(out[0])
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
        rows.append((case.name, medians["cascade"], medians["padded_beam_xla"]))
    print("| case | cascade beam (ms) | padded beam, XLA (ms) | padded / cascade |")
    print("| --- | ---: | ---: | ---: |")
    for name, ours, padded in rows:
        print(f"| {name} | {ours:.1f} | {padded:.1f} | {padded / ours:.2f} |")


if __name__ == "__main__":
    main()
