"""Positive controls beyond the default BadNet: another target class (4), trigger pattern
(checkerboard), size (5) and corner (top-left), so no defense (or test) can assume class 0 or
the bottom-right corner. The setting is one of the attack spread's (qbd.presets.SPREAD_ATTACKS),
whose rows the shipped table declares over five pinned models per data set; here its seed-0
models of both data sets, fp32, canonical protocol, each cell judged by its row's single-seed
rule (an outcome the row measured), so a cell fails the moment the defense does something its
row never did."""

from __future__ import annotations

import pytest

from qbd.config import DatasetSpec, Gates
from qbd.defenses import BUILTIN
from qbd.presets import SPREAD_ATTACKS

DEFENSES = tuple(sorted(BUILTIN))  # the built-in catalog (qbd.defenses), not a copy of its names
SETTING = "checkerboard5-top-left-t4"


@pytest.fixture(scope="module", params=["digits", "synthetic"])
def variant_bench(request, qbd_memo):
    from qbd.data import load_dataset
    from qbd.runner import seeded_bench
    from qbd.train import check_gates

    bench = seeded_bench(load_dataset(DatasetSpec(request.param)), 0, SPREAD_ATTACKS[SETTING], memo=qbd_memo)  # the rows' bench, model 0
    check_gates(bench.train_metrics, Gates(), attacked=True)
    return bench


@pytest.mark.qbd_smoke
@pytest.mark.parametrize("defense", DEFENSES)
def test_nondefault_attack_is_judged_by_its_row(variant_bench, defense):
    from qbd.expectations import load_for
    from qbd.runner import load_defense

    r = variant_bench.run(load_defense(defense, "canonical", "smoke"), "fp32")
    assert r["weights"]["origin"] == "zoo"  # the pinned model, the same on every machine
    assert r["asr"] > 0.95
    table = load_for("smoke")
    assert table.measured_row(r) is not None, f"{r['cell']}: no row of the spread section judges it"
    j = table.judge(r)
    assert j.judgement != "FAIL", f"{r['dataset']}/{defense}: {j.why}"
