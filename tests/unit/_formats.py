"""Writers for tiny data sets in torchvision's exact on-disk formats, for loader tests.

CIFAR-10 ("python version"): a folder cifar-10-batches-py/ with data_batch_1..data_batch_5 and
test_batch, each a pickled dict {"batch_label", "labels", "data", "filenames"} where data is a
uint8 N x 3072 array (the R, G, B planes of a 32x32 image, row-major), and batches.meta, a dict
with "label_names". The real files were written by Python 2's cPickle at protocol 2, so the
default writer here emits that byte stream by hand (`py2_pickle`): str as BINSTRING, numpy
arrays via numpy.core.multiarray._reconstruct -- the path the genuine files take through
`pickle.load(f, encoding="latin1")`.

GTSRB: gtsrb/GTSRB/Training/<00000..00042>/*.ppm (plus the per-class GT-*.csv torchvision
ignores), gtsrb/GTSRB/Final_Test/Images/*.ppm and gtsrb/GT-final_test.csv (';'-separated).
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_META_FILE = "batches.meta"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GTSRB_CLASSES = 43


# --- a Python 2 cPickle (protocol 2) emitter for the CIFAR batch structure -------------------


def py2_pickle(obj: Any) -> bytes:
    """Serialise dicts, lists, str, int, None and uint8 numpy arrays the way Python 2's
    cPickle.dump(obj, f, 2) with numpy 1.x did."""
    out = bytearray(b"\x80\x02")  # PROTO 2
    _emit(out, obj)
    out += b"."  # STOP
    return bytes(out)


def _emit_str(out: bytearray, data: bytes) -> None:
    # a Python 2 str is a byte string: SHORT_BINSTRING / BINSTRING
    if len(data) < 256:
        out += b"U" + bytes([len(data)]) + data
    else:
        out += b"T" + struct.pack("<i", len(data)) + data


def _emit_int(out: bytearray, value: int) -> None:
    if 0 <= value < 256:
        out += b"K" + bytes([value])  # BININT1
    elif 0 <= value < 65536:
        out += b"M" + struct.pack("<H", value)  # BININT2
    else:
        out += b"J" + struct.pack("<i", value)  # BININT


def _emit(out: bytearray, obj: Any) -> None:
    if obj is None:
        out += b"N"
    elif isinstance(obj, bool):
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
        _emit_int(out, obj)
    elif isinstance(obj, str):
        _emit_str(out, obj.encode("latin1"))
    elif isinstance(obj, bytes):
        _emit_str(out, obj)
    elif isinstance(obj, list):
        out += b"]("  # EMPTY_LIST, MARK
        for item in obj:
            _emit(out, item)
        out += b"e"  # APPENDS
    elif isinstance(obj, tuple):
        out += b"("
        for item in obj:
            _emit(out, item)
        out += b"t"  # TUPLE
    elif isinstance(obj, dict):
        out += b"}("  # EMPTY_DICT, MARK
        for key, value in obj.items():
            _emit(out, key)
            _emit(out, value)
        out += b"u"  # SETITEMS
    elif isinstance(obj, np.ndarray):
        _emit_array(out, obj)
    else:
        raise TypeError(f"py2_pickle cannot write {type(obj).__name__}")


def _emit_array(out: bytearray, arr: np.ndarray) -> None:
    if arr.dtype != np.uint8:
        raise TypeError("py2_pickle writes uint8 arrays only")
    arr = np.ascontiguousarray(arr)
    # _reconstruct(ndarray, (0,), 'b')
    out += b"cnumpy.core.multiarray\n_reconstruct\n"
    out += b"cnumpy\nndarray\n"
    out += b"K\x00\x85"  # (0,)
    _emit_str(out, b"b")
    out += b"\x87R"  # TUPLE3, REDUCE
    # state: (1, shape, dtype('uint8'), is_fortran=False, raw bytes) then BUILD
    out += b"(K\x01"
    _emit(out, tuple(int(d) for d in arr.shape))
    out += b"cnumpy\ndtype\n"
    _emit_str(out, b"u1")
    out += b"K\x00K\x01\x87R"  # dtype('u1', 0, 1)
    out += b"(K\x03"  # dtype state: (3, '|', None, None, None, -1, -1, 0)
    _emit_str(out, b"|")
    out += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89"  # NEWFALSE: C order
    _emit_str(out, arr.tobytes())
    out += b"tb"  # TUPLE, BUILD


# --- CIFAR-10 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyCifar:
    """What was written: images N x 3 x 32 x 32 uint8 and labels, train and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


def cifar_batch(images: np.ndarray, labels: np.ndarray, name: str) -> dict[str, Any]:
    """The dict one CIFAR-10 batch file holds."""
    return {
        "batch_label": name,
        "labels": [int(v) for v in labels],
        "data": images.reshape(len(images), -1),  # N x 3072: R plane, G plane, B plane
        "filenames": [f"img_{name}_{i}.png" for i in range(len(images))],
    }


def write_cifar10(
    batch_dir: Path, *, per_batch: int = 3, n_test: int = 4, seed: int = 0, protocol: int | None = None
) -> TinyCifar:
    """Write a tiny CIFAR-10 into `batch_dir` (normally ROOT/cifar-10-batches-py).

    protocol None writes Python 2 style pickles (like the real files); an int uses Python 3's
    pickle at that protocol (a re-packed copy).
    """
    rng = np.random.default_rng(seed)
    batch_dir.mkdir(parents=True, exist_ok=True)

    def dump(obj: dict[str, Any], name: str) -> None:
        data = py2_pickle(obj) if protocol is None else pickle.dumps(obj, protocol=protocol)
        (batch_dir / name).write_bytes(data)

    xs, ys = [], []
    for name in CIFAR_TRAIN_FILES:
        x = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, size=per_batch)
        dump(cifar_batch(x, y, name), name)
        xs.append(x)
        ys.append(y)
    x_test = rng.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8)
    y_test = rng.integers(0, 10, size=n_test)
    dump(cifar_batch(x_test, y_test, CIFAR_TEST_FILE), CIFAR_TEST_FILE)
    dump({"num_cases_per_batch": per_batch, "label_names": list(CIFAR_CLASSES), "num_vis": 3072}, CIFAR_META_FILE)
    return TinyCifar(
        np.concatenate(xs), np.concatenate(ys).astype(np.int64), x_test, y_test.astype(np.int64), CIFAR_CLASSES
    )


# --- GTSRB ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyGtsrb:
    """Original (un-resized) images as H x W x 3 uint8 arrays, in the order torchvision reads."""

    train: list[tuple[np.ndarray, int]]
    test: list[tuple[np.ndarray, int]]


def _save_ppm(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image, mode="RGB").save(path, format="PPM")  # binary P6, as GTSRB ships


def write_gtsrb(
    root: Path,
    *,
    per_class: int = 1,
    n_test: int = 5,
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = ((32, 32),),
) -> TinyGtsrb:
    """Write a tiny GTSRB under ROOT/gtsrb in torchvision's layout. Image sizes (h, w) cycle
    through `sizes`."""
    rng = np.random.default_rng(seed)
    base = root / "gtsrb"
    train_dir = base / "GTSRB" / "Training"
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True, exist_ok=True)
    k = 0

    def image() -> np.ndarray:
        nonlocal k
        h, w = sizes[k % len(sizes)]
        k += 1
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)

    train: list[tuple[np.ndarray, int]] = []
    for c in range(GTSRB_CLASSES):
        folder = train_dir / f"{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for i in range(per_class):
            img = image()
            name = f"00000_{i:05d}.ppm"  # track 0, image i: the real naming
            _save_ppm(folder / name, img)
            rows.append(f"{name};{img.shape[1]};{img.shape[0]};1;1;{img.shape[1] - 1};{img.shape[0] - 1};{c}")
            train.append((img, c))
        (folder / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")

    test: list[tuple[np.ndarray, int]] = []
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(n_test):
        img = image()
        label = int(rng.integers(0, GTSRB_CLASSES))
        name = f"{i:05d}.ppm"
        _save_ppm(test_dir / name, img)
        rows.append(f"{name};{img.shape[1]};{img.shape[0]};1;1;{img.shape[1] - 1};{img.shape[0] - 1};{label}")
        test.append((img, label))
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return TinyGtsrb(train, test)
