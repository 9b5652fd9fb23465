"""CIFAR-10 and GTSRB loaders on tiny files written in torchvision's on-disk formats."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets
from PIL import Image
from torchvision.datasets import CIFAR10

from qbd.config import DatasetSpec
from qbd.data import DATA_ROOT_ENV, layouts, load_dataset
from qbd.data import cifar10 as cifar_mod
from qbd.data import gtsrb as gtsrb_mod
from qbd.data.base import DataUnavailableError
from tests.unit._formats import (
    CIFAR_CLASSES,
    CIFAR_META_FILE,
    CIFAR_TEST_FILE,
    CIFAR_TRAIN_FILES,
    cifar_batch,
    py2_pickle,
    write_cifar10,
    write_gtsrb,
)

CIFAR = DatasetSpec("cifar10")
GTSRB = DatasetSpec("gtsrb")


class UncheckedCIFAR10(CIFAR10):
    """torchvision's own reader with the md5 checks switched off (check_integrity(path, None)
    only checks the file exists), so it can read the tiny test files."""

    # same (mutable) attribute types as torchvision's class
    train_list = [[name, None] for name, _ in CIFAR10.train_list]  # noqa: RUF012
    test_list = [[name, None] for name, _ in CIFAR10.test_list]  # noqa: RUF012
    meta = {**CIFAR10.meta, "md5": None}  # noqa: RUF012


# --- CIFAR-10: round trips -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["cifar-10-batches-py", "cifar10/cifar-10-batches-py"])
def test_cifar10_round_trip(tmp_path: Path, layout: str) -> None:
    tiny = write_cifar10(tmp_path / layout)
    split = load_dataset(CIFAR, tmp_path)
    np.testing.assert_array_equal(split.x_train.numpy(), tiny.x_train)
    np.testing.assert_array_equal(split.y_train.numpy(), tiny.y_train)
    np.testing.assert_array_equal(split.x_test.numpy(), tiny.x_test)
    np.testing.assert_array_equal(split.y_test.numpy(), tiny.y_test)
    assert split.classes == CIFAR_CLASSES
    assert (split.mean, split.std) == (cifar_mod.MEAN, cifar_mod.STD)


def test_cifar10_channel_order(tmp_path: Path) -> None:
    # a row is the R plane, then G, then B, each 32 rows of 32 pixels
    batch_dir = tmp_path / "cifar-10-batches-py"
    write_cifar10(batch_dir)
    row = np.zeros(3072, dtype=np.uint8)
    row[0] = 10  # R at (0, 0)
    row[1024 + 33] = 20  # G at (1, 1)
    row[2048 + 1023] = 30  # B at (31, 31)
    batch = cifar_batch(row[None].reshape(1, 3, 32, 32), np.array([7]), "data_batch_1")
    (batch_dir / "data_batch_1").write_bytes(py2_pickle(batch))
    x = load_dataset(CIFAR, tmp_path).x_train[0].numpy()
    assert (x[0, 0, 0], x[1, 1, 1], x[2, 31, 31]) == (10, 20, 30)
    assert int(x.astype(np.int64).sum()) == 60


def test_cifar10_env_var_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = write_cifar10(tmp_path / "cifar-10-batches-py")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    np.testing.assert_array_equal(load_dataset(CIFAR).y_test.numpy(), tiny.y_test)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_repacked_with_python3_pickle(tmp_path: Path, protocol: int) -> None:
    tiny = write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    split = load_dataset(CIFAR, tmp_path)
    np.testing.assert_array_equal(split.x_train.numpy(), tiny.x_train)
    np.testing.assert_array_equal(split.y_test.numpy(), tiny.y_test)


def test_tiny_files_are_not_the_official_release(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar-10-batches-py")
    assert not cifar_mod._is_official_release(tmp_path / "cifar-10-batches-py")


def test_restricted_reader_agrees_with_torchvision(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=4, n_test=6, seed=5)
    ours = load_dataset(CIFAR, tmp_path)
    for train, x, y in ((True, ours.x_train, ours.y_train), (False, ours.x_test, ours.y_test)):
        ref = UncheckedCIFAR10(str(tmp_path), train=train, download=False)
        np.testing.assert_array_equal(x.numpy(), ref.data.transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(y.numpy(), np.asarray(ref.targets))
        assert ours.classes == tuple(ref.classes)


def test_official_release_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With torchvision's md5 list emptied, the tiny files count as the official release: the
    # production branch must then read them with torchvision, not with the restricted reader.
    tiny = write_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", UncheckedCIFAR10)

    def restricted_reader_must_not_run(*args: object) -> None:
        raise AssertionError("restricted reader used for the official release")

    monkeypatch.setattr(cifar_mod, "_read_batches", restricted_reader_must_not_run)
    split = load_dataset(CIFAR, tmp_path)
    np.testing.assert_array_equal(split.x_train.numpy(), tiny.x_train)
    np.testing.assert_array_equal(split.y_train.numpy(), tiny.y_train)
    np.testing.assert_array_equal(split.x_test.numpy(), tiny.x_test)
    assert split.classes == CIFAR_CLASSES


# --- CIFAR-10: missing files -----------------------------------------------------------------


def test_cifar10_none_root_says_how_to_configure() -> None:
    with pytest.raises(DataUnavailableError) as err:
        cifar_mod.load(CIFAR, None)
    msg = str(err.value)
    for needle in (
        "--data-root",
        DATA_ROOT_ENV,
        "cifar-10-batches-py/data_batch_1",
        "cifar-10-python.tar.gz",
        layouts.CIFAR_URL,
    ):
        assert needle in msg


def test_cifar10_none_root_via_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(DataUnavailableError, match="QBD_DATA_ROOT"):
        load_dataset(CIFAR)


def test_cifar10_empty_root_names_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError) as err:
        load_dataset(CIFAR, tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "tar -xzf" in msg


def test_cifar10_missing_file_is_named(tmp_path: Path) -> None:
    batch_dir = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar10(batch_dir)
    (batch_dir / "data_batch_4").unlink()
    (batch_dir / CIFAR_META_FILE).unlink()
    with pytest.raises(DataUnavailableError) as err:
        load_dataset(CIFAR, tmp_path)
    msg = str(err.value)
    assert f"{batch_dir} lacks data_batch_4, batches.meta" in msg


def test_cifar10_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataUnavailableError, match="data_batch_1"):
        load_dataset(CIFAR, tmp_path / "file")


# --- CIFAR-10: corrupt and hostile files -----------------------------------------------------


class _Exec:
    """Unpickling this runs `code` through exec, as a hostile batch file would."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (self.code,))


class _System:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("echo pwned",))


def _payload(marker: Path) -> _Exec:
    return _Exec(f"open({str(marker)!r}, 'w').write('pwned')")


@pytest.mark.parametrize("target", [*CIFAR_TRAIN_FILES[:1], CIFAR_TEST_FILE, CIFAR_META_FILE])
@pytest.mark.parametrize("where", ["top", "nested"])
def test_malicious_pickle_never_executes(tmp_path: Path, target: str, where: str) -> None:
    root = tmp_path / "root"
    batch_dir = root / "cifar-10-batches-py"
    write_cifar10(batch_dir)
    marker = tmp_path / "pwned"
    payload = _payload(marker)
    obj = payload if where == "top" else {"data": payload, "labels": [0], "label_names": [payload]}
    (batch_dir / target).write_bytes(pickle.dumps(obj, protocol=2))
    # the exploit is real: plain pickle would run it
    assert not marker.exists()
    with pytest.raises(DataUnavailableError, match=r"refusing to unpickle (__builtin__|builtins)\.exec"):
        load_dataset(CIFAR, root)
    assert not marker.exists()


def test_malicious_os_system_is_refused(tmp_path: Path) -> None:
    batch_dir = tmp_path / "cifar-10-batches-py"
    write_cifar10(batch_dir)
    (batch_dir / "data_batch_2").write_bytes(pickle.dumps({"data": _System(), "labels": []}))
    with pytest.raises(DataUnavailableError, match=r"refusing to unpickle (os|posix|nt)\.system"):
        load_dataset(CIFAR, tmp_path)


def test_exploit_used_in_the_tests_is_live(tmp_path: Path) -> None:
    # guard against a vacuous test: the same bytes do execute under plain pickle
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_payload(marker), protocol=2))
    assert marker.read_text() == "pwned"


def test_build_cannot_modify_numpy_functions(tmp_path: Path) -> None:
    # GLOBAL numpy._core.numeric._frombuffer, then BUILD (None, {"__defaults__": (1,)}): on the
    # raw function this would silently change numpy's pickle support for the whole process.
    frombuffer = np.empty(1).__reduce_ex__(5)[0]
    before = frombuffer.__defaults__
    for module in (b"numpy._core.numeric", b"numpy.core.numeric"):
        attack = b"\x80\x02c" + module + b"\n_frombuffer\nN}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b."
        batch_dir = tmp_path / module.decode() / "cifar-10-batches-py"
        write_cifar10(batch_dir)
        (batch_dir / "data_batch_1").write_bytes(attack)
        with pytest.raises(DataUnavailableError):
            load_dataset(CIFAR, batch_dir.parent)
    assert frombuffer.__defaults__ == before


def test_other_codecs_are_refused(tmp_path: Path) -> None:
    batch_dir = tmp_path / "cifar-10-batches-py"
    write_cifar10(batch_dir)
    # _codecs.encode("x", "rot13"): allowed global, refused argument
    attack = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R."
    (batch_dir / "test_batch").write_bytes(attack)
    with pytest.raises(DataUnavailableError, match="rot13"):
        load_dataset(CIFAR, tmp_path)


@pytest.mark.parametrize(
    "damage",
    [
        "truncated",
        "empty",
        "not-a-pickle",
        "not-a-dict",
        "float-data",
        "flat-data",
        "short-labels",
        "bad-label",
        "no-names",
    ],
)
def test_corrupt_cifar10_file(tmp_path: Path, damage: str) -> None:
    batch_dir = tmp_path / "cifar-10-batches-py"
    write_cifar10(batch_dir)
    path = batch_dir / ("batches.meta" if damage == "no-names" else "data_batch_3")
    good = np.zeros((2, 3072), dtype=np.uint8)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not-a-pickle":
        path.write_bytes(b"this is not a pickle\n")
    else:
        obj = {
            "not-a-dict": [1, 2, 3],
            "float-data": {"data": good.astype(np.float32), "labels": [0, 1]},
            "flat-data": {"data": good.reshape(-1), "labels": [0, 1]},
            "short-labels": {"data": good, "labels": [0]},
            "bad-label": {"data": good, "labels": [0, 10]},
            "no-names": {"label_names": "airplane"},
        }[damage]
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataUnavailableError, match=str(path.name)):
        load_dataset(CIFAR, tmp_path)


# --- GTSRB -----------------------------------------------------------------------------------


def test_gtsrb_round_trip(tmp_path: Path) -> None:
    tiny = write_gtsrb(tmp_path, per_class=2, n_test=7)
    split = load_dataset(GTSRB, tmp_path)
    assert split.num_classes == 43 and split.classes == gtsrb_mod.CLASSES
    assert tuple(split.x_train.shape) == (86, 3, 32, 32) and tuple(split.x_test.shape) == (7, 3, 32, 32)
    # torchvision reads class folders in sorted order and the test images in CSV order
    np.testing.assert_array_equal(split.x_train.numpy(), np.stack([img.transpose(2, 0, 1) for img, _ in tiny.train]))
    np.testing.assert_array_equal(split.y_train.numpy(), [c for _, c in tiny.train])
    np.testing.assert_array_equal(split.x_test.numpy(), np.stack([img.transpose(2, 0, 1) for img, _ in tiny.test]))
    np.testing.assert_array_equal(split.y_test.numpy(), [c for _, c in tiny.test])
    assert (split.mean, split.std) == (gtsrb_mod.MEAN, gtsrb_mod.STD)


def test_gtsrb_resizes_every_image_to_32(tmp_path: Path) -> None:
    tiny = write_gtsrb(tmp_path, n_test=3, sizes=((45, 38), (17, 21), (32, 32), (64, 64)))
    split = load_dataset(GTSRB, tmp_path)
    for x, (img, _) in zip(split.x_test.numpy(), tiny.test, strict=True):
        ref = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(x, ref.transpose(2, 0, 1))
    assert tuple(split.x_train.shape[1:]) == (3, 32, 32)


def test_gtsrb_none_root_says_how_to_configure() -> None:
    with pytest.raises(DataUnavailableError) as err:
        gtsrb_mod.load(GTSRB, None)
    msg = str(err.value)
    for needle in (
        "--data-root",
        DATA_ROOT_ENV,
        "gtsrb/GTSRB/Training/00000",
        "GTSRB_Final_Test_GT.zip",
        layouts.GTSRB_URL,
    ):
        assert needle in msg


def test_gtsrb_empty_root_names_the_expected_paths(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError) as err:
        load_dataset(GTSRB, tmp_path)
    msg = str(err.value)
    for path in (layouts.GTSRB_TRAIN, layouts.GTSRB_TEST, layouts.GTSRB_TEST_CSV):
        assert str(tmp_path / path) in msg


def test_gtsrb_missing_test_csv(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    (tmp_path / layouts.GTSRB_TEST_CSV).unlink()
    with pytest.raises(DataUnavailableError, match=r"GT-final_test\.csv is missing"):
        load_dataset(GTSRB, tmp_path)


def test_gtsrb_missing_class_folder(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    shutil.rmtree(tmp_path / layouts.GTSRB_TRAIN / "00042")
    with pytest.raises(DataUnavailableError, match=r"00000\.\.00042 \(missing 00042\)"):
        load_dataset(GTSRB, tmp_path)


def test_gtsrb_class_folder_without_images(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    for ppm in (tmp_path / layouts.GTSRB_TRAIN / "00007").glob("*.ppm"):
        ppm.unlink()
    with pytest.raises(DataUnavailableError, match="GTSRB train split"):
        load_dataset(GTSRB, tmp_path)


def test_gtsrb_test_image_missing(tmp_path: Path) -> None:
    write_gtsrb(tmp_path, n_test=3)
    (tmp_path / layouts.GTSRB_TEST / "00001.ppm").unlink()
    with pytest.raises(DataUnavailableError, match=r"00001\.ppm"):
        load_dataset(GTSRB, tmp_path)


def test_gtsrb_corrupt_image(tmp_path: Path) -> None:
    write_gtsrb(tmp_path, n_test=3)
    (tmp_path / layouts.GTSRB_TEST / "00002.ppm").write_bytes(b"P6\n32 32\n255\n\x00\x01")
    with pytest.raises(DataUnavailableError, match="GTSRB test split"):
        load_dataset(GTSRB, tmp_path)


@pytest.mark.parametrize("class_id", ["43", "-1", "x"])
def test_gtsrb_bad_class_id(tmp_path: Path, class_id: str) -> None:
    write_gtsrb(tmp_path, n_test=2)
    csv_path = tmp_path / layouts.GTSRB_TEST_CSV
    lines = csv_path.read_text().splitlines()
    lines[1] = lines[1].rsplit(";", 1)[0] + ";" + class_id
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataUnavailableError, match="GTSRB test"):
        load_dataset(GTSRB, tmp_path)


def test_the_layouts_are_torchvisions():
    """qbd.data.layouts states the files without importing torchvision; they must be its own."""
    assert list(layouts.CIFAR_FILES) == cifar_mod.required_files()
    assert len(layouts.GTSRB_CLASS_FOLDERS) == len(gtsrb_mod.CLASSES)


@pytest.mark.parametrize("layout", list(layouts.CIFAR_LAYOUTS))
def test_the_plugin_accepts_every_root_the_loader_accepts(tmp_path, layout):
    """The plugin skips a data set by the loader's own check: both CIFAR-10 layouts run, and a
    root without the files is skipped with the loader's message."""
    from qbd.plugin.options import data_missing

    assert data_missing("cifar10", str(tmp_path)).startswith("CIFAR-10 not found")
    (tmp_path / layout).mkdir(parents=True)
    for name in layouts.CIFAR_FILES:
        (tmp_path / layout / name).write_bytes(b"")
    assert data_missing("cifar10", str(tmp_path)) is None
    assert layouts.find_cifar_batches(tmp_path) == tmp_path / layout
    assert data_missing("digits", None) is None  # embedded: needs no root
