"""Which part of a split class is the poison: the part whose samples vary more.

A poisoned target class holds two kinds of samples: its own clean images, one class, and the
poison, images of every other class carrying the trigger. The trigger pulls the poison together
along the direction that separates the two parts (what AC's 2-means and SS's top singular
direction find); everywhere else the poison keeps the spread of the many classes it came from.
So the part with the larger spread (for SS with the separating direction projected out; AC reads
the spread of the whole activation vectors) is the poison. No label and no trigger is used, only
the activations the defense already reads. A part of fewer than MIN_PART samples is an outlier
group, and an outlier group is the suspect (the case the authors' rules were made for).

Why not the authors' choices: AC's "the smaller cluster is the poison" and SS's squared score
((R_i - mean) . v)^2 assume the poison is a minority of its class. With a 10 % poison rate over
10-12 classes it is about half of it (digits 144 of 286, synthetic 1,200 of 2,200): the squared
score does not rank the poison above the clean half (AUROC 0.52-0.64 on digits; 0.31-0.36 on
synthetic, where it ranks the clean half higher) and on synthetic the smaller cluster is the
clean part (precision 0.001-0.004). The more varied part was the poison on the thirty fp32 BadNet
models it was measured on (docs/defenses.md#which-part-is-the-poison). Limit: the premise is a
poison drawn from many classes; a poison from one source class (a source-specific attack) is as
uniform as the clean part, and the rule then has nothing to go on (tests/unit/defenses).
"""

from __future__ import annotations

import numpy as np

MIN_PART = 2  # samples: a part smaller than this is an outlier group, and the suspect


def spread(x: np.ndarray, direction: np.ndarray | None = None) -> float:
    """Mean squared distance of the rows of `x` to their mean, with `direction` (a unit vector)
    projected out first; 0 for fewer than two rows."""
    if len(x) < 2:
        return 0.0
    c = x - x.mean(axis=0, keepdims=True)
    if direction is not None:
        c = c - np.outer(c @ direction, direction)
    return float(np.mean(np.sum(c * c, axis=1)))


def more_varied(x: np.ndarray, part: np.ndarray, direction: np.ndarray | None = None) -> np.ndarray:
    """`part` (a boolean mask over the rows of `x`) or its complement, whichever varies more; a
    part of fewer than MIN_PART rows (an outlier group) whatever its spread."""
    if int(part.sum()) < MIN_PART or int((~part).sum()) < MIN_PART:
        return part if int(part.sum()) <= int((~part).sum()) else ~part
    return part if spread(x[part], direction) >= spread(x[~part], direction) else ~part


def split_line(p: np.ndarray, iterations: int = 100) -> np.ndarray:
    """2-means on a line: the mask of the upper group of the values `p` (deterministic: the
    centres start at the extremes and move to their groups' means until nothing changes)."""
    lo, hi = float(p.min()), float(p.max())
    upper = p > (lo + hi) / 2
    for _ in range(iterations):
        if upper.all() or not upper.any():
            break
        cut = (float(p[upper].mean()) + float(p[~upper].mean())) / 2
        nxt = p > cut
        if np.array_equal(nxt, upper):
            break
        upper = nxt
    return upper
