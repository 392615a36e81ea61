"""Sharded generation: which samples a shard runs, the id of a run, and the merge of its shards.

`cascade generate --shard I/K` runs the I-th (0-based) of K contiguous slices
of the samples, sized like `np.array_split` (sizes differ by at most one, an
empty slice is valid), and records `SHARD_ATTRS` and a `run_id` in its result.
The `run_id` is a hash of what defines the run (model file contents, inputs
path, key and shape, steps, state, stop rule, seed...), so K processes on a
cluster agree on it without talking to each other. `merge_shards` checks that
its files are the K distinct shards of one run and streams them, in order,
into one ragged result. A shard also records the run's description
(`RUN_DESCRIPTION_ATTR`, its JSON), so that a merge of shards of different
runs can say which setting differs.
"""

import dataclasses
import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np

from cascade_cli.errors import DataError
from cascade_cli.results_io import STOP_SUMMARY_ATTRS, RaggedH5Writer, open_result, read_result_attrs, run_attrs

SHARD_ATTRS = ("shard_index", "shard_count", "sample_start", "sample_stop", "total_samples")
RUN_DESCRIPTION_ATTR = "run_description"
"""A shard's attribute holding the canonical JSON its `run_id` hashes; a merged result leaves it out."""
RUN_ID_LENGTH = 16
_SHOWN_DIGEST = 12  # hex characters of a digest shown in a message
_SHOWN_DIFFERENCES = 3
# Recorded attributes that do not define the run: paths (the run has their contents), the run's id and
# what a stop rule counted (a shard's own counts).
_NOT_SETTINGS = frozenset({"model", "model_a", "model_b", "inputs", "steps", "run_id", RUN_DESCRIPTION_ATTR,
                           *SHARD_ATTRS, *STOP_SUMMARY_ATTRS})
# How the description's parts that hash a file's or array's contents read in a message.
_DESCRIPTION_NAMES = {"models": "the model files' contents (sha256)", "inputs": "the inputs file's contents (sha256)",
                      "steps": "the steps (sha256)", "batch_size": "the batch size"}
_SHARD_PATTERN = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
_HASH_CHUNK = 1 << 20
_SHOWN_MISSING = 8


MAX_SHARDS = 2**31 - 1  # K is recorded as an int64 attribute; a run has at most one shard per sample anyway


def parse_shard(text):
    """Parses `"I/K"` (0-based: `0 <= I < K`) into `(index, count)`.

    Raises:
        DataError: when `text` is not two integers `I/K` with `0 <= I < K`.
    """
    match = _SHARD_PATTERN.fullmatch(str(text))
    if match is None:
        raise DataError(f"expected I/K, two integers such as 0/4, received '{text}'")
    index, count = int(match.group(1)), int(match.group(2))
    if count > MAX_SHARDS:
        raise DataError(f"expected at most {MAX_SHARDS:,} shards (K), received '{text}'")
    if count < 1:
        raise DataError(f"expected at least one shard (K >= 1), received '{text}'")
    if index >= count:
        raise DataError(
            f"expected a 0-based shard index 0 <= I < K = {count}, received I = {index} in '{text}'"
        )
    return index, count


def shard_range(n_samples, *, index, count):
    """Returns `(start, stop)`: the samples of shard `index` of `count`, as `np.array_split` cuts them.

    The first `n_samples % count` shards get one sample more; with
    `count > n_samples` the last shards are empty (`start == stop`).
    """
    if not 0 <= index < count:
        raise DataError(f"shard index: expected 0 <= I < {count}, received {index}")
    size, extra = divmod(int(n_samples), int(count))
    start = index * size + min(index, extra)
    return start, start + size + (1 if index < extra else 0)


def file_digest(path):
    """Returns the sha256 hex digest of a file's bytes, read a chunk at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def array_digest(array):
    """Returns the sha256 hex digest of an array's dtype, shape and C-order bytes."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _canonical(description):
    """The canonical JSON text of a run's description: sorted keys, no spaces."""
    return json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)


def run_id(description):
    """Returns the id of a run: a sha256 hex prefix of its canonical JSON description.

    Args:
        description: a JSON-serialisable dict of everything that defines the
            run's values (file digests, shapes, settings); key order does not
            matter.

    Returns:
        `RUN_ID_LENGTH` hex characters, the same for the same description.
    """
    return hashlib.sha256(_canonical(description).encode()).hexdigest()[:RUN_ID_LENGTH]


def shard_attrs(*, index, count, start, stop, total_samples, run, description=None):
    """Returns the attributes a shard records: `SHARD_ATTRS`, `run_id` and, given one, its description.

    Args:
        index, count, start, stop, total_samples: the shard and its samples.
        run: the run's `run_id`.
        description: what `run` hashes (see `run_id`), recorded as
            `RUN_DESCRIPTION_ATTR` so that `check_shards` can name the setting
            in which two runs differ; None records none.
    """
    attrs = {"shard_index": int(index), "shard_count": int(count), "sample_start": int(start),
             "sample_stop": int(stop), "total_samples": int(total_samples), "run_id": str(run)}
    if description is not None:
        attrs[RUN_DESCRIPTION_ATTR] = _canonical(description)
    return attrs


def _shown(value):
    """A setting's value as a message shows it: digests shortened, text quoted."""
    if isinstance(value, list):
        return "[" + ", ".join(_shown(item) for item in value) + "]"
    if isinstance(value, str):
        if len(value) > _SHOWN_DIGEST and re.fullmatch(r"[0-9a-f]+", value):
            return value[:_SHOWN_DIGEST] + "..."
        return repr(value)
    return "(none)" if value is None else repr(value)


def _settings(attrs):
    """What defines a shard's run, as far as it recorded it: its description, else its settings attributes."""
    text = attrs.get(RUN_DESCRIPTION_ATTR)
    if isinstance(text, str):
        try:
            description = json.loads(text)
        except ValueError:
            description = None
        if isinstance(description, dict):
            return description
    return {key: value for key, value in run_attrs(attrs).items() if key not in _NOT_SETTINGS}


def run_differences(attrs, other):
    """Says in which settings two shards' runs differ, from what each recorded.

    Args:
        attrs, other: the attributes of two shards with different `run_id`s.

    Returns:
        `(name, value, other_value)` triples, the values as a message shows
        them, in name order; empty when what they recorded is the same (shards
        that did not record their description, `RUN_DESCRIPTION_ATTR`, and
        differ only in what their settings do not say: file contents, batch size).
    """
    mine, theirs = _settings(attrs), _settings(other)
    if (RUN_DESCRIPTION_ATTR in attrs) != (RUN_DESCRIPTION_ATTR in other):  # compare like with like
        mine, theirs = ({key: value for key, value in run_attrs(item).items() if key not in _NOT_SETTINGS}
                        for item in (attrs, other))
    missing = object()
    return [(_DESCRIPTION_NAMES.get(key, key), _shown(mine.get(key)), _shown(theirs.get(key)))
            for key in sorted(set(mine) | set(theirs)) if mine.get(key, missing) != theirs.get(key, missing)]


def _other_run_message(shard, first):
    """The error for `shard`, whose run differs from `first`'s: the files, and which settings differ."""
    head = (f"'{shard.path}' is from another run than '{first.path}' (run_id {shard.attrs['run_id']} "
            f"!= {first.attrs['run_id']})")
    differences = run_differences(shard.attrs, first.attrs)
    if not differences:
        return (f"{head}; the settings they record are the same, so the contents of the model, inputs or steps "
                "files, or the batch size, differ; expected every shard of one run")
    shown = "; ".join(f"{name} is {value} in '{shard.path}' but {other} in '{first.path}'"
                      for name, value, other in differences[:_SHOWN_DIFFERENCES])
    if len(differences) > _SHOWN_DIFFERENCES:
        shown += f"; and {len(differences) - _SHOWN_DIFFERENCES} more setting(s)"
    return f"{head}: {shown}; expected every shard of one run"


@dataclasses.dataclass(frozen=True)
class MergeSummary:
    """What `merge_shards` wrote: the file, the run, shards, samples and emitted inner steps."""

    output: Path
    run_id: str
    shards: int
    samples: int
    emitted: int


@dataclasses.dataclass(frozen=True)
class _Shard:
    path: str
    attrs: dict

    @property
    def index(self):
        return self.attrs["shard_index"]

    @property
    def count(self):
        return self.attrs["shard_count"]

    @property
    def label(self):
        return f"shard {self.index}/{self.count}"


def _read_shard(path):
    """Reads and checks the shard attributes of one result file (not its arrays)."""
    attrs = read_result_attrs(path)
    missing = [key for key in (*SHARD_ATTRS, "run_id") if key not in attrs]
    if missing:
        raise DataError(
            f"'{path}' is not a shard: attribute {', '.join(repr(key) for key in missing)} is missing; "
            "expected a result written by cascade generate --shard I/K"
        )
    for key in SHARD_ATTRS:
        value = attrs[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(f"'{path}' attribute '{key}': expected a non-negative integer, received {value!r}")
    shard = _Shard(str(path), attrs)
    if not shard.index < shard.count:
        raise DataError(f"'{path}' attribute 'shard_index': expected 0 <= I < {shard.count}, received {shard.index}")
    if not attrs["sample_start"] <= attrs["sample_stop"] <= attrs["total_samples"]:
        raise DataError(
            f"'{path}' samples {attrs['sample_start']}:{attrs['sample_stop']}: expected a range within "
            f"0:{attrs['total_samples']}"
        )
    return shard


def check_shards(paths):
    """Checks that `paths` are the K distinct shards of one run and returns them sorted by index.

    Args:
        paths: result files written by `cascade generate --shard I/K`, in any order.

    Returns:
        The shards' `(path, attrs)` pairs, sorted by `shard_index`.

    Raises:
        DataError: naming the files, when one is not a shard, when they come
            from different runs or splits, or when a shard is duplicated or
            missing, or the sample ranges do not join up.
    """
    paths = list(paths)
    if not paths:
        raise DataError("no shards given: expected the K result files of one cascade generate --shard run")
    shards = [_read_shard(path) for path in paths]
    first = shards[0]
    for shard in shards[1:]:
        if shard.attrs["run_id"] != first.attrs["run_id"]:
            raise DataError(_other_run_message(shard, first))
        for key in ("shard_count", "total_samples"):
            if shard.attrs[key] != first.attrs[key]:
                raise DataError(
                    f"'{shard.path}' has {key} {shard.attrs[key]} but '{first.path}' has {first.attrs[key]}: "
                    "expected shards of one split of the run"
                )
    by_index = {}
    for shard in shards:
        if shard.index in by_index:
            raise DataError(
                f"'{by_index[shard.index].path}' and '{shard.path}' are both {shard.label}: "
                "expected each shard once"
            )
        by_index[shard.index] = shard
    count = first.count
    if len(by_index) != count:  # never a list of `count` entries: a damaged file may claim 10**9 shards
        shown = list(itertools.islice((index for index in range(count) if index not in by_index), _SHOWN_MISSING))
        names = ", ".join(f"{index}/{count}" for index in shown)
        if count - len(by_index) > len(shown):
            names += f" and {count - len(by_index) - len(shown):,} more"
        plural = "s" if count - len(by_index) > 1 else ""
        raise DataError(
            f"shard{plural} {names} {'are' if plural else 'is'} missing: expected all {count:,} shards of run "
            f"{first.attrs['run_id']}, received {len(shards)}"
        )
    ordered = [by_index[index] for index in range(count)]
    stop = 0
    for shard in ordered:
        start = shard.attrs["sample_start"]
        if start != stop:
            raise DataError(
                f"'{shard.path}' ({shard.label}) starts at sample {start}: expected {stop}, where the shard "
                "before it ends"
            )
        stop = shard.attrs["sample_stop"]
    if stop != first.attrs["total_samples"]:
        raise DataError(
            f"the shards end at sample {stop}: expected {first.attrs['total_samples']}, the run's total_samples"
        )
    return [(shard.path, shard.attrs) for shard in ordered]


def merge_shards(paths, output, *, overwrite=False, batch_samples=None):
    """Joins the K shards of one run into one ragged HDF5 result, one batch of samples in memory at a time.

    The shards are checked first (`check_shards`), then read a batch at a
    time and appended in `shard_index` order through `RaggedH5Writer`, so
    `output` appears only when every shard fitted, and is never one of the
    shards (whatever its spelling). Its attributes are the run's, without
    `SHARD_ATTRS` and `RUN_DESCRIPTION_ATTR`.

    Args:
        paths: the shard result files, in any order.
        output: the `.h5` file to write.
        overwrite: whether `output` may be replaced.
        batch_samples: samples read at a time; `None` reads about 64 MiB of
            values at a time.

    Returns:
        A `MergeSummary`.

    Raises:
        DataError: see `check_shards`; also when a shard's arrays disagree
            with its attributes or with the other shards (Ta, O).
    """
    shards = check_shards(paths)
    first_path, first_attrs = shards[0]
    attrs = {key: value for key, value in run_attrs(first_attrs).items()
             if key not in (*SHARD_ATTRS, RUN_DESCRIPTION_ATTR)}
    for key in STOP_SUMMARY_ATTRS:  # what a stop rule did: counts, so the run's are the shards' sums
        counts = [shard_attrs.get(key) for _, shard_attrs in shards]
        if key in attrs and all(isinstance(count, int) for count in counts):
            attrs[key] = sum(counts)
    with open_result(first_path) as first:
        shape, dtype, tokens = (first.outer_steps, first.output_size), first.dtype, first.has_tokens
    samples = emitted = 0
    with RaggedH5Writer(output, outer_steps=shape[0], output_size=shape[1], overwrite=overwrite,
                        attrs=attrs, dtype=dtype, inputs=[path for path, _ in shards], tokens=tokens) as writer:
        for path, shard in shards:
            with open_result(path) as reader:
                if (reader.outer_steps, reader.output_size) != shape:
                    raise DataError(
                        f"'{path}' has Ta={reader.outer_steps} outer steps and output size O={reader.output_size}: "
                        f"expected Ta={shape[0]} and O={shape[1]} like '{first_path}'"
                    )
                if reader.has_tokens != tokens:  # the sampled ids of a greedy or categorical run
                    raise DataError(f"'{path}' {'holds' if reader.has_tokens else 'has no'} sampled tokens: "
                                    f"expected {'them' if tokens else 'none'} like '{first_path}'")
                expected = shard["sample_stop"] - shard["sample_start"]
                if reader.n_samples != expected:
                    raise DataError(
                        f"'{path}' holds {reader.n_samples} samples: expected {expected}, its samples "
                        f"{shard['sample_start']}:{shard['sample_stop']}"
                    )
                for piece in reader.pieces(batch_samples=batch_samples):
                    writer.append(piece)
                samples += reader.n_samples
                emitted += reader.total
    return MergeSummary(Path(output), str(first_attrs["run_id"]), len(shards), samples, emitted)
