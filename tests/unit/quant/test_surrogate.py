"""qbd.quant.surrogate: the straight-through pieces reproduce torch's int8 arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qbd.quant.surrogate import DynamicLinearSTE, choose_dynamic_qparams, fake_quant_ste
from qbd.quant.warnings import ignoring_known_warnings

CASES = {
    "mixed": torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1,
    "positive": torch.rand(4, 16, generator=torch.Generator().manual_seed(1)) + 0.5,
    "negative": -torch.rand(4, 16, generator=torch.Generator().manual_seed(2)) - 0.5,
    "zeros": torch.zeros(4, 16),
    "tiny range": torch.rand(4, 16, generator=torch.Generator().manual_seed(3)) * 1e-4,
    "large": torch.randn(4, 16, generator=torch.Generator().manual_seed(4)) * 1e4,
}


@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_dynamic_qparams_match_aten(case: str, reduce_range: bool) -> None:
    """Same ChooseQuantizationParams as ATen; quantized::linear_dynamic keeps the scale as a
    float32 (TensorQuantizationParams), quantize_per_tensor_dynamic as the double before it."""
    x = CASES[case]
    with ignoring_known_warnings():
        q = torch.quantize_per_tensor_dynamic(x, torch.quint8, reduce_range)
    scale, zero_point, quant_max = choose_dynamic_qparams(x, reduce_range)
    assert (scale, zero_point) == (float(np.float32(q.q_scale())), q.q_zero_point())
    assert quant_max == (127 if reduce_range else 255)


def test_straight_through_gradient_inside_range_only() -> None:
    x = torch.tensor([-1.0, 0.04, 0.5, 2.0, 30.0], requires_grad=True)
    y = fake_quant_ste(x, 0.1, 10, 0, 255)  # range [-1.0, 24.5]
    y.sum().backward()
    torch.testing.assert_close(y.detach(), torch.tensor([-1.0, 0.0, 0.5, 2.0, 24.5]))
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))


def test_dynamic_linear_twin_matches_torch() -> None:
    from torch import nn

    torch.manual_seed(0)
    linear = nn.Linear(32, 5)
    x = torch.randn(6, 32) * 2
    with ignoring_known_warnings():
        deployed = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear})[0]
    w, b = deployed._weight_bias()
    twin = DynamicLinearSTE(w.dequantize(), b, reduce_range=True)  # x86 default engine
    torch.testing.assert_close(twin(x), deployed(x), rtol=1e-5, atol=1e-6)
