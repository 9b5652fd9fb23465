"""Device choice (qbd.devices) and where a Bench puts its models (qbd.evaluate): the logic is
tested here on any host; tests marked `gpu` run the same on a CUDA device when there is one."""

from __future__ import annotations

import pytest
import torch

from qbd import devices
from qbd.errors import ConfigError


@pytest.mark.parametrize(("requested", "count", "worker", "expected"), [
    ("auto", 0, None, "cpu"),
    ("auto", 0, "gw3", "cpu"),
    ("cpu", 4, "gw3", "cpu"),
    ("auto", 1, None, "cuda:0"),
    ("auto", 4, "gw5", "cuda:1"),  # worker k takes cuda:{k mod GPUs}
    ("cuda", 4, "gw2", "cuda:2"),
    ("cuda", 2, "gw0", "cuda:0"),
    ("cuda", 2, "main", "cuda:0"),  # not an xdist worker id
    ("cuda:1", 4, "gw3", "cuda:1"),  # an explicit index is taken as given
])
def test_pick(requested: str, count: int, worker: str | None, expected: str) -> None:
    assert devices.pick(requested, cuda_count=count, worker=worker) == expected


def test_every_worker_gets_a_gpu_and_they_are_shared_evenly() -> None:
    picked = [devices.pick("auto", cuda_count=3, worker=f"gw{k}") for k in range(9)]
    assert sorted(picked) == sorted(["cuda:0", "cuda:1", "cuda:2"] * 3)


@pytest.mark.parametrize(("requested", "count", "message"), [
    ("cuda", 0, "no CUDA device"),
    ("cuda:0", 0, "no CUDA device"),
    ("cuda:2", 2, "cuda:0..cuda:1"),
    ("gpu", 1, "valid: auto, cpu, cuda or cuda:N"),
    ("cpu:1", 1, "valid"),
    ("", 1, "valid"),
])
def test_bad_requests_are_config_errors(requested: str, count: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        devices.pick(requested, cuda_count=count)


def test_resolve_uses_what_torch_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve("auto") == "cuda:1"
    assert devices.resolve("auto", worker="gw4") == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto") == "cpu"


class _Model:
    def __init__(self) -> None:
        self.moved_to: list[torch.device] = []

    def to(self, device: torch.device) -> _Model:
        self.moved_to.append(device)
        return self


class _QM:
    def __init__(self) -> None:
        self.model = _Model()


@pytest.mark.parametrize(("runs_on", "device", "moved"), [
    (("cpu",), "cuda:1", False),  # torch's int8 kernels: the deployed model stays on the CPU
    (("cpu", "cuda"), "cuda:1", True),
    (("cpu", "cuda"), "cpu", False),
    (None, "cuda:0", False),  # a scheme that does not say where it runs is taken as CPU-only
])
def test_deployed_model_goes_where_its_scheme_runs(runs_on, device, moved) -> None:
    from types import SimpleNamespace

    from qbd.evaluate import _place

    scheme = SimpleNamespace() if runs_on is None else SimpleNamespace(devices=runs_on)
    qm = _place(scheme, _QM(), torch.device(device))
    assert qm.model.moved_to == ([torch.device(device)] if moved else [])


def test_built_in_schemes_say_where_they_run() -> None:
    from qbd.quant import SCHEMES

    where = {name: SCHEMES.get(name).devices for name in ("fp32", "int4-sim", "int8-dynamic", "int8-static")}
    assert where == {"fp32": ("cpu", "cuda"), "int4-sim": ("cpu", "cuda"), "int8-dynamic": ("cpu",), "int8-static": ("cpu",)}


def _bench(device: str):
    from qbd.config import AttackSpec, DatasetSpec
    from qbd.data import load_dataset
    from qbd.evaluate import Bench, BenchSpec
    from qbd.models import build_model

    data = load_dataset(DatasetSpec("digits"), None)
    model = build_model("tiny-cnn", data.num_classes, data.mean, data.std)
    return Bench(data, model, AttackSpec(), spec=BenchSpec(holdout=64, stream=40), device=device)


def test_cpu_placement_is_recorded() -> None:
    bench = _bench("cpu")
    assert bench.placement("int8-static") == {"device": "cpu", "deployed": "cpu", "surrogate": "cpu"}
    assert bench.subject("int8-static", "surrogate").device == torch.device("cpu")


@pytest.mark.qbd_gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_surrogate_and_float_schemes_move_and_int8_stays() -> None:
    bench = _bench("cuda:0")
    assert bench.placement("fp32") == {"device": "cuda:0", "deployed": "cuda:0", "surrogate": "cuda:0"}
    p = bench.placement("int8-static")
    assert p["deployed"] == "cpu" and p["surrogate"] == "cuda:0" and "runs on cpu only" in p["note"]
    assert bench.subject("int8-static", "surrogate").device.type == "cuda"
    assert bench.subject("int8-static", "deployed").device.type == "cpu"
    m = bench.metrics("int4-sim")  # measured where the deployed model runs
    assert 0.0 <= m["clean_acc"] <= 1.0
    from qbd.quant.audit import measure_input_gradient

    for scheme in ("fp32", "int4-sim", "int8-dynamic", "int8-static"):  # what test_audit does, on the device
        s = bench.subject(scheme, "surrogate")
        ok, note = measure_input_gradient(s.model, tuple(bench.calib().shape[1:]), s.device)
        assert ok, f"{scheme}: {note}"
    from qbd.runner import load_defense

    for name in ("fine-pruning", "neural-cleanse", "strip"):  # FP fine-tunes on the GPU, re-deploys to the CPU
        r = bench.run(load_defense(name, "canonical", "smoke"), "int8-static", seed=0)
        assert r["verdict"]["reason_code"] not in ("error", "timeout", "unspecified"), r["verdict"]["reason"]
        assert r["placement"]["surrogate"] == "cuda:0"
