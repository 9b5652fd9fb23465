"""Properties of the intN-sim weight quantizer (the paper's Eq. 3, per output channel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qbd.quant.intn_sim import MAX_BITS, MIN_BITS, quantize_weight

BITS = st.integers(MIN_BITS, MAX_BITS)
# Bounded, finite float32 values; subnormals excluded (their scale would underflow).
ELEMENTS = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)
# Linear-like (out, in) and conv-like (out, in, kh, kw) weights, small.
SHAPES = st.one_of(
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
    hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=3),
)


@st.composite
def weights(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(SHAPES)
    w = draw(hnp.arrays(np.float32, shape, elements=ELEMENTS))
    zero_rows = draw(hnp.arrays(np.bool_, (shape[0],)))  # some all-zero output channels
    w[zero_rows] = 0.0
    return torch.from_numpy(w)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


# Slack for float32 rounding of w / scale and q * scale (relative to the channel's max |w|).
EPS = 4 * float(np.finfo(np.float32).eps)


@given(weights(), BITS)
def test_shape_dtype_and_scale_shape_preserved(w: torch.Tensor, bits: int) -> None:
    w_q, scale = quantize_weight(w, bits)
    assert w_q.shape == w.shape and w_q.dtype == w.dtype
    assert scale.shape == (w.shape[0],)


@given(weights(), BITS)
def test_finite_and_all_zero_channels_stay_zero(w: torch.Tensor, bits: int) -> None:
    w_q, scale = quantize_weight(w, bits)
    assert torch.isfinite(w_q).all() and torch.isfinite(scale).all()
    zero = (_rows(w) == 0).all(dim=1)
    assert (scale[zero] == 0).all()
    assert (_rows(w_q)[zero] == 0).all()


@given(weights(), BITS)
def test_zero_maps_to_zero(w: torch.Tensor, bits: int) -> None:
    w_q, _ = quantize_weight(w, bits)
    assert (w_q[w == 0] == 0).all()


@given(weights(), BITS)
def test_error_at_most_half_a_step(w: torch.Tensor, bits: int) -> None:
    # Symmetric with scale = max|w| / qmax: every value lies inside the range, so rounding
    # to the nearest level is off by at most scale / 2.
    w_q, scale = quantize_weight(w, bits)
    err = _rows(w - w_q).abs().amax(dim=1)
    amax = _rows(w).abs().amax(dim=1)
    assert (err <= scale / 2 + EPS * amax).all()


@given(weights(), BITS)
def test_at_most_2_pow_bits_levels_per_channel(w: torch.Tensor, bits: int) -> None:
    w_q, scale = quantize_weight(w, bits)
    for row, s in zip(_rows(w_q), scale, strict=True):
        assert torch.unique(row).numel() <= 2**bits
        if s > 0:  # the levels are integer multiples of the scale within [-2^(N-1), 2^(N-1)-1]
            q = row / s
            assert torch.allclose(q, q.round(), atol=1e-3)
            assert q.round().min() >= -(2 ** (bits - 1)) and q.round().max() <= 2 ** (bits - 1) - 1


@given(weights(), BITS)
def test_idempotent(w: torch.Tensor, bits: int) -> None:
    w_q, _ = quantize_weight(w, bits)
    w_qq, _ = quantize_weight(w_q, bits)
    assert torch.equal(w_qq, w_q)


@given(weights(), BITS, st.data())
def test_scales_are_per_output_channel(w: torch.Tensor, bits: int, data: st.DataObject) -> None:
    """Changing one output channel changes neither the other channels' output nor scale."""
    channel = data.draw(st.integers(0, w.shape[0] - 1))
    factor = data.draw(st.floats(0.0, 1e3, width=32, allow_subnormal=False))
    w2 = w.clone()
    w2[channel] = w2[channel] * factor + 1.0
    w_q, scale = quantize_weight(w, bits)
    w2_q, scale2 = quantize_weight(w2, bits)
    others = torch.arange(w.shape[0]) != channel
    assert torch.equal(w_q[others], w2_q[others])
    assert torch.equal(scale[others], scale2[others])


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.ones(2, 2), bits)


def test_eq3_by_hand() -> None:
    # int4: qmax = 7; channel 0 max |w| = 1.4 -> scale 0.2; channel 1 all zero.
    w = torch.tensor([[1.4, -0.31, 0.05, -1.4], [0.0, 0.0, 0.0, 0.0]])
    w_q, scale = quantize_weight(w, 4)
    torch.testing.assert_close(scale, torch.tensor([0.2, 0.0]))
    torch.testing.assert_close(w_q, torch.tensor([[1.4, -0.4, 0.0, -1.4], [0.0, 0.0, 0.0, 0.0]]))
