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
    """Same ChooseQuantizationParams as ATen, for each row served alone; quantized::linear_dynamic
    keeps the scale as a float32 (TensorQuantizationParams), quantize_per_tensor_dynamic as the
    double before it."""
    x = CASES[case]
    scale, zero_point, quant_max = choose_dynamic_qparams(x, reduce_range)
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32 and scale.shape == (len(x),)
    for i in range(len(x)):
        with ignoring_known_warnings():
            q = torch.quantize_per_tensor_dynamic(x[i : i + 1], torch.quint8, reduce_range)
        assert (float(scale[i]), int(zero_point[i])) == (float(np.float32(q.q_scale())), q.q_zero_point())
    assert quant_max == (127 if reduce_range else 255)


def test_dynamic_qparams_are_per_row() -> None:
    """Rows with different ranges get different parameters (one range over the tensor would not)."""
    x = torch.cat([CASES["mixed"], CASES["tiny range"]])
    scale, _, _ = choose_dynamic_qparams(x, reduce_range=True)
    assert scale[:4].min() > 100 * scale[4:].max()


def test_straight_through_gradient_inside_range_only() -> None:
    x = torch.tensor([-1.0, 0.04, 0.5, 2.0, 30.0], requires_grad=True)
    y = fake_quant_ste(x, 0.1, 10, 0, 255)  # range [-1.0, 24.5]
    y.sum().backward()
    torch.testing.assert_close(y.detach(), torch.tensor([-1.0, 0.0, 0.5, 2.0, 24.5]))
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))


def _deployed_linear(seed: int) -> tuple[torch.nn.Module, DynamicLinearSTE]:
    from torch import nn

    linear = nn.Linear(32, 5)
    with torch.no_grad():  # seeded init, independent of the global RNG
        g = torch.Generator().manual_seed(seed)
        linear.weight.copy_(torch.randn(5, 32, generator=g) / 6)
        linear.bias.copy_(torch.randn(5, generator=g) / 6)
    with ignoring_known_warnings():
        deployed = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear})[0]
    w, b = deployed._weight_bias()
    return deployed, DynamicLinearSTE(w.dequantize(), b, reduce_range=True)  # x86 default engine


def _mixed_rows() -> torch.Tensor:
    """Rows whose ranges differ by ~100x: one range over all of them changes the small ones."""
    g = torch.Generator().manual_seed(5)
    return torch.cat([torch.randn(3, 32, generator=g) * 5, torch.rand(3, 32, generator=g) * 0.1 - 0.02])


def _one_at_a_time(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[i : i + 1]) for i in range(len(x))])


@pytest.mark.skipif(torch.backends.quantized.engine != "x86", reason="measured on the x86 engine")
def test_deployed_kernel_takes_one_range_over_the_batch() -> None:
    """What the twin is compared with: quantized::linear_dynamic quantizes its whole input with
    one range (docs/quantization.md), so a row's output depends on the other rows."""
    deployed, _ = _deployed_linear(0)
    x = _mixed_rows()
    with torch.no_grad():
        batch, alone = deployed(x), _one_at_a_time(deployed, x)
        w, b = deployed._weight_bias()
        per_tensor = torch.nn.functional.linear(torch.quantize_per_tensor_dynamic(x, torch.quint8, True).dequantize(), w.dequantize(), b)
    torch.testing.assert_close(batch, per_tensor, rtol=1e-5, atol=1e-5)
    assert (batch[3:] - alone[3:]).abs().max() > 0.1 * alone[3:].abs().max()


def test_dynamic_linear_twin_matches_torch_served_alone() -> None:
    deployed, twin = _deployed_linear(0)
    x = _mixed_rows()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), _one_at_a_time(deployed, x), rtol=1e-5, atol=1e-5)


def test_dynamic_linear_twin_is_batch_independent() -> None:
    """A row's output is the same alone and in any batch (the old per-tensor twin moved the small
    rows of this batch by ~30 % of their logits)."""
    _, twin = _deployed_linear(1)
    x = _mixed_rows()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), _one_at_a_time(twin, x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(twin(x.flip(0)).flip(0), twin(x), rtol=1e-5, atol=1e-6)


def test_dynamic_linear_twin_gradient_is_straight_through_per_row() -> None:
    _, twin = _deployed_linear(2)
    x = _mixed_rows().requires_grad_()
    (grad,) = torch.autograd.grad(twin(x).sum(), x)
    # inside every row's own range the input gradient is the float linear's: column sums of W
    torch.testing.assert_close(grad, twin.weight.sum(0).expand_as(x))


@pytest.mark.parametrize(("qmin", "qmax"), [(0, 255), (-128, 127), (0, 127)])
def test_fake_quant_is_bitwise_atens_with_the_same_gradient(qmin: int, qmax: int) -> None:
    """qbd's straight-through fake quantization (faster on a CPU) against
    torch.fake_quantize_per_tensor_affine: the same values to the bit, ties included, and the same
    gradient (1 inside the range, 0 where clipped)."""
    g = torch.Generator().manual_seed(qmin + qmax)
    for _ in range(50):
        scale = float(torch.rand(1, generator=g)) * 0.2 + 1e-4
        zp = int(torch.randint(qmin, qmax + 1, (1,), generator=g))
        x = torch.randn(4000, generator=g) * scale * 150
        x[:64] = (torch.arange(64) - 32 + 0.5) * scale  # exact halves: round half to even
        x.requires_grad_(True)
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        ours = fake_quant_ste(x, scale, zp, qmin, qmax)
        assert torch.equal(ours, ref)
        upstream = torch.randn(4000, generator=g)
        assert torch.equal(torch.autograd.grad(ours, x, upstream)[0], torch.autograd.grad(ref, x, upstream)[0])


def test_fake_quant_keeps_a_nan_and_clamps_infinities() -> None:
    """torch's kernel turns NaN into quant_min (a diverged activation would look like a valid
    one); qbd's keeps it NaN, so a defense sees the divergence, and clamps +-inf to the ends."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3])
    out = fake_quant_ste(x, 0.1, 3, 0, 255)
    assert torch.isnan(out[0]) and out[1] == pytest.approx((255 - 3) * 0.1) and out[2] == pytest.approx(-3 * 0.1)
    assert out[3] == pytest.approx(0.3)


def test_fake_quant_of_another_dtype_is_torchs() -> None:
    """bf16 activations (autocast) go through torch's op, which computes in float32."""
    x = (torch.randn(2000, generator=torch.Generator().manual_seed(9)) * 40).to(torch.bfloat16)
    assert torch.equal(fake_quant_ste(x, 0.37, 7, 0, 255), torch.fake_quantize_per_tensor_affine(x, 0.37, 7, 0, 255))


def test_channels_last_input_computes_in_the_kernels_layout():
    """A float mean over H and W sums in memory order: the twin's must be the deployed oneDNN
    graph's (channels_last), whatever layout its input arrives in."""
    import torch.fx as fx

    from qbd.quant.surrogate import channels_last_input

    class Pool(torch.nn.Module):
        def forward(self, x):
            return torch.mean(x, (2, 3))

    x = torch.randn(16, 64, 4, 4, generator=torch.Generator().manual_seed(0)) * 7
    nhwc = torch.mean(x.contiguous(memory_format=torch.channels_last), (2, 3))
    assert not torch.equal(torch.mean(x, (2, 3)), nhwc)  # the layouts' sums differ: the test can fail
    gm = channels_last_input(fx.symbolic_trace(Pool()))
    assert torch.equal(gm(x), nhwc) and torch.equal(gm(x.contiguous(memory_format=torch.channels_last)), nhwc)

    class Scale(torch.nn.Module):
        def forward(self, f):
            return f * 2

    f = torch.randn(4, 8).t()  # 2-D inputs (a head's features) pass as they are, layout and all
    assert torch.equal(channels_last_input(fx.symbolic_trace(Scale()))(f), f * 2)
