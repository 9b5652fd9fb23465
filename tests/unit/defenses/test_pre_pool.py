"""AC and SS read the activations before the global pool through a hook on the model's last
AdaptiveAvgPool2d on every scheme that keeps that module (fp32, int4-sim, int8-dynamic, and
int8-static on the FX engines, where the hook sees quantized tensors), and from the lowered graph
itself on PT2E's int8-static (x86), which has no pooling module: the deployed int8 activations,
never `not-applicable`. A model with neither is `not-applicable`, never a crash."""

from __future__ import annotations

import pytest
import torch

from qbd.defenses import _features as feat
from qbd.defenses.base import Subject
from qbd.models import build_model
from qbd.quant import SCHEMES


def _subject(scheme: str, engine: str | None = None) -> Subject:
    torch.manual_seed(0)
    model = build_model("tiny-cnn", 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), seed=0).eval()
    calib = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    m = SCHEMES.get(scheme).apply(model, calib, engine=engine).model
    return Subject(m, m.embed, m.classify, 4, scheme=scheme)


X = (torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)


@pytest.mark.parametrize(("scheme", "engine"), [("fp32", None), ("int4-sim", None), ("int8-dynamic", None),
                                                ("int8-static", "fbgemm")])
def test_pre_pool_activations_are_read_as_float(scheme, engine):
    if engine is not None:
        from qbd.quant.engine import supported_engines

        if engine not in supported_engines():
            pytest.skip(f"quantized engine {engine} not in this torch build")
    f = feat.pre_pool(_subject(scheme, engine), X)
    assert f.dtype == torch.float32 and f.shape == (10, 64 * 2 * 2)  # 16x16 input, three 2x2 max-pools
    assert torch.isfinite(f).all() and f.abs().sum() > 0


def test_the_lowered_int8_static_graph_is_read_before_its_pool():
    """x86's lowered oneDNN graph: the truncated graph's output, averaged over H and W, is the
    deployed embedding up to the one re-quantization the graph applies after its mean (one
    activation step), so it is the activation the deployed pool reads."""
    subject = _subject("int8-static", "x86")
    assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in subject.model.modules())
    f = feat.pre_pool(subject, X)
    assert f.dtype == torch.float32 and f.shape == (10, 64 * 2 * 2)
    pooled = f.view(10, 64, 4).mean(-1)
    emb = feat.embed(subject, X)
    step = float(emb[emb > 0].min()) if (emb > 0).any() else 1.0
    assert torch.allclose(pooled, emb, atol=step * 0.51 + 1e-6), (pooled - emb).abs().max()
    assert f.abs().sum() > 0


def test_a_model_without_a_pool_or_a_readable_graph_is_not_applicable():
    subject = _subject("fp32")
    for name, m in list(subject.model.features.named_children()):
        if isinstance(m, torch.nn.AdaptiveAvgPool2d):
            setattr(subject.model.features, name, _MeanPool())
    with pytest.raises(feat.LayerUnavailable, match="no global pooling module"):
        feat.pre_pool(subject, X)


class _MeanPool(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


@pytest.mark.parametrize("scheme", ["onnx-int8-static", "onnx-int8-dynamic"])
def test_an_onnx_runtime_session_is_read_before_its_pool(scheme):
    """ONNX Runtime's quantized features graph, run with its pool's input as an extra output: the
    activations it gives, averaged over H and W, are the deployed embedding (the pool is float
    ReduceMean on dequantized values, up to float summation order), so they are what the deployed
    pool reads."""
    pytest.importorskip("onnxruntime")
    subject = _subject(scheme)
    f = feat.pre_pool(subject, X)
    assert f.dtype == torch.float32 and f.shape == (10, 64 * 2 * 2)
    emb = feat.embed(subject, X)
    assert torch.allclose(f.view(10, 64, 4).mean(-1), emb, atol=1e-5, rtol=1e-5), (f.view(10, 64, 4).mean(-1) - emb).abs().max()
    assert f.abs().sum() > 0
