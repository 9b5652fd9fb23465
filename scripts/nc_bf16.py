"""Neural Cleanse (canonical, fp32 scheme) in float32 and in bf16 autocast on the same pinned
evaluation models: seconds per cell and whether the verdict (status, named class) changes.

    python scripts/nc_bf16.py digits > nc-bf16-digits.jsonl      # and synthetic; one process per data set

Each model runs both precisions back to back, the order alternating from model to model (A B,
B A), in one process of one thread, so both see the same machine. bf16 autocast runs the model's
convolutions and matrix products in bfloat16 (oneDNN's AMX kernels on a CPU that has them); the
trigger, the loss and the optimiser stay float32. docs/performance.md has the figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from qbd.config import AttackSpec, DatasetSpec
from qbd.data import load_dataset
from qbd.defenses.neural_cleanse import NeuralCleanse
from qbd.runner import seeded_bench
from qbd.zoo.pinned import EVAL_SEEDS


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    dataset = argv[0]
    data = load_dataset(DatasetSpec(dataset), None)
    k = 0
    for seed in EVAL_SEEDS:
        for attack in (AttackSpec(), None):
            bench = seeded_bench(data, seed, attack)
            order = ("fp32", "bf16") if k % 2 == 0 else ("bf16", "fp32")
            k += 1
            for precision in order:
                r = bench.run(NeuralCleanse("canonical", tier="smoke", precision=precision), "fp32", seed=seed)
                v = r["verdict"]
                print(json.dumps({"dataset": dataset, "seed": seed, "backdoored": attack is not None, "precision": precision,
                                  "seconds": r["seconds"], "status": v["status"], "target": v["target_class"],
                                  "reason_code": v["reason_code"], "score": v["score"], "truth": r["truth"]["target"],
                                  "origin": r["weights"]["origin"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
