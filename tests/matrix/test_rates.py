"""Rates over seeds, the defenses' headline: every built-in defense on fp32, canonical protocol, on
the pinned zoo's five backdoored and five clean models of each data set (evaluation seeds 0-4;
thresholds were calibrated on seeds 100-104, scripts/calibrate.py). The row must meet the bounds
the shipped expectations declare for it: the project's goal (detected naming the target on >= 4
of 5 backdoored models, a false alarm on <= 1 of 5 clean ones) or a declared finding with its
figures, bounded on both sides. A row without declared bounds fails: this test cannot pass on
nothing.

The same figures: `OMP_NUM_THREADS=1 qbd run --dataset D --quant fp32 --protocol canonical --seeds 5 --json`."""

from __future__ import annotations

import pytest

from qbd.config import AttackSpec, DatasetSpec, cell_id
from qbd.pinned import EVAL_SEEDS

DEFENSES = ["activation-clustering", "fine-pruning", "neural-cleanse", "spectral-signatures", "strip"]


def _zoo_bench(data, dataset: str, seed: int, attack: AttackSpec | None):
    from qbd.evaluate import Bench, BenchSpec
    from qbd.presets import seeded_job
    from qbd.store import Store
    from qbd.tiers import TIERS
    from qbd.zoo import get_trained

    tier = TIERS["smoke"]
    job = seeded_job(dataset, tier.model, seed, attack)
    tm = get_trained(job, data, Store(), progress=False)
    assert tm.cache == "zoo", f"{job.slug()}: not loaded from the pinned zoo"
    return Bench(data, tm.model, job.attack, probe_attack=AttackSpec(seed=seed), model_name=tier.model,
                 spec=BenchSpec(holdout=tier.holdout, stream=tier.stream, seed=seed), train_metrics=tm.metrics,
                 tier="smoke", weights=tm.provenance())


@pytest.mark.smoke
@pytest.mark.parametrize("defense", DEFENSES)
@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_fp32_canonical_row_meets_its_declared_rates(dataset, defense):
    import torch

    from qbd.data import load_dataset
    from qbd.expectations import load, shipped
    from qbd.rates import fraction, rows
    from qbd.runner import load_defense

    table = load(shipped("smoke"))
    rid = cell_id(dataset, "fp32", defense, "canonical")
    assert table.row_bounds(rid), f"{rid}: no rate bounds declared in qbd/expected/smoke.toml"
    data = load_dataset(DatasetSpec(dataset), None)
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matrix's convention: verdicts must not depend on the worker count
    try:
        for seed in EVAL_SEEDS:
            for attack in (AttackSpec(), None):
                r = _zoo_bench(data, dataset, seed, attack).run(load_defense(defense, "canonical", "smoke"), "fp32", seed=seed)
                code = r["verdict"]["reason_code"]
                assert code not in ("error", "timeout", "unspecified"), f"{r['cell']} seed {seed}: {r['verdict']['reason']}"
                results.append(r)
    finally:
        torch.set_num_threads(threads)
    (row,) = rows(results)
    assert (row["n_backdoored"], row["n_clean"], row["seeds"]) == (len(EVAL_SEEDS), len(EVAL_SEEDS), list(EVAL_SEEDS))
    failures = table.check_row(row)
    summary = (f"detection {fraction(row['detected'], row['n_backdoored'], row['detection_ci'])}, false alarms"
               f" {fraction(row['false_alarms'], row['n_clean'], row['false_alarm_ci'])}, invalid {row['invalid']}")
    assert not failures, f"{rid}: {summary}: " + "; ".join(failures)
