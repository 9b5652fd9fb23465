"""Positive controls beyond the default BadNet: another target class, trigger pattern, size and
corner, so no defense (or test) can assume class 0 or the bottom-right corner. Judged against the
truth (detected naming class 3); a defense that really fails here is a declared finding below,
with its why, and the test fails the moment the finding stops holding."""

from __future__ import annotations

import pytest

from qbd.config import AttackSpec, DatasetSpec, Gates, ModelJob, ModelSpec
from qbd.outcomes import judge

VARIANT = AttackSpec(target=3, trigger_pattern="checkerboard", trigger_size=4, trigger_position="top-left")
# declared findings on this attack (fp32, canonical protocol): {defense: expectations entry}
FINDINGS: dict[str, dict[str, str]] = {
    "activation-clustering": {"outcome": "miss", "why": "docs/results.md#findings (AC misses): on this attack too, the target"
                              " class's 2-means silhouette (0.37) is no outlier: classes 4 and 5 score the same (0.37)"},
    "spectral-signatures": {"outcome": "miss", "why": "docs/results.md#findings (SS misses): target class sigma1^2/sigma2^2 2.63,"
                            " the lowest of all 12 classes; the largest is 6.49, below the threshold 12"},
}


@pytest.fixture(scope="module")
def variant_bench():
    from qbd.data import load_dataset
    from qbd.evaluate import Bench
    from qbd.presets import default_train
    from qbd.store import Store
    from qbd.train import check_gates
    from qbd.zoo import get_trained

    data = load_dataset(DatasetSpec("synthetic"))
    job = ModelJob(DatasetSpec("synthetic"), ModelSpec("tiny-cnn"), VARIANT, default_train("synthetic", "tiny-cnn"))
    tm = get_trained(job, data, Store(), progress=False)
    check_gates(tm.metrics, Gates(), attacked=True)
    return Bench(data, tm.model, VARIANT, model_name="tiny-cnn", tier="smoke")


@pytest.mark.smoke
@pytest.mark.parametrize("defense", ["activation-clustering", "fine-pruning", "neural-cleanse", "spectral-signatures", "strip"])
def test_nondefault_attack_is_detected(variant_bench, defense):
    from qbd.runner import load_defense

    r = variant_bench.run(load_defense(defense, "canonical", "smoke"), "fp32")
    assert r["asr"] > 0.95
    j = judge(r, FINDINGS.get(defense))
    assert j.judgement != "FAIL", f"{defense}: {j.why}"
