"""Everything a short GPU allocation should run, in one command, within a fixed time budget:

    python -m bench.gpu_run                 # on an H100/H200: about 10 minutes at most
    python -m bench.gpu_run --dry-run       # tiny shapes on CPU through the interpreter (CI)

Stages, in this order (the figures people wait for first; each with its own share of the
budget; a stage that runs out is cut and says so):
0. ``python -m bench.warm``: the triton binaries the smoke stage, the headline rows and the GPU
   tests launch (about 300) compiled in parallel, one process per CPU (at most 32), into
   Triton's cache, in order of first use, so that the stages after it time and test kernels
   instead of compiling.
1. ``python -m bench.smoke`` (at most 20 s, before anything is timed): each backward build
   (split, fused with ordered dQ adds, fused with atomic ones) at a small shape and at N 4096
   D 40 against an oracle and the split pair's gradients, the ordered build under a poll limit of
   2^20 (a hang traps in about a second), a stress run with one warp of every block delayed
   (bitwise the same gradients), the final semaphore counts; its verdict (``smoke.json``, written
   before the first check and after each) heads the README. Where it saw the ordered build trap
   or hang, the stages after it leave that build out (its default poll limit is minutes).
2. Headline rows: the 8 VideoBooth shapes (256 and 512 px U-Net levels), fwd and fwd+bwd, bf16,
   for reference, the SDPA backends (the report picks the best), flex and triton; and the
   attention peak memory of a training step (the attn1 block rows of bench_model.py).
   ``python -m bench.report`` then writes report.md and the plots. Then the triton fwd+bwd rows
   again with each backward build: ``VB_BWD=split`` (7 matmuls), ``VB_BWD=fused`` (5 matmuls,
   ordered dQ adds) and fused with atomic adds (``VB_BENCH_DQ=atomic``), compared shape by shape
   (bwd_builds.md): whether the fused build is faster where ``auto`` could take it (``auto`` is
   the split pair until ``FUSED_VERIFIED`` in vb_kernels/impl/fused/choice.py cites such a
   result), and what the order costs.
3. ``pytest tests -m gpu``: the GPU-only tests (bf16, every head dim at full tiles, int64
   offsets, flex gradients, the 100-run determinism test, tests/test_gpu_fused_backward.py:
   launch groups at N 4096, M > N, two streams, CUDA graphs, semaphore counts), within 120 s.
4. One end-to-end denoising step of the SD-1.4-sized VideoBooth U-Net (random weights, 256 px,
   16 frames, classifier-free guidance batch of 2, image prompt), per attn1 backend.
5. Tile sweep: for D in {40, 64, 72, 80, 128, 160}, candidate (BLOCK_M, BLOCK_N, warps,
   stages) per kernel (``VB_TILES``; ``dkvq``: the fused 5-matmul backward, ``VB_BWD=fused``,
   against the split pair's ``dq`` / ``dkv`` rows), timed with ``triton.testing.do_bench``; the winners go to
   tiles.json / tiles.md (copy them into ``_TILES`` in vb_kernels/impl/fused/forward.py by hand,
   after a look at the compile report).
Everything lands in ``bench/results/<device>/`` (``--out``) with a README.md table.
The GPU machine has its own torch/triton and no registry: carry missing wheels as
``shared/tools/device-wheels.sh`` does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAD_DIMS = (40, 64, 72, 80, 128, 160)
# Per head dim: tokens per frame of the sweep's shape (B=1, F=16, H=8, M=N): the U-Net level
# that has that head dim at 512 px (40, 80, 160), else a DiT-like 1024.
SWEEP_TOKENS = {40: 4096, 64: 1024, 72: 1024, 80: 1024, 128: 1024, 160: 256}
CANDIDATES = {
    "fwd": [(128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2)],
    # the fused 5-matmul backward (VB_BWD=fused): its fwd+bwd against the split pair's rows below
    "dkvq": [(64, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 1), (32, 128, 4, 1)],
    "dq": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2)],
    "dkv": [(64, 64, 4, 2), (32, 64, 4, 2), (32, 128, 8, 2), (32, 64, 8, 2)],
}
BUDGET_S = {"warm": 75, "smoke": 20, "headline": 140, "bwd_builds": 96, "tests": 120, "e2e": 40,
            "sweep": 75}  # 566 s; + start-up and the stages' own margins: about 10 minutes
DRY_SMOKE_BUDGET_S = 900  # the smoke stage through the interpreter on a loaded 2-core CPU (CI)
STAGES = ("warm", "smoke", "headline", "tests", "e2e", "sweep")  # run order (headline includes bwd_builds)
HEADLINE_K = "(vb256 or vb512) and bf16 and (reference or sdpa or flex or triton)"
MEMORY_K = "down0 and fwd+bwd and bf16"


def _run(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> dict:
    """Run a subprocess with a wall-clock cap; its output goes to ``log``."""
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        out, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = out + f"\n[cut at {timeout:.0f} s by bench.gpu_run's budget]\n", "timeout"
    log.write_text(out)
    tail = [line for line in out.strip().splitlines() if line.strip()][-1:] or [""]
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "summary": tail[0]}


def stage_warm(out: Path, dry: bool) -> dict:
    """bench.warm (the dry run records and counts the binaries only)."""
    cmd = [sys.executable, "-m", "bench.warm", "--budget", f"{BUDGET_S['warm']:.0f}", "--json", str(out / "warm.json")]
    res = _run(cmd + (["--dry-run"] if dry else []), BUDGET_S["warm"] + 30, out / "warm.log")
    if (out / "warm.json").exists():
        res["warm"] = json.loads((out / "warm.json").read_text())
    return res


def stage_smoke(out: Path, dry: bool) -> dict:
    """bench.smoke: every backward build in seconds, its verdict in smoke.json (dry: the interpreter)."""
    budget = DRY_SMOKE_BUDGET_S if dry else BUDGET_S["smoke"]
    cmd = [sys.executable, "-m", "bench.smoke", "--out", str(out), "--budget", f"{budget:.0f}"]
    # the supervisor keeps its own deadline (it kills a worker at it); the margin is its start and exit
    res = _run(cmd + (["--dry-run"] if dry else []), budget + (60 if dry else 10), out / "smoke_stage.log")
    if (out / "smoke.json").exists():
        verdict = json.loads((out / "smoke.json").read_text())
        res["smoke"] = {k: verdict.get(k) for k in ("verdict", "summary", "builds", "device", "seconds")}
    return res


def fused_ordered_blocked(stages: dict) -> str | None:
    """Why the stages after the smoke leave the fused build with ordered dQ adds out, or None:
    the smoke saw it trap, hang or crash (under the default poll limit, 2^28, a wait that never
    passes would take minutes of the run's budget before it traps)."""
    builds = ((stages.get("smoke") or {}).get("smoke") or {}).get("builds") or {}
    bad = {b: s for b, s in builds.items() if b in ("fused", "stress") and s in ("trap", "hang", "crash")}
    if not bad:
        return None
    return "left out: the smoke stage saw the ordered build " + ", ".join(f"{b}: {s}" for b, s in sorted(bad.items()))


def stage_tests(out: Path, dry: bool, skip_fused: str | None = None) -> dict:
    if dry:  # the GPU tests skip on a CPU; run one fast test file to exercise the stage
        cmd = [sys.executable, "-m", "pytest", "tests/test_schedule_and_inputs.py", "-q", "-x", "-k", "named"]
    else:
        cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    if skip_fused:  # every test of the fused build has "fused" in its id or file name
        cmd += ["-k", "not fused"]
    res = _run(cmd, BUDGET_S["tests"], out / "tests.log")
    if skip_fused:
        res["note"] = f"fused tests {skip_fused}"
    return res


def stage_headline(out: Path, dry: bool, skip_fused: str | None = None) -> dict:
    marker, k_op, k_mem = ("smoke", "smoke.vb and (reference or triton)", "smoke and attn1 and fwd+bwd") if dry \
        else ("not smoke", HEADLINE_K, MEMORY_K)
    res = {}
    for name, path, k in (("headline", "bench/bench_attention.py", k_op), ("memory", "bench/bench_model.py", k_mem)):
        js = out / f"{name}.json"
        res[name] = _run([sys.executable, "-m", "pytest", path, "-q", "-m", marker, "-k", k,
                          f"--benchmark-json={js}", "-p", "no:cacheprovider"],
                         BUDGET_S["headline"] / 2, out / f"{name}.log")
    jsons = [str(out / f"{n}.json") for n in ("headline", "memory") if (out / f"{n}.json").exists()]
    if jsons:
        res["report"] = _run([sys.executable, "-m", "bench.report", *jsons, "--out", str(out)], 60,
                             out / "report.log")
    # the same triton fwd+bwd rows with each backward build, for the same-run comparison: split,
    # fused with ordered dQ adds (the default's choice at D <= 64), fused with atomic adds
    k_rows = "smoke.vb and triton and fwd+bwd" if dry else f"({HEADLINE_K}) and triton and fwd+bwd"
    builds = {}
    for name, build, dq in (("headline_split", "split", "ordered"), ("headline_fused", "fused", "ordered"),
                            ("headline_fused_atomic", "fused", "atomic")):
        js = out / f"{name}.json"
        if skip_fused and (build, dq) == ("fused", "ordered"):
            res[name], builds[name] = {"rc": "skipped", "seconds": 0, "summary": skip_fused}, None
            continue
        res[name] = _run([sys.executable, "-m", "pytest", "bench/bench_attention.py", "-q", "-m", marker,
                          "-k", k_rows, f"--benchmark-json={js}", "-p", "no:cacheprovider"],
                         BUDGET_S["bwd_builds"] / 3, out / f"{name}.log",
                         env=dict(os.environ, VB_BWD=build, VB_BENCH_DQ=dq))
        builds[name] = json.loads(js.read_text()) if js.exists() else None
    if builds["headline_split"] is not None and builds["headline_fused"] is not None:
        rows = compare_builds(builds["headline_split"], builds["headline_fused"], builds["headline_fused_atomic"])
        (out / "bwd_builds.md").write_text(builds_markdown(rows))
        res["bwd_builds"] = {"rows": len(rows), "summary": builds_summary(rows)}
    return res


def _medians(bench_json: dict) -> dict:
    # median seconds of each triton fwd+bwd row, by the row's name without the build
    return {b["name"]: b["stats"]["median"] for b in bench_json.get("benchmarks", [])
            if "-triton-fwd+bwd-" in b["name"]}


def compare_builds(split_json: dict, fused_json: dict, atomic_json: dict | None = None) -> list:
    """(row, split ms, fused ms, fused-atomic ms or None, split / fused) for the triton fwd+bwd
    rows both the split and the fused pytest-benchmark JSON hold (split: ``VB_BWD=split``; fused:
    ``VB_BWD=fused``, ordered dQ adds; atomic: the same with ``VB_BENCH_DQ=atomic``, where it has
    the row)."""
    split, fused = _medians(split_json), _medians(fused_json)
    atomic = _medians(atomic_json or {})
    return [(name, split[name] * 1e3, fused[name] * 1e3, atomic[name] * 1e3 if atomic.get(name) else None,
             split[name] / fused[name])
            for name in sorted(split) if name in fused and fused[name] > 0]


def _geomean(xs: list) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def builds_summary(rows: list) -> str:
    if not rows:
        return "no row in both runs"
    speed = [r[4] for r in rows]
    out = (f"fused vs split fwd+bwd over {len(rows)} shapes: geometric mean speed-up {_geomean(speed):.2f}x, "
           f"range {min(speed):.2f}x .. {max(speed):.2f}x")
    cost = [r[2] / r[3] for r in rows if r[3]]
    if cost:
        out += (f"; the ordered dQ adds take {_geomean(cost):.2f}x the atomic build's time "
                f"(geometric mean over {len(cost)} shapes, range {min(cost):.2f}x .. {max(cost):.2f}x)")
    return out


def builds_markdown(rows: list) -> str:
    lines = ["# The backward's builds, same run: split (VB_BWD=split: 7 matmuls) vs fused (VB_BWD=fused: 5 "
             "matmuls, ordered dQ adds, and atomic ones with VB_BENCH_DQ=atomic); the default (auto) is the "
             "split pair until FUSED_VERIFIED (vb_kernels/impl/fused/choice.py) cites a result like this one", "",
             builds_summary(rows), "",
             "| row | split ms | fused ms | fused atomic ms | split / fused | fused / atomic |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {s:.4f} | {f:.4f} | {'' if a is None else f'{a:.4f}'} | {x:.2f} | "
              f"{'' if a is None else f'{f / a:.2f}'} |" for name, s, f, a, x in rows]
    return "\n".join(lines) + "\n"


def _bench_ms(fn, dry: bool) -> float:
    if dry:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=25)


def stage_sweep(out: Path, dry: bool, head_dims=HEAD_DIMS, skip_fused: str | None = None) -> dict:
    """Time each candidate tile of each kernel with the other kernels at their defaults."""
    import functools

    import torch

    from vb_kernels import videobooth_attention

    from .measure import Step, Workload
    from .shapes import Case

    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    deadline = time.perf_counter() + BUDGET_S["sweep"]
    results, table = {}, []
    cands = {"fwd": CANDIDATES["fwd"][:2], "dkvq": CANDIDATES["dkvq"][:1], "dq": CANDIDATES["dq"][:1],
             "dkv": CANDIDATES["dkv"][:1]} if dry else dict(CANDIDATES)
    if skip_fused:  # dkvq times the ordered build
        cands.pop("dkvq")
    for d in head_dims:
        n = 16 if dry else SWEEP_TOKENS[d]
        f = 2 if dry else 16
        h = 1 if dry else 8
        # the suite's timed callable (clears the gradients, then a forward, and a backward)
        w = Workload(Case("sweep", f"D{d}", 1, f, n, h, d, n), dtype, device, grad=True)
        attention = functools.partial(videobooth_attention, backend="triton")
        fwd, fwd_bwd = Step(w, attention, "fwd"), Step(w, attention, "fwd+bwd")

        results[d] = {}
        for kernel, tiles_list in cands.items():
            best = None
            for tiles in tiles_list:
                if time.perf_counter() > deadline:
                    results[d][kernel] = {"cut": "sweep budget spent", **(best or {})}
                    break
                os.environ["VB_TILES"] = f"{kernel}={','.join(map(str, tiles))}"
                os.environ["VB_BWD"] = "fused" if kernel == "dkvq" else "split"
                try:
                    ms = _bench_ms(fwd if kernel == "fwd" else fwd_bwd, dry)
                except Exception as e:  # noqa: BLE001 - a tile that does not compile or fit
                    table.append((d, kernel, tiles, None, f"{type(e).__name__}: {str(e)[:80]}"))
                    continue
                finally:
                    os.environ.pop("VB_TILES", None)
                    os.environ.pop("VB_BWD", None)
                table.append((d, kernel, tiles, ms, ""))
                if best is None or ms < best["ms"]:
                    best = {"tiles": list(tiles), "ms": round(ms, 4)}
            else:
                results[d][kernel] = best or {"cut": "no candidate ran"}
    (out / "tiles.json").write_text(json.dumps({"shape": "B=1 F=16 H=8 M=N, N per D: " + json.dumps(SWEEP_TOKENS),
                                                "dtype": str(dtype), "winners": results}, indent=1))
    lines = ["| D | kernel | tiles (BLOCK_M, BLOCK_N, warps, stages) | ms (fwd for fwd; fwd+bwd for dq/dkv) | note |",
             "|---|---|---|---|---|"]
    lines += [f"| {d} | {k} | {t} | {'' if ms is None else f'{ms:.4f}'} | {note} |" for d, k, t, ms, note in table]
    (out / "tiles.md").write_text("\n".join(lines) + "\n")
    return {"winners": results, **({"note": f"dkvq {skip_fused}"} if skip_fused else {})}


def stage_e2e(out: Path, dry: bool) -> dict:
    """One denoising step (U-Net forward, CFG batch of 2, image prompt) per attn1 backend."""
    import torch
    from diffusers import UNet2DConditionModel

    import vb

    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    if dry:
        cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=2, norm_num_groups=8)
        frames, side, text_dim = 2, 8, 32
    else:  # SD-1.4's U-Net config, 256 px (32x32 latents)
        cfg = dict(sample_size=32, cross_attention_dim=768, attention_head_dim=8)
        frames, side, text_dim = 16, 32, 768
    res = {}
    deadline = time.perf_counter() + BUDGET_S["e2e"]
    for backend in ("reference", "triton") if dry else ("reference", "sdpa", "flex", "triton"):
        if time.perf_counter() > deadline:
            res[backend] = "cut: e2e budget spent"
            continue
        torch.manual_seed(0)
        net = vb.VideoBoothUNet(UNet2DConditionModel(**cfg), attn_backend=backend).to(device=device, dtype=dtype)
        g = torch.Generator().manual_seed(0)

        def rnd(*s):
            return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

        x, text = rnd(2, 4, frames, side, side), rnd(2, 77, text_dim)
        img, null = rnd(2, 4, side, side), rnd(1, 77, text_dim)

        def step():
            with torch.no_grad():
                return net(x, 500, text, image_latents=img, null_encoder_hidden_states=null)

        try:
            first = step()
            res[backend] = {"ms": round(_bench_ms(step, dry), 3), "finite": bool(torch.isfinite(first).all())}
            if backend == "reference":
                ref = first.float()
            else:
                res[backend]["rel_err_vs_reference"] = float((first.float() - ref).norm() / ref.norm())
        except Exception as e:  # noqa: BLE001 - recorded, the other backends still run
            res[backend] = f"{type(e).__name__}: {str(e)[:200]}"
        net = None  # free the model before the next backend's
    (out / "e2e.json").write_text(json.dumps(res, indent=1))
    return res


def smoke_lines(out: Path) -> list[str]:
    """The smoke verdict for the top of the README, read from smoke.json (as far as it got)."""
    path = out / "smoke.json"
    if not path.exists():
        return ["**Smoke verdict: none** (no smoke.json: the smoke stage did not run)", ""]
    try:
        v = json.loads(path.read_text())
    except ValueError as e:
        return [f"**Smoke verdict: unreadable** (smoke.json: {e})", ""]
    builds = ", ".join(f"{b} {s}" for b, s in (v.get("builds") or {}).items())
    lines = [f"**Smoke verdict: {str(v.get('verdict')).upper()}**: {v.get('summary', '')} ({builds}; "
             f"{v.get('seconds')} s, `smoke.json`)", ""]
    def err(x):
        return "" if x is None else f"{x:.2e}"

    lines += ["| check | status | max rel err (oracle; stress: vs no stall) | vs split | backward ms | seconds |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {c['name']} | {c.get('status')} | {err(c.get('max_rel_err'))} | {err(c.get('max_rel_err_vs_split'))} | "
              f"{c.get('backward_ms', '')} | {c.get('seconds', '')} |" for c in v.get("checks", [])]
    lines.append("")
    for c in v.get("checks", []):
        if c.get("status") != "pass":
            lines.append(f"- {c['name']}: {c.get('status')}" + (f": {c['detail']}" if c.get("detail") else ""))
    return lines + ([""] if lines[-1] else [])


def headline_lines(out: Path) -> list[str]:
    """The report's headline rows (triton per VideoBooth U-Net shape), from headline.json."""
    path = out / "headline.json"
    if not path.exists():
        return []
    from .report import compare, headline, load

    try:
        rows = compare(load([path]))
    except (ValueError, KeyError) as e:
        return [f"headline.json: unreadable ({type(e).__name__}: {e})", ""]
    return ["## Headline (from `report.md`)", ""] + headline(rows) + [""]


def readme(out: Path, env: dict, stages: dict, total_s: float) -> None:
    """README.md: the smoke verdict, then the headline rows, then every stage."""
    lines = [f"# GPU run: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}, "
             f"{total_s:.0f} s in all (`python -m bench.gpu_run`).", ""]
    lines += smoke_lines(out) + headline_lines(out)
    lines += ["| stage | result | seconds | files |", "|---|---|---|---|"]
    sm = stages.get("smoke", {})
    if sm:
        lines.append(f"| bench.smoke: every backward build, poll limit 2^20, stress, semaphores | rc={sm.get('rc')}: "
                     f"{sm.get('summary', '')} | {sm.get('seconds')} | smoke.json, smoke.log |")
    for name, r in stages.get("headline", {}).items():
        files = {"report": "report.md, plots, report.log", "bwd_builds": "bwd_builds.md"}.get(
            name, f"{name}.json, {name}.log")
        lines.append(f"| {name} | rc={r.get('rc', '')}: {r.get('summary', '')} | {r.get('seconds', '')} | {files} |")
    w = stages.get("warm", {})
    if w:
        lines.append(f"| bench.warm: compile the run's triton binaries | rc={w.get('rc')}: {w.get('summary', '')} | "
                     f"{w.get('seconds')} | warm.json, warm.log |")
    t = stages.get("tests", {})
    if t:
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(f"| pytest tests -m gpu | rc={t.get('rc')}: {t.get('summary', '')}{note} | {t.get('seconds')} | "
                     f"tests.log |")
    sw = stages.get("sweep", {})
    if "error" in sw:
        lines.append(f"| tile sweep | {sw['error']} | | |")
    else:
        for d, kern in sw.get("winners", {}).items():
            best = ", ".join(f"{k} {v.get('tiles')} {v.get('ms', '')} ms{' (' + v['cut'] + ')' if 'cut' in v else ''}"
                             for k, v in kern.items())
            lines.append(f"| tile sweep D={d} | {best} | | tiles.md, tiles.json |")
    e2e = stages.get("e2e", {})
    for backend, r in e2e.items():
        lines.append(f"| denoising step, attn1 {backend} | {r} | | e2e.json |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through the interpreter (CI)")
    ap.add_argument("--out", type=Path, help="results folder (default: bench/results/<device>/)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES),
                    help="stages to run, in this order (default: all)")
    ap.add_argument("--budget", type=float, default=sum(BUDGET_S.values()),
                    help="seconds for all stages together, shared in the default proportions "
                         f"(default {sum(BUDGET_S.values()):.0f}; lower it when less device time is left)")
    args = ap.parse_args(argv)
    if args.budget <= 0:
        ap.error(f"--budget: expected a positive number of seconds, got {args.budget}")
    scale = args.budget / sum(BUDGET_S.values())
    for k in BUDGET_S:
        BUDGET_S[k] *= scale
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    from .measure import environment
    from .report import slug

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a CPU", file=sys.stderr)
        return 2
    env = environment()
    out = args.out or REPO / "bench" / "results" / slug(env["device"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.json").write_text(json.dumps(env, indent=1))
    t0, stages = time.perf_counter(), {}
    for name in sorted(args.stages, key=STAGES.index):  # always in the run's order: warm, smoke, ...
        print(f"[gpu_run] {name} ...", flush=True)
        try:
            skip_fused = fused_ordered_blocked(stages)
            if name == "warm":
                stages[name] = stage_warm(out, args.dry_run)
            elif name == "smoke":
                stages[name] = stage_smoke(out, args.dry_run)
            elif name == "tests":
                stages[name] = stage_tests(out, args.dry_run, skip_fused)
            elif name == "headline":
                stages[name] = stage_headline(out, args.dry_run, skip_fused)
            elif name == "sweep":
                stages[name] = stage_sweep(out, args.dry_run, (40,) if args.dry_run else HEAD_DIMS, skip_fused)
            else:
                stages[name] = stage_e2e(out, args.dry_run)
        except Exception as e:  # noqa: BLE001 - one stage failing must not lose the others' results
            stages[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"[gpu_run] {name}: {json.dumps(stages[name])[:400]}", flush=True)
        readme(out, env, stages, time.perf_counter() - t0)
    (out / "stages.json").write_text(json.dumps(stages, indent=1, default=str))
    print(f"[gpu_run] wrote {out}/README.md in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
