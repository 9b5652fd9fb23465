"""A differentiable torch evaluator of a quantized ONNX graph: the surrogate of the
onnx-int8-* schemes.

It executes the graph ONNX Runtime runs, node by node, with torch ops, from the graph's own int8
weights, scales and zero points (no float weight from the original model):
  * DequantizeLinear of constant integers (weights, int32 biases) is folded once into a float
    buffer: (q - zero_point) * scale, per channel along the node's axis;
  * a QuantizeLinear -> DequantizeLinear pair on an activation is straight-through fake
    quantization at the graph's own scale and zero point (qbd.quant.surrogate.fake_quant_ste:
    identity gradient inside the range, zero where clipped);
  * DynamicQuantizeLinear (ORT's dynamic flow: uint8, range = [min(0, x), max(0, x)], scale
    (max - min) / 255, zero point round-half-even(-min / scale), scale 1 when max == min) is
    computed from the activation itself, detached, and applied with a straight-through
    gradient; ConvInteger / MatMulInteger then compute the integer product in float
    ((q_x - zp_x) * (q_w - zp_w), exact up to float32 accumulation).
Dynamic ranges are taken per image by default (index along dim 0): an image's surrogate logits
never depend on what else is in its batch. ORT takes one range over the batch it is served, so
against the runtime served batches the two differ by more than float rounding (measured, with
the stated bound, in docs/quantization.md); per_image=False takes ORT's batch range.

An op outside `OPS` is a ConfigError naming it, at construction. Nothing here imports
onnxruntime: the graph comes in as an onnx.ModelProto.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qbd.config import ConfigError
from qbd.quant.surrogate import fake_quant_ste

# ONNX TensorProto element types -> integer range, for Q/DQ (onnx.TensorProto.{UINT8, INT8})
_QRANGE = {2: (0, 255), 3: (-128, 127)}


@dataclass
class _Quantized:
    """A QuantizeLinear / DynamicQuantizeLinear output, kept symbolic: `x` is the float input,
    `scale` / `zero_point` its qparams (python floats for a static pair; tensors of shape
    [N, 1, ...] or [] for a dynamic one). Only Q/DQ-aware ops consume it."""

    x: torch.Tensor
    scale: Any
    zero_point: Any
    qmin: int
    qmax: int
    scale_name: str | None = None
    zp_name: str | None = None

    def codes(self) -> torch.Tensor:
        """q = clamp(round_half_even(x / scale) + zero_point) as float, with a straight-through
        gradient (1 / scale inside the range, 0 where clamped). x / scale, not x * (1 / scale):
        ORT divides, and the one-ulp difference flips values that sit on a rounding tie
        (measured: the multiply left 2 of 64 tiny-cnn images a level apart, the divide none)."""
        y = self.x / self.scale
        return (y + (torch.round(y) - y).detach() + self.zero_point).clamp(self.qmin, self.qmax)

    def fake(self) -> torch.Tensor:
        """(q - zero_point) * scale, straight-through. A static pair (python-float qparams) uses
        qbd's fast fake-quant kernel (it multiplies by 1 / scale, as ATen does): against ORT's
        requantizing int8 kernels it agreed exactly as well as the divide (tiny-cnn, measured)."""
        if isinstance(self.scale, float):
            return fake_quant_ste(self.x, self.scale, int(self.zero_point), self.qmin, self.qmax)
        return (self.codes() - self.zero_point) * self.scale


@dataclass(frozen=True)
class _Node:
    op: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]


Op = Callable[["OnnxTorchGraph", _Node, list[Any]], Any]
OPS: dict[str, Op] = {}


def op(*names: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        for n in names:
            OPS[n] = fn
        return fn

    return register


def _float(v: Any) -> torch.Tensor:
    if isinstance(v, _Quantized):
        raise ConfigError("a quantized activation reached a float op without a DequantizeLinear")
    return v


@op("Identity")
def _identity(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    return a[0]


@op("QuantizeLinear")
def _quantize(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    if n.attrs.get("axis", 1) != 1 and g.shape_of(n.inputs[1]) != ():
        raise ConfigError(f"onnx surrogate: per-channel QuantizeLinear on an activation ({n.name}) is not supported")
    scale, zp = g.scalar(n.inputs[1]), g.scalar(n.inputs[2]) if len(n.inputs) > 2 else 0.0
    qmin, qmax = _QRANGE[g.dtype_of(n.inputs[2]) if len(n.inputs) > 2 else 2]
    return _Quantized(_float(a[0]), float(scale), float(zp), qmin, qmax, n.inputs[1], n.inputs[2] if len(n.inputs) > 2 else None)


@op("DequantizeLinear")
def _dequantize(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    q = a[0]
    if not isinstance(q, _Quantized):
        raise ConfigError(f"onnx surrogate: DequantizeLinear {n.name} of a computed integer tensor is not supported")
    if (q.scale_name, q.zp_name) != (n.inputs[1], n.inputs[2] if len(n.inputs) > 2 else None):
        # a requantization (different qparams) is (q - zp') * s' of the same codes
        return (q.codes() - g.scalar(n.inputs[2]) if len(n.inputs) > 2 else q.codes()) * g.scalar(n.inputs[1])
    return q.fake()


@op("DynamicQuantizeLinear")
def _dynamic_quantize(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    x = _float(a[0])
    dims = tuple(range(1, x.dim())) if g.per_image else tuple(range(x.dim()))
    with torch.no_grad():
        lo = x.amin(dim=dims, keepdim=g.per_image).clamp(max=0)
        hi = x.amax(dim=dims, keepdim=g.per_image).clamp(min=0)
        scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 255)
        zp = torch.round((-lo / scale).clamp(0, 255))  # qmin - min / scale, saturated, half to even
    q = _Quantized(x, scale, zp, 0, 255)
    return q, scale, zp


def _int_operand(g: OnnxTorchGraph, n: _Node, a: list[Any], i: int) -> torch.Tensor:
    """Input i of ConvInteger / MatMulInteger minus its zero point (input i + 2), in float."""
    v = a[i]
    zp = a[i + 2] if len(a) > i + 2 and a[i + 2] is not None else 0.0
    v = v.codes() if isinstance(v, _Quantized) else v.float()
    if isinstance(zp, torch.Tensor):
        zp = zp.float()  # per image ([N, 1, ...]) for x; scalar, or per column for a MatMul B
        if n.op == "ConvInteger" and i == 1 and zp.numel() > 1:
            zp = zp.reshape(-1, *([1] * (v.dim() - 1)))  # a conv weight's per-output-channel zero point
    return v - zp


@op("ConvInteger")
def _conv_integer(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    return _conv(n, _int_operand(g, n, a, 0), _int_operand(g, n, a, 1), None)


@op("MatMulInteger")
def _matmul_integer(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    return torch.matmul(_int_operand(g, n, a, 0), _int_operand(g, n, a, 1))


@op("Cast")
def _cast(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    if n.attrs["to"] != 1:  # FLOAT: integer products are already float-valued here
        raise ConfigError(f"onnx surrogate: Cast to element type {n.attrs['to']} ({n.name}) is not supported")
    return _float(a[0]).float()


def _conv(n: _Node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    at = n.attrs
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ConfigError(f"onnx surrogate: Conv auto_pad={at['auto_pad']!r} ({n.name}) is not supported")
    k = w.dim() - 2
    pads = list(at.get("pads", [0] * 2 * k))
    if pads[:k] != pads[k:]:
        raise ConfigError(f"onnx surrogate: asymmetric Conv pads {pads} ({n.name}) are not supported")
    return F.conv2d(x, w, b, stride=tuple(at.get("strides", [1] * k)), padding=tuple(pads[:k]),
                    dilation=tuple(at.get("dilations", [1] * k)), groups=at.get("group", 1))


@op("Conv")
def _conv_op(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    return _conv(n, _float(a[0]), _float(a[1]), _float(a[2]) if len(a) > 2 and a[2] is not None else None)


@op("Gemm")
def _gemm(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    x, w = _float(a[0]), _float(a[1])
    if n.attrs.get("transA", 0):
        x = x.t()
    if n.attrs.get("transB", 0):
        w = w.t()
    y = n.attrs.get("alpha", 1.0) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + n.attrs.get("beta", 1.0) * _float(a[2])
    return y


@op("MatMul")
def _matmul(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    return torch.matmul(_float(a[0]), _float(a[1]))


@op("Add")
def _add(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    return _float(a[0]) + _float(a[1])


@op("Mul")
def _mul(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    return _float(a[0]) * _float(a[1])


@op("Relu")
def _relu(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    return F.relu(_float(a[0]))


@op("MaxPool")
def _maxpool(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    at = n.attrs
    k = list(at["kernel_shape"])
    pads = list(at.get("pads", [0] * 2 * len(k)))
    if pads[: len(k)] != pads[len(k):] or at.get("ceil_mode", 0) or len(n.outputs) > 1:
        raise ConfigError(f"onnx surrogate: MaxPool {n.name} with asymmetric pads, ceil_mode or indices is not supported")
    return F.max_pool2d(_float(a[0]), k, stride=list(at.get("strides", [1] * len(k))), padding=pads[: len(k)],
                        dilation=list(at.get("dilations", [1] * len(k))))


@op("GlobalAveragePool")
def _gap(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    return _float(a[0]).mean(dim=(2, 3), keepdim=True)


@op("ReduceMean")
def _reduce_mean(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    axes = a[1] if len(a) > 1 and a[1] is not None else n.attrs.get("axes")
    x = _float(a[0])
    if axes is None:
        axes = tuple(range(x.dim()))
    return x.mean(dim=tuple(int(i) for i in axes), keepdim=bool(n.attrs.get("keepdims", 1)))


@op("Flatten")
def _flatten(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    x = _float(a[0])
    axis = n.attrs.get("axis", 1) % max(x.dim(), 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@op("Reshape")
def _reshape(g: OnnxTorchGraph, n: _Node, a: list[Any]) -> Any:
    x = _float(a[0])
    shape = [int(s) for s in a[1]]
    if not n.attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


class OnnxTorchGraph(nn.Module):
    """forward(x) = the ONNX graph's single output, computed with torch ops (see the module
    docstring). Integer constants (shapes, axes) stay python tuples; every other constant is a
    buffer, so `.to(device)` moves the whole evaluator."""

    def __init__(self, model: Any, *, per_image: bool = True) -> None:
        from onnx import numpy_helper  # the caller checked that onnx is importable

        super().__init__()
        graph = model.graph
        if len(graph.input) != 1 or len(graph.output) != 1:
            raise ConfigError("onnx surrogate: expected a graph with one input and one output")
        self.per_image = per_image
        self.input_name, self.output_name = graph.input[0].name, graph.output[0].name
        arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self._dtypes = {t.name: t.data_type for t in graph.initializer}
        self._shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        nodes = [_node(n) for n in graph.node]
        for n in nodes:
            if n.op == "Constant":
                (out,) = n.outputs
                arrays[out] = numpy_helper.to_array(n.attrs["value"])
                self._dtypes[out] = n.attrs["value"].data_type
                self._shapes[out] = tuple(arrays[out].shape)
        nodes = [n for n in nodes if n.op != "Constant"]
        unsupported = sorted({n.op for n in nodes} - set(OPS))
        if unsupported:
            raise ConfigError(f"onnx surrogate: unsupported ONNX op(s) {', '.join(unsupported)}; supported: {', '.join(sorted(OPS))}")
        # fold DequantizeLinear of constants (weights, int32 biases) into float buffers, once
        kept: list[_Node] = []
        for n in nodes:
            if n.op == "DequantizeLinear" and all(i in arrays for i in n.inputs if i):
                arrays[n.outputs[0]] = _dequantize_const(arrays, n)
                self._shapes[n.outputs[0]] = tuple(arrays[n.outputs[0]].shape)
            else:
                kept.append(n)
        self._pyscalars = {k: float(v.reshape(-1)[0]) for k, v in arrays.items() if v.size == 1}
        used = {i for n in kept for i in n.inputs if i}
        self._consts: dict[str, tuple[int, ...]] = {}
        self._buffer_of: dict[str, str] = {}
        for name in sorted(used & set(arrays)):
            v = arrays[name]
            if v.dtype == np.int64:
                self._consts[name] = tuple(int(i) for i in v.reshape(-1))
            else:
                key = f"c{len(self._buffer_of)}"
                self.register_buffer(key, torch.from_numpy(np.array(v, copy=True)))
                self._buffer_of[name] = key
        self.nodes = kept

    def dtype_of(self, name: str) -> int:
        return self._dtypes[name]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._shapes.get(name, ())

    def scalar(self, name: str) -> float:
        """A constant scale / zero point as a python float (read at construction: no host sync)."""
        if name not in self._pyscalars:
            raise ConfigError(f"onnx surrogate: expected a constant scalar for {name}")
        return self._pyscalars[name]

    def _value(self, name: str, env: dict[str, Any]) -> Any:
        if not name:
            return None
        if name in env:
            return env[name]
        if name in self._consts:
            return self._consts[name]
        return getattr(self, self._buffer_of[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = {self.input_name: x}
        for n in self.nodes:
            out = OPS[n.op](self, n, [self._value(i, env) for i in n.inputs])
            outs: Sequence[Any] = out if isinstance(out, tuple) else (out,)
            for name, value in zip(n.outputs, outs, strict=False):
                env[name] = value
        return _float(env[self.output_name])


def _node(n: Any) -> _Node:
    from onnx import helper

    if n.domain not in ("", "ai.onnx"):
        raise ConfigError(f"onnx surrogate: unsupported ONNX op {n.domain}.{n.op_type} ({n.name})")
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    return _Node(n.op_type, n.name, tuple(n.input), tuple(n.output), attrs)


def _dequantize_const(arrays: dict[str, np.ndarray], n: _Node) -> np.ndarray:
    q = arrays[n.inputs[0]].astype(np.float64)
    scale = arrays[n.inputs[1]].astype(np.float64)
    zp = arrays[n.inputs[2]].astype(np.float64) if len(n.inputs) > 2 and n.inputs[2] else np.zeros_like(scale)
    if scale.ndim == 1 and scale.size > 1:
        axis = n.attrs.get("axis", 1) % q.ndim
        view = [1] * q.ndim
        view[axis] = -1
        scale, zp = scale.reshape(view), zp.reshape(view)
    return ((q - zp) * scale).astype(np.float32)
