"""Measured rows (qbd.measured_rows): a row's entry from its models' outcomes, the rule over the
row's seeds (each count within one model), the single-seed rule (an outcome the row measured), and
the loader's checks."""

import pytest

from qbd import measured_rows
from qbd.errors import ConfigError
from qbd.expectations import load
from qbd.rates import rows

ATTACK = {"name": "badnet", "target": 0, "trigger_pattern": "white", "trigger_size": 3,
          "trigger_position": "bottom-right", "poison_rate": 0.1}
ROW = "digits/int4-sim/neural-cleanse[canonical]"


def _r(seed, *, clean=False, status="detected", target=0, code=None):
    ds = "digits:clean" if clean else "digits"
    return {"cell": f"{ds}/int4-sim/neural-cleanse[canonical]", "dataset": "digits", "seed": seed,
            "attack": None if clean else {**ATTACK, "seed": seed}, "quant": {"scheme": "int4-sim"},
            "defense": {"name": "neural-cleanse", "protocol": "canonical", "names_target": True},
            "verdict": {"status": status, "target_class": target if status == "detected" else None,
                        "reason_code": code, "reason": "r" if status == "invalid" else None}}


def _models(detected=8, wrong=1, false_alarms=2, invalid_clean=0, n=10):
    out = []
    for s in range(n):
        if s < detected:
            out.append(_r(s))
        elif s < detected + wrong:
            out.append(_r(s, target=5))
        else:
            out.append(_r(s, status="clean"))
        if s < false_alarms:
            out.append(_r(s, clean=True, target=3))
        elif s < false_alarms + invalid_clean:
            out.append(_r(s, clean=True, status="invalid", code="not-converged"))
        else:
            out.append(_r(s, clean=True, status="clean"))
    return out


def _table(tmp_path, entry_text):
    p = tmp_path / "t.toml"
    p.write_text(f'[meta]\ntier = "smoke"\n\n[rows."{ROW}"]\n{entry_text}\n')
    return load(p)


def _entry_text(entry, why='why = "docs/results.md#rows: measured"'):
    from qbd.expectations_write import toml_value

    return "\n".join(f"{k} = {toml_value(v)}" for k, v in entry.items()) + "\n" + why


def test_the_entry_counts_each_kinds_outcomes():
    entry = measured_rows.measured(_models())
    assert entry == {"seeds": list(range(10)), "backdoored": {"pass": 8, "miss": 1, "wrong-target": 1},
                     "clean": {"pass": 8, "false-alarm": 2}}
    assert not measured_rows.problems(entry) and not measured_rows.all_truth(entry)
    assert measured_rows.bounds(entry) == {"min_detection_rate": 0.7, "max_detection_rate": 0.9,
                                           "min_false_alarm_rate": 0.1, "max_false_alarm_rate": 0.3}


def test_a_rerun_within_one_model_passes_and_two_models_off_fails(tmp_path):
    table = _table(tmp_path, _entry_text(measured_rows.measured(_models())))
    (row,) = rows(_models())
    assert table.check_row(row) == []
    for results in (_models(detected=7, wrong=2), _models(detected=9, wrong=0), _models(false_alarms=3),
                    _models(false_alarms=1), _models(false_alarms=1, invalid_clean=1)):
        (row,) = rows(results)
        assert table.check_row(row) == [], row["outcomes"]
    for results, what in ((_models(detected=6, wrong=3), "detections"), (_models(detected=10, wrong=0), "detections"),
                          (_models(false_alarms=4), "false alarms"), (_models(false_alarms=0), "false alarms"),
                          (_models(invalid_clean=2), "invalid")):
        (row,) = rows(results)
        failures = table.check_row(row)
        assert failures and what in failures[0], (row["outcomes"], failures)
    (row,) = rows(_models()[:10])  # five seeds: not the row's seeds
    assert "measured on seeds" in table.check_row(row)[0]


def test_a_single_seed_cell_must_give_an_outcome_its_row_measured(tmp_path):
    table = _table(tmp_path, _entry_text(measured_rows.measured(_models())))
    assert table.judge(_r(0)).judgement == "pass"
    j = table.judge(_r(0, status="clean"))  # a miss: measured on 1 of 10
    assert j.judgement == "finding" and "1 of the row's 10" in j.why
    j = table.judge(_r(0, clean=True, target=4))  # a false alarm: measured on 2 of 10
    assert j.judgement == "finding"
    for bad in (_r(0, status="invalid", code="not-converged"), _r(0, status="invalid", code="error"),
                _r(0, clean=True, status="invalid", code="no-signal")):
        j = table.judge(bad)
        assert j.judgement == "FAIL" and "never gave" in j.why, j


def test_a_row_that_detected_every_model_fails_a_changed_named_class(tmp_path):
    entry = measured_rows.measured(_models(detected=10, wrong=0, false_alarms=0))
    assert measured_rows.all_truth(entry)
    table = _table(tmp_path, _entry_text(entry, why=""))  # every model matched its truth: no why needed
    assert table.judge(_r(3)).judgement == "pass"
    assert table.judge(_r(3, target=7)).judgement == "FAIL"  # the named class changed
    assert table.judge(_r(3, status="clean")).judgement == "FAIL"
    assert table.judge(_r(3, clean=True, target=1)).judgement == "FAIL"


@pytest.mark.parametrize(("text", "fragment"), [
    ('seeds = [0, 1]\nbackdoored = { pass = 3 }', "3 models counted, but 2 seeds"),
    ('seeds = [0, 1]\nbackdoored = { pass = 1, "false-alarm" = 1 }', "not an outcome of a backdoored model"),
    ('seeds = [0, 1]\nclean = { pass = 1, "invalid:error" = 1 }\nwhy = "w"', "never an expected outcome"),
    ('seeds = [0, 1]\nclean = { pass = 1, "invalid:made-up" = 1 }\nwhy = "w"', "unknown reason code"),
    ('seeds = [0, 1]\nclean = { pass = 1, miss = 1 }', "not an outcome of a clean model"),
    ('seeds = [0, 1]\nbackdoored = { pass = 1, miss = 1 }', "needs a `why`"),
    ('seeds = [0, 1]\nbackdoored = { pass = 2 }\nmin_detection_rate = 0.5', "follow from its counts"),
    ('backdoored = { pass = 2 }', "names the model seeds"),
])
def test_the_loader_refuses_a_bad_measured_row(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _table(tmp_path, text)


def test_a_cell_finding_on_a_measured_row_is_refused(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text(f'[meta]\ntier = "smoke"\n\n[rows."{ROW}"]\nseeds = [0, 1]\nbackdoored = {{ pass = 2 }}\n\n'
                 '[cells."digits:clean/int4-sim/neural-cleanse[canonical]"]\noutcome = "false-alarm"\nwhy = "w"\n')
    with pytest.raises(ConfigError, match="measured over models and judges it"):
        load(p)


def test_the_whole_histogram_is_compared_not_only_the_truths_count(tmp_path):
    """Two models' outcomes swapped between miss and wrong target, or two invalid verdicts with
    another reason code, leave the detection and invalid counts alone: they still fail."""
    base = _models(detected=6, wrong=2, false_alarms=0, invalid_clean=2)  # 6 pass, 2 wrong-target, 2 miss
    table = _table(tmp_path, _entry_text(measured_rows.measured(base)))
    (row,) = rows(base)
    assert table.check_row(row) == []
    swapped = [dict(r, verdict={**r["verdict"], "status": "clean", "target_class": None}) if r["attack"] and
               r["verdict"]["target_class"] == 5 else r for r in base]  # both wrong targets become misses
    (row,) = rows(swapped)
    assert "2 backdoored models moved" in table.check_row(row)[0]
    recoded = [dict(r, verdict={**r["verdict"], "reason_code": "no-signal"}) if r["verdict"]["status"] == "invalid" else r
               for r in base]
    (row,) = rows(recoded)
    assert "2 clean models moved" in table.check_row(row)[0]
    assert measured_rows.moved({"pass": 8, "miss": 2}, {"pass": 8, "wrong-target": 2}) == 2


# -- rows of another attack's models ([attacks.<name>.rows]) ---------------------------------------
BLEND = {"name": "blend", "target": 2, "trigger_pattern": "checkerboard", "trigger_size": 3,
         "trigger_position": "bottom-right", "poison_rate": 0.1, "alpha": 0.15}


def _blend(seed, *, status="detected", target=2):
    r = _r(seed, status=status, target=target)
    return {**r, "attack": {**BLEND, "seed": seed}}


def _section_table(tmp_path, extra=""):
    clean_row = {"seeds": list(range(10)), "clean": {"pass": 8, "false-alarm": 2}, "backdoored": {"pass": 10}}
    p = tmp_path / "t.toml"
    p.write_text(f'[meta]\ntier = "smoke"\n\n[rows."{ROW}"]\n{_entry_text(clean_row)}\n\n'
                 f'[attacks.blend]\nattack = {{ name = "blend", target = 2, trigger_pattern = "checkerboard", trigger_size = 3,'
                 f' trigger_position = "bottom-right", poison_rate = 0.1, alpha = 0.15 }}\n\n'
                 f'[attacks.blend.rows."{ROW}"]\nseeds = [0, 1, 2, 3, 4]\nbackdoored = {{ pass = 3, miss = 2 }}\n'
                 f'why = "docs/results.md#other-attacks: measured"\n{extra}')
    return load(p)


def test_an_attacks_row_judges_its_backdoored_models_and_leaves_clean_ones_to_rows(tmp_path):
    table = _section_table(tmp_path)
    five = [_blend(s) for s in range(3)] + [_blend(s, status="clean") for s in (3, 4)]
    controls = [_r(s, clean=True, status="clean") for s in range(5)]
    judgements, failures, rated = table.judge_run(five + controls, 5)
    assert failures == [] and rated == 1 and all(j.judgement != "FAIL" for j in judgements)
    # two more misses: two models moved, the row fails
    worse = [_blend(s) for s in range(1)] + [_blend(s, status="clean") for s in range(1, 5)]
    _, failures, _ = table.judge_run(worse + controls, 5)
    assert len(failures) == 1 and "2 backdoored models moved" in failures[0]
    # a clean control of the run is judged by [rows]' single-seed rule: a false alarm there was measured,
    # an invalid verdict was not
    fa = table.judge(_r(0, clean=True, target=3))
    assert fa.judgement == "finding"
    bad = table.judge_run(five + [_r(0, clean=True, status="invalid", code="not-converged")], 5)[0][-1]
    assert bad.judgement == "FAIL"
    # one seed: a backdoored model judged by the section's row, never by [rows] (which measured BadNet)
    assert table.judge(_blend(0, status="clean")).judgement == "finding"
    assert table.judge(_blend(0, target=7)).judgement == "FAIL"  # a wrong target the row never measured


def test_an_attacks_row_round_trips_and_its_mistakes_are_refused(tmp_path):
    from qbd.expectations_write import dumps

    table = _section_table(tmp_path)
    again = tmp_path / "again.toml"
    again.write_text(dumps(table))
    assert load(again).attacks["blend"]["rows"] == table.attacks["blend"]["rows"]
    with pytest.raises(ConfigError, match="its row is measured over models"):
        _section_table(tmp_path, f'\n[attacks.blend.cells."{ROW}"]\noutcome = "miss"\nwhy = "x"\n')
    p = tmp_path / "clean.toml"
    p.write_text((tmp_path / "t.toml").read_text().replace("backdoored = { pass = 3, miss = 2 }",
                                                           "backdoored = { pass = 3, miss = 2 }\nclean = { pass = 5 }"))
    with pytest.raises(ConfigError, match="its clean models are judged by"):
        load(p)


def test_a_meta_row_without_clean_counts_fails_a_run_with_clean_models(tmp_path):
    """[rows] compares every kind of model its run judged: a row declared from backdoored models
    alone does not pass a run whose clean models it never measured."""
    backdoored_only = {"seeds": list(range(10)), "backdoored": {"pass": 8, "miss": 1, "wrong-target": 1}}
    table = _table(tmp_path, _entry_text(backdoored_only))
    (row,) = rows(_models())
    assert any("10 clean models judged, the row was measured on 0" in m for m in table.check_row(row))
