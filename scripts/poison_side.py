"""Which part of a split class is the poison? The per-sample rules of AC and SS on the target class
of the pinned BadNet models, against the known poison (docs/defenses.md#which-part-is-the-poison).

    python scripts/poison_side.py digits 0,1,2,3,4,5,6,7,8,9
    python scripts/poison_side.py synthetic 100,101,102,103,104

Per model, fp32, activations before the pool of the poisoned training set's target class:
- SS: AUROC for the poison of the authors' squared score p^2, of the signed projection p
  oriented by qbd's rule (the more varied side positive), and of p oriented by its skew (another
  candidate); precision / recall of the canonical suspects (spectrum()'s "varied-side").
- AC: precision of the smaller cluster (the authors' suspects); precision / recall of the more
  varied cluster (the canonical suspects), from cluster_class itself.
"""

from __future__ import annotations

import sys

import numpy as np
import torch


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    from scipy.stats import rankdata

    r = rankdata(score)
    n1 = int(positive.sum())
    n0 = len(positive) - n1
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def pr(suspect: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    tp = int((suspect & positive).sum())
    return tp / max(1, int(suspect.sum())), tp / max(1, int(positive.sum()))


def main(dataset: str, seeds: list[int]) -> None:
    from qbd.config import AttackSpec, DatasetSpec
    from qbd.data import load_dataset
    from qbd.defenses import _features as feat
    from qbd.defenses._poison_side import more_varied, split_line
    from qbd.defenses.activation_clustering import ActivationClustering, cluster_class
    from qbd.defenses.spectral_signatures import SpectralSignatures, _svd, spectrum
    from qbd.evaluate import Bench
    from qbd.presets import seeded_job
    from qbd.store import Store
    from qbd.trained import get_trained

    torch.set_num_threads(1)
    data = load_dataset(DatasetSpec(dataset))
    for seed in seeds:
        job = seeded_job(dataset, "tiny-cnn", seed, AttackSpec())
        tm = get_trained(job, data, Store(), progress=False)
        bench = Bench(data, tm.model, job.attack, tier="smoke")
        x, y, poisoned = bench.poisoned_train
        idx = np.flatnonzero(y.numpy() == job.attack.target)
        f = feat.representations(bench.subject("fp32", "surrogate"), x[idx], "pre-pool", 512).double().numpy()
        pos = poisoned.numpy()[idx].astype(bool)
        rc = f - f.mean(axis=0)
        _, v = _svd(rc, False)
        p = rc @ v
        varied = more_varied(rc, split_line(p), v)
        oriented = p if varied.sum() and p[varied].mean() > p[~varied].mean() else -p
        skewed = p if float(np.mean(p**3)) > 0 else -p
        ss = np.zeros(len(idx), bool)
        ss[spectrum(f, SpectralSignatures("canonical").params)["top"]] = True
        ac = cluster_class(f, ActivationClustering("canonical").params, 0)
        small, more = np.zeros(len(idx), bool), np.zeros(len(idx), bool)
        small[ac["smaller"]], more[ac["varied"]] = True, True
        print(f"{dataset} seed {seed}: target class {len(idx)} samples, {pos.mean():.2f} poison | SS AUROC squared"
              f" {auroc(p**2, pos):.2f}, varied side {auroc(oriented, pos):.2f}, skew {auroc(skewed, pos):.2f};"
              f" suspects precision/recall {pr(ss, pos)[0]:.3f}/{pr(ss, pos)[1]:.3f} | AC smaller cluster precision"
              f" {pr(small, pos)[0]:.3f}; more varied precision/recall {pr(more, pos)[0]:.3f}/{pr(more, pos)[1]:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else list(range(10)))
