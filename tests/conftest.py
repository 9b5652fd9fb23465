"""Test-suite setup shared by every test folder."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _cores_per_worker() -> None:
    """Under `pytest -n N`, each worker gets cores/N torch threads (qbd.plugin.session.share_cores)."""
    import torch

    from qbd.plugin.session import share_cores

    share_cores(torch)


# The suite's longest tests, longest first (`pytest -n auto --durations=40` on the 2-core Xeon:
# the synthetic NC row about 320 s, ten NC optimisations in series; the digits NC row 155 s; the
# int8-static-conditioned training 100 s; each other row ten models; an NC cell 20-50 s). They start
# first, so no worker is left alone with one of them at the end while the other idles.
LONGEST_FIRST = (
    "tests/matrix/test_rates.py::test_fp32_canonical_row_meets_its_declared_rates[synthetic-neural-cleanse]",
    "tests/matrix/test_rates.py::test_fp32_canonical_row_meets_its_declared_rates[digits-neural-cleanse]",
    "tests/unit/test_dormant_static.py::test_quant_conditioned_int8_static_trains_to_its_gate_on_digits",
    "tests/matrix/test_rates.py::",
    "neural-cleanse",
)


def _rank(nodeid: str) -> int:
    return next((i for i, part in enumerate(LONGEST_FIRST) if part in nodeid), len(LONGEST_FIRST))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: _rank(item.nodeid))  # stable: the rest keep pytest's order


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """`pytest -n auto` schedules with xdist's work stealing, unless a --dist is given: its default
    `load` hands each worker a quarter of its share of consecutive tests up front and never takes
    them back, so the longest tests (first, above) would queue on one worker while the other
    idles at the end. Work stealing splits the tests in contiguous halves (each module's tests stay
    together) and lets an idle worker take the tail of the other's queue."""
    if not config.pluginmanager.hasplugin("xdist") or config.getoption("dist", "no") != "load":
        return
    if not any(a == "-d" or a.startswith("--dist") for a in config.invocation_params.args):
        config.option.dist = "worksteal"
