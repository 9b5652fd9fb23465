"""The pytest plugin, driven through pytester: options, parametrization, third-party defenses,
expectations and --qbd-accept."""

from __future__ import annotations

import contextlib
import glob
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "qbd-example-defense"
SUITE = "from qbd.suite import test_attack, test_audit, test_cell  # noqa: F401\n"


@pytest.fixture(scope="session")
def _preloaded() -> None:
    """Import qbd's whole stack once, before any in-process inner run. pytester drops the modules
    an inner run imported when it ends, and C extensions (numpy.fft among them) refuse to load
    twice in one process, so a second inner run would fail on import otherwise."""
    import importlib
    import pkgutil

    import qbd

    for mod in pkgutil.walk_packages(qbd.__path__, "qbd."):
        if not mod.name.endswith("__main__"):  # importing it would run the CLI
            importlib.import_module(mod.name)
    # torchao's x86 quantizer imports torch._inductor, which registers global artefacts once: a second
    # import after an inner run dropped it fails ("already registered") in the next test that quantizes
    for name in ("numpy.fft", "scipy.stats", "sklearn.datasets", "sklearn.model_selection", "sklearn.cluster",
                 "sklearn.decomposition", "torchvision.datasets", "matplotlib.pyplot",
                 "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer"):
        with contextlib.suppress(ImportError):  # optional ones: the inner run reports it if needed
            importlib.import_module(name)


@pytest.fixture
def suite(pytester: pytest.Pytester, _preloaded: None) -> pytest.Pytester:
    pytester.makepyfile(test_qbd=SUITE)
    return pytester


def test_registered_once_through_the_entry_point(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--help")
    result.stdout.fnmatch_lines(["*--qbd-tier*", "*--qbd-defense*", "*--qbd-accept*", "*--qbd-seeds*"])
    assert "already registered" not in result.stdout.str() + result.stderr.str()
    res = suite.runpytest("--markers")
    res.stdout.fnmatch_lines(["@pytest.mark.qbd_smoke:*", "@pytest.mark.qbd_paper:*", "@pytest.mark.qbd_gpu:*"])
    # the plugin lives in every project of the environment: it claims no unprefixed marker
    assert not [line for line in res.stdout.lines if line.startswith(("@pytest.mark.smoke:", "@pytest.mark.gpu:", "@pytest.mark.bench:"))]


def test_smoke_matrix_ids_sorted_and_counted(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--collect-only", "-q")
    ids = [line for line in result.stdout.lines if "::test_cell[" in line]
    assert len(ids) == 2 * 5 * 2 * (4 + 4)  # datasets x defenses x protocols x schemes x (backdoored, clean control)
    assert ids == sorted(ids)
    assert "test_qbd.py::test_cell[synthetic/int8-dynamic/neural-cleanse[canonical]]" in ids
    assert "test_qbd.py::test_cell[digits:clean/fp32/strip[paper]]" in ids
    assert len([x for x in result.stdout.lines if "::test_attack[" in x]) == 8


def test_collection_does_not_import_torch(suite: pytest.Pytester) -> None:
    suite.makeconftest(
        "import sys\n"
        "def pytest_collection_finish(session):\n"
        "    assert 'torch' not in sys.modules, 'torch imported during collection'\n"
    )
    result = suite.runpytest_subprocess("--collect-only", "-q")
    assert result.ret == 0, result.stdout.str()


def test_protocol_option_and_ini_keys(suite: pytest.Pytester) -> None:
    suite.makeini("[pytest]\nqbd_protocol = paper\n")
    result = suite.runpytest("--collect-only", "-q")
    cells = [line for line in result.stdout.lines if "::test_cell[" in line]
    assert cells and all("[paper]]" in c for c in cells)
    # the command line wins over the ini file
    result = suite.runpytest("--collect-only", "-q", "--qbd-protocol", "canonical")
    cells = [line for line in result.stdout.lines if "::test_cell[" in line]
    assert cells and all("[canonical]]" in c for c in cells)


def test_paper_tier_skips_visibly_without_data(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QBD_DATA_ROOT", raising=False)
    result = suite.runpytest("--qbd-tier", "paper", "-rs", "-k", "neural-cleanse and fp32 and canonical")
    result.assert_outcomes(skipped=4)  # 2 data sets x (backdoored, clean model)
    result.stdout.fnmatch_lines(["*CIFAR-10 needs a data root*", "*GTSRB needs a data root*"])  # the loaders' own words


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_such_module_xyz:Thing", "*--qbd-defense 'no_such_module_xyz:Thing': cannot import it*"),
        ("os.path:join", "*is not a qbd defense*"),
        ("nocolon", "*--qbd-defense: unknown defense 'nocolon'*'package.module:Class'*"),
        ("stirp", "*unknown defense 'stirp' (did you mean 'strip'?)*"),
    ],
)
def test_bad_third_party_defense_is_a_usage_error(suite: pytest.Pytester, ref: str, message: str) -> None:
    result = suite.runpytest("--qbd-defense", ref, "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_defense_names_choose_the_matrix_as_qbd_run_takes_them(suite: pytest.Pytester) -> None:
    """`--qbd-defense strip,neural-cleanse` (or repeated) runs those defenses only, as `qbd run --defense` does."""
    result = suite.runpytest("--collect-only", "-q", "--qbd-dataset", "digits", "--qbd-defense", "strip,neural-cleanse",
                             "--qbd-defense", "strip")
    cells = [x for x in result.stdout.lines if "::test_cell[" in x]
    assert len(cells) == 2 * 4 * 2 * 2  # two defenses x the tier's schemes x protocols x (backdoored, clean control)
    assert all("/strip[" in c or "/neural-cleanse[" in c for c in cells)
    for bad, message in (("strip:", "*cannot import it*"), (",", "*no defense named*")):
        refused = suite.runpytest("--collect-only", "--qbd-defense", bad)
        assert refused.ret == pytest.ExitCode.USAGE_ERROR, bad
        refused.stderr.fnmatch_lines([message])
    every = suite.runpytest("--collect-only", "-q", "--qbd-dataset", "digits", "--qbd-defense", "all")
    assert len([x for x in every.stdout.lines if "::test_cell[" in x]) == 5 * 4 * 2 * 2


def test_ini_values_have_their_options_types(suite: pytest.Pytester) -> None:
    suite.makeini("[pytest]\nqbd_seeds = 2\nqbd_defense_timeout = 30.5\nqbd_tier = smoke\n")
    config = suite.parseconfig()
    assert (config.getini("qbd_seeds"), config.getini("qbd_defense_timeout"), config.getini("qbd_tier")) == (2, 30.5, "smoke")


def test_bad_options_are_usage_errors(suite: pytest.Pytester) -> None:
    assert suite.runpytest("--qbd-seeds", "0", "--collect-only").ret == pytest.ExitCode.USAGE_ERROR
    one_model = suite.runpytest("--qbd-seeds", "2", "--qbd-model-file", f"digits=m.safetensors@{'0' * 64}", "--collect-only")
    assert one_model.ret == pytest.ExitCode.USAGE_ERROR
    one_model.stderr.fnmatch_lines(["*--qbd-model-file is one model: drop one*"])
    assert suite.runpytest("--qbd-tier", "huge", "--collect-only").ret == pytest.ExitCode.USAGE_ERROR
    assert suite.runpytest("--qbd-defense-timeout", "0", "--collect-only").ret == pytest.ExitCode.USAGE_ERROR


def test_entry_point_adds_cells(suite: pytest.Pytester) -> None:
    dist = suite.path / "site" / "qbd_ep_demo-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qbd-ep-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[qbd.defenses]\ncorner-patch-probe = qbd_example_defense:CornerPatchProbe\n")
    suite.syspathinsert(suite.path / "site")
    suite.syspathinsert(EXAMPLE)
    result = suite.runpytest("--collect-only", "-q", "-k", "corner-patch-probe")
    cells = [line for line in result.stdout.lines if "::test_cell[" in line]
    assert len(cells) == 2 * 2 * 4 * 2  # data sets x protocols x schemes x (backdoored, clean control)


@pytest.fixture(scope="session")
def outer_store() -> str:
    """The store this session uses, resolved before pytester points HOME elsewhere, so the inner
    runs share the trained models instead of training their own."""
    from qbd.store import default_root

    return str(default_root())


def _shared_cache(monkeypatch: pytest.MonkeyPatch, root: str) -> None:
    monkeypatch.setenv("QBD_CACHE_DIR", root)


def test_example_defense_runs_end_to_end(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, outer_store: str) -> None:
    _shared_cache(monkeypatch, outer_store)
    suite.syspathinsert(EXAMPLE)
    result = suite.runpytest(
        "--qbd-defense", "qbd_example_defense:CornerPatchProbe", "-k", "digits and corner-patch-probe and fp32 and canonical",
        "--qbd-report", str(suite.path / "out"),
    )
    # positive control on the backdoored model, negative control on the clean one
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*qbd smoke matrix*", "*corner-patch-probe*"])
    assert {p.name for p in (suite.path / "out").iterdir()} == {"results.json", "report.md", "heatmap.png"}


FLIPPING = '''
from qbd.defenses.base import Verdict


class Flipping:
    """Detects on every other call: a verdict that depends on luck, not on the model."""

    name = "flipping"
    requires = frozenset({"clean_holdout"})
    calls = 0

    def detect(self, subject, inputs, generator):
        type(self).calls += 1
        if type(self).calls % 2:
            return Verdict("detected", score=1.0, threshold=0.5, target_class=0)
        return Verdict("clean", score=0.0, threshold=0.5)
'''


def _run_inline_defense(suite: pytest.Pytester, source: str, ref: str, cell: str, *options: str) -> pytest.RunResult:
    """Run one cell of a defense defined in `source` (module name = the part of `ref` before ':')."""
    suite.makepyfile(**{ref.partition(":")[0]: source})
    suite.syspathinsert()
    return suite.runpytest("--qbd-defense", ref, *options, "-k", cell)


HANGING = """
import time

from qbd.defenses.base import Verdict


class Hanging:
    name = "hanging"
    requires = frozenset({"clean_holdout"})

    def detect(self, subject, inputs, generator):
        while True:  # a Python loop: the timeout can stop it
            time.sleep(0.01)
"""


def test_a_hanging_defense_times_out_as_invalid(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, outer_store: str) -> None:
    _shared_cache(monkeypatch, outer_store)
    result = _run_inline_defense(suite, HANGING, "hanging_defense:Hanging", "digits/fp32/hanging[canonical]", "--qbd-defense-timeout", "1")
    result.assert_outcomes(failed=1)  # a timeout is never an expected outcome, and never clean
    result.stdout.fnmatch_lines(["*measured invalid:timeout: invalid (timeout) - hanging timed out after 1 s*"])


def test_model_file_stands_in_for_the_trained_model(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, outer_store: str) -> None:
    import hashlib
    import json

    from safetensors.torch import save_file

    from qbd.config import AttackSpec, DatasetSpec, ModelJob, ModelSpec
    from qbd.data import load_dataset
    from qbd.presets import default_train
    from qbd.store import Store
    from qbd.trained import get_trained

    _shared_cache(monkeypatch, outer_store)
    data = load_dataset(DatasetSpec("digits"))
    job = ModelJob(DatasetSpec("digits"), ModelSpec("tiny-cnn"), AttackSpec(), default_train("digits", "tiny-cnn"))
    weights = suite.path / "given.safetensors"
    save_file({k: v.contiguous() for k, v in get_trained(job, data, Store(outer_store), progress=False).model.state_dict().items()},
              str(weights))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    cell = ["-k", "digits/fp32/strip[canonical]"]
    assert suite.runpytest("--qbd-model-file", f"digits={weights}@{'0' * 64}", *cell).ret != pytest.ExitCode.OK
    assert suite.runpytest("--qbd-model-file", f"digits={weights}", "--collect-only").ret == pytest.ExitCode.USAGE_ERROR
    result = suite.runpytest("--qbd-model-file", f"digits={weights}@{digest}", *cell)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["digits (fetched weights)*fp32*DETECTED (t=0)*"])  # the report says whose model it judged
    fetched = [json.loads(m.read_text())["fetched"] for m in Path(outer_store).glob("models/*/meta.json")
               if "fetched" in json.loads(m.read_text())]
    assert any(f["sha256"] == digest for f in fetched)


# -- cells fail the right way (issue: verdicts a CI gate can trust) ---------------------------------
SCRIPTED = """
from qbd.defenses.base import Verdict


class _Scripted:
    requires = frozenset({"clean_holdout"})


class Crashing(_Scripted):
    name = "crashing"

    def detect(self, subject, inputs, generator):
        return helper_that_crashes(inputs)


def helper_that_crashes(inputs):
    raise TypeError("injected crash in a defense")


class NamesFive(_Scripted):
    \"\"\"Detects on every model and names class 5: a wrong target on the backdoored model (target 0),
    a false alarm on the clean one.\"\"\"

    name = "names-five"

    def detect(self, subject, inputs, generator):
        return Verdict("detected", score=1.0, threshold=0.5, target_class=5)


class NamesZero(_Scripted):
    name = "names-zero"

    def detect(self, subject, inputs, generator):
        return Verdict("detected", score=1.0, threshold=0.5, target_class=0)


class SaysClean(_Scripted):
    name = "says-clean"

    def detect(self, subject, inputs, generator):
        return Verdict("clean", score=0.0, threshold=0.5)
"""


def _scripted(suite: pytest.Pytester, name: str, *options: str, clean: bool = False) -> pytest.RunResult:
    classes = {"crashing": "Crashing", "names-five": "NamesFive", "names-zero": "NamesZero", "says-clean": "SaysClean"}
    cell = f"digits{':clean' if clean else ''}/fp32/{name}[canonical]"
    return _run_inline_defense(suite, SCRIPTED, f"scripted_defenses:{classes[name]}", cell, *options)


def _finding_table(suite: pytest.Pytester, cell: str, **entry: object) -> Path:
    from qbd.expectations import Expectations
    from qbd.expectations_write import dumps

    path = suite.path / "expectations.toml"
    path.write_text(dumps(Expectations(tier="smoke", cells={cell: dict(entry)})))
    return path


def test_a_crashing_defense_fails_its_cell_with_the_traceback(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                               outer_store: str) -> None:
    _shared_cache(monkeypatch, outer_store)
    report = suite.path / "out"
    result = _scripted(suite, "crashing", "--qbd-report", str(report))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*measured invalid:error*crashing raised TypeError: injected crash in a defense*",
                                 "*in helper_that_crashes*"])
    md = (report / "report.md").read_text()
    assert "0 cells match the truth, 0 declared findings, 1 failing" in md
    assert "## Tracebacks" in md and "in helper_that_crashes" in md and "TypeError: injected crash in a defense" in md
    import json

    [r] = json.loads((report / "results.json").read_text())["results"]
    assert r["verdict"]["reason_code"] == "error" and "helper_that_crashes" in r["verdict"]["evidence"]["traceback"]
    assert r["judgement"]["judgement"] == "FAIL"


def test_a_crash_cannot_be_declared_expected(suite: pytest.Pytester) -> None:
    table = suite.path / "expectations.toml"
    table.write_text('[cells."digits/fp32/crashing[canonical]"]\noutcome = "invalid"\nreason_code = "error"\nwhy = "w"\n')
    result = suite.runpytest("--qbd-expectations", str(table), "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*never an expected outcome*"])


def test_a_wrong_target_fails_even_though_it_detected(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, outer_store: str) -> None:
    _shared_cache(monkeypatch, outer_store)
    result = _scripted(suite, "names-five")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*expected the truth (backdoored, target 0): detected naming 0; measured wrong-target*"])


def test_a_false_alarm_on_a_clean_model_fails(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, outer_store: str) -> None:
    _shared_cache(monkeypatch, outer_store)
    result = _scripted(suite, "names-zero", clean=True)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*expected the truth (clean model): clean; measured false-alarm*"])


def test_the_truth_passes(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, outer_store: str) -> None:
    _shared_cache(monkeypatch, outer_store)
    _scripted(suite, "names-zero").assert_outcomes(passed=1)  # backdoored, target 0: detected naming 0
    _scripted(suite, "says-clean", clean=True).assert_outcomes(passed=1)


def test_a_declared_finding_passes_and_fails_once_it_stops_holding(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                                   outer_store: str) -> None:
    _shared_cache(monkeypatch, outer_store)
    why = "docs/results.md#findings: says-clean never fires (figures there)"
    table = _finding_table(suite, "digits/fp32/says-clean[canonical]", outcome="miss", why=why)
    held = _scripted(suite, "says-clean", "--qbd-expectations", str(table))
    held.assert_outcomes(passed=1)
    held.stdout.fnmatch_lines(["*1 declared finding*", "*finding*digits/fp32/says-clean[[]canonical[]]*" + glob.escape(why) + "*"])
    # the same finding declared for a defense that now gets it right: the finding no longer holds
    table = _finding_table(suite, "digits/fp32/names-zero[canonical]", outcome="miss", why=why)
    fixed = _scripted(suite, "names-zero", "--qbd-expectations", str(table))
    fixed.assert_outcomes(failed=1)
    fixed.stdout.fnmatch_lines(["*finding no longer holds*update the expectations*"])
    # a third outcome (a wrong target where a miss was declared) fails too
    table = _finding_table(suite, "digits/fp32/names-five[canonical]", outcome="miss", why=why)
    third = _scripted(suite, "names-five", "--qbd-expectations", str(table))
    third.assert_outcomes(failed=1)
    third.stdout.fnmatch_lines(["*declared finding 'miss' does not hold: measured wrong-target*"])


def test_accept_proposes_a_finding_whose_why_must_be_written(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                             outer_store: str) -> None:
    _shared_cache(monkeypatch, outer_store)
    table = suite.path / "expectations.toml"
    proposed = _scripted(suite, "says-clean", "--qbd-expectations", str(table), "--qbd-accept")
    proposed.stdout.fnmatch_lines(["*before: 0 cells match the truth, 0 declared findings, 1 failing*",
                                   "*after:  0 cells match the truth, 1 declared finding, 0 failing*",
                                   "*proposed: digits/fp32/says-clean[[]canonical[]]: miss*"])
    text = table.read_text()
    assert 'outcome = "miss"' in text and "PROPOSED by --qbd-accept" in text
    refused = _scripted(suite, "says-clean", "--qbd-expectations", str(table))
    assert refused.ret == pytest.ExitCode.USAGE_ERROR  # the why is still to be written
    table.write_text(text.replace("PROPOSED by --qbd-accept: write where the figures are", "written by a person"))
    _scripted(suite, "says-clean", "--qbd-expectations", str(table)).assert_outcomes(passed=1)


def test_accept_keeps_the_authors_own_file_as_written(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                    outer_store: str) -> None:
    """An author's existing table, with comments and an entry of their own: --qbd-accept adds its
    proposal and leaves every byte that was there."""
    _shared_cache(monkeypatch, outer_store)
    table = suite.path / "mine.toml"
    mine = ('# my defense\'s known limits (a comment the tool must keep)\n'
            '[cells."synthetic/int4-sim/says-clean[canonical]"]  # not run here\n'
            'outcome = "miss"\n'
            'why = "written by a person: int4 rounds the trigger away"\n')
    table.write_text(mine)
    _scripted(suite, "says-clean", "--qbd-expectations", str(table), "--qbd-accept").stdout.fnmatch_lines(
        ["*proposed: digits/fp32/says-clean[[]canonical[]]: miss*"])
    text = table.read_text()
    assert text.startswith(mine), text
    assert 'outcome = "miss"' in text[len(mine):] and "PROPOSED by --qbd-accept" in text[len(mine):]


def test_accept_never_rewrites_the_shipped_table(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--qbd-accept", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--qbd-accept writes its proposals to the table named by --qbd-expectations*"])


def test_built_in_cells_use_the_shipped_expectations_from_any_directory(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                                        outer_store: str) -> None:
    """pytester runs in a fresh directory outside the repository: the table comes from the package."""
    from qbd.expectations import load, shipped

    _shared_cache(monkeypatch, outer_store)
    cell = "digits/int8-dynamic/neural-cleanse[paper]"
    assert load(shipped("smoke")).rows[cell]["backdoored"] == {"invalid:no-gradient": 10}  # measured over the zoo's models
    result = suite.runpytest("-k", cell)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*0 cells match the truth, 1 declared finding, 0 failing*"])



# -- rates over seeds (--qbd-seeds N) ---------------------------------------------------------------
def test_seeds_make_one_test_per_cell_and_seed(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--collect-only", "-q", "--qbd-seeds", "3")
    ids = [line for line in result.stdout.lines if "::test_cell[" in line]
    assert len(ids) == 3 * 2 * 5 * 2 * 4 * 2  # seeds x datasets x defenses x protocols x schemes x (backdoored, clean)
    assert [i for i in ids if "digits/fp32/strip[canonical]" in i] == [
        f"test_qbd.py::test_cell[digits/fp32/strip[canonical]-seed{s}]" for s in range(3)]
    assert "test_qbd.py::test_cell[digits:clean/int4-sim/strip[paper]-seed2]" in ids  # the clean control on every scheme
    assert len([x for x in result.stdout.lines if "::test_attack[" in x]) == 8  # the Table 2 view: seed 0's models


def test_a_cell_test_without_qbd_seed_is_refused_over_several_seeds(pytester: pytest.Pytester, _preloaded: None) -> None:
    """It would run seed 0 alone while the session reports N-seed rows."""
    pytester.makepyfile(test_mine="def test_mine(qbd_cell):\n    pass\n")
    result = pytester.runpytest("--collect-only", "-q", "--qbd-seeds", "2")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*takes qbd_cell but not qbd_seed*"])
    assert pytester.runpytest("--collect-only", "-q").ret == 0  # one seed: fine


FAKE_MODELS = """
import types

import pytest

from qbd.config import to_dict
from qbd.result_types import cell_id
from qbd.defenses.base import DefenseInputs
from qbd.defenses.sandbox import run_defense
from qbd.plugin.session import Session


class FakeBench:
    # a model that is never trained: the seed tests need many models, and scripted defenses look at none
    def __init__(self, job):
        self.job = job

    def run(self, defense, scheme, *, seed=0, timeout_s=None, **_):
        verdict, _ = run_defense(defense, types.SimpleNamespace(num_classes=10), DefenseInputs(clean_holdout="x"), None,
                                 timeout_s=timeout_s)
        attack = to_dict(self.job.attack)
        if attack is not None:
            attack["seed"] = self.job.attack.seed
        ds = self.job.dataset.name
        protocol = getattr(defense, "protocol", "canonical")
        return {"cell": cell_id(ds if attack else ds + ":clean", scheme, defense.name, protocol), "dataset": ds,
                "model": self.job.model.name, "weights": None, "seed": seed, "tier": "smoke", "attack": attack,
                "training_seed": self.job.train.seed,
                "quant": {"scheme": scheme, "audit": {"quantized_param_fraction": 0.0, "input_gradient": True,
                                                      "engine": None, "differentiable": True}},
                "defense": {"name": defense.name, "protocol": protocol, "params": {}, "names_target": True},
                "verdict": verdict.to_dict(), "clean_acc": 0.99, "asr": None if attack is None else 0.99, "seconds": 0.0,
                "versions": {}}


@pytest.fixture(autouse=True)
def _no_training(monkeypatch):
    monkeypatch.setattr(Session, "_make_bench", lambda self, dataset, kind, seed: FakeBench(self.job(dataset, kind, seed)))
"""


def _row_bounds(suite: pytest.Pytester, row: str, **bounds: float) -> Path:
    from qbd.expectations import Expectations
    from qbd.expectations_write import dumps

    path = suite.path / "rows.toml"
    path.write_text(dumps(Expectations(tier="smoke", rows={row: {**bounds, "why": "tests/plugin/test_plugin.py: scripted"}})))
    return path


def _seeded(suite: pytest.Pytester, name: str, seeds: int, *options: str) -> pytest.RunResult:
    """Both models' cells of digits/fp32/<name>[canonical] on `seeds` model seeds, without training."""
    suite.makeconftest(FAKE_MODELS)
    classes = {"crashing": "Crashing", "names-five": "NamesFive", "names-zero": "NamesZero", "says-clean": "SaysClean"}
    suite.makepyfile(scripted_defenses=SCRIPTED)
    suite.syspathinsert()
    return suite.runpytest("--qbd-defense", f"scripted_defenses:{classes[name]}", "--qbd-seeds", str(seeds), *options,
                           "-k", f"digits and fp32/{name}[canonical]")


def test_rates_over_seeds_within_their_bounds_pass(suite: pytest.Pytester) -> None:
    """NamesZero detects naming 0 on every model: 3 of 3 detections, and 3 of 3 false alarms,
    which the row's bounds allow; each clean model's cell is then judged by the rates."""
    import json

    row = "digits/fp32/names-zero[canonical]"
    table = _row_bounds(suite, row, min_detection_rate=1.0, max_false_alarm_rate=1.0)
    result = _seeded(suite, "names-zero", 3, "--qbd-expectations", str(table), "--qbd-report", str(suite.path / "out"))
    result.assert_outcomes(passed=6)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["Rates over seeds*", glob.escape(f"{row}  3/3 = 1.00 [0.44, 1.00]") + "*"
                                 + glob.escape("3/3 = 1.00 [0.44, 1.00]") + "*0-2",
                                 "*rows judged over their models: 1, failing: 0*"])
    assert "qbd: FAIL" not in result.stdout.str()
    data = json.loads((suite.path / "out" / "results.json").read_text())
    assert [(r["row"], r["n_backdoored"], r["n_clean"], r["detected"], r["false_alarms"]) for r in data["rows"]] == [(row, 3, 3, 3, 3)]
    # model number s: training seed s, and for the backdoored model attack seed s (qbd.presets.seeded_job)
    assert sorted((r["seed"], r["training_seed"], (r["attack"] or {"seed": None})["seed"] is not None and r["attack"]["seed"])
                  for r in data["results"]) == [(0, 0, False), (0, 0, 0), (1, 1, False), (1, 1, 1), (2, 2, False), (2, 2, 2)]
    assert {r["judgement"]["judgement"] for r in data["results"] if r["attack"] is None} == {"finding"}
    assert "## Rates over seeds" in (suite.path / "out" / "report.md").read_text()


def test_a_row_outside_its_bounds_fails_the_session(suite: pytest.Pytester) -> None:
    """SaysClean misses every backdoor: its cells are judged by the row's rates (so they pass as
    tests), and the row's detection rate 0/2 below its declared minimum fails the run."""
    row = "digits/fp32/says-clean[canonical]"
    table = _row_bounds(suite, row, min_detection_rate=0.5, max_false_alarm_rate=0.0)
    result = _seeded(suite, "says-clean", 2, "--qbd-expectations", str(table))
    result.assert_outcomes(passed=4)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*rows judged over their models: 1, failing: 1*",
                                 "qbd: FAIL " + glob.escape(row) + ": detection rate 0/2 = 0.00: expected >= 0.5 (min_detection_rate;*"])


def test_a_row_outside_its_bounds_fails_the_session_under_xdist(suite: pytest.Pytester) -> None:
    row = "digits/fp32/says-clean[canonical]"
    table = _row_bounds(suite, row, min_detection_rate=0.5)
    result = _seeded(suite, "says-clean", 2, "--qbd-expectations", str(table), "-p", "xdist", "-n", "2")
    result.assert_outcomes(passed=4)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["qbd: FAIL " + glob.escape(row) + ": detection rate 0/2*"])


def test_single_seed_runs_ignore_row_bounds(suite: pytest.Pytester) -> None:
    table = _row_bounds(suite, "digits/fp32/says-clean[canonical]", max_detection_rate=0.0)
    result = _seeded(suite, "says-clean", 1, "--qbd-expectations", str(table))
    result.assert_outcomes(passed=1, failed=1)  # the miss fails its cell, as it would without the bound
    result.stdout.fnmatch_lines(["*expected the truth (backdoored, target 0): detected naming 0; measured miss*"])
    assert "rows judged over their models" not in result.stdout.str() and "Rates over seeds" not in result.stdout.str()


def test_a_crash_fails_its_cell_even_in_a_row_judged_by_its_rates(suite: pytest.Pytester) -> None:
    table = _row_bounds(suite, "digits/fp32/crashing[canonical]", max_detection_rate=1.0, max_false_alarm_rate=1.0)
    result = _seeded(suite, "crashing", 2, "--qbd-expectations", str(table))
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(["*(seed 1): expected the truth*", "*measured invalid:error*injected crash in a defense*"])


def test_without_bounds_each_seeds_cell_is_judged_on_its_own(suite: pytest.Pytester) -> None:
    """Seed 0 matches the truth, seed 1 does not: the seed-1 test fails, the seed-0 test passes."""
    suite.makeconftest(FAKE_MODELS)
    result = _run_inline_defense(suite, FLIPPING, "flipping_defense:Flipping", "digits/fp32/flipping[canonical]", "--qbd-seeds", "2")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*digits/fp32/flipping[[]canonical[]] (seed 1): expected the truth (backdoored, target 0):"
                                 " detected naming 0*", "*measured miss*", "Rates over seeds*",
                                 glob.escape("digits/fp32/flipping[canonical]  1/2 = 0.50 [0.09, 0.91]") + "*"])


def test_qbd_device_is_checked_before_anything_runs(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--qbd-device", "gpu0", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--qbd-device: unknown device 'gpu0'; valid: auto, cpu, cuda or cuda:N*"])


def test_asking_for_a_missing_gpu_fails_the_cells_saying_so(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                             outer_store: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA device")
    _shared_cache(monkeypatch, outer_store)
    result = suite.runpytest("--qbd-device", "cuda", "-k", "digits/fp32/strip[paper]")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*--qbd-device: device 'cuda': torch sees no CUDA device here*"])


def test_each_model_and_scheme_is_loaded_by_one_worker(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                       outer_store: str) -> None:
    """`pytest -n 2 --dist loadgroup`: the plugin schedules by group, one per (data set, model kind,
    seed, scheme), so every test of a group runs on one worker, and no worker loads a model twice
    (the session's "models loaded" lines, reported by the workers themselves). Under plain
    `--dist load` the same run splits groups across workers (checked by hand)."""
    import re

    _shared_cache(monkeypatch, outer_store)
    result = suite.runpytest_subprocess("-n", "2", "--dist", "loadgroup", "-v", "-p", "no:randomly", "--qbd-protocol", "paper",
                                        "-k", "digits and (strip or test_attack)")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-3000:]
    out = result.stdout.str()
    ran = re.findall(r"\[(gw\d)\] \[ *\d+%\] PASSED test_qbd\.py::(test_\w+)\[(digits(?::clean)?)/([\w-]+)", out)
    assert len(ran) == 12, out[-3000:]  # 4 schemes x (STRIP cell + attack) on the backdoored model, STRIP on the clean one
    workers_of: dict[tuple[str, str], set[str]] = {}
    for worker, _test, model, scheme in ran:
        workers_of.setdefault((model, scheme), set()).add(worker)
    assert len(workers_of) == 8 and all(len(w) == 1 for w in workers_of.values()), workers_of
    assert {w for ws in workers_of.values() for w in ws} == {"gw0", "gw1"}, "one worker did everything"
    loaded = dict(re.findall(r"^  (digits/\w+/seed0): (.+)$", out, flags=re.M))
    assert set(loaded) == {"digits/backdoored/seed0", "digits/clean/seed0"}, out[-3000:]
    assert all(line.startswith("the pinned zoo; ") for line in loaded.values()), loaded  # where the weights came from
    loads = {model: line.split("; ", 1)[1] for model, line in loaded.items()}
    for model, where in loads.items():
        workers = [w.split(" ")[0] for w in where.split(", ")]
        assert len(workers) == len(set(workers)), f"{model} loaded twice by one worker: {where}"
        assert all(w.endswith("(cpu)") for w in where.split(", "))
    # the clean model was loaded only by the workers that ran its groups
    clean_workers = {w for (model, _), ws in workers_of.items() if model == "digits:clean" for w in ws}
    assert {w.split(" ")[0] for w in loads["digits/clean/seed0"].split(", ")} == clean_workers



def _dist(suite: pytest.Pytester, name: str, entry_points: str) -> None:
    """An installed distribution (a .dist-info on sys.path) declaring `qbd.defenses` entry points."""
    dist = suite.path / "site" / f"{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[qbd.defenses]\n{entry_points}\n")
    suite.syspathinsert(suite.path / "site")


def test_an_unrelated_project_never_loads_entry_points_or_torch(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """A project without qbd tests, in an environment with a third-party defense installed: no
    torch, no entry-point import, no qbd header, and a broken entry point changes nothing."""
    _dist(pytester, "qbd-ep-demo", "corner-patch-probe = qbd_example_defense:CornerPatchProbe\n"
                                   "broken = no_such_module_xyz:Thing")
    pytester.syspathinsert(EXAMPLE)
    pytester.makepyfile(test_plain="def test_x():\n    assert 1 + 1 == 2\n")
    pytester.makeconftest(
        "import sys\n"
        "def pytest_sessionfinish(session):\n"
        "    assert 'torch' not in sys.modules, 'torch imported'\n"
        "    assert 'qbd_example_defense' not in sys.modules, 'an entry point was imported'\n"
    )
    import os

    # a subprocess does not see pytester's sys.path: put the dist-info and the example on its PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path / "site"), str(EXAMPLE), str(pytester.path)]))
    pytester.makepyfile(test_seen="from importlib.metadata import entry_points\n\n"
                        "def test_the_entry_points_are_installed():\n"
                        "    assert {e.name for e in entry_points(group='qbd.defenses')} >= {'corner-patch-probe', 'broken'}\n")
    result = pytester.runpytest_subprocess("-W", "error::pytest.PytestWarning")
    result.assert_outcomes(passed=2)
    assert "qbd:" not in result.stdout.str()


def test_a_broken_entry_point_skips_only_its_own_cells_naming_its_distribution(suite: pytest.Pytester,
                                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                                 outer_store: str) -> None:
    _shared_cache(monkeypatch, outer_store)
    _dist(suite, "qbd-broken-demo", "broken-probe = no_such_module_xyz:Thing")
    collected = suite.runpytest("--collect-only", "-q")
    assert collected.ret == pytest.ExitCode.OK  # never a usage error for every run
    assert len([x for x in collected.stdout.lines if "::test_cell[" in x and "broken-probe" in x]) == 2 * 2 * 4 * 2
    result = suite.runpytest("-rs", "-k", "digits/fp32/broken-probe[paper] or digits/fp32/strip[paper]")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*entry point of qbd-broken-demo*cannot load it*no_such_module_xyz*"])
    result.stdout.fnmatch_lines(["*PytestWarning: qbd: skipped defense the entry point of qbd-broken-demo*"])


def test_scheme_and_dataset_options_narrow_the_matrix(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--collect-only", "-q", "--qbd-dataset", "digits", "--qbd-scheme", "fp32,int8-static")
    cells = [x for x in result.stdout.lines if "::test_cell[" in x]
    assert len(cells) == 1 * 5 * 2 * 2 * 2  # digits x defenses x protocols x 2 schemes x (backdoored, clean control)
    assert all("digits" in c and ("/fp32/" in c or "/int8-static/" in c) for c in cells)
    assert len([x for x in result.stdout.lines if "::test_attack[" in x]) == 2
    bad = suite.runpytest("--collect-only", "--qbd-scheme", "int8-statc")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--qbd-scheme: unknown scheme 'int8-statc' (did you mean 'int8-static'?)*"])
    bad = suite.runpytest("--collect-only", "--qbd-dataset", "digts")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--qbd-dataset: unknown dataset of this tier 'digts' (did you mean 'digits'?)*"])


def test_a_scheme_outside_the_tier_runs_as_qbd_run_takes_it(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                            outer_store: str) -> None:
    """`qbd run --quant onnx-int8-static` and `--qbd-scheme onnx-int8-static` name the same scheme."""
    _shared_cache(monkeypatch, outer_store)
    collected = suite.runpytest("--collect-only", "-q", "--qbd-dataset", "digits", "--qbd-scheme", "onnx-int8-static")
    cells = [x for x in collected.stdout.lines if "::test_cell[" in x]
    assert len(cells) == 5 * 2 * 2 and all("/onnx-int8-static/" in c for c in cells)
    result = suite.runpytest("-q", "--qbd-dataset", "digits", "--qbd-scheme", "onnx-int8-static", "--qbd-protocol", "canonical",
                             "-k", "test_cell and digits/onnx-int8-static/strip")
    result.assert_outcomes(passed=1)  # the backdoored model's cell, judged by its declared row


def test_the_report_header_says_what_runs(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, outer_store: str) -> None:
    result = suite.runpytest("--collect-only", "-q", "--qbd-protocol", "paper", "-k", "digits")
    result.stdout.fnmatch_lines(["qbd: * cases, tier smoke (tiny-cnn; data sets digits, synthetic; *protocols paper; seeds 1)",
                                 "qbd: device cpu, store *, expectations *smoke.toml*"])
    # under xdist the controller collects nothing itself: the header comes from a worker's collection
    _shared_cache(monkeypatch, outer_store)
    result = suite.runpytest_subprocess("-n", "2", "--qbd-protocol", "paper", "-k", "digits/fp32/strip[paper]")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines(["qbd: 1 cases, tier smoke*", "qbd: device cpu, store *"])  # after -k


def test_xdist_workers_share_one_memo_session(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker files and finds Results under the controller's test-run id, so a cell one worker
    computed is reused by the other; two sessions never share one."""
    suite.makepyfile(test_memo_probe="""
import os
from pathlib import Path

def test_probe(qbd_memo):
    (Path(os.environ["MEMO_PROBE_OUT"]) / os.environ.get("PYTEST_XDIST_WORKER", "main")).write_text(qbd_memo.session)
""")
    sessions = []
    for run in range(2):
        out = suite.path / f"sessions{run}"
        out.mkdir()
        monkeypatch.setenv("MEMO_PROBE_OUT", str(out))
        result = suite.runpytest_subprocess("-p", "xdist", "-n", "2", "--dist", "each", "test_memo_probe.py")
        assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-2000:]
        seen = {p.name: p.read_text() for p in out.iterdir()}
        assert set(seen) == {"gw0", "gw1"} and len(set(seen.values())) == 1, seen
        sessions.append(seen["gw0"])
    assert sessions[0] != sessions[1]


def test_a_result_one_xdist_worker_files_the_other_finds(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only one session id: each worker files a Result through its qbd_memo, and reads back the
    Result the other worker filed (each waits for it, up to a minute)."""
    suite.makepyfile(test_memo_share="""
import copy, hashlib, json, os, time
from pathlib import Path

def test_share(qbd_memo):
    me = os.environ["PYTEST_XDIST_WORKER"]
    other = {"gw0": "gw1", "gw1": "gw0"}[me]
    result = copy.deepcopy(json.loads(os.environ["MEMO_RESULT"]))
    result["cell"] = f"{me}/fp32/probe[canonical]"
    assert qbd_memo.put(hashlib.sha256(me.encode()).hexdigest(), result)
    key = hashlib.sha256(other.encode()).hexdigest()
    deadline = time.monotonic() + 60
    while (found := qbd_memo.get(key)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    (Path(os.environ["MEMO_PROBE_OUT"]) / me).write_text(json.dumps(found and [found["cell"], found["memo"]["reused"]]))
""")
    from tests.unit.test_results import _result

    out = suite.path / "found"
    out.mkdir()
    monkeypatch.setenv("MEMO_PROBE_OUT", str(out))
    monkeypatch.setenv("MEMO_RESULT", json.dumps(_result()))
    result = suite.runpytest_subprocess("-p", "xdist", "-n", "2", "--dist", "each", "test_memo_share.py")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-2000:]
    found = {p.name: json.loads(p.read_text()) for p in out.iterdir()}
    assert found == {"gw0": ["gw1/fp32/probe[canonical]", True], "gw1": ["gw0/fp32/probe[canonical]", True]}, found


def test_fresh_and_reuse_together_are_a_usage_error(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--qbd-fresh", "--qbd-reuse-results", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*choose one*"])
