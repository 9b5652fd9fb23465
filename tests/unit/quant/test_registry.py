"""qbd.quant: the scheme registry and the contract every scheme keeps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qbd.config import ConfigError
from qbd.quant import SCHEMES
from qbd.quant.base import QuantizedClassifier, QuantizedModel, Scheme

from .conftest import HAS_TORCHAO, images

AUDIT_KEYS = {
    "scheme",
    "quantized_param_fraction",
    "input_gradient",
    "engine",
    "bits",
    "max_levels_per_channel",
    "quantized_modules",
    "max_rel_error",
    "model_bytes",
    "differentiable",
}


def test_names() -> None:
    expected = {"fp32", "int8-dynamic", "int8-static", "onnx-int8-static", "onnx-int8-dynamic"} | {f"int{n}-sim" for n in range(2, 9)}
    assert set(SCHEMES.names()) == expected
    assert SCHEMES.names() == sorted(SCHEMES.names())


def test_listing_names_does_not_import_torch() -> None:
    code = "import sys, qbd.quant; qbd.quant.SCHEMES.names(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", SCHEMES.names())
def test_scheme_protocol(name: str) -> None:
    scheme = SCHEMES.get(name)
    assert isinstance(scheme, Scheme)
    assert scheme.name == name
    assert isinstance(scheme.differentiable, bool)


@pytest.fixture(scope="module")
def applied(tiny, calib) -> dict[str, QuantizedModel]:
    """Every scheme applied once to the tiny CNN, with its default engine (int8-static: the
    torch.ao FX fallback where torchao is missing)."""
    engines = {} if HAS_TORCHAO else {"int8-static": "fbgemm"}
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    result = {name: SCHEMES.get(name).apply(tiny, calib[:16], engines.get(name)) for name in SCHEMES.names()}
    after = tiny.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a scheme modified the caller's model"
    return result


@pytest.mark.parametrize("name", SCHEMES.names())
def test_caller_model_untouched_and_contract(name: str, applied, tiny, probe) -> None:
    qm = applied[name]
    probe = probe[:8]
    assert qm.scheme == name
    assert isinstance(qm.model, QuantizedClassifier)
    assert qm.model is not tiny and qm.model.normalize is not tiny.normalize
    assert not tiny.training
    with torch.no_grad():
        logits = qm.model(probe)
        torch.testing.assert_close(qm.classify(qm.embed(probe)), logits, rtol=0, atol=0)
    assert logits.shape == (probe.shape[0], tiny.num_classes) and logits.dtype == torch.float32
    assert qm.embed(probe).shape == (probe.shape[0], tiny.feature_dim)


@pytest.mark.parametrize("name", SCHEMES.names())
def test_audit_is_json_and_measured(name: str, applied) -> None:
    qm = applied[name]
    d = qm.audit.to_dict()
    assert d.keys() >= AUDIT_KEYS
    assert json.loads(json.dumps(d)) == d
    assert d["scheme"] == name
    # the measured gradient flow agrees with the scheme's claim, and with QuantizedModel
    assert d["input_gradient"] is d["differentiable"] is qm.differentiable is SCHEMES.get(name).differentiable
    assert 0.0 <= d["quantized_param_fraction"] <= 1.0
    assert d["model_bytes"] > 0


@pytest.mark.parametrize("name", SCHEMES.names())
def test_surrogate_is_differentiable(name: str, applied, probe) -> None:
    qm = applied[name]
    surrogate = qm.surrogate()
    if qm.differentiable:
        assert surrogate is qm.model
    x = probe[:4].clone().requires_grad_()
    (grad,) = torch.autograd.grad(surrogate(x).sum(), x)
    assert torch.isfinite(grad).all() and (grad != 0).any()
    torch.testing.assert_close(surrogate.classify(surrogate.embed(x)), surrogate(x))


@pytest.mark.parametrize("name", ["fp32", "int4-sim"])
def test_engineless_schemes_refuse_an_engine(name: str, tiny) -> None:
    with pytest.raises(ConfigError, match="takes no quantized engine"):
        SCHEMES.get(name).apply(tiny, None, "x86")


@pytest.mark.parametrize("name", ["int8-dynamic", "int8-static"])
def test_unknown_engine(name: str, tiny) -> None:
    with pytest.raises(ConfigError, match="not supported"):
        SCHEMES.get(name).apply(tiny, images(4, 0), "onednn-typo")


def test_bad_calibration_shape(tiny) -> None:
    with pytest.raises(ConfigError, match="N x 3 x H x W"):
        SCHEMES.get("int8-static").apply(tiny, torch.rand(3, 32, 32))


@pytest.mark.parametrize("name", [n for n in SCHEMES.names() if not SCHEMES.get(n).differentiable])
def test_surrogate_shares_no_tensors_with_the_deployed_model(name: str, applied) -> None:
    qm = applied[name]
    # both state dicts stay alive while compared, so no address can be freed and reused
    deployed, twin = qm.model.state_dict(), qm.surrogate().state_dict()

    def storages(state: dict[str, object]) -> set[int]:
        tensors = [t for t in state.values() if isinstance(t, torch.Tensor) and t.numel() and not t.is_quantized]
        return {t.data_ptr() for t in tensors}

    assert not storages(deployed) & storages(twin)
