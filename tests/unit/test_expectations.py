"""Expectations tables: the truth is the default, an entry is a declared finding with a why.
Validation (load), the judgement of a cell (judge), the CA / ASR and audit bounds, --qbd-accept's
proposals (propose), writing (dumps), and the two tables qbd ships."""

import re
import runpy
from pathlib import Path

import pytest

from qbd.errors import ConfigError
from qbd.expectations import DEFAULT_ATTACK, Expectations, load, load_for, shipped
from qbd.expectations_format import PROPOSED
from qbd.expectations_write import dumps, propose
from qbd.reason_codes import NEVER_EXPECTED, REASON_CODES

ROOT = Path(__file__).resolve().parents[2]
BD = "digits/int8-dynamic/neural-cleanse[paper]"  # a backdoored model's cell
CLEAN = "digits:clean/fp32/strip[canonical]"  # the clean model's (negative control) cell
ATTACK = {**DEFAULT_ATTACK, "seed": 0}  # what a Result records for the attack the findings were measured on
ROW = "digits/fp32/strip[canonical]"  # a row: the backdoored and the clean models' cells over seeds
TRACEBACK = 'Traceback (most recent call last):\n  File "plugin.py", line 3, in detect\nValueError: boom\n'


def _result(cell, status, target=None, code=None, attack=ATTACK, evidence=None):
    return {"cell": cell, "seed": 0, "attack": None if ":clean/" in cell else dict(attack),
            "verdict": {"status": status, "target_class": target, "reason": "r" if status == "invalid" else None,
                        "reason_code": code, "evidence": evidence or {}}}


def _load(tmp_path, text):
    p = tmp_path / "e.toml"
    p.write_text(text)
    return load(p)


def _cell(key, **fields):
    return f'[cells."{key}"]\n' + "".join(f"{k} = {v}\n" for k, v in fields.items())


WHY = '"docs/results.md#findings"'


# -- load: every rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "message"), [
    # findings
    (_cell(BD, outcome='"miss"'), "needs a `why`"),
    (_cell(BD, outcome='"miss"', why='"   "'), "needs a `why`"),
    (_cell(BD, outcome='"miss"', why=f'"{PROPOSED}: write where the figures are (measured clean)"'), "still needs its `why` written"),
    (_cell(BD, outcome='"pass"', why=WHY), "outcome 'pass' is the truth"),
    (_cell(BD, outcome='"detected"', why=WHY), "outcome must be one of"),
    (_cell(BD, outcome="1", why=WHY), "outcome must be one of"),
    (_cell(BD, outcome='"false-alarm"', why=WHY), "a false alarm can only happen on a clean model"),
    (_cell(CLEAN, outcome='"miss"', why=WHY), "a clean model has no backdoor to miss"),
    (_cell(CLEAN, outcome='"wrong-target"', why=WHY), "a clean model has no backdoor to name"),
    (_cell(BD, outcome='"invalid"', why=WHY), "an invalid finding pins its reason_code"),
    (_cell(BD, outcome='"invalid"', reason_code='"bogus"', why=WHY), "an invalid finding pins its reason_code"),
    (_cell(BD, outcome='"invalid"', reason_code='["no-gradient"]', why=WHY), "an invalid finding pins its reason_code"),
    (_cell(BD, outcome='"invalid"', reason_code='"error"', why=WHY), "reason_code 'error' is never an expected outcome"),
    (_cell(BD, outcome='"invalid"', reason_code='"timeout"', why=WHY), "reason_code 'timeout' is never an expected outcome"),
    (_cell(BD, outcome='"invalid"', reason_code='"unspecified"', why=WHY), "reason_code 'unspecified' is never an expected outcome"),
    (_cell(BD, outcome='"miss"', reason_code='"no-gradient"', why=WHY), "reason_code belongs to an invalid finding"),
    (_cell(BD, outcome='"miss"', target="3", why=WHY), "target pins the class a wrong-target finding names"),
    (_cell(BD, outcome='"invalid"', reason_code='"no-signal"', target="3", why=WHY), "target pins the class"),
    (_cell(BD, outcome='"wrong-target"', target="-1", why=WHY), "target must be a class index"),
    (_cell(BD, outcome='"wrong-target"', target="true", why=WHY), "target must be a class index"),
    (_cell(BD, outcome='"wrong-target"', target="2.0", why=WHY), "target must be a class index"),
    (_cell(BD, reason_code='"no-gradient"'), "reason_code without an `outcome`"),
    (_cell(BD, why=WHY), "why without an `outcome`"),
    (_cell(BD, paper='"yes"'), "paper must be 'detected' or 'clean'"),
    (_cell(BD, outcome='"miss"', why="3"), "why must be a string"),
    (_cell(BD, colour="1"), "unknown key(s) ['colour']"),
    (_cell(BD, status='"clean"'), "unknown key(s) ['status']"),  # the old format is refused, not ignored
    (_cell(BD, xfail='"known"'), "unknown key(s) ['xfail']"),
    # the deployed model's CA / ASR
    ('[attack."a/b"]\nmin_asr = 0.9\nmax_asr = 0.5\nwhy = "w"\n', "min_asr > max_asr"),
    ('[attack."a/b"]\nmin_clean_acc = 0.9\nmax_clean_acc = 0.5\nwhy = "w"\n', "min_clean_acc > max_clean_acc"),
    ('[attack."a/b"]\nmax_asr = 0.5\n', "needs a `why`"),
    ('[attack."a/b"]\nmax_asr = 1.5\nwhy = "w"\n', "max_asr must be a fraction"),
    ('[attack."a/b"]\nmax_asr = true\nwhy = "w"\n', "max_asr must be a fraction"),
    ('[attack."a/b"]\nmax_asr = nan\nwhy = "w"\n', "max_asr must be a fraction"),
    ('[attack."a/b"]\nasr = 0.9\n', "unknown key(s) ['asr']"),
    ('[attack."a/b"]\ntolerance = 0.1\n', "unknown key(s) ['tolerance']"),
    # audits
    ('[audit."a/b"]\ninput_gradient = "no"\n', "input_gradient must be true or false"),
    ('[audit."a/b"]\nmin_quantized_fraction = 0.5\nmax_quantized_fraction = 0.1\n', "min_quantized_fraction > max_quantized_fraction"),
    ('[audit."a/b"]\nmax_quantized_fraction = true\n', "max_quantized_fraction must be a fraction"),
    # meta and the file as a whole
    ('[meta]\ntolerance = 0.05\n', "meta: unknown key(s) ['tolerance']"),
    ('[meta]\nmin_asr = 1.5\n', "meta.min_asr must be a number in [0, 1]"),
    ('[meta]\nmin_clean_acc = true\n', "meta.min_clean_acc must be a number in [0, 1]"),
    ('[meta]\ntier = 3\n', "meta.tier must be a string"),
    ('[meta]\nattack = {}\n', "meta.attack must be a table"),
    ('[meta]\nattack = "badnet"\n', "meta.attack must be a table"),
    ('meta = 1\n', "[meta] must be a table"),
    ('cells = 1\n', "[cells] must be a table"),
    ('[cells]\n"a/b/c[x]" = 1\n', "must be a table"),
    ('[bogus]\n', "unknown table(s) ['bogus']"),
    ('[cells\n', "not valid TOML"),
])
def test_a_bad_table_is_refused_naming_file_and_entry(tmp_path, text, message):
    p = tmp_path / "e.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(p)
    assert message in str(err.value)
    assert str(p) in str(err.value)
    entry = re.search(r'^\[(?:cells|attack|audit)\."(.+)"\]', text)
    if entry:
        assert repr(entry.group(1)) in str(err.value)


def test_missing_or_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match="cannot be read"):
        load(tmp_path)  # a directory


def test_the_reason_codes_a_finding_may_pin():
    """A crash, a timeout, an invalid verdict without a code or a verdict about a surrogate that
    is not the deployed model is never an expected outcome."""
    assert {"error", "timeout", "unspecified", "surrogate-disagrees"} == NEVER_EXPECTED
    assert set(REASON_CODES) - NEVER_EXPECTED == {"no-gradient", "no-signal", "rule-cannot-fire", "not-converged",
                                                  "not-applicable", "diverged"}


@pytest.mark.parametrize("code", ["no-gradient", "no-signal", "rule-cannot-fire", "not-converged", "not-applicable", "diverged"])
def test_an_invalid_finding_with_an_explained_code_loads(tmp_path, code):
    e = _load(tmp_path, _cell(BD, outcome='"invalid"', reason_code=f'"{code}"', why=WHY))
    assert e.cells[BD] == {"outcome": "invalid", "reason_code": code, "why": "docs/results.md#findings"}


def test_every_finding_kind_loads(tmp_path):
    text = (_cell("d/fp32/a[paper]", outcome='"miss"', why=WHY, note='"n"', paper='"clean"')
            + _cell("d/fp32/b[paper]", outcome='"wrong-target"', target="7", why=WHY)
            + _cell("d/fp32/c[paper]", outcome='"wrong-target"', why=WHY)
            + _cell("d:clean/fp32/a[paper]", outcome='"false-alarm"', why=WHY)
            + _cell("d/fp32/d[paper]", paper='"detected"'))  # a paper mark alone: judged against the truth
    e = _load(tmp_path, text)
    assert e.cells["d/fp32/b[paper]"]["target"] == 7 and e.cells["d/fp32/d[paper]"] == {"paper": "detected"}
    assert (e.tier, e.min_clean_acc, e.min_asr, e.attack_spec) == ("smoke", 0.85, 0.9, DEFAULT_ATTACK)


# -- judge -------------------------------------------------------------------------------------------
TRUTH_ONLY = Expectations()


@pytest.mark.parametrize(("cell", "status", "target", "code", "outcome", "judgement"), [
    (BD, "detected", 0, None, "pass", "pass"),
    (BD, "clean", None, None, "miss", "FAIL"),
    (BD, "detected", 3, None, "wrong-target", "FAIL"),  # detected, naming the wrong class: never a pass
    (BD, "invalid", None, "no-gradient", "invalid:no-gradient", "FAIL"),  # undeclared: fails
    (CLEAN, "clean", None, None, "pass", "pass"),
    (CLEAN, "detected", 0, None, "false-alarm", "FAIL"),
])
def test_without_a_finding_the_truth_is_expected(cell, status, target, code, outcome, judgement):
    j = TRUTH_ONLY.judge(_result(cell, status, target, code))
    assert (j.cell, j.outcome, j.judgement) == (cell, outcome, judgement)
    assert j.expected == ("the truth (backdoored, target 0): detected naming 0" if cell == BD
                          else "the truth (clean model): clean")
    assert (j.why is None) == (judgement == "pass")
    if judgement == "FAIL":
        assert f"measured {outcome}" in j.why


def test_a_crash_fails_and_its_message_carries_the_traceback():
    r = _result(BD, "invalid", code="error", evidence={"exception": "ValueError", "traceback": TRACEBACK})
    r["verdict"]["reason"] = "plugin raised ValueError: boom"
    j = TRUTH_ONLY.judge(r)
    assert (j.outcome, j.judgement) == ("invalid:error", "FAIL")
    assert "plugin raised ValueError: boom" in j.why and TRACEBACK.rstrip() in j.why


NO_GRADIENT = {"outcome": "invalid", "reason_code": "no-gradient", "why": "docs/quantization.md: no autograd kernel"}


def test_a_declared_finding_that_holds_is_a_finding():
    e = Expectations(cells={BD: NO_GRADIENT})
    j = e.judge(_result(BD, "invalid", code="no-gradient"))
    assert (j.outcome, j.judgement, j.why) == ("invalid:no-gradient", "finding", NO_GRADIENT["why"])
    assert j.expected == "finding: invalid:no-gradient"


def test_a_finding_that_no_longer_holds_because_the_cell_matches_the_truth_fails():
    j = Expectations(cells={BD: NO_GRADIENT}).judge(_result(BD, "detected", 0))
    assert (j.outcome, j.judgement) == ("pass", "FAIL")
    assert "finding no longer holds" in j.why and NO_GRADIENT["why"] in j.why


@pytest.mark.parametrize(("status", "target", "code", "outcome"), [
    ("clean", None, None, "miss"),
    ("detected", 5, None, "wrong-target"),
    ("invalid", None, "no-signal", "invalid:no-signal"),  # invalid, but for another reason
    ("invalid", None, "error", "invalid:error"),
])
def test_a_finding_fails_on_any_third_outcome(status, target, code, outcome):
    j = Expectations(cells={BD: NO_GRADIENT}).judge(_result(BD, status, target, code))
    assert (j.outcome, j.judgement) == (outcome, "FAIL")
    assert "declared finding 'invalid:no-gradient' does not hold" in j.why


def test_a_wrong_target_finding_with_a_pinned_target():
    e = Expectations(cells={BD: {"outcome": "wrong-target", "target": 7, "why": "w"}})
    assert e.judge(_result(BD, "detected", 7)).judgement == "finding"
    other = e.judge(_result(BD, "detected", 3))
    assert (other.outcome, other.judgement) == ("wrong-target", "FAIL")
    assert "naming 7" in other.why
    assert e.judge(_result(BD, "detected", 0)).judgement == "FAIL"  # now the truth
    unpinned = Expectations(cells={BD: {"outcome": "wrong-target", "why": "w"}})
    assert [unpinned.judge(_result(BD, "detected", t)).judgement for t in (3, 7, 0)] == ["finding", "finding", "FAIL"]


def test_miss_and_false_alarm_findings():
    e = Expectations(cells={BD: {"outcome": "miss", "why": "w"}, CLEAN: {"outcome": "false-alarm", "why": "w"}})
    assert e.judge(_result(BD, "clean")).judgement == "finding"
    assert e.judge(_result(CLEAN, "detected", 4)).judgement == "finding"
    assert e.judge(_result(CLEAN, "clean")).judgement == "FAIL"
    assert e.judge(_result(BD, "detected", 0)).judgement == "FAIL"


@pytest.mark.parametrize("change", [{"target": 3}, {"trigger_size": 5}, {"trigger_pattern": "checkerboard"}, {"poison_rate": 0.05}])
def test_a_finding_does_not_apply_to_a_run_with_another_attack(change):
    """Findings were measured on meta.attack: another attack is judged against the truth alone."""
    e = Expectations(cells={BD: NO_GRADIENT})
    attack = {**ATTACK, **change}
    assert e.finding(_result(BD, "invalid", code="no-gradient", attack=attack)) is None
    assert e.judge(_result(BD, "invalid", code="no-gradient", attack=attack)).judgement == "FAIL"
    t = attack["target"]
    assert e.judge(_result(BD, "detected", t, attack=attack)).judgement == "pass"


def test_a_clean_models_finding_applies_whatever_attack_was_probed():
    e = Expectations(attack_spec={**DEFAULT_ATTACK, "target": 5}, cells={CLEAN: {"outcome": "false-alarm", "why": "w"}})
    assert e.judge(_result(CLEAN, "detected", 1)).judgement == "finding"


def test_an_entry_without_an_outcome_is_not_a_finding():
    e = Expectations(cells={BD: {"paper": "clean", "note": "n"}})
    assert e.finding(_result(BD, "clean")) is None
    assert e.judge(_result(BD, "clean")).judgement == "FAIL"
    assert e.judge(_result(BD, "detected", 0)).judgement == "pass"


# -- CA / ASR bounds ---------------------------------------------------------------------------------
def test_attack_bounds_default_to_meta():
    e = Expectations(min_clean_acc=0.85, min_asr=0.9)
    assert e.check_attack("d/fp32", 0.9, 0.95) == []
    assert e.check_attack("d/fp32", 0.85, 0.9) == []  # bounds are inclusive
    assert e.check_attack("d/fp32", 0.8, 0.95) == ["clean_acc: expected >= 0.85, measured 0.8000"]
    assert e.check_attack("d/fp32", 0.9, 0.5) == ["asr: expected >= 0.9, measured 0.5000"]
    assert e.check_attack("d:clean/fp32", 0.9, None) == []  # a clean model has no ASR to bound


def test_an_entry_bound_overrides_meta_and_quotes_its_why():
    e = Expectations(attack={"d/int4-sim": {"min_clean_acc": 0.5, "max_clean_acc": 0.7, "why": "docs/x.md: CA drops"}})
    assert e.check_attack("d/int4-sim", 0.6, 0.95) == []
    [low] = e.check_attack("d/int4-sim", 0.4, 0.95)
    assert low.startswith("clean_acc: expected >= 0.5, measured 0.4000") and "docs/x.md: CA drops" in low
    [high] = e.check_attack("d/int4-sim", 0.9, 0.95)
    assert high.startswith("clean_acc: expected <= 0.7, measured 0.9000") and "declared finding no longer holds" in high


def test_a_max_asr_finding_can_hold_under_the_meta_minimum():
    """An entry declaring that ASR collapses (max_asr) replaces meta's min_asr for that key: the
    finding must be satisfiable, else it fails whatever the model does."""
    e = Expectations(min_asr=0.9, attack={"d/int8-static": {"max_asr": 0.7, "why": "docs/x.md: ASR collapses"}})
    assert e.check_attack("d/int8-static", 0.95, 0.5) == []
    [msg] = e.check_attack("d/int8-static", 0.95, 0.8)
    assert msg.startswith("asr: expected <= 0.7, measured 0.8000")


def test_audit_checks_gradients_and_fractions():
    e = Expectations(path=Path("e.toml"), audit={"a/int8-dynamic": {"input_gradient": False, "surrogate_gradient": True,
                                                                    "min_quantized_fraction": 0.001, "max_quantized_fraction": 0.01}})
    assert e.check_audit("a/int8-dynamic", {"input_gradient": False, "quantized_param_fraction": 0.005}, True) == []
    bad = e.check_audit("a/int8-dynamic", {"input_gradient": True, "quantized_param_fraction": 0.5, "gradient_note": "n"}, False)
    assert bad == ["input_gradient: expected False, measured True (n)", "surrogate gradient: expected True, measured False",
                   "quantized_param_fraction 0.500000 > 0.01"]
    assert e.check_audit("a/int8-dynamic", {"input_gradient": False, "quantized_param_fraction": 0.0}, True) == [
        "quantized_param_fraction 0.000000 < 0.001"]
    [missing] = e.check_audit("a/int8-static", {"input_gradient": False, "quantized_param_fraction": 1.0}, True)
    assert "no expectation for audit 'a/int8-static'" in missing


# -- propose (--qbd-accept) -------------------------------------------------------------------------
def test_propose_only_for_failing_cells_without_a_finding():
    pinned = {"outcome": "wrong-target", "target": 7, "why": "docs/results.md: names 7", "note": "n"}
    old = Expectations(cells={BD: dict(NO_GRADIENT), "d/fp32/pin[paper]": dict(pinned), "d/fp32/marked[paper]": {"paper": "clean"}})
    results = [
        _result(BD, "detected", 0),  # its finding no longer holds: a person decides
        _result("d/fp32/pin[paper]", "detected", 3),  # its pinned target moved: a person decides
        _result("d/fp32/marked[paper]", "invalid", code="no-signal"),  # a paper mark, no finding yet
        _result("d/fp32/missed[paper]", "clean"),
        _result("d/fp32/other[paper]", "detected", 4),
        _result("d/fp32/crash[paper]", "invalid", code="error"),
        _result("d/fp32/slow[paper]", "invalid", code="timeout"),
        _result("d/fp32/mute[paper]", "invalid", code="unspecified"),
        _result(CLEAN, "detected", 2),
        _result("d/fp32/fine[paper]", "detected", 0),  # matches the truth: nothing to propose
    ]
    new, lines = propose(old, results)
    # existing findings are never changed, nor their why or pin dropped; the original is untouched
    assert new.cells[BD] == old.cells[BD] == NO_GRADIENT
    assert new.cells["d/fp32/pin[paper]"] == old.cells["d/fp32/pin[paper]"] == pinned
    assert old.cells["d/fp32/marked[paper]"] == {"paper": "clean"} and "d/fp32/missed[paper]" not in old.cells
    proposed = {k: v for k, v in new.cells.items() if k not in old.cells or v != old.cells[k]}
    assert set(proposed) == {"d/fp32/marked[paper]", "d/fp32/missed[paper]", "d/fp32/other[paper]", CLEAN}
    assert all(v["why"].startswith(PROPOSED) for v in proposed.values())
    assert {k: {f: x for f, x in v.items() if f != "why"} for k, v in proposed.items()} == {
        "d/fp32/marked[paper]": {"paper": "clean", "outcome": "invalid", "reason_code": "no-signal"},
        "d/fp32/missed[paper]": {"outcome": "miss"},
        "d/fp32/other[paper]": {"outcome": "wrong-target", "target": 4},
        CLEAN: {"outcome": "false-alarm"},
    }
    assert lines[:2] == ["before: 1 cell matches the truth, 0 declared findings, 9 failing",
                         "after:  1 cell matches the truth, 4 declared findings, 5 failing"]
    for cell in ("d/fp32/crash[paper]", "d/fp32/slow[paper]", "d/fp32/mute[paper]"):
        assert cell not in new.cells
        assert any(line.startswith("  not proposed") and cell in line for line in lines)
    assert sum(line.startswith("  by hand:") for line in lines) == 2


def test_a_proposed_finding_loads_only_once_its_why_is_written(tmp_path):
    new, _ = propose(Expectations(), [_result(BD, "clean")])
    p = tmp_path / "e.toml"
    p.write_text(dumps(new))
    with pytest.raises(ConfigError, match="still needs its `why` written"):
        load(p)
    p.write_text(p.read_text().replace(new.cells[BD]["why"], "docs/results.md: NC misses it here"))
    assert load(p).judge(_result(BD, "clean")).judgement == "finding"


# -- dumps -------------------------------------------------------------------------------------------
def test_dumps_round_trips(tmp_path):
    e = Expectations(tier="paper", min_clean_acc=0.8, min_asr=0.95, attack_spec={**DEFAULT_ATTACK, "target": 3},
                     cells={BD: {"outcome": "invalid", "reason_code": "no-gradient", "why": 'say "no" \\ here\nand\there', "paper": "clean"},
                            CLEAN: {"outcome": "false-alarm", "why": "w"}, "d/fp32/x[paper]": {"outcome": "wrong-target", "target": 4, "why": "w"}},
                     attack={"d/fp32": {"max_asr": 0.5, "why": "w", "paper_asr": 0.998}},
                     audit={"d/fp32": {"input_gradient": False, "min_quantized_fraction": 1e-05, "max_quantized_fraction": 0.123456}},
                     rows={ROW: {"min_detection_rate": 0.8, "max_false_alarm_rate": 0.2, "why": "w", "note": "n"},
                           "d/int4-sim/y[canonical]": {"max_detection_rate": 0.0, "min_false_alarm_rate": 1.0, "why": "w"}})
    p = tmp_path / "e.toml"
    p.write_text(dumps(e, "header line\n\nafter a gap"))
    back = load(p)
    assert (back.tier, back.min_clean_acc, back.min_asr, back.attack_spec, back.cells, back.attack, back.audit, back.rows) == (
        e.tier, e.min_clean_acc, e.min_asr, e.attack_spec, e.cells, e.attack, e.audit, e.rows)
    assert p.read_text().startswith("# header line\n#\n# after a gap\n")


def test_dumps_writes_control_characters_as_toml_escapes(tmp_path):
    """A why may hold any character TOML can escape; written back, the table must still load."""
    e = Expectations(cells={BD: {"outcome": "miss", "why": "bell \x07, escape \x1b, delete \x7f, return \r"}})
    p = tmp_path / "e.toml"
    p.write_text(dumps(e))
    assert load(p).cells == e.cells


# -- the tables qbd ships ----------------------------------------------------------------------------
@pytest.mark.parametrize("tier", ["smoke", "paper"])
def test_shipped_tables_load_and_every_finding_has_a_why(tier):
    p = shipped(tier)
    assert p == ROOT / "qbd" / "expected" / f"{tier}.toml"  # inside the package: installed with it
    e = load(p)
    assert e.tier == tier and e.audit and e.attack_spec == DEFAULT_ATTACK
    for key, entry in [*e.cells.items(), *e.attack.items()]:
        if "outcome" in entry or "why" in entry:
            assert entry["why"].strip() and not entry["why"].startswith(PROPOSED), key
            for doc in re.findall(r"docs/[\w-]+\.md", entry["why"]):
                assert (ROOT / doc).is_file(), (key, doc)  # a why points to figures that exist


def test_load_for_falls_back_to_the_shipped_table_or_the_truth(tmp_path):
    assert load_for("smoke").path == shipped("smoke")
    none = load_for("no-such-tier")
    assert (none.path, none.cells) == (None, {})
    p = tmp_path / "mine.toml"
    p.write_text(_cell(BD, outcome='"miss"', why=WHY))
    assert load_for("smoke", p).cells[BD]["outcome"] == "miss"
    with pytest.raises(ConfigError, match="does not exist"):
        load_for("smoke", tmp_path / "none.toml")  # a table asked for by name must exist


def test_the_paper_table_is_what_its_script_generates(tmp_path, monkeypatch):
    (tmp_path / "qbd" / "expected").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "scripts" / "paper_expectations.py"))
    assert (tmp_path / "qbd" / "expected" / "paper.toml").read_text() == shipped("paper").read_text()


def test_paper_table_transcribes_the_paper():
    """Table 1 (`paper` marks): NC detects on CIFAR-10 FP32, GTSRB FP32 and GTSRB INT4, nothing
    else; Table 2's CA / ASR; the INT8 NC cells are findings invalid / no-gradient (the gradient
    artifact the paper read as 'not detected'), every STRIP cell invalid / rule-cannot-fire."""
    e = load(shipped("paper"))
    detected = sorted(c for c, v in e.cells.items() if v.get("paper") == "detected")
    assert detected == ["cifar10/fp32/neural-cleanse[paper]", "gtsrb/fp32/neural-cleanse[paper]", "gtsrb/int4-sim/neural-cleanse[paper]"]
    assert sum(v.get("paper") == "clean" for v in e.cells.values()) == 2 * 3 * 5 - 3
    assert e.attack["cifar10/int4-sim"]["paper_clean_acc"] == 0.527 and e.attack["gtsrb/fp32"]["paper_asr"] == 0.994
    findings = {c: (v["outcome"], v.get("reason_code")) for c, v in e.cells.items() if "outcome" in v}
    expected = {}
    for ds in ("cifar10", "gtsrb"):
        for scheme in ("int8-dynamic", "int8-static"):
            expected[f"{ds}/{scheme}/neural-cleanse[paper]"] = ("invalid", "no-gradient")
            expected[f"{ds}:clean/{scheme}/neural-cleanse[paper]"] = ("invalid", "no-gradient")
        for scheme in ("fp32", "int8-dynamic", "int8-static", "int4-sim"):
            expected[f"{ds}/{scheme}/strip[paper]"] = ("invalid", "rule-cannot-fire")
            expected[f"{ds}:clean/{scheme}/strip[paper]"] = ("invalid", "rule-cannot-fire")
    assert findings == expected  # every other cell is expected to match the truth
    for ds in ("cifar10", "gtsrb"):
        nc = f"{ds}/int8-dynamic/neural-cleanse[paper]"
        assert e.cells[nc]["paper"] == "clean"  # what the paper read the gradient artifact as
        assert e.judge(_result(nc, "invalid", code="no-gradient")).judgement == "finding"
        assert e.judge(_result(nc, "clean")).judgement == "FAIL"


# -- rows: rate bounds over seeds ----------------------------------------------------------------------
def _row_entry(key=ROW, **fields):
    return f'[rows."{key}"]\n' + "".join(f"{k} = {v}\n" for k, v in fields.items())


@pytest.mark.parametrize(("text", "message"), [
    (_row_entry(min_detection_rate="0.8"), "a row bound needs a `why`"),
    (_row_entry(min_detection_rate="0.8", why='" "'), "a row bound needs a `why`"),
    (_row_entry(min_detection_rate="0.8", why="3"), "why must be a string"),
    (_row_entry(why=WHY), "states no bound"),
    (_row_entry(min_detection_rate="1.2", why=WHY), "min_detection_rate must be a number in [0, 1]"),
    (_row_entry(max_false_alarm_rate="-0.1", why=WHY), "max_false_alarm_rate must be a number in [0, 1]"),
    (_row_entry(max_false_alarm_rate="true", why=WHY), "max_false_alarm_rate must be a number in [0, 1]"),
    (_row_entry(min_detection_rate='"0.8"', why=WHY), "min_detection_rate must be a number in [0, 1]"),
    (_row_entry(min_detection_rate="nan", why=WHY), "min_detection_rate must be a number in [0, 1]"),
    (_row_entry(min_detection_rate="0.9", max_detection_rate="0.5", why=WHY), "min_detection_rate > max_detection_rate"),
    (_row_entry(min_false_alarm_rate="0.5", max_false_alarm_rate="0.2", why=WHY), "min_false_alarm_rate > max_false_alarm_rate"),
    (_row_entry(min_detection_rate="0.8", why=WHY, outcome='"miss"'), "unknown key(s) ['outcome']"),
    (_row_entry(detection_rate="0.8", why=WHY), "unknown key(s) ['detection_rate']"),
    (_row_entry("digits:clean/fp32/strip[canonical]", max_false_alarm_rate="0.2", why=WHY), "no ':clean'"),
    (_row_entry("digits/fp32/strip", min_detection_rate="0.8", why=WHY), "not a row id"),
    (_row_entry("digits/strip[canonical]", min_detection_rate="0.8", why=WHY), "not a row id"),
    (_row_entry("digits/fp32/strip[canonical]/x", min_detection_rate="0.8", why=WHY), "not a row id"),
    (_row_entry("digits/fp32/strip[both]", min_detection_rate="0.8", why=WHY), "unknown protocol 'both'"),
    ('[rows]\n"a/b/c[paper]" = 1\n', "must be a table"),
    ("rows = 1\n", "[rows] must be a table"),
    (_row_entry(min_detection_rate="0.8", max_invalid_rate="2", why=WHY), "max_invalid_rate must be a number in [0, 1]"),
    (_row_entry(min_detection_rate="0.8", seeds="[0]", why=WHY), "seeds must be a list of at least two"),
    (_row_entry(min_detection_rate="0.8", seeds="[0, 0]", why=WHY), "seeds must be a list of at least two"),
    (_row_entry(min_detection_rate="0.8", seeds="[0, -1]", why=WHY), "seeds must be a list of at least two"),
    (_row_entry(min_detection_rate="0.8", seeds='"0-4"', why=WHY), "seeds must be a list of at least two"),
])
def test_a_bad_row_entry_is_refused_naming_file_and_row(tmp_path, text, message):
    p = tmp_path / "e.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(p)
    assert message in str(err.value) and str(p) in str(err.value)
    entry = re.search(r'^\[rows\."(.+)"\]', text)
    if entry:
        assert repr(entry.group(1)) in str(err.value)


def test_row_bounds_load(tmp_path):
    e = _load(tmp_path, _row_entry(min_detection_rate="0.8", max_false_alarm_rate="0.2", why=WHY, note='"n"')
              + _row_entry("synthetic/int8-static/my-defense[paper]", max_detection_rate="0", why=WHY))
    assert e.row_bounds(ROW) == {"min_detection_rate": 0.8, "max_false_alarm_rate": 0.2}
    assert e.row_bounds("synthetic/int8-static/my-defense[paper]") == {"max_detection_rate": 0}
    assert e.row_bounds("digits/fp32/neural-cleanse[canonical]") is None


def _rate_row(detected, n_backdoored, false_alarms, n_clean, row=ROW):
    return {"row": row, "detected": detected, "n_backdoored": n_backdoored,
            "detection_rate": detected / n_backdoored if n_backdoored else None,
            "false_alarms": false_alarms, "n_clean": n_clean, "false_alarm_rate": false_alarms / n_clean if n_clean else None}


BOUNDED = Expectations(rows={ROW: {"min_detection_rate": 0.8, "max_false_alarm_rate": 0.2, "why": "docs/defenses.md: calibrated"}})


def test_check_row_against_its_bounds():
    assert BOUNDED.check_row(_rate_row(4, 5, 1, 5)) == []  # bounds are inclusive
    assert BOUNDED.check_row(_rate_row(5, 5, 0, 5)) == []
    assert BOUNDED.check_row(_rate_row(3, 5, 2, 5)) == [
        "detection rate 3/5 = 0.60: expected >= 0.8 (min_detection_rate; why: docs/defenses.md: calibrated)",
        "false alarm rate 2/5 = 0.40: expected <= 0.2 (max_false_alarm_rate; why: docs/defenses.md: calibrated)"]
    upper = Expectations(rows={ROW: {"max_detection_rate": 0.0, "min_false_alarm_rate": 1.0, "why": "w"}})
    assert upper.check_row(_rate_row(0, 5, 5, 5)) == []
    assert [m.split(":")[0] for m in upper.check_row(_rate_row(1, 5, 4, 5))] == ["detection rate 1/5 = 0.20", "false alarm rate 4/5 = 0.80"]
    assert TRUTH_ONLY.check_row(_rate_row(0, 5, 5, 5)) == []  # no bounds: nothing to check


def test_an_invalid_verdict_fails_a_bounded_row_unless_allowed():
    """Invalid is neither a detection nor a false alarm: a row of invalid clean cells would meet
    any false-alarm bound, so invalid verdicts are bounded too (default: none)."""
    row = {**_rate_row(5, 5, 0, 4), "invalid": 1}
    (msg,) = BOUNDED.check_row(row)
    assert msg.startswith("invalid verdicts 1/9 = 0.11: expected <= 0.0 (max_invalid_rate")
    allowing = Expectations(rows={ROW: {**BOUNDED.rows[ROW], "max_invalid_rate": 0.2}})
    assert allowing.check_row(row) == []


def test_rows_bounded_on_named_seeds_are_judged_only_on_those_seeds():
    e = Expectations(rows={ROW: {**BOUNDED.rows[ROW], "seeds": [0, 1, 2, 3, 4]}})
    assert e.by_rates(ROW, ATTACK, 5) and e.by_rates(ROW, ATTACK, [4, 3, 2, 1, 0])
    assert not e.by_rates(ROW, ATTACK, 3)  # seeds 0-2: other models than the bounds describe
    assert not e.by_rates(ROW, ATTACK, [100, 101, 102, 103, 104])  # the calibration seeds
    assert e.check_row({**_rate_row(5, 5, 0, 5), "seeds": [0, 1, 2, 3, 4]}) == []
    (msg,) = e.check_row({**_rate_row(5, 5, 0, 5), "seeds": [100, 101, 102, 103, 104]})
    assert "measured on seeds [0, 1, 2, 3, 4]" in msg
    results = [_full(ROW, "detected", 0, seed=s) for s in range(100, 105)]
    assert e.rows_judged_by_rates(results, 5) == frozenset()
    assert e.rows_judged_by_rates([_full(ROW, "detected", 0, seed=s) for s in range(5)], 5) == frozenset({ROW})
    assert load_text_roundtrip(e) == e.rows


def load_text_roundtrip(e):
    import tomllib

    return tomllib.loads(dumps(e))["rows"]


def test_a_bound_on_a_rate_without_models_fails():
    assert BOUNDED.check_row(_rate_row(0, 0, 0, 0)) == ["min_detection_rate 0.8: no backdoored models in this row",
                                                        "max_false_alarm_rate 0.2: no clean models in this row"]


def _full(cell, status, target=None, code=None, seed=0, attack=ATTACK):
    """A Result with what a row needs (data set, scheme, defense)."""
    ds, scheme, rest = cell.split("/")
    defense, _, protocol = rest.rstrip("]").partition("[")
    r = _result(cell, status, target, code, attack=attack)
    return {**r, "seed": seed, "dataset": ds.split(":")[0], "quant": {"scheme": scheme},
            "defense": {"name": defense, "protocol": protocol, "names_target": True}}


ROW_CLEAN = "digits:clean/fp32/strip[canonical]"


def test_by_rates_only_over_several_seeds_with_bounds_and_the_measured_attack():
    assert BOUNDED.by_rates(ROW, ATTACK, 5)
    assert BOUNDED.by_rates(ROW, None, 5)  # a run of clean models only
    assert not BOUNDED.by_rates(ROW, ATTACK, 1)  # single-seed runs ignore row bounds
    assert not BOUNDED.by_rates("digits/fp32/neural-cleanse[canonical]", ATTACK, 5)  # no bounds
    assert not BOUNDED.by_rates(ROW, {**ATTACK, "target": 3}, 5)  # bounds measured on another attack
    results = [_full(ROW, "detected", 0, seed=s) for s in range(2)] + [_full(ROW_CLEAN, "clean", seed=s) for s in range(2)]
    results += [_full("digits/fp32/neural-cleanse[canonical]", "clean")]
    assert BOUNDED.rows_judged_by_rates(results, 2) == frozenset({ROW})
    assert BOUNDED.rows_judged_by_rates(results, 1) == frozenset()
    other = [_full(ROW_CLEAN, "clean"), _full(ROW, "detected", 3, attack={**ATTACK, "target": 3})]  # the clean one first
    assert BOUNDED.rows_judged_by_rates(other, 2) == frozenset()


@pytest.mark.parametrize(("cell", "status", "target", "code", "outcome", "judgement"), [
    (ROW, "detected", 0, None, "pass", "pass"),
    (ROW, "clean", None, None, "miss", "finding"),  # the row's rates account for it
    (ROW, "detected", 4, None, "wrong-target", "finding"),
    (ROW, "invalid", None, "no-signal", "invalid:no-signal", "finding"),
    (ROW_CLEAN, "detected", 2, None, "false-alarm", "finding"),
    (ROW_CLEAN, "clean", None, None, "pass", "pass"),
    (ROW, "invalid", None, "error", "invalid:error", "FAIL"),  # never expected: a crash, a timeout, an unexplained invalid
    (ROW, "invalid", None, "timeout", "invalid:timeout", "FAIL"),
    (ROW_CLEAN, "invalid", None, "unspecified", "invalid:unspecified", "FAIL"),
])
def test_a_cell_judged_by_its_rows_rates_fails_only_on_never_expected_outcomes(cell, status, target, code, outcome, judgement):
    j = BOUNDED.judge(_full(cell, status, target, code), by_rates=True)
    assert (j.outcome, j.judgement) == (outcome, judgement)
    if judgement == "finding":
        assert j.expected == f"the rates of row {ROW}: min_detection_rate 0.8, max_false_alarm_rate 0.2"
        assert j.why.endswith("docs/defenses.md: calibrated")
    # without its rates (one seed, or no bounds) the same Result is judged against the truth
    assert BOUNDED.judge(_full(cell, status, target, code)).judgement == ("pass" if outcome == "pass" else "FAIL")


def test_rates_override_a_cells_declared_finding_over_several_seeds():
    e = Expectations(cells={ROW: {"outcome": "miss", "why": "w"}}, rows=dict(BOUNDED.rows))
    assert e.judge(_full(ROW, "detected", 0), by_rates=True).judgement == "pass"
    assert e.judge(_full(ROW, "clean"), by_rates=True).judgement == "finding"
    assert e.judge(_full(ROW, "detected", 0)).judgement == "FAIL"  # one seed: the cell's finding no longer holds


def test_propose_keeps_the_rows():
    new, _ = propose(BOUNDED, [_result(BD, "clean")])
    assert new.rows == BOUNDED.rows and new.rows is not BOUNDED.rows


def test_a_quant_conditioned_models_asr_is_bounded_by_its_truth():
    """Dormant in FP32, awake in its own scheme, unknown elsewhere: the deployed-model check of
    `qbd run --attack quant-conditioned` holds it to that, not to BadNet's ASR floor."""
    from qbd.expectations import Expectations, dormant_asr_bounds

    qc = {"name": "quant-conditioned", "scheme": "int4-sim", "target": 0}
    assert dormant_asr_bounds(qc, "fp32") == {"max_asr": 0.10}
    assert dormant_asr_bounds(qc, "int4-sim") == {"min_asr": 0.90}
    assert dormant_asr_bounds(qc, "int8-static") == {}
    table = Expectations()
    assert table.check_attack("digits/fp32", 0.99, 0.01, own=False, attack=qc) == []
    assert table.check_attack("digits/fp32", 0.99, 0.5, own=False, attack=qc) == ["asr: expected <= 0.1, measured 0.5000"]
    assert table.check_attack("digits/int4-sim", 0.99, 0.5, own=False, attack=qc) == ["asr: expected >= 0.9, measured 0.5000"]
    assert table.check_attack("digits/int8-static", 0.99, 0.0, own=False, attack=qc) == []
    assert table.check_attack("digits/int8-static", 0.5, 0.0, own=False, attack=qc) != []  # clean accuracy still bounded
    # BadNet keeps meta's floor
    assert table.check_attack("digits/fp32", 0.99, 0.5, own=False, attack={"name": "badnet"}) != []
    # conditioned on int8-static: awake on the engine it was conditioned on (x86, the default), no
    # bound on another engine (fbgemm's calibrated ranges do not clip its trigger the same way)
    q8 = {**qc, "scheme": "int8-static"}
    assert dormant_asr_bounds(q8, "int8-static") == dormant_asr_bounds(q8, "int8-static", "x86") == {"min_asr": 0.90}
    assert dormant_asr_bounds(q8, "int8-static", "fbgemm") == {}
    assert table.check_attack("digits/int8-static", 0.99, 0.05, own=False, attack=q8, engine="fbgemm") == []
    assert table.check_attack("digits/int8-static", 0.99, 0.05, own=False, attack=q8, engine="x86") != []
    assert dormant_asr_bounds(qc, "int4-sim", "anything") == {"min_asr": 0.90}  # intN-sim: one deployment


# -- other attacks' findings and borderline cells ----------------------------------------------------
BLEND = {"name": "blend", "target": 2, "trigger_pattern": "checkerboard", "trigger_size": 3, "trigger_position": "bottom-right",
         "poison_rate": 0.1, "alpha": 0.15}
BLEND_TOML = ('{ name = "blend", target = 2, trigger_pattern = "checkerboard", trigger_size = 3, trigger_position = "bottom-right",'
              ' poison_rate = 0.1, alpha = 0.15 }')
OTHER = f"""
[attacks.blend]
attack = {BLEND_TOML}

[attacks.blend.cells."{BD}"]
outcome = "miss"
why = {WHY}

[attacks.blend.cells."digits/fp32/neural-cleanse[canonical]"]
outcome = "borderline"
margin = 0.25
why = {WHY}
"""


def _scored(cell, status, score, threshold=2.0, target=None, attack=BLEND, code=None):
    r = _result(cell, status, target, code=code, attack=attack)
    r["verdict"].update(score=score, threshold=threshold)
    return r


def test_another_attacks_findings_apply_to_that_attack_only(tmp_path):
    e = _load(tmp_path, OTHER)
    assert e.judge(_result(BD, "clean", attack={**BLEND, "seed": 0})).judgement == "finding"
    assert e.judge(_result(BD, "clean", attack={**BLEND, "alpha": 0.2})).judgement == "FAIL"  # another blend: the truth
    assert e.judge(_result(BD, "clean")).judgement == "FAIL"  # BadNet: meta's findings (none here)
    assert e.judge(_result(BD, "detected", target=2, attack=BLEND)).judgement == "FAIL"  # the truth now: finding no longer holds
    assert load(_write(tmp_path, dumps(e))).attacks == e.attacks  # written back as read
    # --qbd-accept never files another attack's failing cell under meta's [cells] (it would apply to BadNet)
    failing = _scored("digits/fp32/neural-cleanse[canonical]", "clean", 1.5, attack={**BLEND, "seed": 0})
    new, lines = propose(e, [failing])
    assert new.cells == e.cells and new.attacks == e.attacks and any("[attacks.<name>]" in x for x in lines)


def _write(tmp_path, text):
    p = tmp_path / "again.toml"
    p.write_text(text)
    return p


def test_a_borderline_finding_accepts_the_truth_or_a_miss_near_the_threshold_only(tmp_path):
    e = _load(tmp_path, OTHER)
    nc = "digits/fp32/neural-cleanse[canonical]"
    assert e.judge(_scored(nc, "detected", 2.17, target=2)).judgement == "finding"
    assert e.judge(_scored(nc, "clean", 1.96)).judgement == "finding"
    far = e.judge(_scored(nc, "detected", 3.0, target=2))
    assert far.judgement == "FAIL" and "no longer holds" in far.why  # moved away from the threshold: update the table
    assert e.judge(_scored(nc, "detected", 2.1, target=5)).judgement == "FAIL"  # another class is neither side
    assert e.judge(_scored(nc, "invalid", 2.0, code="not-converged")).judgement == "FAIL"
    assert e.judge(_scored(nc, "invalid", None, code="error")).judgement == "FAIL"
    # the verdict must be the score's side: a miss above the threshold was decided by something else
    wrong_side = e.judge(_scored(nc, "clean", 2.1))
    assert wrong_side.judgement == "FAIL" and "not the side of the threshold" in wrong_side.why
    assert e.judge(_scored(nc, "detected", 1.9, target=2)).judgement == "FAIL"
    # a margin that is no longer narrow against the threshold accepts nothing
    too_wide = e.judge(_scored(nc, "clean", 0.3, threshold=0.4))
    assert too_wide.judgement == "FAIL" and "too wide" in too_wide.why


def test_a_borderline_finding_reads_the_targets_own_statistic(tmp_path):
    """NC's score is the largest anomaly index of any class; on a backdoored model the borderline
    judgement reads the planted target's (evidence per_class_score), so a detection of the target
    far above the threshold, or a miss whose score sits near it on another class, fails."""
    e = _load(tmp_path, OTHER)
    nc = "digits/fp32/neural-cleanse[canonical]"

    def scored(status, score, own, target=None):
        r = _scored(nc, status, score, target=target)
        r["verdict"]["evidence"] = {"per_class_score": [None, 1.1, own, None]}
        return r

    assert e.judge(scored("detected", 2.17, 2.17, target=2)).judgement == "finding"
    moved = e.judge(scored("detected", 2.17, 3.4, target=2))  # the target's own index moved away: not borderline
    assert moved.judgement == "FAIL" and "target's (class 2) own statistic 3.400" in moved.why
    assert e.judge(scored("clean", 1.96, 1.96)).judgement == "finding"
    far = e.judge(scored("clean", 1.96, 0.4))  # the score near 2.0 is another class's; the target's is far below
    assert far.judgement == "FAIL" and "own statistic 0.400" in far.why
    assert e.judge(scored("clean", 1.96, None)).judgement == "FAIL"  # the target was not scored at all


BADNET_TOML = ('{ name = "badnet", target = 0, trigger_pattern = "white", trigger_size = 3, trigger_position = "bottom-right",'
               ' poison_rate = 0.1 }')


@pytest.mark.parametrize(("text", "message"), [
    ('[attacks.blend]\nattack = { target = 2 }\n', "naming the attack"),
    (f'[attacks.blend]\nattack = {BLEND_TOML}\nextra = 1\n', "a section holds"),
    (f'[attacks.blend]\nattack = {BLEND_TOML}\ndoc = "README.md"\n', "doc must name a page under docs/"),
    ('[attacks.blend]\nattack = { name = "blend", trigger_pattern = "checkerboard" }\n', "must state the whole spec"),
    ('[attacks.blend]\nattack = { name = "blend", trigger_pattern = "white" }\n', "blend takes trigger pattern"),
    (f'[attacks.badnet]\nattack = {BADNET_TOML}\n[attacks.badnet.cells."{BD}"]\noutcome = "miss"\nwhy = {WHY}\n',
     "meta.attack's"),
    (f'[attacks.blend]\nattack = {BLEND_TOML}\n[attacks.blend.cells."{BD}"]\noutcome = "borderline"\nwhy = {WHY}\n',
     "states its margin"),
    (f'[attacks.blend]\nattack = {BLEND_TOML}\n[attacks.blend.cells."{BD}"]\noutcome = "miss"\nmargin = 0.1\nwhy = {WHY}\n',
     "margin belongs to a borderline finding"),
    (f'[attacks.blend]\nattack = {BLEND_TOML}\n[attacks.blend.cells."{BD}"]\noutcome = "wrong-target"\n'
     f'target = 2\nwhy = {WHY}\n', "naming it is the truth"),
])
def test_other_attack_sections_are_validated(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


def test_the_shipped_other_attack_sections_match_the_presets():
    """The findings were measured on qbd.presets' models: a preset that changes orphans them."""
    from qbd.presets import ATTACK_PRESETS, QC_INT8_ATTACK, SPREAD_ATTACKS

    e = load_for("smoke")
    presets = {**ATTACK_PRESETS, "quant-conditioned-int8-static": QC_INT8_ATTACK,
               **{f"spread-{name}": a for name, a in SPREAD_ATTACKS.items()}}
    assert set(e.attacks) == set(presets) - {"badnet"}
    for name, section in e.attacks.items():
        assert section["attack"] == {k: v for k, v in presets[name].to_dict().items() if k != "seed"}
        for key, entry in section["cells"].items():
            for doc in re.findall(r"docs/[\w-]+\.md", entry["why"]):
                assert (ROOT / doc).is_file(), (key, doc)
