"""bench.smoke (bench.gpu_run's smoke stage) on the CPU: the supervisor that keeps a trap or a hang
from taking the stage with it (with a stand-in worker), the semaphore check in the interpreter
with its positive controls, the binaries bench.warm compiles for it, and its command line. The
whole stage in its dry run (every check through the interpreter) runs in tests/test_gpu_run.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bench import smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for ``bench.smoke --worker``: speaks its protocol; what each check does is in its name.
FAKE_WORKER = textwrap.dedent(r'''
    import json, os, sys, time
    EVENT = "@@smoke "
    def emit(ev):
        sys.stdout.write(EVENT + json.dumps(ev) + "\n"); sys.stdout.flush()
    names = sys.argv[sys.argv.index("--checks") + 1].split(",")
    if os.environ.get("FAKE_NO_START"):
        sys.stderr.write("ImportError: No module named 'torch'\n"); sys.exit(1)
    emit({"event": "ready", "device": "fake"})
    for name in names:
        emit({"event": "start", "name": name})
        # what the verdict file said once the supervisor had this check's start (written at once)
        for _ in range(100):
            seen = json.loads(open(os.environ["SMOKE_JSON"]).read())
            if {c["name"]: c["status"] for c in seen["checks"]}[name] == "running":
                break
            time.sleep(0.05)
        seen = {"verdict": seen["verdict"], "statuses": [c["status"] for c in seen["checks"]]}
        kind = name.split(".")[1].rstrip("0123456789")
        if kind == "hang":
            emit({"event": "launch", "kernel": "_bwd_dkv_kernel"})
            time.sleep(600)
        if kind == "die":  # the context lost mid-check: stderr names the CUDA error, no report
            sys.stderr.write("RuntimeError: CUDA error: unspecified launch failure\n"); sys.stderr.flush()
            os._exit(1)
        if kind == "trap":  # the worker caught the error, reports it and exits (its context is lost)
            emit({"event": "done", "name": name, "result": {"status": "trap", "detail": "illegal instruction"}})
            sys.exit(3)
        emit({"event": "done", "name": name, "result": {"status": "pass", "max_rel_err": 0.001, "seen": seen}})
''')


def _checks(*names):
    return [dict(name=n, shape=n.split(".")[0], build="fused", deterministic=True, debug={}, kind="grads")
            for n in names]


def _supervise(tmp_path, names, extra_env=None, **kw):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    env = dict(os.environ, SMOKE_JSON=str(tmp_path / "smoke.json"), **(extra_env or {}))
    return smoke.supervise(_checks(*names), tmp_path, [sys.executable, str(script)], env=env, **kw)


def test_supervisor_records_hangs_and_traps_and_goes_on(tmp_path):
    """A hung check is killed after the silence limit and recorded as a hang, a worker that dies
    mid-check with a CUDA launch failure as a trap, one that reports a trap too; a fresh worker
    runs the checks left each time, and the verdict file on disk says so after every check."""
    names = ["small.ok1", "small.hang1", "small.ok2", "small.die1", "small.trap1", "small.ok3"]
    state = _supervise(tmp_path, names, budget_s=120, silence_s=3)
    status = {c["name"]: c["status"] for c in state["checks"]}
    assert status == {"small.ok1": "pass", "small.hang1": "hang", "small.ok2": "pass", "small.die1": "trap",
                      "small.trap1": "trap", "small.ok3": "pass"}, state
    assert state["workers"] == 4 and state["verdict"] == "fail" and state["device"] == "fake"
    on_disk = json.loads((tmp_path / "smoke.json").read_text())
    assert on_disk["verdict"] == "fail" and [c["status"] for c in on_disk["checks"]] == list(status.values())
    assert "small.hang1: hang" in on_disk["summary"] and on_disk["builds"]["hang1"] == "hang"
    by = {c["name"]: c for c in on_disk["checks"]}
    assert "no progress for 3 s" in by["small.hang1"]["detail"] and "_bwd_dkv_kernel" in by["small.hang1"]["detail"]
    assert "unspecified launch failure" in by["small.die1"]["detail"]
    # written first (all pending, "running"), then after each check: what each check saw at its start
    assert by["small.ok1"]["seen"] == {"verdict": "running", "statuses": ["running"] + ["pending"] * 5}
    assert by["small.ok2"]["seen"]["statuses"][:3] == ["pass", "hang", "running"]
    assert by["small.ok3"]["seen"]["statuses"] == ["pass", "hang", "pass", "trap", "trap", "running"]
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write leaves no temp file


def test_supervisor_cuts_what_the_budget_does_not_reach(tmp_path):
    """The stage's deadline: the check running at it is cut (not a hang), the ones after it too."""
    state = _supervise(tmp_path, ["small.ok1", "small.hang1", "small.ok2"], budget_s=3, silence_s=60)
    assert [c["status"] for c in state["checks"]] == ["pass", "cut", "cut"], state
    assert state["verdict"] == "incomplete" and "2 cut by the budget" in state["summary"]


def test_supervisor_gives_up_on_a_worker_that_cannot_start(tmp_path):
    """A worker that exits before its first check (an import error) fails every check once, with
    its stderr, instead of being restarted for ever."""
    state = _supervise(tmp_path, ["small.ok1", "small.ok2"], extra_env={"FAKE_NO_START": "1"}, budget_s=60,
                       silence_s=5)
    assert [c["status"] for c in state["checks"]] == ["error", "error"] and state["workers"] == 1, state
    assert "No module named 'torch'" in state["checks"][0]["detail"]


def test_verdict_and_build_status():
    def checks(*statuses):
        return [{"name": f"s.{b}", "status": st} for b, st in statuses]

    assert smoke.verdict(checks(("split", "pass"), ("fused", "pass")))[0] == "pass"
    v, summary = smoke.verdict(checks(("split", "pass"), ("fused", "hang"), ("stress", "cut")))
    assert v == "fail" and "s.fused: hang" in summary and "1 cut" in summary
    assert smoke.verdict(checks(("split", "pass"), ("fused", "pending")))[0] == "running"
    assert smoke.build_status([{"name": "a.fused", "status": "pass"}, {"name": "b.fused", "status": "trap"},
                               {"name": "a.split", "status": "pass"}]) == {"fused": "trap", "split": "pass"}


def _fused_run(shape, sched, deterministic=True):
    from vb_kernels import videobooth_attention
    from vb_kernels.impl.fused import launch
    from vb_kernels.testing import make_inputs

    torch.manual_seed(0)
    leaves = [t.requires_grad_() for t in make_inputs(*shape)]
    rec = smoke.LaunchRecorder()
    with launch.intercept(rec):
        out = videobooth_attention(*leaves, schedule=sched, backend="triton", bwd_build="fused",
                                   deterministic=deterministic)
        out.backward(torch.randn_like(out))
    return rec


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run; tests/test_gpu_fused_backward.py on a GPU")
def test_semaphore_counts_in_the_interpreter_and_their_controls():
    """The ordered build's final counts equal (key blocks of the source) x THREADS per tile
    (phase 2 and phase 1, the image target longer than a frame: M > N), and the check fails
    where one count is off, where the phases come in the wrong order, and where no ordered
    launch ran (the atomic build)."""
    from vb_kernels import Schedule

    sched = Schedule.videobooth(3).with_image_everywhere()
    shape = (1, 3, 17, 2, 40, 40)  # M > N: the image has more key blocks than a frame
    rec = _fused_run(shape, sched)
    res = smoke.check_semaphores(rec.dkv, sched, True)
    assert res["ok"] and res["multiples"] and res["total"] == res["expected_total"] > 0, res
    want = [smoke.expected_semaphores(p.rows, 2, int(a["n_qt"]), 17, 40, int(a["BLOCK_N"]), int(a["THREADS"]))
            for p, a in zip(reversed(sched.plan(True)), rec.dkv)]
    assert len({int(x) for w in want for x in w.unique()} - {0}) >= 2  # two source lengths
    sem = rec.dkv[0]["sem"]
    sem.view(-1)[3] -= 1  # positive control: one count off
    bad = smoke.check_semaphores(rec.dkv, sched, True)
    assert not bad["ok"] and bad["wrong_tiles"] == 1 and not bad["multiples"] and "counted" in bad["first_wrong"]
    sem.view(-1)[3] += 1
    assert not smoke.check_semaphores(rec.dkv[::-1], sched, True)["ok"]  # phase 1's buffer read as phase 2's
    atomic = _fused_run(shape, sched, deterministic=False)
    res = smoke.check_semaphores(atomic.dkv, sched, True)
    assert not res["ok"] and "found 0" in res["detail"]


_WARM_CHECK = r"""
import json
from bench import smoke, warm
calls = smoke.smoke_calls()
found = warm.binaries(calls)
print(json.dumps({"prefix": warm.all_calls()[:len(calls)] == calls, "calls": len(calls), "checks": len(smoke.plan()),
                  "distinct": len({k[0] for k in found}) == len(found),
                  "dkv": sorted({(k[3].get("POLL_LIMIT"), k[3].get("STALL_NS"), k[3].get("DETERMINISTIC"))
                                 for k in found if k[1].__name__.startswith("_bwd_dkv")}, key=repr)}))
"""


def test_warm_compiles_the_smoke_binaries_with_their_debug_constants():
    """bench.warm's calls start with the smoke's; its dK/dV binaries include the ordered build
    with the short poll limit, and with the stalled warp, each its own binary (recorded as for
    sm_90, outside the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VB_BWD", "VB_TILES")}
    res = subprocess.run([sys.executable, "-c", _WARM_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["prefix"] and out["distinct"], out
    assert out["calls"] == out["checks"] + 2, out  # the stress checks run twice: without the stall, then with it
    dkv = [tuple(x) for x in out["dkv"]]
    assert (smoke.POLL_LIMIT, None, True) in dkv and (smoke.POLL_LIMIT, smoke.STALL_NS, True) in dkv, dkv
    assert (None, None, False) in dkv and (None, None, None) in dkv, dkv  # atomic and split: default constants


@pytest.mark.parametrize("args, message", [
    (["--out", "X", "--checks", "small.fused,bogus"], "--checks: unknown ['bogus']; expected names among"),
    (["--out", "X", "--budget", "0"], "--budget: expected a positive number of seconds, got 0.0"),
    (["--out", "X", "--silence", "-1"], "--silence: expected a positive number of seconds, got -1.0"),
    ([], "--out: expected a folder for smoke.json"),
])
def test_smoke_command_line_rejects_bad_input(args, message):
    res = subprocess.run([sys.executable, "-m", "bench.smoke", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and message in res.stderr, res.stderr
