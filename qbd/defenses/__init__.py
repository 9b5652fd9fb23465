"""Defense registry: one catalog for the CLI and the pytest plugin.

Built-ins are lazy entries (names listed without importing torch). Third-party defenses join
through the `qbd.defenses` entry-point group (listed from package metadata, imported only when a
cell runs them) or a "module:Class" reference (`--qbd-defense`, `qbd run --defense module:Class`).

A defense class is instantiated as `cls(protocol=..., tier=...)`; see qbd.defenses.base.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from qbd.registry import Registry

ENTRY_POINT_GROUP = "qbd.defenses"

DEFENSES: Registry[Any] = Registry("defense")
DEFENSES.add_lazy("neural-cleanse", "qbd.defenses.neural_cleanse:NeuralCleanse")
DEFENSES.add_lazy("activation-clustering", "qbd.defenses.activation_clustering:ActivationClustering")
DEFENSES.add_lazy("strip", "qbd.defenses.strip:Strip")
DEFENSES.add_lazy("spectral-signatures", "qbd.defenses.spectral_signatures:SpectralSignatures")
DEFENSES.add_lazy("fine-pruning", "qbd.defenses.fine_pruning:FinePruning")

BUILTIN = tuple(DEFENSES.names())


@dataclass(frozen=True)
class Available:
    """A defense the user can name: `ref` is what loads it (a built-in name or "module:Class");
    `origin` says where it came from ("built-in", or the distribution of an entry point)."""

    name: str
    ref: str
    origin: str = "built-in"

    @property
    def builtin(self) -> bool:
        return self.origin == "built-in"


def available() -> list[Available]:
    """Built-ins, then the `qbd.defenses` entry points, sorted by name. Torch-free: entry points
    are read from metadata, not imported. One that shadows a built-in, repeats another's name or
    is malformed is skipped with a warning naming its distribution, never an error."""
    from importlib.metadata import entry_points

    out = {n: Available(n, n) for n in BUILTIN}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "an unknown distribution"
        problem = ("its name is a built-in defense's" if ep.name in BUILTIN
                   else f"another entry point ({out[ep.name].origin}) has that name" if ep.name in out
                   else "its value is not 'module:Class'" if ":" not in ep.value else None)
        if problem:
            warnings.warn(f"qbd: skipped the {ENTRY_POINT_GROUP} entry point {ep.name!r} = {ep.value!r} of {dist}: {problem}",
                          stacklevel=2)
            continue
        out[ep.name] = Available(ep.name, ep.value, f"entry point of {dist}")
    return sorted(out.values(), key=lambda a: a.name)

