"""Temporal schedules of the VideoBooth cross-frame attention (DESIGN.md section 2).

A schedule is data, not a branch: which frames each frame reads (``refs``), which frames get
their values refreshed from the image prompt (``keyframes``), and whether the image tokens are
also keys of every frame (``image_everywhere``). Every backend reads the same object; the fused
kernels read the tables built by :meth:`Schedule.plan`, so a new schedule is a new table and
never a new kernel.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

IMAGE = -1
"""Source id of the image prompt's tokens in a :class:`Plan` (frames are 0..F-1)."""


@dataclass(frozen=True)
class Source:
    """One distinct key/value source of a query row: ``frame`` (or IMAGE) read ``count`` times.

    ``value_slot`` is the keyframe slot whose refreshed values U replace V_frame, or -1 when the
    values are the frame's own V (or the image's V).
    """

    frame: int
    value_slot: int
    count: int


@dataclass(frozen=True)
class Plan:
    """What one phase computes: query rows, each attending to a list of distinct sources.

    ``rows[i]`` is (query frame, sources); row i writes output slot i (phase 1: keyframe slot in
    U; phase 2: frame i). Duplicated references become a count, which the kernels apply exactly
    as a log(count) bias: softmax over [K; K] keys equals softmax over K with weight 2.
    """

    rows: tuple[tuple[int, tuple[Source, ...]], ...]
    # Sources no row reads whose gradients this phase still writes (as zeros): phase 2 writes
    # every frame's dK/dV and the image's, so the backward allocates its gradients unfilled.
    unread: tuple[int, ...] = ()

    def targets(self) -> tuple[tuple[Source, tuple[tuple[int, int], ...]], ...]:
        """Inverse table for the backward: each distinct (frame, value slot) with its readers
        as (row, count), readers in row order (deterministic accumulation order); then the
        ``unread`` sources with no readers (their programs write zeros)."""
        readers: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, (_, sources) in enumerate(self.rows):
            for s in sources:
                readers.setdefault((s.frame, s.value_slot), []).append((i, s.count))
        # Heaviest targets first (most readers, then frame id): the dK/dV grid's z axis runs in
        # this order, so the anchor frame's long programs start first instead of trailing.
        order = sorted(readers.items(), key=lambda item: (-len(item[1]), item[0]))
        return tuple((Source(fr, slot, 1), tuple(rd)) for (fr, slot), rd in order) + tuple(
            (Source(fr, -1, 1), ()) for fr in self.unread)

    def tables(self, device: torch.device | str, max_readers: int | None = None) -> dict[str, torch.Tensor]:
        """Device tables for the fused kernels (int32 ids, float32 log-counts), cached.

        ``max_readers``: split every backward target read by more rows into chunks of at most
        that many readers (see :func:`chunk_targets`); None keeps one program per target."""
        return _plan_tables(self, torch.device(device), max_readers)


def chunk_targets(targets, max_readers: int | None):
    """Split heavy dK/dV targets for load balance (issue 11 item 4).

    ``targets``: :meth:`Plan.targets`. A target read by more than ``max_readers`` rows becomes
    ceil(R / max_readers) chunks of consecutive readers, as even as they go (row order kept); each chunk's programs
    write fp32 partial sums to their own partial slot, and one reduction adds a target's slots
    in slot order: the same bits every run. Returns (chunks, reductions): chunks are
    (Source, readers, partial slot or -1), heaviest first, unread targets last; reductions are
    (Source, first slot, number of slots), one per split target."""
    chunks, reductions, n_slots = [], [], 0
    for src, readers in targets:
        if max_readers is None or len(readers) <= max_readers:
            chunks.append((src, readers, -1))
            continue
        count = -(-len(readers) // max_readers)  # sizes differ by at most one: 16 at cap 15 -> 8 + 8
        bounds = [i * len(readers) // count for i in range(count + 1)]
        parts = [readers[bounds[i]:bounds[i + 1]] for i in range(count)]
        reductions.append((src, n_slots, len(parts)))  # a target's partial slots are consecutive
        chunks.extend((src, part, n_slots + i) for i, part in enumerate(parts))
        n_slots += len(parts)
    # launch order: heaviest programs first, unread targets (no readers) last; stable otherwise
    order = sorted(range(len(chunks)), key=lambda i: (-len(chunks[i][1]), i) if chunks[i][1] else (1, i))
    return tuple(chunks[i] for i in order), tuple(reductions)


@lru_cache(maxsize=256)
def _plan_tables(plan: Plan, device: torch.device, max_readers: int | None = None) -> dict[str, torch.Tensor]:
    # Built once per (plan, device, split), shared by equal schedules; the copy to the device is
    # illegal inside a CUDA graph capture, so a first use there is an error that says what to do.
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"schedule: the fused kernels' tables for this schedule are not on {device} yet, and a CUDA "
            "graph is being captured (a host-to-device copy is illegal there); run the op once at "
            "these shapes (forward and backward, if the graph has one) before capturing")
    rows = plan.rows
    n_src_max = max(1, max(len(s) for _, s in rows))
    row_qframe = [qf for qf, _ in rows]
    n_src = [len(s) for _, s in rows]
    src_frame = [[s.frame for s in srcs] + [0] * (n_src_max - len(srcs)) for _, srcs in rows]
    src_vslot = [[s.value_slot for s in srcs] + [-1] * (n_src_max - len(srcs)) for _, srcs in rows]
    src_logw = [[math.log(s.count) for s in srcs] + [0.0] * (n_src_max - len(srcs)) for _, srcs in rows]

    targets, reductions = chunk_targets(plan.targets(), max_readers)
    n_rd_max = max([1] + [len(rd) for _, rd, _ in targets])
    tgt_frame = [t.frame for t, _, _ in targets]
    tgt_vslot = [t.value_slot for t, _, _ in targets]
    tgt_part = [p for _, _, p in targets]
    n_rd = [len(rd) for _, rd, _ in targets]
    rd_row = [[r for r, _ in rd] + [0] * (n_rd_max - len(rd)) for _, rd, _ in targets]
    # the target's place in each reader's source list: the reader's dQ partial slot (fused backward)
    place = [{(s.frame, s.value_slot): j for j, s in enumerate(srcs)} for _, srcs in rows]
    rd_slot = [[place[r][(t.frame, t.value_slot)] for r, _ in rd] + [0] * (n_rd_max - len(rd)) for t, rd, _ in targets]

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    def f32(x):
        return torch.tensor(x, dtype=torch.float32, device=device)

    return {
        "row_qframe": i32(row_qframe), "n_src": i32(n_src), "src_frame": i32(src_frame),
        "src_vslot": i32(src_vslot), "src_logw": f32(src_logw),
        "tgt_frame": i32(tgt_frame or [0]), "tgt_vslot": i32(tgt_vslot or [0]), "tgt_part": i32(tgt_part or [-1]),
        "n_rd": i32(n_rd or [0]), "rd_row": i32(rd_row if targets else [[0]]),
        "rd_slot": i32(rd_slot if targets else [[0]]),
        "red_frame": i32([t.frame for t, _, _ in reductions] or [0]),
        "red_vslot": i32([t.value_slot for t, _, _ in reductions] or [-1]),
        "red_first": i32([first for _, first, _ in reductions] or [0]),
        "red_count": i32([count for _, _, count in reductions] or [0]),
        "n_rows": len(rows), "n_targets": len(targets), "n_src_max": n_src_max, "n_rd_max": n_rd_max,
        "n_partials": sum(count for _, _, count in reductions), "n_reductions": len(reductions),
        "reader_counts": tuple(len(rd) for _, rd, _ in targets), "plan": plan,
    }


class Schedule:
    """Which frames each frame attends to.

    Args:
        refs: (F, R) ints; ``refs[f]`` lists frame f's reference frames, in key order; -1 is an
            empty slot. A duplicated reference counts twice (the original's frame 0 sees [0, 0]).
        keyframes: frames whose values are refreshed by attending to the image prompt's tokens
            (phase 1). May be empty: plain cross-frame attention.
        image_everywhere: also prepend the image tokens to every frame's keys (phase 2).
    """

    # Not a dataclass: ``keyframes`` is both the instance's tuple and the named constructor
    # ``Schedule.keyframes(F, m)``; the instance attribute shadows the classmethod.
    def __init__(self, refs, keyframes: Sequence[int] = (0,), image_everywhere: bool = False,
                 name: str = "custom"):
        if isinstance(refs, torch.Tensor):
            refs = refs.tolist()
        try:
            table = tuple(tuple(_as_int(r) for r in row) for row in refs)
        except TypeError as e:
            raise TypeError(f"refs: expected an (F, R) table of ints, got {type(refs).__name__}") from e
        if len(table) == 0:
            raise ValueError("refs: expected at least one frame (F >= 1), got an empty table")
        widths = {len(row) for row in table}
        if len(widths) != 1 or 0 in widths:
            raise ValueError(f"refs: expected a rectangular (F, R) table with R >= 1, got row lengths {sorted(widths)}")
        n_frames = len(table)
        for f, row in enumerate(table):
            for r in row:
                if r < -1 or r >= n_frames:
                    raise ValueError(f"refs[{f}]: expected frame ids in [0, {n_frames - 1}] or -1, got {r}")
        try:
            keys = tuple(sorted({_as_int(u) for u in keyframes}))
        except TypeError as e:
            raise TypeError(f"keyframes: expected a sequence of ints, got {type(keyframes).__name__}") from e
        for u in keys:
            if not 0 <= u < n_frames:
                raise ValueError(f"keyframes: expected frame ids in [0, {n_frames - 1}], got {u}")
        self.__dict__.update(refs=table, keyframes=keys, image_everywhere=bool(image_everywhere), name=name,
                             _fused={})

    def __setattr__(self, key, value):
        raise AttributeError("Schedule is immutable; build a new one")

    def _key(self):
        return (self.refs, self.keyframes, self.image_everywhere)

    def __eq__(self, other):
        return isinstance(other, Schedule) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    # ---- named schedules (DESIGN.md section 2) -------------------------------------------
    @classmethod
    def videobooth(cls, num_frames: int) -> "Schedule":
        """The paper's sparse-causal schedule: keyframes {0}, refs[f] = [0, max(f-1, 0)]."""
        _check_frames(num_frames)
        return cls([[0, max(f - 1, 0)] for f in range(num_frames)], (0,), name="videobooth")

    @classmethod
    def first(cls, num_frames: int) -> "Schedule":
        """Every frame reads only the (refreshed) first frame."""
        _check_frames(num_frames)
        return cls([[0] for _ in range(num_frames)], (0,), name="first")

    @classmethod
    def window(cls, num_frames: int, k: int) -> "Schedule":
        """Rolling window: refs[f] = the k frames before f that exist; frame 0 reads itself."""
        _check_frames(num_frames)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k!r}")
        refs = []
        for f in range(num_frames):
            row = list(range(max(f - k, 0), f)) or [0]
            refs.append(row + [-1] * (k - len(row)))
        return cls(refs, (0,), name=f"window{k}")

    @classmethod
    def keyframes(cls, num_frames: int, m: int) -> "Schedule":
        """Periodic re-anchoring: keyframes {0, m, 2m, ...}; refs[f] = [m*floor(f/m), max(f-1, 0)]."""
        _check_frames(num_frames)
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"m: expected an int >= 1, got {m!r}")
        refs = [[m * (f // m), max(f - 1, 0)] for f in range(num_frames)]
        return cls(refs, tuple(range(0, num_frames, m)), name=f"keyframes{m}")

    # ---- derived --------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return len(self.refs)

    @property
    def num_refs(self) -> int:
        return len(self.refs[0])

    def with_image_everywhere(self, on: bool = True) -> "Schedule":
        return Schedule(self.refs, self.keyframes, on, name=self.name + ("+img" if on else ""))

    def keys_per_frame(self, n_tokens: int, n_image: int) -> list[int]:
        """Number of keys frame f attends to in phase 2 (literal concat length)."""
        img = n_image if self.image_everywhere else 0
        return [img + n_tokens * sum(r >= 0 for r in row) for row in self.refs]

    def plan(self, has_image: bool) -> tuple[Plan, Plan]:
        """(phase 1, phase 2) plans. Phase 1 is empty when there are no keyframes."""
        return _plans(self.refs, self.keyframes, self.image_everywhere, has_image)

    def frames_without_refs(self) -> tuple[int, ...]:
        """Frames whose refs are all -1 (they have keys only if image tokens are prepended); cached."""
        hit = self._fused.get("empty")
        if hit is None:
            hit = self._fused["empty"] = tuple(f for f, row in enumerate(self.refs) if all(r < 0 for r in row))
        return hit

    def fused_tables(self, has_image: bool, device: torch.device) -> tuple:
        """(phase 1 tables or None, phase 2 tables) for the fused kernels on ``device``, built at
        the first call and kept on this schedule, so a call costs one dict lookup (no plan
        hashing). Built with a host-to-device copy, which a CUDA graph capture forbids: run the
        op once (or call this) before capturing."""
        key = (has_image, device)
        hit = self._fused.get(key)
        if hit is None:
            phase1, phase2 = self.plan(has_image)
            hit = (phase1.tables(device) if phase1.rows else None, phase2.tables(device))
            self._fused[key] = hit
        return hit

    def __repr__(self) -> str:
        return (f"Schedule(name={self.name!r}, F={self.num_frames}, refs={[list(r) for r in self.refs]}, "
                f"keyframes={list(self.keyframes)}, image_everywhere={self.image_everywhere})")


def _as_int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, torch.SymInt)) and not hasattr(x, "__index__"):
        raise TypeError(f"expected an int, got {type(x).__name__}")
    return int(x)


def _check_frames(num_frames) -> None:
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames: expected an int >= 1, got {num_frames!r}")


@lru_cache(maxsize=256)
def _plans(refs, keyframes, image_everywhere, has_image) -> tuple[Plan, Plan]:
    # Phase 1 refreshes only the keyframes some frame reads: an unread U changes nothing (exact).
    read = {r for row in refs for r in row if r >= 0}
    keyframes = tuple(u for u in keyframes if u in read)
    slot = {u: i for i, u in enumerate(keyframes)}
    img = (Source(IMAGE, -1, 1),) if has_image else ()
    phase1 = Plan(tuple((u, img + (Source(u, -1, 1),)) for u in keyframes))
    rows = []
    for f, row in enumerate(refs):
        # Exact shortcut: a reference read c times is attended once with a log(c) bias, so the
        # original's [0, 0] costs one pass over frame 0 and the LSE still equals the literal one.
        counts = Counter(r for r in row if r >= 0)
        srcs = tuple(Source(r, slot.get(r, -1), c) for r, c in counts.items())
        rows.append((f, (img if image_everywhere else ()) + srcs))
    # Phase 2's backward writes every gradient once (zeros where nothing reads), phase 1 adds.
    unread = tuple(f for f in range(len(refs)) if f not in read)
    if has_image and not image_everywhere:
        unread += (IMAGE,)
    return phase1, Plan(tuple(rows), unread)
