"""CIFAR-10 from the user's data root, in torchvision's on-disk format ("CIFAR-10 python version").

qbd never downloads: the files must already be in DIR/cifar-10-batches-py/ (torchvision's layout;
DIR/cifar10/cifar-10-batches-py/ is accepted too), where DIR is --data-root or $QBD_DATA_ROOT.

The batches are Python pickles, and unpickling runs whatever code a pickle names. Two read paths:

* Production: when every file has the md5 torchvision records for the official release, the
  files are exactly the published ones (a second md5 preimage is infeasible), so torchvision's
  own `CIFAR10` reads them, unchanged.
* Anything else -- a re-packed copy, a corrupted or tampered file, the tiny files the tests
  write -- is read by `_BatchUnpickler`, which allows only the numpy globals an array needs, so a
  malicious batch raises DataUnavailableError instead of executing code. It follows torchvision's
  format rules exactly (same file list, latin1 decoding, "labels" or "fine_labels", rows of
  3072 bytes in channel-major order, class names from batches.meta) and the tests check it
  against torchvision's reader.

Residual risk of the production path: a process that can write to the data root could swap a
file between the md5 check and torchvision's read. Data roots are trusted directories.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from qbd.config import DatasetSpec
from qbd.data.base import DataSplit, DataUnavailableError
from qbd.data.layouts import CIFAR_ARCHIVE, CIFAR_URL, find_cifar_batches

# Per-channel mean and std of the 50,000 training images. The std is the per-pixel one; the
# (0.2023, 0.1994, 0.2010) found in many repositories is a mistaken per-image average.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

_ROW = 3 * 32 * 32

# Exceptions that reading a damaged or hostile pickle can raise; all mean "not a usable batch".
_READ_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    MemoryError,  # a damaged length field asks for an allocation that fails: not a usable batch either
)


def load(spec: DatasetSpec, root: Path | None) -> DataSplit:
    """Load CIFAR-10 from `root`. `spec.seed` is unused: the train/test split is fixed."""
    from torchvision.datasets import CIFAR10  # lazy: torchvision is a heavy import

    batch_dir = find_cifar_batches(root)
    if _is_official_release(batch_dir):
        x_train, y_train, classes = _read_with_torchvision(CIFAR10, batch_dir, train=True)
        x_test, y_test, _ = _read_with_torchvision(CIFAR10, batch_dir, train=False)
    else:
        classes = _read_meta(batch_dir / CIFAR10.meta["filename"], CIFAR10.meta["key"])
        x_train, y_train = _read_batches(batch_dir, [name for name, _ in CIFAR10.train_list], len(classes))
        x_test, y_test = _read_batches(batch_dir, [name for name, _ in CIFAR10.test_list], len(classes))
    return DataSplit.from_numpy("cifar10", (x_train, y_train), (x_test, y_test), classes, MEAN, STD)


def required_files() -> list[str]:
    """The files torchvision's CIFAR10 reads, in its order (qbd.data.layouts.CIFAR_FILES must equal it)."""
    from torchvision.datasets import CIFAR10

    return [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]


def _is_official_release(batch_dir: Path) -> bool:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    files = CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    return all(check_integrity(str(batch_dir / name), md5) for name, md5 in files)


def _read_with_torchvision(
    cifar10_cls: Any, batch_dir: Path, train: bool
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The production reader: torchvision's CIFAR10 on files whose md5 matched the release."""
    ds = cifar10_cls(str(batch_dir.parent), train=train, download=False)
    x = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # torchvision keeps HWC
    return x, np.asarray(ds.targets, dtype=np.int64), tuple(ds.classes)


# --- restricted reader -----------------------------------------------------------------------


class _FromBuffer:
    """numpy's `_frombuffer` (how protocol-5 pickles rebuild arrays) behind an object without
    attributes: a pickle's BUILD opcode can set attributes on a plain Python function, which
    would let a hostile file alter numpy's own function for the rest of the process."""

    __slots__ = ("_fn",)

    def __init__(self) -> None:
        object.__setattr__(self, "_fn", np.empty(1).__reduce_ex__(5)[0])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("read-only")

    def __call__(self, *args: Any) -> np.ndarray:
        return self._fn(*args)


class _Latin1Encode:
    """`_codecs.encode(text, "latin1")`, how Python 3 pickles bytes at protocol <= 2; other
    codecs are refused."""

    __slots__ = ()

    def __call__(self, text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        if encoding not in ("latin1", "latin-1") or errors != "strict":
            raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
        return text.encode("latin1")


def _allowed_globals() -> MappingProxyType[tuple[str, str], Any]:
    """The only globals a CIFAR batch may name: what numpy pickles an array or dtype with.

    Each is a builtin or a read-only object, so BUILD cannot modify it. The numpy builtins are
    taken from numpy's own reduce output, so this works on numpy 1.x (numpy.core) and 2.x
    (numpy._core); both module spellings are accepted because pickles name their writer's.
    """
    reconstruct = np.empty(0).__reduce__()[0]  # multiarray._reconstruct (protocols 0..4)
    scalar = np.int64(0).__reduce__()[0]  # multiarray.scalar (numpy scalars)
    frombuffer = _FromBuffer()  # numeric._frombuffer (protocol 5)
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _Latin1Encode(),
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return MappingProxyType(allowed)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler for untrusted CIFAR batches: plain containers and numpy arrays, nothing else.

    Dicts, lists, strings, bytes and numbers come from pickle opcodes that call no code; every
    other object is built through `find_class` (GLOBAL, STACK_GLOBAL and the EXT opcodes all go
    through it), which only hands out numpy's array builders. A hostile file can still ask for
    a huge allocation (MemoryError), but not run code.
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="latin1")  # as torchvision: batches were written by Python 2
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: a CIFAR-10 batch holds only dicts, lists,"
                " strings and numpy arrays"
            ) from None


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f).load()
    except _READ_ERRORS as exc:
        raise DataUnavailableError(
            f"CIFAR-10 file {path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {' '.join(str(exc).split())}). Replace"
            f" it with the file from {CIFAR_ARCHIVE} ({CIFAR_URL})."
        ) from exc
    if not isinstance(entry, dict):
        raise DataUnavailableError(f"CIFAR-10 file {path} does not hold a dict (got {type(entry).__name__})")
    return entry


def _read_meta(path: Path, key: str) -> tuple[str, ...]:
    meta = _unpickle(path)
    names = meta.get(key)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataUnavailableError(f"CIFAR-10 file {path} has no list of class names under {key!r}")
    return tuple(names)


def _read_batches(batch_dir: Path, names: list[str], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's rules: concatenate each batch's "data" rows, and "labels" (or "fine_labels")."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    for name in names:
        path = batch_dir / name
        entry = _unpickle(path)
        data = entry.get("data")
        targets = entry.get("labels", entry.get("fine_labels"))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataUnavailableError(f"CIFAR-10 file {path}: 'data' must be a uint8 N x {_ROW} array, got {got}")
        if not isinstance(targets, (list, np.ndarray)) or len(targets) != len(data):
            raise DataUnavailableError(f"CIFAR-10 file {path}: 'labels' must list one label per image")
        y = np.asarray(targets)
        if y.size and (y.dtype.kind not in "iu" or int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataUnavailableError(f"CIFAR-10 file {path}: labels must be integers 0..{num_classes - 1}")
        images.append(data)
        labels.extend(int(t) for t in y)
    if not labels:  # batches without a single image would train on nothing
        raise DataUnavailableError(f"CIFAR-10 files {', '.join(names)} in {batch_dir} hold no images")
    x = np.vstack(images).reshape(-1, 3, 32, 32)  # rows are R, G, B planes of 32 x 32
    return np.ascontiguousarray(x), np.asarray(labels, dtype=np.int64)
