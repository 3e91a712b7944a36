"""Data-loading throughput: clips/s of `VideoBoothDataset` on long synthetic videos, decoding
from frame 0 vs seeking, with 0 or more DataLoader workers (docs/train.md gives the figures).

    python -m vb_train.throughput --out /tmp/tp --videos 8 --frames 480 --workers 0 2

The videos are written first (libx264, a keyframe every `--gop` frames, as web video has one
every second or two), in the VideoBooth layout with one subject each; every clip is
`--num-frames` frames `--stride` apart at a random offset, plus frame 0 for the image prompt.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def write_videos(root: Path, num: int, frames: int, size: int, gop: int, fps: int = 24) -> None:
    """`num` videos of `frames` frames in the VideoBooth layout (category "clip"), one subject
    (a square) in every mask."""
    import csv

    import av
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for v in range(num):
        vid = f"v{v:04d}"
        folder = root / "clip" / vid
        folder.mkdir(parents=True, exist_ok=True)
        with av.open(str(folder / "video.mp4"), "w") as c:
            st = c.add_stream("libx264", rate=fps)
            st.width = st.height = size
            st.pix_fmt = "yuv420p"
            st.codec_context.gop_size = gop
            st.codec_context.options = {"crf": "23", "keyint_min": str(gop), "sc_threshold": "0"}
            base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            for i in range(frames):
                img = np.roll(base, i, axis=1)
                for p in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(p)
            for p in st.encode():
                c.mux(p)
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
        Image.fromarray(mask).save(folder / "mask_1.png")
        q = size // 4
        (folder / "mask.json").write_text(json.dumps(
            [{"value": 1, "label": "square", "logit": 1.0, "box": [q, q, 3 * q, 3 * q]}]))
        rows.append({"videoid": vid, "name": "a square moving", "page_dir": "0"})
    with open(root / "clip.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def measure(root: Path, *, seek: bool, workers: int, num_frames: int, stride: int, size: int,
            batch_size: int = 4, epochs: int = 2) -> float:
    """Clips per second of the dataset through a DataLoader (the first batch excluded)."""
    from vb_train.data import VideoBoothDataset

    ds = VideoBoothDataset(root, num_frames=num_frames, frame_stride=stride, size=size, image_size=size, seed=0,
                           seek=seek)
    n, t0 = 0, None
    for e in range(epochs):
        ds.set_epoch(e)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                             collate_fn=lambda items: len(items))
        for b in loader:
            if t0 is None:
                t0 = time.perf_counter()  # workers started, first batch in
                continue
            n += b
    return n / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vb_train.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the synthetic videos")
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--frames", type=int, default=480, help="frames per video (20 s at 24 fps)")
    p.add_argument("--size", type=int, default=320, help="video side in pixels")
    p.add_argument("--out-size", type=int, default=256, dest="out_size", help="clip side after resizing")
    p.add_argument("--gop", type=int, default=24, help="frames between keyframes")
    p.add_argument("--num-frames", type=int, default=16, dest="num_frames")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    a = p.parse_args(argv)
    root = Path(a.out)
    if not (root / "clip.csv").is_file():
        write_videos(root, a.videos, a.frames, a.size, a.gop)
    rows = []
    for workers in a.workers:
        for seek in (False, True):
            cps = measure(root, seek=seek, workers=workers, num_frames=a.num_frames, stride=a.stride,
                          size=a.out_size)
            rows.append({"workers": workers, "seek": seek, "clips_per_s": round(cps, 2)})
            print(json.dumps(rows[-1]), flush=True)
    (root / "throughput.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
