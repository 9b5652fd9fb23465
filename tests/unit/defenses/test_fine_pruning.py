import json

import pytest
import torch

from qbd.defenses.base import DefenseInputs, run_defense
from qbd.defenses.fine_pruning import FinePruning, decide_paper
from qbd.errors import ConfigError
from tests.unit.defenses import Constant, CornerBackdoor, NaNFeatures, add_trigger, quadrant_images, subject

FAST = {"finetune_epochs": 2}


def _inputs(n_hold=200, n_probe=90):
    x_hold, y_hold = quadrant_images(n_hold, seed=1)
    xp, yp = quadrant_images(n_probe + n_probe // 3 + 3, seed=2)
    probe = add_trigger(xp[yp != 0][:n_probe])
    return DefenseInputs(clean_holdout=(x_hold, y_hold), triggered_probe=(probe, 0))


def _run(defense, model, inputs=None):
    v, _ = run_defense(defense, subject(model, 4), inputs or _inputs(), torch.Generator().manual_seed(0))
    return v


def test_pruning_the_dormant_backdoor_channel_neutralises_the_backdoor():
    model = CornerBackdoor(channel=True)
    v = _run(FinePruning("canonical", **FAST), model)
    assert v.status == "detected", v.evidence
    ev = v.evidence
    assert ev["before"]["asr"] > 0.95 and ev["after_pruning"]["asr"] < 0.05
    assert ev["pruned"] >= 1 and ev["clean_acc_drop"] <= 0.05
    assert v.score == pytest.approx(ev["before"]["asr"] - ev["after_fine_tuning"]["asr"], abs=1e-3)
    assert ev["fine_tuned"] and v.controls["fine_tuned"].passed
    assert 2 <= len(ev["curve"]) <= 33 and ev["curve"][0][0] == 0.0 and ev["curve"][-1][0] == 1.0
    json.dumps(v.to_dict(), allow_nan=False)
    # the subject's own model is untouched: fine-tuning works on a copy
    assert model.head.weight[0, 15].item() == pytest.approx(48.0)


def test_backdoor_without_a_dormant_channel_survives():
    # the trigger is wired into class 0's own channel: pruning it costs class 0, so pruning
    # stops first and the backdoor stays
    v = _run(FinePruning("canonical", **FAST), CornerBackdoor(channel=False))
    assert v.status == "clean"
    assert v.evidence["after_pruning"]["asr"] > 0.9 and v.score < v.threshold


def test_clean_model_probe_cannot_drop_fifty_points():
    # the negative control: a clean model's probe ASR is its natural rate
    class CleanModel(CornerBackdoor):
        def __init__(self):
            super().__init__(channel=True)
            with torch.no_grad():
                self.head.weight[0, 15] = 0.0

    v = _run(FinePruning("canonical", **FAST), CleanModel())
    assert v.status == "clean" and v.evidence["before"]["asr"] < 0.5
    assert not v.controls["probe_asr_before"].passed


def test_model_without_float_parameters_is_pruned_but_not_fine_tuned():
    v = _run(FinePruning("canonical", **FAST), Constant())
    assert v.evidence["fine_tuned"] is False and "no float trainable parameters" in v.evidence["fine_tune_note"]
    assert v.evidence["after_fine_tuning"] is None


def test_paper_counts_dormant_channels_and_prunes_nothing():
    v = _run(FinePruning("paper"), CornerBackdoor(channel=True))
    assert v.status == "detected" and v.evidence["dormant"] == 1 and v.score == pytest.approx(1 / 16)
    assert v.threshold == 0.001 and not v.controls["prunes_or_finetunes"].passed
    v = decide_paper(torch.linspace(0.1, 1.0, 64).double().numpy(), FinePruning("paper").params)
    assert v.status == "clean" and v.score == 0.0


def test_nan_features_are_invalid():
    from tests.unit.defenses import PixelFeatures

    x, y = quadrant_images(40)
    inputs = DefenseInputs(clean_holdout=(x, y), triggered_probe=(add_trigger(x[y != 0]), 0))
    for protocol in ("canonical", "paper"):
        v = _run(FinePruning(protocol), NaNFeatures(192, 4), inputs)
        assert v.status == "invalid" and "non-finite" in v.reason
    assert _run(FinePruning("paper"), PixelFeatures(192, 4), inputs).status in ("clean", "detected")


def test_params_budgets_and_needs():
    d = FinePruning("canonical")
    assert d.params["max_acc_drop"] == 0.04 and d.params["asr_drop_threshold"] == 0.5 and d.params["max_ca_drop"] == 0.05
    assert set(FinePruning("canonical", tier="smoke").params) == set(FinePruning.defaults["canonical"])
    assert FinePruning("canonical", finetune=False).params["finetune"] is False
    assert d.requires == frozenset({"clean_holdout", "triggered_probe"})
    assert FinePruning("paper").requires == frozenset({"clean_holdout"})
    with pytest.raises(ConfigError):
        FinePruning("canonical", dormant_threshold=0.1)
