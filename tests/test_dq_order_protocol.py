"""An exhaustive model of the fused backward's ordered dQ adds (``_dq_partial`` in
vb_kernels/impl/fused/backward.py), in plain Python: every interleaving of every lane's steps.

The interpreter runs a Triton program as one unit, so no kernel test on the CPU can see what goes
wrong *between* the warps of a block or between blocks. This model can. Per query tile there is
one semaphore (an int that only grows); key block ``j`` of a chain must add its dQ tile after
every add of blocks ``0 .. j-1``. Each lane (a thread) of block ``j``, at every query tile:

1. polls until the tile's count passes the wait rule (``ge``: count >= j * THREADS, the kernel's;
   ``eq``: count == j * THREADS, the rule before, which this model shows can deadlock);
2. adds its part of the tile;
3. releases: ``thread`` (the kernel's source): every lane counts one for itself (ptxas turns a
   warp's same-address adds into one add of the warp's lane count by a leader lane, which is the
   ``warp`` rule with the lanes still independent before it); ``warp``: once every lane of its
   warp has added (``bar.warp.sync``), lane 0 counts the warp's lanes at once.

Blocks start in launch order (block ``j`` only after block ``j - 1`` has started), at most
``resident`` at a time, and leave when all their lanes are done; that is what forward progress
rests on (CUDA dispatches a grid's blocks in order; FA3's ordered reductions assume the same).
A state from which no step is possible while some lane is not done is a deadlock: on the GPU
the poll would spin until its limit and trap.
"""
from __future__ import annotations

import itertools
import sys

import pytest


def explore(blocks: int = 3, warps: int = 2, lanes: int = 2, tiles: int = 2, resident: int = 2,
            wait: str = "ge", release: str = "thread", add_after_release: bool = False,
            dispatch=None) -> dict:
    """Every reachable state of the protocol, depth first with memo. Returns the counts of states
    and of deadlocks, whether any add came before an add of a lower block into the same tile
    (``order_violations``), and the final counts of the runs that finished.

    ``dispatch``: the order blocks start in (default: launch order 0, 1, ...).
    ``add_after_release``: a wrong variant (release, then add) for the order check's control."""
    if wait not in ("ge", "eq") or release not in ("warp", "thread"):
        raise ValueError(f"wait/release: expected 'ge'|'eq' and 'warp'|'thread', got {wait!r}, {release!r}")
    threads = warps * lanes
    order = tuple(range(blocks)) if dispatch is None else tuple(dispatch)
    n_lanes = blocks * threads
    # a lane's pc: 3 * tile + phase (0 poll, 1 add, 2 release), 3 * tiles = done; -1 = not started
    steps = 3 * tiles
    first, second = (2, 1) if add_after_release else (1, 2)  # phase of the add and of the release

    def lane(b, w, i):
        return (b * warps + w) * lanes + i

    def passes(count, b):
        target = b * threads
        return count >= target if wait == "ge" else count == target

    start = ((-1,) * n_lanes, (0,) * tiles, (0,) * (blocks * tiles), 0)  # pcs, counts, adds per (block, tile), started
    seen, stack = {start}, [start]
    deadlocks, violations, finals = 0, 0, set()
    while stack:
        pcs, counts, adds, started = stack.pop()
        nxt = []
        live = sum(1 for b in order[:started] if any(pcs[lane(b, w, i)] < steps
                                                      for w in range(warps) for i in range(lanes)))
        if started < blocks and live < resident:  # the next block in dispatch order starts
            b = order[started]
            p = list(pcs)
            for w in range(warps):
                for i in range(lanes):
                    p[lane(b, w, i)] = 0
            nxt.append((tuple(p), counts, adds, started + 1))
        for b in order[:started]:
            for w in range(warps):
                group = [lane(b, w, i) for i in range(lanes)]
                for x in group:
                    pc = pcs[x]
                    if pc < 0 or pc >= steps:
                        continue
                    t, phase = divmod(pc, 3)
                    p = list(pcs)
                    if phase == 0:
                        if passes(counts[t], b):
                            p[x] = pc + 1
                            nxt.append((tuple(p), counts, adds, started))
                    elif phase == first:  # the add: every lower block's adds into the tile done?
                        if any(adds[lo * tiles + t] < threads for lo in range(b)):
                            violations += 1
                        a = list(adds)
                        a[b * tiles + t] += 1
                        p[x] = pc + 1
                        nxt.append((tuple(p), counts, tuple(a), started))
                    elif release == "thread":
                        c = list(counts)
                        c[t] += 1
                        p[x] = pc + 1
                        nxt.append((tuple(p), tuple(c), adds, started))
                if release == "warp":  # the warp's lanes all at the release of the same tile
                    pcs_w = {pcs[x] for x in group}
                    if len(pcs_w) == 1:
                        pc = pcs_w.pop()
                        if 0 <= pc < steps and pc % 3 == second:
                            c = list(counts)
                            c[pc // 3] += lanes
                            p = list(pcs)
                            for x in group:
                                p[x] = pc + 1
                            nxt.append((tuple(p), tuple(c), adds, started))
        if not nxt:
            if all(pc == steps for pc in pcs):
                finals.add(counts)
            else:
                deadlocks += 1
        for s in nxt:
            if s not in seen:
                seen.add(s)
                stack.append(s)
    return dict(states=len(seen), deadlocks=deadlocks, order_violations=violations, finals=finals)


def test_kernel_rule_never_deadlocks_and_adds_in_key_block_order():
    """The kernel's rule (wait at >=, a release per thread): no schedule deadlocks, every add of
    a tile comes after all the adds of the lower key blocks, and every run ends with each tile
    counted blocks x THREADS (what the GPU test reads back from the semaphores)."""
    res = explore(lanes=1, warps=3, wait="ge", release="thread")
    assert res["states"] > 1000  # the model really branched
    assert res["deadlocks"] == 0 and res["order_violations"] == 0
    assert res["finals"] == {(3 * 3, 3 * 3)}


def test_one_release_per_warp_with_ge_is_also_safe():
    """What ptxas makes of the per-thread release (one add per warp, by a leader, of the lane
    count) and a warp-synchronised release: safe under >= too."""
    res = explore(wait="ge", release="warp")
    assert res["deadlocks"] == 0 and res["order_violations"] == 0 and res["finals"] == {(12, 12)}


@pytest.mark.parametrize("release", ["warp", "thread"])
def test_equality_rule_deadlocks(release):
    """Positive control: the equality wait deadlocks in the same model, with either release: a
    warp that has passed the wait, added and released moves the count past the target of a slower
    warp of its own block, which then never sees equality (on the GPU: polls until the trap)."""
    res = explore(lanes=2 if release == "warp" else 1, wait="eq", release=release)
    assert res["deadlocks"] > 0


def test_equality_rule_is_safe_only_with_one_lane_per_block():
    """Why no test saw it: with the whole block as one unit (the interpreter's view, or a CTA
    barrier after the poll, which today's sm_90 builds happen to have) equality never misses."""
    res = explore(warps=1, lanes=1, wait="eq", release="thread")
    assert res["deadlocks"] == 0 and res["order_violations"] == 0


def test_order_check_has_a_positive_control():
    """Releasing before adding lets a later block add first: the order check must see it."""
    res = explore(lanes=1, wait="ge", release="thread", add_after_release=True)
    assert res["order_violations"] > 0


def test_forward_progress_rests_on_launch_order():
    """Blocks that start out of launch order can deadlock when not all of them are resident (a
    waiting block holds the only slot its predecessor needs); in launch order they never do."""
    assert explore(lanes=1, resident=1, dispatch=(1, 0, 2))["deadlocks"] > 0
    assert explore(lanes=1, resident=1)["deadlocks"] == 0
    assert explore(lanes=1, resident=3, dispatch=(2, 1, 0))["deadlocks"] == 0


def test_bad_rule_names_are_refused():
    with pytest.raises(ValueError, match="wait/release"):
        explore(wait="gt")


if __name__ == "__main__":  # python tests/test_dq_order_protocol.py: the counts of each rule
    for wait, release in itertools.product(("ge", "eq"), ("warp", "thread")):
        r = explore(wait=wait, release=release)
        print(f"wait {wait:2} release per {release:6}: {r['states']:6} states, {r['deadlocks']:5} deadlocks, "
              f"{r['order_violations']} order violations", file=sys.stdout)
