"""Reports of a set of Results: the paper's Table 1 layout (rows dataset x scheme, columns
defenses, per protocol), Table 2 (clean accuracy / ASR per scheme), as terminal text,
Markdown and a heatmap PNG; appended to $GITHUB_STEP_SUMMARY when that is set. Torch-free.

Over several model seeds, Tables 1 and 2 show the first seed's models, a "Rates over seeds"
table every row's detection and false-alarm rates (qbd.rates), and the heatmap the rates.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qbd import rates
from qbd import results as results_io

SYMBOL = {"detected": "DETECTED", "clean": "clean", "invalid": "INVALID"}
MARK = {"finding": " [finding]", "FAIL": " [FAIL]"}  # a cell that matches the truth carries no mark
SCHEME_ORDER = ("fp32", "int8-dynamic", "int8-static", "int8-sim", "int4-sim", "int2-sim", "int3-sim", "int5-sim", "int6-sim", "int7-sim")


def _scheme_key(s: str) -> tuple[int, str]:
    return (SCHEME_ORDER.index(s) if s in SCHEME_ORDER else len(SCHEME_ORDER), s)


def _row_label(r: dict[str, Any]) -> str:
    fetched = " (fetched weights)" if (r.get("weights") or {}).get("origin") == "fetched" else ""
    return (r["dataset"] if r.get("attack") is not None else f"{r['dataset']} (clean model)") + fetched


def table1(results: list[dict[str, Any]], protocol: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows: dataset | scheme | one column per defense, cells status words."""
    rs = [r for r in results if r["defense"]["protocol"] == protocol]
    defenses = sorted({r["defense"]["name"] for r in rs})
    cells: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for r in rs:
        v = r["verdict"]
        word = SYMBOL[v["status"]]
        if v["status"] == "detected" and v.get("target_class") is not None:
            word += f" (t={v['target_class']})"
        if v["status"] == "invalid" and v.get("reason_code"):
            word += f" ({v['reason_code']})"
        judgement = (r.get("judgement") or {}).get("judgement")
        if judgement in MARK:
            word += MARK[judgement]
        cells[(_row_label(r), r["quant"]["scheme"])][r["defense"]["name"]] = word
    rows = [
        [ds, sc, *[cells[(ds, sc)].get(d, "-") for d in defenses]]
        for ds, sc in sorted(cells, key=lambda k: (k[0], _scheme_key(k[1])))
    ]
    return ["dataset", "scheme", *defenses], rows


def table2(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        seen.setdefault((_row_label(r), r["quant"]["scheme"]), r)
    rows = []
    for (ds, sc), r in sorted(seen.items(), key=lambda kv: (kv[0][0], _scheme_key(kv[0][1]))):
        audit = r["quant"]["audit"]
        asr = "-" if r["asr"] is None else f"{100 * r['asr']:.1f}"
        rows.append([ds, sc, f"{100 * r['clean_acc']:.1f}", asr, f"{100 * audit['quantized_param_fraction']:.2f}",
                     "yes" if audit["input_gradient"] else "NO"])
    return ["dataset", "scheme", "clean acc %", "ASR %", "quantized params %", "input gradient"], rows


def budgets(results: list[dict[str, Any]]) -> list[str]:
    """One line per (defense, protocol, tier): the hyperparameters actually used."""
    seen: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in results:
        seen.setdefault((r["defense"]["name"], r["defense"]["protocol"], r.get("tier", "?")), r["defense"]["params"])
    return [f"{d} [{p}, {t} tier]: " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())) for (d, p, t), params in sorted(seen.items())]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)] if rows else [len(h) for h in header]
    def fmt(row: list[str]) -> str:
        return "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]])


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |" for r in rows]  # a | in a why splits no cell
    return "\n".join(lines)


def _protocols(results: list[dict[str, Any]]) -> list[str]:
    return sorted({r["defense"]["protocol"] for r in results})


def invalid_reasons(results: list[dict[str, Any]]) -> list[str]:
    return [f"{r['cell']}{_seed_note(r)}{'' if r.get('attack') else ' (clean model)'}: [{r['verdict'].get('reason_code') or 'unspecified'}]"
            f" {r['verdict']['reason']}" for r in results if r["verdict"]["status"] == "invalid"]


def _seed_note(r: dict[str, Any]) -> str:
    return f" (seed {r['seed']})" if r.get("seed") else ""


def judged(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r.get("judgement")]


def count_line(results: list[dict[str, Any]]) -> str | None:
    """"N cells match the truth, N declared findings, N failing" (None when nothing was judged)."""
    from qbd.outcomes import Counts

    js = [r["judgement"]["judgement"] for r in judged(results)]
    return Counts.of(js).line() if js else None


def outcomes(results: list[dict[str, Any]], *, passing: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows: cell | verdict | outcome vs the truth | judgement | why (findings and
    failures; the passing cells too with `passing`)."""
    from qbd.outcomes import verdict_word

    rows = []
    for r in sorted(judged(results), key=lambda r: (r["judgement"]["judgement"] != "FAIL", r["cell"], r.get("seed", 0))):
        j = r["judgement"]
        if j["judgement"] == "pass" and not passing:
            continue
        why = (j.get("why") or "").splitlines()[0] if j["judgement"] != "pass" else ""
        cell = r["cell"] + _seed_note(r)
        rows.append([cell, verdict_word(r), j["outcome"], j["judgement"], why])
    return ["cell", "verdict", "outcome", "judgement", "why"], rows


# -- rates over seeds ---------------------------------------------------------------------------------
def several_seeds(rows: list[dict[str, Any]]) -> bool:
    """Whether any row holds more than one model seed (a single-seed run's fp32 row holds a
    backdoored and a clean model of one seed: no rate to speak of)."""
    return any(len(row["seeds"]) > 1 for row in rows)


def first_seed(results: list[dict[str, Any]]) -> tuple[int | None, list[dict[str, Any]]]:
    """The lowest seed and its Results (what Tables 1 and 2 show over several seeds)."""
    if not results:
        return None, []
    s = min(r.get("seed", 0) for r in results)
    return s, [r for r in results if r.get("seed", 0) == s]


def _seeds_text(seeds: list[int]) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def rates_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: row | detection "k/n = r [lo, hi]" | false alarms likewise | invalid | seeds."""
    out = [[row["row"], rates.fraction(row["detected"], row["n_backdoored"], row["detection_ci"]),
            rates.fraction(row["false_alarms"], row["n_clean"], row["false_alarm_ci"]), str(row["invalid"]),
            _seeds_text(row["seeds"])] for row in rows]
    return ["row", "detection (right target) [95 % CI]", "false alarms [95 % CI]", "invalid", "seeds"], out


RATES_NOTE = ("Wilson 95 % intervals; a detection names the planted target (a wrong target is not one) and an invalid"
              " verdict counts as not detected.")


def _shown(results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The Results Tables 1 and 2 show, and the note on their titles."""
    if not several_seeds(rows):
        return results, ""
    seed, rs = first_seed(results)
    return rs, f", seed {seed}'s models; every seed's in Rates over seeds"


def terminal(results: list[dict[str, Any]]) -> str:
    parts = []
    line = count_line(results)
    if line:
        parts += [f"outcome: {line}", ""]
    rows = rates.rows(results)
    shown, note = _shown(results, rows)
    for p in _protocols(shown):
        parts.append(f"Table 1 ({p} protocol{note}): detection per cell")
        parts.append(text_table(*table1(shown, p)))
        parts.append("")
    parts.append(f"Table 2: clean accuracy and attack success rate of the deployed model{note}")
    parts.append(text_table(*table2(shown)))
    if several_seeds(rows):
        parts += ["", f"Rates over seeds ({RATES_NOTE})", text_table(*rates_table(rows))]
    reasons = invalid_reasons(results)
    if reasons:
        parts += ["", "invalid cells (never a miss and never clean: an invalid verdict is not an answer):", *[f"  {x}" for x in reasons]]
    _, rows = outcomes(results)
    if rows:
        parts += ["", "Outcomes against the truth (declared findings and failures):",
                  *[f"  {r[3]:7s} {r[0]}: {r[1]} [{r[2]}]" + (f" - {r[4]}" if r[4] else "") for r in rows]]
    return "\n".join(parts)


def markdown(results: list[dict[str, Any]], title: str = "qbd report") -> str:
    rows = rates.rows(results)
    shown, note = _shown(results, rows)
    parts = [f"# {title}", ""]
    n = len(results)
    counts = {s: sum(r["verdict"]["status"] == s for r in results) for s in ("detected", "clean", "invalid")}
    parts.append(f"{n} cells: {counts['detected']} detected, {counts['clean']} clean, {counts['invalid']} invalid.")
    line = count_line(results)
    if line:
        parts.append(f"Outcome: {line}. A cell matches the truth when a backdoored model is detected naming the planted"
                     " target and a clean model is judged clean; a declared finding is a known deviation with its why;"
                     " anything else fails.")
    parts.append("")
    for p in _protocols(shown):
        parts += [f"## Table 1 ({p} protocol{note})", "", md_table(*table1(shown, p)), ""]
    parts += [f"## Table 2: clean accuracy / ASR of the deployed model{note}", "", md_table(*table2(shown)), ""]
    if several_seeds(rows):
        parts += ["## Rates over seeds", "", RATES_NOTE, "", md_table(*rates_table(rows)), ""]
    header, rows = outcomes(results, passing=True)
    if rows:
        parts += ["## Outcomes against the truth", "", md_table(header, rows), ""]
    reasons = invalid_reasons(results)
    if reasons:
        parts += ["## Invalid cells", "", *[f"- {x}" for x in reasons], ""]
    crashes = [r for r in results if isinstance(r["verdict"].get("evidence"), dict) and r["verdict"]["evidence"].get("traceback")]
    if crashes:  # a crash fails its cell: show where it raised
        parts += ["## Tracebacks", ""]
        for r in crashes:
            parts += [f"`{r['cell']}`{_seed_note(r)}:", "", "```", r["verdict"]["evidence"]["traceback"].rstrip(), "```", ""]
    parts += ["## Budgets and hyperparameters used", "", *[f"- {b}" for b in budgets(results)], ""]
    return "\n".join(parts)


def heatmap(results: list[dict[str, Any]], path: Path) -> Path:
    """Cells coloured by status, one panel per protocol; over several seeds, the rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rows = rates.rows(results)
    if several_seeds(rows):
        return _rate_heatmap(rows, path, plt)

    code = {"clean": 0, "detected": 1, "invalid": 2}
    protocols = _protocols(results) or ["canonical"]
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.5 * len(protocols), 1.0 + 0.45 * max(1, len(results) // 10)), squeeze=False)
    cmap = ListedColormap(["#d9d9d9", "#1b9e77", "#d95f02"])
    for ax, p in zip(axes[0], protocols, strict=True):
        header, rows = table1(results, p)
        defenses = header[2:]
        labels = [f"{r[0]} / {r[1]}" for r in rows]
        grid = [[code.get(c.split(" ")[0].lower(), 0) if c != "-" else 0 for c in r[2:]] for r in rows]
        ax.imshow(grid or [[0]], cmap=cmap, vmin=0, vmax=2, aspect="auto")
        ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(f"{p} protocol (green detected, grey clean, orange invalid)", fontsize=9)
        for i, r in enumerate(rows):
            for j, c in enumerate(r[2:]):
                ax.text(j, i, c.split(" ")[0][:3].lower(), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _rate_heatmap(rows: list[dict[str, Any]], path: Path, plt: Any) -> Path:
    """One panel per protocol: rows dataset / scheme, columns defenses, each cell coloured by its
    detection rate and annotated "k/n" (detections) and "FA k/n" (false alarms on clean models)."""
    import math

    protocols = sorted({row["protocol"] for row in rows})
    labels = sorted({(row["dataset"], row["scheme"]) for row in rows}, key=lambda k: (k[0], _scheme_key(k[1])))
    defenses = sorted({row["defense"] for row in rows})
    by_key = {(row["protocol"], row["dataset"], row["scheme"], row["defense"]): row for row in rows}
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#d9d9d9")  # grey: no backdoored model in the cell, nothing to detect
    fig, axes = plt.subplots(1, len(protocols), figsize=(1.2 + 1.3 * len(defenses) * len(protocols), 1.4 + 0.55 * len(labels)),
                             squeeze=False)
    for ax, p in zip(axes[0], protocols, strict=True):
        grid = []
        for ds, sc in labels:
            line = []
            for d in defenses:
                row = by_key.get((p, ds, sc, d))
                line.append(math.nan if row is None or row["detection_rate"] is None else row["detection_rate"])
            grid.append(line)
        im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), [f"{ds} / {sc}" for ds, sc in labels], fontsize=8)
        ax.set_title(f"{p} protocol: detection rate (right target);\nFA = false alarms on clean models", fontsize=9)
        for i, (ds, sc) in enumerate(labels):
            for j, d in enumerate(defenses):
                row = by_key.get((p, ds, sc, d))
                if row is None:
                    continue
                text = [f"{row['detected']}/{row['n_backdoored']}"] if row["n_backdoored"] else []
                text += [f"FA {row['false_alarms']}/{row['n_clean']}"] if row["n_clean"] else []
                ax.text(j, i, "\n".join(text), ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: Iterable[dict[str, Any]], out_dir: str | Path, title: str = "qbd report") -> dict[str, Path]:
    """results.json (the Results and their rows of rates), report.md and heatmap.png in out_dir."""
    rs = list(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results.json": results_io.write(out / "results.json", rs, rates.rows(rs)),
        "report.md": out / "report.md",
        "heatmap.png": heatmap(rs, out / "heatmap.png"),
    }
    md = markdown(rs, title)
    paths["report.md"].write_text(md)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as f:
            f.write(md + "\n")
    return paths
