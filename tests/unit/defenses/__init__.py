"""Hand-built subjects for the defense unit tests: tiny models whose penultimate features and
outputs are known by construction, so each defense's answer is known without training."""

from __future__ import annotations

import torch
from torch import nn

from qbd.defenses.base import Subject


class PixelFeatures(nn.Module):
    """embed(x) = the image's pixels (so constructed images ARE the features); a random linear
    head. For AC/SS: build uint8 images whose pixels form the wanted point clouds."""

    def __init__(self, dim: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(dim, num_classes)
        # a global pool that keeps the input's size: the "pre-pool" activations AC and SS read
        # (through a hook on the model's last AdaptiveAvgPool2d) are the pixels too
        self.pool = nn.AdaptiveAvgPool2d((None, None))
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, dim, generator=g))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).flatten(1)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))


def subject(model: nn.Module, num_classes: int) -> Subject:
    return Subject(model, model.embed, model.classify, num_classes)


def blobs(sizes: list[int], centres: torch.Tensor, sd: float, seed: int = 0) -> torch.Tensor:
    """uint8 images 3 x 4 x 4 (48 pixels) drawn around `centres` (len(sizes) x 48, in uint8 units)."""
    g = torch.Generator().manual_seed(seed)
    parts = [centres[i] + sd * torch.randn(n, centres.shape[1], generator=g) for i, n in enumerate(sizes)]
    return torch.cat(parts).round().clamp(0, 255).to(torch.uint8).view(-1, 3, 4, 4)


def class_data(num_classes: int = 4, per_class: int = 150, poison: int = 0, target: int = 0, shift: float = 90.0,
               sd: float = 8.0, seed: int = 0, poison_from: str = "target") -> tuple[torch.Tensor, torch.Tensor]:
    """One Gaussian blob per class; with `poison` > 0 the target class also holds that many
    poisoned points carrying a trigger direction: a shifted blob at the target's centre, or with
    `poison_from` = "others" the other classes' points shifted (as a BadNet poison is: images of
    every other class, relabelled, with the trigger)."""
    g = torch.Generator().manual_seed(seed + 1)
    centres = 60 + 80 * torch.rand(num_classes, 48, generator=g)
    xs, ys = [], []
    for c in range(num_classes):
        xs.append(blobs([per_class], centres[c : c + 1], sd, seed + 10 + c))
        ys.append(torch.full((per_class,), c))
    if poison:
        if poison_from == "others":
            sources = torch.tensor([c for c in range(num_classes) if c != target])
            bent = centres[sources[torch.arange(poison) % len(sources)]].clone()
            bent[:, :8] += shift  # the trigger lights up eight feature dims
            xs.append(blobs([1] * poison, bent, sd, seed + 99))
        else:
            bent = centres[target].clone()
            bent[:8] += shift  # the trigger lights up eight feature dims
            xs.append(blobs([poison], bent[None], sd, seed + 99))
        ys.append(torch.full((poison,), target))
    return torch.cat(xs), torch.cat(ys)


def quadrant_images(n: int, num_classes: int = 4, size: int = 8, seed: int = 0, iid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k brightens quadrant k; background noise below 80, so a saturating blend of two
    clean images stays below 255 in the bottom-right corner unless a trigger is there. Labels
    cycle through the classes (exactly balanced), or with `iid` are drawn independently, as a
    sample's are."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g) if iid else torch.arange(n) % num_classes
    x = torch.randint(0, 60, (n, 3, size, size), generator=g)
    h = size // 2
    for k in range(num_classes):
        r, c = divmod(k, 2)
        x[y == k, :, r * h : (r + 1) * h, c * h : (c + 1) * h] += 60
    return x.clamp(0, 255).to(torch.uint8), y


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    """A white 2 x 2 patch in the bottom-right corner."""
    out = x.clone()
    out[:, :, -2:, -2:] = 255
    return out


def _quadrants(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.stack([x[:, :, r * h : (r + 1) * h, c * h : (c + 1) * h].mean((1, 2, 3)) for r in (0, 1) for c in (0, 1)], 1)


def _corner_white(x: torch.Tensor) -> torch.Tensor:
    """1 where the bottom-right 2 x 2 patch is (near) white, else 0."""
    return (x[:, :, -2:, -2:].amin((1, 2, 3)) > 0.97).float()


class CornerBackdoor(nn.Module):
    """Features: 4 quadrant channels, 11 filler channels, and (with `channel=True`) one backdoor
    channel that is 0 on clean images and 1 when the corner trigger is present. The head sends
    the quadrant evidence to its class and the backdoor channel to class 0. With
    `channel=False` the trigger is wired into quadrant channel 0 instead (no separate channel:
    pruning cannot remove it without removing class 0)."""

    def __init__(self, channel: bool = True, logit_scale: float = 12.0) -> None:
        super().__init__()
        self.channel = channel
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            for k in range(4):
                self.head.weight[k, k] = logit_scale
            self.head.weight[0, 15] = 4 * logit_scale

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        q = _quadrants(x)
        q = q - q.mean(1, keepdim=True) + 0.5  # relative brightness, stays positive
        trig = _corner_white(x)
        filler = 0.6 + 0.01 * x[:, :, :2, :2].mean((1, 2, 3), keepdim=False)[:, None].expand(-1, 11)
        if self.channel:
            back = trig[:, None]
        else:
            q = q.clone()
            q[:, 0] = q[:, 0] + 4 * trig
            back = torch.zeros_like(trig)[:, None]
        return torch.cat([q, filler, back], 1)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))


class Constant(nn.Module):
    """Predicts class 0 with certainty for every input (entropy 0 everywhere)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        logits = torch.full((num_classes,), -1000.0)
        logits[0] = 0.0
        self.register_buffer("logits", logits)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4]

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(f), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))


class NaNFeatures(PixelFeatures):
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")  # before the pool, so the pre-pool activations carry it too
        return self.pool(x).flatten(1)
