"""The loop over B compiled whole (issue 29) against the plain loop, side by side in one process.

From the repository root, on an otherwise idle machine:

    python -m benchmarks.loop_ab             # under a minute on 2 cores
    python -m benchmarks.loop_ab --repeats 9
    python -m benchmarks.loop_ab --compaction  # compacted rows vs masked rows vs the padded XLA decode
    python -m benchmarks.loop_ab --fused       # one XLA call for A, plan, loop and packing vs A and loop apart
    python -m benchmarks.loop_ab --gradient    # XLA's gradient of A and the loop vs the hand-written one
    python -m benchmarks.loop_ab --chosen --batches 1,8,64,256  # carry's gradient chosen at run time vs XLA's
    python -m benchmarks.loop_ab --pieces      # teacher forcing: XLA's gradient taken apart, beside the peer
    python -m benchmarks.loop_ab --apart       # gradients traced apart (xla.traced_apart) vs in the backward pass

The feedback suite's models and data (`benchmarks.feedback`): greedy decoding
with the stop token `END`, `max_steps = 8`, in `reset` and in `carry`, at the
feedback suite's three cases. Each case runs one default `Cascade` (with
`jit_compile="auto"` the loop over B runs under XLA where it compiles) and
one whose loop is held on the plain path; model A runs under XLA in both, so
the ratio is the loop's alone. Lengths and tokens are checked equal and values
close before anything is timed; the timings are interleaved (three rounds of
`--repeats` calls each) and the median of the rounds' medians is printed, in
milliseconds. Nothing is asserted about speed: it is a measurement, not a test.
"""

import argparse
import os
import time

import numpy as np

from benchmarks import bench

CASES = ((1, 200, 64), (8, 100, 64), (64, 50, 64))


def _median_ms(function, inputs, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for part in function(inputs):
            np.asarray(part)
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times))


def _generators(model_a, model_b, *, state):
    """`{"compiled": run, "plain": run}`: the default loop choice, and the plain loop with A still under XLA."""
    from benchmarks.feedback import END
    from cascade_cli.run import cascade as runner, xla
    from cascade_cli.options import StopRule

    made = {}
    for name in ("compiled", "plain"):
        cascade = runner.Cascade(model_a, model_b, state=state, feedback=True, sampler="greedy", max_steps=8,
                                 stop_rule=StopRule.token(END))
        if name == "plain":
            cascade._loop_choice = xla.LoopChoice(False, "held on the plain loop by benchmarks.loop_ab")
        made[name] = lambda inputs, cascade=cascade: cascade.run(inputs, return_tokens=True)
    return made


def compaction(repeats):
    """`reset` greedy decode, the feedback suite's cases: the compiled loop with compacted rows (the default), with
    masked rows (`COMPACT_ROWS` out of reach) and the feedback suite's `padded_decode_xla`, in ms and as a ratio."""
    import tensorflow as tf

    from benchmarks import feedback
    from cascade_cli.run import compiled_loop

    rng = np.random.default_rng(0)
    print("case              compacted ms  masked ms  padded XLA ms  compacted / masked  compacted / padded  "
          "masked / padded")
    for n, ta, hidden in CASES:
        model_a, model_b = feedback.build_models(features=16, hidden=hidden, outputs=16, max_steps=8)
        inputs = tf.constant(feedback.make_data(rng, n, ta, features=16, max_steps=8)[0])
        made = {}
        for name, rows in (("compacted", compiled_loop.COMPACT_ROWS), ("masked", 10**9)):
            default, compiled_loop.COMPACT_ROWS = compiled_loop.COMPACT_ROWS, rows  # read when the loop is traced
            try:
                made[name] = _generators(model_a, model_b, state="reset")["compiled"]
                results = [np.asarray(part) for part in made[name](inputs)]
            finally:
                compiled_loop.COMPACT_ROWS = default
            made[name + " result"] = results
        first, second = made.pop("compacted result"), made.pop("masked result")
        assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second)), "compacted and masked rows differ"
        padded = feedback.make_method("padded_decode_xla", model_a, model_b, direction="forward",
                                      run_plan=feedback.plan())[0]
        made["padded"] = padded
        rounds = {name: [] for name in made}
        for _ in range(3):
            for name, function in made.items():
                rounds[name].append(_median_ms(function, inputs, repeats))
        compacted, masked, padded = (float(np.median(rounds[name])) for name in ("compacted", "masked", "padded"))
        print(f"N={n:<3} Ta={ta:<4} H={hidden}  {compacted:12.1f}  {masked:9.1f}  {padded:13.1f}  "
              f"{compacted / masked:18.2f}  {compacted / padded:18.2f}  {masked / padded:15.2f}", flush=True)


def _fused_pair(make, inputs, steps):
    """`{"fused": run, "apart": run}` from `make() -> (cascade, run(inputs, steps))`; results checked equal first:
    lengths and tokens exactly, values bit for bit."""
    made, results = {}, {}
    for name in ("fused", "apart"):
        cascade, function = make()
        if name == "apart":
            cascade._loops["fused"] = False  # held on A's and the loop's own XLA calls
        made[name] = (lambda _i, _s, f=function: f(inputs, steps))
        results[name] = [np.asarray(part) for part in function(inputs, steps)]
        made[name + " cascade"] = cascade
    assert made["fused cascade"].loop_fused is True, made["fused cascade"]._loops.get("fused problem")
    for want, got in zip(results["apart"], results["fused"]):
        assert want.shape == got.shape and want.tobytes() == got.tobytes(), "fused and apart differ"
    return {name: made[name] for name in ("fused", "apart")}


def fused(repeats, rounds, batches):
    """The fused forward call (`cascade_cli.run.fused`) against A and the loop as their own XLA calls, and the best
    padded peer of each suite, interleaved medians in ms. The cases: the feedback suite's greedy decode (`reset`,
    and `carry`), eager `run`; the peers suite's `carry` forward inside a `tf.function` (as it times `cascade`)."""
    import tensorflow as tf

    from benchmarks import feedback, peers
    from cascade_cli.run import cascade as runner
    from cascade_cli.options import StopRule

    rng = np.random.default_rng(0)
    print("case                          fused ms  apart ms  peer ms  fused/apart  fused/peer  apart/peer  load")
    for n, ta, hidden in CASES:
        if n not in batches:
            continue
        rows = []
        model_a, model_b = feedback.build_models(features=16, hidden=hidden, outputs=16, max_steps=8)
        inputs = tf.constant(feedback.make_data(rng, n, ta, features=16, max_steps=8)[0])
        for state in ("reset", "carry"):
            def make(state=state):
                cascade = runner.Cascade(model_a, model_b, state=state, feedback=True, sampler="greedy",
                                         max_steps=8, stop_rule=StopRule.token(feedback.END))
                return cascade, lambda inputs, _steps: cascade.run(inputs, return_tokens=True)
            made = _fused_pair(make, inputs, None)
            peer = None
            if state == "reset":
                padded = feedback.make_method("padded_decode_xla", model_a, model_b, direction="forward",
                                              run_plan=feedback.plan())[0]
                peer = lambda _i, _s, padded=padded: padded(inputs)
            rows.append((f"feedback {state} N={n}", made, peer))
        peer_a, peer_b = bench.build_models(features=16, hidden=hidden, outputs=16)
        x = tf.constant(rng.normal(size=(n, ta, 16)).astype(np.float32))
        steps = tf.constant(bench.make_steps(rng, n, ta, max_steps=8))

        def make_carry():
            cascade = runner.Cascade(peer_a, peer_b, state="carry")
            return cascade, peers._traced_once(lambda i, s: (cascade(i, s).flat_values,), peer_a)
        made = _fused_pair(make_carry, x, steps)
        padded, _ = peers.make_keras_padded(peer_a, peer_b, state="carry", direction="forward", xla=True,
                                            max_steps=8, hidden=hidden)
        rows.append((f"peers carry N={n}", made, lambda _i, _s: padded(x, steps)))
        for name, made, peer in rows:
            ms = bench.rounds_ms(dict(made, **({} if peer is None else {"peer": peer})), repeats=repeats, rounds=rounds)
            load = bench.load_average()
            peer_ms = ms.get("peer", float("nan"))
            print(f"{name:28}  {ms['fused']:8.2f}  {ms['apart']:8.2f}  {peer_ms:7.2f}  {ms['fused'] / ms['apart']:11.2f}"
                  f"  {ms['fused'] / peer_ms:10.2f}  {ms['apart'] / peer_ms:10.2f}  {load}", flush=True)


def _teacher_trainer(runner, feedback, model_a, model_b):
    """`(cascade, train(inputs, steps, targets))`: the feedback suite's teacher-forced forward+backward, as
    `feedback.make_method("cascade", ..., direction="forward+backward")` makes it (an eager call under a tape)."""
    import tensorflow as tf

    cascade = runner.Cascade(model_a, model_b, feedback=True)
    weights = model_a.trainable_variables + model_b.trainable_variables

    def train(inputs, steps, targets):
        with tf.GradientTape() as tape:
            values, _ = cascade.run(inputs, steps, targets=targets, training=True)
            loss = feedback.teacher_loss(targets, values)
        return tape.gradient(loss, weights)

    return cascade, train


def _gradient_pair(make, arguments):
    """`{"xla": run, "hand": run}` from `make() -> (cascade, run(*arguments) -> gradients)`: XLA's gradient of A
    and the loop with known inputs (`Cascade.gradient_fused`), whatever the rule chooses, and the plain path
    with its hand-written gradient; gradients checked equal first (float32 rounding)."""
    from cascade_cli.run import xla

    made, results = {}, {}
    for name in ("xla", "hand"):
        cascade, function = make()
        if name == "hand":
            cascade._loops["gradient"] = False  # held on the plain path and its hand-written gradient
        made[name] = (lambda _i, _s, f=function: f(*arguments))
        chosen = xla.hand_written
        if name == "xla":  # XLA's gradient even where the rule leaves the loop to the hand-written one
            xla.hand_written = lambda *_, **__: False  # read where the call is traced: its first call
        try:
            results[name] = [np.asarray(g) for g in function(*arguments)]
        finally:
            xla.hand_written = chosen
        made[name + " cascade"] = cascade
    assert made["xla cascade"].gradient_fused is True, made["xla cascade"]._loops.get("gradient problem")
    assert made["hand cascade"].gradient_fused is False
    for want, got in zip(results["hand"], results["xla"]):
        scale = max(1.0, float(np.max(np.abs(want))))
        assert np.max(np.abs(got - want)) <= 1e-4 * scale, "XLA's and the hand-written gradients differ"
    return {name: made[name] for name in ("xla", "hand")}


def gradient(repeats, rounds, batches):
    """XLA's gradient of A and the loop over B with known inputs (`cascade_cli.run.known.run_known_gradient`)
    against the plain path's hand-written one, and the best padded XLA peer, interleaved medians in ms: the peers
    suite's `reset` and `carry` forward+backward (inside a `tf.function`, as it times `cascade`) and the feedback
    suite's teacher-forced forward+backward (an eager call under an eager tape, as it times `cascade`)."""
    import tensorflow as tf

    from benchmarks import feedback, peers
    from cascade_cli.run import cascade as runner

    rng = np.random.default_rng(0)
    peer_plan, feedback_plan = peers.plan(), feedback.plan()
    print("case                          xla ms   hand ms  peer ms  xla/hand  xla/peer  hand/peer  load")
    for n, ta, hidden in CASES:
        if n not in batches:
            continue
        rows = []
        peer_a, peer_b = bench.build_models(features=peer_plan.features, hidden=hidden, outputs=peer_plan.outputs)
        weights = peer_a.trainable_variables + peer_b.trainable_variables
        x = tf.constant(rng.normal(size=(n, ta, peer_plan.features)).astype(np.float32))
        steps = tf.constant(bench.make_steps(rng, n, ta, max_steps=peer_plan.max_steps))
        for state in ("reset", "carry"):
            def make(state=state):
                cascade = runner.Cascade(peer_a, peer_b, state=state)

                def run(inputs, steps):
                    with tf.GradientTape() as tape:
                        total = tf.reduce_sum(cascade(inputs, steps).flat_values)
                    return tape.gradient(total, weights)
                return cascade, peers._traced_once(run, peer_a)
            made = _gradient_pair(make, (x, steps))
            padded, _ = peers.make_keras_padded(peer_a, peer_b, state=state, direction="forward+backward", xla=True,
                                                max_steps=peer_plan.max_steps, hidden=hidden)
            rows.append((f"peers {state} N={n}", made, lambda _i, _s, padded=padded: padded(x, steps)))
        model_a, model_b = feedback.build_models(features=feedback_plan.features, hidden=hidden,
                                                 outputs=feedback_plan.outputs, max_steps=feedback_plan.max_steps)
        inputs, lengths = feedback.make_data(rng, n, ta, features=feedback_plan.features,
                                             max_steps=feedback_plan.max_steps)
        tokens = np.concatenate([np.append(np.arange(1, length), feedback.END) for length in lengths.ravel()])
        arguments = (inputs, lengths, tokens.astype(np.int32))

        def make_teacher():
            return _teacher_trainer(runner, feedback, model_a, model_b)
        made = _gradient_pair(make_teacher, arguments)
        peer = feedback.make_method("padded_decode_xla", model_a, model_b, direction="forward+backward",
                                    run_plan=feedback_plan)[0]
        tensors = tuple(tf.constant(a) for a in arguments)
        rows.append((f"teacher N={n}", made, lambda _i, _s, peer=peer, tensors=tensors: peer(*tensors)))
        for name, made, peer in rows:
            ms = bench.rounds_ms(dict(made, peer=peer), repeats=repeats, rounds=rounds)
            load = bench.load_average()
            print(f"{name:28}  {ms['xla']:7.2f}  {ms['hand']:7.2f}  {ms['peer']:7.2f}  {ms['xla'] / ms['hand']:8.2f}"
                  f"  {ms['xla'] / ms['peer']:8.2f}  {ms['hand'] / ms['peer']:9.2f}  {load}", flush=True)


def chosen_gradient(repeats, rounds, batches):
    """`carry` forward+backward inside the peers suite's `tf.function`, traced for any batch: main's rule (XLA's
    gradient, the trace does not know its batch) against the batch choosing at run time
    (`cascade_cli.run.known.run_chosen_gradient`: XLA's below `XLA_GRADIENT_BELOW` samples, the hand-written one
    from there), interleaved medians in ms; gradients checked equal first (float32 rounding)."""
    import tensorflow as tf

    from benchmarks import peers
    from cascade_cli.run import cascade as runner, xla

    rng = np.random.default_rng(0)
    plan = peers.plan()
    print("case                  old ms   new ms  new/old  load (1, 5, 15 min)")
    for case in plan.cases:
        if case.batch not in batches:
            continue
        peer_a, peer_b = bench.build_models(features=plan.features, hidden=case.hidden, outputs=plan.outputs)
        weights = peer_a.trainable_variables + peer_b.trainable_variables
        x = tf.constant(rng.normal(size=(case.batch, case.outer, plan.features)).astype(np.float32))
        steps = tf.constant(bench.make_steps(rng, case.batch, case.outer, max_steps=plan.max_steps))
        made, results = {}, {}
        for name in ("old", "new"):
            cascade = runner.Cascade(peer_a, peer_b, state="carry")

            def run(inputs, steps, cascade=cascade):
                with tf.GradientTape() as tape:
                    total = tf.reduce_sum(cascade(inputs, steps).flat_values)
                return tape.gradient(total, weights)
            function = peers._traced_once(run, peer_a)
            rule = xla.chooses_gradient
            if name == "old":  # main's: read where the call is traced, its first call
                xla.chooses_gradient = lambda *_, **__: False
            try:
                results[name] = [np.asarray(g) for g in function(x, steps)]
            finally:
                xla.chooses_gradient = rule
            made[name] = (lambda _i, _s, f=function: f(x, steps))
        for want, got in zip(results["old"], results["new"]):
            scale = max(1.0, float(np.max(np.abs(want))))
            assert np.max(np.abs(got - want)) <= 1e-4 * scale, "the old and new gradients differ"
        ms = bench.rounds_ms(made, repeats=repeats, rounds=rounds)
        load = bench.load_average()
        print(f"{case.name:20}  {ms['old']:7.1f}  {ms['new']:7.1f}  {ms['new'] / ms['old']:7.2f}  {load}", flush=True)


def _timed(made, repeats, rounds):
    """`({key: ms}, {key: cpu ms})`: interleaved rounds, the median of each call's per-round median wall time,
    and the median of its per-round process CPU time per call (every thread of the process, so also what the
    wall time loses to other processes' load)."""
    wall, cpu = {key: [] for key in made}, {key: [] for key in made}
    for _ in range(rounds):
        for key, function in made.items():
            [np.asarray(part) for part in function()]  # warm
            times, started_cpu = [], time.process_time()
            for _ in range(repeats):
                started = time.perf_counter()
                [np.asarray(part) for part in function()]
                times.append(time.perf_counter() - started)
            cpu[key].append((time.process_time() - started_cpu) / repeats * 1e3)
            wall[key].append(float(np.median(times)) * 1e3)
    return ({key: float(np.median(values)) for key, values in table.items()} for table in (wall, cpu))


def pieces(repeats, rounds, batches):
    """The feedback suite's teacher-forced forward+backward taken apart: the whole eager call under a tape on the
    hand-written gradient and on XLA's (`known.run_known_gradient`), XLA's forward and gradient functions
    alone, the gradient function asked for the weights' gradients only (no inputs' nor targets'), model A's
    vector-Jacobian product alone and B's loop's gradient alone (`known_rows_values` from A's outputs), each
    its own `jit_compile` call; and the padded XLA peer. Interleaved, ms and CPU ms per call."""
    import tensorflow as tf

    from benchmarks import feedback
    from cascade_cli.run import cascade as runner, compiled_loop, known, xla

    rng = np.random.default_rng(0)
    run_plan = feedback.plan()
    print("case            piece                                  ms   cpu ms  load")
    for n, ta, hidden in CASES:
        if n not in batches:
            continue
        model_a, model_b = feedback.build_models(features=run_plan.features, hidden=hidden, outputs=run_plan.outputs,
                                                 max_steps=run_plan.max_steps)
        inputs, lengths = feedback.make_data(rng, n, ta, features=run_plan.features, max_steps=run_plan.max_steps)
        tokens = np.concatenate([np.append(np.arange(1, length), feedback.END) for length in lengths.ravel()])
        arguments = tuple(tf.constant(a) for a in (inputs, lengths, tokens.astype(np.int32)))
        a_weights, b_weights = model_a.trainable_variables, model_b.trainable_variables
        peer = feedback.make_method("padded_decode_xla", model_a, model_b, direction="forward+backward",
                                    run_plan=run_plan)[0]
        made = {"padded XLA peer, whole": lambda: peer(*arguments)}
        for path in ("hand", "xla"):
            cascade, train = _teacher_trainer(runner, feedback, model_a, model_b)
            rule = xla.hand_written
            if path == "xla":  # read where the call is traced: its first call
                xla.hand_written = lambda *_, **__: False
            try:
                train(*arguments)
            finally:
                xla.hand_written = rule
            assert cascade.gradient_fused is (True if path == "xla" else None)
            made[f"cascade, {path}-written gradient" if path == "hand" else "cascade, XLA's gradient"] = (
                lambda train=train: train(*arguments))
        forward, gradient = next(value for key, value in cascade._loops.items() if key[0] == "known")
        x, caps = arguments[:2]
        targets = tf.one_hot(arguments[2], run_plan.outputs)
        trip = compiled_loop.trip(caps, walk=False, max_steps=cascade.max_steps)
        padded, _ = compiled_loop.call(forward, x, caps, trip, targets)
        upstream = tf.random.stateless_normal(tf.shape(padded), (0, 1))
        step, quantum = cascade._b_step(True), cascade._row_quantum

        def rows_values(table, targets):
            return known.known_rows_values(cascade, compiled_loop.Step.called(step), table, caps, trip, targets,
                                           walk=False, quantum=quantum)[0]

        def weights_only(x):
            with tf.GradientTape() as tape:
                values = rows_values(tf.reshape(model_a(x, training=True), [-1, hidden]), targets)
            return tape.gradient(values, a_weights + b_weights, output_gradients=upstream)

        def a_vjp(x, upstream):
            with tf.GradientTape() as tape:
                ir = model_a(x, training=True)
            return tape.gradient(ir, a_weights, output_gradients=upstream)

        def b_gradient(table):
            with tf.GradientTape() as tape:
                tape.watch(table)
                values = rows_values(table, targets)
            return tape.gradient(values, [table, *b_weights], output_gradients=upstream)

        table = tf.reshape(model_a(x), [-1, hidden])
        a_upstream = tf.ones_like(model_a(x))
        jit = {name: tf.function(f, jit_compile=True, autograph=False)
               for name, f in (("weights", weights_only), ("a", a_vjp), ("b", b_gradient))}
        shaped = {name: tf.function(f.python_function, jit_compile=True, autograph=False)  # traced for these shapes
                  for name, f in (("forward", forward), ("gradient", gradient))}
        made.update({
            "XLA's forward function alone": lambda: compiled_loop.call(forward, x, caps, trip, targets),
            "  the same, traced for these shapes": lambda: shaped["forward"](x, caps, trip, targets),
            "XLA's gradient function alone": lambda: compiled_loop.call(gradient, x, caps, trip, targets, upstream),
            "  the same, traced for these shapes ": lambda: shaped["gradient"](x, caps, trip, targets, upstream),
            "  the same, weights' gradients only": lambda: jit["weights"](x),
            "  A's vector-Jacobian product alone": lambda: jit["a"](x, a_upstream),
            "  B's loop's gradient alone": lambda: jit["b"](table),
        })
        wall, cpu = _timed(made, repeats, rounds)
        load = bench.load_average()
        for key in made:
            print(f"teacher N={n:<4}  {key:36}  {wall[key]:6.2f}  {cpu[key]:7.2f}  {load}", flush=True)


def traced_apart_ab(repeats, rounds, batches):
    """XLA's gradient functions traced apart (`xla.traced_apart`, now) against traced in the backward pass that
    first calls them (main before), on the hand-written gradient and on XLA's: the feedback suite's teacher-forced
    forward+backward (an eager call under an eager tape) and the peers suite's `reset` and `carry`
    forward+backward (inside a `tf.function`; `carry` takes XLA's gradient below `xla.XLA_GRADIENT_BELOW`
    samples either way), beside the padded XLA peer; one process, interleaved, ms and CPU ms per call; gradients
    checked equal first."""
    import tensorflow as tf

    from benchmarks import feedback, peers
    from cascade_cli.run import cascade as runner, xla

    rng = np.random.default_rng(0)
    feedback_plan, peer_plan = feedback.plan(), peers.plan()
    print("case                path  old ms  new ms  new/old  old cpu  new cpu  peer ms  new/peer  load")
    for n, ta, hidden in CASES:
        if n not in batches:
            continue
        model_a, model_b = feedback.build_models(features=feedback_plan.features, hidden=hidden,
                                                 outputs=feedback_plan.outputs, max_steps=feedback_plan.max_steps)
        inputs, lengths = feedback.make_data(rng, n, ta, features=feedback_plan.features,
                                             max_steps=feedback_plan.max_steps)
        tokens = np.concatenate([np.append(np.arange(1, length), feedback.END) for length in lengths.ravel()])
        teacher_arguments = tuple(tf.constant(a) for a in (inputs, lengths, tokens.astype(np.int32)))
        peer_a, peer_b = bench.build_models(features=peer_plan.features, hidden=hidden, outputs=peer_plan.outputs)
        x = tf.constant(rng.normal(size=(n, ta, peer_plan.features)).astype(np.float32))
        steps = tf.constant(bench.make_steps(rng, n, ta, max_steps=peer_plan.max_steps))

        def make_teacher():
            cascade, train = _teacher_trainer(runner, feedback, model_a, model_b)
            return cascade, lambda: train(*teacher_arguments)

        def make_peers(state):
            cascade = runner.Cascade(peer_a, peer_b, state=state)
            weights = peer_a.trainable_variables + peer_b.trainable_variables

            def run(inputs, steps):
                with tf.GradientTape() as tape:
                    total = tf.reduce_sum(cascade(inputs, steps).flat_values)
                return tape.gradient(total, weights)
            traced = peers._traced_once(run, peer_a)
            return cascade, lambda: traced(x, steps)
        teacher_peer = feedback.make_method("padded_decode_xla", model_a, model_b, direction="forward+backward",
                                            run_plan=feedback_plan)[0]
        cases = [("teacher", make_teacher, lambda: teacher_peer(*teacher_arguments))]
        for state in ("reset", "carry"):
            padded, _ = peers.make_keras_padded(peer_a, peer_b, state=state, direction="forward+backward", xla=True,
                                                max_steps=peer_plan.max_steps, hidden=hidden)
            cases.append((f"peers {state}", lambda state=state: make_peers(state),
                          lambda padded=padded: padded(x, steps)))
        for case, make, peer in cases:
            made, results = {"peer": peer}, {}
            for path in ("hand", "xla"):
                for name in ("old", "new"):
                    rule, apart = xla.hand_written, xla.traced_apart
                    if path == "xla":  # both read where the call is traced: its first call
                        xla.hand_written = lambda *_, **__: False
                    if name == "old":
                        xla.traced_apart = lambda *_: None
                    try:
                        cascade, function = make()
                        results[path, name] = [np.asarray(g) for g in function()]
                    finally:
                        xla.hand_written, xla.traced_apart = rule, apart
                    if case != "peers carry":  # whose rule takes XLA's gradient below 32 samples on either path
                        assert cascade.gradient_fused is (True if path == "xla" else None)
                    made[path, name] = function
            for key, got in results.items():
                for want, value in zip(results["hand", "old"], got):
                    assert np.max(np.abs(value - want)) <= 1e-4 * max(1.0, float(np.max(np.abs(want)))), key
            ms, cpu = _timed(made, repeats, rounds)
            load = bench.load_average()
            for path in ("hand", "xla"):
                old, new = ms[path, "old"], ms[path, "new"]
                print(f"{case + ' N=' + str(n):18}  {path:4}  {old:6.1f}  {new:6.1f}  {new / old:7.2f}  "
                      f"{cpu[path, 'old']:7.1f}  {cpu[path, 'new']:7.1f}  {ms['peer']:7.1f}  {new / ms['peer']:8.2f}"
                      f"  {load}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loop_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per round (default 7)")
    parser.add_argument("--compaction", action="store_true",
                        help="compacted rows against masked rows and the padded XLA decode (reset, greedy)")
    parser.add_argument("--fused", action="store_true",
                        help="one XLA call for A, the plan, the loop and the packing vs A and the loop apart")
    parser.add_argument("--gradient", action="store_true",
                        help="XLA's gradient of A and the loop with known inputs vs the hand-written one")
    parser.add_argument("--chosen", action="store_true",
                        help="carry forward+backward in a trace for any batch: XLA's gradient (main) vs the batch "
                             "choosing at run time")
    parser.add_argument("--pieces", action="store_true",
                        help="teacher forcing: XLA's gradient taken apart, beside the whole call and the peer")
    parser.add_argument("--apart", action="store_true",
                        help="gradients traced apart (xla.traced_apart) vs traced in the backward pass")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of --repeats calls (--fused, --gradient, --chosen, --pieces, --apart; default 3)")
    parser.add_argument("--batches", default="1,8,64",
                        help="the N of the cases to run (--fused, --gradient, --chosen, --pieces, --apart; "
                             "default 1,8,64)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.apart:
        return traced_apart_ab(args.repeats, args.rounds, {int(n) for n in args.batches.split(",")})
    if args.pieces:
        return pieces(args.repeats, args.rounds, {int(n) for n in args.batches.split(",")})
    if args.chosen:
        return chosen_gradient(args.repeats, args.rounds, {int(n) for n in args.batches.split(",")})
    if args.gradient:
        return gradient(args.repeats, args.rounds, {int(n) for n in args.batches.split(",")})
    if args.fused:
        return fused(args.repeats, args.rounds, {int(n) for n in args.batches.split(",")})
    if args.compaction:
        return compaction(args.repeats)
    import tensorflow as tf

    from benchmarks import feedback

    rng = np.random.default_rng(0)
    print("state  case              compiled ms  plain ms  compiled / plain  loop compiled")
    for state in ("reset", "carry"):
        for n, ta, hidden in CASES:
            model_a, model_b = feedback.build_models(features=16, hidden=hidden, outputs=16, max_steps=8)
            inputs = tf.constant(feedback.make_data(rng, n, ta, features=16, max_steps=8)[0])
            made = _generators(model_a, model_b, state=state)
            plain, compiled = ([np.asarray(part) for part in made[name](inputs)] for name in ("plain", "compiled"))
            assert all(np.array_equal(p, c) for p, c in zip(plain[1:], compiled[1:])), "lengths or tokens differ"
            assert np.allclose(plain[0], compiled[0], rtol=1e-4, atol=1e-4), "values differ"
            rounds = {name: [] for name in made}
            for _ in range(3):
                for name, function in made.items():
                    rounds[name].append(_median_ms(function, inputs, args.repeats))
            fast, slow = (float(np.median(rounds[name])) for name in ("compiled", "plain"))
            chosen = made["compiled"].__defaults__[0].loop_compiled
            print(f"{state:6} N={n:<3} Ta={ta:<4} H={hidden}  {fast:11.1f}  {slow:8.1f}  {fast / slow:16.2f}  {chosen}",
                  flush=True)


if __name__ == "__main__":
    main()
