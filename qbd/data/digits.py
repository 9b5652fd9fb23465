"""scikit-learn's bundled handwritten digits (UCI ML optical digits, 1,797 8x8 images, 0..16).

Real data that ships inside scikit-learn, so it needs neither a download nor a data root. Each
image is scaled to 0..255, upsampled to 32x32 and replicated to 3 channels so that it fits the
same models and triggers as the other data sets. The train/test split is stratified and seeded
by `spec.seed`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qbd.config import DatasetSpec
from qbd.data.base import DataSplit
from qbd.errors import ConfigError

SIZE = 32
TEST_FRACTION = 0.2
CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
# Per-channel mean/std (in [0, 1] units, rounded to 4 decimals) of all 1,797 images after
# `to_pixels`: fixed constants, independent of the split seed. The channels are identical copies.
MEAN = (0.3052, 0.3052, 0.3052)
STD = (0.3236, 0.3236, 0.3236)

_SOURCE_SIZE = 8
_SOURCE_MAX = 16


def load(spec: DatasetSpec, root: Path | None = None) -> DataSplit:
    """Load, upsample and split the digits. `root` is unused (the data ship with scikit-learn)."""
    # Imported here: scikit-learn is a heavy import and only this loader needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if spec.seed >= 2**32:  # scikit-learn's random_state is a 32-bit seed
        raise ConfigError(f"digits: the split seed must be < 2**32, got {spec.seed}")
    bunch = load_digits()
    images = to_pixels(bunch.images)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(labels.size), test_size=TEST_FRACTION, random_state=spec.seed, stratify=labels
    )
    # Sorted so the order within each split depends only on membership, not on the shuffle.
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return DataSplit.from_numpy("digits", (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx]),
                                CLASSES, MEAN, STD)


def to_pixels(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) values 0..16 -> uint8 (N, 3, 32, 32): bilinear upsampling, grey replicated to RGB.

    The bilinear weights of an exact 4x upsampling are multiples of 1/8, so the whole resize is
    done in integer arithmetic and rounded once: bit-identical on every machine, and equal (up to
    that final rounding) to torch's `interpolate(mode="bilinear", align_corners=False)`.
    """
    src = np.asarray(images)
    if src.ndim != 3 or src.shape[1:] != (_SOURCE_SIZE, _SOURCE_SIZE):
        raise ValueError(f"expected N x 8 x 8 digit images, got shape {src.shape}")
    values = np.rint(src).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > _SOURCE_MAX or not np.array_equal(values, src)):
        raise ValueError("digit images must hold integers 0..16")
    w = _bilinear_weights(_SOURCE_SIZE, SIZE)  # (32, 8), rows sum to 8
    # num = W @ img @ W^T, in units of 1/64 of a source level (integers, exact in any order)
    num = np.einsum("ij,njk,lk->nil", w, values, w)
    denom = 64 * _SOURCE_MAX
    grey = (num * 255 + denom // 2) // denom  # round half up
    return np.repeat(grey.astype(np.uint8)[:, None], 3, axis=1)


def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """Integer bilinear interpolation matrix (n_out x n_in) with half-pixel centres and edge
    clamping (align_corners=False), scaled by 8: exact only for a 4x upsampling."""
    scale = n_out // n_in
    if scale * n_in != n_out or scale != 4:
        raise ValueError("integer weights are exact only for a 4x upsampling")
    w = np.zeros((n_out, n_in), dtype=np.int64)
    for o in range(n_out):
        # source coordinate in eighths: ((o + 0.5) / 4 - 0.5) * 8 = 2 * o - 3
        pos = max(2 * o - 3, 0)
        i0, frac = divmod(pos, 8)
        i1 = min(i0 + 1, n_in - 1)
        w[o, i0] += 8 - frac
        w[o, i1] += frac
    return w
