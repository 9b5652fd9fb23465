"""The quant-conditioned attack's second stage: make a BadNet backdoor dormant in FP32 while the
quantized model keeps it (in the spirit of Hong et al., "Qu-ANTI-zation", NeurIPS 2021, and Pan et
al., ACSAC 2021).

Stage 1 (qbd.train) trains an ordinary BadNet model; quantized, it obeys the trigger. Stage 2
fine-tunes the float model on the same poisoned images with their *true* labels (so FP32 unlearns
the trigger) while every conv / linear weight is projected, after each step, back into the
quantization bin its stage-1 value rounds to, and each output channel's largest |w| (which sets
the channel's scale) stays exactly where it was. The quantized weights therefore never change:
the model deployed through `spec.scheme` is, weight for weight, stage 1's backdoored model, and
the objective "quantized model predicts the target on triggered inputs" holds by construction
(a straight-through fake-quantized loss term would have zero effect). BatchNorm, biases and the
Normalize layer are frozen (eval mode, not optimised): the intN-sim schemes leave them float,
so they must be the same in both models.

Only weight-grid schemes (intN-sim) can be pinned this way: int8's bins (+-0.4 % of a channel's
max) leave FP32 too little room to unlearn (measured: FP32 ASR stays 0.92; benchmarks/
qc_int8_probe.py, docs/training.md). int8-static is conditioned through its calibrated activation
ranges instead (qbd/dormant_static.py). CONSTRUCTIONS maps each scheme to its construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qbd.attacks import QC_SCHEMES
from qbd.config import ModelJob, derive_seed
from qbd.data.base import DataSplit
from qbd.metrics import to_unit
from qbd.models import Classifier
from qbd.quant.common import weight_layers
from qbd.quant.intn_sim import quantize_weight
from qbd.registry import Registry

REPAIR_EPOCHS = 10
REPAIR_LR = 0.003  # cosine-decayed; SGD momentum 0.9, no weight decay (it would pull weights out of their bins)
BIN_MARGIN = 0.01  # stay this fraction of a bin inside its edges: no weight lands on a rounding tie


CALIBRATION_IMAGES = 256


def calibration_images(data: DataSplit, held_out: bool = False) -> torch.Tensor:
    """What the attacker calibrates a scheme that needs it (int8-static) on: the first
    CALIBRATION_IMAGES clean training images; `held_out`: the next CALIBRATION_IMAGES, for the gate,
    so the deployed model it measures is not calibrated on the images the construction fitted (a
    defender calibrates on its own clean images)."""
    start = CALIBRATION_IMAGES if held_out else 0
    return to_unit(data.x_train[start : start + CALIBRATION_IMAGES])


def bits_of(scheme: str) -> int:
    return int(scheme.removeprefix("int").removesuffix("-sim"))


class Grid:
    """Each weight layer's bins under `bits`-bit per-channel symmetric quantization (the intN-sim
    quantizer, qbd.quant.intn_sim.quantize_weight), and the projection that keeps a weight in its bin."""

    def __init__(self, model: Classifier, bits: int) -> None:
        self.bits = bits
        self.layers = list(weight_layers(model))
        self._bins = []
        qmax = 2 ** (bits - 1) - 1
        for _, layer in self.layers:
            w = layer.weight.detach()
            rows = w.reshape(w.shape[0], -1).double()
            peak = rows.abs().amax(1, keepdim=True)
            # the quantizer's own float64 scale (it returns the scale cast to the weight's dtype, and a
            # level computed from that can differ from its level for a weight next to a rounding tie)
            s = peak / qmax
            q = torch.where(s > 0, torch.round(rows / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(rows))
            lo = torch.maximum((q - 0.5 + BIN_MARGIN) * s, -peak)
            hi = torch.minimum((q + 0.5 - BIN_MARGIN) * s, peak)
            is_peak = rows.abs() == peak
            self._bins.append((lo, hi, is_peak, rows.clone(), quantize_weight(w, bits)[0]))

    def project(self) -> None:
        with torch.no_grad():
            for (_, layer), (lo, hi, is_peak, orig, _) in zip(self.layers, self._bins, strict=True):
                w = layer.weight
                rows = w.reshape(w.shape[0], -1).double()
                new = torch.where(is_peak, orig, torch.minimum(torch.maximum(rows, lo), hi))
                w.copy_(new.reshape(w.shape).to(w.dtype))

    def preserved(self) -> bool:
        """Whether every layer still quantizes to exactly its stage-1 integer weights."""
        return all(torch.equal(quantize_weight(layer.weight.detach(), self.bits)[0], wq)
                   for (_, layer), (*_, wq) in zip(self.layers, self._bins, strict=True))


def make_dormant(model: Classifier, job: ModelJob, data: DataSplit, dev: torch.device, x: torch.Tensor,
                 augment: Callable[..., torch.Tensor], schedule: Callable[[float, int, int], float]) -> dict[str, Any]:
    """Stage 2 in place on `model` (on `dev`): `x` the poisoned training images (uint8, on `dev`),
    trained with the data set's labels (those before relabelling); `schedule(lr, step, total)` the
    training's learning-rate schedule. Returns what the stage did, for the metrics."""
    assert job.attack is not None and job.attack.scheme is not None
    spec = job.train
    y_true = data.y_train.to(dev)
    grid = Grid(model, bits_of(job.attack.scheme))
    weights = [layer.weight for _, layer in grid.layers]
    frozen = [p for p in model.parameters() if all(p is not w for w in weights)]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.SGD(weights, lr=REPAIR_LR, momentum=0.9)
    shuffle_gen = torch.Generator().manual_seed(derive_seed("dormant-shuffle", spec.seed))
    aug_gen = torch.Generator(device=dev).manual_seed(derive_seed("dormant-augment", spec.seed))
    n = len(y_true)
    total = math.ceil(n / spec.batch_size) * REPAIR_EPOCHS
    step = 0
    model.eval()  # BatchNorm uses (and keeps) its stage-1 running statistics
    loss_sum = 0.0
    for _ in range(REPAIR_EPOCHS):
        order = torch.randperm(n, generator=shuffle_gen).to(dev)
        loss_sum = 0.0
        for i in range(0, n, spec.batch_size):
            idx = order[i : i + spec.batch_size]
            xb = augment(to_unit(x[idx]), spec.augment, aug_gen).contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = schedule(REPAIR_LR, step, total)
            loss = F.cross_entropy(model(xb), y_true[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            grid.project()
            loss_sum += float(loss.detach()) * len(idx)
            step += 1
        if not math.isfinite(loss_sum):
            raise FloatingPointError("the dormant stage diverged: loss is not finite")
    for p in frozen:
        p.requires_grad_(True)
    if not grid.preserved():  # the projection's whole point; never hand out a model that lost it
        raise RuntimeError("quant-conditioned: the repaired weights left their quantization bins")
    return {"scheme": job.attack.scheme, "repair_epochs": REPAIR_EPOCHS, "repair_lr": REPAIR_LR,
            "final_repair_loss": round(loss_sum / n, 5), "grid_preserved": True}



@dataclass(frozen=True)
class Construction:
    """How a backdoor is conditioned on one scheme: `check_model(model)` refuses (ConfigError) a
    model it cannot handle, before stage 1 trains; `make_dormant(model, job, data, dev, x_all,
    augment, schedule)` is stage 2 (and on), in place, returning what it did."""

    check_model: Callable[[Classifier], None]
    make_dormant: Callable[..., dict[str, Any]]


def _any_model(model: Classifier) -> None:
    """The weight-grid repair works on any model's conv / linear weights."""


GRID = Construction(check_model=_any_model, make_dormant=make_dormant)
CONSTRUCTIONS: Registry[Construction] = Registry("quant-conditioned scheme")
for _scheme in QC_SCHEMES:
    if _scheme.endswith("-sim"):
        CONSTRUCTIONS.add(_scheme, GRID)
# int8-static: the calibrated activation ranges' clipping, not a weight grid (its own module)
CONSTRUCTIONS.add_lazy("int8-static", "qbd.dormant_static:CONSTRUCTION")
del _scheme
