"""Do the canonical rules generalise? Each canonical defense on fp32 against the attack settings
outside its calibration (qbd.presets.SPREAD_ATTACKS; the thresholds were calibrated on the default
BadNet, 10 % poison, white 3x3 bottom-right, target 0, models 100-104): lower poison rates, another
patch size, pattern, corner and target, and a blend with seeded noise. The models are the pinned
zoo's, on qbd.zoo.pinned.SPREAD_SEEDS; a setting that does not take on a data set
(qbd.zoo.pinned.SPREAD_UNTAKEN) is not run there.

    python scripts/attack_spread.py --out out/spread5          # both data sets, every pinned setting
    python scripts/attack_spread.py --summary out/spread5      # the table again, from the saved runs
    python scripts/declare_rows.py out/spread5/*.json          # the shipped table's [attacks."spread-*"] rows
    python scripts/attack_spread.py --out reports/spread --expectations   # judged against them (exit 1 on a failing row)

Prints, per data set and defense, the models of each setting on which it names the planted target
(k of N, with its Wilson interval) and the settings where it names it on a majority of the
models, with the models' deployed ASR, as docs/defenses.md shows. The settings reuse the model
seeds, so their models are not pooled into one rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qbd.config import AttackSpec
from qbd.outcomes import outcome
from qbd.presets import SPREAD_ATTACKS
from qbd.rates import wilson
from qbd.zoo.pinned import SPREAD_MIN_ASR, SPREAD_SEEDS, SPREAD_UNTAKEN

DATASETS = ("digits", "synthetic")


def options(a: AttackSpec) -> list[str]:
    """The `qbd run` options that plant exactly `a`."""
    opts = ["--attack", a.name, "--target", str(a.target), "--trigger-pattern", a.trigger_pattern,
            "--trigger-size", str(a.trigger_size), "--trigger-position", a.trigger_position, "--poison-rate", repr(a.poison_rate)]
    return opts + (["--blend-alpha", repr(a.alpha)] if a.name == "blend" else [])


def settings(ds: str) -> list[str]:
    return [name for name in SPREAD_ATTACKS if name not in SPREAD_UNTAKEN.get(ds, ())]


def _file(out: Path, ds: str, name: str) -> Path:
    return out / f"{ds}-{name}.json"


def run(out: Path, datasets: tuple[str, ...] = DATASETS, *, expectations: bool = False) -> list[str]:
    """Run every pinned setting not yet saved in `out`; with `expectations`, each run judges its
    rows against the shipped table. The runs whose rows failed (exit 1)."""
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for ds in datasets:
        for name in settings(ds):
            path = _file(out, ds, name)
            if path.exists():
                continue
            cmd = [sys.executable, "-m", "qbd", "run", "--dataset", ds, "--quant", "fp32", "--protocol", "canonical",
                   "--no-controls", "--no-progress", "--json", "--min-asr", str(SPREAD_MIN_ASR), "--seeds", ",".join(map(str, SPREAD_SEEDS)),
                   *options(SPREAD_ATTACKS[name]), *([] if expectations else ["--no-gate"])]
            print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if not done.stdout.strip() or done.returncode not in (0, 1):
                raise SystemExit(f"{ds} {name}: no results (exit {done.returncode}): {done.stderr[-2000:]}")
            path.write_text(done.stdout)
            if done.returncode == 1:
                print(done.stderr[-4000:], file=sys.stderr)
                failed.append(f"{ds} {name}")
    return failed


def _majorities(out: Path) -> dict[tuple[str, str], int]:
    """(data set, defense) -> the settings whose saved runs name the target on a majority of models."""
    hits: dict[tuple[str, str, str], list[bool]] = {}
    for ds in DATASETS:
        for name in settings(ds):
            path = _file(out, ds, name)
            for r in json.loads(path.read_text())["results"] if path.exists() else []:
                if r.get("attack") is not None:  # the backdoored models: named is qbd's own "pass" against the truth
                    hits.setdefault((ds, r["defense"]["name"], name), []).append(outcome(r) == "pass")
    out_: dict[tuple[str, str], int] = {}
    for (ds, defense, _), h in hits.items():
        out_[(ds, defense)] = out_.get((ds, defense), 0) + (2 * sum(h) > len(h))
    return out_


def declared_majorities() -> dict[tuple[str, str], int]:
    """The same count from the shipped table's spread rows (their backdoored models' pass counts)."""
    from qbd.expectations import load_for

    table = load_for("smoke")
    out: dict[tuple[str, str], int] = {}
    for name in SPREAD_ATTACKS:
        for rid, entry in table.attacks[f"spread-{name}"]["rows"].items():
            ds, defense = rid.split("/", 1)[0], rid.split("/")[2].split("[")[0]
            counts = entry["backdoored"]
            out[(ds, defense)] = out.get((ds, defense), 0) + (2 * counts.get("pass", 0) > sum(counts.values()))
    return out


def majority_changes(out: Path) -> list[str]:
    """Where a run's settings-on-a-majority count differs from the declared rows' (docs/defenses.md
    quotes those counts; each row's own tolerance of one model could move them unnoticed)."""
    measured, declared = _majorities(out), declared_majorities()
    return [f"{ds} {d}: named on a majority of models on {measured.get((ds, d), 0)} settings, declared {n}"
            for (ds, d), n in sorted(declared.items()) if measured.get((ds, d), 0) != n and (ds, d) in measured]


def summary(out: Path) -> str:
    lines = []
    for ds in DATASETS:
        named: dict[str, dict[str, list[bool]]] = {}  # defense -> setting -> per model
        asr: dict[str, dict[int, float]] = {}
        for label in settings(ds):
            path = _file(out, ds, label)
            if not path.exists():
                continue
            for r in json.loads(path.read_text())["results"]:
                if r.get("attack") is None:
                    continue
                named.setdefault(r["defense"]["name"], {}).setdefault(label, []).append(outcome(r) == "pass")
                asr.setdefault(label, {})[r["seed"]] = r["asr"]  # fp32's: the same for every defense
        labels = [x for x in settings(ds) if _file(out, ds, x).exists()]
        if not labels:  # a data set not run into this folder
            continue
        spread = ", ".join(f"{x} {min(asr[x].values()):.2f}-{max(asr[x].values()):.2f}" if asr.get(x) else f"{x} n/a"
                           for x in labels)
        lines += [f"**{ds}** (ASR over the models: {spread})", "",
                  "| defense | " + " | ".join(labels) + " | settings named on a majority |",
                  "|---|" + "---|" * (len(labels) + 1)]

        def cell(c: list[bool]) -> str:
            if not c:
                return "-"
            lo, hi = wilson(sum(c), len(c))
            return f"{sum(c)}/{len(c)} [{lo:.2f}, {hi:.2f}]"

        for d, per in sorted(named.items()):
            cells = [per.get(x, []) for x in labels]
            majority = sum(2 * sum(c) > len(c) for c in cells if c)
            lines.append(f"| {d} | " + " | ".join(cell(c) for c in cells) + f" | {majority}/{len(labels)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="run every setting (skipping those already saved) into this folder")
    ap.add_argument("--summary", type=Path, help="print the table from a folder of saved runs")
    ap.add_argument("--dataset", default=",".join(DATASETS), help=f"comma-separated (default: {','.join(DATASETS)})")
    ap.add_argument("--expectations", action="store_true", help="judge each run's rows against the shipped table, and each"
                    " defense's count of settings named on a majority of models against the declared rows'; exit 1 if any fails")
    args = ap.parse_args()
    failed = run(args.out, tuple(args.dataset.split(",")), expectations=args.expectations) if args.out else []
    if args.expectations:
        failed += majority_changes(args.out)
    print(summary(args.out or args.summary))
    if failed:
        print("rows failing the shipped table: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
