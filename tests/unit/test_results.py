"""The Result contract: the optional `weights` provenance, the verdict's `reason_code` and the
optional `judgement` against the expectations."""

import re

import pytest

from qbd.defenses.base import Verdict
from qbd.results import problems


def _result(weights=None, verdict=None, **extra):
    v = verdict or {"status": "clean", "score": None, "threshold": None, "target_class": None, "reason": None,
                    "reason_code": None, "evidence": {}, "controls": {}}
    return {"cell": "d/fp32/x[paper]", "dataset": "d", "model": "tiny-cnn", "weights": weights, "seed": 0, "tier": "smoke",
            "attack": None, "quant": {"scheme": "fp32", "audit": {"quantized_param_fraction": 0.0, "input_gradient": True,
                                                                   "engine": None, "differentiable": True}},
            "defense": {"name": "x", "protocol": "paper", "params": {}},
            "verdict": v, "clean_acc": 0.9, "asr": None, "seconds": 1.0, "versions": {}, **extra}


@pytest.mark.parametrize(("weights", "fragment"), [
    ({"origin": "downloaded"}, "weights.origin must be one of trained, fetched, zoo, got 'downloaded'"),
    ("trained", "weights must be an object or null, not str"),
    ({"origin": "fetched", "source": "m.pt"}, "fetched weights must record their sha256"),
    ({"origin": "zoo", "file": "m.safetensors"}, "zoo weights must record their sha256"),
])
def test_bad_provenance_is_a_problem(weights, fragment):
    assert any(fragment in p for p in problems(_result(weights)))


@pytest.mark.parametrize("weights", [None, {"origin": "trained", "store_key": "k"}, {"origin": "fetched", "sha256": "ab"},
                                     {"origin": "zoo", "sha256": "ab", "file": "m.safetensors"}])
def test_good_provenance_passes_its_check(weights):
    assert problems(_result(weights)) == []


@pytest.mark.parametrize("verdict", [
    Verdict("clean"),
    Verdict("detected", score=3.0, threshold=2.0, target_class=0),
    Verdict.invalid("no input gradient", "no-gradient"),
    Verdict.invalid("a third-party defense said invalid"),  # code `unspecified`
])
def test_a_verdicts_dict_satisfies_the_contract(verdict):
    assert problems(_result(verdict=verdict.to_dict())) == []


def _verdict(status, code, reason="r"):
    return {"status": status, "score": None, "threshold": None, "target_class": None, "reason": reason,
            "reason_code": code, "evidence": {}, "controls": {}}


@pytest.mark.parametrize(("verdict", "fragment"), [
    (_verdict("invalid", None), "an invalid verdict needs a reason_code"),
    (_verdict("invalid", "bogus"), "an invalid verdict needs a reason_code"),
    (_verdict("invalid", ["error"]), "an invalid verdict needs a reason_code"),  # a problem, not a TypeError
    (_verdict("clean", "no-signal", reason=None), "only an invalid verdict carries a reason_code"),
    (_verdict("detected", "error", reason=None), "only an invalid verdict carries a reason_code"),
    ({k: v for k, v in _verdict("invalid", "error").items() if k != "reason_code"}, "verdict lacks 'reason_code'"),
])
def test_a_bad_reason_code_is_a_problem(verdict, fragment):
    assert any(fragment in p for p in problems(_result(verdict=verdict))), problems(_result(verdict=verdict))


@pytest.mark.parametrize("judgement", [None, {"outcome": "pass", "judgement": "pass", "expected": "t", "why": None},
                                       {"outcome": "invalid:no-gradient", "judgement": "finding"},
                                       {"outcome": "miss", "judgement": "FAIL", "why": "w"}])
def test_a_judgement_is_optional(judgement):
    assert problems(_result(judgement=judgement)) == []


@pytest.mark.parametrize(("judgement", "fragment"), [
    ("pass", "judgement must be an object or null, not str"),
    ({"judgement": "pass"}, "judgement lacks 'outcome'"),
    ({"outcome": "pass", "judgement": "maybe"}, "judgement.judgement must be one of pass, finding, FAIL, got 'maybe'"),
    ({"outcome": 1, "judgement": "FAIL"}, "judgement.outcome must be a string, not int"),
])
def test_a_malformed_judgement_is_a_problem(judgement, fragment):
    assert fragment in problems(_result(judgement=judgement))


# -- rows of rates over seeds (qbd.rates) in a results file --------------------------------------------
def _seeded(seed, clean, status):
    v = {"status": status, "score": None, "threshold": None, "target_class": 0 if status == "detected" else None,
         "reason": None, "reason_code": None, "evidence": {}, "controls": {}}
    attack = None if clean else {"name": "badnet", "target": 0, "trigger_pattern": "white", "trigger_size": 3,
                                 "trigger_position": "bottom-right", "poison_rate": 0.1, "seed": seed}
    return {**_result(verdict=v, attack=attack), "seed": seed, "cell": f"d{':clean' if clean else ''}/fp32/x[paper]"}


def test_a_results_file_carries_its_rows_and_loads_them_back(tmp_path):
    import json

    from qbd import rates
    from qbd.results import dump, load, read, write

    results = [_seeded(s, False, "detected" if s else "clean") for s in range(3)] + [_seeded(s, True, "clean") for s in range(3)]
    data = json.loads(dump(results))
    assert data["rows"] == rates.rows(results)  # computed when not given
    [row] = data["rows"]
    assert (row["detected"], row["n_backdoored"], row["false_alarms"], row["n_clean"]) == (2, 3, 0, 3)
    p = write(tmp_path / "results.json", results)
    back, back_rows = load(p)
    assert back_rows == data["rows"] and back == data["results"] and read(p) == back


def test_an_old_results_file_without_rows_still_loads(tmp_path):
    import json

    from qbd.results import load, read

    p = tmp_path / "old.json"
    p.write_text(json.dumps({"schema": 1, "results": [_result()]}))
    assert load(p) == ([_result()], []) and read(p) == [_result()]


def _row(**change):
    from qbd import rates

    return {**rates.rows([_seeded(0, False, "detected"), _seeded(1, False, "clean"), _seeded(0, True, "clean")])[0], **change}


@pytest.mark.parametrize(("change", "fragment"), [
    ({"row": 3}, "'row' must be a string"),
    ({"n_clean": -1}, "'n_clean' must be an integer >= 0"),
    ({"detected": True}, "'detected' must be an integer >= 0"),
    ({"seeds": [0, "1"]}, "'seeds' must be a list of integers"),
    ({"detected": 3}, "detected 3 > n_backdoored 2"),
    ({"detection_rate": 0.7}, "detection_rate must be detected / n_backdoored = 0.5"),
    ({"detection_rate": None}, "detection_rate must be detected / n_backdoored"),
    ({"detection_ci": [0.6, 0.9]}, "detection_ci must be [low, high] in [0, 1] around detection_rate"),
    ({"detection_ci": None}, "detection_ci must be [low, high]"),
    ({"false_alarm_ci": [0.0, 1.5]}, "false_alarm_ci must be [low, high]"),
    ({"n_backdoored": 0, "detected": 0}, "detection_rate and detection_ci must be null when n_backdoored is 0"),
    ({"outcomes": {"backdoored": {"pass": 1}}}, "'outcomes' must count every model of the row"),
    ({"outcomes": {"backdoored": {"pass": 0}}}, "'outcomes' must map backdoored / clean"),
    ({"outcomes": {"other": {}}}, "'outcomes' must map backdoored / clean"),
])
def test_a_malformed_row_is_a_problem(change, fragment):
    from qbd.results import row_problems

    assert row_problems(_row()) == []
    assert any(fragment in p for p in row_problems(_row(**change))), row_problems(_row(**change))


def test_a_malformed_row_is_refused_on_dump_and_load(tmp_path):
    import json

    from qbd.results import ResultError, dump, load

    with pytest.raises(ResultError, match=r"row d/fp32/x\[paper\]: detected 3 > n_backdoored 2"):
        dump([_result()], [_row(detected=3)])
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"schema": 1, "results": [], "rows": {"a": 1}}))
    with pytest.raises(ResultError, match="'rows' must be a list"):
        load(p)
    p.write_text(json.dumps({"schema": 1, "results": [], "rows": [_row(seeds="0")]}))
    with pytest.raises(ResultError, match="'seeds' must be a list of integers"):
        load(p)


def test_rows_that_disagree_with_their_results_are_refused_on_load(tmp_path):
    """A well-formed row claiming 2/2 next to Results showing 0/2 is not a results file to trust."""
    import json

    from qbd import rates
    from qbd.results import ResultError, load

    results = [_seeded(0, False, "clean"), _seeded(1, False, "clean"), _seeded(0, True, "clean")]
    row = rates.rows(results)[0]
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"schema": 1, "results": results, "rows": [row]}))
    assert load(p)[1] == [row]
    forged = {**row, "detected": 2, "detection_rate": 1.0, "detection_ci": list(rates.wilson(2, 2))}
    p.write_text(json.dumps({"schema": 1, "results": results, "rows": [forged]}))
    with pytest.raises(ResultError, match="not the rates of its 'results'"):
        load(p)


# -- the Result's JSON Schema (qbd/schema/result.schema.json) ---------------------------------------------
def _validator():
    import jsonschema

    from qbd.results import schema

    s = schema()
    jsonschema.Draft202012Validator.check_schema(s)  # a well-formed draft 2020-12 schema
    return jsonschema.Draft202012Validator(s)


class _Says:
    """A defense that answers what it is told (the built-in ones rarely detect on an untrained model)."""

    requires = frozenset()

    def __init__(self, name, verdict, protocol="canonical"):
        self.name, self.protocol, self._verdict = name, protocol, verdict

    def detect(self, subject, inputs, generator):
        if self._verdict is None:
            raise RuntimeError("boom")  # a crash: invalid, code error, the traceback in the evidence
        return self._verdict


@pytest.fixture(scope="module")
def real_results():
    """Results as Bench.run produces them: an untrained tiny-cnn on the toy data, backdoored and
    clean, through fp32 and int8-dynamic, with real defenses and stand-ins for the other verdicts."""
    from qbd.config import AttackSpec
    from qbd.evaluate import Bench
    from qbd.models import build_model
    from qbd.outcomes import judge
    from qbd.runner import load_defense
    from tests.toy import toy_split

    data = toy_split(n_train=200, n_test=120)
    model = build_model("tiny-cnn", 4, data.mean, data.std, seed=0).eval()
    out = []
    for attack in (AttackSpec(), None):
        bench = Bench(data, model, attack, model_name="tiny-cnn", weights={"origin": "trained", "store_key": "k"})
        out.append(bench.run(load_defense("spectral-signatures", "canonical", "smoke"), "int8-dynamic"))
        out.append(bench.run(load_defense("strip", "paper", "smoke"), "fp32"))
        out.append(bench.run(_Says("names-one", Verdict("detected", score=2.5, threshold=1.0, target_class=1)), "fp32"))
        out.append(bench.run(_Says("crashes", None), "int8-dynamic"))
    for r in out:
        r["judgement"] = judge(r, None).to_dict()
    return out


def test_real_results_satisfy_the_schema(real_results):
    v = _validator()
    statuses = {r["verdict"]["status"] for r in real_results}
    assert statuses == {"detected", "clean", "invalid"}, statuses  # every kind of verdict is checked
    assert any(r["attack"] is None for r in real_results) and any(r["verdict"]["controls"] for r in real_results)
    assert any((r["verdict"]["evidence"] or {}).get("traceback") for r in real_results)
    for r in real_results:
        assert problems(r) == []
        errors = [e.message for e in v.iter_errors(r)]
        assert errors == [], (r["cell"], errors)


def _broken(result, path, value=KeyError):
    """A deep copy of `result` with the key at `path` set to `value` (KeyError: removed)."""
    import copy

    r = copy.deepcopy(result)
    *parents, last = path
    node = r
    for k in parents:
        node = node[k]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return r


BROKEN = [  # (path, value): each makes a Result that both the schema and problems() refuse
    (("cell",), KeyError), (("verdict",), KeyError), (("versions",), KeyError), (("clean_acc",), KeyError),
    (("verdict", "status"), "maybe"), (("verdict", "status"), KeyError), (("verdict", "reason_code"), KeyError),
    (("verdict", "controls"), KeyError), (("clean_acc",), 1.5), (("asr",), "high"), (("seed",), "0"),
    (("quant", "audit", "input_gradient"), KeyError), (("defense", "protocol"), KeyError),
    (("attack", "target"), KeyError), (("weights",), {"origin": "fetched"}), (("weights",), {"origin": "downloaded"}),
    (("judgement",), {"judgement": "maybe", "outcome": "pass"}), (("judgement",), {"judgement": "pass"}),
]


@pytest.mark.parametrize(("path", "value"), BROKEN, ids=lambda x: "/".join(x) if isinstance(x, tuple) else repr(x))
def test_a_broken_result_fails_the_schema_and_the_check(real_results, path, value):
    backdoored = next(r for r in real_results if r["attack"] is not None)
    assert not list(_validator().iter_errors(backdoored))
    r = _broken(backdoored, path, value)
    assert list(_validator().iter_errors(r)), f"the schema accepts {path}={value!r}"
    assert problems(r), f"problems() accepts {path}={value!r}"


@pytest.mark.parametrize(("status", "code", "reason"), [
    ("invalid", None, "r"),  # an invalid verdict without its code
    ("invalid", "bogus", "r"),
    ("invalid", "error", None),  # without its reason
    ("clean", "no-signal", None),  # a code on a verdict that is not invalid
    ("detected", "error", None),
])
def test_a_verdicts_conditions_are_in_the_schema(status, code, reason):
    r = _result(verdict=_verdict(status, code, reason))
    assert list(_validator().iter_errors(r)) and problems(r)


@pytest.mark.parametrize("result", [
    _result(), _result({"origin": "zoo", "sha256": "ab", "file": "m.safetensors"}),
    _result(judgement={"outcome": "invalid:no-gradient", "judgement": "finding"}),
    _result(verdict=Verdict.invalid("a third-party defense said invalid").to_dict()),
    _seeded(1, False, "detected"),
])
def test_what_the_check_accepts_the_schema_accepts(result):
    assert problems(result) == [] and not list(_validator().iter_errors(result))


# -- the run's metadata in a results file ------------------------------------------------------------------
def test_a_results_file_carries_the_runs_metadata(tmp_path):
    import json

    from qbd.results import ResultError, dump, load, read_run, write

    run = {"command": "qbd run --tier smoke", "tier": "smoke", "seeds": [0]}
    p = write(tmp_path / "r.json", [_result()], run=run)
    data = json.loads(p.read_text())
    assert data["schema"] == 1 and data["run"] == run  # next to the keys existing readers use
    assert load(p) == ([_result()], data["rows"]) and read_run(p) == run
    assert read_run(write(tmp_path / "old.json", [_result()])) is None  # written without: none
    with pytest.raises(ResultError, match="the run's metadata is a JSON object"):
        dump([_result()], run=["smoke"])
    with pytest.raises(ResultError, match="not plain JSON"):
        dump([_result()], run={"expectations": tmp_path})
    p.write_text(json.dumps({**data, "run": "smoke"}))
    with pytest.raises(ResultError, match="'run' must be an object"):
        load(p)


def test_agreement_control_passes_only_when_every_image_set_agrees():
    from qbd.cell_controls import MIN_TOP1_AGREEMENT, agreement_control

    def a(data, top1, rel):
        return {"data": data, "n_images": 10, "top1_agreement": top1, "max_rel_logit_delta": rel, "max_abs_logit_delta": rel}

    good = [a("calibration", 1.0, 0.006), a("held-out", 0.99, 0.01), a("triggered", 1.0, 0.01)]
    c = agreement_control(good, 0.05)
    assert c.passed and c.value == 0.99 and "held-out (10)" in c.detail
    assert not agreement_control([*good[:2], a("triggered", 1.0, 0.06)], 0.05).passed  # one set out of tolerance
    assert not agreement_control([*good[:2], a("triggered", MIN_TOP1_AGREEMENT - 0.01, 0.0)], 0.05).passed
    assert not agreement_control([*good[:2], a("triggered", None, None)], 0.05).passed  # non-finite logits: no figures
    assert agreement_control(good, None).passed  # no tolerance stated: top-1 alone


class _Inspects(_Says):
    """A gradient defense (what routes a canonical cell through the scheme's surrogate)."""

    requires = frozenset({"input_gradients"})


def _int8_static_bench():
    from qbd.config import AttackSpec
    from qbd.evaluate import Bench
    from qbd.models import build_model
    from tests.toy import toy_split

    data = toy_split(n_train=200, n_test=120)
    model = build_model("tiny-cnn", 4, data.mean, data.std, seed=0).eval()
    return Bench(data, model, AttackSpec(), model_name="tiny-cnn", weights={"origin": "trained", "store_key": "k"})


def test_a_gradient_defense_on_int8_static_carries_the_surrogate_agreement_control():
    bench = _int8_static_bench()
    said = Verdict("detected", score=2.5, threshold=1.0, target_class=0)
    r = bench.run(_Inspects("inspects", said), "int8-static")
    assert r["defense"]["gradient_path"] == "surrogate"
    agree = r["quant"]["audit"]["surrogate_agreement"]
    assert agree["data"] == "calibration" and agree["rel_tolerance"] == r["quant"]["audit"]["surrogate_rel_tolerance"]
    control = r["verdict"]["controls"]["surrogate_agrees_with_runtime"]
    measured = bench.surrogate_agreement("int8-static")
    assert [m["data"] for m in measured] == ["calibration", "held-out", "triggered"]
    assert all(m["within_tolerance"] and m["top1_agreement"] >= 0.98 for m in measured), measured
    assert control["passed"] and control["value"] == min(m["top1_agreement"] for m in measured)
    assert r["verdict"]["status"] == "detected" and r["verdict"]["target_class"] == 0  # an agreeing surrogate: as said
    # a defense that reads outputs only inspects the deployed model itself: no surrogate, no control
    r = bench.run(_Says("outputs", said), "int8-static")
    assert r["defense"]["gradient_path"] == "deployed" and "surrogate_agrees_with_runtime" not in r["verdict"]["controls"]
    assert problems(r) == [] and _validator().is_valid(r)


@pytest.mark.parametrize("measured", [
    [{"data": "held-out", "n_images": 10, "top1_agreement": 0.5, "max_rel_logit_delta": 0.3}],  # disagrees
    RuntimeError("the runtime fell over"),  # could not be measured
])
def test_a_surrogate_that_disagrees_with_the_runtime_makes_the_verdict_invalid(monkeypatch, measured):
    from qbd.evaluate import Bench
    from qbd.outcomes import judge
    from qbd.reason_codes import NEVER_EXPECTED

    def agreement(self, scheme, engine=None):
        if isinstance(measured, Exception):
            raise measured
        return measured

    monkeypatch.setattr(Bench, "surrogate_agreement", agreement)
    said = Verdict("detected", score=2.5, threshold=1.0, target_class=0)
    r = _int8_static_bench().run(_Inspects("inspects", said), "int8-static")
    v = r["verdict"]
    assert v["status"] == "invalid" and v["reason_code"] == "surrogate-disagrees" and "surrogate-disagrees" in NEVER_EXPECTED
    assert v["controls"]["surrogate_agrees_with_runtime"]["passed"] is False
    # what the defense said about the surrogate is kept, not passed off as the deployed model's verdict
    assert v["evidence"]["surrogate_verdict"] == {"status": "detected", "target_class": 0, "score": 2.5, "threshold": 1.0,
                                                  "reason_code": None}
    assert judge(r, None).judgement == "FAIL"  # it matched the truth on the surrogate, and still fails
    assert problems(r) == [] and _validator().is_valid(r)


@pytest.mark.parametrize(("status", "reason", "code"), [
    ("invalid", None, "no-signal"), ("invalid", "r", None), ("invalid", "r", "bogus"), ("clean", None, "no-signal"),
    ("maybe", None, None), ("detected", None, None), ("invalid", "r", "timeout"), ("clean", "fine", None),
])
def test_the_schema_and_the_one_verdict_rule_agree(status, reason, code):
    """qbd.reason_codes.verdict_problems (Verdict, sandbox, problems()) and the JSON Schema's
    if/then/else accept and refuse the same verdicts."""
    from qbd.reason_codes import verdict_problems

    verdict = {"status": status, "score": None, "threshold": None, "target_class": None, "reason": reason,
               "reason_code": code, "evidence": {}, "controls": {}}
    import jsonschema

    from qbd.results import schema

    only_verdict = {"$schema": schema()["$schema"], "$defs": schema()["$defs"], "$ref": "#/$defs/verdict"}
    schema_ok = not list(jsonschema.Draft202012Validator(only_verdict).iter_errors(verdict))
    assert schema_ok == (verdict_problems(status, reason, code) == [])


# -- the Result's types (qbd.result_types): the one definition of its JSON -------------------------------
def test_the_shipped_schema_is_the_types_schema():
    """qbd/schema/result.schema.json is written from the types (scripts/write_schema.py): a type
    edited without rewriting it fails here."""
    import json
    from importlib import resources

    from qbd.result_types import json_schema

    shipped = json.loads((resources.files("qbd") / "schema" / "result.schema.json").read_text(encoding="utf-8"))
    assert shipped == json_schema(), "run: python scripts/write_schema.py"
    assert shipped["$defs"]["verdict"]["properties"]["status"]["enum"] == ["detected", "clean", "invalid"]


_ODD_VALUES = [KeyError, None, True, -1, 0, 2, 2.0, 0.5, 1.5, "", "x", "0" * 64, [], [0.1, 0.9], {}, {"passed": True}]


def _paths(node, prefix=()):
    """Every key path of a JSON object (into objects, not lists)."""
    for k, v in node.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))


def _objects(node, prefix=()):
    """The path of every JSON object in `node`, itself included."""
    yield prefix
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _objects(v, (*prefix, k))


def _varied(real_results):
    """Real Results (a detection with controls, a crash, a clean model's) plus what those lack: a
    memo, zoo and fetched weights, a blend attack, a placement note, a measured agreement."""
    import copy

    crash = next(r for r in real_results if r["defense"]["name"] == "crashes" and r["attack"] is not None)
    detection = next(r for r in real_results if r["defense"]["name"] == "names-one" and r["attack"] is not None)
    clean = next(r for r in real_results if r["defense"]["name"] == "spectral-signatures" and r["attack"] is None)
    more = copy.deepcopy(detection)
    more["memo"] = {"key": "a" * 64, "reused": True, "session": "s", "filed": True}
    more["weights"] = {"origin": "zoo", "zoo_key": "k", "file": "m.safetensors", "sha256": "ab"}
    more["attack"].update(name="blend", alpha=0.15)
    more["placement"]["note"] = "int8-static runs on cpu only"
    more["quant"]["audit"]["surrogate_agreement"] = {"data": "calibration", "n_images": 8, "runtime_batch": 1,
                                                     "max_abs_logit_delta": 0.01, "max_abs_runtime_logit": 3.0,
                                                     "max_rel_logit_delta": 0.003, "top1_agreement": 1.0,
                                                     "rel_tolerance": None, "within_tolerance": None}
    fetched = copy.deepcopy(clean)
    fetched["weights"] = {"origin": "fetched", "store_key": "k", "source": "m.pt", "sha256": "ab"}
    return [crash, detection, clean, more, fetched]


def test_the_schema_and_the_check_agree_on_every_mutation(real_results):
    """Derived from one definition, the JSON Schema and problems() accept and refuse the same
    Results: each key of varied real Results removed or set to each of a set of odd values, and a
    key no type names added to each object. Either one drifting from the other fails."""
    v = _validator()
    refused = 0
    for result in _varied(real_results):
        assert problems(result) == [] and v.is_valid(result)
        mutants = [_broken(result, path, value) for path in _paths(result) for value in _ODD_VALUES]
        mutants += [_broken(result, (*path, "added_by_someone"), 1) for path in _objects(result)]
        for r in mutants:
            by_schema, by_check = not v.is_valid(r), bool(problems(r))
            refused += by_check
            assert by_schema == by_check, (problems(r), [e.message for e in v.iter_errors(r)][:3])
    assert refused > 1000  # the mutations do reach the checks
    # the two differences with Python's jsonschema, by design: JSON has no NaN, so qbd refuses one
    # that Python's json let in; and a pattern's "$" is ECMA-262's (JSON Schema's regex dialect),
    # which, unlike Python's re, does not match before a trailing newline
    nan = _broken(real_results[0], ("clean_acc",), float("nan"))
    assert problems(nan) == ["clean_acc must be a number, not nan"] and v.is_valid(nan)
    newline = _broken(_varied(real_results)[3], ("memo", "key"), "a" * 64 + "\n")
    assert [p.split(",")[0] for p in problems(newline)] == ["memo.key must match ^[0-9a-f]{64}$"] and v.is_valid(newline)


def test_an_older_results_file_reads_and_writes_back_byte_for_byte():
    """A results file an earlier qbd wrote (100 zoo models' Results, its keys sorted): every Result
    reads into the types and writes back the same JSON text, key order included."""
    import json
    from pathlib import Path

    from qbd.result_types import Result

    old = json.loads((Path(__file__).resolve().parents[2] / "fixtures" / "calibration" / "seeds-100-104.json").read_text())
    assert len(old["results"]) == 100
    for r in old["results"]:
        assert json.dumps(Result.from_dict(r).to_dict()) == json.dumps(r)


def test_a_result_reads_into_its_types_and_back_unchanged(real_results):
    from qbd.result_types import ControlPart, Result, VerdictPart

    for r in real_results:
        typed = Result.from_dict(r)
        assert typed.to_dict() == r
        assert isinstance(typed.verdict, VerdictPart) and typed.verdict.status == r["verdict"]["status"]
        assert all(isinstance(c, ControlPart) for c in typed.verdict.controls.values())
        assert typed.quant.audit.quantized_param_fraction == r["quant"]["audit"]["quantized_param_fraction"]
        assert typed.cell_id.id == r["cell"] and typed.cell_id.control == ("backdoored" if r["attack"] else "clean")
    with_more = {**real_results[0], "added_by_a_newer_qbd": {"x": 1}}  # unknown keys are kept, not dropped
    assert Result.from_dict(with_more).to_dict() == with_more


def test_a_bad_result_does_not_read_into_its_types(real_results):
    from qbd.result_types import Result, ResultError

    cell = re.escape(real_results[0]["cell"])
    with pytest.raises(ResultError, match=rf"^Result {cell}: verdict\.status must be one of detected, clean, invalid"):
        Result.from_dict(_broken(real_results[0], ("verdict", "status"), "maybe"))
    with pytest.raises(ResultError, match=r"missing key 'quant'"):
        Result.from_dict(_broken(real_results[0], ("quant",)))
    with pytest.raises(ResultError, match=r"cell must match"):  # a cell id that does not parse
        Result.from_dict(_broken(real_results[0], ("cell",), "oops"))
    with pytest.raises(ResultError, match=r"seed must be >= 0, got -1"):
        Result.from_dict(_broken(real_results[0], ("seed",), -1))


def test_a_typed_result_survives_copy_and_pickle():
    """ABSENT stays the one ABSENT through a copy or a pickle, so the copy writes the same JSON."""
    import copy
    import json
    import pickle

    from qbd.result_types import Result
    from qbd.shapes import ABSENT

    typed = Result.from_dict(_result())
    assert typed.memo is ABSENT
    for other in (copy.deepcopy(typed), copy.copy(typed), pickle.loads(pickle.dumps(typed))):
        assert other == typed and other.memo is ABSENT and json.dumps(other.to_dict()) == json.dumps(typed.to_dict())


def test_every_open_record_keeps_the_keys_it_does_not_name():
    """A record that is not closed has an `extra` field, so no key of the JSON is lost on the way
    through the types (a record without one would drop it without a word)."""
    import dataclasses

    from qbd import result_types
    from qbd.shapes import Record

    parts = [c for c in vars(result_types).values() if isinstance(c, type) and issubclass(c, Record) and dataclasses.is_dataclass(c)]
    assert len(parts) >= 18
    assert [c.__name__ for c in parts if not c.closed and "extra" not in {f.name for f in dataclasses.fields(c)}] == []
    audit = {**_result()["quant"]["audit"], "added_later": 1}
    assert result_types.Audit.from_dict(audit).to_dict() == audit


def test_an_audit_built_by_a_scheme_equals_its_json_read_back(real_results):
    """Lists stay lists and the measured agreement a dict, so a built Audit and the same Audit
    read back compare equal, and the record shares nothing with the JSON it was read from."""
    from qbd.result_types import Audit

    audit = next(r for r in real_results if r["quant"]["scheme"] == "int8-dynamic")["quant"]["audit"]
    built = Audit(**{k: v for k, v in audit.items()})
    read = Audit.from_dict(audit)
    assert read == built and isinstance(read.quantized_modules, list)
    read.quantized_modules.append("edited")  # frozen is shallow, but the JSON it came from is untouched
    assert "edited" not in audit["quantized_modules"]


def test_an_old_audit_reads_and_writes_back_as_it_was():
    """A results file from before the audit's other fields existed: the four required facts are
    enough, and the absent ones stay absent when written back."""
    from qbd.result_types import Result
    from qbd.shapes import ABSENT

    old = _result()
    typed = Result.from_dict(old)
    assert typed.quant.audit.backend is ABSENT and typed.to_dict() == old


def test_a_bench_that_breaks_the_contract_fails_where_it_builds_the_result(monkeypatch):
    """Bench.run checks its Result against the types where it makes it: a scheme whose audit claims a
    quantized fraction outside [0, 1] fails in the bench, not in a reader of the results file."""
    import dataclasses

    from qbd.evaluate import Bench
    from qbd.models import build_model
    from tests.toy import toy_split

    data = toy_split(n_train=100, n_test=60)
    bench = Bench(data, build_model("tiny-cnn", 4, data.mean, data.std, seed=0).eval(), None, model_name="tiny-cnn")
    qm = bench.quantized("fp32")
    monkeypatch.setattr(qm, "audit", dataclasses.replace(qm.audit, quantized_param_fraction=1.5))
    with pytest.raises(ValueError, match=r"quant.audit.quantized_param_fraction must lie in \[0, 1\], got 1.5"):
        bench.run(_Says("names-one", Verdict("clean")), "fp32")

    class OwnAudit:  # a third-party scheme's audit of its own type, with a to_dict() as before the types
        def __init__(self, d):
            self.d = d

        def to_dict(self):
            return dict(self.d)

    real = dataclasses.replace(qm.audit, quantized_param_fraction=0.0).to_dict()
    monkeypatch.setattr(qm, "audit", OwnAudit(real))
    assert bench.run(_Says("says-clean", Verdict("clean")), "fp32")["quant"]["audit"] == real


def test_a_cell_id_is_a_type_that_reads_back():
    from qbd.result_types import Cell

    for text in ("digits/int8-dynamic/strip[paper]", "synthetic:clean/fp32/neural-cleanse[canonical]"):
        cell = Cell.parse(text)
        assert cell.id == text and Cell.from_dict(cell.to_dict()) == cell and ":clean" not in cell.row
    for bad in ("digits/fp32/strip", "digits/fp32/strip[paper]/x", "a:b:clean/fp32/s[paper]", "d/fp32/s [paper]", 3):
        with pytest.raises(ValueError, match="not a cell id"):
            Cell.parse(bad)
    with pytest.raises(ValueError, match="not a cell"):  # a part the id cannot carry
        Cell.from_dict({"dataset": "d/x", "scheme": "fp32", "defense": "s", "protocol": "paper"})


def test_a_results_file_of_another_format_is_refused(tmp_path):
    import json

    from qbd.results import ResultError, load, write

    path = write(tmp_path / "results.json", [_result()])
    doc = json.loads(path.read_text())
    doc["schema"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultError, match="results format 2, but this qbd reads format 1"):
        load(path)
