"""The report's tables of a set of Results: the paper's Table 1 layout (rows dataset x scheme,
columns defenses, per protocol), Table 2 (clean accuracy / ASR per scheme), the outcomes against
the truth, the rates over seeds and the budgets used, as rows of strings (text_table and md_table
lay them out). Torch-free."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from qbd import rates
from qbd.figure import scheme_key

SYMBOL = {"detected": "DETECTED", "clean": "clean", "invalid": "INVALID"}
MARK = {"finding": " [finding]", "FAIL": " [FAIL]"}  # a cell that matches the truth carries no mark


def row_label(r: dict[str, Any]) -> str:
    fetched = " (fetched weights)" if (r.get("weights") or {}).get("origin") == "fetched" else ""
    return (r["dataset"] if r.get("attack") is not None else f"{r['dataset']} (clean model)") + fetched


def table1(results: list[dict[str, Any]], protocol: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows: dataset | scheme | one column per defense, cells status words."""
    rs = [r for r in results if r["defense"]["protocol"] == protocol]
    defenses = sorted({r["defense"]["name"] for r in rs})
    cells: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for r in rs:
        v = r["verdict"]
        word = SYMBOL[v["status"]]
        if v["status"] == "detected" and v.get("target_class") is not None:
            word += f" (t={v['target_class']})"
        if v["status"] == "invalid" and v.get("reason_code"):
            word += f" ({v['reason_code']})"
        judgement = (r.get("judgement") or {}).get("judgement")
        if judgement in MARK:
            word += MARK[judgement]
        cells[(row_label(r), r["quant"]["scheme"])][r["defense"]["name"]] = word
    rows = [
        [ds, sc, *[cells[(ds, sc)].get(d, "-") for d in defenses]]
        for ds, sc in sorted(cells, key=lambda k: (k[0], scheme_key(k[1])))
    ]
    return ["dataset", "scheme", *defenses], rows


def table2(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        seen.setdefault((row_label(r), r["quant"]["scheme"]), r)
    rows = []
    for (ds, sc), r in sorted(seen.items(), key=lambda kv: (kv[0][0], scheme_key(kv[0][1]))):
        audit = r["quant"]["audit"]
        asr = "-" if r["asr"] is None else f"{100 * r['asr']:.1f}"
        rows.append([ds, sc, f"{100 * r['clean_acc']:.1f}", asr, f"{100 * audit['quantized_param_fraction']:.2f}",
                     "yes" if audit["input_gradient"] else "NO"])
    return ["dataset", "scheme", "clean acc %", "ASR %", "quantized params %", "input gradient"], rows


def budgets(results: list[dict[str, Any]]) -> list[str]:
    """One line per (defense, protocol, tier): the hyperparameters actually used."""
    seen: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in results:
        seen.setdefault((r["defense"]["name"], r["defense"]["protocol"], r.get("tier", "?")), r["defense"]["params"])
    return [f"{d} [{p}, {t} tier]: " + (", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "(it records no params)")
            for (d, p, t), params in sorted(seen.items())]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)] if rows else [len(h) for h in header]
    def fmt(row: list[str]) -> str:
        return "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]])


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |" for r in rows]  # a | in a why splits no cell
    return "\n".join(lines)


def protocols(results: list[dict[str, Any]]) -> list[str]:
    return sorted({r["defense"]["protocol"] for r in results})


def invalid_reasons(results: list[dict[str, Any]]) -> list[str]:
    return [f"{r['cell']}{seed_note(r)}{'' if r.get('attack') else ' (clean model)'}: [{r['verdict'].get('reason_code') or 'unspecified'}]"
            f" {r['verdict']['reason']}" for r in results if r["verdict"]["status"] == "invalid"]


UNCALIBRATED_NOTE = ("a threshold no calibration was made for: the pooled value of the data sets that have one, which"
                     " does not carry across data sets (docs/defenses.md#thresholds-per-data-set)")


def uncalibrated(results: list[dict[str, Any]]) -> list[str]:
    """One line per (data set, defense, threshold) whose verdicts a data set's own calibration did
    not decide: the pooled "*" entry of a per-data-set threshold (qbd.defenses._per_dataset)."""
    found: dict[tuple[str, str, str], str] = {}
    for r in results:
        ev = r["verdict"].get("evidence")
        labels = ev.get("threshold_calibrated_for") if isinstance(ev, dict) else None
        for param, label in (labels.items() if isinstance(labels, dict) else ()):
            if isinstance(label, str) and label.startswith("*"):
                found.setdefault((r.get("dataset", "?"), r["defense"]["name"], param), label)
    return [f"{ds} / {name}: {param} = {label}" for (ds, name, param), label in sorted(found.items())]


def seed_note(r: dict[str, Any]) -> str:
    return f" (seed {r['seed']})" if r.get("seed") else ""


def judged(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r.get("judgement")]


def count_line(results: list[dict[str, Any]]) -> str | None:
    """"N cells match the truth, N declared findings, N failing" (None when nothing was judged)."""
    from qbd.outcomes import Counts

    js = [r["judgement"]["judgement"] for r in judged(results)]
    return Counts.of(js).line() if js else None


def outcomes(results: list[dict[str, Any]], *, passing: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows: cell | verdict | outcome vs the truth | judgement | why (findings and
    failures; the passing cells too with `passing`)."""
    from qbd.outcomes import verdict_word

    rows = []
    for r in sorted(judged(results), key=lambda r: (r["judgement"]["judgement"] != "FAIL", r["cell"], r.get("seed", 0))):
        j = r["judgement"]
        if j["judgement"] == "pass" and not passing:
            continue
        why = (j.get("why") or "").splitlines()[0] if j["judgement"] != "pass" else ""
        cell = r["cell"] + seed_note(r)
        rows.append([cell, verdict_word(r), j["outcome"], j["judgement"], why])
    return ["cell", "verdict", "outcome", "judgement", "why"], rows


# -- rates over seeds ---------------------------------------------------------------------------------
def several_seeds(rows: list[dict[str, Any]]) -> bool:
    """Whether any row holds more than one model seed (a single-seed run's fp32 row holds a
    backdoored and a clean model of one seed: no rate to speak of)."""
    return any(len(row["seeds"]) > 1 for row in rows)


def first_seed(results: list[dict[str, Any]]) -> tuple[int | None, list[dict[str, Any]]]:
    """The lowest seed and its Results (what Tables 1 and 2 show over several seeds)."""
    if not results:
        return None, []
    s = min(r.get("seed", 0) for r in results)
    return s, [r for r in results if r.get("seed", 0) == s]


def seeds_text(seeds: list[int]) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def rates_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: row | detection "k/n = r [lo, hi]" | false alarms likewise | invalid | seeds."""
    out = [[row["row"], rates.fraction(row["detected"], row["n_backdoored"], row["detection_ci"]),
            rates.fraction(row["false_alarms"], row["n_clean"], row["false_alarm_ci"]), str(row["invalid"]),
            seeds_text(row["seeds"])] for row in rows]
    return ["row", "detection (right target) [95 % CI]", "false alarms [95 % CI]", "invalid", "seeds"], out


RATES_NOTE = ("Wilson 95 % intervals; a detection names the planted target (a wrong target is not one) and an invalid"
              " verdict counts as not detected.")


def shown_cells(results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The Results Tables 1 and 2 show, and the note on their titles."""
    if not several_seeds(rows):
        return results, ""
    seed, rs = first_seed(results)
    return rs, f", seed {seed}'s models; every seed's in Rates over seeds"


