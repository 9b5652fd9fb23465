"""qbd.pool: tasks on worker processes of one thread, results in the tasks' order."""

from __future__ import annotations

import os

import pytest

from qbd.pool import WorkerDied, resolve_workers, run_tasks, usable_cpus


def _square_plus(context: int, task: int, report) -> tuple[int, int, int]:
    import torch

    return task * task + context, torch.get_num_threads(), os.getpid()


def _fail_on_three(context: None, task: int, report) -> int:
    if task == 3:
        raise ValueError("task three fails")
    return task


def _die(context: None, task: int, report) -> int:
    if task == 1:
        os._exit(3)  # a worker killed mid-task (out of memory, a crash in native code)
    return task


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_back_in_task_order_on_one_thread(workers):
    done = []
    out = run_tasks(_square_plus, 10, list(range(6)), workers=workers, order=[5, 4, 3, 2, 1, 0],
                    on_done=lambda i, r: done.append(i))
    assert [r[0] for r in out] == [t * t + 10 for t in range(6)]
    assert {r[1] for r in out} == {1}  # every task ran on one intra-op thread
    assert sorted(done) == list(range(6))
    pids = {r[2] for r in out}
    assert (pids == {os.getpid()}) if workers == 1 else (os.getpid() not in pids)


def test_the_caller_keeps_its_thread_count():
    import torch

    before = torch.get_num_threads()
    run_tasks(_square_plus, 0, [1], workers=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("workers", [1, 2])
def test_an_exception_in_a_task_is_raised_to_the_caller(workers):
    with pytest.raises(ValueError, match="task three fails"):
        run_tasks(_fail_on_three, None, list(range(5)), workers=workers)


def test_a_worker_that_dies_is_an_error_that_says_what_to_do():
    with pytest.raises(WorkerDied, match=r"-j 1"):
        run_tasks(_die, None, [0, 1, 2], workers=2)


def test_order_must_be_a_permutation():
    with pytest.raises(ValueError, match="permutation"):
        run_tasks(_square_plus, 0, [1, 2], order=[0, 0])


def test_worker_count():
    assert resolve_workers("auto", 1000) == usable_cpus()
    assert resolve_workers(8, 3) == 3 and resolve_workers(2, 0) == 1 and resolve_workers(1, 50) == 1


def _count_up(context: None, task: int, report) -> int:
    import time

    for step in range(1, 4):
        if report is not None:
            report((task, step))
    time.sleep(0.3)  # a queued update reaches the caller while the task is still running
    return task


@pytest.mark.parametrize("workers", [1, 2])
def test_a_task_reports_progress_to_the_caller(workers):
    """The first update always passes (later ones within 0.25 s are dropped: the caller only
    redraws a line); no listener, no reporter."""
    seen = []
    run_tasks(_count_up, None, [0, 1, 2], workers=workers, on_progress=lambda i, payload: seen.append((i, payload)))
    assert sorted(seen) == [(0, (0, 1)), (1, (1, 1)), (2, (2, 1))]
    assert run_tasks(_report_given, None, [5], workers=workers) == [False]  # no listener: no reporter


def _report_given(context: None, task: int, report) -> bool:
    return report is not None


def test_spawned_workers_get_the_context_pickled():
    """Where there is no fork (macOS, Windows) the workers are spawned: the context is pickled to
    each, and the results are the same."""
    out = run_tasks(_square_plus, 7, [1, 2, 3], workers=2, start_method="spawn")
    assert [r[0] for r in out] == [8, 11, 16] and {r[1] for r in out} == {1}


def _threads(context, task, report):
    import torch

    return torch.get_num_threads()


def test_in_process_thread_limit_is_for_cpu_runs_only():
    import torch

    before = torch.get_num_threads()
    if before < 2:
        torch.set_num_threads(2)
    try:
        assert run_tasks(_threads, None, [0], workers=1) == [1]
        assert run_tasks(_threads, None, [0], workers=1, one_thread_in_process=False) == [torch.get_num_threads()]
        assert torch.get_num_threads() >= 2
    finally:
        torch.set_num_threads(before)
