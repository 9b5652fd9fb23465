import json

import pytest
import torch

from qbd.defenses._per_dataset import pick
from qbd.defenses.activation_clustering import ActivationClustering, decide
from qbd.defenses.base import DefenseInputs
from qbd.defenses.sandbox import run_defense
from qbd.errors import ConfigError
from tests.unit.defenses import NaNFeatures, PixelFeatures, class_data, subject


def _run(defense, x, y, model=None, seed=0, dataset=None):
    model = model or PixelFeatures(48, 4)
    inputs = DefenseInputs(clean_holdout=(x, y), poisoned_train=(x, y), dataset=dataset)
    v, _ = run_defense(defense, subject(model, 4), inputs, torch.Generator().manual_seed(seed))
    return v


def test_canonical_flags_the_class_holding_two_clusters():
    # the target class holds as many poisoned points as clean ones (relative size 0.5): the
    # silhouette rule flags it, the authors' 0.35 size rule cannot
    x, y = class_data(per_class=150, poison=150, target=2)
    v = _run(ActivationClustering("canonical"), x, y)
    assert v.status == "detected" and v.target_class == 2
    assert v.evidence["flagged"] == [2]
    assert v.evidence["relative_size"][2] == pytest.approx(0.5, abs=0.02)
    assert v.evidence["size_rule_would_flag"] is False
    assert v.controls["sees_poisoned_data"].passed
    json.dumps(v.to_dict(), allow_nan=False)  # evidence is plain JSON


def test_canonical_single_blobs_are_clean():
    x, y = class_data(per_class=150)
    v = _run(ActivationClustering("canonical"), x, y)
    assert v.status == "clean" and v.target_class is None
    assert v.score < v.threshold
    assert len(v.evidence["silhouette"]) == 4


def test_paper_rule_needs_a_minority_cluster():
    # 50/50 split: a high silhouette but no "significant minority" -> the paper's rule is silent
    x, y = class_data(per_class=150, poison=150, target=1)
    assert _run(ActivationClustering("paper"), x, y).status == "clean"
    # a 20 % minority with a clear gap is flagged
    x, y = class_data(per_class=150, poison=38, target=1)
    v = _run(ActivationClustering("paper"), x, y)
    assert v.status == "detected" and v.target_class == 1
    assert not v.controls["sees_poisoned_data"].passed
    assert "clean holdout" in v.controls["sees_poisoned_data"].detail


def test_decide_rules_on_constructed_statistics():
    stats = [{"n": 100, "sizes": [50, 50], "relative_size": 0.5, "silhouette": 0.8},
             {"n": 100, "sizes": [80, 20], "relative_size": 0.2, "silhouette": 0.2},
             {"n": 2, "sizes": None, "relative_size": None, "silhouette": None}]
    canon = decide(stats, pick(ActivationClustering("canonical").params, ("silhouette_threshold",), "digits")[0])
    assert canon.status == "detected" and canon.target_class == 0 and canon.evidence["size_rule_classes"] == [1]
    paper = decide(stats, ActivationClustering("paper").params)
    assert paper.status == "detected" and paper.target_class == 1 and paper.score == 0.2
    empty = decide([stats[2]], ActivationClustering("paper").params)
    assert empty.status == "invalid" and "cluster" in empty.reason and empty.reason_code == "no-signal"


def test_nan_features_are_invalid_never_clean():
    x, y = class_data(per_class=40)
    v = _run(ActivationClustering("canonical"), x, y, model=NaNFeatures(48, 4))
    assert v.status == "invalid" and "non-finite" in v.reason and v.reason_code == "diverged"


def test_deterministic_for_a_seed():
    x, y = class_data(per_class=80, poison=80)
    a = _run(ActivationClustering("canonical"), x, y, seed=3).to_dict()
    b = _run(ActivationClustering("canonical"), x, y, seed=3).to_dict()
    assert a == b


def test_params_overrides_and_needs():
    d = ActivationClustering("canonical")
    assert set(d.params) == set(ActivationClustering.defaults["canonical"])
    assert d.requires == frozenset({"poisoned_train"})
    assert ActivationClustering("paper").requires == frozenset({"clean_holdout"})
    assert ActivationClustering("paper").params["silhouette_threshold"] == 0.15
    assert ActivationClustering("canonical", silhouette_threshold=0.9).params["silhouette_threshold"] == 0.9
    with pytest.raises(ConfigError, match="has no '\\*' entry"):
        ActivationClustering("canonical", silhouette_threshold={"digits": 0.4})
    with pytest.raises(ConfigError, match="must be a number"):
        ActivationClustering("canonical", silhouette_threshold="0.4")
    with pytest.raises(ConfigError, match="does not know: 'CIFAR-10'; known: cifar10, digits"):
        ActivationClustering("canonical", silhouette_threshold={"CIFAR-10": 0.4, "*": 0.4})
    with pytest.raises(ConfigError, match=r"silhouette_threshold\['\*'\]: nan is not finite"):
        ActivationClustering("canonical", silhouette_threshold={"digits": 0.4, "*": float("nan")})
    with pytest.raises(ConfigError, match="unknown parameter"):
        ActivationClustering("canonical", k=3)
    with pytest.raises(ConfigError, match="unknown protocol"):
        ActivationClustering("other")


def test_missing_training_set_is_invalid():
    x, y = class_data(per_class=20)
    v, _ = run_defense(ActivationClustering("canonical"), subject(PixelFeatures(48, 4), 4),
                       DefenseInputs(clean_holdout=(x, y)), torch.Generator())
    assert v.status == "invalid" and "poisoned_train" in v.reason and v.reason_code == "not-applicable"


@pytest.mark.parametrize(("dataset", "expected", "said"), [("digits", 0.418, "digits"), ("synthetic", 0.36, "synthetic"),
                                                           ("mine", 0.408, "'mine' has no calibration"), (None, 0.408, "not given")])
def test_the_threshold_is_the_data_sets_own(dataset, expected, said):
    """The canonical rule compares with the midpoint calibrated on the cell's own data set, the
    pooled one for any other, and says which in its evidence; a threshold between two classes'
    silhouettes decides the verdict by it."""
    x, y = class_data(per_class=150, poison=150, target=2)
    v = _run(ActivationClustering("canonical"), x, y, dataset=dataset)
    assert v.threshold == expected and said in v.evidence["threshold_calibrated_for"]["silhouette_threshold"]
    low = _run(ActivationClustering("canonical", silhouette_threshold={"gtsrb": v.score - 0.01, "*": v.score + 0.01}), x, y, dataset="gtsrb")
    assert low.status == "detected" and low.target_class == 2
    high = _run(ActivationClustering("canonical", silhouette_threshold={"gtsrb": v.score - 0.01, "*": v.score + 0.01}), x, y, dataset="cifar10")
    assert high.status == "clean"
