"""Measured rows: what a row's evaluation models did, and the one rule a run is judged by.
Torch-free.

A row (data set, scheme, defense, protocol, on the table's meta attack) is declared by the
outcomes (qbd.outcomes) its pinned evaluation models measured, counted per kind of model:

    [rows."digits/int4-sim/neural-cleanse[canonical]"]
    seeds = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    backdoored = { pass = 9, "wrong-target" = 1 }     # outcome -> number of backdoored models
    clean = { pass = 7, "false-alarm" = 3 }            # outcome -> number of clean models
    why = "..."    # required unless every model matched its truth (a finding: where its figures are)

The rule, stated once (TOLERANCE):

- **Over the row's seeds** (`qbd run --seeds 10`, `--qbd-seeds 10`): each kind of model's whole
  outcome histogram (pass, miss, wrong-target, false-alarm, invalid by reason code) must be
  reachable from the measured one by moving at most TOLERANCE model. The models are pinned, so a
  rerun sees the same weights; only a defense's own float arithmetic differs between CPU families
  and thread counts, enough to move a model whose statistic sits on its threshold. One model is
  an assumption, measured so far on one CPU family only (the Intel Xeon the rows were measured
  on): two detections lost, two false alarms gained, two models' reason codes changed, or a miss
  and a wrong target swapped on two models fail the row.
- **Any other run** (one seed, or a subset of the seeds): each cell is judged by its row: its
  outcome must be one the row measured on that kind of model (a backdoored model of a row that
  detected 10 of 10 must be detected naming the target; one of a row that missed 3 of 10 may
  miss). A single seed shows a regression to an outcome the row never produced; it cannot show a
  change in a rate, which needs the row's models.

A crash, a timeout or an unexplained invalid verdict (qbd.reason_codes.NEVER_EXPECTED) is never
a measured outcome and always fails its cell.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from qbd.outcomes import outcome, split
from qbd.reason_codes import NEVER_EXPECTED, REASON_CODES

TOLERANCE = 1  # models: how far a rerun's count may lie from the measured one (module docstring)
KINDS = ("backdoored", "clean")
# the outcomes each kind of model can have, besides "invalid:<reason_code>"
OUTCOMES = {"backdoored": ("pass", "miss", "wrong-target"), "clean": ("pass", "false-alarm")}


def kind_of(result: dict[str, Any]) -> str:
    return "clean" if result.get("attack") is None else "backdoored"


def measured(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row's entry from its Results: seeds and the outcome counts per kind of model (the
    caller groups Results by row, qbd.rates.row_id)."""
    entry: dict[str, Any] = {"seeds": sorted({int(r.get("seed", 0)) for r in results})}
    for k, counts in outcome_counts(results).items():  # the truth's word first, as a reader looks for it
        entry[k] = dict(sorted(counts.items(), key=lambda kv: (kv[0] != "pass", kv[0])))
    return entry


def is_measured(entry: dict[str, Any] | None) -> bool:
    return bool(entry) and any(k in entry for k in KINDS)  # type: ignore[operator]


def all_truth(entry: dict[str, Any]) -> bool:
    """Whether every model of the row matched its truth (no finding to explain)."""
    return all(set(entry.get(k, {})) <= {"pass"} for k in KINDS)


def totals(counts: dict[str, int] | None, kind: str) -> dict[str, int]:
    """n, the truth's count (detections / false alarms) and the invalid count of one kind."""
    c = counts or {}
    return {"n": sum(c.values()), "flagged": c.get("pass" if kind == "backdoored" else "false-alarm", 0),
            "invalid": sum(v for o, v in c.items() if o.startswith("invalid:"))}


def problems(entry: dict[str, Any]) -> list[str]:
    """What is wrong with a measured row entry (the loader raises on any)."""
    out = []
    seeds = entry.get("seeds")
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        return ["a measured row names the model seeds it was measured on (seeds = [...])"]
    for k in KINDS:
        c = entry.get(k)
        if c is None:
            continue
        if not isinstance(c, dict) or not c:
            out.append(f"{k} must be a table of outcome = number of models")
            continue
        for o, n in c.items():
            kind, code = split(o)
            if kind == "invalid":
                if code not in REASON_CODES:
                    out.append(f"{k}: {o!r}: unknown reason code (valid: {', '.join(sorted(REASON_CODES))})")
                elif code in NEVER_EXPECTED:
                    out.append(f"{k}: {o!r} is never an expected outcome: a crash or a timeout fails its cell")
            elif o not in OUTCOMES[k]:
                out.append(f"{k}: {o!r} is not an outcome of a {k} model; valid: {', '.join(OUTCOMES[k])}, invalid:<code>")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                out.append(f"{k}: {o} = {n!r}: a count of models >= 1")
        if not out and sum(c.values()) != len(seeds):
            out.append(f"{k}: {sum(c.values())} models counted, but {len(seeds)} seeds named")
    return out


def moved(want: dict[str, int] | None, got: dict[str, int] | None) -> int:
    """The fewest models whose outcome must differ to turn one outcome histogram into the other
    (half the L1 distance between equal-sized histograms)."""
    w, g = want or {}, got or {}
    return sum(abs(w.get(o, 0) - g.get(o, 0)) for o in set(w) | set(g)) // 2


def check(entry: dict[str, Any], row: dict[str, Any], kinds: tuple[str, ...] = KINDS) -> list[str]:
    """A run over the row's seeds (qbd.rates.rows' row, with its outcome counts in `outcomes`)
    against the measured entry: failure messages ([] passes). The whole outcome histogram of each
    of `kinds` is compared, reason codes and wrong targets included: at most TOLERANCE model may
    have moved. (An attack's row, qbd.expectations, counts its backdoored models only.)"""
    out = []
    for k in kinds:
        want, got = entry.get(k), row["outcomes"].get(k)
        n_want, n_got = totals(want, k)["n"], totals(got, k)["n"]
        if n_want != n_got:
            out.append(f"{n_got} {k} models judged, the row was measured on {n_want}")
            continue
        m = moved(want, got)
        if m > TOLERANCE:
            t_want, t_got = totals(want, k), totals(got, k)
            what = "detections naming the target" if k == "backdoored" else "false alarms"
            out.append(f"{m} {k} models moved (at most {TOLERANCE} may): {what} {t_got['flagged']}/{n_got} and invalid"
                       f" {t_got['invalid']} against measured {t_want['flagged']}/{n_want} and {t_want['invalid']}"
                       f" (measured {describe(want)}; this run {describe(got)})")
    return out


def bounds(entry: dict[str, Any]) -> dict[str, float]:
    """The rate bounds the rule gives a run over the row's seeds (for reports; check() decides)."""
    out = {}
    for k, rate in (("backdoored", "detection_rate"), ("clean", "false_alarm_rate")):
        t = totals(entry.get(k), k)
        if t["n"]:
            out[f"min_{rate}"] = max(0, t["flagged"] - TOLERANCE) / t["n"]
            out[f"max_{rate}"] = min(t["n"], t["flagged"] + TOLERANCE) / t["n"]
    return out


def admissible(entry: dict[str, Any], result: dict[str, Any]) -> bool:
    """The single-seed rule: the cell's outcome is one its row measured on its kind of model."""
    o = outcome(result)
    return split(o)[1] not in NEVER_EXPECTED and (entry.get(kind_of(result)) or {}).get(o, 0) > 0


def describe(counts: dict[str, int] | None) -> str:
    """"pass 9, miss 1" (or "none")."""
    return ", ".join(f"{o} {n}" for o, n in (counts or {}).items()) or "none"


def outcome_counts(results: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per kind of model, outcome -> models (for a row of qbd.rates)."""
    counts: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    for r in results:
        counts[kind_of(r)][outcome(r)] += 1
    return {k: dict(sorted(c.items())) for k, c in counts.items() if c}
