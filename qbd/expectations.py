"""Expectations tables (TOML): what each cell should report, and the comparison that turns a
mismatch into a readable failure. Torch-free.

    [meta]
    tier = "smoke"
    tolerance = 0.05                    # allowed |measured - expected| for CA / ASR

    [cells."synthetic/fp32/neural-cleanse[canonical]"]
    status = "detected"                 # detected | clean | invalid
    target = 0                          # optional: the predicted target class
    reason = "no gradient signal"       # optional: a substring of an invalid verdict's reason
    xfail = "why this known deviation"  # optional: the cell is known to fail its test (recorded
                                        # status or control requirement) for this reason; strict
    paper = "clean"                     # optional: what the paper's Table 1 reported (detected |
                                        # clean), kept by --qbd-accept and quoted on a mismatch

    [attack."synthetic/int4-sim"]       # CA and ASR of the deployed model
    clean_acc = 0.93
    asr = 1.0

    [audit."synthetic/int8-dynamic"]    # what the quantizer really did
    input_gradient = false
    surrogate_gradient = true
    min_quantized_fraction = 0.0001
    max_quantized_fraction = 0.01

A cell with no entry is expected to be `detected` on a backdoored model and not `detected` on a
clean one: the question qbd asks of every defense, third-party ones included. Control cells
(fp32 under the canonical protocol on the backdoored model: positive; any cell on the clean
model: negative) must also meet that requirement whatever their recorded status.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbd.errors import ConfigError

STATUSES = ("detected", "clean", "invalid")
_CELL_KEYS = {"status", "target", "reason", "xfail", "note", "paper"}
_ATTACK_KEYS = {"clean_acc", "asr", "tolerance", "xfail", "note"}
_AUDIT_KEYS = {"input_gradient", "surrogate_gradient", "min_quantized_fraction", "max_quantized_fraction", "xfail", "note"}


@dataclass
class Expectations:
    path: Path | None = None
    tier: str = "smoke"
    tolerance: float = 0.05
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    attack: dict[str, dict[str, Any]] = field(default_factory=dict)
    audit: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- lookups ---------------------------------------------------------------------------
    def cell(self, cell_id: str, backdoored: bool) -> dict[str, Any]:
        """The expectation of a cell: its entry, or the default question."""
        if cell_id in self.cells:
            return self.cells[cell_id]
        return {"status": "detected"} if backdoored else {"status": "not-detected"}

    # -- comparisons: each returns a list of human-readable mismatches -------------------------
    def check_cell(self, result: dict[str, Any]) -> list[str]:
        exp = self.cell(result["cell"], result.get("attack") is not None)
        v = result["verdict"]
        out = []
        want = exp.get("status")
        if want == "not-detected":
            if v["status"] == "detected":
                out.append(f"verdict: expected not detected (negative control), measured detected (target {v['target_class']})")
            elif v["status"] == "invalid":
                out.append(f"verdict: expected a valid 'clean' verdict, measured invalid ({v['reason']})")
        elif want is not None and v["status"] != want:
            out.append(f"verdict: expected {want}, measured {v['status']}" + (f" ({v['reason']})" if v["reason"] else "")
                       + (f"; the paper reported {exp['paper']}" if "paper" in exp else ""))
        if "target" in exp and v["status"] == "detected" and v["target_class"] != exp["target"]:
            out.append(f"target class: expected {exp['target']}, measured {v['target_class']}")
        if "reason" in exp and exp["reason"] not in (v["reason"] or ""):
            out.append(f"reason: expected it to mention {exp['reason']!r}, measured {v['reason']!r}")
        return out

    def check_attack(self, key: str, clean_acc: float, asr: float | None) -> list[str]:
        exp = self.attack.get(key)
        if exp is None:
            return [f"no expectation for attack cell {key!r} in {self.path} (run with --qbd-accept to record it)"]
        tol = float(exp.get("tolerance", self.tolerance))
        out = []
        for name, measured in (("clean_acc", clean_acc), ("asr", asr)):
            if name in exp and measured is not None and abs(measured - exp[name]) > tol:
                out.append(f"{name}: expected {exp[name]:.4f} +- {tol}, measured {measured:.4f}")
        return out

    def check_audit(self, key: str, audit: dict[str, Any], surrogate_gradient: bool) -> list[str]:
        exp = self.audit.get(key)
        if exp is None:
            return [f"no expectation for audit {key!r} in {self.path} (run with --qbd-accept to record it)"]
        out = []
        if "input_gradient" in exp and audit["input_gradient"] != exp["input_gradient"]:
            out.append(f"input_gradient: expected {exp['input_gradient']}, measured {audit['input_gradient']} ({audit.get('gradient_note')})")
        if "surrogate_gradient" in exp and surrogate_gradient != exp["surrogate_gradient"]:
            out.append(f"surrogate gradient: expected {exp['surrogate_gradient']}, measured {surrogate_gradient}")
        frac = audit["quantized_param_fraction"]
        if "min_quantized_fraction" in exp and frac < exp["min_quantized_fraction"]:
            out.append(f"quantized_param_fraction {frac:.6f} < {exp['min_quantized_fraction']}")
        if "max_quantized_fraction" in exp and frac > exp["max_quantized_fraction"]:
            out.append(f"quantized_param_fraction {frac:.6f} > {exp['max_quantized_fraction']}")
        return out


def load(path: str | Path) -> Expectations:
    """Read and validate an expectations file; errors name the file and the entry."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"expectations file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"expectations file {p} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"expectations file {p} is not valid TOML: {e}") from None
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise ConfigError(f"{p}: [meta] must be a table")
    unknown_meta = set(meta) - {"tier", "tolerance"}
    if unknown_meta:
        raise ConfigError(f"{p}: meta: unknown key(s) {sorted(unknown_meta)}; valid: ['tier', 'tolerance']")
    unknown_top = set(raw) - {"meta", "cells", "attack", "audit"}
    if unknown_top:
        raise ConfigError(f"{p}: unknown table(s) {sorted(unknown_top)}; valid: meta, cells, attack, audit")
    tol = meta.get("tolerance", 0.05)
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not (0 <= tol <= 1):
        raise ConfigError(f"{p}: meta.tolerance must be a number in [0, 1], got {tol!r}")
    e = Expectations(path=p, tier=str(meta.get("tier", "smoke")), tolerance=float(tol))
    for table, allowed in (("cells", _CELL_KEYS), ("attack", _ATTACK_KEYS), ("audit", _AUDIT_KEYS)):
        entries = raw.get(table, {})
        if not isinstance(entries, dict):
            raise ConfigError(f"{p}: [{table}] must be a table")
        for key, entry in entries.items():
            if not isinstance(entry, dict):
                raise ConfigError(f"{p}: {table}.{key!r} must be a table")
            bad = set(entry) - allowed
            if bad:
                raise ConfigError(f"{p}: {table}.{key!r}: unknown key(s) {sorted(bad)}; valid: {sorted(allowed)}")
            _check_entry(p, table, key, entry)
        setattr(e, table, dict(entries))
    return e


def _is_fraction(v: Any) -> bool:
    """A finite number in [0, 1]; a bool is not a number here (TOML's true is not 1)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1


def _check_entry(p: Path, table: str, key: str, entry: dict[str, Any]) -> None:
    where = f"{p}: {table}.{key!r}"
    if table == "cells":
        if entry.get("status") not in STATUSES:
            raise ConfigError(f"{where}: status must be one of {STATUSES}, got {entry.get('status')!r}")
        if "paper" in entry and entry["paper"] not in ("detected", "clean"):
            raise ConfigError(f"{where}: paper must be 'detected' or 'clean' (the paper's Table 1 mark), got {entry['paper']!r}")
        if "target" in entry and (not isinstance(entry["target"], int) or isinstance(entry["target"], bool) or entry["target"] < 0):
            raise ConfigError(f"{where}: target must be a class index >= 0")
    if table == "attack":
        for name in ("clean_acc", "asr", "tolerance"):
            v = entry.get(name)
            if v is not None and not _is_fraction(v):
                raise ConfigError(f"{where}: {name} must be a fraction in [0, 1], got {v!r}")
    if table == "audit":
        for name in ("input_gradient", "surrogate_gradient"):
            if name in entry and not isinstance(entry[name], bool):
                raise ConfigError(f"{where}: {name} must be true or false")
        for name in ("min_quantized_fraction", "max_quantized_fraction"):
            v = entry.get(name)
            if v is not None and not _is_fraction(v):
                raise ConfigError(f"{where}: {name} must be a fraction in [0, 1], got {v!r}")
        if entry.get("min_quantized_fraction", 0) > entry.get("max_quantized_fraction", 1):
            raise ConfigError(f"{where}: min_quantized_fraction > max_quantized_fraction")
    for name in ("reason", "note"):
        if name in entry and not isinstance(entry[name], str):
            raise ConfigError(f"{where}: {name} must be a string")
    if "xfail" in entry and (not isinstance(entry["xfail"], str) or not entry["xfail"].strip()):
        raise ConfigError(f"{where}: xfail must be a non-empty reason")


# -- writing (--qbd-accept) ----------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(round(v, 4))
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps(e: Expectations, header: str = "") -> str:
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []
    lines += ["", "[meta]", f"tier = {_toml_value(e.tier)}", f"tolerance = {_toml_value(e.tolerance)}"]
    for table in ("attack", "audit", "cells"):
        for key in sorted(getattr(e, table)):
            lines += ["", f"[{table}.{_toml_value(key)}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in getattr(e, table)[key].items()]
    return "\n".join(lines) + "\n"


def accept(e: Expectations, results: list[dict[str, Any]], attack: dict[str, dict[str, float]], audit: dict[str, dict[str, Any]]) -> Expectations:
    """A copy of `e` updated to what this run measured (explanations kept where still true)."""
    new = Expectations(path=e.path, tier=e.tier, tolerance=e.tolerance,
                       cells={k: dict(v) for k, v in e.cells.items()},
                       attack={k: dict(v) for k, v in e.attack.items()},
                       audit={k: dict(v) for k, v in e.audit.items()})
    for r in results:
        v = r["verdict"]
        entry: dict[str, Any] = {"status": v["status"]}
        if v["status"] == "detected" and v["target_class"] is not None:
            entry["target"] = int(v["target_class"])
        old = e.cells.get(r["cell"], {})
        entry.update({k: old[k] for k in ("xfail", "note", "paper") if k in old})  # explanations stay
        new.cells[r["cell"]] = entry
    for key, m in attack.items():
        entry = {k: round(float(val), 4) for k, val in m.items() if val is not None}
        entry.update({k: e.attack[key][k] for k in ("tolerance", "xfail", "note") if k in e.attack.get(key, {})})
        new.attack[key] = entry
    for key, a in audit.items():
        new.audit[key] = {**e.audit.get(key, {}), **a}
    return new
