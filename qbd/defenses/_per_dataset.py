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


def check(owner: str, param: str, value: Any, off: bool = False, positive: bool = False) -> None:
    """ConfigError unless `value` is a finite number or a {data set: finite number} mapping whose
    keys are catalog data sets (`qbd list`) plus ANY; with `off`, None also stands for "this rule
    is not used" (as the value or as a data set's entry); with `positive`, values must be above 0
    (a ratio's threshold: 0 divides by zero, a negative one turns the rule off). A NaN would flag
    nothing: a silent clean."""
    import math

    from qbd.data import DATASETS
    from qbd.errors import ConfigError

    def problem(v: Any) -> str | None:
        if off and v is None:
            return None
        if not isinstance(v, Real) or isinstance(v, bool):
            return f"{v!r} is not a number" + (" (or None: not used)" if off else "")
        if not math.isfinite(v):
            return f"{v!r} is not finite"
        return f"{v!r} is not above 0" if positive and v <= 0 else None

    if not isinstance(value, Mapping):
        bad = problem(value)
        if bad:
            raise ConfigError(f"{owner}: {param} must be a number or a mapping from data set names to numbers"
                              f" with a {ANY!r} entry for other data sets: {bad}")
        return
    if ANY not in value:
        raise ConfigError(f"{owner}: {param} has no {ANY!r} entry, the threshold for a data set without one of its own"
                          f" (got {dict(value)!r})")
    unknown = sorted(k for k in value if k != ANY and k not in DATASETS)
    if unknown:
        raise ConfigError(f"{owner}: {param} names data sets qbd does not know: {', '.join(map(repr, unknown))};"
                          f" known: {', '.join(DATASETS.names())}")
    for k, v in value.items():
        bad = problem(v)
        if bad:
            raise ConfigError(f"{owner}: {param}[{k!r}]: {bad}")


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


def pick(params: Mapping[str, Any], names: tuple[str, ...], dataset: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """A copy of `params` with each of `names` resolved for `dataset` (resolve), and for each what
    it was calibrated for (the verdict's evidence `threshold_calibrated_for`)."""
    out, calibrated_for = dict(params), {}
    for name in names:
        out[name], calibrated_for[name] = resolve(params[name], dataset)
    return out, calibrated_for
