"""The kernels the main job's speed comes from, each next to what it replaced, one thread, in one
run (compare within a group; nothing here asserts a time):

    pytest -p no:xdist -m bench tests/bench/test_kernels_bench.py --benchmark-only

- `fake-quant`: the surrogates' straight-through fake quantization (qbd.quant.surrogate), forward
  and backward over a 32 x 16 x 32 x 32 activation, against torch.fake_quantize_per_tensor_affine;
  bitwise equal (tests/unit/quant/test_surrogate.py).
- `top-svd`: the spectral signature of one class matrix (1,000 samples x 1,024 pre-pool features,
  a few strong directions plus noise): the top two singular values and the top direction by
  ARPACK against LAPACK's whole thin SVD (tests/unit/defenses/test_spectral_signatures.py checks
  they agree).
- `features`: tiny-cnn's pre-pool features of 2,048 32x32 images in batches of 512, the images in
  channels_last against the default layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.bench
@pytest.mark.parametrize("impl", ["qbd", "aten"])
def test_fake_quant(benchmark, one_thread, impl):
    from qbd.quant.surrogate import fake_quant_ste

    benchmark.group = "fake-quant"
    x = (torch.randn(32, 16, 32, 32, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_(True)
    upstream = torch.ones_like(x)
    fq = (lambda t: fake_quant_ste(t, 0.05, 3, 0, 255)) if impl == "qbd" else (
        lambda t: torch.fake_quantize_per_tensor_affine(t, 0.05, 3, 0, 255))

    def step():
        torch.autograd.grad(fq(x), x, upstream)

    benchmark.pedantic(step, rounds=20, iterations=5, warmup_rounds=2)
    benchmark.extra_info.update(shape=list(x.shape), threads=1)


def class_matrix(n: int = 1000, d: int = 1024, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, 4)) * [8.0, 4.0, 2.0, 1.0] @ rng.normal(size=(4, d))
    r = signal + rng.normal(size=(n, d))
    return r - r.mean(axis=0, keepdims=True)


@pytest.mark.bench
@pytest.mark.parametrize("whole", [False, True], ids=["arpack-top2", "lapack-all"])
def test_top_svd(benchmark, one_thread, whole):
    from qbd.defenses._features import single_threaded
    from qbd.defenses.spectral_signatures import _svd

    benchmark.group = "top-svd"
    rc = class_matrix()
    with single_threaded():
        benchmark.pedantic(_svd, args=(rc, whole), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(shape=list(rc.shape), threads=1)


@pytest.mark.bench
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_features(benchmark, one_thread, layout, monkeypatch):
    from qbd.defenses import _features as feat
    from qbd.defenses.base import Subject
    from qbd.models import build_model

    benchmark.group = "features"
    model = build_model("tiny-cnn", 10, (0.5,) * 3, (0.25,) * 3, seed=0).eval()
    x = torch.randint(0, 256, (2048, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.int64).to(torch.uint8)
    if layout == "contiguous":
        monkeypatch.setattr(feat, "channels_last", lambda t: t)
    subject = Subject(model, model.embed, model.classify, 10)
    benchmark.pedantic(feat.pre_pool, args=(subject, x), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(images=len(x), threads=1)
