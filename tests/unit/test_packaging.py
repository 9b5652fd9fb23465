"""Packaging and CI: the distribution is `pytest-qbd` and the example defense depends on it; CI runs
exactly .ci/run, caches the model store only under a key that hashes what determines the models,
and the GPU workflow fails when no paper-tier cell ran. Also int8-static's messages and logging
as a user sees them (a missing torchao, torch's trace records under pytest)."""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import json
import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement

from qbd.config import ConfigError
from qbd.models import build_model
from qbd.quant import SCHEMES

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
EXAMPLE = ROOT / "examples" / "qbd-example-defense"
DISTRIBUTION = "pytest-qbd"

# Modules that training imports but that cannot change a trained model's weights.
# reached from training, but they define no weights: errors, the catalogs' loader, and the Result's
# types (qbd.quant.base re-exports the Audit), whose edits must not throw the cached models away
NOT_MODEL_DEFINING = {"qbd/errors.py", "qbd/registry.py", "qbd/result_types.py", "qbd/shapes.py", "qbd/reason_codes.py",
                      "qbd/outcomes.py"}


def workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def runs(steps: list[dict]) -> list[str]:
    return [s["run"] for s in steps if "run" in s]


def pip_installs(script: str) -> list[str]:
    return re.findall(r"pip install[^\n;&|]*", script)


def heredoc(script: str) -> str:
    return script.split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0]


# -- the distribution and the example -------------------------------------------------------------
def test_distribution_name_is_pytest_qbd() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION
    assert project["entry-points"]["pytest11"] == {"qbd": "qbd.pytest_plugin"}  # the import name stays qbd


def test_an_authors_install_carries_none_of_qbds_own_test_needs() -> None:
    """`pip install pytest-qbd` is what a defense author installs: qbd's own test suite's needs (the
    S3 store's mock server, the schema checker, property tests, benchmarks, ONNX) stay in extras."""
    import re

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert not names & {"moto", "s3fs", "jsonschema", "hypothesis", "pytest-benchmark", "onnx", "onnxruntime", "onnxscript", "boto3"}
    assert {"torch", "pytest", "pytest-xdist", "torchao", "tomlkit"} <= names  # what a run needs
    test = {re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0].lower() for d in project["optional-dependencies"]["test"]}
    assert {"moto", "s3fs", "jsonschema", "hypothesis"} <= test


def test_example_defense_depends_on_the_distribution() -> None:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    assert [Requirement(r).name for r in project["dependencies"]] == [DISTRIBUTION]


def test_example_readme_installs_qbd_from_the_checkout() -> None:
    commands = re.findall(r"pip install [^\n`]*", (EXAMPLE / "README.md").read_text())
    assert commands, "the example's README shows how to install it"
    for command in commands:
        # a bare `qbd` (or `qbd[...]`) would fetch the unrelated `qbd` from the package index
        assert not [a for a in command.split()[2:] if re.fullmatch(r"['\"]?qbd(\[.*\])?['\"]?", a)], command
    assert any(" -e . " in f"{c} " for c in commands), "qbd itself comes from the checkout"


# -- ci.yml --------------------------------------------------------------------------------------
def test_ci_test_job_runs_ci_run_and_installs_nothing_else() -> None:
    steps = workflow("ci.yml")["jobs"]["test"]["steps"]
    scripts = runs(steps)
    assert "bash .ci/run" in scripts
    others = [s for s in scripts if s != "bash .ci/run"]
    installs = [i for s in others for i in pip_installs(s)]
    # the one pip call besides .ci/run only resolves (installs nothing) to learn torch's version
    assert installs and all("--dry-run" in i for i in installs), installs


def test_ci_installs_only_ruff_outside_ci_run() -> None:
    text = (WORKFLOWS / "ci.yml").read_text()
    assert "download.pytorch.org" not in text
    lint = [i for s in runs(workflow("ci.yml")["jobs"]["lint"]["steps"]) for i in pip_installs(s)]
    assert lint == ['pip install "ruff>=0.6" ']


def store_cache(steps: list[dict]) -> dict:
    caches = [s["with"] for s in steps if str(s.get("uses", "")).startswith("actions/cache") and s["with"]["path"] == ".qbd-cache"]
    assert len(caches) == 1
    return caches[0]


def test_ci_store_cache_has_no_fallback_and_keys_on_versions() -> None:
    cache = store_cache(workflow("ci.yml")["jobs"]["test"]["steps"])
    assert "restore-keys" not in cache  # a stale store must never be restored
    key = cache["key"]
    assert "steps.py.outputs.python-version" in key and "steps.versions.outputs.torch" in key


def hashed_patterns(key: str) -> list[str]:
    (args,) = re.findall(r"hashFiles\(([^)]*)\)", key)
    return re.findall(r"'([^']+)'", args)


def qbd_imports(path: Path) -> set[str]:
    """qbd files that `path` imports (at module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        for name in names:
            if name == "qbd" or name.startswith("qbd."):
                parts = name.split(".")
                candidates = [ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")]
                out |= {str(p.relative_to(ROOT)) for p in candidates if p.is_file()}
    return out


def test_ci_store_cache_key_hashes_every_model_defining_file() -> None:
    patterns = hashed_patterns(store_cache(workflow("ci.yml")["jobs"]["test"]["steps"])["key"])
    for required in ("qbd/train.py", "qbd/presets.py", "qbd/config.py", "qbd/models/**", "qbd/data/**",
                     "qbd/poisoning.py", "qbd/zoo/weights/manifest.json"):
        assert required in patterns
    # everything training and the store key reach (transitively) is hashed: a new module that
    # changes the weights cannot be left out of the key
    todo, seen = ["qbd/train.py", "qbd/presets.py", "qbd/trained.py"], set()
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += sorted(qbd_imports(ROOT / f) - {"qbd/store.py", "qbd/remote_store.py"})  # the store, not the models
    missing = [f for f in sorted(seen - NOT_MODEL_DEFINING) if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not missing, f"the store cache key does not hash {missing}"
    assert all(list(ROOT.glob(p)) for p in patterns), "every hashed pattern names files that exist"


def test_ci_resolves_the_torch_version_it_keys_on(tmp_path: Path) -> None:
    (step,) = [s for s in workflow("ci.yml")["jobs"]["test"]["steps"] if s.get("id") == "versions"]
    report = tmp_path / "resolved.json"
    report.write_text(json.dumps({"install": [{"metadata": {"name": "numpy", "version": "2.3.0"}},
                                              {"metadata": {"name": "torch", "version": "2.14.1"}}]}))
    out = subprocess.run([sys.executable, "-", str(report)], input=heredoc(step["run"]), capture_output=True,
                         text=True, check=True)
    assert out.stdout == "torch=2.14.1\n"


# -- every workflow --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.yml")))
def test_workflow_installs_no_side_torch_and_fails_pipes(name: str) -> None:
    doc = workflow(name)
    assert "download.pytorch.org" not in (WORKFLOWS / name).read_text()  # the install pyproject resolves, no other
    scripts = [s for job in doc["jobs"].values() for s in runs(job["steps"])]
    if any(" | " in s for s in scripts):
        # GitHub's implicit shell has no pipefail: `cmd | tee` would hide cmd's failure
        assert doc.get("defaults", {}).get("run", {}).get("shell") == "bash"
    for job in doc["jobs"].values():
        for s in job["steps"]:
            if str(s.get("uses", "")).startswith("actions/cache") and s["with"]["path"] == ".qbd-cache":
                assert "restore-keys" not in s["with"]


# -- gpu.yml: a paper-tier run that ran no cell is a failure ----------------------------------------
@pytest.fixture(scope="module")
def zero_cells_guard() -> str:
    steps = workflow("gpu.yml")["jobs"]["paper-tier"]["steps"]
    scripts = runs(steps)
    (pytest_at,) = [i for i, s in enumerate(scripts) if "pytest" in s and "--qbd-tier paper" in s]
    assert "--qbd-report reports/paper" in scripts[pytest_at]
    guards = [s for s in steps[pytest_at + 1:] if "results.json" in s.get("run", "")]
    assert len(guards) == 1 and guards[0]["shell"] == "python3 {0}"
    assert not guards[0].get("if") and not guards[0].get("continue-on-error")
    return guards[0]["run"]


def run_guard(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("results", [None, []], ids=["no-report", "empty-report"])
def test_gpu_guard_fails_when_no_cell_ran(zero_cells_guard: str, tmp_path: Path, results: list | None) -> None:
    if results is not None:
        (tmp_path / "reports" / "paper").mkdir(parents=True)
        (tmp_path / "reports" / "paper" / "results.json").write_text(json.dumps({"results": results}))
    out = run_guard(zero_cells_guard, tmp_path)
    assert out.returncode != 0
    assert "ran 0 cells" in out.stderr


def test_gpu_guard_passes_when_cells_ran(zero_cells_guard: str, tmp_path: Path) -> None:
    (tmp_path / "reports" / "paper").mkdir(parents=True)
    (tmp_path / "reports" / "paper" / "results.json").write_text(json.dumps({"results": [{"cell": "a"}, {"cell": "b"}]}))
    out = run_guard(zero_cells_guard, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "2 paper-tier cells ran" in out.stdout


# -- int8-static as a user sees it -----------------------------------------------------------------
def tiny_model() -> torch.nn.Module:
    return build_model("tiny-cnn", 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), seed=0).eval()


def calibration() -> torch.Tensor:
    return torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_missing_torchao_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e", None)
    with pytest.raises(ConfigError, match=re.escape("(pip install torchao)")) as e:
        SCHEMES.get("int8-static").apply(tiny_model(), calibration(), "x86")
    assert "qbd[" not in str(e.value)  # qbd has no extras for it: torchao is a core dependency


@pytest.fixture
def trace_capture(caplog: pytest.LogCaptureFixture):
    """caplog at DEBUG, and attached to torch's non-propagating trace logger (pytest >= 9 does
    this itself for every non-propagating logger; older versions do not)."""
    from qbd.quant.static_pt2e import TRACE_LOGGER

    caplog.set_level(logging.DEBUG)
    logger = logging.getLogger(TRACE_LOGGER)
    added = caplog.handler not in logger.handlers
    if added:
        logger.addHandler(caplog.handler)
    yield caplog
    if added:
        logger.removeHandler(caplog.handler)


def torch_debug_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.split(".")[0] == "torch" and r.levelno <= logging.DEBUG]


def test_torch_export_logs_trace_records_into_the_capture(trace_capture) -> None:
    """The control: without qbd's guard, torch.export does log into a captured trace logger."""
    torch.export.export(torch.nn.Linear(4, 2), (torch.rand(2, 4),))
    assert torch_debug_records(trace_capture)


# find_spec, not importorskip: importing torchao outside qbd's log filter would log its known warning
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed (pip install torchao)")
def test_int8_static_logs_no_torch_trace_records(trace_capture) -> None:
    from qbd.quant.static_pt2e import TRACE_LOGGER

    q = SCHEMES.get("int8-static").apply(tiny_model(), calibration(), "x86")
    assert q.audit.engine == "x86"
    assert not torch_debug_records(trace_capture)
    assert trace_capture.handler in logging.getLogger(TRACE_LOGGER).handlers  # detached only for the duration


def test_trace_guard_keeps_torchs_own_trace_handler() -> None:
    from torch._logging._internal import LazyTraceHandler

    from qbd.quant.static_pt2e import TRACE_LOGGER, torch_trace_to_torch_only

    logger = logging.getLogger(TRACE_LOGGER)
    own, foreign = LazyTraceHandler(None), logging.NullHandler()
    logger.addHandler(own)
    logger.addHandler(foreign)
    try:
        with torch_trace_to_torch_only():
            assert own in logger.handlers and foreign not in logger.handlers  # TORCH_TRACE still works
        assert own in logger.handlers and foreign in logger.handlers
    finally:
        logger.removeHandler(own)
        logger.removeHandler(foreign)


def test_the_untrusted_weights_loader_sits_below_the_cli():
    """qbd.fetch (which reads untrusted weights) and the runner never import the CLI, directly or
    through another qbd module, at module level or inside a function."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "qbd"
    graph: dict[str, set[str]] = {}
    for p in root.rglob("*.py"):
        name = ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qbd"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("qbd")}
        graph[name] = deps

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    assert "qbd.fetch" in graph and "qbd.runner" in reach("qbd.cli")  # the graph was read: the CLI reaches the runner
    cli = {"qbd.cli", "qbd.cli_options", "qbd.run_cli", "qbd.store_cli", "qbd.quant_cli", "qbd.zoo.cli"}  # the CLI's modules
    for low in ("qbd.fetch", "qbd.runner", "qbd.trained", "qbd.store", "qbd.remote_store"):
        assert not cli & reach(low), f"{low} reaches the CLI: {sorted(cli & reach(low))}"
