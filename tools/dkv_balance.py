"""Load balance of the fused backward's dK/dV launch, as a model (no GPU needed).

    python tools/dkv_balance.py                       # the paper's schedule, F=16, B=2, H=8, D=40
    python tools/dkv_balance.py --frames 24 --sms 114 # another clip length / an H100 PCIe

Every dK/dV program (one key block x one (batch, head) x one target, or one chunk of a split
target) costs its number of readers (each reader is one pass over a frame's queries); programs are
placed greedily, in launch order, on the first free SM (one resident program per SM). The figure
is the makespan over the ideal (total work / SMs), without and with the reader split that
`vb_kernels.impl.fused.backward.reader_cap` chooses. Unread targets (zeros only) count 0.05.
"""
from __future__ import annotations

import argparse
import heapq

import torch

from vb_kernels import Schedule
from vb_kernels.impl.fused.backward import reader_cap
from vb_kernels.impl.fused.forward import block_config, cdiv
from vb_kernels.impl.fused.launch import cuda_tiles
from vb_kernels.schedule import chunk_targets


def makespan(works: list[float], sms: int) -> float:
    """Finish time of ``works`` (program costs in launch order) on ``sms`` greedy slots."""
    free = [0.0] * sms
    for w in works:
        heapq.heappush(free, heapq.heappop(free) + w)
    return max(free)


def balance(schedule: Schedule, tokens: int, batch: int, heads: int, head_dim: int, sms: int) -> dict:
    """Makespan / ideal of the phase-2 dK/dV launch, unsplit and as the op splits it."""
    _, phase2 = schedule.plan(False)
    targets = phase2.targets()
    counts = tuple(len(rd) for _, rd in targets)
    with cuda_tiles():
        cfg = block_config(head_dim, torch.device("cpu"), "dkv", n_queries=tokens, n_keys=tokens)
    programs = cdiv(tokens, cfg["BLOCK_N"]) * batch * heads
    cap = reader_cap(counts, cdiv(tokens, cfg["BLOCK_N"]), batch * heads, True, torch.device("cpu"), None)
    split, _ = chunk_targets(targets, cap)
    whole = [max(len(rd), 0.05) for _, rd in targets for _ in range(programs)]
    parts = [max(len(rd), 0.05) for _, rd, _ in split for _ in range(programs)]
    ideal = sum(whole) / sms
    return dict(tokens=tokens, cap=cap, unsplit=makespan(whole, sms) / ideal, split=makespan(parts, sms) / ideal)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=40)
    p.add_argument("--sms", type=int, default=132, help="SM count (132: H100 SXM / H200)")
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    args = p.parse_args(argv)
    print("| N | reader cap | unsplit / ideal | split / ideal |\n|---|---|---|---|")
    for n in args.tokens:
        r = balance(Schedule.videobooth(args.frames), n, args.batch, args.heads, args.head_dim, args.sms)
        print(f"| {n} | {r['cap'] or '-'} | {r['unsplit']:.2f}x | {r['split']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
