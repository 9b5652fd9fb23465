"""The Result contract (one per cell, JSON), the row of rates over seeds (qbd.rates), and their
validation. Torch-free.

A results file (results.json, `qbd run --json`) is `{"schema": 1, "results": [Result, ...],
"rows": [row, ...], "effects": [effect, ...], "run": {...}}`; "effects" are quantization's paired
effects against fp32 on the same models (qbd.effects); "run" (the run's metadata: versions,
command, tier, device..., qbd.run_metadata) is optional, and a file written before rows or
effects existed has no "rows" or "effects": it still loads, under the same schema version (a
reader that ignores unknown keys reads them all).

The Result's types (qbd.result_types) are its one definition: problems() is their check, schema()
their JSON Schema (draft 2020-12), shipped as qbd/schema/result.schema.json for readers outside qbd."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qbd.result_types import SCHEMA_VERSION, Result, ResultError, json_schema

SCHEMA_FILE = "result.schema.json"  # shipped for readers outside qbd; json_schema() is what it holds


def problems(result: Any) -> list[str]:
    """Everything wrong with one Result (empty when it satisfies the contract): the check the
    Result's types state (qbd.result_types)."""
    return Result.problems(result)


def validate(result: Any) -> None:
    """Raise ResultError, naming the cell and every problem, unless the Result satisfies the contract."""
    Result.validate(result)


_ROW_STR = ("row", "dataset", "scheme", "defense", "protocol")
_ROW_COUNTS = ("n_backdoored", "detected", "n_clean", "false_alarms", "invalid")
# rate key -> (its interval's key, its count, its number of models)
_ROW_RATES = {"detection_rate": ("detection_ci", "detected", "n_backdoored"),
              "false_alarm_rate": ("false_alarm_ci", "false_alarms", "n_clean")}


def row_problems(row: Any) -> list[str]:
    """Everything wrong with one row of rates (empty when it satisfies the contract)."""
    if not isinstance(row, dict):
        return [f"a row is a JSON object, got {type(row).__name__}"]
    out = [f"row key {k!r} must be a string" for k in _ROW_STR if not isinstance(row.get(k), str)]
    out += [f"row key {k!r} must be an integer >= 0" for k in _ROW_COUNTS
            if not (isinstance(row.get(k), int) and not isinstance(row.get(k), bool) and row[k] >= 0)]
    seeds = row.get("seeds")
    if not (isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        out.append("row key 'seeds' must be a list of integers")
    oc = row.get("outcomes", {})  # absent in a file written before outcome counts existed
    if not (isinstance(oc, dict) and set(oc) <= {"backdoored", "clean"} and all(
            isinstance(c, dict) and all(isinstance(o, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                        for o, n in c.items()) for c in oc.values())):
        out.append("row key 'outcomes' must map backdoored / clean to {outcome: number of models}")
    if out:
        return out
    for rate_key, (ci_key, k_key, n_key) in _ROW_RATES.items():
        rate, ci, k, n = row.get(rate_key, "missing"), row.get(ci_key, "missing"), row[k_key], row[n_key]
        if k > n:
            out.append(f"{k_key} {k} > {n_key} {n}")
        elif n == 0:
            if rate is not None or ci is not None:
                out.append(f"{rate_key} and {ci_key} must be null when {n_key} is 0")
        elif not _fraction(rate) or abs(rate - k / n) > 1e-9:
            out.append(f"{rate_key} must be {k_key} / {n_key} = {k / n}, got {rate!r}")
        elif not (isinstance(ci, list) and len(ci) == 2 and all(_fraction(x) for x in ci) and ci[0] <= rate <= ci[1]):
            out.append(f"{ci_key} must be [low, high] in [0, 1] around {rate_key}, got {ci!r}")
    if oc and (sum(oc.get("backdoored", {}).values()) != row["n_backdoored"] or sum(oc.get("clean", {}).values()) != row["n_clean"]):
        out.append("row key 'outcomes' must count every model of the row")
    return out


def _fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0


def validate_row(row: Any) -> None:
    p = row_problems(row)
    if p:
        rid = row.get("row", "?") if isinstance(row, dict) else "?"
        raise ResultError(f"row {rid}: " + "; ".join(p))


def dump(results: Iterable[dict[str, Any]], rows: list[dict[str, Any]] | None = None,
         run: dict[str, Any] | None = None) -> str:
    """The results file's text; `rows` default to qbd.rates.rows(results); `run`, the run's
    metadata, is written under "run" when given."""
    from qbd import rates

    rs = sorted(results, key=lambda r: (r["cell"], r.get("seed", 0)))
    for r in rs:
        validate(r)
    rows = rates.rows(rs) if rows is None else rows
    for row in rows:
        validate_row(row)
    found = effects_of(rs)
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "results": rs, "rows": rows, "effects": found}
    if run is not None:
        if not isinstance(run, dict):
            raise ResultError(f"the run's metadata is a JSON object, got {type(run).__name__}")
        doc["run"] = run
    try:
        return json.dumps(doc, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:  # a Path or a NaN in the metadata (ResultError is a ValueError too)
        raise ResultError(f"the results file is not plain JSON: {e}") from None


def effects_of(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Quantization's paired effects (qbd.effects) of a set of Results, each checked."""
    from qbd.effects import effect_problems, effects

    found = effects(results)
    for e in found:
        p = effect_problems(e)
        if p:
            raise ResultError(f"effect {e.get('effect', '?')}: " + "; ".join(p))
    return found


def write(path: str | Path, results: Iterable[dict[str, Any]], rows: list[dict[str, Any]] | None = None,
          run: dict[str, Any] | None = None) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(dump(results, rows, run) + "\n")
    tmp.replace(p)
    return p


def _document(path: str | Path) -> dict[str, Any]:
    """A results file's top-level object, its shape checked (not yet its Results and rows)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ResultError(f"{path}: expected an object with a 'results' list")
    if not isinstance(data.get("rows", []), list):
        raise ResultError(f"{path}: 'rows' must be a list")
    if not isinstance(data.get("run", {}), dict):
        raise ResultError(f"{path}: 'run' must be an object")
    version = data.get("schema", SCHEMA_VERSION)  # a file of bare Results (a fixture) may leave it out
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise ResultError(f"{path}: results format {version!r}, but this qbd reads format {SCHEMA_VERSION}: read it with the"
                          " qbd that wrote it (its 'run' names the version)")
    return data


def load(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(results, rows) of a results file, both validated; rows are [] in a file that has none."""
    data = _document(path)
    rows = data.get("rows", [])
    for r in data["results"]:
        validate(r)
    for row in rows:
        validate_row(row)
    if rows:  # the rows are a summary of the results: a file whose two disagree is not trusted
        from qbd import rates

        expected = rates.rows(data["results"])
        if all("outcomes" not in row for row in rows):  # written before rows carried their outcome counts
            expected = [{k: v for k, v in row.items() if k != "outcomes"} for row in expected]
        if rows != expected:
            raise ResultError(f"{path}: its 'rows' are not the rates of its 'results' (edited, or written by another version)")
    if "effects" in data and data["effects"] != effects_of(data["results"]):  # likewise (a file from before effects has none)
        raise ResultError(f"{path}: its 'effects' are not the paired effects of its 'results' (edited, or written by another version)")
    return data["results"], rows


def read(path: str | Path) -> list[dict[str, Any]]:
    """The Results of a results file (load() for its rows too)."""
    return load(path)[0]


def read_run(path: str | Path) -> dict[str, Any] | None:
    """The run's metadata of a results file (None in a file written without it)."""
    return _document(path).get("run")


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one Result (qbd/schema/result.schema.json holds the same)."""
    return json_schema()
