"""fp32: the reference point. A copy of the model in eval mode; nothing is quantized."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qbd.models import Classifier
from qbd.quant.audit import build_audit
from qbd.quant.base import QuantizedClassifier, QuantizedModel
from qbd.quant.common import calib_batches, check_engine, eval_copy, input_shape, model_device


class FP32:
    name = "fp32"
    differentiable = True
    engines: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu", "cuda")  # where the deployed model can run

    def apply(
        self,
        model: Classifier,
        calib: torch.Tensor | Sequence[torch.Tensor] | None = None,
        engine: str | None = None,
    ) -> QuantizedModel:
        check_engine(self.name, engine, self.engines)
        batches = calib_batches(calib)
        copy = eval_copy(model)
        deployed = QuantizedClassifier.from_parts(copy, copy.features, copy.head)
        audit = build_audit(
            scheme=self.name,
            differentiable=self.differentiable,
            fp32_model=model,
            deployed=deployed,
            input_shape=input_shape(batches),
            engine=None,
            backend="float32 (no quantization)",
            bits=None,
            quantized_modules=[],
            quantized_params=0,
            max_levels=None,
            max_rel_err=None,
            surrogate_rel_tolerance=None,
            kernel_ops={},
            device=model_device(copy),
        )
        return QuantizedModel(scheme=self.name, model=deployed, audit=audit, differentiable=True)


SCHEME = FP32()
