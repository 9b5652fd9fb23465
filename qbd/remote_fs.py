"""The file systems under a URL model store (qbd.remote_store): reaching them through fsspec with
every backend failure named, whole-object and create-only writes where fsspec's are not, and how
a conditional write was answered."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

from qbd.errors import ConfigError
from qbd.store import StoreError


def local_put(path: str, data: bytes, create: bool) -> None:
    """Whole-object writes on a local disk: write aside, then link (create-only: fails if the
    name exists) or rename into place. fsspec's own create mode checks then writes: not atomic."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if create:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# filesystems whose fsspec writes are not whole-object or not create-only by themselves
PUTS: dict[str, Callable[[str, bytes, bool], None]] = {"file": local_put, "local": local_put}


def protocol(fs: Any) -> str:
    p = fs.protocol
    return p if isinstance(p, str) else p[0]


def filesystem(url: str) -> tuple[Any, str]:
    import fsspec.core
    from fsspec.registry import known_implementations

    proto = url.split("://", 1)[0]
    try:
        # a fresh instance: cached ones keep the endpoint/credentials of when they were made
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)
    except ImportError as e:
        pkg = known_implementations.get(proto, {}).get("class", "").split(".")[0]
        hint = f"pip install {pkg}" if pkg and pkg != "fsspec" else str(e)
        raise ConfigError(f"model store {url}: {proto}:// needs a package that is not installed: {hint}") from None
    except ValueError as e:
        raise ConfigError(f"model store {url}: unknown protocol {proto!r} ({e})") from None
    return Guarded(fs, url), path.rstrip("/")


class StoreUnreachable(StoreError, OSError):
    """The backend failed (endpoint down, access denied): not damage, so nothing is quarantined."""


class Guarded:
    """An fsspec filesystem whose failures, other than the protocol's own answers (not found,
    exists), become StoreUnreachable naming the store: botocore's errors, for one, are not OSErrors."""

    def __init__(self, fs: Any, url: str) -> None:
        self._fs = fs
        self._url = url

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except (FileNotFoundError, FileExistsError):
                raise
            except Exception as e:
                raise StoreUnreachable(f"model store {self._url}: {type(e).__name__}: {e}") from e

        return call


def conditional_answer(error: BaseException | None) -> str | None:
    """How a failed conditional put was answered: "exists" (412 Precondition Failed), "conflict"
    (409, simultaneous conditional writes: retry), or None (something else)."""
    import errno

    text = f"{type(error).__name__} {error}"
    code = getattr(error, "response", {}).get("Error", {}).get("Code") if hasattr(error, "response") else None
    if code == "PreconditionFailed" or "PreconditionFailed" in text or "412" in text.split():
        return "exists"
    if (code == "ConditionalRequestConflict" or "ConditionalRequestConflict" in text
            or (isinstance(error, OSError) and error.errno == errno.EBUSY)):
        return "conflict"
    return None
