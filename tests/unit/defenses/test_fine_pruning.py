import copy
import json

import pytest
import torch

from qbd.defenses import _features as feat
from qbd.defenses.base import DefenseInputs, Subject
from qbd.defenses.fine_pruning import FinePruning, decide, decide_paper
from qbd.defenses.sandbox import run_defense
from qbd.errors import ConfigError
from qbd.quant.intn_sim import quantize_weight
from tests.unit.defenses import Constant, CornerBackdoor, NaNFeatures, add_trigger, quadrant_images, subject

FAST = {"finetune_epochs": 2}


def _inputs(n_hold=200, n_probe=90, triggered=1.0):
    x_hold, y_hold = quadrant_images(n_hold, seed=1)
    xp, yp = quadrant_images(n_probe + n_probe // 3 + 3, seed=2)
    xp = xp[yp != 0][:n_probe]
    k = round(triggered * len(xp))  # a probe where only part carries the trigger: a weakened backdoor's ASR
    probe = torch.cat([add_trigger(xp[:k]), xp[k:]])
    return DefenseInputs(clean_holdout=(x_hold, y_hold), triggered_probe=(probe, 0))


def _deployable(model, deploy=lambda m: m, log=None):
    """A subject that can be re-deployed: `deploy` maps an edited float copy to the deployed model."""

    def redeploy(edited):
        deployed = deploy(edited)
        if log is not None:
            log.append(deployed)
        return subject(deployed, 4)

    return Subject(model, model.embed, model.classify, 4, float_model=model, redeploy=redeploy)


def _int4(model):
    """A toy int4-sim deployment: every Linear weight on its per-channel 4-bit grid."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer in out.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(quantize_weight(layer.weight, 4)[0])
    return out


def _run(defense, model, inputs=None, subj=None):
    v, _ = run_defense(defense, subj or _deployable(model), inputs or _inputs(), torch.Generator().manual_seed(0))
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


def test_repaired_model_is_re_deployed_on_the_schemes_grid_and_judged_there():
    # int4: the judged model must stay on 16 levels per channel; fine-tuning in float moves the
    # weights off the grid, so only a re-deployed model is what the defender would ship
    deployed_int4 = []
    model = CornerBackdoor(channel=True)
    v = _run(FinePruning("canonical", **FAST), model, subj=_deployable(_int4(model), _int4, deployed_int4))
    assert v.status == "detected" and v.evidence["fine_tuned"]
    (repaired,) = deployed_int4
    for row in repaired.head.weight:
        assert len(torch.unique(row)) <= 16
    assert torch.equal(repaired.head.weight[:, 15], torch.zeros(4))  # the pruned channel is gone from the deployed head
    # the ASR after fine-tuning is the re-deployed model's own, with no mask outside it
    probe = _inputs().triggered_probe[0]
    asr = float((feat.logits(subject(repaired, 4), probe).argmax(1) == 0).float().mean())
    assert v.evidence["after_fine_tuning"]["asr"] == pytest.approx(asr, abs=1e-6)


def test_a_subject_that_cannot_be_re_deployed_is_judged_after_pruning():
    v = _run(FinePruning("canonical", **FAST), None, subj=subject(CornerBackdoor(channel=True), 4))
    assert v.status == "detected" and not v.evidence["fine_tuned"] and v.evidence["after_fine_tuning"] is None
    assert "no float model" in v.evidence["fine_tune_note"] and not v.controls["fine_tuned"].passed
    assert v.score == pytest.approx(v.evidence["before"]["asr"] - v.evidence["after_pruning"]["asr"], abs=1e-6)


def test_backdoor_without_a_dormant_channel_survives():
    # the trigger is wired into class 0's own channel: pruning it costs class 0, so pruning
    # stops first and the backdoor stays
    v = _run(FinePruning("canonical", **FAST), CornerBackdoor(channel=False))
    assert v.status == "clean"
    assert v.evidence["after_pruning"]["asr"] > 0.9 and v.score < v.threshold


class CleanModel(CornerBackdoor):
    def __init__(self):
        super().__init__(channel=True)
        with torch.no_grad():
            self.head.weight[0, 15] = 0.0


def test_clean_model_is_clean_its_probe_showing_no_trigger_effect():
    # the negative control: a clean model's probe ASR is its natural rate, so the trigger has no
    # measurable effect and there was nothing to remove: clean, the truth
    v = _run(FinePruning("canonical", **FAST), CleanModel())
    assert v.status == "clean", v.reason
    assert v.evidence["before"]["asr"] < 0.5 and not v.controls["trigger_effect_before"].passed
    assert v.evidence["trigger_effect_p"] > 0.5 and v.score == 0.0 and not v.evidence["backdoor_on_probe"]


def test_a_weakened_backdoor_is_judged_relative_to_its_own_asr():
    # 40 % of the probe triggers the backdoor, the natural rate is 0: a backdoor is there (as a
    # scheme that weakens it leaves it). Pruning the channel removes all of it: a complete repair,
    # detected, though an absolute drop of 0.5 was out of reach (it was `not-applicable` before)
    v = _run(FinePruning("canonical", **FAST), CornerBackdoor(channel=True), _inputs(triggered=0.4))
    assert v.evidence["before"]["asr"] == pytest.approx(0.4, abs=0.02) and v.evidence["trigger_effect_p"] < 1e-3
    assert v.status == "detected", v.to_dict()
    assert v.score == pytest.approx(v.evidence["asr_drop"] / v.evidence["before"]["asr"], abs=1e-3) and v.score >= 0.5
    assert v.evidence["asr_drop"] < 0.5  # the old absolute rule could not have fired


def test_the_removed_share_decides_both_ways():
    """decide() on fabricated curves: half of a 0.4 ASR removed is a repair, a third is not; a
    probe with no trigger effect is clean with score 0 whatever its "drop"."""
    p = FinePruning("canonical").params
    base = {"channels": 64, "pruned": 3, "curve": [(0, 0.99, 0.4), (3, 0.98, 0.2)], "pruned_only": (0.98, 0.2), "fine_tuned": True,
            "fine_tune_note": "ok", "natural": (0, 200), "n_probe": 200, "before": (0.99, 0.4)}
    assert decide({**base, "after": (0.98, 0.2)}, p).status == "detected"
    v = decide({**base, "after": (0.98, 0.27)}, p)
    assert v.status == "clean" and v.score == pytest.approx(0.325)
    v = decide({**base, "before": (0.99, 0.02), "after": (0.98, 0.0), "natural": (3, 200)}, p)
    assert v.status == "clean" and v.score == 0.0 and not v.controls["trigger_effect_before"].passed
    v = decide({**base, "after": (0.90, 0.0)}, p)  # removed all, but 9 points of clean accuracy lost
    assert v.status == "clean" and v.score == 1.0


def test_diverging_fine_tuning_is_invalid():
    v = _run(FinePruning("canonical", **FAST, finetune_lr=1e38), CornerBackdoor(channel=True))
    assert v.status == "invalid" and v.reason_code == "diverged" and "non-finite" in v.reason


def test_model_without_float_parameters_is_pruned_but_not_fine_tuned():
    v = _run(FinePruning("canonical", **FAST), None, subj=subject(Constant(), 4))
    assert v.evidence["fine_tuned"] is False and "no float model" in v.evidence["fine_tune_note"]
    assert v.evidence["after_fine_tuning"] is None
    # it predicts the target for everything: probe ASR 1 = its natural rate, nothing pruned changes that
    assert v.status == "clean" and v.score == 0.0


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
        assert v.status == "invalid" and "non-finite" in v.reason and v.reason_code == "diverged"
    # pixel features: every pixel's mean over the holdout is at least the noise mean (29.5 / 255
    # = 0.12), far above the 0.01 dormant threshold, so no channel is dormant
    v = _run(FinePruning("paper"), PixelFeatures(192, 4), inputs)
    assert v.status == "clean" and v.evidence["dormant"] == 0 and v.score == 0.0


def test_params_budgets_and_needs():
    d = FinePruning("canonical")
    assert d.params["max_acc_drop"] == 0.04 and d.params["removed_threshold"] == 0.5 and d.params["max_ca_drop"] == 0.05
    assert set(FinePruning("canonical", tier="smoke").params) == set(FinePruning.defaults["canonical"])
    assert FinePruning("canonical", finetune=False).params["finetune"] is False
    assert d.requires == frozenset({"clean_holdout", "triggered_probe"})
    assert FinePruning("paper").requires == frozenset({"clean_holdout"})
    with pytest.raises(ConfigError):
        FinePruning("canonical", dormant_threshold=0.1)
    x, y = quadrant_images(1)
    v = _run(FinePruning("canonical"), CornerBackdoor(), DefenseInputs(clean_holdout=(x, y), triggered_probe=(x, 0)))
    assert v.status == "invalid" and v.reason_code == "not-applicable"
