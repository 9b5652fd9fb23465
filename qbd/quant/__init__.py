"""Quantization schemes: name -> scheme, each with `.apply(model, calib, engine)` returning a
QuantizedModel (deployed model, audit, surrogate). See docs/quantization.md.

Torch-free on purpose: entries are lazy, so the CLI and the pytest plugin can list scheme
names without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qbd.registry import Registry

if TYPE_CHECKING:
    from qbd.quant.base import Scheme

SCHEMES: Registry[Scheme] = Registry("quantization scheme")
SCHEMES.add_lazy("fp32", "qbd.quant.fp32:SCHEME")
SCHEMES.add_lazy("int8-dynamic", "qbd.quant.int8_dynamic:SCHEME")
SCHEMES.add_lazy("int8-static", "qbd.quant.int8_static:SCHEME")
# ONNX Runtime's INT8 CPU path; needs the `onnx` extra at apply time, not to be listed
SCHEMES.add_lazy("onnx-int8-static", "qbd.quant.onnx_rt:STATIC")
SCHEMES.add_lazy("onnx-int8-dynamic", "qbd.quant.onnx_rt:DYNAMIC")
SIM_BITS = tuple(range(2, 9))  # intN-sim, N = 2..8; int4-sim is the paper's INT4
for _bits in SIM_BITS:
    SCHEMES.add_lazy(f"int{_bits}-sim", f"qbd.quant.intn_sim:INT{_bits}_SIM")
del _bits

__all__ = ["SCHEMES", "SIM_BITS"]
