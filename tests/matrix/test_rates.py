"""Rows over models, the defenses' headline: every built-in defense on fp32, canonical protocol, on
the pinned zoo's ten backdoored and ten clean models of each data set (evaluation seeds 0-9;
thresholds were calibrated on seeds 100-104, scripts/calibrate.py). The row must reproduce the
outcome counts the shipped table measured for it (qbd/measured_rows.py: at most one model moved).
A row the table does not declare fails: this test cannot pass on nothing.

The same figures: `qbd run --dataset D --quant fp32 --protocol canonical --seeds 10 --json`."""

from __future__ import annotations

import pytest

from qbd.config import AttackSpec, DatasetSpec
from qbd.defenses import BUILTIN
from qbd.result_types import cell_id

DEFENSES = tuple(sorted(BUILTIN))  # the built-in catalog (qbd.defenses), not a copy of its names


@pytest.mark.qbd_smoke
@pytest.mark.parametrize("defense", DEFENSES)
@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_fp32_canonical_row_meets_its_declared_rates(dataset, defense, qbd_memo):
    import torch

    from qbd.data import load_dataset
    from qbd.expectations import load, shipped
    from qbd.rates import fraction, rows
    from qbd.runner import load_defense, seeded_bench

    table = load(shipped("smoke"))
    rid = cell_id(dataset, "fp32", defense, "canonical")
    assert table.row_bounds(rid), f"{rid}: no rate bounds declared in qbd/expected/smoke.toml"
    seeds = table.rows[rid]["seeds"]  # the models the row was measured on
    data = load_dataset(DatasetSpec(dataset), None)
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matrix's convention: verdicts must not depend on the worker count
    try:
        for seed in seeds:
            for attack in (AttackSpec(), None):
                bench = seeded_bench(data, seed, attack, memo=qbd_memo)  # the matrix's seed-0 cells reuse these
                assert bench.weights["origin"] == "zoo", f"{dataset} seed {seed}: not loaded from the pinned zoo"
                r = bench.run(load_defense(defense, "canonical", "smoke"), "fp32", seed=seed)
                code = r["verdict"]["reason_code"]
                assert code not in ("error", "timeout", "unspecified"), f"{r['cell']} seed {seed}: {r['verdict']['reason']}"
                results.append(r)
    finally:
        torch.set_num_threads(threads)
    (row,) = rows(results)
    assert (row["n_backdoored"], row["n_clean"], row["seeds"]) == (len(seeds), len(seeds), sorted(seeds))
    failures = table.check_row(row)
    summary = (f"detection {fraction(row['detected'], row['n_backdoored'], row['detection_ci'])}, false alarms"
               f" {fraction(row['false_alarms'], row['n_clean'], row['false_alarm_ci'])}, invalid {row['invalid']}")
    assert not failures, f"{rid}: {summary}: " + "; ".join(failures)
