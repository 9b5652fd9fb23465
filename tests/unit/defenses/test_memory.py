"""Memory budgets: the per-image footprint is measured, and a budget splits NC's classes and
STRIP's blended batches into smaller passes without changing a verdict."""

import numpy as np
import pytest
import torch

from qbd.defenses._memory import MIB, bytes_per_image, images_within
from qbd.defenses.base import DefenseInputs, Subject
from qbd.defenses.neural_cleanse import NeuralCleanse
from qbd.defenses.sandbox import run_defense
from qbd.defenses.strip import Strip
from qbd.models import build_model
from qbd.quant import SCHEMES


@pytest.fixture(scope="module")
def tiny():
    model = build_model("tiny-cnn", 10, (0.5,) * 3, (0.25,) * 3, seed=0).eval()
    x = torch.randint(0, 256, (96, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.int64).to(torch.uint8)
    return model, x


def _subject(m):
    return Subject(m, m.embed, m.classify, 10)


def test_footprint_is_measured_and_scales_with_the_image(tiny):
    model, _ = tiny
    big = bytes_per_image(model, (3, 32, 32), torch.device("cpu"))
    small = bytes_per_image(model, (3, 16, 16), torch.device("cpu"))
    assert big > 3 * 32 * 32 * 4  # more than the input alone: every layer's output counts
    assert 3.0 < big / small < 5.0  # conv activations scale with the pixel count


def test_footprint_of_a_quantized_graph_model(tiny):
    model, x = tiny
    qm = SCHEMES.get("int8-static").apply(model, x[:32].float() / 255)
    assert bytes_per_image(qm.model, (3, 32, 32), torch.device("cpu")) > 3 * 32 * 32 * 4


def test_images_within_budget():
    assert images_within(1, MIB // 4, 1.0) == 4
    assert images_within(1, MIB // 4, 2.0) == 2
    assert images_within(0.001, MIB, 3.0) == 1  # below one image: still runs, one at a time


def test_nc_budget_splits_classes_and_keeps_the_verdict(tiny):
    model, x = tiny
    inputs = DefenseInputs((x, torch.zeros(len(x), dtype=torch.int64)))
    per_image = bytes_per_image(model, (3, 32, 32), torch.device("cpu"))
    budget = 3 * 3 * 8 * per_image / MIB  # three classes of 8 images, at 3x a forward each
    kw = {"steps": 4, "batch_size": 8, "mode": "batched"}
    whole, _ = run_defense(NeuralCleanse("paper", **kw), _subject(model), inputs, torch.Generator().manual_seed(3))
    split, _ = run_defense(NeuralCleanse("paper", memory_mib=budget, **kw), _subject(model), inputs, torch.Generator().manual_seed(3))
    assert split.evidence["class_chunk"] == 3 and "class_chunk" not in whole.evidence
    assert split.status == whole.status
    np.testing.assert_allclose(split.evidence["norms"], whole.evidence["norms"], rtol=1e-4)


def test_strip_budget_shrinks_passes_and_keeps_the_entropies(tiny):
    model, x = tiny
    inputs = DefenseInputs((x[:64], torch.zeros(64, dtype=torch.int64)), triggered_inputs=x[64:])
    per_image = bytes_per_image(model, (3, 32, 32), torch.device("cpu"))
    budget = 2 * 40 * per_image / MIB  # 40 blended images per pass
    kw = {"n_overlays": 8}
    free, _ = run_defense(Strip("canonical", **kw), _subject(model), inputs, torch.Generator().manual_seed(0))
    tight, _ = run_defense(Strip("canonical", memory_mib=budget, **kw), _subject(model), inputs, torch.Generator().manual_seed(0))
    assert tight.evidence["images_per_pass"] == 40
    assert tight.status == free.status and tight.score == free.score
    assert tight.evidence["entropy_stream"] == free.evidence["entropy_stream"]
