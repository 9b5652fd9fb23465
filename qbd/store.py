"""Content-addressed model store.

Layout under the root ($QBD_CACHE_DIR, else the platform's user cache dir):

    models/<key>/weights.safetensors   the weights (never pickle)
    models/<key>/meta.json             job, metrics, sha256 of the weights, versions
    locks/<key>.lock                   one lock per key (flock: released when its holder dies)
    tmp/                               entries being written; renamed into models/ when complete
    quarantine/                        corrupted entries moved aside, kept for inspection

A new entry is written in tmp/ and renamed into place with one atomic rename, so a reader sees
either no entry or a complete one. Whoever holds the key's lock creates a missing entry; the
others wait on the lock and then load what it wrote: exactly one process trains a config.
A writer killed mid-write leaves only its tmp/<key>.* directory, removed by the next holder of
that key's lock. A corrupt entry is quarantined and recreated, except where the caller says it
cannot be recreated (fetched weights, qbd.fetch): then it is quarantined and refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from qbd.errors import ConfigError

CACHE_ENV = "QBD_CACHE_DIR"
LOCK_TIMEOUT_ENV = "QBD_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 4 * 3600.0  # a paper-tier training on CPU can take hours
FORMAT = 1
WEIGHTS = "weights.safetensors"
META = "meta.json"


class StoreError(RuntimeError):
    """The store cannot provide an entry (corrupt, locked too long, unreadable)."""


class CorruptEntryError(StoreError):
    pass


@dataclass
class Entry:
    key: str
    path: Path | str  # the entry's directory (a URL for qbd.remote_store), or a pinned zoo file
    state_dict: dict[str, Any]
    meta: dict[str, Any]
    hit: bool
    weights: Path | str | None = None  # the file (or URL) the weights were read from


def default_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else user_cache_root()


def user_cache_root() -> Path:
    """qbd's folder in the user's cache (platformdirs), whatever $QBD_CACHE_DIR says."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("qbd", appauthor=False))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelStore:
    """What the local and the URL stores share: an entry's problem, verify and get_or_create. Each
    store says how it holds a key alone (a file lock; a lease object), whether an entry was
    published, and how it creates one."""

    UNPUBLISHED = f"no {META}"  # an entry's problem when its metadata was never written
    lock_timeout: float

    # what each store provides ------------------------------------------------------------------
    def entry_names(self) -> list[str]: raise NotImplementedError
    def has(self, key: str) -> bool: raise NotImplementedError
    def load(self, key: str) -> Entry: raise NotImplementedError
    def quarantine(self, key: str, why: str) -> Any: raise NotImplementedError
    def _published(self, name: str) -> bool: raise NotImplementedError
    def _set_aside(self, name: str, why: str) -> None: raise NotImplementedError  # a name that is not a key
    def _hold_to_check(self, key: str) -> Callable[[], None] | None: raise NotImplementedError
    def _hold_to_create(self, key: str, describe: str, log: Callable[[str], None],
                        corrupt: bool) -> tuple[Callable[[], None], Entry | None]: raise NotImplementedError
    def _create(self, key: str, create: Callable[[], tuple[dict[str, Any], dict[str, Any]]]) -> Entry:
        raise NotImplementedError

    # shared ------------------------------------------------------------------------------------
    def verify(self, quarantine: bool = False) -> dict[str, str | None]:
        """Re-hash and parse every entry: {name: problem, or None when intact}. With
        `quarantine`, corrupt entries are moved aside (held alone, re-checked first)."""
        out: dict[str, str | None] = {}
        for name in self.entry_names():
            out[name] = self._problem(name)
            if out[name] is None or not quarantine:
                continue
            if not is_key(name):  # nothing of ours; nothing to hold
                self._set_aside(name, out[name] or "")
                continue
            release = self._hold_to_check(name)
            if release is None:
                out[name] = f"{out[name]} (left in place: its lock stayed busy)"
                continue
            try:
                out[name] = self._problem(name)  # it may have been recreated meanwhile
                if out[name] is not None:
                    self.quarantine(name, out[name] or "")
            finally:
                release()
        return out

    def _problem(self, name: str) -> str | None:
        if not is_key(name):
            return "not a store key (64 lowercase hex digits)"
        if not self._published(name):
            return self.UNPUBLISHED
        try:
            self.load(name)
        except CorruptEntryError as e:
            return str(e)
        return None

    def get_or_create(
        self,
        key: str,
        create: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
        describe: str = "",
        log: Callable[[str], None] | None = None,
        refuse_corrupt: str | None = None,
    ) -> Entry:
        """Return the entry for `key`, creating it with `create() -> (state_dict, meta)` if it
        is missing. Concurrent callers: one creates, the others wait and load.

        A corrupt entry is quarantined and recreated; with `refuse_corrupt` (the reason, shown to
        the user) it is quarantined and CorruptEntryError is raised instead."""
        log = log or stderr_log
        corrupt = False
        if self.has(key):
            try:
                return self.load(key)
            except CorruptEntryError:
                corrupt = True  # handled while held, so only one process quarantines it
        release, published = self._hold_to_create(key, describe, log, corrupt)
        if published is not None:  # another process published it while this one waited
            return published
        try:
            if self.has(key):
                try:
                    return self.load(key)
                except CorruptEntryError as e:
                    dest = self.quarantine(key, str(e))
                    if refuse_corrupt is not None:
                        raise CorruptEntryError(f"{e}; moved to {dest}; {refuse_corrupt}") from None
                    log(f"qbd: {e}; moved to {dest}, recreating it")
            return self._create(key, create)
        finally:
            release()


class Store(ModelStore):
    def __init__(self, root: str | os.PathLike[str] | None = None, lock_timeout: float | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"model cache {self.root} is not a directory (--cache-dir / ${CACHE_ENV})")
        self.lock_timeout = seconds_setting(lock_timeout, LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT)

    # -- paths -------------------------------------------------------------------------------
    def entry_dir(self, key: str) -> Path:
        check_key(key)
        return self.root / "models" / key

    def _lock(self, key: str) -> FileLock:
        d = self.root / "locks"
        d.mkdir(parents=True, exist_ok=True)
        return FileLock(str(d / f"{key}.lock"))

    def keys(self) -> list[str]:
        d = self.root / "models"
        return sorted(p.name for p in d.iterdir() if (p / META).is_file()) if d.is_dir() else []

    def has(self, key: str) -> bool:
        d = self.entry_dir(key)
        return (d / META).is_file() and (d / WEIGHTS).is_file()

    # -- read --------------------------------------------------------------------------------
    def read_meta(self, key: str) -> dict[str, Any]:
        try:
            meta = json.loads((self.entry_dir(key) / META).read_text())
        except (OSError, ValueError) as e:
            raise CorruptEntryError(f"store entry {key}: unreadable {META}: {e}") from e
        if not isinstance(meta, dict) or meta.get("key") != key or "weights_sha256" not in meta:
            raise CorruptEntryError(f"store entry {key}: {META} does not describe this entry")
        return meta

    def load(self, key: str) -> Entry:
        """Load an entry, verifying the weights' sha256 against the metadata."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = self.entry_dir(key)
        meta = self.read_meta(key)
        try:
            digest = sha256_file(d / WEIGHTS)
        except OSError as e:
            raise CorruptEntryError(f"store entry {key}: cannot read weights: {e}") from e
        if digest != meta["weights_sha256"]:
            raise CorruptEntryError(
                f"store entry {key}: weights sha256 {digest[:12]}... does not match the recorded"
                f" {str(meta['weights_sha256'])[:12]}..."
            )
        try:
            state = load_file(str(d / WEIGHTS))
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptEntryError(f"store entry {key}: cannot parse weights: {e}") from e
        return Entry(key=key, path=d, state_dict=state, meta=meta, hit=True, weights=d / WEIGHTS)

    # -- write -------------------------------------------------------------------------------
    def save(self, key: str, state_dict: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write an entry atomically; the caller should hold the key's lock."""
        from safetensors.torch import save_file

        final = self.entry_dir(key)
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = tmp_root / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
            save_file(tensors, str(tmp / WEIGHTS))
            full_meta = {
                **meta,
                "key": key,
                "format": FORMAT,
                "weights_sha256": sha256_file(tmp / WEIGHTS),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "versions": versions(),
            }
            (tmp / META).write_text(json.dumps(full_meta, indent=2, sort_keys=True))
            _fsync_dir_files(tmp)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # only a corrupt leftover can be here: we hold the lock
                self.quarantine(key, "replaced")
            os.rename(tmp, final)
            _fsync_path(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def quarantine(self, key: str, why: str) -> Path | None:
        d = self.entry_dir(key)
        if not d.exists():
            return None
        return self._move_aside(d, key, why)

    def _move_aside(self, d: Path, name: str, why: str) -> Path:
        q = self.root / "quarantine"
        q.mkdir(parents=True, exist_ok=True)
        dest = q / f"{name}.{int(time.time())}.{uuid.uuid4().hex[:6]}"
        os.rename(d, dest)
        (dest / "QUARANTINED").write_text(why + "\n")
        return dest

    def _remove_stale_tmp(self, key: str) -> None:
        # writers hold the key's lock, and we hold it now: any tmp/<key>.* is from a dead writer
        d = self.root / "tmp"
        if d.is_dir():
            for p in d.glob(f"{key}.*"):
                shutil.rmtree(p, ignore_errors=True)

    # -- maintenance -------------------------------------------------------------------------
    def stale_tmp(self) -> list[str]:
        """Leftovers of writers that died mid-write (removed by the next holder of their key's lock)."""
        d = self.root / "tmp"
        return sorted(str(p) for p in d.iterdir()) if d.is_dir() else []

    def entry_names(self) -> list[str]:
        """Every directory under models/, valid entry or not (a key's dir without meta.json is
        damage: entries only appear by atomic rename)."""
        d = self.root / "models"
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def _published(self, name: str) -> bool:
        return (self.entry_dir(name) / META).is_file()

    def _set_aside(self, name: str, why: str) -> None:
        self._move_aside(self.root / "models" / name, name, why)

    def _hold_to_check(self, key: str) -> Callable[[], None] | None:
        lock = self._lock(key)
        try:
            lock.acquire(timeout=self.lock_timeout)
        except Timeout:
            return None
        return lock.release

    def _hold_to_create(self, key: str, describe: str, log: Callable[[str], None],
                        corrupt: bool) -> tuple[Callable[[], None], Entry | None]:
        lock = self._lock(key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log(f"qbd: waiting for another process to finish {describe or key} (lock {lock.lock_file})")
            try:
                lock.acquire(timeout=self.lock_timeout)
            except Timeout:
                raise StoreError(
                    f"timed out after {self.lock_timeout:.0f} s waiting for the lock on {describe or key}"
                    f" ({lock.lock_file}); another process is still creating it. Raise"
                    f" ${LOCK_TIMEOUT_ENV} or stop that process."
                ) from None
        return lock.release, None

    def _create(self, key: str, create: Callable[[], tuple[dict[str, Any], dict[str, Any]]]) -> Entry:
        self._remove_stale_tmp(key)
        state, meta = create()
        path = self.save(key, state, meta)
        entry = self.load(key)
        entry.hit = False
        entry.path = path
        return entry


def seconds_setting(value: float | None, env: str, default: float) -> float:
    """`value`, else $env, else `default`: a number of seconds > 0."""
    if value is not None:
        return value
    raw = os.environ.get(env)
    try:
        out = default if raw is None else float(raw)
    except ValueError:
        out = math.nan
    if not (math.isfinite(out) and out > 0):
        raise ConfigError(f"${env} must be a number of seconds > 0, got {raw!r}")
    return out


def versions() -> dict[str, str]:
    import platform

    from qbd import __version__

    out = {"qbd": __version__, "python": platform.python_version()}
    for mod in ("torch", "torchvision"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def is_key(key: str) -> bool:
    return len(key) == 64 and all(c in "0123456789abcdef" for c in key)


def check_key(key: str) -> None:
    if not is_key(key):
        raise StoreError(f"invalid store key {key!r}: expected 64 lowercase hex digits")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_files(d: Path) -> None:
    for p in d.iterdir():
        _fsync_path(p)
    _fsync_path(d)


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
