"""qbd.runner: the plan's models first, then its cells on worker processes."""

from __future__ import annotations

import pytest
import torch

from qbd import runner
from qbd.config import DatasetSpec, ModelJob
from qbd.errors import ConfigError
from qbd.tiers import TIERS


def _plan(device: str) -> runner.RunPlan:
    return runner.RunPlan(jobs=(ModelJob(DatasetSpec("digits")),), tier=TIERS["smoke"], schemes=("fp32",),
                          defenses=("strip",), protocols=("canonical",), device=device)


def _no_models(*args, **kwargs):
    raise AssertionError("models were loaded before the worker count was checked")


def test_workers_on_a_gpu_are_refused_before_any_model_is_loaded(monkeypatch):
    monkeypatch.setattr("qbd.train.resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(runner, "_units", _no_models)
    with pytest.raises(ConfigError, match="-j 2: worker processes run cells on the CPU; with --device cuda use -j 1"):
        runner.run(_plan("cuda"), data_root=None, store=None, workers=2)


def test_auto_workers_on_a_gpu_mean_one_process(monkeypatch):
    seen = {}
    monkeypatch.setattr("qbd.train.resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(runner, "_units", lambda *a: [])
    monkeypatch.setattr("qbd.pool.run_tasks", lambda fn, ctx, tasks, **kw: seen.update(kw) or [])
    assert runner.run(_plan("auto"), data_root=None, store=None, workers="auto") == []
    assert seen["workers"] == 1


def test_auto_device_on_a_cpu_machine_uses_the_cores(monkeypatch):
    """`--device auto` is a CPU here: -j auto keeps its workers (the device string is resolved, not compared)."""
    seen = {}
    monkeypatch.setattr("qbd.train.resolve_device", lambda device: torch.device("cpu"))
    monkeypatch.setattr("qbd.pool.usable_cpus", lambda: 2)
    unit = runner._Unit(bench=None, seed=0, seed_note="", cells=tuple(runner.Cell("digits", "fp32", "strip", "canonical")
                                                                    for _ in range(3)))
    monkeypatch.setattr(runner, "_units", lambda *a: [unit])
    monkeypatch.setattr("qbd.pool.run_tasks", lambda fn, ctx, tasks, **kw: seen.update(kw) or [])
    runner.run(_plan("auto"), data_root=None, store=None, workers="auto", progress=False, log=lambda m: None)
    assert seen["workers"] == 2


class _Terminal:
    """A stand-in for a terminal's stderr (tqdm writes its frames there)."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, []

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text.append(s)
        return len(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("tty", [True, False])
def test_step_progress_only_on_a_terminal(monkeypatch, tmp_path, workers, tty):
    """Fine-Pruning's fine-tuning steps reach the run's one progress line on a terminal, from this
    process or from a worker; a redirected log gets the cell lines and no bar frames."""
    import sys

    from qbd.config import AttackSpec
    from qbd.presets import seeded_job
    from qbd.store import Store

    err = _Terminal(tty)
    monkeypatch.setattr(sys, "stderr", err)
    logged = []
    plan = runner.RunPlan(jobs=(seeded_job("digits", "tiny-cnn", 0, AttackSpec()),), tier=TIERS["smoke"], schemes=("fp32",),
                          defenses=("fine-pruning",), protocols=("canonical",), controls=False)
    out = runner.run(plan, data_root=None, store=Store(tmp_path), workers=workers, log=logged.append)
    assert [r["cell"] for r in out] == ["digits/fp32/fine-pruning[canonical]"]
    text = "".join(err.text)
    if tty:
        assert "fine-pruning[canonical] fp32: step" in text and "cells:" in text
        assert "digits/fp32/fine-pruning[canonical]: detected" in text  # the cell line, above the bar
    else:
        assert "cells:" not in text and "step" not in text
        assert any(m.startswith("digits/fp32/fine-pruning[canonical]: detected") for m in logged)


def test_a_run_that_fails_midway_hands_back_the_cells_that_finished(monkeypatch):
    """An error outside a defense (a scheme that cannot be applied, a lost worker) stops the run;
    the Results of the cells that finished come with the error, for the caller to write."""
    unit = runner._Unit(bench=None, seed=0, seed_note="", cells=tuple(runner.Cell("digits", s, "strip", "canonical")
                                                                    for s in ("fp32", "int4-sim", "int8-static")))
    monkeypatch.setattr("qbd.train.resolve_device", lambda device: torch.device("cpu"))
    monkeypatch.setattr(runner, "_units", lambda *a: [unit])
    monkeypatch.setattr(runner, "_longest_first", lambda tasks, plan: list(range(len(tasks))))

    def cell(context, task, report):
        if task[1].scheme == "int8-static":
            raise ConfigError("scheme 'int8-static' cannot run here")
        return {"cell": f"digits/{task[1].scheme}/strip[canonical]", "seconds": 0.1,
                "verdict": {"status": "clean", "target_class": None}}

    monkeypatch.setattr(runner, "_run_cell", cell)
    with pytest.raises(runner.PartialRun) as info:
        runner.run(_plan("cpu"), data_root=None, store=None, workers=1, progress=False, log=lambda m: None)
    e = info.value
    assert [r["cell"] for r in e.results] == ["digits/fp32/strip[canonical]", "digits/int4-sim/strip[canonical]"]
    assert e.total == 3 and isinstance(e.cause, ConfigError) and "stopped after 2 of 3 cells" in str(e)


def test_a_run_wide_engine_reaches_only_the_schemes_that_take_one():
    """`qbd run --engine fbgemm` over fp32 and int8-static: fp32 takes no engine and runs as it is
    (it used to stop the run at the fp32 control with "takes no quantized engine")."""
    from qbd.config import AttackSpec
    from qbd.data import load_dataset
    from qbd.quant.engine import supported_engines
    from qbd.runner import load_defense, seeded_bench

    if "fbgemm" not in supported_engines():
        pytest.skip("fbgemm is not in this torch build")
    bench = seeded_bench(load_dataset(DatasetSpec("digits"), None), 0, AttackSpec())
    defense = load_defense("spectral-signatures", "canonical", "smoke")
    fp32 = bench.run(defense, "fp32", engine="fbgemm")
    static = bench.run(defense, "int8-static", engine="fbgemm")
    assert fp32["quant"]["audit"]["engine"] is None and static["quant"]["audit"]["engine"] == "fbgemm"
    assert fp32["defense"]["input_unchanged"] is None and static["defense"]["input_unchanged"] is False
    dynamic = bench.run(defense, "int8-dynamic")
    assert dynamic["defense"]["input_unchanged"] is True  # only the classifier is quantized: SS reads fp32's activations


_DEFENSES = '''
from qbd.defenses.base import Verdict

class NoProtocol:
    name = "no-proto"
    requires = frozenset({"clean_holdout"})
    params = {}

    def detect(self, subject, inputs, generator):
        return Verdict("clean")

class AlwaysCanonical(NoProtocol):
    name = "always-canonical"

    def __init__(self):
        self.protocol = "canonical"

class CallsItselfStrip(NoProtocol):
    name = "strip"
'''


def test_a_defense_runs_the_cells_protocol_and_cannot_borrow_a_builtins_name(tmp_path, monkeypatch):
    """A class that keeps no protocol is told the cell's (its data diet and its cell id follow it);
    one that insists on another is refused, as is a module:Class calling itself by a built-in's
    name (it would be judged by that defense's declared findings)."""
    (tmp_path / "qbd_runner_fakes.py").write_text(_DEFENSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {runner.load_defense("qbd_runner_fakes:NoProtocol", p, "smoke").protocol for p in ("canonical", "paper")} == {
        "canonical", "paper"}
    assert runner.load_defense("qbd_runner_fakes:AlwaysCanonical", "canonical", "smoke").protocol == "canonical"
    with pytest.raises(ConfigError, match="asked for the 'paper' protocol, it says `protocol = 'canonical'`"):
        runner.load_defense("qbd_runner_fakes:AlwaysCanonical", "paper", "smoke")
    with pytest.raises(ConfigError, match="its name 'strip' is a built-in defense's"):
        runner.load_defense("qbd_runner_fakes:CallsItselfStrip", "canonical", "smoke")
    assert type(runner.load_defense("qbd.defenses.strip:Strip", "canonical", "smoke")).__name__ == "Strip"  # the built-in itself
