"""qbd's pytest plugin (registered once, through the `pytest11` entry point).

Importing this module must stay cheap: no torch until a qbd fixture is used.
"""

from __future__ import annotations

import pytest

MARKERS = {
    "smoke": "the smoke matrix on the embedded data sets (CPU, tiny model)",
    "paper": "the paper tier: ResNet-18 on CIFAR-10 / GTSRB (needs the data, practical on a GPU)",
    "gpu": "needs a CUDA device",
    "bench": "pytest-benchmark timings (run with -p no:xdist)",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
