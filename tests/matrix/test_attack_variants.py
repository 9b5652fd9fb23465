"""Positive controls beyond the default BadNet: another target class, trigger pattern, size and
corner (qbd.presets.VARIANT_ATTACK), so no defense (or test) can assume class 0 or the
bottom-right corner. On the pinned zoo's variant models of both data sets, fp32, canonical
protocol; judged against the truth (detected naming class 3). A defense that really fails here is
a declared finding in the shipped table's [attacks."badnet-variant"] section, with its why, and the
test fails the moment the finding stops holding."""

from __future__ import annotations

import pytest

from qbd.config import DatasetSpec, Gates
from qbd.defenses import BUILTIN
from qbd.presets import VARIANT_ATTACK, seeded_job

DEFENSES = tuple(sorted(BUILTIN))  # the built-in catalog (qbd.defenses), not a copy of its names


@pytest.fixture(scope="module", params=["digits", "synthetic"])
def variant_bench(request):
    from qbd.data import load_dataset
    from qbd.evaluate import Bench
    from qbd.store import Store
    from qbd.train import check_gates
    from qbd.trained import get_trained

    data = load_dataset(DatasetSpec(request.param))
    job = seeded_job(request.param, "tiny-cnn", 0, VARIANT_ATTACK)
    tm = get_trained(job, data, Store(), progress=False)
    check_gates(tm.metrics, Gates(), attacked=True)
    return Bench(data, tm.model, job.attack, model_name="tiny-cnn", tier="smoke", weights=tm.provenance())


@pytest.mark.qbd_smoke
@pytest.mark.parametrize("defense", DEFENSES)
def test_nondefault_attack_is_detected(variant_bench, defense):
    from qbd.expectations import load_for
    from qbd.runner import load_defense

    r = variant_bench.run(load_defense(defense, "canonical", "smoke"), "fp32")
    assert r["weights"]["origin"] == "zoo"  # the pinned model, the same on every machine
    assert r["asr"] > 0.95
    j = load_for("smoke").judge(r)  # its findings: the shipped table's [attacks."badnet-variant"] section
    assert j.judgement != "FAIL", f"{r['dataset']}/{defense}: {j.why}"
