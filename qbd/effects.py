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
the p-value is 1. Only pairs with an answer on both sides are compared: a pair with an invalid
verdict on either side (no gradient through int8 kernels, a rule that cannot fire) says nothing
about whether quantization changed the defense's answer, so it is left out and counted apart
(`invalid`); a side with no such pair is null ("no answer"). Every run tests many effects at
once, so each p-value also comes Holm-adjusted over all the effects of the call (`p_holm`,
family-wise error at the nominal level); the report stars only what survives it.

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


def _invalid(r: dict[str, Any]) -> bool:  # no answer from the defense on this model
    return r["verdict"]["status"] == "invalid"


def _unchanged(r: dict[str, Any]) -> bool | None:
    return (r.get("defense") or {}).get("input_unchanged")


def effects(results: list[dict[str, Any]], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """One effect per (data set, defense, protocol, scheme != baseline) that has at least one
    pair, sorted. Keys: effect (id "dataset/scheme/defense[protocol]"), dataset, scheme, baseline,
    defense, protocol, input_unchanged (True, False or None when not known), invalid (per side:
    invalid verdicts on the baseline, on the scheme, and the pairs left out for them), then for
    the backdoored pairs (`detection`) and the clean pairs (`false_alarm`) each a dict over the
    pairs with an answer on both sides: n, baseline_count, scheme_count, baseline_rate,
    scheme_rate, baseline_ci, scheme_ci (Wilson 95 %), change (scheme_rate - baseline_rate), lost
    (flagged on the baseline only), gained (flagged on the scheme only), p (exact McNemar),
    p_holm (Holm-adjusted over every side of every effect returned); null when there is no such
    pair."""
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
            sides = {"detection": [p for p in pairs if p[0].get("attack") is not None],
                     "false_alarm": [p for p in pairs if p[0].get("attack") is None]}
            out.append({
                "effect": f"{ds}/{scheme}/{defense}[{protocol}]", "dataset": ds, "scheme": scheme, "baseline": baseline,
                "defense": defense, "protocol": protocol,
                "input_unchanged": flags.pop() if len(flags) == 1 else None,
                "invalid": {side: _invalid_counts(ps) for side, ps in sides.items()},
                **{side: _paired(ps) for side, ps in sides.items()},
            })
    _holm(out)
    return out


def _invalid_counts(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, int]:
    return {"baseline": sum(_invalid(b) for b, _ in pairs), "scheme": sum(_invalid(q) for _, q in pairs),
            "pairs_left_out": sum(_invalid(b) or _invalid(q) for b, q in pairs)}


def _paired(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any] | None:
    answered = [(b, q) for b, q in pairs if not (_invalid(b) or _invalid(q))]
    n = len(answered)
    if n == 0:
        return None
    a = [_flag(b) for b, _ in answered]
    s = [_flag(q) for _, q in answered]
    lost = sum(x and not y for x, y in zip(a, s, strict=True))
    gained = sum(y and not x for x, y in zip(a, s, strict=True))
    ka, ks = sum(a), sum(s)
    return {
        "n": n, "baseline_count": ka, "scheme_count": ks, "baseline_rate": ka / n, "scheme_rate": ks / n,
        "baseline_ci": list(wilson(ka, n)), "scheme_ci": list(wilson(ks, n)),  # type: ignore[arg-type]
        "change": (ks - ka) / n, "lost": lost, "gained": gained, "p": mcnemar_exact(lost, gained),
    }


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values (family-wise error), in the input's order."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    m, running, out = len(ps), 0.0, [0.0] * len(ps)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def _holm(found: list[dict[str, Any]]) -> None:
    sides = [e[side] for e in found for side in ("detection", "false_alarm") if e[side] is not None]
    for side, adjusted in zip(sides, holm([x["p"] for x in sides]), strict=True):
        side["p_holm"] = adjusted


def effect_problems(effect: Any) -> list[str]:
    """Everything wrong with one effect (empty when it satisfies the contract): the counts are
    consistent and the rates, changes and p-values are what the counts give."""
    from qbd.result_types import Effect

    out = Effect.problems(effect)  # the shape its type states; then the arithmetic no schema can
    if out:
        return out
    for side in ("detection", "false_alarm"):
        p = effect[side]
        if p is None:
            continue
        n = p["n"]
        if max(p["baseline_count"], p["scheme_count"]) > n:
            out.append(f"{side}: counts must lie in [0, n]")
            continue
        if p["baseline_count"] - p["lost"] != p["scheme_count"] - p["gained"] or p["lost"] > p["baseline_count"]:
            out.append(f"{side}: lost/gained do not reconcile the two counts")
        want = {"baseline_rate": p["baseline_count"] / n, "scheme_rate": p["scheme_count"] / n,
                "change": (p["scheme_count"] - p["baseline_count"]) / n, "p": mcnemar_exact(p["lost"], p["gained"])}
        out += [f"{side}: {k} must be {v}, got {p[k]!r}" for k, v in want.items() if abs(p[k] - v) > 1e-9]
        if p["p_holm"] < p["p"] - 1e-12:
            out.append(f"{side}: p_holm must lie in [p, 1], got {p['p_holm']!r}")
        for k, c in (("baseline_ci", p["baseline_count"]), ("scheme_ci", p["scheme_count"])):
            want_ci = list(wilson(c, n))  # type: ignore[arg-type]
            if any(abs(x - y) > 1e-9 for x, y in zip(p[k], want_ci, strict=True)):
                out.append(f"{side}: {k} must be the Wilson interval {want_ci}, got {p[k]!r}")
    return out


def significant(effect: dict[str, Any], alpha: float = 0.05, key: str = "p_holm") -> list[str]:
    """The sides ("detection", "false_alarm") whose change is significant at `alpha` (Holm-adjusted
    by default; key="p" for the nominal, per-test level)."""
    return [side for side in ("detection", "false_alarm")
            if effect.get(side) is not None and effect[side][key] < alpha]


def change_text(side: dict[str, Any] | None, invalid: dict[str, int] | None = None) -> str:
    """"10/10 -> 6/10 (-0.40, p=0.125, Holm 1)", with ", 3 pairs left out (invalid)" where
    verdicts were invalid; "no answer" where no pair had one on both sides."""
    left = (invalid or {}).get("pairs_left_out", 0)
    note = f"; {left} pairs left out (invalid)" if left else ""
    if side is None:
        return ("no answer" + note) if left else "-"
    return (f"{side['baseline_count']}/{side['n']} -> {side['scheme_count']}/{side['n']}"
            f" ({side['change']:+.2f}, p={side['p']:.3g}, Holm {side['p_holm']:.2g}){note}")
