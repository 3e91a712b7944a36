"""Shared by tests/ and bench/. On a machine without a CUDA GPU the Triton kernels run through
the interpreter: TRITON_INTERPRET must be set before any @triton.jit function is created, so it
is set here, before the vb_kernels package is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# fp32 dots in IEEE precision, so DESIGN.md's fp32 tolerance (1e-5) means something on a GPU.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def _versions() -> str:
    """One line: the resolved versions the suite runs on (so a drift shows in the CI log)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in ("torch", "triton", "diffusers", "transformers", "accelerate", "open_clip_torch", "kernels"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} -")
    return "versions: " + ", ".join(parts) + f" (CUDA {'yes' if torch.cuda.is_available() else 'no'})"


def pytest_sessionstart(session):
    # written even under -q (pytest's own header is not), before any test runs
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(_versions())
