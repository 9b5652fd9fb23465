"""Image tensor conventions (pixels to [0, 1], the kernels' layout), clean accuracy, attack success
rate, and the MAD anomaly index."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Logits = Callable[[torch.Tensor], torch.Tensor]


def to_unit(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]; float input is returned as is (cast to dtype)."""
    if x.dtype == torch.uint8:
        return x.to(dtype).div_(255.0)
    return x.to(dtype)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Images in channels_last: the convolution and pooling kernels' fast layout on a CPU (1.8x
    for tiny-cnn's features on one thread, tests/bench/test_kernels_bench.py; values equal to
    ~1e-6 relative, the kernels' summation order), and the layout oneDNN's int8 kernels compute in."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def predict(model: Logits, x: torch.Tensor, batch_size: int = 512, device: str | torch.device | None = None) -> torch.Tensor:
    """Predicted labels (on CPU) for uint8 or [0, 1] float images, in batches."""
    if isinstance(model, torch.nn.Module):
        model.eval()
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else "cpu"
    device = device or "cpu"
    out = []
    for i in range(0, len(x), batch_size):
        xb = to_unit(x[i : i + batch_size].to(device))
        out.append(model(xb).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def accuracy(model: Logits, x: torch.Tensor, y: torch.Tensor, **kw: object) -> float:
    if len(y) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((predict(model, x, **kw) == y.cpu()).float().mean())


def attack_success_rate(model: Logits, x_triggered: torch.Tensor, target: int, **kw: object) -> float:
    """Share of triggered images classified as the target. `x_triggered` must already exclude
    images whose true label is the target (qbd.poisoning.triggered_test does)."""
    if len(x_triggered) == 0:
        raise ValueError("attack success rate of an empty set is undefined")
    return float((predict(model, x_triggered, **kw) == target).float().mean())


MAD_CONSISTENCY = 1.4826  # makes MAD a consistent estimator of sigma for normal data


def anomaly_index(values: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Neural Cleanse's outlier score: (median, MAD, |v - median| / MAD).

    The median is numpy's (mean of the two middle values for an even count); torch.median
    returns the lower one and changes results. MAD == 0 yields an index of inf/nan: callers must
    treat it as "no signal" (invalid), never as "no outlier".
    """
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    mad = MAD_CONSISTENCY * float(np.median(np.abs(v - med)))
    with np.errstate(divide="ignore", invalid="ignore"):
        idx = np.abs(v - med) / mad
    return med, mad, idx
