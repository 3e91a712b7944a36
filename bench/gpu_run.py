"""Everything a short GPU allocation should run, in one command, within a fixed time budget:

    python -m bench.gpu_run                 # on an H100/H200: about 10 minutes at most
    python -m bench.gpu_run --dry-run       # tiny shapes on CPU through the interpreter (CI)

Stages, in this order (the figures people wait for first; each with its own share of the
budget; a stage that runs out is cut and says so):
0. ``python -m bench.warm``: the triton binaries the headline rows and the GPU tests launch
   (about 280) compiled in parallel, one process per CPU (at most 32), into Triton's cache, in
   order of first use, so that the stages after it time and test kernels instead of compiling.
1. Headline rows: the 8 VideoBooth shapes (256 and 512 px U-Net levels), fwd and fwd+bwd, bf16,
   for reference, the SDPA backends (the report picks the best), flex and triton; and the
   attention peak memory of a training step (the attn1 block rows of bench_model.py).
   ``python -m bench.report`` then writes report.md and the plots. Then the triton fwd+bwd rows
   again with each backward build: ``VB_BWD=split`` (7 matmuls), ``VB_BWD=fused`` (5 matmuls,
   ordered dQ adds) and fused with atomic adds (``VB_BENCH_DQ=atomic``), compared shape by shape
   (bwd_builds.md): whether the default (``auto``: fused at D <= 64, chosen on the compile
   report's figures) wins where it takes the fused build, and what the order costs.
2. ``pytest tests -m gpu``: the GPU-only tests (bf16, every head dim at full tiles, int64
   offsets, flex gradients, the 100-run determinism test), within 120 s.
3. One end-to-end denoising step of the SD-1.4-sized VideoBooth U-Net (random weights, 256 px,
   16 frames, classifier-free guidance batch of 2, image prompt), per attn1 backend.
4. Tile sweep: for D in {40, 64, 72, 80, 128, 160}, candidate (BLOCK_M, BLOCK_N, warps,
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
BUDGET_S = {"warm": 75, "headline": 150, "bwd_builds": 105, "tests": 120, "e2e": 45, "sweep": 80}  # 575 s
# + start-up: about 10 minutes
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


def stage_tests(out: Path, dry: bool) -> dict:
    if dry:  # the GPU tests skip on a CPU; run one fast test file to exercise the stage
        cmd = [sys.executable, "-m", "pytest", "tests/test_schedule_and_inputs.py", "-q", "-x", "-k", "named"]
    else:
        cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    return _run(cmd, BUDGET_S["tests"], out / "tests.log")


def stage_headline(out: Path, dry: bool) -> dict:
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
             "matmuls, ordered dQ adds, and atomic ones with VB_BENCH_DQ=atomic); the default (auto) takes "
             "fused at D <= 64", "",
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


def stage_sweep(out: Path, dry: bool, head_dims=HEAD_DIMS) -> dict:
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
             "dkv": CANDIDATES["dkv"][:1]} if dry else CANDIDATES
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
    return {"winners": results}


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


def readme(out: Path, env: dict, stages: dict, total_s: float) -> None:
    lines = [f"# GPU run: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}, "
             f"{total_s:.0f} s in all (`python -m bench.gpu_run`).", "",
             "| stage | result | seconds | files |", "|---|---|---|---|"]
    w = stages.get("warm", {})
    if w:
        lines.append(f"| bench.warm: compile the run's triton binaries | rc={w.get('rc')}: {w.get('summary', '')} | "
                     f"{w.get('seconds')} | warm.json, warm.log |")
    t = stages.get("tests", {})
    lines.append(f"| pytest tests -m gpu | rc={t.get('rc')}: {t.get('summary', '')} | {t.get('seconds')} | tests.log |")
    for name, r in stages.get("headline", {}).items():
        files = {"report": "report.md, plots, report.log", "bwd_builds": "bwd_builds.md"}.get(
            name, f"{name}.json, {name}.log")
        lines.append(f"| {name} | rc={r.get('rc', '')}: {r.get('summary', '')} | {r.get('seconds', '')} | {files} |")
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
    ap.add_argument("--stages", nargs="+", default=["warm", "headline", "tests", "e2e", "sweep"],
                    choices=["warm", "headline", "tests", "e2e", "sweep"])
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
    for name in args.stages:
        print(f"[gpu_run] {name} ...", flush=True)
        try:
            if name == "warm":
                stages[name] = stage_warm(out, args.dry_run)
            elif name == "tests":
                stages[name] = stage_tests(out, args.dry_run)
            elif name == "headline":
                stages[name] = stage_headline(out, args.dry_run)
            elif name == "sweep":
                stages[name] = stage_sweep(out, args.dry_run, (40,) if args.dry_run else HEAD_DIMS)
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
