"""Reports of a set of Results: the paper's Table 1 layout (rows dataset x scheme, columns
defenses, per protocol), Table 2 (clean accuracy / ASR per scheme), as terminal text,
Markdown and a heatmap PNG; appended to $GITHUB_STEP_SUMMARY when that is set. Torch-free.

report.md and results.json carry the run's metadata (run_metadata: versions, platform, command
line, tier, model, attack, seeds, device, expectations, date). The heatmap colours each cell by its
outcome against the truth (CATEGORIES), beside the deployed models' clean accuracy and ASR; it is a
picture of the tables, which stay the reference.

Over several model seeds, the report leads with quantization's effect, paired with fp32 on the
same models (qbd.effects, qbd.effects_report: a table, and effects.png beside the heatmap);
Tables 1 and 2 then show the first seed's models, a "Rates over seeds" table every row's
detection and false-alarm rates (qbd.rates), and the heatmap the rates.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbd import rates
from qbd import results as results_io
from qbd.effects import effects
from qbd.effects_report import NOTE as EFFECTS_NOTE
from qbd.effects_report import save as save_effects
from qbd.effects_report import several_models
from qbd.effects_report import table as effects_table
from qbd.figure import figure as _figure
from qbd.figure import save as _save
from qbd.figure import scheme_key

SYMBOL = {"detected": "DETECTED", "clean": "clean", "invalid": "INVALID"}
MARK = {"finding": " [finding]", "FAIL": " [FAIL]"}  # a cell that matches the truth carries no mark


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
        for ds, sc in sorted(cells, key=lambda k: (k[0], scheme_key(k[1])))
    ]
    return ["dataset", "scheme", *defenses], rows


def table2(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        seen.setdefault((_row_label(r), r["quant"]["scheme"]), r)
    rows = []
    for (ds, sc), r in sorted(seen.items(), key=lambda kv: (kv[0][0], scheme_key(kv[0][1]))):
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
    found = effects(results)
    if several_models(found):  # the headline: quantization's effect, paired on the same models
        parts += [f"Quantization's effect ({EFFECTS_NOTE})", text_table(*effects_table(found)), ""]
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


def markdown(results: list[dict[str, Any]], title: str = "qbd report", *, run: dict[str, Any] | None = None,
             picture: str | None = None, effects_picture: str | None = None) -> str:
    """report.md's text; `run`: the run's metadata (run_metadata) as a header block; `picture`: the
    heatmap's file name, relative to report.md, shown above the tables; `effects_picture`: the
    effects' picture, shown with their table, the report's headline."""
    rows = rates.rows(results)
    shown, note = _shown(results, rows)
    parts = [f"# {title}", ""]
    if run:
        parts += [md_table(*run_table(run)), ""]
    n = len(results)
    counts = {s: sum(r["verdict"]["status"] == s for r in results) for s in ("detected", "clean", "invalid")}
    parts.append(f"{n} cells: {counts['detected']} detected, {counts['clean']} clean, {counts['invalid']} invalid.")
    line = count_line(results)
    if line:
        parts.append(f"Outcome: {line}. A cell matches the truth when a backdoored model is detected naming the planted"
                     " target and a clean model is judged clean; a declared finding is a known deviation with its why;"
                     " anything else fails.")
    parts.append("")
    found = effects(results)
    if several_models(found):
        parts += ["## Quantization's effect, paired with fp32 on the same models", "", EFFECTS_NOTE, ""]
        if effects_picture:
            parts += [f"![effects]({effects_picture})", ""]
        parts += [md_table(*effects_table(found)), ""]
    elif found:
        parts += ["One model per cell: a single seed shows whether each cell matches its truth (or its row's measured"
                  " outcomes), not whether quantization changes a defense's rates; run `qbd run --seeds 10` for the"
                  " paired effects.", ""]
    elif several_seeds(rows):
        parts += ["No paired effects: they compare each scheme with fp32 on the same models, and fp32 was not among"
                  " the schemes run (add it to --quant).", ""]
    if picture:
        parts += [f"![heatmap]({picture})", "",
                  f"[{picture}]({picture}) colours each cell by its outcome against the truth (see its legend), beside the"
                  " deployed models' clean accuracy and ASR; it is a picture of the tables below, which are the reference.", ""]
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


# -- run metadata -------------------------------------------------------------------------------------
# the order report.md's header lists them in; a caller's other keys follow
RUN_FIELDS = ("command", "tier", "model", "attack", "seeds", "device", "expectations", "versions", "platform", "date")


def run_metadata(**fields: Any) -> dict[str, Any]:
    """The run's metadata, for report.md's header and results.json's "run": the caller's fields
    (command, tier, model, attack, seeds, device, expectations, or any other JSON-able value) and,
    where one is absent or None, this process's command line, versions, platform and the date."""
    out = {k: _plain(v) for k, v in fields.items()}
    defaults = {"command": _command_line, "versions": _versions, "platform": _platform, "date": _now}
    for key, default in defaults.items():
        if out.get(key) is None:
            out[key] = default()
    return out


def run_facts(results: list[dict[str, Any]]) -> dict[str, Any]:
    """What the Results themselves say about their run: tier, model, attack specs (without the
    per-model attack seed), model seeds and device (where they record their placement)."""
    def distinct(values: Iterable[Any]) -> str | None:
        vs = sorted({str(v) for v in values if v is not None})
        return ", ".join(vs) if vs else None

    attacks: list[dict[str, Any]] = []
    for r in results:
        a = {k: v for k, v in (r.get("attack") or {}).items() if k != "seed"}
        if a and a not in attacks:
            attacks.append(a)
    if not results:
        return {}
    facts = {"tier": distinct(r.get("tier") for r in results), "model": distinct(r.get("model") for r in results),
             "attack": attacks, "seeds": sorted({int(r.get("seed", 0)) for r in results}),
             "device": distinct((r.get("placement") or {}).get("device") for r in results)}
    return {k: v for k, v in facts.items() if v is not None}


def _plain(v: Any) -> Any:
    """JSON-ready: paths as text, tuples as lists."""
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _command_line() -> str:
    """This process's command line as typed: `qbd run ...`, `pytest ...`, `python -m qbd run ...`."""
    import shlex
    import sys

    if not sys.argv or not sys.argv[0]:
        return ""
    prog = Path(sys.argv[0])
    head = ["python", "-m", prog.parent.name] if prog.name == "__main__.py" else [prog.name]
    return shlex.join([*head, *sys.argv[1:]])


def _versions() -> dict[str, str]:
    """Read from the installed distributions: the report stays torch-free."""
    import platform
    from importlib import metadata

    from qbd import __version__

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    # the libraries a verdict depends on (kernels, quantization flows, clustering, SVD)
    libs = ("torch", "torchvision", "torchao", "numpy", "scipy", "scikit-learn")
    return {"qbd": __version__, **{lib: version(lib) for lib in libs}, "python": platform.python_version(),
            "qbd_source": _source()}


def _source() -> str:
    """Which qbd ran: a git checkout's commit, and whether its files differ from it (modified or
    new, outside out/ and docs/; a version number does not change between commits), else
    "installed"."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "installed"
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        # tracked files modified anywhere, and new files where a run reads them (code, tables, the zoo)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=all", "--", ".", ":(exclude)out", ":(exclude)docs"],
                               capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return "a git checkout (git could not say which commit)"
    return f"git {head.stdout.strip()}" + (" with uncommitted changes" if dirty.stdout.strip() else "")


def _platform() -> dict[str, Any]:
    import platform

    return {"os": platform.platform(), "machine": platform.machine(), "cpu": _cpu_name(), "cpu_count": os.cpu_count()}


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() elsewhere, often empty)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def describe_attack(attack: Any) -> str:
    """"badnet: target 0, white 3x3 trigger at bottom-right, 10 % poisoned" for an attack spec
    (a list of specs joined by "; "; none: "none (clean models only)")."""
    if isinstance(attack, list):
        return "; ".join(describe_attack(a) for a in attack) or "none (clean models only)"
    if not isinstance(attack, dict):
        return "none (clean models only)" if attack is None else str(attack)
    a = attack
    try:
        size = a["trigger_size"]
        return (f"{a['name']}: target {a['target']}, {a['trigger_pattern']} {size}x{size} trigger at {a['trigger_position']},"
                f" {100 * a['poison_rate']:g} % poisoned")
    except (KeyError, TypeError):  # a spec of another shape: its fields as they are
        return ", ".join(f"{k}={v}" for k, v in a.items())


def run_table(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of report.md's run block: the known fields in order, then the others."""
    def text(key: str, v: Any) -> str:
        if key == "attack":
            return describe_attack(v)
        if key == "seeds" and isinstance(v, list) and all(isinstance(x, int) for x in v):
            return _seeds_text(v) if v else "-"
        if key == "command" and v and "`" not in str(v):
            return f"`{v}`"
        if key == "expectations" and v is None:
            return "none: every cell judged against the truth alone"
        if key == "platform" and isinstance(v, dict):
            return ", ".join(str(x) for x in (v.get("os"), v.get("machine"), v.get("cpu")) if x) + (
                f" ({v['cpu_count']} CPUs)" if v.get("cpu_count") else "")
        if isinstance(v, dict):
            return ", ".join(f"{k} {x}" for k, x in v.items())
        return "-" if v is None else str(v)

    keys = [k for k in RUN_FIELDS if k in run] + [k for k in run if k not in RUN_FIELDS]
    return ["run", ""], [[k, text(k, run[k])] for k in keys]


# -- the heatmap ----------------------------------------------------------------------------------------
HATCH_COLOUR = "#707070"


@dataclass(frozen=True)
class Category:
    label: str
    colour: str
    hatch: str | None = None


# A cell's outcome against the truth (qbd.outcomes), in the legend's order. Okabe & Ito's palette:
# its colours stay distinct under the common colour-vision deficiencies. A missing cell is hatched
# grey: never drawn as clean.
CATEGORIES: dict[str, Category] = {
    "correct-detection": Category("correct detection (named the planted target)", "#009E73"),
    "correct-clean": Category("correct: clean model judged clean", "#56B4E9"),
    "miss": Category("miss (backdoored, judged clean)", "#D55E00"),
    "wrong-target": Category("wrong target (detected, named another class)", "#E69F00"),
    "false-alarm": Category("false alarm (clean model, detected)", "#CC79A7"),
    "invalid": Category("invalid (its reason code in the cell)", "#F0E442"),
    "finding": Category("declared finding (as the expectations declare)", "#0072B2"),
    "missing": Category("missing (no Result for the cell)", "#D9D9D9", "//"),
}
NOTHING_TO_DETECT = Category("no backdoored model in the row: nothing to detect", "#D9D9D9")
CA_COLOUR, ASR_COLOUR = "#4D4D4D", "#A6A6A6"


def category(result: dict[str, Any]) -> str:
    """The key in CATEGORIES of one Result: a declared finding (its judgement says so), else its
    outcome against the truth."""
    from qbd.outcomes import outcome, split

    if (result.get("judgement") or {}).get("judgement") == "finding":
        return "finding"
    kind, _ = split(outcome(result))
    if kind == "pass":
        return "correct-detection" if result.get("attack") is not None else "correct-clean"
    return kind


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
        rows = sorted({(_row_label(r), r["quant"]["scheme"]) for r in results}, key=lambda k: (k[0], scheme_key(k[1])))
        columns = sorted({(r["defense"]["name"], r["defense"]["protocol"]) for r in results}, key=lambda k: (k[1], k[0]))
        ri, ci = {k: i for i, k in enumerate(rows)}, {k: j for j, k in enumerate(columns)}
        cells: dict[tuple[int, int], dict[str, Any]] = {}
        for r in results:  # one model seed: one Result per cell (over several, the rate heatmap)
            key = (ri[(_row_label(r), r["quant"]["scheme"])], ci[(r["defense"]["name"], r["defense"]["protocol"])])
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


def _paint(ax: Any, i: int, j: int, c: Category | str) -> None:
    from matplotlib.patches import Rectangle

    colour, hatch = (c.colour, c.hatch) if isinstance(c, Category) else (c, None)
    # linewidth 0: no border; the hatch is drawn in the edge colour all the same
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=colour, edgecolor=HATCH_COLOUR if hatch else colour,
                           hatch=hatch, linewidth=0))


def _patch(c: Category) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=c.colour, edgecolor=HATCH_COLOUR if c.hatch else c.colour, hatch=c.hatch, label=c.label)


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
    code; a legend of every category; beside it the deployed model's clean accuracy and ASR."""
    grid = OutcomeGrid.of(results)
    n_rows, n_cols = len(grid.rows), len(grid.columns)
    row_labels = [f"{ds} / {sc}" for ds, sc in grid.rows]
    col_labels = [f"{d}[{p}]" for d, p in grid.columns]
    longest_row = max((len(x) for x in row_labels), default=10)
    longest_col = max((len(x) for x in col_labels), default=10)
    width = 0.5 + 0.065 * longest_row + 1.0 * max(n_cols, 2) + 2.4
    height = 2.6 + 0.045 * longest_col + 0.42 * max(n_rows, 1)
    fig = _figure(max(width, 7.5), height)
    gs = fig.add_gridspec(1, 2, width_ratios=[max(n_cols, 2), 2.2])
    ax = fig.add_subplot(gs[0, 0])
    panel = fig.add_subplot(gs[0, 1], sharey=ax)
    for i in range(n_rows):
        for j in range(n_cols):
            c = CATEGORIES[grid.category(i, j)]
            _paint(ax, i, j, c)
            ax.text(j, i, cell_text(grid.cells.get((i, j))), ha="center", va="center", fontsize=7, color=_ink(c.colour))
    _grid_lines(ax, max(n_rows, 1), max(n_cols, 1))
    for j in range(1, n_cols):  # a darker line where the protocol changes
        if grid.columns[j][1] != grid.columns[j - 1][1]:
            ax.axvline(j - 0.5, color="#333333", linewidth=2.5)
    _top_labels(ax, col_labels)
    ax.set_yticks(range(n_rows), row_labels, fontsize=8)
    if not n_rows:
        ax.text(0, 0, "no Results", ha="center", va="center")
    ax.legend(handles=[_patch(c) for c in CATEGORIES.values()], title="outcome against the truth (FAIL: fails its expectation)",
              loc="upper left", bbox_to_anchor=(0.0, -0.02), ncols=2, fontsize=7, title_fontsize=8, frameon=False)
    _ca_asr_panel(panel, grid)
    fig.suptitle(title_line(results), fontsize=9)
    return Drawn(fig, ax, panel, grid)


def _ca_asr_panel(panel: Any, grid: OutcomeGrid) -> None:
    """Per row, the deployed model's clean accuracy and ASR, as bars with their values."""
    from matplotlib.patches import Patch

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
    panel.legend(handles=[Patch(color=CA_COLOUR, label="clean accuracy"), Patch(color=ASR_COLOUR, label="attack success rate")],
                 loc="upper left", bbox_to_anchor=(0.0, -0.02), fontsize=7, frameon=False)


def heatmap(results: list[dict[str, Any]], path: Path) -> Path:
    """The outcome heatmap (draw_outcomes); over several model seeds, the rates (draw_rates)."""
    rows = rates.rows(results)
    if several_seeds(rows):
        return _save(draw_rates(rows, title_line(results)), path)
    return draw_outcomes(results).save(path)


def draw_rates(rows: list[dict[str, Any]], title: str = "") -> Any:
    """One panel per protocol: rows dataset / scheme, columns defenses, each cell coloured by its
    detection rate (cividis: readable without colour vision) and annotated "k/n" (detections) and
    "FA k/n" (false alarms on clean models); a cell with no row is hatched, never a rate."""
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
                _paint(ax, i, j, colour)
                text = [f"{row['detected']}/{row['n_backdoored']}"] if row["n_backdoored"] else []
                text += [f"FA {row['false_alarms']}/{row['n_clean']}"] if row["n_clean"] else []
                ax.text(j, i, "\n".join(text), ha="center", va="center", fontsize=7, color=_ink(colour))
        _grid_lines(ax, len(labels), len(defenses))
        _top_labels(ax, defenses)
        ax.set_yticks(range(len(labels)), [f"{ds} / {sc}" for ds, sc in labels], fontsize=8)
        ax.set_title(f"{p} protocol", fontsize=9)
        fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=ax, fraction=0.05, pad=0.02).set_label(
            "detection rate (right target)", fontsize=8)
    axes[0].legend(handles=[_patch(NOTHING_TO_DETECT), _patch(CATEGORIES["missing"])], loc="upper left", bbox_to_anchor=(0.0, -0.02),
                   title="k/n: backdoored models detected naming the target\nFA k/n: false alarms on clean models",
                   fontsize=7, title_fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def write_report(results: Iterable[dict[str, Any]], out_dir: str | Path, title: str = "qbd report",
                 run: dict[str, Any] | None = None) -> dict[str, Path]:
    """results.json (the Results, their rows of rates and the run's metadata under "run"),
    report.md (the run's metadata, a link to the heatmap, the tables) and heatmap.png in out_dir.
    `run`: the caller's metadata (run_metadata's fields: command, tier, device, expectations...);
    what it lacks is taken from the Results (run_facts) and this process (run_metadata)."""
    rs = list(results)
    meta = run_metadata(**{**run_facts(rs), **(run or {})})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results.json": results_io.write(out / "results.json", rs, rates.rows(rs), run=meta),
        "report.md": out / "report.md",
        "heatmap.png": heatmap(rs, out / "heatmap.png"),
    }
    found = effects(rs)
    if several_models(found):
        paths["effects.png"] = save_effects(found, out / "effects.png", title_line(rs))
    paths["report.md"].write_text(markdown(rs, title, run=meta, picture=paths["heatmap.png"].name,
                                           effects_picture="effects.png" if "effects.png" in paths else None))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:  # the step summary cannot show a file of the job's disk: no picture there
        with open(summary, "a") as f:
            f.write(markdown(rs, title, run=meta) + "\n")
    return paths
