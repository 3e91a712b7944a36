"""Load balance of the fused backward's dK/dV launch, as a model (no GPU needed).

    python tools/dkv_balance.py                       # the paper's schedule, F=16, B=2, H=8, D=40
    python tools/dkv_balance.py --frames 24 --sms 114 # another clip length / an H100 PCIe
    python tools/dkv_balance.py --order               # what the ordered dQ adds cost, by launch order

Every dK/dV program (one key block x one (batch, head) x one target, or one chunk of a split
target) costs its number of readers (each reader is one pass over a frame's queries); programs are
placed greedily, in launch order, on the first free SM (one resident program per SM). The figure
is the makespan over the ideal (total work / SMs), without and with the reader split that
`vb_kernels.impl.fused.backward.reader_cap` chooses. Unread targets (zeros only) count 0.05.

``--order``: the deterministic fused build (``VB_BWD=fused``) adds the key blocks of a chain (one
(batch*head, target) pair) into each query tile in key-block order: block j's step over a query
tile ends no earlier than ``latency`` steps after block j - 1's (its release, seen by block j's
wait). Step by step, one step = one query tile of one reader, each step ``1 +- jitter``
(uniform), programs dispatched in launch order on the first free SM; the figure is the makespan
over the ideal, ordered and with atomic adds (no order), for the launch order of the split pass
(key blocks fastest: a chain's blocks start together) and the fused pass's grouped order
(:func:`vb_kernels.impl.fused.backward.launch_order`).
"""
from __future__ import annotations

import argparse
import heapq

import numpy as np
import torch

from vb_kernels import Schedule
from vb_kernels.impl.fused.backward import launch_order, order_group, reader_cap
from vb_kernels.impl.fused.forward import block_config, cdiv
from vb_kernels.impl.fused.launch import cuda_tiles
from vb_kernels.schedule import chunk_targets


def makespan(works: list[float], sms: int) -> float:
    """Finish time of ``works`` (program costs in launch order) on ``sms`` greedy slots."""
    free = [0.0] * sms
    for w in works:
        heapq.heappush(free, heapq.heappop(free) + w)
    return max(free)


def _phase2(schedule: Schedule, tokens: int, batch: int, heads: int, head_dim: int, kernel: str):
    """The phase-2 dK/dV launch of ``kernel`` ("dkv": the split pair's pass, "dkvq": the fused
    one) as the op plans it for a CUDA launch: (targets, their chunks after the reader split,
    reader cap, tiles, key blocks)."""
    _, phase2 = schedule.plan(False)
    targets = phase2.targets()
    with cuda_tiles():
        cfg = block_config(head_dim, torch.device("cpu"), kernel, n_queries=tokens, n_keys=tokens)
    key_blocks = cdiv(tokens, cfg["BLOCK_N"])
    cap = reader_cap(tuple(len(rd) for _, rd in targets), key_blocks, batch * heads, True, torch.device("cpu"), None)
    split, _ = chunk_targets(targets, cap)
    return targets, split, cap, cfg, key_blocks


def balance(schedule: Schedule, tokens: int, batch: int, heads: int, head_dim: int, sms: int) -> dict:
    """Makespan / ideal of the phase-2 dK/dV launch, unsplit and as the op splits it."""
    targets, split, cap, _, key_blocks = _phase2(schedule, tokens, batch, heads, head_dim, "dkv")
    programs = key_blocks * batch * heads
    whole = [max(len(rd), 0.05) for _, rd in targets for _ in range(programs)]
    parts = [max(len(rd), 0.05) for _, rd, _ in split for _ in range(programs)]
    ideal = sum(whole) / sms
    return dict(tokens=tokens, cap=cap, unsplit=makespan(whole, sms) / ideal, split=makespan(parts, sms) / ideal)


def chain_steps(schedule: Schedule, tokens: int, batch: int, heads: int, head_dim: int):
    """(steps of each chain of the fused pass, in launch order; key blocks; query tiles per reader)."""
    _, split, _, cfg, key_blocks = _phase2(schedule, tokens, batch, heads, head_dim, "dkvq")
    n_qt = cdiv(tokens, cfg["BLOCK_M"])
    return [len(rd) * n_qt for _, rd, _ in split for _ in range(batch * heads)], key_blocks, n_qt


def ordered_makespan(steps: list[int], key_blocks: int, sms: int, group: int | None, latency: float,
                     jitter: float = 0.0, ordered: bool = True, seed: int = 0) -> float:
    """Finish time of the fused pass in the step model above (one step = 1). ``group``: chains per
    group of the grouped launch order, or None for key blocks fastest."""
    rng = np.random.default_rng(seed)
    n = len(steps)
    order = ([(c, j) for c in range(n) for j in range(key_blocks)] if group is None
             else launch_order(n, key_blocks, group))
    free = [0.0] * sms
    ends = {}  # chain -> end time of each step of its last-launched key block
    start_prev = span = 0.0
    for c, j in order:
        start = start_prev = max(heapq.heappop(free), start_prev)  # dispatched in launch order
        if steps[c] == 0:  # an unread target's program: writes zeros
            heapq.heappush(free, start + 0.05)
            continue
        work = np.cumsum(1 + jitter * rng.uniform(-1, 1, steps[c]))
        if ordered and j > 0:  # end_s = max(end_{s-1} + w_s, predecessor's end_s + latency)
            end = np.maximum(start, np.maximum.accumulate(ends[c] + latency - work)) + work
        else:
            end = start + work
        ends[c] = end
        heapq.heappush(free, end[-1])
        span = max(span, end[-1])
    return span


def order_table(schedule: Schedule, tokens, batch: int, heads: int, head_dim: int, sms: int,
                latencies=(0.5, 1.0, 2.0), jitter: float = 0.2) -> list[dict]:
    """Makespan over ideal of the fused pass, ordered / atomic, by launch order and latency."""
    rows = []
    for n in tokens:
        steps, key_blocks, n_qt = chain_steps(schedule, n, batch, heads, head_dim)
        ideal = sum(steps) * key_blocks / sms
        group = min(len(steps), order_group(n_qt, True, torch.device("cpu")))
        for lat in latencies:
            row = dict(tokens=n, group=group, latency=lat)
            for name, g in (("fastest", None), ("grouped", group)):
                for mode in (True, False):
                    row[name, mode] = ordered_makespan(steps, key_blocks, sms, g, lat, jitter, mode) / ideal
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=40)
    p.add_argument("--sms", type=int, default=132, help="SM count (132: H100 SXM / H200)")
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    p.add_argument("--order", action="store_true", help="the ordered dQ adds' cost by launch order (see above)")
    p.add_argument("--jitter", type=float, default=0.2, help="--order: each step takes 1 +- jitter")
    args = p.parse_args(argv)
    if args.order:
        print(f"| N | latency (steps) | key blocks fastest: ordered / atomic | grouped (G): ordered / atomic |\n"
              f"|---|---|---|---|")
        for r in order_table(Schedule.videobooth(args.frames), args.tokens, args.batch, args.heads, args.head_dim,
                             args.sms, jitter=args.jitter):
            print(f"| {r['tokens']} | {r['latency']:g} | {r['fastest', True]:.3f}x / {r['fastest', False]:.3f}x "
                  f"| ({r['group']}) {r['grouped', True]:.3f}x / {r['grouped', False]:.3f}x |")
        return 0
    print("| N | reader cap | unsplit / ideal | split / ideal |\n|---|---|---|---|")
    for n in args.tokens:
        r = balance(Schedule.videobooth(args.frames), n, args.batch, args.heads, args.head_dim, args.sms)
        print(f"| {n} | {r['cap'] or '-'} | {r['unsplit']:.2f}x | {r['split']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
