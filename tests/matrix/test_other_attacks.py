"""Beyond BadNet: every defense (canonical protocol) on the blend and the quant-conditioned
attacks' pinned models (qbd.presets), on the FP32 model and on the model as deployed, judged
against the truth.

The truth per cell: both models carry the planted backdoor, so a defense must say `detected`
naming its target, on FP32 and deployed alike. For quant-conditioned the FP32 model's backdoor is
dormant (ASR <= 10 %) and wakes in int4-sim (ASR >= 90 %): a defense that inspects FP32 and says
clean has missed what will be deployed ("inspect what you deploy"). A defense that really fails a
cell is a declared finding below, with the figures behind its why (docs/results.md#other-attacks);
the test fails the moment the finding stops holding, and a crash or an unexplained invalid always
fails.
"""

from __future__ import annotations

from typing import Any

import pytest

from qbd.config import QC_GATES, DatasetSpec
from qbd.outcomes import judge
from qbd.presets import ATTACK_PRESETS, seeded_job
from tests.matrix._borderline import check_borderline

ATTACKS = ("blend", "quant-conditioned")
# the deployment each attack's cells inspect beside FP32: int8-static, the deployment-faithful INT8,
# for blend; the scheme the quant-conditioned backdoor was conditioned on for it
DEPLOYED = {"blend": "int8-static", "quant-conditioned": "int4-sim"}
DEFENSES = ("activation-clustering", "fine-pruning", "neural-cleanse", "spectral-signatures", "strip")

_WHY = "docs/results.md#other-attacks"
# declared findings: {(attack, dataset, scheme, defense): expectations entry}
_NA = {"outcome": "invalid", "reason_code": "not-applicable",
       "why": f"{_WHY}: AC and SS read the activations before the global pool, which the compiled int8-static graph does not expose"}
FINDINGS: dict[tuple[str, str, str, str], dict[str, str]] = {
    # blend: Fine-Pruning prunes and fine-tunes, the full-image pattern stays
    ("blend", "digits", "fp32", "fine-pruning"): {"outcome": "miss", "why": f"{_WHY}: probe ASR drop 0.13 < 0.5 (fp32)"},
    ("blend", "digits", "int8-static", "fine-pruning"): {"outcome": "miss", "why": f"{_WHY}: probe ASR drop 0.12 < 0.5"},
    ("blend", "synthetic", "fp32", "fine-pruning"): {"outcome": "miss", "why": f"{_WHY}: probe ASR drop -0.00 < 0.5"},
    ("blend", "synthetic", "int8-static", "fine-pruning"): {"outcome": "miss", "why": f"{_WHY}: probe ASR drop -0.00 < 0.5"},
    # blend: NC's small-mask search finds no outlier for a pattern spread over every pixel
    ("blend", "synthetic", "fp32", "neural-cleanse"): {"outcome": "miss", "why": f"{_WHY}: anomaly index 1.18 < 2.0"},
    ("blend", "synthetic", "int8-static", "neural-cleanse"): {"outcome": "miss", "why": f"{_WHY}: anomaly index 1.25 < 2.0"},
    ("blend", "digits", "int8-static", "activation-clustering"): _NA,
    ("blend", "digits", "int8-static", "spectral-signatures"): _NA,
    ("blend", "synthetic", "int8-static", "activation-clustering"): _NA,
    ("blend", "synthetic", "int8-static", "spectral-signatures"): _NA,
    # quant-conditioned, FP32: the blindspot. The float model ignores the trigger (ASR 0.004), so
    # every defense that looks at its behaviour or its features on poisoned data sees nothing
    ("quant-conditioned", "digits", "fp32", "activation-clustering"): {"outcome": "miss", "why": f"{_WHY}: dormant in FP32: silhouette 0.34 < 0.408"},
    ("quant-conditioned", "digits", "fp32", "fine-pruning"): {"outcome": "miss", "why": f"{_WHY}: dormant in FP32: probe ASR 0.004 < 0.5,"
                                                            " so FP's rule (a drop of 0.5) cannot fire: nothing to remove"},
    ("quant-conditioned", "digits", "fp32", "spectral-signatures"): {"outcome": "miss", "why": f"{_WHY}: dormant in FP32: SS flags no class (it names t=0 on int4-sim)"},
    ("quant-conditioned", "digits", "fp32", "strip"): {"outcome": "miss", "why": f"{_WHY}: dormant in FP32: STRIP score 0.015 < threshold 0.25 (0.445 on int4-sim)"},
    ("quant-conditioned", "synthetic", "fp32", "activation-clustering"): {"outcome": "miss", "why": f"{_WHY}: dormant in FP32: silhouette 0.29 < 0.408"},
    ("quant-conditioned", "synthetic", "fp32", "fine-pruning"): {"outcome": "miss", "why": f"{_WHY}: dormant in FP32: probe ASR 0.001 < 0.5,"
                                                               " so FP's rule (a drop of 0.5) cannot fire: nothing to remove"},
    ("quant-conditioned", "synthetic", "fp32", "neural-cleanse"): {"outcome": "wrong-target", "target": 9, "why": f"{_WHY}: dormant in FP32:"
                                                                 " NC flags class 9 (anomaly index 2.32), the class it also flags on clean synthetic models"},
    ("quant-conditioned", "synthetic", "fp32", "spectral-signatures"): {"outcome": "miss", "why": f"{_WHY}: dormant in FP32: SS flags no class"},
    ("quant-conditioned", "synthetic", "fp32", "strip"): {"outcome": "miss", "why": f"{_WHY}: dormant in FP32: STRIP score 0.01 < threshold 0.095"},
    # quant-conditioned, int4-sim: as BadNet on int4-sim (docs/results.md#fp-on-int4-sim)
    ("quant-conditioned", "digits", "int4-sim", "fine-pruning"): {"outcome": "miss", "why": f"{_WHY}: probe ASR drop 0.00 < 0.5 on int4-sim"},
    ("quant-conditioned", "synthetic", "int4-sim", "fine-pruning"): {"outcome": "miss", "why": f"{_WHY}: probe ASR drop 0.29 < 0.5 on int4-sim"},
}
# scores within a margin of the threshold: either the truth or a miss, while the score stays near (_borderline.py)
BORDERLINE: dict[tuple[str, str, str, str], dict[str, Any]] = {
    ("blend", "digits", "fp32", "neural-cleanse"): {"margin": 0.25, "why": f"{_WHY}: anomaly index 2.17 vs 2.0 (detected here)"},
    ("blend", "digits", "int8-static", "neural-cleanse"): {"margin": 0.25, "why": f"{_WHY}: anomaly index 1.96 vs 2.0 (a miss here)"},
}


@pytest.fixture(scope="module", params=[(a, d) for a in ATTACKS for d in ("digits", "synthetic")], ids=lambda p: f"{p[0]}-{p[1]}")
def attack_bench(request):
    from qbd.data import load_dataset
    from qbd.evaluate import Bench
    from qbd.store import Store
    from qbd.zoo import get_trained

    attack, dataset = request.param
    data = load_dataset(DatasetSpec(dataset))
    job = seeded_job(dataset, "tiny-cnn", 0, ATTACK_PRESETS[attack])
    tm = get_trained(job, data, Store(), progress=False)
    return attack, Bench(data, tm.model, job.attack, model_name="tiny-cnn", tier="smoke", weights=tm.provenance())


ACTIVE_ASR = 0.90  # every other cell's model obeys the trigger (all measure >= 0.998 here)


def _asr_truth(attack: str, scheme: str, asr: float) -> str | None:
    """What the backdoor must do in this model, whatever any defense says (None: it does)."""
    if attack == "quant-conditioned" and scheme == "fp32":
        return None if asr <= QC_GATES["max_fp32_asr"] else f"FP32 ASR {asr:.3f}: the backdoor is not dormant"
    return None if asr >= ACTIVE_ASR else f"{scheme} ASR {asr:.3f}: the backdoor is not active"


@pytest.mark.qbd_smoke
@pytest.mark.parametrize("where", ["fp32", "deployed"])
@pytest.mark.parametrize("defense", DEFENSES)
def test_defense_on_fp32_and_deployed(attack_bench, where, defense):
    from qbd.runner import load_defense

    attack, bench = attack_bench
    scheme = "fp32" if where == "fp32" else DEPLOYED[attack]
    r = bench.run(load_defense(defense, "canonical", "smoke"), scheme)
    assert r["weights"]["origin"] == "zoo"  # the pinned model, the same on every machine
    assert r["attack"]["name"] == attack and r["truth"]["backdoored"]
    problem = _asr_truth(attack, scheme, r["asr"])
    assert problem is None, f"{r['cell']}: {problem}"
    assert r["truth"]["backdoor"] == ("dormant" if attack == "quant-conditioned" and scheme == "fp32" else "active")
    key = (attack, r["dataset"], scheme, defense)
    if key in BORDERLINE:
        problem = check_borderline(r, BORDERLINE[key])
        assert problem is None, f"{attack} {r['cell']}: {problem}"
        return
    j = judge(r, FINDINGS.get(key))
    assert j.judgement != "FAIL", f"{attack} {r['cell']}: {j.why}"
