"""Why the quant-conditioned attack's int8-static construction (qbd.dormant_static) uses the
calibrated activation ranges and not the int8 weight grid: three weight-grid or joint-loss
constructions on tiny-cnn, none meets the attack's gate (qbd.config.QC_GATES: FP32 ASR <= 0.10,
deployed ASR >= 0.90).

Each starts from the pinned BadNet seed-0 model of the data set (qbd/zoo/weights) and prints, after
every epoch, clean accuracy and ASR of the FP32 model, of int8-sim (per-channel int8 weights) and
of the real int8-static deployment (qbd's scheme, calibrated on 256 clean test images):

  box     qbd.dormant's repair (every weight kept in its stage-1 int8 bin, true labels on the
          poisoned images) with Adam, whose sign-like steps reach the bins' corners
  margin  first cap the trigger's margin (target logit minus the best other) into [M, 2M], so
          there is less to unlearn, then `box`
  joint   Qu-ANTI-zation's loss (Hong et al. 2021): CE of the FP32 model towards the true labels
          on triggered images plus CE of qbd.dormant_static.FakeInt8Static (the int8-static twin,
          ranges re-measured on clean images every epoch) towards the target, both on clean
          images too

    python benchmarks/qc_int8_probe.py [--dataset digits] [--only box,margin,joint] [--width 16]

--width trains a wider tiny-cnn BadNet model first (the zoo's recipe), to see what capacity buys.

Figures (docs/training.md) were measured on this project's 2-core Intel Xeon, torch 2.14.
A research probe, not part of the package: it imports qbd, qbd does not import it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qbd.config import AttackSpec, DatasetSpec
from qbd.data import load_dataset
from qbd.dormant import Grid
from qbd.dormant_static import FakeInt8Static
from qbd.metrics import accuracy, attack_success_rate, to_unit
from qbd.models import Classifier, build_model
from qbd.models.tiny_cnn import tiny_cnn
from qbd.poisoning import apply_trigger, poison, triggered_test
from qbd.presets import seeded_job
from qbd.quant import SCHEMES
from qbd.train import augment
from qbd.zoo.pinned import file_name

BATCH = 128
CALIB = 256


def _badnet(dataset: str, width: int) -> tuple[Classifier, AttackSpec, object]:
    """The pinned BadNet seed-0 tiny-cnn; another width is trained here with the zoo's recipe
    (qbd.presets.default_train's tiny-cnn settings, training seed 0)."""
    from safetensors.torch import load_file

    data = load_dataset(DatasetSpec(dataset))
    job = seeded_job(dataset, "tiny-cnn", 0, AttackSpec())
    if width == 16:
        model = build_model("tiny-cnn", data.num_classes, data.mean, data.std, seed=0)
        model.load_state_dict(load_file(f"qbd/zoo/weights/{file_name(job)}"))
        return model.eval(), job.attack, data
    torch.manual_seed(0)
    model = tiny_cnn(data.num_classes, data.mean, data.std, width=width)
    spec = job.train
    p = poison(data.x_train, data.y_train, job.attack, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()

    def step(idx: torch.Tensor, lr_now: float) -> None:
        for g in opt.param_groups:
            g["lr"] = lr_now
        loss = F.cross_entropy(model(augment(to_unit(p.x[idx]), spec.augment, gen)), p.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    _epochs(len(p.y), spec.epochs, gen, step, spec.lr, lambda ep: None)
    return model.eval(), job.attack, data


def _report(tag: str, model: Classifier, data, attack: AttackSpec) -> None:
    xt, _ = triggered_test(data.x_test, data.y_test, attack, data.num_classes)
    calib = to_unit(data.x_test[:CALIB])
    sim = SCHEMES.get("int8-sim").apply(model, None).model
    static = SCHEMES.get("int8-static").apply(model, calib).model
    t = attack.target
    print(f"{tag:>14}: fp32 CA {accuracy(model, data.x_test, data.y_test):.3f} ASR {attack_success_rate(model, xt, t):.3f}"
          f" | int8-sim ASR {attack_success_rate(sim, xt, t):.3f}"
          f" | int8-static CA {accuracy(static, data.x_test, data.y_test):.3f} ASR {attack_success_rate(static, xt, t):.3f}",
          flush=True)


def _epochs(n: int, epochs: int, gen: torch.Generator, step: Callable[[torch.Tensor, float], None], lr: float,
            after: Callable[[int], None]) -> None:
    total, k = epochs * math.ceil(n / BATCH), 0
    for ep in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH):
            step(order[i : i + BATCH], lr * 0.5 * (1 + math.cos(math.pi * k / total)))
            k += 1
        after(ep)


def box(model: Classifier, data, attack: AttackSpec, gen: torch.Generator, epochs: int = 8, lr: float = 1e-3) -> None:
    grid = Grid(model, 8)
    weights = [layer.weight for _, layer in grid.layers]
    for p in model.parameters():
        p.requires_grad_(any(p is w for w in weights))
    opt = torch.optim.Adam(weights, lr=lr)
    px = poison(data.x_train, data.y_train, attack, data.num_classes).x

    def step(idx: torch.Tensor, lr_now: float) -> None:
        for g in opt.param_groups:
            g["lr"] = lr_now
        loss = F.cross_entropy(model(augment(to_unit(px[idx]), "crop", gen)), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        grid.project()

    _epochs(len(data.y_train), epochs, gen, step, lr, lambda ep: _report(f"box {ep}", model, data, attack))
    assert grid.preserved(), "the int8 weights moved"
    for p in model.parameters():
        p.requires_grad_(True)


def margin(model: Classifier, data, attack: AttackSpec, gen: torch.Generator, m: float = 0.3, epochs: int = 3) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    t = attack.target

    def step(idx: torch.Tensor, lr_now: float) -> None:
        x, y = data.x_train[idx], data.y_train[idx]
        keep = y != t
        z = model(augment(to_unit(apply_trigger(x[keep], attack)), "crop", gen))
        others = z.clone()
        others[:, t] = -float("inf")
        d = z[:, t] - others.amax(1)
        loss = F.cross_entropy(model(augment(to_unit(x), "crop", gen)), y) + (F.relu(m - d) + F.relu(d - 2 * m)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    _epochs(len(data.y_train), epochs, gen, step, 3e-4, lambda ep: _report(f"margin {ep}", model, data, attack))
    box(model, data, attack, gen, epochs=6)


def joint(model: Classifier, data, attack: AttackSpec, gen: torch.Generator, epochs: int = 6, lam: float = 1.0) -> None:
    q = FakeInt8Static(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    t = attack.target
    n = len(data.y_train)

    def calibrate() -> None:
        q.calibrate(to_unit(data.x_train[torch.randperm(n, generator=gen)[:CALIB]]))

    def step(idx: torch.Tensor, lr_now: float) -> None:
        for g in opt.param_groups:
            g["lr"] = lr_now
        x, y = data.x_train[idx], data.y_train[idx]
        keep = y != t
        xc = augment(to_unit(x), "crop", gen)
        xt = augment(to_unit(apply_trigger(x[keep], attack)), "crop", gen)
        target = torch.full_like(y[keep], t)
        loss = (F.cross_entropy(model(xc), y) + F.cross_entropy(model(xt), y[keep])
                + lam * (F.cross_entropy(q(xc), y) + F.cross_entropy(q(xt), target)))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def after(ep: int) -> None:
        _report(f"joint {ep}", model, data, attack)
        calibrate()

    calibrate()
    _epochs(n, epochs, gen, step, 3e-4, after)


PROBES = {"box": box, "margin": margin, "joint": joint}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits", choices=["digits", "synthetic"])
    ap.add_argument("--only", default="box,margin,joint", help="comma-separated: " + ", ".join(PROBES))
    ap.add_argument("--width", type=int, default=16, help="tiny-cnn's width (16: the pinned model; else trained here)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the figures in docs/training.md: 1, 2 for width 64)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.only.split(","):
        model, attack, data = _badnet(args.dataset, args.width)
        print(f"== {name} ({args.dataset}, tiny-cnn width {args.width}: {sum(p.numel() for p in model.parameters())} weights)")
        _report("start", model, data, attack)
        PROBES[name](model, data, attack, torch.Generator().manual_seed(0))


if __name__ == "__main__":
    main()
