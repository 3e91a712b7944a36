"""Cases shared by the attention tests: named and random schedules, the oracle call."""
from __future__ import annotations

import random

import torch

from vb_kernels import Schedule, videobooth_attention
from vb_kernels.testing import upcast


def random_schedule(n_frames: int, n_refs: int, seed: int) -> Schedule:
    """A hand-built-looking table: duplicated refs, -1 slots, random keyframes."""
    rng = random.Random(seed)
    refs = []
    for _ in range(n_frames):
        row = [rng.choice([-1] + list(range(n_frames))) for _ in range(n_refs)]
        if all(r < 0 for r in row):
            row[rng.randrange(n_refs)] = rng.randrange(n_frames)
        if rng.random() < 0.5:  # force a duplicate
            row[-1] = next(r for r in row if r >= 0)
        refs.append(row)
    keyframes = rng.sample(range(n_frames), k=rng.randint(0, min(2, n_frames)))
    return Schedule(refs, keyframes, image_everywhere=rng.random() < 0.5, name=f"random{seed}")


def named_schedule(name: str, n_frames: int) -> Schedule:
    if name == "videobooth":
        return Schedule.videobooth(n_frames)
    if name == "first":
        return Schedule.first(n_frames)
    if name == "window2":
        return Schedule.window(n_frames, 2)
    if name == "keyframes2":
        return Schedule.keyframes(n_frames, 2)
    if name == "image_everywhere":
        return Schedule.videobooth(n_frames).with_image_everywhere()
    if name == "no_keyframes":  # the unconditional pass of classifier-free guidance
        return Schedule(Schedule.videobooth(n_frames).refs, keyframes=())
    if name.startswith("random"):
        return random_schedule(n_frames, 3, int(name[len("random"):]))
    raise KeyError(name)


SCHEDULES = ["videobooth", "first", "window2", "keyframes2", "image_everywhere", "no_keyframes",
             "random0", "random1", "random2"]


def oracle(q, k, v, k_img, v_img, schedule, **kw):
    """The reference backend in float64 on upcast inputs."""
    return videobooth_attention(*upcast(q, k, v, k_img, v_img), schedule=schedule, backend="reference", **kw)


def needs_cuda():
    import pytest
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
