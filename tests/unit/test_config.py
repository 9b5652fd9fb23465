import dataclasses
import json

import pytest

from qbd.config import (
    AttackSpec,
    ConfigError,
    DatasetSpec,
    ModelJob,
    ModelSpec,
    TrainSpec,
    canonical_json,
    parse_position,
)
from qbd.result_types import cell_id


def _variants(spec):
    """One changed copy of `spec` per field."""
    bumps = {
        int: lambda v: v + 1,
        float: lambda v: v / 2 if v else 0.5,
        str: None,
    }
    alternatives = {
        "name": {"synthetic": "digits", "tiny-cnn": "resnet18-cifar"},
        "trigger_pattern": {"white": "checkerboard", "checkerboard": "random"},
        "trigger_position": {"bottom-right": "top-left"},
        "schedule": {"cosine": "constant"},
        "augment": {"crop": "none"},
        "precision": {"fp32": "bf16"},
    }
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        if v is None or (f.name == "name" and isinstance(spec, AttackSpec)):
            continue  # another attack, or a field another attack owns: test_attack_fields_reach_the_key
        new = alternatives[f.name][v] if isinstance(v, str) else bumps[type(v)](v)
        yield f.name, dataclasses.replace(spec, **{f.name: new})


def test_key_is_stable_and_canonical():
    job = ModelJob()
    assert job.key() == ModelJob().key()
    assert len(job.key()) == 64
    # the key hashes canonical JSON: key order and spacing cannot change it
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert json.loads(canonical_json(job.to_dict())) == job.to_dict()


@pytest.mark.parametrize("part", ["dataset", "model", "attack", "train"])
def test_key_changes_when_any_field_changes(part):
    job = ModelJob()
    base = job.key()
    seen = {base}
    for field, spec in _variants(getattr(job, part)):
        k = dataclasses.replace(job, **{part: spec}).key()
        assert k not in seen, f"changing {part}.{field} did not change the key"
        seen.add(k)


def test_clean_job_has_its_own_key():
    assert ModelJob(attack=None).key() != ModelJob().key()
    assert ModelJob(attack=None).slug().endswith("/clean/s0")


def test_key_depends_on_qbd_version(monkeypatch):
    import qbd.config

    base = ModelJob().key()
    monkeypatch.setattr(qbd.config, "__version__", "999.0")
    assert ModelJob().key() != base


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"poison_rate": 0.0}, r"poison rate must be in \(0, 1\]"),
        ({"poison_rate": 1.5}, r"poison rate must be in \(0, 1\]"),
        ({"poison_rate": float("nan")}, "poison rate"),
        ({"trigger_size": 0}, "trigger size must be >= 1"),
        ({"target": -1}, "target class must be >= 0"),
        ({"trigger_pattern": "plaid"}, "valid: white, checkerboard, random"),
        ({"trigger_position": "middle"}, "use one of top-left"),
        ({"name": "wanet"}, "valid: badnet"),
    ],
)
def test_attack_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AttackSpec(**kwargs)


def test_attack_fits_the_data_set():
    with pytest.raises(ConfigError, match="out of range: the data set has 10 classes"):
        AttackSpec(target=10).check_fits(32, 32, 10)
    with pytest.raises(ConfigError, match="larger than the 32x32 image"):
        AttackSpec(trigger_size=33).check_fits(32, 32, 10)
    with pytest.raises(ConfigError, match="leaves the 32x32 image"):
        AttackSpec(trigger_position="30,0", trigger_size=3).check_fits(32, 32, 10)
    AttackSpec(trigger_position="29,29", trigger_size=3).check_fits(32, 32, 10)


def test_parse_position():
    assert parse_position("top-left") == ("top-left", None, None)
    assert parse_position(" 4 , 7 ") == ("xy", 4, 7)


@pytest.mark.parametrize(
    "kwargs",
    [{"epochs": 0}, {"lr": -1.0}, {"lr": float("inf")}, {"schedule": "step"}, {"augment": "mixup"}, {"precision": "fp16"}, {"batch_size": 1.5}],
)
def test_train_spec_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        TrainSpec(**kwargs)


def test_dataset_and_model_specs():
    with pytest.raises(ConfigError):
        DatasetSpec(seed=-1)
    assert ModelSpec().name == "tiny-cnn"


def test_cell_id():
    assert cell_id("synthetic", "int8-dynamic", "neural-cleanse", "canonical") == "synthetic/int8-dynamic/neural-cleanse[canonical]"


def test_key_depends_on_the_data_fingerprint():
    job = ModelJob()
    assert job.key("a" * 64) != job.key("b" * 64) != job.key()


# the key of the default BadNet job, as every store entry and the pinned zoo's recipe keys were
# written before blend and quant-conditioned existed: adding attacks must not orphan them
def test_badnet_dict_is_unchanged_by_the_other_attacks():
    assert AttackSpec().to_dict() == {"name": "badnet", "target": 0, "trigger_pattern": "white", "trigger_size": 3,
                                      "trigger_position": "bottom-right", "poison_rate": 0.1, "seed": 0}


def test_attack_fields_reach_the_key():
    blend = ModelJob(attack=AttackSpec(name="blend", trigger_pattern="checkerboard"))
    qc = ModelJob(attack=AttackSpec(name="quant-conditioned"))
    keys = {ModelJob().key(), blend.key(), qc.key(),
            dataclasses.replace(blend, attack=dataclasses.replace(blend.attack, alpha=0.1)).key(),
            dataclasses.replace(qc, attack=dataclasses.replace(qc.attack, scheme="int8-sim")).key()}
    assert len(keys) == 5
    assert blend.attack.alpha == 0.15 and qc.attack.scheme == "int4-sim"  # the defaults are filled in, so they are keyed
    assert "blend" in blend.slug() and "qc-int4-sim" in qc.slug()


@pytest.mark.parametrize(("kw", "message"), [
    ({"name": "wanet"}, r"unknown attack 'wanet' \(did you mean 'badnet'\?\); valid: badnet, blend, quant-conditioned"),
    ({"name": "blend", "trigger_pattern": "white"}, "blend takes trigger pattern random or checkerboard"),
    ({"name": "blend", "trigger_pattern": "random", "alpha": 1.0}, "blend alpha must be a number in"),
    ({"name": "blend", "trigger_pattern": "random", "alpha": 0}, "blend alpha must be a number in"),
    ({"alpha": 0.1}, r"alpha \(--blend-alpha\) applies to the blend attack only"),
    ({"scheme": "int4-sim"}, r"scheme \(--qc-scheme\) applies to the quant-conditioned attack only"),
    ({"name": "quant-conditioned", "scheme": "int8-dynamic"}, "quant-conditioned scheme 'int8-dynamic' not supported"),
    ({"name": "quant-conditioned", "scheme": "onnx-int8-static"}, "not supported; valid: int4-sim, .*, int8-static"),
    ({"name": "blend", "trigger_pattern": "random", "trigger_size": 5}, "--trigger-size and --trigger-position do not apply"),
    ({"name": "blend", "trigger_pattern": "random", "trigger_position": "top-left"}, "do not apply"),
])
def test_attack_fields_are_checked(kw, message):
    with pytest.raises(ConfigError, match=message):
        AttackSpec(**kw)


def test_blend_fits_any_image():
    AttackSpec(name="blend", trigger_pattern="random").check_fits(2, 2, 10)  # its default size 3 is not a patch
    with pytest.raises(ConfigError, match="target class 10"):
        AttackSpec(name="blend", trigger_pattern="random", target=10).check_fits(8, 8, 10)
