"""scripts/attack_spread.py: the options that plant each setting, and the gate on the headline
count (settings named on a majority of models) that a row's one-model tolerance would let move."""

import importlib.util
import json
from pathlib import Path

from qbd.expectations import load_for
from qbd.presets import SPREAD_ATTACKS

_spec = importlib.util.spec_from_file_location("attack_spread", Path(__file__).resolve().parents[2] / "scripts" / "attack_spread.py")
attack_spread = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(attack_spread)


def test_the_options_plant_exactly_the_preset(tmp_path):
    from qbd.cli import build_parser
    from qbd.cli_options import job_from_args

    for name, attack in SPREAD_ATTACKS.items():
        args = build_parser().parse_args(["run", "--dataset", "digits", *attack_spread.options(attack)])
        assert job_from_args(args).attack.to_dict() == attack.to_dict(), name


def _runs_as_declared(out: Path, flip: tuple[str, str] | None = None) -> None:
    """Saved runs whose models match every declared spread row's backdoored counts; `flip`
    (setting, row id) loses one model's detection there."""
    table = load_for("smoke")
    for name, attack in SPREAD_ATTACKS.items():
        by_ds: dict[str, list[dict]] = {}
        for rid, entry in table.attacks[f"spread-{name}"]["rows"].items():
            ds, defense = rid.split("/", 1)[0], rid.split("/")[2].split("[")[0]
            hits = entry["backdoored"].get("pass", 0) - (1 if flip == (name, rid) else 0)
            for seed in entry["seeds"]:
                named = seed < hits
                by_ds.setdefault(ds, []).append({
                    "seed": seed, "asr": 1.0, "attack": {**attack.to_dict(), "seed": seed},
                    "defense": {"name": defense, "names_target": True},
                    "verdict": {"status": "detected" if named else "clean", "target_class": attack.target if named else None}})
        for ds, results in by_ds.items():
            attack_spread._file(out, ds, name).write_text(json.dumps({"results": results}))


def test_a_moved_majority_fails_even_where_each_row_passes(tmp_path):
    _runs_as_declared(tmp_path)
    assert attack_spread.majority_changes(tmp_path) == []
    # the synthetic NC row on BadNet at 3 %, 3 of 5: one model lost keeps the row within its
    # tolerance, and moves NC's synthetic count from 5 settings to 4
    rid = "synthetic/fp32/neural-cleanse[canonical]"
    assert load_for("smoke").attacks["spread-badnet-3pct"]["rows"][rid]["backdoored"]["pass"] == 3
    for f in tmp_path.iterdir():
        f.unlink()
    _runs_as_declared(tmp_path, flip=("badnet-3pct", rid))
    assert attack_spread.majority_changes(tmp_path) == [
        "synthetic neural-cleanse: named on a majority of models on 4 settings, declared 5"]
