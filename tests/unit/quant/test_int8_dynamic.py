"""int8-dynamic: the paper's quantize_dynamic({nn.Linear}), its audit and its surrogate."""

from __future__ import annotations

import copy

import pytest
import torch

from qbd.config import ConfigError
from qbd.quant import SCHEMES
from qbd.quant.int8_dynamic import SURROGATE_REL_TOLERANCE
from qbd.quant.surrogate import DynamicLinearSTE

ENGINES = ["x86", "qnnpack"]  # the default and the paper's


@pytest.mark.parametrize("engine", ENGINES)
def test_resnet18_only_the_classifier_is_quantized(engine: str, resnet, probe) -> None:
    before = torch.backends.quantized.engine
    qm = SCHEMES.get("int8-dynamic").apply(resnet, None, engine)
    assert torch.backends.quantized.engine == before  # the engine was scoped
    a = qm.audit
    assert a.engine == engine
    assert a.quantized_modules == ["head"]
    assert a.quantized_params == resnet.head.weight.numel()
    assert a.quantized_param_fraction < 0.01
    assert a.input_gradient is False and a.differentiable is False
    assert "autograd kernel was not registered" in a.gradient_note
    assert a.bits == 8 and a.max_levels_per_channel <= 256 and a.max_rel_error <= 0.5 + 1e-5
    with torch.no_grad():  # the features are not quantized at all: bit-identical to FP32
        assert torch.equal(qm.embed(probe[:4]), resnet.embed(probe[:4]))


def _served_alone(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The deployed model run one image at a time: the reference the surrogate matches
    (quantized::linear_dynamic's range spans the whole batch, see qbd/quant/int8_dynamic.py)."""
    return torch.cat([model(x[i : i + 1]) for i in range(len(x))])


@pytest.mark.parametrize("engine", ENGINES)
def test_surrogate_matches_deployed_served_alone(engine: str, tiny, probe) -> None:
    qm = SCHEMES.get("int8-dynamic").apply(tiny, None, engine)
    surrogate = qm.surrogate()
    assert isinstance(surrogate.head, DynamicLinearSTE)
    with torch.no_grad():
        deployed, twin, fp32 = _served_alone(qm.model, probe), surrogate(probe), tiny(probe)
    scale = deployed.abs().max()
    assert (twin - deployed).abs().max() <= SURROGATE_REL_TOLERANCE * scale
    # discriminating: the float model itself is outside the tolerance
    assert (fp32 - deployed).abs().max() > SURROGATE_REL_TOLERANCE * scale
    x = probe.clone().requires_grad_()
    (grad,) = torch.autograd.grad(surrogate(x).sum(), x)
    assert torch.isfinite(grad).all() and (grad != 0).any()


@pytest.mark.parametrize("engine", ENGINES)
def test_surrogate_logits_do_not_depend_on_the_batch(engine: str, tiny, probe) -> None:
    """An image's surrogate logits are the same alone and next to other images: here next to
    brightened copies, whose features widen a shared range (the old per-tensor twin moved them)."""
    qm = SCHEMES.get("int8-dynamic").apply(tiny, None, engine)
    surrogate = qm.surrogate()
    x = probe[:8]
    mixed = torch.cat([x, (x * 4).clamp(max=1.0), 1 - x])
    with torch.no_grad():
        alone = _served_alone(surrogate, x)
        in_batch = surrogate(mixed)[: len(x)]
    torch.testing.assert_close(in_batch, alone, rtol=1e-5, atol=1e-5 * float(alone.abs().max()))


@pytest.mark.parametrize(("engine", "wrong_reduce_range"), [("x86", False), ("qnnpack", True)])
def test_reduce_range_follows_the_engine(engine: str, wrong_reduce_range: bool, tiny, probe) -> None:
    """x86 rounds activations to 0..127 (reduce_range), qnnpack to 0..255: a twin with the
    other engine's range misses the tolerance."""
    qm = SCHEMES.get("int8-dynamic").apply(tiny, None, engine)
    wrong = qm.surrogate()
    wrong.head.reduce_range = wrong_reduce_range
    with torch.no_grad():
        deployed = _served_alone(qm.model, probe)
        assert (wrong(probe) - deployed).abs().max() > SURROGATE_REL_TOLERANCE * deployed.abs().max()


def test_deployed_copies_keep_numerics(tiny, probe) -> None:
    qm = SCHEMES.get("int8-dynamic").apply(tiny, None, "qnnpack")
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(qm.model)(probe), qm.model(probe))


def test_refuses_non_cpu(tiny) -> None:
    with pytest.raises(ConfigError, match="CPU"):
        SCHEMES.get("int8-dynamic").apply(copy.deepcopy(tiny).to("meta"), None)
