"""What every quantization scheme returns: the deployed model, its audit, and a differentiable
surrogate for defenses that need input gradients.

Input is pixel space [0, 1] everywhere; the Normalize layer stays float in every scheme.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from qbd.models import Classifier, Normalize
from qbd.result_types import Audit


class QuantizedClassifier(Classifier):
    """`head(features(normalize(x)))` with any modules as features and head (quantized
    graphs, dynamic int8 linears), plus `classify(features) = head(features)`, so that
    Fine-Pruning can mask the penultimate features between `embed` and `classify`."""

    def __init__(
        self, normalize: Normalize, features: nn.Module, head: nn.Module, num_classes: int, feature_dim: int
    ) -> None:
        super().__init__(normalize, features, head)  # type: ignore[arg-type]
        self._num_classes = num_classes
        self._feature_dim = feature_dim

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def feature_dim(self) -> int:
        return self._feature_dim

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    @classmethod
    def from_parts(
        cls, like: Classifier, features: nn.Module, head: nn.Module, normalize: Normalize | None = None
    ) -> QuantizedClassifier:
        """Shapes (and, unless given, the Normalize layer) from the float model `like`."""
        norm = like.normalize if normalize is None else normalize
        return cls(norm, features, head, like.num_classes, like.feature_dim)


@dataclass(eq=False)
class QuantizedModel:
    """The result of `Scheme.apply`. `model` is what would be deployed."""

    scheme: str
    model: QuantizedClassifier
    audit: Audit
    differentiable: bool
    # Builds the float twin on demand (None: the deployed model is differentiable already).
    surrogate_factory: Callable[[], QuantizedClassifier] | None = None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.classify(features)

    def surrogate(self) -> QuantizedClassifier:
        """A model with the same forward/embed/classify whose input gradients flow; for a
        differentiable scheme, the deployed model itself."""
        if self.surrogate_factory is None:
            return self.model
        return self.surrogate_factory()


@runtime_checkable
class Scheme(Protocol):
    name: str
    differentiable: bool  # do input gradients flow through the deployed model
    engines: tuple[str, ...]  # accepted `engine` values; () when the scheme takes none
    # device types the deployed model runs on (qbd.evaluate places it; a scheme without the
    # attribute is taken as CPU-only). The model is quantized on the CPU either way.
    devices: tuple[str, ...]

    def apply(
        self,
        model: Classifier,
        calib: torch.Tensor | Sequence[torch.Tensor] | None,
        engine: str | None = None,
    ) -> QuantizedModel: ...
