"""qbd.gate: the one judge of a run for `qbd run --expectations` and the plugin: failing cells,
deployed models outside their clean-accuracy / ASR bounds, rows outside their measured counts."""

from qbd import measured_rows
from qbd.gate import judge_run
from tests.unit.test_measured_rows import ROW, _entry_text, _models, _table


def _deployed(results, clean_acc=0.99, asr=1.0):
    for r in results:
        r.update(clean_acc=clean_acc, asr=asr)
        r["quant"]["audit"] = {"engine": None}
    return results


def test_a_single_seed_run_fails_a_cell_off_its_rows_rule_and_a_model_below_its_bounds(tmp_path):
    table = _table(tmp_path, _entry_text(measured_rows.measured(_models())))
    ok = _deployed([r for r in _models() if r["seed"] == 0])
    gate = judge_run(table, ok, 1)
    assert gate.failing == () and gate.rated == 0 and len(gate.judgements) == len(ok)
    # the row never measured an invalid verdict on a backdoored model: that cell fails
    bad = _deployed([{**ok[0], "verdict": {"status": "invalid", "target_class": None, "reason_code": "not-converged",
                                           "reason": "r"}}, ok[1]])
    assert [c.split(":")[0] for c in judge_run(table, bad, 1).cells] == [ok[0]["cell"].split(":")[0]]
    # the deployed backdoored model under the tier's minimum clean accuracy fails the run, its cells passing
    low = judge_run(table, _deployed([dict(r) for r in ok], clean_acc=0.2), 1)
    assert low.cells == () and len(low.deployed) == 1 and "digits/int4-sim (deployed model)" in low.deployed[0]


def test_ten_models_judge_the_row_by_its_counts(tmp_path):
    table = _table(tmp_path, _entry_text(measured_rows.measured(_models())))
    gate = judge_run(table, _deployed(_models()), 10)
    assert gate.failing == () and gate.rated == 1
    worse = judge_run(table, _deployed(_models(detected=5, wrong=1)), 10)  # three detections lost
    assert worse.cells == () and len(worse.rows) == 1 and worse.rows[0].startswith(ROW)
