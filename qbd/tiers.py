"""What each tier runs: data sets, model, schemes, defenses, protocols. Torch-free, so the
pytest plugin can parametrize the matrix at collection time without importing torch.

- smoke: the embedded data sets with the tiny CNN on 2 CPU cores; defenses run with the
  smaller optimisation budgets their `budgets["smoke"]` declare (recorded in every Result).
- paper: the paper's setting: ResNet-18 on CIFAR-10 and GTSRB, the paper's schemes, full
  budgets; needs the data on disk and, to be practical, a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from qbd.config import PROTOCOLS
from qbd.result_types import Cell


@dataclass(frozen=True)
class Tier:
    name: str
    datasets: tuple[str, ...]
    model: str
    schemes: tuple[str, ...]
    protocols: tuple[str, ...] = PROTOCOLS
    holdout: int = 500
    stream: int = 400
    # the default --device / --qbd-device: smoke's verdicts are declared for models trained and
    # inspected on the CPU (its pinned zoo); the paper tier wants a GPU when there is one
    device: str = "cpu"


TIERS = {
    "smoke": Tier("smoke", ("digits", "synthetic"), "tiny-cnn", ("fp32", "int4-sim", "int8-dynamic", "int8-static")),
    "paper": Tier("paper", ("cifar10", "gtsrb"), "resnet18-cifar", ("fp32", "int4-sim", "int8-dynamic", "int8-static"),
                  holdout=1000, stream=1000, device="auto"),
}


def cells(tier: Tier, defenses: list[str], *, datasets: tuple[str, ...] | None = None, schemes: tuple[str, ...] | None = None,
          protocols: tuple[str, ...] | None = None, control: str = "backdoored") -> list[Cell]:
    """The matrix, sorted, so every xdist worker collects the same cells in the same order."""
    out = [
        Cell(d, s, f, p, control)
        for d in (datasets or tier.datasets)
        for s in (schemes or tier.schemes)
        for f in defenses
        for p in (protocols or tier.protocols)
    ]
    return sorted(set(out))
