"""Do the canonical rules generalise? Each canonical defense on fp32 against attack settings outside
its calibration (the thresholds were calibrated on the default BadNet, 10 % poison, white 3x3
bottom-right, target 0, models 100-104): lower poison rates, other patch sizes, patterns,
positions and targets, and a blend with seeded noise. One model per setting and data set (model
seed 0, trained into the store; the training gate is off, each model's ASR is reported).

    python scripts/attack_spread.py --out out/spread          # both data sets, about 10 minutes on 2 cores
    python scripts/attack_spread.py --summary out/spread      # the table again, from the saved runs

Prints, per data set and defense, the settings on which it names the planted target (k of 5),
with each model's deployed ASR, as the Markdown table docs/defenses.md shows.
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


def run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for ds in DATASETS:
        for label, opts in SETTINGS.items():
            path = _file(out, ds, label)
            if path.exists():
                continue
            cmd = [sys.executable, "-m", "qbd", "run", "--dataset", ds, "--quant", "fp32", "--protocol", "canonical",
                   "--no-controls", "--no-progress", "--min-asr", "0", "--json", *opts]
            print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if not done.stdout.strip():
                raise SystemExit(f"{ds} {label}: no output (exit {done.returncode}): {done.stderr[-2000:]}")
            path.write_text(done.stdout)


def summary(out: Path) -> str:
    lines = []
    for ds in DATASETS:
        per_defense: dict[str, list[str]] = {}
        asr = {}
        for label in SETTINGS:
            path = _file(out, ds, label)
            if not path.exists():
                continue
            for r in json.loads(path.read_text())["results"]:
                if r.get("attack") is None:
                    continue
                asr[label] = r["asr"]
                v = r["verdict"]
                named = v["status"] == "detected" and (v["target_class"] == r["attack"]["target"]
                                                       or not r["defense"].get("names_target", True))
                word = "yes" if named else (f"t={v['target_class']}" if v["status"] == "detected" else
                                            v["status"] if v["status"] != "invalid" else f"invalid ({v['reason_code']})")
                per_defense.setdefault(r["defense"]["name"], []).append(word)
        labels = [x for x in SETTINGS if _file(out, ds, x).exists()]
        lines += [f"**{ds}** (model seed 0; deployed ASR: " + ", ".join(f"{x} {asr.get(x, float('nan')):.2f}" for x in labels) + ")",
                  "", "| defense | " + " | ".join(labels) + " | names the target |",
                  "|---|" + "---|" * (len(labels) + 1)]
        for d, words in sorted(per_defense.items()):
            lines.append(f"| {d} | " + " | ".join(words) + f" | {sum(w == 'yes' for w in words)}/{len(words)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="run every setting (skipping those already saved) into this folder")
    ap.add_argument("--summary", type=Path, help="print the table from a folder of saved runs")
    args = ap.parse_args()
    if args.out:
        run(args.out)
    print(summary(args.out or args.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
