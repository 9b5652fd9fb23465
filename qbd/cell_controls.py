"""The controls a cell's Result carries beside the defense's verdict, scored by the bench on what
the defense never sees: whether the surrogate a gradient defense inspected agrees with the deployed
runtime, and how well a data-inspecting defense's per-sample suspects single out the known poison."""

from __future__ import annotations

from typing import Any

import torch

from qbd.defenses.base import Control, Verdict

# a surrogate whose top-1 disagrees with the runtime on more than this share of the images is not
# inspecting the deployed model
MIN_TOP1_AGREEMENT = 0.98


def agreement_control(measured: list[dict[str, Any]], tolerance: float | None) -> Control:
    """Where a gradient defense ran through a surrogate of a runtime (the schemes whose audit
    measures the agreement: int8-static and the ONNX Runtime ones), every Result says how close the two are on the calibration
    images, held-out clean images and triggered images (static ranges are fitted on the first, so
    the other two are the test): top-1 agreement and max |delta logit| / max |runtime logit|
    against the scheme's tolerance. Passed only if every set is within both."""
    def ok(a: dict[str, Any]) -> bool:
        top1, rel = a.get("top1_agreement"), a.get("max_rel_logit_delta")
        return top1 is not None and top1 >= MIN_TOP1_AGREEMENT and (tolerance is None or (rel is not None and rel <= tolerance))

    parts = [f"{a.get('data')} ({a.get('n_images')}): top-1 {_fmt(a.get('top1_agreement'))}, rel {_fmt4(a.get('max_rel_logit_delta'))}"
             for a in measured]
    top1s = [a["top1_agreement"] for a in measured if a.get("top1_agreement") is not None]
    return Control(all(ok(a) for a in measured), min(top1s) if top1s else None,
                   f"surrogate vs runtime: {'; '.join(parts)} (max |delta logit| / max |runtime logit| <= {tolerance},"
                   f" top-1 >= {MIN_TOP1_AGREEMENT})")


def surrogate_disagrees(verdict: Verdict, control: Control) -> Verdict:
    """The verdict of a gradient defense whose surrogate does not agree with the deployed runtime
    is about another model: it becomes invalid (surrogate-disagrees, never an expected outcome),
    the surrogate's own verdict kept as evidence."""
    said = {"status": verdict.status, "target_class": verdict.target_class, "score": verdict.score,
            "threshold": verdict.threshold, "reason_code": verdict.reason_code}
    return Verdict.invalid(f"the surrogate the defense inspected does not agree with the deployed runtime: {control.detail}",
                           "surrogate-disagrees", evidence={**verdict.evidence, "surrogate_verdict": said},
                           controls=verdict.controls, suspects=verdict.suspects)


def _fmt4(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def poison_controls(verdict: Verdict, is_poisoned: torch.Tensor, labels: torch.Tensor, target: int) -> dict[str, Control]:
    """Score a data-inspecting defense's per-sample suspects against the known poison (the
    defense never sees it): `poison_removal`, the suspects of the classes it flagged (what it
    would filter out); `poison_target_class`, its suspects in the planted target class, flagged
    or not (did it single out the poison at all?). Both are precision / recall of the suspects as
    labelled; for a two-sided split (AC) the detail adds the agreement up to swapping the sides.
    Malformed suspects (a third-party defense) give a failed control saying so, never a crash."""
    import numpy as np

    poisoned = is_poisoned.cpu().numpy().astype(bool)
    n = len(poisoned)
    try:
        by_class = {int(c): np.asarray(i, dtype=np.int64).reshape(-1) for c, i in verdict.suspects["by_class"].items()}  # type: ignore[index]
        flagged = [int(c) for c in (verdict.evidence.get("flagged") or [])]
        if any(len(i) and (i.min() < 0 or i.max() >= n) for i in by_class.values()):
            raise ValueError(f"suspect indices outside 0..{n - 1}")
    except (TypeError, ValueError, KeyError) as e:
        bad = Control(False, None, f"the defense's per-sample suspects are malformed: {e}")
        return {"poison_removal": bad, "poison_target_class": bad}

    def scored(mask: np.ndarray, within: np.ndarray) -> tuple[float | None, float | None, int, int]:
        tp = int((mask & poisoned & within).sum())
        k, m = int((mask & within).sum()), int((poisoned & within).sum())
        return (tp / k if k else None), (tp / m if m else None), k, m

    everywhere = np.ones(n, dtype=bool)
    removed = np.zeros(n, dtype=bool)
    for c in flagged:
        removed[by_class.get(c, np.zeros(0, dtype=np.int64))] = True
    precision, recall, k, m = scored(removed, everywhere)
    out = {"poison_removal": Control(bool(recall is not None and recall >= 0.5 and (precision or 0.0) >= 0.5), recall,
                                     f"suspects of the flagged classes {sorted(flagged)}: {k} samples, precision"
                                     f" {_fmt(precision)}, recall {_fmt(recall)} against the {m} poisoned")}
    in_target = labels.cpu().numpy() == target
    if in_target.any():
        suspect = np.zeros(n, dtype=bool)
        suspect[by_class.get(target, np.zeros(0, dtype=np.int64))] = True
        precision, recall, k, m = scored(suspect, in_target)
        same = float((suspect[in_target] == poisoned[in_target]).mean())
        out["poison_target_class"] = Control(
            bool(recall is not None and recall >= 0.5 and (precision or 0.0) >= 0.5), recall,
            f"target class {target}: {k} suspects of its {int(in_target.sum())} samples, precision {_fmt(precision)}, recall"
            f" {_fmt(recall)} against its {m} poisoned; suspects/rest agree with poisoned/clean on {same:.3f} of the class"
            f" ({max(same, 1.0 - same):.3f} up to swapping the sides)")
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


