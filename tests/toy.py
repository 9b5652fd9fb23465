"""A tiny learnable data set for unit tests that must not depend on the real loaders."""

import torch

from qbd.data.base import DataSplit


def toy_split(n_train: int = 600, n_test: int = 200, size: int = 16, seed: int = 0) -> DataSplit:
    """4 classes; class k brightens quadrant k, so a CNN learns it within an epoch or two."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randint(0, 100, (n, 3, size, size), generator=g, dtype=torch.int64)
    h = size // 2
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, r * h : (r + 1) * h, c * h : (c + 1) * h] += 120
    x = x.clamp(0, 255).to(torch.uint8)
    return DataSplit("toy", x[:n_train], y[:n_train], x[n_train:], y[n_train:], ("a", "b", "c", "d"), (0.5,) * 3, (0.25,) * 3)


def distribution_on_path(monkeypatch, site, name: str, entry_points: str, modules: dict[str, str] | None = None) -> None:
    """An installed distribution `name` 0.1 on sys.path, in folder `site`: its entry_points.txt, and
    `modules` (module name -> source) beside it."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(site))
