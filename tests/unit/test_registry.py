import pytest

from qbd.registry import Registry, UnknownNameError, load_ref


def test_register_get_and_sorted_names():
    r: Registry[int] = Registry("thing")
    r.add("b", 2)
    r.register("a")(1)
    assert r.get("a") == 1 and r.get("b") == 2
    assert r.names() == ["a", "b"] and list(r) == ["a", "b"] and len(r) == 2 and "a" in r


def test_duplicate_and_bad_names_raise():
    r: Registry[int] = Registry("thing")
    r.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        r.add("a", 2)
    with pytest.raises(ValueError, match="invalid"):
        r.add(" a", 3)


def test_unknown_name_lists_valid_ones():
    r: Registry[int] = Registry("scheme")
    r.add("fp32", 1)
    r.add("int4-sim", 2)
    with pytest.raises(UnknownNameError) as e:
        r.get("int3")
    assert str(e.value) == "unknown scheme 'int3'; valid: fp32, int4-sim"


def test_lazy_entries_resolve_on_first_get():
    r: Registry[object] = Registry("thing")
    r.add_lazy("join", "os.path:join")
    import os.path

    assert r.get("join") is os.path.join
    with pytest.raises(ValueError):
        r.add_lazy("bad", "no_colon")
    with pytest.raises(ValueError):
        load_ref("os.path:")


def test_registries_list_without_torch(tmp_path):
    """The CLI and the pytest plugin list data sets without importing torch."""
    import subprocess
    import sys

    code = (
        "import sys; from qbd.data import DATASETS; from qbd.models import MODELS; print(MODELS.names()); import qbd.config, qbd.cli, qbd.pytest_plugin;"
        "print(DATASETS.names()); assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "synthetic" in out.stdout
