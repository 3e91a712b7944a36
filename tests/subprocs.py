"""Environment for the pytest runs a test starts in a subprocess."""
from __future__ import annotations

import os


def measuring_env() -> dict:
    """``os.environ`` without pytest-xdist's worker variables. The CPU suite runs under xdist
    (README's test command); a pytest started from one of its tests inherits PYTEST_XDIST_WORKER,
    and pytest-benchmark then turns itself off (no timings, no --benchmark-json file)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
