"""Model registry (lazy entries: names are listed without importing torch).

A factory is `factory(num_classes, mean, std) -> Classifier`; see qbd.models.base.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qbd.registry import Registry

if TYPE_CHECKING:
    from qbd.models.base import Classifier

MODELS: Registry[Any] = Registry("model")
MODELS.add_lazy("tiny-cnn", "qbd.models.tiny_cnn:tiny_cnn")
MODELS.add_lazy("resnet18-cifar", "qbd.models.resnet:resnet18_cifar")


def build_model(
    name: str, num_classes: int, mean: Sequence[float], std: Sequence[float], seed: int | None = None
) -> Classifier:
    """Build a registered model. With `seed`, its initial weights come from that seed without
    touching the caller's global RNG state."""
    import torch

    factory = MODELS.get(name)
    if seed is None:
        return factory(num_classes, mean, std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(num_classes, mean, std)


def __getattr__(name: str) -> Any:
    # `from qbd.models import Classifier` without importing torch at package import
    if name in ("Classifier", "Normalize"):
        from qbd.models import base

        return getattr(base, name)
    raise AttributeError(name)
