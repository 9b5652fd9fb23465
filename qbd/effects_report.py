"""Quantization's paired effects (qbd.effects) as a table and a picture: the headline of report.md,
of `qbd run`'s terminal output over several models, and of docs/results.md. Torch-free.

The table: per data set, defense and protocol, each scheme's detection rate and false-alarm rate
against fp32's on the same models, "k/n -> k'/n (change, p)", the exact McNemar p-value, and a
note where the change is significant at 5 % or where the scheme leaves the defense's input
unchanged (its row repeats fp32). The picture: one panel per (data set, defense, protocol), the
two rates per scheme with their Wilson 95 % intervals, fp32 first; a significant change is starred.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qbd.effects import change_text, significant
from qbd.figure import figure, scheme_key
from qbd.figure import save as _save

ALPHA = 0.05  # the significance level the table's note and the picture's stars use

NOTE = ("Paired with fp32 on the same models: a detection names the planted target (a wrong target is not one), a"
        " false alarm is a clean model judged detected; only models with an answer on both sides are compared (a pair"
        " with an invalid verdict is left out and counted). p is the exact two-sided McNemar test on the models whose"
        " verdict changed, Holm its Holm adjustment over every comparison of the run; * marks Holm < "
        f"{ALPHA}, (nominal) p < {ALPHA} alone. With n pairs the smallest p possible is 2 / 2^n (0.0625 at n = 5,"
        " 0.002 at n = 10): a change of one or two models is never significant.")


def several_models(effects: list[dict[str, Any]]) -> bool:
    """Whether any effect pairs more than one model of a kind (only then is it worth a table)."""
    return any((e[side] or {}).get("n", 0) > 1 for e in effects for side in ("detection", "false_alarm"))


def _note(e: dict[str, Any]) -> str:
    notes = []
    if e["detection"] is None and e["false_alarm"] is None:
        notes.append("no answer: every pair has an invalid verdict (the rule cannot judge; not evidence either way)")
    if e.get("input_unchanged"):
        notes.append("input unchanged: the layer the defense reads is fp32's (no test of quantization)")
    for side in significant(e, ALPHA, "p"):
        mark = "*" if side in significant(e, ALPHA) else "(nominal)"
        notes.append(f"{mark} {'detection' if side == 'detection' else 'false alarms'} {'fall' if e[side]['change'] < 0 else 'rise'}")
    return "; ".join(notes)


def table(effects: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows, sorted by data set, defense, protocol and scheme."""
    order = sorted(effects, key=lambda e: (e["dataset"], e["defense"], e["protocol"], e["scheme"]))
    rows = [[e["dataset"], f"{e['defense']}[{e['protocol']}]", e["scheme"], change_text(e["detection"], e["invalid"]["detection"]),
             change_text(e["false_alarm"], e["invalid"]["false_alarm"]), _note(e)] for e in order]
    return ["data set", "defense", "scheme", "detection: fp32 -> scheme", "false alarms: fp32 -> scheme", "note"], rows


def draw(effects: list[dict[str, Any]], title: str = "") -> Any:
    """The picture (a matplotlib Figure on the Agg canvas)."""
    panels = sorted({(e["dataset"], e["defense"], e["protocol"]) for e in effects})
    cols = min(4, max(1, len(panels)))
    nrows = -(-len(panels) // cols) if panels else 1
    fig = figure(max(5.0, 3.3 * cols + 0.6), 2.5 * nrows + 1.0)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (ds, defense, protocol) in zip(axes.flat, panels, strict=False):
        mine = sorted((e for e in effects if (e["dataset"], e["defense"], e["protocol"]) == (ds, defense, protocol)),
                      key=lambda e: scheme_key(e["scheme"]))
        labels = [mine[0]["baseline"], *[e["scheme"] for e in mine]]
        if all(e["detection"] is None and e["false_alarm"] is None for e in mine):
            ax.text(0.5, 0.5, "no answer: every pair has\nan invalid verdict", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="#555555")
        for offset, side, colour, label in ((-0.12, "detection", "#1f5fa8", "detection"),
                                            (0.12, "false_alarm", "#c0392b", "false alarms")):
            xs, ys, lo, hi, stars = [], [], [], [], []
            base = next((e[side] for e in mine if e[side] is not None), None)
            if base is not None:  # fp32's rate as the first scheme's pairs measured it
                xs.append(offset)
                ys.append(base["baseline_rate"])
                lo.append(base["baseline_rate"] - base["baseline_ci"][0])
                hi.append(base["baseline_ci"][1] - base["baseline_rate"])
            for i, e in enumerate(mine, start=1):
                s = e[side]
                if s is None:
                    continue
                xs.append(i + offset)
                ys.append(s["scheme_rate"])
                lo.append(s["scheme_rate"] - s["scheme_ci"][0])
                hi.append(s["scheme_ci"][1] - s["scheme_rate"])
                if s["p_holm"] < ALPHA:
                    stars.append((i + offset, s["scheme_ci"][1]))
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=colour, capsize=3, markersize=4, label=label)
            for x, y in stars:
                ax.text(x, min(y + 0.03, 1.08), "*", ha="center", va="bottom", color=colour, fontsize=11)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(-0.05, 1.15)
        ax.set_yticks([0, 0.5, 1.0])
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"{ds}: {defense} [{protocol}]", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    if panels:
        axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle((title + "\n" if title else "") + "detection and false-alarm rates by scheme, paired with fp32\n"
                 f"(Wilson 95 % intervals; * exact McNemar, Holm-adjusted, p < {ALPHA}; invalid pairs left out)", fontsize=9)
    return fig


def save(effects: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    return _save(draw(effects, title), path)
