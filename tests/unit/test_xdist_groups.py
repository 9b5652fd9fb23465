"""Scheduling groups: every qbd case maps to its (data set, model kind, seed, scheme) group, from the
same case list that parametrizes the tests (qbd.plugin.cases.matrix_cases)."""

from __future__ import annotations

import pytest

from qbd.plugin.cases import groups_by_param_id
from qbd.plugin.state import QbdState
from qbd.xdist_groups import param_id


def _state(seeds: int = 1) -> QbdState:
    names = {n: n for n in ("neural-cleanse", "strip")}
    return QbdState(tier="smoke", protocols=("canonical", "paper"), defenses=sorted(names), defense_names=names, seeds=seeds,
                    model_files={}, defense_timeout=None, device="cpu", cache_dir=None, data_root=None, report_dir=None,
                    accept=False, expectations_path=None)


@pytest.mark.parametrize(("nodeid", "expected"), [
    ("test_qbd.py::test_cell[digits/fp32/strip[paper]]", "digits/fp32/strip[paper]"),
    ("tests/m/test_m.py::test_attack[digits/int8-static]", "digits/int8-static"),
    ("test_qbd.py::test_cell[digits:clean/fp32/neural-cleanse[canonical]-seed3]", "digits:clean/fp32/neural-cleanse[canonical]-seed3"),
    ("test_qbd.py::test_plain", None),
    ("test_qbd.py::TestX::test_y[1]", "1"),
])
def test_param_id(nodeid: str, expected: str | None) -> None:
    assert param_id(nodeid) == expected


def test_one_seed_groups_by_model_and_scheme() -> None:
    groups = groups_by_param_id(_state())
    # 2 data sets x 4 schemes x 2 defenses x 2 protocols, backdoored and clean, + 8 attack/audit ids
    assert len(groups) == 32 + 32 + 8
    assert groups["digits/int8-static/strip[paper]"] == groups["digits/int8-static/neural-cleanse[canonical]"] \
        == groups["digits/int8-static"] == "qbd:digits:backdoored:seed0:int8-static"
    assert groups["digits:clean/fp32/strip[paper]"] == "qbd:digits:clean:seed0:fp32"
    assert groups["synthetic/fp32/strip[canonical]"] != groups["digits/fp32/strip[canonical]"]
    assert len(set(groups.values())) == 2 * 4 * 2  # data sets x schemes x (backdoored, clean)


def test_several_seeds_group_each_seed_apart() -> None:
    groups = groups_by_param_id(_state(seeds=3))
    assert "digits/fp32/strip[paper]" not in groups  # over several seeds every cell id carries its seed
    assert groups["digits/fp32/strip[paper]-seed2"] == "qbd:digits:backdoored:seed2:fp32"
    assert groups["digits:clean/int4-sim/strip[paper]-seed1"] == "qbd:digits:clean:seed1:int4-sim"
    assert len(set(groups.values())) == 2 * 2 * 3 * 4  # data sets x kinds x seeds x schemes (clean on every scheme)


def test_scheduler_scopes_qbd_cases_by_group_and_others_alone() -> None:
    from qbd.xdist_groups import GroupScheduling

    sched = GroupScheduling.__new__(GroupScheduling)  # _split_scope needs only the groups
    sched.groups = groups_by_param_id(_state())
    cell, attack = "t.py::test_cell[digits/int8-static/strip[paper]]", "t.py::test_attack[digits/int8-static]"
    assert sched._split_scope(cell) == sched._split_scope(attack) == "qbd:digits:backdoored:seed0:int8-static"
    assert sched._split_scope("t.py::test_other[3]") == "t.py::test_other[3]"  # not a qbd case: a scope of its own
    assert sched._split_scope("t.py::test_x[1]@mygroup") == "mygroup"  # xdist's own suffix, where pytest keeps it
