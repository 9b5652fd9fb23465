"""benchmarks/stand_in_data.py: stand-in CIFAR-10 / GTSRB that qbd's own loaders read back, with the
classes, sizes and images the writer meant."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from qbd.config import DatasetSpec
from qbd.data import load_dataset, synthetic
from qbd.errors import ConfigError

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "stand_in_data.py"
SCALE = 0.002  # cifar10 100 / 20 images, gtsrb 53 / 25


@pytest.fixture(scope="module")
def sid():
    spec = importlib.util.spec_from_file_location("stand_in_data", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def root(sid, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stand-in")
    assert sid.main(["--root", str(root), "--scale", str(SCALE)]) == 0
    return root


def test_cifar10_reads_back_through_qbds_loader(sid, root: Path) -> None:
    data = load_dataset(DatasetSpec("cifar10"), root)
    n_train, n_test = sid.sizes("cifar10", SCALE)
    assert (n_train, n_test) == (100, 20)
    assert tuple(data.x_train.shape) == (n_train, 3, 32, 32) and tuple(data.x_test.shape) == (n_test, 3, 32, 32)
    assert data.num_classes == 10
    assert set(data.y_train.tolist()) == set(range(10))  # every class present, none beyond 9
    x, y = sid.cifar_images(0, "train", n_train)  # the generator's images, bit for bit
    np.testing.assert_array_equal(data.x_train.numpy(), x)
    np.testing.assert_array_equal(data.y_train.numpy(), y)


def test_gtsrb_reads_back_through_qbds_loader(sid, root: Path) -> None:
    data = load_dataset(DatasetSpec("gtsrb"), root)
    n_train, n_test = sid.sizes("gtsrb", SCALE)
    assert (n_train, n_test) == (53, 25)
    assert tuple(data.x_train.shape) == (n_train, 3, 32, 32) and tuple(data.x_test.shape) == (n_test, 3, 32, 32)
    assert data.num_classes == 43
    assert np.bincount(data.y_train.numpy(), minlength=43).min() >= 1  # every class folder holds images
    # torchvision reads the class folders in order: the images are the writer's, bit for bit
    x, y = sid.gtsrb_images(1, "train", n_train)
    np.testing.assert_array_equal(data.x_train.numpy(), x)
    np.testing.assert_array_equal(data.y_train.numpy(), y)
    assert sorted(data.y_test.tolist()) == sorted(sid.gtsrb_images(1, "test", n_test)[1].tolist())


def test_gtsrb_classes_are_tellable_apart(sid) -> None:
    """43 distinct (synthetic class, rotation, flip) triples, and what makes them learnable: every
    synthetic class has its own shape and glyph, so the rotation (which channel carries the sign
    colour) and the flip are the only differences within one class."""
    assert len(sid.GTSRB_CLASSES) == len(set(sid.GTSRB_CLASSES)) == 43
    shape_glyph = [(shape, glyph) for shape, _, glyph in synthetic.CLASS_TABLE]
    assert len(set(shape_glyph)) == len(shape_glyph)
    for base, _, flip in sid.GTSRB_CLASSES:
        shape, _, glyph = synthetic.CLASS_TABLE[base]
        if flip == "v":  # upside down must look different: not a symmetric shape and glyph
            assert shape == "triangle" or glyph == "arrow_up"
        elif flip == "h":
            assert glyph == "arrow_right"


def test_gtsrb_classes_are_the_synthetic_ones_rolled_and_flipped(sid, monkeypatch: pytest.MonkeyPatch) -> None:
    """Class (b, r, f) holds synthetic class b's images with the RGB planes rolled r places (the sign
    colour moves to another channel) and flipped as f says. Checked on marked images: each pixel
    encodes its channel, row and half-column."""
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    marked = (80 * c + h + 40 * (w >= 16)).astype(np.uint8)

    def generate(seed: int, split: str, n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(len(synthetic.CLASS_TABLE)), n_per_class)
        return np.broadcast_to(marked, (len(y), 3, 32, 32)).copy(), y

    monkeypatch.setattr(sid.synthetic, "generate", generate)
    x, y = sid.gtsrb_images(1, "train", 43 * 3 + 5)
    assert np.bincount(y).tolist() == [4] * 5 + [3] * 38
    for label, (_, rotation, flip) in enumerate(sid.GTSRB_CLASSES):
        want = np.roll(marked, rotation, axis=0)
        want = want[:, ::-1, :] if flip == "v" else want[:, :, ::-1] if flip == "h" else want
        np.testing.assert_array_equal(x[y == label], np.broadcast_to(want, (int((y == label).sum()), 3, 32, 32)))


def test_rewrites_its_own_folders_and_never_anyone_elses(sid, tmp_path: Path) -> None:
    assert sid.main(["--root", str(tmp_path), "--scale", "0.002", "--dataset", "gtsrb"]) == 0
    assert sid.main(["--root", str(tmp_path), "--scale", "0.003", "--dataset", "gtsrb"]) == 0
    assert len(list(tmp_path.glob("gtsrb/GTSRB/Training/*/*.ppm"))) == sid.sizes("gtsrb", 0.003)[0] == 80
    real = tmp_path / "cifar-10-batches-py"
    real.mkdir()
    (real / "data_batch_1").write_bytes(b"someone's data")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        sid.write_cifar10(tmp_path, 0.002)
    assert (real / "data_batch_1").read_bytes() == b"someone's data"
    assert sid.main(["--root", str(tmp_path), "--dataset", "cifar10", "--scale", "0.002"]) == 2


@pytest.mark.parametrize("scale", [0.0, -0.5, 1.5])
def test_bad_scale_is_a_config_error_before_anything_is_written(sid, tmp_path: Path, scale: float) -> None:
    with pytest.raises(ConfigError, match="--scale"):
        sid.sizes("cifar10", scale)
    assert sid.main(["--root", str(tmp_path), "--scale", str(scale)]) == 2
    assert list(tmp_path.iterdir()) == []
