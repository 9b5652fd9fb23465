"""Whether a defense left the models it was given as they were. A defense that edits
`subject.model` (or the float model a repair starts from) in place would change what every later
cell of the same bench inspects, and the blame would land on an innocent defense; the bench
fingerprints both around each detect, and a change makes that cell invalid and the bench rebuild
what was touched (qbd.evaluate.Bench.run)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def fingerprint(module: Any) -> str:
    """sha256 over every value of the module's state dict (quantized tensors by their integer codes
    and quantization parameters, packed parameters through their own tensors)."""
    h = hashlib.sha256()
    for key, value in (module.state_dict().items() if hasattr(module, "state_dict") else ()):
        h.update(key.encode())
        _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_quantized:
            h.update(repr((t.qscheme(), t.q_per_channel_scales().tolist() if t.qscheme() in (
                torch.per_channel_affine, torch.per_channel_symmetric) else t.q_scale())).encode())
            t = t.int_repr()
        t = t.cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, (tuple, list)):
        for v in value:
            _feed(h, v)
    else:
        h.update(repr(value).encode())
