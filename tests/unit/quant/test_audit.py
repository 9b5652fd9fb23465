"""qbd.quant.audit: measured facts, not claims."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from qbd.models import build_model
from qbd.quant.audit import (
    float_tensor_count,
    max_levels_of_codes,
    max_levels_per_channel,
    max_rel_error,
    measure_input_gradient,
    state_dict_bytes,
)

SHAPE = (3, 8, 8)


class Detached(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().flatten(1)[:, :4]


class Constant(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 0).flatten(1)[:, :4]


class Warns(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warnings.warn("unrelated warning from forward", UserWarning, stacklevel=1)
        return x.flatten(1)[:, :4]


def test_gradient_flows_through_float_model() -> None:
    model = build_model("tiny-cnn", 10, (0.5,) * 3, (0.25,) * 3, seed=0).eval()
    assert measure_input_gradient(model, SHAPE, torch.device("cpu")) == (True, None)
    assert all(p.grad is None for p in model.parameters()), "the probe must not leave parameter grads"


def test_no_grad_fn() -> None:
    flows, note = measure_input_gradient(Detached(), SHAPE, torch.device("cpu"))
    assert not flows and "no grad_fn" in note


def test_zero_gradient_is_no_gradient() -> None:
    flows, note = measure_input_gradient(Constant(), SHAPE, torch.device("cpu"))
    assert not flows and "all zero" in note


def test_autograd_kernel_warning_recorded_not_leaked() -> None:
    from qbd.quant.warnings import ignoring_known_warnings

    with ignoring_known_warnings():
        model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Flatten(), nn.Linear(192, 4)), {nn.Linear})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flows, note = measure_input_gradient(model, SHAPE, torch.device("cpu"))
    assert not flows
    assert "quantized::linear_dynamic: an autograd kernel was not registered" in note
    assert not caught


def test_other_warnings_are_reemitted() -> None:
    with pytest.warns(UserWarning, match="unrelated warning from forward"):
        assert measure_input_gradient(Warns(), SHAPE, torch.device("cpu"))[0]


def test_float_tensor_count_definition() -> None:
    model = build_model("tiny-cnn", 10, (0.5,) * 3, (0.25,) * 3, seed=0)
    params = sum(p.numel() for p in model.parameters())
    bn_stats = sum(
        m.running_mean.numel() + m.running_var.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )
    assert float_tensor_count(model) == params + bn_stats + 6  # + Normalize mean and std


def test_levels() -> None:
    codes = torch.tensor([[0, 1, 1, -3], [5, 5, 5, 5]])
    assert max_levels_per_channel(codes.float()) == 3
    assert max_levels_of_codes(codes, -8, 7) == 3
    random = torch.randint(-128, 128, (16, 300))
    assert max_levels_of_codes(random, -128, 127) == max_levels_per_channel(random)


def test_rel_error_handles_zero_scale() -> None:
    w = torch.tensor([[1.0, 0.26], [0.0, 0.0]])
    w_q = torch.tensor([[1.0, 0.25], [0.0, 0.0]])
    assert max_rel_error(w, w_q, torch.tensor([0.1, 0.0])) == pytest.approx(0.1, rel=1e-5)


def test_state_dict_bytes_grows_with_weights() -> None:
    assert state_dict_bytes(nn.Linear(100, 100)) > state_dict_bytes(nn.Linear(10, 10)) + 4 * 9000
