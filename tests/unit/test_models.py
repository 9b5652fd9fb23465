import pytest
import torch

from qbd.models import MODELS, build_model


@pytest.mark.parametrize("name", MODELS.names())
def test_models_map_pixels_to_logits(name):
    m = build_model(name, 10, (0.5,) * 3, (0.25,) * 3, seed=0).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = m(x)
        feats = m.embed(x)
    assert logits.shape == (2, 10)
    assert feats.shape == (2, m.feature_dim)
    assert torch.allclose(m.head(feats), logits)
    assert m.num_classes == 10


def test_resnet18_matches_the_papers_text():
    m = build_model("resnet18-cifar", 10, (0.5,) * 3, (0.25,) * 3)
    assert sum(p.numel() for p in m.parameters()) == 11_173_962
    stem = m.features[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(mod, torch.nn.MaxPool2d) for mod in m.modules())
    assert sum(p.numel() for p in m.head.parameters()) == 5130


def test_tiny_cnn_is_small():
    m = build_model("tiny-cnn", 10, (0.5,) * 3, (0.25,) * 3)
    assert 40_000 < sum(p.numel() for p in m.parameters()) < 80_000


def test_normalisation_is_the_first_layer():
    m = build_model("tiny-cnn", 10, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5)).eval()
    x = torch.rand(1, 3, 32, 32)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.5
    assert torch.allclose(m.normalize(x), expected)
    assert "normalize.mean" in m.state_dict()


def test_seeded_build_is_reproducible_and_leaves_global_rng():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    a = build_model("tiny-cnn", 10, (0.5,) * 3, (0.25,) * 3, seed=3)
    assert torch.equal(torch.rand(1), expected)
    b = build_model("tiny-cnn", 10, (0.5,) * 3, (0.25,) * 3, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_unknown_model_lists_valid_ones():
    with pytest.raises(KeyError, match="valid: resnet18-cifar, tiny-cnn"):
        build_model("vgg", 10, (0.5,) * 3, (0.25,) * 3)


def test_every_deployed_model_refuses_uint8_pixels():
    """A defense that hands the model its uint8 inputs gets an error naming the fix, not confident
    garbage, on every built-in scheme (the ONNX Runtime ones where onnx is installed). Only the
    dtype is checked: float pixels in 0..255 (x.float() without /255) pass unnoticed."""
    import importlib.util

    from qbd.quant import get_scheme

    model = build_model("tiny-cnn", 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), seed=0).eval()
    calib = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pixels = (calib[:4] * 255).to(torch.uint8)
    onnx = ("onnx-int8-static", "onnx-int8-dynamic") if importlib.util.find_spec("onnxruntime") else ()
    for scheme in ("fp32", "int4-sim", "int8-dynamic", "int8-static", *onnx):
        qm = get_scheme(scheme).apply(model, calib)
        for m in (qm.model, qm.surrogate()):
            with pytest.raises(TypeError, match=r"float images in \[0, 1\].*to_unit"):
                m(pixels)
        assert qm.model(calib[:4]).shape == (4, 10)
