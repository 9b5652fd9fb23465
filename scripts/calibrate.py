"""Calibrate the decision thresholds of the five built-in defenses on the calibration seeds.

    python scripts/calibrate.py                       # seeds 100-104, both data sets, all five defenses
    python scripts/calibrate.py --seeds 0-4 --out eval.json   # the same figures on other seeds (a check)

Runs every defense (canonical protocol, fp32) on the pinned zoo's backdoored and clean models of
the given seeds, then reports, per defense, the statistic its threshold applies to:

- on the planted target class of each backdoored model (the positives),
- on every other class of the backdoored models and every class of the clean models (the
  negatives: a detection there is a wrong target or a false alarm),

and the threshold the data supports: for a per-class statistic (AC silhouette, SS kurtosis and
separation, NC anomaly index) the midpoint between the most suspicious negative and the nearest
positive beyond it (no calibration false alarm, the largest margin to the positives it catches;
the positives it cannot catch are listed as misses); for a model-level rule (STRIP's binomial test, Fine-Pruning's ASR
drop) whether the threshold in use separates backdoored from clean models. Thresholds are
calibrated on seeds 100-104 and evaluated on seeds 0-9 (qbd.zoo.pinned): never on the same models.

The raw Results are written with --out, so the table can be recomputed (--from FILE) without
running the defenses again.

    python scripts/calibrate.py --from fixtures/calibration/seeds-100-104.json --with fixtures/calibration/spread-100-104.json

(the shipped thresholds). --with adds Results of `qbd run --json` on calibration-seed models under other attacks
(qbd.presets.CALIBRATION_SPREAD: poison rates, patch sizes, corners, targets and a blend a user
would bring, none of them an evaluation setting); their target class is a positive, their other
classes negatives. A Result of any other seed, scheme or protocol is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from qbd.defenses import BUILTIN

DEFENSES = tuple(sorted(BUILTIN))  # the built-in catalog (qbd.defenses), not a copy of its names


def seeds_arg(text: str) -> tuple[int, ...]:
    if "-" in text:
        a, b = text.split("-", 1)
        return tuple(range(int(a), int(b) + 1))
    return tuple(int(s) for s in text.split(","))


def run_model(dataset: str, seed: int, backdoored: bool, defenses: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every defense on one zoo model (fp32, canonical); a worker process, one thread."""
    import torch

    torch.set_num_threads(1)
    from qbd.config import AttackSpec, DatasetSpec
    from qbd.data import load_dataset
    from qbd.runner import load_defense, seeded_bench

    bench = seeded_bench(load_dataset(DatasetSpec(dataset), None), seed, AttackSpec() if backdoored else None)
    if bench.weights["origin"] != "zoo":  # calibration is only honest on the pinned models
        raise SystemExit(f"{dataset} seed {seed}: not in the pinned zoo (qbd zoo build)")
    out = []
    for name in defenses:
        r = bench.run(load_defense(name, "canonical", "smoke"), "fp32", seed=seed)
        print(f"{r['cell']} seed {seed}: {r['verdict']['status']} t={r['verdict']['target_class']} [{r['seconds']:.1f} s]",
              file=sys.stderr, flush=True)
        out.append(r)
    return out


def read_results(path: str) -> list[dict[str, Any]]:
    """The Results of a file --out or `qbd run --json` wrote."""
    with open(path) as f:
        return json.load(f)["results"]


def with_results(paths: list[str]) -> list[dict[str, Any]]:
    """The Results of `--with` files: calibration seeds, fp32, canonical protocol only (a threshold
    set on an evaluation model would be judged on itself)."""
    from qbd.zoo.pinned import CALIBRATION_SEEDS

    out = []
    for path in paths:
        rs = read_results(path)
        for r in rs:
            where = f"{path}: {r['cell']} seed {r['seed']}"
            if r["seed"] not in CALIBRATION_SEEDS:
                raise SystemExit(f"{where}: not a calibration seed ({', '.join(map(str, CALIBRATION_SEEDS))})")
            if r["quant"]["scheme"] != "fp32" or r["defense"]["protocol"] != "canonical":
                raise SystemExit(f"{where}: calibration reads fp32 canonical Results only")
        out += rs
    return out


def _per_class(key: str):
    return lambda r: r["verdict"]["evidence"].get(key)


def _nc_lower_side(r: dict[str, Any]) -> list[float | None] | None:
    """NC flags only classes whose trigger norm is below the median: a large norm is no backdoor."""
    e = r["verdict"]["evidence"]
    if "norms" not in e or "anomaly_index" not in e:
        return None
    med = e["median"]
    return [a if (a is not None and n < med) else 0.0 for a, n in zip(e["anomaly_index"], e["norms"], strict=True)]


# defense -> (statistic, per-class values from a Result, threshold parameter, "above" | "below":
# the side of the threshold on which a class is flagged)
PER_CLASS = {
    "activation-clustering": ("2-means silhouette", _per_class("silhouette"), "silhouette_threshold", "above"),
    "spectral-signatures": ("kurtosis along the top singular direction", _per_class("kurtosis_top_direction"), "kurtosis_threshold", "below"),
    "neural-cleanse": ("anomaly index (norm below the median)", _nc_lower_side, "mad_threshold", "above"),
}
# a defense whose rule reads a second statistic: its row is named "<defense>/<statistic>"
SECOND = {
    "spectral-signatures/separation": ("separation of the 2-means split along the top direction",
                                       _per_class("separation_top_direction"), "separation_threshold", "above"),
}
STATISTICS = {**PER_CLASS, **SECOND}
MODEL_LEVEL = {
    "strip": ("flagged share vs significant share", "score"),
    "fine-pruning": ("ASR drop after pruning + fine-tuning", "score"),
}


def table(results: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    lines = ["| defense | statistic (flags when) | threshold in the Results | positives (target class, backdoored) | most suspicious"
             " negative (other classes; clean models) | every positive beyond it? | threshold the data supports |",
             "|---|---|---|---|---|---|---|"]
    proposal: dict[str, Any] = {}
    for name in sorted({*DEFENSES, *SECOND}):
        rs = [r for r in results if r["defense"]["name"] == name.split("/")[0]]
        if not rs:
            continue
        thr = rs[0]["verdict"]["threshold"] if name not in STATISTICS else _shown(rs[0]["defense"]["params"].get(STATISTICS[name][2]))
        if name in STATISTICS:
            label, get, _, side = STATISTICS[name]
            sign = 1.0 if side == "above" else -1.0
            pos, neg_bd, neg_clean = [], [], []
            for r in rs:
                vals = get(r)
                if vals is None:
                    continue
                if r["attack"] is not None:
                    t = r["attack"]["target"]
                    pos.append(vals[t])
                    neg_bd += [v for c, v in enumerate(vals) if c != t and v is not None]
                else:
                    neg_clean += [v for v in vals if v is not None]
            pos = [v for v in pos if v is not None]
            neg = neg_bd + neg_clean
            worst = _most(neg, sign)
            # the rule: no false alarm on any calibration negative, and the largest margin to the
            # nearest positive beyond the most suspicious negative; positives not beyond it are
            # misses, reported (a second statistic of the same defense may catch them)
            caught = [v for v in pos if worst is not None and sign * v > sign * worst]
            missed = sorted(v for v in pos if worst is None or sign * v <= sign * worst)
            sep = bool(pos and neg and not missed)
            supported = round((worst + _most(caught, -sign)) / 2, 3) if caught else None
            proposal[name] = {"statistic": label, "flags_when": side, "positives": sorted(pos),
                              "worst_negative_other_class": _most(neg_bd, sign), "worst_negative_clean": _most(neg_clean, sign),
                              "separates": sep, "missed": missed, "midpoint": supported, "threshold_in_use": thr}
            verdict = "yes" if sep else f"no: {len(missed)} of {len(pos)} positives not beyond it"
            lines.append(f"| {name} | {label} ({side}) | {thr} | {_range(pos)} | {_m(_most(neg_bd, sign))}; {_m(_most(neg_clean, sign))}"
                         f" | {verdict} | {supported if supported is not None else 'none (no positive beyond it)'} |")
        else:
            label, _ = MODEL_LEVEL[name]
            bd = [r for r in rs if r["attack"] is not None]
            cl = [r for r in rs if r["attack"] is None]
            det = sum(r["verdict"]["status"] == "detected" and r["verdict"]["target_class"] in (None, r["attack"]["target"]) for r in bd)
            fa = sum(r["verdict"]["status"] == "detected" for r in cl)
            pos = [r["verdict"]["score"] for r in bd]
            neg = [r["verdict"]["score"] for r in cl]
            proposal[name] = {"statistic": label, "positives": pos, "negatives": neg, "detected": det, "n_backdoored": len(bd),
                              "false_alarms": fa, "n_clean": len(cl), "threshold_in_use": thr}
            lines.append(f"| {name} | {label} | {_m(thr)} | {_range(pos)}; detected {det}/{len(bd)} | {_m(max(neg, default=None))};"
                         f" false alarms {fa}/{len(cl)} | {'yes' if det == len(bd) and fa == 0 else 'no'} | (rule kept) |")
    return "\n".join(lines), proposal


def _shown(value: Any) -> Any:
    """A threshold as the table shows it: a per-data-set mapping (qbd.defenses._per_dataset) as one string."""
    return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value


def per_dataset(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per defense and threshold parameter, the mapping qbd.defenses._per_dataset takes: each data
    set's own midpoint and "*" the pooled one (None where no target lies beyond the most
    suspicious negative). The pooled value is for a data set with no calibration of its own, so
    it must name targets on every calibrated data set: one that names none of some data set's
    (SS's separation names no synthetic target at digits' level) is that data set's value, not a
    pooled one, and "*" is None (the rule is off elsewhere). Neural Cleanse is left out: it keeps
    the authors' 2.0."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    pooled = table(results)[1]
    own: dict[str, dict[str, Any]] = {}
    for ds in sorted({r["dataset"] for r in results}):
        own[ds] = table([r for r in results if r["dataset"] == ds])[1]
        for name, found in own[ds].items():
            if name in STATISTICS and not name.startswith("neural-cleanse"):
                out.setdefault(name.split("/")[0], {}).setdefault(STATISTICS[name][2], {})[ds] = found["midpoint"]
    for name, (_, _, param, side) in STATISTICS.items():
        if name.split("/")[0] in out and param in out[name.split("/")[0]]:
            m = pooled[name]["midpoint"]
            sign = 1.0 if side == "above" else -1.0
            if m is not None and not all(any(sign * v > sign * m for v in own[ds][name]["positives"]) for ds in own):
                m = None
            out[name.split("/")[0]][param]["*"] = m
    return out


def _most(vals: list[float], sign: float) -> float | None:
    """The most suspicious value: the largest for an "above" rule, the smallest for "below"."""
    return max(vals, key=lambda v: sign * v, default=None)


def _m(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _range(vals: list[float]) -> str:
    return "n/a" if not vals else f"{min(vals):.3g} .. {max(vals):.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=seeds_arg, default=seeds_arg("100-104"), help="model seeds (default: 100-104; not with --from)")
    ap.add_argument("--dataset", default="digits,synthetic", help="data sets to run, comma-separated (not with --from)")
    ap.add_argument("--defense", default=",".join(DEFENSES), help="defenses to run, comma-separated (not with --from)")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="worker processes, one thread each (default: 2)")
    ap.add_argument("--out", help="write the raw Results (JSON) here")
    ap.add_argument("--from", dest="from_files", nargs="+", metavar="FILE",
                    help="recompute the tables from Results files (--out's, or qbd run --json's) instead of running the zoo's models")
    ap.add_argument("--with", dest="with_files", nargs="+", default=[], metavar="FILE",
                    help="Results (qbd run --json) of calibration-seed models under other attacks, added to the calibration")
    args = ap.parse_args(argv)
    defenses = tuple(args.defense.split(","))
    if args.from_files:
        results = [r for path in args.from_files for r in read_results(path)]
    else:
        todo = [(ds, s, bd) for ds in args.dataset.split(",") for s in args.seeds for bd in (True, False)]
        results = []
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for rs in pool.map(run_model, *zip(*todo, strict=True), [defenses] * len(todo)):
                results += rs
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"results": results}, f)
    results = results + with_results(args.with_files)
    for ds in sorted({r["dataset"] for r in results}):
        text, _ = table([r for r in results if r["dataset"] == ds])
        print(f"\n### {ds}\n\n{text}")
    text, proposal = table(results)
    print(f"\n### both data sets\n\n{text}\n")
    print(json.dumps(proposal, indent=1, default=str))
    print("\nthe parameters, per data set (None: no target beyond the most suspicious negative; NC keeps the authors' 2.0):")
    print(json.dumps(per_dataset(results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
