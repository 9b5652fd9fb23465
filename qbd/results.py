"""The Result contract (one per cell, JSON) and its validation. Torch-free."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qbd.outcomes import JUDGEMENTS
from qbd.reason_codes import REASON_CODES

STATUSES = ("detected", "clean", "invalid")
SCHEMA_VERSION = 1

# key -> accepted types (None = JSON null allowed)
_TOP: dict[str, tuple[type, ...]] = {
    "cell": (str,),
    "dataset": (str,),
    "model": (str,),
    "seed": (int,),
    "attack": (dict, type(None)),
    "quant": (dict,),
    "defense": (dict,),
    "verdict": (dict,),
    "clean_acc": (float, int),
    "asr": (float, int, type(None)),
    "seconds": (float, int),
    "versions": (dict,),
}
_ATTACK = ("name", "target", "trigger_pattern", "trigger_size", "trigger_position", "poison_rate")
_VERDICT = ("status", "score", "threshold", "target_class", "reason", "reason_code", "evidence", "controls")
_AUDIT = ("quantized_param_fraction", "input_gradient", "engine", "differentiable")


class ResultError(ValueError):
    """A Result does not satisfy the contract."""


def problems(result: Any) -> list[str]:
    """Everything wrong with one Result (empty when it satisfies the contract)."""
    if not isinstance(result, dict):
        return [f"a Result is a JSON object, got {type(result).__name__}"]
    out = []
    for key, types in _TOP.items():
        if key not in result:
            out.append(f"missing key {key!r}")
        elif not isinstance(result[key], types) or isinstance(result[key], bool):
            out.append(f"{key!r} has type {type(result[key]).__name__}")
    if out:
        return out
    for key in ("clean_acc", "asr"):
        v = result[key]
        if v is not None and not (math.isfinite(v) and 0.0 <= v <= 1.0):
            out.append(f"{key!r} must be a fraction in [0, 1], got {v}")
    if result["attack"] is not None:
        out += [f"attack lacks {k!r}" for k in _ATTACK if k not in result["attack"]]
    q = result["quant"]
    if not isinstance(q.get("scheme"), str):
        out.append("quant.scheme missing")
    audit = q.get("audit")
    if not isinstance(audit, dict):
        out.append("quant.audit missing")
    else:
        out += [f"quant.audit lacks {k!r}" for k in _AUDIT if k not in audit]
    d = result["defense"]
    for k in ("name", "protocol", "params"):
        if k not in d:
            out.append(f"defense lacks {k!r}")
    v = result["verdict"]
    out += [f"verdict lacks {k!r}" for k in _VERDICT if k not in v]
    if v.get("status") not in STATUSES:
        out.append(f"verdict.status must be one of {STATUSES}, got {v.get('status')!r}")
    if v.get("status") == "invalid" and not v.get("reason"):
        out.append("an invalid verdict needs a reason")
    if v.get("status") == "invalid" and not (isinstance(v.get("reason_code"), str) and v["reason_code"] in REASON_CODES):
        out.append(f"an invalid verdict needs a reason_code from {sorted(REASON_CODES)}, got {v.get('reason_code')!r}")
    if v.get("status") != "invalid" and v.get("reason_code") is not None:
        out.append("only an invalid verdict carries a reason_code")
    j = result.get("judgement")  # optional: the outcome against the truth and the expectations (qbd.outcomes)
    if j is not None and not (isinstance(j, dict) and j.get("judgement") in JUDGEMENTS and isinstance(j.get("outcome"), str)):
        out.append(f"judgement must be null or an object with judgement pass|finding|FAIL and an outcome, got {j!r}")
    w = result.get("weights")  # optional provenance: trained by qbd or fetched (pinned sha256)
    if w is not None and not (isinstance(w, dict) and w.get("origin") in ("trained", "fetched")):
        out.append(f"weights must be null or an object with origin 'trained' or 'fetched', got {w!r}")
    elif w is not None and w["origin"] == "fetched" and not isinstance(w.get("sha256"), str):
        out.append("fetched weights must record their sha256")
    return out


def validate(result: Any) -> None:
    p = problems(result)
    if p:
        cell = result.get("cell", "?") if isinstance(result, dict) else "?"
        raise ResultError(f"Result {cell}: " + "; ".join(p))


def dump(results: Iterable[dict[str, Any]]) -> str:
    rs = sorted(results, key=lambda r: r["cell"])
    for r in rs:
        validate(r)
    return json.dumps({"schema": SCHEMA_VERSION, "results": rs}, indent=2, allow_nan=False)


def write(path: str | Path, results: Iterable[dict[str, Any]]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(dump(results) + "\n")
    tmp.replace(p)
    return p


def read(path: str | Path) -> list[dict[str, Any]]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ResultError(f"{path}: expected an object with a 'results' list")
    for r in data["results"]:
        validate(r)
    return data["results"]
