"""The plugin's per-session state (QbdState, kept in config.stash) and the names it shares with
qbd.suite: markers and the user properties that carry Results from workers. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# prefixed: the plugin is installed in every project of the environment, whose own markers it must not claim
MARKERS = {
    "qbd_smoke": "qbd's smoke matrix on the embedded data sets (CPU, tiny model)",
    "qbd_paper": "qbd's paper tier: ResNet-18 on CIFAR-10 / GTSRB (needs the data, practical on a GPU)",
    "qbd_gpu": "needs a CUDA device",
}


RESULT_PROPERTY = "qbd_result"


ATTACK_PROPERTY = "qbd_attack"


AUDIT_PROPERTY = "qbd_audit"


QBD_ARGS = ("qbd_cell", "qbd_attack_case", "qbd_audit_case")  # the arguments qbd parametrizes


LOAD_PROPERTY = "qbd_load"  # a worker loaded a model (its data, weights, quantized copies)


STATE = pytest.StashKey["QbdState"]()


@dataclass
class QbdState:
    """Per-session state, kept in config.stash (never in module globals)."""

    tier: str
    protocols: tuple[str, ...]
    defenses: list[str]  # built-in names and --qbd-defense module:Class references, sorted by cell name
    defense_names: dict[str, str]  # reference -> the defense's `name`
    seeds: int
    model_files: dict[str, Any]  # data set -> qbd.fetch.Source
    defense_timeout: float | None
    device: str  # as asked (auto, cpu, cuda, cuda:N); each worker resolves it (qbd.devices)
    cache_dir: str | None
    data_root: str | None
    report_dir: str | None
    accept: bool
    expectations_path: Path | None
    expectations: Any = None  # qbd.expectations.Expectations, loaded at configure time
    defenses_chosen: bool = False  # --qbd-defense named the matrix's defenses (no installed one joins unnamed)
    results: list[dict[str, Any]] = field(default_factory=list)
    accept_notes: list[str] = field(default_factory=list)
    attack: dict[str, dict[str, Any]] = field(default_factory=dict)
    audit: dict[str, dict[str, Any]] = field(default_factory=dict)
    gate: Any = None  # qbd.gate.Gate of the whole run, judged at session end
    gate_only: list[str] = field(default_factory=list)  # what qbd.gate fails though every test passed
    pending_loads: list[dict[str, Any]] = field(default_factory=list)  # worker side, until the next report
    attack_name: str = "badnet"  # --qbd-attack: the backdoored models' attack (qbd.presets.attack_preset)
    memo: dict[str, Any] = field(default_factory=dict)  # qbd.memo.for_store's reuse, fresh and session
    datasets: tuple[str, ...] | None = None  # --qbd-dataset: a subset of the tier's (None: all)
    schemes: tuple[str, ...] | None = None  # --qbd-scheme: schemes of the catalog (None: the tier's)
    _matrix: dict[str, str] | None = None  # ref -> name with the entry points, once the matrix is built

    def matrix(self) -> dict[str, str]:
        """Every defense of the matrix, ref -> cell name, sorted by name: the built-ins and the
        --qbd-defense references, then the `qbd.defenses` entry points, read from package
        metadata when the matrix is first parametrized (never at configure time, so a project
        without qbd tests never touches them) and imported only when one of their cells runs."""
        if self._matrix is None:
            import warnings

            from qbd.defenses import available

            names = dict(self.defense_names)
            for a in [] if self.defenses_chosen else available():
                if a.builtin:
                    continue
                if a.name in names.values():
                    warnings.warn(f"qbd: the defense {a.name!r} of the {a.origin} is skipped: --qbd-defense names one"
                                  " with that name", pytest.PytestWarning, stacklevel=2)
                    continue
                names[a.name] = a.name  # load_defense resolves entry-point names
            self._matrix = dict(sorted(names.items(), key=lambda kv: kv[1]))
        return self._matrix
    loads: list[dict[str, Any]] = field(default_factory=list)  # controller side: every worker's loads

    def by_rates(self, row_id: str) -> bool:
        """Whether the row's cells are judged by its rates (qbd.expectations.Expectations.by_rates):
        the plugin's backdoored models all carry the default BadNet (seeded per model)."""
        from qbd.config import AttackSpec, to_dict

        return self.expectations is not None and self.expectations.by_rates(row_id, to_dict(AttackSpec()), self.seeds)
