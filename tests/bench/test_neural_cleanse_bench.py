"""Neural Cleanse's optimisation loop, class-batched vs sequential, side by side in one run.

    pytest -p no:xdist -m bench tests/bench --benchmark-only

Groups pair the two modes: `nc-step` (one optimisation step over all classes) and `nc-run` (the
smoke tier's paper-protocol budget, 100 steps). Compare the means within a group; a regression
fails CI through --benchmark-compare-fail, never through an assert on time.
"""

from __future__ import annotations

import pytest
import torch

from qbd.defenses.base import DefenseInputs, Subject
from qbd.defenses.neural_cleanse import NeuralCleanse
from qbd.models import build_model

CLASSES = 10
BATCH = 32


@pytest.fixture(scope="module")
def setup():
    model = build_model("tiny-cnn", CLASSES, (0.5,) * 3, (0.25,) * 3, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (256, 3, 32, 32), generator=g, dtype=torch.int64).to(torch.uint8)
    return Subject(model, model.embed, model.classify, CLASSES), DefenseInputs((x, torch.zeros(256, dtype=torch.int64)))


def _run(subject: Subject, inputs: DefenseInputs, mode: str, steps: int) -> None:
    nc = NeuralCleanse("paper", tier="smoke", mode=mode, steps=steps, batch_size=BATCH)
    nc.detect(subject, inputs, torch.Generator().manual_seed(0))


def _info(benchmark, mode: str, steps: int) -> None:
    benchmark.extra_info.update(classes=CLASSES, batch=BATCH, steps=steps, mode=mode, device="cpu",
                                threads=torch.get_num_threads(), model="tiny-cnn")


@pytest.mark.bench
@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_nc_step(benchmark, setup, mode):
    benchmark.group = "nc-step"
    _info(benchmark, mode, 10)
    subject, inputs = setup
    # 10 steps per round: one step is too short to time against the fixed per-call setup
    benchmark.pedantic(_run, args=(subject, inputs, mode, 10), rounds=5, warmup_rounds=1)
    benchmark.extra_info["ms_per_step"] = round(1000 * benchmark.stats.stats.mean / 10, 2)


@pytest.mark.bench
@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_nc_full_run(benchmark, setup, mode):
    benchmark.group = "nc-run"
    _info(benchmark, mode, 100)
    subject, inputs = setup
    benchmark.pedantic(_run, args=(subject, inputs, mode, 100), rounds=3, warmup_rounds=1)
