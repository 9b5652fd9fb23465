"""intN-sim: the paper's simulated low-bit weights (its Eq. 3), N = 2..8.

Every Conv2d and Linear weight is fake-quantized per output channel, symmetric:
    scale = max|w| / (2^(N-1) - 1),  q = clamp(round(w / scale), -2^(N-1), 2^(N-1) - 1),
    w' = q * scale.
BatchNorm, biases and the Normalize layer are untouched. The model stays a plain float model,
so input gradients are exact and the deployed model is its own surrogate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qbd.models import Classifier
from qbd.quant.audit import build_audit, max_levels_per_channel, max_rel_error
from qbd.quant.base import QuantizedClassifier, QuantizedModel
from qbd.quant.common import calib_batches, check_engine, eval_copy, input_shape, model_device, weight_layers

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


class IntNSim:
    differentiable = True
    engines: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu", "cuda")  # float weights on an integer grid run anywhere

    def __init__(self, bits: int) -> None:
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
        self.bits = bits
        self.name = f"int{bits}-sim"

    def __repr__(self) -> str:
        return f"IntNSim(bits={self.bits})"

    def apply(
        self,
        model: Classifier,
        calib: torch.Tensor | Sequence[torch.Tensor] | None = None,
        engine: str | None = None,
    ) -> QuantizedModel:
        check_engine(self.name, engine, self.engines)
        batches = calib_batches(calib)  # not needed for weights-only quantization; validated
        deployed = eval_copy(model)
        names: list[str] = []
        quantized = 0
        levels = 0
        rel_err = 0.0
        with torch.no_grad():
            for name, layer in weight_layers(deployed):
                w = layer.weight
                w_q, scale = quantize_weight(w, self.bits)
                levels = max(levels, max_levels_per_channel(w_q))
                rel_err = max(rel_err, max_rel_error(w, w_q, scale))
                w.copy_(w_q)
                names.append(name)
                quantized += w.numel()
        qc = QuantizedClassifier.from_parts(deployed, deployed.features, deployed.head)
        audit = build_audit(
            scheme=self.name,
            differentiable=self.differentiable,
            fp32_model=model,
            deployed=qc,
            input_shape=input_shape(batches),
            engine=None,
            backend="float fake-quantized weights (simulation)",
            bits=self.bits,
            quantized_modules=names,
            quantized_params=quantized,
            max_levels=levels or None,
            max_rel_err=rel_err if names else None,
            surrogate_rel_tolerance=None,
            kernel_ops={},
            device=model_device(deployed),
        )
        return QuantizedModel(scheme=self.name, model=qc, audit=audit, differentiable=True)


# One instance per registered name (qbd.quant registers them lazily by attribute).
INT2_SIM = IntNSim(2)
INT3_SIM = IntNSim(3)
INT4_SIM = IntNSim(4)
INT5_SIM = IntNSim(5)
INT6_SIM = IntNSim(6)
INT7_SIM = IntNSim(7)
INT8_SIM = IntNSim(8)
