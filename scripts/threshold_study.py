"""The canonical thresholds, studied on the evaluation models: their margins, and whether any
threshold could make a rule generalise beyond its calibration attack.

--margins: for each canonical defense whose verdict is one statistic against a threshold, on the
fp32 canonical cells of a `qbd run --quant fp32 --protocol canonical --seeds 10` run (the ten
backdoored and ten clean evaluation models per data set): the nearest model's distance to the
threshold (positive: on the side the rule flags), and the rates (backdoored models detected
naming the target; clean models flagged) at the threshold and at the threshold moved by a stated
step either way (default 5 % of it; STRIP's per-model threshold is scaled by the same factor).

--spread: for each canonical defense whose verdict is one statistic against one threshold (found
from the runs themselves: the direction must reproduce every verdict at the shipped threshold),
sweep the threshold over every value the statistic took and count, at each: the attack settings
beyond the calibration attack (scripts/attack_spread.py's runs) on which the rule would name the
planted target on a majority of the models; the false alarms on the clean evaluation models; and
the calibration attack's evaluation models it names (both from a `--seeds 10` run). The threshold
kept is the one reaching `--need` settings with the fewest false alarms, then the most of the
calibration attack named; the span of the statistic's values that do as well is shown.

It is chosen on the evaluation models themselves, so it is an oracle: for one threshold on qbd's
statistic, this objective and these models, no calibration on other models can do better. Where
a rule names a class, the class at another threshold is read from its per-class statistic
(`per_class_score` in the evidence: NC, AC, SS); otherwise a detection is counted as naming the
target (optimistic, so still a ceiling). STRIP's per-model test becomes one flagged-share threshold.

    qbd run --dataset digits --quant fp32 --protocol canonical --seeds 10 --json > digits-s10.json   # and synthetic
    python scripts/threshold_study.py --margins out/digits-s10.json out/synthetic-s10.json
    python scripts/threshold_study.py --spread out/spread-zoo --clean out/digits-s10.json out/synthetic-s10.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def _load(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        out += json.loads(p.read_text())["results"]
    return out


def _fp32_canonical(r: dict) -> bool:
    q = r["quant"]
    return (q["scheme"] if isinstance(q, dict) else q) == "fp32" and r["defense"].get("protocol") == "canonical"


def direction(results: list[dict]) -> str | None:
    """'above' (flags at score >= threshold) or 'below' (score <= threshold), whichever reproduces
    every detected / clean verdict; None when neither does (not one statistic against one threshold)."""
    decided = [r["verdict"] for r in results if r["verdict"]["status"] in ("detected", "clean")
               and isinstance(r["verdict"].get("score"), (int, float)) and isinstance(r["verdict"].get("threshold"), (int, float))]
    if not decided:
        return None
    for name, flags in (("above", lambda s, t: s >= t), ("below", lambda s, t: s <= t)):
        if all(flags(v["score"], v["threshold"]) == (v["status"] == "detected") for v in decided):
            return name
    return None


def _named(r: dict, t: float, way: str) -> bool:
    """Whether the rule at threshold t names the planted target on this backdoored model."""
    v = r["verdict"]
    s = v.get("score")
    if not isinstance(s, (int, float)) or not (s >= t if way == "above" else s <= t):
        return False
    per_class = (v.get("evidence") or {}).get("per_class_score")
    if isinstance(per_class, list) and per_class:
        scored = [i for i, x in enumerate(per_class) if isinstance(x, (int, float))]  # a class with too few samples has none
        best = (max if way == "above" else min)(scored, key=lambda i: per_class[i])
        return best == r["attack"]["target"]
    return True  # no per-class statistic: counted as naming the target (a ceiling)


def _flags(score: object, t: float, way: str) -> bool:
    return isinstance(score, (int, float)) and (score >= t if way == "above" else score <= t)


def rates_at(rs: dict[str, list[dict]], t: float, way: str) -> tuple[int, int, int, int]:
    """At threshold t: the settings named on a majority of their models, the settings, the clean
    models flagged, the calibration attack's evaluation models named."""
    per = defaultdict(list)
    for r in rs["spread"]:
        a = r["attack"]
        per[(a["name"], a["target"], a["trigger_pattern"], a["trigger_size"], a["poison_rate"])].append(_named(r, t, way))
    majority = sum(2 * sum(v) > len(v) for v in per.values())
    return (majority, len(per), sum(_flags(r["verdict"].get("score"), t, way) for r in rs["clean"]),
            sum(_named(r, t, way) for r in rs["main"]))


def ceiling(spread: list[dict], evaluation: list[dict], *, need: int = 4) -> list[str]:
    by: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: {"spread": [], "clean": [], "main": []})
    for r in spread:
        if r.get("attack") is not None and _fp32_canonical(r):
            by[(r["dataset"], r["defense"]["name"])]["spread"].append(r)
    for r in evaluation:
        if _fp32_canonical(r):
            by[(r["dataset"], r["defense"]["name"])]["clean" if r.get("attack") is None else "main"].append(r)
    lines = ["| data set | defense | at the shipped threshold: settings named on a majority; false alarms; calibration attack named |"
             f" the oracle threshold for >= {need} settings (fewest false alarms, then most of the calibration attack named) |"
             " the clean models' most suspicious score |", "|---|---|---|---|---|"]
    for (ds, name), rs in sorted(by.items()):
        if not rs["spread"] or not rs["clean"]:
            continue
        way = direction(rs["spread"] + rs["clean"] + rs["main"])
        if way is None:
            lines.append(f"| {ds} | {name} | not one statistic against one threshold | - | - |")
            continue
        shipped = rs["spread"][0]["verdict"]["threshold"]
        scores = sorted({r["verdict"]["score"] for k in ("spread", "clean", "main") for r in rs[k]
                         if isinstance(r["verdict"].get("score"), (int, float))})
        m0, n_set, a0, h0 = rates_at(rs, shipped, way)
        n_clean, n_main = len(rs["clean"]), len(rs["main"])
        at = {t: rates_at(rs, t, way) for t in scores}
        ok = sorted((a[2], -a[3], t) for t, a in at.items() if a[0] >= need)
        clean_scores = [r["verdict"]["score"] for r in rs["clean"] if isinstance(r["verdict"].get("score"), (int, float))]
        nearest = (max if way == "above" else min)(clean_scores) if clean_scores else None
        best = [t for fa, neg_main, t in ok if (fa, neg_main) == ok[0][:2]] if ok else []  # every threshold as good
        span = "" if not best else f"{best[0]:.4g}" if len(best) == 1 else f"{min(best):.4g} to {max(best):.4g}"
        oracle = (f"{span}: false alarms {ok[0][0]}/{n_clean}; calibration attack {-ok[0][1]}/{n_main}" if ok
                  else f"none reaches {need}/{n_set}")
        lines.append(f"| {ds} | {name} | {shipped:g}: {m0}/{n_set}; {a0}/{n_clean}; {h0}/{n_main} | {oracle} |"
                     f" {'-' if nearest is None else f'{nearest:.4g}'} ({'max' if way == 'above' else 'min'}) |")
    return lines


def _scaled_rates(rs: list[dict], f: float, way: str) -> str:
    """Each model's threshold times f: backdoored models detected naming the target; clean flagged."""
    bd = [r for r in rs if r["attack"] is not None]
    cl = [r for r in rs if r["attack"] is None]
    hit = sum(_named(r, r["verdict"]["threshold"] * f, way) for r in bd)
    fa = sum(_flags(r["verdict"]["score"], r["verdict"]["threshold"] * f, way) for r in cl)
    return f"{hit}/{len(bd)}; {fa}/{len(cl)}"


def margins(results: list[dict], *, step: float = 0.05) -> list[str]:
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        if _fp32_canonical(r) and r["verdict"]["status"] in ("detected", "clean"):
            by[(r["dataset"], r["defense"]["name"])].append(r)
    lines = [f"| data set | defense | threshold | nearest model: distance (which) | at x{1 - step:g}: detected naming the target; false alarms"
             f" | at the threshold | at x{1 + step:g} |", "|---|---|---|---|---|---|---|"]
    for (ds, name), rs in sorted(by.items()):
        way = direction(rs)
        if way is None:
            lines.append(f"| {ds} | {name} | not one statistic against one threshold | - | - | - | - |")
            continue
        thresholds = {r["verdict"]["threshold"] for r in rs}
        shown = f"{thresholds.pop():g}" if len(thresholds) == 1 else f"per model ({min(thresholds):g} to {max(thresholds):g})"
        near = min(rs, key=lambda r: abs(r["verdict"]["score"] - r["verdict"]["threshold"]))
        dist = near["verdict"]["score"] - near["verdict"]["threshold"]
        dist = dist if way == "above" else -dist  # positive: on the side the rule flags
        who = f"{'backdoored' if near['attack'] else 'clean'} seed {near['seed']}"
        at = [_scaled_rates(rs, f, way) for f in (1 - step, 1.0, 1 + step)]
        lines.append(f"| {ds} | {name} | {shown} | {dist:+.4g} ({who}) | " + " | ".join(at) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--margins", type=Path, nargs="+", help="runs over the evaluation models (qbd run --seeds 10 --json)")
    ap.add_argument("--step", type=float, default=0.05, help="the step either side of each threshold, a fraction of it (default: 0.05)")
    ap.add_argument("--spread", type=Path, help="folder of scripts/attack_spread.py runs")
    ap.add_argument("--clean", type=Path, nargs="+", help="with --spread: runs over the evaluation models (qbd run --seeds 10 --json):"
                    " their clean models and the calibration attack's")
    ap.add_argument("--need", type=int, default=4, help="settings the rule must name the target on (default: 4)")
    args = ap.parse_args()
    if not (args.margins or (args.spread and args.clean)):
        ap.error("give --margins RUNS, or --spread DIR with --clean RUNS")
    if args.margins:
        print("\n".join(margins(_load(args.margins), step=args.step)))
    if args.spread:
        print("\n".join(ceiling(_load(sorted(args.spread.glob("*.json"))), _load(args.clean), need=args.need)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
