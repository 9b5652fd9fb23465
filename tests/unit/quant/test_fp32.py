"""fp32: an eval-mode copy, nothing quantized."""

from __future__ import annotations

import torch

from qbd.quant import SCHEMES


def test_identity_copy(tiny, probe) -> None:
    qm = SCHEMES.get("fp32").apply(tiny, None)
    with torch.no_grad():
        assert torch.equal(qm.model(probe), tiny(probe))
    assert qm.model.features is not tiny.features
    a = qm.audit
    assert (a.quantized_modules, a.quantized_params, a.quantized_param_fraction) == ([], 0, 0.0)
    assert a.bits is None and a.engine is None and a.max_rel_error is None and a.input_gradient
