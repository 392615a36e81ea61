"""`benchmarks.tapes`: its table from timings worked out by hand, and (slow) a quick run end to end."""

import dataclasses

import pytest

from benchmarks import bench, tapes

RUN_PLAN = tapes.plan(quick=True)


def fake_timings(medians, first_calls):
    return [{"name": name, "method": method, "times_s": [seconds], "median_s": seconds,
             **({"first_call_s": first_calls[name, method]} if (name, method) in first_calls else {})}
            for (name, method), seconds in medians.items()]


def test_the_table_divides_each_tape_by_one_tape_and_gives_first_calls_in_seconds(tmp_path):
    name = RUN_PLAN.cases[0].name
    timings = fake_timings({(name, "compiled"): 0.010, (name, "one_tape"): 0.020, (name, "persistent"): 0.025,
                            (name, "nested"): 0.030},
                           {(name, "one_tape"): 9.66, (name, "persistent"): 5.0, (name, "nested"): 12.34})
    rows = tapes.timing_rows(RUN_PLAN, timings)
    assert rows[0] == [name, "10.0", "20.0", "25.0", "30.0", "1.25", "1.50", "9.7", "5.0", "12.3"]
    assert rows[1][1:] == ["-"] * 9  # a case with no timings
    machine = {"date": "d", "cpu_model": "c", "cpu_count": 2, "memory_gib": 1.0, "gpus": [], "python": "p",
               "tensorflow": "t", "keras": "k", "numpy": "n"}
    run = {"suite": "tapes", "device": "cpu", "machine": machine, "plan": dataclasses.asdict(RUN_PLAN),
           "timings": timings}
    bench.write_report(tmp_path, run=run)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Tapes, cpu (quick" in text
    assert f"| {name} | 10.0 | 20.0 | 25.0 | 30.0 | 1.25 | 1.50 | 9.7 | 5.0 | 12.3 |" in text


@pytest.mark.slow  # about a minute: three fresh cascades per case, each traced
def test_a_quick_run_times_every_method_and_checks_the_gradients(tmp_path):
    run = tapes.main(["--quick", "--out", str(tmp_path)])
    timed = {(t["name"], t["method"]) for t in run["timings"] if "median_s" in t}
    assert timed == {(case.name, method) for case in RUN_PLAN.cases for method in tapes.METHODS}
    assert all(t["first_call_s"] > 0 for t in run["timings"] if t["method"] in tapes.TAPES)
