"""Command line: `qbd train`, `qbd run`, `qbd quant`, `qbd store` (qbd.fetch), `qbd list`.

Imports stay light at module level so `qbd --help` answers at once; each command imports torch
when it runs. Exit codes: 0 success, 1 a run that failed (gate, corrupt store, ...), 2 a usage
error (unknown name, bad value, missing data), printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from qbd import __version__
from qbd.config import (
    ATTACKS,
    CORNERS,
    DEFAULT_BLEND_ALPHA,
    DEFAULT_QC_SCHEME,
    QC_SCHEMES,
    TIERS,
    TRIGGER_PATTERNS,
    AttackSpec,
    DatasetSpec,
    Gates,
    ModelJob,
    ModelSpec,
)
from qbd.errors import ConfigError, QbdUserError
from qbd.registry import UnknownNameError, unknown_message

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


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


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return v


_seed_count = _int_at_least(1, "a number of seeds")


def _seeds(text: str) -> int | tuple[int, ...]:
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


def _workers(text: str) -> int | str:
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


def add_model_options(p: argparse.ArgumentParser, *, tier: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--dataset", default="synthetic", help="data set (default: synthetic; `qbd list` shows all)")
    g.add_argument("--model", default=None, help="architecture (default: tiny-cnn, resnet18-cifar for --tier paper)")
    if tier:
        g.add_argument("--tier", choices=TIERS, default="smoke", help="default settings tier (default: smoke)")
    g.add_argument("--seed", type=_positive_int, default=0, help="training seed (default: 0)")
    g.add_argument("--epochs", type=_positive_int, default=None, help="override the preset's epochs")
    g.add_argument("--device", default=None, help="where to train and run the defenses: auto (CUDA when present), cpu, cuda or"
                   " cuda:N (default: the tier's: cpu for smoke, auto for paper)")
    g.add_argument("--data-root", default=None, help="where CIFAR-10 / GTSRB live (else $QBD_DATA_ROOT)")
    g.add_argument("--cache-dir", default=None, help="model store: a directory or a URL (s3://bucket/prefix, file:///path) (else $QBD_CACHE_DIR, else the user cache)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.add_argument_group("attack")
    a.add_argument("--attack", choices=ATTACKS, default="badnet",
                   help="badnet (a patch), blend (a full-image pattern mixed in at --blend-alpha) or quant-conditioned (a"
                   " BadNet patch dormant in FP32 that wakes in --qc-scheme) (default: badnet)")
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
    attack = None if args.clean else _probe_from_args(args)
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
    from qbd.tiers import TIERS

    # `is None`, not falsiness: an empty --device= is a spelling to refuse, not "the tier's default"
    return devices.resolve(TIERS[getattr(args, "tier", "smoke")].device if args.device is None else args.device)


def cmd_train(args: argparse.Namespace) -> int:
    from qbd.data import load_dataset
    from qbd.remote_store import open_store
    from qbd.trained import get_trained

    t0 = time.perf_counter()
    job = job_from_args(args)
    data = load_dataset(job.dataset, args.data_root)
    # with --clean the BadNet options still name a trigger (the probe): check it all the same
    (job.attack or _probe_from_args(args)).check_fits(*data.image_size, data.num_classes)
    store = open_store(args.cache_dir)
    tm = get_trained(job, data, store, device=args.device, progress=not args.no_progress)
    m = tm.metrics
    out = {
        "key": tm.entry.key,
        "slug": job.slug(),
        "cache": tm.cache,
        "clean_acc": m["clean_acc"],
        "asr": m["asr"],
        "seconds": round(time.perf_counter() - t0, 3),
        "train_seconds": m.get("train_seconds"),
        "path": str(tm.entry.path),  # the store entry's directory, or the pinned zoo file
        "weights": str(tm.weights_file),
        "job": job.to_dict(),
        "metrics": m,
    }
    if args.json or (job.attack is not None and job.attack.scheme):  # it deploys the model through every scheme: not for free
        out["asr_by_scheme"] = asr_by_scheme(job, data, tm, getattr(args, "tier", "smoke"))
        out["asr_by_scheme_split"] = "evaluation split: the test split less the defender's clean holdout, as the matrix measures it"
    detail = (f"pinned in the zoo (sha256-verified), trained on {tm.provenance().get('trained_on')}; this command {out['seconds']} s"
              if tm.cache == "zoo" else
              f"trained in {m.get('train_seconds')} s on {m.get('device')}; this command {out['seconds']} s")
    return report_model(args, job, tm, out, detail)


def asr_by_scheme(job: ModelJob, data: Any, tm: Any, tier: str) -> dict[str, float] | None:
    """{scheme: ASR of the model deployed through it} for the tier's schemes (and a
    quant-conditioned attack's own), measured as the matrix measures it (qbd.evaluate.Bench, on its
    evaluation split); None for a clean model."""
    if job.attack is None:
        return None
    from qbd.evaluate import tier_bench
    from qbd.tiers import TIERS

    # as `qbd run --seed N` builds it: the tier's split, seeded with the model's seed
    bench = tier_bench(data, tm, job.attack, model_name=job.model.name, tier=tier, seed=job.train.seed)
    schemes = dict.fromkeys((*TIERS[tier].schemes, *((job.attack.scheme,) if job.attack.scheme else ())))
    return {s: round(bench.metrics(s)["asr"], 5) for s in schemes}


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


def cmd_list(args: argparse.Namespace) -> int:
    """Everything a run can name; `--json` for scripts."""
    from qbd.config import PROTOCOLS
    from qbd.data import DATASETS
    from qbd.defenses import available
    from qbd.models import MODELS
    from qbd.quant import SCHEMES
    from qbd.tiers import TIERS

    defenses = available()
    out = {
        "datasets": DATASETS.names(),
        "models": MODELS.names(),
        "schemes": SCHEMES.names(),
        "defenses": [{"name": a.name, "ref": a.ref, "origin": a.origin} for a in defenses],
        "protocols": list(PROTOCOLS),
        "attacks": list(ATTACKS),
        "tiers": {t.name: {"datasets": list(t.datasets), "model": t.model, "schemes": list(t.schemes), "device": t.device}
                  for t in TIERS.values()},
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    print("datasets: ", ", ".join(out["datasets"]))
    print("models:   ", ", ".join(out["models"]))
    print("schemes:  ", ", ".join(out["schemes"]))
    print("defenses: ", ", ".join(a.name if a.builtin else f"{a.name} ({a.origin})" for a in defenses))
    print("protocols:", ", ".join(out["protocols"]))
    print("attacks:  ", ", ".join(out["attacks"]))
    return EXIT_OK


def _csv(text: str | None, valid: list[str] | None, label: str) -> tuple[str, ...]:
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


def cmd_run(args: argparse.Namespace) -> int:
    from qbd.config import PROTOCOLS
    from qbd.data import DATASETS
    from qbd.defenses import BUILTIN, available
    from qbd.quant import SCHEMES
    from qbd.remote_store import open_store
    from qbd.runner import RunPlan, load_defense, run
    from qbd.tiers import TIERS

    tier = TIERS[args.tier]
    if isinstance(args.seeds, tuple) and args.seed != 0:
        raise UsageError(f"--seeds {','.join(map(str, args.seeds))} names the model seeds; drop --seed {args.seed}")
    seeds = args.seeds if isinstance(args.seeds, tuple) else tuple(range(args.seed, args.seed + args.seeds))
    n_seeds = len(seeds)
    if n_seeds > 1 and args.model_file is not None:
        raise UsageError(f"--seeds {n_seeds} trains {n_seeds} models per data set; --model-file is one model: drop one")
    if n_seeds > 1 and args.attack_seed is not None:
        raise UsageError(f"--attack-seed: with --seeds {n_seeds} model s is poisoned with attack seed s; drop --attack-seed")
    # `is not None`: an empty --quant= is a mistake to report, not a request for the default
    datasets = (_csv(args.dataset, DATASETS.names(), "dataset") if args.dataset is not None
                else ("synthetic",) if args.tier == "smoke" else tier.datasets)
    schemes = _csv(args.quant, SCHEMES.names(), "quant") if args.quant is not None else tier.schemes
    if args.quant is None and args.attack == "quant-conditioned" and not args.clean:
        # the deployment its backdoor wakes in is the cell that matters; it is not always a tier scheme
        schemes = tuple(dict.fromkeys((*schemes, _probe_from_args(args).scheme)))
    names = [a.name for a in available()]  # built-ins and the qbd.defenses entry points, as in the pytest matrix
    defenses = _csv(args.defense, names, "defense") if args.defense is not None else tuple(names)
    protocols = _csv(args.protocol, list(PROTOCOLS), "protocol") if args.protocol is not None else tuple(PROTOCOLS)
    usable = []
    for ref in defenses:  # fail on a bad --defense before any training
        try:
            for protocol in protocols:
                load_defense(ref, protocol, tier.name)
        except ConfigError as e:
            if args.defense is not None or ref in BUILTIN:  # the user named it: their error to fix
                raise
            # an installed third-party defense the user did not ask for: say so, run the others
            print(f"qbd: skipped {e}", file=sys.stderr)
            continue
        usable.append(ref)
    defenses = tuple(usable)
    if args.engine is not None:
        from qbd.quant.engine import supported_engines

        if args.engine not in supported_engines():
            raise ConfigError(f"quantized engine {args.engine!r} is not available in this torch build; valid: {', '.join(supported_engines())}")
        takers = [s for s in schemes if SCHEMES.get(s).engines]
        if not takers:
            raise ConfigError(f"--engine {args.engine}: none of the selected schemes ({', '.join(schemes)}) takes a quantized engine")
        for s in takers:  # every scheme that takes engines must take this one (the others ignore it)
            if args.engine not in SCHEMES.get(s).engines:
                raise ConfigError(f"--engine {args.engine}: scheme {s!r} does not run on it; valid: {', '.join(SCHEMES.get(s).engines)}")
    args.device = device_from_args(args)  # before any training: a missing GPU fails here
    jobs = []
    for ds in datasets:
        args_ds = argparse.Namespace(**{**vars(args), "dataset": ds, "model": args.model or tier.model})
        job = job_from_args(args_ds)
        if n_seeds == 1:
            jobs.append(job)
            continue
        from qbd.presets import seeded_job

        # model number s: training seed s and attack seed s (independently trained and poisoned)
        jobs += [seeded_job(ds, job.model.name, s, job.attack, precision=job.train.precision, epochs=args.epochs)
                 for s in seeds]
    model_file = _model_file_from_args(args, datasets)
    plan = RunPlan(
        jobs=tuple(jobs), tier=tier, schemes=schemes, defenses=defenses, protocols=protocols,
        controls=not args.no_controls, gradient_path=args.gradient_path, engine=args.engine,
        device=args.device, multi_seed=n_seeds > 1, probe=jobs[0].attack or _probe_from_args(args), model_file=model_file,
        defense_timeout=args.defense_timeout,
    )
    gates = Gates(args.min_clean_acc, args.min_asr)
    from qbd import expectations

    # read before the run, so a bad table fails in a second, not after the matrix
    table = expectations.load_for(tier.name, args.expectations or None)
    if table.tier != tier.name:
        raise ConfigError(f"--expectations {table.path}: a table for the {table.tier!r} tier; this run is the {tier.name!r} tier")
    from qbd.runner import PartialRun

    stopped: PartialRun | None = None
    try:
        results = run(plan, data_root=args.data_root, store=open_store(args.cache_dir), progress=not args.no_progress,
                      gates=gates, workers=args.jobs)
    except PartialRun as e:  # report the cells that finished, then fail
        if not e.results:
            raise e.cause from None
        stopped, results = e, e.results
    from qbd import rates

    # over several seeds a row with declared rate bounds or counts is judged by them (qbd.expectations)
    judgements, row_failures, rated = table.judge_run(results, n_seeds)
    for r, j in zip(results, judgements, strict=True):
        r["judgement"] = j.to_dict()
    rows = rates.rows(results)
    from qbd.run_metadata import run_facts, run_metadata

    # the same "run" in --json, results.json and report.md: the Results' facts (model, attack, seeds), then ours
    run_info = run_metadata(**{**run_facts(results), "tier": tier.name, "device": plan.device,
                               "expectations": str(table.path) if table.path else None, "gate": args.expectations is not None})
    if args.json:
        from qbd import results as results_io

        print(results_io.dump(results, rows, run=run_info))
    else:
        from qbd.report import terminal

        print(terminal(results))
    if args.report:
        from qbd.report import write_report

        paths = write_report(results, args.report, title=f"qbd {args.tier} matrix", run=run_info)
        print("report: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    rc = _gate(results, args.expectations is not None, table, row_failures=row_failures, rated=rated,
               multi_seed=n_seeds > 1)
    if stopped is not None:
        print(f"qbd: {stopped} (the {len(results)} finished cells are reported above)", file=sys.stderr)
        return EXIT_FAIL
    return rc


def _gate(results: list[dict[str, Any]], gating: bool, table: Any, *, row_failures: Sequence[str] = (), rated: int = 0,
          multi_seed: bool = False) -> int:
    """With --expectations: print every cell (and every deployed model's CA / ASR bound, the
    Table 2 view, and every row outside its declared rate bounds) that fails its expectation,
    and exit 1 on any."""
    from qbd.tables import count_line, first_seed

    def seed_note(r: dict[str, Any]) -> str:
        return f" (seed {r.get('seed', 0)})" if multi_seed else ""

    failing = [f"{r['cell']}{seed_note(r)}: {r['judgement']['why']}" for r in results if r["judgement"]["judgement"] == "FAIL"]
    # the first seed's models, as Table 2 shows them (and as the plugin's test_attack checks them):
    # the bounds were measured on one model per data set
    _, first = first_seed([r for r in results if r.get("attack") is not None])
    deployed = {(r["dataset"], r["quant"]["scheme"]): r for r in first}
    for (ds, scheme), r in sorted(deployed.items()):
        key = f"{ds}/{scheme}"
        failing += [f"{key}{seed_note(r)} (deployed model): {m}"
                    for m in table.check_attack(key, r["clean_acc"], r["asr"], own=table.measured_on(r),
                                                          attack=r.get("attack"), engine=r["quant"]["audit"].get("engine"))]
    failing += row_failures
    source = str(table.path) if table.path else "the truth alone (no table shipped for this tier)"
    print(f"qbd: outcome: {count_line(results) or 'no cells ran'} (expectations: {source})", file=sys.stderr)
    if rated:
        print(f"qbd: rows judged over their models: {rated}, failing: {len(row_failures)}", file=sys.stderr)
    if not gating:
        return EXIT_OK
    for line in failing:
        print(f"qbd: FAIL {line}", file=sys.stderr)
    return EXIT_FAIL if failing else EXIT_OK


def _model_file_from_args(args: argparse.Namespace, datasets: tuple[str, ...]) -> Any:
    """--model-file PATH --sha256 HEX -> qbd.fetch.Source (None without --model-file)."""
    if args.model_file is None:
        if args.sha256 is not None:
            raise UsageError("--sha256 pins a --model-file; give both")
        return None
    if args.sha256 is None:
        raise UsageError("--model-file needs --sha256 HEX (the file's sha256): untrusted weights are only used pinned")
    if len(datasets) != 1:
        raise UsageError(f"--model-file is a model for one data set; got --dataset {','.join(datasets)}")
    from qbd.fetch import Source

    return Source(args.model_file, args.sha256)


def _probe_from_args(args: argparse.Namespace) -> AttackSpec:
    """The attack the options describe (with --clean: the trigger a clean model is probed with)."""
    from qbd.presets import ATTACK_PRESETS

    preset = ATTACK_PRESETS[args.attack]
    pattern = args.trigger_pattern or preset.trigger_pattern
    target = preset.target if args.target is None else args.target
    return AttackSpec(name=args.attack, target=target, trigger_pattern=pattern, trigger_size=args.trigger_size,
                      trigger_position=args.trigger_position, poison_rate=args.poison_rate,
                      seed=args.seed if args.attack_seed is None else args.attack_seed,
                      alpha=args.blend_alpha, scheme=args.qc_scheme)


class _Parser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; qbd's errors are one line (`qbd: error:
    ...`, exit 2) so CI logs and scripts can read them. Sub-parsers inherit the class."""

    def error(self, message: str) -> None:  # type: ignore[override]
        one_line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)  # no control character splits it
        self.exit(EXIT_USAGE, f"qbd: error: {one_line} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qbd",
        description="Does a backdoor defense still work on the model as it is deployed, i.e. quantized?",
    )
    p.add_argument("--version", action="version", version=f"qbd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train (or fetch from the store) a backdoored or clean model")
    add_model_options(t)
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser(
        "run", help="run the (dataset, quantization, defense) matrix (default: the smoke matrix on the embedded data set)"
    )
    add_model_options(r)
    r.set_defaults(dataset=None)
    sel = r.add_argument_group("selection")
    sel.add_argument("--quant", default=None, help="schemes, comma-separated, or all (default: the tier's four)")
    sel.add_argument("--defense", default=None, help="defenses (names or module:Class), comma-separated, or all (default: all: the five built-ins and every installed one)")
    sel.add_argument("--protocol", default=None, help="canonical, paper, or both comma-separated (default: both)")
    sel.add_argument("--gradient-path", choices=("deployed", "surrogate"), default=None,
                     help="what gradient-based defenses backpropagate through (default: deployed under paper, surrogate under canonical)")
    sel.add_argument("--engine", default=None, help="quantized engine for int8 schemes (x86, qnnpack, ...)")
    sel.add_argument("--no-controls", action="store_true", help="skip the negative-control cells on a clean model")
    sel.add_argument("--defense-timeout", type=_positive_float, default=None, metavar="SECONDS",
                     help="a cell whose defense runs longer is invalid (timed out); default: no limit")
    mf = r.add_argument_group("untrusted model (instead of training the backdoored model)")
    mf.add_argument("--model-file", metavar="PATH", default=None,
                    help="weights for --model on --dataset: .safetensors, or a plain state dict in .pt/.pth (loaded weights_only)")
    mf.add_argument("--sha256", metavar="HEX", default=None, help="the model file's sha256 (required with --model-file)")
    r.add_argument("--expectations", metavar="FILE", nargs="?", const="", default=None,
                   help="gate: compare every cell with its expectation (FILE, else the table qbd ships for the tier), print the"
                        " mismatches and exit 1 on any; without it the outcomes are shown but never change the exit code")
    sel.add_argument("--seeds", type=_seeds, default=1, metavar="N|S,S,...",
                     help="run N models per data set, seeds --seed .. --seed+N-1 (training and attack seed s), or the listed"
                          " model seeds, each with its clean control on every scheme, and report each row's detection and"
                          " false-alarm rates (default: 1)")
    r.add_argument("-j", "--jobs", type=_workers, default="auto", metavar="N",
                   help="cells in parallel on N worker processes of one thread each; auto: one per usable core (default)."
                        " Verdicts do not depend on N")
    r.add_argument("--json", action="store_true", help='print {"schema": 1, "results": [Result, ...], "rows": [row, ...], "effects": [effect, ...], "run": {...}}')
    r.add_argument("--report", metavar="DIR", default=None, help="write results.json, report.md and heatmap.png to DIR")
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("list", help="list data sets, models, schemes, defenses (built-in and installed), protocols, attacks")
    ls.add_argument("--json", action="store_true", help="one JSON object: names, each defense's origin, each tier's settings")
    ls.set_defaults(func=cmd_list)

    _add_optional_parsers(sub)
    return p


# -- `qbd store` ------------------------------------------------------------------------------
def add_store_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`qbd store fetch | list | verify` (the loader of untrusted weights is qbd.fetch, below the runner)."""
    store = subparsers.add_parser("store", help="the model store: fetch untrusted weights, list, verify")
    commands = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    f = commands.add_parser(
        "fetch", help="store weights from a path or URL, pinned by sha256 (safetensors or a plain .pt state dict)",
        description="Verify a weights file against its sha256, check it fits the architecture, measure its clean"
                    " accuracy and ASR, and store it under its own 'fetched' key. Nothing is stored on failure.",
    )
    f.add_argument("source", metavar="URL_OR_PATH", help="local path, file:// or http(s):// URL")
    f.add_argument("--sha256", required=True, help="the file's sha256 (64 hex digits)")
    f.add_argument("--format", choices=("safetensors", "pt"), default=None, help="default: from the file name's suffix")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    add_model_options(f)
    f.set_defaults(func=cmd_store_fetch)

    ls = commands.add_parser("list", help="list the stored models")
    ls.add_argument("--cache-dir", default=None, help="model store: a directory or a URL (s3://bucket/prefix, file:///path) (else $QBD_CACHE_DIR, else the user cache)")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=cmd_store_list)

    v = commands.add_parser("verify", help="re-hash and parse every entry; exit 1 if any is corrupt")
    v.add_argument("--cache-dir", default=None, help="model store: a directory or a URL (s3://bucket/prefix, file:///path) (else $QBD_CACHE_DIR, else the user cache)")
    v.add_argument("--quarantine", action="store_true", help="move corrupt entries to quarantine/")
    v.set_defaults(func=cmd_store_verify)
    return store


def cmd_store_fetch(args: argparse.Namespace) -> int:
    from qbd.data import load_dataset
    from qbd.fetch import Source, get_fetched
    from qbd.remote_store import open_store

    source = Source(args.source, args.sha256, args.format)
    job = job_from_args(args)
    data = load_dataset(job.dataset, args.data_root)
    if job.attack is not None:
        job.attack.check_fits(*data.image_size, data.num_classes)
    tm = get_fetched(source, job, data, open_store(args.cache_dir), device=args.device)
    m = tm.metrics
    out = {"key": tm.entry.key, "slug": job.slug(), "cache": tm.cache, "clean_acc": m["clean_acc"], "asr": m["asr"],
           "path": str(tm.entry.path), "fetched": tm.entry.meta["fetched"], "job": tm.entry.meta["job"]}
    return report_model(args, job, tm, out, prefix="fetched ")


def cmd_store_list(args: argparse.Namespace) -> int:
    from qbd.remote_store import open_store
    from qbd.store import CorruptEntryError

    store = open_store(args.cache_dir)
    rows: list[dict[str, Any]] = []
    stored = store.keys()
    for key in stored:
        try:
            meta = store.read_meta(key)
        except CorruptEntryError as e:
            rows.append({"key": key, "problem": str(e)})
            continue
        rows.append({"key": key, "slug": meta.get("slug"), "kind": "fetched" if "fetched" in meta else "trained",
                     "clean_acc": meta.get("metrics", {}).get("clean_acc"), "asr": meta.get("metrics", {}).get("asr"),
                     "created": meta.get("created"), "fetched": meta.get("fetched")})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{store.root}: {len(rows)} model(s)")
    for r in rows:
        if "problem" in r:
            print(f"  {r['key'][:12]}  CORRUPT  {r['problem']}")
            continue
        asr = "-" if r["asr"] is None else f"{r['asr']:.3f}"
        ca = "-" if r["clean_acc"] is None else f"{r['clean_acc']:.3f}"
        src = f"  from {r['fetched']['source']}" if r["fetched"] else ""
        print(f"  {r['key'][:12]}  {r['kind']:<7}  {r['slug']}  CA {ca}  ASR {asr}  {r['created']}{src}")
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    from qbd.remote_store import open_store

    store = open_store(args.cache_dir)
    report = store.verify(quarantine=args.quarantine)
    bad = {k: v for k, v in report.items() if v is not None}
    for name, problem in bad.items():
        print(f"{name}: {'quarantined: ' if args.quarantine else ''}{problem}")
    stale = store.stale_tmp()
    print(f"{store.root}: {len(report) - len(bad)} intact, {len(bad)} corrupt"
          + (f", {len(stale)} unfinished write(s) of writers that died (harmless)" if stale else ""))
    return 1 if bad else 0


def _add_optional_parsers(sub: Any) -> None:
    """Sub-commands that live beside their package (e.g. qbd.quant.cli)."""
    import importlib

    add_store_parser(sub)
    for modname in ("qbd.quant.cli", "qbd.zoo.cli"):
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            continue
        mod.add_parser(sub)


USER_ERRORS: tuple[type[BaseException], ...] = (QbdUserError, UnknownNameError, UsageError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(args.func, args)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return int(func(args) or 0)
    except USER_ERRORS as e:
        print(f"qbd: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qbd: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from qbd.store import StoreError
        from qbd.train import GateError

        if isinstance(e, (GateError, StoreError)):
            print(f"qbd: {e}", file=sys.stderr)
            return EXIT_FAIL
        raise


if __name__ == "__main__":
    sys.exit(main())
