"""Reports show each cell's outcome against the truth: the judgement marks in Table 1, the count
line, the outcomes table (failures first) and the reason code of every invalid cell."""

from qbd.expectations import DEFAULT_ATTACK, Expectations
from qbd.report import count_line, invalid_reasons, markdown, outcomes, table1, terminal

ATTACK = {**DEFAULT_ATTACK, "seed": 0}
FINDING_WHY = "docs/quantization.md: no autograd kernel"


def _result(defense, status, target=None, code=None, clean_model=False):
    ds = "digits:clean" if clean_model else "digits"
    return {"cell": f"{ds}/int8-dynamic/{defense}[paper]", "dataset": "digits", "seed": 0,
            "attack": None if clean_model else dict(ATTACK),
            "quant": {"scheme": "int8-dynamic", "audit": {"quantized_param_fraction": 0.01, "input_gradient": False}},
            "defense": {"name": defense, "protocol": "paper", "params": {}},
            "verdict": {"status": status, "target_class": target, "reason": "why not" if status == "invalid" else None,
                        "reason_code": code, "evidence": {}},
            "clean_acc": 0.99, "asr": None if clean_model else 0.99}


def _judged():
    rs = [_result("neural-cleanse", "invalid", code="no-gradient"),  # a declared finding
          _result("strip", "detected", 0),  # the truth
          _result("activation-clustering", "clean"),  # a miss: FAIL
          _result("fine-pruning", "invalid", code="error"),  # a crash: FAIL
          _result("strip", "clean", clean_model=True)]  # the truth on the clean model
    e = Expectations(cells={rs[0]["cell"]: {"outcome": "invalid", "reason_code": "no-gradient", "why": FINDING_WHY}})
    for r in rs:
        r["judgement"] = e.judge(r).to_dict()
    return rs


def test_table1_marks_findings_and_failures_not_the_truth():
    header, rows = table1(_judged(), "paper")
    assert header == ["dataset", "scheme", "activation-clustering", "fine-pruning", "neural-cleanse", "strip"]
    assert rows == [["digits", "int8-dynamic", "clean [FAIL]", "INVALID (error) [FAIL]", "INVALID (no-gradient) [finding]", "DETECTED (t=0)"],
                    ["digits (clean model)", "int8-dynamic", "-", "-", "-", "clean"]]


def test_count_line_and_outcomes_rows():
    rs = _judged()
    assert count_line(rs) == "2 cells match the truth, 1 declared findings, 2 failing"
    assert count_line([{k: v for k, v in r.items() if k != "judgement"} for r in rs]) is None  # nothing judged
    header, rows = outcomes(rs)
    assert header == ["cell", "verdict", "outcome", "judgement", "why"]
    assert [r[:4] for r in rows] == [  # failures first, then findings; the truth only with passing=True
        ["digits/int8-dynamic/activation-clustering[paper]", "clean", "miss", "FAIL"],
        ["digits/int8-dynamic/fine-pruning[paper]", "invalid (error)", "invalid:error", "FAIL"],
        ["digits/int8-dynamic/neural-cleanse[paper]", "invalid (no-gradient)", "invalid:no-gradient", "finding"]]
    assert rows[2][4] == FINDING_WHY and rows[0][4].startswith("expected the truth (backdoored, target 0)")
    assert len(outcomes(rs, passing=True)[1]) == 5


def test_terminal_and_markdown_show_the_outcomes():
    rs = _judged()
    text = terminal(rs)
    assert text.startswith("outcome: 2 cells match the truth, 1 declared findings, 2 failing\n")
    assert "  FAIL    digits/int8-dynamic/fine-pruning[paper]: invalid (error) [invalid:error]" in text
    assert f"  finding digits/int8-dynamic/neural-cleanse[paper]: invalid (no-gradient) [invalid:no-gradient] - {FINDING_WHY}" in text
    md = markdown(rs)
    assert "Outcome: 2 cells match the truth, 1 declared findings, 2 failing." in md
    assert "| digits:clean/int8-dynamic/strip[paper] | clean | pass | pass |  |" in md
    assert "- digits/int8-dynamic/fine-pruning[paper]: [error] why not" in md


def test_invalid_reasons_carry_the_code():
    r = _result("x", "invalid", code=None)  # a Result written before reason codes
    assert invalid_reasons([r, _result("y", "invalid", code="timeout", clean_model=True)]) == [
        "digits/int8-dynamic/x[paper]: [unspecified] why not",
        "digits:clean/int8-dynamic/y[paper] (clean model): [timeout] why not"]
