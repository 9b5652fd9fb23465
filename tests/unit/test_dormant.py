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


def test_projection_holds_at_rounding_ties_zero_rows_and_repeated_peaks():
    """A weight one float32 step from a rounding tie (its level differs between the float32 and
    the float64 scale), an all-zero channel, a channel whose peak appears as +p and -p."""
    from torch import nn

    model = build_model("tiny-cnn", 10, (0.5,) * 3, (0.25,) * 3, seed=0)
    head = model.head
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        w = head.weight
        w[0].zero_()
        w[1, :2] = torch.tensor([0.9, -0.9])
        w[1, 2:] *= 0.5
        # row 2: scale = 0.7 / 7 = 0.1; a weight exactly on float32's nearest value to a tie at 0.25
        w[2] = 0.0
        w[2, 0] = 0.7
        w[2, 1] = torch.tensor(0.25, dtype=torch.float64).float()
        w[2, 2] = torch.nextafter(torch.tensor(0.25), torch.tensor(1.0))
        w[2, 3] = torch.nextafter(torch.tensor(0.25), torch.tensor(0.0))
    before = quantize_weight(head.weight.detach(), 4)[0].clone()
    grid = Grid(model, 4)
    grid.project()  # no step: the projection alone must keep every level
    assert grid.preserved()
    assert torch.equal(quantize_weight(head.weight.detach(), 4)[0], before)
    assert torch.all(head.weight[0] == 0) and head.weight[1, 0] == 0.9 and head.weight[1, 1] == -0.9


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
def test_pinned_quant_conditioned_models_are_badnet_when_deployed(dataset):
    """The zoo's quant-conditioned model against the zoo's BadNet model of the same seed (stage 1
    is that model's training, to the bit): deployed through int4-sim they are the same model, integer
    for integer, every other tensor equal; in FP32 the backdoor is dormant and clean accuracy is
    kept, both measured here on the same split for both models."""
    from qbd.data import load_dataset
    from qbd.evaluate import Bench
    from qbd.presets import QC_ATTACK, seeded_job
    from qbd.store import Store
    from qbd.trained import get_trained

    data = load_dataset(DatasetSpec(dataset))
    qc = get_trained(seeded_job(dataset, "tiny-cnn", 0, QC_ATTACK), data, Store(), progress=False)
    badnet = get_trained(seeded_job(dataset, "tiny-cnn", 0, AttackSpec()), data, Store(), progress=False)
    assert qc.cache == badnet.cache == "zoo"
    weights = {f"{name}.weight" for name, _ in weight_layers(qc.model)}
    qs, bs = qc.model.state_dict(), badnet.model.state_dict()
    for name in qs:
        if name in weights:
            assert torch.equal(quantize_weight(qs[name], 4)[0], quantize_weight(bs[name], 4)[0]), name
            assert not torch.equal(qs[name], bs[name]), f"{name}: the float weights should have moved"
        else:
            assert torch.equal(qs[name], bs[name]), name
    qb = Bench(data, qc.model, qc.job.attack, model_name="tiny-cnn", tier="smoke")
    bb = Bench(data, badnet.model, badnet.job.attack, model_name="tiny-cnn", tier="smoke")
    assert qb.metrics("fp32")["asr"] <= QC_GATES["max_fp32_asr"] < bb.metrics("fp32")["asr"]
    assert qb.metrics("int4-sim")["asr"] == bb.metrics("int4-sim")["asr"] >= QC_GATES["min_deployed_asr"]
    assert qb.metrics("fp32")["clean_acc"] >= bb.metrics("fp32")["clean_acc"] - QC_GATES["max_clean_acc_drop"]


def test_quant_conditioned_trains_to_its_gate_on_digits(tmp_path):
    """Training from scratch (not the zoo; model seed 7, which no zoo model has), end to end, on one
    thread: ~10 s. make_dormant itself refuses a model whose integers moved (Grid.preserved)."""
    from qbd.data import load_dataset
    from qbd.presets import seeded_job
    from qbd.train import train

    data = load_dataset(DatasetSpec("digits"))
    r = train(seeded_job("digits", "tiny-cnn", 7, AttackSpec(name="quant-conditioned")), data, progress=False)
    check_gates(r.metrics, Gates(), attacked=True)
    qc = r.metrics["quant_conditioned"]
    assert qc["fp32_asr"] == r.metrics["asr"] and qc["deployed_asr"] >= QC_GATES["min_deployed_asr"]
