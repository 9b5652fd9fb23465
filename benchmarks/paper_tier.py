"""Paper-tier timings: ResNet-18 BadNet training and Neural Cleanse, class-batched vs sequential,
measured side by side in one run. Prints one JSON line per figure.

    python benchmarks/paper_tier.py --device cuda                # the paper's scale (GPU)
    python benchmarks/paper_tier.py --device cpu --quick         # scaled down, runs anywhere

Data: qbd's procedural `synthetic` traffic signs at CIFAR-10's shape (50,000 train images,
32x32), so the CA/ASR gates are meaningful without a download.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from qbd.config import AttackSpec, DatasetSpec, ModelJob, ModelSpec, TrainSpec
from qbd.data.base import DataSplit
from qbd.defenses.base import DefenseInputs, Subject
from qbd.defenses.neural_cleanse import NeuralCleanse
from qbd.train import train


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def cudnn_benchmark(on: bool):
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def synthetic_cifar_shaped(n_train: int, n_test: int) -> DataSplit:
    from qbd.data import synthetic

    t0 = time.perf_counter()
    k = len(synthetic.CLASSES) if hasattr(synthetic, "CLASSES") else 12
    xtr, ytr = synthetic.generate(0, "train", -(-n_train // k))
    xte, yte = synthetic.generate(0, "test", -(-n_test // k))
    split = DataSplit("synthetic", torch.from_numpy(xtr[:n_train]), torch.from_numpy(ytr[:n_train]).long(),
                      torch.from_numpy(xte[:n_test]), torch.from_numpy(yte[:n_test]).long(),
                      tuple(str(i) for i in range(k)), synthetic.MEAN, synthetic.STD)
    emit(figure="data_generation", n_train=len(split.y_train), n_test=len(split.y_test), seconds=round(time.perf_counter() - t0, 2))
    return split


def bench_training(data: DataSplit, device: torch.device, epochs: int, batch: int, compile_model: bool, model_name: str) -> Any:
    # the paper's lr 0.1 at every batch size: linear scaling (0.4 at batch 512, no warm-up)
    # collapsed ResNet-18 to the target class on the first H200 run
    spec = TrainSpec(epochs=epochs, batch_size=batch, lr=0.1, momentum=0.9,
                     weight_decay=5e-4, schedule="cosine", augment="crop", seed=0,
                     precision="bf16" if device.type == "cuda" else "fp32")
    job = ModelJob(DatasetSpec("synthetic"), ModelSpec(model_name), AttackSpec(), spec)
    sync(device)
    t0 = time.perf_counter()
    result = train(job, data, device=device, progress=False, compile_model=compile_model)
    sync(device)
    seconds = time.perf_counter() - t0
    m = result.metrics
    emit(figure="train_badnet", model=model_name, device=str(device), epochs=epochs, batch=batch, precision=spec.precision,
         compile=compile_model, seconds_total=round(seconds, 2), train_seconds=m["train_seconds"],
         images_per_s=m["images_per_s"], clean_acc=round(m["clean_acc"], 4), asr=round(m["asr"], 4),
         gates_met=m["clean_acc"] >= 0.85 and m["asr"] >= 0.95)
    return result.model


def bench_nc(model: torch.nn.Module, data: DataSplit, device: torch.device, classes: int, steps: int, batch: int,
             mode: str, precision: str, label: str, compile_step: bool = False) -> dict[str, Any]:
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if classes != model.num_classes:
        # a 43-class problem on the same trunk: a fresh head (timing only, verdict not meaningful)
        model = _with_head(model, classes, device)
    sub = Subject(model, model.embed, model.classify, classes, device=device)
    nc = NeuralCleanse("paper", tier="paper", steps=steps, batch_size=batch, mode=mode, precision=precision, compile=compile_step)
    inputs = DefenseInputs(clean_holdout=(data.x_test[:2000], data.y_test[:2000]))
    with cudnn_benchmark(device.type == "cuda"):
        # warm-up: a few steps (cudnn autotuning, allocator)
        NeuralCleanse("paper", tier="paper", steps=5, batch_size=batch, mode=mode, precision=precision, compile=compile_step).detect(
            sub, inputs, torch.Generator().manual_seed(0))
        sync(device)
        t0 = time.perf_counter()
        verdict = nc.detect(sub, inputs, torch.Generator().manual_seed(0))
        sync(device)
        seconds = time.perf_counter() - t0
    out = {"figure": "neural_cleanse", "variant": label, "device": str(device), "classes": classes, "steps": steps,
           "batch": batch, "mode": mode, "precision": precision, "compile": compile_step, "seconds": round(seconds, 3),
           "ms_per_step_all_classes": round(1000 * seconds / steps, 2), "status": verdict.status,
           "reason_code": verdict.reason_code, "target_class": verdict.target_class, "norms": verdict.evidence.get("norms")}
    emit(**out)
    return out


def _with_head(model: torch.nn.Module, classes: int, device: torch.device) -> torch.nn.Module:
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(m.head.in_features, classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.05)
        head.bias.zero_()
    m.head = head.to(device)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="scaled-down sizes (CPU)")
    ap.add_argument("--compile", action="store_true", help="also time Neural Cleanse with a torch.compile'd step")
    ap.add_argument("--compile-train", action="store_true", help="also time training with torch.compile")
    ap.add_argument("--skip-sequential", action="store_true", help="skip the (slow) sequential NC baseline")
    ap.add_argument("--skip-43", action="store_true", help="skip the 43-class NC timing")
    ap.add_argument("--model", default="resnet18-cifar", help="resnet18-cifar (the paper's) or tiny-cnn")
    args = ap.parse_args()
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    emit(figure="environment", **env)
    if args.quick:
        n_train, n_test, epochs, batch, steps, nc_batch = 2400, 1200, 2, 128, 20, 32
    else:
        n_train, n_test, epochs, batch, steps, nc_batch = 50_000, 10_000, 20, 512, 1000, 128
    data = synthetic_cifar_shaped(n_train, n_test)
    model = bench_training(data, device, epochs, batch, compile_model=False, model_name=args.model)
    if args.compile_train:
        bench_training(data, device, epochs, batch, compile_model=True, model_name=args.model)
    runs = []
    precisions = ("fp32", "bf16") if device.type == "cuda" else ("fp32",)
    for precision in precisions:
        runs.append(bench_nc(model, data, device, 10, steps, nc_batch, "batched", precision, f"batched-{precision}"))
    if not args.skip_sequential:
        runs.append(bench_nc(model, data, device, 10, steps, nc_batch, "sequential", "fp32", "sequential-fp32"))
    if args.compile:
        # compile time is excluded by the warm-up run: the figure is the steady-state loop
        runs.append(bench_nc(model, data, device, 10, steps, nc_batch, "batched", precisions[-1],
                             f"batched-{precisions[-1]}-compiled", compile_step=True))
    seq = next((r["seconds"] for r in runs if r["mode"] == "sequential"), None)
    for r in runs:
        if seq is not None and r["mode"] == "batched":
            emit(figure="nc_speedup_vs_sequential", variant=r["variant"], speedup=round(seq / r["seconds"], 2))
    fp32 = runs[0]
    for r in runs[1:]:
        import numpy as np

        a, b = np.array(fp32["norms"]), np.array(r["norms"])
        emit(figure="nc_precision_agreement", variant=r["variant"], same_status=r["status"] == fp32["status"],
             same_target=r["target_class"] == fp32["target_class"], max_rel_norm_diff=round(float(np.max(np.abs(a - b) / np.maximum(a, 1e-9))), 4))
    if not args.skip_43:
        bench_nc(model, data, device, 43, steps, nc_batch, "batched", precisions[-1], f"batched-{precisions[-1]}-43cls")


if __name__ == "__main__":
    main()
