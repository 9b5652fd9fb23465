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

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qbd import measured_rows
from qbd.attacks import conditioned
from qbd.config import QC_ENGINES, QC_GATES
from qbd.errors import ConfigError
from qbd.expectations_format import (
    ATTACK_KEYS,
    AUDIT_KEYS,
    CELL_KEYS,
    CHECKS,
    META_KEYS,
    ROW_BOUNDS,
    ROW_KEYS,
    TABLES,
    check_entries,
    is_fraction,
    load_other_attacks,
    row_of,
)
from qbd.outcomes import Judgement, judge, outcome, split, verdict_word
from qbd.reason_codes import NEVER_EXPECTED

DEFAULT_ATTACK = {"name": "badnet", "target": 0, "trigger_pattern": "white", "trigger_size": 3,
                  "trigger_position": "bottom-right", "poison_rate": 0.1}


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
    extends: bool = True  # [meta] extends: an author's table adds to the shipped one (qbd.expectations_layers)
    layers: tuple[Path, ...] = ()  # the files this table was read from, the shipped one first

    @property
    def source(self) -> str:
        """The files, for messages: "qbd/expected/smoke.toml + my.toml"; "the truth alone" for none."""
        files = self.layers or ((self.path,) if self.path else ())
        return " + ".join(str(f) for f in files) or "the truth alone (no table shipped for this tier)"

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
            return self._judge_by_rates(result, self.row_entry(row_of(result["cell"]), result.get("attack")) or {})
        entry = self.measured_row(result)
        if entry is not None:
            return self._judge_by_row(result, entry)
        return judge(result, self.finding(result))

    def measured_row(self, result: dict[str, Any]) -> dict[str, Any] | None:
        """The measured row (qbd.measured_rows) that judges this Result's cell, if the table has
        one and the Result's model carries the attack it was measured on."""
        entry = self.row_entry(row_of(result["cell"]), result.get("attack"))
        return entry if measured_rows.is_measured(entry) and measured_rows.kind_of(result) in entry else None

    def _judge_by_row(self, result: dict[str, Any], entry: dict[str, Any]) -> Judgement:
        """The single-seed rule (qbd.measured_rows): the outcome must be one the row measured."""
        measured = outcome(result)
        truth = judge(result, None)
        kind = measured_rows.kind_of(result)
        counts = measured_rows.describe(entry.get(kind))
        expected = f"an outcome row {row_of(result['cell'])} measured on its {kind} models ({counts})"
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
        if attack is not None and conditioned(str(attack.get("name"))):
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

    def check_audit(self, key: str, audit: dict[str, Any], surrogate_gradient: bool, builtin: bool = True) -> list[str]:
        """`builtin`: a scheme qbd ships, whose audit its table must state; a third-party scheme the
        table does not name is held to its own claim (`differentiable`) instead."""
        exp = self.audit.get(key)
        if exp is None and not builtin:
            exp = {"input_gradient": audit["differentiable"]}
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
    unknown_meta = set(meta) - META_KEYS
    if unknown_meta:
        raise ConfigError(f"{p}: meta: unknown key(s) {sorted(unknown_meta)}; valid: {sorted(META_KEYS)}")
    unknown_top = set(raw) - {"meta", "attacks", *TABLES}
    if unknown_top:
        raise ConfigError(f"{p}: unknown table(s) {sorted(unknown_top)}; valid: meta, attacks, {', '.join(TABLES)}")
    for name in ("min_clean_acc", "min_asr"):
        if name in meta and not is_fraction(meta[name]):
            raise ConfigError(f"{p}: meta.{name} must be a number in [0, 1], got {meta[name]!r}")
    attack = meta.get("attack", DEFAULT_ATTACK)
    if not isinstance(attack, dict) or not attack:
        raise ConfigError(f"{p}: meta.attack must be a table naming the attack the findings were measured on")
    tier = meta.get("tier", "smoke")
    if not isinstance(tier, str):
        raise ConfigError(f"{p}: meta.tier must be a string")
    extends = meta.get("extends", True)
    if not isinstance(extends, bool):
        raise ConfigError(f"{p}: meta.extends must be true or false, got {extends!r}")
    e = Expectations(path=p, tier=tier, min_clean_acc=float(meta.get("min_clean_acc", 0.85)),
                     min_asr=float(meta.get("min_asr", 0.9)), attack_spec=dict(attack), extends=extends, layers=(p,))
    for table, allowed in (("cells", CELL_KEYS), ("attack", ATTACK_KEYS), ("audit", AUDIT_KEYS), ("rows", ROW_KEYS)):
        entries = raw.get(table, {})
        if not isinstance(entries, dict):
            raise ConfigError(f"{p}: [{table}] must be a table")
        check_entries(f"{p}: {table}", entries, allowed, CHECKS[table], e.attack_spec.get("target") if table == "cells" else None)
        setattr(e, table, dict(entries))
    e.attacks = load_other_attacks(p, raw.get("attacks", {}), e.attack_spec)
    for key, entry in e.cells.items():  # one source of truth per cell
        rid = row_of(key)
        if "outcome" in entry and measured_rows.is_measured(e.rows.get(rid)):
            raise ConfigError(f"{p}: cells.{key!r}: its row {rid!r} is measured over models and judges it; drop the entry")
    return e


def load_for(tier: str, path: str | Path | None = None) -> Expectations:
    """The table qbd ships for the tier (none shipped: the truth alone), with `path`'s on top of
    it (qbd.expectations_layers) unless that one says `extends = false`."""
    base = shipped(tier)
    if path is None:
        return load(base) if base.exists() else Expectations(path=None, tier=tier)
    p = Path(path)
    top = load(p)
    if not top.extends or not base.exists() or p.resolve() == base.resolve():
        return top
    from qbd.expectations_layers import layer

    return layer(load(base), top)


def _row_attacks(results: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """Row id -> the attack its backdoored models carry (None for a row of clean models only)."""
    from qbd.rates import row_id

    attack: dict[str, dict[str, Any] | None] = {}
    for r in results:  # a row's clean models carry no attack: take its backdoored models'
        if attack.get(row_id(r)) is None:
            attack[row_id(r)] = r.get("attack")
    return attack


