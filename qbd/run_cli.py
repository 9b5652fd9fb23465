"""`qbd run`: plan the matrix from the options, run it (qbd.runner), print and write its report,
and gate it against the expectations table."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qbd.attacks import conditioned
from qbd.cli_options import EXIT_FAIL, EXIT_OK, UsageError, csv_names, device_from_args, job_from_args, probe_from_args
from qbd.config import (
    Gates,
)
from qbd.errors import ConfigError


def cmd_run(args: argparse.Namespace) -> int:
    from qbd.config import PROTOCOLS
    from qbd.data import DATASETS
    from qbd.defenses import BUILTIN, available
    from qbd.quant import get_scheme, scheme_names
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
    datasets = (csv_names(args.dataset, DATASETS.names(), "dataset") if args.dataset is not None
                else ("synthetic",) if args.tier == "smoke" else tier.datasets)
    schemes = csv_names(args.quant, scheme_names(), "quant") if args.quant is not None else tier.schemes
    if args.quant is None and conditioned(args.attack) and not args.clean:
        # the deployment its backdoor wakes in is the cell that matters; it is not always a tier scheme
        schemes = tuple(dict.fromkeys((*schemes, probe_from_args(args).scheme)))
    names = [a.name for a in available()]  # built-ins and the qbd.defenses entry points, as in the pytest matrix
    defenses = csv_names(args.defense, names, "defense") if args.defense is not None else tuple(names)
    protocols = csv_names(args.protocol, list(PROTOCOLS), "protocol") if args.protocol is not None else tuple(PROTOCOLS)
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
        takers = [s for s in schemes if get_scheme(s).engines]
        if not takers:
            raise ConfigError(f"--engine {args.engine}: none of the selected schemes ({', '.join(schemes)}) takes a quantized engine")
        for s in takers:  # every scheme that takes engines must take this one (the others ignore it)
            if args.engine not in get_scheme(s).engines:
                raise ConfigError(f"--engine {args.engine}: scheme {s!r} does not run on it; valid: {', '.join(get_scheme(s).engines)}")
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
        device=args.device, multi_seed=n_seeds > 1, probe=jobs[0].attack or probe_from_args(args), model_file=model_file,
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
        from qbd.memo import for_store

        store = open_store(args.cache_dir)
        results = run(plan, data_root=args.data_root, store=store, progress=not args.no_progress, gates=gates, workers=args.jobs,
                      memo=for_store(store, reuse=args.reuse_results, fresh=args.fresh))
    except PartialRun as e:  # report the cells that finished, then fail
        if not e.results:
            raise e.cause from None
        stopped, results = e, e.results
    from qbd import rates
    from qbd.gate import judge_run

    # over several seeds a row with declared rate bounds or counts is judged by them (qbd.expectations)
    gate = judge_run(table, results, n_seeds)
    for r, j in zip(results, gate.judgements, strict=True):
        r["judgement"] = j.to_dict()
    rows = rates.rows(results)
    from qbd.run_metadata import run_facts, run_metadata

    # the same "run" in --json, results.json and report.md: the Results' facts (model, attack, seeds), then ours
    run_info = run_metadata(**{**run_facts(results), "tier": tier.name, "device": plan.device,
                               "expectations": table.source if table.path else None, "gate": not args.no_gate})
    if args.json:
        from qbd import results as results_io

        print(results_io.dump(results, rows, run=run_info))
    else:
        from qbd.report import terminal

        print(terminal(results))
    if args.report:
        from qbd.report import write_report

        paths = write_report(results, args.report, title=f"qbd {args.tier} matrix", run=run_info, failing_rows=gate.failing_rows,
                             failing=gate.failing)
        print("report: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    rc = _gate(results, gate, not args.no_gate, table)
    if stopped is not None:
        print(f"qbd: {stopped} (the {len(results)} finished cells are reported above)", file=sys.stderr)
        return EXIT_FAIL
    return rc


def _gate(results: list[dict[str, Any]], gate: Any, gating: bool, table: Any) -> int:
    """Say what the run measured, print everything that fails its expectations (qbd.gate) and exit
    1 on any, as pytest does; with --no-gate the same lines, exit 0."""
    from qbd.tables import count_line

    print(f"qbd: outcome: {count_line(results) or 'no cells ran'} (expectations: {table.source})", file=sys.stderr)
    if gate.rated:
        print(f"qbd: rows judged over their models: {gate.rated}, failing: {len(gate.rows)}", file=sys.stderr)
    for line in gate.failing:
        print(f"qbd: FAIL {line}", file=sys.stderr)
    if gate.failing and not gating:
        print(f"qbd: {len(gate.failing)} failing, exit 0 all the same (--no-gate)", file=sys.stderr)
    return EXIT_FAIL if gate.failing and gating else EXIT_OK


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
