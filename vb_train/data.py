"""VideoBooth training data: (caption, image prompt, video) triplets.

The loader reads the layout of the VideoBooth subset of WebVid (and the synthetic set that
`vb_train.toy.synthetic` writes in the same layout) and builds a triplet the way the paper does: the
subject is cut out of frame 0 with its mask, pasted on white, cropped to its box, padded to a
square and resized; the clip is a run of frames resized and centre-cropped. Each branch has its
own augmentation (the image prompt's is random; the video's is the same for every frame).

Layout
------
::

    root/
      {category}.csv                 one CSV per category (dog.csv, cat.csv, ...)
      {category}/{videoid}/          one folder per video
          mask.json                  the segments of frame 0 (schema below)
          mask_{value}.png           one mask per segment; nonzero pixels are the segment
          video.mp4 | {videoid}.mp4  the clip ...
          frames/*.png|*.jpg         ... or its frames (sorted by the number in the name);
                                     image files directly in the folder whose names do not
                                     start with "mask" are taken as frames too
    video_root/{page_dir}/{videoid}.mp4   WebVid's own layout: used when the video folder
                                          holds no clip and `video_root` is given

CSV schema: a header row, then one row per video. Columns are found by name; others are
ignored (WebVid's contentUrl and duration, the synthetic set's split/shape/pattern/...):

    videoid    WebVid video id; also the name of the video's folder
    page_dir   WebVid page directory (only used with `video_root`; may be empty)
    name       the caption ("caption" is accepted as an alias; `caption_column` picks
               another column, e.g. the synthetic set's short_caption)

mask.json schema (what the VideoBooth parsing step wrote: Grounded-SAM output)::

    [{"value": 0, "label": "background"},
     {"value": 1, "label": "panda", "logit": 0.84, "box": [x1, y1, x2, y2]}, ...]

    value  int; the segment's mask is mask_{value}.png
    label  the subject word (the caption word whose tokens the image tokens replace)
    box    [x1, y1, x2, y2] in pixels of frame 0 (x right, y down, x2/y2 exclusive; floats
           allowed). If the mask has another resolution than the decoded frames, the mask is
           resized (nearest) and the box scaled by the same factors.
    logit  optional detection score; with several subjects, evaluation picks the highest,
           training picks one at random (as the original code)

Entries with value 0, label "background" or no box are not subjects.

Output of `VideoBoothDataset.__getitem__` (a dict; `torch.utils.data.default_collate` batches
it, strings become lists):

    video       float32 (F, 3, H, W) in [-1, 1]
    image       float32 (3, S, S) in [-1, 1]: the subject on white (white = 1.0)
    caption     str
    subject     str, the mask label (the word to replace in the caption)
    video_id    str
    category    str
    index       int, the item actually returned (differs from the one asked for after a skip)
    skipped     int, how many bad items were passed over to return this one

Bad data: a missing or corrupt video, frame, mask or mask.json never ends an epoch. The item is
recorded (reason, path, message), logged once as a warning, remembered so that it is not
decoded again, and the next item is returned instead (index + 1, wrapping around).
`VideoBoothDataset.report()` gives the counters; `scan()` checks every item up front. With
DataLoader workers each worker holds its own counters: sum the per-sample `skipped` field in
the training loop for a global count.

Randomness (frame offset, subject choice, augmentation) comes from a generator seeded by
(seed, epoch, index), not from global state: an item is the same whichever worker loads it and
in whatever order, which is what an exact resume needs. Call `set_epoch` every epoch.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov")

__all__ = [
    "PromptAugment",
    "SampleError",
    "VideoBoothDataset",
    "VideoRecord",
    "augment_image_prompt",
    "center_crop_resize",
    "choose_frame_indices",
    "load_mask",
    "make_image_prompt",
    "read_frames",
    "read_mask_json",
    "read_records",
]


# --------------------------------------------------------------------------------------------
# errors and records
# --------------------------------------------------------------------------------------------
class SampleError(Exception):
    """One item could not be loaded. `reason` is a short key for the counters
    (missing_video, bad_video, missing_mask, bad_mask, no_subject, bad_box, too_short, error)."""

    def __init__(self, reason: str, path: str | os.PathLike | None, message: str):
        super().__init__(reason, path, message)
        self.reason = reason
        self.path = str(path) if path is not None else ""
        self.message = message

    def __str__(self) -> str:
        # built on demand: the path is sometimes filled in by a caller that knows it
        return f"{self.reason}: {self.path or '?'}: {self.message}"


@dataclass(frozen=True)
class VideoRecord:
    """One CSV row: where the video's folder is and what its caption says."""

    category: str
    videoid: str
    page_dir: str
    caption: str
    folder: Path


def read_records(
    root: str | os.PathLike,
    categories: Sequence[str] | None = None,
    row_filter: Callable[[dict], bool] | None = None,
    caption_column: str | None = None,
) -> list[VideoRecord]:
    """Read `root/{category}.csv` for each category (all CSVs in `root` when None).

    `row_filter(row) -> bool` sees the raw CSV row (a dict of strings) and keeps the row when
    True; for example `lambda r: r["split"] == "train"` on the synthetic set.
    caption_column: the column holding the caption; None: "name", else "caption".
    Rows with an empty videoid are dropped with a warning. A CSV without the needed columns is
    a configuration error (ValueError), not a bad item.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root: not a directory: {root}")
    if categories is None:
        categories = sorted(p.stem for p in root.glob("*.csv"))
        if not categories:
            raise ValueError(f"root: no {{category}}.csv file in {root}")
    elif isinstance(categories, str):
        raise TypeError("categories: expected a sequence of category names, got a str")
    records: list[VideoRecord] = []
    for cat in categories:
        path = root / f"{cat}.csv"
        if not path.is_file():
            raise ValueError(f"categories: no CSV for category {cat!r} ({path})")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or ())
            if caption_column is not None:
                cap_col = caption_column if caption_column in cols else None
            else:
                cap_col = "name" if "name" in cols else "caption" if "caption" in cols else None
            if "videoid" not in cols or cap_col is None:
                want = caption_column or "name (or caption)"
                raise ValueError(
                    f"root: {path} needs the columns videoid and {want}, has {sorted(cols)}")
            for row in reader:
                if row_filter is not None and not row_filter(row):
                    continue
                vid = (row.get("videoid") or "").strip()
                if not vid:
                    log.warning("%s: row without a videoid dropped", path)
                    continue
                records.append(VideoRecord(
                    category=cat, videoid=vid, page_dir=(row.get("page_dir") or "").strip(),
                    caption=row[cap_col] or "", folder=root / cat / vid))
    return records


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
def _natural_key(p: Path):
    # frame_2.png before frame_10.png
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def find_video(rec: VideoRecord, video_root: str | os.PathLike | None = None) -> Path | list[Path]:
    """The clip of a record: a video file path, or the sorted list of its frame files.

    Raises SampleError("missing_video") when there is none.
    """
    folder = rec.folder
    for name in ("video", rec.videoid):
        for ext in VIDEO_EXTS:
            p = folder / f"{name}{ext}"
            if p.is_file():
                return p
    frames_dir = folder / "frames"
    if frames_dir.is_dir():
        frames = [p for p in frames_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS]
    elif folder.is_dir():
        frames = [p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTS and not p.name.lower().startswith("mask")]
    else:
        frames = []
    if frames:
        return sorted(frames, key=_natural_key)
    if video_root is not None:
        p = Path(video_root) / rec.page_dir / f"{rec.videoid}.mp4"
        if p.is_file():
            return p
    raise SampleError("missing_video", folder, "no video file and no frames")


def choose_frame_indices(total: int, num_frames: int, stride: int, u: float | None) -> list[int]:
    """Indices of the frames of one clip.

    A run of `num_frames` frames `stride` apart, starting at `floor(u * (total - span + 1))`
    (u in [0, 1); u=None starts at 0). A video shorter than the span but with at least
    `num_frames` frames is sampled evenly over its length instead (a smaller stride), so short
    clips are still used; with fewer frames than `num_frames` it raises SampleError.
    """
    span = (num_frames - 1) * stride + 1
    if total >= span:
        start = 0 if u is None else min(int(u * (total - span + 1)), total - span)
        return [start + i * stride for i in range(num_frames)]
    if total >= num_frames:
        return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()
    raise SampleError("too_short", None, f"{total} frames, need at least {num_frames}")


# A wanted frame this many frames past the decoder's position is reached by seeking (to the
# keyframe at or before it) instead of decoding every frame in between.
SEEK_GAP = 24


def _decode_av(path: Path, wanted: set[int], seek: bool = True,
               container=None) -> tuple[dict[int, np.ndarray], int, bool]:
    """Decode the frames `wanted` of `path`. Returns (frames kept, frames up to the last one
    decoded, whether the end of the stream was reached).

    With `seek` (and a stream whose frame rate and time base are known), a wanted frame more
    than SEEK_GAP frames ahead is reached with a seek to the keyframe at or before it, and frame
    numbers come from timestamps (round((pts - start) * time_base * rate), exact for constant
    frame rates); the clip's frames are then the same as decoding from the start. Otherwise the
    stream is decoded from the start and frames are counted (variable frame rates).
    `container`: an already open, not yet decoded PyAV container of `path` (it is closed here)."""
    import av  # imported here: only video files need it

    keep: dict[int, np.ndarray] = {}
    targets = sorted(wanted)
    with (container if container is not None else av.open(str(path))) as container:
        stream = container.streams.video[0]
        rate, tb = stream.average_rate, stream.time_base
        start = stream.start_time or 0
        timed = seek and bool(rate) and bool(tb)
        pos = 0  # the frame number the decoder yields next (when decoding on from the start)
        frames = container.decode(stream)
        for t in targets:
            if t in keep:
                continue
            if timed and t - pos > SEEK_GAP:
                container.seek(start + int(t / (rate * tb)), stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
                pos = -1  # unknown until the first frame after the seek
            for frame in frames:
                if timed and frame.pts is not None:
                    n = int(round(float((frame.pts - start) * tb * rate)))
                else:
                    n = max(pos, 0)
                if n in wanted:
                    # one swscale thread: the same file always gives the same pixels
                    keep[n] = frame.reformat(format="rgb24", threads=1).to_ndarray()
                pos = n + 1
                if n >= t:
                    break
            else:
                return keep, max(pos, 0), True
    return keep, pos, False


def _open_counted(path: Path):
    """(open PyAV container, the frame count its header gives, 0 when it does not say)."""
    import av

    container = av.open(str(path))
    if not container.streams.video:
        container.close()
        raise SampleError("bad_video", path, "no video stream")
    return container, int(container.streams.video[0].frames or 0)


def read_frames(source: Path | list[Path], num_frames: int, stride: int = 1,
                u: float | None = None, seek: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read one clip and frame 0.

    source: a video file (decoded with PyAV) or a sorted list of frame images. seek: reach far
    frames of a video by seeking (False: decode every frame from the start; the same frames).
    Returns (clip uint8 (F, H, W, 3), frame0 uint8 (H, W, 3)). Frame indices come from
    `choose_frame_indices(total, num_frames, stride, u)`.
    Raises SampleError (bad_video / too_short) for unreadable or short clips.
    """
    if isinstance(source, list):
        idx = choose_frame_indices(len(source), num_frames, stride, u)
        cache: dict[int, np.ndarray] = {}
        for i in {0, *idx}:
            try:
                with Image.open(source[i]) as im:
                    cache[i] = np.asarray(im.convert("RGB"))
            except Exception as e:  # PIL raises several types for broken files
                raise SampleError("bad_video", source[i], f"unreadable frame ({e})") from e
        shapes = {a.shape for a in cache.values()}
        if len(shapes) != 1:
            raise SampleError("bad_video", source[0], f"frames of different sizes {sorted(shapes)}")
        return np.stack([cache[i] for i in idx]), cache[0]

    path = source
    try:
        container, total = _open_counted(path)  # one open for the count and the decode
        if total <= 0:
            # the container does not say: count by decoding (rare; small files)
            _, total, _ = _decode_av(path, {1 << 62}, seek=False, container=container)
            container = None
        try:
            idx = choose_frame_indices(total, num_frames, stride, u)
        except SampleError:
            if container is not None:
                container.close()
            raise
        keep, n, ended = _decode_av(path, {0, *idx}, seek=seek, container=container)
        if ended and n > 0:
            # the header over-counted: pick again over the frames that really exist
            idx = choose_frame_indices(n, num_frames, stride, u)
            keep, n, _ = _decode_av(path, {0, *idx}, seek=seek)
    except SampleError as e:
        if not e.path:
            e.path = str(path)
        raise
    except Exception as e:  # av.error.*, OSError, ...: all mean the file is unusable
        raise SampleError("bad_video", path, f"{type(e).__name__}: {e}") from e
    missing = [i for i in {0, *idx} if i not in keep]
    if missing:
        raise SampleError("bad_video", path, f"could not decode frames {sorted(missing)[:5]}")
    return np.stack([keep[i] for i in idx]), keep[0]


# --------------------------------------------------------------------------------------------
# masks and the image prompt
# --------------------------------------------------------------------------------------------
def read_mask_json(folder: Path) -> list[dict]:
    """The subject entries of `folder/mask.json` (background and box-less entries dropped)."""
    path = folder / "mask.json"
    if not path.is_file():
        raise SampleError("missing_mask", path, "no mask.json")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
        if isinstance(entries, dict):  # a single segment written as an object
            entries = [entries]
        subjects = []
        for e in entries:
            if not isinstance(e, dict) or "box" not in e or e.get("label") == "background":
                continue
            value = int(e["value"])
            if value == 0:
                continue
            box = [float(v) for v in e["box"]]
            if len(box) != 4:
                raise ValueError(f"box has {len(box)} numbers, expected 4")
            subjects.append({"value": value, "label": str(e["label"]), "box": box,
                             "logit": float(e.get("logit", 0.0))})
    except SampleError:
        raise
    except Exception as e:
        raise SampleError("bad_mask", path, f"{type(e).__name__}: {e}") from e
    if not subjects:
        raise SampleError("no_subject", path, "no segment with a label and a box")
    return subjects


def load_mask(path: Path) -> np.ndarray:
    """A mask png as bool (H, W): True where any channel is nonzero."""
    if not path.is_file():
        raise SampleError("missing_mask", path, "no mask file")
    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except Exception as e:
        raise SampleError("bad_mask", path, f"{type(e).__name__}: {e}") from e
    if a.ndim == 3:
        a = a[..., :3].any(axis=-1) if a.shape[-1] != 2 else a[..., 0]
    return a != 0


def make_image_prompt(frame0: np.ndarray, mask: np.ndarray, box: Sequence[float], size: int,
                      box_trim: tuple[int, float] | None = None) -> torch.Tensor:
    """The subject of frame 0 on white, cropped to its box, padded square, resized.

    frame0: uint8 (H, W, 3). mask: bool (h, w), resized (nearest) to (H, W) when it differs,
    with `box` scaled alike. box: [x1, y1, x2, y2] pixels, x2/y2 exclusive.
    box_trim: (edge, fraction): cut that fraction of the box off one edge (0 top, 1 bottom,
    2 left, 3 right) first, the box augmentation of the original stage-2 code.
    Returns float32 (3, size, size) in [-1, 1], white (1.0) outside the subject.
    Padding is centred (the odd pixel goes bottom/right) and white.
    """
    if frame0.ndim != 3 or frame0.shape[-1] != 3:
        raise ValueError(f"frame0: expected (H, W, 3), got {tuple(frame0.shape)}")
    if mask.ndim != 2:
        raise ValueError(f"mask: expected (H, W), got {tuple(mask.shape)}")
    H, W = frame0.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    if mask.shape != (H, W):
        sy, sx = H / mask.shape[0], W / mask.shape[1]
        x1, x2, y1, y2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
        m = torch.from_numpy(mask.astype(np.uint8))[None, None].float()
        mask = F.interpolate(m, size=(H, W), mode="nearest")[0, 0].bool().numpy()
    if box_trim is not None:
        edge, frac = box_trim
        if edge == 0:
            y1 += frac * (y2 - y1)
        elif edge == 1:
            y2 -= frac * (y2 - y1)
        elif edge == 2:
            x1 += frac * (x2 - x1)
        else:
            x2 -= frac * (x2 - x1)
    # whole pixels covering the box, inside the frame
    x1, y1 = max(0, math.floor(x1)), max(0, math.floor(y1))
    x2, y2 = min(W, math.ceil(x2)), min(H, math.ceil(y2))
    if x2 - x1 < 2 or y2 - y1 < 2:
        raise SampleError("bad_box", None, f"box {list(box)} is empty inside a {W}x{H} frame")
    if not mask[y1:y2, x1:x2].any():
        raise SampleError("bad_mask", None, "the mask is empty inside the box")

    img = torch.from_numpy(np.ascontiguousarray(frame0[y1:y2, x1:x2])).permute(2, 0, 1).float()
    img = img / 127.5 - 1.0
    img = torch.where(torch.from_numpy(mask[y1:y2, x1:x2])[None], img, torch.ones_like(img))
    h, w = img.shape[1:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    # pad with value 1.0 (white), centred
    img = F.pad(img, (left, side - w - left, top, side - h - top), value=1.0)
    img = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)[0]
    return img.clamp_(-1.0, 1.0)


@dataclass
class PromptAugment:
    """Random augmentation of the image prompt (the coarse/fine image branch).

    Defaults follow the original VideoBooth code (a RandomAffine with white fill):
    hflip probability 0.5, rotation uniform in +-degrees, translation uniform in
    +-translate[0] (x) and +-translate[1] (y) of the side, scale uniform in `scale`.
    box_trim: with this max fraction, one random edge of the box is cut off before cropping
    (the original uses 0.2 in stage 2 and nothing in stage 1); 0 turns it off.
    """

    hflip: float = 0.5
    degrees: float = 30.0
    translate: tuple[float, float] = (0.0, 0.1)
    scale: tuple[float, float] = (0.8, 1.2)
    box_trim: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip: a probability in [0, 1], got {self.hflip}")
        if self.degrees < 0:
            raise ValueError(f"degrees: must be >= 0, got {self.degrees}")
        if len(self.translate) != 2 or min(self.translate) < 0:
            raise ValueError(f"translate: (x, y) fractions >= 0, got {self.translate}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale: (low, high) with 0 < low <= high, got {self.scale}")
        if not 0.0 <= self.box_trim < 1.0:
            raise ValueError(f"box_trim: a fraction in [0, 1), got {self.box_trim}")


def augment_image_prompt(img: torch.Tensor, rng: np.random.Generator,
                         aug: PromptAugment) -> torch.Tensor:
    """Random flip + rotation + translation + scale of a square image prompt, white fill.

    img: (3, S, S) in [-1, 1]. Returns the same shape. One bilinear resampling
    (`affine_grid`/`grid_sample`); pixels that come from outside the image are white.
    """
    if img.ndim != 3 or img.shape[1] != img.shape[2]:
        raise ValueError(f"img: expected a square (3, S, S) image, got {tuple(img.shape)}")
    flip = rng.random() < aug.hflip
    angle = math.radians(rng.uniform(-aug.degrees, aug.degrees))
    tx = rng.uniform(-aug.translate[0], aug.translate[0]) * 2.0  # normalized coords span 2
    ty = rng.uniform(-aug.translate[1], aug.translate[1]) * 2.0
    s = rng.uniform(aug.scale[0], aug.scale[1])
    # affine_grid maps output coordinates to input ones, so build the inverse transform:
    # x_in = Flip @ Rot(-angle) / s @ (x_out - t)
    c, sn = math.cos(angle), math.sin(angle)
    m = torch.tensor([[c, sn], [-sn, c]], dtype=torch.float32) / s
    if flip:
        m[0] = -m[0]
    t = torch.tensor([tx, ty], dtype=torch.float32)
    theta = torch.cat([m, (-m @ t)[:, None]], dim=1)[None]
    grid = F.affine_grid(theta, [1, *img.shape], align_corners=False)
    # sample (img - 1) with zero padding, then add 1: outside pixels become exactly white
    out = F.grid_sample(img[None] - 1.0, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[0] + 1.0
    return out.clamp_(-1.0, 1.0)


def center_crop_resize(video: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (shorter side first, keeping the aspect) and centre-crop to (H, W).

    video: uint8 (F, h, w, 3). Returns float32 (F, 3, H, W) in [-1, 1]. The same geometry for
    every frame (it is one batched resize), so nothing jitters between frames.
    """
    x = torch.as_tensor(video)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"video: expected (F, H, W, 3), got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    H, W = size
    h, w = x.shape[-2:]
    k = max(H / h, W / w)
    nh, nw = max(H, round(h * k)), max(W, round(w * k))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - H) // 2, (nw - W) // 2
    return x[:, :, top:top + H, left:left + W].clamp_(-1.0, 1.0).contiguous()


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------
def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in v)):
        raise ValueError(f"{name}: expected a positive int or (H, W), got {v!r}")
    return int(v[0]), int(v[1])


@dataclass
class _Stats:
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (every time skipped)
    bad: dict = field(default_factory=dict)  # index -> SampleError (first failure)


class VideoBoothDataset(torch.utils.data.Dataset):
    """(caption, image prompt, video) triplets from the VideoBooth layout (module docstring).

    Args:
        root: folder with `{category}.csv` files and `{category}/{videoid}/` folders.
        categories: category names to read; None reads every CSV in `root`.
        video_root: WebVid's `{page_dir}/{videoid}.mp4` tree, for records whose folder has no
            clip. None: the clip must be in the video's folder.
        num_frames: F, frames per clip.
        frame_stride: distance between sampled frames (see `choose_frame_indices`).
        size: video output size, int or (H, W).
        image_size: S, image prompt output size (224 = CLIP's input).
        train: True: random frame offset, random subject among several, prompt augmentation.
            False: frames from 0, the highest-logit subject, no augmentation (evaluation).
        prompt_augment: the image prompt's augmentation (used when train); None: default.
        vae_prompt_augment: when given (and train), items also hold ``image_vae``: the same
            crop with its own, independent augmentation draw (the official code augments the
            CLIP branch and the VAE branch separately); None: no ``image_vae``.
        seed: base seed of the per-item generators.
        max_skips: how many bad items in a row one `__getitem__` may pass over before it
            raises RuntimeError (a dataset that is mostly broken should fail loudly).
        strict: raise the first SampleError instead of skipping (for debugging data).
        seek: reach far frames of a video by seeking (see :func:`read_frames`); False decodes
            from the start (what `python -m vb_train.throughput` compares against).
        row_filter, caption_column: passed to `read_records`.
        paired_transform: ``f(frame0 uint8 (H, W, 3), mask bool (H, W)) -> uint8 (H, W, 3)``:
            items also hold ``image_paired``, the image prompt of the transformed frame 0 made
            with the same box, trim and augmentation draws as ``image`` (e.g. the two-tone toy's
            colour swap, ``vb_train.toy.synthetic.swap_two_tone``); None: no ``image_paired``.

    The video branch is resized and centre-cropped, never flipped: captions name directions
    ("moving left"). The image prompt comes at one size S; a fine path that wants it at the
    video's size resizes it (it is a padded square, so nothing is cropped). Condition dropout
    (null caption, grey image) belongs to the training loop, not here.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        categories: Sequence[str] | None = None,
        *,
        video_root: str | os.PathLike | None = None,
        num_frames: int = 16,
        frame_stride: int = 1,
        size: int | tuple[int, int] = 256,
        image_size: int = 224,
        train: bool = True,
        prompt_augment: PromptAugment | None = None,
        vae_prompt_augment: PromptAugment | None = None,
        seed: int = 0,
        max_skips: int = 64,
        strict: bool = False,
        seek: bool = True,
        row_filter: Callable[[dict], bool] | None = None,
        caption_column: str | None = None,
        paired_transform: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    ):
        for name, v in (("num_frames", num_frames), ("frame_stride", frame_stride),
                        ("image_size", image_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not isinstance(max_skips, int) or max_skips < 0:
            raise ValueError(f"max_skips: expected an int >= 0, got {max_skips!r}")
        if prompt_augment is not None and not isinstance(prompt_augment, PromptAugment):
            raise TypeError(f"prompt_augment: expected PromptAugment or None, "
                            f"got {type(prompt_augment).__name__}")
        self.root = Path(root)
        self.records = read_records(root, categories, row_filter, caption_column)
        if not self.records:
            raise ValueError(f"root: no usable rows in the CSVs of {self.root}")
        self.video_root = video_root
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.size = _pair(size, "size")
        self.image_size = image_size
        self.train = bool(train)
        self.prompt_augment = prompt_augment or PromptAugment()
        if vae_prompt_augment is not None and not isinstance(vae_prompt_augment, PromptAugment):
            raise TypeError(f"vae_prompt_augment: expected PromptAugment or None, "
                            f"got {type(vae_prompt_augment).__name__}")
        self.vae_prompt_augment = vae_prompt_augment
        if paired_transform is not None and not callable(paired_transform):
            raise TypeError(f"paired_transform: expected a callable or None, got {type(paired_transform).__name__}")
        self.paired_transform = paired_transform
        self.seed = int(seed)
        self.epoch = 0
        self.max_skips = max_skips
        self.strict = strict
        self.seek = bool(seek)
        self.stats = _Stats()

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """New random draws (offsets, augmentations) for a new epoch; call before iterating."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    # one item; raises SampleError
    def load(self, index: int) -> dict:
        """Load item `index` without skipping: raises SampleError when it is bad."""
        rec = self.records[index]
        rng = self._rng(index)
        subjects = read_mask_json(rec.folder)
        if self.train:
            subj = subjects[int(rng.integers(len(subjects)))]
        else:
            subj = max(subjects, key=lambda s: s["logit"])
        mask = load_mask(rec.folder / f"mask_{subj['value']}.png")
        source = find_video(rec, self.video_root)
        u = float(rng.random()) if self.train else None
        clip, frame0 = read_frames(source, self.num_frames, self.frame_stride, u, self.seek)
        trim = None
        if self.train and self.prompt_augment.box_trim > 0:
            trim = (int(rng.integers(4)), float(rng.uniform(0.01, self.prompt_augment.box_trim)))
        try:
            image = make_image_prompt(frame0, mask, subj["box"], self.image_size, trim)
            paired = None
            if self.paired_transform is not None:
                m = mask
                if m.shape != frame0.shape[:2]:
                    m = F.interpolate(torch.from_numpy(m.astype(np.uint8))[None, None].float(), size=frame0.shape[:2],
                                      mode="nearest")[0, 0].bool().numpy()
                paired = make_image_prompt(np.asarray(self.paired_transform(frame0, m), dtype=np.uint8), mask,
                                           subj["box"], self.image_size, trim)
        except SampleError as e:
            e.path = e.path or str(rec.folder / "mask.json")
            raise
        image_vae = None
        if self.train:
            crop = image
            state = rng.bit_generator.state
            image = augment_image_prompt(crop, rng, self.prompt_augment)
            if paired is not None:  # the same draws: a second generator from the same state
                twin = np.random.default_rng()
                twin.bit_generator.state = state
                paired = augment_image_prompt(paired, twin, self.prompt_augment)
            if self.vae_prompt_augment is not None:  # drawn after the CLIP branch's: those stay as without it
                image_vae = augment_image_prompt(crop, rng, self.vae_prompt_augment)
        video = center_crop_resize(clip, self.size)
        item = {"video": video, "image": image, "caption": rec.caption, "subject": subj["label"],
                "video_id": rec.videoid, "category": rec.category}
        if image_vae is not None:
            item["image_vae"] = image_vae
        if paired is not None:
            item["image_paired"] = paired
        return item

    def _record_bad(self, index: int, err: SampleError) -> None:
        self.stats.skipped[err.reason] += 1
        if index not in self.stats.bad:
            self.stats.bad[index] = err
            log.warning("skipping %s/%s: %s", self.records[index].category,
                        self.records[index].videoid, err)

    def __getitem__(self, index: int) -> dict:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        last: SampleError | None = None
        for attempt in range(min(self.max_skips, n - 1) + 1):
            i = (index + attempt) % n
            if i in self.stats.bad:
                # known bad: do not decode it again
                self.stats.skipped[self.stats.bad[i].reason] += 1
                last = self.stats.bad[i]
                continue
            try:
                item = self.load(i)
            except SampleError as e:
                if self.strict:
                    raise
                last = e
            except Exception as e:  # anything else a broken file can raise
                if self.strict:
                    raise
                last = SampleError("error", self.records[i].folder, f"{type(e).__name__}: {e}")
            else:
                self.stats.loaded += 1
                item["index"] = i
                item["skipped"] = attempt
                return item
            self._record_bad(i, last)
        raise RuntimeError(
            f"VideoBoothDataset: {attempt + 1} bad items in a row from index {index} "
            f"(last: {last}); skipped so far: {dict(self.stats.skipped)}; see report()")

    def report(self) -> dict:
        """Counters of this process: {"items", "loaded", "bad_items", "skipped": {reason: n},
        "bad": {"category/videoid": "reason: path: message"}}. `skipped` counts every time a
        bad item was passed over; `bad_items` counts distinct bad items."""
        return {
            "items": len(self.records),
            "loaded": self.stats.loaded,
            "bad_items": len(self.stats.bad),
            "skipped": dict(self.stats.skipped),
            "bad": {f"{self.records[i].category}/{self.records[i].videoid}": str(e)
                    for i, e in sorted(self.stats.bad.items())},
        }

    def scan(self, progress: bool = False) -> dict:
        """Load every item once (no skipping) and record the bad ones; returns `report()`.

        Later `__getitem__` calls pass over the bad items without decoding them again.
        """
        it = range(len(self.records))
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="scan", unit="clip")
        for i in it:
            if i in self.stats.bad:
                continue
            try:
                self.load(i)
            except SampleError as e:
                self._record_bad(i, e)
            except Exception as e:
                self._record_bad(i, SampleError("error", self.records[i].folder,
                                                f"{type(e).__name__}: {e}"))
        return self.report()
