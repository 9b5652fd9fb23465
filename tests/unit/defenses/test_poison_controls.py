"""Per-sample controls of the data-inspecting defenses (AC, SS): the suspects a defense names are
mapped back to the right input rows, and the bench scores them against the known poison
(qbd.cell_controls.poison_controls) as labelled sets; malformed suspects never crash a cell."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qbd.cell_controls import poison_controls
from qbd.defenses.activation_clustering import ActivationClustering, cluster_class
from qbd.defenses.base import DefenseInputs, Verdict
from qbd.defenses.sandbox import run_defense, vouch
from qbd.defenses.spectral_signatures import SpectralSignatures, spectrum
from tests.unit.defenses import PixelFeatures, class_data, subject


def _verdict(by_class, flagged):
    v = Verdict("detected" if flagged else "clean", target_class=flagged[0] if flagged else None,
                evidence={"flagged": flagged})
    v.suspects = {"data": "poisoned_train", "by_class": by_class}
    return v


def test_scores_are_precision_and_recall_of_the_suspects_as_labelled():
    labels = torch.tensor([0] * 6 + [1] * 4)
    poisoned = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)  # rows 0-2 of class 0
    exact = poison_controls(_verdict({0: [0, 1, 2]}, [0]), poisoned, labels, target=0)
    assert exact["poison_removal"].passed and exact["poison_removal"].value == 1.0
    assert exact["poison_target_class"].passed and "precision 1.000" in exact["poison_target_class"].detail
    # the complement of the poison within the class: agreement up to swapping is 1, but as a
    # labelled suspect set it is all wrong, and the control fails
    swapped = poison_controls(_verdict({0: [3, 4, 5]}, [0]), poisoned, labels, target=0)
    assert not swapped["poison_target_class"].passed and swapped["poison_target_class"].value == 0.0
    assert "(1.000 up to swapping the sides)" in swapped["poison_target_class"].detail
    # nothing flagged: nothing removed, yet the target class's suspects are still scored
    quiet = poison_controls(_verdict({0: [0, 1, 2]}, []), poisoned, labels, target=0)
    assert not quiet["poison_removal"].passed and quiet["poison_removal"].value == 0.0
    assert quiet["poison_target_class"].passed
    half = poison_controls(_verdict({0: [0, 3]}, [0]), poisoned, labels, target=0)
    assert half["poison_removal"].value == pytest.approx(1 / 3) and "precision 0.500" in half["poison_removal"].detail


@pytest.mark.parametrize("by_class", [{0: [0, 99]}, {0: [-1]}, {0: "x"}])
def test_malformed_suspects_fail_the_control_not_the_cell(by_class):
    labels = torch.zeros(10, dtype=torch.long)
    out = poison_controls(_verdict(by_class, [0]), torch.zeros(10, dtype=torch.bool), labels, target=0)
    assert not out["poison_removal"].passed and "malformed" in out["poison_removal"].detail


def test_vouch_keeps_wellformed_suspects_and_drops_others():
    v = _verdict({0: np.array([1, 2])}, [0])
    assert vouch(v, "d", 10).suspects["by_class"][0].tolist() == [1, 2]
    v.suspects = ["not", "a", "mapping"]
    assert vouch(v, "d", 10).suspects is None


def test_ac_suspects_are_the_smaller_cluster_in_input_order():
    """cluster_class sorts rows canonically before clustering; the suspects must be mapped back to
    the rows as the caller passed them."""
    rng = np.random.RandomState(0)
    a = np.concatenate([rng.normal(0, 1, (40, 5)), rng.normal(12, 1, (15, 5))])
    perm = rng.permutation(len(a))
    stats = cluster_class(a[perm], {"reduce": "none", "nb_dims": 0, "n_init": 5, "silhouette_sample": 1000}, 0)
    small = set(np.flatnonzero(perm >= 40).tolist())  # where the 15 far points ended up
    assert set(stats["smaller"].tolist()) == small


def test_ss_suspects_are_the_largest_scores():
    rng = np.random.RandomState(1)
    r = np.concatenate([rng.normal(0, 1, (90, 6)), rng.normal(0, 1, (10, 6)) + np.array([15, 0, 0, 0, 0, 0])])
    s = spectrum(r, {"removal_multiplier": 1.0, "eps": 0.1, "statistic": "kurtosis"})
    assert set(s["top"].tolist()) == set(range(90, 100))


@pytest.mark.parametrize("defense", [ActivationClustering("canonical"), SpectralSignatures("canonical")])
def test_defenses_name_suspects_by_row_of_the_inspected_set(defense):
    x, y = class_data(per_class=120, poison=100, target=1, poison_from="others")  # the other classes' points, triggered
    v, _ = run_defense(defense, subject(PixelFeatures(48, 4), 4), DefenseInputs(clean_holdout=(x, y), poisoned_train=(x, y)),
                       torch.Generator().manual_seed(0))
    assert v.suspects is not None and v.suspects["data"] == "poisoned_train"
    poisoned = torch.zeros(len(y), dtype=torch.bool)
    poisoned[-100:] = True  # class_data appends the poisoned blob last
    out = poison_controls(v, poisoned, y, target=1)
    # its suspects in the target class are the poison rows: the more varied part of the class's
    # split (qbd.defenses._poison_side), all of it for both
    assert out["poison_target_class"].value == 1.0 and "precision 1.000" in out["poison_target_class"].detail
    assert all(((y[torch.as_tensor(i)] == c).all()) for c, i in v.suspects["by_class"].items())  # each class's own rows
