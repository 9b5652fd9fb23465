"""Shared fixtures for the quantization tests. No training: models are seeded random inits;
the "trained-ish" tiny CNN only gets BatchNorm running statistics from a few train-mode
forward passes on seeded random images, so activations have realistic ranges."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from qbd.models import Classifier, build_model

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
NUM_CLASSES = 10

# int8-static's default engine (x86) runs torchao PT2E; torchao is a dependency of qbd, but may be missing from an environment.
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed (pip install torchao)")


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def with_bn_stats(model: Classifier, seed: int) -> Classifier:
    model.train()
    with torch.no_grad():
        for i in range(4):
            model(images(32, seed + i))
    return model.eval()


@pytest.fixture(scope="session")
def tiny() -> Classifier:
    """tiny-cnn, seed 0, BatchNorm statistics set. Tests must not modify it (schemes copy)."""
    return with_bn_stats(build_model("tiny-cnn", NUM_CLASSES, MEAN, STD, seed=0), seed=100)


@pytest.fixture(scope="session")
def resnet() -> Classifier:
    """resnet18-cifar, untrained (seed 0), eval mode."""
    return build_model("resnet18-cifar", NUM_CLASSES, MEAN, STD, seed=0).eval()


@pytest.fixture(scope="session")
def calib() -> torch.Tensor:
    return images(64, seed=1)


@pytest.fixture(scope="session")
def probe() -> torch.Tensor:
    return images(32, seed=2)
