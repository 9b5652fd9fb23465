"""The smoke matrix's ONNX Runtime cells: every defense (canonical protocol) on the pinned seed-0
BadNet model of both data sets deployed through onnx-int8-static and onnx-int8-dynamic (an ONNX
Runtime session; docs/quantization.md), and every defense's negative control on the clean seed-0
models. Output-only defenses run on the session itself; AC and SS read the session's activations
before the pool; Neural Cleanse runs through the surrogate built from the runtime's own scales and
zero points, and its Result must carry the surrogate-vs-runtime agreement control, passed.
Each cell is judged by its row, measured over five backdoored and five clean pinned models
([rows] in qbd/expected/smoke.toml; docs/results.md#onnx-runtime): its outcome must be one the
row measured on that kind of model, and a crash never passes.
"""

from __future__ import annotations

import pytest

from qbd.config import AttackSpec, DatasetSpec
from qbd.defenses import BUILTIN
from qbd.presets import seeded_job

SCHEMES = ("onnx-int8-static", "onnx-int8-dynamic")
DEFENSES = tuple(sorted(BUILTIN))  # the built-in catalog (qbd.defenses), not a copy of its names


@pytest.fixture(scope="module")
def table():
    from qbd.expectations import load_for

    return load_for("smoke")  # the ONNX rows, as `qbd run --expectations` reads them


def _bench(dataset: str, attack: AttackSpec | None, memo):
    from qbd.data import load_dataset
    from qbd.evaluate import Bench
    from qbd.store import Store
    from qbd.trained import get_trained

    data = load_dataset(DatasetSpec(dataset))
    job = seeded_job(dataset, "tiny-cnn", 0, attack)
    tm = get_trained(job, data, Store(), progress=False)
    return Bench(data, tm.model, job.attack, model_name="tiny-cnn", tier="smoke", weights=tm.provenance(), memo=memo)


@pytest.fixture(scope="module", params=["digits", "synthetic"])
def badnet_bench(request, qbd_memo):
    pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'pytest-qbd[onnx]'")
    return _bench(request.param, AttackSpec(), qbd_memo)


@pytest.fixture(scope="module", params=["digits", "synthetic"])
def clean_bench(request, qbd_memo):
    pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'pytest-qbd[onnx]'")
    return _bench(request.param, None, qbd_memo)


@pytest.mark.qbd_smoke
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("defense", DEFENSES)
def test_defense_on_the_onnx_runtime(badnet_bench, table, scheme, defense):
    from qbd.runner import load_defense

    r = badnet_bench.run(load_defense(defense, "canonical", "smoke"), scheme)
    assert r["weights"]["origin"] == "zoo"
    audit = r["quant"]["audit"]
    assert audit["engine"] == "onnxruntime" and audit["kernel_ops"], audit  # the runtime really ran int8 kernels
    if r["defense"]["gradient_path"] == "surrogate":
        control = r["verdict"]["controls"]["surrogate_agrees_with_runtime"]
        assert control["passed"], control["detail"]
    assert table.measured_row(r) is not None, f"{r['cell']}: no measured row judges it"
    j = table.judge(r)
    assert j.judgement != "FAIL", f"{r['cell']}: {j.why}"


@pytest.mark.qbd_smoke
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("defense", DEFENSES)
def test_the_negative_control_on_the_onnx_runtime(clean_bench, table, scheme, defense):
    from qbd.runner import load_defense

    r = clean_bench.run(load_defense(defense, "canonical", "smoke"), scheme)
    assert not r["truth"]["backdoored"] and r["weights"]["origin"] == "zoo"
    assert table.measured_row(r) is not None, f"{r['cell']}: no measured row judges it"
    j = table.judge(r)
    assert j.judgement != "FAIL", f"{r['cell']}: {j.why}"
