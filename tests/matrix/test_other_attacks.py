"""Beyond BadNet: every defense (canonical protocol) on the blend and the quant-conditioned
attacks' pinned models (qbd.presets), on the FP32 model and on the model as deployed, judged
against the truth.

The truth per cell: both models carry the planted backdoor, so a defense must say `detected`
naming its target, on FP32 and deployed alike. For quant-conditioned the FP32 model's backdoor is
dormant (ASR <= 10 %) and wakes in the scheme it was conditioned on, int4-sim or int8-static
(ASR >= 90 %): a defense that inspects FP32 and says
clean has missed what will be deployed ("inspect what you deploy"). Each cell is judged by its
row, measured over five of the attack's pinned models: the shipped table's [attacks.<name>.rows]
(qbd/expected/smoke.toml; docs/results.md#other-attacks). Its outcome must be one the row
measured; a crash or an unexplained invalid always fails.
"""

from __future__ import annotations

import pytest

from qbd.config import DatasetSpec
from qbd.defenses import BUILTIN
from qbd.presets import BLEND_ATTACK, QC_ATTACK, QC_INT8_ATTACK

# each attack's preset, by its section's name in the shipped table, and the deployment its cells
# inspect beside FP32: int8-static, the deployment-faithful INT8, for blend; for a quant-conditioned
# backdoor the scheme it was conditioned on
ATTACKS = {"blend": (BLEND_ATTACK, "int8-static"), "quant-conditioned": (QC_ATTACK, "int4-sim"),
           "quant-conditioned-int8-static": (QC_INT8_ATTACK, "int8-static")}
DEFENSES = tuple(sorted(BUILTIN))  # the built-in catalog (qbd.defenses), not a copy of its names


@pytest.fixture(scope="module")
def table():
    """The shipped expectations: the findings for these attacks are its [attacks.<name>] sections,
    so `qbd run --attack ... --expectations` and this test judge the same way."""
    from qbd.expectations import load_for

    return load_for("smoke")


@pytest.fixture(scope="module", params=[(a, d) for a in ATTACKS for d in ("digits", "synthetic")], ids=lambda p: f"{p[0]}-{p[1]}")
def attack_bench(request, qbd_memo):
    from qbd.data import load_dataset
    from qbd.runner import seeded_bench

    attack, dataset = request.param
    return attack, seeded_bench(load_dataset(DatasetSpec(dataset)), 0, ATTACKS[attack][0], memo=qbd_memo)  # the rows' bench, model 0


@pytest.mark.qbd_smoke
@pytest.mark.parametrize("where", ["fp32", "deployed"])
@pytest.mark.parametrize("defense", DEFENSES)
def test_defense_on_fp32_and_deployed(attack_bench, table, where, defense):
    from qbd.runner import load_defense

    attack, bench = attack_bench
    spec, deployed = ATTACKS[attack]
    scheme = "fp32" if where == "fp32" else deployed
    r = bench.run(load_defense(defense, "canonical", "smoke"), scheme)
    assert r["weights"]["origin"] == "zoo"  # the pinned model, the same on every machine
    assert r["attack"] == {**spec.to_dict(), "seed": 0} and r["truth"]["backdoored"]
    # what the backdoor must do in this model, whatever any defense says: the table's deployed-model
    # bounds (BadNet's floor, ASR >= 0.9, for blend; for quant-conditioned its truth, dormant_asr_bounds:
    # FP32 ASR <= 0.10, its scheme's >= 0.90), as `qbd run` checks them
    problems = table.check_attack(f"{r['dataset']}/{scheme}", r["clean_acc"], r["asr"], own=False, attack=r["attack"],
                                  engine=r["quant"]["audit"]["engine"])
    assert not problems, f"{r['cell']}: {problems}"
    assert r["truth"]["backdoor"] == ("dormant" if spec.name == "quant-conditioned" and scheme == "fp32" else "active")
    # every row is declared (the digits int8-static NC row of quant-conditioned on int8-static was
    # not while its surrogate disagreed with the deployed graph on one model, qbd's limit, fixed)
    assert table.measured_row(r) is not None, f"{attack} {r['cell']}: no measured row judges it"
    j = table.judge(r)
    assert j.judgement != "FAIL", f"{attack} {r['cell']}: {j.why}"
