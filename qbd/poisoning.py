"""Triggers and poisoning (the attacks themselves are declared in qbd.attacks, the catalog).
Poisoned training samples carry the trigger and are relabelled to the target class.

- badnet (Gu et al. 2017): a square patch written into the image.
- blend (Chen et al. 2017): a full-image pattern mixed into every pixel, x' = (1 - a) x + a p,
  procedural (seeded noise or a checkerboard), so nothing is downloaded.
- quant-conditioned: BadNet's patch and poisoning; what differs is training (qbd.dormant).

Triggers are applied to uint8 pixels before normalisation (the model's first layer), unlike the
paper's code, which wrote the patch after normalisation (a grey patch): the trigger is part of
the image a deployed model receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qbd.attacks import get_attack
from qbd.config import AttackSpec, derive_seed, parse_position


@dataclass(frozen=True)
class PoisonedSet:
    """A training set with `poison_idx` carrying the trigger and the target label."""

    x: torch.Tensor  # uint8 N x 3 x H x W
    y: torch.Tensor  # int64 N, poisoned entries relabelled
    poison_idx: torch.Tensor  # int64, sorted
    y_true: torch.Tensor  # the labels before relabelling

    @property
    def is_poisoned(self) -> torch.Tensor:
        mask = torch.zeros(len(self.y), dtype=torch.bool)
        mask[self.poison_idx] = True
        return mask


def trigger_patch(spec: AttackSpec, channels: int = 3) -> torch.Tensor:
    """The patch as uint8 C x s x s."""
    s = spec.trigger_size
    if spec.trigger_pattern == "white":
        return torch.full((channels, s, s), 255, dtype=torch.uint8)
    if spec.trigger_pattern == "checkerboard":
        ij = torch.arange(s)
        board = ((ij[:, None] + ij[None, :]) % 2 == 0).to(torch.uint8) * 255
        return board.expand(channels, s, s).clone()
    # "random": a fixed colour pattern, reproducible from the attack seed alone
    g = torch.Generator().manual_seed(spec.seed)
    return torch.randint(0, 256, (channels, s, s), generator=g, dtype=torch.int64).to(torch.uint8)


def trigger_origin(spec: AttackSpec, height: int, width: int) -> tuple[int, int]:
    """(row, column) of the patch's top-left pixel."""
    s = spec.trigger_size
    kind, x, y = parse_position(spec.trigger_position)
    if kind == "xy":
        return int(y), int(x)
    row = 0 if kind.startswith("top") else height - s
    col = 0 if kind.endswith("left") else width - s
    return row, col


def trigger_mask(spec: AttackSpec, height: int, width: int) -> torch.Tensor:
    """Boolean H x W mask of the pixels the trigger overwrites."""
    r, c = trigger_origin(spec, height, width)
    m = torch.zeros(height, width, dtype=torch.bool)
    m[r : r + spec.trigger_size, c : c + spec.trigger_size] = True
    return m


def blend_pattern(spec: AttackSpec, channels: int, height: int, width: int) -> torch.Tensor:
    """The blend attack's full-image pattern as uint8 C x H x W: seeded uniform noise (Chen et
    al.'s random pattern; reproducible from the attack seed alone) or a one-pixel checkerboard."""
    if spec.trigger_pattern == "checkerboard":
        board = ((torch.arange(height)[:, None] + torch.arange(width)[None, :]) % 2 == 0).to(torch.uint8) * 255
        return board.expand(channels, height, width).clone()
    g = torch.Generator().manual_seed(derive_seed("blend", spec.seed))
    return torch.randint(0, 256, (channels, height, width), generator=g, dtype=torch.int64).to(torch.uint8)


def _write_patch(x: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    _, c, h, w = x.shape
    patch = trigger_patch(spec, c).to(x.device)
    if x.is_floating_point():
        patch = patch.to(x.dtype) / 255.0
    r, col = trigger_origin(spec, h, w)
    out = x.clone()
    out[:, :, r : r + spec.trigger_size, col : col + spec.trigger_size] = patch
    return out


def _blend(x: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    _, c, h, w = x.shape
    alpha = float(spec.alpha)  # type: ignore[arg-type]  # AttackSpec fills it for blend
    p = blend_pattern(spec, c, h, w).to(x.device, torch.float32)
    if x.is_floating_point():
        return ((1 - alpha) * x.float() + alpha * p / 255.0).to(x.dtype)
    # uint8 in, uint8 out, rounded to the nearest level: the trigger is an image a camera could deliver
    return ((1 - alpha) * x.float() + alpha * p).round_().clamp_(0, 255).to(torch.uint8)


# an attack's `trigger` (qbd.attacks) -> how it is written; None: the attack's own `write`
_TRIGGERS = {"patch": _write_patch, "blend": _blend}


def apply_trigger(x: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    """Return a copy of uint8 images N x C x H x W (or float in [0, 1]) carrying the trigger."""
    _, _, h, w = x.shape
    spec.check_fits(h, w)
    if not x.is_floating_point() and x.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 or float, got {x.dtype}")
    attack = get_attack(spec.name)
    if attack.trigger is None:
        out = attack.write(x, spec)
        if not (isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype):
            raise TypeError(f"attack {spec.name!r}: write() must return a tensor shaped and typed as its input"
                            f" ({tuple(x.shape)}, {x.dtype}), got {type(out).__name__}")
        return out
    return _TRIGGERS[attack.trigger](x, spec)


def n_poison(spec: AttackSpec, n: int) -> int:
    return round(spec.poison_rate * n)


def poison(x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, num_classes: int) -> PoisonedSet:
    """Poison round(rate x N) training samples, drawn first from those whose label is not the
    target (a target-class sample gains nothing from the trigger), then from the rest."""
    h, w = int(x.shape[2]), int(x.shape[3])
    spec.check_fits(h, w, num_classes)
    k = n_poison(spec, len(y))
    g = torch.Generator().manual_seed(derive_seed("poison", spec.seed))
    order = torch.randperm(len(y), generator=g)
    not_target = order[y[order] != spec.target]
    is_target = order[y[order] == spec.target]
    idx = torch.cat([not_target, is_target])[:k].sort().values
    xp = x.clone()
    yp = y.clone()
    if k:
        xp[idx] = apply_trigger(x[idx], spec)
        yp[idx] = spec.target
    return PoisonedSet(x=xp, y=yp, poison_idx=idx, y_true=y.clone())


def triggered_test(x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triggered copies of the test images whose true label is not the target: the ASR set.
    Returns (images, their true labels)."""
    spec.check_fits(int(x.shape[2]), int(x.shape[3]), num_classes)
    keep = y != spec.target
    return apply_trigger(x[keep], spec), y[keep].clone()
