"""qbd.gate: the one judge of a run for `qbd run --expectations` and the plugin: failing cells,
deployed models outside their clean-accuracy / ASR bounds, rows outside their measured counts."""

from qbd import measured_rows
from qbd.gate import judge_run
from tests.unit.test_measured_rows import ROW, _entry_text, _models, _table


def _deployed(results, clean_acc=0.99, asr=1.0, origin="zoo"):
    for r in results:
        r.update(clean_acc=clean_acc, asr=asr, weights={"origin": origin})
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
    # the bounds were measured on the zoo's seed-0 model: another seed, or weights trained or fetched
    # elsewhere, have no measured bound and are not judged by one
    other_seed = [{**r, "seed": 1, "attack": {**r["attack"], "seed": 1}} if r["attack"] else {**r, "seed": 1} for r in ok]
    assert judge_run(table, _deployed(other_seed, clean_acc=0.2), 1).deployed == ()
    assert judge_run(table, _deployed([dict(r) for r in ok], clean_acc=0.2, origin="fetched"), 1).deployed == ()


def test_ten_models_judge_the_row_by_its_counts(tmp_path):
    table = _table(tmp_path, _entry_text(measured_rows.measured(_models())))
    gate = judge_run(table, _deployed(_models()), 10)
    assert gate.failing == () and gate.rated == 1
    worse = judge_run(table, _deployed(_models(detected=5, wrong=1)), 10)  # three detections lost
    assert worse.cells == () and len(worse.rows) == 1 and worse.rows[0].startswith(ROW)
