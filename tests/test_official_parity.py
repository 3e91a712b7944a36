"""Parity with the official VideoBooth code itself (docs/official.md): runs only where a checkout
of Vchitect/VideoBooth and an unpacked diffusers 0.11.1 wheel are given by path
(``VB_OFFICIAL_REPO``, ``VB_DIFFUSERS_0111``); skipped otherwise (CI has neither). About 4 min
on 2 CPU cores."""
from __future__ import annotations

import os

import pytest

REPO = os.environ.get("VB_OFFICIAL_REPO")
DIFFUSERS_0111 = os.environ.get("VB_DIFFUSERS_0111")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (REPO and DIFFUSERS_0111 and os.path.isdir(REPO) and os.path.isdir(DIFFUSERS_0111)),
                                 reason="set VB_OFFICIAL_REPO and VB_DIFFUSERS_0111 to the official checkout and "
                                        "the unpacked diffusers 0.11.1 wheel")]


def test_ours_equals_the_official_code_on_random_weights():
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    from official_parity import parity  # tools/official_parity.py

    res = parity(REPO, DIFFUSERS_0111, backends=("reference", "sdpa"), frames=4, size=8, steps=6, log=lambda s: None)
    for backend in ("reference", "sdpa"):
        for key, value in res[backend].items():
            assert value < 1e-5, (backend, key, value)
    assert res["mapper"] == 0.0
    assert res["text"]["one occurrence"] == 0.0 and res["text"]["one occurrence, 73 tokens"] == 0.0
    assert res["timesteps_equal"] and res["sampling"] < 1e-4
