"""The command line as a user meets it: exit codes, one-line errors, JSON output, the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qbd import expectations
from qbd import results as results_io
from qbd.config import AttackSpec


def qbd(*args: str, cache: Path | None = None, check: bool = False, timeout: float = 600,
        path: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m qbd ARGS`; `path` goes on PYTHONPATH (a third-party defense module)."""
    import os

    env = dict(os.environ)
    if cache is not None:
        env["QBD_CACHE_DIR"] = str(cache)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path), env.get("PYTHONPATH")) if p)
    if args[:1] == ("run",) and not any(a == "-j" or a.startswith(("-j", "--jobs")) for a in args):
        # the suite's xdist workers already use the cores: a run here stays in its process
        args = (*args, "-j", "1")
    return subprocess.run([sys.executable, "-m", "qbd", *args], capture_output=True, text=True, env=env, check=check, timeout=timeout)


FAST = ("--dataset", "digits", "--epochs", "1", "--min-clean-acc", "0", "--min-asr", "0", "--no-progress")


def test_help_lists_every_command():
    out = qbd("--help").stdout
    for cmd in ("train", "run", "quant", "store", "list"):
        assert cmd in out


def test_list_shows_registries():
    out = qbd("list").stdout
    assert "synthetic" in out and "int8-static" in out and "neural-cleanse" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", "--dataset", "mnist"), "unknown dataset 'mnist'; valid: cifar10, digits, gtsrb, synthetic"),
        (("train", "--model", "vgg"), "unknown model 'vgg'"),
        (("train", "--poison-rate", "0"), "poison rate must be in (0, 1]"),
        (("train", "--dataset", "digits", "--target", "10"), "target class 10 out of range"),
        (("train", "--dataset", "digits", "--trigger-size", "40"), "larger than the 32x32 image"),
        (("train", "--trigger-position", "middle"), "trigger position 'middle'"),
        (("run", "--quant", "int3"), "unknown quant 'int3'"),
        (("run", "--defense", "magic"), "unknown defense 'magic'"),
        (("train", "--dataset", "cifar10", "--data-root", "/nonexistent"), "cifar-10-batches-py"),
        (("run", "--defense-timeout", "0"), "expected a number of seconds > 0, got '0'"),
        (("run", "--defense", "nosuch.module:Defense"), "--defense 'nosuch.module:Defense': cannot load it"),
        (("train", "--seed", "-1"), "argument --seed: expected an integer >= 0, got -1"),
        (("run", "--seeds", "0"), "argument --seeds: expected a number of seeds >= 1, got 0"),
        (("run", "--seeds", "two"), "argument --seeds: expected a number of seeds >= 1, got 'two'"),
        (("run", "--seeds", "2", "--model-file", "m.safetensors", "--sha256", "ab"), "--model-file is one model: drop one"),
        (("run", "--seeds", "2", "--attack-seed", "3"), "model s is poisoned with attack seed s; drop --attack-seed"),
        (("run", "--seeds", "1,1"), "argument --seeds: model seeds must be distinct and >= 0, got '1,1'"),
        (("run", "--seeds", "1,x"), "argument --seeds: expected a number of seeds or comma-separated model seeds, got '1,x'"),
        (("run", "--seeds", "0,2", "--seed", "3"), "--seeds 0,2 names the model seeds; drop --seed 3"),
        (("run", "--quant", "fp32,int4-sim", "--engine", "x86"), "none of the selected schemes (fp32, int4-sim) takes a quantized engine"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, message, tmp_path):
    r = qbd(*args, cache=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_train_json_then_cache_hit(tmp_path):
    first = json.loads(qbd("train", *FAST, "--json", cache=tmp_path, check=True).stdout)
    for key in ("clean_acc", "asr", "cache", "key", "seconds"):
        assert key in first
    assert first["cache"] == "miss" and 0 <= first["clean_acc"] <= 1 and 0 <= first["asr"] <= 1
    second = json.loads(qbd("train", *FAST, "--json", cache=tmp_path, check=True).stdout)
    assert second["cache"] == "hit" and second["key"] == first["key"]
    assert second["clean_acc"] == first["clean_acc"]


def test_gate_failure_exits_1_with_reason(tmp_path):
    r = qbd("train", "--dataset", "digits", "--epochs", "1", "--min-clean-acc", "1.0", "--min-asr", "0", "--no-progress", cache=tmp_path)
    assert r.returncode == 1
    assert "Phase-1 gate failed: clean accuracy" in r.stderr


def test_four_concurrent_trainings_train_once(tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-m", "qbd", "train", *FAST, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**__import__("os").environ, "QBD_CACHE_DIR": str(tmp_path)})
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    caches = sorted(json.loads(o)["cache"] for o, _ in outs)
    assert caches == ["hit", "hit", "hit", "miss"]
    assert len(list((tmp_path / "models").glob("*/weights.safetensors"))) == 1


def test_run_json_and_report_agree(tmp_path):
    """`qbd run` on the shared store: Results satisfy the contract and report.md shows them."""
    r = qbd("run", "--dataset", "digits", "--quant", "fp32,int8-dynamic", "--defense", "strip", "--protocol", "canonical",
            "--json", "--no-progress", "--report", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)["results"]
    assert len(results) == 4  # two schemes, each on the backdoored model and on the negative control
    for res in results:
        assert results_io.problems(res) == []
        # the default digits models are pinned in the zoo: loaded, sha256-verified, not trained
        assert res["weights"]["origin"] == "zoo" and len(res["weights"]["sha256"]) == 64
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.json", "report.md", "heatmap.png"}
    assert results_io.read(tmp_path / "out" / "results.json") == sorted(results, key=lambda x: x["cell"])
    md = (tmp_path / "out" / "report.md").read_text()
    # the run's metadata, in the JSON, results.json and report.md, with the picture linked
    run = json.loads(r.stdout)["run"]
    assert run == json.loads((tmp_path / "out" / "results.json").read_text())["run"]
    assert run["tier"] == "smoke" and run["device"] == "cpu" and run["expectations"].endswith("smoke.toml")
    assert " run " in f" {run['command']} " and run["versions"]["qbd"] and run["date"]
    assert "![heatmap](heatmap.png)" in md and run["command"] in md
    table = expectations.load(expectations.shipped("smoke"))  # `qbd run` judges against it by default
    for res in results:
        entry = table.measured_row(res)
        assert entry is not None, f"{res['cell']}: its row is measured over the zoo's models in the shipped table"
        if res["judgement"]["outcome"] == "pass":
            # the truth: the backdoor planted with --target's default (0) is named; the clean model is clean
            truth = ("detected", 0) if res["attack"] is not None else ("clean", None)
            assert (res["verdict"]["status"], res["verdict"]["target_class"]) == truth, res["verdict"]
            assert res["judgement"]["judgement"] == "pass"
        else:  # an outcome its row measured on other models too: a finding of the row's
            kind = "backdoored" if res["attack"] is not None else "clean"
            assert entry[kind].get(res["judgement"]["outcome"]), (res["judgement"], entry)
            assert res["judgement"]["judgement"] == "finding"
        word = {"detected": "DETECTED", "clean": "clean", "invalid": "INVALID"}[res["verdict"]["status"]]
        row = next(line for line in md.splitlines() if line.startswith(f"| {res['dataset']}") and f"| {res['quant']['scheme']} |" in line
                   and ("clean model" in line) == (res["attack"] is None))
        finding = res["judgement"]["judgement"] == "finding"
        assert word in row and ("[finding]" in row) == finding and "[FAIL]" not in row
    assert f"Outcome: {len(results) - sum(table.finding(r) is not None for r in results)} cells match the truth" in md


# -- qbd run --expectations: the gate --------------------------------------------------------------
PLUGIN = """
from qbd.defenses.base import Verdict


class AlwaysClean:
    # says clean whatever the model: it misses every backdoor
    name = "always-clean"
    requires = frozenset({"clean_holdout"})

    def detect(self, subject, inputs, generator):
        return Verdict("clean")


class AlwaysZero:
    # detects on every model naming class 0: the planted target, and a false alarm on a clean model
    name = "always-zero"
    requires = frozenset({"clean_holdout"})

    def detect(self, subject, inputs, generator):
        return Verdict("detected", score=1.0, threshold=0.5, target_class=0)


class Crash:
    name = "crash"
    requires = frozenset({"clean_holdout"})

    def detect(self, subject, inputs, generator):
        raise ValueError("boom in a third-party defense")
"""
# cheap cells: the embedded digits set, one scheme, a defense that does nothing (the models come from the store)
GATE = ("run", "--dataset", "digits", "--quant", "fp32", "--protocol", "canonical", "--no-progress", "--json")
MISSED = "digits/fp32/always-clean[canonical]"


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    (tmp_path / "qbd_gate_plugin.py").write_text(PLUGIN)
    return tmp_path


def _table(tmp_path: Path, entry: str) -> Path:
    p = tmp_path / "expected.toml"
    p.write_text(f'[cells."{MISSED}"]\n{entry}why = "tests/unit/test_cli.py: AlwaysClean says clean whatever the model"\n')
    return p


def test_gate_passes_when_every_declared_finding_holds(plugin, tmp_path):
    table = _table(tmp_path, 'outcome = "miss"\n')
    r = qbd(*GATE, "--defense", "qbd_gate_plugin:AlwaysClean", "--expectations", str(table), path=plugin)
    assert r.returncode == 0, r.stderr
    judged = {res["cell"]: res["judgement"] for res in json.loads(r.stdout)["results"]}
    assert {c: (j["outcome"], j["judgement"]) for c, j in judged.items()} == {
        MISSED: ("miss", "finding"), "digits:clean/fp32/always-clean[canonical]": ("pass", "pass")}
    # the author's table extends the one qbd ships: both are named
    assert (f"qbd: outcome: 1 cell matches the truth, 1 declared finding, 0 failing (expectations: {expectations.shipped('smoke')}"
            f" + {table})") in r.stderr
    assert "qbd: FAIL" not in r.stderr


def test_gate_fails_a_declared_finding_that_does_not_hold(plugin, tmp_path):
    table = _table(tmp_path, 'outcome = "invalid"\nreason_code = "no-signal"\n')
    r = qbd(*GATE, "--no-controls", "--defense", "qbd_gate_plugin:AlwaysClean", "--expectations", str(table), path=plugin)
    assert r.returncode == 1, r.stderr
    assert f"qbd: FAIL {MISSED}: declared finding 'invalid:no-signal' does not hold: measured miss" in r.stderr
    assert "0 cells match the truth, 0 declared findings, 1 failing" in r.stderr


@pytest.mark.parametrize("gate", [True, False], ids=["gated", "no-gate"])
def test_a_crashing_defense_fails_its_cell_with_the_traceback(plugin, tmp_path, gate):
    """Against the table qbd ships (the default): a crash is never expected. What prints FAIL exits
    1, as pytest does; --no-gate prints the same and exits 0."""
    r = qbd(*GATE, "--no-controls", "--defense", "qbd_gate_plugin:Crash", *([] if gate else ["--no-gate"]),
            "--report", str(tmp_path / "out"), path=plugin)
    assert r.returncode == (1 if gate else 0), r.stderr
    (res,) = json.loads(r.stdout)["results"]
    assert (res["verdict"]["status"], res["verdict"]["reason_code"]) == ("invalid", "error")
    assert (res["judgement"]["outcome"], res["judgement"]["judgement"]) == ("invalid:error", "FAIL")
    assert f"(expectations: {expectations.shipped('smoke')})" in r.stderr
    assert "0 cells match the truth, 0 declared findings, 1 failing" in r.stderr
    fail = r.stderr[r.stderr.index("qbd: FAIL digits/fp32/crash[canonical]: "):]
    assert "Traceback (most recent call last)" in fail and "qbd_gate_plugin.py" in fail
    assert "ValueError: boom in a third-party defense" in fail
    assert ("exit 0 all the same (--no-gate)" in r.stderr) is not gate
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| digits/fp32/crash[canonical] | invalid (error) | invalid:error | FAIL |" in md
    assert "INVALID (error) [FAIL]" in md


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    ('[cells."digits/fp32/strip[canonical]"]\nstatus = "clean"\n', "unknown key(s) ['status']"),  # the old format
    ('[cells."digits/fp32/strip[canonical]"]\noutcome = "invalid"\nreason_code = "error"\nwhy = "w"\n', "never an expected outcome"),
])
def test_a_bad_expectations_file_is_refused_before_the_run(tmp_path, content, message):
    table = tmp_path / "expected.toml"
    if content is not None:
        table.write_text(content)
    cache = tmp_path / "cache"
    r = qbd(*GATE, "--defense", "strip", "--expectations", str(table), cache=cache)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and str(table) in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (cache / "models").exists()  # refused before anything was trained


# -- qbd run --seeds N: rates over seeds ---------------------------------------------------------------
# models 1 and 2 of a one-epoch recipe (training and attack seed s), trained once for this module
SEEDS = ("run", "--dataset", "digits", "--protocol", "canonical", "--no-progress", "--epochs", "1", "--min-clean-acc", "0",
         "--min-asr", "0", "--seed", "1")
ALWAYS = "qbd_gate_plugin:AlwaysClean,qbd_gate_plugin:AlwaysZero"


@pytest.fixture(scope="module")
def seed_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("seed-cache")


def test_run_seeds_reports_rows_of_rates(plugin, seed_cache, tmp_path):
    r = qbd(*SEEDS, "--no-gate", "--seeds", "2", "--quant", "fp32,int8-dynamic", "--defense", ALWAYS, "--json", "--report", str(tmp_path / "out"),
            cache=seed_cache, path=plugin)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    results, rows = out["results"], out["rows"]
    # every seed's backdoored and clean model on every scheme (the clean control too, over several seeds)
    assert len(results) == 2 * 2 * 2 * 2  # seeds x kinds x schemes x defenses
    assert sorted({(x["seed"], (x["attack"] or {"seed": -1})["seed"]) for x in results}) == [(1, -1), (1, 1), (2, -1), (2, 2)]
    assert [row["row"] for row in rows] == ["digits/fp32/always-clean[canonical]", "digits/fp32/always-zero[canonical]",
                                            "digits/int8-dynamic/always-clean[canonical]", "digits/int8-dynamic/always-zero[canonical]"]
    for row in rows:
        assert (row["n_backdoored"], row["n_clean"], row["seeds"]) == (2, 2, [1, 2])
        zero = row["defense"] == "always-zero"
        assert (row["detected"], row["false_alarms"]) == ((2, 2) if zero else (0, 0))
        assert results_io.row_problems(row) == []
    assert "qbd: digits/tiny-cnn/badnet-t0-white3-bottom-right-p0.1/s2 (seed 2): trained now, stored" in r.stderr or "(seed 2): from the store" in r.stderr
    assert "digits:clean/int8-dynamic/always-zero[canonical] (seed 1): detected (target 0)" in r.stderr
    assert results_io.load(tmp_path / "out" / "results.json")[1] == rows
    assert "## Rates over seeds" in (tmp_path / "out" / "report.md").read_text()
    text = qbd(*SEEDS, "--no-gate", "--seeds", "2", "--quant", "fp32", "--defense", ALWAYS, cache=seed_cache, path=plugin)
    assert text.returncode == 0, text.stderr
    assert "Rates over seeds" in text.stdout
    row = next(line for line in text.stdout.splitlines() if line.startswith("digits/fp32/always-zero[canonical]"))
    assert "2/2 = 1.00 [0.34, 1.00]" in row  # detections, then the false alarms: the same count here
    assert row.count("2/2 = 1.00 [0.34, 1.00]") == 2
    # the model seeds named instead of counted: the same models (store hits), the same rows
    assert SEEDS[-2:] == ("--seed", "1")
    listed = qbd(*SEEDS[:-2], "--no-gate", "--seeds", "2,1", "--quant", "fp32,int8-dynamic", "--defense", ALWAYS, "--json",
                 cache=seed_cache, path=plugin)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["rows"] == rows


def test_a_single_seed_run_prints_rows_in_json_but_no_rates_table(plugin, seed_cache):
    # --attack-seed 1: the very model --seeds trains as seed 1 (a store hit). The --seeds run first, here:
    # under xdist the test that also runs it may be on another worker, with its own store
    warm = qbd(*SEEDS, "--no-gate", "--seeds", "2", "--quant", "fp32", "--defense", ALWAYS, "--no-controls", cache=seed_cache, path=plugin)
    assert warm.returncode == 0, warm.stderr
    r = qbd(*SEEDS, "--no-gate", "--attack-seed", "1", "--quant", "fp32,int8-dynamic", "--defense", "qbd_gate_plugin:AlwaysZero", "--json",
            cache=seed_cache, path=plugin)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["results"]) == 4  # two schemes, and the clean control on each of them
    assert [(row["row"], row["n_backdoored"], row["n_clean"]) for row in out["rows"]] == [
        ("digits/fp32/always-zero[canonical]", 1, 1), ("digits/int8-dynamic/always-zero[canonical]", 1, 1)]
    assert "from the store (trained earlier)" in r.stderr and "(seed 1)" not in r.stderr
    text = qbd(*SEEDS, "--attack-seed", "1", "--quant", "fp32", "--defense", "qbd_gate_plugin:AlwaysZero", cache=seed_cache, path=plugin)
    assert "Rates over seeds" not in text.stdout


def _row_table(tmp_path: Path, **bounds: float) -> Path:
    p = tmp_path / "rows.toml"
    # meta: no CA / ASR minimum for the one-epoch models of this module; a table with gates of its own
    # stands alone (a table extending the shipped one keeps qbd's gates)
    p.write_text('[meta]\nextends = false\nmin_clean_acc = 0.0\nmin_asr = 0.0\n[rows."digits/fp32/always-clean[canonical]"]\n' + "".join(f"{k} = {v}\n" for k, v in bounds.items())
                 + 'why = "tests/unit/test_cli.py: AlwaysClean never fires"\n')
    return p


def test_the_gate_judges_a_bounded_row_by_its_rates(plugin, seed_cache, tmp_path):
    args = (*SEEDS, "--quant", "fp32", "--defense", "qbd_gate_plugin:AlwaysClean", "--json")
    held = qbd(*args, "--seeds", "2", "--expectations", str(_row_table(tmp_path, max_detection_rate=0.0, max_false_alarm_rate=0.0)),
               cache=seed_cache, path=plugin)
    assert held.returncode == 0, held.stderr
    judged = {(x["cell"], x["seed"]): x["judgement"]["judgement"] for x in json.loads(held.stdout)["results"]}
    # the misses are accounted for by the row's rates; the clean models match the truth
    assert judged == {("digits/fp32/always-clean[canonical]", 1): "finding", ("digits/fp32/always-clean[canonical]", 2): "finding",
                      ("digits:clean/fp32/always-clean[canonical]", 1): "pass", ("digits:clean/fp32/always-clean[canonical]", 2): "pass"}
    assert "qbd: rows judged over their models: 1, failing: 0" in held.stderr and "qbd: FAIL" not in held.stderr
    failed = qbd(*args, "--seeds", "2", "--expectations", str(_row_table(tmp_path, min_detection_rate=0.5)), cache=seed_cache, path=plugin)
    assert failed.returncode == 1, failed.stderr
    assert ("qbd: FAIL digits/fp32/always-clean[canonical]: detection rate 0/2 = 0.00: expected >= 0.5 (min_detection_rate;"
            " why: tests/unit/test_cli.py: AlwaysClean never fires)") in failed.stderr
    assert failed.stderr.count("qbd: FAIL") == 1  # the cells themselves pass: the row fails
    # one seed: row bounds are ignored, and the miss fails its cell as before
    single = qbd(*args, "--attack-seed", "1", "--expectations", str(_row_table(tmp_path, max_detection_rate=0.0)),
                 cache=seed_cache, path=plugin)
    assert single.returncode == 1, single.stderr
    assert "qbd: FAIL digits/fp32/always-clean[canonical]: expected the truth (backdoored, target 0)" in single.stderr


def test_without_bounds_every_seeds_cell_is_judged_on_its_own(plugin, seed_cache):
    r = qbd(*SEEDS, "--seeds", "2", "--quant", "fp32", "--no-controls", "--defense", "qbd_gate_plugin:AlwaysClean", "--expectations",
            cache=seed_cache, path=plugin)
    assert r.returncode == 1, r.stderr
    for seed in (1, 2):
        assert f"qbd: FAIL digits/fp32/always-clean[canonical] (seed {seed}): expected the truth" in r.stderr


def test_seed_s_is_model_s_of_the_zoo():
    """`--seed s` without --attack-seed is the zoo's model s: training seed and attack seed s."""
    from qbd.cli import build_parser
    from qbd.cli_options import job_from_args
    from qbd.presets import seeded_job

    args = build_parser().parse_args(["train", "--dataset", "digits", "--seed", "3"])
    assert job_from_args(args) == seeded_job("digits", "tiny-cnn", 3, AttackSpec())
    args = build_parser().parse_args(["train", "--dataset", "digits", "--seed", "3", "--attack-seed", "0"])
    assert job_from_args(args).attack.seed == 0


def test_cells_on_worker_processes_give_the_same_results_in_the_same_order():
    """`-j 2` runs the cells on two worker processes of one thread each; `-j 1` in this process,
    on one thread: the same Results (the timing aside), in the plan's order."""
    sel = ("run", "--dataset", "digits", "--quant", "fp32,int4-sim", "--defense", "spectral-signatures,strip",
           "--protocol", "canonical", "--json", "--no-progress")
    out = {}
    for j in ("1", "2"):
        r = qbd(*sel, "-j", j)
        assert r.returncode == 0, r.stderr
        out[j] = json.loads(r.stdout)["results"]
    assert "8 cells on 2 worker processes" in r.stderr
    assert [x["cell"] for x in out["1"]] == [x["cell"] for x in out["2"]] == [
        "digits/fp32/spectral-signatures[canonical]", "digits/fp32/strip[canonical]",
        "digits/int4-sim/spectral-signatures[canonical]", "digits/int4-sim/strip[canonical]",
        "digits:clean/fp32/spectral-signatures[canonical]", "digits:clean/fp32/strip[canonical]",
        "digits:clean/int4-sim/spectral-signatures[canonical]", "digits:clean/int4-sim/strip[canonical]"]
    for a, b in zip(out["1"], out["2"], strict=True):
        assert a["verdict"] == b["verdict"] and (a["clean_acc"], a["asr"]) == (b["clean_acc"], b["asr"])
        assert a["versions"]["torch_threads"] == b["versions"]["torch_threads"] == 1


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_a_bad_worker_count_is_a_usage_error(bad):
    r = qbd("run", "-j", bad)
    assert r.returncode == 2 and "a worker count (or auto)" in r.stderr


def test_list_json_names_everything_a_run_can_use():
    r = qbd("list", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"datasets", "models", "schemes", "defenses", "protocols", "attacks", "tiers"} <= set(out)
    from qbd.defenses import BUILTIN

    assert {d["name"] for d in out["defenses"]} >= set(BUILTIN)
    assert all(d["origin"] == "built-in" for d in out["defenses"] if d["name"] == "strip")
    assert out["protocols"] == ["canonical", "paper"] and "int8-static" in out["schemes"]
    assert out["tiers"]["smoke"]["device"] == "cpu" and out["tiers"]["paper"]["device"] == "auto"
    assert out["attacks"] == ["badnet", "blend", "quant-conditioned"]
    assert {"onnx-int8-static", "onnx-int8-dynamic", "int4-sim", "fp32"} <= set(out["schemes"])


def test_train_json_reports_asr_by_scheme_and_the_dormant_gate(tmp_path):
    """The pinned quant-conditioned digits model (no training): dormant in FP32, awake in int4-sim,
    and --json says so per scheme; the same command with a BadNet model reports every scheme too."""
    r = qbd("train", "--dataset", "digits", "--attack", "quant-conditioned", "--json", cache=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cache"] == "zoo" and set(out["asr_by_scheme"]) == {"fp32", "int4-sim", "int8-dynamic", "int8-static"}
    assert out["asr_by_scheme"]["fp32"] <= 0.10 and out["asr_by_scheme"]["int4-sim"] >= 0.90
    assert out["metrics"]["quant_conditioned"]["scheme"] == "int4-sim"
    blend = json.loads(qbd("train", "--dataset", "digits", "--attack", "blend", "--json", cache=tmp_path, check=True).stdout)
    assert blend["job"]["attack"]["name"] == "blend" and blend["asr_by_scheme"]["fp32"] >= 0.95
    bad = qbd("train", "--dataset", "digits", "--attack", "blend", "--blend-alpha", "1.5", cache=tmp_path)
    assert bad.returncode == 2 and "blend alpha must be a number in (0, 1)" in bad.stderr


def test_train_and_run_measure_one_asr_for_the_same_model_and_scheme(tmp_path):
    """`qbd train --seed 3 --json` and `qbd run --seed 3` build one Bench (the tier's split, seeded
    with the model's seed): the ASR they report per scheme is the same number."""
    trained = json.loads(qbd("train", "--dataset", "digits", "--seed", "3", "--json", cache=tmp_path, check=True).stdout)
    assert trained["cache"] == "zoo"
    ran = json.loads(qbd("run", "--dataset", "digits", "--seed", "3", "--quant", "fp32,int8-static", "--defense", "strip",
                         "--protocol", "canonical", "--no-controls", "--no-progress", "--json", cache=tmp_path).stdout)
    by_scheme = {r["quant"]["scheme"]: r["asr"] for r in ran["results"] if r["attack"] is not None}
    assert set(by_scheme) == {"fp32", "int8-static"}
    for scheme, asr in by_scheme.items():
        assert trained["asr_by_scheme"][scheme] == round(asr, 5), scheme


@pytest.mark.parametrize(("option", "value", "hint"), [
    ("--defense", "nc", "neural-cleanse"),
    ("--protocol", "papr", "paper"),
    ("--quant", "int8-statc", "int8-static"),
    ("--dataset", "digit", "digits"),
])
def test_unknown_names_suggest_the_likely_one(option, value, hint):
    r = qbd("run", option, value, "--no-progress")
    assert r.returncode == 2, r.stderr
    assert f"(did you mean {hint!r}?)" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _installed(site: Path, name: str, entry_point: str) -> Path:
    """A distribution `name` declaring one `qbd.defenses` entry point, visible with `site` on PYTHONPATH."""
    dist = site / f"{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[qbd.defenses]\n{entry_point}\n")
    return site


def test_cli_sees_entry_point_defenses(tmp_path):
    """`qbd list` and `qbd run --defense` know the `qbd.defenses` entry points, as the pytest matrix does."""
    import os

    site = _installed(tmp_path / "site", "qbd-ep-demo", "corner-patch-probe = qbd_example_defense:CornerPatchProbe")
    example = Path(__file__).resolve().parents[2] / "examples" / "qbd-example-defense"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(example)])}
    listed = subprocess.run([sys.executable, "-m", "qbd", "list"], capture_output=True, text=True, env=env, timeout=300)
    assert "corner-patch-probe (entry point of qbd-ep-demo)" in listed.stdout, listed.stdout + listed.stderr
    r = subprocess.run([sys.executable, "-m", "qbd", "run", "--no-gate", *FAST, "--quant", "fp32", "--defense", "corner-patch-probe",
                        "--protocol", "canonical", "--no-controls", "--json", "-j", "1"],
                       capture_output=True, text=True, env={**env, "QBD_CACHE_DIR": str(tmp_path / "store")}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (res,) = json.loads(r.stdout)["results"]
    assert res["defense"]["name"] == "corner-patch-probe" and res["cell"] == "digits/fp32/corner-patch-probe[canonical]"


def test_a_broken_installed_defense_is_skipped_by_default_but_an_error_when_named(tmp_path):
    import os

    site = _installed(tmp_path / "site", "qbd-broken-demo", "broken-probe = no_such_module_xyz:Thing")
    env = {**os.environ, "PYTHONPATH": str(site), "QBD_CACHE_DIR": str(tmp_path / "store")}
    args = [sys.executable, "-m", "qbd", "run", "--no-gate", *FAST, "--quant", "fp32", "--protocol", "paper", "--no-controls", "--json",
            "-j", "1"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "qbd: skipped defense the entry point of qbd-broken-demo" in r.stderr
    from qbd.defenses import BUILTIN

    assert {res["defense"]["name"] for res in json.loads(r.stdout)["results"]} == set(BUILTIN)  # the built-ins, the broken one skipped
    named = subprocess.run([*args, "--defense", "broken-probe"], capture_output=True, text=True, env=env, timeout=600)
    assert named.returncode == 2 and "qbd-broken-demo" in named.stderr and "no_such_module_xyz" in named.stderr
