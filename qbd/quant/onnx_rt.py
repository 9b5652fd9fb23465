"""onnx-int8-static / onnx-int8-dynamic: the model as ONNX Runtime's INT8 CPU path deploys it.

`features` and `head` are exported to ONNX as two graphs (float input and output, dynamic batch
dimension; the Normalize layer stays float in torch, so `embed` / `classify` stay separately
callable), quantized with onnxruntime.quantization, and run in onnxruntime InferenceSessions:
  static:  quant_pre_process, then quantize_static, QDQ format, per channel, int8 weights and
           uint8 activations (U8S8; ORT's default S8S8 left 12 of resnet18's 20 convs running
           in float between DQ and Q), MinMax calibration on the given holdout batches;
  dynamic: quant_pre_process, Gemm rewritten as MatMul + Add (ORT's dynamic quantizer has no
           Gemm), then quantize_dynamic (per_channel=True, int8 weights; activations uint8 per
           tensor at run time). ORT has no QDQ format for dynamic quantization.
Sessions run on the CPUExecutionProvider with one intra-op and one inter-op thread: one thread
per cell like the rest of qbd, and no ORT thread pool, so a defense can run in a forked child.

The audit reads what the runtime quantized from the quantized ONNX graph and counts the
quantized ops of the graph the session really runs (its optimized graph). The surrogate is a
torch evaluator of the quantized graph (qbd.quant.onnx_surrogate); its agreement with the
runtime, served whole batches of 64 as the cells serve it, is measured on the calibration images
at apply time (Audit.surrogate_agreement) and on any images with qbd.quant.audit.measure_agreement.

Deployed modules hold the quantized ONNX bytes qbd made itself; they refuse pickling (an ONNX
model from an untrusted source is not loaded here).
"""

from __future__ import annotations

import copy
import importlib
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from qbd.config import ConfigError
from qbd.models import Classifier
from qbd.quant.audit import calibration_agreement, max_levels_of_codes, max_rel_error, op_counts
from qbd.quant.base import QuantizedClassifier
from qbd.quant.common import weight_layers
from qbd.quant.scheme import Quantized, SchemeBase

INSTALL = "pip install 'pytest-qbd[onnx]'"
# onnxscript: torch.onnx.export(dynamo=True) translates the exported program with it
_DEPENDENCIES = ("onnx", "onnxruntime", "onnxruntime.quantization", "onnxscript")

# Ops of the runtime's optimized graph that run on integers or convert to / from them.
_QUANT_OPS = frozenset({
    "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul", "QuantizeLinear", "DequantizeLinear", "NhwcMaxPool", "QAttention",
})


def require_onnx() -> None:
    """ConfigError with the install line when the exporter, ONNX or ONNX Runtime is missing."""
    missing = []
    for name in _DEPENDENCIES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"the onnx-int8-* schemes need {', '.join(missing)}: {INSTALL}")


def session_options(optimized_path: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    # one thread and no pool: the caller's thread runs every kernel, so nothing is left running
    # for a forked child (a defense under a timeout) to wait on
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = optimized_path
        so.log_severity_level = 3  # ORT warns that a fully optimized graph is hardware specific: known, it is only read
    return so


def make_session(onnx_bytes: bytes, optimized_path: str | None = None) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(onnx_bytes, session_options(optimized_path), providers=["CPUExecutionProvider"])


class OrtPart(nn.Module):
    """One quantized part (`features` or `head`) running in an ONNX Runtime session: float
    tensor in, float tensor out (on the input's device), no autograd. A deep copy builds its own
    session from the same bytes."""

    def __init__(self, onnx_bytes: bytes, part: str) -> None:
        super().__init__()
        self.onnx_bytes = onnx_bytes
        self.part = part
        self._session = make_session(onnx_bytes)
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        (out,) = self._session.run([self._output], {self._input: arr})
        return torch.from_numpy(out).to(x.device)

    def pool_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation this part's global average pool reads, computed by ONNX Runtime on the
        same quantized graph with that tensor as an extra output: what a defense that reads the
        activations before the pool (AC, SS) must see of the deployed model. LookupError for a
        part with no global pool (the head)."""
        session = self.__dict__.get("_pool_session")
        if session is None:
            try:
                session = make_session(with_pool_input_output(self.onnx_bytes))
            except LookupError as e:
                session = str(e)
            except Exception as e:  # the runtime refused the extended graph (a non-float pool input, say): unreadable, not a crash
                session = f"ONNX Runtime cannot expose the {self.part} graph's pool input: {type(e).__name__}: {e}"
            object.__setattr__(self, "_pool_session", session)  # not a registered attribute: derived, rebuilt on copy
        if isinstance(session, str):
            raise LookupError(session)
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = session.run([POOL_INPUT], {self._input: arr})[0]
        return torch.from_numpy(out).to(x.device)

    def __deepcopy__(self, memo: dict[int, Any]) -> OrtPart:
        clone = type(self)(self.onnx_bytes, self.part)
        clone.train(self.training)
        memo[id(self)] = clone
        return clone

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("an ONNX Runtime part is not picklable: re-apply the scheme (and never unpickle a model"
                        " from an untrusted source)")

    def extra_repr(self) -> str:
        return f"part={self.part!r}, onnx_bytes={len(self.onnx_bytes)}"


POOL_INPUT = "qbd_pool_input"  # the extra graph output pool_input() reads


def with_pool_input_output(onnx_bytes: bytes) -> bytes:
    """The same graph with one more output, POOL_INPUT: the input of its last global average
    pool (GlobalAveragePool, or ReduceMean over H and W as torch.onnx exports it), through an
    Identity so the graph's own tensors stay as they are. LookupError when there is none."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(onnx_bytes)
    pools = [n for n in model.graph.node if n.op_type == "GlobalAveragePool" or (n.op_type == "ReduceMean" and _spatial_mean(model, n))]
    if not pools:
        raise LookupError("no global average pool in this ONNX graph")
    if pools[-1].input[0] in {o.name for o in model.graph.output}:
        raise LookupError("the pool's input is already a graph output")
    model.graph.node.append(helper.make_node("Identity", [pools[-1].input[0]], [POOL_INPUT], name="qbd_pool_input_identity"))
    model.graph.output.append(helper.make_tensor_value_info(POOL_INPUT, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def _spatial_mean(model: Any, node: Any) -> bool:
    """Whether a ReduceMean averages axes 2 and 3 of a 4-D tensor (its axes as an attribute, or
    from opset 18 as a constant second input)."""
    from onnx import numpy_helper

    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1:
        init = {t.name: t for t in model.graph.initializer}
        consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
        if node.input[1] in init:
            axes = numpy_helper.to_array(init[node.input[1]]).tolist()
        elif node.input[1] in consts:
            axes = numpy_helper.to_array(consts[node.input[1]].attribute[0].t).tolist()
    return axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]


def export_part(module: nn.Module, example: torch.Tensor) -> Any:
    """torch.onnx.export(dynamo=True): keeps the modules' parameter names as initializer names
    (the audit maps weights back to the Classifier) and folds BatchNorm into the convs."""
    example = example[:2] if len(example) >= 2 else example.repeat(2, *([1] * (example.dim() - 1)))
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, input_names=["input"],
                                output_names=["output"], dynamic_shapes=({0: batch},))
    return program.model_proto


def gemm_as_matmul(model: Any) -> Any:
    """Gemm(x, W, b) (alpha = beta = 1, no transA, constant W) -> MatMul(x, W') + b, the form
    ORT's dynamic quantizer handles (its IntegerOps registry has MatMul, not Gemm)."""
    from onnx import helper, numpy_helper

    model = copy.deepcopy(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for n in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[n.input[1]])
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), n.input[1]))
        has_bias = len(n.input) > 2 and n.input[2]
        mm_out = f"{n.output[0]}_matmul" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], n.input[1]], [mm_out], name=f"{n.name}_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name}_Add"))
    del graph.node[:]
    graph.node.extend(nodes)
    return model


class _Reader:
    """CalibrationDataReader over the calibration batches (float32 numpy)."""

    def __init__(self, name: str, batches: Sequence[np.ndarray]) -> None:
        self._items = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)

    def rewind(self) -> None:  # part of ORT's reader protocol; MinMax reads once
        pass


def quantize_part(fp_model: Any, kind: str, batches: Sequence[np.ndarray], tmp: str, tag: str) -> tuple[Any, bytes]:
    """(the pre-processed float graph, the quantized ONNX bytes)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre, out = (os.path.join(tmp, f"{tag}.{s}.onnx") for s in ("float", "pre", "int8"))
    onnx.save(fp_model if kind == "static" else gemm_as_matmul(fp_model), src)
    # ORT's recommended first step: symbolic shape inference and graph optimisation (BatchNorm
    # is already folded into the convs by the exporter)
    quant_pre_process(src, pre)
    if kind == "static":
        reader = type("Reader", (_Reader, CalibrationDataReader), {})("input", batches)
        quantize_static(pre, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    else:
        quantize_dynamic(pre, out, per_channel=True, weight_type=QuantType.QInt8)
    with open(out, "rb") as f:
        return onnx.load(pre), f.read()


def runtime_ops(onnx_bytes: bytes, tmp: str, tag: str) -> dict[str, int]:
    """Every op of the graph ONNX Runtime runs (the session's optimized graph), by count."""
    import onnx

    path = os.path.join(tmp, f"{tag}.optimized.onnx")
    make_session(onnx_bytes, path)
    return op_counts(n.op_type for n in onnx.load(path).graph.node)


def quantized_kernel_ops(ops: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in ops.items() if k.startswith("QLinear") or k in _QUANT_OPS}


def _consumer_axis(graph: Any, produced: str) -> int:
    """The output-channel axis of a weight, from the op that consumes it."""
    from onnx import helper

    for n in graph.node:
        if produced in list(n.input)[1:2]:
            if n.op_type in ("Conv", "ConvInteger", "QLinearConv"):
                return 0
            if n.op_type == "Gemm":
                trans_b = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "transB"), 0)
                return 0 if trans_b else 1
            return 1  # MatMul / MatMulInteger: B is K x M
    return 0


def weight_audit(float_graph: Any, q_model: Any, part: str, layer_names: set[str]) -> list[dict[str, Any]]:
    """Per quantized weight of one part: its Classifier name, elements, most levels in one
    output channel, and max |w - Q(w)| / scale against the float weight of the exported graph
    (BatchNorm folded). ORT names a quantized weight W's tensors W_quantized, W_scale,
    W_zero_point."""
    from onnx import helper, numpy_helper

    floats = {t.name: t for t in float_graph.initializer}
    inits = {t.name: t for t in q_model.graph.initializer}
    dq_axis = {n.input[0]: next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), 1)
               for n in q_model.graph.node if n.op_type == "DequantizeLinear"}
    dq_out = {n.input[0]: n.output[0] for n in q_model.graph.node if n.op_type == "DequantizeLinear"}
    out = []
    for name, t in inits.items():
        base = name.removesuffix("_quantized")
        if base == name or base not in floats or t.data_type not in (2, 3):  # uint8 / int8 weights only
            continue
        q = numpy_helper.to_array(t).astype(np.int64)
        scale = numpy_helper.to_array(inits[f"{base}_scale"]).astype(np.float64)
        zp = numpy_helper.to_array(inits[f"{base}_zero_point"]).astype(np.float64)
        axis = _consumer_axis(q_model.graph, dq_out.get(name, name))
        if scale.size > 1 and name in dq_axis:
            axis = dq_axis[name] % q.ndim
        w = numpy_helper.to_array(floats[base]).astype(np.float64)
        qc, wc = np.moveaxis(q, axis, 0), np.moveaxis(w, axis, 0)
        s, z = (scale, zp) if scale.size > 1 else (np.full(qc.shape[0], float(scale)), np.full(qc.shape[0], float(zp)))
        view = (-1,) + (1,) * (qc.ndim - 1)
        w_q = (qc - z.reshape(view)) * s.reshape(view)
        lo, hi = (0, 255) if t.data_type == 2 else (-128, 127)
        stem = base.removesuffix("weight").removesuffix(".")
        layer = f"{part}.{stem}" if stem else part
        out.append({
            "name": layer if layer in layer_names else f"{part}:{base}",
            "numel": int(q.size),
            "levels": max_levels_of_codes(torch.from_numpy(qc.copy()), lo, hi),
            "rel_error": max_rel_error(torch.from_numpy(wc.copy()), torch.from_numpy(w_q), torch.from_numpy(s.copy())),
        })
    return out


class _OnnxInt8(SchemeBase):
    name: str
    kind: str  # static | dynamic
    tolerance: float
    backend: str  # how ORT quantized, for the audit
    differentiable = False
    # The runtime is the scheme: there is no engine to choose (qbd's --engine names torch's).
    engines: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu",)  # CPUExecutionProvider; the surrogate moves anywhere
    needs_calibration = True

    def quantize(self, model: Classifier, calib: list[torch.Tensor], engine: str | None) -> Quantized:
        require_onnx()
        import onnx
        import onnxruntime as ort

        from qbd.quant.onnx_surrogate import OnnxTorchGraph

        fp = model
        with torch.no_grad():
            normalized = [fp.normalize(b.float()) for b in calib]
            embedded = [fp.features(z) for z in normalized]
        layer_names = {name for name, _ in weight_layers(fp)}
        parts: dict[str, OrtPart] = {}
        layers: list[dict[str, Any]] = []
        kernel_ops: dict[str, int] = {}
        q_models: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="qbd-onnx-") as tmp:  # ORT's quantization tools write files
            for part, module, data in (("features", fp.features, normalized), ("head", fp.head, embedded)):
                float_graph, q_bytes = quantize_part(export_part(module, data[0]), self.kind,
                                                     [d.numpy() for d in data], tmp, part)
                q_models[part] = onnx.load_from_string(q_bytes)
                layers += weight_audit(float_graph.graph, q_models[part], part, layer_names)
                for k, v in quantized_kernel_ops(runtime_ops(q_bytes, tmp, part)).items():
                    kernel_ops[k] = kernel_ops.get(k, 0) + v
                parts[part] = OrtPart(q_bytes, part)
        deployed = QuantizedClassifier.from_parts(fp, parts["features"], parts["head"])
        per_image = self.kind == "dynamic"

        def surrogate() -> QuantizedClassifier:
            # parsed afresh from the quantized bytes: shares no tensor with anything
            return QuantizedClassifier(copy.deepcopy(deployed.normalize), OnnxTorchGraph(q_models["features"], per_image=per_image),
                                       OnnxTorchGraph(q_models["head"], per_image=per_image), deployed.num_classes, deployed.feature_dim)

        return Quantized(
            deployed,
            backend=f"onnxruntime {ort.__version__} CPUExecutionProvider, {self.backend} (onnx {onnx.__version__},"
                    f" torch.onnx.export dynamo)",
            bits=8,
            quantized_modules=[x["name"] for x in layers],
            quantized_params=sum(x["numel"] for x in layers),
            max_levels=max((x["levels"] for x in layers), default=None),
            max_rel_err=max((x["rel_error"] for x in layers), default=None),
            kernel_ops=dict(sorted(kernel_ops.items())),
            surrogate_factory=surrogate,
            surrogate_rel_tolerance=self.tolerance,
            surrogate_agreement=calibration_agreement(deployed, surrogate(), calib, self.tolerance, per_image_runtime=per_image),
            model_bytes=sum(len(p.onnx_bytes) for p in parts.values()),
            engine="onnxruntime",
        )


class OnnxInt8Static(_OnnxInt8):
    name = "onnx-int8-static"
    kind = "static"
    backend = "quantize_static QDQ, int8 weights per channel, uint8 activations (U8S8), MinMax calibration"
    # Same int8 weights and qparams; ORT's int32 kernels requantize with their own float epilogue
    # and the twin computes in float, so a value near a rounding tie can land one level away and
    # propagate (as for int8-static).
    tolerance = 0.05


class OnnxInt8Dynamic(_OnnxInt8):
    name = "onnx-int8-dynamic"
    kind = "dynamic"
    backend = "quantize_dynamic per-channel QInt8 weights, uint8 dynamic activations"
    # The runtime takes one activation range over the batch it is served, the surrogate one per
    # image (a defense's answer about an image must not depend on its batch), so the runtime's
    # uint8 steps are coarser: served batches of 16 to 512, 0.006-0.010 of max |logit| (digits
    # model on calibration, held-out, triggered and mixed images; random tiny-cnn and resnet18),
    # against 1e-7 served one image at a time. The same order as static's one-level flips, so
    # static's bound (5x the largest figure measured).
    tolerance = 0.05


STATIC = OnnxInt8Static()
DYNAMIC = OnnxInt8Dynamic()
