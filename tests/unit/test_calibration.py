"""The hard-coded thresholds of AC and SS are the ones the calibration seeds support: recompute
them from the committed calibration Results (scripts/calibrate.py --out, on zoo seeds 100-104)
and compare with the defaults in the code. No evaluation seed (0-4) is in that file."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from qbd.defenses.activation_clustering import ActivationClustering
from qbd.defenses.spectral_signatures import SpectralSignatures
from qbd.zoo.pinned import CALIBRATION_SEEDS

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "fixtures" / "calibration" / "seeds-100-104.json"


@pytest.fixture(scope="module")
def calibration():
    results = json.loads(RESULTS.read_text())["results"]
    table = runpy.run_path(str(ROOT / "scripts" / "calibrate.py"))["table"]
    return results, table(results)[1]


def test_the_calibration_file_was_run_with_todays_rules_on_the_pinned_models(calibration):
    """A stale fixture cannot pass for a calibration: AC's and SS's Results carry today's canonical
    parameters but for the thresholds themselves (which the statistics do not depend on), and every
    model's weights are the pinned zoo's file, by sha256."""
    results, _ = calibration
    pinned = {m["file"]: m["sha256"] for m in json.loads((ROOT / "qbd" / "zoo" / "weights" / "manifest.json").read_text())["models"].values()}
    for r in results:
        assert pinned.get(r["weights"]["file"]) == r["weights"]["sha256"], r["weights"]["file"]
    for defense in (ActivationClustering, SpectralSignatures):
        today = defense("canonical", "smoke").params
        used = [r["defense"]["params"] for r in results if r["defense"]["name"] == defense.name]
        assert used
        for params in used:
            assert {k: v for k, v in params.items() if not k.endswith("_threshold")} == \
                {k: v for k, v in today.items() if not k.endswith("_threshold")}


def test_the_calibration_file_holds_only_calibration_seeds(calibration):
    results, _ = calibration
    assert {r["seed"] for r in results} == set(CALIBRATION_SEEDS)
    assert {r["dataset"] for r in results} == {"digits", "synthetic"}
    assert all(r["weights"]["origin"] == "zoo" for r in results)
    assert len(results) == 2 * len(CALIBRATION_SEEDS) * 2 * 5  # data sets x seeds x (backdoored, clean) x defenses


@pytest.mark.parametrize(("defense", "statistic", "param", "pooled"), [
    (ActivationClustering, "activation-clustering", "silhouette_threshold", True),
    (SpectralSignatures, "spectral-signatures", "kurtosis_threshold", True),
    # the separation does not separate the two data sets' models pooled: off ("*": None) elsewhere
    (SpectralSignatures, "spectral-signatures/separation", "separation_threshold", False)])
def test_thresholds_in_the_code_are_the_calibrated_midpoints(calibration, defense, statistic, param, pooled):
    """Per data set, each set's own calibration midpoint; "*" (other data sets) the pooled one."""
    results, proposal = calibration
    # the pooled midpoint is the "*" entry; where the pooled models do not separate (the separation) it is None: off
    assert proposal[statistic]["separates"] is pooled
    supported = runpy.run_path(str(ROOT / "scripts" / "calibrate.py"))["per_dataset"](results)[defense.name][param]
    assert None not in (supported["digits"], supported["synthetic"]), f"{statistic}: a data set's calibration models no longer separate"
    assert defense("canonical").params[param] == supported


def test_a_defense_uses_its_data_sets_threshold_and_says_which():
    """The mapping reaches the verdict: digits' own midpoint for digits, the pooled one for a data
    set without a calibration of its own, recorded in the evidence either way."""
    from qbd.defenses._per_dataset import ANY, resolve

    thr = ActivationClustering("canonical").params["silhouette_threshold"]
    assert resolve(thr, "digits") == (thr["digits"], "digits")
    value, which = resolve(thr, "cifar10")
    assert value == thr[ANY] and "'cifar10' has no calibration of its own" in which
    assert resolve(0.5, "digits") == (0.5, "every data set (one number)")
