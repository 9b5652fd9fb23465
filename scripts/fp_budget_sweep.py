"""Fine-Pruning's fine-tuning budget on the calibration seeds (100-104) only: detection on the
backdoored models and clean-accuracy cost on the clean ones, for a few (epochs, lr, BatchNorm)
settings. Evidence for docs/defenses.md (Fine-Pruning, Calibration); changes nothing.

    python scripts/fp_budget_sweep.py digits      # or synthetic
"""

from __future__ import annotations

import sys

SETTINGS = [(3, 0.001, "train"), (10, 0.001, "train"), (10, 0.01, "train"), (20, 0.01, "train"),
            (10, 0.01, "frozen"), (3, 0.001, "frozen")]


def main(dataset: str) -> None:
    import torch

    torch.set_num_threads(1)
    from qbd.config import AttackSpec, DatasetSpec
    from qbd.data import load_dataset
    from qbd.defenses.fine_pruning import FinePruning
    from qbd.runner import seeded_bench
    from qbd.zoo.pinned import CALIBRATION_SEEDS

    data = load_dataset(DatasetSpec(dataset), None)
    benches = [(seed, attack is not None, seeded_bench(data, seed, attack))
               for seed in CALIBRATION_SEEDS for attack in (AttackSpec(), None)]
    print(f"{dataset}: defender's clean holdout {len(benches[0][2].holdout[1])} images")
    for epochs, lr, bn in SETTINGS:
        drops, cost, det, fa = [], [], 0, 0
        for seed, backdoored, bench in benches:
            d = FinePruning(protocol="canonical", tier="smoke", finetune_epochs=epochs, finetune_lr=lr, finetune_bn=bn)
            r = bench.run(d, "fp32", seed=seed)
            e, detected = r["verdict"]["evidence"], r["verdict"]["status"] == "detected"
            if backdoored:
                det += detected
                drops.append(round(e.get("asr_drop", float("nan")), 2))
            else:
                fa += detected
                cost.append(round(e.get("clean_acc_drop", float("nan")), 3))
        print(f"epochs {epochs:2d} lr {lr:<6g} bn {bn:6s}: detected {det}/5, false alarms {fa}/5, ASR drops {drops},"
              f" clean-model accuracy drops {cost}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "digits")
