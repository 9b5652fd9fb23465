"""qbd.quant.warnings: only the exact known torch.ao messages are filtered."""

from __future__ import annotations

import warnings

import pytest
import torch

from qbd.quant import SCHEMES
from qbd.quant.warnings import (
    KNOWN,
    OBSERVER_REDUCE_RANGE,
    QUANTIZED_TENSOR_DEPRECATED,
    TORCH_AO_DEPRECATED,
    ignoring_known_warnings,
)

from .conftest import images


@pytest.mark.parametrize("known", KNOWN, ids=lambda k: k.text[:30])
def test_known_message_is_filtered(known) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with ignoring_known_warnings():
            warnings.warn(known.text, known.category, stacklevel=1)
    assert seen == []


def test_cpp_suffix_is_accepted() -> None:
    text = QUANTIZED_TENSOR_DEPRECATED.text + " (Triggered internally at /x/Quantizer.cpp:111.)"
    assert QUANTIZED_TENSOR_DEPRECATED.matches(text, UserWarning)
    assert not TORCH_AO_DEPRECATED.matches(
        TORCH_AO_DEPRECATED.text + " (Triggered internally at a.cpp:1.)", DeprecationWarning
    )


@pytest.mark.parametrize(
    ("message", "category"),
    [
        ("some other library is deprecated", DeprecationWarning),
        (TORCH_AO_DEPRECATED.text + " and more", DeprecationWarning),  # anchored at the end
        ("prefix " + TORCH_AO_DEPRECATED.text, DeprecationWarning),  # anchored at the start
        (TORCH_AO_DEPRECATED.text, RuntimeWarning),  # right text, wrong category
        ("Please use quant_min and quant_max to specify the range for observers.", UserWarning),
    ],
)
def test_other_warnings_pass(message: str, category: type[Warning]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ignoring_known_warnings():
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in caught] == [message]


def test_filters_restored() -> None:
    before = list(warnings.filters)
    with ignoring_known_warnings():
        assert len(warnings.filters) == len(before) + len(KNOWN)
    assert warnings.filters == before


def test_texts_match_torch() -> None:
    from torch.ao.quantization.utils import DEPRECATION_WARNING

    assert TORCH_AO_DEPRECATED.text == DEPRECATION_WARNING
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.ao.quantization.observer.HistogramObserver(reduce_range=True)
    assert any(OBSERVER_REDUCE_RANGE.matches(str(w.message), w.category) for w in caught)


def test_torch_ao_really_warns_and_the_scheme_filters_it(tiny) -> None:
    """quantize_dynamic emits the deprecation (so the filter is needed); the scheme, run with
    every warning turned into an error, filters it and nothing else escapes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(4, 2)), {torch.nn.Linear})
    assert any(TORCH_AO_DEPRECATED.matches(str(w.message), w.category) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for engine in ("x86", "qnnpack"):
            SCHEMES.get("int8-dynamic").apply(tiny, None, engine)
        SCHEMES.get("int8-static").apply(tiny, images(8, 0), "fbgemm")  # the torch.ao FX flow


def test_known_log_record_dropped_others_pass(caplog) -> None:
    import logging

    from qbd.quant.warnings import TORCHAO_ENUM_CONSTANT, ignoring_known_log

    logger = logging.getLogger(TORCHAO_ENUM_CONSTANT.logger)
    with (
        caplog.at_level(logging.WARNING, logger=TORCHAO_ENUM_CONSTANT.logger),
        ignoring_known_log(TORCHAO_ENUM_CONSTANT),
    ):
        logger.warning("%s", TORCHAO_ENUM_CONSTANT.text)
        logger.warning("%s", TORCHAO_ENUM_CONSTANT.text + " (different)")
    assert [r.getMessage() for r in caplog.records] == [TORCHAO_ENUM_CONSTANT.text + " (different)"]
    assert not logger.filters


def test_recording_no_autograd_kernel_records_it_and_passes_others_through():
    import warnings as w

    import pytest

    from qbd.quant.warnings import recording_no_autograd_kernel

    msg = ("quantized::linear_dynamic: an autograd kernel was not registered to the Autograd key(s) but we are"
           " trying to backprop through it. This may lead to silently incorrect behavior.")
    with pytest.warns(UserWarning, match="unrelated") as record, recording_no_autograd_kernel() as notes:
        w.warn(msg, UserWarning, stacklevel=1)
        w.warn(msg, UserWarning, stacklevel=1)
        w.warn("unrelated", UserWarning, stacklevel=1)
    assert notes == [msg.split(". ")[0]]
    assert [str(r.message) for r in record] == ["unrelated"]
