"""tiny-cnn: the CPU tiers' model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from qbd.models.base import Classifier, Normalize, conv_bn_relu


def tiny_cnn(num_classes: int, mean: Sequence[float], std: Sequence[float], width: int = 16) -> Classifier:
    """~60k parameters: four 3x3 conv blocks (16-32-64-64), three max-pools, global average
    pool. Fast enough to train in about a minute on 2 CPU cores."""
    w = width
    layers: list[nn.Module] = []
    layers += conv_bn_relu(3, w) + [nn.MaxPool2d(2)]
    layers += conv_bn_relu(w, 2 * w) + [nn.MaxPool2d(2)]
    layers += conv_bn_relu(2 * w, 4 * w) + [nn.MaxPool2d(2)]
    layers += conv_bn_relu(4 * w, 4 * w)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(Normalize(mean, std), nn.Sequential(*layers), nn.Linear(4 * w, num_classes))
