"""Differentiable float twins of int8 models.

int8 kernels have no autograd. A surrogate computes the same function in float: the identical
dequantized int8 weights, and every activation rounding of the deployed model replaced by
fake quantization with the same scale and zero point and a straight-through gradient
(identity inside the quantization range, zero where the value is clipped: the gradient of
torch.fake_quantize_per_tensor_affine). Its logits match the deployed model's up to the
accumulation order of the int32 and float kernels; each scheme states and tests its tolerance.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

# aten/src/ATen/native/quantized/cpu/QuantUtils.h: scales below this are raised to it.
SMALL_SCALE_THRESHOLD = np.float32(6.1e-5)


def fake_quant_ste(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """round-to-nearest-even(x / scale) + zero_point, clamped, dequantized; gradient passes
    straight through inside [quant_min, quant_max]."""
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), int(quant_min), int(quant_max))


def choose_dynamic_qparams(x: torch.Tensor, reduce_range: bool) -> tuple[float, int, int]:
    """Port of ATen's ChooseQuantizationParams(min, max, 0, 255, preserve_sparsity=False,
    force_scale_power_of_two=False, reduce_range) as quantized::linear_dynamic calls it: one
    per-tensor affine quint8 range over the WHOLE input tensor (every image in the batch).
    Returns (scale, zero_point, quant_max)."""
    qmin, qmax = 0, 255
    if reduce_range:
        qmin, qmax = qmin // 2, qmax // 2
    lo = np.float32(min(float(x.detach().min()), 0.0))
    hi = np.float32(max(float(x.detach().max()), 0.0))
    scale = (float(hi) - float(lo)) / (qmax - qmin)  # double, as in ATen
    if np.float32(scale) == 0 or np.isinf(np.float32(1.0) / np.float32(scale)):
        scale = 0.1
    if scale < SMALL_SCALE_THRESHOLD:
        org = np.float32(scale)
        scale = float(SMALL_SCALE_THRESHOLD)
        if lo == 0:
            hi = np.float32(SMALL_SCALE_THRESHOLD * (qmax - qmin))
        elif hi == 0:
            lo = np.float32(-SMALL_SCALE_THRESHOLD * (qmax - qmin))
        else:
            amp = np.float32(SMALL_SCALE_THRESHOLD / org)
            lo, hi = np.float32(lo * amp), np.float32(hi * amp)
    zp_min = qmin - float(lo) / scale
    zp_max = qmax - float(hi) / scale
    err_min = abs(qmin) - abs(float(lo) / scale)
    err_max = abs(qmax) - abs(float(hi) / scale)
    initial = zp_min if err_min < err_max else zp_max
    zero_point = qmin if initial < qmin else qmax if initial > qmax else int(np.rint(initial))
    return float(np.float32(scale)), zero_point, qmax


class DynamicLinearSTE(nn.Module):
    """Float twin of torch.ao's DynamicQuantizedLinear (qint8 weights): the dequantized int8
    weight, and the input rounded to quint8 with its own dynamic range on every call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, reduce_range: bool) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.reduce_range = reduce_range

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point, qmax = choose_dynamic_qparams(x, self.reduce_range)
        return F.linear(fake_quant_ste(x, scale, zero_point, 0, qmax), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, reduce_range={self.reduce_range}"


def _fake_quant_node(x, scale, zero_point, quant_min, quant_max, dtype):
    # Signature of quantized_decomposed.quantize_per_tensor; returns the dequantized value.
    del dtype
    return fake_quant_ste(x, scale, zero_point, quant_min, quant_max)


def pt2e_ste_twin(reference: fx.GraphModule) -> fx.GraphModule:
    """Rewrite a PT2E reference graph (convert_pt2e output: float ops between
    quantize_per_tensor / dequantize_per_tensor pairs) into its straight-through twin:
    each activation quantize becomes a fake quantization with the same qparams and the
    dequantizes that read it become the identity. Raises on any quantized op it does not know,
    rather than producing a twin that silently differs."""
    # quantized_decomposed ops exist once torchao's pt2e package has been imported, which
    # the caller did to produce `reference`; look them up here, not at import time.
    qd = torch.ops.quantized_decomposed
    act_quant = {qd.quantize_per_tensor.default}
    act_dequant = {qd.dequantize_per_tensor.default}
    # Weight dequantization reads int8 constants only; it stays, so the twin has identical weights.
    weight_dequant = {qd.dequantize_per_channel.default, qd.dequantize_per_tensor.default}
    twin = copy.deepcopy(reference)
    graph = twin.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in act_quant:
            if node.args[0].op == "get_attr":
                continue  # a constant being quantized (not produced by convert_pt2e folding)
            node.target = _fake_quant_node
        elif node.target in act_dequant and getattr(node.args[0], "target", None) is _fake_quant_node:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        namespace = getattr(node.target, "namespace", None)
        if namespace == "quantized_decomposed" and not (
            node.target in weight_dequant and node.args[0].op == "get_attr"
        ):
            raise NotImplementedError(f"no straight-through rewrite for {node.target} in {node.format_node()}")
    graph.lint()
    twin.recompile()
    return twin
