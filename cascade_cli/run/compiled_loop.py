"""The packed loop compiled whole: every inner step of B in one XLA computation (issue 29).

The plain loop (`cascade_cli.run.loop.packed_loop` and the feedback loop) runs op
by op in TensorFlow's graph executor: 30-100 us of dispatch per inner step,
against 4-9 us inside an XLA while loop. Here the whole while loop, B's steps
included, is one `tf.function(jit_compile=True)`, so its shapes must be static:

- *Masked rows.* Every row runs at every step until the last one is done; a
  finished row's values are not emitted (its pair reads -1). Rows never
  leave, so no shape changes inside the loop.
- *Compacted rows* (from `COMPACT_ROWS` rows on, where B's widths allow:
  `LoopSpec.compact`). B itself runs on the running rows only: each step
  moves them to the front and runs B on the smallest of a few static sizes
  (a quarter, a half or all of the rows) that holds them, a switch XLA
  compiles once per size; its results go back to each row's place. The
  bookkeeping around B stays masked. A feedback decode whose rows end at
  ragged steps does 0.65-0.9 of the masked loop's work.
- *Rows in value order.* A row is a `(n, t)` pair with steps > 0 (`reset`) or a
  sample that walks its pairs in order (`carry`, and feedback that starts from
  the previous pair's last value). Rows are kept in ascending pair (or sample)
  order, so each row's emitted values, step after step, are already in value
  order: the outputs leave the compiled region padded, `(rows, steps, O)` with
  each value's pair id, and one boolean mask outside XLA compacts them.
- *Buckets.* XLA compiles once per set of input shapes. The rows, the pair
  table and the trip count are padded up to one of a few sizes (`bucket`): at
  most 25% padding, a handful of compiles per octave of batch size, and every
  row count a multiple of B's row quantum (16, or 2 where all of B's widths
  are multiples of 16: `cascade_cli.run.packing.row_quantum`), so that a row's
  values do not depend on how many rows ran beside it. (Not enough under XLA
  everywhere: in `reset` with a stop rule a row's last bits were seen to
  differ between 2 and 40 samples of one input, 16-row blocks or 2; the plain
  loop's did not. Its matrix products may pick their kernel by size.)
- *Preallocated outputs.* Every `TensorArray` has the static trip count's size
  (DESIGN section 3's XLA trap).
- *Known inputs.* In `carry` with given steps every row's input at every
  step is known before the loop (`known_inputs_loop`): no pair bookkeeping,
  the inputs gathered before the loop where they are small, and a batch of
  one sample run as one row, not a block (`known_rows`).
- *A known cell.* Where B is one Keras cell plus a head, every loop here
  reads the cell's input projection, made once per pair, one table per gate
  (`Step.known_cell`, `cells.Gated`): 0.70-0.81 of calling B at every step.

The compiled loop runs forward only: a call a tape may record, teacher forcing
(targets) and a sequence-form B keep the plain loop. `loop_problem` is the one
predicate that says where it does not apply; the runner's `jit_compile`
switch reads it.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from cascade_cli.keras_internals import tape_may_record
from cascade_cli.run import packing, sampling, stopping

QUANTUM = packing.ROW_QUANTUM  # every bucket is a multiple of it
COMPACT_ROWS = 128  # from this many rows on, B runs on the running rows only (`compacted_step`)
MATMUL_ROWS_MIN = 64  # no compacted size, nor known cell's projection, on fewer rows: XLA:CPU picks a matrix
# product's kernel by its size, and from 64 rows on a row's bits stay put (see LoopSpec)
COMPACTED_EIGHTHS = (2, 4)  # quarters and halves of the rows: the sizes a compacted step may run on (and all of them)
GATHERED_MAX = 1 << 22  # elements (16 MiB of float32): the most inputs `known_inputs_loop` gathers before its loop


def bucket(size, *, minimum=QUANTUM):
    """`size` rounded up to a bucket: a multiple of `minimum`, with at most 4 buckets per octave above 4 * minimum.

    Args:
        size: a scalar int32 tensor, >= 0.
        minimum: the smallest bucket, a power of two.

    Returns:
        A scalar int32 tensor: `minimum * k` for `size <= 4 * minimum`, else a
        multiple of a quarter of the power of two just below `size`.
    """
    size = tf.maximum(tf.cast(size, tf.int32), 1)
    # the highest power of two <= size - 1 (0 for size 1), by bit smearing
    v = size - 1
    for shift in (1, 2, 4, 8, 16):
        v = tf.bitwise.bitwise_or(v, tf.bitwise.right_shift(v, shift))
    high = v - tf.bitwise.right_shift(v, 1)  # the top bit of size - 1
    step = tf.maximum(high // 4, minimum)
    return (size + step - 1) // step * step


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What a compiled loop does, fixed when it is traced.

    Attributes:
        walk: rows are samples walking their pairs in order (else `(n, t)` pairs).
        carry: B's state flows from one pair to the next of a row (else it restarts).
        feedback: B is fed `y_prev`.
        start_previous: feedback starts a pair from the row's last fed value (else from `start`).
        sampler: an `options.Sampler`.
        stop: `(y, tokens) -> hit`, or None without a stop rule.
        zero_gate: what is fed back has its last column, a stop gate's logit, set to 0 (`sampling.feed_back`).
        exclude_stop_step: the step that met the rule is not emitted.
        min_steps: no rule stops a pair before `min_steps` inner steps.
        seed: the draws' seed.
        return_tokens: the sampled ids leave the loop too.
        width: the size of what the step emits, `O`.
        dtype: its dtype.
        state_sizes: B's state sizes.
        state_init: `"zeros"` or `"ir"`.
        compact: from `COMPACT_ROWS` rows on, B runs on the running rows only, moved to the front and cut
            to a few static sizes (`compacted_step`), instead of on every row with the finished ones masked.
            Only where `quantum` is under `QUANTUM` (every width of B a multiple of 16) and on no fewer than
            `MATMUL_ROWS_MIN` rows: a row's last bits under XLA move with the row count its step ran on (widths
            5 and 3: 48 or 80 rows against 160; widths 16: 18 rows against 150, where 60 and 150 agreed),
            most likely because XLA:CPU picks a matrix product's implementation by its sizes (tiled LLVM IR
            for small ones, a library call for larger ones: `GetDotImplementationStrategy`), each summing in
            its own order. Within these bounds a sample's bits were seen the same in any batch (tested).
        quantum: the rows' block (`cascade_cli.run.packing.row_quantum`): every compacted size is a multiple of it.
    """

    walk: bool
    carry: bool
    feedback: bool
    start_previous: bool
    sampler: object
    stop: object
    zero_gate: bool
    exclude_stop_step: bool
    min_steps: int
    seed: int
    return_tokens: bool
    width: int
    dtype: object
    state_sizes: tuple
    state_init: str
    compact: bool = True
    quantum: int = QUANTUM


def compacted_sizes(rows, quantum, *, eighths=None):
    """The row counts a compacted step may run on: `eighths` of `rows` in whole `quantum` blocks, never under
    `MATMUL_ROWS_MIN` (nor over `rows`), then `rows`.

    Scalar int32 tensors computed from `rows` (`tf.shape`): constants once XLA
    compiles for a shape, so every branch of the switch has static shapes.
    """
    eighths = COMPACTED_EIGHTHS if eighths is None else eighths
    sizes = [tf.minimum(rows, tf.maximum((rows * k + 8 * quantum - 1) // (8 * quantum) * quantum, MATMUL_ROWS_MIN))
             for k in eighths]
    return sizes + [rows]


def compacted_step(step, sizes, active, tables, pair, fed, states):
    """One step of B on the running rows only, moved to the front and cut to the smallest of `sizes` that holds them.

    A stable partition puts the running rows first (in row order), a switch
    over the static `sizes` runs B on the first `size` rows, and a gather puts
    every row back in its place. Rows past `size` (all finished) read zeros:
    a finished row never runs again, so nothing reads them.

    Args:
        step: `Step.step`, `(xs, y_prev, states) -> (y, new_states)`.
        sizes: ascending static row counts, the last one all the rows `R`.
        active: `(R,)` bool, the rows still running.
        tables: `Step.tables`' `[(P, X_g)]`, each pair's step input; `pair`: `(R,)` each row's pair (any for a
            finished row).
        fed: `(R, O)` what each row is fed, or None without feedback.
        states: B's states, each `(R, size)`.

    Returns:
        `(y (R, O), new_states)`, as `step` on every row would give them for the running rows.
    """
    running = tf.cast(active, tf.int32)
    count = tf.reduce_sum(running)
    # each row's place after the partition: running rows first, both groups in row order
    place = tf.where(active, tf.cumsum(running) - 1, count + tf.cumsum(1 - running) - 1)
    order = tf.scatter_nd(place[:, None], tf.range(tf.size(place)), tf.shape(place))
    branch = tf.reduce_sum(tf.cast(tf.stack(sizes[:-1]) < count, tf.int32))

    def run(size):
        def on_front():
            front = order[:size]
            pairs = tf.gather(pair, front)
            xs = [tf.gather(table, pairs) for table in tables]
            y, new = step(xs, None if fed is None else tf.gather(fed, front), [tf.gather(s, front) for s in states])
            back = tf.stack([tf.stack([0, sizes[-1] - size]), [0, 0]])
            return [tf.pad(y, back)] + [tf.pad(s, back) for s in new]
        return on_front

    y, *new_states = tf.switch_case(branch, [run(size) for size in sizes])
    return tf.gather(y, place), [tf.gather(s, place) for s in new_states]


def masked_loop(spec, step, start, table, caps, next_pair, sample_of, outer_of, row_pairs, trip):
    """The loop itself, traced inside `jit_compile=True`: every row at every step, finished rows masked.

    Args:
        spec: a `LoopSpec`.
        step: a `Step`, one inner step of B (`y_prev` is None without feedback).
        start: `(O,)`, `y_prev` at a pair's first step (feedback).
        table: `(P, H)` each pair's IR, B's step input (and its initial states with `state_init="ir"`).
        caps: `(P,)` int32 each pair's most inner steps (0 for padding).
        next_pair: `(P,)` int32 the next pair of the same sample with steps > 0, or -1.
        sample_of: `(P,)` int64 each pair's sample's index in the whole input.
        outer_of: `(P,)` int32 each pair's outer step.
        row_pairs: `(R,)` int32 each row's first pair, -1 for a row with none.
        trip: `(T,)` any dtype: only its length counts, the most steps any row runs.

    Returns:
        `(ys (R, T, width), pairs (R, T) int32, tokens (R, T) int64)`: what
        every row emitted at every step and the pair of each plus one (0:
        nothing emitted), so that the rows and steps XLA never wrote read as
        empty; `tokens` is a `(R, 0)` placeholder without `return_tokens`.
    """
    rows, steps = tf.shape(row_pairs)[0], tf.shape(trip)[0]
    dtype = spec.dtype
    sizes = compacted_sizes(rows, spec.quantum) if spec.compact and spec.quantum < QUANTUM else None
    tables = step.tables(table)

    def initial_states(pair):
        if spec.state_init == "ir":
            x = tf.gather(table, pair)
            return [tf.identity(x) for _ in spec.state_sizes]
        return [tf.zeros([rows, size], table.dtype) for size in spec.state_sizes]

    def iterate(j, pair, inner, states, fed, ys, emitted, tokens):
        active = pair >= 0
        safe = tf.maximum(pair, 0)
        y_prev = fed if spec.feedback else None

        def every_row():
            return step.step([tf.gather(t, safe) for t in tables], y_prev, states)

        if sizes is None:
            y, new_states = every_row()
        else:  # a constant once XLA compiles for a shape: only one branch is built further
            y, new_states = tf.cond(rows >= COMPACT_ROWS,
                                    lambda: compacted_step(step.step, sizes, active, tables, safe, y_prev, states),
                                    every_row)
        # the sampler, the gate, the stop rule and min_steps: as the plain loop decides (`run.feedback`)
        u = sampling.draws(spec.sampler, spec.seed, safe, inner, sample_of=lambda p: tf.gather(sample_of, p),
                           outer_of=lambda p: tf.gather(outer_of, p))
        fed_next, token = sampling.feed_back(spec.sampler, y, u, zero_gate=spec.zero_gate)
        hit = None
        if spec.stop is not None:
            hit = spec.stop(y, token)
            held = stopping.held(inner, spec.min_steps)
            if held is not None:
                hit = tf.logical_and(hit, tf.logical_not(held))
        emit = active if hit is None or not spec.exclude_stop_step else tf.logical_and(active, tf.logical_not(hit))
        ys = ys.write(j, y)
        emitted = emitted.write(j, tf.where(emit, pair + 1, 0))
        if spec.return_tokens:
            tokens = tokens.write(j, token)
        done = inner + 1 >= tf.gather(caps, safe)
        if hit is not None:
            done = tf.logical_or(done, hit)
        following = tf.gather(next_pair, safe) if spec.walk else tf.fill([rows], -1)
        next_pair_ids = tf.where(active, tf.where(done, following, pair), -1)
        if spec.walk and not spec.carry:  # a row starting a new pair starts from the initial states
            fresh = initial_states(tf.maximum(next_pair_ids, 0))
            new_states = [tf.where(done[:, None], f, s) for f, s in zip(fresh, new_states)]
        if not spec.feedback:
            fed_next = fed  # nothing is fed back; the sampler's value served the tokens only
        elif not spec.start_previous:
            fed_next = tf.where(done[:, None], tf.broadcast_to(start, tf.shape(fed_next)), fed_next)
        return j + 1, next_pair_ids, tf.where(done, 0, inner + 1), new_states, fed_next, ys, emitted, tokens

    safe = tf.maximum(row_pairs, 0)
    states = initial_states(safe)
    first = tf.zeros_like(start) if spec.start_previous else start  # zeros before a sample's first pair
    fed = tf.tile(first[None], [rows, 1])
    ys = tf.TensorArray(dtype, size=steps, element_shape=tf.TensorShape([None, spec.width]))
    emitted = tf.TensorArray(tf.int32, size=steps, element_shape=tf.TensorShape([None]))
    tokens = tf.TensorArray(tf.int64, size=steps if spec.return_tokens else 1, element_shape=tf.TensorShape([None]))
    if not spec.return_tokens:
        tokens = tokens.write(0, tf.zeros([rows], tf.int64))
    _, _, _, _, _, ys, emitted, tokens = tf.while_loop(
        lambda j, pair, *_: tf.logical_and(j < steps, tf.reduce_any(pair >= 0)),
        iterate,
        (tf.constant(0), row_pairs, tf.zeros_like(row_pairs), states, fed, ys, emitted, tokens),
    )
    tokens = tf.transpose(tokens.stack()) if spec.return_tokens else tf.zeros([rows, 0], tf.int64)
    return tf.transpose(ys.stack(), [1, 0, 2]), tf.transpose(emitted.stack()), tokens


@dataclasses.dataclass(frozen=True)
class Step:
    """B's inner step as the compiled loops run it: the tables a row reads, and the step.

    B's own call reads each pair's IR vector (`called`). A known cell's
    `cells.Gated` reads its input projection instead, made once per pair and
    kept as one table per gate (`known_cell`; `xla.loop_step` chooses).

    Attributes:
        tables: `table (P, H) -> [(P, X_g)]`: a row's input at a step is one row of each.
        step: `([x_g (R, X_g)], y_prev, states) -> (y, new_states)`, `y_prev` None without feedback.
    """

    tables: object
    step: object

    @classmethod
    def called(cls, b_step):
        """B called whole at every step: `b_step` is `(x, y_prev, states) -> (y, new_states)`."""
        return cls(lambda table: [table], lambda xs, y_prev, states: b_step(xs[0], y_prev, states))

    @classmethod
    def known_cell(cls, split, training):
        """A known cell's `cells.Gated` (`split`: a `cells.SplitB`), its head at every step. The projection runs
        on at least `MATMUL_ROWS_MIN` rows, so that a pair's projection has the same bits in any batch."""

        def tables(table):
            pairs = tf.shape(table)[0]
            padded = tf.pad(table, [[0, tf.maximum(MATMUL_ROWS_MIN - pairs, 0)], [0, 0]])
            return [projected[:pairs] for projected in split.gated.project(padded)]

        def step(xs, y_prev, states):
            h, states = split.gated.step(xs, y_prev, states)
            return (h if split.head is None else split.head(h, training=training)), states

        return cls(tables, step)


def gathers_first(steps, rows, width):
    """Whether `known_inputs_loop` gathers every row's input at every step before the loop: where they are at
    most `GATHERED_MAX` elements, `steps * rows * width`, and no tape records the trace (a scalar bool tensor, a
    constant once XLA compiles for a shape).

    Under a tape (XLA's gradient of the loop, `cascade_cli.run.known`) a gather by each step: gathering first
    measured no faster there (N=1: 32.0 against 30.5 ms), and the gradient keeps its bits (the table's gradient
    summed step by step); the values are the same bits either way.
    """
    if tape_may_record():
        return tf.constant(False)
    size = tf.cast(steps, tf.int64) * tf.cast(rows, tf.int64) * tf.cast(width, tf.int64)  # no int32 overflow
    return size <= GATHERED_MAX


def known_inputs_loop(step, table, index, totals, states):
    """`carry` with given steps, traced inside `jit_compile=True`: every row's input at every step is known.

    No pair bookkeeping: row `r` runs `totals[r]` steps, step `j` reading
    row `index[j, r]` of each of `step.tables(table)`; a row past its total
    keeps stepping on pair 0's input, and what it computes then is never read.

    The inputs are gathered before the loop where they are small
    (`gathers_first`), else by each step: a gather per step inside XLA's
    while loop cost N=64 (256 steps of 64 rows) 21 ms against 13 ms, N=128
    31 against 24 ms, with the same bits (N=1 and 8 alike). Both reads are
    traced and a select whose condition is a constant once XLA compiles for
    a shape keeps one: no `tf.cond`, which XLA's gradient
    (`cascade_cli.run.known`) cannot take around a loop over B's variables,
    and no nested loop, which crashed XLA's gradient.

    Args:
        step: a `Step`.
        table: `(P, X)` each pair's step input, `X` static.
        index: `(T, R)` int32 the pair each row reads at each step.
        totals: `(R,)` int32 each row's steps.
        states: B's initial states, each `(R, size)`.

    Returns:
        `ys (R, T, width)`.
    """
    tables = step.tables(table)
    steps, rows = tf.shape(index)[0], tf.shape(index)[1]
    first = gathers_first(steps, rows, sum(t.shape[1] for t in tables))
    gathered = tf.where(first, steps, 1)  # one step's inputs (unread) where they are gathered by each step
    xs = [tf.TensorArray(t.dtype, size=gathered, element_shape=tf.TensorShape([None, t.shape[1]]))
          .unstack(tf.gather(t, index[:gathered])) for t in tables]
    ys = tf.TensorArray(table.dtype, size=steps, element_shape=tf.TensorShape([None, None]))

    def iterate(j, states, ys):
        read = tf.minimum(j, gathered - 1)
        x = [tf.where(first, x.read(read), tf.gather(t, index[j])) for x, t in zip(xs, tables)]
        y, states = step.step(x, None, states)
        return j + 1, states, ys.write(j, y)

    # (the static bound lets XLA differentiate the loop: `cascade_cli.run.known.compile_known`)
    _, _, ys = tf.while_loop(lambda j, *_: j < tf.reduce_max(totals), iterate, (tf.constant(0), list(states), ys),
                             maximum_iterations=steps)
    return tf.transpose(ys.stack(), [1, 0, 2])


def compile_known_inputs_loop(step, *, state_sizes, table_spec):
    """`known_inputs_loop` as one `tf.function(jit_compile=True)`, traced once for every shape."""

    def loop(table, index, totals):
        rows = tf.shape(index)[1]
        return known_inputs_loop(step, table, index, totals,
                                 [tf.zeros([rows, size], table.dtype) for size in state_sizes])

    signature = [table_spec, tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32)]
    return tf.function(loop, input_signature=signature, jit_compile=True, autograph=False)


def known_rows(samples, *, quantum, bucketed=False):
    """The rows a loop with known inputs runs for `samples` samples (a scalar int32 tensor): one for a batch of one,
    else the samples padded to a multiple of `quantum` (`packing.row_quantum`), or to a `bucket` of them.

    One row is a matrix-vector product per step, two rows a matrix product
    (a library call under XLA:CPU): 733 steps of GRU(64) + Dense(16), 1.6
    against 2.8 ms on the shared 2-core VM (load 1.1). Its last bits differ from the
    same sample's among others, as a Keras model's do with the batch size;
    `generate` pads every batch to whole blocks of at least 64 rows, so its
    bytes do not move. The fused call (`known_plan`, inside XLA) and the
    compiled loop (`lay_out_steps`, outside) both take this rule: the fused
    probe compares them bit for bit.
    """
    blocks = bucket(samples, minimum=quantum) if bucketed else (samples + quantum - 1) // quantum * quantum
    return tf.where(tf.equal(samples, 1), 1, blocks)


def lay_out_steps(caps, *, quantum=QUANTUM):
    """The inputs of `known_inputs_loop` from caps `(N, Ta)`: `(pairs, index (T, R), totals (R,))`, bucketed.

    Each sample's inner steps, outer step after outer step, form one sequence;
    step `p` of sample `n` reads its pair's row. `pairs` is the padded pair
    count the table is padded to; the rows `R` a bucket of multiples of
    `quantum` (`packing.row_quantum`).
    """
    n, outer = tf.shape(caps)[0], tf.shape(caps)[1]
    caps_flat = tf.reshape(caps, [-1])
    value_pairs = tf.repeat(tf.range(tf.size(caps_flat)), caps_flat)
    samples = value_pairs // outer
    totals = tf.reduce_sum(caps, axis=1)
    positions = tf.range(tf.size(value_pairs)) - tf.gather(tf.cumsum(totals, exclusive=True), samples)
    steps = bucket(tf.reduce_max(tf.concat([totals, [0]], 0)), minimum=8)
    rows = known_rows(n, quantum=quantum, bucketed=True)
    index = tf.scatter_nd(tf.stack([positions, samples], axis=1), value_pairs, tf.stack([steps, rows]))
    return bucket(tf.size(caps_flat)), index, tf.pad(totals, [[0, rows - n]])


def compact_known(ys, totals):
    """`known_inputs_loop`'s outputs in value order (outside XLA): each row's first `totals[r]` steps."""
    return tf.boolean_mask(ys, tf.sequence_mask(totals, tf.shape(ys)[1]))


def compile_loop(spec, step, start, *, table_spec):
    """`masked_loop` as one `tf.function(jit_compile=True)`, traced once for every shape (XLA compiles per shape)."""
    signature = [table_spec, tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32),
                 tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32),
                 tf.TensorSpec([None], tf.int8)]

    def loop(*arguments):
        return masked_loop(spec, step, start, *arguments)

    return tf.function(loop, input_signature=signature, jit_compile=True, autograph=False)


def call(function, *tensors):
    """Calls a `tf.function` through one concrete function traced for any shape; eagerly, from a graph.

    TensorFlow counts every eager call that traces a `tf.function` against the
    Python function it wraps and warns ("N out of the last N calls to ...
    triggered tf.function retracing") when a program builds several
    `Cascade`s, each with its own functions of the same code. A concrete
    function's call is not counted; it is traced once for any shape.

    XLA caches what it compiled by the function's name and the shapes, and an
    eager call of a `jit_compile=True` function keeps a cache apart from calls
    inside a graph. So every call, in a graph or eager, goes through the same
    concrete function, and an eager one through a plain graph that calls it:
    what a probe (`Cascade`'s first call) compiled serves the compiled call of
    the same shapes, and model A's XLA probe (eager) and the run that follows
    it (traced) share one trace (issue 31: a small run's start).
    """
    specs = [tf.TensorSpec([None] * tensor.shape.rank, tensor.dtype) for tensor in tensors]
    if tf.distribute.has_strategy():  # each replica's variables live on its own device: trace in its own context
        return (function.get_concrete_function() if function.input_signature is not None
                else function.get_concrete_function(*specs))(*tensors)
    key = tuple((spec.shape.rank, spec.dtype) for spec in specs)
    concrete = function.__dict__.setdefault("_cascade_concrete", {})  # kept on the function: no state beside it
    if key not in concrete:
        inner = (function.get_concrete_function() if function.input_signature is not None
                 else function.get_concrete_function(*specs))
        outer = tf.function(lambda *arguments: inner(*arguments), autograph=False)
        concrete[key] = (inner, outer.get_concrete_function(*specs))
    inner, graph = concrete[key]
    return graph(*tensors) if tf.executing_eagerly() else inner(*tensors)


def prepare(caps, sample_index, *, walk, max_steps=None, quantum=QUANTUM):
    """The compiled loop's integer inputs from the caps `(N, Ta)` int32, bucketed (plain TensorFlow, outside XLA).

    The rows are a bucket of multiples of `quantum` (`packing.row_quantum`).

    Returns:
        `(pairs, caps, next_pair, sample_of, outer_of, row_pairs, trip)`:
        `pairs` the padded pair count `P` (the tables are padded to it) and
        the others as `masked_loop` takes them.
    """
    n, outer = tf.shape(caps)[0], tf.shape(caps)[1]
    caps_flat = tf.reshape(caps, [-1])
    total = tf.size(caps_flat)
    pairs = bucket(total)
    padding = pairs - total
    pair_ids = tf.range(total)
    running = tf.cast(tf.where(caps_flat > 0)[:, 0], tf.int32)  # ascending
    if walk:
        samples = tf.range(n)
        next_pair = packing.next_running_pair(running, pair_ids + 1, samples=pair_ids // outer, outer=outer)
        row_pairs = packing.next_running_pair(running, samples * outer, samples=samples, outer=outer)
        longest = tf.reduce_max(tf.concat([tf.reduce_sum(caps, axis=1), [0]], 0))
    else:
        next_pair = tf.fill([total], -1)
        row_pairs = running
        longest = tf.reduce_max(tf.concat([caps_flat, [0]], 0))
    trip = bucket(longest, minimum=8) if max_steps is None or walk else tf.constant(max_steps, tf.int32)
    rows = tf.size(row_pairs)
    row_pairs = tf.pad(row_pairs, [[0, bucket(rows, minimum=quantum) - rows]], constant_values=-1)
    sample_of = tf.gather(tf.cast(sample_index, tf.int64), pair_ids // outer)
    return (pairs, tf.pad(caps_flat, [[0, padding]]), tf.pad(next_pair, [[0, padding]], constant_values=-1),
            tf.pad(sample_of, [[0, padding]]), tf.pad(pair_ids % outer, [[0, padding]]), row_pairs,
            tf.zeros([trip], tf.int8))


def pad_table(table, pairs):
    """`table (P0, ...)` padded with zero rows to `pairs` rows."""
    return tf.pad(table, [[0, pairs - tf.shape(table)[0]]] + [[0, 0]] * (table.shape.rank - 1))


def compact(ys, emitted, tokens=None):
    """The padded outputs in value order (outside XLA): `(values (total, W), pairs (total,), tokens (total,) or None)`.

    Rows are in ascending pair (or sample) order and each row's steps in
    order, so the row-major mask keeps value order.
    """
    where = tf.where(emitted > 0)
    values = tf.gather_nd(ys, where)
    pairs = tf.gather_nd(emitted, where) - 1
    return values, pairs, (None if tokens is None else tf.gather_nd(tokens, where))


def pack(ys, emitted, tokens, pairs):
    """The loop's padded outputs in value order, still padded (traced inside XLA).

    Returns:
        `(values (R * T, W), lengths (P,) int32, tokens (R * T,) or (0,), count ())`: the first `count` values
        (and tokens) are the result.
    """
    width = tf.shape(ys)[2]
    mask = tf.reshape(emitted > 0, [-1])
    size = tf.size(mask)
    place = tf.where(mask, tf.cumsum(tf.cast(mask, tf.int32)) - 1, size)  # the rest go to a spare last slot
    source = tf.tensor_scatter_nd_update(tf.zeros([size + 1], tf.int32), place[:, None], tf.range(size))[:size]
    values = tf.gather(tf.reshape(ys, [-1, width]), source)
    lengths = tf.math.unsorted_segment_sum(tf.cast(mask, tf.int32), tf.maximum(tf.reshape(emitted, [-1]) - 1, 0),
                                           pairs)
    tokens = tf.gather(tf.reshape(tokens, [-1]), source) if tokens.shape[1] != 0 else tf.zeros([0], tf.int64)
    return values, lengths, tokens, tf.reduce_sum(tf.cast(mask, tf.int32))


def trip(caps, *, walk, max_steps):
    """The `(T,)` placeholder whose length is the most steps a row runs, bucketed as `compiled_loop.prepare`'s
    (plain TensorFlow, outside XLA: it depends on the steps' values)."""
    if max_steps is not None and not walk:
        return tf.zeros([max_steps], tf.int8)
    longest = tf.reduce_sum(caps, axis=1) if walk else caps
    return tf.zeros([bucket(tf.reduce_max(longest), minimum=8)], tf.int8)


def known_plan(caps, steps, *, quantum):
    """`compiled_loop.known_inputs_loop`'s inputs from caps `(N, Ta)`, with static shapes (traced inside XLA):
    `(index (T, R), totals (R,))`, `T = steps` and the rows `R` as `known_rows` says.

    Sample `n`'s step `p` reads the pair whose values hold position `p` of the
    sample's sequence: each running pair adds, at its first position, how far
    its outer step is from the previous running pair's, and a cumulative sum
    over the positions gives each position's outer step.
    """
    n, outer = tf.shape(caps)[0], tf.shape(caps)[1]
    running = caps > 0
    ordinal = tf.cumsum(tf.cast(running, tf.int32), axis=1)
    outer_steps = tf.broadcast_to(tf.range(outer)[None], tf.shape(caps))
    rows_of = tf.broadcast_to(tf.range(n)[:, None], tf.shape(caps))
    listed = tf.tensor_scatter_nd_update(  # `listed[n, k + 1]`: sample n's k-th running outer step; 0 before
        tf.zeros(tf.stack([n, outer + 1]), tf.int32),
        tf.stack([rows_of, tf.where(running, ordinal, 0)], axis=-1), tf.where(running, outer_steps, 0))
    delta = tf.where(running, outer_steps - tf.gather(listed, tf.maximum(ordinal - 1, 0), batch_dims=1), 0)
    first = tf.cumsum(caps, axis=1, exclusive=True)  # each pair's first position
    marks = tf.tensor_scatter_nd_add(
        tf.zeros(tf.stack([n, steps + 1]), tf.int32),
        tf.stack([rows_of, tf.where(running, tf.minimum(first, steps), steps)], axis=-1), delta)
    index = tf.cumsum(marks[:, :steps], axis=1) + tf.range(n)[:, None] * outer  # (N, T) pair ids
    rows = known_rows(n, quantum=quantum)
    totals = tf.pad(tf.reduce_sum(caps, axis=1), [[0, rows - n]])
    return tf.transpose(tf.pad(index, [[0, rows - n], [0, 0]])), totals


def known_values(step, table, caps, trip, *, state_sizes, quantum):
    """`carry` with given steps (traced inside XLA): `(values (R * T, W), count)`, the first `count` values the
    result, by `compiled_loop.known_inputs_loop` on `known_plan`'s inputs."""
    index, totals = known_plan(caps, tf.size(trip), quantum=quantum)
    rows = tf.shape(index)[1]
    ys = known_inputs_loop(step, table, index, totals, [tf.zeros([rows, size], table.dtype) for size in state_sizes])
    emitted = tf.cast(tf.sequence_mask(totals, tf.shape(ys)[1]), tf.int32)
    values, _, _, count = pack(ys, emitted, tf.zeros([rows, 0], tf.int64), 1)
    return values, count
