"""The benchmark report (bench/report.py): from a real smoke run's JSON and from synthetic GPU-like
rows, the speedups, memory ratios, goals, markdown and plots come out right."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from subprocs import measuring_env

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory) -> Path:
    """JSON of a real smoke run of two rows (reference and sdpa, forward) of bench/."""
    path = tmp_path_factory.mktemp("bench") / "smoke.json"
    cmd = [sys.executable, "-m", "pytest", "bench/bench_attention.py", "-m", "smoke", "-q",
           "-p", "no:cacheprovider", "-k", "smoke.vb and fwd- and (reference or sdpa)",
           f"--benchmark-json={path}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=measuring_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return path


def _bench(case, name, backend, mode, ms, *, peak=None, n=1024, d=40, set_="vb256", schedule="videobooth",
           dtype="bf16", pct=None):
    """One benchmark entry with pytest-benchmark's structure and the suite's extra_info."""
    return {
        "name": f"test_attention[{case}-{backend}-{mode}-{dtype}]", "group": f"{case} {mode} {dtype}",
        "stats": {"median": ms / 1e3, "min": ms / 1e3, "rounds": 3},
        "extra_info": {
            "kind": "op", "model": None, "set": set_, "case": case, "name": name,
            "shape": {"B": 1, "F": 16, "N": n, "H": 8, "D": d, "M": n}, "schedule": schedule,
            "backend": backend, "mode": mode, "dtype": dtype, "median_ms": ms, "peak_mib": peak,
            "tflops": 100.0, "pct_matmul_peak": pct, "rel_err": 1e-3, "matmul_peak_tflops": 750.0,
            "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "commit": "abc123",
        },
    }


def _synthetic(tmp_path) -> Path:
    top, mid = "vb256.down0-up3.B1F16N1024H8D40M1024.videobooth", "vb256.down1-up2.B1F16N256H8D80M256.videobooth"
    win = "sched.window4.B1F16N1024H8D40M1024.window4"
    benches = [
        # top level, fwd+bwd: triton 4x reference, 2x the best SDPA (flash), a quarter of the memory
        _bench(top, "down0-up3", "reference", "fwd+bwd", 8.0, peak=400.0),
        _bench(top, "down0-up3", "sdpa-flash", "fwd+bwd", 4.0, peak=200.0),
        _bench(top, "down0-up3", "sdpa-efficient", "fwd+bwd", 5.0, peak=210.0),
        _bench(top, "down0-up3", "flex", "fwd+bwd", 3.0, peak=150.0),
        _bench(top, "down0-up3", "triton", "fwd+bwd", 2.0, peak=100.0),
        # second level, fwd: triton only 1.2x the best SDPA (efficient), so that goal is not met
        _bench(mid, "down1-up2", "reference", "fwd", 3.0, peak=50.0, n=256, d=80),
        _bench(mid, "down1-up2", "sdpa-flash", "fwd", 1.5, peak=20.0, n=256, d=80),
        _bench(mid, "down1-up2", "sdpa-efficient", "fwd", 1.2, peak=20.0, n=256, d=80),
        _bench(mid, "down1-up2", "triton", "fwd", 1.0, peak=10.0, n=256, d=80),
        # window schedule: triton 1.5x flex
        _bench(win, "window4", "reference", "fwd", 6.0, set_="sched", schedule="window4"),
        _bench(win, "window4", "flex", "fwd", 3.0, set_="sched", schedule="window4"),
        _bench(win, "window4", "triton", "fwd", 2.0, set_="sched", schedule="window4"),
        {"name": "test_unrelated", "group": None, "stats": {"median": 1.0}, "extra_info": {}},
    ]
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"benchmarks": benches, "machine_info": {}, "commit_info": {}}))
    return path


def test_speedups_against_reference_and_best_sdpa_and_memory_ratio(tmp_path):
    rows = {(r["name"], r["mode"], r["backend"]): r for r in report.compare(report.load([_synthetic(tmp_path)]))}
    tri = rows[("down0-up3", "fwd+bwd", "triton")]
    assert tri["x_ref"] == pytest.approx(4.0)
    assert tri["x_sdpa"] == pytest.approx(2.0) and tri["best_sdpa"] == "sdpa-flash"
    assert tri["mem_ratio"] == pytest.approx(0.25)
    assert rows[("down0-up3", "fwd+bwd", "reference")]["x_ref"] == pytest.approx(1.0)
    mid = rows[("down1-up2", "fwd", "triton")]
    assert mid["best_sdpa"] == "sdpa-efficient" and mid["x_sdpa"] == pytest.approx(1.2)
    # No SDPA row for the window case: no SDPA speedup rather than a made-up one.
    assert rows[("window4", "fwd", "triton")]["x_sdpa"] is None
    assert ("test_unrelated", None, None) not in rows and len(rows) == 12


def test_goals_say_met_not_met_and_no_data(tmp_path):
    text = "\n".join(report.goals(report.compare(report.load([_synthetic(tmp_path)]))))
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "not met (1/2 rows)" in lines[">= 1.5x the best SDPA backend, every VideoBooth shape, fwd and fwd+bwd"]
    assert "worst 1.2" in lines[">= 1.5x the best SDPA backend, every VideoBooth shape, fwd and fwd+bwd"]
    assert "met (2/2 rows)" in lines[">= 1.5x reference, every VideoBooth shape, fwd and fwd+bwd"]
    assert "met (1/1 rows)" in lines[">= 1.3x FlexAttention on window and keyframe schedules"]
    assert "met (1/1 rows)" in lines["training-step (fwd+bwd) peak memory <= 0.5x reference"]
    assert "no data" in lines[">= 60% of the bf16 matmul peak, fwd, D=128, N >= 4096"]


def test_report_command_on_a_real_smoke_run_and_synthetic_gpu_rows(smoke_json, tmp_path):
    out = tmp_path / "out"
    gpu = _synthetic(tmp_path)
    done = subprocess.run([sys.executable, "-m", "bench.report", str(smoke_json), str(gpu), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    md = (out / "report.md").read_text()
    # The real rows: both backends, with their speedups against the reference.
    smoke = [line for line in md.splitlines() if line.startswith("| vb | B1 F3 N16")]
    assert [line.split(" | ")[5] for line in smoke] == ["reference", "sdpa"]
    assert smoke[0].split(" | ")[7] == "1.00x"
    assert "CPU" in md and "NVIDIA H100 80GB HBM3" in md
    # The headline: triton per VideoBooth shape, with the best SDPA backend named.
    assert "| vb256 | down0-up3 |" in md and "2.00x (sdpa-flash)" in md and "| 0.25 |" in md
    for name in ("smoke.png", "vb256.png", "sched.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in md
    assert (out / "smoke.json").exists() and (out / "gpu.json").exists()  # results kept beside the report


def test_real_rows_carry_what_the_issue_asks_for(smoke_json):
    rows = report.load([smoke_json])
    assert {r["backend"] for r in rows} == {"reference", "sdpa"}
    for r in rows:
        for key in ("median_ms", "flops", "tflops", "pct_matmul_peak", "matmul_peak_tflops", "device",
                    "torch", "triton", "commit", "shape", "schedule", "dtype", "mode", "rel_err", "peak_mib"):
            assert key in r, key
        assert r["median_ms"] > 0 and r["flops"] > 0 and r["rel_err"] < 1e-5


def test_median_falls_back_to_the_stats_and_device_names_become_folders(tmp_path):
    entry = _bench("vb256.x", "x", "reference", "fwd", 2.0)
    entry["extra_info"]["median_ms"] = None
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": [entry]}))
    assert report.load([path])[0]["median_ms"] == pytest.approx(2.0)
    assert report.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert report.slug("CPU (AMD EPYC)") == "cpu-amd-epyc"
