"""Every bound the shipped table declares can fail: for each measured row, each declared cell
finding, each other attack's finding and each deployed-model bound, fabricated Results that
reproduce what was measured pass, and plausible regressions fail:

- a row over its seeds: two detections lost (or gained, where fewer than two were detected), two
  false alarms gained (or lost), two more invalid verdicts;
- a single-seed cell of a row: an outcome the row never measured on that kind of model (the named
  class changed, a miss where every model was detected, a false alarm where none was measured);
- a cell finding: the truth, another outcome, another named class; a borderline finding whose
  statistic left its margin, or whose target's own statistic moved (the shipped table declares
  none, every finding being a row's over its models; an author's table on top of it may, and one
  finding of each kind is checked there);
- a deployed model's clean accuracy or ASR beyond its bound.

Torch-free and fast: nothing runs a defense; the Results are made to order."""

from __future__ import annotations

import pytest

from qbd import measured_rows
from qbd.expectations import load, load_for, shipped
from qbd.outcomes import declared_outcome

TABLE = load(shipped("smoke"))
META = dict(TABLE.attack_spec)
MEASURED = sorted(rid for rid, e in TABLE.rows.items() if measured_rows.is_measured(e))
# every measured row, meta's ([rows]) and each other attack's ([attacks.<name>.rows]): (section, row id)
ALL_ROWS = [(None, rid) for rid in MEASURED] + sorted((name, rid) for name, s in TABLE.attacks.items() for rid in s.get("rows", {}))


def _entry(section: str | None, rid: str) -> tuple[dict, dict]:
    """A measured row's entry and the attack its backdoored models carry."""
    if section is None:
        return TABLE.rows[rid], META
    return TABLE.attacks[section]["rows"][rid], TABLE.attacks[section]["attack"]


def _parse(cell: str) -> tuple[str, bool, str, str, str]:
    """'digits:clean/int4-sim/neural-cleanse[paper]' -> (digits, clean, int4-sim, neural-cleanse, paper)."""
    ds, scheme, rest = cell.split("/")
    defense, protocol = rest[:-1].split("[")
    clean = ds.endswith(":clean")
    return ds.removesuffix(":clean"), clean, scheme, defense, protocol


def _result(cell: str, o: str, seed: int = 0, attack: dict | None = None, names_target: bool = True,
            score: float | None = None, threshold: float | None = None) -> dict:
    """A Result of `cell` whose outcome against its truth is `o` (qbd.outcomes' words)."""
    ds, clean, scheme, defense, protocol = _parse(cell)
    atk = None if clean else {**(attack or META), "seed": seed}
    target = None if atk is None else atk["target"]
    kind, _, code = o.partition(":")
    status, named = {"pass": ("clean", None) if clean else ("detected", target), "miss": ("clean", None),
                     "false-alarm": ("detected", 1), "wrong-target": ("detected", (target + 1) % 10 if target is not None else 1),
                     "invalid": ("invalid", None)}[kind]
    return {"cell": cell, "dataset": ds, "seed": seed, "attack": atk, "quant": {"scheme": scheme},
            "defense": {"name": defense, "protocol": protocol, "names_target": names_target},
            "verdict": {"status": status, "target_class": named, "reason_code": code or None,
                        "reason": "r" if kind == "invalid" else None, "score": score, "threshold": threshold,
                        "evidence": {}, "controls": {}}}


def _row_results(rid: str, counts: dict[str, dict[str, int]], seeds: list[int], attack: dict | None = None) -> list[dict]:
    ds, _, rest = rid.partition("/")
    out = []
    for kind in measured_rows.KINDS:
        if kind not in counts:  # an attack's row counts its backdoored models only
            continue
        cell = f"{ds}:clean/{rest}" if kind == "clean" else rid
        outcomes = [o for o, n in counts[kind].items() for _ in range(n)]
        out += [_result(cell, o, seed, attack) for o, seed in zip(outcomes, seeds, strict=True)]
    return out


def _moved(counts: dict[str, int], kind: str, k: int = 2) -> dict[str, int] | None:
    """`counts` with k models moved off the truth's side (or onto it, where fewer than k are on it)."""
    truth = "pass" if kind == "backdoored" else "false-alarm"
    other = "miss" if kind == "backdoored" else "pass"
    c = dict(counts)
    if c.get(truth, 0) >= k:
        c[truth] -= k
        c[other] = c.get(other, 0) + k
    else:
        takers = [o for o in c if o != truth and c[o] > 0]
        if sum(c[o] for o in takers) < k:
            return None
        left = k
        for o in takers:
            step = min(left, c[o])
            c[o] -= step
            left -= step
        c[truth] = c.get(truth, 0) + k
    return {o: n for o, n in c.items() if n > 0}


def test_the_shipped_table_measures_its_rows():
    assert len(MEASURED) >= 80, "every BadNet row of the smoke tier, both data sets, is measured over its models"
    assert all(len(TABLE.rows[rid]["seeds"]) >= 10 for rid in MEASURED if "onnx" not in rid)
    # the ONNX Runtime schemes' rows and the other attacks' rows: over at least five models each
    assert all(len(_entry(s, rid)[0]["seeds"]) >= 5 for s, rid in ALL_ROWS)
    assert {s for s, _ in ALL_ROWS} >= {None, "blend", "quant-conditioned", "quant-conditioned-int8-static"}


def _id(key: tuple[str | None, str]) -> str:
    return f"{key[0] or 'rows'}:{key[1]}"


@pytest.mark.parametrize("key", ALL_ROWS, ids=_id)
def test_a_row_fails_when_two_models_move(key):
    entry, attack = _entry(*key)
    rid = key[1]
    seeds = entry["seeds"]
    from qbd.rates import rows

    (row,) = rows(_row_results(rid, entry, seeds, attack))
    assert TABLE.check_row(row, attack) == [], "the measured counts themselves must pass"
    for kind in measured_rows.KINDS:
        if kind not in entry:
            continue
        moved = _moved(entry[kind], kind)
        assert moved is not None
        (row,) = rows(_row_results(rid, {**entry, kind: moved}, seeds, attack))
        assert TABLE.check_row(row, attack), f"{rid}: two {kind} models moved across the truth, and the row still passes"
        # two more invalid verdicts (taken from the truth's side, or any other)
        c = dict(entry[kind])
        donor = max(c, key=c.get)
        if c[donor] >= 2 and not donor.startswith("invalid:"):
            c[donor] -= 2
            c["invalid:no-signal"] = c.get("invalid:no-signal", 0) + 2
            (row,) = rows(_row_results(rid, {**entry, kind: {o: n for o, n in c.items() if n}}, seeds, attack))
            assert TABLE.check_row(row, attack), f"{rid}: two more invalid {kind} verdicts, and the row still passes"


PLAUSIBLE = {"backdoored": ("pass", "miss", "wrong-target", "invalid:not-converged", "invalid:no-signal", "invalid:no-gradient"),
             "clean": ("pass", "false-alarm", "invalid:not-converged", "invalid:no-signal", "invalid:no-gradient")}


@pytest.mark.parametrize("key", ALL_ROWS, ids=_id)
def test_a_single_seed_cell_fails_an_outcome_its_row_never_measured(key):
    entry, attack = _entry(*key)
    rid = key[1]
    ds, _, rest = rid.partition("/")
    for kind in measured_rows.KINDS:
        if kind not in entry:  # an attack's row counts its backdoored models only
            continue
        cell = f"{ds}:clean/{rest}" if kind == "clean" else rid
        for o in entry.get(kind, {}):
            assert TABLE.judge(_result(cell, o, attack=attack)).judgement != "FAIL", f"{cell}: measured {o}, yet it fails"
        unseen = [o for o in PLAUSIBLE[kind] if o not in entry.get(kind, {})]
        assert unseen, f"{rid}: the row admits every plausible {kind} outcome"  # only a crash could fail it
        for o in unseen:
            assert TABLE.judge(_result(cell, o, attack=attack)).judgement == "FAIL", f"{cell}: {o} was never measured, yet it passes"
        assert TABLE.judge(_result(cell, "invalid:error", attack=attack)).judgement == "FAIL"


def _declared_cells(table) -> list[tuple[str, str, dict, dict | None]]:
    out = [("cells", c, f, None) for c, f in sorted(table.cells.items()) if "outcome" in f]
    for name, section in sorted(table.attacks.items()):
        out += [(name, c, f, section["attack"]) for c, f in sorted(section["cells"].items())]
    return out


CELLS = _declared_cells(TABLE)

# A defense author's own table (on top of the shipped one) may still declare single cells: one
# finding of each kind, on a third-party defense's cells (a built-in's cells are judged by rows)
AUTHOR_TABLE = """
[cells."synthetic/int4-sim/author-defense[canonical]"]
outcome = "miss"
why = "measured"

[cells."synthetic/int8-static/author-defense[canonical]"]
outcome = "wrong-target"
target = 3
why = "measured"

[cells."synthetic:clean/int4-sim/author-defense[canonical]"]
outcome = "false-alarm"
why = "measured"

[cells."digits/int8-static/author-defense[canonical]"]
outcome = "invalid"
reason_code = "no-gradient"
why = "measured"

[cells."digits/int4-sim/author-defense[canonical]"]
outcome = "borderline"
margin = 0.2
why = "measured"
"""


def test_the_shipped_table_pins_no_single_model_outcome():
    """Every shipped finding is a row's, over its models: no entry pins what one model did."""
    assert CELLS == []


@pytest.fixture(scope="module")
def author_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("author") / "expectations.toml"
    path.write_text(AUTHOR_TABLE)
    return load_for("smoke", path)


def test_a_declared_cell_finding_fails_when_it_stops_holding(author_table):
    """Every cell finding of the layered table (the shipped table's, none today, and the author's
    five) holds as declared and fails under each plausible regression."""
    cells = _declared_cells(author_table)
    assert sum("author-defense" in c for _, c, _, _ in cells) == 5 and len(cells) == 5 + len(CELLS)
    for _, cell, finding, attack in cells:
        _check_cell_finding(author_table, cell, finding, attack)


def _check_cell_finding(table, cell: str, finding: dict, attack: dict | None) -> None:
    names_target = not cell.split("/")[2].startswith("fine-pruning")
    judge = table.judge
    if finding["outcome"] == "borderline":
        margin, clean = finding["margin"], ":clean/" in cell
        thr = 2.0
        other = "false-alarm" if clean else "miss"
        near = _result(cell, other, attack=attack, names_target=names_target, score=thr - margin / 2, threshold=thr)
        assert judge(near).judgement == "finding"
        for o, score in ((other, thr - 2 * margin), ("pass", thr + 2 * margin)):
            far = _result(cell, o, attack=attack, names_target=names_target, score=score, threshold=thr)
            assert judge(far).judgement == "FAIL", f"{cell}: {o} at {score} vs {thr} +- {margin} still holds"
        if not clean:  # the target's own statistic moved, the model-level score did not
            moved = _result(cell, "pass", attack=attack, names_target=names_target, score=thr + margin / 2, threshold=thr)
            moved["verdict"]["evidence"] = {"per_class_score": [thr + 3 * margin] * 12}
            assert judge(moved).judgement == "FAIL"
        return
    declared = declared_outcome(finding)
    kw = {"attack": attack, "names_target": names_target}
    held = _result(cell, declared, **kw)
    if "target" in finding:
        held["verdict"]["target_class"] = finding["target"]
    assert judge(held).judgement == "finding", f"{cell}: the declared {declared} itself fails"
    assert judge(_result(cell, "pass", **kw)).judgement == "FAIL", f"{cell}: the truth passes a declared {declared}"
    kind = "clean" if ":clean/" in cell else "backdoored"
    others = [o for o in (*PLAUSIBLE[kind], "invalid:error") if o not in (declared, "pass")]
    for o in others:
        assert judge(_result(cell, o, **kw)).judgement == "FAIL", f"{cell}: {o} passes a declared {declared}"
    if "target" in finding:
        changed = _result(cell, declared, **kw)
        changed["verdict"]["target_class"] = finding["target"] + 1
        assert judge(changed).judgement == "FAIL", f"{cell}: another named class passes a pinned wrong target"


BOUNDED = sorted(TABLE.attack)


@pytest.mark.parametrize("key", BOUNDED)
def test_a_deployed_models_bound_fails_beyond_it(key):
    bounds = TABLE.attack_bounds(key)
    for bound, value in bounds.items():
        name = bound.split("_", 1)[1]
        beyond = value - 0.05 if bound.startswith("min") else value + 0.05
        ca, asr = (beyond, 0.99) if name == "clean_acc" else (0.99, beyond)
        if not 0 <= beyond <= 1:
            continue
        assert TABLE.check_attack(key, ca, asr), f"{key}: {name} {beyond} passes {bound} {value}"
