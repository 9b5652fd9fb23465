"""Test-suite setup shared by every test folder."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _cores_per_worker() -> None:
    """Under `pytest -n N`, each worker gets cores/N torch threads (see qbd.pytest_plugin)."""
    import torch

    from qbd.pytest_plugin import _share_cores

    _share_cores(torch)
