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
