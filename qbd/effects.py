"""Quantization's effect on a defense, paired on the same models. Torch-free.

The paper's question is whether quantization changes what a defense detects. Two rates measured
on different models cannot answer it: model-to-model spread swamps the change. qbd answers it
pairwise: for every (data set, defense, protocol) and every quantized scheme, each model that was
judged both on the unquantized baseline (fp32) and on the scheme is one pair, and

- detection: a backdoored model's pair is (detected naming the target on fp32, on the scheme);
- false alarm: a clean model's pair is (detected on fp32, on the scheme).

The change in each rate is the scheme's rate minus fp32's on the same models, and its p-value is
the exact McNemar test: under "quantization changes nothing", each discordant pair (detected on
one side only) is equally likely to go either way, so the smaller discordant count is binomial
(b + c, 1/2); the two-sided p-value is twice its lower tail, capped at 1. With no discordant pair
the p-value is 1. An invalid verdict counts as not detected on its side (as in qbd.rates), and the
pairs' invalid counts are reported apart.

A cell whose scheme leaves the defense's own input unchanged (int8-dynamic quantizes only the
classifier, so the activations AC and SS read are fp32's) compares fp32 with itself: the effect
says `input_unchanged: true` and a reader should not take its (null) change as evidence about
quantization. It is read from the Result (`defense.input_unchanged`, measured by the bench:
the layer the defense reads is bit-identical to fp32's on the calibration images).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

from qbd.outcomes import outcome
from qbd.rates import wilson

BASELINE = "fp32"  # the unquantized deployment every scheme is compared with


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs (binomial(b + c, 1/2))."""
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _model_key(r: dict[str, Any]) -> tuple[int, str]:
    """One model: its seed and its attack (None: the clean model of that seed)."""
    return int(r.get("seed", 0)), json.dumps(r.get("attack"), sort_keys=True)


def _flag(r: dict[str, Any]) -> bool:
    """Detected (a backdoored model: naming the planted target; a clean one: at all)."""
    if r.get("attack") is None:
        return r["verdict"]["status"] == "detected"
    return outcome(r) == "pass"


def _invalid(r: dict[str, Any]) -> bool:
    return r["verdict"]["status"] == "invalid"


def _unchanged(r: dict[str, Any]) -> bool | None:
    return (r.get("defense") or {}).get("input_unchanged")


def effects(results: list[dict[str, Any]], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """One effect per (data set, defense, protocol, scheme != baseline) that has at least one
    pair, sorted. Keys: effect (id "dataset/scheme/defense[protocol]"), dataset, scheme, baseline,
    defense, protocol, input_unchanged (True, False or None when not known), then for the
    backdoored pairs (`detection`) and the clean pairs (`false_alarm`) each a dict: n (pairs),
    baseline_count, scheme_count, baseline_rate, scheme_rate, baseline_ci, scheme_ci (Wilson
    95 %), change (scheme_rate - baseline_rate), lost (flagged on the baseline only), gained
    (flagged on the scheme only), p (exact McNemar), invalid_baseline, invalid_scheme; null
    when there is no pair of that kind."""
    by: dict[tuple[str, str, str], dict[str, dict[tuple[int, str], dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in results:
        key = (r["dataset"], r["defense"]["name"], r["defense"]["protocol"])
        by[key][r["quant"]["scheme"]][_model_key(r)] = r
    out = []
    for (ds, defense, protocol), schemes in sorted(by.items()):
        base = schemes.get(baseline)
        if not base:
            continue
        for scheme, models in sorted(schemes.items()):
            if scheme == baseline:
                continue
            shared = sorted(set(base) & set(models))
            if not shared:
                continue
            pairs = [(base[m], models[m]) for m in shared]
            flags = {_unchanged(s) for _, s in pairs}
            out.append({
                "effect": f"{ds}/{scheme}/{defense}[{protocol}]", "dataset": ds, "scheme": scheme, "baseline": baseline,
                "defense": defense, "protocol": protocol,
                "input_unchanged": flags.pop() if len(flags) == 1 else None,
                "detection": _paired([p for p in pairs if p[0].get("attack") is not None]),
                "false_alarm": _paired([p for p in pairs if p[0].get("attack") is None]),
            })
    return out


def _paired(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any] | None:
    n = len(pairs)
    if n == 0:
        return None
    a = [_flag(b) for b, _ in pairs]
    s = [_flag(q) for _, q in pairs]
    lost = sum(x and not y for x, y in zip(a, s, strict=True))
    gained = sum(y and not x for x, y in zip(a, s, strict=True))
    ka, ks = sum(a), sum(s)
    return {
        "n": n, "baseline_count": ka, "scheme_count": ks, "baseline_rate": ka / n, "scheme_rate": ks / n,
        "baseline_ci": list(wilson(ka, n)), "scheme_ci": list(wilson(ks, n)),  # type: ignore[arg-type]
        "change": (ks - ka) / n, "lost": lost, "gained": gained, "p": mcnemar_exact(lost, gained),
        "invalid_baseline": sum(_invalid(b) for b, _ in pairs), "invalid_scheme": sum(_invalid(q) for _, q in pairs),
    }


def effect_problems(effect: Any) -> list[str]:
    """Everything wrong with one effect (empty when it satisfies the contract): the counts are
    consistent and the rates, changes and p-values are what the counts give."""
    if not isinstance(effect, dict):
        return [f"an effect is a JSON object, got {type(effect).__name__}"]
    out = [f"effect key {k!r} must be a string" for k in ("effect", "dataset", "scheme", "baseline", "defense", "protocol")
           if not isinstance(effect.get(k), str)]
    if effect.get("input_unchanged") not in (True, False, None):
        out.append("effect key 'input_unchanged' must be true, false or null")
    for side in ("detection", "false_alarm"):
        if side not in effect:
            out.append(f"missing key {side!r}")
            continue
        p = effect[side]
        if p is None:
            continue
        if not isinstance(p, dict):
            out.append(f"{side} must be an object or null")
            continue
        ints = ("n", "baseline_count", "scheme_count", "lost", "gained", "invalid_baseline", "invalid_scheme")
        bad = [k for k in ints if not (isinstance(p.get(k), int) and not isinstance(p.get(k), bool) and p[k] >= 0)]
        if bad:
            out.append(f"{side}: {', '.join(bad)} must be integers >= 0")
            continue
        n = p["n"]
        if n == 0 or max(p["baseline_count"], p["scheme_count"], p["invalid_baseline"], p["invalid_scheme"]) > n:
            out.append(f"{side}: counts must lie in [0, n] with n >= 1")
            continue
        if p["baseline_count"] - p["lost"] != p["scheme_count"] - p["gained"] or p["lost"] > p["baseline_count"]:
            out.append(f"{side}: lost/gained do not reconcile the two counts")
        want = {"baseline_rate": p["baseline_count"] / n, "scheme_rate": p["scheme_count"] / n,
                "change": (p["scheme_count"] - p["baseline_count"]) / n, "p": mcnemar_exact(p["lost"], p["gained"])}
        for k, v in want.items():
            got = p.get(k)
            if not (isinstance(got, (int, float)) and not isinstance(got, bool) and abs(got - v) <= 1e-9):
                out.append(f"{side}: {k} must be {v}, got {got!r}")
        for k, c in (("baseline_ci", p["baseline_count"]), ("scheme_ci", p["scheme_count"])):
            ci = p.get(k)
            want_ci = list(wilson(c, n))  # type: ignore[arg-type]
            if not (isinstance(ci, list) and len(ci) == 2 and all(abs(x - y) <= 1e-9 for x, y in zip(ci, want_ci, strict=True))):
                out.append(f"{side}: {k} must be the Wilson interval {want_ci}, got {ci!r}")
    return out


def significant(effect: dict[str, Any], alpha: float = 0.05) -> list[str]:
    """The sides ("detection", "false_alarm") whose change is significant at `alpha`."""
    return [side for side in ("detection", "false_alarm")
            if effect.get(side) is not None and effect[side]["p"] < alpha]


def change_text(side: dict[str, Any] | None) -> str:
    """"10/10 -> 6/10 (-0.40, p=0.125)"; "-" with no pair."""
    if side is None:
        return "-"
    return (f"{side['baseline_count']}/{side['n']} -> {side['scheme_count']}/{side['n']}"
            f" ({side['change']:+.2f}, p={side['p']:.3g})")
