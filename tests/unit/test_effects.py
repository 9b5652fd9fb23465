"""Quantization's effect, paired on the same models (qbd.effects): the exact McNemar test, the
pairing, and the contract check that refuses an effect whose figures do not follow from its counts."""

import math

import pytest

from qbd.effects import change_text, effect_problems, effects, holm, mcnemar_exact, significant
from qbd.rates import wilson

ATTACK = {"name": "badnet", "target": 0, "trigger_pattern": "white", "trigger_size": 3,
          "trigger_position": "bottom-right", "poison_rate": 0.1}


def _r(scheme, seed, *, clean=False, status="detected", target=0, defense="neural-cleanse", unchanged=None):
    ds = "digits:clean" if clean else "digits"
    return {"cell": f"{ds}/{scheme}/{defense}[canonical]", "dataset": "digits", "seed": seed,
            "attack": None if clean else {**ATTACK, "seed": seed}, "quant": {"scheme": scheme, "audit": {}},
            "defense": {"name": defense, "protocol": "canonical", "names_target": True, "input_unchanged": unchanged},
            "verdict": {"status": status, "target_class": target if status == "detected" else None,
                        "reason_code": "not-converged" if status == "invalid" else None}}


@pytest.mark.parametrize(("b", "c", "p"), [
    (0, 0, 1.0), (1, 0, 1.0), (5, 0, 0.0625), (6, 0, 0.03125), (4, 1, 0.375), (10, 2, 0.0386),
    (3, 3, 1.0),
])
def test_mcnemar_exact_matches_the_binomial_tail(b, c, p):
    # 2 * P(Binomial(b + c, 1/2) <= min(b, c)), capped at 1 (e.g. scipy.stats.binomtest(min, b + c).pvalue)
    assert mcnemar_exact(b, c) == pytest.approx(p, abs=5e-5)
    assert mcnemar_exact(b, c) == mcnemar_exact(c, b)


def test_mcnemar_agrees_with_scipy():
    from scipy.stats import binomtest

    for b in range(0, 12):
        for c in range(0, 12):
            if b + c:
                assert mcnemar_exact(b, c) == pytest.approx(binomtest(min(b, c), b + c).pvalue, rel=1e-9)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_effects_pair_each_model_with_itself_on_fp32():
    rs = []
    for s in range(10):
        rs.append(_r("fp32", s))                                      # fp32 detects all ten
        rs.append(_r("int4-sim", s, status="clean" if s < 6 else "detected"))  # int4 loses six
        rs.append(_r("fp32", s, clean=True, status="clean"))
        rs.append(_r("int4-sim", s, clean=True, status="detected" if s < 2 else "clean"))  # two false alarms gained
    [e] = effects(rs)
    assert e["effect"] == "digits/int4-sim/neural-cleanse[canonical]" and e["baseline"] == "fp32"
    d, f = e["detection"], e["false_alarm"]
    assert (d["n"], d["baseline_count"], d["scheme_count"], d["lost"], d["gained"]) == (10, 10, 4, 6, 0)
    assert d["change"] == pytest.approx(-0.6) and d["p"] == pytest.approx(2 / 2**6)
    assert d["baseline_ci"] == list(wilson(10, 10)) and d["scheme_ci"] == list(wilson(4, 10))
    assert (f["n"], f["baseline_count"], f["scheme_count"], f["gained"], f["p"]) == (10, 0, 2, 2, 0.5)
    assert (d["p_holm"], f["p_holm"]) == (pytest.approx(2 * d["p"]), 0.5)  # two tests in this call
    assert significant(e) == [] and significant(e, key="p") == ["detection"]  # nominal only, after Holm
    assert change_text(d) == "10/10 -> 4/10 (-0.60, p=0.0312, Holm 0.062)"
    assert not effect_problems(e)


def test_a_wrong_target_is_not_a_detection_and_invalid_or_unpaired_models_are_left_out():
    """An invalid verdict is no answer: its pair says nothing about whether quantization changed
    the defense's answer (no gradient through int8 kernels is not a miss), so it is left out and
    counted; models judged on one side only are not pairs."""
    rs = [_r("fp32", 0), _r("int8-static", 0, target=3), _r("fp32", 1), _r("int8-static", 1, status="invalid"),
          _r("fp32", 2), _r("int8-static", 3)]  # seeds 2 and 3 have one side only
    [e] = effects(rs)
    d = e["detection"]
    assert (d["n"], d["baseline_count"], d["scheme_count"], d["lost"]) == (1, 1, 0, 1)
    assert e["invalid"]["detection"] == {"baseline": 0, "scheme": 1, "pairs_left_out": 1}
    assert e["false_alarm"] is None
    assert "1 pairs left out (invalid)" in change_text(d, e["invalid"]["detection"])


def test_a_scheme_that_only_gives_invalid_verdicts_is_no_answer_not_a_loss():
    rs = [_r("fp32", s) for s in range(5)] + [_r("int8-dynamic", s, status="invalid") for s in range(5)]
    [e] = effects(rs)
    assert e["detection"] is None and e["invalid"]["detection"]["pairs_left_out"] == 5
    assert change_text(None, e["invalid"]["detection"]) == "no answer; 5 pairs left out (invalid)"


def test_holm_adjusts_over_the_family():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5] and holm([]) == []


def test_no_effect_without_the_baseline_and_a_scheme_that_leaves_the_input_unchanged_is_marked():
    assert effects([_r("int4-sim", 0)]) == []
    rs = [_r("fp32", s, defense="spectral-signatures") for s in range(3)]
    rs += [_r("int8-dynamic", s, defense="spectral-signatures", unchanged=True) for s in range(3)]
    [e] = effects(rs)
    assert e["input_unchanged"] is True and e["detection"]["change"] == 0 and e["detection"]["p"] == 1.0


@pytest.mark.parametrize(("side", "key", "value"), [
    ("detection", "p", 0.5), ("detection", "change", 0.1), ("detection", "scheme_count", 11), ("detection", "p_holm", 0.0),
    ("detection", "lost", 1), ("detection", "baseline_ci", [0.0, 1.0]), ("false_alarm", "n", 0),
])
def test_an_effect_whose_figures_do_not_follow_from_its_counts_is_refused(side, key, value):
    rs = []
    for s in range(10):
        rs += [_r("fp32", s), _r("int4-sim", s, status="clean" if s < 3 else "detected"),
               _r("fp32", s, clean=True, status="clean"), _r("int4-sim", s, clean=True, status="clean")]
    [e] = effects(rs)
    assert not effect_problems(e)
    e[side] = {**e[side], key: value}
    assert effect_problems(e), f"{side}.{key}={value!r} accepted"


def test_effect_problems_refuses_shapes():
    assert effect_problems([]) and effect_problems({"effect": 1})
    assert math.isclose(mcnemar_exact(0, 7), 2 / 2**7)


def test_effects_satisfy_the_json_schema_and_both_refuse_a_broken_one():
    import jsonschema

    from qbd.results import schema

    s = schema()
    # the effect's definition, with the Result schema's $defs it refers to
    validator = jsonschema.Draft202012Validator({"$schema": s["$schema"], "$defs": s["$defs"], "$ref": "#/$defs/effect"})
    rs = []
    for seed in range(4):
        rs += [_r("fp32", seed), _r("int4-sim", seed, status="clean" if seed < 2 else "detected"),
               _r("fp32", seed, clean=True, status="clean"), _r("int4-sim", seed, clean=True, status="clean")]
    [e] = effects(rs)
    assert not list(validator.iter_errors(e))
    for broken in ({**e, "detection": {**e["detection"], "p": 1.5}}, {k: v for k, v in e.items() if k != "false_alarm"},
                   {**e, "detection": {**e["detection"], "n": 0}}):
        assert list(validator.iter_errors(broken)) and effect_problems(broken)


def test_a_results_file_carries_its_effects_and_refuses_edited_ones(tmp_path):
    import json

    from qbd.results import ResultError, load, write
    from tests.unit.test_results import _result

    alarm = {"status": "detected", "score": 3.0, "threshold": 2.0, "target_class": 1, "reason": None, "reason_code": None,
             "evidence": {}, "controls": {}}
    rs = [_result(), {**_result(verdict=alarm), "cell": "d/int4-sim/x[paper]",
                      "quant": {**_result()["quant"], "scheme": "int4-sim"}}]  # one clean model: quiet on fp32, alarm on int4
    p = write(tmp_path / "results.json", rs)
    doc = json.loads(p.read_text())
    [e] = doc["effects"]
    assert e["effect"] == "d/int4-sim/x[paper]" and e["detection"] is None
    assert (e["false_alarm"]["baseline_count"], e["false_alarm"]["scheme_count"], e["false_alarm"]["gained"]) == (0, 1, 1)
    load(p)
    doc["effects"] = []
    p.write_text(json.dumps(doc))
    with pytest.raises(ResultError, match="effects"):
        load(p)
