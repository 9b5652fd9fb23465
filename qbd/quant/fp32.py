"""fp32: the reference point. A copy of the model in eval mode; nothing is quantized."""

from __future__ import annotations

import torch

from qbd.models import Classifier
from qbd.quant.base import QuantizedClassifier
from qbd.quant.scheme import Quantized, SchemeBase


class FP32(SchemeBase):
    name = "fp32"
    quantizes = False  # the deployment every quantized one is compared with (qbd.effects)

    def quantize(self, model: Classifier, calib: list[torch.Tensor], engine: str | None) -> Quantized:
        return Quantized(QuantizedClassifier.from_parts(model, model.features, model.head), backend="float32 (no quantization)")


SCHEME = FP32()
