"""Narrow warning (and log) filters for the torch.ao / torchao calls qbd makes on purpose.

torch 2.14 deprecates torch.ao.quantization and quantized tensor creation and warns on every
use. qbd calls them deliberately (the paper's int8-dynamic is `quantize_dynamic`), so those
exact messages are noise; everything else must still reach the user. Each known warning is
matched by its full text (anchored at both ends) and its category, only inside
`ignoring_known_warnings()`, never at import time and never as a blanket filter.

Torch-free on purpose: the texts are plain strings; a unit test checks that they still equal
what torch emits, so a reworded warning shows up instead of being silently let through.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    text: str  # the exact message
    category: type[Warning]
    # C++ warnings routed through Python get "(Triggered internally at <file>:<line>.)" appended.
    cpp_suffix: bool = False

    @property
    def pattern(self) -> str:
        suffix = r"( \(Triggered internally at [^)]*\.\))?" if self.cpp_suffix else ""
        return re.escape(self.text) + suffix + r"\Z"

    def matches(self, message: str, category: type[Warning]) -> bool:
        return issubclass(category, self.category) and re.match(self.pattern, message) is not None


# torch/ao/quantization/utils.py DEPRECATION_WARNING, raised through typing_extensions.deprecated
# on quantize_dynamic, prepare_fx, convert_fx and the helpers they call.
TORCH_AO_DEPRECATED = KnownWarning(
    "torch.ao.quantization is deprecated and will be removed in 2.10. \n"
    "For migrations of users: \n"
    "1. Eager mode quantization (torch.ao.quantization.quantize, "
    "torch.ao.quantization.quantize_dynamic), please migrate to use torchao eager mode "
    "quantize_ API instead \n"
    "2. FX graph mode quantization (torch.ao.quantization.quantize_fx.prepare_fx,"
    "torch.ao.quantization.quantize_fx.convert_fx, please migrate to use torchao pt2e quantization "
    "API instead (prepare_pt2e, convert_pt2e) \n"
    "3. pt2e quantization has been migrated to torchao (https://github.com/pytorch/ao/tree/main/torchao/quantization/pt2e) \n"
    "see https://github.com/pytorch/ao/issues/2259 for more details",
    DeprecationWarning,
)

# aten/src/ATen/quantized/Quantizer.cpp, emitted when int8 weights are packed (quantize_dynamic,
# convert_fx) or a quantized tensor is created in a torch.ao forward.
QUANTIZED_TENSOR_DEPRECATED = KnownWarning(
    "torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation "
    "functions that produce tensors with dtype torch.quint8, torch.qint8, and torch.qint32 are "
    "deprecated and will be removed in a future PyTorch release. Please see "
    "https://github.com/pytorch/pytorch/issues/184982 for more information.",
    UserWarning,
    cpp_suffix=True,
)

# torch/ao/quantization/observer.py: the default x86/fbgemm qconfigs build observers with
# reduce_range=True (one warning per observer; hundreds for a ResNet in prepare_fx).
OBSERVER_REDUCE_RANGE = KnownWarning(
    "Please use quant_min and quant_max to specify the range for observers."
    "                     reduce_range will be deprecated in a future release of PyTorch.",
    UserWarning,
)

# Backprop through an op without an autograd kernel (quantized::linear_dynamic, ...). Never
# filtered: the input-gradient probe records it as evidence that no gradient flows.
NO_AUTOGRAD_KERNEL = re.compile(r"[\w:.]+: an autograd kernel was not registered to the Autograd key")

KNOWN: tuple[KnownWarning, ...] = (TORCH_AO_DEPRECATED, QUANTIZED_TENSOR_DEPRECATED, OBSERVER_REDUCE_RANGE)


@contextmanager
def ignoring_known_warnings(known: tuple[KnownWarning, ...] = KNOWN) -> Iterator[None]:
    """Ignore exactly the `known` warnings inside the body; the previous filters come back
    afterwards. Any other warning, including other DeprecationWarnings, passes unchanged."""
    with warnings.catch_warnings():
        for k in known:
            warnings.filterwarnings("ignore", message=k.pattern, category=k.category)
        yield


@contextmanager
def recording_no_autograd_kernel() -> Iterator[list[str]]:
    """Inside the body, torch's "an autograd kernel was not registered" warnings are recorded
    (first sentence, once each) into the yielded list instead of reaching the user: a defense
    that backpropagates through a quantized op reports it as evidence. Any other warning is
    re-emitted unchanged when the body ends."""
    notes: list[str] = []
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            try:
                yield notes
            finally:
                caught = list(recorded)
    finally:
        # outside catch_warnings: re-emitted warnings meet the caller's own filters
        for w in caught:
            text = str(w.message)
            if NO_AUTOGRAD_KERNEL.match(text):
                note = text.split(". ")[0]
                if note not in notes:
                    notes.append(note)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


@dataclass(frozen=True)
class KnownLog:
    logger: str
    text: str  # the exact formatted message

    def matches(self, record: logging.LogRecord) -> bool:
        return record.name == self.logger and record.getMessage() == self.text


# torch/utils/_pytree.py logs this once when torchao 0.18 is imported under torch 2.14
# (torchao registers its KernelPreference enum as a pytree constant).
TORCHAO_ENUM_CONSTANT = KnownLog(
    "torch.utils._pytree",
    "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile"
    " as an opaque value type. Calling register_constant() on Enum subclasses is deprecated and will"
    " be an error in a future release.",
)


class _DropKnown(logging.Filter):
    def __init__(self, known: KnownLog) -> None:
        super().__init__()
        self.known = known

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.known.matches(record)


@contextmanager
def ignoring_known_log(known: KnownLog) -> Iterator[None]:
    """Drop exactly that record of that logger inside the body; every other record passes."""
    logger = logging.getLogger(known.logger)
    drop = _DropKnown(known)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
