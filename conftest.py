"""Root conftest: hypothesis profiles only (selected by $HYPOTHESIS_PROFILE: dev (default), ci
(derandomized, what .ci/run uses), nightly (new random examples each night))."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
# nightly: fresh random examples every run, many more of them (.github/workflows/nightly.yml)
settings.register_profile("nightly", max_examples=1000, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# pytester drives qbd's own plugin in tests/plugin (qbd itself is loaded once, by its entry point)
pytest_plugins = ["pytester"]
