"""A threshold calibrated per data set.

A per-class statistic's natural range is a property of the data as much as of the defense. On
the smoke tier's calibration models (seeds 100-104) a class of a digits model reaches a 2-means
silhouette of 0.401 without a backdoor, while a synthetic model's planted target may score only
0.415; Spectral Signatures' kurtosis is at most 1.11 on a digits target and up to 1.32 on a
synthetic one, and at least 1.43 on any digits class without poison, 2.06 on a synthetic one.
One number for both sets sits close to one set's clean classes or the other's targets. So a
built-in's threshold may be a mapping from a data set's name (as qbd's catalog spells it) to the
midpoint calibrated on that set's own calibration models, with ANY for a data set nobody
calibrated: the midpoint over all calibration models, and the verdict's evidence says it was
that one. A plain number applies to every data set.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any

ANY = "*"  # the entry for a data set without a calibration of its own


def check(owner: str, param: str, value: Any, off: bool = False) -> None:
    """ConfigError unless `value` is a number or a {data set: number} mapping with an ANY entry;
    with `off`, None also stands for "this rule is not used" (as a value or a data set's entry)."""
    from qbd.errors import ConfigError

    def number(v: Any) -> bool:
        return (isinstance(v, Real) and not isinstance(v, bool)) or (off and v is None)

    if number(value):
        return
    if isinstance(value, Mapping) and ANY in value and all(isinstance(k, str) and number(v) for k, v in value.items()):
        return
    none = " (or None: not used)" if off else ""
    raise ConfigError(f"{owner}: {param} must be a number{none}, or a mapping from data set names to such values with a"
                      f" {ANY!r} entry for other data sets; got {value!r}")


def resolve(value: Any, dataset: str | None) -> tuple[Any, str]:
    """The threshold for `dataset` and what it was calibrated for: the data set's own name, or
    ANY's description when it has no entry (or the defense was not told its data set)."""
    def num(v: Any) -> float | None:
        return None if v is None else float(v)

    if not isinstance(value, Mapping):
        return num(value), "every data set (one number)"
    if dataset is not None and dataset in value:
        return num(value[dataset]), dataset
    told = f"{dataset!r} has no calibration of its own" if dataset else "the data set was not given"
    return num(value[ANY]), f"{ANY}: all calibration data sets pooled ({told})"


def pick(params: Mapping[str, Any], names: tuple[str, ...], dataset: str | None) -> tuple[dict[str, Any], str]:
    """A copy of `params` with each of `names` resolved for `dataset` (resolve), and what they were
    calibrated for (the same for every name: the data set's own entry, or ANY)."""
    out, calibrated_for = dict(params), ""
    for name in names:
        out[name], calibrated_for = resolve(params[name], dataset)
    return out, calibrated_for
