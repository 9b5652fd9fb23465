"""Stand-in CIFAR-10 and GTSRB, written in torchvision's exact on-disk formats, for timing the
paper tier on a machine without network access (a lent GPU).

    python benchmarks/stand_in_data.py --root DIR               # full size: 50k/10k and 26,640/12,630
    python benchmarks/stand_in_data.py --root DIR --scale 0.01  # a CPU dry run

THESE ARE STAND-INS, NOT THE DATA SETS. The images come from qbd's procedural `synthetic`
traffic signs (qbd/data/synthetic.py), relabelled; figures measured on them are speed figures
(loading, training, defenses at the paper's sizes and class counts), never the paper's accuracy
or detection results.

- cifar10: DIR/cifar-10-batches-py/ (5 training batches, test_batch, batches.meta; Python 2
  style pickles). Classes 0..9 are the synthetic classes 0..9 (10 and 11 are dropped), seed 0.
- gtsrb: DIR/gtsrb/ (GTSRB/Training/000NN/*.ppm with per-class GT csv, GTSRB/Final_Test/Images
  and GT-final_test.csv). 43 classes, each a (synthetic class, colour rotation, flip) triple:
  the 12 classes under the 3 cyclic RGB rotations (36; every class has its own shape and glyph,
  so the rotation, i.e. which channel carries the sign colour, tells them apart) plus 7 flipped
  ones whose flip is visible (triangles and arrows upside down, an arrow pointing left). Seed 1,
  so the two data sets share no image. Images are 32x32 (the real ones vary, 15..250 px).

The file writers are the test suite's (tests/unit/_formats.py); a folder this script did not
write (it has no STAND_IN marker) is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qbd.data import layouts, synthetic
from qbd.errors import ConfigError
from tests.unit import _formats

SIZES = {"cifar10": (50_000, 10_000), "gtsrb": (26_640, 12_630)}  # (train, test), the real ones'
SEEDS = {"cifar10": 0, "gtsrb": 1}
MARKER = "STAND_IN"  # written into each data set folder this script made
_GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"

# GTSRB's 43 classes: (synthetic class, RGB rotation 0..2, flip). The flips are visible only on
# asymmetric signs: triangles (4, 5) and up-arrows (2, 11) upside down, the right-arrow (3) mirrored.
_FLIPPED = ((4, 0, "v"), (4, 1, "v"), (5, 0, "v"), (5, 1, "v"), (2, 0, "v"), (11, 0, "v"), (3, 0, "h"))
GTSRB_CLASSES: tuple[tuple[int, int, str], ...] = (
    tuple((c, r, "") for r in range(3) for c in range(len(synthetic.CLASS_TABLE))) + _FLIPPED
)
_FLIPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "": lambda x: x,
    "v": lambda x: x[:, :, ::-1, :],
    "h": lambda x: x[:, :, :, ::-1],
}


def sizes(name: str, scale: float) -> tuple[int, int]:
    """(train, test) image counts at `scale`: at least one training image per class, one test image."""
    if not 0 < scale <= 1:
        raise ConfigError(f"--scale must be in (0, 1], got {scale}")
    classes = 10 if name == "cifar10" else len(GTSRB_CLASSES)
    n_train, n_test = SIZES[name]
    return max(classes, round(n_train * scale)), max(1, round(n_test * scale))


def _even(n: int, k: int) -> np.ndarray:
    """n split over k classes as evenly as possible (the first n % k get one more)."""
    return np.full(k, n // k) + (np.arange(k) < n % k)


# --- images ----------------------------------------------------------------------------------


def cifar_images(seed: int, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic images of classes 0..9 (N x 3 x 32 x 32 uint8, labels int64), shuffled."""
    x, y = synthetic.generate(seed, split, -(-n // 10))
    keep = np.flatnonzero(y < 10)[:n]
    return x[keep], y[keep]


def gtsrb_images(seed: int, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images of the 43 stand-in classes, as even as n allows, grouped by class (0, 0, ..., 42)."""
    per_class = _even(n, len(GTSRB_CLASSES))
    need = np.zeros(len(synthetic.CLASS_TABLE), dtype=np.int64)
    for (base, _, _), count in zip(GTSRB_CLASSES, per_class, strict=True):
        need[base] += count
    x, y = synthetic.generate(seed, split, int(need.max()))
    taken = np.zeros_like(need)
    xs, ys = [], []
    for label, ((base, rotation, flip), count) in enumerate(zip(GTSRB_CLASSES, per_class, strict=True)):
        idx = np.flatnonzero(y == base)[taken[base]:taken[base] + count]
        taken[base] += count
        xs.append(_FLIPS[flip](np.roll(x[idx], rotation, axis=1)))
        ys.append(np.full(count, label, dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


# --- writers ---------------------------------------------------------------------------------


def _fresh(folder: Path) -> None:
    """Empty `folder` for rewriting, only if this script made it (its marker is there)."""
    if folder.exists():
        if not (folder / MARKER).is_file():
            raise ConfigError(f"{folder} exists and is not a stand-in written by this script (no {MARKER} file);"
                              " refusing to overwrite it: pick another --root")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def write_cifar10(root: Path, scale: float = 1.0) -> dict[str, object]:
    n_train, n_test = sizes("cifar10", scale)
    seed = SEEDS["cifar10"]
    batch_dir = root / layouts.CIFAR_FOLDER
    _fresh(batch_dir)
    x_train, y_train = cifar_images(seed, "train", n_train)
    x_test, y_test = cifar_images(seed, "test", n_test)
    for name, xb, yb in zip(_formats.CIFAR_TRAIN_FILES, np.array_split(x_train, len(_formats.CIFAR_TRAIN_FILES)),
                            np.array_split(y_train, len(_formats.CIFAR_TRAIN_FILES)), strict=True):
        (batch_dir / name).write_bytes(_formats.py2_pickle(_formats.cifar_batch(xb, yb, name)))
    test_file = _formats.CIFAR_TEST_FILE
    (batch_dir / test_file).write_bytes(_formats.py2_pickle(_formats.cifar_batch(x_test, y_test, test_file)))
    meta = {"num_cases_per_batch": -(-n_train // len(_formats.CIFAR_TRAIN_FILES)),
            "label_names": list(_formats.CIFAR_CLASSES), "num_vis": 3072}
    (batch_dir / _formats.CIFAR_META_FILE).write_bytes(_formats.py2_pickle(meta))
    (batch_dir / MARKER).write_text("stand-in CIFAR-10 from qbd's synthetic generator (benchmarks/stand_in_data.py)\n")
    return {"dataset": "cifar10", "n_train": n_train, "n_test": n_test, "classes": 10, "path": str(batch_dir)}


def write_gtsrb(root: Path, scale: float = 1.0) -> dict[str, object]:
    n_train, n_test = sizes("gtsrb", scale)
    seed = SEEDS["gtsrb"]
    base = root / layouts.GTSRB_FOLDER
    _fresh(base)
    x_train, y_train = gtsrb_images(seed, "train", n_train)
    x_test, y_test = gtsrb_images(seed, "test", n_test)
    hwc = (0, 2, 3, 1)  # the generator's N x 3 x H x W -> N x H x W x 3 for the image files
    train_dir = root / layouts.GTSRB_TRAIN
    for label, folder_name in enumerate(layouts.GTSRB_CLASS_FOLDERS):
        folder = train_dir / folder_name
        folder.mkdir(parents=True)
        rows = [_GT_HEADER]
        for i, img in enumerate(x_train[y_train == label].transpose(hwc)):
            name = f"{i // 30:05d}_{i % 30:05d}.ppm"  # tracks of 30 images, as the real set
            _formats._save_ppm(folder / name, img)
            rows.append(f"{name};32;32;0;0;31;31;{label}")
        (folder / f"GT-{folder_name}.csv").write_text("\n".join(rows) + "\n")
    # the real test set is in no class order
    order = np.random.default_rng([seed, 43]).permutation(len(y_test))
    test_dir = root / layouts.GTSRB_TEST
    test_dir.mkdir(parents=True)
    rows = [_GT_HEADER]
    for i, (img, label) in enumerate(zip(x_test[order].transpose(hwc), y_test[order], strict=True)):
        name = f"{i:05d}.ppm"
        _formats._save_ppm(test_dir / name, img)
        rows.append(f"{name};32;32;0;0;31;31;{int(label)}")
    (root / layouts.GTSRB_TEST_CSV).write_text("\n".join(rows) + "\n")
    (base / MARKER).write_text("stand-in GTSRB from qbd's synthetic generator (benchmarks/stand_in_data.py)\n")
    return {"dataset": "gtsrb", "n_train": n_train, "n_test": n_test, "classes": len(GTSRB_CLASSES), "path": str(base)}


WRITERS: dict[str, Callable[[Path, float], dict[str, object]]] = {"cifar10": write_cifar10, "gtsrb": write_gtsrb}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, type=Path, help="data root (what --data-root / --qbd-data-root take)")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the real sizes, in (0, 1] (default 1)")
    ap.add_argument("--dataset", choices=(*WRITERS, "both"), default="both")
    args = ap.parse_args(argv)
    names = list(WRITERS) if args.dataset == "both" else [args.dataset]
    try:
        for name in names:
            sizes(name, args.scale)  # a bad --scale fails before anything is written
        for name in names:
            t0 = time.perf_counter()
            summary = WRITERS[name](args.root, args.scale)
            print(json.dumps({"figure": "stand_in_data", **summary, "scale": args.scale,
                              "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    except ConfigError as e:
        print(f"stand_in_data: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
