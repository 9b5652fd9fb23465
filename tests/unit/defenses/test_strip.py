import json

import numpy as np
import pytest
import torch
from scipy.stats import binom

from qbd.defenses.base import DefenseInputs
from qbd.defenses.sandbox import run_defense
from qbd.defenses.strip import Strip, decide, decide_paper, significant_count, superimpose
from qbd.errors import ConfigError
from tests.unit.defenses import Constant, CornerBackdoor, NaNFeatures, add_trigger, quadrant_images, subject

FAST = {"n_overlays": 16}


def _inputs(n_hold=200, n_stream=120, triggered=0.5):
    x_hold, y_hold = quadrant_images(n_hold, seed=1)
    xs, _ = quadrant_images(n_stream, seed=2)
    k = int(triggered * n_stream)
    stream = torch.cat([add_trigger(xs[:k]), xs[k:]])
    return DefenseInputs(clean_holdout=(x_hold, y_hold), triggered_inputs=stream)


def _run(defense, inputs, model=None):
    v, _ = run_defense(defense, subject(model or CornerBackdoor(), 4), inputs, torch.Generator().manual_seed(0))
    return v


def test_superimpose_is_the_authors_unclipped_float_sum():
    # the authors call cv2.addWeighted(x, 1, overlay, 1, 0) on images already divided by 255:
    # a float sum, which cv2 does not saturate. 200 + 100 must stay 300 / 255, not 1.0
    a = torch.tensor([[[[200, 10]]]], dtype=torch.uint8)
    b = torch.tensor([[[[[100, 20]]]]], dtype=torch.uint8)
    out = superimpose(a, b)
    assert out.shape == (1, 1, 1, 1, 2)
    assert torch.allclose(out.flatten(), torch.tensor([300 / 255, 30 / 255]))
    assert torch.allclose(superimpose(a.float() / 255, b.float() / 255), out)


def test_canonical_detects_low_entropy_triggered_stream_and_names_target():
    v = _run(Strip("canonical", **FAST), _inputs())
    assert v.status == "detected" and v.target_class == 0
    assert v.score == pytest.approx(0.5, abs=0.05) and v.score > v.threshold
    assert v.evidence["p_value"] < 1e-3
    assert v.evidence["entropy_stream"]["q01"] < v.evidence["entropy_threshold"] < v.evidence["entropy_calibration"]["median"]
    json.dumps(v.to_dict(), allow_nan=False)
    assert _run(Strip("canonical", **FAST), _inputs()).to_dict() == v.to_dict()  # same seed, same verdict


def test_canonical_clean_stream_is_clean():
    v = _run(Strip("canonical", **FAST), _inputs(triggered=0.0))
    assert v.status == "clean" and v.target_class is None and v.score < v.threshold


def test_constant_classifier_has_no_signal():
    # entropy 0 for every blend: the FRR threshold is 0 and nothing can fall below it. That
    # says nothing about the model, so it is invalid, not clean
    v = _run(Strip("canonical", **FAST), _inputs(), model=Constant())
    assert v.status == "invalid" and "no signal" in v.reason and v.reason_code == "no-signal"


def test_paper_rule_cannot_fire_and_says_so():
    v = _run(Strip("paper", **FAST), _inputs(n_hold=200))
    assert v.status == "invalid" and "cannot fire" in v.reason and v.reason_code == "rule-cannot-fire"
    assert not v.controls["rule_can_fire"].passed
    assert v.evidence["fraction_below"] <= 0.05 and v.evidence["n"] == 200
    # the bound holds for any values, by rank arithmetic
    for n in (20, 100, 500, 1000):
        h = np.random.default_rng(n).random(n)
        ev = decide_paper(h, Strip("paper").params).evidence
        assert ev["fraction_below"] <= ev["fraction_bound"]
    # 90 values (the digits holdout): 5 of 90 distinct values lie below their 5th percentile,
    # 5.6 % > 5 %, for every model: the rule fires on anything, so it carries no signal
    v = decide_paper(np.random.default_rng(0).random(90), Strip("paper").params)
    assert v.status == "invalid" and v.reason_code == "no-signal" and v.evidence["fraction_below"] == 5 / 90


def test_binomial_threshold_and_decide_on_constructed_entropies():
    p = Strip("canonical").params
    k = significant_count(400, 0.01, 1e-3)
    assert k is not None and 4 < k < 20
    cal = np.linspace(0.5, 2.0, 300)
    stream = np.concatenate([np.full(50, 0.01), np.linspace(0.6, 2.0, 50)])
    preds = np.concatenate([np.full(50, 7), np.zeros(50, dtype=int)])
    v = decide(cal, stream, preds, p)
    assert v.status == "detected" and v.target_class == 7 and v.evidence["flagged"] == 50
    assert decide(cal, np.linspace(0.6, 2.0, 100), preds, p).status == "clean"
    nan = decide(cal, np.array([np.nan, 1.0]), preds[:2], p)
    assert nan.status == "invalid" and nan.reason_code == "diverged"
    assert significant_count(3, 0.01, 1e-9) is None
    short = decide(cal, np.full(3, 0.0), preds[:3], {**p, "alpha": 1e-9})
    assert short.status == "invalid" and short.reason_code == "rule-cannot-fire"


def test_threshold_is_an_order_statistic_whose_expected_rate_is_at_most_frr():
    p = Strip("canonical").params
    cal = np.random.default_rng(0).permutation(np.arange(250.0) + 1.0)  # 1, 2, ..., 250
    v = decide(cal, np.full(40, 100.0), np.zeros(40, dtype=int), p)
    # k = floor(0.01 * 251) = 2: the threshold is the 2nd smallest value, 1 value lies below it,
    # and the expected share of clean inputs below the k-th of m is k / (m + 1) = 0.8 % <= 1 %
    assert v.evidence["entropy_threshold"] == 2.0 and v.evidence["threshold_rank"] == 2
    assert v.evidence["calibration_share_below"] == pytest.approx(1 / 250)
    # the binomial null rate is an upper bound on that share, not frr itself
    assert p["frr"] < v.evidence["null_rate"] < 0.1


def test_false_alarm_rate_on_clean_streams_is_at_most_alpha():
    # Clean calibration and clean stream entropies from ONE distribution: every detection is a
    # false alarm. Treating the empirical 1 % quantile of 250 values as exact gave 45 of 600
    # here (7.5 % at alpha 1 %). The seeds are fixed, so the count is deterministic; the bound
    # is the count that a true rate of alpha exceeds with probability 1e-6.
    alpha, runs = 0.01, 600
    p = {**Strip("canonical").params, "alpha": alpha}
    alarms = 0
    for seed in range(runs):
        h = np.random.default_rng(seed).gamma(2.0, 0.5, 450)
        alarms += decide(h[:250], h[250:], np.zeros(200, dtype=int), p).status == "detected"
    assert alarms <= binom.ppf(1 - 1e-6, runs, alpha)


def test_nan_logits_are_invalid():
    from tests.unit.defenses import PixelFeatures

    class NaNOut(PixelFeatures):
        def forward(self, x):
            return torch.full((len(x), 4), float("nan"))

    v = _run(Strip("canonical", **FAST), _inputs(), model=NaNOut(192, 4))
    assert v.status == "invalid" and "non-finite" in v.reason and v.reason_code == "diverged"
    v = _run(Strip("paper", **FAST), _inputs(), model=NaNFeatures(192, 4))
    assert v.status == "invalid" and v.reason_code == "diverged"


def test_params_budgets_and_needs():
    assert Strip("canonical").params["n_overlays"] == 100 and Strip("canonical").params["frr"] == 0.01
    assert Strip("canonical", tier="smoke").params["n_overlays"] < 100
    assert Strip("canonical", tier="smoke", n_overlays=8).params["n_overlays"] == 8
    assert set(Strip("canonical", tier="smoke").params) == set(Strip.defaults["canonical"])
    assert Strip("canonical").requires == frozenset({"clean_holdout", "triggered_inputs"})
    assert Strip("paper").requires == frozenset({"clean_holdout"})
    with pytest.raises(ConfigError):
        Strip("paper", frr=0.01)
    v, _ = run_defense(Strip("canonical"), subject(CornerBackdoor(), 4),
                       DefenseInputs(clean_holdout=quadrant_images(20)), torch.Generator())
    assert v.status == "invalid" and "triggered_inputs" in v.reason and v.reason_code == "not-applicable"
    v, _ = run_defense(Strip("canonical", overlay_fraction=1.0), subject(CornerBackdoor(), 4), _inputs(), torch.Generator())
    assert v.status == "invalid" and "too small to split" in v.reason and v.reason_code == "not-applicable"
