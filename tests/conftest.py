"""Settings shared by every test.

Property-based tests (hypothesis) run derandomized and without an example database: the same
examples on every run and every machine, so CI never turns red on a run of luck and a failure
seen once is seen again. ``HYPOTHESIS_PROFILE=explore`` draws fresh random examples on each run,
for a local search for new counterexamples (each test keeps its own ``max_examples``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    derandomize=False,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
