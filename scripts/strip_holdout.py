"""Is STRIP's digits miss its own or qbd's budget? STRIP (canonical, fp32) on the same pinned digits
models, three ways:
- "split, 90": the authors' layout on qbd's digits holdout (360 test images // 4 = 90), split into
  45 overlay images and 45 calibration inputs, so the binomial rule needs a flagged share of 0.25
  (the authors' layout, STRIP's canonical default until leave-one-out replaced it);
- "split, 180": the same with twice the holdout (90 calibration inputs, a share of about 0.16), from
  the same seeded permutation of the test split;
- "leave-one-out, 90": the default now: every one of the 90 holdout images calibrates, blended
  with overlays from the other 89.

    python scripts/strip_holdout.py                  # badnet (10), random patch (5), noise blend (5), clean (10)
    python scripts/strip_holdout.py --calibration    # held out: the calibration seeds 100-104 (badnet, the
                                                     # calibration spread's settings that digits learns, clean)
    python scripts/strip_holdout.py --draws          # the rows' three models at the bound, over ten other
                                                     # generator seeds each, both layouts

One JSON line per model and variant. The pinned zoo's weights where it has them; the calibration
spread's models come from the model store, trained on first use (seconds each on digits).
docs/defenses.md#beyond-the-calibration-attack has the figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from qbd.config import AttackSpec, DatasetSpec
from qbd.data import load_dataset
from qbd.defenses.strip import CALIBRATIONS, Strip
from qbd.evaluate import Bench, BenchSpec
from qbd.outcomes import outcome
from qbd.presets import CALIBRATION_SPREAD, QC_INT8_ATTACK, SPREAD_ATTACKS, seeded_job
from qbd.remote_store import open_store
from qbd.tiers import TIERS
from qbd.zoo.pinned import CALIBRATION_SEEDS, EVAL_SEEDS, SPREAD_SEEDS

SETS = {"badnet": [(AttackSpec(), s) for s in EVAL_SEEDS],
        "random": [(SPREAD_ATTACKS["random4-top-right-t7"], s) for s in SPREAD_SEEDS],
        "blend": [(SPREAD_ATTACKS["blend-noise-a0.2-t1"], s) for s in SPREAD_SEEDS],
        "clean": [(None, s) for s in EVAL_SEEDS]}
# models no STRIP choice was made on: the calibration seeds (BadNet at 2 % is not learned on digits)
CALIBRATION_SETS = {"badnet": [(AttackSpec(), s) for s in CALIBRATION_SEEDS],
                    **{name: [(a, s) for s in CALIBRATION_SEEDS] for name, a in CALIBRATION_SPREAD.items() if name != "badnet-2pct"},
                    "clean": [(None, s) for s in CALIBRATION_SEEDS]}
# the rows' models whose flagged share sits within one input of the bound: (data set, seed, attack, scheme)
AT_THE_BOUND = (("digits", 5, QC_INT8_ATTACK, "int8-static"), ("digits", 3, SPREAD_ATTACKS["blend-noise-a0.2-t1"], "fp32"),
                ("synthetic", 4, SPREAD_ATTACKS["blend-noise-a0.2-t1"], "fp32"))
# (calibration, holdout share): the shipped holdout is the cap 0.25 of the test split
VARIANTS = (("split", 0.25), ("split", 0.5), ("leave-one-out", 0.25))


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", action="store_true", help="the calibration seeds' models instead (held out)")
    ap.add_argument("--draws", action="store_true", help="the rows' models at the bound, over other generator seeds")
    args = ap.parse_args()
    if args.draws:
        return draws()
    sets = CALIBRATION_SETS if args.calibration else SETS
    from qbd.trained import get_trained

    torch.set_num_threads(1)
    data = load_dataset(DatasetSpec("digits"), None)
    tier, store = TIERS["smoke"], open_store()
    for name, models in sets.items():
        for attack, seed in models:
            job = seeded_job("digits", tier.model, seed, attack)
            tm = get_trained(job, data, store, progress=False)
            for calibration, share in VARIANTS:
                b = Bench(data, tm.model, job.attack, probe_attack=job.attack or AttackSpec(seed=seed), model_name=tier.model,
                          spec=BenchSpec(holdout=tier.holdout, stream=tier.stream, seed=seed, max_holdout_share=share),
                          train_metrics=tm.metrics, tier="smoke", weights=tm.provenance())
                v = b.run(Strip("canonical", tier="smoke", calibration=calibration), "fp32", seed=seed)["verdict"]
                print(json.dumps({"set": name, "seed": seed, "calibration": calibration, "holdout": len(b.holdout_idx),
                                  "status": v["status"], "target": v["target_class"],
                                  "truth": job.attack.target if job.attack else None, "flagged_share": round(v["score"], 4),
                                  "share_needed": round(v["threshold"], 4), "n_calibration": v["evidence"].get("n_calibration")}),
                      flush=True)
    return 0


def draws() -> int:
    """Each model at the bound: its row's cell (generator seed = model seed) and ten other seeds."""
    from qbd.runner import seeded_bench

    torch.set_num_threads(1)
    for ds, seed, attack, scheme in AT_THE_BOUND:
        bench = seeded_bench(load_dataset(DatasetSpec(ds), None), seed, attack)
        for calibration in CALIBRATIONS:
            out = []
            for g in (seed, *range(1000, 1010)):
                r = bench.run(Strip("canonical", tier="smoke", calibration=calibration), scheme, seed=g)
                v = r["verdict"]
                out.append((round(v["score"], 3), outcome(r) == "pass"))  # detected naming the planted target
            print(json.dumps({"model": f"{ds}/{attack.label()}/s{seed}/{scheme}", "calibration": calibration,
                              "row_cell": out[0], "named_of_10_other_draws": sum(named for _, named in out[1:]),
                              "shares": [share for share, _ in out[1:]], "share_needed": round(v["threshold"], 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
