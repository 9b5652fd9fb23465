"""Hypothesis properties of the defenses' model-level decision rules: what must hold for every
input, not just the models the matrix happens to train.

NC's MAD rule: invariant to permuting the classes and to scaling every norm; flags only classes
below the median; MAD = 0 is invalid (no signal), never clean. AC and SS: the verdict does not
depend on the order of the samples, and permuting the classes permutes the target."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qbd.defenses import _features as feat
from qbd.defenses import activation_clustering as ac
from qbd.defenses import neural_cleanse as nc
from qbd.defenses import spectral_signatures as ss
from qbd.defenses._per_dataset import pick

# trigger L1 norms: positive, bounded, a few classes (no NaN/inf: that is a separate rule)
_norms = st.lists(st.floats(0.5, 500.0, allow_nan=False, allow_infinity=False), min_size=3, max_size=12)


def _nc_res(norms: list[float]) -> dict:
    k = len(norms)
    return {"norms": list(norms), "reached": [True] * k, "cost": [0.001] * k, "rounds": [10] * k, "iterations": 10 * k,
            "centroids": [[0.0, 0.0]] * k,
            "gradient": {"ok": True, "pattern_grad_abs_max": 1.0, "note": "input gradients reach the trigger"}}


def _nc(norms: list[float]):
    return nc.decide(_nc_res(norms), 2.0)


@given(_norms, st.randoms(use_true_random=False))
def test_nc_rule_is_invariant_to_permuting_classes(norms, rnd):
    perm = list(range(len(norms)))
    rnd.shuffle(perm)
    a, b = _nc(norms), _nc([norms[i] for i in perm])
    assert a.status == b.status
    assert a.reason_code == b.reason_code
    if a.status == "detected":
        # the permuted run names the same class, at its new position (ties broken by index may differ)
        assert norms[a.target_class] == norms[perm[b.target_class]]
        assert a.score == b.score


@given(_norms, st.floats(1e-3, 1e3))
def test_nc_rule_is_invariant_to_scaling_all_norms(norms, c):
    a, b = _nc(norms), _nc([c * n for n in norms])
    assume(a.status != "detected" or abs(a.score - a.threshold) > 1e-6)  # not on the threshold's edge (rounding)
    assert (a.status, a.target_class, a.reason_code) == (b.status, b.target_class, b.reason_code)


@given(_norms)
def test_nc_flags_only_classes_below_the_median(norms):
    v = _nc(norms)
    if v.status == "detected":
        med = float(np.median(norms))
        assert norms[v.target_class] < med
        assert all(norms[c] < med for c in v.evidence["flagged"])


@given(st.floats(0.5, 500.0), st.integers(3, 12), st.data())
def test_nc_mad_zero_is_invalid_never_clean(value, k, data):
    # more than half of the norms equal: the median absolute deviation is 0
    same = k // 2 + 1
    others = data.draw(st.lists(st.floats(0.5, 500.0), min_size=k - same, max_size=k - same))
    v = _nc([value] * same + others)
    assert v.status == "invalid" and v.reason_code == "no-signal"


@given(_norms)
def test_nc_a_class_that_never_succeeded_makes_the_verdict_not_converged(norms):
    res = _nc_res(norms)
    res["reached"][0] = False
    v = nc.decide(res, 2.0)
    assert v.status == "invalid" and v.reason_code == "not-converged"


# -- AC and SS ---------------------------------------------------------------------------------------
@st.composite
def two_blobs(draw):
    """One class's features: a clean blob and a smaller, well separated one (the poison), or a
    single blob; small shapes, bounded values."""
    seed = draw(st.integers(0, 2**16))
    n = draw(st.integers(20, 80))
    d = draw(st.integers(2, 12))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if draw(st.booleans()):
        m = draw(st.integers(4, n // 2))
        x[:m] += draw(st.floats(6.0, 20.0)) * np.eye(d)[0]
    return x


# the thresholds as a cell on digits resolves them (qbd.defenses._per_dataset)
_AC = pick(ac.ActivationClustering(protocol="canonical", tier="smoke").params, ("silhouette_threshold",), "digits")[0]
_SS = pick((p := ss.SpectralSignatures(protocol="canonical", tier="smoke").params), ss.thresholds_of(p["statistic"]), "digits")[0]


@settings(max_examples=30)  # 2-means with 10 restarts per example: the slow one
@given(two_blobs(), st.randoms(use_true_random=False))
def test_ac_class_statistics_do_not_depend_on_sample_order(x, rnd):
    perm = list(range(len(x)))
    rnd.shuffle(perm)
    with feat.single_threaded():
        a, b = ac.cluster_class(x, _AC, 7), ac.cluster_class(x[perm], _AC, 7)
    assert a["sizes"] == b["sizes"]
    if a["silhouette"] is not None:
        assert abs(a["silhouette"] - b["silhouette"]) < 1e-6


@given(two_blobs(), st.randoms(use_true_random=False))
def test_ss_class_statistics_do_not_depend_on_sample_order(x, rnd):
    perm = list(range(len(x)))
    rnd.shuffle(perm)
    a, b = ss.spectrum(x, _SS), ss.spectrum(x[perm], _SS)
    assert a["removed"] == b["removed"]
    assert np.isclose(a["stat"], b["stat"], rtol=1e-6)


@settings(max_examples=30)
@given(st.lists(two_blobs(), min_size=3, max_size=6), st.randoms(use_true_random=False))
def test_ac_and_ss_targets_follow_a_permutation_of_the_classes(classes, rnd):
    perm = list(range(len(classes)))
    rnd.shuffle(perm)
    for stat, decide, params, key in ((lambda x: ac.cluster_class(x, _AC, 7), ac.decide, _AC, "silhouette"),
                                      (lambda x: ss.spectrum(x, _SS), ss.decide, _SS, "stat")):
        with feat.single_threaded():
            stats = [stat(x) for x in classes]
        a, b = decide(stats, params), decide([stats[i] for i in perm], params)
        assert a.status == b.status
        if a.status == "detected":
            # the same class (by its figure: two identical classes tie, and either may be named)
            assert stats[perm[b.target_class]][key] == stats[a.target_class][key]


# -- STRIP -------------------------------------------------------------------------------------------
from qbd.defenses import strip as strip_defense  # noqa: E402

_STRIP = strip_defense.Strip(protocol="canonical", tier="smoke").params
_entropies = st.lists(st.floats(0.01, 3.5, allow_nan=False), min_size=20, max_size=120)


@given(_entropies, _entropies, st.data())
def test_strip_is_monotone_in_the_share_of_low_entropy_inputs(h_cal, h_stream, data):
    """Making more stream inputs low-entropy (below every calibration value) never turns a
    detection into `clean`, and never turns `clean` into invalid."""
    cal, stream = np.array(h_cal), np.array(h_stream)
    preds = np.zeros(len(stream), dtype=np.int64)
    before = strip_defense.decide(cal, stream, preds, _STRIP)
    lowered = data.draw(st.sets(st.integers(0, len(stream) - 1), max_size=len(stream)))
    more = stream.copy()
    more[sorted(lowered)] = 0.001
    after = strip_defense.decide(cal, more, preds, _STRIP)
    order = {"clean": 0, "detected": 1}
    if before.status in order:
        assert after.status in order
        assert order[after.status] >= order[before.status]
        assert after.score >= before.score
