"""Turn pytest-benchmark JSON from ``bench/`` into a markdown table and PNG plots.

    python -m bench.report results.json [more.json ...] [--out DIR]

Writes ``DIR/report.md`` (headline, goals, every row with its speedups, memory ratio and
TFLOP/s, and what each column means), one ``DIR/<set>.png`` per shape set (latency and peak
memory against N, F or M, one line per backend), and copies the JSON into DIR. DIR defaults to
``bench/results/<device>/``. Reads only ``extra_info`` (and the stats median as a fallback), so
it needs neither torch nor a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

BACKEND_ORDER = ("reference", "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex",
                 "flash-attn", "xformers", "triton")
SET_ORDER = ("vb256", "vb512", "sched", "bank", "dit", "long", "model", "smoke")
VIDEOBOOTH_SETS = ("vb256", "vb512")
# Plot axes per shape set: the swept variable, and what else splits a set into panels.
X_AXIS = {"vb256": "N", "vb512": "N", "dit": "N", "long": "F", "bank": "M", "sched": "schedule"}
PANEL_BY = {"dit": ("D",), "long": ("schedule",)}
GOALS_TEXT = "On an H100, bf16 (issue 4); read against this run's device and dtypes."

COLUMNS = """\
- **ms**: median time of one call (fwd) or one forward+backward (fwd+bwd). On CUDA,
  `triton.testing.do_bench` median, warm-up and compilation excluded, L2 flushed between calls;
  on CPU the `perf_counter` median of 1 to 5 rounds after a warm-up call (smoke run: the
  Triton interpreter's times mean nothing).
- **x ref**: reference ms / this row's ms (above 1 = faster than the naive concat).
- **x SDPA**: best SDPA row's ms / this row's ms; best = the fastest of `sdpa`, `sdpa-flash`,
  `sdpa-efficient`, `sdpa-cudnn` for the same shape, mode and dtype (named in the headline).
- **peak MiB**: device memory the call allocates at its peak beyond what was allocated before
  it (inputs, upstream gradient, weights): `max_memory_allocated` after
  `reset_peak_memory_stats`, minus `memory_allocated` before. CUDA only.
- **mem / ref**: peak MiB / reference's peak MiB (below 1 = less memory than the naive concat).
- **TFLOP/s**: FLOPs / time. FLOPs (DESIGN.md section 4): 4·B·H·D·(Σ_f N·keys_f + phase 1),
  keys counted as the literal concatenation; fwd+bwd counts 3.5x the forward. Model rows add
  2·rows·in·out per matmul (3x for fwd+bwd), approximately.
- **% peak**: TFLOP/s over the bf16 matmul rate measured in the same session on the same device.
- **rel err**: ‖out − oracle‖/‖oracle‖ on the same inputs (oracle: reference in float64 where
  small, else SDPA in float32); fwd+bwd rows also check the gradients. Rows over DESIGN.md's
  tolerance fail instead of being timed.
"""


def slug(device: str) -> str:
    """A folder name for a device: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"


# ---- reading and comparing ------------------------------------------------------------------
def load(paths) -> list[dict]:
    """One dict per benchmark row: its extra_info, with ``median_ms`` filled from the stats
    median where extra_info has none (e.g. a run with --benchmark-disable has neither)."""
    rows = []
    for path in paths:
        for bench in json.loads(Path(path).read_text())["benchmarks"]:
            info = dict(bench.get("extra_info") or {})
            if "backend" not in info:
                continue  # not a row of this suite
            if info.get("median_ms") is None and bench.get("stats"):
                info["median_ms"] = bench["stats"]["median"] * 1e3
            rows.append(info)
    return rows


def _key(r: dict) -> tuple:
    return (r.get("kind"), r["case"], r["mode"], r["dtype"])


def _rank(order: tuple, name: str) -> int:
    return order.index(name) if name in order else len(order)


def compare(rows: list[dict]) -> list[dict]:
    """Adds to each row: ``x_ref``, ``x_sdpa`` and ``best_sdpa`` (speedups, > 1 = faster),
    ``mem_ratio`` (peak / reference's peak). None where the baseline row is missing."""
    groups = defaultdict(list)
    for r in rows:
        groups[_key(r)].append(r)
    for group in groups.values():
        timed = [r for r in group if r.get("median_ms")]
        ref = next((r for r in timed if r["backend"] == "reference"), None)
        sdpa = [r for r in timed if r["backend"].startswith("sdpa")]
        best = min(sdpa, key=lambda r: r["median_ms"]) if sdpa else None
        for r in group:
            ms = r.get("median_ms")
            r["x_ref"] = ref["median_ms"] / ms if ref and ms else None
            r["x_sdpa"] = best["median_ms"] / ms if best and ms else None
            r["best_sdpa"] = best["backend"] if best else None
            peak, ref_peak = r.get("peak_mib"), ref.get("peak_mib") if ref else None
            r["mem_ratio"] = peak / ref_peak if peak is not None and ref_peak else None
    # Set, then case in the order the suite ran them (the registry's), then backend.
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r["case"], i)
    return sorted(rows, key=lambda r: (_rank(SET_ORDER, r["set"]), r["set"], r.get("kind") or "",
                                       first[r["case"]], r["mode"], r["dtype"], _rank(BACKEND_ORDER, r["backend"])))


# ---- markdown ---------------------------------------------------------------------------------
def _f(v, spec=".3g", suffix="") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:{spec}}{suffix}"


def _shape(r: dict) -> str:
    s = r["shape"]
    text = f"B{s['B']} F{s['F']} N{s['N']} H{s['H']} D{s['D']} M{s['M'] if s['M'] is not None else '–'}"
    return text + (f" C{s['C']}" if "C" in s else "")


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def headline(rows: list[dict]) -> list[str]:
    """Triton against reference and the best SDPA backend on each VideoBooth U-Net shape."""
    tri = [r for r in rows if r["backend"] == "triton" and r.get("kind") == "op" and r["set"] in VIDEOBOOTH_SETS]
    if not tri:
        return ["No triton rows on the VideoBooth U-Net shapes (vb256, vb512) in this run."]
    lines = [[r["set"], r["name"], _shape(r), r["mode"], r["dtype"], _f(r.get("median_ms")),
              _f(r["x_ref"], ".2f", "x"), _f(r["x_sdpa"], ".2f", "x") + (f" ({r['best_sdpa']})" if r["best_sdpa"] else ""),
              _f(r["mem_ratio"], ".2f")] for r in tri]
    return _table(["set", "level", "shape", "mode", "dtype", "triton ms", "x ref", "x best SDPA", "mem / ref"], lines)


def _goal(name: str, values: list[tuple[float, str]], bound: float, at_least: bool = True) -> list[str]:
    """One goal line: met when every (value, where) is >= bound (``at_least``) or <= bound."""
    if not values:
        return [f"| {name} | no data in this run | |"]
    ok = [(v >= bound) if at_least else (v <= bound) for v, _ in values]
    worst = (min if at_least else max)(values, key=lambda v: v[0])
    return [f"| {name} | {'met' if all(ok) else 'not met'} ({sum(ok)}/{len(values)} rows) | "
            f"worst {worst[0]:.3g} at {worst[1]} |"]


def goals(rows: list[dict]) -> list[str]:
    """The issue's performance goals, each read off the triton rows in bf16."""
    tri = [r for r in rows if r["backend"] == "triton" and r.get("kind") == "op" and r["dtype"] == "bf16"]

    def where(r):
        return f"{r['case']} {r['mode']}"

    flex = {_key(r): r for r in rows if r["backend"] == "flex" and r.get("median_ms")}
    vb = [(r["x_sdpa"], where(r)) for r in tri if r["set"] in VIDEOBOOTH_SETS and r["x_sdpa"]]
    vb_ref = [(r["x_ref"], where(r)) for r in tri if r["set"] in VIDEOBOOTH_SETS and r["x_ref"]]
    vs_flex = [(flex[_key(r)]["median_ms"] / r["median_ms"], where(r)) for r in tri
               if r["schedule"].startswith(("window", "keyframes")) and _key(r) in flex and r.get("median_ms")]
    mem = [(r["mem_ratio"], where(r)) for r in tri if r["mode"] == "fwd+bwd" and r["mem_ratio"] is not None]
    peak = [(r["pct_matmul_peak"], where(r)) for r in tri if r["mode"] == "fwd" and r["shape"]["D"] == 128
            and r["shape"]["N"] >= 4096 and r.get("pct_matmul_peak") is not None]
    out = [GOALS_TEXT, "", "| goal | status | worst row |", "|---|---|---|"]
    out += _goal(">= 1.5x the best SDPA backend, every VideoBooth shape, fwd and fwd+bwd", vb, 1.5)
    out += _goal(">= 1.5x reference, every VideoBooth shape, fwd and fwd+bwd", vb_ref, 1.5)
    out += _goal(">= 1.3x FlexAttention on window and keyframe schedules", vs_flex, 1.3)
    out += _goal("training-step (fwd+bwd) peak memory <= 0.5x reference", mem, 0.5, at_least=False)
    out += _goal(">= 60% of the bf16 matmul peak, fwd, D=128, N >= 4096", peak, 60)
    return out


def markdown(rows: list[dict], plots: list[Path], sources: list[str]) -> str:
    envs = {(r.get("device"), r.get("torch"), r.get("triton"), r.get("commit"), r.get("matmul_peak_tflops")) for r in rows}
    out = ["# VideoBooth cross-frame attention: benchmark report", ""]
    for device, torch_v, triton_v, commit, peak in sorted(envs, key=str):
        out.append(f"- device **{device}**, torch {torch_v}, triton {triton_v}, commit `{commit}`, "
                   f"bf16 matmul peak measured {_f(peak)} TFLOP/s")
    out += [f"- source: {', '.join(sources)} ({len(rows)} rows)", "",
            "## Headline: triton on the VideoBooth U-Net shapes", ""] + headline(rows)
    out += ["", "## Goals", ""] + goals(rows) + ["", "## All rows", ""]
    header = ["case", "shape", "schedule", "mode", "dtype", "backend", "ms", "x ref", "x SDPA",
              "peak MiB", "mem / ref", "TFLOP/s", "% peak", "rel err"]
    by_set = defaultdict(list)
    for r in rows:
        by_set[(r["set"], r.get("kind"))].append(r)
    for (set_name, kind), group in by_set.items():
        out += [f"### {set_name}" + (" (model blocks)" if kind == "model" else ""), ""]
        lines = [[(r["model"] + " " if r.get("model") else "") + r["name"], _shape(r), r["schedule"], r["mode"],
                  r["dtype"], r["backend"], _f(r.get("median_ms")), _f(r["x_ref"], ".2f", "x"),
                  _f(r["x_sdpa"], ".2f", "x"), _f(r.get("peak_mib"), ".1f"), _f(r["mem_ratio"], ".2f"),
                  _f(r.get("tflops")), _f(r.get("pct_matmul_peak"), ".1f"),
                  _f(max(r.get("rel_err") or 0, r.get("rel_err_grad") or 0), ".1e")] for r in group]
        out += _table(header, lines) + [""]
    if plots:
        out += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    out += ["## Columns", "", COLUMNS]
    return "\n".join(out)


# ---- plots ----------------------------------------------------------------------------------
def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per shape set of op rows: latency and peak memory against the set's swept
    variable (N, F, M; the case otherwise), one line per backend, a panel per mode/dtype/..."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_set = defaultdict(list)
    for r in rows:
        if r.get("kind") == "op" and r.get("median_ms"):
            by_set[r["set"]].append(r)
    written = []
    for set_name, group in by_set.items():
        x_var = X_AXIS.get(set_name, "case")

        def x_of(r):
            return r["schedule"] if x_var == "schedule" else r["name"] if x_var == "case" else r["shape"][x_var]

        panels = defaultdict(list)
        for r in group:
            extra = tuple(f"{k}={r['shape'][k] if k in r['shape'] else r[k]}" for k in PANEL_BY.get(set_name, ()))
            panels[extra + (r["mode"], r["dtype"])].append(r)
        categorical = not all(isinstance(x_of(r), (int, float)) for r in group)
        cats = list(dict.fromkeys(x_of(r) for r in group)) if categorical else []
        fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.4 * len(panels)), squeeze=False)
        for (title, prs), (ax_t, ax_m) in zip(panels.items(), axes):
            series = defaultdict(list)
            for r in prs:
                series[r["backend"]].append(r)
            has_mem = any(r.get("peak_mib") is not None for r in prs)
            for backend in sorted(series, key=lambda b: _rank(BACKEND_ORDER, b)):
                pts = sorted(series[backend], key=lambda r: cats.index(x_of(r)) if categorical else x_of(r))
                xs = [cats.index(x_of(r)) if categorical else x_of(r) for r in pts]
                style = dict(marker="o", label=backend, color=f"C{_rank(BACKEND_ORDER, backend)}",
                             lw=2.2 if backend == "triton" else 1.2)
                ax_t.plot(xs, [r["median_ms"] for r in pts], **style)
                mem = [(x, r["peak_mib"]) for x, r in zip(xs, pts) if r.get("peak_mib") is not None]
                if mem:
                    ax_m.plot([m[0] for m in mem], [m[1] for m in mem], **style)
            label = " ".join(title)
            ax_t.set(title=f"{set_name} {label}: latency", ylabel="median ms", yscale="log")
            ax_m.set(title=f"{set_name} {label}: peak memory", ylabel="peak MiB")
            if has_mem:
                ax_m.set_yscale("log")
            else:
                ax_m.text(0.5, 0.5, "no memory data (CPU run)", ha="center", va="center", transform=ax_m.transAxes)
            for ax in (ax_t, ax_m):
                ax.set_xlabel(x_var)
                ax.grid(True, which="both", alpha=0.3)
                if categorical:
                    ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=8)
                elif x_var in ("N", "F", "M"):
                    ax.set_xscale("log", base=2)
            ax_t.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{set_name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


# ---- command line -----------------------------------------------------------------------------
def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON (--benchmark-json) of bench/")
    ap.add_argument("--out", type=Path, help="output folder (default: bench/results/<device>/)")
    args = ap.parse_args(argv)
    rows = compare(load(args.json))
    if not rows:
        sys.exit(f"no bench/ rows with extra_info in {', '.join(args.json)}")
    out_dir = args.out or Path(__file__).resolve().parent / "results" / slug(rows[0].get("device") or "unknown")
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in map(Path, args.json):
        if src.resolve().parent != out_dir.resolve():
            shutil.copyfile(src, out_dir / src.name)
    plots = plot(rows, out_dir)
    report = out_dir / "report.md"
    report.write_text(markdown(rows, plots, [Path(p).name for p in args.json]))
    print(f"wrote {report} ({len(rows)} rows) and {len(plots)} plot(s)")
    return report


if __name__ == "__main__":
    main()
