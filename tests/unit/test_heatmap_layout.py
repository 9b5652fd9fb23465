"""The outcome heatmap lays out for 1 to 12 defenses (both protocols: up to 24 columns) and 1 to 8
schemes: rendered at each size, no text is cut off by the figure's edge, every cell's text stays
inside its cell, no two labels of one axis overlap, and the legend overlaps neither panel."""

from __future__ import annotations

import math

import pytest

from qbd.heatmap import draw_outcomes

SCHEMES = ("fp32", "int8-dynamic", "int8-static", "onnx-int8-dynamic", "onnx-int8-static", "int8-sim", "int4-sim", "int2-sim")
ATTACK = {"name": "badnet", "target": 0, "trigger_pattern": "white", "trigger_size": 3, "trigger_position": "bottom-right",
          "poison_rate": 0.1}
# the widest texts a cell can hold, each a different outcome, some declared, some failing
VERDICTS = [({"status": "clean", "score": 0.398}, "FAIL"), ({"status": "detected", "target_class": 11, "score": 12345.6}, "FAIL"),
            ({"status": "invalid", "reason_code": "surrogate-disagrees"}, "FAIL"), ({"status": "clean", "score": 1.374}, "finding"),
            ({"status": "detected", "target_class": 0, "score": 4.1}, "pass")]


def _results(n_defenses: int, n_schemes: int, protocols: tuple[str, ...]) -> list[dict]:
    defenses = ["activation-clustering-variant" if k == 0 else f"defense-{k:02d}" for k in range(n_defenses)]
    out = []
    k = 0
    for scheme in SCHEMES[:n_schemes]:
        for clean in (False, True):
            for d in defenses:
                for p in protocols:
                    verdict, judgement = VERDICTS[k % len(VERDICTS)]
                    k += 1
                    ds = "synthetic:clean" if clean else "synthetic"
                    out.append({"cell": f"{ds}/{scheme}/{d}[{p}]", "dataset": "synthetic", "seed": 0, "tier": "smoke",
                                "model": "tiny-cnn", "attack": None if clean else dict(ATTACK),
                                "quant": {"scheme": scheme, "audit": {}}, "defense": {"name": d, "protocol": p, "params": {}},
                                "verdict": {"target_class": None, "score": None, "reason": "r", "reason_code": None, **verdict},
                                "judgement": {"outcome": "x", "judgement": judgement},
                                "clean_acc": 0.987, "asr": None if clean else 0.995})
    return out


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1


@pytest.mark.parametrize(("n_defenses", "n_schemes", "protocols"), [
    (1, 1, ("canonical",)), (1, 8, ("canonical",)), (12, 1, ("canonical", "paper")), (12, 8, ("canonical", "paper")),
    (5, 4, ("canonical", "paper")),
])
def test_nothing_overlaps_and_nothing_is_cut(n_defenses, n_schemes, protocols):
    drawn = draw_outcomes(_results(n_defenses, n_schemes, protocols))
    fig, ax = drawn.figure, drawn.ax
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent"))
             if t.get_visible() and t.get_text()]
    for t in texts:
        box = t.get_window_extent(renderer)
        assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1 and box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1, \
            f"{t.get_text()!r} is cut off: {box} outside {page}"
    # every cell's text inside its cell
    w, h = drawn.cell_size()
    for t in ax.texts:
        box = t.get_window_extent(renderer)
        x, y = ax.transData.transform(t.get_position())
        assert box.width <= w - 4 and box.height <= h - 2, (t.get_text(), box, (w, h))
        assert abs((box.x0 + box.x1) / 2 - x) < 2 and abs((box.y0 + box.y1) / 2 - y) < 2
    # the row labels do not overlap each other or the cells
    rows = [t.get_window_extent(renderer) for t in ax.get_yticklabels() if t.get_text()]
    assert not any(_overlap(a, b) for i, a in enumerate(rows) for b in rows[i + 1:])
    assert all(box.x1 <= ax.get_window_extent(renderer).x0 + 1 for box in rows)
    # the column labels are parallel lines of text 35 degrees up: apart by their spacing x sin(35)
    cols = [t for t in ax.get_xticklabels() if t.get_text()]
    if len(cols) > 1:
        spacing = abs(ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0])
        line = cols[0].get_fontsize() * fig.dpi / 72 * 1.3
        assert spacing * math.sin(math.radians(35)) > line
    assert all(t.get_window_extent(renderer).y0 >= ax.get_window_extent(renderer).y1 - 1 for t in cols)
    # the legend sits below both panels, and neither panel is cut off by the page
    legend = fig.legends[0].get_window_extent(renderer)
    for a in (ax, drawn.panel):
        assert not _overlap(legend, a.get_window_extent(renderer))
        box = a.get_window_extent(renderer)
        assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1 and box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1, (box, page)


def test_a_declared_finding_keeps_its_outcomes_colour_and_is_hatched():
    """A declared miss and a declared false alarm look different (their outcomes' colours), each
    hatched; a failing cell is framed in red."""
    from matplotlib.colors import to_hex

    from qbd.heatmap import CATEGORIES, FAIL_EDGE, FINDING

    drawn = draw_outcomes(_results(5, 1, ("canonical",)))
    fills = {(round(p.get_x() + 0.5), round(p.get_y() + 0.5)): to_hex(p.get_facecolor())
             for p in drawn.ax.patches if p.get_facecolor()[3] > 0}
    hatched = {(round(p.get_x() + 0.5), round(p.get_y() + 0.5)) for p in drawn.ax.patches if p.get_hatch() == FINDING.hatch}
    framed = {(round(p.get_x() + 0.5), round(p.get_y() + 0.5)) for p in drawn.ax.patches
              if p.get_facecolor()[3] == 0 and to_hex(p.get_edgecolor()) == to_hex(FAIL_EDGE)}
    grid = drawn.grid
    for (i, j), r in grid.cells.items():
        assert fills[(j, i)] == to_hex(CATEGORIES[grid.category(i, j)].colour)
        assert ((j, i) in hatched) is (r["judgement"]["judgement"] == "finding")
        assert ((j, i) in framed) is (r["judgement"]["judgement"] == "FAIL")
    declared = {grid.category(i, j) for (i, j), r in grid.cells.items() if r["judgement"]["judgement"] == "finding"}
    assert declared == {"miss", "correct-clean"}  # a declared miss and a declared quiet clean model: two colours


def test_the_rate_view_marks_finding_rows_and_failing_rows():
    """Over several seeds: a row whose cells were judged as a declared finding is hatched, a row
    with a failing cell or outside its counts (qbd.gate) is framed in red and says FAIL."""
    from matplotlib.colors import to_hex

    from qbd.heatmap import FAIL_EDGE, FINDING, draw_rates, row_marks
    from qbd.rates import rows
    from tests.unit.test_report import _five_seeds

    found = _five_seeds()
    for r in found:
        r["judgement"] = {"outcome": "x", "judgement": "finding"}
    failing = [{**r, "quant": {**r["quant"], "scheme": "fp32"}, "cell": r["cell"].replace("int8-dynamic", "fp32"),
                "judgement": {"outcome": "x", "judgement": "pass"}} for r in _five_seeds()]
    results = found + failing
    marks = row_marks(results, frozenset({"digits/fp32/strip[paper]"}))
    assert marks == {"digits/int8-dynamic/strip[paper]": "finding", "digits/fp32/strip[paper]": "FAIL"}
    ax = draw_rates(rows(results), "t", marks).axes[0]
    # rows: fp32 (0), int8-dynamic (1); one column
    assert [(p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches if p.get_hatch() == FINDING.hatch] == [(0.0, 1.0)]
    assert [(round(p.get_x() + 0.44, 2), round(p.get_y() + 0.44, 2)) for p in ax.patches
            if p.get_facecolor()[3] == 0 and to_hex(p.get_edgecolor()) == to_hex(FAIL_EDGE)] == [(0.0, 0.0)]
    assert "FAIL" in next(t.get_text() for t in ax.texts if round(t.get_position()[1]) == 0)
    assert "FAIL" not in next(t.get_text() for t in ax.texts if round(t.get_position()[1]) == 1)
