"""Small helpers every scheme needs: copying the caller's model, reading calibration data,
and finding the weights a scheme quantizes."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from qbd.config import ConfigError
from qbd.models import Classifier

DEFAULT_INPUT_SHAPE = (3, 32, 32)  # probe shape when a scheme gets no calibration data


def eval_copy(model: Classifier) -> Classifier:
    """Quantization never touches the caller's model: work on a deep copy in eval mode."""
    if not isinstance(model, Classifier):
        raise TypeError(f"expected a qbd.models.Classifier, got {type(model).__name__}")
    return copy.deepcopy(model).eval()


def model_device(model: nn.Module) -> torch.device:
    """Where the model's tensors live (its first tensor's device); a quantized model's state dict
    also holds non-tensors (packed params, dtypes), skipped."""
    for t in model.state_dict().values():
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def require_cpu(scheme: str, model: nn.Module, calib: Sequence[torch.Tensor]) -> None:
    """torch's int8 kernels (FBGEMM, QNNPACK, oneDNN) run on CPU only."""
    devices = {model_device(model)} | {b.device for b in calib}
    if any(d.type != "cpu" for d in devices):
        raise ConfigError(
            f"scheme {scheme!r} runs int8 CPU kernels only; move the model and the calibration"
            f" data to the CPU first (got {', '.join(sorted(str(d) for d in devices))})"
        )


def calib_batches(calib: torch.Tensor | Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    """Accept one N x 3 x H x W batch or a sequence of them; pixel space [0, 1]."""
    if calib is None:
        return []
    batches = [calib] if isinstance(calib, torch.Tensor) else list(calib)
    for b in batches:
        if b.dim() != 4 or b.shape[1] != 3 or not b.is_floating_point() or b.numel() == 0:
            raise ConfigError(
                f"calibration batches must be non-empty float N x 3 x H x W tensors, got {tuple(b.shape)}"
            )
    if len({tuple(b.shape[1:]) for b in batches}) > 1:
        raise ConfigError("calibration batches must share one image size")
    return batches


def input_shape(batches: Sequence[torch.Tensor]) -> tuple[int, ...]:
    return tuple(batches[0].shape[1:]) if batches else DEFAULT_INPUT_SHAPE


def check_engine(scheme: str, engine: str | None, accepted: tuple[str, ...]) -> str | None:
    """None means the scheme's default (the first accepted engine)."""
    if engine is None:
        return accepted[0] if accepted else None
    if not accepted:
        raise ConfigError(f"scheme {scheme!r} takes no quantized engine (got {engine!r})")
    if engine not in accepted:
        raise ConfigError(f"scheme {scheme!r}: engine {engine!r} not supported; valid: {', '.join(accepted)}")
    return engine


def weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Conv2d | nn.Linear]]:
    """Every Conv2d and Linear, by its name in the Classifier, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            yield name, module
