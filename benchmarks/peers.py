"""Times the cascade as it comes against the peers a user would pick instead (issue 16).

Run from the repository root, on an otherwise idle machine:

    python -m benchmarks.peers                 # full run, medians of 7 (minutes)
    python -m benchmarks.peers --quick         # tiny shapes, 1 repeat (seconds)

The peers, each on the same models, inputs and steps, values checked equal to
the cascade's before anything is timed:

- `keras_padded`: what a Keras user writes. `reset`: the pairs with steps > 0,
  their IR vectors repeated to `(P, L, H)`, `keras.layers.GRU(return_sequences=
  True)` with a mask, then `Dense`. `carry`: each sample's inner steps
  flattened into one padded sequence `(N, max_total, H)` (the IR of the outer
  step each position belongs to), the same GRU and Dense. The GRU and Dense
  carry B's own weights.
- `keras_padded_xla`: the same under XLA (`jit_compile=True`, gradient taken
  inside the compiled function, as Keras' `compile(jit_compile=True)` does),
  padded to `max_steps` in `reset` and to the batch's longest total in `carry`;
  the pair indices and masks, which XLA cannot compute, are worked out first.
- `torch_packed`: PyTorch, `nn.GRU` + `pack_padded_sequence` for A and B and
  `nn.Linear`, the same weights (when `torch` imports; the optional `bench`
  extra).

and the cascade itself: `readme` is the README's call, `cascade(inputs, steps)`
on numpy inputs and steps, eagerly (forward + backward: under an eager
`tf.GradientTape`); `cascade` the same default `Cascade(a, b)` called inside
an explicit `tf.function`; `cascade_plain` with `jit_compile=False`; `nested`
the hand-written nested loops (`benchmarks/nested.py`). Repeats are
interleaved across methods, medians reported; results are merged into
`results.json` and `RESULTS.md` beside `benchmarks.bench`'s runs.
"""

import dataclasses
import importlib.util
import sys
import time

import numpy as np

from benchmarks import bench

SUITE = "peers"
CASCADE_METHODS = ("readme", "cascade", "cascade_plain", "nested")
PEERS = ("keras_padded", "keras_padded_xla", "torch_packed")
METHODS = CASCADE_METHODS + PEERS
STATES = ("reset", "carry")
DIRECTIONS = ("forward", "forward+backward")
TOLERANCE = {"atol": 2e-4, "rtol": 2e-4}  # float32, different summation orders (oneDNN, XLA, PyTorch)


@dataclasses.dataclass(frozen=True)
class PeerPlan(bench.BasePlan):
    """What one peers run does: the issue's four cases, or tiny ones; and the `bench.BasePlan` settings.

    Attributes:
        cases: `bench.Case` entries, smallest batch first.
    """

    cases: tuple


def plan(*, quick=False, repeats=None, batches=None):
    """Returns the plan of issue 16 (or its tiny `quick` version); `batches` keeps only the cases of those `N`."""
    if quick:
        shapes, features, outputs, max_steps = ((1, 6, 4), (3, 5, 4)), 3, 2, 3
    else:
        shapes, features, outputs, max_steps = ((1, 200, 64), (8, 100, 64), (64, 50, 64), (256, 50, 256)), 16, 16, 8
    cases = tuple(bench.Case(f"N={n} Ta={ta} H={h}", n, ta, h) for n, ta, h in shapes
                  if batches is None or n in batches)
    return PeerPlan(cases=cases, features=features, outputs=outputs, max_steps=max_steps,
                    repeats=repeats if repeats is not None else (1 if quick else 7), warmups=1, quick=quick)


def has_torch():
    """Whether PyTorch can be imported (the optional `bench` extra)."""
    return importlib.util.find_spec("torch") is not None


# ------------------------------------------------------------------ the layers a peer uses


def b_layers(model_b):
    """`(cell, head)`: B's `GRUCell` and `Dense`, the layers whose weights every peer copies."""
    import keras

    cells = [layer for layer in model_b.layers if isinstance(layer, keras.layers.GRUCell)]
    heads = [layer for layer in model_b.layers if isinstance(layer, keras.layers.Dense)]
    if len(cells) != 1 or len(heads) != 1:
        raise ValueError(f"the peers need B = GRUCell then Dense. Received: {[layer.name for layer in model_b.layers]}")
    return cells[0], heads[0]


def keras_peer_layers(model_b, hidden):
    """A `keras.layers.GRU(return_sequences=True)` and a `Dense` holding B's weights (copies, not shared)."""
    import keras

    cell, head = b_layers(model_b)
    gru = keras.layers.GRU(cell.units, return_sequences=True)
    gru.build((None, None, hidden))
    gru.set_weights(cell.get_weights())
    dense = keras.layers.Dense(head.units)
    dense.build((None, cell.units))
    dense.set_weights(head.get_weights())
    return gru, dense


def reset_pairs(steps):
    """`(pairs (P, 2) int64, lengths (P,) int32)`: the `(n, t)` with steps > 0, in value order."""
    import tensorflow as tf

    pairs = tf.where(steps > 0)
    return pairs, tf.gather_nd(steps, pairs)


def carry_layout(steps):
    """`(index (total, 2), value_pairs (total,), totals (N,))`: where each inner step sits in `(N, max_total)`."""
    import tensorflow as tf

    outer = tf.shape(steps)[1]
    flat = tf.reshape(steps, [-1])
    value_pairs = tf.repeat(tf.range(tf.size(flat)), flat)
    samples = value_pairs // outer
    totals = tf.reduce_sum(steps, axis=1)
    positions = tf.range(tf.size(value_pairs)) - tf.gather(tf.cumsum(totals, exclusive=True), samples)
    return tf.stack([samples, positions], axis=1), value_pairs, totals


def keras_padded_outputs(model_a, gru, dense, inputs, *, state, gather, mask):
    """The padded peer's outputs `(rows, L, O)`: IR rows laid out as `mask (rows, L)` says, one masked GRU, Dense.

    `gather` is `pairs (P, 2)` in `reset` (each row one pair, its IR repeated
    `L` times) or `(index (total, 2), value_pairs (total,))` in `carry` (each
    row one sample, position `p` fed the IR of the outer step it belongs to).
    """
    import tensorflow as tf

    ir = model_a(inputs, training=False)
    if state == "reset":
        x = tf.gather_nd(ir, gather)
        x = tf.tile(x[:, None, :], [1, tf.shape(mask)[1], 1])
    else:
        index, value_pairs = gather
        ir_flat = tf.reshape(ir, [-1, ir.shape[-1]])
        x = tf.scatter_nd(index, tf.gather(ir_flat, value_pairs),
                          tf.stack([tf.shape(mask)[0], tf.shape(mask)[1], ir.shape[-1]]))
    return dense(gru(x, mask=mask, training=False))


def make_keras_padded(model_a, model_b, *, state, direction, xla, max_steps, hidden):
    """Returns `(function(inputs, steps), weights)` for `keras_padded` or `keras_padded_xla`.

    `forward` returns the valid outputs in value order; `forward+backward` the
    gradient of their sum with respect to A's and the peer's GRU and Dense weights.
    """
    import tensorflow as tf

    gru, dense = keras_peer_layers(model_b, hidden)
    weights = model_a.trainable_variables + gru.trainable_variables + dense.trainable_variables

    def layout(steps):
        """Pair indices and the mask, worked out before the (maybe compiled) model part."""
        if state == "reset":
            pairs, lengths = reset_pairs(steps)
            return pairs, tf.sequence_mask(lengths, max_steps if xla else tf.reduce_max(lengths))
        index, value_pairs, totals = carry_layout(steps)
        return (index, value_pairs), tf.sequence_mask(totals, tf.reduce_max(totals))

    def padded(inputs, gather, mask):
        return keras_padded_outputs(model_a, gru, dense, inputs, state=state, gather=gather, mask=mask)

    def padded_gradients(inputs, gather, mask):
        with tf.GradientTape() as tape:
            y = padded(inputs, gather, mask)
            total = tf.reduce_sum(tf.where(mask[:, :, None], y, tf.zeros_like(y)))
        return tape.gradient(total, weights)

    core = padded if direction == "forward" else padded_gradients
    if xla:
        core = tf.function(core, jit_compile=True)  # compiles once per shape: once per case here

    def run(inputs, steps):
        gather, mask = layout(steps)
        result = core(inputs, gather, mask)
        return tf.boolean_mask(result, mask) if direction == "forward" else result

    return _traced_once(run, model_a), weights


def _traced_once(function, model_a):
    """`tf.function(function)` traced once for inputs `(None, None, F)` and steps `(None, None)` int32."""
    import tensorflow as tf

    signature = [tf.TensorSpec((None, None, model_a.inputs[0].shape[-1]), tf.float32),
                 tf.TensorSpec((None, None), tf.int32)]
    return tf.function(function, input_signature=signature)


# ------------------------------------------------------------------------------ PyTorch


def keras_gru_to_torch(layer, gru):
    """Copies a Keras GRU / GRUCell's weights (gates z, r, h; `reset_after`) into a PyTorch `nn.GRU` (r, z, n)."""
    import torch

    kernel, recurrent, bias = layer.get_weights()
    units = recurrent.shape[0]

    def reorder(matrix):
        z, r, h = (matrix[..., i * units:(i + 1) * units] for i in range(3))
        return np.concatenate([r, z, h], axis=-1)

    with torch.no_grad():
        gru.weight_ih_l0.copy_(torch.from_numpy(reorder(kernel).T.copy()))
        gru.weight_hh_l0.copy_(torch.from_numpy(reorder(recurrent).T.copy()))
        gru.bias_ih_l0.copy_(torch.from_numpy(reorder(bias[0]).copy()))
        gru.bias_hh_l0.copy_(torch.from_numpy(reorder(bias[1]).copy()))


def make_torch_packed(model_a, model_b, *, state, direction):
    """Returns `function(inputs, steps)` for `torch_packed` (numpy in; values or gradients out)."""
    import keras
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    a_gru = next(layer for layer in model_a.layers if isinstance(layer, keras.layers.GRU))
    cell, head = b_layers(model_b)
    features, hidden = a_gru.get_weights()[0].shape[0], a_gru.units
    torch_a = torch.nn.GRU(features, hidden, batch_first=True)
    keras_gru_to_torch(a_gru.cell, torch_a)
    torch_b = torch.nn.GRU(hidden, cell.units, batch_first=True)
    keras_gru_to_torch(cell, torch_b)
    torch_head = torch.nn.Linear(cell.units, head.units)
    kernel, bias = head.get_weights()
    with torch.no_grad():
        torch_head.weight.copy_(torch.from_numpy(kernel.T.copy()))
        torch_head.bias.copy_(torch.from_numpy(bias.copy()))
    parameters = [*torch_a.parameters(), *torch_b.parameters(), *torch_head.parameters()]

    def forward(inputs, steps):
        ir, _ = torch_a(inputs)
        if state == "reset":
            pairs = steps.nonzero(as_tuple=True)
            lengths = steps[pairs]
            x = ir[pairs][:, None, :].expand(-1, int(lengths.max()), -1)
        else:
            totals = steps.sum(dim=1)
            keep = (totals > 0).nonzero(as_tuple=True)[0]  # packing refuses empty sequences
            lengths = totals[keep]
            flat_steps = steps[keep].reshape(-1)
            rows = ir[keep].reshape(-1, hidden).repeat_interleave(flat_steps, dim=0)
            x = torch.zeros(len(keep), int(lengths.max()), hidden)
            mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
            x[mask] = rows
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(torch_b(packed)[0], batch_first=True)
        mask = torch.arange(out.shape[1])[None, :] < lengths[:, None]
        return torch_head(out[mask])  # value order: rows in (n, t) order, then inner step

    def run(inputs, steps):
        inputs, steps = torch.from_numpy(inputs), torch.from_numpy(steps.astype(np.int64))
        if direction == "forward":
            with torch.no_grad():
                return forward(inputs, steps)
        for parameter in parameters:
            parameter.grad = None
        forward(inputs, steps).sum().backward()
        return [parameter.grad for parameter in parameters]

    return run


# -------------------------------------------------------------------------- the cascade


def make_method(method, model_a, model_b, *, state, direction, run_plan, hidden, shared):
    """Returns `(function(inputs, steps), numpy_inputs)` for one method: numpy_inputs says what it takes."""
    import tensorflow as tf

    from cascade_cli.run.cascade import Cascade

    if method in ("keras_padded", "keras_padded_xla"):
        function, _ = make_keras_padded(model_a, model_b, state=state, direction=direction,
                                        xla=method.endswith("xla"), max_steps=run_plan.max_steps, hidden=hidden)
        return function, False
    if method == "torch_packed":
        return make_torch_packed(model_a, model_b, state=state, direction=direction), True
    if method == "nested":
        return bench.make_function("nested", model_a, model_b, state=state, direction=direction, shared=shared), False
    weights = model_a.trainable_variables + model_b.trainable_variables
    cascade = Cascade(model_a, model_b, state=state, jit_compile=False if method == "cascade_plain" else "auto")

    def run(inputs, steps):
        if direction == "forward":
            return cascade(inputs, steps).flat_values
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(cascade(inputs, steps).flat_values)
        return tape.gradient(total, weights)

    if method == "readme":
        return run, True  # eager, numpy inputs and steps, as the README shows it
    return _traced_once(run, model_a), False


def flat_values(method, result):
    """The forward result of a method as one numpy array `(total, O)` in value order."""
    if method == "nested":
        outputs, mask = (np.asarray(part) for part in result)  # time-major (Ta, L, N, O) and (Ta, L, N)
        return np.transpose(outputs, (2, 0, 1, 3))[np.transpose(mask, (2, 0, 1))]
    if hasattr(result, "detach"):
        return result.detach().numpy()
    return np.asarray(result)


def check_values(functions, arrays, *, log):
    """Raises `AssertionError` unless every forward method gives the first one's values.

    Args:
        functions: `method -> (function, numpy_inputs)`, as `make_method` returns them.
        arrays: `(inputs, steps)` as numpy arrays.
        log: called with one line.
    """
    reference = None
    tensors = inputs_as_tensors(arrays)
    for method, (function, numpy_inputs) in functions.items():
        got = flat_values(method, function(*(arrays if numpy_inputs else tensors)))
        if reference is None:
            reference = got
            continue
        if got.shape != reference.shape or not np.allclose(got, reference, **TOLERANCE):
            difference = np.max(np.abs(got - reference)) if got.shape == reference.shape else got.shape
            raise AssertionError(f"{method} differs from {next(iter(functions))}: {difference}")
    log(f"  values equal across {', '.join(functions)}")


def inputs_as_tensors(inputs):
    import tensorflow as tf

    return tf.constant(inputs[0]), tf.constant(inputs[1])


def run_peers(run_plan, *, log=print):
    """Times every method of every case, state and direction; returns the timing dicts and the A choice."""
    torch_ok = has_torch()
    if torch_ok:
        import torch

        torch.manual_seed(0)
    timings, shared, compiled = [], {}, {}
    for case, model_a, model_b, inputs, steps in cases_with_data(run_plan):
        for state in STATES:
            for direction in DIRECTIONS:
                functions = {}
                for method in METHODS:
                    if method == "torch_packed" and not torch_ok:
                        continue
                    functions[method] = make_method(method, model_a, model_b, state=state, direction=direction,
                                                    run_plan=run_plan, hidden=case.hidden,
                                                    shared=shared.setdefault(case.hidden, {}))
                log(f"{case.name}  {state}  {direction}: {', '.join(functions)}")
                if direction == "forward":
                    check_values(functions, (inputs, steps), log=log)
                measured = time_interleaved(functions, (inputs, steps), repeats=run_plan.repeats,
                                            warmups=run_plan.warmups)
                for method, result in measured.items():
                    timings.append({"name": case.name, "batch": case.batch, "outer": case.outer,
                                    "hidden": case.hidden, "useful_rows": int(steps.sum()), "state": state,
                                    "direction": direction, "method": method, **result})
        compiled[case.name] = _a_choice(model_a, model_b)
    return timings, compiled


def cases_with_data(run_plan):
    """Yields `(case, model_a, model_b, inputs, steps)` for each case: one pair of models per `H`, seeded data."""
    rng = np.random.default_rng(0)
    models = {}
    for case in run_plan.cases:
        if case.hidden not in models:
            models[case.hidden] = bench.build_models(features=run_plan.features, hidden=case.hidden,
                                                     outputs=run_plan.outputs)
        inputs = rng.normal(size=(case.batch, case.outer, run_plan.features)).astype(np.float32)
        steps = bench.make_steps(rng, case.batch, case.outer, max_steps=run_plan.max_steps)
        yield (case, *models[case.hidden], inputs, steps)


def _a_choice(model_a, model_b):
    """What the default `Cascade(a, b)` chose for A (`a_compiled`) and, in each mode, for the loop over B
    (`loop_compiled`: the whole loop under XLA), after one call."""
    from cascade_cli.run.cascade import Cascade

    choice = {}
    for state in STATES:
        cascade = Cascade(model_a, model_b, state=state)
        cascade.run(np.zeros((1, 2, model_a.inputs[0].shape[-1]), np.float32), [1, 0])
        choice.setdefault("a_compiled", cascade.a_compiled)
        choice.setdefault("a_compiled_in_training", cascade.a_compiled_in_training)
        choice[f"loop_compiled_{state}"] = cascade.loop_compiled
    return choice


def time_interleaved(functions, arrays, *, repeats, warmups):
    """`bench.time_group` over `functions` (as `check_values` takes them), each given numpy or tensor inputs."""
    tensors = inputs_as_tensors(arrays)
    calls = {method: (lambda _inputs, _steps, f=function, given=(arrays if numpy_inputs else tensors): f(*given))
             for method, (function, numpy_inputs) in functions.items()}
    return bench.time_group(calls, None, None, repeats=repeats, warmups=warmups)


# ------------------------------------------------------------------------------ targets


def _median(timings, name, state, direction, method):
    for timing in timings:
        if (timing["name"], timing["state"], timing["direction"], timing["method"]) == (name, state, direction,
                                                                                      method):
            return timing.get("median_s")
    return None


def best_peer(timings, name, state, direction):
    """`(peer, median_s)`: the fastest peer of one case, state and direction (None where none ran)."""
    found = [(_median(timings, name, state, direction, peer), peer) for peer in PEERS]
    found = [(seconds, peer) for seconds, peer in found if seconds is not None]
    if not found:
        return None, None
    seconds, peer = min(found)
    return peer, seconds


def evaluate_targets(run_plan, timings):
    """The targets of issue 16 this suite can measure, each marked passed or not (None: not measured)."""
    targets = []
    for case in run_plan.cases:
        for state in STATES:
            for direction in DIRECTIONS:
                ratio = bench._ratio(_median(timings, case.name, state, direction, "readme"),
                                     _median(timings, case.name, state, direction, "cascade"))
                targets.append(bench._target("README's eager call near the compiled one", "readme", case.name,
                                             direction, state, ratio, 1.1, "<=", "readme / cascade"))
    for case in run_plan.cases:
        for direction in DIRECTIONS:
            _, best = best_peer(timings, case.name, "reset", direction)
            ratio = bench._ratio(_median(timings, case.name, "reset", direction, "cascade"), best)
            targets.append(bench._target("default settings beat the best peer", "cascade", case.name, direction,
                                         "reset", ratio, 0.8, "<=", "cascade / best peer"))
    carry_case = next((case for case in run_plan.cases if case.batch == 64), run_plan.cases[-1])
    nested = _median(timings, carry_case.name, "carry", "forward+backward", "nested")
    cascade = _median(timings, carry_case.name, "carry", "forward+backward", "cascade")
    targets.append(bench._target("carry faster than nested loops", "cascade", carry_case.name, "forward+backward",
                                 "carry", bench._ratio(nested, cascade), 4.0, ">=", "nested / cascade"))
    _, best = best_peer(timings, carry_case.name, "carry", "forward+backward")
    targets.append(bench._target("carry beats the best carry peer", "cascade", carry_case.name, "forward+backward",
                                 "carry", bench._ratio(cascade, best), 0.8, "<=", "cascade / best peer"))
    return targets


# ------------------------------------------------------------------------------ reports


TIMING_HEADER = ["case", "state", "direction", "readme ms", "cascade ms", "cascade_plain ms", "nested ms",
                 "keras_padded ms", "keras_padded_xla ms", "torch_packed ms", "best peer",
                 "readme / cascade", "cascade / best peer", "cascade_plain / best peer", "nested / cascade"]


def timing_rows(run_plan, timings):
    rows = []
    for case in run_plan.cases:
        for state in STATES:
            for direction in DIRECTIONS:
                times = {method: _median(timings, case.name, state, direction, method) for method in METHODS}
                peer, best = best_peer(timings, case.name, state, direction)
                rows.append([case.name, state, direction,
                             *(bench._format_seconds(times[method]) for method in METHODS),
                             peer or "-",
                             bench._format_ratio(bench._ratio(times["readme"], times["cascade"])),
                             bench._format_ratio(bench._ratio(times["cascade"], best)),
                             bench._format_ratio(bench._ratio(times["cascade_plain"], best)),
                             bench._format_ratio(bench._ratio(times["nested"], times["cascade"]))])
    return rows


def render_run(run):
    """The Markdown section of one peers run, for `RESULTS.md`."""
    machine, run_plan = run["machine"], plan_from_dict(run["plan"])
    title = f"## Peers, {run['device']}" + (" (quick: tiny shapes, checks the script, measures nothing)"
                                            if run_plan.quick else "")
    if not run_plan.quick and len(run_plan.cases) < len(plan().cases):
        title += f" (reduced: only {', '.join(case.name for case in run_plan.cases)})"
    choices = ", ".join(f"{name}: {'XLA' if choice['a_compiled'] else 'plain'} in inference, "
                        f"{'XLA' if choice['a_compiled_in_training'] else 'plain'} in training"
                        + "".join(f", the {state} loop over B {'under XLA' if choice[key] else 'plain'}"
                                  for state in STATES if (key := f"loop_compiled_{state}") in choice)
                        for name, choice in run.get("a_choice", {}).items())
    parts = [
        "", title, "",
        "Written by `python -m benchmarks.peers` (issue 16; see `benchmarks/README.md`). Every method on the same",
        "models, inputs and steps, values checked equal before timing; repeats interleaved; medians.",
        "`best peer` is the fastest of `keras_padded`, `keras_padded_xla` and `torch_packed`;",
        "`cascade / best peer` is the default `Cascade(a, b)` in a `tf.function` over it (lower is better).",
        "",
        *bench.machine_lines(machine, software=f", torch {machine.get('torch') or 'not installed'}" + (
            f" ({machine['torch_threads']} threads)" if machine.get("torch_threads") else "")),
        f"- models: A = GRU(H) on F={run_plan.features} features; B = GRUCell(H) then Dense({run_plan.outputs}); "
        f"steps uniform in 0..{run_plan.max_steps}; {run_plan.repeats} timed runs after {run_plan.warmups} warm-up"
        + (f"; the whole run took {run['seconds']:.0f} s" if "seconds" in run else ""),
        f"- the default `Cascade(a, b)` chose for A (and the loop over B): {choices or 'not recorded'}",
        "",
        "### Median times (ms)",
        "",
        bench._markdown_table(TIMING_HEADER, timing_rows(run_plan, run["timings"])),
        "",
        "### Targets",
        "",
        bench._markdown_table(bench.TARGET_HEADER, bench.target_rows(run["targets"])),
        "",
        "Feedback decoding's targets are in its own suite (`python -m benchmarks.feedback`).",
        "",
    ]
    parts += [f"- {line}" for line in bench.target_legend(run["targets"])]
    errors = bench.errors_of(run["timings"])
    if errors:
        parts += ["", "### Errors", ""] + [f"- {error}" for error in errors]
    return parts


def plan_from_dict(data):
    fields = dict(data)
    fields["cases"] = tuple(bench.Case(**case) for case in fields["cases"])
    return PeerPlan(**fields)


def describe_machine():
    machine = bench.describe_machine()
    if has_torch():
        import torch

        machine["torch"], machine["torch_threads"] = torch.__version__, torch.get_num_threads()
    return machine


def print_tables(run_plan, timings, targets):
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=240)
    bench.print_table(console, "median times (ms)", TIMING_HEADER, timing_rows(run_plan, timings))
    bench.print_table(console, "targets of issue 16", bench.TARGET_HEADER, bench.target_rows(targets))
    for error in bench.errors_of(timings):
        console.print(f"[red]error[/red] {error}")


def main(argv=None):
    """Runs the peers benchmark and merges it into the reports."""
    parser = bench.argument_parser("python -m benchmarks.peers", __doc__.splitlines()[0], default_repeats=7,
                                   batches=True)
    args = bench.parse_arguments(parser, argv)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    run_plan = plan(quick=args.quick, repeats=args.repeats, batches=args.batches)
    machine = describe_machine()
    started = time.perf_counter()
    timings, choice = run_peers(run_plan, log=lambda line: print(line, file=sys.stderr))
    targets = evaluate_targets(run_plan, timings)
    run = {"suite": SUITE, "device": bench.device_label(machine), "machine": machine,
           "plan": dataclasses.asdict(run_plan), "seconds": time.perf_counter() - started, "timings": timings,
           "targets": targets, "a_choice": choice}
    print_tables(run_plan, timings, targets)
    bench.write_report(args.out, run=run)
    return run


if __name__ == "__main__":
    main()
