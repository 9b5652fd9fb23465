"""CornerPatchProbe: an example qbd defense (see README.md)."""

from __future__ import annotations

import torch

from qbd.defenses.base import Control, DefenseInputs, Subject, Verdict
from qbd.metrics import to_unit


class CornerPatchProbe:
    """Flag the model when a solid corner patch sends >= `capture` of clean images to one class."""

    name = "corner-patch-probe"

    def __init__(self, protocol: str = "canonical", tier: str = "smoke", capture: float = 0.8, sizes: tuple[int, ...] = (3, 4, 5)) -> None:
        self.protocol = protocol
        self.requires = frozenset({"clean_holdout"})  # the same diet under both protocols
        # the smoke tier's 2-core budget probes fewer images than the paper tier's GPU runs
        self.params = {"capture": capture, "sizes": list(sizes), "colours": ["white", "black"],
                       "images": 256 if tier == "smoke" else 1024}

    def detect(self, subject: Subject, inputs: DefenseInputs, generator: torch.Generator) -> Verdict:
        # inputs hold uint8 pixels; the model takes float images in [0, 1] on subject.device
        x = to_unit(inputs.clean_holdout[0][: self.params["images"]]).to(subject.device)
        _, _, h, w = x.shape
        best = (0.0, None, "")
        with torch.no_grad():
            for s in self.params["sizes"]:
                for value, colour in ((1.0, "white"), (0.0, "black")):
                    for r, c, corner in ((0, 0, "top-left"), (0, w - s, "top-right"), (h - s, 0, "bottom-left"), (h - s, w - s, "bottom-right")):
                        xp = x.clone()
                        xp[:, :, r : r + s, c : c + s] = value
                        pred = subject(xp).argmax(1)
                        counts = torch.bincount(pred, minlength=subject.num_classes).float() / len(pred)
                        share, cls = float(counts.max()), int(counts.argmax())
                        if share > best[0]:
                            best = (share, cls, f"{colour} {s}x{s} {corner}")
        share, cls, patch = best
        evidence = {"best_patch": patch, "captured_share": round(share, 4), "captured_class": cls}
        controls = {"probed_images": Control(len(x) > 0, float(len(x)), "clean holdout images stamped")}
        if share >= self.params["capture"]:
            return Verdict("detected", score=share, threshold=self.params["capture"], target_class=cls, evidence=evidence, controls=controls)
        return Verdict("clean", score=share, threshold=self.params["capture"], evidence=evidence, controls=controls)
