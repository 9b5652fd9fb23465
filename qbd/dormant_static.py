"""The quant-conditioned attack's second stage for int8-static: a backdoor that the deployed
model's calibrated activation ranges wake.

int8-static (qbd.quant.int8_static) calibrates each activation tensor's range on clean images and
clips whatever exceeds it. On tiny-cnn that clipping, not the int8 weight grid, is where the
deployed model and its float original differ most: BadNet's own trigger drives the first convs to
2.5x their clean range, and the deployed digits model obeys it on 40 % of images against 99.7 % in
FP32. (Keeping each weight in its int8 bin, qbd.dormant's construction for intN-sim, leaves FP32
ASR at 0.92: docs/training.md.) This construction turns the clipping round:

1. survive (SURVIVE_STEPS batches): fine-tune through FakeInt8Static, a differentiable twin of the
   int8-static deployment, so that the deployed model obeys the trigger despite the clipping;
2. loud (LOUD_STEPS, same optimizer and schedule; only the last conv block and the head train,
   so the earlier blocks keep the clean features; FP32 now also trained towards the true labels):
   one channel V of the last conv block, the one quietest on clean images, learns to answer the
   trigger at >= LOUD x the largest clean value of the other channels, and to stay below QUIET x it
   on clean images. FP32 sees V at full size; the deployed model sees it clipped to the calibrated
   range of its tensor, which clean images set;
3. head (HEAD_STEPS, features fixed): the linear head is fitted, full batch (a convex problem), so
   that the FP32 features of triggered images give their true labels and the deployed model's
   features give the target, clean images right in both. "Deployed" is the real int8-static scheme,
   calibrated on the attacker's clean training images (calibration_images); a defender calibrates
   on other clean images of the same distribution, on which the matrix measures the gate again.

The twin covers plain feature stacks (Conv2d, BatchNorm2d, ReLU, pools, Flatten: tiny-cnn); any
other model is a ConfigError before stage 1 trains (check_model).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qbd.config import QC_ENGINES, ConfigError, ModelJob, derive_seed
from qbd.data.base import DataSplit
from qbd.dormant import CALIBRATION_IMAGES, Construction, calibration_images
from qbd.metrics import to_unit
from qbd.models import Classifier
from qbd.poisoning import apply_trigger

SURVIVE_STEPS = 36  # batches (three epochs of digits)
LOUD_STEPS = 600
RECALIBRATE_EVERY = 12
LR = 3e-4  # Adam, cosine-decayed over both phases; BatchNorm statistics frozen (eval mode)
TWIN_WEIGHT = 2.0  # the deployed twin's two losses, against FP32's
LOUD = 4.0  # V on a triggered image: its peak >= LOUD x the other channels' clean peak
QUIET = 0.3  # V on a clean image: its peak <= QUIET x that
QUIET_WEIGHT = 10.0
HEAD_STEPS = 6000
HEAD_LR = 1e-2
HEAD_TRIGGER_WEIGHT = 2.0  # the triggered sets' losses, against the clean sets'
# keeps the head's weights small: a large weight turns one int8 level that the deployed kernels
# round differently from the float twin into a large logit difference (surrogate agreement)
HEAD_L2 = 1e-3
EMBED_BATCH = 512
ENGINE = QC_ENGINES["int8-static"]  # the int8-static engine it is conditioned on (the scheme's default)
_PLAIN = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


def check_model(model: Classifier) -> None:
    """The twin covers plain feature stacks only: every conv followed by its BatchNorm."""
    mods = list(model.features) if isinstance(model.features, nn.Sequential) else []
    plain = bool(mods) and all(isinstance(m, _PLAIN) for m in mods)
    paired = all(isinstance(m, nn.BatchNorm2d) == isinstance(prev, nn.Conv2d) for prev, m in itertools.pairwise(mods))
    simple = all(m.groups == 1 and m.dilation == (1, 1) for m in mods if isinstance(m, nn.Conv2d))  # what the twin's conv2d does
    ends = bool(mods) and isinstance(mods[0], nn.Conv2d) and isinstance(mods[-1], nn.Flatten)  # the head reads flat features
    if not (plain and paired and simple and ends and any(isinstance(m, nn.ReLU) for m in mods)):
        raise ConfigError("quant-conditioned with scheme int8-static supports plain conv / BatchNorm / ReLU / pool"
                          " models (tiny-cnn); use an intN-sim scheme (--qc-scheme int4-sim) for this model")


class FakeInt8Static:
    """`model` as int8-static deploys it, differentiable: BatchNorm folded into each conv,
    per-channel symmetric int8 weights (scale max|w| / 127.5, as the x86 quantizer's observer),
    uint8 per-tensor activations at ranges measured by `calibrate` (clipped outside them, where
    the straight-through gradient is zero), at the same points as the deployed graph: the
    normalised input, every ReLU's output and the head's input."""

    def __init__(self, model: Classifier) -> None:
        check_model(model)
        self.model = model
        self.ranges: list[tuple[float, float]] = []

    @staticmethod
    def _weight(w: torch.Tensor) -> torch.Tensor:
        peak = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
        s = (peak / 127.5).reshape(-1, *([1] * (w.dim() - 1)))
        return w + (torch.clamp(torch.round(w / s), -128, 127) * s - w).detach()

    def _act(self, x: torch.Tensor, k: int, observe: bool) -> torch.Tensor:
        if observe:
            self.ranges.append((min(float(x.min()), 0.0), max(float(x.max()), 0.0)))
            return x
        lo, hi = self.ranges[k]
        s = (hi - lo) / 255 if hi > lo else 1.0
        zp = round(-lo / s)
        clipped = torch.clamp(x, lo, hi)
        return clipped + ((torch.clamp(torch.round(x / s) + zp, 0, 255) - zp) * s - clipped).detach()

    def calibrate(self, images: torch.Tensor) -> None:
        """Each quantized tensor's range (min / max) on clean `images`."""
        self.ranges = []
        with torch.no_grad():
            self._forward(images, observe=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ranges:
            raise RuntimeError("FakeInt8Static: calibrate it first")
        return self._forward(x, observe=False)

    def _forward(self, x: torch.Tensor, observe: bool) -> torch.Tensor:
        mods, k = list(self.model.features), 0
        z = self._act(self.model.normalize(x), k, observe)
        i = 0
        while i < len(mods):
            m = mods[i]
            if isinstance(m, nn.Conv2d):
                bn = mods[i + 1]
                g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                b = bn.bias - bn.running_mean * g + (m.bias * g if m.bias is not None else 0)
                z = F.conv2d(z, self._weight(m.weight * g.reshape(-1, 1, 1, 1)), b, m.stride, m.padding)
                i += 2
                continue
            z = m(z)
            if isinstance(m, (nn.ReLU, nn.Flatten)):
                k += 1
                z = self._act(z, k, observe)
            i += 1
        return F.linear(z, self._weight(self.model.head.weight), self.model.head.bias)


def make_dormant(model: Classifier, job: ModelJob, data: DataSplit, dev: torch.device, x_all: torch.Tensor,
                 augment: Callable[..., torch.Tensor], schedule: Callable[[float, int, int], float]) -> dict[str, Any]:
    """Stages 2-3 in place on `model` (on `dev`, BatchNorm in eval mode), from the clean training
    images (`x_all`, the poisoned set stage 1 trained on, is not needed). Returns what they did."""
    trainable = {p: p.requires_grad for p in model.parameters()}
    try:
        return _stages(model, job, data, dev, augment, schedule)
    finally:  # whatever happened, the model's parameters are as trainable as they were
        for p, flag in trainable.items():
            p.requires_grad_(flag)


def _stages(model: Classifier, job: ModelJob, data: DataSplit, dev: torch.device, augment: Callable[..., torch.Tensor],
            schedule: Callable[[float, int, int], float]) -> dict[str, Any]:
    assert job.attack is not None
    spec, attack, t = job.train, job.attack, job.attack.target
    twin = FakeInt8Static(model)
    last = max(i for i, m in enumerate(model.features) if isinstance(m, nn.ReLU))
    upto, rest = model.features[: last + 1], model.features[last + 1 :]
    clean, labels = data.x_train.to(dev), data.y_train.to(dev)
    n = len(labels)
    shuffle_gen = torch.Generator().manual_seed(derive_seed("dormant-shuffle", spec.seed))
    aug_gen = torch.Generator(device=dev).manual_seed(derive_seed("dormant-augment", spec.seed))
    calib_gen = torch.Generator().manual_seed(derive_seed("dormant-calibrate", spec.seed))
    model.eval()
    with torch.no_grad():  # V: the last block's channel quietest on clean images
        v = int(upto(model.normalize(calibration_images(data).to(dev))).amax((0, 2, 3)).argmin())
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    total = SURVIVE_STEPS + LOUD_STEPS
    target = torch.full((spec.batch_size,), t, device=dev)
    batches: list[torch.Tensor] = []
    window = 0.0  # the loss over the last RECALIBRATE_EVERY steps
    for step in range(total):
        if step % RECALIBRATE_EVERY == 0:  # the twin's ranges follow the model, as a deployer's would
            twin.calibrate(to_unit(clean[torch.randperm(n, generator=calib_gen)[:CALIBRATION_IMAGES].to(dev)]))
            window = 0.0
        if not batches:  # steps, not epochs: a bigger data set must not mean more drift
            batches = list(torch.randperm(n, generator=shuffle_gen).to(dev).split(spec.batch_size))[::-1]
        idx = batches.pop()
        x, y = clean[idx], labels[idx]
        keep = y != t
        xc = augment(to_unit(x), spec.augment, aug_gen)
        ac = upto(model.normalize(xc))
        loss = F.cross_entropy(model.head(rest(ac)), y) + TWIN_WEIGHT * F.cross_entropy(twin(xc), y)
        if step == SURVIVE_STEPS:  # the earlier blocks keep the clean features (and stage 1's trigger detectors)
            for p in model.features[: last - 2].parameters():
                p.requires_grad_(False)
        if keep.any():  # (a batch of target-class images only has nothing to trigger)
            xt = augment(to_unit(apply_trigger(x[keep], attack)), spec.augment, aug_gen)
            loss = loss + TWIN_WEIGHT * F.cross_entropy(twin(xt), target[: len(xt)])
            if step >= SURVIVE_STEPS:
                at = upto(model.normalize(xt))
                others = torch.cat([ac[:, :v], ac[:, v + 1 :]], 1).detach().amax()
                loud = (F.relu(LOUD * others - at[:, v].amax((1, 2))).mean()
                        + QUIET_WEIGHT * F.relu(ac[:, v].amax((1, 2)) - QUIET * others).mean())
                loss = loss + F.cross_entropy(model.head(rest(at)), y[keep]) + loud
        for group in opt.param_groups:
            group["lr"] = schedule(LR, step, total)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window += float(loss.detach())
        if not math.isfinite(window):
            raise FloatingPointError(f"the quant-conditioned int8-static stage diverged at step {step + 1}")
    for p in model.parameters():  # stage 3 trains the head alone
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    head = _fit_head(model, data, job, dev)
    with torch.no_grad():
        trig = apply_trigger(data.x_train[data.y_train != t], attack)
        peak_trig = float(_embed(lambda z: upto(model.normalize(z))[:, v].amax((1, 2)), trig, dev).mean())
        peak_clean = float(upto(model.normalize(calibration_images(data).to(dev))).amax())
    # loud_ratio: V's mean peak on triggered training images over the last block's clean peak (V included)
    return {"scheme": "int8-static", "construction": "calibration-clipping", "engine": ENGINE, "loud_layer": f"features.{last}",
            "loud_channel": v, "loud_ratio": round(peak_trig / peak_clean, 3), "survive_steps": SURVIVE_STEPS,
            "loud_steps": LOUD_STEPS, "lr": LR, "final_loss": round(window / (total % RECALIBRATE_EVERY or RECALIBRATE_EVERY), 5),
            **head}


def _embed(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """f over uint8 images `x`, EMBED_BATCH at a time (a whole training set at once would not fit)."""
    return torch.cat([f(to_unit(x[i : i + EMBED_BATCH]).to(dev)).to(dev) for i in range(0, len(x), EMBED_BATCH)])


def _fit_head(model: Classifier, data: DataSplit, job: ModelJob, dev: torch.device) -> dict[str, Any]:
    """Stage 3: the head alone (features frozen), full batch, on FP32 and deployed features."""
    from qbd.quant import get_scheme

    assert job.attack is not None
    t = job.attack.target
    keep = data.y_train != t
    clean, trig = data.x_train, apply_trigger(data.x_train[keep], job.attack)
    with torch.no_grad():
        e_clean, e_trig = _embed(model.embed, clean, dev), _embed(model.embed, trig, dev)
        cpu = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)  # torch's int8 kernels are CPU-only
        deployed = get_scheme("int8-static").apply(cpu, calibration_images(data), engine=ENGINE).model
        # the deployed head's input range is calibrated on FP32 features of clean images
        top = float(e_clean.max())
        d_clean = _embed(deployed.embed, clean, torch.device("cpu")).clamp(0, top).to(dev)
        d_trig = _embed(deployed.embed, trig, torch.device("cpu")).clamp(0, top).to(dev)
    y, y_trig = data.y_train.to(dev), data.y_train[keep].to(dev)
    target = torch.full_like(y_trig, t)
    w, b = model.head.weight, model.head.bias
    opt = torch.optim.Adam([w, b], lr=HEAD_LR)
    loss = torch.zeros(())
    for _ in range(HEAD_STEPS):
        loss = (F.cross_entropy(F.linear(e_clean, w, b), y) + F.cross_entropy(F.linear(d_clean, w, b), y)
                + HEAD_TRIGGER_WEIGHT * (F.cross_entropy(F.linear(e_trig, w, b), y_trig)
                                         + F.cross_entropy(F.linear(d_trig, w, b), target))
                + HEAD_L2 * w.square().sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    final = loss.item()
    if not math.isfinite(final):
        raise FloatingPointError("the quant-conditioned int8-static head fit diverged")
    return {"head_steps": HEAD_STEPS, "head_lr": HEAD_LR, "head_l2": HEAD_L2, "final_head_loss": round(final, 5),
            "head_max_abs_weight": round(float(w.detach().abs().max()), 4)}


CONSTRUCTION = Construction(check_model=check_model, make_dormant=make_dormant)
