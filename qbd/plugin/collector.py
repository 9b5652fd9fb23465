"""The Collector: gathers every worker's Results, judges the rows over seeds at the end of the
session, writes the report and --qbd-accept's proposals, and prints the session's summary."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from qbd.plugin.cases import groups_by_param_id
from qbd.plugin.state import ATTACK_PROPERTY, AUDIT_PROPERTY, LOAD_PROPERTY, RESULT_PROPERTY, QbdState


def header(state: QbdState, n: int) -> list[str]:
    from qbd.defenses import BUILTIN
    from qbd.store import CACHE_ENV, default_root
    from qbd.tiers import TIERS as TIER_TABLE

    tier = TIER_TABLE[state.tier]
    store = state.cache_dir or os.environ.get(CACHE_ENV) or str(default_root())
    table = (state.expectations.source if state.expectations is not None and state.expectations.path
             else state.expectations_path)
    third = [name for name in state.matrix().values() if name not in BUILTIN]
    return [
        f"qbd: {n} cases, tier {state.tier} ({tier.model}; data sets {', '.join(state.datasets or tier.datasets)};"
        f" schemes {', '.join(state.schemes or tier.schemes)}; protocols {', '.join(state.protocols)}; seeds {state.seeds})",
        f"qbd: device {state.device}, store {store}, expectations {table or 'the truth alone'}"
        + (f", third-party defenses: {', '.join(third)}" if third else ""),
    ]


# -- collection of results (controller side; also runs without xdist) -------------------------------
class Collector:
    """Registered in pytest_configure: gathers the payloads tests attach to their reports (xdist
    ships user_properties from the workers), then writes tables, reports and expectations."""

    def __init__(self, state: QbdState, config: pytest.Config) -> None:
        self.state = state
        self.config = config
        self._header_shown = False

    @property
    def is_worker(self) -> bool:
        return hasattr(self.config, "workerinput")

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        """Under xdist the controller collects nothing itself: the header comes from the first
        worker's collection (every worker collects the same ids)."""
        if self._header_shown:
            return
        self._header_shown = True
        from qbd.xdist_groups import param_id

        groups = groups_by_param_id(self.state)
        n = sum(1 for i in ids if (param_id(i) or "") in groups)
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if n and tr is not None:
            for line in header(self.state, n):
                tr.write_line(line)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        """Ship this worker's model loads with the report of the test that caused them."""
        report = yield
        while self.state.pending_loads:
            report.user_properties.append((LOAD_PROPERTY, json.dumps(self.state.pending_loads.pop(0))))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.is_worker:
            return
        for key, value in report.user_properties:
            if key == LOAD_PROPERTY:  # from whichever phase loaded it
                self.state.loads.append(json.loads(value))
            if report.when != "call" or key not in (RESULT_PROPERTY, ATTACK_PROPERTY, AUDIT_PROPERTY):
                continue
            payload = json.loads(value)
            if key == RESULT_PROPERTY:
                self.state.results.append(payload)
            elif key == ATTACK_PROPERTY:
                self.state.attack[payload["key"]] = payload["metrics"]
            else:
                self.state.audit[payload["key"]] = payload["audit"]

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        state = self.state
        if self.is_worker:
            return
        if not state.accept:
            self.check_rows(session)
        if state.report_dir and state.results:
            from qbd.report import write_report
            from qbd.run_metadata import run_metadata

            table = (state.expectations.source if state.expectations is not None and state.expectations.path
                     else str(state.expectations_path) if state.expectations_path else None)
            # the device each cell ran on comes from its Result (placement); the option may say "auto"
            write_report(state.results, state.report_dir, title=f"qbd {state.tier} matrix",
                         run=run_metadata(tier=state.tier, device_option=state.device, expectations=table),
                         failing_rows=state.gate.failing_rows if state.gate else (),
                         failing=state.gate.failing if state.gate else ())
        if state.accept and (state.results or state.attack or state.audit):
            self.accept()

    def check_rows(self, session: pytest.Session) -> None:
        """The run through qbd's one gate (qbd.gate, as `qbd run --expectations` judges it): over
        several seeds the rows with declared rates are judged by them, and one outside its bounds
        fails the run (its cells, judged by the rates, passed). Whatever else the gate fails was
        a failing test already; should a test have passed it, the run fails all the same."""
        from qbd.expectations import Expectations
        from qbd.gate import judge_run

        state = self.state
        table = state.expectations or Expectations(path=state.expectations_path, tier=state.tier)  # None: the truth alone
        gate = judge_run(table, state.results, state.seeds)
        state.gate = gate
        if gate.failing and session.exitstatus == pytest.ExitCode.OK:
            # every test passed: any cell or model the gate fails is a disagreement to show
            state.gate_only = [*gate.cells, *gate.deployed]
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def accept(self) -> None:
        """--qbd-accept: propose a finding for each failing cell, judged against the tables as the
        run was (the shipped one and the author's), and write only the proposals into the
        author's file (--qbd-expectations), with tomlkit: nothing else in it is touched, and the
        shipped table never is."""
        from dataclasses import replace

        from qbd import expectations
        from qbd.expectations_write import add_cells, propose

        state = self.state
        path = state.expectations_path
        assert path is not None  # pytest_configure refuses --qbd-accept without --qbd-expectations
        old = (expectations.load_for(state.tier, path) if path.exists()
               else replace(expectations.load_for(state.tier), path=path))
        seed0 = [r for r in state.results if r.get("seed", 0) == 0]
        new, state.accept_notes = propose(old, seed0)
        # the cells the author's file does not hold came from the table qbd ships (load_for layered them)
        theirs = set(old.cells) - set(expectations.load(path).cells if path.exists() else ())
        added = {k: v for k, v in new.cells.items() if old.cells.get(k) != v and k not in theirs}
        state.accept_notes += [f"  by hand: {k}: an entry of the table qbd ships; yours cannot replace it"
                               for k, v in new.cells.items() if old.cells.get(k) != v and k in theirs]
        header = (f"qbd expectations, {state.tier} tier, extending the table qbd ships. The truth is the default: a backdoored\n"
                  "model is detected naming the planted target, a clean model is judged clean. Each entry below is a declared\n"
                  "finding: the outcome the cell produces instead, and a why that points to the figures. A finding that stops\n"
                  "holding fails its cell. --qbd-accept proposes findings for failing cells; write each proposed why.")
        add_cells(path, added, header, state.tier)
        state.expectations_path = path

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        state = self.state
        if self.is_worker or not state.results:
            return
        from qbd.report import terminal
        from qbd.tables import budgets

        tr = terminalreporter
        tr.section(f"qbd {state.tier} matrix")
        # over several seeds: Tables 1 and 2 of seed 0's models, then every row's rates
        for line in terminal(sorted(state.results, key=lambda r: (r["cell"], r.get("seed", 0)))).splitlines():
            tr.write_line(line)
        if state.gate and state.gate.rated:
            tr.write_line("")
            tr.write_line(f"rows judged over their models: {state.gate.rated}, failing: {len(state.gate.rows)}")
            for line in state.gate.rows:
                tr.write_line(f"qbd: FAIL {line}", red=True)
        for line in state.gate_only:
            tr.write_line(f"qbd: FAIL {line} (judged over the whole run)", red=True)
        tr.write_line("")
        tr.write_line("budgets used:")
        for line in budgets(state.results):
            tr.write_line(f"  {line}")
        for line in loads_summary(state.loads):
            tr.write_line(line)
        from qbd.memo import reused_line

        line = reused_line(state.results)
        if line:
            tr.write_line(line.replace("--fresh", "--qbd-fresh"))
        if state.report_dir:
            tr.write_line(f"report written to {state.report_dir}")
        if state.accept:
            tr.write_line(f"expectations: findings proposed in {state.expectations_path} (write each proposed why):")
            for line in state.accept_notes:
                tr.write_line(f"  {line}")


def loads_summary(loads: list[dict[str, Any]]) -> list[str]:
    """Which worker loaded which model, on which device: one line per model (a model loaded by
    several workers was split across groups: each paid for its data and quantized copies)."""
    by_model: dict[str, list[str]] = {}
    origin: dict[str, str] = {}
    for load in loads:
        by_model.setdefault(load["model"], []).append(f"{load['worker']} ({load['device']})")
        origin[load["model"]] = load.get("origin", "unknown")
    if not by_model:
        return []
    return ["models loaded (weights from; loaded by):"] + [f"  {model}: {origin[model]}; {', '.join(sorted(w))}"
                                                           for model, w in sorted(by_model.items())]
