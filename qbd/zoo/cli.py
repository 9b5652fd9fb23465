"""`qbd zoo`: build, verify and list the pinned model zoo (qbd.zoo.pinned)."""

from __future__ import annotations

import argparse
import sys

from qbd.zoo.pinned import DEFAULT_DIR, ZOO_ENV, Zoo


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    zoo = subparsers.add_parser("zoo", help="the pinned model zoo (qbd/zoo/weights): build, verify, list")
    commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="COMMAND")
    b = commands.add_parser("build", help="train every zoo model and (re)write the zoo and its manifest",
                            description="Train the smoke tier's models (digits and synthetic; backdoored and clean;"
                            " evaluation seeds 0-9 and calibration seeds 100-104; blend, quant-conditioned and the attack"
                            " settings beyond the calibration attack: qbd.zoo.pinned.zoo_jobs) and write them,"
                            " with manifest.json, to DIR. Each model trains on one thread; -j runs several at once and"
                            " does not change the weights.")
    b.add_argument("--dir", default=None, help=f"zoo directory (default, in a checkout only: {DEFAULT_DIR})")
    b.add_argument("-j", "--jobs", type=int, default=1, help="models trained at once (default: 1)")
    b.add_argument("--cache-dir", default=None, help="model store to train into (else $QBD_CACHE_DIR, else the user cache)")
    b.add_argument("--missing", action="store_true", help="keep the models the zoo already pins; train only those it lacks")
    b.set_defaults(func=cmd_build)
    for name, helptext, func in (("verify", "re-hash every zoo file against the manifest", cmd_verify),
                                 ("list", "one line per zoo model: file, clean accuracy, ASR, CPU", cmd_list)):
        c = commands.add_parser(name, help=helptext)
        c.add_argument("--dir", default=None, help=f"zoo directory (default: ${ZOO_ENV}, else {DEFAULT_DIR})")
        c.set_defaults(func=func)
    return zoo


def _zoo(args: argparse.Namespace) -> Zoo:
    import os

    from qbd.errors import ConfigError

    root = args.dir or os.environ.get(ZOO_ENV) or str(DEFAULT_DIR)
    zoo = Zoo(root)
    if not zoo.models:
        raise ConfigError(f"no zoo at {root} (no manifest.json listing models); build one with `qbd zoo build`")
    return zoo


def cmd_build(args: argparse.Namespace) -> int:
    from qbd.errors import ConfigError
    from qbd.zoo.build import build

    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if args.dir is None:
        # an installed package's zoo is the one its findings were measured on: never rewrite it in place
        if not (DEFAULT_DIR.parents[2] / ".git").exists():
            raise ConfigError(f"qbd zoo build: name the directory to write with --dir; the default ({DEFAULT_DIR}) is the"
                              " installed package's pinned zoo, which the shipped findings describe")
        args.dir = str(DEFAULT_DIR)
    zoo = build(args.dir, cache_dir=args.cache_dir, workers=args.jobs, missing_only=args.missing, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"qbd zoo: {len(zoo.models)} models and {zoo.root / 'manifest.json'} written")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    zoo = _zoo(args)
    problems = zoo.verify()
    for line in problems:
        print(f"qbd zoo: {line}", file=sys.stderr)
    print(f"qbd zoo: {len(zoo.models)} models in {zoo.root}: " + ("all match the manifest" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def cmd_list(args: argparse.Namespace) -> int:
    zoo = _zoo(args)
    rows = sorted(zoo.models.values(), key=lambda r: r["file"])
    for r in rows:
        asr = "-" if r["asr"] is None else f"{r['asr']:.4f}"
        print(f"{r['file']}\tclean acc {r['clean_acc']:.4f}\tASR {asr}\t{r['cpu']}\ttorch {r['torch']}")
    return 0
