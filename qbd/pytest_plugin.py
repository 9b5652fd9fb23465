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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qbd.config import PROTOCOLS, TIERS

# prefixed: the plugin is installed in every project of the environment, whose own markers it must not claim
MARKERS = {
    "qbd_smoke": "qbd's smoke matrix on the embedded data sets (CPU, tiny model)",
    "qbd_paper": "qbd's paper tier: ResNet-18 on CIFAR-10 / GTSRB (needs the data, practical on a GPU)",
    "qbd_gpu": "needs a CUDA device",
}
RESULT_PROPERTY = "qbd_result"
ATTACK_PROPERTY = "qbd_attack"
AUDIT_PROPERTY = "qbd_audit"
QBD_ARGS = ("qbd_cell", "qbd_attack_case", "qbd_audit_case")  # the arguments qbd parametrizes
LOAD_PROPERTY = "qbd_load"  # a worker loaded a model (its data, weights, quantized copies)
_STATE = pytest.StashKey["QbdState"]()


@dataclass
class QbdState:
    """Per-session state, kept in config.stash (never in module globals)."""

    tier: str
    protocols: tuple[str, ...]
    defenses: list[str]  # built-in names and --qbd-defense module:Class references, sorted by cell name
    defense_names: dict[str, str]  # reference -> the defense's `name`
    seeds: int
    model_files: dict[str, Any]  # data set -> qbd.fetch.Source
    defense_timeout: float | None
    device: str  # as asked (auto, cpu, cuda, cuda:N); each worker resolves it (qbd.devices)
    cache_dir: str | None
    data_root: str | None
    report_dir: str | None
    accept: bool
    expectations_path: Path | None
    expectations: Any = None  # qbd.expectations.Expectations, loaded at configure time
    defenses_chosen: bool = False  # --qbd-defense named the matrix's defenses (no installed one joins unnamed)
    results: list[dict[str, Any]] = field(default_factory=list)
    accept_notes: list[str] = field(default_factory=list)
    attack: dict[str, dict[str, Any]] = field(default_factory=dict)
    audit: dict[str, dict[str, Any]] = field(default_factory=dict)
    row_failures: list[str] = field(default_factory=list)  # "row: message", computed at session end
    rows_by_rates: int = 0  # how many rows were judged by their rates
    pending_loads: list[dict[str, Any]] = field(default_factory=list)  # worker side, until the next report
    datasets: tuple[str, ...] | None = None  # --qbd-dataset: a subset of the tier's (None: all)
    schemes: tuple[str, ...] | None = None  # --qbd-scheme: schemes of the catalog (None: the tier's)
    _matrix: dict[str, str] | None = None  # ref -> name with the entry points, once the matrix is built

    def matrix(self) -> dict[str, str]:
        """Every defense of the matrix, ref -> cell name, sorted by name: the built-ins and the
        --qbd-defense references, then the `qbd.defenses` entry points, read from package
        metadata when the matrix is first parametrized (never at configure time, so a project
        without qbd tests never touches them) and imported only when one of their cells runs."""
        if self._matrix is None:
            import warnings

            from qbd.defenses import available

            names = dict(self.defense_names)
            for a in [] if self.defenses_chosen else available():
                if a.builtin:
                    continue
                if a.name in names.values():
                    warnings.warn(f"qbd: the defense {a.name!r} of the {a.origin} is skipped: --qbd-defense names one"
                                  " with that name", pytest.PytestWarning, stacklevel=2)
                    continue
                names[a.name] = a.name  # load_defense resolves entry-point names
            self._matrix = dict(sorted(names.items(), key=lambda kv: kv[1]))
        return self._matrix
    loads: list[dict[str, Any]] = field(default_factory=list)  # controller side: every worker's loads

    def by_rates(self, row_id: str) -> bool:
        """Whether the row's cells are judged by its rates (qbd.expectations.Expectations.by_rates):
        the plugin's backdoored models all carry the default BadNet (seeded per model)."""
        from qbd.config import AttackSpec, to_dict

        return self.expectations is not None and self.expectations.by_rates(row_id, to_dict(AttackSpec()), self.seeds)


# -- options ------------------------------------------------------------------------------------
_OPTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("tier", {"choices": ("smoke", "paper")}, "matrix tier: smoke (CPU, embedded data) or paper (default: smoke)"),
    ("cache-dir", {}, "model store: a directory or a URL (s3://bucket/prefix, file:///path) shared by workers and hosts (default: $QBD_CACHE_DIR, else the user cache)"),
    ("data-root", {}, "where CIFAR-10 / GTSRB live for the paper tier (default: $QBD_DATA_ROOT)"),
    ("defense", {"action": "append"}, "run only these defenses, comma-separated (repeatable), as `qbd run --defense` takes them:"
     " built-in or installed names, or a third-party 'module:Class' (default: the built-ins and the installed ones)"),
    ("protocol", {"choices": ("canonical", "paper", "both")}, "protocol(s) to run (default: both)"),
    ("report", {}, "write results.json, report.md and heatmap.png to this directory"),
    ("accept", {"action": "store_true"}, "propose a finding (with a why still to write) for every failing cell of this run, in the"
     " expectations file; existing findings, whys and pins are kept"),
    ("seeds", {"type": int}, "run every cell on this many model seeds (0 .. N-1, each a test of its own), report each row's"
     " detection and false-alarm rates, and check the rate bounds the expectations declare (default: 1)"),
    ("expectations", {}, "expectations TOML (default: the table qbd ships for the tier, qbd/expected/<tier>.toml)"),
    ("model-file", {"action": "append"}, "DATASET=PATH@SHA256: use these (untrusted) weights as DATASET's backdoored model"
     " instead of training it; safetensors or a weights_only state dict, pinned by sha256 (repeatable)"),
    ("defense-timeout", {"type": float}, "seconds a defense may run per cell; past it the cell is invalid (default: no limit)"),
    ("dataset", {}, "run only these of the tier's data sets, comma-separated (default: all of them)"),
    ("scheme", {}, "run these schemes, comma-separated: the tier's or any other of the catalog, as `qbd run --quant` takes"
     " (e.g. onnx-int8-static) (default: the tier's; the clean model's negative control runs on each of them)"),
    ("device", {}, "where models train and defenses run: auto (CUDA when present), cpu, cuda or cuda:N; under xdist a bare"
     " cuda (or auto on a GPU host) gives worker k cuda:{k mod GPUs} (default: the tier's: cpu for smoke, auto for paper)"),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qbd", "qbd: backdoor defenses under quantization")
    for name, kw, help_text in _OPTIONS:
        group.addoption(f"--qbd-{name}", dest=f"qbd_{name.replace('-', '_')}", default=None, help=help_text, **kw)
        ini_type = "linelist" if kw.get("action") == "append" else "bool" if kw.get("action") == "store_true" else "string"
        parser.addini(f"qbd_{name.replace('-', '_')}", help_text, type=ini_type, default=None)


def _opt(config: pytest.Config, name: str, default: Any = None) -> Any:
    key = f"qbd_{name.replace('-', '_')}"
    v = config.getoption(key)
    if v is None or v == []:
        v = config.getini(key)
    return default if v is None or v == [] else v


def _model_files(specs: list[str]) -> dict[str, Any]:
    """["digits=/m.safetensors@<sha256>", ...] -> {"digits": Source}; torch-free (qbd.fetch is)."""
    from qbd.errors import QbdUserError
    from qbd.fetch import Source

    out: dict[str, Any] = {}
    for spec in specs:
        dataset, eq, rest = spec.partition("=")
        path, at, digest = rest.rpartition("@")
        if not (eq and at and dataset and path):
            raise pytest.UsageError(f"--qbd-model-file {spec!r}: expected DATASET=PATH@SHA256")
        if dataset in out:
            raise pytest.UsageError(f"--qbd-model-file: two files for {dataset!r}")
        try:
            out[dataset] = Source(path, digest)
        except QbdUserError as e:
            raise pytest.UsageError(f"--qbd-model-file {spec!r}: {e}") from None
    return out


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`: qbd's cases grouped by model and scheme (qbd.xdist_groups), whatever
    pytest version xdist runs under. Opt-in: plain `-n` keeps xdist's own scheduling."""
    state = config.stash.get(_STATE, None)
    if state is None or config.getvalue("dist") != "loadgroup":
        return None
    from qbd.xdist_groups import GroupScheduling

    return GroupScheduling(config, log, groups_by_param_id(state))


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    # xdist registers it; without xdist, --strict-markers must still accept the cells' groups
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist runs tests of one group on one worker")
    tier = _opt(config, "tier", "smoke")
    if tier not in TIERS:
        raise pytest.UsageError(f"--qbd-tier {tier!r}: valid: {', '.join(TIERS)}")
    from qbd import devices
    from qbd.errors import ConfigError
    from qbd.tiers import TIERS as TIER_TABLE

    device = _opt(config, "device", TIER_TABLE[tier].device)
    try:
        devices.check(device)
    except ConfigError as e:
        raise pytest.UsageError(f"--qbd-device: {e}") from None
    proto = _opt(config, "protocol", "both")
    if proto not in (*PROTOCOLS, "both"):
        raise pytest.UsageError(f"--qbd-protocol {proto!r}: valid: canonical, paper, both")
    seeds = int(_opt(config, "seeds", 1))
    if seeds < 1:
        raise pytest.UsageError(f"--qbd-seeds must be >= 1, got {seeds}")
    raw_timeout = _opt(config, "defense-timeout")
    try:
        timeout = None if raw_timeout in (None, "") else float(raw_timeout)
    except ValueError:
        timeout = float("nan")
    if timeout is not None and not (0 < timeout < float("inf")):
        raise pytest.UsageError(f"--qbd-defense-timeout must be a number of seconds > 0, got {raw_timeout!r}")
    model_files = _model_files(_opt(config, "model-file", []) or [])
    if model_files and seeds > 1:
        raise pytest.UsageError(f"--qbd-seeds {seeds} evaluates {seeds} models per data set; --qbd-model-file is one model: drop one")
    refs = list(_opt(config, "defense", []) or [])
    defense_names, chosen = _resolve_defenses(refs)
    from qbd.quant import SCHEMES

    # a data set of the tier's; a scheme of the catalog, as `qbd run --quant` takes (the tier's first)
    subset = {"dataset": _subset(_opt(config, "dataset"), TIER_TABLE[tier].datasets, "dataset of this tier"),
              "scheme": _subset(_opt(config, "scheme"), tuple(dict.fromkeys((*TIER_TABLE[tier].schemes, *SCHEMES.names()))), "scheme")}
    exp = _opt(config, "expectations")
    exp_path = Path(exp) if exp else None  # None: the table qbd ships (qbd.expectations.shipped)
    accept = bool(_opt(config, "accept", False))
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
        cache_dir=_opt(config, "cache-dir"),
        data_root=_opt(config, "data-root"),
        report_dir=_opt(config, "report"),
        accept=accept,
        expectations_path=exp_path,
        expectations=table,
        datasets=subset["dataset"],
        schemes=subset["scheme"],
    )
    config.stash[_STATE] = state
    config.pluginmanager.register(Collector(state, config), "qbd-collector")


def _subset(text: str | None, valid: tuple[str, ...], kind: str) -> tuple[str, ...] | None:
    """--qbd-dataset / --qbd-scheme "a,b" -> ("a", "b"), each one of `valid` (did-you-mean otherwise)."""
    if not text:
        return None
    from qbd.registry import unknown_message

    option = kind.split()[0]
    items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not items:
        raise pytest.UsageError(f"--qbd-{option} {text!r}: no {option} named")
    if items == ("all",):  # as `qbd run --quant all`
        return valid
    for it in items:
        if it not in valid:
            raise pytest.UsageError(f"--qbd-{option}: {unknown_message(kind, it, list(valid))}")
    return tuple(v for v in valid if v in items) or None


def _resolve_defenses(values: list[str]) -> tuple[dict[str, str], bool]:
    """--qbd-defense values (repeatable, each comma-separated, as `qbd run --defense` takes them):
    names of built-in or installed defenses and 'module:Class' references -> ({ref: name}, whether
    the user chose the matrix's defenses). None given: the built-ins, and the entry points join
    later (QbdState.matrix). A reference the user typed is imported now, so a broken one is a
    usage error naming it; a name is checked against the entry points' metadata, not imported."""
    from qbd.defenses import BUILTIN, available
    from qbd.registry import load_ref, unknown_message

    items = list(dict.fromkeys(v.strip() for raw in values for v in raw.split(",") if v.strip()))
    if values and not items:
        raise pytest.UsageError("--qbd-defense: no defense named (give names or 'package.module:Class', comma-separated)")
    if not items or items == ["all"]:  # `all`, as `qbd run --defense all`: the default matrix
        return {n: n for n in BUILTIN}, False
    names: dict[str, str] = {}
    for ref in items:
        if ":" not in ref:
            installed = [a.name for a in available()]
            if ref not in installed:
                raise pytest.UsageError(f"--qbd-defense: {unknown_message('defense', ref, installed)}"
                                        " (a third-party class is named as 'package.module:Class')")
            if ref in names.values():
                raise pytest.UsageError(f"--qbd-defense {ref!r}: a 'module:Class' given before it already has that name")
            names[ref] = ref
            continue
        try:
            obj = load_ref(ref)
        except (ImportError, AttributeError, ValueError) as e:
            raise pytest.UsageError(f"--qbd-defense {ref!r}: cannot import it: {type(e).__name__}: {e}") from None
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name or not callable(getattr(obj, "detect", None)):
            raise pytest.UsageError(
                f"--qbd-defense {ref!r}: {obj!r} is not a qbd defense (it needs a str `name`, a `requires` set and a"
                " `detect(subject, inputs, generator) -> Verdict` method)"
            )
        if name in BUILTIN:
            raise pytest.UsageError(f"--qbd-defense {ref!r}: its name {name!r} is a built-in defense's; give your class another")
        if name in names.values():
            raise pytest.UsageError(f"--qbd-defense {ref!r}: a defense named {name!r} is already in the matrix")
        names[ref] = name
    return names, True


# -- parametrization ----------------------------------------------------------------------------
def _data_missing(dataset: str, root: str | None) -> str | None:
    """Why a paper-tier data set cannot run (checked on the file system, without torch)."""
    from qbd.data import DATA_ROOT_ENV

    base = root or os.environ.get(DATA_ROOT_ENV)
    if not base:
        return f"{dataset}: no data root (pass --qbd-data-root or set ${DATA_ROOT_ENV})"
    marker = {"cifar10": "cifar-10-batches-py", "gtsrb": "gtsrb"}.get(dataset)
    if marker and not (Path(base) / marker).exists():
        return f"{dataset}: {Path(base) / marker} not found"
    return None


def _group(dataset: str, kind: str, seed: int, scheme: str) -> str:
    """The scheduling group of a case: its model and scheme. Under xdist (qbd.xdist_groups) a
    worker loads a model at most once and each (model, scheme) is quantized by one worker only;
    grouping by model alone would leave all but 4 workers idle on the one-seed matrix (2 data
    sets x 2 kinds)."""
    return f"qbd:{dataset}:{kind}:seed{seed}:{scheme}"


def _cases(state: QbdState) -> dict[str, list[tuple[str, tuple[Any, ...], str]]]:
    """Every parametrized qbd argument's cases: {argname: [(param id, values, group)]}. The same
    list parametrizes the tests (workers) and groups them for scheduling (controller)."""
    from qbd.tiers import TIERS as TIER_TABLE
    from qbd.tiers import Cell

    tier = TIER_TABLE[state.tier]
    datasets, schemes = state.datasets or tier.datasets, state.schemes or tier.schemes
    cells = []
    for ds in datasets:
        for name in state.matrix().values():
            for proto in state.protocols:
                cells += [Cell(ds, s, name, proto) for s in schemes]
                # the negative control on every scheme, as in `qbd run`: a defense that false-alarms only
                # once the clean model is quantized is a blindspot too
                cells += [Cell(ds, s, name, proto, "clean") for s in schemes]
    cells.sort(key=lambda c: c.id)
    pairs = sorted((ds, s) for ds in datasets for s in schemes)
    attack = [(f"{ds}/{s}", ((ds, s),), _group(ds, "backdoored", 0, s)) for ds, s in pairs]
    return {
        # one seed: seed 0 (the qbd_seed fixture), today's ids
        "qbd_cell": [(c.id, (c,), _group(c.dataset, c.control, 0, c.scheme)) for c in cells],
        "qbd_cell+qbd_seed": [(f"{c.id}-seed{s}", (c, s), _group(c.dataset, c.control, s, c.scheme))
                              for c in cells for s in range(state.seeds)],
        "qbd_attack_case": attack,
        "qbd_audit_case": attack,
    }


def groups_by_param_id(state: QbdState) -> dict[str, str]:
    """{param id: group} of every case this session parametrizes (for qbd.xdist_groups)."""
    several = state.seeds > 1
    return {pid: group for arg, cases in _cases(state).items() if arg != ("qbd_cell" if several else "qbd_cell+qbd_seed")
            for pid, _, group in cases}


def _marks(state: QbdState, dataset: str, group: str | None = None) -> list[Any]:
    marks: list[Any] = [getattr(pytest.mark, f"qbd_{state.tier}")]
    if group is not None:
        marks.append(pytest.mark.xdist_group(group))
    if state.tier == "paper":
        marks.append(pytest.mark.qbd_gpu)
        why = _data_missing(dataset, state.data_root)
        if why:
            marks.append(pytest.mark.skip(reason=why))
    return marks


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    state: QbdState | None = metafunc.config.stash.get(_STATE, None)
    if state is None or not any(a in metafunc.fixturenames for a in QBD_ARGS):
        return  # not a qbd test: nothing is read (entry points included)
    cases = _cases(state)

    def params(arg: str) -> list[Any]:
        return [pytest.param(*values, id=pid, marks=_marks(state, values[0][0] if arg.endswith("_case") else values[0].dataset, group))
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
    state: QbdState | None = config.stash.get(_STATE, None)
    n = sum(1 for it in items if any(a in getattr(getattr(it, "callspec", None), "params", {}) for a in QBD_ARGS))
    if state is None or n == 0:
        return []
    return _header(state, n)


def _header(state: QbdState, n: int) -> list[str]:
    from qbd.defenses import BUILTIN
    from qbd.store import CACHE_ENV, default_root
    from qbd.tiers import TIERS as TIER_TABLE

    tier = TIER_TABLE[state.tier]
    store = state.cache_dir or os.environ.get(CACHE_ENV) or str(default_root())
    table = state.expectations_path or (state.expectations.path if state.expectations is not None else None)
    third = [name for name in state.matrix().values() if name not in BUILTIN]
    return [
        f"qbd: {n} cases, tier {state.tier} ({tier.model}; data sets {', '.join(state.datasets or tier.datasets)};"
        f" schemes {', '.join(state.schemes or tier.schemes)}; protocols {', '.join(state.protocols)}; seeds {state.seeds})",
        f"qbd: device {state.device}, store {store}, expectations {table or 'the truth alone'}"
        + (f", third-party defenses: {', '.join(third)}" if third else ""),
    ]


# -- fixtures -----------------------------------------------------------------------------------
class Session:
    """Gets benches (trained model + data + quantized copies) lazily, one per data set and kind,
    from the store: a model is trained at most once per machine, whatever the worker count."""

    def __init__(self, state: QbdState) -> None:
        self.state = state
        self._benches: dict[tuple[str, str, int], Any] = {}
        self._data: dict[str, Any] = {}
        self._device: str | None = None

    @property
    def device(self) -> str:
        """This worker's device (qbd.devices.resolve of --qbd-device). The paper tier on `auto`
        without a GPU skips: ResNet-18 at the paper's scale is not practical on a CPU unless the
        user asks for it (--qbd-device cpu)."""
        if self._device is None:
            from qbd import devices
            from qbd.errors import ConfigError

            try:
                device = devices.resolve(self.state.device)
            except ConfigError as e:
                pytest.fail(f"--qbd-device: {e}", pytrace=False)
            if self.state.tier == "paper" and self.state.device == "auto" and devices.is_cpu(device):
                pytest.skip("the paper tier trains ResNet-18 at the paper's scale: no CUDA device here (--qbd-device cpu to insist)")
            self._device = device
        return self._device

    @property
    def expectations(self) -> Any:
        if self.state.expectations is None:  # --qbd-accept starting a new table: the truth alone
            from qbd.expectations import Expectations

            self.state.expectations = Expectations(path=self.state.expectations_path, tier=self.state.tier)
        return self.state.expectations

    def bench(self, dataset: str, kind: str = "backdoored", seed: int = 0) -> Any:
        key = (dataset, kind, seed)
        if key not in self._benches:
            self._benches[key] = self._make_bench(dataset, kind, seed)
            self.state.pending_loads.append({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                                             "model": f"{dataset}/{kind}/seed{seed}", "device": self.device})
        return self._benches[key]

    def job(self, dataset: str, kind: str = "backdoored", seed: int = 0, device: str = "cpu") -> Any:
        """Model number `seed` of the tier's recipe (qbd.presets.seeded_job): training seed and, for
        the backdoored model, the default BadNet's attack seed."""
        from qbd.config import AttackSpec
        from qbd.presets import seeded_job
        from qbd.tiers import TIERS as TIER_TABLE

        model = TIER_TABLE[self.state.tier].model
        return seeded_job(dataset, model, seed, AttackSpec() if kind == "backdoored" else None,
                          precision="fp32" if device.startswith("cpu") else "bf16")

    def by_rates(self, result: dict[str, Any]) -> bool:
        from qbd.rates import row_id

        return self.state.by_rates(row_id(result))

    def _make_bench(self, dataset: str, kind: str, seed: int) -> Any:
        import torch

        from qbd import devices

        device = self.device
        if devices.is_cpu(device):  # one thread: CPU verdicts must not depend on the worker count
            _single_thread(torch)
        else:  # the CPU-only int8 cells share the host's cores among the GPU workers
            _share_cores(torch)
            devices.prepare(device)
        from qbd.config import DatasetSpec, Gates
        from qbd.data import load_dataset
        from qbd.evaluate import tier_bench
        from qbd.remote_store import open_store
        from qbd.tiers import TIERS as TIER_TABLE
        from qbd.train import check_gates
        from qbd.trained import get_trained

        tier = TIER_TABLE[self.state.tier]
        if dataset not in self._data:
            self._data[dataset] = load_dataset(DatasetSpec(dataset), self.state.data_root)
        data = self._data[dataset]
        job = self.job(dataset, kind, seed, device)
        attack = job.attack
        source = self.state.model_files.get(dataset) if kind == "backdoored" else None
        if source is not None:  # the user's weights stand in for the trained backdoored model
            from qbd.fetch import get_fetched

            tm = get_fetched(source, job, data, open_store(self.state.cache_dir), device=device)
        else:
            tm = get_trained(job, data, open_store(self.state.cache_dir), device=device, progress=False)
        check_gates(tm.metrics, Gates(), attacked=attack is not None)
        # the clean model is probed with the trigger its seed's backdoored model carries
        return tier_bench(data, tm, attack, probe_attack=self.job(dataset, "backdoored", seed).attack, model_name=tier.model,
                          tier=self.state.tier, seed=seed, device=device)

    def defense(self, name: str, protocol: str) -> Any:
        from qbd.errors import ConfigError
        from qbd.runner import load_defense

        ref = next(r for r, n in self.state.matrix().items() if n == name)
        if ref in self.state.defense_names:  # a built-in, or a --qbd-defense the user named: errors are theirs
            return load_defense(ref, protocol, self.state.tier)
        try:
            return load_defense(ref, protocol, self.state.tier)
        except ConfigError as e:  # an installed entry point nobody named: a warning and skipped cells, as in `qbd run`
            import warnings

            warnings.warn(f"qbd: skipped {e}", pytest.PytestWarning, stacklevel=2)
            pytest.skip(f"qbd: skipped {e}")


def _share_cores(torch: Any) -> None:
    """Under xdist, give each worker its share of the cores: N workers x all-cores threads
    oversubscribe the CPU, and OpenMP's spinning threads then run several times slower."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and workers.isdigit() and int(workers) > 0:
        share = max(1, (os.cpu_count() or 1) // int(workers))
        if torch.get_num_threads() > share:
            torch.set_num_threads(share)


def _single_thread(torch: Any) -> None:
    """Matrix cells run on one thread whatever the worker count: Fine-Pruning's fine-tuning
    reduces gradients differently per thread count, and `pytest -n 0` must give the same
    verdicts as `pytest -n 2` (use -n auto for the cores)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def qbd_session(request: pytest.FixtureRequest) -> Session:
    state = request.config.stash.get(_STATE, None)
    if state is None:
        pytest.skip("the qbd plugin is not configured")
    return Session(state)


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
            for line in _header(self.state, n):
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
        if state.report_dir and state.results:
            from qbd.report import write_report
            from qbd.run_metadata import run_metadata

            table = state.expectations_path or (state.expectations.path if state.expectations is not None else None)
            # the device each cell ran on comes from its Result (placement); the option may say "auto"
            write_report(state.results, state.report_dir, title=f"qbd {state.tier} matrix",
                         run=run_metadata(tier=state.tier, device_option=state.device, expectations=str(table) if table else None))
        if state.accept:
            if state.results or state.attack or state.audit:
                self.accept()
            return
        self.check_rows(session)

    def check_rows(self, session: pytest.Session) -> None:
        """Over several seeds: the rows with declared rate bounds are judged by their rates; one
        outside its bounds fails the run (its cells, judged by the rates, passed)."""
        from qbd.rates import rows

        state = self.state
        rated = [row for row in rows(state.results) if state.by_rates(row["row"])]
        state.rows_by_rates = len(rated)
        state.row_failures = [f"{row['row']}: {m}" for row in rated for m in state.expectations.check_row(row)]
        if state.row_failures and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def accept(self) -> None:
        from qbd import expectations
        from qbd.expectations_write import dumps, propose

        state = self.state
        path = state.expectations_path
        assert path is not None  # pytest_configure refuses --qbd-accept without --qbd-expectations
        old = expectations.load(path) if path.exists() else expectations.Expectations(path=path, tier=state.tier)
        seed0 = [r for r in state.results if r.get("seed", 0) == 0]
        new, state.accept_notes = propose(old, seed0)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = (f"qbd expectations, {state.tier} tier. The truth is the default: a backdoored model is detected naming the\n"
                  "planted target, a clean model is judged clean. Each entry below is a declared finding: the outcome the cell\n"
                  "produces instead, and a why that points to the figures. A finding that stops holding fails its cell.\n"
                  "--qbd-accept proposes findings for failing cells; write each proposed why before committing.")
        path.write_text(dumps(new, header))
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
        if state.rows_by_rates:
            tr.write_line("")
            tr.write_line(f"rows judged over their models: {state.rows_by_rates}, failing: {len(state.row_failures)}")
            for line in state.row_failures:
                tr.write_line(f"qbd: FAIL {line}", red=True)
        tr.write_line("")
        tr.write_line("budgets used:")
        for line in budgets(state.results):
            tr.write_line(f"  {line}")
        for line in loads_summary(state.loads):
            tr.write_line(line)
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
    for load in loads:
        by_model.setdefault(load["model"], []).append(f"{load['worker']} ({load['device']})")
    if not by_model:
        return []
    return ["models loaded:"] + [f"  {model}: {', '.join(sorted(w))}" for model, w in sorted(by_model.items())]
