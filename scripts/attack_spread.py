"""Do the canonical rules generalise? Each canonical defense on fp32 against attack settings outside
its calibration (the thresholds were calibrated on the default BadNet, 10 % poison, white 3x3
bottom-right, target 0, models 100-104): lower poison rates, other patch sizes, patterns,
positions and targets, and a blend with seeded noise. N models per setting and data set (model
seeds 0..N-1, trained into the store, not pinned; the training gate is off, each model's ASR is
reported).

    python scripts/attack_spread.py --out out/spread5 --seeds 5   # both data sets, five models per setting
    python scripts/attack_spread.py --summary out/spread5         # the table again, from the saved runs

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

# label -> qbd run attack options (none is the calibration attack)
SETTINGS = {
    "badnet 1 %": ["--poison-rate", "0.01"],
    "badnet 3 %": ["--poison-rate", "0.03"],
    "checkerboard 5x5 top-left t=4": ["--trigger-pattern", "checkerboard", "--trigger-size", "5", "--trigger-position",
                                      "top-left", "--target", "4"],
    "random 4x4 top-right t=7": ["--trigger-pattern", "random", "--trigger-size", "4", "--trigger-position", "top-right",
                                 "--target", "7"],
    "blend noise a=0.2 t=1": ["--attack", "blend", "--trigger-pattern", "random", "--blend-alpha", "0.2", "--target", "1"],
}
DATASETS = ("digits", "synthetic")


def _file(out: Path, ds: str, label: str) -> Path:
    return out / f"{ds}-{label.replace(' ', '_').replace('%', 'pct').replace('=', '')}.json"


def run(out: Path, seeds: int = 1, datasets: tuple[str, ...] = DATASETS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for ds in datasets:
        for label, opts in SETTINGS.items():
            path = _file(out, ds, label)
            if path.exists():
                continue
            cmd = [sys.executable, "-m", "qbd", "run", "--dataset", ds, "--quant", "fp32", "--protocol", "canonical",
                   "--no-controls", "--no-progress", "--min-asr", "0", "--json", "--seeds", str(seeds), *opts]
            print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if not done.stdout.strip():
                raise SystemExit(f"{ds} {label}: no output (exit {done.returncode}): {done.stderr[-2000:]}")
            path.write_text(done.stdout)


def summary(out: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from qbd.rates import wilson

    lines = []
    for ds in DATASETS:
        named: dict[str, dict[str, list[bool]]] = {}  # defense -> setting -> per model
        asr: dict[str, dict[int, float]] = {}
        for label in SETTINGS:
            path = _file(out, ds, label)
            if not path.exists():
                continue
            for r in json.loads(path.read_text())["results"]:
                if r.get("attack") is None:
                    continue
                v = r["verdict"]
                hit = v["status"] == "detected" and (v["target_class"] == r["attack"]["target"]
                                                     or not r["defense"].get("names_target", True))
                named.setdefault(r["defense"]["name"], {}).setdefault(label, []).append(hit)
                asr.setdefault(label, {})[r["seed"]] = r["asr"]  # fp32's: the same for every defense
        labels = [x for x in SETTINGS if _file(out, ds, x).exists()]
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
    ap.add_argument("--seeds", type=int, default=5, help="models per setting and data set (default: 5)")
    ap.add_argument("--dataset", default=",".join(DATASETS), help=f"comma-separated (default: {','.join(DATASETS)})")
    args = ap.parse_args()
    if args.out:
        run(args.out, args.seeds, tuple(args.dataset.split(",")))
    print(summary(args.out or args.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
