"""Cells whose score sits within a stated margin of the defense's threshold: pinned weights make
the model the same on every machine, but a defense's own float arithmetic (NC's optimisation, int8
kernels with and without VNNI) differs between CPU families, so such a cell may land on either
side. A borderline finding accepts exactly two outcomes (the truth, or the named miss) and holds
only while the score stays within the margin: the moment it moves away, or the defense crashes,
turns invalid or names another class, the test fails."""

from __future__ import annotations

from typing import Any


def check_borderline(result: dict[str, Any], finding: dict[str, Any]) -> str | None:
    """None when the cell is what the borderline finding says; else why not."""
    v = result["verdict"]
    score, threshold = v.get("score"), v.get("threshold")
    if score is None or threshold is None:
        return f"borderline finding, but the verdict has no score/threshold ({v['status']}: {v.get('reason')})"
    if abs(score - threshold) > finding["margin"]:
        return (f"borderline finding no longer holds: score {score:.3f} is {abs(score - threshold):.3f} from the threshold"
                f" {threshold:.3f} (margin {finding['margin']}; {finding['why']})")
    target = result["truth"]["target"]
    if v["status"] == "detected" and v.get("target_class") == target:
        return None
    if v["status"] == "clean":
        return None
    return f"borderline cell produced {v['status']} (target {v.get('target_class')}), neither the truth nor a miss"
