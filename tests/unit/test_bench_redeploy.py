"""Bench.subject hands repair methods the float model and a way to re-deploy an edited copy of it
through the cell's own scheme and calibration (Fine-Pruning's fine-tune-then-re-deploy)."""

import copy

import torch

from qbd.evaluate import Bench
from qbd.models import build_model
from tests.toy import toy_split


def _bench():
    data = toy_split()
    model = build_model("tiny-cnn", 4, data.mean, data.std, seed=0).eval()
    return Bench(data, model, None)


def test_subject_carries_the_float_model_and_redeploys_onto_the_schemes_grid():
    bench = _bench()
    subject = bench.subject("int4-sim", "deployed")
    assert subject.float_model is bench.model
    edited = copy.deepcopy(bench.model)
    with torch.no_grad():
        for prm in edited.parameters():
            prm.add_(0.01 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(1)))
    repaired = subject.redeploy(edited)
    assert repaired.scheme == "int4-sim" and repaired.gradient_path == "deployed"
    for layer in repaired.model.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            rows = layer.weight.detach().flatten(1)
            assert max(len(torch.unique(r)) for r in rows) <= 16  # int4: 16 levels per output channel
    # the unedited float model re-deploys to the cell's own deployed model
    x = bench.holdout[0][:8].float() / 255
    same = subject.redeploy(bench.model)
    assert torch.allclose(same.model(x), bench.quantized("int4-sim").model(x))
    assert not torch.allclose(repaired.model(x), same.model(x))


class _Editor:
    """Edits what it is given in place: the deployed model, or the float model a repair starts from."""

    requires = frozenset({"clean_holdout"})
    protocol = "canonical"

    def __init__(self, which):
        self.name, self.which, self.params = f"edits-{which}", which, {}

    def detect(self, subject, inputs, generator):
        from qbd.defenses.base import Verdict

        target = subject.model if self.which == "deployed" else subject.float_model
        with torch.no_grad():
            for prm in target.parameters():
                prm.zero_()
        return Verdict("detected", score=9.0, threshold=1.0, target_class=0)


class _Reader:
    """Reports the logits it sees, to show what the next cell inspects."""

    name, requires, params, protocol = "reads", frozenset({"clean_holdout"}), {}, "canonical"

    def detect(self, subject, inputs, generator):
        from qbd.defenses.base import Verdict

        x = inputs.clean_holdout[0][:8].float() / 255
        with torch.no_grad():
            return Verdict("clean", score=float(subject(x).abs().sum()), threshold=0.0)


def test_a_defense_that_edits_its_model_is_invalid_and_the_next_cell_sees_the_model_as_deployed():
    for which, scheme in (("deployed", "int4-sim"), ("float", "int8-dynamic")):
        bench = _bench()
        before = bench.run(_Reader(), scheme)["verdict"]["score"]
        edited = bench.run(_Editor(which), scheme)
        assert (edited["verdict"]["status"], edited["verdict"]["reason_code"]) == ("invalid", "error")
        assert "changed the weights of the model it was given" in edited["verdict"]["reason"]
        assert edited["verdict"]["evidence"]["defense_verdict"]["status"] == "detected"  # what it said, kept as evidence
        assert bench.run(_Reader(), scheme)["verdict"]["score"] == before  # the next cell: the model as deployed
        assert bench.run(_Reader(), "fp32")["verdict"]["score"] > 0  # and the float model restored


class _GradientProbe:
    """Backpropagates to the pixels without declaring 'input_gradients': on int8-dynamic it gets the
    deployed model, whose int8 linear has no autograd kernel."""

    name, requires, params, protocol = "gradient-probe", frozenset({"clean_holdout"}), {}, "canonical"

    def detect(self, subject, inputs, generator):
        from qbd.defenses.base import Verdict

        x = (inputs.clean_holdout[0][:8].float() / 255).requires_grad_()
        (grad,) = torch.autograd.grad(subject(x).sum(), x, allow_unused=True)
        return Verdict("clean", score=0.0 if grad is None else float(grad.abs().sum()), threshold=1.0)


def test_a_gradient_that_never_arrived_is_invalid_not_a_silent_miss():
    bench = _bench()
    r = bench.run(_GradientProbe(), "int8-dynamic")
    assert (r["verdict"]["status"], r["verdict"]["reason_code"]) == ("invalid", "no-gradient"), r["verdict"]
    assert "declare 'input_gradients'" in r["verdict"]["reason"]
    timed = bench.run(_GradientProbe(), "int8-dynamic", timeout_s=60)  # detect in a child process: the same
    assert (timed["verdict"]["status"], timed["verdict"]["reason_code"]) == ("invalid", "no-gradient"), timed["verdict"]
    assert bench.run(_GradientProbe(), "fp32")["verdict"]["status"] == "clean"  # gradients flow there: its answer stands
