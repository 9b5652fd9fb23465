"""BadNet (Gu et al. 2017): a square patch written into the image in pixel space, poisoned
training samples relabelled to the target class.

Triggers are applied to uint8 pixels before normalisation (the model's first layer), unlike the
paper's code, which wrote the patch after normalisation (a grey patch, SEED-AUDIT.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def apply_trigger(x: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    """Return a copy of uint8 images N x C x H x W (or float in [0, 1]) with the patch written."""
    _, c, h, w = x.shape
    spec.check_fits(h, w)
    patch = trigger_patch(spec, c).to(x.device)
    if x.is_floating_point():
        patch = patch.to(x.dtype) / 255.0
    elif x.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 or float, got {x.dtype}")
    r, col = trigger_origin(spec, h, w)
    out = x.clone()
    out[:, :, r : r + spec.trigger_size, col : col + spec.trigger_size] = patch
    return out


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
