"""The command line as a user meets it: exit codes, one-line errors, JSON output, the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qbd import results as results_io


def qbd(*args: str, cache: Path | None = None, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if cache is not None:
        env["QBD_CACHE_DIR"] = str(cache)
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
    assert len(results) == 3  # two schemes + the negative control
    for res in results:
        assert results_io.problems(res) == []
        assert res["weights"]["origin"] == "trained" and len(res["weights"]["store_key"]) == 64
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.json", "report.md", "heatmap.png"}
    assert results_io.read(tmp_path / "out" / "results.json") == sorted(results, key=lambda x: x["cell"])
    md = (tmp_path / "out" / "report.md").read_text()
    for res in results:
        word = {"detected": "DETECTED", "clean": "clean", "invalid": "INVALID"}[res["verdict"]["status"]]
        row = next(line for line in md.splitlines() if line.startswith(f"| {res['dataset']}") and f"| {res['quant']['scheme']} |" in line
                   and ("clean model" in line) == (res["attack"] is None))
        assert word in row
