"""Generation into a file: stream inputs through the runner, batch by batch, into a ragged result.

`generate_to_file` is what `cascade generate` and `cascade demo` run, and what a
Python user calls to write a result file without the command line:

>>> with open_inputs("inputs.h5") as source:
...     summary = generate_to_file(cascade, source, steps, output="results.h5")

The result is written by `results_io.RaggedH5Writer` under a temporary name and
renamed into place at the end, so a killed run leaves nothing half-written.
Batches start at multiples of `batch_size` (`shards.batch_ranges`), also for a
shard, which is what makes K merged shards bit-identical to one run. Each
batch is padded to whole blocks of samples (`_whole_blocks`), and the
runner's feedback loop runs whole blocks of rows, so a result with a sampler
or feedback is byte-identical at any `batch_size` too.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from cascade_cli.errors import CascadeError, DataError, ParameterError, received
from cascade_cli.run.models import check_inputs_fit
from cascade_cli.options import (GENERATE_BATCH_SIZE, check_choice, check_int, resolve_runner_settings,
                                  runner_attrs)
from cascade_cli.run.packing import ROW_QUANTUM
from cascade_cli.result import CascadeResult
from cascade_cli.results_io import STOP_SUMMARY_ATTRS, RaggedH5Writer
from cascade_cli.shards import shard_range
from cascade_cli.steps import check_steps


# Attributes that name files: a run is identified by what the files hold, not by how a path is spelled.
_PATH_ATTRS = frozenset({"model", "model_a", "model_b", "inputs", "steps"})

MIN_BATCH_ROWS = 64
"""The fewest samples a runner call gets (`_whole_blocks`): XLA's kernels for A change below about 50 rows."""


@dataclasses.dataclass(frozen=True)
class GenerateSummary:
    """What a generation wrote.

    Attributes:
        output: the result file.
        samples: samples written.
        emitted: inner steps emitted, all pairs together.
        pairs: `(n, t)` pairs that could run (cap > 0).
        at_cap: pairs that ran to their cap (given steps or `max_steps`); with
            a stop rule, the others were ended by the rule.
        seconds: wall time of the generation.
        at_first: pairs with a cap above 1 that a stop rule ended at their
            first step (0 without a rule).
    """

    output: Path
    samples: int
    emitted: int
    pairs: int
    at_cap: int
    seconds: float
    at_first: int = 0


@dataclasses.dataclass(frozen=True)
class GenerateRun:
    """What `generate_files` did: the summary, the attributes it recorded and the settings it ran with.

    Attributes:
        summary: the `GenerateSummary` of the writing.
        attrs: the result's run attributes (settings, files, `run_id`, and a
            shard's `sample_start`, `sample_stop`, `total_samples`).
        settings: every runner setting, as `options.resolve_runner_settings` gives them.
    """

    summary: GenerateSummary
    attrs: dict
    settings: dict


def generate_files(inputs, output, *, model_a=None, model_b=None, model=None, inputs_key="inputs", steps=None,
                   steps_source="none", settings=None, batch_size=GENERATE_BATCH_SIZE, num_samples=1, shard=None,
                   keep_gate=False, allow_nonfinite=False, overwrite=False, safe_mode=True, allow_legacy_h5=False,
                   progress=iter, window=None):
    """Generates a ragged result file from model and inputs files: what `cascade generate` does.

    Loads the models (A and B, or a generator packed by `cascade pack`),
    settles the runner settings (each given one, else the generator's, else
    the default: `options.resolve_runner_settings`), builds the `Cascade`,
    seeds Keras with the run's seed and writes the result with the run's
    attributes (`generation_attrs`, `identify_run`).

    Args:
        inputs: the inputs file (`data.open_inputs`); `inputs_key` its dataset or array.
        output: the `.h5` result to write.
        model_a, model_b: model files; or `model`, a packed generator's file.
        steps: `(Ta,)` or `(N, Ta)` integers, or None (`max_steps` with a stop rule).
        steps_source: where the steps came from, as the result records it
            (a file name, `"--steps 3,4,2"`, or `"none"`).
        settings: runner settings given, `{name: value}` (None: not given).
        batch_size, num_samples, shard, keep_gate, allow_nonfinite, overwrite,
            progress, window: as `generate_to_file`.
        safe_mode, allow_legacy_h5: how the model files load (`model_files.load_model`).

    Returns:
        A `GenerateRun`.

    Raises:
        ParameterError: a runner setting that cannot apply (naming it, e.g.
            `stop_rule`), `keep_gate` without a stop gate, or `steps` when
            neither steps nor `max_steps` are given.
        CascadeError: as `generate_to_file`, and files that cannot be read.
    """
    import keras

    from cascade_cli.data import open_inputs
    from cascade_cli.run.cascade import Cascade

    given = dict(settings or {})
    with open_inputs(inputs, key=inputs_key) as source:
        if model is not None:
            from cascade_cli.train.keras_model import load_generator

            generator = load_generator(model, safe_mode=safe_mode)
            pair, saved, model_files = (generator.model_a, generator.model_b), generator.settings, (model,)
        else:
            from cascade_cli.model_files import load_pair

            pair = load_pair(model_a, model_b, safe_mode=safe_mode, allow_legacy_h5=allow_legacy_h5,
                             feedback=bool(given.get("feedback")))
            saved, model_files = {}, (model_a, model_b)
        run_settings = resolve_runner_settings(given, saved)
        rule = run_settings["stop_rule"]
        if keep_gate and getattr(rule, "kind", None) != "gate":
            raise ParameterError("keep_gate", "keeps the stop gate's column in the values: it needs stop_gate=True "
                                              "(or a generator packed with it).")
        cascade = Cascade(*pair, **run_settings)
        if steps is None and run_settings["max_steps"] is None:
            raise ParameterError("steps", "no inner steps given: expected them, or max_steps=M with a stop rule; "
                                          "received neither.")
        steps = resolve_steps(steps, source, max_steps=run_settings["max_steps"], where=steps_source)
        keras.utils.set_random_seed(run_settings["seed"])
        files = {"model": str(model)} if model is not None else {"model_a": str(model_a), "model_b": str(model_b)}
        attrs = generation_attrs(run_settings, files={**files, "inputs": str(inputs), "inputs_key": str(inputs_key),
                                                      "steps": steps_source.strip("'")},
                                 num_samples=num_samples, keep_gate=keep_gate)
        attrs = identify_run(attrs, model_files=model_files, source=source, steps=steps, batch_size=batch_size,
                             shard=shard, num_samples=num_samples)
        summary = generate_to_file(cascade, source, steps, output=output, batch_size=batch_size, attrs=attrs,
                                   shard=shard, num_samples=num_samples, overwrite=overwrite, progress=progress,
                                   keep_gate=keep_gate, allow_nonfinite=allow_nonfinite, window=window)
    return GenerateRun(summary, attrs, run_settings)


def generation_attrs(settings, *, files, num_samples=1, keep_gate=False):
    """The attributes a generated result records: its files, the runner settings, the draws and the version.

    Args:
        settings: every runner setting (`options.resolve_runner_settings`).
        files: the files the run read, e.g. `{"model_a": ..., "model_b":
            ..., "inputs": ..., "inputs_key": ..., "steps": ...}`.
        num_samples: samples drawn per input.
        keep_gate: with a stop gate, whether its column stays in the values.
    """
    from cascade_cli import __version__

    rule = settings["stop_rule"]
    return {**files, **runner_attrs(settings), "num_samples": int(num_samples), "cascade_version": __version__,
            **({"keep_gate": bool(keep_gate)} if rule is not None and rule.kind == "gate" else {})}


def resolve_steps(steps, source, *, max_steps=None, where="the steps"):
    """Checks `steps` against the inputs of `source` and the runner's `max_steps`.

    Args:
        steps: `(Ta,)` (shared by every sample) or `(N, Ta)` integers, or None
            (every pair runs to `max_steps`, ended by a stop rule).
        source: the `InputSource` the steps go with.
        max_steps: the runner's cap, or None.
        where: names the steps in messages, e.g. `"'steps.txt'"`.

    Returns:
        `(Ta,)` or `(N, Ta)` int64, or None.

    Raises:
        DataError: the shape fits neither form, or a value is negative, not an
            integer, above `max_steps` or above what int32 holds.
    """
    if steps is None:
        return None
    steps = check_steps(steps, n_samples=source.n_samples, outer_steps=source.outer_steps, max_steps=max_steps,
                        source=where)
    limit = np.iinfo(np.int32).max
    if steps.size and steps.max() > limit:
        index = tuple(int(i) for i in np.argwhere(steps > limit)[0])
        raise DataError(f"steps from {where} at index {index[0] if len(index) == 1 else index}: expected at most "
                        f"{limit}, received {int(steps[index])}.")
    return steps


def generate_to_file(cascade, source, steps=None, *, output, batch_size=GENERATE_BATCH_SIZE, attrs=None,
                     shard=None, num_samples=1, overwrite=False, progress=iter, keep_gate=False,
                     allow_nonfinite=False, window=None):
    """Runs `cascade` over the samples of `source` and writes a ragged HDF5 result.

    With `num_samples` K, every input is run K times: result sample `n * K +
    k` is the k-th draw for input n, and its draws depend on that index (the
    runner's `sample_index`), so batches and shards cut the K * N results
    like any others. With a sampler that picks tokens the result holds them
    (`tokens`), and the attributes record whether A ran under XLA and why not
    where it did not: a job too small for XLA to pay runs A's plain call and
    the plain loop over B with no probe, decided from the whole job
    (`Cascade.plan_xla`), so every batch size and shard runs alike. The K
    draws are streamed: memory holds one batch of `batch_size` results, and
    the work before the first batch grows with the shard's own samples, not
    with N x K.

    A model that produces NaN or Inf stops the run before that batch is
    written, naming the model and the first `(sample, outer, inner)` that went
    non-finite, unless `allow_nonfinite`.

    Args:
        cascade: a `Cascade`.
        source: an open `data.InputSource` `(N, Ta, F)`.
        steps: `(Ta,)` or `(N, Ta)` integers (see `resolve_steps`), or None to
            run `cascade.max_steps` everywhere (with its stop rule).
        output: the `.h5` file to write.
        batch_size: samples per runner call.
        attrs: attributes recorded in the file (see `identify_run`).
        shard: `(index, count)` to write only the index-th of `count`
            contiguous slices of the samples (`shards.shard_range`), or None.
        num_samples: samples drawn per input, K >= 1; N x K x Ta + 1 must fit
            the result's int64 row splits.
        overwrite: whether `output` may be replaced.
        progress: wraps the list of `BatchRange`s as they run, e.g. a progress
            bar weighted by `BatchRange.samples`; `iter` shows nothing.
        keep_gate: with a stop gate (`StopRule.gate`), keep B's last column,
            the stop logit, in the written values; by default they hold the
            other `O - 1`.
        allow_nonfinite: write NaN and Inf values instead of stopping at the
            first.
        window: run each batch in windows of this many outer steps, the
            state carried (`cascade_cli.run.windows`): the same result, with the
            runner's memory bounded by the window instead of `Ta`; None runs
            each batch whole.

    Returns:
        A `GenerateSummary`.

    Raises:
        CascadeError: bad steps, an output that cannot be written, a model
            that fails on a batch (naming the samples), or one that produces
            NaN or Inf (without `allow_nonfinite`).
    """
    from cascade_cli.data import InputSource
    from cascade_cli.run.cascade import Cascade

    if not isinstance(cascade, Cascade):
        raise ParameterError("cascade", f"expected a cascade_cli.Cascade, received {received(cascade)}.")
    if not isinstance(source, InputSource):
        raise ParameterError("source", f"expected an open InputSource (cascade_cli.data.open_inputs), received "
                                       f"{received(source)}.")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    repeats = check_int("num_samples", num_samples, minimum=1)
    window = None if window is None else check_int("window", window, minimum=1)
    check_choice("allow_nonfinite", allow_nonfinite, (True, False))
    steps = resolve_steps(steps, source, max_steps=cascade.max_steps)
    if steps is None and cascade.max_steps is None:
        raise CascadeError("steps are required unless the cascade has max_steps.")
    check_inputs_fit(cascade.a_spec, source.shape, where=f"inputs in {source.name}")
    source.check_finite()
    inputs_count, outer, features = source.shape
    check_num_samples(repeats, n_inputs=inputs_count, outer_steps=outer)
    n_samples = inputs_count * repeats
    first, last = (0, n_samples) if shard is None else shard_range(n_samples, index=shard[0], count=shard[1])
    ranges = batch_ranges(first, last, batch_size=batch_size, n_samples=n_samples)
    check_batch_memory(cascade, steps, ranges, outer_steps=outer, repeats=repeats, window=window)
    cascade.plan_xla(samples=n_samples, outer_steps=outer,  # the whole job's, never the batch's or the shard's
                     inner_steps=_job_inner_steps(steps, cascade.max_steps, n_samples=n_samples, outer=outer,
                                                  repeats=repeats))
    dtype = tf.as_dtype(cascade.model_a.inputs[0].dtype)
    tokens = cascade.sampler.tokens
    call = lambda inputs, caps, index: cascade.run(inputs, caps, sample_index=index, return_tokens=tokens)  # noqa: E731
    if cascade.sampler.kind == "beam" and repeats > 1:  # result sample n * K + k: input n's k-th best hypothesis
        from cascade_cli.run import beam

        beam.check_num_samples(cascade, repeats)
        call = lambda inputs, caps, index: beam.run_ranked(  # noqa: E731
            cascade, inputs, caps, ranks=tf.cast(index % repeats, tf.int32))
    if window is not None:  # windows of outer steps, each a runner call, the state carried
        from cascade_cli.run.windows import Windows

        windows = Windows(cascade, window)
        run = lambda inputs, caps, index: windows(inputs, caps, index, return_tokens=tokens)  # noqa: E731
    else:
        run = _batch_function(call, [tf.TensorSpec([None, outer, features], dtype),
                                     tf.TensorSpec([None, outer], tf.int32), tf.TensorSpec([None], tf.int64)])

    emitted = at_cap = pairs = at_first = 0
    first_length = 0 if cascade.exclude_stop_step else 1
    started = time.perf_counter()
    # a stop gate's logit column is the last: left out of the values unless keep_gate
    drop_gate = cascade.stop_rule is not None and cascade.stop_rule.kind == "gate" and not keep_gate
    with RaggedH5Writer(output, outer_steps=outer, output_size=cascade.b_spec.output_size - int(drop_gate),
                        overwrite=overwrite, attrs=attrs, inputs=(source.path,), tokens=tokens) as writer:
        batches = progress(ranges)
        with contextlib.closing(batches) if hasattr(batches, "close") else contextlib.nullcontext():
            for batch in batches:  # closing() stops a live bar at once when a batch fails
                caps = _caps(steps, cascade.max_steps, batch.start, batch.stop, outer, repeats=repeats)
                inputs = _read_repeated(source, batch, repeats).astype(dtype.as_numpy_dtype)
                inputs, caps, index = _whole_blocks(inputs, caps, start=batch.start)
                values, *rest = _run_batch(run, cascade, inputs, caps, index, batch)
                part = CascadeResult(values, *rest).slice_samples(*batch.keep)
                if not allow_nonfinite:
                    check_finite_outputs(cascade, part, inputs[slice(*batch.keep)],
                                         first_sample=batch.start + batch.keep[0], repeats=repeats)
                if drop_gate:
                    part = CascadeResult(part.values[:, :-1], part.lengths, part.tokens)
                writer.append(part)
                caps = caps[slice(*batch.keep)]
                emitted += int(part.lengths.sum())
                running = caps > 0
                pairs += int(running.sum())
                at_cap += int((running & (part.lengths == caps)).sum())
                if cascade.stop_rule is not None:
                    at_first += int(((caps > 1) & (part.lengths == first_length)).sum())
        if cascade.stop_rule is not None:  # what the rule did, for inspect to say it as generate does
            writer.attrs.update(zip(STOP_SUMMARY_ATTRS, (pairs, at_cap, at_first)))
        if cascade.a_compiled is not None:  # decided by the plan or the first batch; for inspect
            writer.attrs["a_compiled"] = bool(cascade.a_compiled)
            if cascade.a_compile_problem:
                writer.attrs["a_compile_problem"] = cascade.a_compile_problem
        if cascade.loop_compiled is not None:
            writer.attrs["loop_compiled"] = bool(cascade.loop_compiled)
            if cascade.loop_compile_problem:
                writer.attrs["loop_compile_problem"] = cascade.loop_compile_problem
        if cascade.loop_fused is not None:  # A, the plan, the loop and the packing as one XLA call
            writer.attrs["loop_fused"] = bool(cascade.loop_fused)
    return GenerateSummary(Path(output), last - first, emitted, pairs, at_cap, time.perf_counter() - started,
                           at_first)


@dataclasses.dataclass(frozen=True)
class BatchRange:
    """One runner call: samples `start:stop`, of which `keep` (relative to `start`) are written."""

    start: int
    stop: int
    keep: tuple[int, int]

    @property
    def samples(self):
        """How many samples of this batch are written."""
        return self.keep[1] - self.keep[0]


class BatchRanges(collections.abc.Sequence):
    """The `BatchRange`s of a generation, computed as they are asked for: no list of N x K / batch_size items.

    Equal to a list of the same `BatchRange`s. `samples` is how many samples
    they write in all, and `largest` the most samples one batch runs.
    """

    def __init__(self, first, last, *, batch_size, n_samples):
        self.first, self.last, self.batch_size, self.n_samples = first, last, batch_size, n_samples
        self._start = first - first % batch_size
        self._count = 0 if last <= first else -(-(last - self._start) // batch_size)

    def __len__(self):
        return self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        start = self._start + index * self.batch_size
        stop = min(start + self.batch_size, self.n_samples)
        return BatchRange(start, stop, (max(start, self.first) - start, min(stop, self.last) - start))

    def __eq__(self, other):
        if isinstance(other, (list, tuple, BatchRanges)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    @property
    def samples(self):
        """The samples written, all batches together."""
        return max(self.last - self.first, 0)

    @property
    def largest(self):
        """The most samples one batch runs (its whole range, kept or not)."""
        return max((min(self.batch_size, self.n_samples - self[i].start) for i in {0, len(self) - 1} if len(self)),
                   default=0)

    def starts(self):
        """The start of every batch, as numpy int64 chunks of at most a million (for vectorized sums)."""
        for chunk in range(0, self._count, 1 << 20):
            yield self._start + np.arange(chunk, min(chunk + (1 << 20), self._count), dtype=np.int64) * self.batch_size


def batch_ranges(first, last, *, batch_size, n_samples):
    """The batches that write samples `first:last` of `n_samples`.

    Batches start at multiples of `batch_size` whatever `first` is, so a shard
    runs the very batches an unsharded run does and keeps its own samples: a
    value can change in its last bits with the other rows of its batch, and
    this is what makes K merged shards bit-identical to one run.

    Returns:
        A `BatchRanges`, a sequence of `BatchRange` computed on demand.
    """
    return BatchRanges(first, last, batch_size=batch_size, n_samples=n_samples)


RESULT_ROWS_MAX = 2**63 - 2
"""The most `(sample, outer)` rows a result holds: its `row_splits_1 (N * Ta + 1,)` are int64."""


def check_num_samples(num_samples, *, n_inputs, outer_steps):
    """Refuses a `num_samples` whose N x K x Ta + 1 row splits do not fit the result's int64."""
    most = RESULT_ROWS_MAX // max(n_inputs * outer_steps, 1)
    if num_samples > most:
        raise ParameterError("num_samples", f"expected at most {most:,} for {n_inputs:,} inputs of {outer_steps} "
                                            f"outer steps (a result's row splits are int64), received {num_samples:,}.")


def _batch_rows(steps, ranges, *, repeats):
    """The most inner steps one batch of `ranges` runs, for `(N, Ta)` steps with K = `repeats` draws each.

    Result sample `i` runs the steps of input `i // K`; the sum over samples
    `[0, x)` is `K * C[x // K] + (x % K) * r[x // K]` with `r` the rows' sums
    and `C` their running sum, so each batch costs O(1), in numpy chunks.
    """
    sums = steps.sum(axis=1, dtype=np.float64)
    running = np.concatenate([[0.0], np.cumsum(sums)])
    padded = np.concatenate([sums, [0.0]])

    def before(x):
        return repeats * running[x // repeats] + (x % repeats) * padded[x // repeats]

    most = 0.0
    for starts in ranges.starts():
        stops = np.minimum(starts + ranges.batch_size, ranges.n_samples)
        most = max(most, float((before(stops) - before(starts)).max()))
    return int(most)


def check_batch_memory(cascade, steps, ranges, *, outer_steps, available=None, repeats=1, window=None):
    """Refuses a generation whose largest batch cannot fit in memory, before anything runs.

    A batch holds every row it emits a few times over (B's outputs step-major
    and in value order, the rows' inputs and states), so its size is about
    `rows x (O + H + states) x itemsize x 4`, with rows the sum of the batch's
    caps (`max_steps` everywhere under a stop rule).

    Args:
        cascade: the `Cascade`.
        steps: `(Ta,)` or `(N, Ta)` int64 (one row per input), or None (every
            pair capped at `cascade.max_steps`).
        ranges: the `BatchRanges` (or a list of `BatchRange`) that will run.
        outer_steps: `Ta`.
        available: bytes the run may use; by default the machine's memory, or
            the address-space limit when one is set.
        repeats: the draws per input (`num_samples`): result sample `i` runs
            the steps of input `i // repeats`.
        window: outer steps per window (`generate --window`), or None. With a
            window the runner works on one window at a time and only the
            joined outputs (O columns, held about 3 times while they are
            joined) grow with `Ta`; the window's rows are bounded by each
            sample's busiest window.

    Raises:
        DataError: naming the size, the batch and the settings that shrink it.
    """
    if not isinstance(ranges, BatchRanges):
        ranges = list(ranges)
        if not ranges:
            return
        largest = max(batch.stop - batch.start for batch in ranges)
    else:
        if not len(ranges):
            return
        largest = ranges.largest
    most = dict(ranges=ranges, largest=largest, max_steps=cascade.max_steps, repeats=repeats)
    rows = _most_rows(steps, outer_steps=outer_steps, **most)
    width = cascade.b_spec.output_size + cascade.a_spec.ir_size + sum(cascade.b_spec.state_sizes)
    itemsize = tf.as_dtype(cascade.model_b.outputs[0].dtype).size
    if window is None or window >= outer_steps:
        needed = float(rows) * width * itemsize * 4
    else:
        window_rows = _most_rows(_busiest_window(steps, outer_steps=outer_steps, window=window), outer_steps=window,
                                 **most)
        needed = (float(rows) * cascade.b_spec.output_size * 3 + float(window_rows) * width * 4) * itemsize
    available = _available_memory() if available is None else available
    if needed > available:
        raise DataError(
            f"generating would need about {needed / 2**30:.1f} GiB for a batch of {largest:,} samples "
            f"({rows:,} inner steps{'' if window is None else f', windows of {window:,} outer steps'}) but about "
            f"{available / 2**30:.1f} GiB is available; use a smaller batch_size{'' if window is None else ' or window'}"
            " or max_steps, or fewer steps."
        )


def _most_rows(steps, *, ranges, largest, outer_steps, max_steps, repeats):
    """The most inner steps one batch of `ranges` runs: `steps` `(Ta,)` or `(N, Ta)`, or None (`max_steps` each)."""
    if steps is None:
        return largest * outer_steps * int(max_steps)
    if steps.ndim == 1:
        return largest * int(steps.sum())
    if isinstance(ranges, BatchRanges):
        return _batch_rows(steps, ranges, repeats=repeats)
    sums = np.concatenate([[0], np.cumsum(steps.sum(axis=1, dtype=np.float64))])
    return int(max(sums[batch.stop] - sums[batch.start] for batch in ranges))


def _busiest_window(steps, *, outer_steps, window):
    """Each sample's most inner steps in one window of `window` outer steps, as steps of one outer step: `(1,)` for
    `(Ta,)` steps, `(N, 1)` for `(N, Ta)`; None for None."""
    if steps is None:
        return None
    pad = ((0, 0),) * (steps.ndim - 1) + ((0, -outer_steps % window),)
    per_window = np.pad(steps, pad).reshape(*steps.shape[:-1], -1, window)
    return per_window.sum(axis=-1).max(axis=-1, initial=0)[..., None]


def _available_memory():
    """The machine's memory in bytes, or the address-space limit when it is lower."""
    import os
    import resource

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    return physical if limit in (resource.RLIM_INFINITY, -1) else min(physical, limit)


def _job_inner_steps(steps, max_steps, *, n_samples, outer, repeats):
    """The inner steps a whole job may run: the sum of its caps over every sample and draw (Python int)."""
    if steps is None:
        return n_samples * outer * int(max_steps)
    if steps.ndim == 1:
        return n_samples * int(steps.sum())
    return repeats * int(steps.sum())


def _caps(steps, max_steps, start, stop, outer, *, repeats=1):
    """The caps `(stop - start, Ta)` int32 of a batch: its steps (input `i // repeats`'s for result sample `i`),
    or `max_steps` everywhere."""
    if steps is None:
        return np.full((stop - start, outer), max_steps, np.int32)
    if steps.ndim == 1:
        return np.broadcast_to(steps.astype(np.int32), (stop - start, outer))
    return steps[np.arange(start, stop, dtype=np.int64) // repeats].astype(np.int32)


def _whole_blocks(inputs, caps, *, start):
    """`(inputs, caps, sample_index)` of a batch padded with zero samples that run no step.

    The batch grows to a multiple of `packing.ROW_QUANTUM`, and to at least
    `MIN_BATCH_ROWS` samples.

    In whole blocks a sample's values do not depend on the batch beside it,
    and at 64 rows or more XLA runs A with the kernels of any large batch
    (below about 50 rows it picks others, with other last bits). With the
    runner's feedback loop on whole blocks too, `--batch-size` never changes
    a byte of a result with a sampler or feedback.
    """
    n = len(inputs)
    extra = max(MIN_BATCH_ROWS, -(-n // ROW_QUANTUM) * ROW_QUANTUM) - n
    inputs = np.concatenate([inputs, np.zeros((extra, *inputs.shape[1:]), inputs.dtype)])
    caps = np.concatenate([caps, np.zeros((extra, caps.shape[1]), caps.dtype)])
    return inputs, caps, np.arange(start, start + n + extra, dtype=np.int64)


def _read_repeated(source, batch, repeats):
    """The inputs of result samples `batch.start:batch.stop`: input `i // repeats` for result sample `i`."""
    if repeats == 1:
        return source.read(batch.start, batch.stop)
    first = batch.start // repeats
    inputs = source.read(first, (batch.stop - 1) // repeats + 1)
    return inputs[np.arange(batch.start, batch.stop, dtype=np.int64) // repeats - first]  # the batch's rows only


def _batch_function(function, signature):
    """`function` as one `tf.function` for every batch, traced at once without AutoGraph where it traces so.

    The runner is plain graph code (`tf.while_loop`, `tf.cond`), and AutoGraph
    leaves Keras' layers alone anyway: its rewriting of the runner's
    functions (about 40) was most of a small run's first call (issue 31) and
    adds no op. Should a path of the runner branch on a tensor in Python, it
    is traced with AutoGraph instead.
    """
    plain = tf.function(function, input_signature=signature, autograph=False)
    try:
        plain.get_concrete_function()
    except tf.errors.OperatorNotAllowedInGraphError:
        return tf.function(function, input_signature=signature)
    except Exception:  # noqa: BLE001 - the first batch traces it again, and a failure there names the model
        return plain
    return plain


def _run_batch(run, cascade, inputs, caps, index, batch):
    """Runs one batch: `(values, lengths)` or `(values, lengths, tokens)` as numpy.

    A TensorFlow failure inside a model becomes a `CascadeError` that names it.
    """
    try:
        outputs = run(inputs, caps, index)
    except tf.errors.OpError as error:
        raise CascadeError(
            f"{_failing_model(cascade, error)} failed on samples {batch.start}:{batch.stop}: "
            f"{str(error.message).strip().splitlines()[0] if error.message else type(error).__name__}"
        ) from error
    return tuple(output.numpy() for output in outputs)


def check_finite_outputs(cascade, part, inputs, *, first_sample, repeats=1):
    """Raises `CascadeError` when a batch's values hold NaN or Inf, naming the model and the first `(n, t, j)`.

    The model is A when A's IR of that sample and outer step is already
    non-finite, else B.

    Args:
        cascade: the `Cascade` that ran.
        part: the batch's `CascadeResult` (the samples written).
        inputs: the batch's inputs, one row per sample of `part`.
        first_sample: the result index of `part`'s first sample.
        repeats: the draws per input (`num_samples`).
    """
    bad = ~np.isfinite(part.values).all(axis=1)
    if not bad.any():
        return
    row = int(np.argmax(bad))
    ends = np.cumsum(part.lengths.reshape(-1))
    pair = int(np.searchsorted(ends, row, side="right"))
    n, t = divmod(pair, part.lengths.shape[1])
    j = row - (int(ends[pair - 1]) if pair else 0)
    ir = np.asarray(cascade.run_a(inputs[n:n + 1])[0])  # A in either form
    role, model = ("model A", cascade.model_a) if not np.isfinite(ir[0, t]).all() else ("model B", cascade.model_b)
    value = part.values[row][~np.isfinite(part.values[row])][0]
    sample = first_sample + n
    which = f"sample {sample}" + (f" (input {sample // repeats}, draw {sample % repeats})" if repeats > 1 else "")
    raise CascadeError(
        f"{role} ('{model.name}') went non-finite at {which}, outer step {t}, inner step {j}, the first "
        f"non-finite value ({value}); nothing was written. Check its weights (cascade inspect shows non-finite "
        "ones), or pass allow_nonfinite=True to write such values.")


def _failing_model(cascade, error):
    """`"model A"`, `"model B"` or `"the cascade"`, from the node names TensorFlow's message quotes."""
    text = str(error)
    for role, model in (("model B", cascade.model_b), ("model A", cascade.model_a)):
        if f"{model.name}/" in text or f"'{model.name}'" in text:
            return f"{role} ('{model.name}')"
    return "the cascade"


def identify_run(attrs, *, model_files, source, steps, batch_size, shard=None, num_samples=1):
    """Returns `attrs` with the run's `run_id` and, for a shard, the shard attributes.

    The `run_id` hashes what defines the run (`shards.run_id`): the given
    attributes, the bytes of the model and inputs files (not their paths, so
    `x.h5` and `./x.h5` are one run), the inputs' key, shape and dtype, the
    steps and the batch size. `batch_size` is part of it because a value can
    change in its last bits with the other rows of its batch, and the shards
    of one run must merge into exactly the result of an unsharded run.

    Args:
        attrs: the settings recorded in the result (state, stop rule, seed, ...).
        model_files: the model files read: `(model_a_path, model_b_path)`, or a packed generator's `(path,)`.
        source: the open `InputSource`.
        steps: the steps array, or None.
        batch_size: samples per runner call.
        shard: `(index, count)`, or None.
        num_samples: samples drawn per input: the result has `num_samples * N` samples.
    """
    from cascade_cli.shards import array_digest, file_digest, run_id, shard_attrs

    named = {key: value for key, value in attrs.items() if key not in _PATH_ATTRS}  # paths: by content below
    description = {**named, "models": [file_digest(path) for path in model_files],
                   "inputs": file_digest(source.path), "inputs_key": source.key, "inputs_shape": list(source.shape), "inputs_dtype": str(source.dtype),
                   "steps": None if steps is None else array_digest(steps), "batch_size": int(batch_size)}
    attrs = {**attrs, "run_id": run_id(description)}
    if shard is not None:
        index, count = shard
        total = source.n_samples * num_samples
        start, stop = shard_range(total, index=index, count=count)
        attrs.update(shard_attrs(index=index, count=count, start=start, stop=stop, total_samples=total,
                                 run=attrs["run_id"], description=description))
    return attrs
