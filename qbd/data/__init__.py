"""Data set registry. Entries are lazy so names can be listed without importing torch.

A loader is `load(spec: DatasetSpec, root: pathlib.Path | None) -> DataSplit`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from qbd.config import DatasetSpec
from qbd.registry import Registry

if TYPE_CHECKING:
    from qbd.data.base import DataSplit

DATASETS: Registry = Registry("dataset")
DATASETS.add_lazy("synthetic", "qbd.data.synthetic:load")
DATASETS.add_lazy("digits", "qbd.data.digits:load")
DATASETS.add_lazy("cifar10", "qbd.data.cifar10:load")
DATASETS.add_lazy("gtsrb", "qbd.data.gtsrb:load")

DATA_ROOT_ENV = "QBD_DATA_ROOT"


def resolve_root(root: str | os.PathLike[str] | None) -> Path | None:
    """--data-root wins, then $QBD_DATA_ROOT, else None (embedded data sets need none)."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else None


def load_dataset(spec: DatasetSpec, root: str | os.PathLike[str] | None = None) -> DataSplit:
    return DATASETS.get(spec.name)(spec, resolve_root(root))
