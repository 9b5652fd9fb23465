"""Rates over seeds (qbd.rates): the Wilson interval, and the grouping of Results into rows."""

import pytest

from qbd.rates import fraction, row_id, rows, wilson

ATTACK = {"name": "badnet", "target": 0, "trigger_pattern": "white", "trigger_size": 3,
          "trigger_position": "bottom-right", "poison_rate": 0.1}


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (4, 5, 0.3755, 0.9638),  # the textbook values (e.g. statsmodels proportion_confint(method="wilson"))
    (0, 5, 0.0, 0.4345),
    (5, 5, 0.5655, 1.0),
    (1, 1, 0.2065, 1.0),
    (50, 100, 0.4038, 0.5962),
])
def test_wilson_matches_known_values(k, n, low, high):
    lo, hi = wilson(k, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)


def test_wilson_stays_in_the_unit_interval_and_is_symmetric():
    for n in range(1, 30):
        for k in range(n + 1):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            mirror = wilson(n - k, n)
            assert (round(1 - hi, 12), round(1 - lo, 12)) == (round(mirror[0], 12), round(mirror[1], 12))


def test_wilson_without_trials_is_none_and_refuses_impossible_counts():
    assert wilson(0, 0) is None
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(3, 2)


def _r(dataset="digits", scheme="fp32", defense="strip", protocol="canonical", *, seed=0, clean=False, status="detected",
       target=0, code=None, names_target=True):
    ds = f"{dataset}:clean" if clean else dataset
    return {"cell": f"{ds}/{scheme}/{defense}[{protocol}]", "dataset": dataset, "seed": seed,
            "attack": None if clean else {**ATTACK, "seed": seed},
            "quant": {"scheme": scheme}, "defense": {"name": defense, "protocol": protocol, "names_target": names_target},
            "verdict": {"status": status, "target_class": target if status == "detected" else None,
                        "reason_code": code, "reason": "r" if status == "invalid" else None}}


def test_rows_group_backdoored_and_clean_models_of_one_row():
    results = [_r(seed=s) for s in range(4)] + [_r(seed=4, status="clean")]  # 4 of 5 detected
    results += [_r(seed=s, clean=True, status="clean") for s in range(4)] + [_r(seed=4, clean=True)]  # 1 false alarm of 5
    [row] = rows(results)
    assert row == {
        "row": "digits/fp32/strip[canonical]", "dataset": "digits", "scheme": "fp32", "defense": "strip",
        "protocol": "canonical", "n_backdoored": 5, "detected": 4, "detection_rate": 0.8, "detection_ci": list(wilson(4, 5)),
        "n_clean": 5, "false_alarms": 1, "false_alarm_rate": 0.2, "false_alarm_ci": list(wilson(1, 5)), "invalid": 0,
        "seeds": [0, 1, 2, 3, 4], "outcomes": {"backdoored": {"miss": 1, "pass": 4}, "clean": {"false-alarm": 1, "pass": 4}}}
    assert row_id(results[-1]) == row["row"]  # a clean model's cell id carries ":clean", its row id does not


def test_a_wrong_target_is_not_a_detection_and_invalid_counts_as_not_detected():
    results = [_r(seed=0), _r(seed=1, target=5), _r(seed=2, status="invalid", code="no-gradient"),
               _r(seed=3, clean=True, status="invalid", code="no-signal")]
    [row] = rows(results)
    assert (row["detected"], row["n_backdoored"], row["detection_rate"]) == (1, 3, 1 / 3)
    # an invalid verdict on the clean model is no false alarm either, but it is counted
    assert (row["false_alarms"], row["n_clean"], row["false_alarm_rate"], row["invalid"]) == (0, 1, 0.0, 2)


def test_a_defense_that_names_no_target_detects_without_one():
    [row] = rows([_r(defense="fine-pruning", target=None, names_target=False),
                  _r(defense="fine-pruning", seed=1, target=None)])  # names targets, names none: not a detection
    assert (row["detected"], row["n_backdoored"]) == (1, 2)


def test_rows_are_sorted_and_a_missing_kind_has_no_rate():
    results = [_r("synthetic", "int4-sim", "strip"), _r("digits", "int8-static", clean=True, status="clean"),
               _r("digits", "fp32", "neural-cleanse", "paper")]
    out = rows(results)
    assert [r["row"] for r in out] == ["digits/fp32/neural-cleanse[paper]", "digits/int8-static/strip[canonical]",
                                       "synthetic/int4-sim/strip[canonical]"]
    clean_only = out[1]
    assert (clean_only["n_backdoored"], clean_only["detection_rate"], clean_only["detection_ci"]) == (0, None, None)
    assert (clean_only["n_clean"], clean_only["false_alarm_rate"]) == (1, 0.0)
    assert (out[0]["n_clean"], out[0]["false_alarm_rate"], out[0]["false_alarm_ci"]) == (0, None, None)
    assert rows([]) == []


def test_fraction_text():
    assert fraction(4, 5, wilson(4, 5)) == "4/5 = 0.80 [0.38, 0.96]"
    assert fraction(0, 5, wilson(0, 5)) == "0/5 = 0.00 [0.00, 0.43]"
    assert fraction(0, 0, None) == "-"
