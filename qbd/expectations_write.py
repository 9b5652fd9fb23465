"""Writing an expectations table: dumps (a table as TOML text), propose (--qbd-accept's
proposed findings for the failing cells, each why left for a person to write) and add_cells (the
proposals written into the author's file, everything else in it kept as it was). Torch-free."""

from __future__ import annotations

import json
import re
from typing import Any

from qbd.expectations import Expectations
from qbd.expectations_format import OTHER_ATTACKS_DOC, PROPOSED
from qbd.outcomes import Counts, split
from qbd.reason_codes import NEVER_EXPECTED


# -- writing ----------------------------------------------------------------------------------------
def _toml_key(k: str) -> str:
    """A bare key where TOML allows one (letters, digits, - and _), else a quoted one."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_value(k)

def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")  # JSON escapes are TOML's; TOML also refuses DEL
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")

def dumps(e: Expectations, header: str = "") -> str:
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []
    lines += ["", "[meta]", f"tier = {toml_value(e.tier)}", f"min_clean_acc = {toml_value(e.min_clean_acc)}",
              f"min_asr = {toml_value(e.min_asr)}", f"attack = {toml_value(e.attack_spec)}"]
    for table in ("attack", "audit", "cells", "rows"):
        for key in sorted(getattr(e, table)):
            lines += ["", f"[{table}.{toml_value(key)}]"]
            lines += [f"{k} = {toml_value(v)}" for k, v in getattr(e, table)[key].items()]
    for name in sorted(e.attacks):
        section = e.attacks[name]
        lines += ["", f"[attacks.{toml_value(name)}]", f"attack = {toml_value(section['attack'])}"]
        if section.get("doc", OTHER_ATTACKS_DOC) != OTHER_ATTACKS_DOC:
            lines.append(f"doc = {toml_value(section['doc'])}")
        for table in ("cells", "rows"):
            for key in sorted(section.get(table, {})):
                lines += ["", f"[attacks.{toml_value(name)}.{table}.{toml_value(key)}]"]
                lines += [f"{k} = {toml_value(v)}" for k, v in section[table][key].items()]
    return "\n".join(lines) + "\n"

def propose(e: Expectations, results: list[dict[str, Any]]) -> tuple[Expectations, list[str]]:
    """--qbd-accept: a copy of `e` with a proposed finding for every failing cell that declares
    none, and the lines to print (a truth-vs-finding count diff, and what needs a person).
    Existing entries, their `why` and their pins are never changed or dropped; a crash or a
    timeout is never proposed; every proposed why must be written by hand before the table loads."""
    new = Expectations(path=e.path, tier=e.tier, min_clean_acc=e.min_clean_acc, min_asr=e.min_asr,
                       attack_spec=dict(e.attack_spec), cells={k: dict(v) for k, v in e.cells.items()},
                       attack={k: dict(v) for k, v in e.attack.items()}, audit={k: dict(v) for k, v in e.audit.items()},
                       rows={k: dict(v) for k, v in e.rows.items()},
                       attacks={k: {"attack": dict(v["attack"]), "cells": {c: dict(x) for c, x in v["cells"].items()},
                                    "rows": {c: dict(x) for c, x in v.get("rows", {}).items()},
                                    "doc": v.get("doc", OTHER_ATTACKS_DOC)}
                                for k, v in e.attacks.items()})
    before = e.judge_all(results)
    notes: list[str] = []
    for j, r in zip(before, sorted(results, key=lambda r: (r["cell"], r.get("seed", 0))), strict=True):
        if j.judgement != "FAIL":
            continue
        kind, code = split(j.outcome)
        if e.measured_row(r) is not None:  # its row judges it: re-measure the row (scripts/declare_rows.py), not a cell entry
            notes.append(f"  by hand: {j.cell}: its row is measured over models; re-measure it with qbd run --seeds"
                         f" {len(e.measured_row(r)['seeds'])} and scripts/declare_rows.py")
            continue
        if not e.measured_on(r):  # another attack's cell: its section, by hand (a [cells] entry would apply to meta's attack)
            notes.append(f"  by hand: {j.cell}: {(r.get('attack') or {}).get('name')} is not meta.attack: declare it in its"
                         " [attacks.<name>] section")
            continue
        if "outcome" in e.cells.get(j.cell, {}):  # a declared finding (applying here or not) is a person's to revise
            notes.append(f"  by hand: {j.cell}: {j.why.splitlines()[0] if j.why else j.outcome}")
            continue
        if code in NEVER_EXPECTED:
            notes.append(f"  not proposed (a crash or a timeout is never expected): {j.cell}: {j.outcome}")
            continue
        entry: dict[str, Any] = {"outcome": kind}
        if code:
            entry["reason_code"] = code
        if kind == "wrong-target":
            entry["target"] = int(r["verdict"]["target_class"])
        entry["why"] = f"{PROPOSED}: write where the figures are (measured {j.verdict})"
        new.cells[j.cell] = {**new.cells.get(j.cell, {}), **entry}
        notes.append(f"  proposed: {j.cell}: {j.outcome}")
    a, b = (Counts.of([j.judgement for j in js]) for js in (before, new.judge_all(results)))
    head = [f"before: {a.line()}", f"after:  {b.line()}"]
    return new, head + notes


def add_cells(path: Any, entries: dict[str, dict[str, Any]], header: str, tier: str) -> None:
    """Write `entries` as [cells."<id>"] tables into the TOML file at `path` (created with `header`
    and its tier when missing). Edited with tomlkit, so the file's comments, order and every entry
    it already holds stay exactly as they were; an id the file already has is replaced by its
    merged entry (propose only ever adds keys to it)."""
    from pathlib import Path

    import tomlkit

    p = Path(path)
    if p.exists():
        doc = tomlkit.parse(p.read_text(encoding="utf-8"))
    else:
        doc = tomlkit.document()
        for line in header.splitlines():
            doc.add(tomlkit.comment(line))
        doc.add(tomlkit.nl())
        meta = tomlkit.table()
        meta.add("tier", tier)
        meta.add(tomlkit.comment("extends the table qbd ships: its findings keep applying to the built-in defenses"))
        doc.add("meta", meta)
    if "cells" not in doc:
        doc.add("cells", tomlkit.table(is_super_table=True))
    cells = doc["cells"]
    for key in sorted(entries):
        table = tomlkit.table()
        for k, v in entries[key].items():
            table.add(k, v)
        cells[key] = table  # type: ignore[index]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(tomlkit.dumps(doc), encoding="utf-8")
