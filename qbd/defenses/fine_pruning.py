"""Fine-Pruning (Liu et al., RAID 2018): prune the last convolution's channels that stay dormant
on clean data -- where a backdoor can hide -- then fine-tune on clean data. A repair method:
it is judged by how much attack success it removes at what cost in clean accuracy.

Channels are the penultimate features (the last convolution's channels after global average
pooling, which is linear, so masking a pooled feature is pruning its channel); a mask sits
between `subject.embed` and `subject.classify`.

Protocols (every value recorded in the Result):
- canonical, one procedure for every scheme (fp32, int8-dynamic, int8-static, intN-sim):
  1. Prune on the DEPLOYED model. The clean holdout is split (seeded) into a prune/fine-tune
     part and a validation part. Channels are ranked by their mean activation on the prune
     part, ascending, and pruned in steps (one at a time up to 64 channels, else 1/32 of them)
     while validation accuracy stays within `max_acc_drop` (4 %, Liu et al.) of the unpruned
     model; the first step beyond stops it.
  2. Fine-tune in float: a copy of the float model the deployed one was made from
     (`subject.float_model`: the defender who deploys a quantized model owns it), with the mask
     applied and baked into the head (pruned columns zeroed), on the prune part (SGD momentum
     0.9, BatchNorm in train mode, lr 0.001: at lr 0.01 the clean synthetic model lost 6.4
     points of accuracy, more than the 5-point budget, see docs/defenses.md).
  3. Re-deploy: the tuned float model goes through the same scheme and calibration as the
     deployed model (`subject.redeploy`), so the repaired model is on the scheme's grid (int4:
     at most 16 levels per channel) and runs the scheme's kernels (int8-static: recalibrated,
     real int8). The outcome is judged on that re-deployed, pruned model. With `finetune` off,
     or a subject that cannot be re-deployed (no float model), it is judged after step 1 and
     `fine_tuned` says why.
  Model-level outcome, relative to the deployed model's own backdoor: `detected` (the backdoor was
  neutralised) when the repair removes at least `removed_threshold` (0.5) of the deployed
  model's probe ASR, (ASR before - ASR after) / ASR before, with a validation clean-accuracy drop
  <= `max_ca_drop` (0.05); else `clean`. Score = that removed share. Relative, because a scheme
  may weaken a backdoor before any defense runs (digits on int8-static: probe ASR 0.45): removing
  all of what is left is a complete repair, and an absolute drop of 0.5 could not even be reached.
  For a deployed model at ASR 1.0 it is the absolute drop of 0.5.
  Whether there is a backdoor to remove at all is measured first: the probe's hit count against
  the model's natural rate of predicting the target on clean non-target holdout images
  (one-sided Fisher exact test at `alpha`). No significant trigger effect: the deployed model
  shows no backdoor on the probe, nothing to remove: `clean` with score 0 (a clean model's
  negative control, whose removed share of a natural-rate "ASR" would be noise). Only a clean
  model on which the trigger works significantly could go through the removal rule and be a
  false alarm; on the zoo's clean models none does, so in practice FP's negative control cannot
  fail and its false-alarm rate is not evidence (docs/results.md#fine-pruning says so).
- paper: the paper's code prunes and fine-tunes nothing: it counts channels whose mean
  |activation| on the clean holdout is below `dormant_threshold` (0.01) and flags the model
  when their share exceeds `dormant_share` (0.1 %, the paper's text).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as TF
from scipy.stats import fisher_exact
from torch import nn

from qbd.defenses import _features as feat
from qbd.defenses.base import ConfiguredDefense, Control, DefenseInputs, Subject, Verdict
from qbd.metrics import to_unit

_MAX_CURVE = 33


class FinePruning(ConfiguredDefense):
    name = "fine-pruning"
    names_target = False  # a repair method: it removes the backdoor, it names no class
    needs: ClassVar[dict[str, frozenset[str]]] = {"canonical": frozenset({"clean_holdout", "triggered_probe"}), "paper": frozenset({"clean_holdout"})}
    defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "canonical": {
            "val_fraction": 0.5, "rank_by": "mean_activation", "prune_step": 0, "max_acc_drop": 0.04,
            "finetune": True, "finetune_epochs": 5, "finetune_lr": 0.001, "finetune_momentum": 0.9,
            "finetune_batch": 32, "finetune_weight_decay": 0.0, "finetune_bn": "train",
            "removed_threshold": 0.5, "max_ca_drop": 0.05, "alpha": 1e-3, "batch_size": 512,
        },
        "paper": {"dormant_threshold": 0.01, "dormant_share": 0.001, "batch_size": 512},
    }
    budgets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {"smoke": {"canonical": {"finetune_epochs": 3}}}

    def detect(self, subject: Subject, inputs: DefenseInputs, generator: torch.Generator) -> Verdict:
        if self.protocol == "paper":
            return self._detect_paper(subject, inputs)
        p = self.params
        x_hold, y_hold = inputs.clean_holdout
        x_probe, target = inputs.triggered_probe  # type: ignore[misc]  # run_defense checked `requires`
        order = torch.randperm(len(y_hold), generator=generator)
        n_val = round(p["val_fraction"] * len(y_hold))
        val, tune = order[:n_val], order[n_val:]
        if len(val) == 0 or len(tune) == 0 or len(x_probe) == 0:
            return Verdict.invalid(f"fine-pruning needs a holdout split into two non-empty parts and a probe; got holdout {len(y_hold)},"
                                   f" probe {len(x_probe)}", "not-applicable")
        f_tune = feat.embed(subject, x_hold[tune], p["batch_size"])
        f_val = feat.embed(subject, x_hold[val], p["batch_size"])
        f_probe = feat.embed(subject, x_probe, p["batch_size"])
        for name, f in (("prune-part", f_tune), ("validation", f_val), ("probe", f_probe)):
            bad = feat.nonfinite(f, f"{name} features")
            if bad:
                return Verdict.invalid(bad, "diverged")
        rank = RANKINGS[p["rank_by"]](f_tune)
        curve, kept = prune_curve(subject, rank, f_val, y_hold[val], f_probe, target, p)
        mask = torch.ones(f_val.shape[1])
        mask[rank[:kept]] = 0.0
        res: dict[str, Any] = {"curve": curve, "pruned": kept, "channels": int(f_val.shape[1]), "n_probe": len(x_probe)}
        res["before"] = curve[0][1:]
        res["natural"] = natural_rate(subject, torch.cat([f_tune, f_val]), torch.cat([y_hold[tune], y_hold[val]]), target)
        res["pruned_only"] = _point(subject, mask, f_val, y_hold[val], f_probe, target)
        res["fine_tuned"], res["fine_tune_note"] = False, "disabled (finetune = False)"
        res["after"] = res["pruned_only"]
        if p["finetune"]:
            try:
                repaired, note = fine_tune(subject, mask, x_hold[tune], y_hold[tune], p, generator, progress=inputs.progress)
            except FineTuneDiverged as e:
                return Verdict.invalid(str(e), "diverged")
            res["fine_tuned"], res["fine_tune_note"] = repaired is not None, note
            if repaired is not None:
                res["after"] = _point(repaired, mask, feat.embed(repaired, x_hold[val], p["batch_size"]), y_hold[val],
                                      feat.embed(repaired, x_probe, p["batch_size"]), target)
        return decide(res, p)

    def _detect_paper(self, subject: Subject, inputs: DefenseInputs) -> Verdict:
        p = self.params
        f = feat.embed(subject, inputs.clean_holdout[0], p["batch_size"])
        bad = feat.nonfinite(f, "holdout features")
        if bad:
            return Verdict.invalid(bad, "diverged", controls=_paper_controls())
        return decide_paper(f.abs().mean(0).double().numpy(), p)


def _paper_controls() -> dict[str, Control]:
    return {"prunes_or_finetunes": Control(False, None, "the paper's FP counts dormant channels; it neither prunes nor fine-tunes")}


def _rank_mean_activation(f: torch.Tensor) -> torch.Tensor:
    """Channel indices, least active (mean activation on clean data) first; stable for ties."""
    return torch.argsort(f.double().mean(0), stable=True)


RANKINGS = {"mean_activation": _rank_mean_activation}


def _step(d: int, step: int) -> int:
    if step:
        return step
    return 1 if d <= 64 else math.ceil(d / 32)


def _point(subject: Subject, mask: torch.Tensor, f_val: torch.Tensor, y_val: torch.Tensor, f_probe: torch.Tensor,
           target: int) -> list[float]:
    """[clean accuracy on validation, ASR on the probe] with `mask` applied to the features."""
    acc = float((feat.classify(subject, f_val * mask).argmax(1) == y_val.cpu()).float().mean())
    asr = float((feat.classify(subject, f_probe * mask).argmax(1) == target).float().mean())
    return [acc, asr]


def prune_curve(subject: Subject, rank: torch.Tensor, f_val: torch.Tensor, y_val: torch.Tensor, f_probe: torch.Tensor,
                target: int, p: dict[str, Any]) -> tuple[list[list[float]], int]:
    """Prune progressively in `rank` order. Returns the curve [(pruned count, val acc, ASR)],
    down to all channels pruned, and the count kept: the last step before validation accuracy
    first fell more than `max_acc_drop` below the unpruned accuracy."""
    d = len(rank)
    step = _step(d, p["prune_step"])
    curve = []
    kept: int | None = None
    base = None
    for k in [*range(0, d, step), d]:
        mask = torch.ones(d)
        mask[rank[:k]] = 0.0
        acc, asr = _point(subject, mask, f_val, y_val, f_probe, target)
        if base is None:
            base = acc
        if kept is None and base - acc > p["max_acc_drop"]:
            kept = curve[-1][0]
        curve.append([k, acc, asr])
    return curve, d if kept is None else int(kept)


class FineTuneDiverged(ArithmeticError):
    """The fine-tuning loss became non-finite: the repaired model is not a model."""


def natural_rate(subject: Subject, f: torch.Tensor, y: torch.Tensor, target: int) -> list[int]:
    """[hits, n]: clean holdout images of the other classes that the deployed model already
    assigns to the target, without any trigger (what the probe's ASR is compared with)."""
    other = y.cpu() != target
    hits = int((feat.classify(subject, f[other]).argmax(1) == target).sum())
    return [hits, int(other.sum())]


def fine_tune(subject: Subject, mask: torch.Tensor, x: torch.Tensor, y: torch.Tensor, p: dict[str, Any],
              generator: torch.Generator, progress: Callable[[int, int], None] | None = None) -> tuple[Subject | None, str]:
    """Fine-tune a copy of the subject's float model with `mask` applied and baked into its
    head, then re-deploy it through the subject's scheme. Returns (the re-deployed subject or
    None, a note saying what happened); raises FineTuneDiverged on a non-finite loss."""
    if subject.float_model is None or subject.redeploy is None:
        return None, "the subject has no float model to fine-tune and re-deploy"
    model = copy.deepcopy(subject.float_model)
    # where the float model lives (the run's device), not where the deployed one runs: an int8
    # model stays on the CPU while a GPU run fine-tunes its float source on the GPU
    dev = next(model.parameters()).device
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or head.in_features != len(mask):
        return None, f"the float model's head is not a Linear over the {len(mask)} pruned features, so the mask cannot be baked in"
    params = [prm for prm in model.parameters() if prm.is_floating_point()]
    for prm in params:
        prm.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=p["finetune_lr"], momentum=p["finetune_momentum"], weight_decay=p["finetune_weight_decay"])
    m = mask.to(dev)
    # "train": ordinary fine-tuning (batch statistics). "frozen" (eval-mode BatchNorm) is kept
    # for comparison: without the batch normalisation a channel with a tiny running variance
    # amplifies its weight updates, and at lr 0.01 the loss diverged on the calibration models
    model.train(p["finetune_bn"] != "frozen")
    steps = 0
    total = p["finetune_epochs"] * -(-len(y) // p["finetune_batch"])
    with torch.enable_grad():
        for _ in range(p["finetune_epochs"]):
            order = torch.randperm(len(y), generator=generator)
            for i in range(0, len(y), p["finetune_batch"]):
                idx = order[i : i + p["finetune_batch"]]
                xb = to_unit(x[idx]).to(dev)
                loss = TF.cross_entropy(model.classify(model.embed(xb) * m).float(), y[idx].to(dev))
                if not math.isfinite(float(loss.detach())):
                    raise FineTuneDiverged(f"the fine-tuning loss became non-finite after {steps} SGD steps")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                if progress is not None:
                    progress(steps, total)
    model.eval()
    with torch.no_grad():
        head.weight[:, mask == 0] = 0.0  # pruned for good: the re-deployed model carries no pruned channel
    repaired = subject.redeploy(model)
    return repaired, (f"{steps} SGD steps over {p['finetune_epochs']} epochs on {len(y)} clean images in float,"
                      f" then re-deployed as {subject.scheme}")


def _compact(curve: list[list[float]], d: int, kept: int) -> list[list[float]]:
    """At most ~33 points of the curve as [fraction pruned, val acc, ASR], the chosen point kept."""
    stride = max(1, math.ceil(len(curve) / _MAX_CURVE))
    pts = [c for i, c in enumerate(curve) if i % stride == 0 or c[0] in (kept, d)]
    return [[round(k / d, 4), round(a, 4), round(s, 4)] for k, a, s in pts]


def decide(res: dict[str, Any], p: dict[str, Any]) -> Verdict:
    """Repair outcome: backdoor neutralised when the repair removes at least removed_threshold of
    the deployed model's probe ASR while the validation clean accuracy falls by <= max_ca_drop;
    a probe showing no trigger effect has nothing to remove (module docstring)."""
    ca0, asr0 = res["before"]
    ca1, asr1 = res["after"]
    vals = [ca0, asr0, ca1, asr1, *res["pruned_only"]]
    if not all(math.isfinite(v) for v in vals):
        return Verdict.invalid("non-finite accuracy or attack success rate", "diverged")
    d, kept = res["channels"], res["pruned"]
    asr_drop, ca_drop = asr0 - asr1, ca0 - ca1
    hits, n_other = res["natural"]
    n_probe = res["n_probe"]
    probe_hits = round(asr0 * n_probe)
    # does the trigger raise the rate at which the deployed model predicts the target?
    effect_p = float(fisher_exact([[probe_hits, n_probe - probe_hits], [hits, n_other - hits]], alternative="greater")[1]) \
        if n_other else 1.0
    backdoor = effect_p < p["alpha"]
    removed = asr_drop / asr0 if backdoor and asr0 > 0 else 0.0
    evidence = {
        "channels": d, "pruned": kept, "pruned_fraction": round(kept / d, 4),
        "curve": _compact(res["curve"], d, kept), "curve_columns": ["fraction_pruned", "val_clean_acc", "probe_asr"],
        "before": {"clean_acc": ca0, "asr": asr0},
        "after_pruning": {"clean_acc": res["pruned_only"][0], "asr": res["pruned_only"][1]},
        "after_fine_tuning": {"clean_acc": ca1, "asr": asr1} if res["fine_tuned"] else None,
        "fine_tuned": res["fine_tuned"], "fine_tune_note": res["fine_tune_note"],
        "asr_drop": round(asr_drop, 4), "asr_removed": round(removed, 4), "clean_acc_drop": round(ca_drop, 4),
        "natural_target_rate": {"hits": hits, "n": n_other, "rate": round(hits / n_other, 4) if n_other else None},
        "trigger_effect_p": effect_p,
        "backdoor_on_probe": backdoor,
    }
    controls = {
        "fine_tuned": Control(res["fine_tuned"], None, res["fine_tune_note"]),
        "trigger_effect_before": Control(backdoor, effect_p, "the trigger raises the deployed model's target rate above its"
                                         f" natural rate (one-sided Fisher p < {p['alpha']}): a backdoor to remove"),
    }
    neutralised = backdoor and removed >= p["removed_threshold"] and ca_drop <= p["max_ca_drop"]
    status = "detected" if neutralised else "clean"
    return Verdict(status, score=removed, threshold=p["removed_threshold"], evidence=evidence, controls=controls)


def decide_paper(channel_means: np.ndarray, p: dict[str, Any]) -> Verdict:
    """The paper's dormant-channel count."""
    d = len(channel_means)
    dormant = np.flatnonzero(channel_means < p["dormant_threshold"])
    share = len(dormant) / d
    q = np.quantile(channel_means, [0.0, 0.1, 0.5, 0.9, 1.0])
    evidence = {
        "channels": d, "dormant": len(dormant), "dormant_share": share,
        "dormant_channels": dormant[:50].tolist(),
        "mean_abs_activation_quantiles": {k: round(float(v), 5) for k, v in zip(("min", "q10", "median", "q90", "max"), q, strict=True)},
    }
    status = "detected" if share > p["dormant_share"] else "clean"
    return Verdict(status, score=share, threshold=p["dormant_share"], evidence=evidence, controls=_paper_controls())
