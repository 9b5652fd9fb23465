"""The base a quantization scheme is written on: it checks the engine and the calibration data,
copies the caller's model, and measures the audit; a scheme writes only `quantize`.

A third-party scheme is one such class in its own module, named by a `qbd.schemes` entry point
(docs/quantization.md#your-own-scheme):

    class Int6PerTensor(SchemeBase):
        name = "int6-per-tensor"

        def quantize(self, model, calib, engine):
            return quantize_weights(model, my_rounding, backend="...", bits=6)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qbd.models import Classifier
from qbd.quant.audit import build_audit, max_levels_per_channel, max_rel_error
from qbd.quant.base import QuantizedClassifier, QuantizedModel
from qbd.quant.common import (
    calib_batches,
    check_engine,
    eval_copy,
    input_shape,
    model_device,
    require_cpu,
    weight_layers,
)


@dataclass
class Quantized:
    """What `quantize` returns: the deployed model and what only the scheme knows about it. The
    rest of the audit (parameter fraction, size, whether input gradients flow) is measured."""

    deployed: QuantizedClassifier
    backend: str  # which quantization flow produced the deployed model, in words
    bits: int | None = None
    quantized_modules: list[str] = field(default_factory=list)  # names in the Classifier
    quantized_params: int = 0
    max_levels: int | None = None  # most distinct integer levels in one output channel
    max_rel_err: float | None = None  # max |w - Q(w)| / scale
    kernel_ops: dict[str, int] = field(default_factory=dict)
    # a differentiable float twin for gradient defenses; None: the deployed model is one
    surrogate_factory: Callable[[], QuantizedClassifier] | None = None
    surrogate_rel_tolerance: float | None = None
    surrogate_agreement: dict[str, Any] | None = None
    model_bytes: int | None = None  # the artefact's size where it is not the state dict
    engine: str | None = None  # the audit's engine where it is not one of `engines` (a runtime's name)


# the bound a surrogate is held to when its scheme states none: int8-static's (a one-level flip of a
# value near a rounding tie, propagated)
DEFAULT_SURROGATE_TOLERANCE = 0.05


def _check_changed(name: str, model: Classifier, deployed: QuantizedClassifier, batch: torch.Tensor) -> None:
    """A scheme that says it quantizes must change the model: logits bit-identical to the float
    model's on the calibration images mean nothing was quantized, whatever its audit claims.

    A float model whose logits do not depend on the image (every feature dead, so the logits are
    the head's bias: what fine-pruning's repair can leave) is left unchecked: quantizing it changes
    nothing to see, and refusing it turned such a repair into a crash (found on a GPU)."""
    from qbd.errors import ConfigError

    with torch.no_grad():
        x = batch[:64]
        ours = model(x.to(model_device(model))).cpu()
        same = torch.equal(ours, deployed(x.to(model_device(deployed))).cpu())
    constant = len(ours) > 1 and bool((ours == ours[:1]).all())
    if same and not constant:
        raise ConfigError(f"scheme {name!r} quantizes nothing: its deployed model's logits equal the float model's on"
                          " the calibration images (set `quantizes = False` for a reference deployment)")


class SchemeBase:
    """A quantization scheme (the qbd.quant.base.Scheme protocol): subclass, set `name`, write
    `quantize`. `quantizes = False` marks the reference deployment (fp32), which quantizes nothing."""

    name: str = ""
    differentiable: bool = True  # do input gradients flow through the deployed model
    engines: tuple[str, ...] = ()  # accepted engine values, default first; () takes none
    devices: tuple[str, ...] = ("cpu", "cuda")  # where the deployed model can run
    needs_calibration: bool = False
    quantizes: bool = True
    # measure the surrogate against the deployed model on the calibration images when `quantize`
    # did not (a gradient defense's cells then carry the surrogate_agrees_with_runtime control);
    # int8-dynamic opts out: its runtime's ranges depend on the batch, its surrogate's on the image
    measures_agreement: bool = True

    def quantize(self, model: Classifier, calib: list[torch.Tensor], engine: str | None) -> Quantized:
        """`model`: a private eval-mode copy of the caller's float model (edit it freely); `calib`:
        clean float batches in [0, 1]; `engine`: one of `engines` (the first when not asked), or None."""
        raise NotImplementedError(f"{type(self).__name__} must define quantize()")

    def apply(
        self, model: Classifier, calib: torch.Tensor | Sequence[torch.Tensor] | None = None, engine: str | None = None
    ) -> QuantizedModel:
        from qbd.errors import ConfigError

        engine = check_engine(self.name, engine, self.engines)
        batches = calib_batches(calib)
        if self.needs_calibration and not batches:
            raise ConfigError(f"{self.name} needs calibration data: clean holdout batches N x 3 x H x W in [0, 1]")
        if "cuda" not in self.devices:
            require_cpu(self.name, model, batches)
        fp = eval_copy(model)
        q = self.quantize(fp, batches, engine)
        if self.quantizes and batches:
            _check_changed(self.name, model, q.deployed, batches[0])
        agreement = q.surrogate_agreement
        if agreement is None and q.surrogate_factory is not None and self.measures_agreement and batches:
            from qbd.quant.audit import calibration_agreement

            tolerance = q.surrogate_rel_tolerance if q.surrogate_rel_tolerance is not None else DEFAULT_SURROGATE_TOLERANCE
            agreement = calibration_agreement(q.deployed, q.surrogate_factory(), batches, tolerance, per_image_runtime=False)
        audit = build_audit(
            scheme=self.name,
            differentiable=self.differentiable,
            fp32_model=model,
            deployed=q.deployed,
            input_shape=input_shape(batches),
            engine=q.engine or engine,
            backend=q.backend,
            bits=q.bits,
            quantized_modules=q.quantized_modules,
            quantized_params=q.quantized_params,
            max_levels=q.max_levels,
            max_rel_err=q.max_rel_err,
            surrogate_rel_tolerance=q.surrogate_rel_tolerance,
            kernel_ops=q.kernel_ops,
            device=model_device(fp),
            model_bytes=q.model_bytes,
            surrogate_agreement=agreement,
        )
        return QuantizedModel(scheme=self.name, model=q.deployed, audit=audit, differentiable=self.differentiable,
                              surrogate_factory=q.surrogate_factory)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def quantize_weights(
    model: Classifier, rounding: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], *, backend: str, bits: int | None
) -> Quantized:
    """Weights-only fake quantization: every Conv2d and Linear weight of `model` (edited in place)
    replaced by `rounding(w) -> (w', scale)`, scale per output channel or a scalar. The model stays
    float, so it is its own surrogate."""
    names: list[str] = []
    quantized, levels, rel_err = 0, 0, 0.0
    with torch.no_grad():
        for name, layer in weight_layers(model):
            w = layer.weight
            w_q, scale = rounding(w)
            levels = max(levels, max_levels_per_channel(w_q))
            rel_err = max(rel_err, max_rel_error(w, w_q, scale))
            w.copy_(w_q)
            names.append(name)
            quantized += w.numel()
    return Quantized(QuantizedClassifier.from_parts(model, model.features, model.head), backend=backend, bits=bits,
                     quantized_modules=names, quantized_params=quantized, max_levels=levels or None,
                     max_rel_err=rel_err if names else None)
