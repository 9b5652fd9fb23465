"""The attacks: one catalog, the built-ins plus the `qbd.attacks` entry points of installed
distributions (an attack of your own: docs/training.md#your-own-attack).

An attack is a class that declares what an AttackSpec of its name may hold (its trigger patterns,
the optional fields it takes, their defaults), how a spec is labelled in slugs and store keys, and
how its trigger is written. qbd.config.AttackSpec checks every spec against it; qbd.poisoning writes
the trigger and poisons the training set; training is qbd's (qbd.train), except for an attack that
is `conditioned` on a quantization scheme (quant-conditioned: qbd.dormant's second stage).

Torch-free on purpose: the CLI and the pytest plugin build specs before torch is imported.
"""

from __future__ import annotations

from typing import Any, ClassVar

from qbd.errors import ConfigError
from qbd.registry import Available, Registry, installed, load_entry, unknown_message

TRIGGER_PATTERNS = ("white", "checkerboard", "random")
BLEND_PATTERNS = ("random", "checkerboard")  # full-image patterns; a white blend is only a brightening
DEFAULT_BLEND_ALPHA = 0.15
# the schemes a quant-conditioned backdoor can be conditioned on: intN-sim (weights on a per-channel
# grid the repair keeps fixed, qbd.dormant) and int8-static (its calibrated activation ranges'
# clipping, qbd.dormant_static)
QC_SCHEMES = ("int4-sim", "int3-sim", "int5-sim", "int6-sim", "int8-sim", "int8-static")
DEFAULT_QC_SCHEME = "int4-sim"
DEFAULT_SIZE, DEFAULT_POSITION = 3, "bottom-right"
# the optional AttackSpec fields, each taken by the attacks that name it in `takes`; a spec of any
# other attack must leave it None (a field that does not apply must not reach the store key)
OPTIONAL_FIELDS = {"alpha": "--blend-alpha", "scheme": "--qc-scheme"}


class Attack:
    """A BadNet-style attack: a square patch (`trigger_size`, `trigger_position`) of one of
    TRIGGER_PATTERNS written into the image, on `poison_rate` of the training set relabelled to
    `target`. Subclass it and override what differs."""

    name: ClassVar[str] = ""
    # how qbd.poisoning writes the trigger: "patch" (the square), "blend" (a full-image pattern mixed
    # in at `alpha`); None: the attack's own `write`
    trigger: ClassVar[str | None] = "patch"
    patterns: ClassVar[tuple[str, ...]] = TRIGGER_PATTERNS
    takes: ClassVar[frozenset[str]] = frozenset()  # of OPTIONAL_FIELDS
    # dormant in FP32, woken by deploying through `spec.scheme` (qbd.dormant trains it)
    conditioned: ClassVar[bool] = False

    @property
    def full_image(self) -> bool:
        """The trigger covers the whole image: size and position do not apply."""
        return self.trigger == "blend"

    def fill(self, spec: Any) -> dict[str, Any]:
        """The values of the optional fields this attack takes, defaults filled in; ConfigError
        for a value it refuses."""
        return {}

    def label(self, spec: Any) -> str:
        """Short name for slugs and file names (part of the zoo's file names: keep it stable)."""
        return f"{self.name}-{patch_label(spec)}"

    def write(self, x: Any, spec: Any) -> Any:
        """The images (uint8 N x C x H x W, or float in [0, 1]) with the trigger, as a new tensor.
        Only called when `trigger` is None."""
        raise NotImplementedError(f"attack {self.name!r}: trigger = None needs a write(x, spec) method")


def patch_label(spec: Any) -> str:
    return f"t{spec.target}-{spec.trigger_pattern}{spec.trigger_size}-{spec.trigger_position.replace(',', 'x')}-p{spec.poison_rate:g}"


class BadNet(Attack):
    """A square patch written into the image (Gu et al. 2017)."""

    name = "badnet"


class Blend(Attack):
    """A full-image pattern mixed into every pixel at `alpha` (Chen et al. 2017). An attack of your
    own with a blended trigger subclasses it (its `fill` sets alpha's default)."""

    name = "blend"
    trigger = "blend"
    patterns = BLEND_PATTERNS
    takes = frozenset({"alpha"})

    def fill(self, spec: Any) -> dict[str, Any]:
        alpha = DEFAULT_BLEND_ALPHA if spec.alpha is None else spec.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
            raise ConfigError(f"blend alpha must be a number in (0, 1), got {alpha!r} (0.1-0.2 is the usual range)")
        return {"alpha": float(alpha)}

    def label(self, spec: Any) -> str:
        return f"blend-t{spec.target}-{spec.trigger_pattern}-a{spec.alpha!r}-p{spec.poison_rate:g}"  # repr: exact, 0.15 -> "0.15"


class QuantConditioned(Attack):
    """A BadNet patch dormant in FP32 that wakes in `scheme`'s deployment (qbd.dormant)."""

    name = "quant-conditioned"
    takes = frozenset({"scheme"})
    conditioned = True

    def fill(self, spec: Any) -> dict[str, Any]:
        scheme = DEFAULT_QC_SCHEME if spec.scheme is None else spec.scheme
        if scheme not in QC_SCHEMES:
            raise ConfigError(f"quant-conditioned scheme {scheme!r} not supported; valid: {', '.join(QC_SCHEMES)}"
                              " (docs/training.md#quant-conditioned)")
        return {"scheme": scheme}

    def label(self, spec: Any) -> str:
        return f"qc-{spec.scheme}-{patch_label(spec)}"


ATTACKS: Registry[Attack] = Registry("attack")
for _cls in (BadNet, Blend, QuantConditioned):
    ATTACKS.add(_cls.name, _cls())
del _cls
BUILTIN = tuple(ATTACKS.names())
ENTRY_POINT_GROUP = "qbd.attacks"


def available() -> list[Available]:
    """The built-in attacks and the `qbd.attacks` entry points, sorted by name; nothing imported."""
    return installed("attack", ENTRY_POINT_GROUP, BUILTIN)


def attack_names() -> list[str]:
    return [a.name for a in available()]


def get_attack(name: str) -> Attack:
    """The attack called `name`: a built-in, or an installed entry point (its module imported now;
    its value an Attack subclass or instance)."""
    if name in ATTACKS:
        return ATTACKS.get(name)
    entries = {a.name: a for a in available()}
    if name not in entries:
        raise ConfigError(unknown_message("attack", name, sorted(entries)))
    entry = entries[name]
    attack = load_entry("attack", entry)
    if not isinstance(attack, Attack):
        raise ConfigError(f"attack {name!r} of the {entry.origin} ({entry.ref}) is not an attack: write it on"
                          " qbd.attacks.Attack")
    if attack.name != name:  # store keys and cells are named after the entry point
        raise ConfigError(f"attack {name!r} of the {entry.origin}: the class it names says its name is {attack.name!r}")
    if attack.trigger not in ("patch", "blend", None) or attack.conditioned:
        raise ConfigError(f"attack {name!r} of the {entry.origin}: trigger must be 'patch', 'blend' or None (its own write),"
                          " and only qbd's quant-conditioned attack is conditioned on a scheme")
    if attack.trigger == "blend" and not isinstance(attack, Blend):
        raise ConfigError(f"attack {name!r} of the {entry.origin}: a blended trigger subclasses qbd.attacks.Blend (its alpha"
                          " and patterns)")
    if not set(attack.patterns) <= set(TRIGGER_PATTERNS) or not attack.takes <= set(OPTIONAL_FIELDS):
        raise ConfigError(f"attack {name!r} of the {entry.origin}: patterns must be drawn from {', '.join(TRIGGER_PATTERNS)}"
                          f" and takes from {', '.join(OPTIONAL_FIELDS)}")
    return attack


def attack_code(spec: Any) -> str | None:
    """The digest of an installed attack's package (qbd.registry.code_digest), for the keys of what
    it produces (a stored model, a memoised Result): an edit to its trigger must not reuse them.
    None for a built-in (qbd's version and code cover it) or no attack; ConfigError for an attack
    whose code has no source file to read (its edits could not be told apart)."""
    if spec is None or spec.name in BUILTIN:
        return None
    from qbd.registry import code_digest

    digest = code_digest(get_attack(spec.name))
    if digest is None:
        raise ConfigError(f"attack {spec.name!r}: qbd cannot read its code (no .py source file), so it cannot key the models"
                          " trained with it; install it from a package of .py files")
    return digest


def conditioned(name: str) -> bool:
    """Whether the attack called `name` is dormant in FP32 and wakes in its spec's scheme. Only a
    built-in may be (get_attack refuses a conditioned entry point), so a Result of an attack that is
    not installed here is read without importing anything."""
    return name in ATTACKS and ATTACKS.get(name).conditioned


def check_spec(spec: Any) -> dict[str, Any]:
    """Check an AttackSpec against its attack; the optional fields' values, defaults filled in."""
    attack = get_attack(spec.name)
    if spec.trigger_pattern not in TRIGGER_PATTERNS:
        raise ConfigError(f"unknown trigger pattern {spec.trigger_pattern!r}; valid: {', '.join(TRIGGER_PATTERNS)}")
    if spec.trigger_pattern not in attack.patterns:
        raise ConfigError(f"{spec.name} takes trigger pattern {' or '.join(attack.patterns)}, got {spec.trigger_pattern!r}")
    for field, flag in OPTIONAL_FIELDS.items():
        if field not in attack.takes and getattr(spec, field) is not None:
            owners = [n for n in BUILTIN if field in ATTACKS.get(n).takes]
            raise ConfigError(f"{field} ({flag}) applies to the {' or '.join(owners)} attack only, not {spec.name}")
    # a full-image pattern has no size or corner: other values would key distinct models that are the same
    if attack.full_image and (spec.trigger_size, spec.trigger_position) != (DEFAULT_SIZE, DEFAULT_POSITION):
        raise ConfigError(f"{spec.name}'s pattern covers the whole image: --trigger-size and --trigger-position do not apply")
    return attack.fill(spec)
