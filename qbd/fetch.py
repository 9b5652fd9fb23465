"""Untrusted model weights: fetch them with a pinned sha256, check they fit the architecture,
and keep them in the store beside the trained models. Also the `qbd store` command.

    qbd store fetch URL_OR_PATH --sha256 HEX [--dataset digits --model tiny-cnn --target 0 ...]
    qbd run --model-file PATH --sha256 HEX [--dataset digits ...]   (uses it instead of training)
    qbd store list [--json]
    qbd store verify [--quarantine]

Trust boundary: the bytes are read once into memory, hashed, and compared with the pinned
sha256 before anything parses them. Only two formats are parsed: safetensors (tensors and a
JSON header, no code) and a plain state dict through torch.load(weights_only=True), whose
unpickler refuses every global outside torch's tensor allowlist; nothing else is unpickled.
The state dict must then match the architecture exactly (same keys, same shapes, finite floats).
Any failure raises FetchError (exit status 2) before the store is touched.

Store key: a fetched model never shares a key with a trained one (it would pass off foreign
weights as the job's training). Its key is the sha256 of {"fetched": sha256 of the file, the
data set, model and attack specs, the data's fingerprint}; the training spec is not in it.
The entry's meta.json has "fetched": {"source", "sha256", "format", "bytes"}. A corrupt fetched
entry is quarantined and refused, never recreated behind the user's back: fetch it again.

Torch is imported only when a command runs (this module is imported to build the CLI parser).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbd.config import ModelJob, canonical_json, sha256_text, to_dict
from qbd.errors import QbdUserError

if TYPE_CHECKING:
    import torch

    from qbd.data.base import DataSplit
    from qbd.remote_store import UrlStore
    from qbd.store import Store
    from qbd.zoo import TrainedModel

FORMATS = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}
MAX_BYTES = 4 << 30  # refuse larger downloads before they exhaust memory (ResNet-18: 45 MB)
URL_TIMEOUT_S = 60.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
REFETCH_HINT = "fetched weights are never recreated automatically: fetch them again with their pinned --sha256"


class FetchError(QbdUserError):
    """Weights that cannot be used: unreachable, wrong sha256, unsafe or malformed, or not this
    architecture. Nothing was stored."""


@dataclass(frozen=True)
class Source:
    location: str  # a local path, file:// or http(s):// URL, as the user gave it
    sha256: str  # pinned digest of the file's bytes (64 lowercase hex digits)
    format: str | None = None  # "safetensors" or "pt"; None: from the file name's suffix

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", check_sha256(self.sha256))
        if self.format is not None and self.format not in ("safetensors", "pt"):
            raise FetchError(f"unknown weights format {self.format!r}; valid: pt, safetensors")

    def recorded(self) -> str:
        """What meta.json records: an absolute path for a local file, else display()."""
        if "://" in self.location:
            return self.display()
        return str(Path(self.location).expanduser().resolve())

    def display(self) -> str:
        """The location without any user:password in a URL (it goes into meta.json and logs)."""
        parts = urllib.parse.urlsplit(self.location)
        if "@" in parts.netloc:
            return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
        return self.location


def check_sha256(text: str) -> str:
    digest = text.strip().lower()
    if not _HEX64.match(digest):
        raise FetchError(f"--sha256 must be 64 hex digits (the file's sha256), got {text!r}")
    return digest


def weights_format(source: Source) -> str:
    if source.format is not None:
        return source.format
    path = urllib.parse.urlsplit(source.location).path if "://" in source.location else source.location
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise FetchError(
            f"{source.display()}: only .safetensors, or a plain state dict in .pt/.pth, is accepted;"
            " name the format with --format if the name has no such suffix"
        )
    return fmt


def read_source(source: Source, max_bytes: int = MAX_BYTES) -> bytes:
    """The file's bytes, from a local path, file:// or http(s):// URL, at most `max_bytes`."""
    loc = source.location
    if "://" not in loc:
        return _read_local(Path(loc).expanduser(), loc, max_bytes)
    parts = urllib.parse.urlsplit(loc)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise FetchError(f"{loc}: file:// URLs must name a local file (file:///path)")
        return _read_local(Path(urllib.request.url2pathname(parts.path)), loc, max_bytes)
    if scheme not in ("http", "https"):
        raise FetchError(f"{source.display()}: unsupported URL scheme {scheme!r}; use a path, file://, http:// or https://")
    try:
        with urllib.request.urlopen(loc, timeout=URL_TIMEOUT_S) as resp:  # scheme checked above
            return _read_capped(resp, source.display(), max_bytes)
    except (urllib.error.URLError, OSError, ValueError) as e:  # HTTPError, DNS, refused, timeout
        reason = getattr(e, "reason", None) or e
        raise FetchError(f"cannot fetch {source.display()}: {reason}") from None


def _read_local(path: Path, shown: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return _read_capped(f, shown, max_bytes)
    except FileNotFoundError:
        raise FetchError(f"{shown}: no such file") from None
    except OSError as e:
        raise FetchError(f"cannot read {shown}: {e.strerror or e}") from None


def _read_capped(f: Any, shown: str, max_bytes: int) -> bytes:
    buf = bytearray()
    while chunk := f.read(1 << 20):
        buf += chunk
        if len(buf) > max_bytes:
            raise FetchError(f"{shown}: larger than {max_bytes} bytes; refusing it")
    return bytes(buf)


def parse_weights(raw: bytes, fmt: str, shown: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from verified bytes, without ever running code from them."""
    import torch

    try:
        if fmt == "safetensors":
            from safetensors.torch import load

            obj: Any = load(raw)
        else:
            # weights_only: torch's restricted unpickler; an explicit True is not overridden
            # by $TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD. A bare pickle (not torch.save's format) makes
            # it warn about the protocol before refusing; that one warning would break the
            # one-line error. Nothing else is silenced.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected pickle protocol \d+ in the checkpoint", category=UserWarning)
                obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; quote only the line naming the culprit
        lines = [ln.strip() for ln in str(e).splitlines()]
        detail = next((ln for ln in lines if "nsupported" in ln), "it needs more than tensors and containers")
        raise FetchError(f"{shown}: refused: not a plain state dict, torch.load(weights_only=True) rejects it ({detail})") from None
    except Exception as e:  # any parse failure is the file's fault; reported, never used
        first = (str(e).strip().splitlines() or [""])[0][:200]
        label = "safetensors" if fmt == "safetensors" else "torch .pt"
        raise FetchError(f"{shown}: not a readable {label} weights file ({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise FetchError(f"{shown}: expected a flat state dict {{name: tensor}}, got {type(obj).__name__}")
    return dict(obj)


def check_fits(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Strict: the architecture's exact keys and shapes, dense tensors, finite floats."""
    import torch

    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    wrong, bad = [], []
    for k in sorted(expected.keys() & state.keys()):
        got, want = state[k], expected[k]
        if got.layout != torch.strided or got.shape != want.shape or got.is_floating_point() != want.is_floating_point():
            wrong.append(f"{k} {list(got.shape)} {str(got.dtype).removeprefix('torch.')} (expected {list(want.shape)}"
                         f" {str(want.dtype).removeprefix('torch.')})")
        elif got.is_floating_point() and not bool(torch.isfinite(got).all()):
            bad.append(k)
    problems = [f"{label}: {_few(names)}" for label, names in
                (("missing keys", missing), ("unexpected keys", extra), ("wrong shape or type", wrong),
                 ("non-finite values", bad)) if names]
    if problems:
        raise FetchError(f"{what}: " + "; ".join(problems))


def _few(names: Iterable[str], n: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def fetched_key(job: ModelJob, sha256: str, data_fingerprint: str) -> str:
    doc = {"fetched": sha256, "dataset": to_dict(job.dataset), "model": to_dict(job.model),
           "attack": to_dict(job.attack), "data": data_fingerprint}
    return sha256_text(canonical_json(doc))


def fetched_job_dict(job: ModelJob) -> dict[str, Any]:
    return {**job.to_dict(), "train": None}  # not trained by qbd: its training spec says nothing


def get_fetched(
    source: Source,
    job: ModelJob,
    data: DataSplit,
    store: Store | UrlStore,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> TrainedModel:
    """Verify, parse and check `source` for `job`'s architecture on `data`, then return it from
    the store (storing it and its measured clean accuracy / ASR the first time)."""
    from qbd.models import build_model
    from qbd.store import CorruptEntryError
    from qbd.zoo import TrainedModel, load_weights

    fmt = weights_format(source)
    raw = read_source(source)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != source.sha256:
        raise FetchError(f"{source.display()}: sha256 is {digest}, expected {source.sha256}; refusing it")
    state = parse_weights(raw, fmt, source.display())
    model = build_model(job.model.name, data.num_classes, data.mean, data.std)
    what = f"{source.display()} does not fit {job.model.name} on {job.dataset.name} ({data.num_classes} classes)"
    check_fits(state, model.state_dict(), what)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # check_fits should have caught it; keep the error one line anyway
        raise FetchError(f"{what}: {' '.join(str(e).split())[:300]}") from None
    fingerprint = data.fingerprint()

    def create() -> tuple[dict[str, Any], dict[str, Any]]:
        from qbd.train import evaluate, resolve_device

        metrics = evaluate(model, job, data, resolve_device(device))
        model.cpu()
        meta = {
            "job": fetched_job_dict(job),
            "slug": job.slug(),
            "metrics": {**metrics, "device": device},
            "data_sha256": fingerprint,
            "fetched": {"source": source.recorded(), "sha256": digest, "format": fmt, "bytes": len(raw)},
        }
        return model.state_dict(), meta  # the model's own dtypes, not the file's

    entry = store.get_or_create(fetched_key(job, digest, fingerprint), create, describe=f"fetched {job.slug()}",
                                log=log, refuse_corrupt=REFETCH_HINT)
    if entry.meta.get("fetched", {}).get("sha256") != digest:
        raise CorruptEntryError(f"store entry {entry.key} does not record the fetched file {digest}; remove it")
    return TrainedModel(job=job, model=load_weights(job, data, entry.state_dict),
                        metrics=dict(entry.meta["metrics"]), entry=entry)


# -- `qbd store` ------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from qbd.cli import add_model_options

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
    f.set_defaults(func=cmd_fetch)

    ls = commands.add_parser("list", help="list the stored models")
    ls.add_argument("--cache-dir", default=None, help="model store: a directory or a URL (s3://bucket/prefix, file:///path) (else $QBD_CACHE_DIR, else the user cache)")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=cmd_list)

    v = commands.add_parser("verify", help="re-hash and parse every entry; exit 1 if any is corrupt")
    v.add_argument("--cache-dir", default=None, help="model store: a directory or a URL (s3://bucket/prefix, file:///path) (else $QBD_CACHE_DIR, else the user cache)")
    v.add_argument("--quarantine", action="store_true", help="move corrupt entries to quarantine/")
    v.set_defaults(func=cmd_verify)
    return store


def cmd_fetch(args: argparse.Namespace) -> int:
    from qbd.cli import job_from_args, report_model
    from qbd.data import load_dataset
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


def cmd_list(args: argparse.Namespace) -> int:
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


def cmd_verify(args: argparse.Namespace) -> int:
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
