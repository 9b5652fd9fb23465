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


def test_the_calibration_file_holds_only_calibration_seeds(calibration):
    results, _ = calibration
    assert {r["seed"] for r in results} == set(CALIBRATION_SEEDS)
    assert {r["dataset"] for r in results} == {"digits", "synthetic"}
    assert all(r["weights"]["origin"] == "zoo" for r in results)
    assert len(results) == 2 * len(CALIBRATION_SEEDS) * 2 * 5  # data sets x seeds x (backdoored, clean) x defenses


@pytest.mark.parametrize(("defense", "param"), [(ActivationClustering, "silhouette_threshold"),
                                                (SpectralSignatures, "kurtosis_threshold")])
def test_thresholds_in_the_code_are_the_calibrated_midpoints(calibration, defense, param):
    _, proposal = calibration
    found = proposal[defense.name]
    assert found["separates"], f"{defense.name}: the calibration models no longer separate"
    assert defense("canonical").params[param] == found["midpoint"]
