"""An author's expectations table on top of the one qbd ships: their findings for their defense
(and schemes, and attacks) join the shipped ones, which keep applying to the built-ins. `[meta]
extends = false` makes a table stand alone instead. Torch-free.

A layer adds entries, it never replaces one: an entry the shipped table declares is qbd's measured
finding, and a silent override would change what the built-in defenses are judged against."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from qbd.errors import ConfigError

TABLES = ("cells", "attack", "audit", "rows")


def layer(base: Any, top: Any) -> Any:
    """`top` (the author's table) over `base` (the shipped one), both qbd.expectations.Expectations
    (not imported: qbd.expectations calls this module): one table whose `path` is the author's and
    whose `layers` name both."""
    where = f"{top.path}"
    if top.tier != base.tier:
        raise ConfigError(f"{where}: a table for the {top.tier!r} tier cannot extend the {base.tier!r} tier's")
    if top.attack_spec != base.attack_spec:
        raise ConfigError(f"{where}: meta.attack {top.attack_spec} is not the attack the shipped table's findings were"
                          f" measured on ({base.attack_spec}); declare yours in an [attacks.<name>] section, or set"
                          " `extends = false` in [meta] to use your table alone")
    merged: dict[str, dict[str, Any]] = {}
    for table in TABLES:
        mine, theirs = getattr(top, table), getattr(base, table)
        _no_overlap(where, table, mine, theirs)
        merged[table] = {**theirs, **mine}
    attacks = {name: dict(section) for name, section in base.attacks.items()}
    for name, section in top.attacks.items():
        if name not in attacks:
            attacks[name] = section
            continue
        if section["attack"] != attacks[name]["attack"]:
            raise ConfigError(f"{where}: [attacks.{name}] names another attack than the shipped section of that name; rename it")
        for table in ("cells", "rows"):
            _no_overlap(where, f"attacks.{name}.{table}", section.get(table, {}), attacks[name].get(table, {}))
            attacks[name][table] = {**attacks[name].get(table, {}), **section.get(table, {})}
    # the tier's gates on the deployed models are qbd's (measured on its zoo): a layer cannot loosen them
    return replace(top, min_clean_acc=base.min_clean_acc, min_asr=base.min_asr, attacks=attacks,
                   layers=(*base.layers, *top.layers), **merged)


def _no_overlap(where: str, table: str, mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    both = sorted(set(mine) & set(theirs))
    if both:
        raise ConfigError(f"{where}: [{table}] {both[0]!r}" + (f" (and {len(both) - 1} more)" if len(both) > 1 else "")
                          + " is declared by the table qbd ships: your table adds entries, it does not replace qbd's"
                          " (set `extends = false` in [meta] to judge against your table alone)")
