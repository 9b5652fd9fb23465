"""`qbd zoo build`: train the pinned zoo's models (qbd.zoo.pinned.zoo_jobs) and write them, with
their manifest, into a zoo directory. Each model trains on one thread in a spawned process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qbd.config import ModelJob
from qbd.zoo.pinned import Zoo, zoo_jobs


def _train_one(job: ModelJob, cache_dir: str | None) -> tuple[ModelJob, str, dict[str, Any], dict[str, Any], str]:
    """In a worker process: train `job` (or take it from the store), never from the zoo."""
    from qbd.data import load_dataset
    from qbd.remote_store import open_store
    from qbd.trained import get_trained

    data = load_dataset(job.dataset, None)
    tm = get_trained(job, data, open_store(cache_dir), progress=False, zoo=None)
    return job, data.fingerprint(), tm.model.state_dict(), tm.metrics, tm.entry.key


def build(out: str | os.PathLike[str], *, cache_dir: str | None = None, workers: int = 1,
          jobs: list[ModelJob] | None = None, log: Any = print, missing_only: bool = False) -> Zoo:
    """Train every zoo job (one thread each, `workers` processes: weights do not depend on
    `workers`) and write the models and the manifest under `out`, replacing what was there.
    `missing_only`: keep the models the zoo already pins (their files untouched) and train only
    the jobs it lacks."""
    import shutil
    import tempfile

    todo = zoo_jobs() if jobs is None else jobs
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    if missing_only:
        return _add_missing(Zoo(dest), todo, cache_dir, workers, log)
    # build beside the zoo and swap in only when every model is there: a failed build leaves
    # the old zoo (files and manifest) as it was
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.build-") as tmp:
        zoo = Zoo(tmp)
        _train_into(zoo, todo, cache_dir, workers, log, checkpoint=False)
        old = Zoo(dest)
        for rec in old.models.values():  # only what the old manifest listed: never a user's other files
            (dest / rec["file"]).unlink(missing_ok=True)
        for rec in zoo.models.values():
            shutil.move(str(Path(tmp) / rec["file"]), dest / rec["file"])
        zoo.root = dest
        zoo.write_manifest()
    return Zoo(dest)


def _add_missing(zoo: Zoo, jobs: list[ModelJob], cache_dir: str | None, workers: int, log: Any) -> Zoo:
    from qbd.data import load_dataset

    fingerprints = {name: load_dataset(spec, None).fingerprint() for name, spec in {j.dataset.name: j.dataset for j in jobs}.items()}
    todo = [j for j in jobs if zoo.find(j, fingerprints[j.dataset.name]) is None]
    log(f"qbd zoo: {len(jobs) - len(todo)} of {len(jobs)} models already pinned; training {len(todo)}")
    _train_into(zoo, todo, cache_dir, workers, log, checkpoint=True)  # an interrupted run keeps what it trained
    return Zoo(zoo.root)


def _train_into(zoo: Zoo, todo: list[ModelJob], cache_dir: str | None, workers: int, log: Any, *, checkpoint: bool) -> None:
    """Train `todo` in `workers` spawned processes and add each model to `zoo` as it arrives
    (`checkpoint`: writing the manifest after each)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=_spawn()) as pool:
        for i, fut in enumerate([pool.submit(_train_one, job, cache_dir) for job in todo], 1):
            job, fingerprint, state, metrics, store_key = fut.result()
            p = zoo.add(job, fingerprint, state, metrics, store_key)
            if checkpoint:
                zoo.write_manifest()
            asr = "" if metrics["asr"] is None else f", ASR {metrics['asr']:.4f}"
            log(f"qbd zoo: [{i}/{len(todo)}] {p.path.name}: clean acc {metrics['clean_acc']:.4f}{asr}")


def _spawn() -> Any:
    """Trainers start as fresh interpreters: a forked child cannot run autograd once its parent
    has (after torch.export, say: "Unable to handle autograd's threading in combination with
    fork-based multiprocessing"), and a zoo build may be called from such a process (a test run)."""
    import multiprocessing

    return multiprocessing.get_context("spawn")
