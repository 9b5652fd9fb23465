"""scikit-learn's digits, upsampled to 32x32 RGB with a seeded stratified split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from qbd.config import DatasetSpec
from qbd.data import digits, load_dataset
from qbd.data.base import DataSplit

N_TOTAL = 1797


@pytest.fixture(scope="module")
def split0() -> DataSplit:
    return load_dataset(DatasetSpec("digits", 0))


@pytest.fixture(scope="module")
def source() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return bunch.images, bunch.target


def test_shapes_and_dtypes(split0: DataSplit) -> None:
    assert split0.classes == tuple("0123456789")
    assert tuple(split0.x_train.shape[1:]) == (3, 32, 32)
    assert split0.x_train.dtype == torch.uint8 and split0.y_train.dtype == torch.int64
    assert split0.x_test.dtype == torch.uint8 and split0.y_test.dtype == torch.int64
    # the three channels are copies of the grey image
    assert torch.equal(split0.x_train[:, 0], split0.x_train[:, 1])
    assert torch.equal(split0.x_train[:, 0], split0.x_train[:, 2])


def test_split_sizes(split0: DataSplit) -> None:
    assert len(split0.x_train) + len(split0.x_test) == N_TOTAL
    assert len(split0.x_test) == 360  # ceil(0.2 * 1797), scikit-learn's rounding


def test_split_is_stratified(split0: DataSplit, source: tuple[np.ndarray, np.ndarray]) -> None:
    total = np.bincount(source[1], minlength=10)
    test = np.bincount(split0.y_test.numpy(), minlength=10)
    assert np.all(np.abs(test - digits.TEST_FRACTION * total) <= 1)


def test_split_is_a_partition(split0: DataSplit, source: tuple[np.ndarray, np.ndarray]) -> None:
    pixels = digits.to_pixels(source[0])
    # every source image lands in exactly one split (compare as multisets of rows)
    both = np.concatenate([split0.x_train.numpy(), split0.x_test.numpy()])
    key = lambda a: sorted(r.tobytes() for r in a)  # noqa: E731
    assert key(both) == key(pixels)


def test_deterministic_and_seeded(split0: DataSplit) -> None:
    again = load_dataset(DatasetSpec("digits", 0))
    assert torch.equal(again.x_train, split0.x_train) and torch.equal(again.y_test, split0.y_test)
    other = load_dataset(DatasetSpec("digits", 1))
    assert len(other.x_test) == len(split0.x_test)
    assert not torch.equal(other.x_test, split0.x_test)


def test_upsampling_matches_torch_bilinear(source: tuple[np.ndarray, np.ndarray]) -> None:
    images = source[0]
    ours = digits.to_pixels(images)[:, 0].astype(np.float64)
    ref = F.interpolate(torch.from_numpy(images * (255 / 16))[:, None], size=32, mode="bilinear", align_corners=False)[
        :, 0
    ].numpy()
    assert np.abs(ours - ref).max() <= 0.5 + 1e-9


def test_value_range() -> None:
    flat = digits.to_pixels(np.stack([np.zeros((8, 8)), np.full((8, 8), 16.0)]))
    assert (flat[0] == 0).all() and (flat[1] == 255).all()


def test_mean_std_constants(source: tuple[np.ndarray, np.ndarray]) -> None:
    x = digits.to_pixels(source[0]).astype(np.float64) / 255
    assert round(float(x.mean()), 4) == digits.MEAN[0]
    assert round(float(x.std()), 4) == digits.STD[0]


@pytest.mark.parametrize("bad", [np.zeros((2, 8, 7)), np.full((1, 8, 8), 17.0), np.full((1, 8, 8), 0.5)])
def test_to_pixels_rejects_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        digits.to_pixels(bad)
