"""int8-dynamic: the paper's INT8, `torch.ao.quantization.quantize_dynamic(model, {nn.Linear},
dtype=torch.qint8)`.

Only nn.Linear is in the dynamic mapping, so on a CNN this quantizes the classifier alone
(0.046 % of a CIFAR ResNet-18). Weights: qint8, per-tensor symmetric (MinMaxObserver,
scale = max|w| / 127.5). Activations: quint8 per-tensor affine, range taken from each input
tensor at run time, reduce_range on x86/fbgemm (levels 0..127), full range on qnnpack.
quantized::linear_dynamic has no autograd kernel: no input gradient reaches the pixels, which is
what made the paper's INT8 Neural Cleanse collapse.

The kernel's range spans its whole input tensor, every image of a batch (measured, torch 2.14.1,
x86 and qnnpack), so an image's deployed logits depend on the rest of its batch. The surrogate
is the float twin (DynamicLinearSTE) with identical dequantized weights and a range per image:
it matches the deployed model served one image at a time (batch size 1), the one serving in
which an image's output depends on that image alone; its tolerance is stated against that.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qbd.models import Classifier
from qbd.quant.audit import max_levels_of_codes, max_rel_error, op_counts
from qbd.quant.base import QuantizedClassifier
from qbd.quant.common import weight_layers
from qbd.quant.engine import EngineBound, quantized_engine
from qbd.quant.scheme import Quantized, SchemeBase
from qbd.quant.surrogate import DynamicLinearSTE
from qbd.quant.warnings import ignoring_known_warnings

# Engines whose dynamic linear honours reduce_range=True (the module always passes True);
# qnnpack ignores it and uses the full 0..255 range.
_REDUCE_RANGE = {"x86": True, "fbgemm": True, "qnnpack": False}

# Surrogate logits match the deployed model run one image at a time within this fraction of
# max |deployed logit|: both compute sum((q_x - zp) * s_x * q_w * s_w); they differ only by
# float vs int32 accumulation (measured ~1e-7 relative), plus a rare one-level flip of an input
# element whose x / scale lands on a rounding tie.
SURROGATE_REL_TOLERANCE = 1e-3


class Int8Dynamic(SchemeBase):
    name = "int8-dynamic"
    differentiable = False
    engines: tuple[str, ...] = ("x86", "qnnpack", "fbgemm")  # default first; the paper used qnnpack
    devices: tuple[str, ...] = ("cpu",)  # torch's int8 kernels are CPU-only; the surrogate can move
    # the runtime takes one activation range per batch, the surrogate one per image: they agree
    # served one image at a time (SURROGATE_REL_TOLERANCE), not on the 64-image batches the base
    # would compare (docs/quantization.md#surrogates-and-their-tolerances)
    measures_agreement = False

    def quantize(self, model: Classifier, calib: list[torch.Tensor], engine: str | None) -> Quantized:
        assert engine is not None  # dynamic quantization needs no calibration
        fp = model
        # The engine decides how the int8 weights are packed; packed weights then run with
        # their own kernels whatever the global engine is later.
        with quantized_engine(engine), ignoring_known_warnings():
            q = torch.ao.quantization.quantize_dynamic(fp, {nn.Linear}, dtype=torch.qint8, inplace=False)
        dynamic_cls = torch.ao.nn.quantized.dynamic.Linear
        names, kernels, quantized, levels, rel_err = [], [], 0, 0, 0.0
        float_modules = dict(weight_layers(fp))
        for name, module in list(q.named_modules()):
            if not isinstance(module, dynamic_cls):
                continue
            w_int8, _ = module._weight_bias()
            w_float = float_modules[name].weight.detach()
            names.append(name)
            kernels.append(f"{type(module).__module__}.{type(module).__qualname__}")
            quantized += w_int8.numel()
            levels = max(levels, max_levels_of_codes(w_int8.int_repr(), -128, 127))
            rel_err = max(rel_err, max_rel_error(w_float, w_int8.dequantize(), torch.tensor(w_int8.q_scale())))
            q.set_submodule(name, EngineBound(module, engine))  # copies keep the packing engine
        deployed = QuantizedClassifier.from_parts(fp, q.features, q.head, normalize=q.normalize)
        reduce_range = _REDUCE_RANGE[engine]
        return Quantized(
            deployed,
            backend="torch.ao.quantization.quantize_dynamic({nn.Linear}, qint8)",
            bits=8,
            quantized_modules=names,
            quantized_params=quantized,
            max_levels=levels or None,
            max_rel_err=rel_err if names else None,
            kernel_ops=op_counts(kernels),
            surrogate_factory=lambda: _float_twin(deployed, reduce_range),
            surrogate_rel_tolerance=SURROGATE_REL_TOLERANCE,
        )


def _float_twin(deployed: QuantizedClassifier, reduce_range: bool) -> QuantizedClassifier:
    """Deep copy of the deployed model in which every dynamic int8 linear is replaced by its
    straight-through twin (pre-seeding deepcopy's memo substitutes them wherever they occur)."""
    dynamic_cls = torch.ao.nn.quantized.dynamic.Linear
    memo: dict[int, object] = {}
    for module in deployed.modules():
        if isinstance(module, EngineBound) and isinstance(module.module, dynamic_cls):
            w, b = module.module._weight_bias()
            memo[id(module)] = DynamicLinearSTE(w.dequantize(), b, reduce_range)
    return copy.deepcopy(deployed, memo)


SCHEME = Int8Dynamic()
