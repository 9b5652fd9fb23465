"""scripts/declare_rows.py: measured rows from runs, for meta's attack ([rows]) and for another
attack's section ([attacks.<name>.rows]); the cell findings those rows replace are dropped, and a
rewrite is idempotent."""

import importlib.util
import tomllib
from pathlib import Path

import pytest

from qbd.expectations import load

_spec = importlib.util.spec_from_file_location("declare_rows", Path(__file__).resolve().parents[2] / "scripts" / "declare_rows.py")
declare_rows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(declare_rows)

BADNET = {"name": "badnet", "target": 0, "trigger_pattern": "white", "trigger_size": 3, "trigger_position": "bottom-right",
          "poison_rate": 0.1}
BLEND = {"name": "blend", "target": 2, "trigger_pattern": "checkerboard", "trigger_size": 3, "trigger_position": "bottom-right",
         "poison_rate": 0.1, "alpha": 0.15}
CELL = "digits/fp32/strip[canonical]"
TABLE = f"""# a comment that stays
[meta]
tier = "smoke"

[attacks.blend]
attack = {{ name = "blend", target = 2, trigger_pattern = "checkerboard", trigger_size = 3, trigger_position = "bottom-right", poison_rate = 0.1, alpha = 0.15 }}

[attacks.blend.cells."{CELL}"]
outcome = "miss"
why = "seed 0 only"
"""


def _r(seed, attack, status="detected", target=None):
    clean = attack is None
    return {"cell": CELL.replace("digits/", "digits:clean/") if clean else CELL, "dataset": "digits", "seed": seed,
            "attack": None if clean else {**attack, "seed": seed}, "quant": {"scheme": "fp32"},
            "defense": {"name": "strip", "protocol": "canonical", "names_target": True},
            "verdict": {"status": status, "target_class": (attack or {}).get("target", 3) if status == "detected" else target,
                        "reason_code": None, "reason": None}}


def test_rows_for_meta_and_for_a_section(tmp_path, capsys):
    path = tmp_path / "t.toml"
    path.write_text(TABLE)
    badnet = [_r(s, BADNET) for s in range(3)] + [_r(s, None, "clean") for s in range(3)]
    blend = [_r(s, BLEND) for s in range(4)] + [_r(4, BLEND, "clean")] + [_r(s, None, "detected") for s in range(5)]
    rows = declare_rows.declared([badnet, blend], load(path))
    assert "5 clean-model Results of another attack's run left out" in capsys.readouterr().err  # said, not silent
    assert rows == {(None, "digits/fp32/strip[canonical]"): {"seeds": [0, 1, 2], "backdoored": {"pass": 3}, "clean": {"pass": 3}},
                    ("blend", "digits/fp32/strip[canonical]"): {"seeds": [0, 1, 2, 3, 4], "backdoored": {"pass": 4, "miss": 1},
                                                                 "why": "docs/results.md#other-attacks: detected naming the target 4/5"
                                                                        " [0.38, 0.96] (miss 1)"}}
    text = declare_rows.rewrite(path.read_text(), rows)
    assert "# a comment that stays" in text and "seed 0 only" not in text  # the section's cell finding is replaced
    path.write_text(text)
    table = load(path)
    assert table.attacks["blend"]["rows"][CELL]["backdoored"] == {"pass": 4, "miss": 1} and not table.attacks["blend"]["cells"]
    assert table.rows[CELL]["clean"] == {"pass": 3}  # the blend run's clean controls (false alarms) are not [rows]' models
    assert declare_rows.rewrite(text, rows) == text
    # a run of one scheme leaves the rows of the schemes it did not run (an ONNX run and the BadNet run)
    other = {(None, "digits/int8-static/strip[canonical]"): {"seeds": [0, 1, 2], "backdoored": {"pass": 3}, "clean": {"pass": 3}}}
    both = declare_rows.rewrite(text, other)
    assert "[rows.\"digits/fp32/strip[canonical]\"]" in both and "[rows.\"digits/int8-static/strip[canonical]\"]" in both


def test_an_attack_without_a_section_is_refused(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[meta]\ntier = "smoke"\n')
    with pytest.raises(SystemExit, match=r"has no \[attacks\.<name>\] section"):
        declare_rows.declared([[_r(0, BLEND)]], load(path))
    assert tomllib.loads(path.read_text())  # untouched
