"""Tests of `cascade_cli.inspection`: the facts `cascade inspect` prints about a file."""

import re

import numpy as np
import pytest

from cascade_cli import h5, inspection, results_io
from cascade_cli.errors import DataError
from cascade_cli.result import CascadeResult
from cascade_cli.results_io import write_result

LENGTHS = [[3, 0], [1, 2]]


def hand_result():
    return CascadeResult(np.arange(12, dtype=np.float32).reshape(6, 2), LENGTHS)


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_describe_result_reads_the_header_and_lengths_and_checks_the_values(tmp_path, suffix):
    """The values are read too (issue 34: inspect says when a result holds NaN or Inf), a batch at a time."""
    path = tmp_path / f"r{suffix}"
    write_result(path, hand_result(), layout="padded", pad_value=-1.0,
                 attrs={"state": "reset", "stop_rule": "norm", "stop_value": 0.5, "max_steps": 3})

    report = inspection.describe_result(path)
    rows = dict(report.rows)
    assert rows["layout"] == "padded (format_version 1)"
    assert (rows["samples N"], rows["outer steps Ta"], rows["output size O"]) == ("2", 2, 2)
    assert rows["inner steps"] == "6 emitted, longest 3"
    assert rows["padding"] == "pad_value -1.0, time_major False"
    assert rows["state"] == "reset" and "pad_value" not in rows
    # only (0, 0) has 3 steps: the words of generate's summary of the same run
    assert rows["stop rule"] == "Stop rule norm >= 0.5: 1 of 4 pairs reached their cap; the rule ended the other 3 earlier."
    assert report.lengths.tolist() == LENGTHS
    assert "warning" not in rows  # every value is finite


@pytest.mark.parametrize("recorded, expected", [
    ({"a_compiled": True, "jit_compile": "auto"}, "under XLA (jit_compile=auto)"),
    ({"a_compiled": False, "jit_compile": "False"}, "without XLA (jit_compile=False)"),
    ({"a_compiled": False, "jit_compile": "auto"},
     "without XLA (jit_compile=auto): A did not compile, or its XLA call differed from its plain call"),
    ({"a_compiled": True}, "under XLA"),
    ({"jit_compile": "True"}, "jit_compile=True (whether it ran under XLA is not recorded)"),
    ({}, None),  # an older file: nothing said
])
def test_inspect_says_whether_model_a_ran_under_xla(tmp_path, recorded, expected):
    path = tmp_path / "r.h5"
    write_result(path, hand_result(), attrs={"state": "reset", **recorded})
    rows = inspection.describe_result(path).rows
    assert dict(rows).get("model A ran") == expected
    assert not {"a_compiled", "jit_compile"} & {name for name, _ in rows}  # one row, not the raw attributes


@pytest.mark.parametrize("recorded, expected", [
    ({"loop_compiled": True}, "under XLA, whole"),
    ({"loop_compiled": False, "loop_compile_problem": "B is in sequence form: it runs in one padded call, not a loop"},
     "without XLA: B is in sequence form: it runs in one padded call, not a loop"),
    ({"loop_compiled": False}, "without XLA"),
    ({"a_compiled": True}, None),  # a file from before the loop compiled: nothing said of it
])
def test_inspect_says_whether_the_loop_over_b_ran_under_xla(tmp_path, recorded, expected):
    path = tmp_path / "r.h5"
    write_result(path, hand_result(), attrs={"state": "reset", **recorded})
    rows = inspection.describe_result(path).rows
    assert dict(rows).get("the loop over B ran") == expected
    assert not {"loop_compiled", "loop_compile_problem"} & {name for name, _ in rows}


def test_kind_of_tells_results_from_inputs_and_training(tmp_path):
    write_result(tmp_path / "r.npz", hand_result())
    write_result(tmp_path / "r.h5", hand_result())
    write_result(tmp_path / "r.csv", hand_result())
    np.savez(tmp_path / "x.npz", inputs=np.zeros((2, 3, 4)))
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4)))
    np.save(tmp_path / "s.npy", np.zeros((2, 3)))
    (tmp_path / "s.csv").write_text("1,2,3\n")
    kinds = {name: inspection.kind_of(tmp_path / name)
             for name in ("r.npz", "r.h5", "r.csv", "x.npz", "x.npy", "s.npy", "s.csv")}
    assert kinds == {"r.npz": "result", "r.h5": "result", "r.csv": "csv", "x.npz": "inputs",
                     "x.npy": "inputs", "s.npy": "steps", "s.csv": "steps"}


def test_kind_of_errors_name_the_file(tmp_path):
    (tmp_path / "cut.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(DataError, match=r"'.*cut\.npy' is not readable as a \.npy array"):
        inspection.kind_of(tmp_path / "cut.npy")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"'.*bad\.npz' is not readable as a \.npz archive"):
        inspection.kind_of(tmp_path / "bad.npz")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"'.*bad\.h5' is not a readable HDF5 file"):
        inspection.kind_of(tmp_path / "bad.h5")
    with pytest.raises(DataError, match="does not exist"):
        inspection.kind_of(tmp_path / "nope.h5")


def test_run_attrs_leave_the_layout_out():
    attrs = {"layout": "padded", "format_version": 1, "pad_value": 0.0, "time_major": True, "seed": 2}
    assert inspection.run_attrs(attrs) == {"seed": 2}


def test_inspect_describes_a_stop_rule_run_as_generate_does(tmp_path):
    path = tmp_path / "r.h5"
    attrs = {"stop_rule": "token", "stop_value": 2, "max_steps": 3, "steps": "none", "exclude_stop_step": False}
    write_result(path, hand_result(), attrs=attrs)
    sentence, warning = inspection.stop_rule_lines(("token", 2), pairs=4, at_cap=1, at_first=1)
    assert sentence == "Stop rule token == 2: 1 of 4 pairs reached their cap; the rule ended the other 3 earlier."
    assert warning is None
    rows = inspection.describe_result(path).rows
    assert ("stop rule", sentence) in rows and not [row for row in rows if row[0] == "warning"]
    capped = CascadeResult(np.zeros((12, 2), np.float32), [[3, 3], [3, 3]])  # the rule never fired
    write_result(tmp_path / "capped.h5", capped, attrs=attrs)
    rows = dict(inspection.describe_result(tmp_path / "capped.h5").rows)
    assert rows["stop rule"].startswith("Stop rule token == 2: 4 of 4 pairs reached their cap")
    assert rows["warning"].startswith("the stop rule never fired")
    assert inspection.stop_rule_lines(("norm", 1.0), pairs=4, at_cap=0, at_first=4)[1].startswith(
        "the stop rule fired at the first step of every pair")
    write_result(tmp_path / "given.h5", hand_result(), attrs={**attrs, "steps": "'s.txt'"})
    rows = inspection.describe_result(tmp_path / "given.h5").rows
    assert rows[-1][1].startswith("(caps: max_steps 3; the steps given as caps, 's.txt', are not in the file")
    counted = {"stop_pairs": 3, "stop_at_cap": 2, "stop_at_first": 0}  # what generate counted with its caps
    write_result(tmp_path / "counted.h5", hand_result(), attrs={**attrs, "steps": "'s.txt'", **counted})
    rows = inspection.describe_result(tmp_path / "counted.h5").rows
    assert rows[-1] == ("stop rule", inspection.stop_rule_lines(("token", 2), pairs=3, at_cap=2)[0])
    assert not set(counted) & {name for name, _ in rows}


def test_model_inputs_and_outputs_are_named_by_their_layers():
    import keras

    x = keras.Input((3,), name="ir")
    model = keras.Model(x, [keras.layers.Dense(2, name="head")(x), keras.layers.Dense(1, name="gate")(x)])
    rows = dict(inspection.describe_model(model, "m.keras")[0])
    assert rows["inputs"] == "ir (None, 3)"
    assert rows["outputs"] == "head (None, 2); gate (None, 1)"
    assert "keras_tensor" not in rows["outputs"]


HISTORY = """epoch,loss,val_loss,seconds
1,4.0,5.0,0.5
2,2.0,3.0,0.4
3,1.0,3.5,0.4
"""


def test_a_training_history_is_described_as_one(tmp_path):
    """history.csv used to be read as a steps file."""
    path = tmp_path / "history.csv"
    path.write_text(HISTORY)
    assert inspection.kind_of(path) == "csv"
    report = inspection.describe_csv(path)
    rows = dict(report.rows)
    assert rows["training history"] == f"'{path}'"
    assert rows["epochs"] == "3"
    assert rows["last"] == "epoch 3: loss 1, val_loss 3.5"
    assert rows["best val_loss"] == "3 at epoch 2 (the weights kept)"
    plot = [value for name, value in report.rows if name == ""]
    assert plot == inspection.text_plot({"loss": [4.0, 2.0, 1.0], "val_loss": [5.0, 3.0, 3.5]})
    assert report.lengths is None


def test_text_plot_by_hand():
    # values 1..5 on 5 rows: one row per unit; loss 5, 3, 1 and val_loss 5, 4, 3 (both at 5 in column 0)
    lines = inspection.text_plot({"loss": [5, 3, 1], "val_loss": [5, 4, 3]}, width=60, height=5)
    assert lines == ["5 |*  ",
                     "4 | x ",
                     "3 | ox",
                     "2 |   ",
                     "1 |  o",
                     "  +---"]
    # six epochs into three columns: the mean of each pair
    # six epochs into three columns: the means 2, 3 and 5; 2 lies half way between rows 1 and 3 and rounds up
    assert inspection.text_plot({"loss": [1, 3, 3, 3, 5, 5]}, width=3, height=3) == [
        "5 |  o", "3 |oo ", "1 |   ", "  +---"]
    assert inspection.text_plot({"loss": [float("nan")]}) == []


def test_a_history_with_a_bad_number_names_line_and_column(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,val_loss,seconds\n1,abc,,0.1\n")
    with pytest.raises(DataError, match=r"line 2 column 'loss': expected a number, received 'abc'"):
        inspection.describe_csv(path)


def test_a_fifo_is_refused_instead_of_blocking_the_read(tmp_path):
    import os

    from cascade_cli.inspection import kind_of

    fifo = tmp_path / "history.csv"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="is a FIFO"):
        kind_of(fifo)


def test_settings_text_leaves_out_what_is_unset_and_shows_a_stop_rule_as_text():
    from cascade_cli.options import StopRule

    settings = {"state": "carry", "max_steps": None, "stop_rule": StopRule.norm(1.25), "exclude_stop_step": False,
                "fast_cells": "auto"}
    assert inspection.settings_text(settings) == ("state=carry, stop_rule=norm >= 1.25, exclude_stop_step=False, "
                                                  "fast_cells=auto")
    assert inspection.settings_text({"max_steps": None}) == "the defaults"


def test_inspect_of_a_packed_generator_describes_its_two_models_and_settings(tmp_path):
    import builders
    from clitools import assert_error, assert_ok, invoke
    from cascade_cli.train.keras_model import CascadeModel
    from cascade_cli.options import StopRule

    generator = CascadeModel(builders.model_a(), builders.step_b(), max_steps=6, stop_rule=StopRule.token(1),
                             fast_cells=False)
    generator.save(tmp_path / "g.keras")
    result = invoke("inspect", tmp_path / "g.keras")
    assert_ok(result)

    def row(label):
        (line,) = [line for line in result.stdout.splitlines() if line.startswith(f"{label} ")]
        return line[len(label):].strip()

    assert row("generator").startswith(f"'{tmp_path / 'g.keras'}'")
    assert row("model A").startswith(f"{builders.model_a().name}: inputs")
    assert row("model B").startswith(f"{builders.step_b().name}: inputs")
    assert "keras_tensor" not in result.stdout  # named by their layers
    assert "max_steps=6, stop_rule=token == 1" in row("settings") and "fast_cells=False" in row("settings")
    builders.model_a().save(tmp_path / "a.keras")
    assert_error(invoke("inspect", tmp_path / "g.keras", "--partner", tmp_path / "a.keras"), 2,
                 "--partner: ", "is a packed generator", "inspect it without a partner")


def test_inspect_of_a_step_form_b_says_whether_it_fits_the_feedback_form(tmp_path):
    import builders
    from clitools import assert_ok, invoke

    def feedback_row(model):
        rows, _, _ = inspection.describe_model(model, "m.keras")
        return dict(rows).get("feedback")

    step = feedback_row(builders.step_b())  # [x, state] -> [y, state]: y is not fed back
    assert step.startswith("form no (model B has 2 inputs") and "feedback-form B returns [y, *new_states]" in step
    assert feedback_row(builders.feedback_b(units=5, output_size=3)) == (
        "form yes: [x (H=4), y_prev (O=3), states [5]] -> [y, states]; use it with --feedback")
    assert feedback_row(builders.feedback_b(states=False)) == ("form yes: [x (H=4), y_prev (O=3)] -> y; "
                                                           "use it with --feedback")
    assert feedback_row(builders.model_a()) is None  # neither step form nor feedback form: nothing to say
    builders.feedback_b().save(tmp_path / "fb.keras")
    result = invoke("inspect", tmp_path / "fb.keras")
    assert_ok(result)
    assert re.search(r"^feedback +form yes: \[x \(H=4\), y_prev \(O=3\), states \[5\]\]", result.stdout, re.M), \
        result.stdout


def test_inspect_pairs_a_feedback_form_b_with_its_partner_in_either_order(tmp_path):
    import builders
    from clitools import assert_ok, invoke

    builders.model_a().save(tmp_path / "a.keras")
    builders.feedback_b().save(tmp_path / "fb.keras")
    builders.model_a(ir_size=5).save(tmp_path / "wide.keras")
    fits = (f"A='{tmp_path / 'a.keras'}' and B='{tmp_path / 'fb.keras'}' fit: IR size H=4, B emits O=3 "
            "(feedback form; use it with --feedback)")
    for order in (("fb.keras", "a.keras"), ("a.keras", "fb.keras")):  # the README's order first
        result = invoke("inspect", tmp_path / order[0], "--partner", tmp_path / order[1])
        assert_ok(result)
        assert re.search(r"^pair +" + re.escape(fits), result.stdout, re.M), result.stdout
    result = invoke("inspect", tmp_path / "fb.keras", "--partner", tmp_path / "wide.keras")
    assert result.exit_code == 1
    assert (f"Error: model A ('{tmp_path / 'wide.keras'}') emits IR vectors of size 5 but model B "
            f"('{tmp_path / 'fb.keras'}') expects inputs of size 4") in result.stderr

