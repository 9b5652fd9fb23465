"""The command line's shared parts: exit codes, value types, the model options (`qbd train`,
`qbd run`, `qbd store fetch`) and the job, device and probe they name, and a model's report.
Light at module level, as qbd.cli is."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from qbd.attacks import DEFAULT_BLEND_ALPHA, DEFAULT_QC_SCHEME, QC_SCHEMES, TRIGGER_PATTERNS
from qbd.config import (
    CORNERS,
    AttackSpec,
    DatasetSpec,
    Gates,
    ModelJob,
    ModelSpec,
)
from qbd.errors import ConfigError, QbdUserError
from qbd.registry import UnknownNameError, unknown_message
from qbd.tiers import TIERS

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2  # success; a run that failed (gate, corrupt store...); a usage error


class UsageError(QbdUserError):
    """A user mistake; printed as one line, exit code 2."""


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(0, "an integer")


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return v


_seed_count = _int_at_least(1, "a number of seeds")


def seeds_arg(text: str) -> int | tuple[int, ...]:
    """--seeds: a number of models (seeds --seed .. --seed+N-1), or the model seeds themselves,
    comma-separated (a row measured on the models that pass their attack's gate, say)."""
    if "," not in text:
        return _seed_count(text)
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seeds or comma-separated model seeds, got {text!r}") from None
    if any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"model seeds must be distinct and >= 0, got {text!r}")
    return seeds


def workers_arg(text: str) -> int | str:
    """`auto` or a count of worker processes (1: in this process)."""
    if text == "auto":
        return text
    return _int_at_least(1, "a worker count (or auto)")(text)


def _unit_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def csv_names(text: str | None, valid: list[str] | None, label: str) -> tuple[str, ...]:
    """"a,b" -> ("a", "b"); "all" -> every valid name; names are checked when `valid` is given."""
    if text is None:
        return ()
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items == ["all"] and valid is not None:
        return tuple(valid)
    if not items:
        raise ConfigError(f"--{label}: empty list")
    for it in items:
        if valid is not None and it not in valid and ":" not in it:
            raise UnknownNameError(unknown_message(label, it, list(valid)))
    return tuple(dict.fromkeys(items))


def add_model_options(p: argparse.ArgumentParser, *, tier: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--dataset", default="synthetic", help="data set (default: synthetic; `qbd list` shows all)")
    g.add_argument("--model", default=None, help="architecture (default: tiny-cnn, resnet18-cifar for --tier paper)")
    if tier:
        g.add_argument("--tier", choices=tuple(TIERS), default="smoke", help="default settings tier (default: smoke)")
    g.add_argument("--seed", type=_positive_int, default=0, help="training seed (default: 0)")
    g.add_argument("--epochs", type=_positive_int, default=None, help="override the preset's epochs")
    g.add_argument("--device", default=None, help="where to train and run the defenses: auto (CUDA when present), cpu, cuda or"
                   " cuda:N (default: the tier's: cpu for smoke, auto for paper)")
    g.add_argument("--data-root", default=None, help="where CIFAR-10 / GTSRB live (else $QBD_DATA_ROOT)")
    g.add_argument("--cache-dir", default=None, help="model store: a directory or a URL (s3://bucket/prefix, file:///path) (else $QBD_CACHE_DIR, else the user cache)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.add_argument_group("attack")
    a.add_argument("--attack", default="badnet",
                   help="badnet (a patch), blend (a full-image pattern mixed in at --blend-alpha), quant-conditioned (a"
                   " BadNet patch dormant in FP32 that wakes in --qc-scheme), or an installed one (`qbd list`; the"
                   " qbd.attacks entry points) (default: badnet)")
    a.add_argument("--target", type=_positive_int, default=None,
                   help="target class (default: the attack's preset, the pinned zoo's: 0, for blend 2)")
    a.add_argument("--trigger-pattern", choices=TRIGGER_PATTERNS, default=None,
                   help="default: the attack's preset: white (badnet, quant-conditioned), checkerboard (blend; or random noise)")
    a.add_argument("--blend-alpha", type=float, default=None, help=f"blend: the pattern's weight, in (0, 1) (default: {DEFAULT_BLEND_ALPHA})")
    a.add_argument("--qc-scheme", choices=QC_SCHEMES, default=None,
                   help=f"quant-conditioned: the scheme whose quantized model obeys the trigger (default: {DEFAULT_QC_SCHEME})")
    a.add_argument("--trigger-size", type=_positive_int, default=3, help="side in pixels (default: 3)")
    a.add_argument("--trigger-position", default="bottom-right", help=f"{', '.join(CORNERS)} or x,y (default: bottom-right)")
    a.add_argument("--poison-rate", type=float, default=0.10, help="share of training samples poisoned, in (0, 1] (default: 0.1)")
    a.add_argument("--attack-seed", type=_positive_int, default=None,
                   help="which samples are poisoned; the random pattern (default: the training seed, so --seed s is model s"
                   " of the pinned zoo)")
    a.add_argument("--clean", action="store_true", help="train without poisoning (the negative control)")
    gg = p.add_argument_group("phase-1 gate")
    gg.add_argument("--min-clean-acc", type=_unit_float, default=Gates.min_clean_acc)
    gg.add_argument("--min-asr", type=_unit_float, default=Gates.min_asr)


def job_from_args(args: argparse.Namespace) -> ModelJob:
    from qbd.data import DATASETS
    from qbd.presets import DEFAULT_MODEL, default_train

    DATASETS.get(args.dataset)  # unknown names fail here, listing the valid ones
    from qbd.models import MODELS

    model = args.model or DEFAULT_MODEL[getattr(args, "tier", "smoke")]
    MODELS.get(model)
    if args.epochs == 0:
        raise ConfigError("--epochs must be >= 1")
    attack = None if args.clean else probe_from_args(args)
    args.device = device_from_args(args)
    precision = "fp32" if args.device == "cpu" else "bf16"
    return ModelJob(
        dataset=DatasetSpec(args.dataset),
        model=ModelSpec(model),
        attack=attack,
        train=default_train(args.dataset, model, seed=args.seed, precision=precision, epochs=args.epochs),
    )


def device_from_args(args: argparse.Namespace) -> str:
    """--device resolved on this host (qbd.devices): a concrete "cpu" or "cuda:N"."""
    from qbd import devices
    # `is None`, not falsiness: an empty --device= is a spelling to refuse, not "the tier's default"
    return devices.resolve(TIERS[getattr(args, "tier", "smoke")].device if args.device is None else args.device)


def probe_from_args(args: argparse.Namespace) -> AttackSpec:
    """The attack the options describe (with --clean: the trigger a clean model is probed with)."""
    from qbd.presets import attack_preset

    preset = attack_preset(args.attack)
    pattern = args.trigger_pattern or preset.trigger_pattern
    target = preset.target if args.target is None else args.target
    return AttackSpec(name=args.attack, target=target, trigger_pattern=pattern, trigger_size=args.trigger_size,
                      trigger_position=args.trigger_position, poison_rate=args.poison_rate,
                      seed=args.seed if args.attack_seed is None else args.attack_seed,
                      alpha=args.blend_alpha, scheme=args.qc_scheme)


def report_model(args: argparse.Namespace, job: ModelJob, tm: Any, out: dict[str, Any], detail: str | None = None,
                 prefix: str = "") -> int:
    """Print a stored model's figures (`out` as JSON with --json), then apply the Phase-1 gate."""
    from qbd.train import check_gates

    m = tm.metrics
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        asr = "n/a (clean model)" if m["asr"] is None else f"{m['asr']:.4f}"
        print(f"{prefix}{job.slug()}  cache {tm.cache}  clean acc {m['clean_acc']:.4f}  ASR {asr}")
        if detail:
            print(f"  {detail}")
        if out.get("asr_by_scheme"):
            print("  ASR by scheme: " + ", ".join(f"{k} {v:.4f}" for k, v in out["asr_by_scheme"].items()))
        qc = m.get("quant_conditioned")
        if qc:
            print(f"  quant-conditioned: FP32 ASR {qc['fp32_asr']:.4f}, {qc['scheme']} ASR {qc['deployed_asr']:.4f}, clean acc"
                  f" {qc['fp32_clean_acc']:.4f} (stage-1 BadNet {qc['backdoored_clean_acc']:.4f})")
        print(f"  weights: {tm.weights_file}")
    check_gates(m, Gates(args.min_clean_acc, args.min_asr), attacked=job.attack is not None)
    return EXIT_OK


def asr_by_scheme(job: ModelJob, data: Any, tm: Any, tier: str) -> dict[str, float] | None:
    """{scheme: ASR of the model deployed through it} for the tier's schemes (and a
    quant-conditioned attack's own), measured as the matrix measures it (qbd.evaluate.Bench, on its
    evaluation split); None for a clean model."""
    if job.attack is None:
        return None
    from qbd.evaluate import tier_bench
    # as `qbd run --seed N` builds it: the tier's split, seeded with the model's seed
    bench = tier_bench(data, tm, job.attack, model_name=job.model.name, tier=tier, seed=job.train.seed)
    schemes = dict.fromkeys((*TIERS[tier].schemes, *((job.attack.scheme,) if job.attack.scheme else ())))
    return {s: round(bench.metrics(s)["asr"], 5) for s in schemes}
