"""The one GPU command (``python -m bench.gpu_run``) in its dry run: tiny shapes on CPU through
the interpreter, every stage, results folder with its README table (issue 11, item 6)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from subprocs import measuring_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_run_dry_run_writes_every_stage(tmp_path):
    env = dict(measuring_env(), TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-m", "bench.gpu_run", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert not any("error" in s for s in stages.values() if isinstance(s, dict)), stages
    runs = {n: r for n, r in stages["headline"].items() if n != "bwd_builds"}
    assert stages["tests"]["rc"] == 0 and all(r["rc"] == 0 for r in runs.values()), stages
    assert stages["warm"]["rc"] == 0 and stages["warm"]["warm"]["binaries"] > 200, stages["warm"]  # counted only
    assert "bench.warm" in (tmp_path / "README.md").read_text()
    # the smoke stage, through the interpreter: every check passed, its verdict heads the README
    smoke = json.loads((tmp_path / "smoke.json").read_text())
    assert stages["smoke"]["rc"] == 0 and smoke["verdict"] == "pass" and smoke["interpreter"], smoke["summary"]
    assert set(smoke["builds"]) == {"split", "fused", "fused_atomic", "stress"}, smoke["builds"]
    assert "not applied" in smoke["debug_constants"]  # POLL_LIMIT / STALL_NS are compiled-only
    checks = {c["name"]: c for c in smoke["checks"]}
    assert checks["small.fused"]["semaphores"]["ok"] and checks["small.stress"]["bitwise_equal"]["q"], checks
    assert checks["n4096.fused"]["oracle"] == "sdpa, float32" and checks["small.split"]["oracle"] == "reference, float64"
    lines = (tmp_path / "README.md").read_text().splitlines()
    assert lines[4].startswith("**Smoke verdict: PASS**"), lines[:8]
    assert any(line.startswith("| small.fused | pass |") for line in lines)  # a row per check under the verdict
    stage_rows = lines[lines.index("| stage | result | seconds | files |") + 2:]
    assert stage_rows[0].startswith("| bench.smoke") and stage_rows[1].startswith("| headline |"), stage_rows
    assert stages["headline"]["bwd_builds"]["rows"] >= 1, stages["headline"]  # fused vs split, same run
    assert "fused vs split fwd+bwd over" in (tmp_path / "bwd_builds.md").read_text()
    assert "the ordered dQ adds take" in (tmp_path / "bwd_builds.md").read_text()  # the atomic build ran too
    for name in ("README.md", "env.json", "headline.json", "memory.json", "report.md", "tiles.md", "tiles.json",
                 "e2e.json", "smoke.json", "smoke.log"):
        assert (tmp_path / name).exists(), name
    winners = json.loads((tmp_path / "tiles.json").read_text())["winners"]["40"]
    assert set(winners) == {"fwd", "dkvq", "dq", "dkv"} and all("tiles" in w for w in winners.values()), winners
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["triton"]["finite"] and e2e["triton"]["rel_err_vs_reference"] < 1e-4, e2e
    readme = (tmp_path / "README.md").read_text()
    assert "pytest tests -m gpu" in readme and "tile sweep D=40" in readme and "denoising step" in readme


def test_compare_builds_pairs_rows_by_name():
    """The fused-vs-split table pairs the triton fwd+bwd rows of the two runs by name."""
    from bench.gpu_run import builds_markdown, builds_summary, compare_builds

    def run(rows):
        return {"benchmarks": [{"name": n, "stats": {"median": m}} for n, m in rows.items()]}

    a = "test_attention[vb512.down0-up3.B1F16N4096H8D40M4096.videobooth-triton-fwd+bwd-bf16]"
    b = "test_attention[vb256.mid.B1F16N16H8D160M16.videobooth-triton-fwd+bwd-bf16]"
    fwd = "test_attention[vb256.mid.B1F16N16H8D160M16.videobooth-triton-fwd-bf16]"
    split = run({a: 0.020, b: 0.001, fwd: 0.004})
    fused = run({a: 0.010, fwd: 0.002, b: 0.002})
    rows = compare_builds(split, fused)
    assert [(r[0], round(r[4], 6)) for r in rows] == [(b, 0.5), (a, 2.0)]
    assert "geometric mean speed-up 1.00x, range 0.50x .. 2.00x" in builds_summary(rows)
    assert "atomic" not in builds_summary(rows)
    assert builds_markdown(rows).count("\n| test_attention[") == 2
    assert compare_builds(split, run({})) == [] and builds_summary([]) == "no row in both runs"
    # with the atomic build's run: the ordering cost, fused (ordered) / atomic, where it has the row
    rows = compare_builds(split, fused, run({a: 0.008}))
    assert [r[3] for r in rows] == [None, 8.0]
    assert "ordered dQ adds take 1.25x the atomic build's time (geometric mean over 1 shapes" in builds_summary(rows)
    assert "| 10.0000 | 8.0000 | 2.00 | 1.25 |" in builds_markdown(rows)


def test_bench_triton_rows_take_the_dq_mode_from_the_environment(monkeypatch):
    """VB_BENCH_DQ=atomic: the bench's triton callable passes deterministic=False (what gpu_run's
    atomic build run relies on); anything but ordered / atomic is refused by name."""
    from bench import backends

    monkeypatch.delenv("VB_BENCH_DQ", raising=False)
    assert backends.attention("triton").keywords == {"backend": "triton", "deterministic": True}
    monkeypatch.setenv("VB_BENCH_DQ", "atomic")
    assert backends.attention("triton").keywords == {"backend": "triton", "deterministic": False}
    monkeypatch.setenv("VB_BENCH_DQ", "fast")
    with pytest.raises(ValueError, match="VB_BENCH_DQ: expected 'ordered' or 'atomic', got 'fast'"):
        backends.attention("triton")


def test_warm_compiles_the_gpu_tests_binaries_into_the_cache(tmp_path):
    """bench.warm records the headline rows' and the GPU tests' triton calls, dedupes their
    binaries and compiles them for sm_90 into Triton's cache (here the first one: the forward of
    the first headline row)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VB_BWD", "VB_TILES")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    res = subprocess.run([sys.executable, "-m", "bench.warm", "--workers", "1", "--limit", "1", "--json",
                          str(tmp_path / "warm.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((tmp_path / "warm.json").read_text())
    assert out["binaries"] > 100 and out["compiled"] == 1 and "cut" not in out, out
    assert "_bwd_dkv_kernel" in out["kernels"] and "_fwd_kernel" in out["kernels"]
    cubins = list((tmp_path / "cache").rglob("*.cubin"))
    assert len(cubins) == 1 and cubins[0].stem == "_fwd_kernel", cubins


_KEY_CHECK = r"""
import inspect, json, re
from triton import knobs
from triton.compiler.compiler import ASTSource, get_cache_invalidating_env_vars, get_cache_key
from triton.runtime.jit import JITFunction
from bench import warm
from vb_kernels.impl.fused import aot

def cache_key(kern, bound):
    backend, kwargs, bound_args, spec, options = bound
    options, sig, consts, attrs = kern._pack_args(backend, kwargs, bound_args, spec, options)
    src = ASTSource(kern, sig, consts, attrs)
    return get_cache_key(src, backend, backend.parse_options(dict(options.__dict__, **src.parse_options())),
                         get_cache_invalidating_env_vars())

added = sorted(set(re.findall(r"kwargs\[.(\w+).\]\s*=", inspect.getsource(JITFunction.run))))
found = warm.binaries()
same = 0
for _key, kern, args, kwargs, bound in found:
    # what JITFunction.run adds to a launch's keywords before it binds them
    launch = dict(kwargs, debug=kwargs.get("debug", kern.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    same += cache_key(kern, bound) == cache_key(kern, aot.bind_launch(kern, args, launch))
print(json.dumps([added, same, len(found)]))
"""


@pytest.mark.parametrize("debug", ["", "1"], ids=["default", "TRITON_DEBUG"])
def test_warm_compiles_what_the_launcher_looks_up(debug):
    """Triton's cache key (source, specialisation, options, target, env) of every binary
    bench.warm compiles equals the key a launch with the same arguments looks up, also under
    TRITON_DEBUG=1 (debug binaries), so that the GPU tests read the warm binaries instead of
    compiling them again; and the launcher (``JITFunction.run``) adds no keyword but the two
    bench.warm adds too: a triton that keys on more fails here, not silently on the GPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VB_BWD", "VB_TILES", "TRITON_DEBUG")}
    if debug:
        env["TRITON_DEBUG"] = debug
    res = subprocess.run([sys.executable, "-c", _KEY_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    added, same, total = json.loads(res.stdout.strip().splitlines()[-1])
    assert added == ["debug", "instrumentation_mode"], added
    assert total > 100 and same == total, (same, total)


def test_budget_fits_ten_minutes_and_the_smoke_comes_first():
    """The stages' budgets: the smoke's 20 s inside the 10 minutes (with start-up and the stages'
    margins), the smoke right after warm and before the headline."""
    from bench import gpu_run, smoke

    assert sum(gpu_run.BUDGET_S.values()) <= 570 and gpu_run.BUDGET_S["smoke"] == smoke.BUDGET_S == 20
    assert gpu_run.STAGES[:3] == ("warm", "smoke", "headline")


def test_a_smoke_that_saw_the_ordered_build_trap_keeps_it_out_of_the_later_stages(tmp_path, monkeypatch):
    """Where the smoke saw the fused ordered build trap or hang, the headline leaves its rows out,
    the GPU tests deselect the fused tests and the sweep its dkvq candidates (under the default
    poll limit a wait that never passes takes minutes); a failed tolerance alone does not."""
    from bench import gpu_run

    assert gpu_run.fused_ordered_blocked({}) is None
    ok = {"smoke": {"smoke": {"builds": {"split": "pass", "fused": "fail", "fused_atomic": "pass", "stress": "pass"}}}}
    assert gpu_run.fused_ordered_blocked(ok) is None
    bad = {"smoke": {"smoke": {"builds": {"split": "pass", "fused": "pass", "stress": "hang"}}}}
    reason = gpu_run.fused_ordered_blocked(bad)
    assert reason == "left out: the smoke stage saw the ordered build stress: hang"
    runs = []

    def fake_run(cmd, timeout, log, env=None):
        runs.append((cmd, (env or {}).get("VB_BWD"), (env or {}).get("VB_BENCH_DQ")))
        return {"cmd": " ".join(cmd), "rc": 0, "seconds": 0.0, "summary": ""}

    monkeypatch.setattr(gpu_run, "_run", fake_run)
    res = gpu_run.stage_headline(tmp_path, False, reason)
    assert res["headline_fused"]["rc"] == "skipped" and res["headline_fused"]["summary"] == reason
    assert [(b, dq) for _, b, dq in runs if b] == [("split", "ordered"), ("fused", "atomic")]
    res = gpu_run.stage_tests(tmp_path, False, reason)
    assert runs[-1][0][-2:] == ["-k", "not fused"] and reason in res["note"]
    gpu_run.stage_tests(tmp_path, False, None)
    assert "-k" not in runs[-1][0]
