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
    install = next(s["run"] for s in steps if "pip install" in s.get("run", ""))
    assert "download.pytorch.org/whl/cpu" in install  # CPU torch, not the CUDA wheel


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
