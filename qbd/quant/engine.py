"""The quantized engine (torch.backends.quantized.engine) as a scoped setting.

The engine is process-global state: it decides which kernels pack the int8 weights
(x86 / fbgemm: FBGEMM with reduce_range, qnnpack: QNNPACK). qbd never leaves it changed:
it is set around the calls that pack weights and restored afterwards, even on error.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qbd.config import ConfigError
from qbd.quant.warnings import ignoring_known_warnings


def supported_engines() -> list[str]:
    return sorted(e for e in torch.backends.quantized.supported_engines if e != "none")


@contextmanager
def quantized_engine(name: str) -> Iterator[str]:
    """Run the body with `name` as the quantized engine, then restore the previous one."""
    if name not in supported_engines():
        raise ConfigError(
            f"quantized engine {name!r} is not available in this torch build; valid: {', '.join(supported_engines())}"
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield name
    finally:
        torch.backends.quantized.engine = previous


class EngineBound(nn.Module):
    """A torch.ao quantized module whose packed int8 weights belong to one engine.

    Packed weights run with their own kernels whatever the global engine is, but copying a
    module repacks them on the *current* engine: a qnnpack int8-dynamic model deep-copied
    under x86 changes its logits (reduce_range differs). So deepcopy runs under the engine the
    weights were packed with. (load_state_dict repacks too: load under
    `quantized_engine(engine)`.)"""

    def __init__(self, module: nn.Module, engine: str) -> None:
        super().__init__()
        self.module = module
        self.engine = engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def __deepcopy__(self, memo: dict[int, object]) -> nn.Module:
        with quantized_engine(self.engine), ignoring_known_warnings():
            twin = EngineBound(copy.deepcopy(self.module, memo), self.engine)
        twin.training = self.training
        memo[id(self)] = twin
        return twin

    def extra_repr(self) -> str:
        return f"engine={self.engine!r}"
