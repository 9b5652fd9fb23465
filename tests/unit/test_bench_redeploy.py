"""Bench.subject hands repair methods the float model and a way to re-deploy an edited copy of it
through the cell's own scheme and calibration (Fine-Pruning's fine-tune-then-re-deploy)."""

import copy

import torch

from qbd.evaluate import Bench
from qbd.models import build_model
from tests.toy import toy_split


def _bench():
    data = toy_split()
    model = build_model("tiny-cnn", 4, data.mean, data.std, seed=0).eval()
    return Bench(data, model, None)


def test_subject_carries_the_float_model_and_redeploys_onto_the_schemes_grid():
    bench = _bench()
    subject = bench.subject("int4-sim", "deployed")
    assert subject.float_model is bench.model
    edited = copy.deepcopy(bench.model)
    with torch.no_grad():
        for prm in edited.parameters():
            prm.add_(0.01 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(1)))
    repaired = subject.redeploy(edited)
    assert repaired.scheme == "int4-sim" and repaired.gradient_path == "deployed"
    for layer in repaired.model.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            rows = layer.weight.detach().flatten(1)
            assert max(len(torch.unique(r)) for r in rows) <= 16  # int4: 16 levels per output channel
    # the unedited float model re-deploys to the cell's own deployed model
    x = bench.holdout[0][:8].float() / 255
    same = subject.redeploy(bench.model)
    assert torch.allclose(same.model(x), bench.quantized("int4-sim").model(x))
    assert not torch.allclose(repaired.model(x), same.model(x))
