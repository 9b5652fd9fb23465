"""The only place models are trained (Phase 1 of the paper's Algorithm 1).

One loop for CPU and GPU: the whole (uint8) training set lives on the device, augmentation and
normalisation run there too, so a step never waits on host data loading. On CUDA the step runs
under bf16 autocast when the spec asks for it, with channels_last tensors and a fused optimizer.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from qbd.attacks import conditioned
from qbd.config import QC_ENGINES, QC_GATES, Gates, ModelJob, TrainSpec, derive_seed
from qbd.data.base import DataSplit
from qbd.metrics import accuracy, attack_success_rate, to_unit
from qbd.models import Classifier, build_model
from qbd.poisoning import poison, triggered_test

TRAIN_THREADS_ENV = "QBD_TRAIN_THREADS"


def cpu_train_threads() -> int:
    """Threads for CPU training: 1 unless $QBD_TRAIN_THREADS says otherwise. Weight gradients
    are reduced differently for each thread count, so a fixed count is what makes "same seed,
    same weights" hold on every machine and under any number of xdist workers."""
    raw = os.environ.get(TRAIN_THREADS_ENV, "1")
    if not raw.isdigit() or int(raw) < 1:
        from qbd.errors import ConfigError

        raise ConfigError(f"${TRAIN_THREADS_ENV} must be an integer >= 1, got {raw!r}")
    return int(raw)


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class GateError(RuntimeError):
    """The trained model failed the Phase-1 gate (clean accuracy or ASR below the floor)."""


@dataclass
class TrainResult:
    model: Classifier
    metrics: dict[str, Any]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return d


def augment(x: torch.Tensor, mode: str, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shift by up to `pad` pixels (zero padding) and, for crop-flip, horizontal flips.
    x: float N x C x H x W on any device; `generator` lives on the same device."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # N 1 H 1
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # N 1 1 W
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    if mode == "crop-flip":
        flip = torch.rand(n, device=dev, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def _lr_at(spec: TrainSpec, step: int, total: int) -> float:
    if spec.schedule == "constant":
        return spec.lr
    return 0.5 * spec.lr * (1.0 + math.cos(math.pi * step / total))


def training_set(job: ModelJob, data: DataSplit) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images, labels, number poisoned) that the job trains on."""
    if job.attack is None:
        return data.x_train, data.y_train, 0
    p = poison(data.x_train, data.y_train, job.attack, data.num_classes)
    return p.x, p.y, len(p.poison_idx)


def evaluate(model: Classifier, job: ModelJob, data: DataSplit, device: torch.device) -> dict[str, float | None]:
    """Clean accuracy on the test split and, for a backdoored job, ASR on triggered test images
    whose true label is not the target."""
    model.eval()
    out: dict[str, float | None] = {"clean_acc": accuracy(model, data.x_test, data.y_test, device=device), "asr": None}
    if job.attack is not None:
        xt, _ = triggered_test(data.x_test, data.y_test, job.attack, data.num_classes)
        out["asr"] = attack_success_rate(model, xt, job.attack.target, device=device)
    return out


def train(job: ModelJob, data: DataSplit, device: str | torch.device | None = "cpu", progress: bool = True,
          compile_model: bool = False) -> TrainResult:
    dev = resolve_device(device)
    threads = cpu_train_threads() if dev.type == "cpu" else None
    with torch_threads(threads) if threads else nullcontext():
        result = _train(job, data, dev, progress, compile_model)
    result.metrics["cpu_threads"] = threads
    return result


def _train(job: ModelJob, data: DataSplit, dev: torch.device, progress: bool, compile_model: bool) -> TrainResult:
    """Train `job` on `data`; deterministic on CPU for a given seed. `compile_model` runs the
    step through torch.compile (worth it only when the run is long enough to repay compiling:
    benchmarks/paper_tier.py measures both)."""
    spec = job.train
    if spec.precision == "bf16" and dev.type != "cuda":
        raise ValueError("bf16 training is for CUDA devices; use precision fp32 on CPU")
    t0 = time.perf_counter()
    x_all, y_all, n_poisoned = training_set(job, data)
    x_all = x_all.to(dev)
    y_all = y_all.to(dev)
    model = build_model(job.model.name, data.num_classes, data.mean, data.std, seed=spec.seed)
    if job.attack is not None and conditioned(job.attack.name):
        from qbd.dormant import CONSTRUCTIONS

        assert job.attack.scheme is not None
        CONSTRUCTIONS.get(job.attack.scheme).check_model(model)  # before stage 1, not after it
    model = model.to(dev).to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_model else model
    opt_kw: dict[str, Any] = {"fused": True} if dev.type == "cuda" else {}
    opt = torch.optim.SGD(
        model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, **opt_kw
    )
    shuffle_gen = torch.Generator().manual_seed(derive_seed("shuffle", spec.seed))
    aug_gen = torch.Generator(device=dev).manual_seed(derive_seed("augment", spec.seed))
    n = len(y_all)
    steps_per_epoch = math.ceil(n / spec.batch_size)
    total = steps_per_epoch * spec.epochs
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16")
    bar = _progress(total, f"train {job.slug()}", progress)
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.int64)
    seen = 0
    step = 0
    model.train()
    for epoch in range(spec.epochs):
        order = torch.randperm(n, generator=shuffle_gen).to(dev)
        for i in range(0, n, spec.batch_size):
            idx = order[i : i + spec.batch_size]
            xb = augment(to_unit(x_all[idx]), spec.augment, aug_gen).contiguous(memory_format=torch.channels_last)
            yb = y_all[idx]
            for group in opt.param_groups:
                group["lr"] = _lr_at(spec, step, total)
            with autocast:
                logits = forward(xb)
                loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # accumulate on the device; read back only when the bar refreshes (no per-step sync)
            loss_sum += loss.detach() * len(yb)
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += len(yb)
            step += 1
            if bar is not None and (step % 20 == 0 or step == total):
                bar.set_postfix(epoch=f"{epoch + 1}/{spec.epochs}", loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
                bar.update(step - bar.n)
        if not math.isfinite(loss_sum.item()):
            raise FloatingPointError(f"training diverged in epoch {epoch + 1}: loss is not finite (lr {spec.lr})")
        last_loss, last_acc = loss_sum.item() / seen, correct.item() / seen
        loss_sum.zero_()
        correct.zero_()
        seen = 0
    if bar is not None:
        bar.close()
    model = model.to(memory_format=torch.contiguous_format).eval()
    dormant = None
    if job.attack is not None and conditioned(job.attack.name):
        dormant = _dormant_stage(model, job, data, dev, x_all)
    train_seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = evaluate(model, job, data, dev)
    if dormant is not None:
        deployed = dormant.pop("deployed")
        dormant.update(fp32_asr=metrics["asr"], fp32_clean_acc=metrics["clean_acc"], deployed_asr=deployed["asr"],
                       deployed_clean_acc=deployed["clean_acc"],
                       clean_acc_drop=round(dormant["backdoored_clean_acc"] - metrics["clean_acc"], 5))
        metrics["quant_conditioned"] = dormant
    metrics.update(
        seconds=round(time.perf_counter() - t0, 3),
        train_seconds=round(train_seconds, 3),
        images_per_s=round(n * spec.epochs / train_seconds, 1),
        final_train_loss=round(last_loss, 5),
        final_train_acc=round(last_acc, 5),
        poisoned=n_poisoned,
        train_size=n,
        device=str(dev),
    )
    return TrainResult(model=model.cpu(), metrics=metrics)


def _dormant_stage(model: Classifier, job: ModelJob, data: DataSplit, dev: torch.device, x_all: torch.Tensor) -> dict[str, Any]:
    """quant-conditioned: stage 1 (above) planted BadNet; the scheme's construction
    (qbd.dormant.CONSTRUCTIONS) hides it from FP32 and keeps it in the deployed model."""
    from qbd.dormant import CONSTRUCTIONS, calibration_images
    from qbd.quant import get_scheme

    assert job.attack is not None and job.attack.scheme is not None
    before = evaluate(model, job, data, dev)
    out = CONSTRUCTIONS.get(job.attack.scheme).make_dormant(
        model.to(memory_format=torch.channels_last), job, data, dev, x_all, augment,
        lambda lr, step, total: _lr_at(replace(job.train, lr=lr), step, total))
    model.to(memory_format=torch.contiguous_format).eval()
    # calibrated (int8-static; intN-sim needs none) on clean training images the construction did
    # not fit; the matrix measures it again with the defender's calibration (qbd.evaluate.Bench)
    scheme = get_scheme(job.attack.scheme)
    where = dev if dev.type in scheme.devices else torch.device("cpu")  # torch's int8 kernels are CPU-only
    deployed = scheme.apply(model.to(where), calibration_images(data, held_out=True), engine=QC_ENGINES.get(job.attack.scheme)).model
    model.to(dev)
    out.update(backdoored_clean_acc=before["clean_acc"], backdoored_asr=before["asr"],
               deployed=evaluate(deployed, job, data, where))
    return out


def check_gates(metrics: dict[str, Any], gates: Gates, attacked: bool) -> None:
    """Phase-1 gate: refuse to evaluate defenses on a model whose attack did not take. A
    quant-conditioned model's gate is its own (QC_GATES): dormant in FP32, active when deployed,
    clean accuracy kept."""
    problems = []
    if metrics["clean_acc"] < gates.min_clean_acc:
        problems.append(f"clean accuracy {metrics['clean_acc']:.4f} < {gates.min_clean_acc}")
    qc = metrics.get("quant_conditioned")
    if attacked and qc is not None:
        problems += quant_conditioned_problems(qc)
    elif attacked and (metrics["asr"] is None or metrics["asr"] < gates.min_asr):
        problems.append(f"attack success rate {metrics['asr']:.4f} < {gates.min_asr}")
    if problems:
        raise GateError(
            "Phase-1 gate failed: " + "; ".join(problems)
            + ". Train longer (--epochs), change the attack, or lower the floor (--min-clean-acc / --min-asr)."
        )


def quant_conditioned_problems(qc: dict[str, Any]) -> list[str]:
    """The quant-conditioned gate (QC_GATES), on the metrics qbd.dormant's stage records."""
    g = QC_GATES
    problems = []
    if qc["fp32_asr"] > g["max_fp32_asr"]:
        problems.append(f"FP32 ASR {qc['fp32_asr']:.4f} > {g['max_fp32_asr']} (the backdoor is not dormant)")
    if qc["deployed_asr"] < g["min_deployed_asr"]:
        problems.append(f"{qc['scheme']} ASR {qc['deployed_asr']:.4f} < {g['min_deployed_asr']} (it does not wake)")
    if qc["clean_acc_drop"] > g["max_clean_acc_drop"]:
        problems.append(f"clean accuracy drop {qc['clean_acc_drop']:.4f} > {g['max_clean_acc_drop']} against the"
                        " stage-1 BadNet model")
    return problems


def _progress(total: int, desc: str, enabled: bool):  # -> tqdm | None
    """A bar on a terminal; a redirected log (CI) gets one line instead of hundreds of frames."""
    if not enabled:
        return None
    if not sys.stderr.isatty():
        print(f"qbd: {desc}: {total} steps ...", file=sys.stderr, flush=True)
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True)
