"""int8-static: deployment-faithful post-training static INT8 of every conv and linear
(weights and activations), calibrated on clean holdout batches, running real int8 CPU kernels.

`features` and `head` are quantized as two graphs, each with float input and float output, so
`embed` (float penultimate features, dequantized) and `classify` stay separately callable and
Fine-Pruning can mask features between them; the Normalize layer stays float. The engine picks
the flow:
  x86 (default): torchao PT2E + X86InductorQuantizer, lowered to oneDNN int8 kernels;
  fbgemm, qnnpack: torch.ao FX graph mode (prepare_fx / convert_fx), quantized modules running
  on that quantized engine: the tested fallback, should PT2E break on a torch/torchao pair.
Deployed graphs have no autograd; the surrogate is the float twin with identical (BN-folded)
dequantized weights and straight-through fake quantization at the calibrated scales.
"""

from __future__ import annotations

import copy

import torch

from qbd.models import Classifier
from qbd.quant.audit import calibration_agreement, op_counts
from qbd.quant.base import QuantizedClassifier
from qbd.quant.scheme import Quantized, SchemeBase
from qbd.quant.static_flow import StaticFlow
from qbd.registry import Registry

FLOWS: Registry[StaticFlow] = Registry("int8-static engine")
FLOWS.add_lazy("x86", "qbd.quant.static_pt2e:FLOW")
FLOWS.add_lazy("fbgemm", "qbd.quant.static_fx:FLOW")
FLOWS.add_lazy("qnnpack", "qbd.quant.static_fx:FLOW")

# Surrogate logits match the deployed model within this fraction of max |deployed logit|.
# Same int8 weights and qparams; the int32 kernels and the float twin round the same
# pre-activations differently only near a rounding tie, and a flipped level propagates.
SURROGATE_REL_TOLERANCE = 0.05


class Int8Static(SchemeBase):
    name = "int8-static"
    differentiable = False
    engines: tuple[str, ...] = ("x86", "fbgemm", "qnnpack")  # default first
    devices: tuple[str, ...] = ("cpu",)  # torch's int8 kernels are CPU-only; the surrogate can move
    needs_calibration = True

    def quantize(self, model: Classifier, calib: list[torch.Tensor], engine: str | None) -> Quantized:
        assert engine is not None
        flow = FLOWS.get(engine)
        fp = model
        with torch.no_grad():
            normalized = [fp.normalize(b) for b in calib]
            embedded = [fp.features(z) for z in normalized]
        features = flow.quantize_part(fp.features, normalized, engine)
        head = flow.quantize_part(fp.head, embedded, engine)
        deployed = QuantizedClassifier.from_parts(fp, features.deployed, head.deployed)

        layers = [(f"features.{s.name}" if s.name else "features", s) for s in features.layers]
        layers += [(f"head.{s.name}" if s.name else "head", s) for s in head.layers]

        def surrogate() -> QuantizedClassifier:
            # its own copy of everything: moving or editing the twin leaves the deployed model alone
            normalize = copy.deepcopy(deployed.normalize)
            return QuantizedClassifier(
                normalize, features.twin(), head.twin(), deployed.num_classes, deployed.feature_dim
            )

        return Quantized(
            deployed,
            backend=flow.backend,
            bits=8,
            quantized_modules=[name for name, _ in layers],
            quantized_params=sum(s.numel for _, s in layers),
            max_levels=max((s.levels for _, s in layers), default=None),
            max_rel_err=max((s.rel_error for _, s in layers), default=None),
            kernel_ops=op_counts(features.kernel_ops + head.kernel_ops),
            surrogate_factory=surrogate,
            surrogate_rel_tolerance=SURROGATE_REL_TOLERANCE,
            # measured as for the ONNX Runtime schemes, so a gradient defense's Result can say how
            # close the model it inspected is to the one deployed (static ranges: batch-independent)
            surrogate_agreement=calibration_agreement(deployed, surrogate(), calib, SURROGATE_REL_TOLERANCE,
                                                      per_image_runtime=False),
        )


SCHEME = Int8Static()
