"""Defense Results memoised by content, so that no cell is computed twice.

A cell's Result depends on the model's weights, the data, the bench's split, the scheme, the
defense and its parameters, the protocol, the seed, the device and thread count, and the code and
library versions that ran it. `cell_parts` and `ResultMemo.environment` list all of them; the memo
files a Result under the sha256 of that list, in the local store's `results/` folder, where every
process on the machine (xdist workers, `qbd run -j` workers) finds it. docs/scaling.md has the list
and the limits.

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
LIBRARIES = ("torch", "torchvision", "torchao", "numpy", "scipy", "scikit-learn", "onnx", "onnxruntime", "onnxscript")


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
        self._digests: dict[str, str | None] = {}  # top-level package -> its code digest, once per process

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
        # the machine: float kernels differ between instruction sets (a Result computed on an AMD
        # EPYC is not reused on an Intel Xeon), and between Python builds
        import platform

        return {"qbd_code": source_digest(qbd), "libraries": versions, "python": platform.python_version(),
                "machine": platform.machine(), "cpu": _cpu_model()}

    def code_digest(self, obj: Any) -> str | None:
        """qbd.registry.code_digest of `obj`'s top-level package, taken once per process."""
        from qbd.registry import code_digest

        cls = obj if isinstance(obj, type) else type(obj)
        top = cls.__module__.split(".")[0]
        if top not in self._digests:
            self._digests[top] = code_digest(cls)
        return self._digests[top]

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
        if problems(result) or not isinstance(entry.get("session"), str):
            return None
        result["memo"] = {"key": key, "reused": True, "session": entry["session"]}
        return result

    def put(self, key: str, result: dict[str, Any]) -> bool:
        """File `result` under `key` (atomically: a reader sees the old entry or the new one). False,
        with a warning, when the folder cannot be written: the Result itself stands."""
        path = self._path(key)
        text = json.dumps({"format": FORMAT, "key": key, "session": self.session, "result": result}, allow_nan=True)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the entry from the other users of a shared store
            os.replace(tmp, path)
            return True
        except OSError as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            import warnings

            warnings.warn(f"qbd: could not file a Result in {self.root} ({type(e).__name__}: {e}); it is not reused", stacklevel=2)
            return False


def for_store(store: Any, *, reuse: bool = False, fresh: bool = False, session: str | None = None) -> ResultMemo:
    """The memo beside a model store: in its folder for a local store; in the user's cache folder for a
    URL store (a Result is cheap to recompute next to a model, and shared folders would need locks).
    `session`: None starts a new one."""
    import uuid

    root = getattr(store, "root", None)
    if not isinstance(root, Path):
        from qbd.store import user_cache_root

        root = user_cache_root()
    return ResultMemo(root, session or uuid.uuid4().hex, reuse=reuse, fresh=fresh)


def answers(result: dict[str, Any], *, cell: str, seed: int, scheme: str, gradient_path: str, attack: Any) -> bool:
    """Whether a filed Result is the one asked for (its cell, seed, scheme, gradient path and
    attack): a guard against a key that missed a difference, never a substitute for the key."""
    return (result.get("cell") == cell and result.get("seed") == seed and result["quant"].get("scheme") == scheme
            and result["defense"].get("gradient_path") == gradient_path and result.get("attack") == attack)


def files_result(result: dict[str, Any], defense: Any) -> bool:
    """Whether a freshly computed Result may be filed: not invalid, and not a defense that opts out."""
    return result["verdict"]["status"] != "invalid" and getattr(defense, "memoize", True) is not False


def code_of(obj: Any, memo: ResultMemo) -> dict[str, Any]:
    """What identifies the code of a defense or scheme that is not qbd's own: its class and the
    digest of its top-level package (every file of it: a helper module or a data file counts too).
    qbd's own code is in `ResultMemo.environment`. sha256 None: not identifiable."""
    cls = obj if isinstance(obj, type) else type(obj)
    out: dict[str, Any] = {"class": f"{cls.__module__}:{cls.__qualname__}"}
    if cls.__module__.split(".")[0] != "qbd":
        out["sha256"] = memo.code_digest(cls)
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
    from qbd.quant import get_scheme

    codes = {"defense": code_of(defense, bench.memo), "scheme": code_of(get_scheme(scheme), bench.memo)}
    if any("sha256" in c and c["sha256"] is None for c in codes.values()):
        return None
    params = _own_params(defense)
    if params is None:  # parameters qbd cannot write down exactly: their state would not be in the key
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
        "defense": {"name": defense.name, "protocol": getattr(defense, "protocol", "canonical"), "params": params,
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


def _own_params(defense: Any) -> str | None:
    """A defense's `params` written down exactly (NaN, infinities and every type kept apart); None
    when they cannot be (a value JSON cannot hold), or when a defense that is not qbd's declares
    none: its configuration then lives where the key cannot see it."""
    from qbd.defenses.base import declared_params

    p = declared_params(defense)
    if p is None and type(defense).__module__.split(".")[0] != "qbd" and getattr(defense, "memoize", None) is not True:
        return None

    def strict(value: Any) -> Any:
        if isinstance(value, (set, frozenset)):
            return {"set": sorted(strict(v) if not isinstance(v, (str, int, float)) else v for v in value)}
        raise TypeError(type(value).__name__)

    try:
        return json.dumps(dict(p or {}), sort_keys=True, separators=(",", ":"), allow_nan=True, default=strict)
    except (TypeError, ValueError):
        return None


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else the platform's processor string)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
