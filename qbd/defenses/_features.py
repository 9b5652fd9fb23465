"""Batched, gradient-free passes of a Subject over uint8 images: penultimate features, logits.

The subject may be a quantized CPU model, so every pass runs in eval mode under no_grad, in
fixed-size batches, and the model's train/eval mode is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from qbd.defenses.base import Control, Subject
from qbd.metrics import channels_last, to_unit

BATCH = 512


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def _map(subject: Subject, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    with eval_mode(subject.model):
        for i in range(0, len(x), batch_size):
            xb = channels_last(to_unit(x[i : i + batch_size].to(subject.device)))
            out.append(fn(xb).float().cpu())
    if not out:
        raise ValueError("no images to pass through the model")
    return torch.cat(out)


def embed(subject: Subject, x: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
    """Penultimate features (N x D float32, CPU) of uint8 or [0, 1] images."""
    return _map(subject, subject.embed, x, batch_size).flatten(1)


class LayerUnavailable(LookupError):
    """The subject does not expose the asked-for layer (e.g. a graph compiled end to end)."""


def pre_pool(subject: Subject, x: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
    """The input of the model's last global pooling layer, flattened (N x C*H*W float32, CPU):
    the spatial map global average pooling collapses. A trigger is a small local patch; after
    pooling it is one of many averaged positions, before pooling it has its own coordinates.

    Read with a hook on the pooling module; a graph lowered end to end (PT2E int8-static) has no
    such module, so there the module that runs the graph reads it from the graph itself
    (`pool_input`), on the input the embedding pass gives it: the deployed int8 activations."""
    pools = [m for m in subject.model.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)]
    if pools:
        return _captured(subject, x, batch_size, pools[-1:], _pool_hook_input)
    graphs = [m for m in subject.model.modules() if callable(getattr(m, "pool_input", None))]
    if not graphs:
        raise LayerUnavailable(f"the {subject.scheme} model exposes no global pooling module and no lowered graph to read"
                               " it from, so the activations before pooling cannot be read")
    return _captured(subject, x, batch_size, graphs, lambda m, inp: m.pool_input(inp[0]))


def _pool_hook_input(_m: torch.nn.Module, inp: tuple[torch.Tensor, ...]) -> torch.Tensor:
    t = inp[0]
    return t.dequantize() if t.is_quantized else t  # an FX int8 graph pools quantized tensors


def _captured(subject: Subject, x: torch.Tensor, batch_size: int, modules: list[torch.nn.Module],
              read: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]) -> torch.Tensor:
    """What `read(module, its inputs)` gives during an embedding pass, from exactly one of
    `modules` (a LookupError from `read` means: not this module, e.g. a head graph with no pool)."""
    by_module: dict[int, list[torch.Tensor]] = {}
    missing: set[str] = set()

    def keep(m: torch.nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        try:
            t = read(m, inp)
        except LookupError as e:
            missing.add(str(e))
            return
        by_module.setdefault(id(m), []).append(t.detach().float().flatten(1).cpu())

    hooks = [m.register_forward_hook(keep) for m in modules]
    try:
        _map(subject, subject.embed, x, batch_size)
    finally:
        for h in hooks:
            h.remove()
    if len(by_module) != 1:
        why = f" ({'; '.join(sorted(missing))})" if missing else ""
        raise LayerUnavailable(f"the {subject.scheme} model: the activations before its global pool were read from"
                               f" {len(by_module)} modules on the embedding path, need exactly one{why}")
    return torch.cat(next(iter(by_module.values())))


# the representation a data-inspecting defense clusters (AC) or decomposes (SS)
LAYERS: dict[str, Callable[[Subject, torch.Tensor, int], torch.Tensor]] = {"penultimate": embed, "pre-pool": pre_pool}


def representations(subject: Subject, x: torch.Tensor, layer: str, batch_size: int = BATCH) -> torch.Tensor:
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; valid: {', '.join(LAYERS)}")
    return LAYERS[layer](subject, x, batch_size)


def logits(subject: Subject, x: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
    """Logits (N x K float32, CPU) of uint8 or [0, 1] images."""
    return _map(subject, subject.model, x, batch_size)


@torch.no_grad()
def classify(subject: Subject, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits from penultimate features (the head alone), batched."""
    out = []
    with eval_mode(subject.model):
        for i in range(0, len(features), batch_size):
            out.append(subject.classify(features[i : i + batch_size].to(subject.device)).float().cpu())
    return torch.cat(out)


def nonfinite(t: torch.Tensor | np.ndarray, what: str) -> str | None:
    """A reason string when `t` holds NaN or inf (the verdict must then be invalid), else None."""
    arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    bad = int(arr.size - np.isfinite(arr).sum())
    if bad:
        return f"{what} contain {bad} non-finite value(s) (NaN or inf): no statistic can be computed"
    return None


def single_threaded():
    """Scope numpy/scikit-learn (OpenBLAS, OpenMP) to one thread. Their thread pools spin-wait,
    and on a shared 2-core machine a 64 x 64 SVD or a 2-means fit then takes a second instead
    of milliseconds; the per-class problems here are far too small to gain from threads."""
    return threadpool_limits(limits=1)


def seed_from(generator: torch.Generator) -> int:
    """A seed for numpy / scikit-learn drawn from the run's torch generator."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def per_class(y: torch.Tensor, num_classes: int) -> list[np.ndarray]:
    """Indices of each (assigned) label, as numpy arrays."""
    yn = y.cpu().numpy()
    return [np.flatnonzero(yn == c) for c in range(num_classes)]


def sees_poison_control(abbrev: str, data: str) -> Control:
    """Whether a data-inspecting defense (AC, SS) sees the poisoned training set it was designed
    for, or only the clean holdout as the paper fed it."""
    if data == "poisoned_train":
        return Control(True, None, f"{abbrev} inspects the training set as the model was trained on it")
    return Control(False, None, f"the paper fed {abbrev} the clean holdout only")
