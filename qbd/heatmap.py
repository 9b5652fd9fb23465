"""The heatmap: each cell coloured by its outcome against the truth (CATEGORIES), beside the
deployed models' clean accuracy and ASR; over several seeds, the rows' rates. A picture of the
tables (qbd.tables), which stay the reference. Torch-free (matplotlib, through qbd.figure)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbd import rates
from qbd.figure import figure as _figure
from qbd.figure import save as _save
from qbd.figure import scheme_key
from qbd.run_metadata import describe_attack, run_facts
from qbd.tables import row_label, several_seeds

# -- the heatmap ----------------------------------------------------------------------------------------
HATCH_COLOUR = "#707070"


@dataclass(frozen=True)
class Category:
    label: str
    colour: str
    hatch: str | None = None


# A cell's outcome against the truth (qbd.outcomes), in the legend's order. Okabe & Ito's palette:
# its colours stay distinct under the common colour-vision deficiencies. A missing cell is hatched
# grey: never drawn as clean. A declared finding keeps its outcome's colour (a miss and a false alarm
# must not look alike because both were declared) and is marked by FINDING's hatching.
CATEGORIES: dict[str, Category] = {
    "correct-detection": Category("correct detection (named the planted target)", "#009E73"),
    "correct-clean": Category("correct: clean model judged clean", "#56B4E9"),
    "miss": Category("miss (backdoored, judged clean)", "#D55E00"),
    "wrong-target": Category("wrong target (detected, named another class)", "#E69F00"),
    "false-alarm": Category("false alarm (clean model, detected)", "#CC79A7"),
    "invalid": Category("invalid (its reason code in the cell)", "#F0E442"),
    "missing": Category("missing (no Result for the cell)", "#D9D9D9", "//"),
}
FINDING = Category("declared finding (hatched over its outcome's colour)", "#FFFFFF", "xx")
FAIL_EDGE = "#C00000"  # the frame of a cell or row that fails its expectation
# inches: a cell holds two lines of 7-point text ("clean / 0.398", "FAIL") with room to spare
CELL_W, CELL_H, PANEL_W = 1.3, 0.5, 2.3
NOTHING_TO_DETECT = Category("no backdoored model in the row: nothing to detect", "#D9D9D9")
CA_COLOUR, ASR_COLOUR = "#4D4D4D", "#A6A6A6"


def category(result: dict[str, Any]) -> str:
    """The key in CATEGORIES of one Result: its outcome against the truth, declared or not."""
    from qbd.outcomes import outcome, split

    kind, _ = split(outcome(result))
    if kind == "pass":
        return "correct-detection" if result.get("attack") is not None else "correct-clean"
    return kind


def judged(result: dict[str, Any] | None) -> str | None:
    """"finding" or "FAIL" when the Result's judgement says so (None: it matches the truth, or was not judged)."""
    j = ((result or {}).get("judgement") or {}).get("judgement")
    return j if j in ("finding", "FAIL") else None


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def cell_text(result: dict[str, Any] | None) -> str:
    """"t=3 / 4.1" (the class named, the score), "clean / 0.2", the reason code of an invalid
    verdict; a second line "FAIL" when the cell fails its expectation."""
    if result is None:
        return "no Result"
    v = result["verdict"]
    if v["status"] == "invalid":
        text = v.get("reason_code") or "unspecified"
    else:
        head = "clean" if v["status"] == "clean" else "detected" if v.get("target_class") is None else f"t={v['target_class']}"
        text = head if v.get("score") is None else f"{head} / {_num(v['score'])}"
    if (result.get("judgement") or {}).get("judgement") == "FAIL":
        text += "\nFAIL"
    return text


@dataclass(frozen=True)
class OutcomeGrid:
    """Rows (row label, scheme) as Table 1 orders them, columns (defense, protocol), and the
    Result of each (row, column) index pair; a pair without one is a missing cell."""

    rows: list[tuple[str, str]]
    columns: list[tuple[str, str]]
    cells: dict[tuple[int, int], dict[str, Any]]

    @classmethod
    def of(cls, results: list[dict[str, Any]]) -> OutcomeGrid:
        rows = sorted({(row_label(r), r["quant"]["scheme"]) for r in results}, key=lambda k: (k[0], scheme_key(k[1])))
        columns = sorted({(r["defense"]["name"], r["defense"]["protocol"]) for r in results}, key=lambda k: (k[1], k[0]))
        ri, ci = {k: i for i, k in enumerate(rows)}, {k: j for j, k in enumerate(columns)}
        cells: dict[tuple[int, int], dict[str, Any]] = {}
        for r in results:  # one model seed: one Result per cell (over several, the rate heatmap)
            key = (ri[(row_label(r), r["quant"]["scheme"])], ci[(r["defense"]["name"], r["defense"]["protocol"])])
            cells.setdefault(key, r)
        return cls(rows, columns, cells)

    def category(self, i: int, j: int) -> str:
        r = self.cells.get((i, j))
        return "missing" if r is None else category(r)

    def row_result(self, i: int) -> dict[str, Any] | None:
        """A Result of row i (every cell of a row shares its deployed model: its CA and ASR)."""
        return next((self.cells[(i, j)] for j in range(len(self.columns)) if (i, j) in self.cells), None)


@dataclass(frozen=True)
class Drawn:
    """A drawn outcome heatmap: the figure, the heatmap's axes, the CA/ASR panel and the grid."""

    figure: Any
    ax: Any
    panel: Any
    grid: OutcomeGrid

    def centres(self) -> dict[tuple[int, int], tuple[float, float]]:
        """Each cell's centre in the saved PNG's pixels, (x right, y down) as an image reads."""
        self.figure.canvas.draw()  # the layout settles at draw time
        height = self.figure.bbox.height
        out = {}
        for i in range(len(self.grid.rows)):
            for j in range(len(self.grid.columns)):
                x, y = self.ax.transData.transform((j, i))
                out[(i, j)] = (float(x), float(height - y))
        return out

    def cell_size(self) -> tuple[float, float]:
        """A cell's width and height in pixels."""
        self.figure.canvas.draw()
        (x0, y0), (x1, y1) = self.ax.transData.transform([(0, 0), (1, 1)])
        return float(abs(x1 - x0)), float(abs(y1 - y0))

    def save(self, path: Path) -> Path:
        return _save(self.figure, path)


def _ink(colour: str) -> str:
    """Black or white text, whichever reads better on `colour` (WCAG relative luminance)."""
    from matplotlib.colors import to_rgb

    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
    return "black" if 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2] > 0.179 else "white"


def _paint(ax: Any, i: int, j: int, c: Category | str, mark: str | None = None) -> None:
    """Fill cell (i, j); `mark` "finding" hatches it in a shade that reads on its colour, "FAIL"
    frames it in red."""
    from matplotlib.patches import Rectangle

    colour, hatch = (c.colour, c.hatch) if isinstance(c, Category) else (c, None)
    # linewidth 0: no border; the hatch is drawn in the edge colour all the same
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=colour, edgecolor=HATCH_COLOUR if hatch else colour,
                           hatch=hatch, linewidth=0))
    if mark == "finding":
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="none", edgecolor=_ink(colour), hatch=FINDING.hatch,
                               linewidth=0, alpha=0.35))
    elif mark == "FAIL":
        ax.add_patch(Rectangle((j - 0.44, i - 0.44), 0.88, 0.88, facecolor="none", edgecolor=FAIL_EDGE, linewidth=2.5))


def _patch(c: Category) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=c.colour, edgecolor=HATCH_COLOUR if c.hatch else c.colour, hatch=c.hatch, label=c.label)


def _fail_patch(label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor="white", edgecolor=FAIL_EDGE, linewidth=2.5, label=label)


def _text_inches(labels: list[str], points: float = 8) -> float:
    """A generous width for the longest label at `points` (an average glyph is about 0.55 em)."""
    return 0.62 * points / 72 * max((len(x) for x in labels), default=4)


def _grid_lines(ax: Any, n_rows: int, n_cols: int) -> None:
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(n_rows - 0.5, -0.5)  # row 0 on top, as in the tables
    ax.hlines([i + 0.5 for i in range(n_rows - 1)], -0.5, n_cols - 0.5, colors="white", linewidth=2)
    ax.vlines([j + 0.5 for j in range(n_cols - 1)], -0.5, n_rows - 0.5, colors="white", linewidth=2)
    for side in ax.spines.values():
        side.set_visible(False)


def _top_labels(ax: Any, labels: list[str]) -> None:
    ax.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False, length=0)
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="left", rotation_mode="anchor", fontsize=8)


def title_line(results: list[dict[str, Any]]) -> str:
    """"smoke tier, tiny-cnn, badnet: target 0, ..." from the Results."""
    facts = run_facts(results)
    tier = f"{facts['tier']} tier" if "tier" in facts else "tier unknown"
    return ", ".join([tier, facts.get("model") or "model unknown", describe_attack(facts.get("attack"))])


def draw_outcomes(results: list[dict[str, Any]]) -> Drawn:
    """One cell per (dataset x scheme [x clean model], defense[protocol]), coloured by its outcome
    against the truth (CATEGORIES) and annotated with the class named and the score, or the reason
    code; a declared finding hatched over its outcome's colour, a failing cell framed in red and
    marked FAIL; beside it the deployed model's clean accuracy and ASR; one legend below. The figure
    grows with the grid (CELL_W x CELL_H inches a cell), so 1 to 12 defenses and 1 to 8 schemes lay
    out without overlap (tests/unit/test_heatmap_layout.py)."""
    grid = OutcomeGrid.of(results)
    n_rows, n_cols = len(grid.rows), len(grid.columns)
    row_labels = [f"{ds} / {sc}" for ds, sc in grid.rows]
    col_labels = [f"{d}[{p}]" for d, p in grid.columns]
    # rotated 35 degrees, a column label rises sin(35) of its length and runs cos(35) to the right
    top = 0.58 * _text_inches(col_labels) + 0.5
    width = max(7.5, _text_inches(row_labels) + CELL_W * max(n_cols, 1) + PANEL_W + 0.82 * _text_inches(col_labels[-1:]) + 0.6)
    legend_rows = -(-(len(CATEGORIES) + 3) // max(1, int(width // 3.6)))
    height = top + CELL_H * max(n_rows, 1) + 0.2 * legend_rows + 0.9
    fig = _figure(width, height)
    gs = fig.add_gridspec(1, 2, width_ratios=[CELL_W * max(n_cols, 1), PANEL_W])
    ax = fig.add_subplot(gs[0, 0])
    panel = fig.add_subplot(gs[0, 1], sharey=ax)
    for i in range(n_rows):
        for j in range(n_cols):
            r = grid.cells.get((i, j))
            c = CATEGORIES[grid.category(i, j)]
            _paint(ax, i, j, c, judged(r))
            ax.text(j, i, cell_text(r), ha="center", va="center", fontsize=7, color=_ink(c.colour))
    _grid_lines(ax, max(n_rows, 1), max(n_cols, 1))
    for j in range(1, n_cols):  # a darker line where the protocol changes
        if grid.columns[j][1] != grid.columns[j - 1][1]:
            ax.axvline(j - 0.5, color="#333333", linewidth=2.5)
    _top_labels(ax, col_labels)
    ax.set_yticks(range(n_rows), row_labels, fontsize=8)
    if not n_rows:
        ax.text(0, 0, "no Results", ha="center", va="center")
    _ca_asr_panel(panel, grid)
    handles = [_patch(c) for c in CATEGORIES.values()] + [_patch(FINDING), _fail_patch("FAIL: fails its expectation")]
    fig.legend(handles=handles + _ca_asr_handles(), title="outcome against the truth", loc="outside lower left",
               ncols=max(1, int(width // 3.6)), fontsize=7, title_fontsize=8, frameon=False)
    fig.suptitle(title_line(results), fontsize=9)
    return Drawn(fig, ax, panel, grid)


def _ca_asr_panel(panel: Any, grid: OutcomeGrid) -> None:
    """Per row, the deployed model's clean accuracy and ASR, as bars with their values."""
    for i in range(len(grid.rows)):
        r = grid.row_result(i)
        for dy, key, colour in ((-0.19, "clean_acc", CA_COLOUR), (0.19, "asr", ASR_COLOUR)):
            v = None if r is None else r.get(key)
            if v is None:
                panel.text(1, i + dy, "-", va="center", fontsize=7)
                continue
            panel.barh(i + dy, 100 * v, height=0.36, color=colour)
            panel.text(100 * v + 1, i + dy, f"{100 * v:.1f}", va="center", fontsize=7)
    panel.set_xlim(0, 120)
    panel.set_xticks([0, 50, 100])
    # the scale on top, as the heatmap's column labels: the legends sit below both
    panel.tick_params(labelleft=False, left=False, top=True, labeltop=True, bottom=False, labelbottom=False, labelsize=7)
    panel.set_title("deployed model (%)", fontsize=8)


def _ca_asr_handles() -> list[Any]:
    from matplotlib.patches import Patch

    return [Patch(color=CA_COLOUR, label="deployed model: clean accuracy"), Patch(color=ASR_COLOUR, label="deployed model: attack success rate")]


def heatmap(results: list[dict[str, Any]], path: Path, failing_rows: frozenset[str] = frozenset()) -> Path:
    """The outcome heatmap (draw_outcomes); over several model seeds, the rates (draw_rates), each
    row marked as its cells were judged (row_marks) or failing (`failing_rows`: qbd.gate's rows)."""
    rows = rates.rows(results)
    if several_seeds(rows):
        return _save(draw_rates(rows, title_line(results), row_marks(results, failing_rows)), path)
    return draw_outcomes(results).save(path)


def row_marks(results: list[dict[str, Any]], failing_rows: frozenset[str] = frozenset()) -> dict[str, str]:
    """Row id -> "FAIL" (a cell of it failed, or the row left its declared counts) or "finding" (its
    cells were judged as a declared finding); rows that match the truth are not in it."""
    out: dict[str, str] = {rid: "FAIL" for rid in failing_rows}
    for r in results:
        mark, rid = judged(r), rates.row_id(r)
        if mark == "FAIL" or (mark == "finding" and rid not in out):
            out[rid] = mark
    return out


def draw_rates(rows: list[dict[str, Any]], title: str = "", marks: dict[str, str] | None = None) -> Any:
    """One panel per protocol: rows dataset / scheme, columns defenses, each cell coloured by its
    detection rate (cividis: readable without colour vision) and annotated "k/n" (detections) and
    "FA k/n" (false alarms on clean models); a cell with no row is hatched, never a rate. `marks`
    (row_marks): a declared finding's row hatched, a failing one framed in red and marked FAIL."""
    marks = marks or {}
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize, to_hex

    protocols = sorted({row["protocol"] for row in rows})
    labels = sorted({(row["dataset"], row["scheme"]) for row in rows}, key=lambda k: (k[0], scheme_key(k[1])))
    defenses = sorted({row["defense"] for row in rows})
    by_key = {(row["protocol"], row["dataset"], row["scheme"], row["defense"]): row for row in rows}
    cmap = matplotlib.colormaps["cividis"]
    longest = max((len(f"{ds} / {sc}") for ds, sc in labels), default=10)
    fig = _figure(max(7.0, 1.6 + 0.065 * longest + (1.3 * len(defenses) + 1.0) * len(protocols)), 2.8 + 0.55 * len(labels))
    axes = fig.subplots(1, len(protocols), squeeze=False)[0]
    for ax, p in zip(axes, protocols, strict=True):
        for i, (ds, sc) in enumerate(labels):
            for j, d in enumerate(defenses):
                row = by_key.get((p, ds, sc, d))
                if row is None:
                    _paint(ax, i, j, CATEGORIES["missing"])
                    ax.text(j, i, "no Result", ha="center", va="center", fontsize=7)
                    continue
                colour = NOTHING_TO_DETECT.colour if row["detection_rate"] is None else to_hex(cmap(row["detection_rate"]))
                mark = marks.get(row["row"])
                _paint(ax, i, j, colour, mark)
                text = [f"{row['detected']}/{row['n_backdoored']}"] if row["n_backdoored"] else []
                text += [f"FA {row['false_alarms']}/{row['n_clean']}"] if row["n_clean"] else []
                text += ["FAIL"] if mark == "FAIL" else []
                ax.text(j, i, "\n".join(text), ha="center", va="center", fontsize=7, color=_ink(colour))
        _grid_lines(ax, len(labels), len(defenses))
        _top_labels(ax, defenses)
        ax.set_yticks(range(len(labels)), [f"{ds} / {sc}" for ds, sc in labels], fontsize=8)
        ax.set_title(f"{p} protocol", fontsize=9)
        fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=ax, fraction=0.05, pad=0.02).set_label(
            "detection rate (right target)", fontsize=8)
    axes[0].legend(handles=[_patch(NOTHING_TO_DETECT), _patch(CATEGORIES["missing"]), _patch(FINDING),
                            _fail_patch("FAIL: the row fails its expectation")], loc="upper left", bbox_to_anchor=(0.0, -0.02),
                   title="k/n: backdoored models detected naming the target\nFA k/n: false alarms on clean models",
                   fontsize=7, title_fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


