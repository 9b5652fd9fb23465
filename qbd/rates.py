"""Rates over seeds: one row per (dataset, scheme, defense, protocol), over every model seed's
backdoored and clean model. Torch-free (the plugin, the reports and the CLI use it).

A row's id is the cell id without ":clean" (qbd.result_types.cell_id), so the backdoored models' cells
and the clean models' cells of one (dataset, scheme, defense, protocol) fall in the same row.

- detection rate: backdoored models whose outcome is `pass` (detected naming the planted target,
  or detected by a defense that declares it names no target; qbd.outcomes.outcome) over all
  backdoored models. A wrong target is not a detection, and an invalid verdict counts as not
  detected (it is still counted apart, in `invalid`).
- false-alarm rate: clean models judged `detected` over all clean models.

Each rate comes with its Wilson score 95 % interval; a rate (and its interval) is None when the
row has no model of that kind.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from qbd.measured_rows import outcome_counts
from qbd.outcomes import outcome
from qbd.result_types import cell_id

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of k successes in n trials (None when n == 0). Unlike the normal
    approximation it stays inside [0, 1] and is not empty at k = 0 or k = n, which is where
    a defense's rates over 5 seeds usually sit."""
    if n == 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at k = 0 (k = n) the bound is exactly 0 (1); the formula leaves float rounding there
    low = 0.0 if k == 0 else min(p, max(0.0, centre - half))
    high = 1.0 if k == n else max(p, min(1.0, centre + half))
    return low, high


def row_id(result: dict[str, Any]) -> str:
    """The row a Result belongs to: its cell id without ":clean"."""
    return cell_id(result["dataset"], result["quant"]["scheme"], result["defense"]["name"], result["defense"]["protocol"])


def rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per row, sorted by row id (see the module docstring). Keys: row, dataset, scheme,
    defense, protocol, n_backdoored, detected, detection_rate, detection_ci, n_clean,
    false_alarms, false_alarm_rate, false_alarm_ci, invalid (invalid verdicts of either kind of
    model; they count as not detected, never as clean), seeds (sorted), outcomes ({"backdoored":
    {outcome: models}, "clean": {...}}, qbd.outcomes' words). An interval is a
    [low, high] list (what a JSON round trip gives back), or None with its rate."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[row_id(r)].append(r)
    return [_row(rid, rs) for rid, rs in sorted(groups.items())]


def _row(rid: str, rs: list[dict[str, Any]]) -> dict[str, Any]:
    backdoored = [r for r in rs if r.get("attack") is not None]
    clean = [r for r in rs if r.get("attack") is None]
    detected = sum(outcome(r) == "pass" for r in backdoored)
    false_alarms = sum(r["verdict"]["status"] == "detected" for r in clean)
    first = rs[0]
    return {
        "row": rid,
        "dataset": first["dataset"],
        "scheme": first["quant"]["scheme"],
        "defense": first["defense"]["name"],
        "protocol": first["defense"]["protocol"],
        "n_backdoored": len(backdoored),
        "detected": detected,
        "detection_rate": _rate(detected, len(backdoored)),
        "detection_ci": _ci(detected, len(backdoored)),
        "n_clean": len(clean),
        "false_alarms": false_alarms,
        "false_alarm_rate": _rate(false_alarms, len(clean)),
        "false_alarm_ci": _ci(false_alarms, len(clean)),
        "invalid": sum(r["verdict"]["status"] == "invalid" for r in rs),
        "seeds": sorted({int(r.get("seed", 0)) for r in rs}),
        # per kind of model, outcome -> models: what a measured row (qbd.measured_rows) is judged by
        "outcomes": outcome_counts(rs),
    }


def _rate(k: int, n: int) -> float | None:
    return None if n == 0 else k / n


def _ci(k: int, n: int) -> list[float] | None:
    ci = wilson(k, n)
    return None if ci is None else list(ci)


def fraction(k: int, n: int, ci: list[float] | tuple[float, float] | None) -> str:
    """"4/5 = 0.80 [0.38, 0.96]"; "-" when there is no model of that kind."""
    if n == 0 or ci is None:
        return "-"
    return f"{k}/{n} = {k / n:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
