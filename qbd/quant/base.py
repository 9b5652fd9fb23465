"""What every quantization scheme returns: the deployed model, its audit, and a differentiable
surrogate for defenses that need input gradients.

Input is pixel space [0, 1] everywhere; the Normalize layer stays float in every scheme.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from qbd.models import Classifier, Normalize


@dataclass(frozen=True)
class Audit:
    """What a scheme really did to a model; measured, not declared.

    quantized_param_fraction = quantized_params / total_params, where total_params counts every
    floating-point tensor of the FP32 model's state dict (conv and linear weights and biases,
    BatchNorm weights, biases and running statistics, the Normalize mean and std) and
    quantized_params counts the weights that the deployed model stores as integers (or, for
    simulated schemes, on an integer grid). BatchNorm folded into a quantized conv counts as
    not quantized.
    """

    scheme: str
    differentiable: bool  # the scheme's claim about the deployed model
    input_gradient: bool  # measured: a backward pass delivered a finite, non-zero input grad
    gradient_note: str | None  # why not, or the warning torch raised during the probe
    engine: str | None  # quantized engine / kernel family that ran the int8 ops
    backend: str  # which quantization flow produced the deployed model
    bits: int | None
    quantized_modules: list[str]  # names in the Classifier ("features.3.conv1", "head")
    quantized_params: int
    total_params: int
    quantized_param_fraction: float
    max_levels_per_channel: int | None  # most distinct integer levels in one output channel
    max_rel_error: float | None  # max |w - Q(w)| / scale over all quantized weights
    model_bytes: int  # torch.save(deployed.state_dict()) into a BytesIO
    # Stated bound on max |surrogate logits - deployed logits| / max |deployed logits|;
    # None where the surrogate is the deployed model itself.
    surrogate_rel_tolerance: float | None = None
    kernel_ops: dict[str, int] = field(default_factory=dict)  # quantized op / module -> count
    # Surrogate vs deployed logits measured at apply time on the calibration images (JSON-able:
    # n_images, max_abs_logit_delta, max_rel_logit_delta, top1_agreement, ...); None where not
    # measured (a scheme whose surrogate is the deployed model, or one that does not measure it).
    surrogate_agreement: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
