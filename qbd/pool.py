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

import multiprocessing
import os
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
    """torch on one intra-op thread for the block (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init(context: Any) -> None:
    import torch

    torch.set_num_threads(1)
    global _CONTEXT  # see _CONTEXT
    _CONTEXT = context


def _call(fn: Callable[[Any, Any], Any], task: Any) -> Any:
    return fn(_CONTEXT, task)


def run_tasks(fn: Callable[[Any, T], R], context: Any, tasks: Sequence[T], *, workers: int = 1,
              order: Sequence[int] | None = None, on_done: Callable[[int, R], None] | None = None) -> list[R]:
    """`[fn(context, t) for t in tasks]`, on `workers` processes. `order`: the indices in the
    order to start them (longest first balances the load); `on_done(i, result)` runs in the
    caller as each finishes. An exception in a task is raised here, as it would be in-process;
    pending tasks are cancelled."""
    start = list(order) if order is not None else list(range(len(tasks)))
    if sorted(start) != list(range(len(tasks))):
        raise ValueError("order must be a permutation of the task indices")
    out: list[Any] = [None] * len(tasks)
    if workers <= 1:
        with one_thread():
            for i in start:
                out[i] = fn(context, tasks[i])
                if on_done is not None:
                    on_done(i, out[i])
        return out
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                             initializer=_init, initargs=(context,)) as pool:
        futures: dict[Future[Any], int] = {pool.submit(_call, fn, tasks[i]): i for i in start}
        rank = {i: n for n, i in enumerate(start)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in sorted(done, key=lambda f: rank[futures[f]]):
                    i = futures[f]
                    try:
                        out[i] = f.result()
                    except BrokenProcessPool as e:
                        raise WorkerDied(f"a worker process died while running task {i} ({tasks[i]!r}); run with one"
                                         " worker (-j 1) to see the failure in this process") from e
                    if on_done is not None:
                        on_done(i, out[i])
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return out
