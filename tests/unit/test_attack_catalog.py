"""The attack catalog (qbd.attacks): the built-ins and the `qbd.attacks` entry points, checked
when a spec names them; nothing special-cases an attack by its name."""

import sys

import pytest
import torch

from qbd.attacks import BUILTIN, Attack, attack_names, conditioned, get_attack
from qbd.config import AttackSpec
from qbd.errors import ConfigError
from tests.toy import distribution_on_path


def _dist(monkeypatch, tmp_path, entry_points: str, module: str = "", name: str = "") -> None:
    distribution_on_path(monkeypatch, tmp_path / "site", "qbd-att", entry_points, {name: module} if module else None)


def test_the_builtins_and_their_declarations():
    assert BUILTIN == ("badnet", "blend", "quant-conditioned")
    assert [conditioned(n) for n in BUILTIN] == [False, False, True]
    assert not conditioned("not-installed-here")  # a Result's attack read without importing anything
    assert get_attack("blend").full_image and not get_attack("badnet").full_image


BASE = "from qbd.attacks import Attack\nclass Bad(Attack):\n"


@pytest.mark.parametrize(("module", "message"), [
    ("class Bad:\n    name = 'bad-att'\n", "is not an attack: write it on qbd.attacks.Attack"),
    (BASE + "    name = 'other'\n", "says its name is 'other'"),
    (BASE + "    name = 'bad-att'\n    conditioned = True\n", "only qbd's quant-conditioned attack is conditioned"),
    (BASE + "    name = 'bad-att'\n    takes = frozenset({'beta'})\n", "takes from alpha, scheme"),
    ("raise ImportError('missing dependency')\n", "cannot load it (ImportError: missing dependency)"),
])
def test_a_broken_attack_entry_point_is_an_error_naming_its_distribution(monkeypatch, tmp_path, module, message):
    monkeypatch.delitem(sys.modules, "bad_att", raising=False)  # another parameter's module of that name
    _dist(monkeypatch, tmp_path, "[qbd.attacks]\nbad-att = bad_att:Bad\n", module, "bad_att")
    assert "bad-att" in attack_names()  # listed from metadata, nothing imported
    with pytest.raises(ConfigError, match="entry point of qbd-att") as e:
        AttackSpec(name="bad-att")
    assert message in str(e.value)


def test_an_installed_attack_is_checked_like_a_builtin(monkeypatch, tmp_path):
    module = ("from qbd.attacks import Attack\n"
              "class Stripe(Attack):\n    name = 'stripe'\n    trigger = None\n    patterns = ('white',)\n"
              "    def write(self, x, spec):\n        return x[:, :1]\n")  # a wrong shape
    _dist(monkeypatch, tmp_path, "[qbd.attacks]\nstripe = stripe_att:Stripe\n", module, "stripe_att")
    with pytest.raises(ConfigError, match="stripe takes trigger pattern white"):
        AttackSpec(name="stripe", trigger_pattern="random")
    with pytest.raises(ConfigError, match=r"alpha \(--blend-alpha\) applies to the blend attack only, not stripe"):
        AttackSpec(name="stripe", alpha=0.2)
    spec = AttackSpec(name="stripe")
    assert spec.label() == "stripe-t0-white3-bottom-right-p0.1"  # the base's label
    from qbd.poisoning import apply_trigger

    with pytest.raises(TypeError, match="write\\(\\) must return a tensor shaped and typed as its input"):
        apply_trigger(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), spec)


def test_an_entry_point_cannot_shadow_a_builtin_attack(monkeypatch, tmp_path):
    _dist(monkeypatch, tmp_path, "[qbd.attacks]\nblend = fake:Blend\n")
    with pytest.warns(UserWarning, match="its name is a built-in attack's"):
        names = attack_names()
    assert names.count("blend") == 1 and type(get_attack("blend")).__module__ == "qbd.attacks"


def test_a_subclass_reuses_the_patch_writer():
    class Wide(Attack):
        name = "wide"

    assert Wide().trigger == "patch" and Wide().label(AttackSpec()) == "wide-t0-white3-bottom-right-p0.1"


def test_an_edit_to_an_installed_attack_changes_its_models_keys(monkeypatch, tmp_path):
    """The store key of a model (and the memo key of its Results) carries an installed attack's code:
    an edited trigger trains a new model, never reuses the old one."""
    from qbd.config import ModelJob

    module = ("from qbd.attacks import Attack\n"
              "class Dots(Attack):\n    name = 'dots'\n    trigger = None\n    patterns = ('white',)\n"
              "    def write(self, x, spec):\n        out = x.clone()\n        out[:, :, ::4, ::4] = 255\n        return out\n")
    monkeypatch.delitem(sys.modules, "dots_att", raising=False)
    _dist(monkeypatch, tmp_path, "[qbd.attacks]\ndots = dots_att:Dots\n", module, "dots_att")
    job = ModelJob(attack=AttackSpec(name="dots"))
    before = job.key()
    (tmp_path / "site" / "dots_att.py").write_text(module.replace("::4, ::4", "::3, ::3"))
    assert job.key() != before
    assert ModelJob().key() == ModelJob().key()  # a built-in attack's key has no code digest: the zoo's keys stand


def test_a_blended_installed_attack_must_subclass_blend(monkeypatch, tmp_path):
    module = "from qbd.attacks import Attack\nclass Mix(Attack):\n    name = 'mix'\n    trigger = 'blend'\n"
    monkeypatch.delitem(sys.modules, "mix_att", raising=False)
    _dist(monkeypatch, tmp_path, "[qbd.attacks]\nmix = mix_att:Mix\n", module, "mix_att")
    with pytest.raises(ConfigError, match=r"a blended trigger subclasses qbd\.attacks\.Blend"):
        AttackSpec(name="mix")
