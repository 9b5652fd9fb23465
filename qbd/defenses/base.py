"""The Defense contract: the protocol a defense implements (`name`, `requires`, `detect`), the
inputs it is given (Subject, DefenseInputs), the Verdict it returns with its Controls, and the
ConfiguredDefense base the built-ins share. The sandbox that runs a defense and turns a crash, a
timeout or a NaN into `invalid` is qbd.defenses.sandbox.

A verdict nobody can trust is `invalid` with a reason: an exception, a NaN, MAD = 0, or a
gradient-based defense that received no input gradient. It is never `clean`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from qbd.reason_codes import NEVER_EXPECTED, REASON_CODES, STATUSES, verdict_problems  # noqa: F401  (re-exported for defense authors)

Status = Literal["detected", "clean", "invalid"]
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
    reason_code: str | None = None  # one of REASON_CODES when status is invalid
    # Per-sample output of a data-inspecting defense: {"data": the DefenseInputs field inspected,
    # "by_class": {class: indices of the samples it suspects}}. The bench scores it against the
    # known poison as a control (the defense never sees which samples are poisoned); not serialised.
    suspects: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # a defense may leave an invalid verdict's code out; qbd then files it as "unspecified"
        if self.status == "invalid" and self.reason_code is None:
            self.reason_code = "unspecified"
        problems = verdict_problems(self.status, self.reason, self.reason_code)
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def invalid(cls, reason: str, code: str = "unspecified", **kw: Any) -> Verdict:
        """An invalid verdict: `reason` for people, `code` (REASON_CODES) for gates."""
        return cls(status="invalid", reason=reason, reason_code=code, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "score": _jsonable(self.score),
            "threshold": _jsonable(self.threshold),
            "target_class": self.target_class,
            "reason": self.reason,
            "reason_code": self.reason_code,
            "evidence": _jsonable(self.evidence),
            "controls": {k: c.to_dict() for k, c in sorted(self.controls.items())},
        }


@dataclass
class Subject:
    """The model a defense inspects, as deployed (or its differentiable surrogate).

    forward(x) maps float pixel-space images in [0, 1] (N x 3 x H x W) to logits, and refuses
    uint8 with a TypeError: DefenseInputs holds uint8 pixels, so convert them first
    (qbd.metrics.to_unit). embed/classify split it at the penultimate layer, so that
    classify(embed(x)) == forward(x). Put your tensors on `device`, not on
    `next(model.parameters()).device`: a deployed int8 or ONNX Runtime model holds its weights
    as packed or foreign buffers and has no parameters at all.
    """

    model: nn.Module
    embed: Callable[[torch.Tensor], torch.Tensor]
    classify: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int
    scheme: str = "fp32"
    gradient_path: str = "deployed"  # deployed | surrogate
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # For repair methods (Fine-Pruning) only: the float model the deployed one was made from, and
    # a function that deploys an edited copy of it through the same scheme and calibration,
    # returning its Subject. None where the subject was built without them.
    float_model: nn.Module | None = None
    redeploy: Callable[[nn.Module], Subject] | None = None

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
    # the data set's name as qbd's catalog spells it ("digits"), which a defender knows: a
    # threshold calibrated per data set is chosen by it (qbd.defenses._per_dataset); None: not told
    dataset: str | None = None
    # `progress(done, total)`: a long optimisation (Neural Cleanse, Fine-Pruning) reports its steps;
    # None: nobody is watching. Cheap to call often: the caller throttles what it shows.
    progress: Callable[[int, int], None] | None = field(default=None, compare=False, repr=False)

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


def declared_params(defense: Any) -> Any:
    """A defense's `params` as it declares them (a mapping, a method returning one, or None)."""
    p = getattr(defense, "params", None)
    return p() if callable(p) else p


def params_of(defense: Any) -> dict[str, Any]:
    """Every hyperparameter a defense reports (its `params` mapping), JSON-ready."""
    p = declared_params(defense)
    return _jsonable(dict(p)) if isinstance(p, Mapping) else {}


def check_defense(obj: Any) -> None:
    """Raise TypeError unless `obj` satisfies the Defense protocol."""
    problems = []
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        problems.append("a non-empty str `name`")
    req = getattr(obj, "requires", None)
    if not isinstance(req, (set, frozenset)):
        problems.append(f"`requires`, a set drawn from {sorted(REQUIREMENTS)}")
    elif not set(req) <= REQUIREMENTS:
        problems.append(f"`requires` drawn from {sorted(REQUIREMENTS)} (it has {sorted(map(str, set(req) - REQUIREMENTS))})")
    if not callable(getattr(obj, "detect", None)):
        problems.append("a `detect(subject, inputs, generator) -> Verdict` method")
    if problems:
        what = f"{type(obj).__module__}.{type(obj).__qualname__}" + (f" ({obj.name!r})" if isinstance(getattr(obj, "name", None), str) else "")
        raise TypeError(f"{what} is not a qbd defense: it needs " + ", ".join(problems))




_NOT_A_NUMBER = object()


def _as_float(value: Any) -> Any:
    """None, a finite or non-finite float, or _NOT_A_NUMBER. Accepts numpy scalars and 1-element
    tensors; refuses bools, strings and everything else."""
    import numpy as np

    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return _NOT_A_NUMBER
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        return _NOT_A_NUMBER
    return float(value)


def _as_int(value: Any) -> int | None:
    """An int from an int, numpy integer or 1-element integer tensor; None for anything else."""
    import numpy as np

    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            return None
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


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
    names_target: bool = True  # a detection names the target class (False: a repair method, a pooled statistic)
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


def __getattr__(name: str) -> object:
    # run_defense, vouch and DefenseTimeout lived here before the sandbox had a module of its own: say
    # where they went (importing them from here would tie the contract back to the sandbox, a cycle)
    if name in ("run_defense", "vouch", "DefenseTimeout"):
        raise ImportError(f"qbd.defenses.base.{name} moved to qbd.defenses.sandbox.{name} (the sandbox that runs a defense)")
    raise AttributeError(f"module 'qbd.defenses.base' has no attribute {name!r}")
