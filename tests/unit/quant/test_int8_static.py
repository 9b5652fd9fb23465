"""int8-static: real int8 kernels for every conv and linear, calibrated; its surrogate."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from qbd.config import ConfigError
from qbd.quant import SCHEMES
from qbd.quant.base import QuantizedModel
from qbd.quant.int8_static import SURROGATE_REL_TOLERANCE

from .conftest import images, needs_torchao

# x86: torchao PT2E lowered to oneDNN; fbgemm, qnnpack: the torch.ao FX fallback
ENGINES = [pytest.param("x86", marks=needs_torchao), "fbgemm", "qnnpack"]
FLOAT_COMPUTE = ("aten.conv", "aten.linear", "aten.addmm", "aten.mm")


@pytest.fixture(scope="module")
def resnet_static(resnet) -> QuantizedModel:
    return SCHEMES.get("int8-static").apply(resnet, images(16, 3))


@pytest.fixture(scope="module", params=ENGINES)
def tiny_static(request, tiny, calib) -> QuantizedModel:
    return SCHEMES.get("int8-static").apply(tiny, calib, request.param)


@needs_torchao
def test_resnet18_every_conv_and_linear_runs_int8(resnet_static, resnet) -> None:
    a = resnet_static.audit
    convs = [n for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d)]
    assert a.quantized_modules == [*convs, "head"]  # BatchNorm folded into the convs
    assert a.quantized_param_fraction >= 0.95
    assert a.engine == "x86" and "PT2E" in a.backend
    ops = a.kernel_ops
    assert not [op for op in ops if op.startswith(FLOAT_COMPUTE)], f"float compute left: {ops}"
    assert sum(n for op, n in ops.items() if op.startswith("onednn.qconv")) == len(convs) == 20
    assert ops.get("onednn.qlinear_pointwise.default") == 1
    assert a.bits == 8 and a.max_levels_per_channel <= 256 and a.max_rel_error <= 0.5 + 1e-4
    assert a.input_gradient is False
    # int8 weights: the deployed state dict is about a quarter of the float one
    assert a.model_bytes < 0.3 * SCHEMES.get("fp32").apply(resnet, None).audit.model_bytes


@needs_torchao
def test_resnet18_deployed_output_has_no_autograd(resnet_static, probe) -> None:
    x = probe[:2].clone().requires_grad_()
    assert not resnet_static.model(x).requires_grad
    # nothing in the deployed int8 graph is a trainable parameter
    assert not [n for n, p in resnet_static.model.named_parameters() if p.requires_grad]


def test_missing_torchao_is_a_clear_error(tiny, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e", None)
    with pytest.raises(ConfigError, match="needs torchao"):
        SCHEMES.get("int8-static").apply(tiny, images(4, 0), "x86")


def test_tiny_kernels(tiny_static) -> None:
    a = tiny_static.audit
    assert len(a.quantized_modules) == 5 and a.quantized_param_fraction >= 0.95
    assert sum(a.kernel_ops.values()) == 5  # four convs and the linear
    assert not [op for op in a.kernel_ops if op.startswith(FLOAT_COMPUTE)]
    if a.engine == "x86":
        assert all(op.startswith("onednn.q") for op in a.kernel_ops)
    else:
        assert all(op.startswith("torch.ao.nn.") and ".quantized." in op for op in a.kernel_ops)


def test_surrogate_matches_deployed(tiny_static, tiny, probe) -> None:
    surrogate = tiny_static.surrogate()
    with torch.no_grad():
        deployed, twin, fp32 = tiny_static.model(probe), surrogate(probe), tiny(probe)
        # the stated tolerance, relative to the logit scale
        assert (twin - deployed).abs().max() <= SURROGATE_REL_TOLERANCE * deployed.abs().max()
        # and it models the int8 rounding: much closer to the deployed model than FP32 is
        assert (twin - deployed).abs().mean() < 0.5 * (fp32 - deployed).abs().mean()
        # one quantized layer alone (no rounding flips to propagate) matches to float precision
        # except where an input sits on a rounding tie (one level flips)
        f = tiny_static.embed(probe)
        head_diff = (surrogate.classify(f) - tiny_static.classify(f)).abs()
        assert (head_diff <= 1e-5).float().mean() >= 0.98
        assert twin.argmax(1).eq(deployed.argmax(1)).float().mean() >= 0.9
    x = probe.clone().requires_grad_()
    (grad,) = torch.autograd.grad(surrogate(x).sum(), x)
    assert torch.isfinite(grad).all() and (grad != 0).any()


def test_deployed_model_is_usable(tiny_static, probe) -> None:
    model = tiny_static.model
    model.eval()
    with torch.no_grad():
        out = model(probe)
        assert model(probe[:1]).shape == (1, 10)  # any batch size
        torch.testing.assert_close(model(probe[:1]), out[:1], rtol=0, atol=1e-5)
        assert torch.equal(copy.deepcopy(model)(probe), out)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert buf.tell() == tiny_static.audit.model_bytes


class SharedReluBlock(nn.Module):
    """One nn.ReLU called twice, as in torchvision's BasicBlock."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


@needs_torchao
def test_pt2e_shared_module_limitation_points_to_the_fallback() -> None:
    from qbd.models import Classifier, Normalize

    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), SharedReluBlock(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    model = Classifier(Normalize((0.5,) * 3, (0.25,) * 3), features, nn.Linear(8, 4)).eval()
    with pytest.raises(ConfigError, match=r"Input partition has more than one output node.*engine 'fbgemm'"):
        SCHEMES.get("int8-static").apply(model, images(4, 0))
    fallback = SCHEMES.get("int8-static").apply(model, images(4, 0), "fbgemm")
    assert fallback.audit.quantized_modules == ["features.0", "features.2.conv1", "features.2.conv2", "head"]


def test_needs_calibration(tiny) -> None:
    with pytest.raises(ConfigError, match="calibration"):
        SCHEMES.get("int8-static").apply(tiny, None)


def test_refuses_non_cpu(tiny) -> None:
    with pytest.raises(ConfigError, match="CPU"):
        SCHEMES.get("int8-static").apply(copy.deepcopy(tiny).to("meta"), images(4, 0))


@needs_torchao
def test_dequantizing_the_weights_once_changes_nothing(tiny_static, probe, monkeypatch) -> None:
    """The PT2E twin reads its int8 weights dequantized once (a float buffer) instead of at every
    forward; outputs and input gradients are the same to the bit as with the per-forward op."""
    import qbd.quant.surrogate as surrogate_module

    folded = tiny_static.surrogate()
    monkeypatch.setattr(surrogate_module, "_fold_weight_dequant", lambda gm, targets: None)
    per_forward = tiny_static.surrogate()
    if not any("_qbd_dequantized" in n for n, _ in folded.named_buffers()):
        pytest.skip(f"this engine's twin ({tiny_static.audit.backend}) is not a PT2E graph")
    grads = []
    for twin in (folded, per_forward):
        x = probe.clone().requires_grad_()
        out = twin(x)
        grads.append((out.detach(), torch.autograd.grad(out.logsumexp(1).sum(), x)[0]))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_audit_measures_the_surrogates_agreement_on_the_calibration_images(tiny_static, calib) -> None:
    from qbd.quant.audit import measure_agreement
    from qbd.quant.common import calib_batches

    a = tiny_static.audit.surrogate_agreement
    images = torch.cat([b.float() for b in calib_batches(calib)])
    assert a["data"] == "calibration" and a["n_images"] == len(images) and a["runtime_batch"] == 64
    assert a["rel_tolerance"] == SURROGATE_REL_TOLERANCE and a["within_tolerance"] is True
    assert "per_image_runtime" not in a  # static ranges: the runtime's output does not depend on its batch
    # measured, not stated: the same figures measured again from the two models
    again = measure_agreement(tiny_static.surrogate(), tiny_static.model, images, tolerance=SURROGATE_REL_TOLERANCE,
                              data="calibration")
    assert again == a
    assert a["top1_agreement"] >= 0.9  # an untrained model's near-tied logits (the matrix's models: >= 0.99)
