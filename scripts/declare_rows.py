"""Declare the shipped table's measured rows from a run over the pinned evaluation models.

    qbd run --dataset digits --seeds 10 --json > digits.json      # and synthetic, likewise
    python scripts/declare_rows.py digits.json synthetic.json [--table qbd/expected/smoke.toml]

Every row of the runs' Results on the table's meta attack becomes a measured row
(qbd.measured_rows): its seeds and its outcome counts per kind of model, and, where any model
did not match its truth, a why with the figures. Results of another attack's models whose spec
an [attacks.<name>] section states become that section's rows, counting the backdoored models
only (`qbd run --attack blend --seeds 5 --no-controls --json > blend-digits.json`). The previous
measured rows of the runs' (data set, scheme)s, and every cell finding of a row now measured (the
row judges those cells), are replaced; everything else (comments, other sections, rows of data
sets and schemes the runs do not cover) is kept as written. Re-running on the same runs rewrites the same text.
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
from qbd.expectations import load, shipped
from qbd.expectations_write import toml_value
from qbd.rates import row_id, wilson

BEGIN = "# -- measured rows: written by scripts/declare_rows.py from runs over the pinned evaluation models --"
ANCHOR = "docs/results.md#{defense}"  # docs/results.md's findings have a section per defense
_QUOTED = r'"(?:[^"\\]|\\.)*"'
# [rows."id"], [cells."id"], and an attack section's [attacks."name".rows."id"] / [attacks.name.cells."id"]
_HEADER = re.compile(rf'^\[(?:attacks\.({_QUOTED}|[A-Za-z0-9_-]+)\.)?(rows|cells)\.({_QUOTED})\]\s*$')


def _rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)  # type: ignore[misc]
    return f"{k}/{n} [{lo:.2f}, {hi:.2f}]"


def why(entry: dict, doc: str) -> str:
    """The figures of a row that is a finding, after the docs page that explains it: each kind's
    truth count with its Wilson interval and what the other models did."""
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
    return doc + ": " + "; ".join(parts)


Key = tuple[str | None, str]  # (the [attacks.<name>] section, None for meta's attack; the row id)


def _section_of(attack: dict | None, table) -> str | bool | None:
    """None for meta's attack (and clean models), the section's name for another attack a section
    states, False for an attack the table has no section for."""
    if table.measured_on({"attack": attack}):
        return None
    for name, section in table.attacks.items():
        if all(attack.get(k) == v for k, v in section["attack"].items()):
            return name
    return False


def declared(runs: list[list[dict]], table) -> dict[Key, dict]:
    """The measured rows of `runs` (each one run's Results)."""
    groups: dict[Key, list[dict]] = defaultdict(list)
    for results in runs:
        sections = [_section_of(r.get("attack"), table) for r in results]
        if False in sections:
            bad = results[sections.index(False)]
            sys.exit(f"{row_id(bad)}: attack {bad['attack']} has no [attacks.<name>] section in the table; add one first")
        other_attack = any(name is not None for name in sections)
        if other_attack and any(r.get("attack") is None for r in results):
            n = sum(r.get("attack") is None for r in results)
            print(f"declare_rows: {n} clean-model Results of another attack's run left out: an attack's row counts its"
                  " backdoored models, and clean models are [rows]' (declare them from the BadNet runs)", file=sys.stderr)
        for r, name in zip(results, sections, strict=True):
            if other_attack and r.get("attack") is None:
                continue  # a clean control of another attack's run: [rows] counts the clean models of BadNet's runs
            groups[(name, row_id(r))].append(r)
    out = {}
    for (name, rid), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        entry = measured_rows.measured(rs)
        if not measured_rows.all_truth(entry):
            doc = ANCHOR.format(defense=rs[0]["defense"]["name"]) if name is None else table.attacks[name]["doc"]
            entry["why"] = why(entry, doc)
        out[(name, rid)] = entry
    return out


def _old_rows(text: str) -> dict[Key, dict]:
    import tomllib

    raw = tomllib.loads(text)
    out: dict[Key, dict] = {(None, rid): e for rid, e in raw.get("rows", {}).items()}
    for name, section in raw.get("attacks", {}).items():
        out.update({(name, rid): e for rid, e in section.get("rows", {}).items()})
    return out


def rewrite(text: str, rows: dict[Key, dict]) -> str:
    """The table's text with the measured rows of the runs' (section, data set, scheme)s and those
    rows' cell findings replaced; rows of other data sets and schemes are kept as they are."""
    import tomllib

    covered = {(name, *rid.split("/")[:2]) for name, rid in rows}  # (section, data set, scheme)
    old = {k: e for k, e in _old_rows(text).items() if (k[0], *k[1].split("/")[:2]) not in covered}
    rows = dict(sorted({**old, **rows}.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])))
    lines = text.split("\n")
    if BEGIN in lines:
        lines = lines[: lines.index(BEGIN)]
    kept, skipping = [], False
    for line in lines:
        m = _HEADER.match(line)
        if m:
            section = None if m.group(1) is None else tomllib.loads(f"k = {m.group(1)}")["k"] if m.group(1).startswith('"') else m.group(1)
            key = tomllib.loads(f"k = {m.group(3)}")["k"]
            skipping = m.group(2) == "rows" or (section, key.replace(":clean/", "/", 1)) in rows
        elif line.startswith("["):
            skipping = False
        if not skipping:
            kept.append(line)
    body = "\n".join(kept).rstrip("\n")
    block = [BEGIN]
    for (name, rid), entry in rows.items():
        where = "rows" if name is None else f"attacks.{toml_value(name)}.rows"
        block += ["", f"[{where}.{toml_value(rid)}]", *[f"{k} = {toml_value(v)}" for k, v in entry.items()]]
    return body + "\n\n" + "\n".join(block) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="results files (qbd run --json, or a report's results.json)")
    ap.add_argument("--table", default=str(shipped("smoke")), help="the expectations table to rewrite")
    args = ap.parse_args(argv)
    table = Path(args.table)
    rows = declared([results_io.read(path) for path in args.runs], load(table))
    table.write_text(rewrite(table.read_text(), rows))  # rows of data sets the runs do not cover are kept
    load(table)  # the rewritten table must load
    findings = sum(1 for e in rows.values() if "why" in e)
    print(f"{table}: {len(rows)} measured rows ({findings} findings, {len(rows) - findings} matching the truth on every model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
