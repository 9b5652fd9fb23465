"""`qbd quant audit`: quantize a model with a scheme and print what was really quantized.

    qbd quant audit --model resnet18-cifar --untrained --scheme int8-dynamic [--engine qnnpack] [--json]
    qbd quant audit --model tiny-cnn --dataset synthetic --scheme int8-static [--json]

With --dataset the model is the default BadNet model trained on that data set (from the store;
trained once if missing, as `qbd train` would), calibrated on the defender's clean holdout as in
the matrix, and the report adds the deployed model's clean accuracy and ASR.

qbd.cli adds `add_parser(subparsers)` to the main parser and calls `args.func(args)`; `run`
returns the exit status and raises qbd.config.ConfigError for user errors. Torch is imported
only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from qbd.config import ConfigError
from qbd.quant import get_scheme, scheme_names

UNTRAINED_MEAN = (0.5, 0.5, 0.5)
UNTRAINED_STD = (0.25, 0.25, 0.25)
UNTRAINED_SEED = 0  # model weights
CALIB_SEED = 0  # the random calibration batch
CALIB_SHAPE = (64, 3, 32, 32)


MAX_CLASSES = 100_000  # above ImageNet-21k's 21,841; beyond it the classifier alone runs to gigabytes


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    quant = subparsers.add_parser("quant", help="quantization schemes and their audits")
    commands = quant.add_subparsers(dest="quant_command", required=True, metavar="COMMAND")
    audit = commands.add_parser(
        "audit",
        help="quantize a model and report what was quantized and whether input gradients flow",
        description="Quantize a model with a scheme and print its audit (see docs/quantization.md).",
    )
    audit.add_argument("--model", required=True, help="model name (tiny-cnn, resnet18-cifar)")
    source = audit.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--untrained",
        action="store_true",
        help=f"seeded random weights; int8-static calibrates on {CALIB_SHAPE[0]} seeded uniform images",
    )
    source.add_argument("--dataset", metavar="NAME", help="a model trained on NAME, from the model store")
    audit.add_argument("--scheme", required=True, help=f"one of: {', '.join(scheme_names())}")
    audit.add_argument("--engine", help="quantized engine for int8 schemes (x86, fbgemm, qnnpack)")
    audit.add_argument("--num-classes", type=int, default=10, metavar="N", help="classes with --untrained (default 10)")
    audit.add_argument("--seed", type=int, default=0, help="training seed with --dataset (default 0)")
    audit.add_argument("--data-root", default=None, help="where CIFAR-10 / GTSRB live (else $QBD_DATA_ROOT)")
    audit.add_argument("--cache-dir", default=None, help="model store: a directory or a URL (s3://bucket/prefix, file:///path) (else $QBD_CACHE_DIR, else the user cache)")
    audit.add_argument("--json", action="store_true", help="print the audit as JSON")
    audit.set_defaults(func=run)
    return quant


def run(args: argparse.Namespace) -> int:
    from qbd.registry import UnknownNameError

    try:
        scheme = get_scheme(args.scheme)  # a built-in or an installed entry point
    except UnknownNameError as e:  # its message lists the valid names and a did-you-mean
        raise ConfigError(str(e)) from None
    if not 2 <= args.num_classes <= MAX_CLASSES:  # the bound keeps a typo from allocating gigabytes
        raise ConfigError(f"--num-classes must be in [2, {MAX_CLASSES}], got {args.num_classes}")
    import torch

    from qbd.models import MODELS, build_model

    if args.model not in MODELS:
        raise ConfigError(f"unknown model {args.model!r}; valid: {', '.join(MODELS.names())}")
    if args.dataset is not None:
        report = _trained_report(args)
        print(json.dumps(report, indent=2) if args.json else format_table(report))
        return 0
    model = build_model(args.model, args.num_classes, UNTRAINED_MEAN, UNTRAINED_STD, seed=UNTRAINED_SEED)
    calib = torch.rand(CALIB_SHAPE, generator=torch.Generator().manual_seed(CALIB_SEED))
    qm = scheme.apply(model, calib, args.engine)
    report = {
        "model": args.model,
        "source": "untrained",
        "num_classes": args.num_classes,
        "calibration": {"images": CALIB_SHAPE[0], "seed": CALIB_SEED, "distribution": "uniform [0, 1]"},
        "audit": qm.audit.to_dict(),
    }
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def _trained_report(args: argparse.Namespace) -> dict[str, Any]:
    from qbd.config import AttackSpec, DatasetSpec, ModelJob, ModelSpec
    from qbd.data import load_dataset
    from qbd.evaluate import tier_bench
    from qbd.presets import DEFAULT_MODEL, default_train
    from qbd.remote_store import open_store
    from qbd.trained import get_trained

    spec = DatasetSpec(args.dataset)
    job = ModelJob(spec, ModelSpec(args.model), AttackSpec(), default_train(args.dataset, args.model, seed=args.seed))
    data = load_dataset(spec, args.data_root)
    tm = get_trained(job, data, open_store(args.cache_dir), progress=False)
    # the split of the tier this model is the default of, seeded with the model's seed: as the matrix builds it
    tier = next((t for t, m in DEFAULT_MODEL.items() if m == args.model), "smoke")
    bench = tier_bench(data, tm, job.attack, model_name=args.model, tier=tier, seed=args.seed)
    qm = bench.quantized(args.scheme, args.engine)
    m = bench.metrics(args.scheme, args.engine)
    return {
        "model": args.model,
        "source": f"{job.slug()} (store key {tm.entry.key[:12]}, {tm.cache})",
        "num_classes": data.num_classes,
        "calibration": {"images": len(bench.calib()), "from": "the defender's clean holdout"},
        "deployed": {"clean_acc": m["clean_acc"], "asr": m["asr"]},
        "audit": qm.audit.to_dict(),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return f"{len(value)}: {', '.join(map(str, value))}" if value else "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k} x{v}" for k, v in value.items()) or "(none)"
    return "-" if value is None else str(value)


def format_table(report: dict[str, Any]) -> str:
    audit = report["audit"]
    width = max(map(len, audit))
    lines = [
        f"quant audit: {report['model']} ({report['source']}, {report['num_classes']} classes), scheme {audit['scheme']}"
    ]
    if "deployed" in report:
        d = report["deployed"]
        lines.append(f"  deployed model: clean acc {d['clean_acc']:.4f}, ASR {d['asr']:.4f}")
    for key, value in audit.items():
        text = _fmt(value)
        if key == "quantized_param_fraction":
            text += f"  ({100 * value:.3f} % of {audit['total_params']:,} float values)"
        wrapped = textwrap.wrap(text, 100 - width - 4) or [""]
        lines.append(f"  {key:<{width}}  {wrapped[0]}")
        lines += [f"  {'':<{width}}  {cont}" for cont in wrapped[1:]]
    return "\n".join(lines)
