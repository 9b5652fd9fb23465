"""GTSRB (German Traffic Sign Recognition Benchmark) from the user's data root.

Read with torchvision's `GTSRB` class, so the on-disk layout is torchvision's (DIR is --data-root
or $QBD_DATA_ROOT; qbd never downloads):

    DIR/gtsrb/GTSRB/Training/00000/*.ppm ... DIR/gtsrb/GTSRB/Training/00042/*.ppm
    DIR/gtsrb/GTSRB/Final_Test/Images/*.ppm
    DIR/gtsrb/GT-final_test.csv            (semicolon-separated; columns Filename and ClassId)

The images vary in size (15x15 to 250x250); every one is resized to 32x32 (bilinear, the whole
image rather than its region of interest), as the paper does. There are no pickles here: PPM
images and a CSV, decoded by Pillow and the csv module.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from qbd.config import DatasetSpec
from qbd.data.base import DataSplit, DataUnavailableError
from qbd.data.layouts import GTSRB_TEST_CSV, GTSRB_TRAIN, check_gtsrb, gtsrb_how_to_get

SIZE = 32

# Sign names of ClassId 0..42 (the benchmark's signnames).
CLASSES: tuple[str, ...] = (
    "Speed limit (20km/h)",
    "Speed limit (30km/h)",
    "Speed limit (50km/h)",
    "Speed limit (60km/h)",
    "Speed limit (70km/h)",
    "Speed limit (80km/h)",
    "End of speed limit (80km/h)",
    "Speed limit (100km/h)",
    "Speed limit (120km/h)",
    "No passing",
    "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection",
    "Priority road",
    "Yield",
    "Stop",
    "No vehicles",
    "Vehicles over 3.5 metric tons prohibited",
    "No entry",
    "General caution",
    "Dangerous curve to the left",
    "Dangerous curve to the right",
    "Double curve",
    "Bumpy road",
    "Slippery road",
    "Road narrows on the right",
    "Road work",
    "Traffic signals",
    "Pedestrians",
    "Children crossing",
    "Bicycles crossing",
    "Beware of ice/snow",
    "Wild animals crossing",
    "End of all speed and passing limits",
    "Turn right ahead",
    "Turn left ahead",
    "Ahead only",
    "Go straight or right",
    "Go straight or left",
    "Keep right",
    "Keep left",
    "Roundabout mandatory",
    "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
)

# Per-channel mean/std of the GTSRB training images, the values commonly used for this data set
# in PyTorch code. Fixed constants (see DataSplit); they were not recomputed here because no
# copy of GTSRB was at hand -- recompute on the resized training set if exactness matters.
MEAN = (0.3403, 0.3121, 0.3214)
STD = (0.2724, 0.2608, 0.2669)


def load(spec: DatasetSpec, root: Path | None) -> DataSplit:
    """Load GTSRB from `root`. `spec.seed` is unused: the benchmark's train/test split is fixed."""
    from torchvision.datasets import GTSRB  # lazy: torchvision is a heavy import

    root = check_gtsrb(root)
    x_train, y_train = _read(GTSRB, root, "train")
    x_test, y_test = _read(GTSRB, root, "test")
    return DataSplit.from_numpy("gtsrb", (x_train, y_train), (x_test, y_test), CLASSES, MEAN, STD)


def _resize(image: Image.Image) -> np.ndarray:
    """PIL RGB image -> uint8 3 x 32 x 32."""
    small = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)


def _read(gtsrb_cls: type, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    where = root / (GTSRB_TRAIN if split == "train" else GTSRB_TEST_CSV)
    try:
        ds = gtsrb_cls(str(root), split=split, transform=_resize, download=False)
        n = len(ds)
        x = np.empty((n, 3, SIZE, SIZE), dtype=np.uint8)
        y = np.empty(n, dtype=np.int64)
        for i in range(n):
            x[i], y[i] = ds[i]
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, csv.Error, KeyError, ValueError) as exc:
        # OSError: a missing or truncated image, or a class folder without .ppm files
        # (FileNotFoundError; UnidentifiedImageError is a subclass too); DecompressionBombError:
        # a header claiming billions of pixels; csv.Error, KeyError, ValueError: a malformed CSV
        # (missing column, non-integer ClassId).
        raise DataUnavailableError(
            f"GTSRB {split} split under {where} is incomplete or malformed ({type(exc).__name__}: {exc}). "
            + gtsrb_how_to_get(root)
        ) from exc
    if n == 0:
        raise DataUnavailableError(f"GTSRB {split} split under {where} has no images. " + gtsrb_how_to_get(root))
    if int(y.min()) < 0 or int(y.max()) >= len(CLASSES):
        raise DataUnavailableError(f"GTSRB {split} labels under {where} fall outside 0..{len(CLASSES) - 1}")
    return x, y
