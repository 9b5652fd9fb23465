"""Run independent tasks on worker processes, one thread each, and hand back their results in
the tasks' order: the engine behind `qbd run -j N`.

Why processes of one thread: a cell's tensors (tiny-cnn on 32 images) are too small for
intra-op threads to keep two cores busy, while two cells on two processes do (figures in
docs/performance.md); and a result must not depend on how many workers ran it, while float
reductions depend on the thread count. So every task runs on one thread, in-process
(`workers` = 1) or in a worker.

On Linux the workers are forked after the caller has built `context` (data sets, models): they
inherit it without copying or re-importing anything, and set one thread before any work (what
PyTorch's DataLoader workers do). Elsewhere they are spawned and `context` is pickled once per
worker.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# The worker process's inherited (or unpickled) context: set once by _init in that process,
# never in the parent. A pool's initializer can hand its workers state no other way.
_CONTEXT: Any = None


class WorkerDied(RuntimeError):
    """A worker process ended without a result (killed, out of memory, a crash in native code)."""


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(requested: int | str, tasks: int) -> int:
    """`auto`: one worker per usable core; never more workers than tasks, never fewer than one."""
    n = usable_cpus() if requested == "auto" else int(requested)
    return max(1, min(n, tasks))


@contextmanager
def one_thread():
    """torch, and the BLAS / OpenMP pools numpy, SciPy and scikit-learn use, on one thread for
    the block (restored after)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def _init(context: Any, updates: Any) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=1)  # for the life of this worker process
    if updates is not None:
        # progress updates are disposable: a worker must never wait at exit for a parent that
        # stopped reading them (an error or Ctrl-C in the parent)
        updates.cancel_join_thread()
    global _CONTEXT  # see _CONTEXT
    _CONTEXT = (context, updates)


def _call(fn: Callable[..., Any], i: int, task: Any) -> Any:
    context, updates = _CONTEXT
    return fn(context, task, None if updates is None else _Throttled(lambda payload: updates.put((i, payload))))


class _Throttled:
    """A task's progress reporter: forwards the first update and then at most one per `interval`
    seconds; the others are dropped (the caller only redraws a line)."""

    def __init__(self, send: Callable[[Any], None], interval: float = 0.25) -> None:
        self.send, self.interval, self.last = send, interval, -math.inf

    def __call__(self, payload: Any) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.send(payload)


def run_tasks(fn: Callable[..., R], context: Any, tasks: Sequence[T], *, workers: int = 1,
              order: Sequence[int] | None = None, on_done: Callable[[int, R], None] | None = None,
              on_progress: Callable[[int, Any], None] | None = None, start_method: str | None = None,
              one_thread_in_process: bool = True) -> list[R]:
    """`[fn(context, t, report) for t in tasks]`, on `workers` processes. `order`: the indices in
    the order to start them (longest first balances the load); `on_done(i, result)` runs in the
    caller as each finishes; a task may call `report(payload)` (None when nobody listens) and the
    caller's `on_progress(i, payload)` gets it, throttled. An exception in a task is raised here,
    as it would be in-process; pending tasks are cancelled. `start_method`: default fork where
    the platform has it, else spawn. `one_thread_in_process`: with one worker, run on one thread
    too (CPU verdicts must not depend on -j); False keeps torch's threads (a GPU run, whose
    CPU-only int8 cells would otherwise crawl)."""
    start = list(order) if order is not None else list(range(len(tasks)))
    if sorted(start) != list(range(len(tasks))):
        raise ValueError("order must be a permutation of the task indices")
    out: list[Any] = [None] * len(tasks)
    if workers <= 1:
        with one_thread() if one_thread_in_process else contextlib.nullcontext():
            for i in start:
                report = None if on_progress is None else _Throttled(lambda payload, i=i: on_progress(i, payload))
                out[i] = fn(context, tasks[i], report)
                if on_done is not None:
                    on_done(i, out[i])
        return out
    method = start_method or ("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    mp = multiprocessing.get_context(method)
    updates = mp.Queue() if on_progress is not None else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp, initializer=_init, initargs=(context, updates))
    try:
        futures: dict[Future[Any], int] = {pool.submit(_call, fn, i, tasks[i]): i for i in start}
        rank = {i: n for n, i in enumerate(start)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            _drain(updates, on_progress)
            for f in sorted(done, key=lambda f: rank[futures[f]]):
                i = futures[f]
                try:
                    out[i] = f.result()
                except BrokenProcessPool as e:
                    running = sorted(futures[g] for g in pending | done if not g.cancelled())
                    raise WorkerDied(f"a worker process died (killed, out of memory, or a crash in native code) while"
                                     f" running one of tasks {running}; run with one worker (-j 1) to see the failure in"
                                     " this process") from e
                if on_done is not None:
                    on_done(i, out[i])
    except BaseException:
        _stop(pool)  # an error or Ctrl-C: do not wait minutes for the other running cells
        raise
    pool.shutdown(wait=True)
    _drain(updates, on_progress)
    return out


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now."""
    workers = list(getattr(pool, "_processes", {}).values())  # the executor offers no public handle
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in workers:
        if proc.is_alive():
            proc.terminate()


def _drain(updates: Any, on_progress: Callable[[int, Any], None] | None) -> None:
    while updates is not None and on_progress is not None:
        try:
            i, payload = updates.get_nowait()
        except queue.Empty:
            return
        on_progress(i, payload)
