"""Declare the shipped table's measured rows from a run over the pinned evaluation models.

    qbd run --dataset digits --seeds 10 --json > digits.json      # and synthetic, likewise
    python scripts/declare_rows.py digits.json synthetic.json [--table qbd/expected/smoke.toml]

Every row of the runs' Results on the table's meta attack becomes a measured row
(qbd.measured_rows): its seeds and its outcome counts per kind of model, and, where any model
did not match its truth, a why with the figures. The table's previous [rows] entries, and every
[cells] finding of a row now measured (the row judges those cells), are replaced; everything else
(comments, other sections) is kept as written. Re-running on the same runs rewrites the same text.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qbd import measured_rows
from qbd import results as results_io
from qbd.expectations import _toml_value, load, shipped
from qbd.rates import row_id, wilson

BEGIN = "# -- measured rows: written by scripts/declare_rows.py from runs over the pinned evaluation models --"
ANCHOR = "docs/results.md#{defense}"  # docs/results.md's findings have a section per defense
_HEADER = re.compile(r'^\[(rows|cells)\.("(?:[^"\\]|\\.)*")\]\s*$')


def _rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)  # type: ignore[misc]
    return f"{k}/{n} [{lo:.2f}, {hi:.2f}]"


def why(entry: dict, defense: str) -> str:
    """The figures of a row that is a finding: each kind's truth count with its Wilson interval and
    what the other models did."""
    parts = []
    for kind, label in (("backdoored", "detected naming the target"), ("clean", "false alarms")):
        counts = entry.get(kind)
        if not counts:
            continue
        t = measured_rows.totals(counts, kind)
        others = {o: n for o, n in counts.items() if o not in ("pass", "false-alarm")}
        rest = f" ({measured_rows.describe(others)})" if others and kind == "backdoored" else ""
        if kind == "clean":
            inval = {o: n for o, n in counts.items() if o.startswith("invalid:")}
            rest = f" ({measured_rows.describe(inval)})" if inval else ""
        parts.append(f"{label} {_rate(t['flagged'], t['n'])}{rest}")
    return ANCHOR.format(defense=defense) + ": " + "; ".join(parts)


def declared(results: list[dict], meta_attack: dict) -> dict[str, dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        a = r.get("attack")
        if a is None or all(a.get(k) == v for k, v in meta_attack.items()):
            groups[row_id(r)].append(r)
    out = {}
    for rid, rs in sorted(groups.items()):
        entry = measured_rows.measured(rs)
        if not measured_rows.all_truth(entry):
            entry["why"] = why(entry, rs[0]["defense"]["name"])
        out[rid] = entry
    return out


def rewrite(text: str, rows: dict[str, dict]) -> str:
    """The table's text with the [rows] entries of the runs' data sets and the measured rows'
    [cells] findings replaced; rows of other data sets are kept as they are."""
    import tomllib

    datasets = {rid.split("/", 1)[0] for rid in rows}
    old_rows = {rid: e for rid, e in tomllib.loads(text).get("rows", {}).items() if rid.split("/", 1)[0] not in datasets}
    rows = dict(sorted({**old_rows, **rows}.items()))
    lines = text.split("\n")
    if BEGIN in lines:
        lines = lines[: lines.index(BEGIN)]
    kept, skipping = [], False
    for line in lines:
        m = _HEADER.match(line)
        if m:
            key = tomllib.loads(f"k = {m.group(2)}")["k"]
            skipping = m.group(1) == "rows" or key.replace(":clean/", "/", 1) in rows
        elif line.startswith("["):
            skipping = False
        if not skipping:
            kept.append(line)
    body = "\n".join(kept).rstrip("\n")
    block = [BEGIN]
    for rid, entry in rows.items():
        block += ["", f"[rows.{_toml_value(rid)}]", *[f"{k} = {_toml_value(v)}" for k, v in entry.items()]]
    return body + "\n\n" + "\n".join(block) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="results files (qbd run --json, or a report's results.json)")
    ap.add_argument("--table", default=str(shipped("smoke")), help="the expectations table to rewrite")
    args = ap.parse_args(argv)
    results = [r for path in args.runs for r in results_io.read(path)]
    table = Path(args.table)
    rows = declared(results, load(table).attack_spec)
    table.write_text(rewrite(table.read_text(), rows))  # rows of data sets the runs do not cover are kept
    load(table)  # the rewritten table must load
    findings = sum(1 for e in rows.values() if "why" in e)
    print(f"{table}: {len(rows)} measured rows ({findings} findings, {len(rows) - findings} matching the truth on every model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
