"""The one GPU command (``python -m bench.gpu_run``) in its dry run: tiny shapes on CPU through
the interpreter, every stage, results folder with its README table (issue 11, item 6)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_run_dry_run_writes_every_stage(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-m", "bench.gpu_run", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert not any("error" in s for s in stages.values() if isinstance(s, dict)), stages
    assert stages["tests"]["rc"] == 0 and all(r["rc"] == 0 for r in stages["headline"].values()), stages
    for name in ("README.md", "env.json", "headline.json", "memory.json", "report.md", "tiles.md", "tiles.json",
                 "e2e.json"):
        assert (tmp_path / name).exists(), name
    winners = json.loads((tmp_path / "tiles.json").read_text())["winners"]["40"]
    assert set(winners) == {"fwd", "dkvq", "dq", "dkv"} and all("tiles" in w for w in winners.values()), winners
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["triton"]["finite"] and e2e["triton"]["rel_err_vs_reference"] < 1e-4, e2e
    readme = (tmp_path / "README.md").read_text()
    assert "pytest tests -m gpu" in readme and "tile sweep D=40" in readme and "denoising step" in readme
