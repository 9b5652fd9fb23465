"""qbd's pytest plugin, registered once through the `pytest11` entry point.

It only talks to pytest: options, markers, parametrization of the matrix, session fixtures,
collection of Results from every worker, the end-of-session tables and report files. The work
lives in qbd.evaluate / qbd.runner / qbd.report. Importing this module stays cheap: torch is
imported when a qbd fixture is first used, never at collection.

Tests opt in by requesting arguments: `qbd_cell` (one matrix cell) and `qbd_seed` (its model
seed: with --qbd-seeds N each (cell, seed) is a test of its own, so xdist spreads the seeds),
`qbd_attack_case` (dataset, scheme) and `qbd_audit_case` (dataset, scheme); qbd.suite holds
ready test functions. Over several seeds the session ends with each row's rates (qbd.rates),
checked against the rate bounds the expectations declare; a row outside them fails the run.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from qbd.config import PROTOCOLS
from qbd.plugin.cases import groups_by_param_id, marks, matrix_cases
from qbd.plugin.collector import Collector, header
from qbd.plugin.options import OPTIONS, attack_option, opt, parse_model_files, resolve_defenses, subset_of
from qbd.plugin.session import Session
from qbd.plugin.state import MARKERS, QBD_ARGS, STATE, QbdState
from qbd.tiers import TIERS


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qbd", "qbd: backdoor defenses under quantization")
    for name, kw, help_text in OPTIONS:
        group.addoption(f"--qbd-{name}", dest=f"qbd_{name.replace('-', '_')}", default=None, help=help_text, **kw)
        # typed like the option (pytest >= 8.4 reads int and float ini values): `qbd_seeds = 10` is 10, not "10"
        ini_type = ("linelist" if kw.get("action") == "append" else "bool" if kw.get("action") == "store_true"
                    else {int: "int", float: "float"}.get(kw.get("type"), "string"))
        parser.addini(f"qbd_{name.replace('-', '_')}", help_text, type=ini_type, default=None)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`: qbd's cases grouped by model and scheme (qbd.xdist_groups), whatever
    pytest version xdist runs under. Opt-in: plain `-n` keeps xdist's own scheduling."""
    state = config.stash.get(STATE, None)
    if state is None or config.getvalue("dist") != "loadgroup":
        return None
    from qbd.xdist_groups import GroupScheduling

    return GroupScheduling(config, log, groups_by_param_id(state))


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    # xdist registers it; without xdist, --strict-markers must still accept the cells' groups
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist runs tests of one group on one worker")
    tier = opt(config, "tier", "smoke")
    if tier not in TIERS:
        raise pytest.UsageError(f"--qbd-tier {tier!r}: valid: {', '.join(TIERS)}")
    from qbd import devices
    from qbd.errors import ConfigError

    device = opt(config, "device", TIERS[tier].device)
    try:
        devices.check(device)
    except ConfigError as e:
        raise pytest.UsageError(f"--qbd-device: {e}") from None
    proto = opt(config, "protocol", "both")
    if proto not in (*PROTOCOLS, "both"):
        raise pytest.UsageError(f"--qbd-protocol {proto!r}: valid: canonical, paper, both")
    seeds = int(opt(config, "seeds", 1))
    if seeds < 1:
        raise pytest.UsageError(f"--qbd-seeds must be >= 1, got {seeds}")
    raw_timeout = opt(config, "defense-timeout")
    try:
        timeout = None if raw_timeout in (None, "") else float(raw_timeout)
    except ValueError:
        timeout = float("nan")
    if timeout is not None and not (0 < timeout < float("inf")):
        raise pytest.UsageError(f"--qbd-defense-timeout must be a number of seconds > 0, got {raw_timeout!r}")
    model_files = parse_model_files(opt(config, "model-file", []) or [])
    if model_files and seeds > 1:
        raise pytest.UsageError(f"--qbd-seeds {seeds} evaluates {seeds} models per data set; --qbd-model-file is one model: drop one")
    refs = list(opt(config, "defense", []) or [])
    defense_names, chosen = resolve_defenses(refs)
    from qbd.quant import scheme_names

    attack = attack_option(opt(config, "attack", "badnet"))
    # a data set of the tier's; a scheme of the catalog, as `qbd run --quant` takes (the tier's first)
    subset = {"dataset": subset_of(opt(config, "dataset"), TIERS[tier].datasets, "dataset of this tier"),
              "scheme": subset_of(opt(config, "scheme"), tuple(dict.fromkeys((*TIERS[tier].schemes, *scheme_names()))), "scheme")}
    if subset["scheme"] is None and attack.wakes_in:  # as `qbd run --attack quant-conditioned`: its deployment too
        subset["scheme"] = tuple(dict.fromkeys((*TIERS[tier].schemes, attack.wakes_in)))
    reuse, fresh = bool(opt(config, "reuse-results", False)), bool(opt(config, "fresh", False))
    if reuse and fresh:
        raise pytest.UsageError("--qbd-fresh reuses nothing and --qbd-reuse-results reuses earlier sessions' Results: choose one")
    exp = opt(config, "expectations")
    exp_path = Path(exp) if exp else None  # None: the table qbd ships (qbd.expectations.shipped)
    accept = bool(opt(config, "accept", False))
    if accept and exp_path is None:  # never rewrite the table inside the installed package
        raise pytest.UsageError("--qbd-accept writes its proposals to the table named by --qbd-expectations FILE;"
                                " name one (a copy of the shipped table, or a new file)")
    table = None
    if not (accept and exp_path is not None and not exp_path.exists()):  # --qbd-accept may start a new table
        from qbd import expectations
        from qbd.errors import ConfigError

        try:  # torch-free; a bad table is a usage error before any model is trained
            table = expectations.load_for(tier, exp_path)
        except ConfigError as e:
            raise pytest.UsageError(f"--qbd-expectations: {e}") from None
        if table.tier != tier:
            raise pytest.UsageError(f"--qbd-expectations {exp_path}: a table for the {table.tier!r} tier; this run is the {tier!r} tier")
    state = QbdState(
        tier=tier,
        protocols=PROTOCOLS if proto == "both" else (proto,),
        defenses=sorted(defense_names, key=lambda r: defense_names[r]),
        defense_names=defense_names,
        defenses_chosen=chosen,
        seeds=seeds,
        model_files=model_files,
        defense_timeout=timeout,
        device=device,
        cache_dir=opt(config, "cache-dir"),
        data_root=opt(config, "data-root"),
        report_dir=opt(config, "report"),
        accept=accept,
        expectations_path=exp_path,
        expectations=table,
        memo={"reuse": reuse, "fresh": fresh,
              # one session id for the controller and its xdist workers (pytest_configure_node hands it
              # over): they reuse each other's Results, and no other session does
              "session": getattr(config, "workerinput", {}).get("qbd_memo_session") or uuid.uuid4().hex},
        attack_name=attack.name,
        datasets=subset["dataset"],
        schemes=subset["scheme"],
    )
    config.stash[STATE] = state
    config.pluginmanager.register(Collector(state, config), "qbd-collector")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, on the controller, before a worker starts: the worker joins its memo session."""
    state = node.config.stash.get(STATE, None)
    if state is not None:
        node.workerinput["qbd_memo_session"] = state.memo["session"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    state: QbdState | None = metafunc.config.stash.get(STATE, None)
    if state is None or not any(a in metafunc.fixturenames for a in QBD_ARGS):
        return  # not a qbd test: nothing is read (entry points included)
    cases = matrix_cases(state)

    def params(arg: str) -> list[Any]:
        return [pytest.param(*values, id=pid, marks=marks(state, values[0][0] if arg.endswith("_case") else values[0].dataset, group))
                for pid, values, group in cases[arg]]

    if "qbd_cell" in metafunc.fixturenames:
        if state.seeds > 1 and "qbd_seed" not in metafunc.fixturenames:
            # it would run seed 0 alone while the session reports N-seed rows
            raise pytest.UsageError(f"--qbd-seeds {state.seeds}: {metafunc.definition.nodeid} takes qbd_cell but not"
                                    " qbd_seed, so it cannot run the other seeds; request qbd_seed too (as qbd.suite.test_cell does)")
        if state.seeds > 1:
            metafunc.parametrize(("qbd_cell", "qbd_seed"), params("qbd_cell+qbd_seed"))
        else:
            metafunc.parametrize("qbd_cell", params("qbd_cell"))
    for argname in ("qbd_attack_case", "qbd_audit_case"):
        if argname in metafunc.fixturenames:
            metafunc.parametrize(argname, params(argname))


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str]:
    """The run's qbd settings, shown only when qbd cases were collected (an unrelated project sees nothing)."""
    state: QbdState | None = config.stash.get(STATE, None)
    n = sum(1 for it in items if any(a in getattr(getattr(it, "callspec", None), "params", {}) for a in QBD_ARGS))
    if state is None or n == 0:
        return []
    return header(state, n)


@pytest.fixture(scope="session")
def qbd_session(request: pytest.FixtureRequest) -> Session:
    state = request.config.stash.get(STATE, None)
    if state is None:
        pytest.skip("the qbd plugin is not configured")
    return Session(state)


@pytest.fixture(scope="session")
def qbd_memo(qbd_session: Session) -> Any:
    """This session's qbd.memo.ResultMemo: pass it to a bench (qbd.runner.seeded_bench(..., memo=qbd_memo))
    so that a cell another test computed is reused, not recomputed."""
    return qbd_session.memo


@pytest.fixture
def qbd_seed() -> int:
    """The cell's model seed: 0, unless --qbd-seeds N > 1 parametrizes it (pytest_generate_tests)."""
    return 0


@pytest.fixture
def qbd_record(request: pytest.FixtureRequest):
    """Attach a JSON payload to this test's report; the controller collects it (xdist-safe)."""

    def record(kind: str, payload: dict[str, Any]) -> None:
        request.node.user_properties.append((kind, json.dumps(payload, allow_nan=False)))

    return record


