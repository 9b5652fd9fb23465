"""Benchmarks run only without xdist (pytest-benchmark disables its timers under xdist):
`pytest -p no:xdist -m bench tests/bench`. Under `pytest -n auto` they are skipped visibly."""

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    under_xdist = hasattr(config, "workerinput") or bool(getattr(config.option, "numprocesses", None))
    if not under_xdist:
        return
    skip = pytest.mark.skip(reason="benchmarks need -p no:xdist (pytest-benchmark disables itself under xdist)")
    for item in items:
        if "bench" in item.keywords:
            item.add_marker(skip)
