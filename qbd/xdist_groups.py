"""pytest-xdist scheduling by model: every case of one (data set, model kind, seed, scheme) runs on
one worker, so a worker loads a model at most once and each quantized copy is made once.

Imported by the plugin's `pytest_xdist_make_scheduler` only, i.e. only under xdist. xdist's own
loadgroup names groups by rewriting each item's node id on the workers, which pytest 9 no longer
honours; here the controller maps node ids to groups itself, from the same case list that
parametrizes the tests (qbd.plugin.cases.groups_by_param_id). Tests that are not qbd cases are
scheduled one by one, as under `--dist load`; an xdist `@group` suffix is still honoured.
"""

from __future__ import annotations

from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling


def param_id(nodeid: str) -> str | None:
    """"test_x.py::test_cell[digits/fp32/strip[paper]]" -> "digits/fp32/strip[paper]"."""
    name = nodeid.rpartition("::")[2]
    _, bracket, rest = name.partition("[")
    return rest[:-1] if bracket and rest.endswith("]") else None


class GroupScheduling(LoadScopeScheduling):
    def __init__(self, config: pytest.Config, log: Any, groups: dict[str, str]) -> None:
        super().__init__(config, log)
        self.groups = groups

    def _split_scope(self, nodeid: str) -> str:
        if nodeid.rfind("@") > nodeid.rfind("]"):  # xdist's own xdist_group suffix
            return nodeid.rsplit("@", 1)[-1]
        return self.groups.get(param_id(nodeid) or "", nodeid)
