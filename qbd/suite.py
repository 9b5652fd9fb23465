"""Ready test functions for the qbd matrix. Import them into any test module:

    from qbd.suite import test_attack, test_audit, test_cell  # noqa: F401

or run them straight from the package: `pytest --pyargs qbd.suite`. The plugin parametrizes
them (`qbd_cell`, `qbd_attack_case`, `qbd_audit_case`) from the tier and the defenses.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from qbd.plugin.state import ATTACK_PROPERTY, AUDIT_PROPERTY, RESULT_PROPERTY


def _evidence(result: dict[str, Any], limit: int = 1500) -> str:
    v = result["verdict"]
    text = json.dumps({"score": v["score"], "threshold": v["threshold"], "target_class": v["target_class"],
                       "evidence": v["evidence"], "controls": v["controls"]}, default=str)
    return text if len(text) <= limit else text[:limit] + " ..."


def _fail(header: str, failures: list[str]) -> None:
    if failures:
        pytest.fail(header + "\n  " + "\n  ".join(failures), pytrace=False)


def test_cell(qbd_cell: Any, qbd_seed: int, qbd_session: Any, qbd_record: Any) -> None:
    """One (dataset, scheme, defense, protocol) cell on one model seed, judged against the truth
    (backdoored with target t -> detected naming t; clean -> clean) or against its declared
    finding. A crash, a timeout, a wrong target or a finding that no longer holds fails. Over
    several seeds, a row with declared rate bounds is judged by its rates at the session's end,
    and its cells fail here only on a crash, a timeout or an unexplained invalid."""
    cell, seed = qbd_cell, qbd_seed
    state = qbd_session.state
    bench = qbd_session.bench(cell.dataset, cell.control, seed)
    r = bench.run(qbd_session.defense(cell.defense, cell.protocol), cell.scheme, seed=seed, timeout_s=state.defense_timeout)
    j = qbd_session.expectations.judge(r, by_rates=qbd_session.by_rates(r))
    r["judgement"] = j.to_dict()
    qbd_record(RESULT_PROPERTY, r)
    if state.accept or j.judgement != "FAIL":
        return
    _fail(f"{cell.id}{f' (seed {seed})' if state.seeds > 1 else ''}: expected {j.expected}",
          [j.why or j.outcome, f"evidence: {_evidence(r)}"])


def test_attack(qbd_attack_case: tuple[str, str], qbd_session: Any, qbd_record: Any) -> None:
    """Clean accuracy and ASR of the deployed quantized backdoored model (the Table 2 view)."""
    dataset, scheme = qbd_attack_case
    bench = qbd_session.bench(dataset)
    m = bench.metrics(scheme)
    key = f"{dataset}/{scheme}"
    qbd_record(ATTACK_PROPERTY, {"key": key, "metrics": m})
    if qbd_session.state.accept:
        return
    # as qbd.gate judges `qbd run`: the table's own bounds only for the attack they were measured on
    # (--qbd-attack), a quant-conditioned model's ASR by its truth (dormant, or awake where deployed)
    from qbd.config import attack_record

    table, attack = qbd_session.expectations, attack_record(bench.attack)
    failures = table.check_attack(key, m["clean_acc"], m["asr"], own=table.measured_on({"attack": attack}), attack=attack,
                                  engine=bench.quantized(scheme).audit.to_dict().get("engine"))
    _fail(f"{key}: clean acc {m['clean_acc']:.4f}, ASR {m['asr']:.4f}", failures)


def test_audit(qbd_audit_case: tuple[str, str], qbd_session: Any, qbd_record: Any) -> None:
    """Controls on the quantizer: it really quantized (fp32 did not), and the gradient path a
    defense uses is reachable: the surrogate always passes input gradients."""
    from qbd.quant import BUILTIN, get_scheme
    from qbd.quant.audit import measure_input_gradient

    dataset, scheme = qbd_audit_case
    bench = qbd_session.bench(dataset)
    qm = bench.quantized(scheme)
    audit = qm.audit.to_dict()
    surrogate = bench.subject(scheme, "surrogate")  # where the defenses will use it (the bench's device)
    surrogate_ok, _ = measure_input_gradient(surrogate.model, tuple(bench.calib().shape[1:]), surrogate.device)
    key = f"{dataset}/{scheme}"
    qbd_record(AUDIT_PROPERTY, {"key": key, "audit": {
        "input_gradient": bool(audit["input_gradient"]), "surrogate_gradient": bool(surrogate_ok)}})
    failures = []
    frac = audit["quantized_param_fraction"]
    quantizes = getattr(get_scheme(scheme), "quantizes", True)
    if not quantizes and frac != 0:
        failures.append(f"{scheme} must quantize nothing, audit says {frac}")
    if quantizes and frac <= 0:
        failures.append("quantizer not applied: no parameter was quantized")
    if not surrogate_ok:
        failures.append("the surrogate passes no input gradient: gradient-based defenses cannot run")
    if qbd_session.state.accept:
        return
    failures += qbd_session.expectations.check_audit(key, audit, surrogate_ok, builtin=scheme in BUILTIN)
    _fail(f"{key}: audit {json.dumps(audit, default=str)[:800]}", failures)
