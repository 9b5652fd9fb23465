"""The sandbox that runs a defense (run_defense): the contract's checks, then `detect` in a thread
or a forked child under a timeout, its progress forwarded; a crash, a timeout, a NaN or a verdict
that breaks the contract becomes `invalid` with a reason code, never `clean` (vouch)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from qbd.defenses.base import (
    _NOT_A_NUMBER,
    Control,
    Defense,
    DefenseInputs,
    Subject,
    Verdict,
    _as_float,
    _as_int,
    _jsonable,
    check_defense,
)
from qbd.reason_codes import verdict_problems


def run_defense(
    defense: Defense, subject: Subject, inputs: DefenseInputs, generator: torch.Generator, *, timeout_s: float | None = None
) -> tuple[Verdict, float]:
    """Run `detect` and vouch for the answer: a crash, a hang past `timeout_s`, a wrong type, an
    unknown status, a non-finite or non-numeric figure or a target outside the model's classes
    is an `invalid` verdict with the reason, never a silent `clean` and never a crash of the
    run. `timeout_s=None` (the default) sets no limit and runs detect here; with a limit, detect
    runs in a forked child process, killed past it (see "running detect"). Returns (verdict, seconds)."""
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not math.isfinite(timeout_s) or timeout_s <= 0):
        from qbd.errors import ConfigError

        raise ConfigError(f"defense timeout must be a number of seconds > 0, got {timeout_s!r}")
    name = _name_of(defense)
    try:
        check_defense(defense)
    except TypeError as e:  # a third-party object the loader did not vet
        return Verdict.invalid(str(e), "error"), 0.0
    missing = inputs.require(frozenset(defense.requires))
    if missing:
        return Verdict.invalid(f"{name} requires {missing}, which this protocol does not provide", "not-applicable"), 0.0
    t0 = time.perf_counter()
    thread_why = None
    if timeout_s is None:
        outcome = _call(defense, subject, inputs, generator)
    else:
        outcome, thread_why = _call_with_timeout(defense, subject, inputs, generator, float(timeout_s), name)
    seconds = time.perf_counter() - t0
    verdict = _judge(outcome, name, subject.num_classes, timeout_s)
    if thread_why is not None:  # say that a native call past the limit could not have been stopped
        verdict.evidence["timeout_isolation"] = f"thread: {thread_why}"
    return verdict, seconds


def _judge(outcome: Any, name: str, num_classes: int, timeout_s: float | None) -> Verdict:
    """The verdict for what running detect gave: its answer, vouched for, or why there is none."""
    if isinstance(outcome, _TimedOut):
        reason = f"{name} timed out after {timeout_s:g} s"
        if outcome.still_running:
            reason += (" and is still running: Python cannot stop a thread inside native code or one that"
                       " swallows the stop, so it may keep using CPU (and the model) in the background")
        return Verdict.invalid(reason, "timeout", evidence={"timeout_s": timeout_s, "still_running": outcome.still_running})
    if isinstance(outcome, BaseException):
        outcome = _Crash.of(outcome)
    if isinstance(outcome, _Crash):
        # the whole traceback goes into the Result: a crash fails its cell, and the report shows where
        return Verdict.invalid(f"{name} raised {outcome.line}", "error",
                               evidence={"exception": outcome.exception, "traceback": outcome.traceback})
    if isinstance(outcome, _Died):
        code = outcome.exit_code
        if code is None:
            how, evidence = "closed its result pipe and was stopped", {}
        elif code < 0:
            sig = _signal_name(-code)
            how = f"was killed by {sig}" + (" (the kernel's out-of-memory killer sends it)" if -code == signal.SIGKILL else "")
            evidence = {"exit_code": code, "signal": sig}
        else:
            how, evidence = f"exited with status {code}", {"exit_code": code}
        return Verdict.invalid(f"{name}'s process {how} before answering", "error", evidence=evidence)
    return vouch(outcome, name, num_classes)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def vouch(v: Any, name: str, num_classes: int | None = None) -> Verdict:
    """`v` if it is a well-formed Verdict (figures normalised to float and int), else an
    `invalid` verdict saying what is wrong with it."""
    if not isinstance(v, Verdict):
        return Verdict.invalid(f"{name}.detect returned {type(v).__name__}, not a Verdict", "error")
    # Verdict checks these on construction, but its fields stay assignable afterwards
    problems = verdict_problems(v.status, v.reason, "unspecified" if v.status == "invalid" and v.reason_code is None
                                else v.reason_code)
    if problems:
        return Verdict.invalid(f"{name} returned an ill-formed verdict: {'; '.join(problems)}", "error")
    if not isinstance(v.evidence, Mapping):
        return Verdict.invalid(f"{name} returned evidence of type {type(v.evidence).__name__}, not a mapping", "error")
    if not isinstance(v.controls, Mapping):
        return Verdict.invalid(f"{name} returned controls of type {type(v.controls).__name__}, not a mapping", "error")
    for key, c in v.controls.items():
        if not isinstance(key, str) or not isinstance(c, Control):
            return Verdict.invalid(f"{name} returned control {key!r} as a {type(c).__name__}, not a Control", "error")
    figures: dict[str, float | None] = {}
    for label in ("score", "threshold"):
        value = _as_float(getattr(v, label))
        if value is _NOT_A_NUMBER:
            return Verdict.invalid(f"{name} returned a {type(getattr(v, label)).__name__} {label}, not a number", "error")
        if value is not None and not math.isfinite(value) and v.status != "invalid":
            return Verdict.invalid(f"{name} produced a non-finite {label} ({value})", "diverged", evidence=dict(v.evidence), controls=dict(v.controls))
        figures[label] = value
    target = v.target_class
    if target is not None:
        target = _as_int(target)
        if target is None:
            return Verdict.invalid(f"{name} returned target class {v.target_class!r}, not a class index", "error")
        if target < 0 or (num_classes is not None and target >= num_classes):
            return Verdict.invalid(f"{name} returned target class {target}, outside 0..{(num_classes or 0) - 1}", "error",
                                   evidence=dict(v.evidence), controls=dict(v.controls))
    code = "unspecified" if v.status == "invalid" and v.reason_code is None else v.reason_code
    out = Verdict(status=v.status, score=figures["score"], threshold=figures["threshold"], target_class=target,
                  reason=v.reason, evidence=dict(v.evidence), controls=dict(v.controls), reason_code=code,
                  suspects=_suspects(v.suspects))
    try:  # every Result is written as JSON: find an unwritable evidence value now, not at the end of the run
        json.dumps(out.to_dict(), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        return Verdict.invalid(f"{name} returned evidence that is not JSON-serialisable ({type(e).__name__}: {e})", "error")
    return out


def _suspects(s: Any) -> dict[str, Any] | None:
    """A well-formed `suspects` ({"data": str, "by_class": {int: indices}}) or None: it only feeds
    a control, so a malformed one is dropped rather than failing the verdict."""
    if not isinstance(s, Mapping) or not isinstance(s.get("data"), str) or not isinstance(s.get("by_class"), Mapping):
        return None
    return {"data": s["data"], "by_class": dict(s["by_class"])}


# -- running detect ---------------------------------------------------------------------------
# With a timeout, detect runs in a forked child process, which can be killed wherever it is (a
# long BLAS call, a C-extension loop, code that swallows every exception). fork, not spawn: the
# child inherits the subject, inputs and generator as they are, with nothing pickled. Without
# fork (not Linux, CUDA already initialised, a daemonic worker) it runs in a thread, as before,
# and the verdict's evidence says so ("timeout_isolation").
class DefenseTimeout(BaseException):
    """Raised inside a defense's thread (the thread fallback) when it runs past its timeout. A
    BaseException, so a defense's own `except Exception` cannot swallow it."""


@dataclass(frozen=True)
class _TimedOut:
    still_running: bool


@dataclass(frozen=True)
class _Crash:
    """An exception detect raised, as text: it crosses the process boundary whatever its type."""

    exception: str  # the type's name
    line: str  # format_exception_only's last line: "ValueError: bad shape"
    traceback: str

    @classmethod
    def of(cls, e: BaseException) -> _Crash:
        full = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        line = traceback.format_exception_only(type(e), e)[-1].strip()
        if isinstance(e, StopIteration) and "parameters()" in full:
            # the PyTorch habit next(model.parameters()).device, on a deployed int8 or ONNX Runtime model
            line += (" (next(model.parameters()) on a model without parameters: a deployed int8 or ONNX Runtime model"
                     " has none; use subject.device)")
        return cls(type(e).__name__, line, full[-_TRACEBACK_CHARS:])


@dataclass(frozen=True)
class _Died:
    """The child process ended without answering: killed by a signal, or exited."""

    exit_code: int | None


_TRACEBACK_CHARS = 4000  # the end of a traceback (where it raised) is what a reader needs
_GRACE_S = 1.0  # how long a stopped defense gets to end (thread: unwind; process: SIGTERM before SIGKILL)
_PROGRESS_EVERY_S = 0.05  # a child forwards at most this often (plus the first and last step)
# Why a timed defense cannot run in a forked child: (test, reason); the first that holds wins.
_NO_FORK: tuple[tuple[Callable[[], bool], str], ...] = (
    (lambda: "fork" not in multiprocessing.get_all_start_methods(), "this platform cannot fork"),
    (lambda: bool(multiprocessing.current_process().daemon), "a daemonic multiprocessing worker may not start processes"),
    (lambda: torch.cuda.is_initialized(), "CUDA is initialised in this process and a forked child cannot use it"),
)


def _name_of(defense: Any) -> str:
    name = getattr(defense, "name", None)
    return name if isinstance(name, str) and name else type(defense).__name__


def _call(defense: Any, subject: Subject, inputs: DefenseInputs, generator: torch.Generator) -> Any:
    """detect's return value, or the exception it raised (SystemExit included: a defense that
    calls sys.exit must not end the run; KeyboardInterrupt still does)."""
    from qbd.quant.warnings import recording_no_autograd_kernel

    try:
        with recording_no_autograd_kernel() as torch_notes:
            out = defense.detect(subject, inputs, generator)
    except (Exception, SystemExit) as e:
        return e
    # it backpropagated through a deployed kernel without autograd: its answer rests on gradients that
    # never arrived (a silent miss otherwise)
    if torch_notes and isinstance(out, Verdict) and out.status != "invalid" and "input_gradients" not in defense.requires:
        return Verdict.invalid(f"{_name_of(defense)} backpropagated through the deployed model, whose kernels have no"
                               f" autograd ({torch_notes[0]}), so its gradients are missing: declare 'input_gradients' in"
                               " `requires` to be given a differentiable surrogate", "no-gradient",
                               evidence={"defense_verdict": {"status": out.status, "target_class": out.target_class}})
    return out


def _why_not_fork() -> str | None:
    return next((why for test, why in _NO_FORK if test()), None)


def _call_with_timeout(defense: Any, subject: Subject, inputs: DefenseInputs, generator: torch.Generator,
                       timeout_s: float, name: str) -> tuple[Any, str | None]:
    """(`_call`'s outcome, a _Crash, a _Died or a _TimedOut; why it ran in a thread, or None)."""
    why = _why_not_fork()
    if why is None:
        try:
            out = _call_in_process(defense, subject, inputs, generator, timeout_s, name)
        except _ForkFailed as e:  # out of memory or processes: still a verdict, through the thread path
            why = f"fork failed: {e}"
        else:
            if not (isinstance(out, _Crash) and _BAD_AUTOGRAD_FORK in out.line):
                return out, None
            # torch refuses autograd in a child forked after its parent started autograd's device
            # threads (a backward after torch.export does): not the defense's fault, so the thread path
            why = "autograd cannot run in a child forked from this process (torch: " + _BAD_AUTOGRAD_FORK + ")"
    return _call_in_thread(defense, subject, inputs, generator, timeout_s, name), why


class _ForkFailed(Exception):
    pass


_BAD_AUTOGRAD_FORK = "Unable to handle autograd's threading in combination with fork-based multiprocessing"


# -- in a forked child process ------------------------------------------------------------------
def _call_in_process(defense: Any, subject: Subject, inputs: DefenseInputs, generator: torch.Generator,
                     timeout_s: float, name: str) -> Any:
    """The child's answer (a vouched Verdict or a _Crash), a _Died, or a _TimedOut. Ctrl-C (or
    an error in the caller's progress callback) stops the child and is raised here."""
    ctx = multiprocessing.get_context("fork")
    try:
        receive, send = ctx.Pipe(duplex=False)
    except OSError as e:
        raise _ForkFailed(e) from e
    child = ctx.Process(target=_child_main, name=f"qbd-defense-{name}",
                        args=(send, defense, subject, inputs, generator, name, torch.get_num_threads(), torch.is_grad_enabled()))
    try:
        child.start()
    except OSError as e:
        receive.close()
        send.close()
        raise _ForkFailed(e) from e
    send.close()  # the child holds the only writer: its death reads as end-of-file here
    try:
        return _await(child, receive, inputs.progress, time.monotonic() + timeout_s)
    finally:
        receive.close()
        if _end(child):
            child.close()


def _await(child: Any, receive: Any, progress: Callable[[int, int], None] | None, deadline: float) -> Any:
    """Forward the child's progress until it answers, dies or runs past `deadline`."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return _TimedOut(still_running=not _end(child))
        multiprocessing.connection.wait([receive, child.sentinel], timeout=left)
        if receive.poll():  # read before judging the sentinel: an answer may precede the exit
            try:
                data = receive.recv_bytes()
            except (EOFError, OSError):  # nothing, or a message cut off by the child's death
                return _died(child)
            try:
                kind, payload = pickle.loads(data)
            except Exception as e:  # e.g. an object of a class the defense built only in the child
                return Verdict.invalid(f"the defense's answer could not be read back from its process ({type(e).__name__}: {e})", "error")
            if kind == "progress":
                if progress is not None:
                    progress(*payload)
                continue
            if kind == "interrupt":
                raise payload
            child.join(_GRACE_S)  # let it exit by itself: it flushes what the defense printed
            return payload
        if not child.is_alive():
            return _died(child)


def _died(child: Any) -> _Died:
    child.join(_GRACE_S)
    code = child.exitcode
    if code is None:  # closed the pipe yet still running: not to be trusted either
        _end(child)
    return _Died(code)


def _end(child: Any) -> bool:
    """Stop the child if it still runs (SIGTERM, then SIGKILL) and reap it. True if it ended."""
    if child.is_alive():
        child.terminate()
        child.join(_GRACE_S)
    if child.is_alive():
        child.kill()
        child.join(_GRACE_S)
    return not child.is_alive()  # False: uninterruptible (a hung device or file system)


def _child_main(send: Any, defense: Any, subject: Subject, inputs: DefenseInputs, generator: torch.Generator,
                name: str, threads: int, grad: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops this process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a handler inherited from the parent would wait for Python
    _die_with_parent()
    torch.set_num_threads(threads)  # the caller's: float reductions, hence verdicts, depend on it
    lock = threading.Lock()  # one message at a time, whichever thread of the defense reports
    if inputs.progress is not None:
        inputs = replace(inputs, progress=_Forward(send, lock))
    box: list[Any] = []

    def work() -> None:
        try:
            with torch.set_grad_enabled(grad):
                box.append(_call(defense, subject, inputs, generator))
        except BaseException as e:  # KeyboardInterrupt raised by the defense: hand it over
            box.append(e)

    # A fresh thread: GNU OpenMP's pool belongs to the thread that started it, and in the forked
    # copy of the caller's thread it refers to the parent's workers, which were not forked: the
    # first multi-threaded op would wait for them forever.
    worker = threading.Thread(target=work, name="detect", daemon=True)
    worker.start()
    worker.join()
    answer = _answer(box[0] if box else RuntimeError("detect ended without a result"), name, subject.num_classes)
    with lock:
        send.send_bytes(answer)


def _die_with_parent() -> None:
    """Linux: the kernel kills this child if the parent dies (SIGKILL, OOM) before reaping it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Forward:
    """DefenseInputs.progress in the child: (done, total) to the parent, at most every
    _PROGRESS_EVERY_S (the first and the last step always): the caller only redraws a line."""

    def __init__(self, send: Any, lock: threading.Lock) -> None:
        self.send, self.lock, self.last = send, lock, -math.inf

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.last >= _PROGRESS_EVERY_S or done >= total:
                self.last = now
                self.send.send_bytes(pickle.dumps(("progress", (done, total))))


def _answer(outcome: Any, name: str, num_classes: int) -> bytes:
    """The message for the parent. A verdict is vouched for here, where its objects exist (the
    parent vouches again): what cannot be pickled is judged, not lost in transit."""
    if isinstance(outcome, BaseException) and not isinstance(outcome, (Exception, SystemExit)):
        try:
            return pickle.dumps(("interrupt", outcome))
        except Exception:
            return pickle.dumps(("interrupt", KeyboardInterrupt(str(outcome))))
    if isinstance(outcome, BaseException):
        return pickle.dumps(("answer", _Crash.of(outcome)))
    v = vouch(outcome, name, num_classes)
    for candidate in (v, _portable(v)):
        try:
            return pickle.dumps(("answer", candidate))
        except Exception as e:
            error = e
    return pickle.dumps(("answer", Verdict.invalid(
        f"{name} returned a verdict that cannot be sent back from its process ({type(error).__name__}: {error})", "error")))


def _portable(v: Verdict) -> Verdict:
    """`v` as plain JSON values (what its Result records anyway), without `suspects`."""
    return replace(v, evidence=_jsonable(v.evidence), suspects=None,
                   controls={k: Control(bool(c.passed), _jsonable(c.value), str(c.detail)) for k, c in v.controls.items()})


# -- in a thread (no fork) ----------------------------------------------------------------------
def _call_in_thread(defense: Any, subject: Subject, inputs: DefenseInputs, generator: torch.Generator,
                    timeout_s: float, name: str) -> Any:
    """`_call` in a worker thread, waiting at most `timeout_s`.

    Threads cannot be killed. On timeout the worker is sent DefenseTimeout with
    PyThreadState_SetAsyncExc (CPython): it is raised at the next Python bytecode the worker
    runs, which stops a Python loop or a loop of torch calls between two ops, but not one
    long native call (a sleep, a lock, a single huge matmul) nor code that catches
    BaseException. Such a worker is left running as a daemon thread and the verdict says so.
    """
    result: list[Any] = []
    lock = threading.Lock()
    state = {"done": False}
    grad = torch.is_grad_enabled()  # grad mode is thread-local: give the worker the caller's

    def work() -> None:
        try:
            with torch.set_grad_enabled(grad):
                outcome = _call(defense, subject, inputs, generator)
            with lock:
                state["done"] = True
                result.append(outcome)
        except DefenseTimeout:
            pass
        except BaseException as e:  # e.g. KeyboardInterrupt raised in this thread: hand it over
            result.append(e)

    worker = threading.Thread(target=work, name=f"qbd-defense-{name}", daemon=True)
    worker.start()
    try:
        worker.join(timeout_s)
    except BaseException:  # Ctrl-C while waiting: stop the worker too
        _stop(worker, lock, state)
        raise
    if worker.is_alive() and _stop(worker, lock, state):
        worker.join(_GRACE_S)
        return _TimedOut(still_running=worker.is_alive())
    worker.join()  # it had finished, or finished just as it was being stopped
    outcome = result[0] if result else RuntimeError("the defense thread ended without a result")
    if isinstance(outcome, BaseException) and not isinstance(outcome, (Exception, SystemExit)):
        raise outcome
    return outcome


def _stop(worker: threading.Thread, lock: threading.Lock, state: dict[str, bool]) -> bool:
    """Ask the worker to raise DefenseTimeout, unless it already has its result. True if asked."""
    with lock:
        if state["done"] or worker.ident is None:
            return False
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(DefenseTimeout))
        return True


