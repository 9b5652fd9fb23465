"""AC and SS read the activations before the global pool through a hook on the model's last
AdaptiveAvgPool2d: on every scheme that keeps that module (fp32, int4-sim, int8-dynamic, and
int8-static on the FX engines, where the hook sees quantized tensors), and as `not-applicable`
on PT2E's lowered int8-static graph, which has none. Never a crash."""

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


def test_a_graph_without_a_pooling_module_is_not_applicable():
    with pytest.raises(feat.LayerUnavailable, match="no global pooling module"):
        feat.pre_pool(_subject("int8-static", "x86"), X)
