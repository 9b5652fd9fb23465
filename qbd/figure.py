"""What every picture qbd draws shares: the canvas (Agg, outside pyplot: no GUI, no global figure
registry), its resolution, and the order schemes are shown in. Torch-free; matplotlib is imported
only when a figure is made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DPI = 120
# fp32 first (the baseline every scheme is compared with), then the deployments, then the simulations
SCHEME_ORDER = ("fp32", "int8-dynamic", "int8-static", "onnx-int8-dynamic", "onnx-int8-static", "int8-sim", "int4-sim",
                "int2-sim", "int3-sim", "int5-sim", "int6-sim", "int7-sim")


def scheme_key(s: str) -> tuple[int, str]:
    return (SCHEME_ORDER.index(s) if s in SCHEME_ORDER else len(SCHEME_ORDER), s)


def figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas with constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
