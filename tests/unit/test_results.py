"""The Result contract's optional `weights` provenance."""

import pytest

from qbd.results import problems


def _result(weights):
    return {"cell": "d/fp32/x[paper]", "dataset": "d", "model": "tiny-cnn", "weights": weights, "seed": 0, "tier": "smoke",
            "attack": None, "quant": {"scheme": "fp32", "audit": {}}, "defense": {"name": "x", "protocol": "paper", "params": {}},
            "verdict": {"status": "clean", "score": None, "threshold": None, "target_class": None, "reason": None, "evidence": {}, "controls": {}},
            "clean_acc": 0.9, "asr": None, "seconds": 1.0, "versions": {}}


@pytest.mark.parametrize(("weights", "fragment"), [
    ({"origin": "downloaded"}, "origin 'trained' or 'fetched'"),
    ("trained", "origin 'trained' or 'fetched'"),
    ({"origin": "fetched", "source": "m.pt"}, "fetched weights must record their sha256"),
])
def test_bad_provenance_is_a_problem(weights, fragment):
    assert any(fragment in p for p in problems(_result(weights)))


@pytest.mark.parametrize("weights", [None, {"origin": "trained", "store_key": "k"}, {"origin": "fetched", "sha256": "ab"}])
def test_good_provenance_passes_its_check(weights):
    assert not any("weights" in p for p in problems(_result(weights)))
