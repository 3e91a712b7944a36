"""Run the suite and write its report in one go:

    python -m bench [--full] [--out DIR] [any pytest option ...]

On a GPU: the GPU rows (the smoke set excluded; ``--full`` for the whole grid); on a CPU: the
smoke run. The JSON goes to ``DIR/results.json`` (default ``bench/results/<device>/``), then
``python -m bench.report`` writes ``report.md`` and the plots beside it. Exits with pytest's
status.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from .measure import REPO, environment
from .report import main as report, slug


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the full grid (--bench-full)")
    ap.add_argument("--out", type=Path, help="results folder (default: bench/results/<device>/)")
    args, pytest_args = ap.parse_known_args(argv)
    out = args.out or REPO / "bench" / "results" / slug(environment()["device"])
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-m",
           "not smoke" if torch.cuda.is_available() else "smoke", f"--benchmark-json={results}"]
    cmd += ["--bench-full"] if args.full else []
    rc = subprocess.run(cmd + pytest_args, cwd=REPO).returncode
    if results.exists():
        report([str(results), "--out", str(out)])
    return rc


if __name__ == "__main__":
    sys.exit(main())
