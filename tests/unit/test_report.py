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


# -- rates over seeds ---------------------------------------------------------------------------------
def _seeded(seed, status, target=None, clean_model=False, scheme="int8-dynamic"):
    r = _result("strip", status, target, clean_model=clean_model)
    r["seed"] = seed
    r["quant"] = {"scheme": scheme, "audit": {"quantized_param_fraction": 0.01, "input_gradient": False,
                                              "engine": None, "differentiable": False}}
    r["cell"] = r["cell"].replace("int8-dynamic", scheme)
    if r["attack"] is not None:
        r["attack"]["seed"] = seed
    r["verdict"].update(score=None, threshold=None, controls={})
    return {**r, "model": "tiny-cnn", "seconds": 0.1, "versions": {}, "weights": None}


def _five_seeds():
    """strip on one row: 4 of 5 backdoored models detected naming 0 (seed 2 names 3), 1 false alarm in 5."""
    rs = [_seeded(s, "detected", 3 if s == 2 else 0) for s in range(5)]
    rs += [_seeded(s, "detected" if s == 4 else "clean", 0 if s == 4 else None, clean_model=True) for s in range(5)]
    return rs


def test_terminal_and_markdown_show_the_rates_over_seeds():
    rs = _five_seeds()
    text = terminal(rs)
    assert "Rates over seeds (Wilson 95 % intervals;" in text
    row = next(line for line in text.splitlines() if line.startswith("digits/int8-dynamic/strip[paper]"))
    assert "4/5 = 0.80 [0.38, 0.96]" in row and "1/5 = 0.20 [0.04, 0.62]" in row and row.rstrip().endswith("0-4")
    # Tables 1 and 2 show the first seed's models, and say so
    assert "Table 1 (paper protocol, seed 0's models; every seed's in Rates over seeds): detection per cell" in text
    t1 = text[text.index("Table 1"):text.index("Table 2")]
    assert "DETECTED (t=0)" in t1 and "t=3" not in t1
    md = markdown(rs)
    assert "## Rates over seeds" in md
    assert "| digits/int8-dynamic/strip[paper] | 4/5 = 0.80 [0.38, 0.96] | 1/5 = 0.20 [0.04, 0.62] | 0 | 0-4 |" in md


def test_a_single_seed_report_has_no_rates_section():
    rs = [_seeded(0, "detected", 0), _seeded(0, "clean", clean_model=True)]  # one backdoored and one clean model: one seed
    assert "Rates over seeds" not in terminal(rs) and "Rates over seeds" not in markdown(rs)
    assert "seed 0's models" not in terminal(rs)


def test_write_report_carries_the_rows_and_draws_the_rates(tmp_path):
    from qbd import rates
    from qbd.report import write_report
    from qbd.results import load

    rs = _five_seeds() + [_seeded(s, "clean", clean_model=True, scheme="fp32") for s in range(5)]  # a clean-only row
    paths = write_report(rs, tmp_path)
    results, rows = load(paths["results.json"])
    assert rows == rates.rows(rs) and len(results) == 15
    assert [(r["row"], r["n_backdoored"], r["n_clean"]) for r in rows] == [
        ("digits/fp32/strip[paper]", 0, 5), ("digits/int8-dynamic/strip[paper]", 5, 5)]
    assert paths["heatmap.png"].stat().st_size > 1000
    single = write_report([_seeded(0, "detected", 0)], tmp_path / "one")
    assert load(single["results.json"])[1][0]["n_backdoored"] == 1  # rows are there for a single seed too


def test_the_rate_heatmap_annotates_detections_and_false_alarms(tmp_path, monkeypatch):
    import matplotlib.axes

    texts = []
    real = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, x, y, s, *a, **k: texts.append(s) or real(self, x, y, s, *a, **k))
    from qbd.report import heatmap

    heatmap(_five_seeds() + [_seeded(s, "clean", clean_model=True, scheme="fp32") for s in range(5)], tmp_path / "h.png")
    assert sorted(texts) == ["4/5\nFA 1/5", "FA 0/5"]
