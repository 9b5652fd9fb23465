"""The gate: what of a run fails its expectations (cells, deployed models' clean accuracy and ASR,
rows over models). One judge for `qbd run` and the pytest plugin, so that both fail on the same
things; each only prints it its own way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbd.outcomes import Judgement


@dataclass(frozen=True)
class Gate:
    judgements: tuple[Judgement, ...]  # one per Result, in the run's order
    cells: tuple[str, ...]  # "cell (seed s): why" of every failing cell
    deployed: tuple[str, ...]  # a deployed model's clean accuracy or ASR outside its bounds
    rows: tuple[str, ...]  # "row: message" of every row outside its declared rates or counts
    rated: int  # rows judged over their models

    @property
    def failing(self) -> tuple[str, ...]:
        return (*self.cells, *self.deployed, *self.rows)

    @property
    def failing_rows(self) -> frozenset[str]:
        """The ids of the rows outside their declared rates or counts."""
        return frozenset(line.partition(": ")[0] for line in self.rows)


def judge_run(table: Any, results: list[dict[str, Any]], seeds: int) -> Gate:
    """`table`: qbd.expectations.Expectations; `seeds`: models per data set (rows are judged over
    them when above one)."""
    judgements, row_failures, rated = table.judge_run(results, seeds)

    def note(r: dict[str, Any]) -> str:
        return f" (seed {r.get('seed', 0)})" if seeds > 1 else ""

    cells = [f"{r['cell']}{note(r)}: {j.why}" for r, j in zip(results, judgements, strict=True) if j.judgement == "FAIL"]
    # the deployed-model bounds were measured on one model per data set, the zoo's seed 0 (as the
    # plugin's test_attack checks them): any other model (another seed, one trained here, one
    # fetched) has no measured bound, and is not judged by one
    measured = [r for r in results if r.get("attack") is not None and int(r.get("seed", 0)) == 0
                and (r.get("weights") or {}).get("origin") == "zoo"]
    models = {(r["dataset"], r["quant"]["scheme"]): r for r in measured}
    deployed = [f"{ds}/{scheme}{note(r)} (deployed model): {m}" for (ds, scheme), r in sorted(models.items())
                for m in table.check_attack(f"{ds}/{scheme}", r["clean_acc"], r["asr"], own=table.measured_on(r),
                                            attack=r.get("attack"), engine=r["quant"]["audit"].get("engine"))]
    return Gate(tuple(judgements), tuple(cells), tuple(deployed), tuple(row_failures), rated)
