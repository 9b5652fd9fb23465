import hashlib

import pytest
import torch

from qbd.config import AttackSpec, DatasetSpec, Gates, ModelJob, ModelSpec, TrainSpec
from qbd.train import GateError, augment, check_gates, train
from tests.toy import toy_split


def _sha(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


_ATTACK = AttackSpec()


def _job(seed=0, attack=_ATTACK, epochs=2):
    return ModelJob(DatasetSpec("toy"), ModelSpec("tiny-cnn"), attack, TrainSpec(epochs=epochs, lr=0.05, batch_size=64, seed=seed))


def test_same_seed_same_weights_different_seed_different_weights():
    data = toy_split()
    a = train(_job(), data, progress=False)
    b = train(_job(), data, progress=False)
    c = train(_job(seed=1), data, progress=False)
    assert _sha(a.model) == _sha(b.model)
    assert _sha(a.model) != _sha(c.model)
    assert a.metrics == {**b.metrics, **{k: a.metrics[k] for k in ("seconds", "train_seconds", "images_per_s")}}


def test_training_learns_and_records_metrics():
    r = train(_job(epochs=3), toy_split(), progress=False)
    m = r.metrics
    assert m["clean_acc"] > 0.9
    assert 0.0 <= m["asr"] <= 1.0
    assert m["poisoned"] == 60 and m["train_size"] == 600 and m["device"] == "cpu"
    assert not r.model.training


def test_clean_job_has_no_asr_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    r = train(_job(attack=None, epochs=1), toy_split(), progress=False)
    assert r.metrics["asr"] is None and r.metrics["poisoned"] == 0
    assert torch.equal(torch.rand(1), before), "training must not consume the global RNG"


def test_augment_shifts_within_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 10, 10)
    out = augment(x, "crop", g, pad=2)
    assert out.shape == x.shape
    assert torch.equal(augment(x, "none", g), x)
    # each output is the input shifted by at most 2 pixels: the centre 6x6 block reappears
    for i in range(8):
        found = any(
            torch.equal(out[i, :, 2 + dy : 8 + dy, 2 + dx : 8 + dx], x[i, :, 2:8, 2:8])
            for dy in range(-2, 3) for dx in range(-2, 3)
        )
        assert found
    flipped = augment(x, "crop-flip", torch.Generator().manual_seed(1), pad=0)
    assert all(torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2)) for i in range(8))


def test_gates():
    check_gates({"clean_acc": 0.9, "asr": 0.99}, Gates(), attacked=True)
    check_gates({"clean_acc": 0.9, "asr": None}, Gates(), attacked=False)
    with pytest.raises(GateError, match=r"clean accuracy 0.8000 < 0.85"):
        check_gates({"clean_acc": 0.8, "asr": 0.99}, Gates(), attacked=True)
    with pytest.raises(GateError, match=r"attack success rate 0.5000 < 0.95"):
        check_gates({"clean_acc": 0.9, "asr": 0.5}, Gates(), attacked=True)


def test_bf16_refused_on_cpu():
    job = ModelJob(DatasetSpec("toy"), ModelSpec("tiny-cnn"), None, TrainSpec(epochs=1, precision="bf16"))
    with pytest.raises(ValueError, match="bf16"):
        train(job, toy_split(), device="cpu", progress=False)


def test_weights_do_not_depend_on_the_callers_thread_count():
    data = toy_split()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = train(_job(epochs=1), data, progress=False)
        assert torch.get_num_threads() == 2, "training must restore the thread count"
        torch.set_num_threads(1)
        b = train(_job(epochs=1), data, progress=False)
    finally:
        torch.set_num_threads(before)
    assert _sha(a.model) == _sha(b.model)
    assert a.metrics["cpu_threads"] == 1


def test_bad_thread_setting_is_a_config_error(monkeypatch):
    from qbd.errors import ConfigError

    monkeypatch.setenv("QBD_TRAIN_THREADS", "zero")
    with pytest.raises(ConfigError, match="QBD_TRAIN_THREADS"):
        train(_job(epochs=1), toy_split(), progress=False)


def test_training_progress_is_one_line_in_a_redirected_log(capsys):
    from qbd.train import _progress

    assert _progress(120, "train digits-x", enabled=True) is None  # stderr is captured: not a terminal
    assert _progress(120, "train digits-x", enabled=False) is None
    err = capsys.readouterr().err
    assert err == "qbd: train digits-x: 120 steps ...\n"
