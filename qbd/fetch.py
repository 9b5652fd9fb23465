"""Untrusted model weights: fetch them with a pinned sha256, check they fit the architecture,
and keep them in the store beside the trained models. The `qbd store` commands (qbd/store_cli.py)
call it; this module never imports the CLI.

    qbd store fetch URL_OR_PATH --sha256 HEX [--dataset digits --model tiny-cnn --target 0 ...]
    qbd run --model-file PATH --sha256 HEX [--dataset digits ...]   (uses it instead of training)
    qbd store list [--json]
    qbd store verify [--quarantine]

Trust boundary: the bytes are hashed and compared with the pinned sha256 before anything
parses them (a download streams to a temporary file first, hashed as it arrives, removed
after). Only two formats are parsed: safetensors (tensors and a JSON header, no code) and a
plain state dict through torch.load(weights_only=True), whose unpickler refuses every global
outside torch's tensor allowlist; nothing else is unpickled.
The state dict must then match the architecture exactly (same keys, same shapes, finite floats).
Any failure raises FetchError (exit status 2) before the store is touched.

Store key: a fetched model never shares a key with a trained one (it would pass off foreign
weights as the job's training). Its key is the sha256 of {"fetched": sha256 of the file, the
data set, model and attack specs, the data's fingerprint}; the training spec is not in it.
The entry's meta.json has "fetched": {"source", "sha256", "format", "bytes"}. A corrupt fetched
entry is quarantined and refused, never recreated behind the user's back: fetch it again.

Torch is imported only when weights are parsed.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import pickle
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from qbd.config import ModelJob, canonical_json, sha256_text, to_dict
from qbd.errors import QbdUserError

if TYPE_CHECKING:
    import torch

    from qbd.data.base import DataSplit
    from qbd.remote_store import UrlStore
    from qbd.store import Store
    from qbd.trained import TrainedModel

FORMATS = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}
MAX_BYTES = 4 << 30  # refuse larger downloads before they exhaust memory (ResNet-18: 45 MB)
URL_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20  # a download's read size: its memory use, whatever the file's size
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


def read_source(source: Source, max_bytes: int = MAX_BYTES, log: Callable[[str], None] | None = None) -> bytes:
    """The file's bytes, from a local path, file:// or http(s):// URL, at most `max_bytes`, once
    their sha256 is the pinned one (FetchError otherwise): nothing can parse unverified bytes.

    A download streams to a temporary file, hashed as the chunks arrive, and stops as soon as it
    passes `max_bytes` (at once if the server declares a larger size); the file is read back only
    once its hash matched, and removed whatever happens. Progress: a tqdm bar on stderr when it
    is a terminal, else a start and an end line to `log` (none without it)."""
    loc = source.location
    if "://" not in loc:
        return _verified(_read_local(Path(loc).expanduser(), loc, max_bytes), source)
    parts = urllib.parse.urlsplit(loc)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise FetchError(f"{loc}: file:// URLs must name a local file (file:///path)")
        return _verified(_read_local(Path(urllib.request.url2pathname(parts.path)), loc, max_bytes), source)
    if scheme not in ("http", "https"):
        raise FetchError(f"{source.display()}: unsupported URL scheme {scheme!r}; use a path, file://, http:// or https://")
    fd, tmp = tempfile.mkstemp(prefix="qbd-fetch-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _download(source, out, max_bytes, log)
        _check_sha256(digest, source)
        return Path(tmp).read_bytes()  # get_fetched hashes these very bytes again before parsing them
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _verified(raw: bytes, source: Source) -> bytes:
    _check_sha256(hashlib.sha256(raw).hexdigest(), source)
    return raw


def _check_sha256(digest: str, source: Source) -> None:
    if digest != source.sha256:
        raise FetchError(f"{source.display()}: sha256 is {digest}, expected {source.sha256}; refusing it")


def _download(source: Source, out: BinaryIO, max_bytes: int, log: Callable[[str], None] | None) -> str:
    """Stream the URL into `out`; the sha256 of what arrived."""
    shown = source.display()
    try:
        with urllib.request.urlopen(source.location, timeout=URL_TIMEOUT_S) as resp:  # scheme checked by the caller
            declared = _declared_size(resp)
            if declared is not None and declared > max_bytes:
                raise FetchError(f"{shown}: larger than {max_bytes} bytes ({declared} declared); refusing it")
            with _Progress(shown, declared, log) as progress:
                digest, received = _copy_hashed(resp, out, shown, max_bytes, progress)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:  # HTTPError, DNS, refused, timeout
        reason = getattr(e, "reason", None) or e
        raise FetchError(f"cannot fetch {shown}: {reason}") from None
    if declared is not None and received != declared:
        raise FetchError(f"cannot fetch {shown}: the connection closed after {received} of {declared} bytes")
    return digest


def _declared_size(resp: Any) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _copy_hashed(resp: Any, out: BinaryIO, shown: str, max_bytes: int, progress: _Progress) -> tuple[str, int]:
    """Copy chunk by chunk, as they arrive (read1: a slow server's bytes are on disk at once)."""
    digest, received = hashlib.sha256(), 0
    read = getattr(resp, "read1", resp.read)
    while chunk := read(CHUNK_BYTES):
        received += len(chunk)
        if received > max_bytes:
            raise FetchError(f"{shown}: larger than {max_bytes} bytes; refusing it")
        digest.update(chunk)
        try:
            out.write(chunk)
        except OSError as e:  # the disk, not the network: say so
            raise FetchError(f"cannot store the download of {shown} in {tempfile.gettempdir()}: {e.strerror or e}") from None
        progress.update(len(chunk))
    return digest.hexdigest(), received


class _Progress:
    """A download's progress: a tqdm bar on a terminal's stderr; else `log` gets a start line,
    and an end line if it completes (a redirected log wants no bar redrawn thousands of times)."""

    def __init__(self, shown: str, total: int | None, log: Callable[[str], None] | None) -> None:
        self.shown, self.total, self.log, self.bar, self.done = shown, total, log, None, 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> _Progress:
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=f"fetching {Path(urllib.parse.urlsplit(self.shown).path).name}",
                            unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False, dynamic_ncols=True)
        elif self.log is not None:
            size = "size unknown" if self.total is None else f"{self.total} bytes"
            self.log(f"fetching {self.shown} ({size})")
        return self

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, kind: Any, *_: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.log is not None and kind is None:
            self.log(f"fetched {self.shown}: {self.done} bytes in {time.perf_counter() - self.t0:.1f} s")


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
    from qbd.trained import TrainedModel, load_weights

    fmt = weights_format(source)
    raw = read_source(source, log=log)
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
