"""The plugin's options (--qbd-*, each also an ini key qbd_*) and how they are read and checked:
the model files, the data sets and schemes, the defenses they name. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

# -- options ------------------------------------------------------------------------------------
OPTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("tier", {"choices": ("smoke", "paper")}, "matrix tier: smoke (CPU, embedded data) or paper (default: smoke)"),
    ("cache-dir", {}, "model store: a directory or a URL (s3://bucket/prefix, file:///path) shared by workers and hosts (default: $QBD_CACHE_DIR, else the user cache)"),
    ("data-root", {}, "where CIFAR-10 / GTSRB live for the paper tier (default: $QBD_DATA_ROOT)"),
    ("defense", {"action": "append"}, "run only these defenses, comma-separated (repeatable), as `qbd run --defense` takes them:"
     " built-in or installed names, or a third-party 'module:Class' (default: the built-ins and the installed ones)"),
    ("protocol", {"choices": ("canonical", "paper", "both")}, "protocol(s) to run (default: both)"),
    ("report", {}, "write results.json, report.md and heatmap.png to this directory"),
    ("accept", {"action": "store_true"}, "propose a finding (with a why still to write) for every failing cell of this run, in the"
     " expectations file; existing findings, whys and pins are kept"),
    ("seeds", {"type": int}, "run every cell on this many model seeds (0 .. N-1, each a test of its own), report each row's"
     " detection and false-alarm rates, and check the rate bounds the expectations declare (default: 1)"),
    ("expectations", {}, "expectations TOML (default: the table qbd ships for the tier, qbd/expected/<tier>.toml)"),
    ("model-file", {"action": "append"}, "DATASET=PATH@SHA256: use these (untrusted) weights as DATASET's backdoored model"
     " instead of training it; safetensors or a weights_only state dict, pinned by sha256 (repeatable)"),
    ("defense-timeout", {"type": float}, "seconds a defense may run per cell; past it the cell is invalid (default: no limit)"),
    ("dataset", {}, "run only these of the tier's data sets, comma-separated (default: all of them)"),
    ("scheme", {}, "run these schemes, comma-separated: the tier's or any other of the catalog, as `qbd run --quant` takes"
     " (e.g. onnx-int8-static) (default: the tier's; the clean model's negative control runs on each of them)"),
    ("attack", {}, "the backdoor the matrix's models carry, as `qbd run --attack` takes it: badnet, blend,"
     " quant-conditioned or an installed attack (the qbd.attacks entry points), with its preset settings (default: badnet)"),
    ("reuse-results", {"action": "store_true"}, "also reuse defense Results that earlier sessions filed (beside a local"
     " store, else in the user cache: a CI cache); within one session a valid Result is always reused (docs/scaling.md)"),
    ("fresh", {"action": "store_true"}, "compute every cell, reusing no Result (not even within this session); the"
     " Results are still filed"),
    ("device", {}, "where models train and defenses run: auto (CUDA when present), cpu, cuda or cuda:N; under xdist a bare"
     " cuda (or auto on a GPU host) gives worker k cuda:{k mod GPUs} (default: the tier's: cpu for smoke, auto for paper)"),
]


def opt(config: pytest.Config, name: str, default: Any = None) -> Any:
    key = f"qbd_{name.replace('-', '_')}"
    v = config.getoption(key)
    if v is None or v == []:
        v = config.getini(key)
    return default if v is None or v == [] else v


def parse_model_files(specs: list[str]) -> dict[str, Any]:
    """["digits=/m.safetensors@<sha256>", ...] -> {"digits": Source}; torch-free (qbd.fetch is)."""
    from qbd.errors import QbdUserError
    from qbd.fetch import Source

    out: dict[str, Any] = {}
    for spec in specs:
        dataset, eq, rest = spec.partition("=")
        path, at, digest = rest.rpartition("@")
        if not (eq and at and dataset and path):
            raise pytest.UsageError(f"--qbd-model-file {spec!r}: expected DATASET=PATH@SHA256")
        if dataset in out:
            raise pytest.UsageError(f"--qbd-model-file: two files for {dataset!r}")
        try:
            out[dataset] = Source(path, digest)
        except QbdUserError as e:
            raise pytest.UsageError(f"--qbd-model-file {spec!r}: {e}") from None
    return out


def subset_of(text: str | None, valid: tuple[str, ...], kind: str) -> tuple[str, ...] | None:
    """--qbd-dataset / --qbd-scheme "a,b" -> ("a", "b"), each one of `valid` (did-you-mean otherwise)."""
    if not text:
        return None
    from qbd.registry import unknown_message

    option = kind.split()[0]
    items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not items:
        raise pytest.UsageError(f"--qbd-{option} {text!r}: no {option} named")
    if items == ("all",):  # as `qbd run --quant all`
        return valid
    for it in items:
        if it not in valid:
            raise pytest.UsageError(f"--qbd-{option}: {unknown_message(kind, it, list(valid))}")
    return tuple(v for v in valid if v in items) or None


@dataclass(frozen=True)
class AttackOption:
    name: str
    wakes_in: str | None  # a conditioned attack's scheme: the matrix runs it beside the tier's


def attack_option(name: str) -> AttackOption:
    """--qbd-attack NAME, checked against the catalog's names (package metadata: an installed attack
    is imported only when its first model is built)."""
    from qbd.attacks import attack_names, conditioned
    from qbd.registry import unknown_message

    name = name.strip()
    names = attack_names()
    if name not in names:
        raise pytest.UsageError(f"--qbd-attack: {unknown_message('attack', name, names)}")
    wakes_in = None
    if conditioned(name):  # a built-in's preset: torch-free
        from qbd.presets import attack_preset

        wakes_in = attack_preset(name).scheme
    return AttackOption(name, wakes_in)


def resolve_defenses(values: list[str]) -> tuple[dict[str, str], bool]:
    """--qbd-defense values (repeatable, each comma-separated, as `qbd run --defense` takes them):
    names of built-in or installed defenses and 'module:Class' references -> ({ref: name}, whether
    the user chose the matrix's defenses). None given: the built-ins, and the entry points join
    later (QbdState.matrix). A reference the user typed is imported now, so a broken one is a
    usage error naming it; a name is checked against the entry points' metadata, not imported."""
    from qbd.defenses import BUILTIN, available
    from qbd.registry import load_ref, unknown_message

    items = list(dict.fromkeys(v.strip() for raw in values for v in raw.split(",") if v.strip()))
    if values and not items:
        raise pytest.UsageError("--qbd-defense: no defense named (give names or 'package.module:Class', comma-separated)")
    if not items or items == ["all"]:  # `all`, as `qbd run --defense all`: the default matrix
        return {n: n for n in BUILTIN}, False
    names: dict[str, str] = {}
    for ref in items:
        if ":" not in ref:
            installed = [a.name for a in available()]
            if ref not in installed:
                raise pytest.UsageError(f"--qbd-defense: {unknown_message('defense', ref, installed)}"
                                        " (a third-party class is named as 'package.module:Class')")
            if ref in names.values():
                raise pytest.UsageError(f"--qbd-defense {ref!r}: a 'module:Class' given before it already has that name")
            names[ref] = ref
            continue
        try:
            obj = load_ref(ref)
        except (ImportError, AttributeError, ValueError) as e:
            raise pytest.UsageError(f"--qbd-defense {ref!r}: cannot import it: {type(e).__name__}: {e}") from None
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name or not callable(getattr(obj, "detect", None)):
            raise pytest.UsageError(
                f"--qbd-defense {ref!r}: {obj!r} is not a qbd defense (it needs a str `name`, a `requires` set and a"
                " `detect(subject, inputs, generator) -> Verdict` method)"
            )
        if name in BUILTIN:
            raise pytest.UsageError(f"--qbd-defense {ref!r}: its name {name!r} is a built-in defense's; give your class another")
        if name in names.values():
            raise pytest.UsageError(f"--qbd-defense {ref!r}: a defense named {name!r} is already in the matrix")
        names[ref] = name
    return names, True


# -- parametrization ----------------------------------------------------------------------------
def data_missing(dataset: str, root: str | None) -> str | None:
    """Why a file-based data set cannot run: the loaders' own layout check (qbd.data.layouts), so
    the plugin skips exactly the roots `qbd run` refuses. Torch-free."""
    from qbd.data import resolve_root
    from qbd.data.layouts import missing

    return missing(dataset, resolve_root(root))
