"""Defense registry: one catalog for the CLI and the pytest plugin.

Built-ins are lazy entries (names listed without importing torch). Third-party defenses join
through the `qbd.defenses` entry-point group (listed from package metadata, imported only when a
cell runs them) or a "module:Class" reference (`--qbd-defense`, `qbd run --defense module:Class`).

A defense class is instantiated as `cls(protocol=..., tier=...)`; see qbd.defenses.base.
"""

from __future__ import annotations

from typing import Any

from qbd.registry import Available, Registry, installed

ENTRY_POINT_GROUP = "qbd.defenses"

DEFENSES: Registry[Any] = Registry("defense")
DEFENSES.add_lazy("neural-cleanse", "qbd.defenses.neural_cleanse:NeuralCleanse")
DEFENSES.add_lazy("activation-clustering", "qbd.defenses.activation_clustering:ActivationClustering")
DEFENSES.add_lazy("strip", "qbd.defenses.strip:Strip")
DEFENSES.add_lazy("spectral-signatures", "qbd.defenses.spectral_signatures:SpectralSignatures")
DEFENSES.add_lazy("fine-pruning", "qbd.defenses.fine_pruning:FinePruning")

BUILTIN = tuple(DEFENSES.names())
__all__ = ["BUILTIN", "DEFENSES", "ENTRY_POINT_GROUP", "Available", "available"]


def available() -> list[Available]:
    """Built-ins, then the `qbd.defenses` entry points, sorted by name. Torch-free: entry points
    are read from metadata, not imported (qbd.registry.installed)."""
    return installed("defense", ENTRY_POINT_GROUP, BUILTIN)
