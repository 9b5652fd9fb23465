"""The Result contract: the optional `weights` provenance, the verdict's `reason_code` and the
optional `judgement` against the expectations."""

import pytest

from qbd.defenses.base import Verdict
from qbd.results import problems


def _result(weights=None, verdict=None, **extra):
    v = verdict or {"status": "clean", "score": None, "threshold": None, "target_class": None, "reason": None,
                    "reason_code": None, "evidence": {}, "controls": {}}
    return {"cell": "d/fp32/x[paper]", "dataset": "d", "model": "tiny-cnn", "weights": weights, "seed": 0, "tier": "smoke",
            "attack": None, "quant": {"scheme": "fp32", "audit": {"quantized_param_fraction": 0.0, "input_gradient": True,
                                                                   "engine": None, "differentiable": True}},
            "defense": {"name": "x", "protocol": "paper", "params": {}},
            "verdict": v, "clean_acc": 0.9, "asr": None, "seconds": 1.0, "versions": {}, **extra}


@pytest.mark.parametrize(("weights", "fragment"), [
    ({"origin": "downloaded"}, "origin 'trained' or 'fetched'"),
    ("trained", "origin 'trained' or 'fetched'"),
    ({"origin": "fetched", "source": "m.pt"}, "fetched weights must record their sha256"),
])
def test_bad_provenance_is_a_problem(weights, fragment):
    assert any(fragment in p for p in problems(_result(weights)))


@pytest.mark.parametrize("weights", [None, {"origin": "trained", "store_key": "k"}, {"origin": "fetched", "sha256": "ab"}])
def test_good_provenance_passes_its_check(weights):
    assert problems(_result(weights)) == []


@pytest.mark.parametrize("verdict", [
    Verdict("clean"),
    Verdict("detected", score=3.0, threshold=2.0, target_class=0),
    Verdict.invalid("no input gradient", "no-gradient"),
    Verdict.invalid("a third-party defense said invalid"),  # code `unspecified`
])
def test_a_verdicts_dict_satisfies_the_contract(verdict):
    assert problems(_result(verdict=verdict.to_dict())) == []


def _verdict(status, code, reason="r"):
    return {"status": status, "score": None, "threshold": None, "target_class": None, "reason": reason,
            "reason_code": code, "evidence": {}, "controls": {}}


@pytest.mark.parametrize(("verdict", "fragment"), [
    (_verdict("invalid", None), "an invalid verdict needs a reason_code"),
    (_verdict("invalid", "bogus"), "an invalid verdict needs a reason_code"),
    (_verdict("invalid", ["error"]), "an invalid verdict needs a reason_code"),  # a problem, not a TypeError
    (_verdict("clean", "no-signal", reason=None), "only an invalid verdict carries a reason_code"),
    (_verdict("detected", "error", reason=None), "only an invalid verdict carries a reason_code"),
    ({k: v for k, v in _verdict("invalid", "error").items() if k != "reason_code"}, "verdict lacks 'reason_code'"),
])
def test_a_bad_reason_code_is_a_problem(verdict, fragment):
    assert any(fragment in p for p in problems(_result(verdict=verdict))), problems(_result(verdict=verdict))


@pytest.mark.parametrize("judgement", [None, {"outcome": "pass", "judgement": "pass", "expected": "t", "why": None},
                                       {"outcome": "invalid:no-gradient", "judgement": "finding"},
                                       {"outcome": "miss", "judgement": "FAIL", "why": "w"}])
def test_a_judgement_is_optional(judgement):
    assert problems(_result(judgement=judgement)) == []


@pytest.mark.parametrize("judgement", ["pass", {"judgement": "pass"}, {"outcome": "pass", "judgement": "maybe"},
                                       {"outcome": 1, "judgement": "FAIL"}])
def test_a_malformed_judgement_is_a_problem(judgement):
    assert any("judgement must be null or an object" in p for p in problems(_result(judgement=judgement)))
