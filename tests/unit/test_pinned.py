"""The pinned model zoo (qbd/zoo/weights): it covers every model the smoke tier evaluates, its files
match the manifest, a tampered file is refused, an empty store trains nothing, and training still
reproduces a pinned model's clean accuracy and ASR within stated tolerances (not bitwise: the zoo
exists because training differs between CPUs)."""

from __future__ import annotations

import json
import shutil

import pytest

from qbd import train
from qbd.config import AttackSpec
from qbd.errors import ConfigError
from qbd.presets import seeded_job
from qbd.store import CorruptEntryError, Store
from qbd.zoo import pinned

# Retraining a pinned model on another machine (or thread count) gives other weights; these are
# the tolerances within which it must still behave the same. Over the five evaluation seeds on one
# machine, digits clean accuracy spans 0.986-0.994 and ASR 0.981-0.997.
CA_TOLERANCE = 0.015
ASR_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def zoo() -> pinned.Zoo:
    z = pinned.default_zoo()
    assert z is not None, "qbd/zoo/weights is missing: run `qbd zoo build --dir qbd/zoo/weights -j 2`"
    return z


@pytest.fixture(scope="module")
def fingerprints() -> dict[str, str]:
    from qbd.config import DatasetSpec
    from qbd.data import load_dataset

    return {ds: load_dataset(DatasetSpec(ds), None).fingerprint() for ds in ("digits", "synthetic")}


def test_zoo_covers_every_model_the_smoke_tier_evaluates(zoo, fingerprints):
    jobs = pinned.zoo_jobs()
    # per data set: BadNet and clean for every seed, and blend and
    # quant-conditioned on int4-sim and on int8-static on the other attacks' seeds (int8-static's
    # models that pass its gate), and the attack settings beyond the calibration attack that take on
    # the data set on their seeds
    from qbd.presets import SPREAD_ATTACKS

    per_dataset = 2 * (len(pinned.EVAL_SEEDS) + len(pinned.CALIBRATION_SEEDS)) + 2 * len(pinned.OTHER_ATTACK_SEEDS)
    spread = sum(len(SPREAD_ATTACKS) - len(pinned.SPREAD_UNTAKEN.get(ds, ())) for ds in ("digits", "synthetic"))
    assert len(jobs) == 2 * per_dataset + sum(len(s) for s in pinned.QC_INT8_SEEDS.values()) + spread * len(pinned.SPREAD_SEEDS)
    assert all(len(s) >= 5 for s in pinned.QC_INT8_SEEDS.values())  # its rows need five models
    missing = [job.slug() + f" (attack seed {job.attack.seed if job.attack else '-'})" for job in jobs
               if zoo.find(job, fingerprints[job.dataset.name]) is None]
    assert not missing, f"not in the zoo (rebuild it: qbd zoo build): {missing}"
    assert len(zoo.models) == len(jobs)


def test_evaluation_and_calibration_seeds_are_disjoint():
    assert not set(pinned.EVAL_SEEDS) & set(pinned.CALIBRATION_SEEDS)


def test_every_zoo_file_matches_the_manifest(zoo):
    assert zoo.verify() == []
    for rec in zoo.models.values():  # the manifest says what a user needs to trust a model
        assert {"sha256", "job", "store_key", "clean_acc", "asr", "torch", "cpu", "data_sha256"} <= set(rec)
        assert rec["clean_acc"] >= 0.85
        # every pinned backdoored model passes its Phase-1 gate (a quant-conditioned model its own: dormant in FP32)
        qc = rec.get("quant_conditioned")
        if qc is not None:
            assert rec["job"]["attack"]["name"] == "quant-conditioned"
            assert train.quant_conditioned_problems(qc) == [], rec["file"]
        elif _spread(rec):  # the attack settings beyond the calibration attack: a working backdoor
            assert rec["asr"] >= pinned.SPREAD_MIN_ASR, rec["file"]
        else:
            assert rec["asr"] is None or rec["asr"] >= 0.95


def _spread(rec: dict) -> bool:
    from qbd.presets import SPREAD_ATTACKS

    attack = rec["job"]["attack"]
    return attack is not None and any(a.to_dict() == {**attack, "seed": 0} for a in SPREAD_ATTACKS.values())


def _copy_zoo(zoo: pinned.Zoo, dest, keep: str) -> pinned.Zoo:
    dest.mkdir()
    rec = zoo.models[keep]
    shutil.copy(zoo.root / rec["file"], dest / rec["file"])
    (dest / pinned.MANIFEST).write_text(json.dumps({"format": pinned.FORMAT, "models": {keep: rec}}))
    return pinned.Zoo(dest)


def test_a_tampered_zoo_file_is_refused(zoo, fingerprints, tmp_path):
    job = seeded_job("digits", "tiny-cnn", 0, AttackSpec())
    key = pinned.recipe_key(job, fingerprints["digits"])
    copy = _copy_zoo(zoo, tmp_path / "zoo", key)
    pin = copy.find(job, fingerprints["digits"])
    assert pin is not None and copy.load(pin)  # intact: loads
    raw = bytearray(pin.path.read_bytes())
    raw[-1] ^= 0x01
    pin.path.write_bytes(bytes(raw))
    with pytest.raises(CorruptEntryError, match="does not match the manifest"):
        copy.load(pin)
    assert any("sha256 does not match" in p for p in copy.verify())


def test_an_empty_store_loads_the_zoo_and_trains_nothing(zoo, monkeypatch, tmp_path):
    import qbd.train
    from qbd.config import DatasetSpec
    from qbd.data import load_dataset
    from qbd.trained import get_trained

    def no_training(*a, **k):
        raise AssertionError("trained a model the zoo pins")

    monkeypatch.setattr(qbd.train, "train", no_training)
    data = load_dataset(DatasetSpec("digits"), None)
    store = Store(tmp_path / "store")
    for job in (seeded_job("digits", "tiny-cnn", 3, AttackSpec()), seeded_job("digits", "tiny-cnn", 3, None)):
        tm = get_trained(job, data, store, progress=False)
        assert tm.cache == "zoo"
        prov = tm.provenance()
        assert prov["origin"] == "zoo" and len(prov["sha256"]) == 64 and prov["file"].endswith(".safetensors")
    assert store.keys() == []  # nothing written to the store either


def test_qbd_zoo_env(monkeypatch, tmp_path):
    monkeypatch.setenv(pinned.ZOO_ENV, "off")
    assert pinned.default_zoo() is None
    monkeypatch.setenv(pinned.ZOO_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="not a directory"):
        pinned.default_zoo()
    (tmp_path / "z").mkdir()
    monkeypatch.setenv(pinned.ZOO_ENV, str(tmp_path / "z"))
    assert pinned.default_zoo() is None  # a directory without a manifest: no zoo, models are trained


def test_a_bad_manifest_is_a_clear_error(tmp_path):
    (tmp_path / pinned.MANIFEST).write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        pinned.Zoo(tmp_path)
    (tmp_path / pinned.MANIFEST).write_text(json.dumps({"format": 99, "models": {}}))
    with pytest.raises(ConfigError, match="format-1"):
        pinned.Zoo(tmp_path)


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "sub/x.safetensors", "x.pt", ".hidden.safetensors", 3])
def test_a_manifest_cannot_point_outside_the_zoo(tmp_path, name):
    rec = {"file": name, "sha256": "0" * 64, "clean_acc": 0.9, "asr": None}
    (tmp_path / pinned.MANIFEST).write_text(json.dumps({"format": pinned.FORMAT, "models": {"k" * 64: rec}}))
    with pytest.raises(ConfigError, match="bare"):
        pinned.Zoo(tmp_path)


def test_build_retrains_a_pinned_model_within_tolerance(zoo, fingerprints, tmp_path):
    """`qbd zoo build`'s code path, on one model: it trains (never reads the zoo), writes a file
    and a manifest that verify, under the same recipe key; the retrained model's clean accuracy
    and ASR are within the stated tolerances of the pinned one's."""
    job = seeded_job("digits", "tiny-cnn", 0, AttackSpec())
    lines: list[str] = []
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "mine.safetensors").write_bytes(b"a user's file the manifest never listed")
    from qbd.zoo.build import build

    built = build(tmp_path / "zoo", cache_dir=str(tmp_path / "store"), workers=1, jobs=[job], log=lines.append)
    assert len(built.models) == 1 and lines
    assert built.verify() == ["mine.safetensors: not in the manifest"]  # left alone, and reported
    assert not list(tmp_path.glob(".zoo.build-*"))  # the build directory is gone
    key = pinned.recipe_key(job, fingerprints["digits"])
    new, old = built.models[key], zoo.models[key]
    assert new["file"] == old["file"] and new["job"] == old["job"]
    assert abs(new["clean_acc"] - old["clean_acc"]) <= CA_TOLERANCE, (new["clean_acc"], old["clean_acc"])
    assert abs(new["asr"] - old["asr"]) <= ASR_TOLERANCE, (new["asr"], old["asr"])


def test_the_int8_conditioned_rows_are_measured_on_the_pinned_models_that_pass_their_gate():
    """The seeds of quant-conditioned-on-int8-static's rows are named by hand in three places: the
    zoo (QC_INT8_SEEDS, whose models the manifest test above gates), the shipped table's rows, and
    the weekly workflow's commands. They must agree."""
    from pathlib import Path

    from qbd.expectations import load_for

    table = load_for("smoke")
    (section,) = [s for s in table.attacks.values() if s["attack"]["name"] == "quant-conditioned"
                  and s["attack"].get("scheme") == "int8-static"]
    assert section["rows"], "no measured rows for quant-conditioned on int8-static"
    for rid, entry in section["rows"].items():
        assert entry["seeds"] == sorted(pinned.QC_INT8_SEEDS[rid.split("/", 1)[0]]), rid
    workflow = (Path(__file__).resolve().parents[2] / ".github" / "workflows" / "rows.yml").read_text()
    for ds, seeds in pinned.QC_INT8_SEEDS.items():
        assert (f"--dataset {ds} --attack quant-conditioned --qc-scheme int8-static --quant fp32,int8-static"
                f" --seeds {','.join(map(str, seeds))}") in workflow, ds


def test_the_spread_rows_are_measured_on_the_pinned_models_of_every_setting_that_takes():
    """The attack settings beyond the calibration attack: each setting that takes on a data set has
    a declared row per canonical defense over SPREAD_SEEDS, none where it does not take (no models
    are pinned there), and the weekly workflow judges them."""
    from pathlib import Path

    from qbd.defenses import DEFENSES
    from qbd.expectations import load_for
    from qbd.presets import SPREAD_ATTACKS

    table = load_for("smoke")
    for name in SPREAD_ATTACKS:
        rows = table.attacks[f"spread-{name}"]["rows"]
        for ds in ("digits", "synthetic"):
            want = set() if name in pinned.SPREAD_UNTAKEN.get(ds, ()) else {f"{ds}/fp32/{d}[canonical]" for d in DEFENSES}
            assert {rid for rid in rows if rid.startswith(f"{ds}/")} == want, (name, ds)
        for rid, entry in rows.items():
            assert entry["seeds"] == list(pinned.SPREAD_SEEDS), (name, rid)
    workflow = (Path(__file__).resolve().parents[2] / ".github" / "workflows" / "rows.yml").read_text()
    assert "scripts/attack_spread.py --out reports/spread --expectations" in workflow


def test_the_old_get_trained_import_says_where_it_moved():
    """qbd/zoo.py (a job's model) became qbd/trained.py when qbd.zoo became the zoo's package."""
    with pytest.raises(ImportError, match=r"moved to qbd\.trained\.get_trained"):
        from qbd.zoo import get_trained  # noqa: F401
