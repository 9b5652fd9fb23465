"""Command line: `qbd train`, `qbd run` (qbd.run_cli), `qbd quant` (qbd.quant_cli), `qbd store`
(qbd.store_cli, over qbd.fetch), `qbd zoo` (qbd.zoo.cli), `qbd list`; the options they share are
qbd.cli_options'.

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
from qbd.cli_options import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_model_options,
    asr_by_scheme,
    job_from_args,
    positive_float,
    probe_from_args,
    report_model,
    seeds_arg,
    workers_arg,
)
from qbd.errors import QbdUserError
from qbd.registry import UnknownNameError
from qbd.run_cli import cmd_run
from qbd.store_cli import add_store_parser


def cmd_train(args: argparse.Namespace) -> int:
    from qbd.data import load_dataset
    from qbd.remote_store import open_store
    from qbd.trained import get_trained

    t0 = time.perf_counter()
    job = job_from_args(args)
    data = load_dataset(job.dataset, args.data_root)
    # with --clean the BadNet options still name a trigger (the probe): check it all the same
    (job.attack or probe_from_args(args)).check_fits(*data.image_size, data.num_classes)
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


def cmd_list(args: argparse.Namespace) -> int:
    """Everything a run can name; `--json` for scripts."""
    from qbd.attacks import available as available_attacks
    from qbd.config import PROTOCOLS
    from qbd.data import DATASETS
    from qbd.defenses import available
    from qbd.models import MODELS
    from qbd.quant import available as available_schemes
    from qbd.tiers import TIERS

    defenses = available()
    out = {
        "datasets": DATASETS.names(),
        "models": MODELS.names(),
        "schemes": [a.name for a in available_schemes()],
        "scheme_origins": {a.name: a.origin for a in available_schemes() if not a.builtin},
        "defenses": [{"name": a.name, "ref": a.ref, "origin": a.origin} for a in defenses],
        "protocols": list(PROTOCOLS),
        "attacks": [a.name for a in available_attacks()],
        "attack_origins": {a.name: a.origin for a in available_attacks() if not a.builtin},
        "tiers": {t.name: {"datasets": list(t.datasets), "model": t.model, "schemes": list(t.schemes), "device": t.device}
                  for t in TIERS.values()},
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    print("datasets: ", ", ".join(out["datasets"]))
    print("models:   ", ", ".join(out["models"]))
    print("schemes:  ", ", ".join(f"{n} ({out['scheme_origins'][n]})" if n in out["scheme_origins"] else n for n in out["schemes"]))
    print("defenses: ", ", ".join(a.name if a.builtin else f"{a.name} ({a.origin})" for a in defenses))
    print("protocols:", ", ".join(out["protocols"]))
    print("attacks:  ", ", ".join(f"{n} ({out['attack_origins'][n]})" if n in out["attack_origins"] else n for n in out["attacks"]))
    return EXIT_OK


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
    sel.add_argument("--defense-timeout", type=positive_float, default=None, metavar="SECONDS",
                     help="a cell whose defense runs longer is invalid (timed out); default: no limit")
    mf = r.add_argument_group("untrusted model (instead of training the backdoored model)")
    mf.add_argument("--model-file", metavar="PATH", default=None,
                    help="weights for --model on --dataset: .safetensors, or a plain state dict in .pt/.pth (loaded weights_only)")
    mf.add_argument("--sha256", metavar="HEX", default=None, help="the model file's sha256 (required with --model-file)")
    r.add_argument("--expectations", metavar="FILE", nargs="?", const="", default=None,
                   help="your own expectations table, on top of the one qbd ships for the tier (its findings keep"
                        " applying; `[meta] extends = false` in FILE makes it stand alone); with no FILE, the shipped"
                        " table alone (the default); whatever fails is printed as FAIL and the run exits 1")
    r.add_argument("--no-gate", action="store_true",
                   help="show the outcomes and the FAIL lines, but exit 0 on them (exploring, not gating)")
    sel.add_argument("--seeds", type=seeds_arg, default=1, metavar="N|S,S,...",
                     help="run N models per data set, seeds --seed .. --seed+N-1 (training and attack seed s), or the listed"
                          " model seeds, each with its clean control on every scheme, and report each row's detection and"
                          " false-alarm rates (default: 1)")
    r.add_argument("-j", "--jobs", type=workers_arg, default="auto", metavar="N",
                   help="cells in parallel on N worker processes of one thread each; auto: one per usable core (default)."
                        " Verdicts do not depend on N")
    memo = r.add_argument_group("reusing Results (a cell computed once is not computed again in the same run; docs/scaling.md)"
                                ).add_mutually_exclusive_group()
    memo.add_argument("--reuse-results", action="store_true",
                      help="also reuse Results that earlier runs filed (beside a local store, else in the user cache: a CI"
                           " cache): same data, model, scheme, defense and its parameters and code (yours included),"
                           " protocol, seed, device, threads, qbd code and library versions")
    memo.add_argument("--fresh", action="store_true", help="compute every cell, reusing nothing (not even within this run);"
                      " the Results are still filed")
    r.add_argument("--json", action="store_true", help='print {"schema": 1, "results": [Result, ...], "rows": [row, ...], "effects": [effect, ...], "run": {...}}')
    r.add_argument("--report", metavar="DIR", default=None, help="write results.json, report.md and heatmap.png to DIR")
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("list", help="list data sets, models, schemes, defenses (built-in and installed), protocols, attacks")
    ls.add_argument("--json", action="store_true", help="one JSON object: names, each defense's origin, each tier's settings")
    ls.set_defaults(func=cmd_list)

    _add_optional_parsers(sub)
    return p


def _add_optional_parsers(sub: Any) -> None:
    """Sub-commands in modules of their own (qbd.quant_cli, qbd.zoo.cli), added when importable."""
    import importlib

    add_store_parser(sub)
    for modname in ("qbd.quant_cli", "qbd.zoo.cli"):
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
