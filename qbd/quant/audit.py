"""Measure what a quantization scheme did: which weights became integers, on how many levels,
with what error, how big the deployed state dict is, whether input gradients flow, and how
closely a surrogate's logits agree with the deployed model's.

Nothing here trusts a scheme's claim: `input_gradient` comes from a real backward pass.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from qbd.errors import ConfigError
from qbd.quant.base import Audit
from qbd.quant.common import model_device
from qbd.quant.warnings import NO_AUTOGRAD_KERNEL

AGREEMENT_BATCH = 64  # images per call when measuring agreement: whole batches, as the cells serve the runtime
PROBE_SEED = 0  # the probe input is the same on every run
PROBE_BATCH = 2


def float_tensor_count(model: nn.Module) -> int:
    """Elements of every floating-point tensor in the state dict: parameters (conv/linear
    weights and biases, BatchNorm affine) and buffers (BatchNorm running statistics, the
    Normalize mean and std). Integer buffers such as num_batches_tracked are counters, not
    model values, and are left out."""
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


def state_dict_bytes(module: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def max_levels_per_channel(values: torch.Tensor) -> int:
    """Most distinct values in one output channel (dim 0) of a quantized weight."""
    rows = values.detach().reshape(values.shape[0], -1).sort(dim=1).values
    # distinct values in a sorted row = 1 + number of steps between neighbours
    return int((1 + (rows[:, 1:] != rows[:, :-1]).sum(dim=1)).max())


def max_levels_of_codes(codes: torch.Tensor, quant_min: int, quant_max: int) -> int:
    """max_levels_per_channel for integer codes in [quant_min, quant_max], by counting (a
    bincount is several times faster than sorting a ResNet's 11 M weights)."""
    rows = codes.detach().reshape(codes.shape[0], -1).long() - quant_min
    width = quant_max - quant_min + 1
    idx = rows + width * torch.arange(rows.shape[0], device=rows.device).unsqueeze(1)
    counts = torch.bincount(idx.reshape(-1), minlength=rows.shape[0] * width).view(rows.shape[0], width)
    return int((counts > 0).sum(dim=1).max())


def max_rel_error(w: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> float:
    """max |w - Q(w)| / scale, scale per output channel (dim 0) or a scalar. Channels with
    scale 0 (all-zero weights) are exact and contribute 0."""
    err = (w.detach() - w_q.detach()).abs().reshape(w.shape[0], -1).amax(dim=1).double()
    s = scale.detach().double().reshape(-1).expand(w.shape[0])
    rel = torch.where(s > 0, err / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(err))
    return float(rel.max())


def measure_input_gradient(
    model: nn.Module, input_shape: Sequence[int], device: torch.device
) -> tuple[bool, str | None]:
    """Backward the sum of logits to a pixel-space probe input.

    True only when the input gradient exists, is finite and is not all zero. torch's
    "an autograd kernel was not registered" warning (backprop through quantized ops) is the
    expected evidence here: it is recorded in the note instead of leaking to the user; any
    other warning raised during the probe is re-emitted unchanged.
    """
    gen = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.rand((PROBE_BATCH, *input_shape), generator=gen).to(device).requires_grad_()
    notes: list[str] = []
    grad: torch.Tensor | None = None
    with warnings.catch_warnings(record=True) as caught:
        # "always": a repeated probe must record the warning again, not hit the once-registry.
        warnings.simplefilter("always")
        with torch.enable_grad():
            out = model(x)
            if out.requires_grad:
                (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
            else:
                notes.append("the deployed model's output has no grad_fn (no autograd through its ops)")
    for w in caught:
        if NO_AUTOGRAD_KERNEL.match(str(w.message)):
            notes.append(f"torch warned during backward: {str(w.message).split('. ')[0]}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if grad is None:
        if out.requires_grad:
            notes.append("backward reached no gradient for the input")
        return False, "; ".join(notes)
    if not bool(torch.isfinite(grad).all()):
        return False, "; ".join([*notes, "input gradient is not finite"])
    if not bool((grad != 0).any()):
        return False, "; ".join([*notes, "input gradient is all zero"])
    return True, "; ".join(notes) or None


def op_counts(names: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return dict(sorted(counts.items()))


def build_audit(
    *,
    scheme: str,
    differentiable: bool,
    fp32_model: nn.Module,
    deployed: nn.Module,
    input_shape: Sequence[int],
    engine: str | None,
    backend: str,
    bits: int | None,
    quantized_modules: Sequence[str],
    quantized_params: int,
    max_levels: int | None,
    max_rel_err: float | None,
    surrogate_rel_tolerance: float | None,
    kernel_ops: dict[str, int],
    device: torch.device,
    model_bytes: int | None = None,
    surrogate_agreement: dict[str, Any] | None = None,
) -> Audit:
    """`model_bytes`: the deployed artefact's size where it is not the state dict (an ONNX
    model); None measures torch.save(deployed.state_dict())."""
    total = float_tensor_count(fp32_model)
    flows, note = measure_input_gradient(deployed, input_shape, device)
    return Audit(
        scheme=scheme,
        differentiable=differentiable,
        input_gradient=flows,
        gradient_note=note,
        engine=engine,
        backend=backend,
        bits=bits,
        quantized_modules=list(quantized_modules),
        quantized_params=quantized_params,
        total_params=total,
        quantized_param_fraction=quantized_params / total if total else 0.0,
        max_levels_per_channel=max_levels,
        max_rel_error=max_rel_err,
        model_bytes=state_dict_bytes(deployed) if model_bytes is None else model_bytes,
        surrogate_rel_tolerance=surrogate_rel_tolerance,
        kernel_ops=kernel_ops,
        surrogate_agreement=surrogate_agreement,
    )


def _logits(model: nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    """float64 CPU logits of `model` served `batch` images per call, on the model's device."""
    device = model_device(model)
    with torch.no_grad():
        return torch.cat([model(images[i : i + batch].to(device)).to("cpu", torch.float64)
                          for i in range(0, len(images), batch)])


def _figures(sg: torch.Tensor, rt: torch.Tensor) -> dict[str, Any]:
    delta = float((sg - rt).abs().max())
    peak = float(rt.abs().max())
    finite = bool(torch.isfinite(rt).all() and torch.isfinite(sg).all())
    rel = delta / peak if peak > 0 else (0.0 if delta == 0 else float("inf"))
    return {
        "max_abs_logit_delta": delta if finite else None,
        "max_abs_runtime_logit": peak if finite else None,
        "max_rel_logit_delta": rel if finite else None,
        "top1_agreement": float((sg.argmax(1) == rt.argmax(1)).double().mean()),
    }


def _agreement(sg: torch.Tensor, rt: torch.Tensor, batch: int, tolerance: float | None, data: str) -> dict[str, Any]:
    out = {"data": data, "n_images": len(rt), "runtime_batch": batch, **_figures(sg, rt)}
    rel = out["max_rel_logit_delta"]
    out["rel_tolerance"] = tolerance
    out["within_tolerance"] = None if tolerance is None else bool(rel is not None and rel <= tolerance)
    return out


def measure_agreement(surrogate: nn.Module, runtime_model: nn.Module, images: torch.Tensor, batch: int = AGREEMENT_BATCH, *,
                      tolerance: float | None = None, data: str = "images") -> dict[str, Any]:
    """Surrogate vs runtime logits on `images` (float N x 3 x H x W in [0, 1]), both served
    `batch` images per call, as a cell serves them (onnx-int8-dynamic's runtime takes one
    activation range over the whole batch, so its logits depend on the batch; the per-image
    surrogate's do not). Each model gets the images on its own device; no autograd. JSON-able,
    keys as in docs/quantization.md. `tolerance`: the scheme's surrogate_rel_tolerance (None: no
    bound; rel_tolerance and within_tolerance are then None). `data` names the images. Needs no
    onnx: any two modules with logits work."""
    if images.dim() != 4 or not images.is_floating_point() or len(images) == 0:
        raise ConfigError(f"agreement needs a non-empty float N x 3 x H x W batch in [0, 1], got {tuple(images.shape)}"
                          f" {images.dtype}")
    if batch < 1:
        raise ConfigError(f"agreement batch must be >= 1, got {batch}")
    # the surrogate is served the same batches, so a batch-range surrogate (per_image=False) is
    # compared like for like
    return _agreement(_logits(surrogate, images, batch), _logits(runtime_model, images, batch), batch, tolerance, data)


def calibration_agreement(deployed: nn.Module, surrogate: nn.Module, batches: Sequence[torch.Tensor], tolerance: float,
                          per_image_runtime: bool) -> dict[str, Any]:
    """The apply-time agreement: on the calibration images, both served 64 at a time. With
    per_image_runtime, `per_image_runtime` adds the figures with the runtime served one image at
    a time (the per-image surrogate's own setting; the difference is the batch-range gap)."""
    images = torch.cat([b.float() for b in batches])
    sg = _logits(surrogate, images, AGREEMENT_BATCH)
    out = _agreement(sg, _logits(deployed, images, AGREEMENT_BATCH), AGREEMENT_BATCH, tolerance, "calibration")
    if per_image_runtime:
        one = _figures(sg, _logits(deployed, images, 1))
        out["per_image_runtime"] = {"runtime_batch": 1, **{k: one[k] for k in
                                    ("max_abs_logit_delta", "max_rel_logit_delta", "top1_agreement")}}
    return out
