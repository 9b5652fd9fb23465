"""The matrix's parametrized cases: every (data set, scheme, defense, protocol) cell and seed, the
attack and audit cases, their scheduling groups and marks. Torch-free."""

from __future__ import annotations

from typing import Any

import pytest

from qbd.plugin.options import data_missing
from qbd.plugin.state import QbdState


def _group(dataset: str, kind: str, seed: int, scheme: str) -> str:
    """The scheduling group of a case: its model and scheme. Under xdist (qbd.xdist_groups) a
    worker loads a model at most once and each (model, scheme) is quantized by one worker only;
    grouping by model alone would leave all but 4 workers idle on the one-seed matrix (2 data
    sets x 2 kinds)."""
    return f"qbd:{dataset}:{kind}:seed{seed}:{scheme}"


def matrix_cases(state: QbdState) -> dict[str, list[tuple[str, tuple[Any, ...], str]]]:
    """Every parametrized qbd argument's cases: {argname: [(param id, values, group)]}. The same
    list parametrizes the tests (workers) and groups them for scheduling (controller)."""
    from qbd.tiers import TIERS as TIER_TABLE
    from qbd.tiers import Cell

    tier = TIER_TABLE[state.tier]
    datasets, schemes = state.datasets or tier.datasets, state.schemes or tier.schemes
    cells = []
    for ds in datasets:
        for name in state.matrix().values():
            for proto in state.protocols:
                cells += [Cell(ds, s, name, proto) for s in schemes]
                # the negative control on every scheme, as in `qbd run`: a defense that false-alarms only
                # once the clean model is quantized is a blindspot too
                cells += [Cell(ds, s, name, proto, "clean") for s in schemes]
    cells.sort(key=lambda c: c.id)
    pairs = sorted((ds, s) for ds in datasets for s in schemes)
    attack = [(f"{ds}/{s}", ((ds, s),), _group(ds, "backdoored", 0, s)) for ds, s in pairs]
    return {
        # one seed: seed 0 (the qbd_seed fixture), today's ids
        "qbd_cell": [(c.id, (c,), _group(c.dataset, c.control, 0, c.scheme)) for c in cells],
        "qbd_cell+qbd_seed": [(f"{c.id}-seed{s}", (c, s), _group(c.dataset, c.control, s, c.scheme))
                              for c in cells for s in range(state.seeds)],
        "qbd_attack_case": attack,
        "qbd_audit_case": attack,
    }


def groups_by_param_id(state: QbdState) -> dict[str, str]:
    """{param id: group} of every case this session parametrizes (for qbd.xdist_groups)."""
    several = state.seeds > 1
    return {pid: group for arg, cases in matrix_cases(state).items() if arg != ("qbd_cell" if several else "qbd_cell+qbd_seed")
            for pid, _, group in cases}


def marks(state: QbdState, dataset: str, group: str | None = None) -> list[Any]:
    marks: list[Any] = [getattr(pytest.mark, f"qbd_{state.tier}")]
    if group is not None:
        marks.append(pytest.mark.xdist_group(group))
    if state.tier == "paper":
        marks.append(pytest.mark.qbd_gpu)
        why = data_missing(dataset, state.data_root)
        if why:
            marks.append(pytest.mark.skip(reason=why))
    return marks
