"""Memory budgets for the batched defenses (NC, STRIP): how many images one pass may hold.

The footprint of one image is measured, not guessed: one forward pass of a single image under a
dispatch mode that adds up the bytes of every tensor an operator returns. That is what autograd
keeps alive for the backward pass (an upper bound for an inference pass, which frees as it
goes), and it works for any model the defense sees: eager, FX/PT2E-quantized or a surrogate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20


class _OutputBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.total += t.numel() * t.element_size()
        return out


@torch.no_grad()
def bytes_per_image(model: torch.nn.Module, image_shape: tuple[int, ...], device: torch.device) -> int:
    """Bytes of all intermediate tensors of one forward pass of one image (>= 1)."""
    probe = torch.zeros((1, *image_shape), device=device)
    with _OutputBytes() as counter:
        model(probe)
    return max(1, counter.total + probe.numel() * probe.element_size())


def images_within(budget_mib: float, per_image: int, factor: float) -> int:
    """How many images fit in `budget_mib` when each costs `per_image * factor` bytes (>= 1: a
    budget below one image still runs, one image at a time)."""
    return max(1, int(budget_mib * MIB // (per_image * factor)))
