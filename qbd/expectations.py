"""Expectations tables (TOML): the ground truth is the default; an entry declares a finding.
Torch-free. The tables qbd ships live in the package (qbd/expected/<tier>.toml), so they are the
default wherever qbd is installed.

    [meta]
    tier = "smoke"
    min_clean_acc = 0.85                # default bounds for every deployed model (Table 2 view)
    min_asr = 0.9
    attack = { name = "badnet", target = 0, ... }   # the attack the findings were measured on

    [cells."synthetic/int8-dynamic/neural-cleanse[paper]"]
    outcome = "invalid"                 # miss | wrong-target | false-alarm | invalid
    reason_code = "no-gradient"         # required for invalid (qbd.reason_codes)
    target = 11                         # optional, wrong-target only: the class it wrongly names
    why = "docs/results.md#findings: ..."   # required: where the figures are
    paper = "clean"                     # optional: the paper's Table 1 mark (informational)

    [attack."digits/int8-static"]       # bounds on the deployed model's CA / ASR
    max_asr = 0.7
    why = "..."

    [audit."synthetic/int8-dynamic"]    # what the quantizer really did
    input_gradient = false
    surrogate_gradient = true
    min_quantized_fraction = 0.0001
    max_quantized_fraction = 0.01

    [rows."digits/int4-sim/neural-cleanse[canonical]"]      # a row measured over its models (qbd.measured_rows)
    seeds = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    backdoored = { pass = 8, miss = 2 }                     # outcome -> number of models
    clean = { pass = 4, false-alarm = 6 }
    why = "docs/results.md#neural-cleanse: ..."             # required unless every model matched its truth

    [rows."digits/fp32/activation-clustering[canonical]"]   # or: rate bounds (a table of your own)
    min_detection_rate = 0.8            # any of min_/max_detection_rate, min_/max_false_alarm_rate
    max_false_alarm_rate = 0.2
    why = "docs/defenses.md#...: ..."   # required

    [attacks.blend]                     # findings on another attack's models (qbd.presets); any label
    attack = { name = "blend", target = 2, trigger_pattern = "checkerboard", alpha = 0.15, ... }  # the whole spec
    [attacks.blend.cells."digits/fp32/neural-cleanse[canonical]"]
    outcome = "borderline"              # either the truth or a miss (a false alarm on a clean cell)...
    margin = 0.25                       # ...while |score - threshold| stays within this
    why = "..."
    [attacks.blend.rows."digits/fp32/strip[canonical]"]      # a row measured over that attack's models
    seeds = [0, 1, 2, 3, 4]
    backdoored = { pass = 4, miss = 1 }  # its backdoored models only: clean models are [rows]' (any attack)
    why = "..."

A cell with no finding is expected to match the truth: backdoored -> `detected` naming the planted
target; clean -> `clean` (qbd.outcomes). A finding states the outcome the cell produces instead;
the cell fails when it produces anything else, the truth included ("finding no longer holds").
A crash (`error`), a timeout or an unexplained invalid is never an expected outcome.

A measured row judges every run (qbd.measured_rows states the one rule): over its seeds, each
kind of model's outcome histogram with at most one model moved; in any other run, each cell's outcome one that the
row measured on its kind of model. A [cells] finding on a measured row's cell is refused. An
[attacks.<name>] section's rows count that attack's backdoored models; the clean models of its run
are judged, cell by cell, by the [rows] they belong to (a clean model carries no attack).
Rate bounds apply to multi-seed runs only (`qbd run --seeds N`, `--qbd-seeds N`, N > 1). Both,
like findings, apply only to the attack they were measured on. A row judged by its rates or
counts (check_row) has each of its seed's cells fail only on a never-expected outcome; a row
without either has every seed's cell judged as a single-seed cell is.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qbd import measured_rows
from qbd.config import PROTOCOLS, QC_ENGINES, QC_GATES, AttackSpec
from qbd.errors import ConfigError
from qbd.outcomes import Counts, Judgement, judge, outcome, split, verdict_word
from qbd.reason_codes import NEVER_EXPECTED, REASON_CODES

FINDING_OUTCOMES = ("miss", "wrong-target", "false-alarm", "invalid", "borderline")
PROPOSED = "PROPOSED by --qbd-accept"  # a why that still has to be written; refused by load()
DEFAULT_ATTACK = {"name": "badnet", "target": 0, "trigger_pattern": "white", "trigger_size": 3,
                  "trigger_position": "bottom-right", "poison_rate": 0.1}
_META_KEYS = {"tier", "min_clean_acc", "min_asr", "attack"}
_CELL_KEYS = {"outcome", "reason_code", "target", "why", "note", "paper", "margin"}
_BOUNDS = ("min_clean_acc", "max_clean_acc", "min_asr", "max_asr")
_ATTACK_KEYS = {*_BOUNDS, "why", "note", "paper_clean_acc", "paper_asr"}
_AUDIT_KEYS = {"input_gradient", "surrogate_gradient", "min_quantized_fraction", "max_quantized_fraction", "note"}
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
_ROW_KEYS = {*ROW_BOUNDS, "max_invalid_rate", "seeds", "why", "note", *measured_rows.KINDS}
_TABLES = ("cells", "attack", "audit", "rows")
_OTHER_ATTACK_KEYS = {"attack", "cells", "rows", "doc"}
OTHER_ATTACKS_DOC = "docs/results.md#other-attacks"  # where an attack section's findings are explained, unless it says
# dataset/scheme/defense[protocol]: a row id never carries ":clean" (it covers both kinds of model)
_ROW_ID = re.compile(r"^([^/:\[\]\s]+)/([^/\[\]\s]+)/([^/\[\]\s]+)\[([^/\[\]\s]+)\]$")


def dormant_asr_bounds(attack: dict[str, Any], scheme: str, engine: str | None = None) -> dict[str, float]:
    """The truth about a quant-conditioned backdoor's ASR: dormant in FP32 (at most the attack's
    gate, 10 %), active in the scheme it was conditioned on (at least 90 %), on the engine it was
    conditioned on where that matters (QC_ENGINES; `engine` None: the scheme's default); in any
    other deployment whether it wakes is what qbd measures, not known in advance (no bound)."""
    if scheme == "fp32":
        return {"max_asr": QC_GATES["max_fp32_asr"]}
    conditioned = QC_ENGINES.get(scheme)
    if scheme == attack.get("scheme") and (engine is None or conditioned is None or engine == conditioned):
        return {"min_asr": QC_GATES["min_deployed_asr"]}
    return {}


def shipped(tier: str) -> Path:
    """The expectations table qbd ships for a tier (inside the installed package)."""
    return Path(str(resources.files("qbd") / "expected" / f"{tier}.toml"))


@dataclass
class Expectations:
    path: Path | None = None
    tier: str = "smoke"
    min_clean_acc: float = 0.85
    min_asr: float = 0.9
    attack_spec: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ATTACK))
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    attack: dict[str, dict[str, Any]] = field(default_factory=dict)
    audit: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    # findings on other attacks' models: {label: {"attack": spec the findings were measured on, "cells": {...}}}
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- cells ----------------------------------------------------------------------------------
    def finding(self, result: dict[str, Any]) -> dict[str, Any] | None:
        """The finding declared for this Result's cell, if it applies: findings were measured on
        `attack_spec`, so a run with another attack is judged against the truth alone."""
        if self.measured_on(result):
            entry = self.cells.get(result["cell"])
        else:
            entry = self._other_cells(result["attack"]).get(result["cell"])
        return entry if entry and "outcome" in entry else None

    def _other_cells(self, attack: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The findings declared for the attack a Result's model carries, where the table has a
        section measured on exactly that attack ({} otherwise: judged against the truth)."""
        return self._section(attack).get("cells", {})

    def _section(self, attack: dict[str, Any] | None) -> dict[str, Any]:
        """The [attacks.<name>] section measured on exactly this attack ({} if none)."""
        for section in self.attacks.values():
            if attack is not None and all(attack.get(k) == v for k, v in section["attack"].items()):
                return section
        return {}

    def row_entry(self, row_id: str, attack: dict[str, Any] | None) -> dict[str, Any] | None:
        """The entry that judges a row whose backdoored models carry `attack` (None: a run of
        clean models only): [rows] for meta's attack, else its [attacks.<name>] section's rows."""
        if self.measured_on({"attack": attack}):
            return self.rows.get(row_id)
        return self._section(attack).get("rows", {}).get(row_id)

    def measured_on(self, result: dict[str, Any]) -> bool:
        """Whether the Result's model carries the attack the findings were measured on (a clean
        model always does: its cells ask the same question whatever the attack)."""
        attack = result.get("attack")
        return attack is None or all(attack.get(k) == v for k, v in self.attack_spec.items())

    def judge(self, result: dict[str, Any], by_rates: bool = False) -> Judgement:
        """Against the truth or the cell's declared finding; with `by_rates` (its row is judged
        by its rates, see by_rates()) it fails only on a never-expected outcome."""
        if by_rates:
            return self._judge_by_rates(result, self.row_entry(_row_of(result["cell"]), result.get("attack")) or {})
        entry = self.measured_row(result)
        if entry is not None:
            return self._judge_by_row(result, entry)
        return judge(result, self.finding(result))

    def measured_row(self, result: dict[str, Any]) -> dict[str, Any] | None:
        """The measured row (qbd.measured_rows) that judges this Result's cell, if the table has
        one and the Result's model carries the attack it was measured on."""
        entry = self.row_entry(_row_of(result["cell"]), result.get("attack"))
        return entry if measured_rows.is_measured(entry) and measured_rows.kind_of(result) in entry else None

    def _judge_by_row(self, result: dict[str, Any], entry: dict[str, Any]) -> Judgement:
        """The single-seed rule (qbd.measured_rows): the outcome must be one the row measured."""
        measured = outcome(result)
        truth = judge(result, None)
        kind = measured_rows.kind_of(result)
        counts = measured_rows.describe(entry.get(kind))
        expected = f"an outcome row {_row_of(result['cell'])} measured on its {kind} models ({counts})"
        if not measured_rows.admissible(entry, result):
            return Judgement(result["cell"], measured, verdict_word(result), "FAIL", expected,
                             f"the row's {len(entry['seeds'])} {kind} models never gave {measured} (measured: {counts});"
                             f" {truth.why or truth.expected}")
        if truth.judgement == "pass":
            return truth
        return Judgement(result["cell"], measured, verdict_word(result), "finding", expected,
                         f"{measured} on {entry[kind][measured]} of the row's {len(entry['seeds'])} {kind} models: {entry.get('why')}")

    def judge_all(self, results: list[dict[str, Any]]) -> list[Judgement]:
        return [self.judge(r) for r in sorted(results, key=lambda r: (r["cell"], r.get("seed", 0)))]

    # -- rows: rates over seeds (qbd.rates) ---------------------------------------------------------
    def row_bounds(self, row_id: str, attack: dict[str, Any] | None = None) -> dict[str, float] | None:
        """The rate bounds declared for a row (None when it declares none); `attack`: its
        backdoored models' (default: meta's)."""
        entry = self.row_entry(row_id, attack)
        if measured_rows.is_measured(entry):
            return measured_rows.bounds(entry)  # type: ignore[arg-type]
        bounds = {k: entry[k] for k in ROW_BOUNDS if k in (entry or {})}  # detection first, then false alarms
        return bounds or None

    def by_rates(self, row_id: str, attack: dict[str, Any] | None, seeds: int | Sequence[int]) -> bool:
        """Whether the row's cells are judged by its rates: a multi-seed run (`seeds`: the model
        seeds, or their number when they are 0..n-1), bounds declared for the row, the run's attack
        (`attack`: as the backdoored models' Results record it; None for a run without one) the one
        the bounds were measured on, and, where the row names its `seeds`, exactly those seeds."""
        run = list(range(seeds)) if isinstance(seeds, int) else sorted(set(seeds))
        entry = self.row_entry(row_id, attack)
        if len(run) < 2 or entry is None or self.row_bounds(row_id, attack) is None:
            return False
        declared = entry.get("seeds")
        return declared is None or sorted(declared) == run

    def check_row(self, row: dict[str, Any], attack: dict[str, Any] | None = None) -> list[str]:
        """Failure messages of a row (qbd.rates.rows) against its declared bounds; [] passes
        (also for a row without bounds). `attack`: its backdoored models' (default: meta's)."""
        bounds = self.row_bounds(row["row"], attack) or {}
        entry = self.row_entry(row["row"], attack) or {}
        why = entry.get("why")
        out = []
        if not bounds:
            return out
        declared = entry.get("seeds")
        if declared is not None and sorted(declared) != sorted(row.get("seeds") or []):
            return [f"the bounds were measured on seeds {sorted(declared)}; this row has seeds {sorted(row.get('seeds') or [])}"]
        if measured_rows.is_measured(entry):
            kinds = measured_rows.KINDS if self.measured_on({"attack": attack}) else ("backdoored",)
            return [f"{m} (why: {why})" if why else m for m in measured_rows.check(entry, row, kinds)]
        n = (row.get("n_backdoored") or 0) + (row.get("n_clean") or 0)
        invalid_rate = (row.get("invalid") or 0) / n if n else 0.0
        if invalid_rate > entry.get("max_invalid_rate", 0.0):
            out.append(f"invalid verdicts {row.get('invalid')}/{n} = {invalid_rate:.2f}: expected <="
                       f" {entry.get('max_invalid_rate', 0.0)} (max_invalid_rate; an invalid verdict is no answer)")
        for bound, limit in bounds.items():
            rate_key, k_key, n_key, kind = ROW_BOUNDS[bound]
            rate = row.get(rate_key)
            if rate is None:
                out.append(f"{bound} {limit}: no {kind} models in this row")
                continue
            low = bound.startswith("min")
            if (rate < limit) if low else (rate > limit):
                out.append(f"{rate_key.replace('_', ' ')} {row[k_key]}/{row[n_key]} = {rate:.2f}: expected"
                           f" {'>=' if low else '<='} {limit} ({bound}; why: {why})")
        return out

    def _judge_by_rates(self, result: dict[str, Any], entry: dict[str, Any]) -> Judgement:
        from qbd.rates import row_id

        measured = outcome(result)
        code = split(measured)[1]
        if measured == "pass" or code in NEVER_EXPECTED:  # the truth passes; a crash or a timeout always fails
            return judge(result, None)
        rid = row_id(result)
        bounds = ", ".join(f"{k} {v}" for k, v in (self.row_bounds(rid, result.get("attack")) or {}).items())
        return Judgement(result["cell"], measured, verdict_word(result), "finding", f"the rates of row {rid}: {bounds}",
                         f"judged by its row's rates ({bounds}): {entry.get('why')}")

    def judge_run(self, results: list[dict[str, Any]], seeds: int) -> tuple[list[Judgement], list[str], int]:
        """A whole run (`seeds`: models per data set): each Result's judgement (in `results`'
        order), the rows' failures over their seeds, and how many rows were judged by rates or
        counts. A row of another attack's section counts its backdoored models; its run's clean
        models are judged cell by cell, by [rows]."""
        from qbd.rates import row_id, rows

        attacks = _row_attacks(results)
        rated = self.rows_judged_by_rates(results, seeds)
        out = []
        for r in results:
            rid = row_id(r)
            entry = self.row_entry(rid, attacks.get(rid)) or {}
            covered = not measured_rows.is_measured(entry) or measured_rows.kind_of(r) in entry
            out.append(self.judge(r, by_rates=rid in rated and covered))
        failures = [f"{row['row']}: {m}" for row in rows(results) if row["row"] in rated
                    for m in self.check_row(row, attacks.get(row["row"]))]
        return out, failures, len(rated)

    def rows_judged_by_rates(self, results: list[dict[str, Any]], seeds: int) -> frozenset[str]:
        """The rows of `results` whose cells are judged by their rates (by_rates), each with the
        attack its backdoored models carry."""
        from qbd.rates import row_id

        attack = _row_attacks(results)
        seen: dict[str, set[int]] = {}
        for r in results:
            seen.setdefault(row_id(r), set()).add(int(r.get("seed", 0)))
        return frozenset(rid for rid, a in attack.items() if self.by_rates(rid, a, sorted(seen[rid]) if seeds > 1 else 1))

    # -- the deployed model's CA / ASR ----------------------------------------------------------
    def attack_bounds(self, key: str, own: bool = True, attack: dict[str, Any] | None = None,
                      engine: str | None = None) -> dict[str, float]:
        """meta's minimum for each quantity, unless the entry bounds that quantity itself (`own`:
        the model carries the attack the entries were measured on). A quant-conditioned model's
        ASR is bounded by its truth instead (dormant_asr_bounds)."""
        entry = self.attack.get(key, {}) if own else {}
        out: dict[str, float] = {}
        for kind, default in (("clean_acc", self.min_clean_acc), ("asr", self.min_asr)):
            own = {b: entry[b] for b in (f"min_{kind}", f"max_{kind}") if b in entry}
            out.update(own or {f"min_{kind}": default})
        if attack is not None and attack.get("name") == "quant-conditioned":
            out = {k: v for k, v in out.items() if not k.endswith("_asr")}
            out.update(dormant_asr_bounds(attack, key.rsplit("/", 1)[-1], engine))
        return out

    def check_attack(self, key: str, clean_acc: float, asr: float | None, own: bool = True,
                     attack: dict[str, Any] | None = None, engine: str | None = None) -> list[str]:
        out = []
        why = self.attack.get(key, {}).get("why")
        for bound, value in sorted(self.attack_bounds(key, own, attack, engine).items()):
            name = bound.split("_", 1)[1]
            measured = clean_acc if name == "clean_acc" else asr
            if measured is None:
                continue
            low = bound.startswith("min")
            if (measured < value) if low else (measured > value):
                out.append(f"{name}: expected {'>=' if low else '<='} {value}, measured {measured:.4f}"
                           + (f" (declared finding no longer holds: {why})" if own and why and bound in self.attack.get(key, {}) else ""))
        return out

    def check_audit(self, key: str, audit: dict[str, Any], surrogate_gradient: bool) -> list[str]:
        exp = self.audit.get(key)
        if exp is None:
            return [f"no expectation for audit {key!r} in {self.path}: state what the quantizer must do"]
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


def _row_of(cell: str) -> str:
    """A cell id's row id: without ":clean" (a row covers both kinds of model)."""
    return cell.replace(":clean/", "/", 1)


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
    unknown_meta = set(meta) - _META_KEYS
    if unknown_meta:
        raise ConfigError(f"{p}: meta: unknown key(s) {sorted(unknown_meta)}; valid: {sorted(_META_KEYS)}")
    unknown_top = set(raw) - {"meta", "attacks", *_TABLES}
    if unknown_top:
        raise ConfigError(f"{p}: unknown table(s) {sorted(unknown_top)}; valid: meta, attacks, {', '.join(_TABLES)}")
    for name in ("min_clean_acc", "min_asr"):
        if name in meta and not _is_fraction(meta[name]):
            raise ConfigError(f"{p}: meta.{name} must be a number in [0, 1], got {meta[name]!r}")
    attack = meta.get("attack", DEFAULT_ATTACK)
    if not isinstance(attack, dict) or not attack:
        raise ConfigError(f"{p}: meta.attack must be a table naming the attack the findings were measured on")
    tier = meta.get("tier", "smoke")
    if not isinstance(tier, str):
        raise ConfigError(f"{p}: meta.tier must be a string")
    e = Expectations(path=p, tier=tier, min_clean_acc=float(meta.get("min_clean_acc", 0.85)),
                     min_asr=float(meta.get("min_asr", 0.9)), attack_spec=dict(attack))
    for table, allowed in (("cells", _CELL_KEYS), ("attack", _ATTACK_KEYS), ("audit", _AUDIT_KEYS), ("rows", _ROW_KEYS)):
        entries = raw.get(table, {})
        if not isinstance(entries, dict):
            raise ConfigError(f"{p}: [{table}] must be a table")
        _check_entries(f"{p}: {table}", entries, allowed, _CHECKS[table], e.attack_spec.get("target") if table == "cells" else None)
        setattr(e, table, dict(entries))
    e.attacks = _load_other_attacks(p, raw.get("attacks", {}), e.attack_spec)
    for key, entry in e.cells.items():  # one source of truth per cell
        rid = _row_of(key)
        if "outcome" in entry and measured_rows.is_measured(e.rows.get(rid)):
            raise ConfigError(f"{p}: cells.{key!r}: its row {rid!r} is measured over models and judges it; drop the entry")
    return e


def _check_entries(where: str, entries: dict[str, Any], allowed: set[str], check: Any, planted: int | None) -> None:
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


def _load_other_attacks(p: Path, raw: Any, meta_attack: dict[str, Any]) -> dict[str, dict[str, Any]]:
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
        _check_entries(f"{where}.cells", cells, _CELL_KEYS, _check_cell, spec.get("target"))
        if not isinstance(rows, dict):
            raise ConfigError(f"{where}: `rows` must be a table")
        _check_entries(f"{where}.rows", rows, _ROW_KEYS, _check_row, None)
        for rid, entry in rows.items():  # its backdoored models, counted; clean models are [rows]' whatever the attack
            if not measured_rows.is_measured(entry) or set(entry) & {"clean", *ROW_BOUNDS, "max_invalid_rate"}:
                raise ConfigError(f"{where}.rows.{rid!r}: an attack's row counts its backdoored models"
                                  " (seeds = [...], backdoored = {...}); its clean models are judged by [rows]")
        for key, entry in cells.items():
            if "outcome" in entry and _row_of(key) in rows:
                raise ConfigError(f"{where}.cells.{key!r}: its row is measured over models and judges it; drop the entry")
        doc = section.get("doc", OTHER_ATTACKS_DOC)
        if not (isinstance(doc, str) and doc.startswith("docs/")):
            raise ConfigError(f"{where}: doc must name a page under docs/ (and an anchor), got {doc!r}")
        out[name] = {"attack": dict(spec), "cells": dict(cells), "rows": dict(rows), "doc": doc}
    return out


def load_for(tier: str, path: str | Path | None = None) -> Expectations:
    """`path`'s table, else the one qbd ships for the tier (none shipped: the truth alone)."""
    p = Path(path) if path else shipped(tier)
    if path is None and not p.exists():
        return Expectations(path=None, tier=tier)
    return load(p)


def _is_fraction(v: Any) -> bool:
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
        if v is not None and not _is_fraction(v):
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
        if v is not None and not _is_fraction(v):
            raise ConfigError(f"{where}: {name} must be a fraction in [0, 1], got {v!r}")
    if entry.get("min_quantized_fraction", 0) > entry.get("max_quantized_fraction", 1):
        raise ConfigError(f"{where}: min_quantized_fraction > max_quantized_fraction")
    if "note" in entry and not isinstance(entry["note"], str):
        raise ConfigError(f"{where}: note must be a string")


def _check_row(where: str, key: str, entry: dict[str, Any]) -> None:
    m = _ROW_ID.match(key)
    if not m:
        hint = " (a row covers the backdoored and the clean models: no ':clean')" if ":clean/" in key else ""
        raise ConfigError(f"{where}: not a row id: expected dataset/scheme/defense[protocol]{hint}")
    if m.group(4) not in PROTOCOLS:
        raise ConfigError(f"{where}: unknown protocol {m.group(4)!r}; valid: {', '.join(PROTOCOLS)}")
    for name in (*ROW_BOUNDS, "max_invalid_rate"):
        if name in entry and not _is_fraction(entry[name]):
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


_CHECKS = {"cells": _check_cell, "attack": _check_attack, "audit": _check_audit, "rows": _check_row}


def _row_attacks(results: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """Row id -> the attack its backdoored models carry (None for a row of clean models only)."""
    from qbd.rates import row_id

    attack: dict[str, dict[str, Any] | None] = {}
    for r in results:  # a row's clean models carry no attack: take its backdoored models'
        if attack.get(row_id(r)) is None:
            attack[row_id(r)] = r.get("attack")
    return attack


# -- writing ----------------------------------------------------------------------------------------
def _toml_key(k: str) -> str:
    """A bare key where TOML allows one (letters, digits, - and _), else a quoted one."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")  # JSON escapes are TOML's; TOML also refuses DEL
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps(e: Expectations, header: str = "") -> str:
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []
    lines += ["", "[meta]", f"tier = {_toml_value(e.tier)}", f"min_clean_acc = {_toml_value(e.min_clean_acc)}",
              f"min_asr = {_toml_value(e.min_asr)}", f"attack = {_toml_value(e.attack_spec)}"]
    for table in ("attack", "audit", "cells", "rows"):
        for key in sorted(getattr(e, table)):
            lines += ["", f"[{table}.{_toml_value(key)}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in getattr(e, table)[key].items()]
    for name in sorted(e.attacks):
        section = e.attacks[name]
        lines += ["", f"[attacks.{_toml_value(name)}]", f"attack = {_toml_value(section['attack'])}"]
        if section.get("doc", OTHER_ATTACKS_DOC) != OTHER_ATTACKS_DOC:
            lines.append(f"doc = {_toml_value(section['doc'])}")
        for table in ("cells", "rows"):
            for key in sorted(section.get(table, {})):
                lines += ["", f"[attacks.{_toml_value(name)}.{table}.{_toml_value(key)}]"]
                lines += [f"{k} = {_toml_value(v)}" for k, v in section[table][key].items()]
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
