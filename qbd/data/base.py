"""The one data contract every loader returns: uint8 images in pixel space."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qbd.errors import DataUnavailableError

__all__ = ["DataSplit", "DataUnavailableError"]


@dataclass(frozen=True)
class DataSplit:
    """Train and test images as uint8 tensors N x 3 x H x W (RGB) with int64 labels.

    `mean` and `std` (per channel, in [0, 1] units) are the normalisation the model's first
    layer applies; they are fixed constants per data set so that keys and weights do not
    depend on how much data was loaded.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        for label, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"{self.name} {label} images must be uint8 N x 3 x H x W, got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name} {label} labels must be int64 of length {x.shape[0]}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise ValueError(f"{self.name} {label} labels fall outside 0..{len(self.classes) - 1}")

    @classmethod
    def from_numpy(cls, name: str, train: tuple[Any, Any], test: tuple[Any, Any], classes: tuple[str, ...],
                   mean: tuple[float, float, float], std: tuple[float, float, float]) -> DataSplit:
        """A split from numpy (images, labels) pairs, as every loader reads them."""
        return cls(name=name, x_train=torch.from_numpy(np.ascontiguousarray(train[0])), y_train=torch.from_numpy(train[1]),
                   x_test=torch.from_numpy(np.ascontiguousarray(test[0])), y_test=torch.from_numpy(test[1]),
                   classes=classes, mean=mean, std=std)

    def fingerprint(self) -> str:
        """sha256 of every image, label and class name (about 0.1 s for 15k 32x32 images)."""
        import hashlib

        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        h.update("\x00".join(self.classes).encode())
        return h.hexdigest()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])
