"""A verdict's vocabulary: its statuses, and why it is invalid (a closed set, so reports,
expectations and gates can count them). Torch-free (the expectations loader, the Result checks
and the reports read it; qbd.defenses.base hands it to defense authors)."""

from __future__ import annotations

from qbd.shapes import Shape, When

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


# The verdict's status, reason and reason code, stated once (qbd.shapes): the Verdict type (on
# construction), the sandbox (on what a defense returned), the Result check (on JSON) and the JSON
# Schema all come from these. An invalid verdict needs a reason and a code; no other status carries a code.
STATUS = Shape(enum=STATUSES)
REASON = Shape(("string", "null"))
REASON_CODE = Shape(("string", "null"), doc="why an invalid verdict is invalid (qbd.reason_codes.REASON_CODES); null for any other status")
INVALID_NEEDS_A_REASON = When(
    "status", ("invalid",),
    then={"reason": Shape(("string",), min_length=1, says="an invalid verdict needs a reason"),
          "reason_code": Shape(enum=tuple(REASON_CODES),
                               says=f"an invalid verdict needs a reason_code from {', '.join(REASON_CODES)}, got {{value}}")},
    otherwise={"reason_code": Shape(const=None, says="only an invalid verdict carries a reason_code; a {status!r} verdict has {value}")},
)


def verdict_problems(status: object, reason: object, reason_code: object) -> list[str]:
    """What is wrong with a verdict's status, reason and reason code (empty when nothing is)."""
    out = STATUS.problems(status, "status")
    if out:
        return out
    out = REASON.problems(reason, "reason") + REASON_CODE.problems(reason_code, "reason_code")
    return out + INVALID_NEEDS_A_REASON.problems({"status": status, "reason": reason, "reason_code": reason_code}, "verdict")
