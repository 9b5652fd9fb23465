"""Hypothesis properties of BadNet's trigger placement and poisoning."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from qbd.config import CORNERS, AttackSpec
from qbd.poisoning import apply_trigger, n_poison, poison, trigger_mask, trigger_origin, trigger_patch, triggered_test


@st.composite
def attack_and_image(draw):
    h = draw(st.integers(4, 20))
    w = draw(st.integers(4, 20))
    size = draw(st.integers(1, min(h, w)))
    if draw(st.booleans()):
        position = draw(st.sampled_from(CORNERS))
    else:
        position = f"{draw(st.integers(0, w - size))},{draw(st.integers(0, h - size))}"
    k = draw(st.integers(2, 6))
    spec = AttackSpec(
        target=draw(st.integers(0, k - 1)),
        trigger_pattern=draw(st.sampled_from(["white", "checkerboard", "random"])),
        trigger_size=size,
        trigger_position=position,
        poison_rate=draw(st.floats(0.01, 1.0)),
        seed=draw(st.integers(0, 2**16)),
    )
    return spec, h, w, k


@given(attack_and_image(), st.integers(0, 2**16))
def test_trigger_stays_inside_and_changes_only_its_pixels(case, seed):
    spec, h, w, _ = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (3, 3, h, w), generator=g, dtype=torch.int64).to(torch.uint8)
    r, c = trigger_origin(spec, h, w)
    assert 0 <= r <= h - spec.trigger_size and 0 <= c <= w - spec.trigger_size
    xt = apply_trigger(x, spec)
    m = trigger_mask(spec, h, w)
    assert int(m.sum()) == spec.trigger_size**2
    assert torch.equal(xt[:, :, ~m], x[:, :, ~m])
    patch = trigger_patch(spec, 3)
    assert torch.equal(xt[:, :, r : r + spec.trigger_size, c : c + spec.trigger_size], patch.expand(3, -1, -1, -1))
    # the float path writes the same patch, scaled to [0, 1]
    xf = apply_trigger(x.float() / 255, spec)
    assert torch.allclose(xf * 255, xt.float(), atol=1e-3)


@given(attack_and_image(), st.integers(1, 200))
def test_poisoned_count_is_rate_times_n(case, n):
    spec, h, w, k = case
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.int64).to(torch.uint8)
    y = torch.randint(0, k, (n,), generator=g)
    p = poison(x, y, spec, k)
    assert len(p.poison_idx) == n_poison(spec, n) == round(spec.poison_rate * n)
    assert len(set(p.poison_idx.tolist())) == len(p.poison_idx)
    assert torch.all(p.y[p.poison_idx] == spec.target)
    clean = ~p.is_poisoned
    assert torch.equal(p.x[clean], x[clean]) and torch.equal(p.y[clean], y[clean])
    assert torch.equal(p.y_true, y)
    # non-target samples are poisoned first
    n_other = int((y != spec.target).sum())
    assert int((y[p.poison_idx] != spec.target).sum()) == min(n_other, len(p.poison_idx))
    # deterministic
    assert torch.equal(poison(x, y, spec, k).poison_idx, p.poison_idx)


@given(attack_and_image(), st.integers(1, 100))
def test_asr_set_excludes_target_class(case, n):
    spec, h, w, k = case
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.int64).to(torch.uint8)
    y = torch.randint(0, k, (n,), generator=g)
    xt, yt = triggered_test(x, y, spec, k)
    assert len(xt) == len(yt) == int((y != spec.target).sum())
    assert not torch.any(yt == spec.target)
