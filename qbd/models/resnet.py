"""resnet18-cifar: the paper's model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qbd.models.base import Classifier, Normalize, conv_bn_relu


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def resnet18_cifar(num_classes: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    """ResNet-18 as the paper's text describes it: 3x3 stem (stride 1), no max-pool,
    four stages of two basic blocks (64-128-256-512), 11.17 M parameters for 10 classes."""
    layers: list[nn.Module] = conv_bn_relu(3, 64)
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(Normalize(mean, std), nn.Sequential(*layers), nn.Linear(512, num_classes))
