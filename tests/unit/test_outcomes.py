"""A cell's outcome against its ground truth (qbd.outcomes.outcome), and the count line."""

import pytest

from qbd.outcomes import Counts, Judgement, Truth, judge, outcome, split, verdict_word

ATTACK = {"name": "badnet", "target": 0, "trigger_pattern": "white", "trigger_size": 3,
          "trigger_position": "bottom-right", "poison_rate": 0.1, "seed": 0}


def _result(status, target=None, code=None, attack=ATTACK, names_target=True):
    return {"cell": "c", "attack": attack, "defense": {"names_target": names_target},
            "verdict": {"status": status, "target_class": target, "reason": "r" if status == "invalid" else None,
                        "reason_code": code}}


@pytest.mark.parametrize(("status", "target", "code", "expected"), [
    ("detected", 0, None, "pass"),
    # a detector that names targets but named none: it did not name the planted one
    ("detected", None, None, "wrong-target"),
    ("detected", 3, None, "wrong-target"),  # detected, but never a pass
    ("clean", None, None, "miss"),
    ("invalid", None, "no-gradient", "invalid:no-gradient"),
    ("invalid", None, "error", "invalid:error"),
    ("invalid", None, None, "invalid:unspecified"),  # a Result written before reason codes existed
])
def test_outcome_on_a_backdoored_model(status, target, code, expected):
    assert outcome(_result(status, target, code)) == expected


def test_a_defense_that_declares_it_names_no_target_passes_by_detecting():
    # a repair method (Fine-Pruning: names_target = False) on a backdoored model
    assert outcome(_result("detected", None, names_target=False)) == "pass"
    assert outcome(_result("detected", 3, names_target=False)) == "wrong-target"  # a class it names must be right
    assert outcome(_result("detected", None, attack=None, names_target=False)) == "false-alarm"


def test_a_result_without_the_flag_must_name_the_target():
    r = _result("detected", None)
    del r["defense"]
    assert outcome(r) == "wrong-target"


@pytest.mark.parametrize(("status", "target", "code", "expected"), [
    ("clean", None, None, "pass"),
    ("detected", 0, None, "false-alarm"),
    ("detected", None, None, "false-alarm"),
    ("invalid", None, "no-signal", "invalid:no-signal"),
])
def test_outcome_on_a_clean_model(status, target, code, expected):
    assert outcome(_result(status, target, code, attack=None)) == expected


def test_the_truth_is_the_planted_target():
    r = _result("detected", 7, attack={**ATTACK, "target": 7})
    assert Truth.of(r) == Truth(True, 7) and outcome(r) == "pass"
    assert outcome(_result("detected", 0, attack={**ATTACK, "target": 7})) == "wrong-target"
    assert Truth.of(_result("clean", attack=None)) == Truth(False, None)


def test_split_and_verdict_word():
    assert split("invalid:no-gradient") == ("invalid", "no-gradient")
    assert split("miss") == ("miss", None)
    assert verdict_word(_result("detected", 4)) == "detected (t=4)"
    assert verdict_word(_result("detected")) == "detected"
    assert verdict_word(_result("invalid", code="timeout")) == "invalid (timeout)"
    assert verdict_word(_result("clean")) == "clean"


def test_counts():
    js = [Judgement("a", "pass", "clean", "pass", "t"), Judgement("b", "miss", "clean", "finding", "f", "why"),
          Judgement("c", "miss", "clean", "FAIL", "t", "x"), Judgement("d", "invalid:error", "invalid", "FAIL", "t", "x")]
    words = [j.judgement for j in js]
    assert Counts.of(words) == Counts(truth=1, findings=1, failing=2)
    assert Counts.of(words).line() == "1 cell matches the truth, 1 declared finding, 2 failing"
    assert Counts.of([]) == Counts(0, 0, 0)


def test_a_miss_on_a_weakened_backdoor_says_so_and_still_fails():
    """digits int8-static leaves the backdoor at ASR 0.45: a defense that says clean still misses
    it (the model is backdoored), and the FAIL says the scheme weakened it."""
    r = {"cell": "digits/int8-static/x[canonical]", "attack": {"target": 0}, "defense": {"names_target": True},
         "verdict": {"status": "clean", "target_class": None, "reason": None, "evidence": {},
                     "controls": {"backdoor_persists": {"passed": False, "value": 0.45, "detail": "d"}}}}
    j = judge(r, None)
    assert j.judgement == "FAIL" and "ASR is 0.45" in j.why and "still backdoored" in j.why
    r["verdict"]["controls"]["backdoor_persists"]["passed"] = True
    assert "ASR is" not in judge(r, None).why
