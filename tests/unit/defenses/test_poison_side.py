"""Which part of a split class is the poison (qbd.defenses._poison_side), and the AC / SS suspects
built on it: the poison is drawn from the other classes, so it is the more varied part."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qbd.cell_controls import poison_controls
from qbd.defenses._poison_side import more_varied, split_line, spread
from qbd.defenses.activation_clustering import ActivationClustering
from qbd.defenses.base import DefenseInputs
from qbd.defenses.sandbox import run_defense
from qbd.defenses.spectral_signatures import SpectralSignatures
from qbd.errors import ConfigError
from tests.unit.defenses import PixelFeatures, class_data, subject


def test_spread_projects_the_direction_out():
    x = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert spread(x) == pytest.approx(2.0)  # 1 per axis
    assert spread(x, np.array([1.0, 0.0])) == pytest.approx(1.0)
    assert spread(x[:1]) == 0.0


def test_more_varied_picks_either_part():
    rng = np.random.RandomState(0)
    x = np.concatenate([rng.normal(0, 1, (50, 4)), rng.normal(10, 5, (50, 4))])
    part = np.arange(100) < 50
    assert (more_varied(x, part) == ~part).all()
    assert (more_varied(x, ~part) == ~part).all()


@pytest.mark.parametrize("n_far", [50, 10])  # half the class, and a minority
def test_split_line_finds_two_groups(n_far):
    rng = np.random.RandomState(1)
    p = np.concatenate([rng.normal(0, 1, 100 - n_far), rng.normal(8, 1, n_far)])
    assert (split_line(p) == (np.arange(100) >= 100 - n_far)).all()
    assert not split_line(np.zeros(5)).any()  # no spread: one group


@pytest.mark.parametrize("poison", [100, 220])  # the poison the smaller, then the larger part of its class
@pytest.mark.parametrize("cls, authors", [(ActivationClustering, "smaller"), (SpectralSignatures, "squared")])
def test_suspects_are_the_poison_where_the_authors_rule_is_not(cls, authors, poison):
    x, y = class_data(per_class=120, poison=poison, target=1, poison_from="others")
    poisoned = torch.zeros(len(y), dtype=torch.bool)
    poisoned[-poison:] = True  # class_data appends the poison last
    ours, theirs = (run_defense(cls("canonical", **({} if s is None else {"suspects": s})), subject(PixelFeatures(48, 4), 4),
                                DefenseInputs(clean_holdout=(x, y), poisoned_train=(x, y)), torch.Generator().manual_seed(0))[0]
                    for s in (None, authors))
    got = poison_controls(ours, poisoned, y, target=1)["poison_target_class"]
    assert got.passed and got.value == 1.0, got.detail
    if poison > 120:  # the authors' rule takes the smaller part, here the clean one (AC), or a third of the class (SS)
        assert not poison_controls(theirs, poisoned, y, target=1)["poison_target_class"].passed


@pytest.mark.parametrize("cls", [ActivationClustering, SpectralSignatures])
def test_an_unknown_suspect_rule_is_refused(cls):
    with pytest.raises(ConfigError, match="suspects must be one of"):
        cls("canonical", suspects="largest")


def test_a_lone_outlier_is_the_suspect_not_the_rest():
    x = np.concatenate([np.random.RandomState(3).normal(0, 1, (199, 4)), [[40.0, 0, 0, 0]]])
    outlier = np.arange(200) == 199
    assert (more_varied(x, outlier) == outlier).all() and (more_varied(x, ~outlier) == outlier).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_single_source_poison_is_where_the_rule_has_nothing_to_go_on(seed):
    """The limit, stated: the rule's premise is a poison drawn from many classes. A poison that is
    one blob (here: a single shifted source, as spread as the clean part) gives it nothing to read
    (docs/defenses.md#which-part-is-the-poison); for this minority case the authors' choices stay
    available (suspects = smaller / squared) and name it on every seed."""
    x, y = class_data(per_class=120, poison=100, target=1, seed=seed)
    poisoned = torch.zeros(len(y), dtype=torch.bool)
    poisoned[-100:] = True
    for cls, authors in ((ActivationClustering, "smaller"), (SpectralSignatures, "squared")):
        v = run_defense(cls("canonical", suspects=authors), subject(PixelFeatures(48, 4), 4),
                        DefenseInputs(clean_holdout=(x, y), poisoned_train=(x, y)), torch.Generator().manual_seed(0))[0]
        got = poison_controls(v, poisoned, y, target=1)["poison_target_class"]
        assert "precision 1.000" in got.detail, (cls.name, got.detail)
