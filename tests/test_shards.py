"""Tests of sharded generation (`cascade generate --shard I/K`) and `cascade merge` (`cascade_cli.shards`).

The reference is an unsharded `generate` of the same run: K shards merged must
give exactly its `flat_values`, `lengths` and attributes. Shard ranges are
checked against `np.array_split`; merge errors by exit code, their one
`Error: ...` line and an output folder left empty.
"""

import json
import os
import shutil
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import builders
from cascade_cli.cli import main
from cascade_cli.errors import DataError
from cascade_cli.results_io import read_result, read_result_attrs, write_result
from cascade_cli.result import CascadeResult
from cascade_cli.shards import (RUN_DESCRIPTION_ATTR, SHARD_ATTRS, check_shards, merge_shards, parse_shard, run_id,
                                 shard_attrs, shard_range)

N, TA, F = 5, 3, 3
STEPS = np.array([[2, 0, 3], [0, 0, 0], [1, 1, 0], [3, 2, 1], [0, 4, 0]])  # sample 1 emits nothing
STOP = ("--steps-file", "steps.txt", "--max-steps", "4", "--stop-norm", "1.0")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    builders.model_a().save(folder / "a.keras")  # F=3 -> H=4
    builders.step_b().save(folder / "b.keras")  # H=4 -> O=2
    with h5py.File(folder / "x.h5", "w") as f:
        f.create_dataset("inputs", data=builders.inputs(N, TA))
    (folder / "steps.txt").write_text("".join(" ".join(map(str, row)) + "\n" for row in STEPS))
    return folder


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def generate(files, out, *extra):
    extra = [files / arg if arg == "steps.txt" else arg for arg in extra]
    result = invoke("generate", "--model-a", files / "a.keras", "--model-b", files / "b.keras",
                    "--inputs", files / "x.h5", "--batch-size", 2, "-o", out, *extra)  # a later flag wins
    assert result.exit_code == 0, result.output
    return out


def run_shards(files, folder, count, *extra):
    folder.mkdir(exist_ok=True)
    return [generate(files, folder / f"part{index}.h5", "--shard", f"{index}/{count}", *extra)
            for index in range(count)]


@pytest.fixture(scope="module")
def whole(files, tmp_path_factory):
    """Unsharded results of the two runs the tests split: per-sample steps, and a stop rule."""
    folder = tmp_path_factory.mktemp("whole")
    return {"steps": generate(files, folder / "steps.h5", "--steps-file", "steps.txt"),
            "stop": generate(files, folder / "stop.h5", *STOP)}


@pytest.fixture(scope="module")
def three(files, tmp_path_factory):
    """The three shards of the per-sample steps run."""
    return run_shards(files, tmp_path_factory.mktemp("three"), 3, "--steps-file", "steps.txt")


def assert_same_result(merged, reference):
    got, expected = read_result(merged), read_result(reference)
    assert np.array_equal(got.values, expected.values)
    assert np.array_equal(got.lengths, expected.lengths)
    assert got.values.dtype == expected.values.dtype
    assert read_result_attrs(merged) == read_result_attrs(reference)


def assert_error(result, *words):
    """Exit 1 with one `Error: ...` line holding every one of `words`, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


# ------------------------------------------------------------ shard ranges


@pytest.mark.parametrize("n", [0, 1, 5, 7, 12])
@pytest.mark.parametrize("count", [1, 3, 4, 9])
def test_shard_ranges_are_those_of_array_split(n, count):
    pieces = np.array_split(np.arange(n), count)
    for index, piece in enumerate(pieces):
        start, stop = shard_range(n, index=index, count=count)
        assert np.array_equal(np.arange(start, stop), piece)


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard(" 3 / 4 ") == (3, 4)
    for text in ("4/4", "1/0", "-1/3", "1", "a/b", "1/2/3", ""):
        with pytest.raises(DataError):
            parse_shard(text)


def test_run_id_is_a_stable_hash_of_the_description():
    first = run_id({"seed": 0, "state": "reset"})
    assert first == run_id({"state": "reset", "seed": 0})  # key order does not matter
    assert len(first) == 16 and int(first, 16) >= 0
    assert first != run_id({"seed": 1, "state": "reset"})


# ------------------------------------------------------- generate and merge


def test_shards_record_their_range_and_one_run_id(files, whole, three):
    expected = [(0, 2), (2, 4), (4, 5)]  # np.array_split(range(5), 3)
    ids = set()
    for index, path in enumerate(three):
        attrs = read_result_attrs(path)
        assert (attrs["shard_index"], attrs["shard_count"], attrs["total_samples"]) == (index, 3, N)
        assert (attrs["sample_start"], attrs["sample_stop"]) == expected[index]
        ids.add(attrs["run_id"])
        start, stop = expected[index]
        part = read_result(path)
        assert np.array_equal(part.lengths, read_result(whole["steps"]).lengths[start:stop])
    assert ids == {read_result_attrs(whole["steps"])["run_id"]}
    assert ids != {read_result_attrs(whole["stop"])["run_id"]}


@pytest.mark.parametrize("count", [1, 3, 7])
def test_merged_shards_equal_an_unsharded_run(files, whole, three, tmp_path, count):
    parts = three if count == 3 else run_shards(files, tmp_path / "parts", count, "--steps-file", "steps.txt")
    result = invoke("merge", *parts, "-o", tmp_path / "all.h5")
    assert result.exit_code == 0, result.output
    assert f"{count} shards" in result.stderr and f"{N} samples" in result.stderr
    assert_same_result(tmp_path / "all.h5", whole["steps"])
    if count == 7:  # shards 5 and 6 are empty but keep Ta and O
        empty = read_result(parts[6])
        assert (empty.n_samples, empty.outer_steps, empty.output_size, empty.total) == (0, TA, 2, 0)
        assert read_result_attrs(parts[6])["sample_start"] == read_result_attrs(parts[6])["sample_stop"] == N


def test_merged_shards_of_a_stop_rule_run(files, whole, tmp_path):
    parts = run_shards(files, tmp_path / "parts", 2, *STOP)
    assert invoke("merge", *parts, "-o", tmp_path / "all.h5").exit_code == 0
    assert_same_result(tmp_path / "all.h5", whole["stop"])
    assert 0 < read_result(whole["stop"]).lengths.sum() < STEPS.sum()  # the rule really stopped some pairs


def test_merge_takes_the_shards_in_any_order(whole, three, tmp_path):
    result = invoke("merge", three[2], three[0], three[1], "-o", tmp_path / "all.h5")
    assert result.exit_code == 0, result.output
    assert_same_result(tmp_path / "all.h5", whole["steps"])
    assert not set(SHARD_ATTRS) & set(read_result_attrs(tmp_path / "all.h5"))


def test_merge_refuses_an_existing_output_unless_overwrite(whole, three, tmp_path):
    out = tmp_path / "all.h5"
    out.write_bytes(b"keep")
    assert_error(invoke("merge", *three, "-o", out), "already exists", "--overwrite")
    assert out.read_bytes() == b"keep"
    assert invoke("merge", *three, "-o", out, "--overwrite").exit_code == 0
    assert_same_result(out, whole["steps"])


# ------------------------------------------------------------ merge errors


@pytest.mark.parametrize("case", ["other seed", "other batch size", "gap", "two missing", "duplicate",
                                  "not a shard", "other split"])
def test_merge_errors_name_the_files_and_leave_nothing(files, whole, three, tmp_path, case):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if case.startswith("other ") and case != "other split":  # shard 1/3 of a run that differs in one flag
        flag = ["--seed", "1"] if case == "other seed" else ["--batch-size", "3"]
        other = generate(files, tmp_path / "other1.h5", "--steps-file", "steps.txt", "--shard", "1/3", *flag)
        parts, words = [three[0], other, three[2]], [f"'{other}' is from another run than '{three[0]}'"]
        # which setting differs, both values and both files (the batch size is in the run's description)
        words.append(f"seed is 1 in '{other}' but 0 in '{three[0]}'" if case == "other seed" else "batch size")
    elif case == "gap":
        parts, words = [three[2], three[0]], ["shard 1/3 is missing"]
    elif case == "two missing":
        parts, words = [three[1]], ["shards 0/3, 2/3 are missing"]
    elif case == "duplicate":
        copy = shutil.copy(three[0], tmp_path / "copy0.h5")
        parts, words = [three[0], three[1], copy, three[2]], [f"'{three[0]}' and '{copy}' are both shard 0/3"]
    elif case == "not a shard":
        parts, words = [three[0], whole["steps"]], [f"'{whole['steps']}' is not a shard", "--shard"]
    else:
        two = generate(files, tmp_path / "two1.h5", "--steps-file", "steps.txt", "--shard", "1/2")
        parts, words = [three[0], two], [f"'{two}' has shard_count 2", f"'{three[0]}' has 3"]
    assert_error(invoke("merge", *parts, "-o", out_dir / "all.h5"), *words)
    assert os.listdir(out_dir) == []


def fake_shard(path, *, index, count, start, stop, total=4, outer=2, run="r", description=None, **settings):
    lengths = np.ones((stop - start, outer), np.int64)
    attrs = shard_attrs(index=index, count=count, start=start, stop=stop, total_samples=total, run=run,
                        description=description)
    write_result(path, CascadeResult(np.zeros((int(lengths.sum()), 1), np.float32), lengths),
                 attrs={**attrs, **settings})
    return path


DESCRIPTION = {"state": "reset", "seed": 0, "batch_size": 2, "models": ["ab" * 32, "cd" * 32], "inputs": "ef" * 32,
               "steps": None}


def test_merge_names_the_setting_in_which_two_runs_differ(tmp_path):
    def pair(first, second, **settings):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        a = fake_shard(folder / "a.h5", index=0, count=2, start=0, stop=2, run=run_id(first or {}),
                       description=first, **settings.get("a", {}))
        b = fake_shard(folder / "b.h5", index=1, count=2, start=2, stop=4, run=run_id(second or {"b": 1}),
                       description=second, **settings.get("b", {}))
        with pytest.raises(DataError) as caught:
            check_shards([a, b])
        message = str(caught.value)
        assert message.startswith(f"'{b}' is from another run than '{a}'"), message
        return message, a, b

    message, a, b = pair(DESCRIPTION, {**DESCRIPTION, "batch_size": 3})
    assert f"the batch size is 3 in '{b}' but 2 in '{a}'" in message
    assert "seed" not in message and "state" not in message  # only what differs
    message, a, b = pair(DESCRIPTION, {**DESCRIPTION, "inputs": "01" * 32, "seed": 4})
    assert f"the inputs file's contents (sha256) is {'01' * 6}... in '{b}' but {'ef' * 6}... in '{a}'" in message
    assert f"seed is 4 in '{b}' but 0 in '{a}'" in message
    message, a, b = pair(DESCRIPTION, {key: value for key, value in DESCRIPTION.items() if key != "seed"})
    assert f"seed is (none) in '{b}' but 0 in '{a}'" in message
    # shards that did not record their description: the settings they did record, paths and counts aside
    message, a, b = pair(None, None, a={"state": "reset", "inputs": "x.h5", "stop_pairs": 3},
                         b={"state": "carry", "inputs": "./x.h5", "stop_pairs": 5})
    assert f"state is 'carry' in '{b}' but 'reset' in '{a}'" in message
    assert "inputs" not in message.split("):", 1)[1] and "stop_pairs" not in message
    message, a, b = pair(None, None, a={"seed": 0}, b={"seed": 0})
    assert "the settings they record are the same" in message and "batch size" in message


def test_a_merged_result_leaves_out_the_run_description(tmp_path):
    run = run_id(DESCRIPTION)
    parts = [fake_shard(tmp_path / f"p{index}.h5", index=index, count=2, start=2 * index, stop=2 * index + 2,
                        run=run, description=DESCRIPTION, seed=0) for index in range(2)]
    assert json.loads(read_result_attrs(parts[0])[RUN_DESCRIPTION_ATTR]) == DESCRIPTION
    merge_shards(parts, tmp_path / "all.h5")
    assert read_result_attrs(tmp_path / "all.h5") == {"layout": "ragged", "format_version": 1, "run_id": run,
                                                      "seed": 0}


def test_check_shards_refuses_ranges_that_do_not_join_and_arrays_that_differ(tmp_path):
    a = fake_shard(tmp_path / "a.h5", index=0, count=2, start=0, stop=2)
    b = fake_shard(tmp_path / "b.h5", index=1, count=2, start=2, stop=4)
    assert [path for path, _ in check_shards([b, a])] == [str(a), str(b)]
    overlap = fake_shard(tmp_path / "c.h5", index=1, count=2, start=1, stop=4)
    with pytest.raises(DataError, match=r"'.*c\.h5' \(shard 1/2\) starts at sample 1: expected 2"):
        check_shards([a, overlap])
    short = fake_shard(tmp_path / "d.h5", index=1, count=2, start=2, stop=3)
    with pytest.raises(DataError, match="end at sample 3: expected 4"):
        check_shards([a, short])
    wide = fake_shard(tmp_path / "e.h5", index=1, count=2, start=2, stop=4, outer=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = invoke("merge", a, wide, "-o", out_dir / "all.h5")
    assert_error(result, f"'{wide}' has Ta=3 outer steps", "expected Ta=2")
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("value", ["3/3", "x", "1/0", "-1/3", "1"])
def test_a_malformed_shard_is_a_usage_error(files, tmp_path, value):
    result = invoke("generate", "--model-a", files / "a.keras", "--model-b", files / "b.keras",
                    "--inputs", files / "x.h5", "--steps", "1,2,3", "--shard", value, "-o", tmp_path / "p.h5")
    assert result.exit_code == 2, result.output
    assert "'--shard'" in result.stderr and "Traceback" not in result.output
    assert os.listdir(tmp_path) == []


def test_merge_and_shard_have_help_with_an_example():
    result = invoke("merge", "--help")
    assert result.exit_code == 0 and "Example:" in result.stdout and "cascade merge" in result.stdout
    assert "--shard I/K" in invoke("generate", "--help").stdout


def test_merge_shards_streams_batches_into_the_run_by_hand(tmp_path):
    run = "0123456789abcdef"
    parts = [CascadeResult(np.arange(6, dtype=np.float32).reshape(3, 2), [[2, 0], [0, 1], [0, 0]]),
             CascadeResult(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.int64)),
             CascadeResult(np.arange(6, 14, dtype=np.float32).reshape(4, 2), [[1, 3]])]
    paths = []
    for index, (start, stop) in enumerate([(0, 3), (3, 3), (3, 4)]):
        paths.append(tmp_path / f"p{index}.npz")
        write_result(paths[-1], parts[index], attrs={**shard_attrs(index=index, count=3, start=start, stop=stop,
                                                                   total_samples=4, run=run), "seed": 7})
    summary = merge_shards(paths[::-1], tmp_path / "all.h5", batch_samples=1)
    assert (summary.run_id, summary.shards, summary.samples, summary.emitted) == (run, 3, 4, 7)
    merged = read_result(tmp_path / "all.h5")
    assert merged.lengths.tolist() == [[2, 0], [0, 1], [0, 0], [1, 3]]
    np.testing.assert_array_equal(merged.values, np.arange(14, dtype=np.float32).reshape(7, 2))
    assert read_result_attrs(tmp_path / "all.h5") == {"layout": "ragged", "format_version": 1,
                                                      "run_id": run, "seed": 7}


def test_merge_never_writes_over_one_of_its_shards(tmp_path, monkeypatch):
    a = fake_shard(tmp_path / "a.h5", index=0, count=2, start=0, stop=2)
    b = fake_shard(tmp_path / "b.h5", index=1, count=2, start=2, stop=4)
    (tmp_path / "link.h5").symlink_to(b)
    before = b.read_bytes()
    monkeypatch.chdir(tmp_path)
    for output in ("b.h5", "./../" + tmp_path.name + "/b.h5", "link.h5"):
        with pytest.raises(DataError, match=r"is one of this command's inputs.*choose another output name"):
            merge_shards([a, b], output, overwrite=True)
    assert b.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "b.h5", "link.h5"]


def test_a_shard_claiming_a_billion_shards_is_refused_at_once(tmp_path):
    a = fake_shard(tmp_path / "a.h5", index=0, count=10**9, start=0, stop=2)
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"shards 1/1000000000, 2/1000000000, .* and 999,999,991 more are missing: "
                                        r"expected all 1,000,000,000 shards"):
        check_shards([a])
    assert time.perf_counter() - started < 1.0


def test_a_shard_count_past_what_a_result_can_record_is_refused():
    from cascade_cli.shards import MAX_SHARDS, parse_shard

    assert parse_shard(f"0/{MAX_SHARDS}") == (0, MAX_SHARDS)
    with pytest.raises(DataError, match="expected at most 2,147,483,647 shards"):
        parse_shard("0/100000000000000000000")
