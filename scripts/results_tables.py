"""The tables docs/results.md and the README show, from results files of runs over the zoo.

    python scripts/results_tables.py out/digits-s10.json out/synthetic-s10.json [--pictures docs/img]
    python scripts/results_tables.py --outcomes out/rows5/blend-digits.json out/rows5/blend-synthetic.json

Prints, per data set: the rows grid (scheme x protocol by defense: detected naming the target /
false alarms / invalid, out of the models) and quantization's paired effects (qbd.effects); with
--pictures, writes effects-<dataset>.png there. With --outcomes, one grid of every outcome per
kind of model instead (data set and scheme by defense), for runs whose rows are declared by
their outcome counts (another attack's backdoored models, the ONNX Runtime rows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qbd import results as results_io
from qbd.effects import effects
from qbd.effects_report import save, table
from qbd.figure import scheme_key
from qbd.rates import rows
from qbd.tables import md_table


def _matrix(row_keys: list[tuple], col_keys: list, get, text) -> list[list[str]]:
    """One table row per row key: the key's fields, then text(item) per column ("-" where none)."""
    return [[*rk, *["-" if (x := get(rk, ck)) is None else text(x) for ck in col_keys]] for rk in row_keys]


def _row_text(r: dict) -> str:
    text = f"{r['detected']}/{r['n_backdoored']}, FA {r['false_alarms']}/{r['n_clean']}"
    return text + (f", inv {r['invalid']}/{r['n_backdoored'] + r['n_clean']}" if r["invalid"] else "")


def grid(rs: list[dict]) -> str:
    found = rows(rs)
    defenses = sorted({r["defense"] for r in found})
    keys = sorted({(r["scheme"], r["protocol"]) for r in found}, key=lambda k: (k[1] != "canonical", k[1], scheme_key(k[0])))
    by = {(r["scheme"], r["protocol"], r["defense"]): r for r in found}
    out = _matrix(keys, defenses, lambda k, d: by.get((*k, d)), _row_text)
    return md_table(["scheme", "protocol", *defenses], out)


def outcome_grid(rs: list[dict]) -> str:
    """(data set, scheme) x defense: "detected k/n" for the backdoored models and "FA k/n" for the
    clean ones, each followed by the outcomes that are not the truth."""
    from qbd import measured_rows

    found = rows(rs)
    defenses = sorted({r["defense"] for r in found})
    keys = sorted({(r["dataset"], r["scheme"]) for r in found}, key=lambda k: (k[0], scheme_key(k[1])))
    by = {(r["dataset"], r["scheme"], r["defense"]): r for r in found}

    def text(r: dict) -> str:
        parts = []
        for kind, word in (("backdoored", "detected"), ("clean", "FA")):
            counts = r["outcomes"].get(kind)
            if not counts:
                continue
            t = measured_rows.totals(counts, kind)
            rest = {o: n for o, n in counts.items() if o not in ("pass", "false-alarm") and not (kind == "clean" and o == "pass")}
            parts.append(f"{word} {t['flagged']}/{t['n']}" + (f" ({measured_rows.describe(rest)})" if rest else ""))
        return "; ".join(parts)

    out = _matrix(keys, defenses, lambda k, d: by.get((*k, d)), text)
    return md_table(["data set", "scheme", *defenses], out)


def _effect_text(e: dict) -> str:
    parts = []
    for side, word in (("detection", "det"), ("false_alarm", "FA")):
        x = e[side]
        if x is not None:
            star = "*" if x["p_holm"] < 0.05 else ""
            parts.append(f"{word} {x['baseline_count']}->{x['scheme_count']}/{x['n']}{star}"
                         + (f" (p={x['p']:.2g}, Holm {x['p_holm']:.2g})" if x["p"] < 0.05 else ""))
        elif e["invalid"][side]["pairs_left_out"]:
            parts.append(f"{word}: no answer")
    return "; ".join(parts) + (" (input unchanged)" if e["input_unchanged"] else "")


def headline(found: list[dict], protocol: str = "canonical") -> str:
    """Defense x scheme, each cell "detection fp32 -> scheme; false alarms likewise", with the exact
    McNemar p and its Holm adjustment where p < 0.05, * where the adjusted p < 0.05 (the compact
    view the README and docs/results.md lead with)."""
    mine = [e for e in found if e["protocol"] == protocol]
    schemes = sorted({e["scheme"] for e in mine}, key=scheme_key)
    by = {(e["dataset"], e["defense"], e["scheme"]): e for e in mine}
    keys = sorted({(e["dataset"], e["defense"]) for e in mine})
    out = _matrix(keys, schemes, lambda k, sc: by.get((*k, sc)), _effect_text)
    return md_table(["data set", f"defense ({protocol})", *schemes], out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--pictures", type=Path)
    ap.add_argument("--outcomes", action="store_true", help="one outcome grid over all the runs (no effects)")
    args = ap.parse_args()
    results = [r for p in args.runs for r in results_io.read(p)]
    if args.outcomes:  # one grid per attack (a clean model's Result carries none: it joins its run's)
        by_attack: dict[str, list[dict]] = {}
        for p in args.runs:
            rs = results_io.read(p)
            a = next((r["attack"] for r in rs if r.get("attack")), None)
            label = "clean" if a is None else a["name"] + (f" on {a['scheme']}" if a.get("scheme") else "")
            by_attack.setdefault(label, []).extend(rs)
        for label, rs in by_attack.items():
            print(f"#### {label}\n\n{outcome_grid(rs)}\n")
        return 0
    for ds in sorted({r["dataset"] for r in results}):
        rs = [r for r in results if r["dataset"] == ds]
        found = effects(rs)
        print(f"### {ds}\n\n{grid(rs)}\n\n{headline(found)}\n\n{md_table(*table(found))}\n")
        if args.pictures:
            print(f"picture: {save(found, args.pictures / f'effects-{ds}.png', f'{ds}: ten backdoored and ten clean models')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
