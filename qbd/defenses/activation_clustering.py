"""Activation Clustering (Chen et al., SafeAI 2019): split each class's penultimate activations
into two clusters; a class whose activations fall into two well-separated groups holds samples
the model treats differently from the rest -- the poison, which carries the trigger.

Protocols (every value recorded in the Result):
- canonical: the training set as the model was trained on it, split by ASSIGNED label; each
  class's activations at `layer` = "pre-pool" (the input of the global average pool, 64 x 4 x 4
  on tiny-cnn, flattened) reduced to `nb_dims` = 10 dimensions by PCA (IBM ART's default; the AC
  paper used ICA), 2-means (`n_init` restarts), silhouette on at most `silhouette_sample` points
  per class. Why before pooling: a trigger is a small patch, and after global pooling it is one
  of 16 averaged positions; on the pooled 64-d features even the true poison/clean split of the
  target class scores a silhouette of only 0.27-0.35, no more than natural sub-modes of other
  classes, while before pooling the target class stands apart.
  Model-level rule (rule = "silhouette"): a class is flagged when its 2-means silhouette exceeds
  `silhouette_threshold`, calibrated per data set on the calibration seeds 100-104 only (never
  the evaluation seeds 0-9), over the default BadNet and the attacks of
  qbd.presets.CALIBRATION_SPREAD: the midpoint between the highest silhouette of any clean-model
  class or non-target class and the nearest target class above it, digits 0.418 (0.401 / 0.435;
  one digits target, 0.397, lies below a negative and is missed), synthetic 0.36 (0.305 / 0.416),
  and for any other data set the midpoint over both, 0.408 (0.401 / 0.416)
  (qbd.defenses._per_dataset; scripts/calibrate.py; docs/defenses.md#calibration). The authors' relative-size rule
  (smaller cluster < 0.35) is reported as evidence only: with a 10 % poison rate in a 10-class
  set the target class holds about as many poisoned samples as clean ones, so its poison cluster
  has a relative size near 0.5 and the size rule cannot flag it.
  Per sample (`suspects` = "more-varied"): each class's suspects are the cluster whose
  activations vary more, the poison's side (qbd.defenses._poison_side); `suspects` = "smaller"
  keeps the authors' removal set, the smaller cluster, which is the clean part where the poison is
  the larger one (synthetic). The bench scores them against the known poison as the controls
  `poison_removal` and `poison_target_class`.
- paper: the paper fed AC the clean holdout only: 2-means on the raw penultimate activations per
  holdout label, no reduction; rule = "size-and-silhouette": a class is flagged when its smaller cluster
  has relative size < 0.35 and the silhouette exceeds 0.15 (paper 4.2 / A.2).
Both: the model is flagged when any class is; the target is the flagged class with the highest
silhouette.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.metrics import silhouette_score

from qbd.defenses import _features as feat
from qbd.defenses._per_dataset import ANY, check, pick
from qbd.defenses._poison_side import more_varied
from qbd.defenses.base import ConfiguredDefense, Control, DefenseInputs, Subject, Verdict

_MIN_POINTS = 4  # 2-means and a silhouette need a few points in a class


class ActivationClustering(ConfiguredDefense):
    name = "activation-clustering"
    needs: ClassVar[dict[str, frozenset[str]]] = {"canonical": frozenset({"poisoned_train"}), "paper": frozenset({"clean_holdout"})}
    defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "canonical": {
            "data": "poisoned_train", "layer": "pre-pool", "nb_dims": 10, "reduce": "pca", "n_init": 10,
            "silhouette_sample": 2000, "size_threshold": 0.35, "rule": "silhouette",
            # per data set (qbd.defenses._per_dataset): each set's calibration midpoint, "*" pooled
            "silhouette_threshold": {"digits": 0.418, "synthetic": 0.36, ANY: 0.408}, "suspects": "more-varied", "batch_size": 512,
        },
        "paper": {
            "data": "clean_holdout", "layer": "penultimate", "nb_dims": 0, "reduce": "none", "n_init": 10,
            "silhouette_sample": 2000, "size_threshold": 0.35, "silhouette_threshold": 0.15,
            "rule": "size-and-silhouette", "suspects": "smaller", "batch_size": 512,
        },
    }

    def validate(self) -> None:
        from qbd.errors import ConfigError

        if self.params["suspects"] not in ('more-varied', 'smaller'):
            raise ConfigError(f"{self.name}: suspects must be one of more-varied, smaller, got {self.params['suspects']!r}")
        check(self.name, "silhouette_threshold", self.params["silhouette_threshold"])

    def detect(self, subject: Subject, inputs: DefenseInputs, generator: torch.Generator) -> Verdict:
        p = self.params
        x, y = getattr(inputs, p["data"])
        seed = feat.seed_from(generator)
        controls = {"sees_poisoned_data": feat.sees_poison_control("AC", p["data"])}
        try:
            feats = feat.representations(subject, x, p["layer"], p["batch_size"])
        except feat.LayerUnavailable as e:
            return Verdict.invalid(str(e), "not-applicable", controls=controls)
        bad = feat.nonfinite(feats, f"{p['layer']} activations")
        if bad:
            return Verdict.invalid(bad, "diverged", controls=controls)
        groups = feat.per_class(y, subject.num_classes)
        with feat.single_threaded():
            stats = [cluster_class(feats[idx].double().numpy(), p, seed + c) for c, idx in enumerate(groups)]
        used, calibrated_for = pick(p, ("silhouette_threshold",), inputs.dataset)
        v = decide(stats, used)
        v.controls.update(controls)
        v.evidence["layer"] = p["layer"]
        v.evidence["threshold_calibrated_for"] = calibrated_for
        # each class's suspects: the more varied cluster (the poison's side), or the authors' smaller one
        side = "varied" if p.get("suspects", "smaller") == "more-varied" else "smaller"
        v.suspects = {"data": p["data"], "by_class": {c: idx[s[side]] for c, (idx, s) in enumerate(zip(groups, stats, strict=True))
                                                      if s[side] is not None}}
        return v


def cluster_class(a: np.ndarray, p: dict[str, Any], seed: int) -> dict[str, Any]:
    """2-means on one class's activations: cluster sizes (larger first), relative size of the
    smaller cluster, silhouette. A class too small or without spread has no split (None)."""
    n = len(a)
    out: dict[str, Any] = {"n": n, "sizes": None, "relative_size": None, "silhouette": None, "smaller": None, "varied": None}
    if n < _MIN_POINTS or float(np.ptp(a, axis=0).max(initial=0.0)) == 0.0:
        return out
    # k-means++ seeds by row index, so on a class without a clear split the local optimum it
    # lands in depends on the sample order; a canonical (lexicographic) row order makes the
    # statistics a function of the set of activations alone
    order = np.lexsort(a.T[::-1])
    a = full = a[order]
    rng = np.random.RandomState(seed)
    a = _REDUCERS[p["reduce"]](a, p["nb_dims"], rng)
    labels = KMeans(n_clusters=2, n_init=p["n_init"], random_state=rng.randint(2**31 - 1)).fit_predict(a)
    sizes = np.bincount(labels, minlength=2)
    if sizes.min() == 0:
        return out
    out["sizes"] = sorted((int(s) for s in sizes), reverse=True)
    out["relative_size"] = float(sizes.min() / n)
    out["smaller"] = np.sort(order[labels == int(np.argmin(sizes))])  # positions in the class's input order
    out["varied"] = np.sort(order[more_varied(full, labels == 0)])  # spread read on the activations, not the reduction
    sample = p["silhouette_sample"]
    if n > sample:
        # seeded subsample for speed; keep both clusters represented
        pick = rng.choice(n, size=sample, replace=False)
        if len(np.unique(labels[pick])) < 2:
            pick = np.arange(n)
        a, labels = a[pick], labels[pick]
    out["silhouette"] = float(silhouette_score(a, labels))
    return out


def _pca(a: np.ndarray, dims: int, rng: np.random.RandomState) -> np.ndarray:
    k = min(dims, a.shape[1], a.shape[0] - 1)
    if k >= a.shape[1]:
        return a
    return PCA(n_components=k, random_state=rng.randint(2**31 - 1)).fit_transform(a)


def _ica(a: np.ndarray, dims: int, rng: np.random.RandomState) -> np.ndarray:
    """FastICA to `dims` unit-variance components: the AC paper's own reduction."""
    k = min(dims, a.shape[1], a.shape[0] - 1)
    return FastICA(n_components=k, whiten="unit-variance", max_iter=1000, random_state=rng.randint(2**31 - 1)).fit_transform(a)


def _identity(a: np.ndarray, dims: int, rng: np.random.RandomState) -> np.ndarray:
    return a


_REDUCERS: dict[str, Callable[[np.ndarray, int, np.random.RandomState], np.ndarray]] = {
    "pca": _pca, "ica": _ica, "none": _identity,
}


def _by_silhouette(s: dict[str, Any], p: dict[str, Any]) -> bool:
    return s["silhouette"] is not None and s["silhouette"] > p["silhouette_threshold"]


def _by_size_and_silhouette(s: dict[str, Any], p: dict[str, Any]) -> bool:
    return _size_rule(s, p) and _by_silhouette(s, p)


def _size_rule(s: dict[str, Any], p: dict[str, Any]) -> bool:
    return s["relative_size"] is not None and s["relative_size"] < p["size_threshold"]


# rule name -> per-class flag; the score is the highest silhouette among the classes the rule
# compares with the silhouette threshold (all clustered classes, or those passing the size rule)
RULES: dict[str, tuple[Callable[[dict[str, Any], dict[str, Any]], bool], Callable[[dict[str, Any], dict[str, Any]], bool]]] = {
    "silhouette": (_by_silhouette, lambda s, p: s["silhouette"] is not None),
    "size-and-silhouette": (_by_size_and_silhouette, lambda s, p: s["silhouette"] is not None and _size_rule(s, p)),
}


def decide(stats: list[dict[str, Any]], p: dict[str, Any]) -> Verdict:
    """Model-level verdict from per-class cluster statistics (see the module docstring)."""
    flag, scored = RULES[p["rule"]]
    sil = [s["silhouette"] for s in stats]
    evidence: dict[str, Any] = {
        "rule": p["rule"],
        "n_per_class": [s["n"] for s in stats],
        "silhouette": [None if v is None else round(v, 4) for v in sil],
        "relative_size": [None if s["relative_size"] is None else round(s["relative_size"], 4) for s in stats],
        "cluster_sizes": [s["sizes"] for s in stats],
    }
    clustered = [c for c, v in enumerate(sil) if v is not None]
    controls = {"classes_clustered": Control(bool(clustered), len(clustered) / max(len(stats), 1),
                                             "share of classes with enough distinct points for 2-means")}
    if not clustered:
        # the input was there, the statistic is undefined for every class (too few points or no
        # spread): nothing can be scored, as with MAD = 0, so no-signal rather than not-applicable
        return Verdict.invalid("no class had enough distinct activations to cluster", "no-signal", evidence=evidence,
                               controls=controls)
    if any(not math.isfinite(sil[c]) for c in clustered):
        return Verdict.invalid("a silhouette score is non-finite", "diverged", evidence=evidence, controls=controls)
    flagged = [c for c, s in enumerate(stats) if flag(s, p)]
    size_rule = [c for c, s in enumerate(stats) if _size_rule(s, p)]
    evidence["flagged"] = flagged
    evidence["size_rule_classes"] = size_rule  # smaller cluster < size_threshold, any silhouette
    evidence["size_rule_would_flag"] = bool(size_rule)
    evidence["max_silhouette_class"] = max(clustered, key=lambda c: sil[c])
    # each class's own statistic as the rule compares it (None: not scored): what a borderline
    # judgement reads for the planted target (qbd.outcomes)
    evidence["per_class_score"] = [round(sil[c], 4) if scored(s, p) and sil[c] is not None else None for c, s in enumerate(stats)]
    compared = [sil[c] for c, s in enumerate(stats) if scored(s, p)]
    score = max(compared) if compared else 0.0
    if flagged:
        target = max(flagged, key=lambda c: sil[c])
        return Verdict("detected", score=score, threshold=p["silhouette_threshold"], target_class=int(target),
                       evidence=evidence, controls=controls)
    return Verdict("clean", score=score, threshold=p["silhouette_threshold"], evidence=evidence, controls=controls)
