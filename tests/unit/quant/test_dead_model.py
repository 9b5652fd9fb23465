"""A float model whose features are all dead (its logits are the head's bias, whatever the image)
is what fine-pruning's repair can leave. Re-deploying it must not be refused as a scheme that
"quantizes nothing": that turned the repair into an `error` cell (seen on an H100)."""

from __future__ import annotations

import pytest
import torch

from qbd.errors import ConfigError
from qbd.models import build_model
from qbd.quant import get_scheme
from qbd.quant.base import QuantizedClassifier
from qbd.quant.scheme import Quantized, SchemeBase


def _dead(seed: int = 0) -> torch.nn.Module:
    m = build_model("tiny-cnn", 10, (0.5,) * 3, (0.25,) * 3, seed=seed).eval()
    last_bn = [x for x in m.features if isinstance(x, torch.nn.BatchNorm2d)][-1]
    with torch.no_grad():  # the last ReLU sees only negative inputs: every feature is 0
        last_bn.weight.zero_()
        last_bn.bias.fill_(-5.0)
    return m


@pytest.mark.parametrize("scheme", ["int8-static", "int8-dynamic", "int4-sim"])
def test_a_model_with_dead_features_is_deployed(scheme: str) -> None:
    model = _dead()
    calib = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = model(calib)
    assert (logits == logits[:1]).all()  # the premise: input-independent logits
    q = get_scheme(scheme).apply(model, calib)
    assert torch.equal(q.model(calib), logits)  # nothing to quantize that shows, and no refusal


def test_a_scheme_that_changes_nothing_is_still_refused_on_a_live_model() -> None:
    """The exemption is for constant logits only: the check still fails a do-nothing scheme."""

    class ChangesNothing(SchemeBase):
        name = "changes-nothing"

        def quantize(self, model, calib, engine):
            return Quantized(QuantizedClassifier.from_parts(model, model.features, model.head), backend="none", bits=4)

    live = build_model("tiny-cnn", 10, (0.5,) * 3, (0.25,) * 3, seed=0).eval()
    calib = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="quantizes nothing"):
        ChangesNothing().apply(live, calib)
    ChangesNothing().apply(_dead(), calib)  # the same scheme on a dead model: not refused
