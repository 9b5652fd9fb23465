"""intN-sim: Eq. 3 per output channel on every conv and linear weight, nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qbd.quant import SCHEMES, SIM_BITS
from qbd.quant.intn_sim import IntNSim, quantize_weight


@pytest.fixture(scope="module")
def int4_resnet(resnet):
    return SCHEMES.get("int4-sim").apply(resnet, None)


def test_int4_resnet_quantizes_every_conv_and_linear(int4_resnet, resnet) -> None:
    a = int4_resnet.audit
    layers = [n for n, m in resnet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 21 and a.quantized_modules == layers
    assert a.quantized_param_fraction >= 0.95
    assert a.bits == 4 and a.max_levels_per_channel <= 16
    assert a.max_rel_error <= 0.5 + 1e-5
    assert a.input_gradient and a.differentiable and a.gradient_note is None


def test_int4_leaves_batchnorm_biases_and_normalize_untouched(int4_resnet, resnet) -> None:
    fp = resnet.state_dict()
    q = int4_resnet.model.state_dict()
    assert fp.keys() == q.keys()
    weight_keys = {f"{n}.weight" for n, m in resnet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for key in fp:
        if key in weight_keys:
            w_q, _ = quantize_weight(fp[key], 4)
            assert torch.equal(q[key], w_q), key
        else:  # BatchNorm weight/bias/running stats, head bias, Normalize mean/std
            assert torch.equal(q[key], fp[key]), key


@pytest.mark.parametrize("bits", SIM_BITS)
def test_levels_per_bit_width(bits: int, tiny) -> None:
    a = SCHEMES.get(f"int{bits}-sim").apply(tiny, None).audit
    assert a.bits == bits
    assert a.max_levels_per_channel <= 2**bits - 1  # symmetric: -qmax..qmax
    assert a.quantized_param_fraction >= 0.95


def test_more_bits_less_error(tiny, probe) -> None:
    with torch.no_grad():
        ref = tiny(probe)
        errs = [(SCHEMES.get(f"int{b}-sim").apply(tiny, None).model(probe) - ref).abs().mean() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]


def test_all_zero_layer_has_no_nan(tiny, probe) -> None:
    import copy

    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.head.weight.zero_()
    qm = SCHEMES.get("int4-sim").apply(model, None)
    assert torch.isfinite(qm.model(probe)).all()
    assert torch.equal(qm.model.head.weight, torch.zeros_like(model.head.weight))


def test_bits_validated() -> None:
    with pytest.raises(ValueError, match="bits"):
        IntNSim(9)
