"""Differentiable float twins of int8 models.

int8 kernels have no autograd. A surrogate computes the same function in float: the identical
dequantized int8 weights, and every activation rounding of the deployed model replaced by
fake quantization with the same scale and zero point and a straight-through gradient
(identity inside the quantization range, zero where the value is clipped: the gradient of
torch.fake_quantize_per_tensor_affine / _per_channel_affine). Its logits match the deployed model's up to the
accumulation order of the int32 and float kernels; each scheme states and tests its tolerance.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from qbd.metrics import channels_last

# aten/src/ATen/native/quantized/cpu/QuantUtils.h: scales below this are raised to it.
SMALL_SCALE_THRESHOLD = np.float32(6.1e-5)


def fake_quant_ste(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """round-to-nearest-even(x / scale) + zero_point, clamped, dequantized; gradient passes
    straight through inside [quant_min, quant_max]. For a float32 tensor on a CPU, qbd's own op:
    bitwise what torch.fake_quantize_per_tensor_affine computes for finite values (tested), in
    about a third of its time (tests/bench/test_kernels_bench.py): the surrogates' activations go
    through it at every step. A NaN stays NaN (torch's kernel turns it into quant_min, hiding a
    divergence) and +-inf clamps to the range's ends. Other dtypes and devices use torch's op."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), int(quant_min), int(quant_max))
    sc = np.float32(scale)
    # ATen multiplies by the float32 reciprocal of the float32 scale; both are exact python floats
    return _FakeQuantSTE.apply(x, float(sc), float(np.float32(1.0) / sc), float(int(zero_point)), float(quant_min), float(quant_max))


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, inv_scale: float, zero_point: float, qmin: float,
                qmax: float) -> torch.Tensor:
        q = torch.round(x * inv_scale).add_(zero_point)  # round half to even, as nearbyint
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((q >= qmin) & (q <= qmax))  # inside the range: the gradient passes
        return q.clamp_(qmin, qmax).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None  # faster here than where / masked_fill


def choose_dynamic_qparams(x: torch.Tensor, reduce_range: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Port of ATen's ChooseQuantizationParams(min, max, 0, 255, preserve_sparsity=False,
    force_scale_power_of_two=False, reduce_range) as quantized::linear_dynamic calls it, for
    each sample x[i] (index along dim 0) on its own: the range the kernel takes when that
    sample is served alone (batch size 1). Vectorised on x's device, so no host
    synchronisation. Returns (scale float32 [N], zero_point int32 [N], quant_max)."""
    qmin, qmax = 0, 255
    if reduce_range:
        qmin, qmax = qmin // 2, qmax // 2
    span = qmax - qmin
    flat = x.detach().reshape(x.shape[0], -1).float()
    lo = flat.amin(1).clamp(max=0.0)  # float32, as ATen's min / max
    hi = flat.amax(1).clamp(min=0.0)
    scale = (hi.double() - lo.double()) / span  # double, as in ATen
    s32 = scale.float()
    scale = torch.where((s32 == 0) | torch.isinf(1.0 / s32), 0.1, scale)
    # ATen widens a too-small range (float32 arithmetic) and uses the threshold as the scale;
    # python scalars, not device tensors: a host-to-device copy would synchronise on CUDA
    threshold = float(SMALL_SCALE_THRESHOLD)
    small = scale < threshold
    small32 = torch.full_like(lo, threshold)
    amp = small32 / scale.float()
    lo_small = torch.where(lo == 0, lo, torch.where(hi == 0, -small32 * span, lo * amp))
    hi_small = torch.where(lo == 0, small32 * span, torch.where(hi == 0, hi, hi * amp))
    lo = torch.where(small, lo_small, lo).double()
    hi = torch.where(small, hi_small, hi).double()
    scale = torch.where(small, threshold, scale)
    zp_min = qmin - lo / scale
    zp_max = qmax - hi / scale
    err_min = abs(qmin) - (lo / scale).abs()
    err_max = abs(qmax) - (hi / scale).abs()
    initial = torch.where(err_min < err_max, zp_min, zp_max)
    zero_point = initial.clamp(qmin, qmax).round()  # round half to even, as nearbyint
    return scale.float(), zero_point.int(), qmax


class DynamicLinearSTE(nn.Module):
    """Float twin of torch.ao's DynamicQuantizedLinear (qint8 weights): the dequantized int8
    weight, and the input rounded to quint8 with a dynamic range.

    The range is taken per sample (x[i], index along dim 0), exactly what the kernel computes
    for that sample served alone. The deployed kernel itself takes ONE range over its whole
    input tensor, so in a batch a sample's logits depend on what else is in it (measured on
    torch 2.14.1, x86 and qnnpack: docs/quantization.md). The twin deliberately matches the
    model served one request at a time: a defense's answer about an input must not depend on
    which other inputs it was batched with (Neural Cleanse stacks K classes x B images in one
    forward; batched and sequential runs must agree), and batch size 1 is the only serving
    whose output is a function of the input alone."""

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
        # straight-through gradient inside each sample's range, as fake_quant_ste
        xq = torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, 0, qmax)
        return F.linear(xq, self.weight, self.bias)

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
    _fold_weight_dequant(twin, weight_dequant)
    graph.lint()
    twin.recompile()
    return twin


def channels_last_input(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with every 4-D input turned channels_last before anything reads it. oneDNN's int8
    kernels compute in channels_last whatever layout they are given, and a float reduction's sum
    depends on its order: the twin's global mean over a contiguous map parts from the deployed
    one's by an ulp, enough to flip a tie at the pooled output's requantization by a level. On
    the int8-static-conditioned digits model seed 1, served contiguous images, that put the twin
    0.108 of the largest logit from the deployed model (above the 0.05 tolerance); served
    channels_last images, 5.6e-7. Neural Cleanse already fed it channels_last; the audit did not."""
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        with graph.inserting_after(node):
            cl = graph.call_function(channels_last, (node,))
        node.replace_all_uses_with(cl, delete_user_cb=lambda user, cl=cl: user is not cl)  # all but the new node
    graph.lint()
    gm.recompile()
    return gm


def _fold_weight_dequant(gm: fx.GraphModule, targets: set[Any]) -> None:
    """Dequantize each int8 weight constant once, into a float buffer the graph reads, instead
    of at every forward: the same op on the same constants, computed once."""
    for n, node in enumerate(list(gm.graph.nodes)):
        if node.op != "call_function" or node.target not in targets:
            continue
        if not all(a.op == "get_attr" for a in node.args if isinstance(a, fx.Node)):
            continue
        args = [_attr(gm, a.target) if isinstance(a, fx.Node) else a for a in node.args]
        name = f"_qbd_dequantized_{n}"
        gm.register_buffer(name, node.target(*args, **node.kwargs).detach())
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(name)
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
