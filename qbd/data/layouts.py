"""Where the file-based data sets must sit under a data root, and the one check of it: the loaders
call it before they read, and the pytest plugin calls it at collection to skip a data set that is
not there, so both accept the same roots. Torch-free and numpy-free (the plugin imports it).

qbd never downloads: each check's error says where to get the files and where to put them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qbd.errors import DataUnavailableError


def _no_root(data: str, example: str, how_to_get: Callable[[Path], str]) -> DataUnavailableError:
    return DataUnavailableError(f"{data} needs a data root: pass --data-root DIR or set QBD_DATA_ROOT=DIR, where"
                                f" DIR/{example} exists. " + how_to_get(Path("DIR")))


# -- CIFAR-10: torchvision's python-version batches ---------------------------------------------
CIFAR_FOLDER = "cifar-10-batches-py"  # torchvision.datasets.CIFAR10.base_folder
# Where the batch folder may sit, relative to the data root; the first is torchvision's layout.
CIFAR_LAYOUTS = (Path(CIFAR_FOLDER), Path("cifar10") / CIFAR_FOLDER)
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
# the files torchvision's CIFAR10 reads, in its order (tests/unit/test_data_loaders.py checks them)
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")


def cifar_how_to_get(root: Path) -> str:
    return (
        f"Download {CIFAR_ARCHIVE} (the 'CIFAR-10 python version') from {CIFAR_URL} and extract it with"
        f" `tar -xzf {CIFAR_ARCHIVE} -C {root}`; qbd never downloads data."
    )


def find_cifar_batches(root: Path | None) -> Path:
    """The folder holding the batch files, or DataUnavailableError saying where to put them."""
    if root is None:
        raise _no_root("CIFAR-10", f"{CIFAR_FOLDER}/data_batch_1", cifar_how_to_get)
    root = Path(root)
    candidates = [root / layout for layout in CIFAR_LAYOUTS]
    # Prefer a layout whose folder exists, so "missing files" names the folder the user made.
    batch_dir = next((c for c in candidates if c.is_dir()), candidates[0])
    missing = [name for name in CIFAR_FILES if not (batch_dir / name).is_file()]
    if missing:
        where = " or ".join(str(c) for c in candidates)
        raise DataUnavailableError(
            f"CIFAR-10 not found: {batch_dir} lacks {', '.join(missing)}. Expected the batch"
            f" files data_batch_1..data_batch_5, test_batch and batches.meta in {where}. " + cifar_how_to_get(root)
        )
    return batch_dir


# -- GTSRB: torchvision's layout ----------------------------------------------------------------
GTSRB_FOLDER = "gtsrb"
GTSRB_TRAIN = Path(GTSRB_FOLDER) / "GTSRB" / "Training"
GTSRB_TEST = Path(GTSRB_FOLDER) / "GTSRB" / "Final_Test" / "Images"
GTSRB_TEST_CSV = Path(GTSRB_FOLDER) / "GT-final_test.csv"
GTSRB_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
GTSRB_ARCHIVES = ("GTSRB-Training_fixed.zip", "GTSRB_Final_Test_Images.zip", "GTSRB_Final_Test_GT.zip")
# torchvision's ImageFolder numbers the class folders in sorted order; these names make that
# order equal to the ClassId (43 classes)
GTSRB_CLASS_FOLDERS = tuple(f"{i:05d}" for i in range(43))


def gtsrb_how_to_get(root: Path) -> str:
    return (
        f"Download {', '.join(GTSRB_ARCHIVES)} from {GTSRB_URL} and unzip all three into {root / GTSRB_FOLDER}/"
        " (torchvision.datasets.GTSRB's layout); qbd never downloads data."
    )


def check_gtsrb(root: Path | None) -> Path:
    """Return `root` if torchvision's layout is there, else DataUnavailableError saying where."""
    if root is None:
        raise _no_root("GTSRB", f"{GTSRB_TRAIN}/00000", gtsrb_how_to_get)
    root = Path(root)
    problems = []
    train = root / GTSRB_TRAIN
    if not train.is_dir():
        problems.append(f"{train}/ is missing")
    else:
        present = sorted(p.name for p in train.iterdir() if p.is_dir())
        if present != list(GTSRB_CLASS_FOLDERS):
            missing = sorted(set(GTSRB_CLASS_FOLDERS) - set(present))
            extra = sorted(set(present) - set(GTSRB_CLASS_FOLDERS))
            detail = "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
                    f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}" if extra else "",
                )
                if part
            )
            problems.append(f"{train}/ must hold exactly the class folders 00000..00042 ({detail})")
    if not (root / GTSRB_TEST).is_dir():
        problems.append(f"{root / GTSRB_TEST}/ is missing")
    if not (root / GTSRB_TEST_CSV).is_file():
        problems.append(f"{root / GTSRB_TEST_CSV} is missing")
    if problems:
        raise DataUnavailableError(f"GTSRB not found under {root}: {'; '.join(problems)}. " + gtsrb_how_to_get(root))
    return root


# data set -> its check (a data set not named here is embedded and needs no root)
CHECKS: dict[str, Callable[[Path | None], Path]] = {"cifar10": find_cifar_batches, "gtsrb": check_gtsrb}


def missing(dataset: str, root: Path | None) -> str | None:
    """Why `dataset` cannot be read from `root` (None: it can, or it needs no files)."""
    check = CHECKS.get(dataset)
    if check is None:
        return None
    try:
        check(root)
    except DataUnavailableError as e:
        return str(e)
    return None
