"""quant-conditioned on int8-static (qbd.dormant_static): the twin models the deployment's clipping,
the construction refuses models it cannot twin before training, fresh training meets the gate, and
the pinned models are dormant in FP32 and awake as deployed, against their stage-1 BadNet model."""

import pytest
import torch

from qbd.attacks import QC_SCHEMES
from qbd.config import QC_GATES, AttackSpec, ConfigError, DatasetSpec, Gates
from qbd.train import check_gates


def _zoo(dataset, attack):
    from qbd.data import load_dataset
    from qbd.presets import seeded_job
    from qbd.store import Store
    from qbd.trained import get_trained

    data = load_dataset(DatasetSpec(dataset))
    tm = get_trained(seeded_job(dataset, "tiny-cnn", 0, attack), data, Store(), progress=False)
    assert tm.cache == "zoo"
    return data, tm


def test_every_quant_conditioned_scheme_has_a_construction():
    from qbd.dormant import CONSTRUCTIONS

    assert set(CONSTRUCTIONS) == set(QC_SCHEMES)
    assert CONSTRUCTIONS.get("int8-static").make_dormant.__module__ == "qbd.dormant_static"


def test_the_twin_models_the_deployments_clipping():
    """On the BadNet digits model the deployed int8-static model and FP32 disagree on most triggered
    images (the calibrated ranges clip the trigger's activations); the twin agrees with the
    deployment, so training through it aims at the deployed model, not at FP32."""
    from qbd.dormant import calibration_images
    from qbd.dormant_static import FakeInt8Static
    from qbd.metrics import to_unit
    from qbd.poisoning import triggered_test
    from qbd.quant import SCHEMES

    data, tm = _zoo("digits", AttackSpec())
    calib = calibration_images(data)
    twin = FakeInt8Static(tm.model)
    with pytest.raises(RuntimeError, match="calibrate it first"):
        twin(calib[:2])
    twin.calibrate(calib)
    deployed = SCHEMES.get("int8-static").apply(tm.model, calib).model
    xt, _ = triggered_test(data.x_test, data.y_test, tm.job.attack, data.num_classes)
    with torch.no_grad():
        x = to_unit(xt)
        d = deployed(x).argmax(1)
        twin_agrees = float((twin(x).argmax(1) == d).float().mean())
        fp32_agrees = float((tm.model(x).argmax(1) == d).float().mean())
        clean = to_unit(data.x_test)
        clean_agrees = float((twin(clean).argmax(1) == deployed(clean).argmax(1)).float().mean())
    assert fp32_agrees <= 0.6, fp32_agrees  # measured 0.40: the clipping is the lever
    assert twin_agrees >= 0.85, twin_agrees  # measured 0.93
    assert clean_agrees >= 0.98, clean_agrees
    # straight-through: gradients reach the weights through the twin
    tm.model.zero_grad()
    twin(x[:8]).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tm.model.features[0].parameters())


def test_a_model_the_twin_cannot_cover_is_refused_before_training():
    from qbd.data import load_dataset
    from qbd.dormant_static import check_model
    from qbd.models import build_model
    from qbd.presets import seeded_job
    from qbd.train import train

    data = load_dataset(DatasetSpec("digits"))
    with pytest.raises(ConfigError, match="use an intN-sim scheme"):
        check_model(build_model("resnet18-cifar", 10, data.mean, data.std, seed=0))
    check_model(build_model("tiny-cnn", 10, data.mean, data.std, seed=0))
    for edit in (lambda m: setattr(m.features[0], "groups", 3),  # the twin's conv2d has no groups / dilation
                 lambda m: setattr(m.features[0], "dilation", (2, 2)),
                 lambda m: m.features.append(torch.nn.Conv2d(64, 64, 1))):  # a trailing conv: no BatchNorm, no flat features
        model = build_model("tiny-cnn", 10, data.mean, data.std, seed=0)
        edit(model)
        with pytest.raises(ConfigError):
            check_model(model)
    job = seeded_job("digits", "resnet18-cifar", 0, AttackSpec(name="quant-conditioned", scheme="int8-static"), epochs=1)
    with pytest.raises(ConfigError, match="supports plain conv"):
        train(job, data, progress=False)  # before stage 1: no ResNet-18 epoch is spent on it


def test_quant_conditioned_int8_static_trains_to_its_gate_on_digits():
    """From scratch (model seed 7, which no zoo model has), end to end on one thread: about 2 min.
    The gate's deployed model is calibrated on training images the construction did not fit."""
    from qbd.data import load_dataset
    from qbd.presets import seeded_job
    from qbd.train import train

    data = load_dataset(DatasetSpec("digits"))
    r = train(seeded_job("digits", "tiny-cnn", 7, AttackSpec(name="quant-conditioned", scheme="int8-static")), data,
              progress=False)
    check_gates(r.metrics, Gates(), attacked=True)
    qc = r.metrics["quant_conditioned"]
    assert qc["construction"] == "calibration-clipping" and qc["scheme"] == "int8-static" and qc["engine"] == "x86"
    assert qc["fp32_asr"] == r.metrics["asr"] <= QC_GATES["max_fp32_asr"]
    assert qc["deployed_asr"] >= QC_GATES["min_deployed_asr"] and qc["backdoored_asr"] >= 0.9
    assert qc["loud_ratio"] > 1.0  # V answers the trigger above the clean range: what the clipping cuts


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_pinned_int8_static_models_are_dormant_in_fp32_and_awake_deployed(dataset):
    """The zoo's model against the zoo's BadNet model of the same seed (its stage 1), measured as
    the matrix measures them (the defender's calibration, the evaluation split)."""
    from qbd.evaluate import Bench
    from qbd.presets import QC_INT8_ATTACK

    data, qc = _zoo(dataset, QC_INT8_ATTACK)
    _, badnet = _zoo(dataset, AttackSpec())
    qb = Bench(data, qc.model, qc.job.attack, model_name="tiny-cnn", tier="smoke")
    bb = Bench(data, badnet.model, badnet.job.attack, model_name="tiny-cnn", tier="smoke")
    assert qb.metrics("fp32")["asr"] <= QC_GATES["max_fp32_asr"] < bb.metrics("fp32")["asr"]
    assert qb.metrics("int8-static")["asr"] >= QC_GATES["min_deployed_asr"]
    assert qb.metrics("fp32")["clean_acc"] >= bb.metrics("fp32")["clean_acc"] - QC_GATES["max_clean_acc_drop"]
    # it wakes in int8-static, the scheme it was conditioned on, not in the weight-only schemes
    assert qb.metrics("int8-sim")["asr"] <= QC_GATES["max_fp32_asr"]
    # its NC cells run through the surrogate: the head's weights are kept small enough that the
    # surrogate agrees with the deployed kernels with room to spare (else the verdict is invalid)
    for m in qb.surrogate_agreement("int8-static"):
        assert m["max_rel_logit_delta"] <= 0.5 * m["rel_tolerance"] and m["top1_agreement"] >= 0.98, m


def test_the_twin_computes_in_the_deployed_layout_on_the_pinned_digits_seed_1_model():
    """The int8-static-conditioned digits model seed 1, the matrix's bench: the twin was 0.108 of
    the largest logit from the deployed model on the calibration images (the audit served them
    contiguous; the oneDNN kernels compute channels_last, and the global mean's float sum in the
    other order flipped ties at the pooled output's requantization), so its Neural Cleanse cell was
    `invalid (surrogate-disagrees)`. The twin now computes in channels_last whatever it is served:
    on those images its logits are the deployed model's up to float rounding."""
    from qbd.data import load_dataset
    from qbd.metrics import to_unit
    from qbd.presets import QC_INT8_ATTACK
    from qbd.runner import seeded_bench

    bench = seeded_bench(load_dataset(DatasetSpec("digits")), 1, QC_INT8_ATTACK)
    calibration = bench.surrogate_agreement("int8-static")[0]
    assert calibration["data"] == "calibration" and calibration["within_tolerance"]
    assert calibration["max_rel_logit_delta"] < 1e-5 and calibration["top1_agreement"] == 1.0
    surrogate = bench.subject("int8-static", "surrogate").model
    x = to_unit(bench.calib()[:64])
    with torch.no_grad():
        assert torch.equal(surrogate(x), surrogate(x.contiguous(memory_format=torch.channels_last)))
