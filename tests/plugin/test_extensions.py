"""A third party adds a quantization scheme, a defense and an attack to qbd: one file and one entry
point each, nothing of qbd edited. Both front-ends, `qbd run` / `qbd train` and the pytest plugin,
then run them like the built-ins (catalogs: qbd.quant.get_scheme, qbd.defenses.available,
qbd.attacks.get_attack)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TOY_SCHEME = '''
"""Symmetric 6-bit weights with one scale per tensor (not per channel, as qbd's intN-sim)."""
import torch

from qbd.quant.scheme import SchemeBase, quantize_weights


def _round(w):
    scale = w.detach().abs().max().double() / 31
    if scale == 0:
        return w.clone(), scale
    return (torch.clamp(torch.round(w.double() / scale), -32, 31) * scale).to(w.dtype), scale


class Int6PerTensor(SchemeBase):
    name = "toy-int6-tensor"

    def quantize(self, model, calib, engine):
        return quantize_weights(model, _round, backend="toy: int6 per-tensor weights", bits=6)
'''

TOY_DEFENSE = '''
"""Flag the model when a white square in a corner sends most clean images to one class."""
import torch

from qbd.defenses.base import Verdict


class CornerSquare:
    name = "toy-corner"
    requires = frozenset({"clean_holdout"})

    def __init__(self, protocol="canonical"):
        self.protocol = protocol
        self.params = {"capture": 0.8, "size": 3}

    def detect(self, subject, inputs, generator):
        x = inputs.clean_holdout[0][:200].float() / 255.0
        s, best = self.params["size"], (0.0, None)
        with torch.no_grad():
            for r, c in ((0, 0), (0, -s), (-s, 0), (-s, -s)):
                xp = x.clone()
                xp[:, :, r:r + s or None, c:c + s or None] = 1.0
                counts = torch.bincount(subject.model(xp).argmax(1), minlength=subject.num_classes)
                best = max(best, (float(counts.max()) / len(x), int(counts.argmax())), key=lambda b: b[0])
        share, cls = best
        if share >= self.params["capture"]:
            return Verdict("detected", score=share, threshold=self.params["capture"], target_class=cls)
        return Verdict("clean", score=share, threshold=self.params["capture"])


class QuantAlarm(CornerSquare):
    """CornerSquare in fp32; on any quantized deployment it flags class 0, backdoored or not."""

    name = "toy-quant-alarm"

    def detect(self, subject, inputs, generator):
        if subject.scheme != "fp32":
            return Verdict("detected", score=1.0, threshold=self.params["capture"], target_class=0)
        return super().detect(subject, inputs, generator)
'''

TOY_ATTACK = '''
"""A white bar over the two leftmost columns: a trigger qbd does not ship, written by the attack itself."""
from qbd.attacks import Attack


class LeftBar(Attack):
    name = "toy-bar"
    trigger = None  # this class writes it
    patterns = ("white",)

    def label(self, spec):
        return f"toy-bar-t{spec.target}-p{spec.poison_rate:g}"

    def write(self, x, spec):
        out = x.clone()
        out[:, :, :, :2] = 1.0 if x.is_floating_point() else 255
        return out
'''


@pytest.fixture
def toy_site(tmp_path: Path) -> dict[str, str]:
    """An installed distribution: the two files and a dist-info naming one entry point for each.
    Returns the environment a subprocess needs to see it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "toy_scheme.py").write_text(TOY_SCHEME)
    (site / "toy_defense.py").write_text(TOY_DEFENSE)
    (site / "toy_attack.py").write_text(TOY_ATTACK)
    dist = site / "qbd_toys-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qbd-toys\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[qbd.schemes]\ntoy-int6-tensor = toy_scheme:Int6PerTensor\n\n"
                                           "[qbd.defenses]\ntoy-corner = toy_defense:CornerSquare\n"
                                           "toy-quant-alarm = toy_defense:QuantAlarm\n\n"
                                           "[qbd.attacks]\ntoy-bar = toy_attack:LeftBar\n")
    return {**os.environ, "PYTHONPATH": str(site), "QBD_CACHE_DIR": str(tmp_path / "store")}


def _qbd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qbd", *args], capture_output=True, text=True, env=env, timeout=900,
                          cwd=env["PYTHONPATH"])


def test_listed(toy_site: dict[str, str]) -> None:
    listed = json.loads(_qbd(toy_site, "list", "--json").stdout)
    assert "toy-int6-tensor" in listed["schemes"] and listed["scheme_origins"] == {"toy-int6-tensor": "entry point of qbd-toys"}
    assert {"name": "toy-corner", "ref": "toy_defense:CornerSquare", "origin": "entry point of qbd-toys"} in listed["defenses"]
    assert "toy-bar" in listed["attacks"] and listed["attack_origins"] == {"toy-bar": "entry point of qbd-toys"}


def test_a_toy_attack_trains_and_runs_through_both_front_ends(toy_site: dict[str, str], tmp_path: Path) -> None:
    """`qbd train --attack toy-bar` plants the toy's own trigger (the gate measures its ASR), and
    `--qbd-attack toy-bar` builds the plugin's matrix on that model: the same store entry, and the
    deployed model's ASR test passes on it."""
    r = _qbd(toy_site, "train", "--dataset", "digits", "--attack", "toy-bar", "--json", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    trained = json.loads(r.stdout)
    assert "toy-bar-t0-p0.1" in trained["slug"] and trained["metrics"]["asr"] >= 0.9, trained
    (tmp_path / "test_qbd.py").write_text("from qbd.suite import test_attack, test_audit, test_cell  # noqa: F401\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "--qbd-attack", "toy-bar",
                        "--qbd-dataset", "digits", "--qbd-scheme", "fp32", "-o", "addopts=", "-k", "test_attack", "test_qbd.py"],
                       capture_output=True, text=True, env=toy_site, timeout=900, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "PASSED test_qbd.py::test_attack[digits/fp32]" in out, out[-3000:]
    stored = json.loads(_qbd(toy_site, "store", "list", "--json").stdout)
    assert [e for e in stored if "toy-bar" in json.dumps(e)] and len(stored) == 1, stored  # qbd train's model, not a second


def test_an_unknown_attack_is_a_usage_error_in_both_front_ends(toy_site: dict[str, str], tmp_path: Path) -> None:
    r = _qbd(toy_site, "train", "--dataset", "digits", "--attack", "toy-barr")
    assert r.returncode == 2 and "unknown attack 'toy-barr' (did you mean 'toy-bar'?)" in r.stderr, r.stderr[-2000:]
    (tmp_path / "test_qbd.py").write_text("from qbd.suite import test_cell  # noqa: F401\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--qbd-attack", "toy-barr", "--collect-only",
                        "-o", "addopts=", "test_qbd.py"], capture_output=True, text=True, env=toy_site, timeout=300, cwd=tmp_path)
    assert p.returncode == 4 and "unknown attack 'toy-barr' (did you mean 'toy-bar'?)" in p.stderr, p.stderr[-2000:]


def test_qbd_run_runs_them(toy_site: dict[str, str]) -> None:
    """The toy defense on the toy scheme and on fp32, the backdoored model and its clean control
    (the zoo's digits models): it names the planted target and stays quiet on the clean model."""
    r = _qbd(toy_site, "run", "--dataset", "digits", "--quant", "fp32,toy-int6-tensor", "--defense", "toy-corner",
             "--protocol", "canonical", "--json", "--no-progress", "-j", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    results = {res["cell"]: res for res in json.loads(r.stdout)["results"]}
    assert set(results) == {f"digits{c}/{s}/toy-corner[canonical]" for c in ("", ":clean") for s in ("fp32", "toy-int6-tensor")}
    toy = results["digits/toy-int6-tensor/toy-corner[canonical]"]
    assert toy["quant"]["audit"]["bits"] == 6 and toy["quant"]["audit"]["quantized_param_fraction"] > 0.9
    assert toy["quant"]["audit"]["backend"] == "toy: int6 per-tensor weights"
    assert toy["verdict"]["status"] == "detected" and toy["verdict"]["target_class"] == toy["truth"]["target"]
    assert results["digits:clean/toy-int6-tensor/toy-corner[canonical]"]["verdict"]["status"] == "clean"
    # which release produced the verdicts: the toy's distribution, in each Result and in the run's metadata
    assert toy["defense"]["distribution"] == {"name": "qbd-toys", "version": "0.1"}
    assert json.loads(r.stdout)["run"]["defenses"] == {"toy-corner": "qbd-toys 0.1"}


def test_pytest_runs_them(toy_site: dict[str, str], tmp_path: Path) -> None:
    """The plugin takes the same names (`--qbd-scheme`, `--qbd-defense`) and runs the same cells."""
    (tmp_path / "test_qbd.py").write_text("from qbd.suite import test_attack, test_audit, test_cell  # noqa: F401\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--qbd-dataset", "digits",
                        "--qbd-scheme", "toy-int6-tensor", "--qbd-defense", "toy-corner", "--qbd-protocol", "canonical",
                        "-o", "addopts=", "-rA", "test_qbd.py"],
                       capture_output=True, text=True, env=toy_site, timeout=900, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    passed = {line.split("PASSED ", 1)[1].strip() for line in out.splitlines() if line.startswith("PASSED ")}
    assert passed == {"test_qbd.py::test_cell[digits/toy-int6-tensor/toy-corner[canonical]]",
                      "test_qbd.py::test_cell[digits:clean/toy-int6-tensor/toy-corner[canonical]]",
                      "test_qbd.py::test_audit[digits/toy-int6-tensor]", "test_qbd.py::test_attack[digits/toy-int6-tensor]"}, out[-3000:]


def test_a_false_alarm_only_once_quantized_fails_in_both_front_ends(toy_site: dict[str, str], tmp_path: Path) -> None:
    """The negative control runs on every scheme, single seed included: a defense that is quiet on
    the clean fp32 model and flags the clean int4-sim one fails that cell, in `qbd run` (exit 1)
    and in pytest (that test fails), and nothing else fails."""
    cell = "digits:clean/int4-sim/toy-quant-alarm[canonical]"
    r = _qbd(toy_site, "run", "--dataset", "digits", "--quant", "fp32,int4-sim", "--defense", "toy-quant-alarm",
             "--protocol", "canonical", "--json", "--no-progress", "-j", "1")
    assert r.returncode == 1, r.stderr[-3000:]
    fails = [line for line in r.stderr.splitlines() if line.startswith("qbd: FAIL")]
    assert len(fails) == 1 and fails[0].startswith(f"qbd: FAIL {cell}: ") and "false-alarm" in fails[0], fails
    (tmp_path / "test_qbd.py").write_text("from qbd.suite import test_attack, test_audit, test_cell  # noqa: F401\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rf", "--qbd-dataset", "digits",
                        "--qbd-scheme", "fp32,int4-sim", "--qbd-defense", "toy-quant-alarm", "--qbd-protocol", "canonical",
                        "-o", "addopts=", "-k", "test_cell", "test_qbd.py"],
                       capture_output=True, text=True, env=toy_site, timeout=900, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 1 and "1 failed, 3 passed" in out, out[-3000:]
    assert f"FAILED test_qbd.py::test_cell[{cell}]" in out, out[-3000:]


def _dist_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, entry_points: str, module: str = "", name: str = "") -> None:
    """A distribution qbd-bad on sys.path; `module` the source of the module `name`."""
    from tests.toy import distribution_on_path

    distribution_on_path(monkeypatch, tmp_path / "inproc", "qbd-bad", entry_points, {name: module} if module else None)


@pytest.mark.parametrize(("value", "module", "message"), [
    ("no_such_module_qbd:X", "", "cannot load it (ModuleNotFoundError"),
    ("bad_scheme_a:NotAScheme", "class NotAScheme:\n    name = 'bad-one'\n", "is not a scheme: it has no differentiable, engines, apply"),
    ("bad_scheme_b:Misnamed", "from qbd.quant.scheme import SchemeBase\nclass Misnamed(SchemeBase):\n    name = 'other'\n",
     "says its name is 'other'"),
])
def test_a_broken_scheme_entry_point_is_an_error_naming_its_distribution(monkeypatch, tmp_path, value, module, message) -> None:
    from qbd.errors import ConfigError
    from qbd.quant import get_scheme, scheme_names

    _dist_on_path(monkeypatch, tmp_path, f"[qbd.schemes]\nbad-one = {value}\n", module, value.partition(":")[0])
    assert "bad-one" in scheme_names()  # listed from metadata, nothing imported
    with pytest.raises(ConfigError, match="entry point of qbd-bad") as e:
        get_scheme("bad-one")
    assert message in str(e.value)


def test_an_entry_point_cannot_shadow_a_builtin_scheme(monkeypatch, tmp_path) -> None:
    from qbd.quant import available, get_scheme

    _dist_on_path(monkeypatch, tmp_path, "[qbd.schemes]\nint8-static = bad_scheme:Fake\n")
    with pytest.warns(UserWarning, match="its name is a built-in quantization scheme's"):
        entries = {a.name: a for a in available()}
    assert entries["int8-static"].builtin and type(get_scheme("int8-static")).__module__ == "qbd.quant.int8_static"


def test_a_third_party_scheme_is_held_to_its_own_claim() -> None:
    """The shipped table states no audit for a scheme it does not know: the scheme's own
    `differentiable` claim is the expectation, and a claim the probe contradicts fails."""
    from qbd.expectations import load, shipped

    exp = load(shipped("smoke"))
    honest = {"differentiable": True, "input_gradient": True, "quantized_param_fraction": 0.9}
    assert exp.check_audit("digits/toy", honest, True, builtin=False) == []
    lying = {**honest, "differentiable": False}
    assert exp.check_audit("digits/toy", lying, True, builtin=False)
    assert exp.check_audit("digits/toy", honest, True, builtin=True)  # a built-in must be stated in the table


def test_the_base_measures_what_a_third_party_scheme_could_only_claim():
    """A scheme that says it quantizes but changes nothing is refused, whatever its audit claims; a
    non-differentiable scheme's surrogate is measured against its deployed model (so a gradient
    defense's cells carry the surrogate_agrees_with_runtime control), and a surrogate that is not
    the deployed model fails that measurement."""
    import copy

    import torch

    from qbd.errors import ConfigError
    from qbd.models import build_model
    from qbd.quant.base import QuantizedClassifier
    from qbd.quant.scheme import Quantized, SchemeBase, quantize_weights

    class ChangesNothing(SchemeBase):
        name = "changes-nothing"

        def quantize(self, model, calib, engine):
            return Quantized(QuantizedClassifier.from_parts(model, model.features, model.head), backend="claims int4",
                             bits=4, quantized_modules=["features.0"], quantized_params=10**6)

    class FloatSurrogate(SchemeBase):
        """Deploys 2-bit weights, but hands gradient defenses the float model as its 'surrogate'."""

        name = "float-surrogate"
        differentiable = False

        def quantize(self, model, calib, engine):
            original = copy.deepcopy(model)
            q = quantize_weights(model, lambda w: (torch.sign(w) * w.abs().mean(), w.abs().mean()), backend="2-level", bits=2)
            q.surrogate_factory = lambda: QuantizedClassifier.from_parts(original, original.features, original.head)
            return q

    model = build_model("tiny-cnn", 10, (0.5,) * 3, (0.25,) * 3, seed=0).eval()
    calib = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="quantizes nothing"):
        ChangesNothing().apply(model, calib)
    agreement = FloatSurrogate().apply(model, calib).audit.surrogate_agreement
    assert agreement is not None and agreement["within_tolerance"] is False and agreement["rel_tolerance"] == 0.05


def test_a_distribution_is_recorded_only_for_a_file_it_installed(tmp_path, monkeypatch):
    """A module imported from a local file is not credited to the installed distribution that
    happens to own a package of the same top-level name."""
    import types

    import yaml  # noqa: F401  (imported: its file is the one PyYAML installed)

    from qbd.registry import distribution_of

    class FromPyYAML:
        pass

    FromPyYAML.__module__ = "yaml"
    assert distribution_of(FromPyYAML(), "qbd.defenses")["name"] == "PyYAML"
    local = tmp_path / "shadow.py"
    local.write_text("")
    shadow = types.ModuleType("yaml.local_shadow")
    shadow.__file__ = str(local)
    monkeypatch.setitem(__import__("sys").modules, "yaml.local_shadow", shadow)

    class Local:
        pass

    Local.__module__ = "yaml.local_shadow"
    assert distribution_of(Local(), "qbd.defenses") is None
