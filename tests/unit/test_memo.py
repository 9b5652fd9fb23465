"""qbd.memo: a cell computed once is not computed again in the same session, nor in a later one when
asked; anything its Result depends on changes the key; nothing untrustworthy is filed."""

import copy
import json

import pytest
import torch

from qbd.config import AttackSpec
from qbd.defenses.base import Verdict
from qbd.evaluate import Bench, BenchSpec
from qbd.memo import ResultMemo, reused_line
from qbd.models import build_model
from tests.toy import toy_split


class _Counting:
    """A defense that counts its runs and answers what it is told (its params are its answer)."""

    requires = frozenset()
    protocol = "canonical"

    def __init__(self, status="detected", name="counting"):
        self.name, self.status, self.calls = name, status, 0

    @property
    def params(self):
        return {"status": self.status}

    def detect(self, subject, inputs, generator):
        self.calls += 1
        if self.status == "detected":
            return Verdict("detected", score=3.0, threshold=2.0, target_class=1)
        if self.status == "nan":
            return Verdict("clean", score=float("nan"), threshold=2.0)  # the sandbox makes it invalid
        return Verdict("clean", score=1.0, threshold=2.0)


def _bench(memo, seed=0, data=None):
    data = data or toy_split()
    model = build_model("tiny-cnn", 4, data.mean, data.std, seed=seed).eval()
    return Bench(data, model, None, memo=memo, model_name="tiny-cnn")


def _without_memo(result):
    return {k: v for k, v in result.items() if k != "memo"}


def test_a_cell_is_computed_once_per_session_and_the_reused_result_is_the_same(tmp_path):
    memo = ResultMemo(tmp_path, "session-a")
    defense = _Counting()
    first = _bench(memo).run(defense, "int8-dynamic")
    again = _bench(ResultMemo(tmp_path, "session-a")).run(defense, "int8-dynamic")  # another worker, same session
    assert defense.calls == 1
    assert first["memo"] == {"key": first["memo"]["key"], "reused": False, "session": "session-a", "filed": True}
    assert again["memo"] == {"key": first["memo"]["key"], "reused": True, "session": "session-a"}
    assert _without_memo(again) == _without_memo(first)
    assert reused_line([first, again]).startswith("qbd: 1 of 2 cells reused")
    assert reused_line([first]) == ""


def test_a_later_session_recomputes_unless_asked_to_reuse_and_fresh_reads_nothing(tmp_path):
    defense = _Counting()
    _bench(ResultMemo(tmp_path, "monday")).run(defense, "fp32")
    _bench(ResultMemo(tmp_path, "tuesday")).run(defense, "fp32")
    assert defense.calls == 2  # a later session: its code may differ in ways no digest sees
    reused = _bench(ResultMemo(tmp_path, "wednesday", reuse=True)).run(defense, "fp32")
    assert defense.calls == 2 and reused["memo"]["reused"] and reused["memo"]["session"] == "tuesday"
    fresh = ResultMemo(tmp_path, "tuesday", fresh=True)
    _bench(fresh).run(defense, "fp32")
    _bench(fresh).run(defense, "fp32")
    assert defense.calls == 4  # --fresh: not even within its own session


def _key(bench, defense, scheme="fp32", seed=0, gradient_path="deployed", engine=None, timeout_s=None):
    from qbd.memo import cell_parts

    parts = cell_parts(bench, defense, scheme, gradient_path=gradient_path, engine=engine, seed=seed, timeout_s=timeout_s)
    return bench.memo.key(parts)


def test_everything_a_result_depends_on_changes_the_key(tmp_path, monkeypatch):
    """A key that left any of these out would hand one cell another's Result."""
    memo = ResultMemo(tmp_path, "s")
    bench = _bench(memo)
    base = _key(bench, _Counting())
    other_data = toy_split()
    other_data.x_test[0, 0, 0, 0] ^= 1  # one pixel of one test image
    edited = _bench(memo)
    with torch.no_grad():
        next(edited.model.parameters()).view(-1)[0] += 1e-3  # one weight
    edited = Bench(edited.data, edited.model, None, memo=memo, model_name="tiny-cnn")
    variants = {
        "params": _key(bench, _Counting(status="clean")),
        "defense name": _key(bench, _Counting(name="other")),
        "scheme": _key(bench, _Counting(), scheme="int8-dynamic"),
        "seed": _key(bench, _Counting(), seed=1),
        "weights": _key(edited, _Counting()),
        "data": _key(_bench(memo, data=other_data), _Counting()),
        "model seed": _key(_bench(memo, seed=1), _Counting()),
    }
    with torch.no_grad():
        threads = torch.get_num_threads()
        torch.set_num_threads(threads + 1)
        try:
            variants["threads"] = _key(bench, _Counting())
        finally:
            torch.set_num_threads(threads)
    code = ResultMemo(tmp_path, "s")
    code.environment = {**memo.environment, "qbd_code": "0" * 64}  # an edit to qbd's code
    variants["qbd code"] = code.key(_parts(bench))
    libs = ResultMemo(tmp_path, "s")
    libs.environment = {**memo.environment, "libraries": {**memo.environment["libraries"], "scikit-learn": "0.0"}}
    variants["library version"] = libs.key(_parts(bench))
    variants["gradient path"] = _key(bench, _Counting(), gradient_path="surrogate")
    variants["timeout"] = _key(bench, _Counting(), timeout_s=60.0)
    paper, needs = _Counting(), _Counting()
    paper.protocol = "paper"
    needs.requires = frozenset({"clean_holdout"})
    variants["protocol"], variants["requires"] = _key(bench, paper), _key(bench, needs)
    data = bench.data
    for name, kw in {"probe trigger": {"probe_attack": AttackSpec(seed=3)}, "attack": {"attack": AttackSpec()},
                     "bench split": {"spec": BenchSpec(holdout=100)}, "tier": {"tier": "paper"}}.items():
        kw = {"attack": None, **kw}
        other = Bench(data, bench.model, kw.pop("attack"), memo=memo, model_name="tiny-cnn", **kw)
        variants[name] = _key(other, _Counting())
    assert all(k != base for k in variants.values()), [n for n, k in variants.items() if k == base]
    # two parts that only differ against their own baseline
    assert _key(bench, _Counting(), scheme="int8-static", engine="fbgemm") != _key(bench, _Counting(), scheme="int8-static")
    assert _key(bench, _Counting(status=float("nan"))) != _key(bench, _Counting(status=None))  # NaN is not None
    assert _key(_bench(memo), _Counting()) == base  # and the same cell again: the same key


def _parts(bench):
    from qbd.memo import cell_parts

    return cell_parts(bench, _Counting(), "fp32", gradient_path="deployed", engine=None, seed=0, timeout_s=None)


def test_the_code_digest_reads_every_module_of_the_package(tmp_path, monkeypatch):
    import qbd

    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "nc.py").write_text("STEPS = 100\n")
    monkeypatch.setattr(qbd, "__file__", str(package / "__init__.py"))
    before = ResultMemo(tmp_path, "s").environment
    (package / "sub" / "nc.py").write_text("STEPS = 99\n")  # an edit deep in a sub-package
    after = ResultMemo(tmp_path, "s").environment
    assert before["qbd_code"] != after["qbd_code"] and before["libraries"] == after["libraries"]
    assert before["libraries"]["torch"] == torch.__version__


def test_invalid_results_and_opted_out_defenses_are_never_filed(tmp_path):
    memo = ResultMemo(tmp_path, "s")
    nan = _Counting(status="nan")
    first = _bench(memo).run(nan, "fp32")
    assert first["verdict"]["status"] == "invalid" and first["memo"]["filed"] is False
    _bench(memo).run(nan, "fp32")
    assert nan.calls == 2  # an invalid verdict (a NaN, a timeout, a crash) is computed again
    opted = _Counting()
    opted.memoize = False
    _bench(memo).run(opted, "fp32")
    _bench(memo).run(opted, "fp32")
    assert opted.calls == 2


def test_an_unreadable_or_tampered_entry_is_a_miss_and_is_rewritten(tmp_path):
    memo = ResultMemo(tmp_path, "s")
    defense = _Counting()
    key = _bench(memo).run(defense, "fp32")["memo"]["key"]
    path = next((tmp_path / "results").rglob(f"{key}.json"))
    path.write_text("{not json")
    _bench(memo).run(defense, "fp32")
    assert defense.calls == 2
    entry = json.loads(path.read_text())
    entry["key"] = "f" * 64  # an entry filed under another name
    path.write_text(json.dumps(entry))
    _bench(memo).run(defense, "fp32")
    assert defense.calls == 3
    entry = json.loads(path.read_text())
    del entry["result"]["verdict"]  # no longer a Result
    path.write_text(json.dumps(entry))
    assert not _bench(memo).run(defense, "fp32")["memo"]["reused"]


def test_a_defense_whose_code_cannot_be_identified_is_not_memoised(tmp_path):
    memo = ResultMemo(tmp_path, "s")
    ns: dict = {}
    exec("class Anonymous:\n    requires = frozenset()\n    name = 'anon'\n    calls = 0\n"
         "    def detect(self, subject, inputs, generator):\n        type(self).calls += 1\n"
         "        return V('clean', score=1.0, threshold=2.0)\n", {"V": Verdict, "__name__": "not_a_module"}, ns)
    anon = ns["Anonymous"]()
    r = _bench(memo).run(anon, "fp32")
    _bench(memo).run(anon, "fp32")
    assert "memo" not in r and ns["Anonymous"].calls == 2


def test_the_cli_refuses_fresh_with_reuse(tmp_path, capsys):
    from qbd.cli import main

    with pytest.raises(SystemExit) as e:  # argparse refuses it before anything is planned
        main(["run", "--dataset", "digits", "--quant", "fp32", "--defense", "strip", "--fresh", "--reuse-results",
              "--cache-dir", str(tmp_path)])
    assert e.value.code == 2 and "--reuse-results: not allowed with argument --fresh" in capsys.readouterr().err


def test_copies_of_a_memo_share_its_session(tmp_path):
    memo = ResultMemo(tmp_path, "s", reuse=True)
    twin = copy.deepcopy(memo)  # what a `qbd run -j` worker receives
    assert (twin.root, twin.session, twin.reuse, twin.fresh) == (memo.root, "s", True, False)


def test_a_third_party_defense_is_keyed_by_its_whole_package(tmp_path, monkeypatch):
    """An edit to a helper module of the defense's package changes the key, not only its own file."""
    import importlib

    from qbd.memo import code_of

    pkg = tmp_path / "memo_probe_defense"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from memo_probe_defense.impl import Probe\n")
    (pkg / "impl.py").write_text("class Probe:\n    name = 'probe'\n")
    (pkg / "helpers.py").write_text("THRESHOLD = 2.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = importlib.import_module("memo_probe_defense").Probe()
    memo = ResultMemo(tmp_path, "s")
    before = code_of(probe, memo)
    (pkg / "helpers.py").write_text("THRESHOLD = 2.5\n")
    after = code_of(probe, ResultMemo(tmp_path, "s"))  # the next process reads the edited package
    assert before["class"] == "memo_probe_defense.impl:Probe" and before["sha256"] and before["sha256"] != after["sha256"]
    assert code_of(probe, memo) == before  # taken once per process: the code this process runs
    assert "sha256" not in code_of(Verdict, memo)  # qbd's own code: covered by the memo's environment


def test_where_the_zoo_is_installed_is_no_part_of_the_key(tmp_path):
    """A new virtual environment moves the zoo; its models (by sha256) and their Results do not change."""
    memo = ResultMemo(tmp_path, "s")
    keys = set()
    for where in ("/venv-a/qbd/zoo", "/venv-b/qbd/zoo"):
        bench = _bench(memo)
        bench.weights = {"origin": "zoo", "sha256": "ab" * 32, "file": "m.safetensors", "zoo": where, "repository_zoo": False}
        keys.add(_key(bench, _Counting()))
    assert len(keys) == 1


def test_a_store_that_cannot_be_written_loses_no_result(tmp_path):
    (tmp_path / "results").write_text("a file where the folder should be")
    memo = ResultMemo(tmp_path, "s")
    with pytest.warns(UserWarning, match="could not file a Result"):
        r = _bench(memo).run(_Counting(), "fp32")
    assert r["verdict"]["status"] == "detected" and r["memo"]["filed"] is False


def test_a_defense_of_someone_elses_without_params_is_not_memoised(tmp_path):
    """Its configuration would live where the key cannot see it (constructor arguments, a module:instance)."""
    memo = ResultMemo(tmp_path, "s")

    class NoParams(_Counting):
        params = None

    NoParams.__module__ = "someone_else"
    from qbd.memo import _own_params

    assert _own_params(NoParams()) is None and _own_params(_Counting()) is not None
    assert _own_params(type("Opaque", (_Counting,), {"params": {"model": object()}})()) is None  # not writable exactly
    r = _bench(memo).run(_Counting(), "fp32")
    assert r["memo"]["filed"]
