"""qbd.quant.engine: the quantized engine is set only inside the context, and quantized
modules keep the engine their weights were packed with when copied."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qbd.config import ConfigError
from qbd.quant.engine import EngineBound, quantized_engine, supported_engines
from qbd.quant.warnings import ignoring_known_warnings


def test_engine_set_inside_and_restored() -> None:
    before = torch.backends.quantized.engine
    other = next(e for e in ("qnnpack", "fbgemm", "x86") if e != before)
    with quantized_engine(other) as name:
        assert name == other == torch.backends.quantized.engine
    assert torch.backends.quantized.engine == before


def test_engine_restored_on_error() -> None:
    before = torch.backends.quantized.engine
    with pytest.raises(RuntimeError, match="boom"), quantized_engine("qnnpack"):
        raise RuntimeError("boom")
    assert torch.backends.quantized.engine == before


def test_unknown_engine() -> None:
    with pytest.raises(ConfigError, match="not available"), quantized_engine("tpu"):
        pass
    assert "x86" in supported_engines() and "qnnpack" in supported_engines()


def test_deepcopy_keeps_the_packing_engine() -> None:
    """A qnnpack-packed dynamic linear deep-copied while x86 is the global engine would be
    repacked for x86 and change its outputs; EngineBound copies under qnnpack."""
    torch.manual_seed(0)
    x = torch.randn(8, 64) * 3
    with quantized_engine("qnnpack"), ignoring_known_warnings():
        packed = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(64, 10)), {nn.Linear})[0]
    bound = EngineBound(packed, "qnnpack")
    with quantized_engine("x86"), ignoring_known_warnings():
        naive, kept = copy.deepcopy(packed), copy.deepcopy(bound)
    with torch.no_grad():
        assert not torch.equal(naive(x), packed(x))  # the hazard EngineBound exists for
        assert torch.equal(kept(x), packed(x))
    assert kept.engine == "qnnpack" and kept.module is not packed
