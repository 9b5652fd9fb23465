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


# -- the loop against the machine ----------------------------------------------------------------
# Neural Cleanse's whole optimisation (sequential, one thread, its defaults) next to a plain
# PyTorch loop doing only what it must: forward and input-gradient backward of the same shapes,
# as many times, with the same channels_last input (`plain`). The gap between `nc-loop` and
# `plain` is the loop's own overhead (masking, Adam, bookkeeping); `plain-contiguous` is the
# textbook loop (default layout); `plain-folded` runs the model with BatchNorm folded into its
# convolutions (NeuralCleanse's opt-in `fold_batchnorm`, qbd.defenses.nc_reverse.fast_view).
# Each entry records its GFLOP/s (torch's FLOP counter).
STEPS = 20  # per class: 10 classes x 20 steps = 200 forward+backward passes of 32 images


def _plain(model: torch.nn.Module, x: torch.Tensor, channels_last: bool) -> None:
    target = torch.zeros(len(x), dtype=torch.int64)
    for _ in range(CLASSES * STEPS):
        xi = x.clone().requires_grad_(True)
        xin = xi.contiguous(memory_format=torch.channels_last) if channels_last else xi
        torch.nn.functional.cross_entropy(model(xin), target).backward()


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        xi = x.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(model(xi), torch.zeros(len(x), dtype=torch.int64)).backward()
    return counter.get_total_flops()


@pytest.mark.bench
@pytest.mark.parametrize("variant", ["nc-loop", "plain", "plain-contiguous", "plain-folded"])
def test_nc_loop_vs_plain_pytorch(benchmark, setup, variant):
    import copy

    from qbd.defenses.nc_reverse import fast_view

    benchmark.group = "nc-vs-plain"
    subject, inputs = setup
    model = copy.deepcopy(subject.model)  # frozen here; the fixture's model stays as it is
    for prm in model.parameters():
        prm.requires_grad_(False)
    x = inputs.clean_holdout[0][:BATCH].float() / 255
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if variant == "nc-loop":
            nc = NeuralCleanse("paper", tier="smoke", mode="sequential", steps=STEPS, batch_size=BATCH)
            benchmark.pedantic(nc.detect, args=(subject, inputs, torch.Generator().manual_seed(0)), rounds=3, warmup_rounds=1)
        else:
            net = fast_view(model)[0] if variant == "plain-folded" else model
            benchmark.pedantic(_plain, args=(net, x, variant != "plain-contiguous"), rounds=3, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    flops = _flops(model, x) * CLASSES * STEPS
    benchmark.extra_info.update(classes=CLASSES, batch=BATCH, steps=STEPS, threads=1, model="tiny-cnn", flops=flops,
                                gflop_per_s=round(flops / benchmark.stats.stats.median / 1e9, 2))
