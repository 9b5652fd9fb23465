"""Quantization schemes: name -> scheme, each with `.apply(model, calib, engine)` returning a
QuantizedModel (deployed model, audit, surrogate). See docs/quantization.md.

One catalog: the built-ins below plus the `qbd.schemes` entry points of installed distributions
(a scheme of your own: docs/quantization.md#your-own-scheme). Everything that takes a scheme name
(`qbd run --quant`, `--qbd-scheme`, the bench) resolves it with `get_scheme` and lists the valid
ones with `scheme_names`.

Torch-free on purpose: entries are lazy, so the CLI and the pytest plugin can list scheme
names without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qbd.registry import Available, Registry, installed, load_entry, unknown_message

if TYPE_CHECKING:
    from qbd.quant.base import Scheme

SCHEMES: Registry[Scheme] = Registry("quantization scheme")
SCHEMES.add_lazy("fp32", "qbd.quant.fp32:SCHEME")
SCHEMES.add_lazy("int8-dynamic", "qbd.quant.int8_dynamic:SCHEME")
SCHEMES.add_lazy("int8-static", "qbd.quant.int8_static:SCHEME")
# ONNX Runtime's INT8 CPU path; needs the `onnx` extra at apply time, not to be listed
SCHEMES.add_lazy("onnx-int8-static", "qbd.quant.onnx_rt:STATIC")
SCHEMES.add_lazy("onnx-int8-dynamic", "qbd.quant.onnx_rt:DYNAMIC")
SIM_BITS = tuple(range(2, 9))  # intN-sim, N = 2..8; int4-sim is the paper's INT4
for _bits in SIM_BITS:
    SCHEMES.add_lazy(f"int{_bits}-sim", f"qbd.quant.intn_sim:INT{_bits}_SIM")
del _bits

BUILTIN = tuple(SCHEMES.names())
ENTRY_POINT_GROUP = "qbd.schemes"


def available() -> list[Available]:
    """The built-in schemes and the `qbd.schemes` entry points, sorted by name; nothing imported."""
    return installed("quantization scheme", ENTRY_POINT_GROUP, BUILTIN)


def scheme_names() -> list[str]:
    return [a.name for a in available()]


def get_scheme(name: str) -> Scheme:
    """The scheme called `name`: a built-in, or an installed entry point (its module imported now;
    its value a scheme object or a class taking no arguments)."""
    from qbd.errors import ConfigError
    from qbd.registry import UnknownNameError

    if name in SCHEMES:
        return SCHEMES.get(name)
    entries = {a.name: a for a in available()}
    if name not in entries:
        raise UnknownNameError(unknown_message("quantization scheme", name, sorted(entries)))
    entry = entries[name]
    scheme = load_entry("quantization scheme", entry)
    missing = [a for a in ("name", "differentiable", "engines", "apply") if not hasattr(scheme, a)]
    if missing:
        raise ConfigError(f"quantization scheme {name!r} of the {entry.origin} ({entry.ref}) is not a scheme: it has no"
                          f" {', '.join(missing)} (write it on qbd.quant.scheme.SchemeBase)")
    if scheme.name != name:  # cells and reports are named after the entry point
        raise ConfigError(f"quantization scheme {name!r} of the {entry.origin}: the object it names says its name is"
                          f" {scheme.name!r}")
    return scheme


__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "SCHEMES", "SIM_BITS", "available", "get_scheme", "scheme_names"]
