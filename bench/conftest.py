"""pytest options and session fixtures of the benchmark suite (the root conftest.py has already
set TRITON_INTERPRET=1 on a machine without CUDA; nothing here touches it)."""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="bench/: run the full grid of shapes, schedules and dtypes on a GPU "
                          "instead of the default subset (also BENCH_FULL=1)")


@pytest.fixture(scope="session")
def matmul_peak():
    """The bf16 matmul rate of this device, measured once per session."""
    from bench.measure import matmul_peak as measure

    return measure()
