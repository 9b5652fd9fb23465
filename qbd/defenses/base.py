"""The Defense protocol, the Verdict it returns, and the guard that turns a crash into `invalid`.

A verdict nobody can trust is `invalid` with a reason: an exception, a NaN, MAD = 0, or a
gradient-based defense that received no input gradient. It is never `clean`.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

Status = Literal["detected", "clean", "invalid"]
STATUSES: tuple[str, ...] = ("detected", "clean", "invalid")
REQUIREMENTS = frozenset({"clean_holdout", "poisoned_train", "triggered_inputs", "triggered_probe", "input_gradients"})


@dataclass
class Control:
    """A named check that the cell could have fired: passed or not, with a figure."""

    passed: bool
    value: float | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"passed": bool(self.passed), "value": _jsonable(self.value), "detail": self.detail}


@dataclass
class Verdict:
    status: Status
    score: float | None = None
    threshold: float | None = None
    target_class: int | None = None
    reason: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    controls: dict[str, Control] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"verdict status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "invalid" and not self.reason:
            raise ValueError("an invalid verdict needs a reason")

    @classmethod
    def invalid(cls, reason: str, **kw: Any) -> Verdict:
        return cls(status="invalid", reason=reason, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "score": _jsonable(self.score),
            "threshold": _jsonable(self.threshold),
            "target_class": self.target_class,
            "reason": self.reason,
            "evidence": _jsonable(self.evidence),
            "controls": {k: c.to_dict() for k, c in sorted(self.controls.items())},
        }


@dataclass
class Subject:
    """The model a defense inspects, as deployed (or its differentiable surrogate).

    forward(x) maps pixel-space images in [0, 1] to logits; embed/classify split it at the
    penultimate layer, so that classify(embed(x)) == forward(x).
    """

    model: nn.Module
    embed: Callable[[torch.Tensor], torch.Tensor]
    classify: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int
    scheme: str = "fp32"
    gradient_path: str = "deployed"  # deployed | surrogate
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@dataclass
class DefenseInputs:
    """What the defense is fed. Images are uint8 N x 3 x H x W in pixel space.

    `clean_holdout`: clean labelled images the defender holds (never used for training).
    `poisoned_train`: the training set as the model was trained on it (AC, SS).
    `triggered_inputs`: a stream of incoming test inputs, about half triggered (STRIP).
    `triggered_probe`: images known to carry the trigger, whose true label is not the target:
    for repair methods (Fine-Pruning), which are judged by how much ASR they remove.
    Which stream inputs are triggered, and which training samples are poisoned, is not here:
    detectors must not see the ground truth.
    """

    clean_holdout: tuple[torch.Tensor, torch.Tensor]
    poisoned_train: tuple[torch.Tensor, torch.Tensor] | None = None
    triggered_inputs: torch.Tensor | None = None
    triggered_probe: tuple[torch.Tensor, int] | None = None  # (images, target class)

    def require(self, needs: frozenset[str] | set[str]) -> str | None:
        """The name of a missing input, or None."""
        for name in sorted(needs - {"input_gradients"}):
            if getattr(self, name) is None:
                return name
        return None


@runtime_checkable
class Defense(Protocol):
    name: str
    requires: frozenset[str]

    def detect(self, subject: Subject, inputs: DefenseInputs, generator: torch.Generator) -> Verdict: ...


def params_of(defense: Any) -> dict[str, Any]:
    """Every hyperparameter a defense reports (its `params` mapping), JSON-ready."""
    p = getattr(defense, "params", None)
    if callable(p):
        p = p()
    return _jsonable(dict(p)) if isinstance(p, Mapping) else {}


def check_defense(obj: Any) -> None:
    """Raise TypeError unless `obj` satisfies the Defense protocol."""
    problems = []
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        problems.append("a non-empty str `name`")
    req = getattr(obj, "requires", None)
    if not isinstance(req, (set, frozenset)) or not set(req) <= REQUIREMENTS:
        problems.append(f"`requires`, a set drawn from {sorted(REQUIREMENTS)}")
    if not callable(getattr(obj, "detect", None)):
        problems.append("a `detect(subject, inputs, generator) -> Verdict` method")
    if problems:
        raise TypeError(f"{obj!r} is not a qbd defense: it needs " + ", ".join(problems))


def run_defense(defense: Defense, subject: Subject, inputs: DefenseInputs, generator: torch.Generator) -> tuple[Verdict, float]:
    """Run `detect` and vouch for the answer: a crash, a wrong type or a non-finite figure is
    an `invalid` verdict with the reason, never a silent `clean`. Returns (verdict, seconds)."""
    t0 = time.perf_counter()
    missing = inputs.require(frozenset(defense.requires))
    if missing:
        return Verdict.invalid(f"{defense.name} requires {missing}, which this protocol does not provide"), 0.0
    try:
        v = defense.detect(subject, inputs, generator)
    except Exception as e:
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return Verdict.invalid(f"{defense.name} raised {tb}", evidence={"exception": type(e).__name__}), time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    if not isinstance(v, Verdict):
        return Verdict.invalid(f"{defense.name}.detect returned {type(v).__name__}, not a Verdict"), seconds
    for label, value in (("score", v.score), ("threshold", v.threshold)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)) and v.status != "invalid":
            return Verdict.invalid(f"{defense.name} produced a non-finite {label} ({value})", evidence=v.evidence, controls=v.controls), seconds
    return v, seconds


def _jsonable(obj: Any) -> Any:
    """Numbers, tensors and numpy values -> plain JSON values; NaN/inf -> None."""
    import numpy as np

    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


class ConfiguredDefense:
    """Base of the built-in defenses: hyperparameters per protocol, budgets per tier.

    `defaults[protocol]` holds every hyperparameter; `budgets[tier][protocol]` may shrink the
    optimisation budget for a tier (the smoke tier runs on 2 CPU cores); keyword overrides win.
    Whatever is used ends up in `params`, and every Result records it.
    """

    name: str = ""
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    budgets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}
    needs: ClassVar[dict[str, frozenset[str]]] = {}  # protocol -> inputs

    def __init__(self, protocol: str = "canonical", tier: str = "paper", **overrides: Any) -> None:
        from qbd.errors import ConfigError

        if protocol not in self.defaults:
            raise ConfigError(f"{self.name}: unknown protocol {protocol!r}; valid: {', '.join(sorted(self.defaults))}")
        params = {**self.defaults[protocol], **self.budgets.get(tier, {}).get(protocol, {})}
        unknown = sorted(set(overrides) - set(params))
        if unknown:
            raise ConfigError(f"{self.name}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(params))}")
        params.update(overrides)
        self.protocol = protocol
        self.tier = tier
        self.params: dict[str, Any] = params
        self.requires: frozenset[str] = self.needs[protocol]
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for parameter values that cannot work, at construction rather than
        as an `invalid` verdict in every cell."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(protocol={self.protocol!r}, tier={self.tier!r})"
