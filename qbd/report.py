"""Reports of a set of Results, composed: the terminal text, report.md (appended to
$GITHUB_STEP_SUMMARY when that is set), results.json and the pictures. The parts live beside it:
qbd.tables (Table 1 and 2, outcomes, rates over seeds, budgets), qbd.run_metadata (report.md's
header and results.json's "run") and qbd.heatmap (each cell's outcome against the truth, beside
the deployed models' clean accuracy and ASR; a picture of the tables, which stay the reference).
Torch-free.

Over several model seeds, the report leads with quantization's effect, paired with fp32 on the
same models (qbd.effects, qbd.effects_report: a table, and effects.png beside the heatmap);
Tables 1 and 2 then show the first seed's models, a "Rates over seeds" table every row's
detection and false-alarm rates (qbd.rates), and the heatmap the rates.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from qbd import rates
from qbd import results as results_io
from qbd.effects import effects
from qbd.effects_report import NOTE as EFFECTS_NOTE
from qbd.effects_report import save as save_effects
from qbd.effects_report import several_models
from qbd.effects_report import table as effects_table
from qbd.heatmap import heatmap, title_line
from qbd.run_metadata import run_facts, run_metadata, run_table
from qbd.tables import (
    RATES_NOTE,
    UNCALIBRATED_NOTE,
    budgets,
    count_line,
    invalid_reasons,
    md_table,
    outcomes,
    protocols,
    rates_table,
    seed_note,
    several_seeds,
    shown_cells,
    table1,
    table2,
    text_table,
    uncalibrated,
)


def terminal(results: list[dict[str, Any]]) -> str:
    parts = []
    line = count_line(results)
    if line:
        parts += [f"outcome: {line}", ""]
    rows = rates.rows(results)
    shown, note = shown_cells(results, rows)
    found = effects(results)
    if several_models(found):  # the headline: quantization's effect, paired on the same models
        parts += [f"Quantization's effect ({EFFECTS_NOTE})", text_table(*effects_table(found)), ""]
    for p in protocols(shown):
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
    pooled = uncalibrated(results)
    if pooled:
        parts += ["", f"Judged with {UNCALIBRATED_NOTE}:", *[f"  {x}" for x in pooled]]
    _, rows = outcomes(results)
    if rows:
        parts += ["", "Outcomes against the truth (declared findings and failures):",
                  *[f"  {r[3]:7s} {r[0]}: {r[1]} [{r[2]}]" + (f" - {r[4]}" if r[4] else "") for r in rows]]
    return "\n".join(parts)


def markdown(results: list[dict[str, Any]], title: str = "qbd report", *, run: dict[str, Any] | None = None,
             picture: str | None = None, effects_picture: str | None = None, failing: Sequence[str] = ()) -> str:
    """report.md's text; `run`: the run's metadata (run_metadata) as a header block; `picture`: the
    heatmap's file name, relative to report.md, shown above the tables; `effects_picture`: the
    effects' picture, shown with their table, the report's headline; `failing`: everything the
    gate fails (qbd.gate: cells, deployed models, rows), listed first."""
    rows = rates.rows(results)
    shown, note = shown_cells(results, rows)
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
    if failing:
        parts += [f"## What fails ({len(failing)}: the run exits 1)", "",
                  *[f"- `{line.splitlines()[0]}`" for line in failing], ""]
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
    for p in protocols(shown):
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
    pooled = uncalibrated(results)
    if pooled:
        parts += ["## Thresholds not calibrated for the data set", "", f"Judged with {UNCALIBRATED_NOTE}:", "",
                  *[f"- {x}" for x in pooled], ""]
    crashes = [r for r in results if isinstance(r["verdict"].get("evidence"), dict) and r["verdict"]["evidence"].get("traceback")]
    if crashes:  # a crash fails its cell: show where it raised
        parts += ["## Tracebacks", ""]
        for r in crashes:
            parts += [f"`{r['cell']}`{seed_note(r)}:", "", "```", r["verdict"]["evidence"]["traceback"].rstrip(), "```", ""]
    parts += ["## Budgets and hyperparameters used", "", *[f"- {b}" for b in budgets(results)], ""]
    return "\n".join(parts)


def write_report(results: Iterable[dict[str, Any]], out_dir: str | Path, title: str = "qbd report",
                 run: dict[str, Any] | None = None, failing_rows: Iterable[str] = (), failing: Sequence[str] = ()) -> dict[str, Path]:
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
        "heatmap.png": heatmap(rs, out / "heatmap.png", frozenset(failing_rows)),
    }
    found = effects(rs)
    if several_models(found):
        paths["effects.png"] = save_effects(found, out / "effects.png", title_line(rs))
    paths["report.md"].write_text(markdown(rs, title, run=meta, picture=paths["heatmap.png"].name,
                                           effects_picture="effects.png" if "effects.png" in paths else None, failing=failing))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:  # the step summary cannot show a file of the job's disk: no picture there
        with open(summary, "a") as f:
            f.write(markdown(rs, title, run=meta, failing=failing) + "\n")
    return paths
