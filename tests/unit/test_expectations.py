"""Expectations tables: validation, the mismatch messages, --qbd-accept's rewrite, and the two
tables the project ships."""

from pathlib import Path

import pytest

from qbd.errors import ConfigError
from qbd.expectations import Expectations, accept, dumps, load

ROOT = Path(__file__).resolve().parents[2]


def _result(cell, status, target=None, reason=None, backdoored=True):
    return {"cell": cell, "attack": {"target": 0} if backdoored else None,
            "verdict": {"status": status, "target_class": target, "reason": reason}}


def _write(tmp_path, text):
    p = tmp_path / "e.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(("text", "message"), [
    ('[cells."a/b/c[paper]"]\nstatus = "maybe"\n', "status must be one of"),
    ('[cells."a/b/c[paper]"]\nstatus = "clean"\ntarget = -1\n', "target must be a class index"),
    ('[cells."a/b/c[paper]"]\nstatus = "clean"\npaper = "yes"\n', "paper must be 'detected' or 'clean'"),
    ('[cells."a/b/c[paper]"]\nstatus = "clean"\ncolour = 1\n', "unknown key"),
    ('[cells."a/b/c[paper]"]\nstatus = "clean"\nxfail = "  "\n', "xfail must be a non-empty reason"),
    ('[attack."a/b"]\nasr = 1.5\n', "asr must be a fraction"),
    ('[audit."a/b"]\ninput_gradient = "no"\n', "input_gradient must be true or false"),
    ('[meta]\ntolerance = 2\n', "meta.tolerance"),
    ('[bogus]\n', "unknown table"),
    ('[cells\n', "not valid TOML"),
])
def test_bad_tables_name_file_and_entry(tmp_path, text, message):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        load(p)
    assert str(p) in str(err.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "none.toml")


def test_default_question_for_unlisted_cells():
    e = Expectations()
    assert e.check_cell(_result("x/fp32/d[canonical]", "detected", 0)) == []
    assert e.check_cell(_result("x/fp32/d[canonical]", "clean")) == ["verdict: expected detected, measured clean"]
    assert e.check_cell(_result("x:clean/fp32/d[canonical]", "clean", backdoored=False)) == []
    [msg] = e.check_cell(_result("x:clean/fp32/d[canonical]", "detected", 3, backdoored=False))
    assert "negative control" in msg and "target 3" in msg
    [msg] = e.check_cell(_result("x:clean/fp32/d[canonical]", "invalid", reason="NaN", backdoored=False))
    assert "valid 'clean'" in msg and "NaN" in msg


def test_mismatch_messages_quote_target_reason_and_the_paper():
    e = Expectations(cells={"c": {"status": "invalid", "reason": "no gradient signal", "paper": "clean"},
                            "t": {"status": "detected", "target": 0}})
    msg, reason = e.check_cell(_result("c", "detected", 0))
    assert "expected invalid, measured detected" in msg and "the paper reported clean" in msg
    assert reason.startswith("reason: expected it to mention 'no gradient signal'")
    assert e.check_cell(_result("c", "invalid", reason="MAD of the trigger norms is 0")) == [
        "reason: expected it to mention 'no gradient signal', measured 'MAD of the trigger norms is 0'"]
    assert e.check_cell(_result("t", "detected", 4)) == ["target class: expected 0, measured 4"]


def test_attack_tolerance_per_entry_and_missing_entry():
    e = Expectations(tolerance=0.05, attack={"a/fp32": {"clean_acc": 0.9, "asr": 1.0},
                                             "a/int4-sim": {"clean_acc": 0.5, "tolerance": 0.3}})
    assert e.check_attack("a/fp32", 0.94, 0.96) == []
    [msg] = e.check_attack("a/fp32", 0.84, 0.96)
    assert msg.startswith("clean_acc: expected 0.9000 +- 0.05, measured 0.8400")
    assert e.check_attack("a/int4-sim", 0.79, None) == []
    [msg] = e.check_attack("a/int8-static", 0.9, 0.9)
    assert "--qbd-accept" in msg


def test_audit_checks_gradients_and_fractions():
    e = Expectations(audit={"a/int8-dynamic": {"input_gradient": False, "surrogate_gradient": True,
                                               "min_quantized_fraction": 0.001, "max_quantized_fraction": 0.01}})
    ok = {"input_gradient": False, "quantized_param_fraction": 0.005}
    assert e.check_audit("a/int8-dynamic", ok, True) == []
    bad = e.check_audit("a/int8-dynamic", {"input_gradient": True, "quantized_param_fraction": 0.5, "gradient_note": "n"}, False)
    assert len(bad) == 3 and any("> 0.01" in m for m in bad)


def test_accept_records_measurements_and_keeps_explanations():
    old = Expectations(tier="paper", cells={"c": {"status": "clean", "xfail": "why", "note": "n", "paper": "clean"}},
                       attack={"a/fp32": {"clean_acc": 0.5, "tolerance": 0.2, "note": "Table 2", "xfail": "known"}})
    new = accept(old, [_result("c", "detected", 2), _result("d", "invalid", reason="r")],
                 {"a/fp32": {"clean_acc": 0.91234, "asr": 0.99}}, {"a/fp32": {"input_gradient": True}})
    assert new.cells["c"] == {"status": "detected", "target": 2, "xfail": "why", "note": "n", "paper": "clean"}
    assert new.cells["d"] == {"status": "invalid"}
    assert new.attack["a/fp32"] == {"clean_acc": 0.9123, "asr": 0.99, "tolerance": 0.2, "note": "Table 2", "xfail": "known"}
    assert new.audit["a/fp32"] == {"input_gradient": True}
    assert old.cells["c"]["status"] == "clean"  # the original is left alone


def test_dumps_round_trips(tmp_path):
    e = Expectations(tier="paper", tolerance=0.03, cells={'x/y/z[paper]': {"status": "invalid", "reason": 'say "no"', "paper": "clean"}},
                     attack={"x/y": {"clean_acc": 0.5}}, audit={"x/y": {"input_gradient": False}})
    p = _write(tmp_path, dumps(e, "header line\n\nafter a gap"))
    back = load(p)
    assert (back.tier, back.tolerance, back.cells, back.attack, back.audit) == (e.tier, e.tolerance, e.cells, e.attack, e.audit)
    assert p.read_text().startswith("# header line\n#\n# after a gap\n")


@pytest.mark.parametrize("tier", ["smoke", "paper"])
def test_shipped_tables_load(tier):
    e = load(ROOT / "fixtures" / "expectations" / f"{tier}.toml")
    assert e.tier == tier and e.cells and e.attack and e.audit


def test_paper_table_transcribes_the_paper():
    """Table 1: NC detects on CIFAR-10 FP32, GTSRB FP32 and GTSRB INT4, nothing else; Table 2's
    CA / ASR; the INT8 NC cells are the gradient artifact, recorded as invalid."""
    e = load(ROOT / "fixtures" / "expectations" / "paper.toml")
    detected = sorted(c for c, v in e.cells.items() if v.get("paper") == "detected")
    assert detected == ["cifar10/fp32/neural-cleanse[paper]", "gtsrb/fp32/neural-cleanse[paper]", "gtsrb/int4-sim/neural-cleanse[paper]"]
    assert sum(v.get("paper") == "clean" for v in e.cells.values()) == 2 * 3 * 5 - 3
    assert e.attack["cifar10/int4-sim"]["clean_acc"] == 0.527 and e.attack["gtsrb/fp32"]["asr"] == 0.994
    for ds in ("cifar10", "gtsrb"):
        nc = e.cells[f"{ds}/int8-dynamic/neural-cleanse[paper]"]
        assert nc["status"] == "invalid" and nc["reason"] == "no gradient signal"
