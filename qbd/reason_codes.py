"""A verdict's vocabulary: its statuses, and why it is invalid (a closed set, so reports,
expectations and gates can count them). Torch-free (the expectations loader, the Result checks
and the reports read it; qbd.defenses.base hands it to defense authors)."""

from __future__ import annotations

STATUSES: tuple[str, ...] = ("detected", "clean", "invalid")

REASON_CODES: dict[str, str] = {
    "no-gradient": "a gradient-based defense received no (or a zero / non-finite) input gradient",
    "no-signal": "the statistic cannot score anything (MAD = 0, a constant score, a zero threshold)",
    "rule-cannot-fire": "the decision rule cannot reach its threshold whatever the model (rank arithmetic)",
    "not-converged": "the optimisation did not reach what the rule needs (e.g. reversed triggers that never succeeded)",
    "not-applicable": "nothing for the rule to judge (nothing to fine-tune, an input missing, a layer qbd cannot read from the deployment)",
    "surrogate-disagrees": "the surrogate a gradient defense inspected does not agree with the deployed runtime (or the agreement could not be measured)",
    "diverged": "the computation produced non-finite values",
    "timeout": "the defense ran past its time limit",
    "error": "the defense crashed or returned something that is not a well-formed Verdict",
    "unspecified": "a third-party defense returned invalid without a reason code",
}
# the defense failed to run, or to say why, or inspected a surrogate that is not the deployed model:
# never an expected outcome, so such a cell always fails
NEVER_EXPECTED = frozenset({"error", "timeout", "unspecified", "surrogate-disagrees"})


def verdict_problems(status: object, reason: object, reason_code: object) -> list[str]:
    """What is wrong with a verdict's status, reason and reason code: the one rule that the
    Verdict type (on construction), the sandbox (on what a defense returned) and the Result check
    (on JSON) apply; qbd/schema/result.schema.json states it too (tests/unit/test_results.py).
    An invalid verdict needs a reason and a code; no other status carries a code."""
    if not isinstance(status, str) or status not in STATUSES:
        return [f"status must be one of {', '.join(STATUSES)}, got {status!r}"]
    out = []
    if reason is not None and not isinstance(reason, str):
        out.append(f"reason must be a str, not {type(reason).__name__}")
    if status == "invalid":
        if not reason:
            out.append("an invalid verdict needs a reason")
        if not (isinstance(reason_code, str) and reason_code in REASON_CODES):
            out.append(f"an invalid verdict needs a reason_code from {', '.join(REASON_CODES)}, got {reason_code!r}")
    elif reason_code is not None:
        out.append(f"only an invalid verdict carries a reason_code; a {status!r} verdict has {reason_code!r}")
    return out
