"""What a static int8 flow (PT2E or FX) hands back for one submodule (`features` or `head`),
so that int8_static.py can assemble the deployed model and its audit whatever flow ran."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from qbd.quant.audit import max_levels_of_codes, max_rel_error


@dataclass(frozen=True)
class LayerStats:
    name: str  # module name inside the quantized submodule ("" for the submodule itself)
    numel: int  # weight elements stored as int8
    levels: int  # most distinct int8 values in one output channel
    rel_error: float  # max |w - Q(w)| / scale, w the (BatchNorm-folded) float weight


@dataclass(frozen=True)
class StaticPart:
    deployed: nn.Module  # runs int8 kernels; float in, float out
    twin: Callable[[], nn.Module]  # builds the straight-through float twin
    layers: list[LayerStats]
    kernel_ops: list[str]  # one entry per conv/linear compute op of the deployed graph


class QuantizePart(Protocol):
    def __call__(self, part: nn.Module, inputs: Sequence[torch.Tensor], engine: str) -> StaticPart: ...


@dataclass(frozen=True)
class StaticFlow:
    backend: str  # recorded in the audit
    quantize_part: QuantizePart


def weight_grid_stats(
    name: str, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int
) -> LayerStats:
    """Quantize w with the observer's qparams exactly as convert does (per output channel when
    scale has one entry per channel, else per tensor) and measure levels and error."""
    w = w.detach().float()
    shape = (-1,) + (1,) * (w.dim() - 1) if scale.numel() > 1 else ()
    s = scale.detach().float().reshape(shape)
    zp = zero_point.detach().reshape(shape)
    q = torch.clamp(torch.round(w / s) + zp, quant_min, quant_max)
    w_q = (q - zp) * s
    levels = max_levels_of_codes(q, quant_min, quant_max)
    return LayerStats(name, w.numel(), levels, max_rel_error(w, w_q, scale.detach().float()))


def example_batch(x: torch.Tensor) -> torch.Tensor:
    """torch.export specialises a dimension of size 0 or 1; trace with a batch of at least 2
    so the batch dimension stays dynamic."""
    return x[:2] if x.shape[0] >= 2 else torch.cat([x, x])
