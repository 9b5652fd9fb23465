"""Frozen, hashable specifications. Everything that determines a trained model is in a spec,
and a model's store key is the sha256 of their canonical JSON (plus the qbd version).

Torch-free on purpose: the CLI and the pytest plugin build specs before torch is imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from qbd import __version__
from qbd.attacks import DEFAULT_POSITION, DEFAULT_SIZE, attack_code, check_spec, get_attack
from qbd.errors import ConfigError

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
# the engine a scheme's quant-conditioned construction is conditioned on, where the scheme has
# several that deploy differently (int8-static: x86's calibrated ranges clip the trigger's
# activations, fbgemm's do not: docs/training.md); a scheme not listed: any engine
QC_ENGINES = {"int8-static": "x86"}
# quant-conditioned's gate: FP32 ASR at most 10 %, ASR of the model deployed through its scheme at
# least 90 %, FP32 clean accuracy at most 2 points below the stage-1 BadNet model's
QC_GATES = {"max_fp32_asr": 0.10, "min_deployed_asr": 0.90, "max_clean_acc_drop": 0.02}
PROTOCOLS = ("canonical", "paper")
# Bump when qbd.train, qbd.dormant, qbd.poisoning or a model definition changes the weights a spec produces:
# the revision is part of every store key, so stale models are never reused.
TRAINING_REVISION = 2
_XY = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*$", re.ASCII)  # ASCII: "٣,٣" is not a position
# Seeds reach torch.Generator.manual_seed, which overflows past 64 bits; one bound for all seeds.
MAX_SEED = 2**63 - 1


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, non-finite floats refused."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def derive_seed(purpose: str, seed: int) -> int:
    """An independent 63-bit seed per purpose: two generators seeded with the same user seed
    must not draw the same stream (a shuffle equal to the poisoning order puts every poisoned
    sample in the first batches)."""
    return int(hashlib.sha256(f"qbd:{purpose}:{seed}".encode()).hexdigest()[:15], 16)


def to_dict(spec: Any) -> Any:
    if spec is None:
        return None
    own = getattr(spec, "to_dict", None)
    return own() if own is not None else dataclasses.asdict(spec)


def attack_record(attack: Any) -> dict[str, Any] | None:
    """An AttackSpec as a Result records it: its fields and its seed (None: a clean model)."""
    d = to_dict(attack)
    if d is not None:
        d["seed"] = attack.seed
    return d


@dataclass(frozen=True)
class DatasetSpec:
    name: str = "synthetic"
    seed: int = 0  # generation and split seed; loaders of fixed data sets ignore it

    def __post_init__(self) -> None:
        _check_int("dataset seed", self.seed, 0, MAX_SEED)


@dataclass(frozen=True)
class ModelSpec:
    name: str = "tiny-cnn"


def parse_position(position: str) -> tuple[str, int, int] | tuple[str, None, None]:
    """'bottom-right' -> ('bottom-right', None, None); '4,7' -> ('xy', 4, 7) (x = column)."""
    if position in CORNERS:
        return position, None, None
    m = _XY.match(position)
    if m:
        return "xy", int(m.group(1)), int(m.group(2))
    raise ConfigError(
        f"trigger position {position!r}: use one of {', '.join(CORNERS)} or 'x,y' (column,row of the"
        " trigger's top-left pixel)"
    )


@dataclass(frozen=True)
class AttackSpec:
    """A planted backdoor; poisoned samples are relabelled to `target`. `name` is an attack of the
    catalog (qbd.attacks: badnet, blend, quant-conditioned, or an installed one), which says
    which fields apply and fills their defaults.

    badnet: a square patch written in pixel space. blend: a full-image pattern (`trigger_pattern`
    random or checkerboard) mixed into every pixel, x' = (1 - alpha) x + alpha p; size and position
    do not apply. quant-conditioned: a BadNet patch, then the float model is repaired on the
    triggered images with their true labels while every weight stays in its quantization bin of
    `scheme`: the backdoor is dormant in FP32 and wakes when the model is quantized.
    """

    name: str = "badnet"
    target: int = 0
    trigger_pattern: str = "white"
    trigger_size: int = DEFAULT_SIZE
    trigger_position: str = DEFAULT_POSITION
    poison_rate: float = 0.10
    seed: int = 0  # which samples are poisoned, and the `random` pattern
    alpha: float | None = None  # blend only (default DEFAULT_BLEND_ALPHA)
    scheme: str | None = None  # quant-conditioned only: the deployment it wakes in (default DEFAULT_QC_SCHEME)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"attack name must be a string, got {self.name!r}")
        # the attack's own fields: defaults filled in, values checked, the others refused
        for key, value in check_spec(self).items():
            object.__setattr__(self, key, value)
        _check_int("trigger size", self.trigger_size, 1)
        _check_int("target class", self.target, 0)
        _check_int("attack seed", self.seed, 0, MAX_SEED)
        parse_position(self.trigger_position)
        rate = self.poison_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
            raise ConfigError(f"poison rate must be a number in (0, 1], got {rate!r}")
        if not 0.0 < rate <= 1.0:
            raise ConfigError(f"poison rate must be in (0, 1], got {rate}")

    def to_dict(self) -> dict[str, Any]:
        """Fields that do not apply to the attack are left out, so a BadNet spec (and its store
        and zoo keys) reads as it did before blend and quant-conditioned existed."""
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k in ("alpha", "scheme") and v is None)}

    def label(self) -> str:
        """Short name for slugs and file names."""
        return get_attack(self.name).label(self)

    def check_fits(self, height: int, width: int, num_classes: int | None = None) -> None:
        """Raise ConfigError when the trigger or the target does not fit the data set."""
        if num_classes is not None and self.target >= num_classes:
            raise ConfigError(
                f"target class {self.target} out of range: the data set has {num_classes} classes"
                f" (0..{num_classes - 1})"
            )
        if get_attack(self.name).full_image:  # a full-image pattern fits any image
            return
        if self.trigger_size > min(height, width):
            raise ConfigError(
                f"trigger size {self.trigger_size} is larger than the {height}x{width} image"
            )
        kind, x, y = parse_position(self.trigger_position)
        if kind == "xy" and (x + self.trigger_size > width or y + self.trigger_size > height):
            raise ConfigError(
                f"trigger at x,y = {x},{y} with size {self.trigger_size} leaves the"
                f" {height}x{width} image"
            )


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings. The paper's: SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | constant
    augment: str = "crop"  # none | crop (pad 2, random shift) | crop-flip
    seed: int = 0  # initialisation, shuffling, augmentation
    precision: str = "fp32"  # fp32 | bf16 (autocast; GPU)

    def __post_init__(self) -> None:
        _check_int("epochs", self.epochs, 1)
        _check_int("batch size", self.batch_size, 1)
        _check_int("training seed", self.seed, 0, MAX_SEED)
        for label, v in (("lr", self.lr), ("momentum", self.momentum), ("weight decay", self.weight_decay)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{label} must be a finite number >= 0, got {v!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"unknown schedule {self.schedule!r}; valid: constant, cosine")
        if self.augment not in ("none", "crop", "crop-flip"):
            raise ConfigError(f"unknown augmentation {self.augment!r}; valid: crop, crop-flip, none")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"unknown precision {self.precision!r}; valid: bf16, fp32")


@dataclass(frozen=True)
class Gates:
    """Phase-1 gate of the paper's Algorithm 1: refuse a model whose attack did not take."""

    min_clean_acc: float = 0.85
    min_asr: float = 0.95


@dataclass(frozen=True)
class ModelJob:
    """Everything that determines one trained model's weights."""

    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    attack: AttackSpec | None = field(default_factory=AttackSpec)  # None: clean model
    train: TrainSpec = field(default_factory=TrainSpec)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": to_dict(self.dataset),
            "model": to_dict(self.model),
            "attack": to_dict(self.attack),
            "train": to_dict(self.train),
        }

    def key(self, data_fingerprint: str | None = None, cpu_threads: int | None = None) -> str:
        """Store key. With the data's fingerprint (DataSplit.fingerprint), a changed data set
        (another copy of CIFAR-10, a new synthetic generator) can never reuse stale weights;
        CPU training is bitwise reproducible only for a given thread count, so that is in too."""
        doc: dict[str, Any] = {"job": self.to_dict(), "qbd": __version__, "revision": TRAINING_REVISION}
        code = attack_code(self.attack)  # an installed attack's: an edit to its trigger retrains
        if code is not None:
            doc["attack_code"] = code
        if data_fingerprint is not None:
            doc["data"] = data_fingerprint
        if cpu_threads is not None:
            doc["cpu_threads"] = cpu_threads
        return sha256_text(canonical_json(doc))

    def slug(self) -> str:
        attack = "clean" if self.attack is None else self.attack.label()
        return f"{self.dataset.name}/{self.model.name}/{attack}/s{self.train.seed}"


def _check_int(label: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{label} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{label} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{label} must be <= {maximum}, got {value}")
