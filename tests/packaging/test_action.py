"""The composite action a defense author calls (action.yml) and the script it runs
(scripts/action_gate.sh): the action passes every input the script reads, and the script, run here
on the example defense, writes the report and the step summary and exits as qbd run does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "action_gate.sh"
EXAMPLE = ROOT / "examples" / "qbd-example-defense"


def _gate(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    summary = tmp_path / "summary.md"
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("QBD_") or k == "QBD_CACHE_DIR"},
            "QBD_PYTHON": sys.executable, "GITHUB_STEP_SUMMARY": str(summary), "QBD_DATASETS": "digits",
            "QBD_SCHEMES": "fp32,int8-dynamic", "QBD_PROTOCOLS": "canonical", "QBD_REPORT_DIR": str(tmp_path / "report"),
            "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(tmp_path)]), **env}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full, cwd=tmp_path, timeout=900)


def test_the_action_passes_every_input_the_script_reads():
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    steps = action["runs"]["steps"]
    (gate,) = [s for s in steps if "action_gate.sh" in s.get("run", "")]
    assert gate["run"] == 'bash "${{ github.action_path }}/scripts/action_gate.sh"'
    read = set(re.findall(r"\$\{(QBD_[A-Z_]+)", SCRIPT.read_text())) - {"QBD_PYTHON"}  # python: the setup step's
    assert set(gate["env"]) == read
    used = set(re.findall(r"inputs\.([a-z-]+)", yaml.safe_dump(steps)))
    assert used == set(action["inputs"])  # no input is ignored, none is missing
    upload = steps[-1]
    assert upload["uses"].startswith("actions/upload-artifact@") and upload["if"] == "always()"
    install = next(s for s in steps if "pip install" in s.get("run", ""))
    assert "download.pytorch.org/whl/cpu" in install["run"]  # CPU torch, not the CUDA wheel
    # by default qbd is the action's own source at the ref the author named: one version of script, table and zoo
    assert install["env"]["QBD_ACTION_SOURCE"] == "${{ github.action_path }}" and action["inputs"]["qbd"]["default"] == ""
    assert '"${QBD_REQUIREMENT:-$QBD_ACTION_SOURCE}"' in install["run"]
    # no input is pasted into a script (a crafted input would run as shell): inputs reach them through env
    assert not [s["run"] for s in steps if "inputs." in s.get("run", "")]


def test_ci_runs_the_action_itself_on_the_example():
    """The install steps run only on a runner: ci.yml calls the action from the checkout (`uses: ./`)
    on the example defense, with an artifact name of its own."""
    jobs = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())["jobs"]
    (step,) = [s for job in jobs.values() for s in job["steps"] if s.get("uses") == "./"]
    import tomllib

    project = tomllib.loads((ROOT / step["with"]["package"] / "pyproject.toml").read_text())["project"]
    assert step["with"]["defense"] in project["entry-points"]["qbd.defenses"]  # the name the package registers
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert step["with"]["artifact-name"] != action["inputs"]["artifact-name"]["default"]
    assert set(step["with"]) <= set(action["inputs"])


def test_the_gate_passes_on_the_example_and_writes_the_report_and_summary(tmp_path):
    r = _gate(tmp_path, QBD_DEFENSE="qbd_example_defense:CornerPatchProbe")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"report.md", "heatmap.png", "results.json"}
    summary = (tmp_path / "summary.md").read_text()
    assert "Outcome: 4 cells match the truth, 0 declared findings, 0 failing." in summary, summary[:2000]
    assert "qbd: exit" not in summary


def test_the_gate_fails_the_job_on_a_fail_and_says_why(tmp_path):
    (tmp_path / "never_detects.py").write_text(
        "from qbd.defenses.base import Verdict\n\n"
        "class NeverDetects:\n    name = 'never-detects'\n    requires = frozenset({'clean_holdout'})\n    params = {}\n\n"
        "    def detect(self, subject, inputs, generator):\n        return Verdict('clean', score=0.0, threshold=1.0)\n")
    r = _gate(tmp_path, QBD_DEFENSE="never_detects:NeverDetects")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "qbd: FAIL digits/fp32/never-detects[canonical]" in r.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "**qbd: exit 1** (a cell, a deployed model or a row fails its expectation" in summary
    # the report says what failed, as the log does: the summary and the uploaded report.md agree with the red job
    for text in (summary, (tmp_path / "report" / "report.md").read_text()):
        assert "## What fails (2: the run exits 1)" in text and "- `digits/fp32/never-detects[canonical]: " in text


def test_the_gate_wants_a_defense(tmp_path):
    r = _gate(tmp_path)
    assert r.returncode == 2 and "the 'defense' input is required" in r.stderr


def test_the_summary_says_why_a_run_stopped(tmp_path):
    """A usage error quotes qbd's one line; a python without qbd is not mistaken for a FAIL."""
    r = _gate(tmp_path, QBD_DEFENSE="strip", QBD_DATASETS="digitz")
    assert r.returncode == 2
    assert "**qbd: exit 2** (a usage error: qbd: error: unknown dataset 'digitz' (did you mean 'digits'?)" in \
        (tmp_path / "summary.md").read_text()
    (tmp_path / "summary.md").unlink()
    no_qbd = tmp_path / "python-without-qbd"
    no_qbd.write_text("#!/bin/sh\necho '/usr/bin/python3: No module named qbd' >&2\nexit 1\n")
    no_qbd.chmod(0o755)
    r = _gate(tmp_path, QBD_DEFENSE="strip", QBD_PYTHON=str(no_qbd))
    assert r.returncode == 1
    assert "**qbd: exit 1** (qbd stopped: /usr/bin/python3: No module named qbd)." in (tmp_path / "summary.md").read_text()
