"""The model store on a URL (s3://bucket/prefix, file:///...; any fsspec filesystem that honours
create-only writes, checked once per store), through fsspec.

A qbd.store.ModelStore beside the local Store: the same interface, errors, verify and get_or_create;
it holds a key with a lease and publishes create-only. Object stores have neither rename
nor flock, so the protocol rests on create-only puts (S3's If-None-Match; a hard link locally):

    models/<key>/weights-<sha256>.safetensors   immutable, content-named, written first
    models/<key>/meta.json                       the commit point, written last and create-only
    locks/<key>.json                             a lease: {owner, host, pid, created, heartbeat}
    quarantine/<key>.<time>.<hex6>/              corrupt entries copied aside, with QUARANTINED

An entry exists iff its meta.json does. Racing publishers cannot mix their bytes up: the loser's
create-only put of meta.json fails and it loads the winner's entry. The lease only spares a second
training: its holder refreshes `heartbeat` every stale_after/4 s and deletes it when done; a lease
whose heartbeat is older than stale_after ($QBD_LOCK_STALE_AFTER, default 60 s; holders' clocks
must agree to within that) belongs to a dead process and is broken.

Credentials and endpoints come from fsspec's own configuration (~/.config/fsspec/*.json, or
FSSPEC_<PROTOCOL>_<OPTION> variables) and the backend's environment; for S3 (pip install s3fs):
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_PROFILE.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from qbd.errors import ConfigError
from qbd.remote_fs import PUTS, StoreUnreachable, conditional_answer, filesystem, protocol
from qbd.store import (
    CACHE_ENV,
    DEFAULT_LOCK_TIMEOUT,
    FORMAT,
    LOCK_TIMEOUT_ENV,
    META,
    CorruptEntryError,
    Entry,
    ModelStore,
    Store,
    StoreError,
    check_key,
    is_key,
    seconds_setting,
    versions,
)

STALE_AFTER_ENV = "QBD_LOCK_STALE_AFTER"
DEFAULT_STALE_AFTER = 60.0
ORPHAN = f"no {META} (a writer died before publishing)"
_CONFLICT_RETRIES = 6


def open_store(root: str | os.PathLike[str] | None = None, lock_timeout: float | None = None) -> Store | UrlStore:
    """The store at `root` (else $QBD_CACHE_DIR, else the user cache dir): a UrlStore for a URL."""
    where = os.fspath(root) if root is not None else os.environ.get(CACHE_ENV)
    if where is not None and "://" in where:
        return UrlStore(where, lock_timeout)
    return Store(root, lock_timeout)


class UrlStore(ModelStore):
    def __init__(self, url: str, lock_timeout: float | None = None, stale_after: float | None = None) -> None:
        self.root = url.rstrip("/")
        self.lock_timeout = seconds_setting(lock_timeout, LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT)
        self.stale_after = seconds_setting(stale_after, STALE_AFTER_ENV, DEFAULT_STALE_AFTER)
        self.fs, self._base = filesystem(self.root)
        self._create_only_checked = False

    # -- paths: `_path` for fsspec, `_url` for people -------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join((self._base, *parts))

    def _url(self, path: str) -> str:
        return self.root + path[len(self._base):]

    def entry_dir(self, key: str) -> str:
        check_key(key)
        return self._url(self._path("models", key))

    def _files(self, *parts: str) -> list[str]:
        self.fs.invalidate_cache()  # listings are cached per instance; other processes write too
        return sorted(self.fs.find(self._path(*parts)))

    def _tree(self) -> dict[str, list[str]]:
        """{name under models/: the paths of its objects}, from one listing."""
        base, out = self._path("models") + "/", {}
        for p in self._files("models"):
            out.setdefault(p[len(base):].split("/")[0], []).append(p)
        return out

    def entry_names(self) -> list[str]:
        """Every name under models/, valid entry or not."""
        return sorted(self._tree())

    def keys(self) -> list[str]:
        return sorted(n for n, files in self._tree().items() if self._path("models", n, META) in files)

    def has(self, key: str) -> bool:
        check_key(key)
        return self._read(self._path("models", key, META)) is not None

    # -- read --------------------------------------------------------------------------------
    def _read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def read_meta(self, key: str) -> dict[str, Any]:
        check_key(key)
        raw = self._read(self._path("models", key, META))
        if raw is None:
            raise CorruptEntryError(f"store entry {key}: no {META}")
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise CorruptEntryError(f"store entry {key}: unreadable {META}: {e}") from e
        if not isinstance(meta, dict) or meta.get("key") != key or "weights_sha256" not in meta:
            raise CorruptEntryError(f"store entry {key}: {META} does not describe this entry")
        return meta

    def load(self, key: str) -> Entry:
        """Load an entry, verifying the weights' sha256 against the metadata. Only damage is a
        CorruptEntryError; a network failure stays an OSError (no quarantining on a hiccup)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        meta = self.read_meta(key)
        name = meta.get("weights_file")
        if not isinstance(name, str) or not name.startswith("weights-") or "/" in name:
            raise CorruptEntryError(f"store entry {key}: {META} names no weights file")
        path = self._path("models", key, name)
        raw = self._read(path)
        if raw is None:
            raise CorruptEntryError(f"store entry {key}: cannot read weights: {self._url(path)} is missing")
        digest = hashlib.sha256(raw).hexdigest()
        if digest != meta["weights_sha256"]:
            raise CorruptEntryError(
                f"store entry {key}: weights sha256 {digest[:12]}... does not match the recorded"
                f" {str(meta['weights_sha256'])[:12]}..."
            )
        try:
            state = load(raw)
        except (SafetensorError, ValueError) as e:
            raise CorruptEntryError(f"store entry {key}: cannot parse weights: {e}") from e
        return Entry(key=key, path=self.entry_dir(key), state_dict=state, meta=meta, hit=True, weights=self._url(path))

    # -- write -------------------------------------------------------------------------------
    def _put(self, path: str, data: bytes, create: bool = False) -> None:
        """Write one object whole; with `create`, FileExistsError if it exists already."""
        put = PUTS.get(protocol(self.fs))
        if put is not None:
            put(path, data, create)
            return
        if create:
            self._check_create_only()
        for attempt in range(_CONFLICT_RETRIES + 1):
            try:
                self.fs.pipe_file(path, data, mode="create" if create else "overwrite")
                return
            except StoreUnreachable as e:
                answer = conditional_answer(e.__cause__)
                if create and answer == "exists":  # a 412 the backend did not map to FileExistsError
                    raise FileExistsError(path) from e
                if answer != "conflict" or attempt == _CONFLICT_RETRIES:
                    raise
                # S3 answers 409 to simultaneous conditional writes of one key: retry, as AWS advises
                time.sleep(random.uniform(0.05, 0.1) * 2**attempt)

    def _check_create_only(self) -> None:
        """Once per store: a backend that ignores create-only writes (some S3-compatible servers
        drop If-None-Match) would let racing publishers overwrite each other: refuse it."""
        if self._create_only_checked:
            return
        probe = self._path("locks", f"probe-{uuid.uuid4().hex}")
        self.fs.pipe_file(probe, b"1", mode="create")
        try:
            self.fs.pipe_file(probe, b"2", mode="create")
        except FileExistsError:
            self._create_only_checked = True
            return
        except StoreUnreachable as e:
            if conditional_answer(e.__cause__) == "exists":
                self._create_only_checked = True
                return
            raise
        finally:
            self._rm(probe)
        raise ConfigError(f"model store {self.root}: the backend ignores create-only writes (If-None-Match), so racing"
                          " publishers could overwrite each other's entries; use a backend that honours them (AWS S3,"
                          " MinIO, a local or mounted path)")

    def _rm(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def save(self, key: str, state_dict: dict[str, Any], meta: dict[str, Any]) -> str:
        """Publish an entry: the weights, then meta.json create-only. FileExistsError if the key
        has an entry already (a racing publisher won); that entry is left untouched."""
        from safetensors.torch import save

        check_key(key)
        data = save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
        digest = hashlib.sha256(data).hexdigest()
        name = f"weights-{digest}.safetensors"
        weights = self._path("models", key, name)
        self._put(weights, data)  # same name, same bytes: overwriting a twin changes nothing
        full_meta = {**meta, "key": key, "format": FORMAT, "weights_file": name, "weights_sha256": digest,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions()}
        try:
            self._put(self._path("models", key, META), json.dumps(full_meta, indent=2, sort_keys=True).encode(), create=True)
        except FileExistsError:
            try:
                winner = self.read_meta(key).get("weights_file")
            except CorruptEntryError:
                winner = None  # cannot tell whose weights these are: leave them
            if winner is not None and winner != name:
                self._rm(weights)
            raise
        return self.entry_dir(key)

    def quarantine(self, key: str, why: str) -> str | None:
        check_key(key)
        return self._move_aside(key, why)

    def _move_aside(self, name: str, why: str) -> str | None:
        """Copy models/<name>/ to quarantine/, then delete it, meta.json first (the entry vanishes
        at once, never half-way)."""
        src = self._path("models", name)
        files = self._files("models", name)
        if not files:
            return None
        dest = self._path("quarantine", f"{name}.{int(time.time())}.{uuid.uuid4().hex[:6]}")
        for f in files:
            data = self._read(f)
            if data is not None:
                self._put(dest + f[len(src):], data)
        self._put(dest + "/QUARANTINED", (why + "\n").encode())
        for f in sorted(files, key=lambda f: not f.endswith("/" + META)):
            self._rm(f)
        return self._url(dest)

    # -- the lease ---------------------------------------------------------------------------
    def _try_lease(self, key: str) -> _Lease | None:
        path = self._path("locks", f"{key}.json")
        for _ in range(2):  # a second try after breaking a stale (or just released) lease
            lease = _Lease(self, path)
            try:
                self._put(path, lease.record(), create=True)
            except FileExistsError:
                raw = self._read(path)
                if raw is None:
                    continue  # released meanwhile: try again
                try:
                    held = json.loads(raw)
                    beat = float(held["heartbeat"])
                except (ValueError, KeyError, TypeError):
                    held, beat = {}, 0.0  # our writes are whole: an unparsable lease is damage, not a write in flight
                if time.time() - beat <= self.stale_after:
                    return None
                # stale: its holder died. Of the waiters that saw it, only the one whose create-only
                # marker for this lease lands breaks it; a late one cannot delete its successor
                gone = held.get("owner") or hashlib.sha256(raw).hexdigest()[:32]
                try:
                    self._put(self._path("locks", f"{key}.broken-{gone}"), b"", create=True)
                except FileExistsError:
                    return None
                self._rm(path)
                continue
            lease.start()
            return lease
        return None

    def _acquire(self, key: str, describe: str, log: Callable[[str], None], watch: bool) -> _Lease | None:
        """Take the key's lease, waiting up to lock_timeout; with `watch`, None as soon as the
        entry is published by someone else."""
        deadline = time.monotonic() + self.lock_timeout
        delay, logged = 0.2, False
        url = self._url(self._path("locks", f"{key}.json"))
        while True:
            if watch and self.has(key):
                return None
            lease = self._try_lease(key)
            if lease is not None:
                return lease
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreError(
                    f"timed out after {self.lock_timeout:.0f} s waiting for the lock on {describe or key}"
                    f" ({url}); another process is still creating it. Raise ${LOCK_TIMEOUT_ENV} or stop that process."
                )
            if not logged:
                log(f"qbd: waiting for another process to finish {describe or key} (lease {url})")
                logged = True
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, 2.0)

    # -- maintenance -------------------------------------------------------------------------
    def stale_tmp(self) -> list[str]:
        """Objects of writers that died before publishing: harmless (named by their content), moved
        aside by `verify(quarantine=True)`."""
        return [self._url(f) for n, files in sorted(self._tree().items())
                if is_key(n) and self._path("models", n, META) not in files for f in files]

    # -- ModelStore's hooks -------------------------------------------------------------------
    UNPUBLISHED = ORPHAN

    def _published(self, name: str) -> bool:
        return self.has(name)

    def _set_aside(self, name: str, why: str) -> None:
        self._move_aside(name, why)

    def _hold_to_check(self, key: str) -> Callable[[], None] | None:
        try:
            lease = self._acquire(key, key, lambda m: None, watch=False)
        except StoreError:
            return None
        assert lease is not None  # without `watch`, _acquire returns a lease or raises
        return lease.release

    def _hold_to_create(self, key: str, describe: str, log: Callable[[str], None],
                        corrupt: bool) -> tuple[Callable[[], None], Entry | None]:
        while True:
            lease = self._acquire(key, describe, log, watch=not corrupt)
            if lease is not None:
                return lease.release, None
            try:  # published while we waited
                return (lambda: None), self.load(key)
            except CorruptEntryError:
                corrupt = True

    def _create(self, key: str, create: Callable[[], tuple[dict[str, Any], dict[str, Any]]]) -> Entry:
        # a dead writer's unpublished weights stay (content-named, so harmless; `verify --quarantine`
        # clears them): deleting here could remove a live writer's, were two to hold the lease
        state, meta = create()
        return self._publish(key, state, meta)

    def _publish(self, key: str, state: dict[str, Any], meta: dict[str, Any]) -> Entry:
        """save() then load(): our entry (hit False), or the winner's if another publisher won."""
        try:
            self.save(key, state, meta)
        except FileExistsError:
            return self.load(key)
        entry = self.load(key)
        entry.hit = False
        return entry


class _Lease:
    """A held lease on a key: a heartbeat thread keeps it fresh until release()."""

    def __init__(self, store: UrlStore, path: str) -> None:
        self.store, self.path = store, path
        self.owner = uuid.uuid4().hex
        self.created = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"qbd-lease-{path[-16:]}", daemon=True)

    def record(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "created": self.created, "heartbeat": time.time()}).encode()

    def _mine(self) -> bool:
        raw = self.store._read(self.path)
        try:
            return raw is not None and json.loads(raw).get("owner") == self.owner
        except (ValueError, AttributeError):
            return False

    def start(self) -> None:
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.store.stale_after / 4):
            try:
                if not self._mine():
                    return  # broken as stale by someone else: the create-only meta.json still decides
                self.store._put(self.path, self.record())
            except Exception:
                pass  # a missed beat (network); the next one may get through

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):  # a lease left behind goes stale; never mask the caller's outcome
            if self._mine():
                self.store._rm(self.path)
