"""A third-party defense that crashes, hangs or answers nonsense yields an `invalid` verdict
with a clear reason: never a crash of the whole run, never `clean`."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbd.defenses.base import REASON_CODES, Control, DefenseInputs, Subject, Verdict, run_defense
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
    (_mutated(status="maybe"), ("unknown status 'maybe'", "valid: detected, clean, invalid"), "error"),
    (_mutated(status=None), ("unknown status None",), "error"),
    (_mutated(status="invalid", reason=None), ("without a reason",), "error"),
    (_mutated(reason=42), ("int reason",), "error"),
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
    (_mutated(reason_code="no-signal"), ("'clean' verdict with reason code 'no-signal'",), "error"),
    (_mutated(status="invalid", reason="r", reason_code="maybe"), ("reason code 'maybe'",), "error"),
    (_mutated(status="invalid", reason="r", reason_code=["error"]), ("reason code ['error']",), "error"),
]


@pytest.mark.parametrize(("value", "words", "code"), MALFORMED, ids=[f"{i}-{w[0][:32]}" for i, (_, w, _) in enumerate(MALFORMED)])
def test_a_malformed_answer_is_invalid(cell, value, words, code):
    v = run(cell, returning(value))
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


@pytest.mark.parametrize("timeout_s", [None, 30.0], ids=["inline", "threaded"])
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


@pytest.mark.parametrize("timeout_s", [None, 30.0], ids=["inline", "threaded"])
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
def _defense_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("qbd-defense-")]


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


@pytest.mark.parametrize("behave", [_spin_forward, _spin_swallowing])
def test_a_python_loop_that_never_ends_is_stopped_and_invalid(cell, behave):
    t0 = time.perf_counter()
    v = run(cell, Fake(behave, name="spinner"), timeout_s=0.3)
    assert_invalid(v, "spinner timed out after 0.3 s")
    assert v.reason_code == "timeout"
    assert "still running" not in v.reason and v.evidence["still_running"] is False
    assert time.perf_counter() - t0 < 30  # it did come back (generous: 2 shared cores)
    assert _defense_threads() == []


def test_a_defense_stuck_in_native_code_is_reported_still_running(cell):
    release = threading.Event()
    try:
        v = run(cell, Fake(lambda s, i: release.wait(), name="stuck"), timeout_s=0.2)
        assert_invalid(v, "stuck timed out after 0.2 s", "still running")
        assert v.reason_code == "timeout"
        assert v.evidence == {"timeout_s": 0.2, "still_running": True}
    finally:
        release.set()  # Event.wait is one native call: the worker ends only when released
    for t in _defense_threads():
        t.join(10)
    assert _defense_threads() == []


def test_within_its_time_a_defense_answers_normally(cell):
    good = Verdict("detected", score=3.0, threshold=2.0, target_class=1)
    v = run(cell, returning(good), timeout_s=60)
    assert v.to_dict() == good.to_dict()
    assert _defense_threads() == []


@pytest.mark.parametrize("grad", [True, False])
def test_the_worker_thread_keeps_the_callers_grad_mode(cell, grad):
    # grad mode is thread-local in torch; a gradient-based defense must see the caller's
    d = Fake(lambda s, i: Verdict("clean", score=float(torch.is_grad_enabled())))
    with torch.set_grad_enabled(grad):
        assert run(cell, d, timeout_s=60).score == float(grad)


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
