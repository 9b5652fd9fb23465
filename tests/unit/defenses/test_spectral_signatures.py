import json

import numpy as np
import pytest
import torch

from qbd.defenses._per_dataset import pick
from qbd.defenses.base import DefenseInputs
from qbd.defenses.sandbox import run_defense
from qbd.defenses.spectral_signatures import SpectralSignatures, decide, spectrum, thresholds_of
from qbd.errors import ConfigError
from tests.unit.defenses import NaNFeatures, PixelFeatures, class_data, subject


def _run(defense, x, y, model=None, dataset=None):
    model = model or PixelFeatures(48, 4)
    inputs = DefenseInputs(clean_holdout=(x, y), poisoned_train=(x, y), dataset=dataset)
    v, _ = run_defense(defense, subject(model, 4), inputs, torch.Generator().manual_seed(0))
    return v


def test_canonical_flags_the_class_with_a_dominant_direction():
    x, y = class_data(per_class=150, poison=150, target=3)
    v = _run(SpectralSignatures("canonical"), x, y)
    assert v.status == "detected" and v.target_class == 3
    assert v.evidence["flagged"] == [3]
    # a 50/50 split along v: the projections are bimodal (kurtosis near 1, not 3)
    assert v.evidence["kurtosis_top_direction"][3] < 1.5
    # the authors' per-sample removal set: 1.5 * eps of every class
    assert v.evidence["removal_counts"][3] == round(1.5 * 0.1 * 300)
    json.dumps(v.to_dict(), allow_nan=False)


def test_canonical_single_blobs_are_clean():
    x, y = class_data(per_class=150)
    v = _run(SpectralSignatures("canonical"), x, y, dataset="synthetic")
    # one Gaussian blob per class: a kurtosis near 3 (flagged below 1.773) and no split that
    # stands apart (separation far below 12.988); the statistic is relative to both, flagged above 1
    assert v.status == "clean" and v.score < v.threshold == 1.0 and v.target_class is None
    assert v.evidence["flags_when"] == "above" and min(v.evidence["kurtosis_top_direction"]) > 2.0
    assert v.evidence["thresholds"] == {"kurtosis_threshold": 1.773, "separation_threshold": 12.988}


@pytest.mark.parametrize("poison", [150, 15])
def test_the_kurtosis_finds_a_poisoned_half_and_the_separation_a_poisoned_minority(poison):
    """A target class half poison (the default 10 % BadNet) has a kurtosis near 1; one a tenth
    poison (1 % BadNet) keeps a kurtosis above 3 that no kurtosis threshold flags, but its
    poison still stands apart along v: the separation names it."""
    x, y = class_data(per_class=150, poison=poison, target=2, poison_from="others")
    kurtosis_only = _run(SpectralSignatures("canonical", statistic="kurtosis"), x, y, dataset="synthetic")
    both = _run(SpectralSignatures("canonical"), x, y, dataset="synthetic")
    assert both.status == "detected" and both.target_class == 2
    if poison == 150:
        assert kurtosis_only.status == "detected" and both.evidence["kurtosis_top_direction"][2] < 1.773
    else:
        assert kurtosis_only.status == "clean" and both.evidence["kurtosis_top_direction"][2] > 1.773
        assert both.evidence["separation_top_direction"][2] > 12.988


def test_a_data_set_without_a_calibration_uses_the_kurtosis_alone():
    """The separation has no pooled threshold (its pooled midpoint names no synthetic target), so
    on another data set a poisoned minority is not flagged, and the evidence says why."""
    x, y = class_data(per_class=150, poison=15, target=2, poison_from="others")
    v = _run(SpectralSignatures("canonical"), x, y, dataset="mine")
    assert v.status == "clean" and v.evidence["thresholds"] == {"kurtosis_threshold": 1.373, "separation_threshold": None}
    assert "'mine' has no calibration of its own" in v.evidence["threshold_calibrated_for"]["separation_threshold"]
    # the separation rule alone has nothing to judge with there: invalid, never a silent clean
    alone = _run(SpectralSignatures("canonical", statistic="separation"), x, y, dataset="mine")
    assert alone.status == "invalid" and alone.reason_code == "not-applicable" and "separation_threshold" in alone.reason
    with pytest.raises(ConfigError, match="needs a separation_threshold"):
        SpectralSignatures("canonical", statistic="separation", separation_threshold=None)
    with pytest.raises(ConfigError, match="None: not used"):
        SpectralSignatures("canonical", separation_threshold="low")
    with pytest.raises(ConfigError, match=r"kurtosis_threshold\['digits'\]: None is not a number"):
        SpectralSignatures("canonical", kurtosis_threshold={"digits": None, "*": 1.3})


def test_paper_pools_all_classes_and_names_no_target():
    x, y = class_data(per_class=100)
    v = _run(SpectralSignatures("paper"), x, y)
    assert v.evidence["n_per_group"] == [400] and v.target_class is None
    assert v.threshold == 1.0 and not v.controls["sees_poisoned_data"].passed
    # one direction carrying almost all the variance: the ratio exceeds 1
    r = np.zeros((200, 5))
    r[:, 0] = np.linspace(-10, 10, 200)
    r[:, 1:] = np.random.default_rng(0).normal(0, 0.1, (200, 4))
    st = spectrum(r, SpectralSignatures("paper").params)
    assert st["stat"] > 100
    assert decide([st], SpectralSignatures("paper").params).status == "detected"


def test_degenerate_and_non_finite_inputs_are_invalid():
    p = SpectralSignatures("canonical").params
    line = np.outer(np.arange(10.0), np.ones(3))  # rank 1: sigma_2 = 0, ratio infinite
    v = decide([spectrum(line, p)], p)
    assert v.status == "invalid" and "non-finite" in v.reason and v.reason_code == "no-signal"
    v = decide([spectrum(np.ones((10, 3)), p)], p)
    assert v.status == "invalid" and v.reason_code == "no-signal"
    x, y = class_data(per_class=30)
    v = _run(SpectralSignatures("canonical"), x, y, model=NaNFeatures(48, 4))
    assert v.status == "invalid" and "non-finite" in v.reason and v.reason_code == "diverged"


def test_params_overrides_and_needs():
    d = SpectralSignatures("canonical", eps=0.05)
    assert set(d.params) == set(SpectralSignatures.defaults["canonical"]) and d.params["eps"] == 0.05
    assert d.requires == frozenset({"poisoned_train"})
    assert SpectralSignatures("paper").requires == frozenset({"clean_holdout"})
    with pytest.raises(ConfigError):
        SpectralSignatures("paper", threshold=2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_two_by_arpack_agree_with_the_whole_svd(seed):
    """The kurtosis and sv_ratio rules read sigma_1, sigma_2 and the top direction only, which
    ARPACK computes (qbd.defenses.spectral_signatures._svd): on a class matrix of the pre-pool
    shape (a few strong directions plus noise) they agree with LAPACK's whole SVD."""
    from qbd.defenses.spectral_signatures import _kurtosis, _svd

    rng = np.random.default_rng(seed)
    r = rng.normal(size=(600, 4)) * [8.0, 4.0, 2.0, 1.0] @ rng.normal(size=(4, 1024)) + rng.normal(size=(600, 1024))
    rc = r - r.mean(axis=0, keepdims=True)
    sv_top, v_top = _svd(rc, whole=False)
    sv_all, v_all = _svd(rc, whole=True)
    assert len(sv_top) == 2 and len(sv_all) == 600
    np.testing.assert_allclose(sv_top, sv_all[:2], rtol=1e-10)
    assert abs(abs(float(v_top @ v_all)) - 1.0) < 1e-10  # the same direction, up to its sign
    assert _kurtosis(sv_top, rc @ v_top) == pytest.approx(_kurtosis(sv_all, rc @ v_all), rel=1e-10)


def test_a_large_rank_one_class_is_still_rank_one_by_arpack():
    from qbd.defenses.spectral_signatures import _numerical_rank_one, _svd

    rng = np.random.default_rng(3)
    rc = np.outer(rng.normal(size=500), rng.normal(size=1024))
    rc -= rc.mean(axis=0, keepdims=True)
    sv, _ = _svd(rc, whole=False)
    assert _numerical_rank_one(sv, rc.shape)
    zero, _ = _svd(np.zeros((40, 64)), whole=False)  # ARPACK cannot start on it: LAPACK answers
    assert zero[0] == 0.0


def test_the_separation_at_its_edges():
    """A few stray samples split off a Gaussian class are no poisoned group (under
    separation_min_share; at 0 they would score in the thousands); two point masses are a perfect
    split, flagged rather than made a non-finite statistic; NaN projections give a non-finite statistic (invalid)."""
    p = pick((d := SpectralSignatures("canonical")).params, thresholds_of(d.params["statistic"]), "digits")[0]
    rng = np.random.default_rng(0)
    blob = rng.normal(0, 1, (300, 8))
    blob[:3, 0] += 200  # three stray samples, 1 % of the class
    assert spectrum(blob, p)["separation"] == 0.0
    assert spectrum(blob, {**p, "separation_min_share": 0.0})["separation"] > 100
    masses = np.repeat(np.eye(8)[:2] * 10, 50, axis=0) + np.outer(np.arange(100) % 2, np.eye(8)[2]) * 1e-9
    two = decide([spectrum(masses, p), spectrum(rng.normal(0, 1, (100, 8)), p)], p)
    assert two.status == "detected" and two.target_class == 0
    with pytest.raises(ConfigError, match="is not above 0"):
        SpectralSignatures("canonical", separation_threshold={"digits": 0, "*": None})
    from qbd.defenses.spectral_signatures import _kurtosis_or_separation
    assert np.isnan(_kurtosis_or_separation(np.ones(2), np.array([1.0, np.nan, -1.0]), p))  # -> invalid, never "unsuspicious"
