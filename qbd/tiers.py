"""What each tier runs: data sets, model, schemes, defenses, protocols. Torch-free, so the
pytest plugin can parametrize the matrix at collection time without importing torch.

- smoke: the embedded data sets with the tiny CNN on 2 CPU cores; defenses run with the
  smaller optimisation budgets their `budgets["smoke"]` declare (recorded in every Result).
- paper: the paper's setting: ResNet-18 on CIFAR-10 and GTSRB, the paper's schemes, full
  budgets; needs the data on disk and, to be practical, a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qbd.config import PROTOCOLS, cell_id


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


@dataclass(frozen=True, order=True)
class Cell:
    """One (dataset, scheme, defense, protocol) case; `control` "clean" marks the negative
    control (the same cell on a model trained without poisoning)."""

    dataset: str
    scheme: str
    defense: str
    protocol: str
    control: str = "backdoored"

    @property
    def id(self) -> str:
        ds = self.dataset if self.control == "backdoored" else f"{self.dataset}:clean"
        return cell_id(ds, self.scheme, self.defense, self.protocol)

    @property
    def row(self) -> str:
        """Its row's id: the cell id without ":clean" (a row covers both kinds of model)."""
        return cell_id(self.dataset, self.scheme, self.defense, self.protocol)

    @classmethod
    def parse(cls, text: str) -> Cell:
        """The cell of an id, "dataset[:clean]/scheme/defense[protocol]" (ValueError otherwise); a
        row id (no ":clean") parses as its backdoored cell."""
        m = _CELL_ID.match(text) if isinstance(text, str) else None
        if not m:
            raise ValueError(f"not a cell id: {text!r}; expected dataset[:clean]/scheme/defense[protocol]")
        return cls(m["dataset"], m["scheme"], m["defense"], m["protocol"], "clean" if m["clean"] else "backdoored")

    def to_dict(self) -> dict[str, str]:
        return {"dataset": self.dataset, "scheme": self.scheme, "defense": self.defense, "protocol": self.protocol,
                "control": self.control}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> Cell:
        if not isinstance(d, dict) or set(d) - {"control"} != {"dataset", "scheme", "defense", "protocol"}:
            raise ValueError(f"a cell is an object with dataset, scheme, defense, protocol (and control), got {d!r}")
        if d.get("control", "backdoored") not in CONTROLS:
            raise ValueError(f"a cell's control is one of {', '.join(CONTROLS)}, got {d['control']!r}")
        return cls(**d)


CONTROLS = ("backdoored", "clean")
# no part holds "/", "[", "]" or white space; the data set holds no ":" (its ":clean" marks the control)
_CELL_ID = re.compile(r"^(?P<dataset>[^/:\[\]\s]+)(?P<clean>:clean)?/(?P<scheme>[^/\[\]\s]+)/(?P<defense>[^/\[\]\s]+)"
                      r"\[(?P<protocol>[^/\[\]\s]+)\]$")


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
