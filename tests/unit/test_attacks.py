import pytest
import torch

from qbd.config import AttackSpec, ConfigError
from qbd.poisoning import apply_trigger, blend_pattern, poison, trigger_origin, trigger_patch


def test_patterns():
    assert torch.all(trigger_patch(AttackSpec(trigger_pattern="white")) == 255)
    board = trigger_patch(AttackSpec(trigger_pattern="checkerboard", trigger_size=4))
    assert board[0].tolist() == [[255, 0, 255, 0], [0, 255, 0, 255], [255, 0, 255, 0], [0, 255, 0, 255]]
    r1 = trigger_patch(AttackSpec(trigger_pattern="random", seed=1))
    assert torch.equal(r1, trigger_patch(AttackSpec(trigger_pattern="random", seed=1)))
    assert not torch.equal(r1, trigger_patch(AttackSpec(trigger_pattern="random", seed=2)))


@pytest.mark.parametrize(
    ("position", "origin"),
    [("top-left", (0, 0)), ("top-right", (0, 29)), ("bottom-left", (29, 0)), ("bottom-right", (29, 29)), ("5,7", (7, 5))],
)
def test_positions(position, origin):
    assert trigger_origin(AttackSpec(trigger_position=position), 32, 32) == origin


def test_bottom_right_white_square_pixels():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    xt = apply_trigger(x, AttackSpec())
    assert int(xt.sum()) == 255 * 27
    assert torch.all(xt[0, :, 29:, 29:] == 255)
    assert torch.equal(x, torch.zeros_like(x)), "apply_trigger must not modify its input"


def test_poison_rejects_what_does_not_fit():
    x = torch.zeros(10, 3, 8, 8, dtype=torch.uint8)
    y = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ConfigError, match="larger than the 8x8 image"):
        poison(x, y, AttackSpec(trigger_size=9), 10)
    with pytest.raises(ConfigError, match="target class 12 out of range"):
        poison(x, y, AttackSpec(target=12), 10)


def test_int_images_of_other_dtypes_are_refused():
    with pytest.raises(TypeError):
        apply_trigger(torch.zeros(1, 3, 8, 8, dtype=torch.int32), AttackSpec())


def test_poisoning_order_is_independent_of_the_training_shuffle():
    """Same seed for attack and training must not line the poisoned samples up in epoch 0."""
    from qbd.config import derive_seed

    n = 1000
    y = torch.arange(n) % 10
    x = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    p = poison(x, y, AttackSpec(seed=0), 10)
    first_batch = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("shuffle", 0)))[:128]
    share = p.is_poisoned[first_batch].float().mean().item()
    assert share < 0.3, f"{share:.2f} of the first batch is poisoned"
    assert derive_seed("poison", 0) != derive_seed("shuffle", 0)


def test_blend_mixes_the_whole_image_at_alpha():
    spec = AttackSpec(name="blend", trigger_pattern="random", alpha=0.2, seed=3)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = blend_pattern(spec, 3, 16, 16)
    xt = apply_trigger(x, spec)
    assert xt.dtype == torch.uint8 and xt.shape == x.shape
    expected = (0.8 * x.float() + 0.2 * p.float()).round()
    assert torch.equal(xt.float(), expected)  # every pixel, not a patch
    assert (xt != x).float().mean() > 0.5
    # float input: the same mix, without rounding
    xf = apply_trigger(x.float() / 255, spec)
    assert torch.allclose(xf * 255, 0.8 * x.float() + 0.2 * p.float(), atol=1e-3)


def test_blend_pattern_is_reproducible_and_seeded():
    a = AttackSpec(name="blend", trigger_pattern="random", seed=1)
    assert torch.equal(blend_pattern(a, 3, 8, 8), blend_pattern(a, 3, 8, 8))
    assert not torch.equal(blend_pattern(a, 3, 8, 8), blend_pattern(AttackSpec(name="blend", trigger_pattern="random", seed=2), 3, 8, 8))
    board = blend_pattern(AttackSpec(name="blend", trigger_pattern="checkerboard"), 1, 2, 2)
    assert board[0].tolist() == [[255, 0], [0, 255]]


def test_quant_conditioned_plants_badnets_patch():
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert torch.equal(apply_trigger(x, AttackSpec(name="quant-conditioned")), apply_trigger(x, AttackSpec()))
