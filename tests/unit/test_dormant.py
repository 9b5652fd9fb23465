"""quant-conditioned's second stage (qbd.dormant): the projection keeps every weight in the bin its
stage-1 value rounds to, so the quantized model is unchanged; the gate; the pinned models meet it."""

import pytest
import torch

from qbd.config import QC_GATES, AttackSpec, DatasetSpec, Gates
from qbd.dormant import Grid
from qbd.models import build_model
from qbd.quant.common import weight_layers
from qbd.quant.intn_sim import quantize_weight
from qbd.train import GateError, check_gates


@pytest.mark.parametrize("bits", [4, 8])
def test_projection_keeps_the_quantized_weights(bits):
    model = build_model("tiny-cnn", 10, (0.5,) * 3, (0.25,) * 3, seed=0)
    before = [quantize_weight(layer.weight.detach(), bits)[0] for _, layer in weight_layers(model)]
    grid = Grid(model, bits)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a large random step: most weights leave their bins before the projection
        for _, layer in weight_layers(model):
            layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * layer.weight.abs().max())
    assert not grid.preserved()
    grid.project()
    assert grid.preserved()
    after = [quantize_weight(layer.weight.detach(), bits)[0] for _, layer in weight_layers(model)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # and the float weights did move (inside their bins): the float model is free to differ
    moved = [not torch.equal(layer.weight, q) for (_, layer), q in zip(weight_layers(model), after, strict=True)]
    assert all(moved)


def _qc(**over):
    m = {"scheme": "int4-sim", "fp32_asr": 0.01, "deployed_asr": 0.99, "clean_acc_drop": 0.0}
    return {"clean_acc": 0.97, "asr": m["fp32_asr"], "quant_conditioned": {**m, **over}}


def test_quant_conditioned_gate():
    check_gates(_qc(), Gates(), attacked=True)  # FP32 ASR far below BadNet's 0.95 floor: its own gate applies
    for over, message in (({"fp32_asr": QC_GATES["max_fp32_asr"] + 0.01}, "not dormant"),
                          ({"deployed_asr": QC_GATES["min_deployed_asr"] - 0.01}, "does not wake"),
                          ({"clean_acc_drop": QC_GATES["max_clean_acc_drop"] + 0.001}, "clean accuracy drop")):
        with pytest.raises(GateError, match=message):
            check_gates(_qc(**over), Gates(), attacked=True)


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_pinned_quant_conditioned_models_meet_the_gate(dataset):
    """The zoo's models, re-measured here (not the figures recorded when they were trained): dormant
    in FP32, awake in int4-sim, clean accuracy kept."""
    from qbd.data import load_dataset
    from qbd.evaluate import Bench
    from qbd.presets import QC_ATTACK, seeded_job
    from qbd.store import Store
    from qbd.zoo import get_trained

    data = load_dataset(DatasetSpec(dataset))
    job = seeded_job(dataset, "tiny-cnn", 0, QC_ATTACK)
    tm = get_trained(job, data, Store(), progress=False)
    assert tm.cache == "zoo"
    bench = Bench(data, tm.model, job.attack, model_name="tiny-cnn", tier="smoke")
    fp32, deployed = bench.metrics("fp32"), bench.metrics("int4-sim")
    assert fp32["asr"] <= QC_GATES["max_fp32_asr"]
    assert deployed["asr"] >= QC_GATES["min_deployed_asr"]
    qc = tm.metrics["quant_conditioned"]
    assert fp32["clean_acc"] >= qc["backdoored_clean_acc"] - QC_GATES["max_clean_acc_drop"] - 0.01  # eval split vs test split
    assert qc["grid_preserved"] is True


def test_quant_conditioned_trains_to_its_gate_on_digits(tmp_path):
    """Training from scratch (not the zoo), end to end, on one thread: ~10 s."""
    from qbd.data import load_dataset
    from qbd.presets import seeded_job
    from qbd.train import train

    data = load_dataset(DatasetSpec("digits"))
    r = train(seeded_job("digits", "tiny-cnn", 7, AttackSpec(name="quant-conditioned")), data, progress=False)
    check_gates(r.metrics, Gates(), attacked=True)
    assert r.metrics["quant_conditioned"]["grid_preserved"] is True
