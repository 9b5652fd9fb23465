"""Is STRIP's digits miss its own or qbd's budget? STRIP (canonical, fp32) on the same pinned digits
models with the shipped holdout (360 test images // 4 = 90: 45 calibration inputs for its entropy
threshold, so its binomial rule needs a flagged share of 0.25) and with twice that (180: 90
calibration inputs, a share of about 0.16), from the same seeded permutation of the test split.

    python scripts/strip_holdout.py            # badnet (10), random patch (5), noise blend (5), clean (10)

One JSON line per model and holdout. No model is trained: the zoo's weights (digits trains in
seconds if the zoo is absent). docs/defenses.md#beyond-the-calibration-attack has the figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from qbd.config import AttackSpec, DatasetSpec
from qbd.data import load_dataset
from qbd.evaluate import Bench, BenchSpec
from qbd.presets import SPREAD_ATTACKS, seeded_job
from qbd.remote_store import open_store
from qbd.runner import load_defense
from qbd.tiers import TIERS

SETS = {"badnet": [(AttackSpec(), s) for s in range(10)],
        "random": [(SPREAD_ATTACKS["random4-top-right-t7"], s) for s in range(5)],
        "blend": [(SPREAD_ATTACKS["blend-noise-a0.2-t1"], s) for s in range(5)],
        "clean": [(None, s) for s in range(10)]}


def main() -> int:
    from qbd.trained import get_trained

    torch.set_num_threads(1)
    data = load_dataset(DatasetSpec("digits"), None)
    tier, store = TIERS["smoke"], open_store()
    for name, models in SETS.items():
        for attack, seed in models:
            job = seeded_job("digits", tier.model, seed, attack)
            tm = get_trained(job, data, store, progress=False)
            for share in (0.25, 0.5):  # the shipped cap (360 // 4 = 90 images), and twice it
                b = Bench(data, tm.model, job.attack, probe_attack=job.attack or AttackSpec(seed=seed), model_name=tier.model,
                          spec=BenchSpec(holdout=tier.holdout, stream=tier.stream, seed=seed, max_holdout_share=share),
                          train_metrics=tm.metrics, tier="smoke", weights=tm.provenance())
                v = b.run(load_defense("strip", "canonical", "smoke"), "fp32", seed=seed)["verdict"]
                print(json.dumps({"set": name, "seed": seed, "holdout": len(b.holdout_idx), "status": v["status"], "target": v["target_class"],
                                  "truth": job.attack.target if job.attack else None, "flagged_share": round(v["score"], 4),
                                  "share_needed": round(v["threshold"], 4), "n_calibration": v["evidence"].get("n_calibration")}),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
