"""Which device a run uses. Torch-free except `resolve`, so the plugin and the CLI can check the
option before torch is imported.

`auto` is CUDA when torch sees a GPU, else the CPU. A bare `cuda` (or `auto` on a GPU host) under
pytest-xdist takes `cuda:{worker index mod device count}`: N workers share the host's GPUs evenly
(`-n 8` on 8 GPUs is one worker per card). `cuda:K` is taken as given.
"""

from __future__ import annotations

import os
import re

from qbd.errors import ConfigError

CHOICES = "auto, cpu, cuda or cuda:N"
_FORM = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")
_WORKER = re.compile(r"^gw(\d+)$")  # pytest-xdist worker ids: gw0, gw1, ...


def check(requested: str) -> str:
    """Validate the spelling (no torch): auto, cpu, cuda, cuda:N."""
    m = _FORM.match(requested or "")
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ConfigError(f"unknown device {requested!r}; valid: {CHOICES}")
    return requested


def worker_index(worker: str | None) -> int:
    m = _WORKER.match(worker or "")
    return int(m.group(1)) if m else 0


def pick(requested: str, *, cuda_count: int, worker: str | None = None) -> str:
    """The concrete device for `requested` on a host with `cuda_count` GPUs, for xdist worker
    `worker` (None: not under xdist)."""
    check(requested)
    kind, _, index = requested.partition(":")
    if kind == "auto":
        kind = "cuda" if cuda_count > 0 else "cpu"
    if kind == "cpu":
        return "cpu"
    if cuda_count == 0:
        raise ConfigError(f"device {requested!r}: torch sees no CUDA device here (use cpu or auto)")
    if index:
        if int(index) >= cuda_count:
            raise ConfigError(f"device {requested!r}: this host has {cuda_count} CUDA device(s), cuda:0..cuda:{cuda_count - 1}")
        return requested
    return f"cuda:{worker_index(worker) % cuda_count}"


def resolve(requested: str, worker: str | None = None) -> str:
    """`pick` with the GPUs torch sees; `worker` defaults to $PYTEST_XDIST_WORKER."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pick(requested, cuda_count=count, worker=worker if worker is not None else os.environ.get("PYTEST_XDIST_WORKER"))


def is_cpu(device: str) -> bool:
    return device.split(":")[0] == "cpu"


def prepare(device: str) -> None:
    """Process settings for a run on `device`: on CUDA, make it the current device (libraries that
    use the current one open no stray context on cuda:0) and turn TF32 off, so float models and
    surrogates compute in full fp32 (TF32's ~1e-3 relative error is the size of the quantization
    effects qbd measures). Training keeps its bf16 autocast. Nothing on a CPU."""
    import torch

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return
    torch.cuda.set_device(torch.device(device))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
