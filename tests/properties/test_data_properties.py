"""Hypothesis properties of the embedded data sets' generators."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qbd.data import digits, synthetic

SMALL = settings(max_examples=10, deadline=None)


@SMALL
@given(seed=st.integers(0, 2**32 - 1), split=st.sampled_from(["train", "test"]), n=st.integers(1, 3))
def test_synthetic_is_deterministic_balanced_and_in_range(seed: int, split: str, n: int) -> None:
    x, y = synthetic.generate(seed, split, n)
    x2, y2 = synthetic.generate(seed, split, n)
    k = len(synthetic.CLASSES)
    assert x.dtype == np.uint8 and x.shape == (k * n, 3, 32, 32)
    assert y.dtype == np.int64 and y.shape == (k * n,)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.bincount(y, minlength=k).tolist() == [n] * k
    assert y.min() >= 0 and y.max() < k


@SMALL
@given(seed=st.integers(0, 2**32 - 2))
def test_synthetic_neighbouring_seeds_differ(seed: int) -> None:
    a, _ = synthetic.generate(seed, "train", 1)
    b, _ = synthetic.generate(seed + 1, "train", 1)
    assert not np.array_equal(a, b)


@SMALL
@given(images=arrays(np.int64, st.tuples(st.integers(1, 4), st.just(8), st.just(8)), elements=st.integers(0, 16)))
def test_digits_upsampling_is_exact_bilinear(images: np.ndarray) -> None:
    out = digits.to_pixels(images.astype(np.float64))
    assert out.dtype == np.uint8 and out.shape == (len(images), 3, 32, 32)
    ref = F.interpolate(
        torch.from_numpy(images * (255 / 16)).double()[:, None], size=32, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    assert np.abs(out[:, 0].astype(np.float64) - ref).max() <= 0.5 + 1e-9
    assert np.array_equal(out, digits.to_pixels(images.astype(np.float64)))
