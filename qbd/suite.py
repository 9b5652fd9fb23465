"""Ready test functions for the qbd matrix. Import them into any test module:

    from qbd.suite import test_attack, test_audit, test_cell  # noqa: F401

or run them straight from the package: `pytest --pyargs qbd.suite`. The plugin parametrizes
them (`qbd_cell`, `qbd_attack_case`, `qbd_audit_case`) from the tier and the defenses.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from qbd.pytest_plugin import ATTACK_PROPERTY, AUDIT_PROPERTY, RESULT_PROPERTY


def _evidence(result: dict[str, Any], limit: int = 1500) -> str:
    v = result["verdict"]
    text = json.dumps({"score": v["score"], "threshold": v["threshold"], "target_class": v["target_class"],
                       "evidence": v["evidence"], "controls": v["controls"]}, default=str)
    return text if len(text) <= limit else text[:limit] + " ..."


def _requirement(cell: Any, result: dict[str, Any]) -> list[str]:
    """Controls: the positive control (backdoored, fp32, canonical protocol) must detect; every
    cell on the clean model must not."""
    status = result["verdict"]["status"]
    if cell.control == "clean" and status == "detected":
        return [f"negative control: detected a backdoor in a clean model (target {result['verdict']['target_class']})"]
    if cell.control == "backdoored" and cell.scheme == "fp32" and cell.protocol == "canonical" and status != "detected":
        return [f"positive control: the planted backdoor was not detected ({status})"]
    return []


def _conclude(entry: dict[str, Any], failures: list[str], header: str, accept: bool) -> None:
    if accept:
        return
    xfail = entry.get("xfail")
    if xfail and failures:
        pytest.xfail(f"{xfail} [{'; '.join(failures)}]")
    if xfail and not failures:
        pytest.fail(f"{header}: passes, but the expectations mark it xfail ({xfail!r}); strict: remove the xfail", pytrace=False)
    if failures:
        pytest.fail(header + "\n  " + "\n  ".join(failures), pytrace=False)


def test_cell(qbd_cell: Any, qbd_session: Any, qbd_record: Any) -> None:
    """One (dataset, scheme, defense, protocol) cell: the verdict matches the expectations, and
    control cells meet their requirement; over several seeds the verdict must not flip."""
    cell = qbd_cell
    state = qbd_session.state
    results = []
    for seed in range(state.seeds):
        bench = qbd_session.bench(cell.dataset, cell.control, seed)
        r = bench.run(qbd_session.defense(cell.defense, cell.protocol), cell.scheme, seed=seed, timeout_s=state.defense_timeout)
        qbd_record(RESULT_PROPERTY, r)
        results.append(r)
    exp = qbd_session.expectations
    first = results[0]
    entry = exp.cells.get(cell.id, {})
    failures = exp.check_cell(first) + _requirement(cell, first)
    statuses = [r["verdict"]["status"] for r in results]
    if len(set(statuses)) > 1:
        rate = statuses.count("detected") / len(statuses)
        failures.append(f"unstable across {len(statuses)} seeds: {statuses} (detection rate {rate:.2f})")
    if failures:
        failures.append(f"evidence: {_evidence(first)}")
    _conclude(entry, failures, f"{cell.id}: expected {exp.cell(cell.id, cell.control == 'backdoored')}", state.accept)


def test_attack(qbd_attack_case: tuple[str, str], qbd_session: Any, qbd_record: Any) -> None:
    """Clean accuracy and ASR of the deployed quantized backdoored model (the Table 2 view)."""
    dataset, scheme = qbd_attack_case
    bench = qbd_session.bench(dataset)
    m = bench.metrics(scheme)
    key = f"{dataset}/{scheme}"
    qbd_record(ATTACK_PROPERTY, {"key": key, "metrics": m})
    exp = qbd_session.expectations
    failures = exp.check_attack(key, m["clean_acc"], m["asr"])
    _conclude(exp.attack.get(key, {}), failures, f"{key}: clean acc {m['clean_acc']:.4f}, ASR {m['asr']:.4f}", qbd_session.state.accept)


def test_audit(qbd_audit_case: tuple[str, str], qbd_session: Any, qbd_record: Any) -> None:
    """Controls on the quantizer: it really quantized (fp32 did not), and the gradient path a
    defense uses is reachable: the surrogate always passes input gradients."""
    import torch

    from qbd.quant.audit import measure_input_gradient

    dataset, scheme = qbd_audit_case
    bench = qbd_session.bench(dataset)
    qm = bench.quantized(scheme)
    audit = qm.audit.to_dict()
    surrogate_ok, _ = measure_input_gradient(qm.surrogate(), tuple(bench.calib().shape[1:]), torch.device("cpu"))
    key = f"{dataset}/{scheme}"
    qbd_record(AUDIT_PROPERTY, {"key": key, "audit": {
        "input_gradient": bool(audit["input_gradient"]), "surrogate_gradient": bool(surrogate_ok)}})
    failures = []
    frac = audit["quantized_param_fraction"]
    if scheme == "fp32" and frac != 0:
        failures.append(f"fp32 must quantize nothing, audit says {frac}")
    if scheme != "fp32" and frac <= 0:
        failures.append("quantizer not applied: no parameter was quantized")
    if not surrogate_ok:
        failures.append("the surrogate passes no input gradient: gradient-based defenses cannot run")
    exp = qbd_session.expectations
    failures += exp.check_audit(key, audit, surrogate_ok)
    _conclude(exp.audit.get(key, {}), failures, f"{key}: audit {json.dumps(audit, default=str)[:800]}", qbd_session.state.accept)
