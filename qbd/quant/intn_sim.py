"""intN-sim: the paper's simulated low-bit weights (its Eq. 3), N = 2..8.

Every Conv2d and Linear weight is fake-quantized per output channel, symmetric:
    scale = max|w| / (2^(N-1) - 1),  q = clamp(round(w / scale), -2^(N-1), 2^(N-1) - 1),
    w' = q * scale.
BatchNorm, biases and the Normalize layer are untouched. The model stays a plain float model,
so input gradients are exact and the deployed model is its own surrogate.
"""

from __future__ import annotations

import torch

from qbd.models import Classifier
from qbd.quant.scheme import Quantized, SchemeBase, quantize_weights

MIN_BITS, MAX_BITS = 2, 8


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 per output channel (dim 0). Returns (w', scale) with w' of w's shape and dtype
    and scale of shape (out_channels,). An all-zero channel has scale 0 and stays zero."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    if w.dim() < 1 or w.shape[0] == 0:
        raise ValueError(f"weight needs an output-channel dimension, got shape {tuple(w.shape)}")
    qmax = 2 ** (bits - 1) - 1
    qmin = -(2 ** (bits - 1))
    # float64 arithmetic: IEEE-exact division on every device, so a weight on a rounding tie
    # lands on the same level on CPU and GPU (float32 CUDA kernels differed from CPU there).
    rows = w.detach().reshape(w.shape[0], -1).double()
    scale = rows.abs().amax(dim=1) / qmax
    nonzero = scale > 0
    # Divide by 1 where the scale is 0: those rows are all zero and map to zero, not NaN.
    safe = torch.where(nonzero, scale, torch.ones_like(scale)).unsqueeze(1)
    q = torch.clamp(torch.round(rows / safe), qmin, qmax)
    w_q = torch.where(nonzero.unsqueeze(1), q * safe, torch.zeros_like(rows))
    return w_q.reshape(w.shape).to(w.dtype), scale.to(w.dtype)


class IntNSim(SchemeBase):
    devices: tuple[str, ...] = ("cpu", "cuda")  # float weights on an integer grid run anywhere

    def __init__(self, bits: int) -> None:
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
        self.bits = bits
        self.name = f"int{bits}-sim"

    def __repr__(self) -> str:
        return f"IntNSim(bits={self.bits})"

    def quantize(self, model: Classifier, calib: list[torch.Tensor], engine: str | None) -> Quantized:
        # calibration data is not needed for weights-only quantization (the base validates it)
        return quantize_weights(model, lambda w: quantize_weight(w, self.bits),
                                backend="float fake-quantized weights (simulation)", bits=self.bits)


# One instance per registered name (qbd.quant registers them lazily by attribute).
INT2_SIM = IntNSim(2)
INT3_SIM = IntNSim(3)
INT4_SIM = IntNSim(4)
INT5_SIM = IntNSim(5)
INT6_SIM = IntNSim(6)
INT7_SIM = IntNSim(7)
INT8_SIM = IntNSim(8)
