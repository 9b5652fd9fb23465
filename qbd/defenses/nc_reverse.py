"""Neural Cleanse's optimisation (qbd.defenses.neural_cleanse): for a group of classes, the
smallest mask-and-pattern trigger that sends clean images to each, solved together (one
forward/backward over classes x batch images per step; every per-class quantity a tensor), with
the authors' cost schedule and early stop, and the fast view of the model it runs on."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.flop_counter import FlopCounterMode

from qbd.defenses.base import Subject
from qbd.metrics import to_unit


@contextmanager
def frozen(model: torch.nn.Module):
    """Eval mode and no weight gradients while the trigger is optimised; restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for prm, _ in flags:
        prm.requires_grad_(False)
    try:
        yield
    finally:
        for prm, flag in flags:
            prm.requires_grad_(flag)
        model.train(was_training)


def fast_view(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The same function as the frozen, eval-mode `model`, with fewer kernels: every Conv2d
    followed by a BatchNorm2d in a Sequential is folded into one convolution (the eval-mode
    affine map applied to the weights once), on a copy in channels_last. Equal to the model up to
    float rounding (tested). A model with nothing to fold (a quantized graph) is used as it is."""

    def foldable(seq: torch.nn.Sequential, i: int) -> bool:
        return (type(seq[i]) is torch.nn.Conv2d and type(seq[i + 1]) is torch.nn.BatchNorm2d
                and seq[i + 1].running_mean is not None)

    if model.training or not any(foldable(m, i) for m in model.modules() if isinstance(m, torch.nn.Sequential)
                                 for i in range(len(m) - 1)):
        return model, {"bn_folded": 0}
    view = copy.deepcopy(model)
    folded = 0
    for seq in [m for m in view.modules() if isinstance(m, torch.nn.Sequential)]:
        for i in range(len(seq) - 1):
            if foldable(seq, i):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(seq[i], seq[i + 1]), torch.nn.Identity()
                folded += 1
    for prm in view.parameters():
        prm.requires_grad_(False)
    return view.to(memory_format=torch.channels_last), {"bn_folded": folded}


@contextmanager
def counting(on: bool) -> Iterator[FlopCounterMode | None]:
    """torch's FLOP counter (convolutions and matrix products, forward and backward) around one
    step when `on`: the loop counts its first step and scales by the images it processes."""
    with FlopCounterMode(display=False) if on else nullcontext() as counter:
        yield counter


def _squash(raw: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "tanh":
        return torch.tanh(raw) / (2 - 1e-7) + 0.5  # the authors' epsilon keeps arctanh finite
    return torch.sigmoid(raw)


def _unsquash(v: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "tanh":
        return torch.atanh((v - 0.5) * (2 - 1e-7))
    return torch.logit(v)


def batch_plan(n: int, batch_size: int, iterations: int, seed: int) -> torch.Tensor:
    """Holdout indices for every iteration, drawn up front (seeded, reshuffled each pass), so
    the loop never copies indices to the device one step at a time."""
    bs = min(batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    per_pass = n // bs
    passes = -(-iterations // per_pass)
    rows = [torch.randperm(n, generator=gen)[: per_pass * bs].view(per_pass, bs) for _ in range(passes)]
    return torch.cat(rows)[:iterations]


def reverse_engineer(subject: Subject, x_hold: torch.Tensor, classes: list[int], p: dict[str, Any], seed: int, *,
                     forward: torch.nn.Module | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Optimise masks and patterns for `classes` together. Returns per-class results.
    `forward`: what computes the logits (default: the subject's model; `fast_view` gives the same
    function with fewer kernels). `progress(round)` is called after every round."""
    dev = subject.device
    k = len(classes)
    _, c, h, w = x_hold.shape
    mask_raw, pat_raw = initial_trigger(classes, (c, h, w), p["init"], p["activation"], seed)
    mask_raw = mask_raw.to(dev).requires_grad_(True)
    pat_raw = pat_raw.to(dev).requires_grad_(True)
    fused = {"fused": True} if dev.type == "cuda" else {}
    opt = torch.optim.Adam([mask_raw, pat_raw], lr=p["lr"], betas=tuple(p["betas"]), **fused)
    targets = torch.tensor(classes, device=dev)
    plan = batch_plan(len(x_hold), p["batch_size"], p["steps"] * p["mini_batches"], seed).to(dev)
    x_unit = to_unit(x_hold.to(dev))  # once: the same values the loop would convert batch by batch
    # channels_last input: ~1.35x faster convolutions on CPU (oneDNN) and tensor cores on GPU
    channels_last = True
    net = forward if forward is not None else subject.model
    forward = torch.compile(net, dynamic=False) if p["compile"] else net
    # a stopped class stops costing at the next check: on a CPU a check costs nothing, on a GPU
    # it is a host synchronisation
    every = p["check_every"] if p["check_every"] != "auto" else (1 if dev.type == "cpu" else 8)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=p["precision"] == "bf16")

    fixed = p["schedule"] == "fixed"
    zeros = torch.zeros(k, device=dev)
    cost = torch.full((k,), p["init_cost"] if fixed else 0.0, device=dev)
    reg_best = torch.full((k,), math.inf, device=dev)
    es_best = reg_best.clone()
    best_mask = _squash(mask_raw.detach(), p["activation"]).clone()
    best_pat = _squash(pat_raw.detach(), p["activation"]).clone()
    reached = torch.zeros(k, dtype=torch.bool, device=dev)
    last_succ = reached.clone()  # did the class's latest round succeed (the mask `select = "last"` ranks)
    active = torch.ones(k, dtype=torch.bool, device=dev)
    rounds_run = torch.zeros(k, device=dev)
    set_ctr, up_ctr, down_ctr, es_ctr = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
    up_flag = torch.zeros(k, dtype=torch.bool, device=dev)
    down_flag = up_flag.clone()
    thr = p["attack_succ_threshold"]
    gradient = {"ok": True, "pattern_grad_abs_max": None, "note": "input gradients reach the trigger"}
    iterations = 0
    images = 0  # images through forward + input-gradient backward (the counted work)
    flops_per_image: float | None = None
    t_loop = time.perf_counter()

    live: torch.Tensor | None = None  # classes still optimised (None: all); refreshed at checks
    k_live = k
    for step in range(p["steps"]):
        acc_sum = zeros.clone()
        reg_sum = zeros.clone()
        for _ in range(p["mini_batches"]):
            xb = x_unit[plan[iterations]]  # B C H W
            m_raw = mask_raw if live is None else mask_raw[live]
            p_raw = pat_raw if live is None else pat_raw[live]
            mask = _squash(m_raw, p["activation"])  # K 1 H W
            pat = _squash(p_raw, p["activation"])  # K C H W
            x_adv = (1 - mask[:, None]) * xb[None] + (mask * pat)[:, None]  # K B C H W
            bsz = xb.shape[0]
            x_in = x_adv.reshape(k_live * bsz, c, h, w)
            if channels_last:
                x_in = x_in.contiguous(memory_format=torch.channels_last)
            with counting(iterations == 0) as counter:
                with autocast:
                    # the counted first step runs eagerly: the counter's global module hooks,
                    # seen by torch.compile, left the compiled step no faster than eager (H100)
                    logits = (net if iterations == 0 else forward)(x_in)
                tgt = (targets if live is None else targets[live]).repeat_interleave(bsz)
                ce = F.cross_entropy(logits.float(), tgt, reduction="none").view(k_live, bsz).mean(1)
                reg = mask.abs().sum(dim=(1, 2, 3))
                loss = (ce + (cost if live is None else cost[live]) * reg).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if iterations == 0:
                gradient = _gradient_check(pat_raw.grad, ce)
                flops_per_image = counter.get_total_flops() / (k_live * bsz) if counter is not None else None
            images += k_live * bsz
            # classes outside `live` get zero gradients; Adam's momentum may still move their
            # raw parameters, but their schedule, best mask and counters are frozen by `active`
            opt.step()
            iterations += 1
            with torch.no_grad():
                acc = (logits.argmax(1) == tgt).float().view(k_live, bsz).mean(1)
                if live is None:
                    acc_sum += acc
                    reg_sum += reg.detach()
                else:
                    acc_sum.index_add_(0, live, acc)
                    reg_sum.index_add_(0, live, reg.detach())
        with torch.no_grad():
            acc = acc_sum / p["mini_batches"]
            reg_r = reg_sum / p["mini_batches"]
            rounds_run += active.float()
            succ = acc >= thr
            reached |= succ & active
            last_succ = torch.where(active, succ, last_succ)
            if p["select"] == "best":
                better = active & succ & (reg_r < reg_best)
                cur_mask = _squash(mask_raw, p["activation"])
                cur_pat = _squash(pat_raw, p["activation"])
                best_mask = torch.where(better[:, None, None, None], cur_mask, best_mask)
                best_pat = torch.where(better[:, None, None, None], cur_pat, best_pat)
                reg_best = torch.where(better, reg_r, reg_best)
            if p["early_stop"]:
                has_best = torch.isfinite(reg_best)
                stale = reg_best >= p["early_stop_threshold"] * es_best
                es_ctr = torch.where(active & has_best, torch.where(stale, es_ctr + 1, zeros), es_ctr)
                es_best = torch.where(active, torch.minimum(reg_best, es_best), es_best)
                active = active & ~(up_flag & down_flag & (es_ctr >= p["early_stop_patience"]))
            if not fixed:
                cost, set_ctr, up_ctr, down_ctr, up_flag, down_flag = _schedule(
                    cost, succ, active, set_ctr, up_ctr, down_ctr, up_flag, down_flag, p
                )
        if progress is not None:
            progress(step + 1)
        if p["early_stop"] and (step + 1) % every == 0:
            # the loop's only host synchronisation: drop the classes that stopped
            idx = active.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            live, k_live = (None, k) if len(idx) == k else (idx, len(idx))

    with torch.no_grad():
        final_mask = _squash(mask_raw, p["activation"])
        if p["select"] == "best":
            # the authors keep the last mask for a class that never reached the threshold
            use_best = torch.isfinite(reg_best)[:, None, None, None]
            final_mask = torch.where(use_best, best_mask, final_mask)
        norms = final_mask.abs().sum(dim=(1, 2, 3))
        stopped = ["budget" if a else "early-stop" for a in active.cpu().tolist()]
    seconds = time.perf_counter() - t_loop  # after the reads above: a GPU has finished by then
    return {
        "classes": classes,
        "norms": norms.double().cpu().tolist(),
        # the ranked norm must be a working trigger: the best successful mask (`best`), or the
        # final mask, which must have succeeded in its last round (`last`, the paper's protocol)
        "reached": (reached if p["select"] == "best" else last_succ).cpu().tolist(),
        "cost": cost.cpu().tolist(),
        "rounds": rounds_run.cpu().int().tolist(),
        "iterations": iterations,
        "centroids": _centroids(final_mask.detach().cpu()),
        "gradient": gradient,
        "stopped": stopped,
        "compute": {"images": images, "flops_per_image": flops_per_image, "seconds": seconds, "check_every": every},
    }


def initial_trigger(classes: list[int], shape: tuple[int, int, int], init: str, activation: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (pre-squash) initial masks (K 1 H W) and patterns (K C H W). `random`: one generator
    per class, the mask drawn first and the pattern after it from the same stream, so mask and
    pattern are independent and a class starts the same whichever classes share its run."""
    c, h, w = shape
    if init != "random":
        return torch.zeros(len(classes), 1, h, w), torch.zeros(len(classes), c, h, w)
    masks, patterns = [], []
    for cls in classes:
        gen = _class_gen(seed, cls)
        masks.append(torch.rand(1, 1, h, w, generator=gen))
        patterns.append(torch.rand(1, c, h, w, generator=gen))
    return _unsquash(torch.cat(masks), activation), _unsquash(torch.cat(patterns), activation)


def _class_gen(seed: int, cls: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1009 + cls)


def _schedule(cost, succ, active, set_ctr, up_ctr, down_ctr, up_flag, down_flag, p):
    """The authors' cost schedule, for all classes at once (inactive classes are frozen)."""
    zeros = torch.zeros_like(cost)
    pat = p["patience"]
    init_phase = (cost == 0) & succ
    set_ctr_n = torch.where(init_phase, set_ctr + 1, zeros)
    do_set = set_ctr_n >= pat
    cost_n = torch.where(do_set, torch.full_like(cost, p["init_cost"]), cost)
    up_n = torch.where(do_set, zeros, up_ctr)
    down_n = torch.where(do_set, zeros, down_ctr)
    upf = up_flag & ~do_set
    downf = down_flag & ~do_set
    up_n = torch.where(succ, up_n + 1, zeros)
    down_n = torch.where(succ, zeros, down_n + 1)
    do_up = up_n >= pat
    do_down = ~do_up & (down_n >= pat)
    up_n = torch.where(do_up, zeros, up_n)
    down_n = torch.where(do_down, zeros, down_n)
    cost_n = torch.where(do_up, cost_n * p["cost_multiplier"], cost_n)
    cost_n = torch.where(do_down, cost_n / p["cost_multiplier"] ** 1.5, cost_n)
    upf = upf | do_up
    downf = downf | do_down

    def keep(new, old):
        return torch.where(active, new, old)

    return keep(cost_n, cost), keep(set_ctr_n, set_ctr), keep(up_n, up_ctr), keep(down_n, down_ctr), keep(upf, up_flag), keep(downf, down_flag)


def _gradient_check(grad: torch.Tensor | None, ce: torch.Tensor) -> dict[str, Any]:
    """The pattern enters the loss only through the cross-entropy term, so its gradient is
    exactly the signal the model gives back: absent, zero or non-finite means no signal."""
    if not ce.requires_grad:
        return {"ok": False, "pattern_grad_abs_max": 0.0, "note": "the model's output has no autograd graph"}
    if grad is None:
        return {"ok": False, "pattern_grad_abs_max": 0.0, "note": "no gradient reached the input"}
    gmax = float(grad.abs().max())
    if not math.isfinite(gmax):
        return {"ok": False, "pattern_grad_abs_max": None, "note": "non-finite input gradient"}
    if gmax == 0.0:
        return {"ok": False, "pattern_grad_abs_max": 0.0, "note": "input gradient is identically zero"}
    return {"ok": True, "pattern_grad_abs_max": gmax, "note": "input gradients reach the trigger"}


def _centroids(mask: torch.Tensor, top: int = 16) -> list[list[float]]:
    """(row, column) centre of each class's `top` strongest mask pixels: where the reversed
    trigger sits (a plain centre of mass drifts towards the image centre with faint mass)."""
    k, _, h, w = mask.shape
    flat = mask[:, 0].reshape(k, -1).double()
    vals, idx = flat.topk(min(top, h * w), dim=1)
    weight = vals.clamp_min(1e-12)
    rows = ((idx // w).double() * weight).sum(1) / weight.sum(1)
    cols = ((idx % w).double() * weight).sum(1) / weight.sum(1)
    return [[round(float(r), 2), round(float(c), 2)] for r, c in zip(rows, cols, strict=True)]


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"norms": [], "reached": [], "cost": [], "rounds": [], "centroids": [], "iterations": 0}
    grads = []
    for part in parts:
        for key in ("norms", "reached", "cost", "rounds", "centroids"):
            out[key] += part[key]
        out["iterations"] += part["iterations"]
        grads.append(part["gradient"])
    bad = [g for g in grads if not g["ok"]]
    out["gradient"] = bad[0] if bad else grads[0]
    out["stopped"] = [s for part in parts for s in part["stopped"]]
    images = sum(part["compute"]["images"] for part in parts)
    seconds = sum(part["compute"]["seconds"] for part in parts)
    counted = [part["compute"]["flops_per_image"] for part in parts]
    # quantized kernels (the deployed int8 models) are invisible to torch's counter: no figure then
    flops = (sum(part["compute"]["images"] * part["compute"]["flops_per_image"] for part in parts)
             if all(c for c in counted) else None)
    out["compute"] = {
        "images": images, "seconds": round(seconds, 3), "flops": flops, "check_every": parts[0]["compute"].get("check_every"),
        "gflop_per_s": round(flops / seconds / 1e9, 2) if flops and seconds > 0 else None,
        "counter": "torch.utils.flop_counter on the first step (convolutions and matrix products, forward and"
                   " input-gradient backward), times the images processed; quantized kernels are not counted;"
                   " seconds include compilation when compile is on",
    }
    return out
