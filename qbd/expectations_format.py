"""The expectations table's format: its sections' keys, the outcomes a finding may declare, the
bounds a row may state, and the checks load() runs on every entry (a bad table is a ConfigError
naming the entry, before any model is trained). Torch-free."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qbd import measured_rows
from qbd.config import PROTOCOLS, AttackSpec
from qbd.errors import ConfigError
from qbd.reason_codes import NEVER_EXPECTED, REASON_CODES
from qbd.result_types import Cell

FINDING_OUTCOMES = ("miss", "wrong-target", "false-alarm", "invalid", "borderline")

PROPOSED = "PROPOSED by --qbd-accept"  # a why that still has to be written; refused by load()

META_KEYS = {"tier", "min_clean_acc", "min_asr", "attack", "extends"}

CELL_KEYS = {"outcome", "reason_code", "target", "why", "note", "paper", "margin"}

_BOUNDS = ("min_clean_acc", "max_clean_acc", "min_asr", "max_asr")

ATTACK_KEYS = {*_BOUNDS, "why", "note", "paper_clean_acc", "paper_asr"}

AUDIT_KEYS = {"input_gradient", "surrogate_gradient", "min_quantized_fraction", "max_quantized_fraction", "note"}

# row bound -> (the row's rate it bounds, its count, its number of models, the kind of model)
ROW_BOUNDS = {
    "min_detection_rate": ("detection_rate", "detected", "n_backdoored", "backdoored"),
    "max_detection_rate": ("detection_rate", "detected", "n_backdoored", "backdoored"),
    "min_false_alarm_rate": ("false_alarm_rate", "false_alarms", "n_clean", "clean"),
    "max_false_alarm_rate": ("false_alarm_rate", "false_alarms", "n_clean", "clean"),
}

# also: max_invalid_rate (default 0: an invalid verdict in a bounded row fails it; invalid counts as
# neither a detection nor a false alarm, so without this a row of invalid clean cells would pass
# its false-alarm bound) and seeds (the model seeds the bounds were measured on)
ROW_KEYS = {*ROW_BOUNDS, "max_invalid_rate", "seeds", "why", "note", *measured_rows.KINDS}

TABLES = ("cells", "attack", "audit", "rows")

_OTHER_ATTACK_KEYS = {"attack", "cells", "rows", "doc"}

OTHER_ATTACKS_DOC = "docs/results.md#other-attacks"  # where an attack section's findings are explained, unless it says

def row_of(cell: str) -> str:
    """A cell id's row id: without ":clean" (a row covers both kinds of model)."""
    return cell.replace(":clean/", "/", 1)

def check_entries(where: str, entries: dict[str, Any], allowed: set[str], check: Any, planted: int | None) -> None:
    """Each entry a table of allowed keys, passing `check`; a wrong-target finding never names
    the `planted` target (naming it is the truth)."""
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}.{key!r} must be a table")
        bad = set(entry) - allowed
        if bad:
            raise ConfigError(f"{where}.{key!r}: unknown key(s) {sorted(bad)}; valid: {sorted(allowed)}")
        check(f"{where}.{key!r}", key, entry)
        if planted is not None and entry.get("outcome") == "wrong-target" and entry.get("target") == planted:
            raise ConfigError(f"{where}.{key!r}: target {entry['target']} is the planted target: naming it is the truth")

def load_other_attacks(p: Path, raw: Any, meta_attack: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: [attacks] must be a table of attack sections")
    out: dict[str, dict[str, Any]] = {}
    for name, section in raw.items():
        where = f"{p}: attacks.{name!r}"
        if not isinstance(section, dict) or set(section) - _OTHER_ATTACK_KEYS:
            raise ConfigError(f"{where}: a section holds `attack` (the spec its findings were measured on), `cells`, `rows`"
                              " and `doc` (where the docs explain its findings)")
        spec, cells, rows = section.get("attack"), section.get("cells", {}), section.get("rows", {})
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"{where}: `attack` must be a table naming the attack (name = ...) and its whole spec")
        try:  # the whole spec, as the attack's Results record it (less the seed): a partial one would match other models
            full = AttackSpec(**spec).to_dict()
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}: attack: {e}") from None
        full.pop("seed")
        if spec != full:
            raise ConfigError(f"{where}: attack must state the whole spec the findings were measured on: {full}")
        if all(spec.get(k) == v for k, v in meta_attack.items()):
            raise ConfigError(f"{where}: its attack is meta.attack's (which wins); declare those findings in [cells]")
        if not isinstance(cells, dict):
            raise ConfigError(f"{where}: `cells` must be a table")
        check_entries(f"{where}.cells", cells, CELL_KEYS, _check_cell, spec.get("target"))
        if not isinstance(rows, dict):
            raise ConfigError(f"{where}: `rows` must be a table")
        check_entries(f"{where}.rows", rows, ROW_KEYS, _check_row, None)
        for rid, entry in rows.items():  # its backdoored models, counted; clean models are [rows]' whatever the attack
            if not measured_rows.is_measured(entry) or set(entry) & {"clean", *ROW_BOUNDS, "max_invalid_rate"}:
                raise ConfigError(f"{where}.rows.{rid!r}: an attack's row counts its backdoored models"
                                  " (seeds = [...], backdoored = {...}); its clean models are judged by [rows]")
        for key, entry in cells.items():
            if "outcome" in entry and row_of(key) in rows:
                raise ConfigError(f"{where}.cells.{key!r}: its row is measured over models and judges it; drop the entry")
        doc = section.get("doc", OTHER_ATTACKS_DOC)
        if not (isinstance(doc, str) and doc.startswith("docs/")):
            raise ConfigError(f"{where}: doc must name a page under docs/ (and an anchor), got {doc!r}")
        out[name] = {"attack": dict(spec), "cells": dict(cells), "rows": dict(rows), "doc": doc}
    return out

def is_fraction(v: Any) -> bool:
    """A finite number in [0, 1]; a bool is not a number here (TOML's true is not 1)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1

def _check_why(where: str, entry: dict[str, Any], what: str = "a declared finding") -> None:
    why = entry.get("why")
    if not isinstance(why, str) or not why.strip():
        raise ConfigError(f"{where}: {what} needs a `why` pointing to its figures")
    if why.startswith(PROPOSED):
        raise ConfigError(f"{where}: the finding proposed by --qbd-accept still needs its `why` written (figures, where)")

def _check_cell(where: str, key: str, entry: dict[str, Any]) -> None:
    for name in ("why", "note"):
        if name in entry and not isinstance(entry[name], str):
            raise ConfigError(f"{where}: {name} must be a string")
    if "paper" in entry and entry["paper"] not in ("detected", "clean"):
        raise ConfigError(f"{where}: paper must be 'detected' or 'clean' (the paper's Table 1 mark), got {entry['paper']!r}")
    o = entry.get("outcome")
    if o is None:
        extra = sorted(set(entry) & {"reason_code", "target", "why"})
        if extra:
            raise ConfigError(f"{where}: {', '.join(extra)} without an `outcome`: a finding states the outcome it declares")
        return
    if o == "pass":
        raise ConfigError(f"{where}: outcome 'pass' is the truth: cells that match it need no entry")
    if o not in FINDING_OUTCOMES:
        raise ConfigError(f"{where}: outcome must be one of {FINDING_OUTCOMES}, got {o!r}")
    _check_why(where, entry)
    clean_cell = ":clean/" in key
    if o == "false-alarm" and not clean_cell:
        raise ConfigError(f"{where}: a false alarm can only happen on a clean model's cell (<dataset>:clean/...)")
    if o in ("miss", "wrong-target") and clean_cell:
        raise ConfigError(f"{where}: a clean model has no backdoor to {'miss' if o == 'miss' else 'name'}")
    margin = entry.get("margin")
    if o == "borderline":
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin <= 0:
            raise ConfigError(f"{where}: a borderline finding states its margin (a number > 0): how far from the threshold the"
                              f" score may be, got {margin!r}")
        if "target" in entry or "reason_code" in entry:
            raise ConfigError(f"{where}: a borderline finding accepts the truth or a miss / false alarm: no target or reason_code")
    elif margin is not None:
        raise ConfigError(f"{where}: margin belongs to a borderline finding, not to {o!r}")
    code = entry.get("reason_code")
    if o == "invalid":
        if not isinstance(code, str) or code not in REASON_CODES:
            raise ConfigError(f"{where}: an invalid finding pins its reason_code, one of {sorted(REASON_CODES)}; got {code!r}")
        if code in NEVER_EXPECTED:
            raise ConfigError(f"{where}: reason_code {code!r} is never an expected outcome: a crash or a timeout fails its cell")
    elif code is not None:
        raise ConfigError(f"{where}: reason_code belongs to an invalid finding, not to {o!r}")
    if "target" in entry:
        t = entry["target"]
        if o != "wrong-target":
            raise ConfigError(f"{where}: target pins the class a wrong-target finding names; not for {o!r}")
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ConfigError(f"{where}: target must be a class index >= 0")

def _check_attack(where: str, key: str, entry: dict[str, Any]) -> None:
    for name in (*_BOUNDS, "paper_clean_acc", "paper_asr"):
        v = entry.get(name)
        if v is not None and not is_fraction(v):
            raise ConfigError(f"{where}: {name} must be a fraction in [0, 1], got {v!r}")
    for kind in ("clean_acc", "asr"):
        if entry.get(f"min_{kind}", 0) > entry.get(f"max_{kind}", 1):
            raise ConfigError(f"{where}: min_{kind} > max_{kind}")
    for name in ("why", "note"):
        if name in entry and not isinstance(entry[name], str):
            raise ConfigError(f"{where}: {name} must be a string")
    if any(b in entry for b in _BOUNDS):
        _check_why(where, entry)

def _check_audit(where: str, key: str, entry: dict[str, Any]) -> None:
    for name in ("input_gradient", "surrogate_gradient"):
        if name in entry and not isinstance(entry[name], bool):
            raise ConfigError(f"{where}: {name} must be true or false")
    for name in ("min_quantized_fraction", "max_quantized_fraction"):
        v = entry.get(name)
        if v is not None and not is_fraction(v):
            raise ConfigError(f"{where}: {name} must be a fraction in [0, 1], got {v!r}")
    if entry.get("min_quantized_fraction", 0) > entry.get("max_quantized_fraction", 1):
        raise ConfigError(f"{where}: min_quantized_fraction > max_quantized_fraction")
    if "note" in entry and not isinstance(entry["note"], str):
        raise ConfigError(f"{where}: note must be a string")

def _check_row(where: str, key: str, entry: dict[str, Any]) -> None:
    try:  # dataset/scheme/defense[protocol]: a row id never carries ":clean" (it covers both kinds of model)
        cell = Cell.parse(key)
    except ValueError:
        cell = None
    if cell is None or cell.control != "backdoored":
        hint = " (a row covers the backdoored and the clean models: no ':clean')" if ":clean/" in key else ""
        raise ConfigError(f"{where}: not a row id: expected dataset/scheme/defense[protocol]{hint}")
    if cell.protocol not in PROTOCOLS:
        raise ConfigError(f"{where}: unknown protocol {cell.protocol!r}; valid: {', '.join(PROTOCOLS)}")
    for name in (*ROW_BOUNDS, "max_invalid_rate"):
        if name in entry and not is_fraction(entry[name]):
            raise ConfigError(f"{where}: {name} must be a number in [0, 1], got {entry[name]!r}")
    if measured_rows.is_measured(entry):
        mixed = sorted(set(entry) & {*ROW_BOUNDS, "max_invalid_rate"})
        if mixed:
            raise ConfigError(f"{where}: a measured row's bounds follow from its counts (qbd.measured_rows); drop {', '.join(mixed)}")
        bad = measured_rows.problems(entry)
        if bad:
            raise ConfigError(f"{where}: " + "; ".join(bad))
        if "why" in entry and not isinstance(entry["why"], str):
            raise ConfigError(f"{where}: why must be a string")
        if not measured_rows.all_truth(entry):
            _check_why(where, entry, "a row whose models do not all match their truth")
        return
    seeds = entry.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and len(seeds) >= 2 and len(set(seeds)) == len(seeds)
                                  and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)):
        raise ConfigError(f"{where}: seeds must be a list of at least two distinct model seeds >= 0, got {seeds!r}")
    if not any(name in entry for name in ROW_BOUNDS):
        raise ConfigError(f"{where}: states no bound; give any of {', '.join(ROW_BOUNDS)}")
    for kind in ("detection_rate", "false_alarm_rate"):
        if entry.get(f"min_{kind}", 0) > entry.get(f"max_{kind}", 1):
            raise ConfigError(f"{where}: min_{kind} > max_{kind}")
    if "note" in entry and not isinstance(entry["note"], str):
        raise ConfigError(f"{where}: note must be a string")
    if "why" in entry and not isinstance(entry["why"], str):
        raise ConfigError(f"{where}: why must be a string")
    _check_why(where, entry, "a row bound")

CHECKS = {"cells": _check_cell, "attack": _check_attack, "audit": _check_audit, "rows": _check_row}
