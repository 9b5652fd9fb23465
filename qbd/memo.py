"""Defense Results memoised by content, so that no cell is computed twice.

A cell's Result depends on the model's weights, the data, the bench's split, the scheme, the
defense and its parameters, the protocol, the seed, the device and thread count, and the code and
library versions that ran it. `key_parts` (qbd.evaluate.Bench) lists all of them; the memo files a
Result under the sha256 of that list, in the local store's `results/` folder, where every process
on the machine (xdist workers, `qbd run -j` workers) finds it.

By default a Result is reused only within the session that computed it (one `qbd run`, one pytest
session across its workers): a later session recomputes, because its code may differ in ways no
digest sees. `reuse=True` (`--reuse-results`, `--qbd-reuse-results`) also takes Results of earlier
sessions, for a CI cache of the store; `fresh=True` (`--fresh`, `--qbd-fresh`) reads nothing.
An `invalid` Result is never filed (a timeout or a crash may not happen again), nor the Result of
a defense that sets `memoize = False` (one whose answer depends on more than its `params`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

FORMAT = 1  # of an entry file; bump when key_parts or the entry's layout changes
FOLDER = "results"
# the libraries whose kernels compute a Result (read from package metadata: nothing is imported)
LIBRARIES = ("torch", "torchvision", "torchao", "numpy", "scipy", "scikit-learn", "onnx", "onnxruntime")


class ResultMemo:
    """Where a session files and finds defense Results. Picklable: `qbd run -j` hands it to its
    worker processes with the benches."""

    def __init__(self, root: str | os.PathLike[str], session: str, *, reuse: bool = False, fresh: bool = False) -> None:
        if not session:
            raise ValueError("a memo needs a session id")
        self.root = Path(root) / FOLDER
        self.session = session
        self.reuse = reuse
        self.fresh = fresh

    @cached_property
    def environment(self) -> dict[str, Any]:
        """qbd's own code (every module's bytes: a version number does not change on each edit) and
        the versions of the libraries that compute. Taken once per process."""
        from importlib import metadata

        import torch

        import qbd
        from qbd.registry import source_digest

        versions: dict[str, str | None] = {"torch": str(torch.__version__)}  # with its build tag (+cu130, +cpu)
        for name in LIBRARIES:
            try:
                versions.setdefault(name, metadata.version(name))
            except metadata.PackageNotFoundError:
                versions[name] = None
        return {"qbd_code": source_digest(qbd), "libraries": versions}

    def key(self, parts: dict[str, Any]) -> str:
        return hashlib.sha256(_canonical({"format": FORMAT, **self.environment, **parts}).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The Result filed under `key` by this session (or by any, with `reuse`), else None. An
        unreadable or foreign entry is a miss: the cell is computed and the entry rewritten."""
        if self.fresh:
            return None
        try:
            entry = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
            return None
        if not (self.reuse or entry.get("session") == self.session):
            return None
        from qbd.results import problems

        result = entry.get("result")
        if problems(result):
            return None
        result["memo"] = {"key": key, "reused": True, "session": entry["session"]}
        return result

    def put(self, key: str, result: dict[str, Any]) -> None:
        """File `result` under `key` (atomically: a reader sees the old entry or the new one)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": FORMAT, "key": key, "session": self.session, "result": result}, allow_nan=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def for_store(store: Any, *, reuse: bool = False, fresh: bool = False, session: str | None = None) -> ResultMemo:
    """The memo beside a model store: in its folder for a local store; in the user's cache folder for a
    URL store (a Result is cheap to recompute next to a model, and shared folders would need locks).
    `session`: None starts a new one."""
    import uuid

    root = getattr(store, "root", None)
    if not isinstance(root, Path):
        from platformdirs import user_cache_dir

        root = Path(user_cache_dir("qbd", appauthor=False))
    return ResultMemo(root, session or uuid.uuid4().hex, reuse=reuse, fresh=fresh)


def files_result(result: dict[str, Any], defense: Any) -> bool:
    """Whether a freshly computed Result may be filed: not invalid, and not a defense that opts out."""
    return result["verdict"]["status"] != "invalid" and getattr(defense, "memoize", True) is not False


def code_of(obj: Any) -> dict[str, Any]:
    """What identifies the code of a defense or scheme that is not qbd's own: its class and the
    digest of its top-level package (every file of it: a helper module or a data file counts too).
    qbd's own code is in `ResultMemo.environment`. sha256 None: not identifiable."""
    from qbd.registry import code_digest

    cls = obj if isinstance(obj, type) else type(obj)
    out: dict[str, Any] = {"class": f"{cls.__module__}:{cls.__qualname__}"}
    if cls.__module__.split(".")[0] != "qbd":
        out["sha256"] = code_digest(cls)
    return out


def cell_parts(bench: Any, defense: Any, scheme: str, *, gradient_path: str, engine: str | None, seed: int,
               timeout_s: float | None) -> dict[str, Any] | None:
    """Everything one cell's Result on `bench` (a qbd.evaluate.Bench) depends on besides qbd's code
    and the libraries (those are `ResultMemo.environment`). None: not memoisable (a defense or
    scheme whose code cannot be identified)."""
    from dataclasses import asdict

    import torch

    from qbd.attacks import attack_code
    from qbd.config import attack_record
    from qbd.defenses.base import params_of
    from qbd.quant import get_scheme

    codes = {"defense": code_of(defense), "scheme": code_of(get_scheme(scheme))}
    if any("sha256" in c and c["sha256"] is None for c in codes.values()):
        return None
    return {
        "data": {"name": bench.data.name, "sha256": bench.data_sha256},
        # where the zoo is installed is no part of a model (its sha256 is): a new environment reuses
        "model": {"name": bench.model_name, "sha256": bench.model_sha256,
                  "weights": {k: v for k, v in (bench.weights or {}).items() if k not in ("zoo", "repository_zoo")}},
        "bench": {"spec": asdict(bench.spec), "tier": bench.tier, "device": str(bench.device),
                  "attack": attack_record(bench.attack), "probe": attack_record(bench.probe),
                  "attack_code": attack_code(bench.attack), "probe_code": attack_code(bench.probe)},
        "scheme": {"name": scheme, "engine": engine, **codes["scheme"]},
        "defense": {"name": defense.name, "protocol": getattr(defense, "protocol", "canonical"), "params": params_of(defense),
                    "requires": sorted(defense.requires), "version": getattr(defense, "version", None),
                    "distribution": bench.distribution(defense), "gradient_path": gradient_path, **codes["defense"]},
        "seed": seed,
        "timeout_s": timeout_s,
        "torch_threads": torch.get_num_threads(),
    }


def reused_line(results: list[dict[str, Any]]) -> str:
    """A line saying how many of `results` the memo supplied ("" when none did)."""
    hits = [r for r in results if (r.get("memo") or {}).get("reused")]
    if not hits:
        return ""
    seconds = sum(float(r.get("seconds") or 0.0) for r in hits)
    return (f"qbd: {len(hits)} of {len(results)} cells reused a Result computed earlier ({seconds:.0f} s of defense time"
            " not spent again; qbd.memo, --fresh recomputes)")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
