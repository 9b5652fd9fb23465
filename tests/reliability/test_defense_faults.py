"""A third-party defense that crashes, hangs or answers nonsense yields an `invalid` verdict
with a clear reason: never a crash of the whole run, never `clean`."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbd.defenses.base import REASON_CODES, Control, DefenseInputs, Subject, Verdict
from qbd.defenses.sandbox import run_defense
from qbd.errors import ConfigError
from qbd.models import build_model

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def cell() -> tuple[Subject, DefenseInputs]:
    model = build_model("tiny-cnn", NUM_CLASSES, (0.5,) * 3, (0.25,) * 3, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.int64).to(torch.uint8)
    y = torch.randint(0, NUM_CLASSES, (16,), generator=g)
    return Subject(model, model.embed, model.classify, NUM_CLASSES), DefenseInputs((x, y))


class Fake:
    """A defense whose detect calls `behave(subject, inputs)`."""

    requires = frozenset({"clean_holdout"})

    def __init__(self, behave: Any, name: str = "fake") -> None:
        self.name = name
        self.behave = behave

    def detect(self, subject: Subject, inputs: DefenseInputs, generator: torch.Generator) -> Any:
        return self.behave(subject, inputs)


def returning(value: Any) -> Fake:
    return Fake(lambda s, i: value)


def run(cell: tuple[Subject, DefenseInputs], defense: Any, timeout_s: float | None = None) -> Verdict:
    subject, inputs = cell
    v, seconds = run_defense(defense, subject, inputs, torch.Generator().manual_seed(0), timeout_s=timeout_s)
    assert isinstance(v, Verdict) and seconds >= 0
    json.dumps(v.to_dict(), allow_nan=False)  # every verdict must be writable into a Result
    return v


def assert_invalid(v: Verdict, *words: str) -> None:
    assert v.status == "invalid", v
    assert v.reason and all(w in v.reason for w in words), v.reason


def _mutated(**fields: Any) -> Verdict:
    """A Verdict edited after construction (its __post_init__ checks only the constructor)."""
    v = Verdict("clean", score=0.5, threshold=2.0)
    for k, val in fields.items():
        setattr(v, k, val)
    return v


class Unprintable:
    pass


# -- wrong answers ------------------------------------------------------------------------------
# (answer, words in the reason, reason code): a malformed answer is the defense's error; a
# non-finite figure in a detected / clean verdict is a computation that diverged
MALFORMED = [
    (None, ("fake.detect returned NoneType, not a Verdict",), "error"),
    ({"status": "clean"}, ("returned dict, not a Verdict",), "error"),
    ("clean", ("returned str, not a Verdict",), "error"),
    (("clean", 0.1), ("returned tuple",), "error"),
    (_mutated(status="maybe"), ("status must be one of detected, clean, invalid, got 'maybe'",), "error"),
    (_mutated(status=None), ("status must be one of", "got None"), "error"),
    (_mutated(status="invalid", reason=None), ("an invalid verdict needs a reason",), "error"),
    (_mutated(reason=42), ("reason must be a string or null, not int",), "error"),
    (_mutated(score=float("nan")), ("non-finite score (nan)",), "diverged"),
    (_mutated(score=float("-inf")), ("non-finite score",), "diverged"),
    (_mutated(threshold=float("inf")), ("non-finite threshold",), "diverged"),
    (_mutated(score=torch.tensor(float("nan"))), ("non-finite score",), "diverged"),
    (_mutated(score="0.5"), ("str score, not a number",), "error"),
    (_mutated(score=True), ("bool score",), "error"),
    (_mutated(score=torch.ones(3)), ("Tensor score",), "error"),
    (_mutated(status="detected", target_class=NUM_CLASSES), ("target class 10, outside 0..9",), "error"),
    (_mutated(status="detected", target_class=-1), ("target class -1",), "error"),
    (_mutated(status="detected", target_class=2.0), ("target class 2.0, not a class index",), "error"),
    (_mutated(status="detected", target_class="2"), ("not a class index",), "error"),
    (_mutated(evidence=["norms"]), ("evidence of type list",), "error"),
    (_mutated(evidence={"x": Unprintable()}), ("not JSON-serialisable",), "error"),
    (_mutated(evidence={"x": {1, 2}}), ("not JSON-serialisable",), "error"),
    (_mutated(controls=[Control(True)]), ("controls of type list",), "error"),
    (_mutated(controls={"positive": True}), ("control 'positive' as a bool, not a Control",), "error"),
    (_mutated(reason_code="no-signal"), ("only an invalid verdict carries a reason_code; a 'clean' verdict has 'no-signal'",), "error"),
    (_mutated(status="invalid", reason="r", reason_code="maybe"), ("needs a reason_code from", "got 'maybe'"), "error"),
    (_mutated(status="invalid", reason="r", reason_code=["error"]), ("got ['error']",), "error"),
]


@pytest.mark.parametrize("timeout_s", [None, 30.0], ids=["inline", "timed"])
@pytest.mark.parametrize(("value", "words", "code"), MALFORMED, ids=[f"{i}-{w[0][:32]}" for i, (_, w, _) in enumerate(MALFORMED)])
def test_a_malformed_answer_is_invalid(cell, value, words, code, timeout_s):
    """The same judgement in-process and from a timed defense's child process (vouched there
    and again here, whatever could or could not be pickled)."""
    v = run(cell, returning(value), timeout_s)
    assert_invalid(v, *words)
    assert v.reason_code == code


def test_numpy_and_tensor_figures_are_accepted_as_plain_numbers(cell):
    v = run(cell, returning(_mutated(status="detected", score=np.float32(3.5), threshold=torch.tensor(2.0),
                                     target_class=np.int64(4))))
    assert (v.status, v.score, v.threshold, v.target_class) == ("detected", 3.5, 2.0, 4)
    assert type(v.score) is float and type(v.target_class) is int


def test_a_well_formed_verdict_passes_unchanged(cell):
    good = Verdict("detected", score=3.0, threshold=2.0, target_class=7, evidence={"norms": [1.0, float("nan")]},
                   controls={"positive": Control(True, 1.0)})
    v = run(cell, returning(good))
    assert v.to_dict() == good.to_dict()


def test_an_invalid_verdict_may_carry_a_nan_score(cell):
    v = run(cell, returning(Verdict.invalid("MAD = 0", "no-signal", score=float("nan"))))
    assert_invalid(v, "MAD = 0")
    assert v.reason_code == "no-signal"  # a third-party defense's own code is kept


def test_a_third_party_invalid_without_a_code_is_unspecified(cell):
    """Written before reason codes (or without one): kept invalid, and marked `unspecified`,
    which no expectations table may declare (qbd.reason_codes.NEVER_EXPECTED)."""
    v = run(cell, returning(Verdict("invalid", reason="could not decide")))
    assert_invalid(v, "could not decide")
    assert v.reason_code == "unspecified"


# -- crashes ------------------------------------------------------------------------------------
def _raise(exc: BaseException) -> Any:
    def behave(s: Subject, i: DefenseInputs) -> Any:
        raise exc

    return behave


@pytest.mark.parametrize("timeout_s", [None, 30.0], ids=["inline", "timed"])
@pytest.mark.parametrize(
    ("behave", "words"),
    [
        (_raise(ValueError("bad shape")), ("fake raised ValueError: bad shape",)),
        (lambda s, i: s(i.clean_holdout[0][:, :2].float()), ("fake raised RuntimeError",)),  # 2 channels into a 3-channel conv
        (lambda s, i: s.classify(torch.zeros(2, 999)), ("fake raised RuntimeError",)),
        (_raise(SystemExit(3)), ("fake raised SystemExit: 3",)),
        (_raise(RecursionError("deep")), ("RecursionError",)),
        (_raise(MemoryError()), ("MemoryError",)),
    ],
)
def test_an_exception_is_invalid_with_its_message(cell, behave, words, timeout_s):
    v = run(cell, Fake(behave), timeout_s)
    assert_invalid(v, *words)
    assert v.reason_code == "error"
    # the whole traceback goes into the Result, down to the frame that raised
    tb = v.evidence["traceback"]
    assert tb.startswith("Traceback (most recent call last):") and "in detect" in tb
    assert tb.rstrip().splitlines()[-1].startswith(v.evidence["exception"])


def test_the_pytorch_device_habit_on_a_model_without_parameters_says_what_to_use():
    """next(model.parameters()).device on a deployed int8 or ONNX Runtime model (no parameters)
    raises a bare StopIteration; the invalid reason says why and names subject.device."""

    class NoParams(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), NUM_CLASSES)

    m = NoParams()
    g = torch.Generator().manual_seed(0)
    inputs = DefenseInputs((torch.rand(4, 3, 32, 32, generator=g), torch.zeros(4, dtype=torch.int64)))
    v = run((Subject(m, m, m, NUM_CLASSES), inputs), Fake(lambda s, i: next(s.model.parameters()).device))
    assert_invalid(v, "StopIteration", "a deployed int8 or ONNX Runtime model has none; use subject.device")
    assert v.reason_code == "error"
    other = run((Subject(m, m, m, NUM_CLASSES), inputs), Fake(_raise(StopIteration())))
    assert "subject.device" not in other.reason  # only the parameters() habit gets the hint


@pytest.mark.parametrize("timeout_s", [None, 30.0], ids=["inline", "timed"])
def test_keyboard_interrupt_still_stops_the_run(cell, timeout_s):
    with pytest.raises(KeyboardInterrupt):
        run(cell, Fake(_raise(KeyboardInterrupt())), timeout_s)


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        ({"name": "odd", "requires": None}, ("is not a qbd defense", "`requires`")),
        ({"name": "odd", "requires": frozenset({"the_labels"})}, ("`requires`",)),
        ({"name": "", "requires": frozenset()}, ("a non-empty str `name`",)),
        ({"name": "odd", "requires": frozenset(), "detect": None}, ("`detect(subject, inputs, generator) -> Verdict`",)),
    ],
)
def test_an_object_that_is_not_a_defense_is_invalid(cell, attrs, words):
    obj = Fake(lambda s, i: Verdict("clean"))
    for k, v in attrs.items():
        setattr(obj, k, v)
    v = run(cell, obj)
    assert_invalid(v, *words)
    assert v.reason_code == "error"


def test_a_missing_input_is_invalid(cell):
    d = returning(Verdict("clean"))
    d.requires = frozenset({"poisoned_train"})
    v = run(cell, d)
    assert_invalid(v, "requires poisoned_train")
    assert v.reason_code == "not-applicable"


# -- hangs --------------------------------------------------------------------------------------
# With a timeout, detect runs in a forked child process that is killed past its time (and, where
# fork is unusable, in a thread as before: see the fallback tests below).
def _defense_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("qbd-defense-")]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _report_pid(i: DefenseInputs) -> None:
    """Tell the test which process runs detect, through the progress channel: (pid, 0)."""
    i.progress(os.getpid(), 0)


def _spin_forward(s: Subject, i: DefenseInputs) -> Any:
    x = i.clean_holdout[0].float() / 255
    while True:  # a Python loop of torch calls that never ends
        s(x)


def _spin_swallowing(s: Subject, i: DefenseInputs) -> Any:
    while True:
        try:
            time.sleep(0.001)
            raise ValueError("retry")
        except Exception:  # a defense that retries on any error must still be stopped
            pass


def _native_sleep(s: Subject, i: DefenseInputs) -> Any:
    _report_pid(i)
    ctypes.CDLL(None).sleep(60)  # one C call: no Python bytecode runs, no async exception lands


def _swallow_everything(s: Subject, i: DefenseInputs) -> Any:
    _report_pid(i)
    while True:
        with contextlib.suppress(BaseException):  # even the thread fallback's DefenseTimeout
            time.sleep(0.01)


def _ignore_sigterm(s: Subject, i: DefenseInputs) -> Any:
    # as a C library might (signal.signal works only on the main thread): terminate() is then not enough, kill() follows
    ctypes.CDLL(None).signal(signal.SIGTERM, ctypes.c_void_p(1))  # SIG_IGN
    _native_sleep(s, i)


def _with_pid_recorder(cell: tuple[Subject, DefenseInputs]) -> tuple[tuple[Subject, DefenseInputs], list[tuple[int, int]]]:
    seen: list[tuple[int, int]] = []
    subject, inputs = cell
    return (subject, replace(inputs, progress=lambda d, t: seen.append((d, t)))), seen


@pytest.mark.parametrize("behave", [_spin_forward, _spin_swallowing])
def test_a_python_loop_that_never_ends_is_stopped_and_invalid(cell, behave):
    t0 = time.perf_counter()
    v = run(cell, Fake(behave, name="spinner"), timeout_s=0.3)
    assert_invalid(v, "spinner timed out after 0.3 s")
    assert v.reason_code == "timeout"
    assert "still running" not in v.reason and v.evidence == {"timeout_s": 0.3, "still_running": False}
    assert time.perf_counter() - t0 < 30  # it did come back (generous: 2 shared cores)
    assert _defense_threads() == []


@pytest.mark.skipif(sys.platform != "linux", reason="the child process needs fork; ctypes.CDLL(None) needs libc")
@pytest.mark.parametrize("behave", [_native_sleep, _swallow_everything, _ignore_sigterm])
def test_a_defense_stuck_in_native_code_is_stopped(cell, behave):
    """A 60 s C call, a loop catching BaseException, a process ignoring SIGTERM: each is
    killed within the timeout plus the grace period (1 s) and some slack, and its process is gone."""
    timed, seen = _with_pid_recorder(cell)
    t0 = time.perf_counter()
    v = run(timed, Fake(behave, name="stuck"), timeout_s=0.5)
    elapsed = time.perf_counter() - t0
    assert_invalid(v, "stuck timed out after 0.5 s")
    assert v.reason_code == "timeout" and "still running" not in v.reason
    assert v.evidence == {"timeout_s": 0.5, "still_running": False}
    assert elapsed < 0.5 + 1.0 * 2 + 10, elapsed  # terminate's and kill's grace, slack for a loaded machine; far below 60
    (pid, _), = seen
    assert pid != os.getpid() and _gone(pid)  # stopped and reaped: no zombie, nothing left running
    assert _defense_threads() == []


@pytest.mark.skipif(sys.platform != "linux", reason="needs fork")
@pytest.mark.parametrize(
    ("behave", "words", "evidence"),
    [
        (lambda s, i: os._exit(3), ("fake's process exited with status 3 before answering",), {"exit_code": 3}),
        (lambda s, i: os.kill(os.getpid(), signal.SIGSEGV), ("fake's process was killed by SIGSEGV before answering",),
         {"exit_code": -signal.SIGSEGV, "signal": "SIGSEGV"}),
        (lambda s, i: os.kill(os.getpid(), signal.SIGKILL), ("killed by SIGKILL", "out-of-memory killer"),
         {"exit_code": -signal.SIGKILL, "signal": "SIGKILL"}),
        (lambda s, i: os._exit(0), ("fake's process exited with status 0 before answering",), {"exit_code": 0}),
    ],
    ids=["exit-3", "segfault", "oom-kill", "exit-0"],
)
def test_a_child_that_dies_is_invalid_with_the_reason(cell, behave, words, evidence):
    """Never clean, never a hang: the parent sees the child's exit, not a missing answer."""
    with faulthandler_off():  # pytest's faulthandler would print the segfault's stack to the log
        v = run(cell, Fake(behave), timeout_s=60)
    assert_invalid(v, *words)
    assert v.reason_code == "error" and v.evidence == evidence


@contextlib.contextmanager
def faulthandler_off():
    import faulthandler

    was = faulthandler.is_enabled()
    faulthandler.disable()
    try:
        yield
    finally:
        if was:
            faulthandler.enable()


def _deterministic(s: Subject, i: DefenseInputs, g: torch.Generator) -> Verdict:
    """A verdict computed from the model, the inputs and the generator, with tensors in it."""
    x = i.clean_holdout[0].float() / 255
    noise = torch.rand(x.shape, generator=g)
    logits = s(x * 0.9 + noise * 0.1)
    score = logits.softmax(1).max(1).values.mean()
    return Verdict("detected", score=score, threshold=torch.tensor(0.05), target_class=int(logits.sum(0).argmax()),
                   evidence={"logits": logits.detach(), "draw": float(torch.rand(1, generator=g))},
                   controls={"positive": Control(True, score.item(), "fired")},
                   suspects={"data": "clean_holdout", "by_class": {0: np.array([1, 2])}})


class Computing(Fake):
    def detect(self, subject: Subject, inputs: DefenseInputs, generator: torch.Generator) -> Any:
        return _deterministic(subject, inputs, generator)


@pytest.mark.parametrize("grad", [True, False])
def test_within_its_time_a_defense_answers_as_it_would_without_a_timeout(cell, grad):
    """The same verdict, figures, evidence and suspects as in-process: the child has the same
    model, inputs, generator state, grad mode and thread count."""
    with torch.set_grad_enabled(grad):
        inline = run(cell, Computing(None))
        timed = run(cell, Computing(None), timeout_s=60)
    assert timed.to_dict() == inline.to_dict()
    assert "timeout_isolation" not in timed.evidence
    assert timed.suspects["data"] == "clean_holdout" and list(timed.suspects["by_class"][0]) == [1, 2]
    assert _defense_threads() == []


@pytest.mark.parametrize("grad", [True, False])
def test_the_child_keeps_the_callers_grad_mode(cell, grad):
    # grad mode is thread-local in torch; a gradient-based defense must see the caller's
    d = Fake(lambda s, i: Verdict("clean", score=float(torch.is_grad_enabled())))
    with torch.set_grad_enabled(grad):
        assert run(cell, d, timeout_s=60).score == float(grad)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_child_runs_with_the_callers_thread_count_and_can_use_it(cell, threads):
    """After the caller has run multi-threaded OpenMP ops, a forked child's first parallel op
    in the copied thread waits forever for the caller's (unforked) workers (GNU libgomp): detect
    runs on a fresh thread in the child, and must finish well within its time."""
    def behave(s: Subject, i: DefenseInputs) -> Verdict:
        a = torch.randn(400, 400)
        (a @ a + torch.randn(2_000_000)[:160_000].view(400, 400)).sum()  # parallel matmul and elementwise ops
        return Verdict("clean", score=float(torch.get_num_threads()))

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(400, 400)
        (a @ a + 1).sum()  # the caller's OpenMP pool now exists
        v = run(cell, Fake(behave), timeout_s=20)  # a hang shows as a timeout
    finally:
        torch.set_num_threads(before)
    assert (v.status, v.score) == ("clean", float(threads)), v


def test_progress_reaches_the_caller(cell):
    seen: list[tuple[int, int]] = []
    subject, inputs = cell

    def behave(s: Subject, i: DefenseInputs) -> Verdict:
        for k in range(1, 201):
            i.progress(k, 200)
        return Verdict("clean")

    v = run((subject, replace(inputs, progress=lambda d, t: seen.append((d, t)))), Fake(behave), timeout_s=60)
    assert v.status == "clean"
    # throttled in the child (the caller only redraws a line), but the first and the last arrive, in order
    assert seen[0] == (1, 200) and seen[-1] == (200, 200) and seen == sorted(seen)


@pytest.mark.skipif(sys.platform != "linux", reason="needs fork")
def test_ctrl_c_while_waiting_stops_the_child(cell):
    """KeyboardInterrupt in the caller (here from its progress callback) ends the run and the
    child: nothing keeps running detect in the background."""
    pids: list[int] = []
    subject, inputs = cell

    def interrupt(done: int, total: int) -> None:
        pids.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run((subject, replace(inputs, progress=interrupt)), Fake(_native_sleep), timeout_s=60)
    (pid,) = pids
    assert _gone(pid)


def test_what_the_defense_prints_is_not_lost(cell, capfd):
    def behave(s: Subject, i: DefenseInputs) -> Verdict:
        # a fully buffered stdout, as when it is a file: flushed only when the child exits
        sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=False)  # noqa: SIM115
        print("a defense's debug line")
        return Verdict("clean")

    assert run(cell, Fake(behave), timeout_s=60).status == "clean"
    assert "a defense's debug line" in capfd.readouterr().out


def _unpicklable_verdict(s: Subject, i: DefenseInputs) -> Verdict:
    lock = threading.Lock()  # cannot be pickled; `suspects` is not checked for JSON, so vouch keeps it
    return Verdict("clean", score=1.0, evidence={"n": torch.tensor(3)},
                   suspects={"data": "clean_holdout", "by_class": {0: [1], "lock": lock}})


def test_a_verdict_that_cannot_be_pickled_comes_back_as_its_json_form(cell):
    """`suspects` only feeds a control: it is dropped rather than losing the verdict."""
    v = run(cell, Fake(_unpicklable_verdict), timeout_s=60)
    assert (v.status, v.score, v.evidence, v.suspects) == ("clean", 1.0, {"n": 3}, None)


def test_an_answer_that_cannot_be_read_back_is_invalid(cell):
    def behave(s: Subject, i: DefenseInputs) -> Verdict:
        # a class that exists only in the child's copy of this module: pickled by name there,
        # not found by name here
        made_in_the_child = type("NotHere", (), {"__module__": __name__})
        sys.modules[__name__].NotHere = made_in_the_child
        return Verdict("clean", suspects={"data": "clean_holdout", "by_class": {0: made_in_the_child()}})

    v = run(cell, Fake(behave), timeout_s=60)
    assert_invalid(v, "the defense's answer could not be read back from its process (AttributeError")
    assert v.reason_code == "error" and not hasattr(sys.modules[__name__], "NotHere")


def _pooled(context: tuple[Subject, DefenseInputs], task: str, report: Any) -> dict[str, Any]:
    subject, inputs = context
    behave = {"stuck": _native_sleep, "spinner": _spin_forward, "good": lambda s, i: Verdict("clean", score=2.0)}[task]
    inputs = replace(inputs, progress=lambda d, t: None)
    # the good one gets time to spare on a loaded machine; the others must be stopped at 0.5 s
    v, _ = run_defense(Fake(behave, name=task), subject, inputs, torch.Generator().manual_seed(0),
                       timeout_s=30.0 if task == "good" else 0.5)
    return v.to_dict()


@pytest.mark.skipif(sys.platform != "linux", reason="needs fork")
def test_a_timed_defense_inside_a_pool_worker(cell):
    """`qbd run -j N`: run_defense in a forked pool worker forks its own child, and kills it."""
    from qbd.pool import run_tasks

    out = run_tasks(_pooled, cell, ["stuck", "spinner", "good"], workers=2)
    assert [(d["status"], d["reason_code"]) for d in out] == [("invalid", "timeout"), ("invalid", "timeout"), ("clean", None)]
    assert out[0]["evidence"] == {"timeout_s": 0.5, "still_running": False}
    assert out[2]["score"] == 2.0


# -- without fork: the thread fallback ----------------------------------------------------------
@pytest.fixture
def no_fork(monkeypatch):
    from qbd.defenses import sandbox

    monkeypatch.setattr(sandbox, "_NO_FORK", ((lambda: True, "testing the fallback"),))


def test_the_fallback_stops_a_python_loop(cell, no_fork):
    v = run(cell, Fake(_spin_swallowing, name="spinner"), timeout_s=0.3)
    assert_invalid(v, "spinner timed out after 0.3 s")
    assert v.evidence == {"timeout_s": 0.3, "still_running": False, "timeout_isolation": "thread: testing the fallback"}
    assert _defense_threads() == []


def test_the_fallback_reports_a_defense_stuck_in_native_code_still_running(cell, no_fork):
    release = threading.Event()
    try:
        v = run(cell, Fake(lambda s, i: release.wait(), name="stuck"), timeout_s=0.2)
        assert_invalid(v, "stuck timed out after 0.2 s", "still running")
        assert v.reason_code == "timeout"
        assert v.evidence == {"timeout_s": 0.2, "still_running": True, "timeout_isolation": "thread: testing the fallback"}
    finally:
        release.set()  # Event.wait is one native call: the worker ends only when released
    for t in _defense_threads():
        t.join(10)
    assert _defense_threads() == []


@pytest.mark.parametrize("grad", [True, False])
def test_the_fallback_answers_normally_and_says_how_it_ran(cell, no_fork, grad):
    with torch.set_grad_enabled(grad):
        inline = run(cell, Computing(None))
        timed = run(cell, Computing(None), timeout_s=60)
    assert timed.evidence.pop("timeout_isolation") == "thread: testing the fallback"
    assert timed.to_dict() == inline.to_dict()


@pytest.mark.parametrize(
    ("patch", "words"),
    [
        (("multiprocessing.get_all_start_methods", lambda: ["spawn"]), "this platform cannot fork"),
        (("torch.cuda.is_initialized", lambda: True), "CUDA is initialised in this process"),
    ],
    ids=["no-fork", "cuda"],
)
def test_when_the_fallback_is_used(cell, monkeypatch, patch, words):
    """A forked child cannot use CUDA once the parent has initialised it: a GPU run falls back."""
    monkeypatch.setattr(*patch)
    v = run(cell, returning(Verdict("clean")), timeout_s=60)
    assert v.status == "clean" and words in v.evidence["timeout_isolation"]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "5"])
def test_a_meaningless_timeout_is_a_config_error(cell, bad):
    with pytest.raises(ConfigError, match="defense timeout must be a number of seconds > 0"):
        run(cell, returning(Verdict("clean")), timeout_s=bad)


# -- whatever detect returns ---------------------------------------------------------------------
_figures = st.one_of(st.none(), st.floats(), st.integers(-5, 20), st.booleans(), st.text(max_size=3),
                     st.builds(np.float32, st.floats(width=32)))
_anything = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                      st.lists(st.integers(), max_size=2), st.sampled_from(["detected", "clean", "invalid", "unsure", ""]))


@st.composite
def _answers(draw: st.DrawFn) -> Any:
    """A Verdict with any fields (set after construction), or anything else at all."""
    if draw(st.booleans()):
        return draw(_anything)
    v = Verdict("clean")
    for field, values in (("status", st.sampled_from(["detected", "clean", "invalid", "unsure"])), ("score", _figures),
                          ("threshold", _figures), ("target_class", _figures), ("reason", st.one_of(st.none(), st.text(max_size=5), st.integers())),
                          ("evidence", st.one_of(st.dictionaries(st.text(max_size=3), _figures, max_size=3), _anything)),
                          ("controls", st.one_of(st.just({}), st.just({"c": Control(True)}), _anything)),
                          ("reason_code", st.one_of(st.none(), st.sampled_from([*REASON_CODES, "bogus"]), _anything))):
        setattr(v, field, draw(values))
    return v


def _well_formed_clean(a: Any) -> bool:
    import math

    def finite(x: Any) -> bool:
        if x is None:
            return True
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.floating)):
            return False
        return math.isfinite(float(x))

    return (isinstance(a, Verdict) and a.status == "clean" and a.reason_code is None and (a.reason is None or isinstance(a.reason, str))
            and finite(a.score) and finite(a.threshold) and isinstance(a.evidence, dict) and isinstance(a.controls, dict))


@settings(max_examples=150, deadline=None)
@given(answer=_answers())
def test_any_answer_gives_a_trustworthy_verdict(cell, answer):
    """Never a crash; a `clean` verdict only when detect really returned a well-formed clean one."""
    v = run(cell, returning(answer))
    assert v.status in ("detected", "clean", "invalid")
    if v.status == "invalid":
        assert isinstance(v.reason, str) and v.reason
        assert v.reason_code in REASON_CODES
    else:
        assert v.reason_code is None
    if v.status == "clean":
        assert _well_formed_clean(answer), (answer, v)
    if not isinstance(answer, Verdict):
        assert v.status == "invalid"



@pytest.mark.skipif(sys.platform != "linux", reason="needs fork")
def test_a_failed_fork_falls_back_to_the_thread_path(cell, monkeypatch):
    """Out of processes or memory at fork: a verdict all the same (the thread path), saying why."""
    import multiprocessing.context

    def no_more(self):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start", no_more, raising=False)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", no_more)
    subject, inputs = cell
    v, _ = run_defense(Fake(lambda s, i: Verdict("clean", score=2.0), name="good"), subject, inputs,
                       torch.Generator().manual_seed(0), timeout_s=30.0)
    assert v.status == "clean" and v.score == 2.0
    assert v.evidence["timeout_isolation"].startswith("thread: fork failed")


@pytest.mark.skipif(sys.platform != "linux", reason="needs fork")
def test_autograd_refused_in_a_forked_child_falls_back_to_the_thread_path(cell):
    """torch refuses autograd in a child forked after its parent started autograd's device threads
    (a backward after torch.export: the ONNX and int8-static schemes export). Simulated without
    poisoning this process: detect raises torch's error in the child only; the parent reruns it in
    a thread, gets the verdict, and says why."""
    parent = os.getpid()

    def detect(s, i):
        if os.getpid() != parent:
            raise RuntimeError("Unable to handle autograd's threading in combination with fork-based multiprocessing."
                               " See https://github.com/pytorch/pytorch/wiki/Autograd-and-Fork")
        return Verdict("clean", score=2.0)

    subject, inputs = cell
    v, _ = run_defense(Fake(detect, name="grad"), subject, inputs, torch.Generator().manual_seed(0), timeout_s=30.0)
    assert v.status == "clean" and v.score == 2.0
    assert v.evidence["timeout_isolation"].startswith("thread: autograd cannot run in a child forked")
    # any other crash in the child stays the defense's crash
    v, _ = run_defense(Fake(lambda s, i: (_ for _ in ()).throw(RuntimeError("boom")), name="bad"), subject, inputs,
                       torch.Generator().manual_seed(0), timeout_s=30.0)
    assert v.status == "invalid" and v.reason_code == "error"


def test_a_message_cut_off_by_the_childs_death_is_a_death():
    """The child died while sending: the parent reads a truncated message, never raises."""
    import multiprocessing

    from qbd.defenses import sandbox

    receive, send = multiprocessing.Pipe(duplex=False)
    send._send(b"\x00\x00\x10\x00" + b"x" * 10)  # a header promising 4096 bytes, then 10
    send.close()

    dead_r, dead_w = os.pipe()
    os.close(dead_w)  # an exited child's sentinel: readable at once

    class Gone:
        sentinel = dead_r
        exitcode = -9

        def join(self, timeout=None):
            return None

        def is_alive(self):
            return False

    try:
        out = sandbox._await(Gone(), receive, None, time.monotonic() + 5)
    finally:
        os.close(dead_r)
    assert isinstance(out, sandbox._Died)
