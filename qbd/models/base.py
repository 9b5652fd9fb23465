"""Model building blocks. Every model is `head(features(normalize(x)))` with x in pixel space
[0, 1]: normalisation is the first layer, so triggers and defenses never see normalised data.

`features` ends in the penultimate vector (global average pool of the last convolution), the
representation Activation Clustering and Spectral Signatures inspect; its entries are the last
convolution's channels, the units Fine-Pruning prunes; `head` is the linear classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # every qbd model starts here, whatever the scheme: integer pixels would be normalised
        # as 0..255 and give confident garbage, not an error
        if not x.is_floating_point():
            raise TypeError(f"qbd models take float images in [0, 1], N x 3 x H x W; got {x.dtype}. DefenseInputs holds"
                            " uint8 pixels: convert them with qbd.metrics.to_unit(x) (x.float() / 255)")
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    def __init__(self, normalize: Normalize, features: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation of pixel-space inputs."""
        return self.features(self.normalize(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from penultimate features (Fine-Pruning masks features in between)."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
