"""Reports show each cell's outcome against the truth: the judgement marks in Table 1, the count
line, the outcomes table (failures first) and the reason code of every invalid cell."""

import pytest

from qbd.expectations import DEFAULT_ATTACK, Expectations
from qbd.report import markdown, terminal
from qbd.tables import count_line, invalid_reasons, outcomes, table1

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
    assert count_line(rs) == "2 cells match the truth, 1 declared finding, 2 failing"
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
    assert text.startswith("outcome: 2 cells match the truth, 1 declared finding, 2 failing\n")
    assert "  FAIL    digits/int8-dynamic/fine-pruning[paper]: invalid (error) [invalid:error]" in text
    assert f"  finding digits/int8-dynamic/neural-cleanse[paper]: invalid (no-gradient) [invalid:no-gradient] - {FINDING_WHY}" in text
    md = markdown(rs)
    assert "Outcome: 2 cells match the truth, 1 declared finding, 2 failing." in md
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
    from qbd.heatmap import heatmap

    heatmap(_five_seeds() + [_seeded(s, "clean", clean_model=True, scheme="fp32") for s in range(5)], tmp_path / "h.png")
    assert sorted(texts) == ["4/5\nFA 1/5", "FA 0/5"]


# -- the outcome heatmap ------------------------------------------------------------------------------
def _scored(r, score):
    r["verdict"]["score"] = score
    return r


def _finding(r):
    r["judgement"] = {"outcome": "invalid:no-gradient", "judgement": "finding", "expected": "finding: invalid:no-gradient",
                      "why": FINDING_WHY}
    return r


def _one_of_each():
    """One cell per category; the clean model's row lacks three defenses (missing cells).
    Returns the Results and {(row, column): category} of the drawn grid."""
    rs = [_scored(_result("strip", "detected", 0), 4.123),  # correct detection
          _result("spectral-signatures", "clean"),  # miss
          _scored(_result("activation-clustering", "detected", 11), 0.61),  # AC naming 11, the target is 0
          _result("neural-cleanse", "invalid", code="no-gradient"),  # invalid
          _finding(_result("fine-pruning", "invalid", code="no-gradient")),  # declared finding
          _result("strip", "detected", 3, clean_model=True),  # false alarm
          _result("spectral-signatures", "clean", clean_model=True)]  # clean, as it should be
    for r in rs:
        r.update(tier="smoke", model="tiny-cnn")
    # columns sorted by protocol, then defense; rows as Table 1: the backdoored model first
    expected = {(0, 0): "wrong-target", (0, 1): "invalid", (0, 2): "invalid", (0, 3): "miss", (0, 4): "correct-detection",
                (1, 0): "missing", (1, 1): "missing", (1, 2): "missing", (1, 3): "correct-clean", (1, 4): "false-alarm"}
    return rs, expected


def _mode_colour(img, centre, size, share=0.8):
    """The most common colour (0..255 RGB) in the middle `share` of the cell around `centre`: the
    cell's fill, whatever its text and hatching cover."""
    import numpy as np

    (x, y), (w, h) = centre, size
    block = img[int(y - share * h / 2):int(y + share * h / 2), int(x - share * w / 2):int(x + share * w / 2), :3]
    pixels = np.round(block.reshape(-1, 3) * 255).astype(int)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    return tuple(int(c) for c in colours[counts.argmax()]), pixels


def test_each_cell_is_drawn_in_its_outcomes_colour(tmp_path):
    import matplotlib.image
    import numpy as np
    from matplotlib.colors import to_rgb

    from qbd.heatmap import CATEGORIES, HATCH_COLOUR, draw_outcomes

    rs, expected = _one_of_each()
    drawn = draw_outcomes(rs)
    assert {(i, j): drawn.grid.category(i, j) for (i, j) in expected} == expected
    assert set(expected.values()) == set(CATEGORIES)  # every category is on the picture
    centres, size = drawn.centres(), drawn.cell_size()
    img = matplotlib.image.imread(drawn.save(tmp_path / "h.png"))
    for cell, cat in expected.items():
        want = tuple(round(255 * c) for c in to_rgb(CATEGORIES[cat].colour))
        got, pixels = _mode_colour(img, centres[cell], size)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1, (cell, cat, got, want)
    # a missing cell is hatched: a good share of its pixels are the hatch's darker grey, never clean's colour
    _, pixels = _mode_colour(img, centres[(1, 0)], size)
    hatch = np.array([round(255 * c) for c in to_rgb(HATCH_COLOUR)])
    assert (np.abs(pixels - hatch).max(axis=1) <= 40).mean() > 0.05


def test_the_heatmap_writes_what_each_cell_says_and_has_a_legend_of_every_category():
    from qbd.heatmap import CATEGORIES, draw_outcomes

    rs, _ = _one_of_each()
    drawn = draw_outcomes(rs)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in drawn.ax.texts}
    assert texts == {(0, 0): "t=11 / 0.61", (0, 1): "no-gradient", (0, 2): "no-gradient", (0, 3): "clean",
                     (0, 4): "t=0 / 4.12", (1, 0): "no Result", (1, 1): "no Result", (1, 2): "no Result",
                     (1, 3): "clean", (1, 4): "t=3"}
    from qbd.heatmap import FINDING

    (legend,) = drawn.figure.legends  # one legend, below both panels
    every = [*CATEGORIES.values(), FINDING]
    assert [t.get_text() for t in legend.get_texts()][:len(every)] == [c.label for c in every]
    assert [h.get_hatch() for h in legend.legend_handles][:len(every)] == [c.hatch for c in every]
    assert "FAIL: fails its expectation" in [t.get_text() for t in legend.get_texts()]
    labels = [t.get_text() for t in drawn.ax.get_xticklabels()]
    assert labels == ["activation-clustering[paper]", "fine-pruning[paper]", "neural-cleanse[paper]",
                      "spectral-signatures[paper]", "strip[paper]"]
    assert [t.get_text() for t in drawn.ax.get_yticklabels()] == ["digits / int8-dynamic", "digits (clean model) / int8-dynamic"]
    title = drawn.figure.get_suptitle()
    assert title == "smoke tier, tiny-cnn, badnet: target 0, white 3x3 trigger at bottom-right, 10 % poisoned"


def test_the_ca_asr_panel_shows_each_rows_deployed_model():
    from qbd.heatmap import draw_outcomes

    rs, _ = _one_of_each()
    for r in rs:
        if r["attack"] is not None:
            r.update(clean_acc=0.9, asr=0.75)
        else:
            r.update(clean_acc=0.95, asr=0.05)
    drawn = draw_outcomes(rs)
    bars = [(round(p.get_y() + p.get_height() / 2, 2), round(p.get_width(), 6)) for p in drawn.panel.patches]
    assert bars == [(-0.19, 90.0), (0.19, 75.0), (0.81, 95.0), (1.19, 5.0)]
    assert [t.get_text() for t in drawn.panel.texts] == ["90.0", "75.0", "95.0", "5.0"]
    (legend,) = drawn.figure.legends
    assert [t.get_text() for t in legend.get_texts()][-2:] == ["deployed model: clean accuracy", "deployed model: attack success rate"]


@pytest.mark.parametrize(("result", "category", "text"), [
    (_result("x", "detected", 0), "correct-detection", "t=0"),
    ({**_result("x", "detected"), "defense": {"name": "x", "protocol": "paper", "params": {}, "names_target": False}},
     "correct-detection", "detected"),  # a repair method names no class
    (_result("x", "detected"), "wrong-target", "detected"),  # naming none although the defense names targets
    (_result("x", "clean"), "miss", "clean"),
    (_result("x", "detected", 2, clean_model=True), "false-alarm", "t=2"),
    (_result("x", "clean", clean_model=True), "correct-clean", "clean"),
    (_result("x", "invalid", code=None), "invalid", "unspecified"),
    ({**_result("x", "clean"), "judgement": {"outcome": "miss", "judgement": "FAIL"}}, "miss", "clean\nFAIL"),
    # a declared miss is drawn as a miss (hatched as declared: test_heatmap_layout.py)
    ({**_result("x", "clean"), "judgement": {"outcome": "miss", "judgement": "finding"}}, "miss", "clean"),
    # a finding that no longer holds: the truth's colour, marked FAIL
    ({**_result("x", "detected", 0), "judgement": {"outcome": "pass", "judgement": "FAIL"}}, "correct-detection", "t=0\nFAIL"),
    (_scored(_result("x", "clean"), 12345.6), "miss", "clean / 12346"),
])
def test_a_cells_category_and_text(result, category, text):
    from qbd.heatmap import category as category_of
    from qbd.heatmap import cell_text

    assert category_of(result) == category and cell_text(result) == text


def test_the_palette_tells_every_category_apart():
    from matplotlib.colors import to_rgb

    from qbd.heatmap import CATEGORIES

    colours = [(to_rgb(c.colour), c.hatch) for c in CATEGORIES.values()]
    assert len(set(colours)) == len(colours)
    assert CATEGORIES["missing"].hatch and CATEGORIES["missing"].colour not in {c.colour for k, c in CATEGORIES.items() if k != "missing"}


def test_the_rate_heatmap_has_a_legend_and_hatches_a_missing_cell():
    from qbd.heatmap import CATEGORIES, NOTHING_TO_DETECT, draw_rates
    from qbd.rates import rows

    rs = _five_seeds() + [_seeded(s, "clean", clean_model=True, scheme="fp32") for s in range(5)]
    other = [{**r, "defense": {**r["defense"], "name": "ss"}, "cell": r["cell"].replace("strip", "ss")}
             for r in rs if r["quant"]["scheme"] == "fp32"]  # ss ran on fp32 only: its int8-dynamic cell is missing
    fig = draw_rates(rows(rs + other), "a title")
    [ax] = fig.axes[:1]
    from qbd.heatmap import FINDING

    assert [t.get_text() for t in ax.get_legend().get_texts()] == [NOTHING_TO_DETECT.label, CATEGORIES["missing"].label,
                                                                  FINDING.label, "FAIL: the row fails its expectation"]
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert [(p.get_x() + 0.5, p.get_y() + 0.5) for p in hatched] == [(0.0, 1.0)]  # column ss, row int8-dynamic
    assert "no Result" in [t.get_text() for t in ax.texts] and fig.get_suptitle() == "a title"


# -- run metadata -------------------------------------------------------------------------------------
def test_run_metadata_fills_what_the_caller_leaves_out(tmp_path):
    import json

    from qbd import __version__
    from qbd.run_metadata import run_metadata

    m = run_metadata(tier="paper", device="cuda:0", expectations=tmp_path / "t.toml", seeds=(0, 1), command=None)
    assert m["tier"] == "paper" and m["device"] == "cuda:0" and m["seeds"] == [0, 1]
    assert m["expectations"] == str(tmp_path / "t.toml")  # JSON-ready
    assert m["versions"]["qbd"] == __version__ and {"torch", "torchvision", "python"} <= set(m["versions"])
    # which qbd: this checkout's commit (a version number does not change between commits)
    assert m["versions"]["qbd_source"].startswith(("git ", "installed", "a git checkout"))
    assert {"os", "machine", "cpu", "cpu_count"} <= set(m["platform"]) and m["date"].endswith("+00:00")
    assert m["command"]  # None is absent: this process's command line
    assert run_metadata(command="qbd run", date="then")["command"] == "qbd run"
    json.dumps(m, allow_nan=False)


def test_write_report_carries_the_run_in_both_files_and_links_the_picture(tmp_path, monkeypatch):
    from qbd.report import markdown, write_report
    from qbd.results import load, read_run

    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    rs = [_seeded(0, "detected", 0), _seeded(0, "clean", clean_model=True)]
    for r in rs:
        r.update(tier="smoke", placement={"device": "cpu", "deployed": "cpu", "surrogate": "cpu"})
    paths = write_report(rs, tmp_path / "out", title="qbd smoke matrix",
                         run={"command": "qbd run --tier smoke", "expectations": "qbd/expected/smoke.toml"})
    run = read_run(paths["results.json"])
    assert load(paths["results.json"])[0] == sorted(rs, key=lambda r: r["cell"])  # the Results load as before
    assert {k: run[k] for k in ("command", "tier", "model", "seeds", "device", "expectations")} == {
        "command": "qbd run --tier smoke", "tier": "smoke", "model": "tiny-cnn", "seeds": [0], "device": "cpu",
        "expectations": "qbd/expected/smoke.toml"}  # the caller's, then what the Results say
    assert run["attack"] == [{k: v for k, v in ATTACK.items() if k != "seed"}]
    md = paths["report.md"].read_text()
    assert "| command | `qbd run --tier smoke` |" in md and "| tier | smoke |" in md and "| seeds | 0 |" in md
    assert "| attack | badnet: target 0, white 3x3 trigger at bottom-right, 10 % poisoned |" in md
    assert f"| versions | qbd {run['versions']['qbd']}, torch {run['versions']['torch']}," in md
    assert "| expectations | qbd/expected/smoke.toml |" in md and f"| date | {run['date']} |" in md
    assert "![heatmap](heatmap.png)" in md and "the tables below, which are the reference" in md
    assert md.index("| command |") < md.index("![heatmap]") < md.index("## Table 1")
    # the step summary cannot show the job's files: the same report without the picture
    assert "| tier | smoke |" in summary.read_text() and "![heatmap]" not in summary.read_text()
    assert "![heatmap]" not in markdown(rs) and "| command |" not in markdown(rs)  # as before, unless asked


@pytest.mark.parametrize(("argv", "command"), [
    (["/venv/bin/qbd", "run", "--tier", "smoke"], "qbd run --tier smoke"),
    (["/src/qbd/__main__.py", "run", "--defense", "a b"], "python -m qbd run --defense 'a b'"),
    (["/venv/bin/pytest", "tests/matrix", "--qbd-report", "out"], "pytest tests/matrix --qbd-report out"),
])
def test_the_default_command_is_the_command_line_as_typed(monkeypatch, argv, command):
    import sys

    from qbd.run_metadata import run_metadata

    monkeypatch.setattr(sys, "argv", argv)
    assert run_metadata()["command"] == command


def test_an_empty_run_still_writes_its_report(tmp_path):
    from qbd.heatmap import draw_outcomes
    from qbd.report import write_report
    from qbd.results import read_run

    paths = write_report([], tmp_path)
    assert paths["heatmap.png"].stat().st_size > 1000 and read_run(paths["results.json"])["versions"]
    assert "no Results" in [t.get_text() for t in draw_outcomes([]).ax.texts]


def _paired_seeds():
    """strip over five models on fp32 and int8-dynamic: fp32 detects 5/5 and is quiet on 5/5 clean
    ones; int8-dynamic loses seeds 0-3 and false-alarms on seed 4's clean model."""
    rs = []
    for s in range(5):
        rs += [_seeded(s, "detected", 0, scheme="fp32"), _seeded(s, "clean", clean_model=True, scheme="fp32"),
               _seeded(s, "clean" if s < 4 else "detected", None if s < 4 else 0),
               _seeded(s, "detected" if s == 4 else "clean", 0 if s == 4 else None, clean_model=True)]
    return rs


def test_the_paired_effects_head_the_report_over_several_models(tmp_path):
    from qbd.report import write_report

    rs = _paired_seeds()
    text = terminal(rs)
    assert text.index("Quantization's effect") < text.index("Table 1")
    line = next(x for x in text.splitlines() if x.startswith("digits") and "int8-dynamic" in x)
    assert "5/5 -> 1/5 (-0.80, p=0.125, Holm 0.25)" in line and "0/5 -> 1/5 (+0.20, p=1, Holm 1)" in line
    md = markdown(rs)
    assert md.index("## Quantization's effect, paired with fp32 on the same models") < md.index("## Table 1")
    paths = write_report(rs, tmp_path)
    assert paths["effects.png"].stat().st_size > 1000 and "![effects](effects.png)" in paths["report.md"].read_text()
    one = [r for r in rs if r["seed"] == 0]
    assert "Quantization's effect" not in terminal(one) and "One model per cell" in markdown(one)
    assert "effects.png" not in write_report(one, tmp_path / "one")


def test_several_models_without_fp32_say_why_there_are_no_effects():
    md = markdown(_five_seeds())  # int8-dynamic only
    assert "No paired effects" in md and "fp32 was not among the schemes run" in md


def test_a_verdict_the_pooled_threshold_decided_is_named_in_the_report():
    """A data set without a calibration of its own is judged with the pooled "*" value: the
    terminal text and report.md say so, once per data set, defense and threshold; a data set's own
    calibration is not listed."""
    from qbd.report import markdown, terminal

    pooled = _result("activation-clustering", "clean")
    pooled["dataset"] = "cifar10"
    pooled["verdict"]["evidence"] = {"threshold_calibrated_for": {
        "silhouette_threshold": "*: all calibration data sets pooled ('cifar10' has no calibration of its own)"}}
    own = _result("activation-clustering", "clean")
    own["verdict"]["evidence"] = {"threshold_calibrated_for": {"silhouette_threshold": "digits"}}
    line = "cifar10 / activation-clustering: silhouette_threshold = *: all calibration data sets pooled"
    md = markdown([pooled, dict(pooled), own])
    assert "## Thresholds not calibrated for the data set" in md and md.count(line) == 1
    assert line in terminal([pooled, own])
    assert "not calibrated" not in markdown([own]) and "silhouette_threshold =" not in terminal([own])
