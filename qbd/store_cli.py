"""`qbd store`: fetch a model into the store, list it, verify it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from qbd.cli_options import add_model_options, job_from_args, report_model


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
