"""Run a selection of cells for one or more data sets: the engine behind `qbd run`.

For each data set and model seed: get the backdoored model (and, with controls, the clean one)
from the store, gate it (Phase 1), then run every (scheme, defense, protocol) cell with progress.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from qbd.config import ModelJob
from qbd.tiers import Cell, Tier


@dataclass(frozen=True)
class RunPlan:
    # one per data set and model seed: the backdoored (or, alone, clean) model; its training seed
    # also seeds the bench (holdout split, stream) and the defenses
    jobs: tuple[ModelJob, ...]
    tier: Tier
    schemes: tuple[str, ...]
    defenses: tuple[str, ...]  # registry names or module:Class references
    protocols: tuple[str, ...]
    controls: bool = True  # also run the cells on a clean model (negative control)
    gradient_path: str | None = None  # None: per protocol (deployed for paper, surrogate for canonical)
    engine: str | None = None
    device: str = "cpu"  # concrete: "cpu" or "cuda:N" (qbd.devices.resolve)
    # several model seeds (rates over seeds): log lines name the seed
    multi_seed: bool = False
    probe: Any = None  # the trigger probing a clean-only run (AttackSpec); default BadNet
    model_file: Any = None  # qbd.fetch.Source: untrusted weights used as the asked-for model, not trained
    defense_timeout: float | None = None  # seconds per cell; past it the cell is invalid (run_defense)


def load_defense(ref: str, protocol: str, tier: str) -> Any:
    """A defense by name (built-in or `qbd.defenses` entry point: qbd.defenses.available) or by a
    "module:Class" reference, instantiated for the protocol."""
    from qbd.defenses import DEFENSES, available
    from qbd.errors import ConfigError
    from qbd.registry import UnknownNameError, load_ref, unknown_message

    origin = None
    if ":" not in ref:
        if ref in DEFENSES:
            return _instantiate(DEFENSES.get(ref), ref, protocol, tier)
        entries = {a.name: a for a in available()}
        if ref not in entries:
            raise UnknownNameError(unknown_message("defense", ref, sorted(entries)))
        name, ref, origin = ref, entries[ref].ref, entries[ref].origin
    try:
        cls = load_ref(ref)
    except (ImportError, AttributeError, ValueError) as e:
        where = f"defense the {origin} ({ref})" if origin else f"--defense {ref!r}"
        raise ConfigError(f"{where}: cannot load it ({type(e).__name__}: {e})") from None
    obj = _instantiate(cls, ref, protocol, tier)
    if origin and getattr(obj, "name", None) != name:  # cells are named after the entry point
        raise ConfigError(f"defense {name!r} of the {origin}: the class it names says its name is {obj.name!r}")
    if obj.name in DEFENSES and cls is not DEFENSES.get(obj.name):
        # it would be judged by the built-in's declared findings (as the plugin refuses it too)
        raise ConfigError(f"--defense {ref!r}: its name {obj.name!r} is a built-in defense's; give your class another")
    return obj


def _instantiate(cls: Any, ref: str, protocol: str, tier: str) -> Any:
    from qbd.defenses.base import check_defense
    from qbd.errors import ConfigError

    if isinstance(cls, type):
        params = inspect.signature(cls).parameters
        any_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        # a third-party class may take no protocol or tier: pass what its signature accepts
        kwargs = {k: v for k, v in (("protocol", protocol), ("tier", tier)) if any_kw or k in params}
        try:
            obj = cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"--defense {ref!r}: cannot instantiate it ({e})") from None
    else:
        import copy

        obj = copy.copy(cls)  # an instance named directly: one copy per protocol
    try:
        check_defense(obj)
    except TypeError as e:
        raise ConfigError(f"--defense {ref!r}: {e}") from None
    # the cell's protocol decides its data diet and its id: a defense that keeps no `protocol` is
    # told it; one that says another protocol than the cell's would be fed and named wrongly
    said = getattr(obj, "protocol", None)
    if said is None:
        try:
            obj.protocol = protocol
        except AttributeError:
            raise ConfigError(f"--defense {ref!r}: it has no `protocol` attribute and qbd cannot set one") from None
    elif said != protocol:
        raise ConfigError(f"--defense {ref!r}: asked for the {protocol!r} protocol, it says `protocol = {said!r}`"
                          " (take a protocol= keyword argument, or leave the attribute out)")
    return obj


def run(plan: RunPlan, *, data_root: str | None, store: Any, progress: bool = True,
        log: Callable[[str], None] | None = None, gates: Any = None, workers: int | str = 1,
        memo: Any = None) -> list[dict[str, Any]]:
    """Every cell of the plan; results in the plan's order (data set, seed, kind, scheme, defense,
    protocol) whatever `workers` is. Models are trained or loaded here first, one after another
    (training uses every thread); the cells then run on `workers` processes of one thread each
    (qbd.pool; `auto`: one per usable core), so a verdict does not depend on the worker count.
    `memo` (qbd.memo.ResultMemo): Results filed by content, so no cell is computed twice."""
    from qbd.pool import resolve_workers, run_tasks
    from qbd.train import resolve_device

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    device = resolve_device(plan.device)  # "auto" -> a concrete device, once
    on_cpu = device.type == "cpu"
    if not on_cpu and workers != "auto" and int(workers) > 1:  # before any training
        from qbd.errors import ConfigError

        raise ConfigError(f"-j {workers}: worker processes run cells on the CPU; with --device {plan.device} use -j 1")
    plan = replace(plan, device=str(device))
    if not on_cpu:
        from qbd import devices

        devices.prepare(plan.device)
    units = _units(plan, data_root, store, progress, log, gates, memo)
    tasks = [(u, cell) for u, unit in enumerate(units) for cell in unit.cells]
    n = resolve_workers(workers, len(tasks)) if on_cpu else 1  # one GPU process: -j auto is 1
    if n > 1:
        log(f"qbd: {len(tasks)} cells on {n} worker processes (one thread each)")
    bar = _progress_bar(len(tasks), progress)
    steps: dict[int, str] = {}  # running cells' step progress (Neural Cleanse, Fine-Pruning), for the bar
    # finished cells' Results: handed back if the run stops midway; a late progress update of a
    # finished cell is dropped
    finished: dict[int, dict[str, Any]] = {}

    def done(i: int, r: dict[str, Any]) -> None:
        finished[i] = r
        msg = _cell_line(r, units[tasks[i][0]].seed_note)
        steps.pop(i, None)
        if bar is not None:
            bar.write(msg, file=sys.stderr)
            bar.set_postfix_str(" | ".join(steps.values()), refresh=False)
            bar.update(1)
        else:
            log(msg)

    def step(i: int, update: tuple[int, int]) -> None:
        if bar is None or i in finished:
            return
        cell = tasks[i][1]
        steps[i] = f"{cell.defense}[{cell.protocol}] {cell.scheme}: step {update[0]}/{update[1]}"
        bar.set_postfix_str(" | ".join(steps.values()))

    try:
        results = run_tasks(_run_cell, _Context(plan, tuple(units)), tasks, workers=n, order=_longest_first(tasks, plan),
                            on_done=done, on_progress=step if bar is not None else None, one_thread_in_process=on_cpu)
    except Exception as e:
        # the cells that finished are real Results: hand them to the caller to write, with the error
        raise PartialRun([finished[i] for i in sorted(finished)], len(tasks), e) from e
    finally:
        if bar is not None:
            bar.close()
    from qbd.memo import reused_line

    line = reused_line(results)
    if line:
        log(line)
    return results


class PartialRun(RuntimeError):
    """A run stopped by an error after some cells finished: `results` are those cells' Results
    (in the plan's order), `total` the number of cells planned, `cause` the error."""

    def __init__(self, results: list[dict[str, Any]], total: int, cause: BaseException) -> None:
        super().__init__(f"the run stopped after {len(results)} of {total} cells: {type(cause).__name__}: {cause}")
        self.results, self.total, self.cause = results, total, cause


@dataclass(frozen=True)
class _Unit:
    """One model and the cells that run on it."""

    bench: Any  # qbd.evaluate.Bench
    seed: int
    seed_note: str
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class _Context:
    """What a worker needs to run any task: inherited by forked workers, pickled once otherwise."""

    plan: RunPlan
    units: tuple[_Unit, ...]


def _units(plan: RunPlan, data_root: str | None, store: Any, progress: bool, log: Callable[[str], None],
           gates: Any, memo: Any) -> list[_Unit]:
    """Load (or train) every model of the plan, gate it, and list its cells."""
    from qbd.data import load_dataset
    from qbd.evaluate import tier_bench
    from qbd.train import check_gates
    from qbd.trained import get_trained

    units: list[_Unit] = []
    loaded: dict[str, Any] = {}  # each data set once, whatever the number of seeds
    for job in plan.jobs:
        ds = job.dataset.name
        if ds not in loaded:
            loaded[ds] = load_dataset(job.dataset, data_root)
        data = loaded[ds]
        for attack in (job.attack, plan.probe):  # before any training: a bad trigger fails at once
            if attack is not None:
                attack.check_fits(*data.image_size, data.num_classes)
        seed = job.train.seed
        seed_note = f" (seed {seed})" if plan.multi_seed else ""
        # the asked-for model over every scheme, and its negative control (same job, no poisoning)
        # on every scheme too: a defense that false-alarms only once the clean model is quantized
        # is a blindspot, and each row's false-alarm rate needs its clean models
        kinds = [("backdoored" if job.attack is not None else "clean", job, plan.schemes)]
        if plan.controls and job.attack is not None:
            kinds.append(("clean", replace(job, attack=None), plan.schemes))
        for kind, j, schemes in kinds:
            if plan.model_file is not None and j is job:  # the asked-for model, not its clean control
                from qbd.fetch import get_fetched

                tm = get_fetched(plan.model_file, j, data, store, device=plan.device, log=log)
            else:
                tm = get_trained(j, data, store, device=plan.device, progress=progress, log=log)
            log(f"qbd: {j.slug()}{seed_note}: {tm.source}"
                f" (clean acc {tm.metrics['clean_acc']:.3f}"
                + ("" if tm.metrics["asr"] is None else f", ASR {tm.metrics['asr']:.3f}") + ")")
            if gates is not None:
                check_gates(tm.metrics, gates, attacked=j.attack is not None)
            bench = tier_bench(data, tm, j.attack, probe_attack=job.attack or plan.probe, model_name=j.model.name,
                               tier=plan.tier.name, seed=seed, device=plan.device, memo=memo)
            cells = tuple(Cell(ds, s, d, p, kind) for s in schemes for d in plan.defenses for p in plan.protocols)
            units.append(_Unit(bench, seed, seed_note, cells))
    return units


def _run_cell(context: _Context, task: tuple[int, Cell], report: Callable[[Any], None] | None) -> dict[str, Any]:
    u, cell = task
    unit, plan = context.units[u], context.plan
    defense = load_defense(cell.defense, cell.protocol, plan.tier.name)
    return unit.bench.run(defense, cell.scheme, gradient_path=plan.gradient_path, engine=plan.engine, seed=unit.seed,
                          timeout_s=plan.defense_timeout, progress=None if report is None else lambda d, t: report((d, t)))


def _longest_first(tasks: list[tuple[int, Cell]], plan: RunPlan) -> list[int]:
    """Start order: the optimisation-based defenses (they take input gradients; Neural Cleanse
    runs for tens of seconds) first, then those that pass the training set through the model,
    then the rest, so no long cell starts last while the other workers idle. Stable within a
    rank."""
    rank: dict[tuple[str, str], int] = {}
    for d in plan.defenses:
        for p in plan.protocols:
            needs = set(getattr(load_defense(d, p, plan.tier.name), "requires", ()))
            rank[(d, p)] = next((r for r, need in enumerate(_SLOW_NEEDS) if need in needs), len(_SLOW_NEEDS))
    return sorted(range(len(tasks)), key=lambda i: rank[(tasks[i][1].defense, tasks[i][1].protocol)])


# what makes a defense slow, slowest first (_longest_first)
_SLOW_NEEDS = ("input_gradients", "poisoned_train")


def _progress_bar(total: int, progress: bool) -> Any:
    """One line for the whole run, on a terminal only (a redirected log gets the cell lines)."""
    if not progress or total == 0 or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="cells", unit="cell", file=sys.stderr, leave=False, dynamic_ncols=True)


def _cell_line(r: dict[str, Any], seed_note: str) -> str:
    v = r["verdict"]
    msg = f"{r['cell']}{seed_note}: {v['status']}" + (f" (target {v['target_class']})" if v["target_class"] is not None else "")
    msg += f" [{r['seconds']:.1f} s]"
    if v["status"] == "invalid":
        msg += f" - {v['reason']}"
    return msg


def seeded_bench(data: Any, seed: int, attack: Any, tier: str = "smoke", store: Any = None, memo: Any = None) -> Any:
    """A Bench on model number `seed` of the tier's recipe (qbd.presets.seeded_job: training and
    attack seed `seed`; the pinned zoo's models first), probed with that seed's trigger and seeded
    with it: what the rates, the calibration and the sweeps over seeds evaluate."""
    from qbd.config import AttackSpec
    from qbd.evaluate import tier_bench
    from qbd.presets import seeded_job
    from qbd.remote_store import open_store
    from qbd.tiers import TIERS
    from qbd.trained import get_trained

    t = TIERS[tier]
    job = seeded_job(data.name, t.model, seed, attack)
    tm = get_trained(job, data, store if store is not None else open_store(), progress=False)
    return tier_bench(data, tm, job.attack, probe_attack=job.attack or AttackSpec(seed=seed), model_name=t.model,
                      tier=tier, seed=seed, memo=memo)
