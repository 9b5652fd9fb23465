"""The hard-coded thresholds of AC and SS are the ones the calibration seeds support: recompute
them from the committed calibration Results and compare with the defaults in the code. The
Results are those of the pinned zoo's default-BadNet and clean models (scripts/calibrate.py
--out) and of models trained under the calibration spread of attacks (qbd.presets.
CALIBRATION_SPREAD, `qbd run --json`), all on seeds 100-104: no evaluation seed (0-9) and no
evaluation attack is in either file."""

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
SPREAD = ROOT / "fixtures" / "calibration" / "spread-100-104.json"


@pytest.fixture(scope="module")
def calibration():
    script = runpy.run_path(str(ROOT / "scripts" / "calibrate.py"))
    results = json.loads(RESULTS.read_text())["results"] + script["with_results"]([str(SPREAD)])
    return results, script["table"](results)[1]


def _today_but_thresholds(defense) -> dict:
    return {k: v for k, v in defense("canonical", "smoke").params.items() if not k.endswith("_threshold")}


def test_the_calibration_file_was_run_with_todays_rules_on_the_pinned_models(calibration):
    """A stale fixture cannot pass for a calibration: AC's and SS's Results carry today's canonical
    parameters but for the thresholds themselves (which the statistics do not depend on), and every
    model's weights are the pinned zoo's file, by sha256."""
    results, _ = calibration
    pinned = {m["file"]: m["sha256"] for m in json.loads((ROOT / "qbd" / "zoo" / "weights" / "manifest.json").read_text())["models"].values()}
    for r in json.loads(RESULTS.read_text())["results"]:
        assert pinned.get(r["weights"]["file"]) == r["weights"]["sha256"], r["weights"]["file"]
    for defense in (ActivationClustering, SpectralSignatures):
        used = [r["defense"]["params"] for r in results if r["defense"]["name"] == defense.name]
        assert used
        for params in used:
            assert {k: v for k, v in params.items() if not k.endswith("_threshold")} == _today_but_thresholds(defense)


def test_the_calibration_files_hold_only_calibration_seeds(calibration):
    base = json.loads(RESULTS.read_text())["results"]
    assert {r["seed"] for r in base} == set(CALIBRATION_SEEDS)
    assert {r["dataset"] for r in base} == {"digits", "synthetic"}
    assert all(r["weights"]["origin"] == "zoo" for r in base)
    assert len(base) == 2 * len(CALIBRATION_SEEDS) * 2 * 5  # data sets x seeds x (backdoored, clean) x defenses
    spread = json.loads(SPREAD.read_text())["results"]
    assert {r["seed"] for r in spread} == set(CALIBRATION_SEEDS)
    assert {(r["quant"]["scheme"], r["defense"]["protocol"]) for r in spread} == {("fp32", "canonical")}
    # every spread model is backdoored under a calibration-spread setting, with its own seed, and carries it
    from qbd.config import AttackSpec
    from qbd.presets import CALIBRATION_SPREAD

    settings = {_setting(a) for a in CALIBRATION_SPREAD.values()}
    for r in spread:
        attack = AttackSpec(**r["attack"])
        assert attack.seed == r["seed"] and _setting(attack) in settings, r["cell"]
        assert r["truth"]["backdoor"] == "active" and r["asr"] >= 0.5, r["cell"]
    # BadNet 2 % does not take on digits (docs/defenses.md): three settings there, four on synthetic
    per_ds = {ds: {_setting(AttackSpec(**r["attack"])) for r in spread if r["dataset"] == ds} for ds in ("digits", "synthetic")}
    assert (len(per_ds["digits"]), len(per_ds["synthetic"])) == (3, 4)
    assert len(spread) == 7 * len(CALIBRATION_SEEDS) * 2  # settings x seeds x (AC, SS)


@pytest.mark.parametrize(("defense", "param", "pooled"), [
    (ActivationClustering, "silhouette_threshold", True),
    (SpectralSignatures, "kurtosis_threshold", True),
    # the pooled separation (digits' own level) names no synthetic target: no pooled rule, off elsewhere
    (SpectralSignatures, "separation_threshold", False)])
def test_thresholds_in_the_code_are_the_calibrated_midpoints(calibration, defense, param, pooled):
    """Per data set, each set's own calibration midpoint; "*" (other data sets) the pooled one."""
    results, _ = calibration
    supported = runpy.run_path(str(ROOT / "scripts" / "calibrate.py"))["per_dataset"](results)[defense.name][param]
    assert None not in (supported["digits"], supported["synthetic"]), f"{param}: no calibration target lies beyond the negatives"
    assert (supported["*"] is not None) is pooled
    assert defense("canonical").params[param] == supported


def test_the_rules_name_every_calibration_target_but_the_two_documented_misses(calibration):
    """No calibration negative is flagged (the midpoints lie beyond the most suspicious negative),
    and SS's two statistics together, AC's one, miss only the targets docs/defenses.md names."""
    from qbd.defenses._per_dataset import resolve

    results, _ = calibration
    ac = ActivationClustering("canonical").params
    ss = SpectralSignatures("canonical").params
    missed, false_alarms = [], []
    for r in results:
        e, ds = r["verdict"]["evidence"], r["dataset"]
        t = r["attack"]["target"] if r["attack"] else None
        if r["defense"]["name"] == "activation-clustering":
            thr = resolve(ac["silhouette_threshold"], ds)[0]
            flags = [s is not None and s > thr for s in e["silhouette"]]
        elif r["defense"]["name"] == "spectral-signatures":
            k, j = resolve(ss["kurtosis_threshold"], ds)[0], resolve(ss["separation_threshold"], ds)[0]
            flags = [(q is not None and q < k) or (sep is None or sep > j)
                     for q, sep in zip(e["kurtosis_top_direction"], e["separation_top_direction"], strict=True)]
        else:
            continue
        false_alarms += [(r["cell"], r["seed"], c) for c, f in enumerate(flags) if f and c != t]
        if t is not None and not flags[t]:
            missed.append((r["defense"]["name"], ds, r["attack"]["name"], r["attack"]["target"], r["seed"]))
    assert false_alarms == []
    assert sorted(missed) == [("activation-clustering", "digits", "badnet", 2, 101),  # white 4x4 bottom-left: 0.397
                              ("spectral-signatures", "digits", "blend", 5, 101)]  # kurtosis 1.408, separation 17.9


def test_a_defense_uses_its_data_sets_threshold_and_says_which():
    """The mapping reaches the verdict: digits' own midpoint for digits, the pooled one for a data
    set without a calibration of its own, recorded in the evidence either way."""
    from qbd.defenses._per_dataset import ANY, resolve

    thr = ActivationClustering("canonical").params["silhouette_threshold"]
    assert resolve(thr, "digits") == (thr["digits"], "digits")
    value, which = resolve(thr, "cifar10")
    assert value == thr[ANY] and "'cifar10' has no calibration of its own" in which
    assert resolve(0.5, "digits") == (0.5, "every data set (one number)")


def _setting(a):
    """An attack setting: everything but which samples are poisoned (the seed)."""
    from dataclasses import replace

    return replace(a, seed=0)


def _trigger(a):
    """A setting's trigger and strength, whatever its target: two settings that differ only in the
    target teach the model the same trigger."""
    from dataclasses import replace

    return replace(a, seed=0, target=0)


def test_the_calibration_attacks_are_not_evaluation_attacks():
    """Thresholds calibrated on an attack that a row then evaluates would be judged on themselves:
    the calibration spread shares no setting with the default BadNet, the blend row or the evaluation
    spread."""
    from qbd.config import AttackSpec
    from qbd.presets import BLEND_ATTACK, CALIBRATION_SPREAD, SPREAD_ATTACKS

    evaluation = {_trigger(a) for a in (AttackSpec(), BLEND_ATTACK, *SPREAD_ATTACKS.values())}
    calibration = {_trigger(a) for a in CALIBRATION_SPREAD.values()}
    assert len(calibration) == len(CALIBRATION_SPREAD)
    assert not calibration & evaluation
    # the blend first chosen (checkerboard, alpha 0.15, target 5) was the evaluation blend row's but
    # for its target: this test now refuses it
    assert _trigger(AttackSpec(name="blend", target=5, trigger_pattern="checkerboard", alpha=0.15)) in evaluation


def test_a_result_of_an_evaluation_seed_is_refused(tmp_path):
    with_results = runpy.run_path(str(ROOT / "scripts" / "calibrate.py"))["with_results"]
    r = json.loads(RESULTS.read_text())["results"][0]
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"results": [r]}))
    assert with_results([str(ok)]) == [r]
    for change, message in (({"seed": 3}, "not a calibration seed"),
                            ({"quant": {"scheme": "int8-static"}}, "fp32 canonical Results only"),
                            ({"defense": {**r["defense"], "protocol": "paper"}}, "fp32 canonical Results only")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"results": [{**r, **change}]}))
        with pytest.raises(SystemExit, match=message):
            with_results([str(bad)])
