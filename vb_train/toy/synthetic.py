"""A synthetic subject-video set in the VideoBooth layout (see `vb_train.data`).

Each clip is a textured subject moving in a straight line over a static textured background:

- subject identity = (shape, pattern, colour): shapes circle/square/triangle/star/diamond,
  patterns solid/striped/dotted/checkered (the second colour is a dark or light shade of the
  first), ten colours; 200 identities in all. The pattern is drawn in the subject's own
  coordinates, so it moves with the subject.
- motion: left, right, up or down, crossing a quarter to a half of the frame.
- background: a named muted colour as a linear gradient or smooth noise.
- caption names subject and motion: "a red striped star moving left on a grey background";
  the subject word (mask label) is the shape ("star"). The CSV also holds `short_caption`
  without colour and pattern ("a star moving left on a grey background"): with it, identity
  can only come from the image prompt, which is what a "with / without image prompt"
  comparison needs (`caption_column="short_caption"` in the loader, or `caption="short"` here
  to put it in `name`).

Files (what `vb_train.data.VideoBoothDataset` reads)::

    out/{shape}.csv              columns videoid, page_dir, name, full_caption, short_caption,
                                 split, shape, pattern, colour, motion, background
    out/{shape}/{videoid}/video.mp4   (or frames/000000.png ... with fmt="frames")
    out/{shape}/{videoid}/mask.json   [{"value": 0, "label": "background"},
                                       {"value": 1, "label": shape, "logit": 1.0, "box": [...]}]
    out/{shape}/{videoid}/mask_1.png  the subject in frame 0 (0/255, mode L)
    out/meta.json                arguments, for the record and as a marker (overwrite only
                                 deletes folders that hold one)

Held-out subjects: `subject_split` assigns every identity to "train" or "heldout" with a fixed
seed of its own (not the generation seed), stratified per shape, so sets generated with
different seeds and `split="train"` / `split="heldout"` never share an identity.

Determinism: clip i draws everything from `numpy.random.default_rng([seed, i])`; the same
arguments give the same frames, masks, CSVs and JSON (PNG frames are byte-identical; mp4
files are byte-identical with the same encoder build).

CLI: ``python -m vb_train.toy.synthetic --out DIR --num N --seed S [--split train|heldout|all]``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "star", "diamond")
PATTERNS = ("solid", "striped", "dotted", "checkered")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 215, 40),
    "orange": (245, 140, 25),
    "purple": (140, 60, 190),
    "pink": (245, 125, 185),
    "cyan": (40, 205, 215),
    "brown": (130, 80, 35),
    "black": (20, 20, 20),
}
# muted, so every subject colour stands out from every background
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "beige": (205, 192, 160),
    "light blue": (165, 190, 215),
    "light green": (175, 205, 165),
    "dark grey": (72, 72, 72),
}
MOTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPLITS = ("train", "heldout", "all")
SPLIT_SEED = 20231201  # fixed: the train/held-out split must not depend on the generation seed

# The two-tone identity (issue 14: a detail only spatial copying can carry): the subject's upper
# half has one colour and its lower half another; the identity is the ORDERED pair. Held-out
# subjects use colour pairs never seen in training, in both orders, so the held-out set holds
# (A over B) and (B over A) with the same colour histogram: only the arrangement tells them apart.
TWO_TONE = "two-tone"          # the pattern field of a two-tone identity
# a square only: its box is the square itself, so the image prompt holds no edge whose
# orientation would tell the upper half from the lower one (a circle's rim would)
TWO_TONE_SHAPES = ("square",)
TWO_TONE_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan")
IDENTITY_KINDS = ("shape-pattern-colour", TWO_TONE)

__all__ = [
    "BACKGROUNDS", "COLOURS", "MOTIONS", "PATTERNS", "SHAPES",
    "TWO_TONE", "TWO_TONE_COLOURS", "TWO_TONE_SHAPES",
    "all_identities", "generate", "main", "render_clip", "subject_phrase", "subject_split",
    "swap_two_tone", "two_tone_colours", "two_tone_identities", "two_tone_split",
]


def all_identities() -> list[tuple[str, str, str]]:
    """Every (shape, pattern, colour), in a fixed order."""
    return [(s, p, c) for s in SHAPES for p in PATTERNS for c in COLOURS]


def subject_split(heldout_fraction: float = 0.2) -> dict[tuple[str, str, str], str]:
    """identity -> "train" | "heldout".

    Per shape, `round(heldout_fraction * n)` identities (at least one when the fraction is > 0)
    are held out, chosen with the fixed `SPLIT_SEED`: every shape is seen in training, with
    other colour/pattern combinations.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction: expected a fraction in [0, 1), got {heldout_fraction}")
    rng = np.random.default_rng(SPLIT_SEED)
    out = {}
    for shape in SHAPES:
        ids = [i for i in all_identities() if i[0] == shape]
        order = rng.permutation(len(ids))
        k = round(heldout_fraction * len(ids))
        if heldout_fraction > 0:
            k = max(k, 1)
        for rank, j in enumerate(order):
            out[ids[j]] = "heldout" if rank < k else "train"
    return out


def subject_phrase(shape: str, pattern: str, colour: str) -> str:
    """'red striped star' (or 'red-over-blue square' for a two-tone subject): how captions name
    a subject."""
    if pattern == TWO_TONE:
        top, bottom = two_tone_colours(colour)
        return f"{top}-over-{bottom} {shape}"
    return f"{colour} {pattern} {shape}"


def two_tone_colours(colour: str) -> tuple[str, str]:
    """'red/blue' -> ('red', 'blue'): the (upper, lower) colours of a two-tone identity."""
    parts = colour.split("/")
    if len(parts) != 2 or parts[0] == parts[1] or not all(c in COLOURS for c in parts):
        raise ValueError(f"identity: a two-tone colour is 'upper/lower' with two different colours of "
                         f"{tuple(COLOURS)}, got {colour!r}")
    return parts[0], parts[1]


def swap_two_tone(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The frame with its two-tone subject's two colours exchanged (A over B -> B over A), pixel
    for pixel: every pixel under `mask` holding one of the two colours gets the other; the rest
    is unchanged. frame uint8 (H, W, 3) (lossless: PNG frames); mask bool (H, W).

    It is the toy's "swapped prompt" (`VideoBoothDataset(paired_transform=swap_two_tone)`): the
    loader crops and augments it with the same draws as the prompt, so a coarse input averaged
    over the two is the same for (A over B) and (B over A) up to float rounding."""
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame: expected uint8 (H, W, 3), got {frame.dtype} {tuple(frame.shape)}")
    if mask.shape != frame.shape[:2]:
        raise ValueError(f"mask: expected shape {frame.shape[:2]}, got {tuple(mask.shape)}")
    colours = np.unique(frame[mask].reshape(-1, 3), axis=0)
    if len(colours) != 2:
        raise ValueError(f"frame: a two-tone subject has exactly 2 colours under its mask, found {len(colours)} "
                         f"(a lossy frame, or not a two-tone subject)")
    a, b = colours
    out = frame.copy()
    is_a = mask & (frame == a).all(-1)
    is_b = mask & (frame == b).all(-1)
    out[is_a], out[is_b] = b, a
    return out


def two_tone_identities() -> list[tuple[str, str, str]]:
    """Every two-tone (shape, 'two-tone', 'upper/lower'), in a fixed order (56)."""
    return [(s, TWO_TONE, f"{a}/{b}") for s in TWO_TONE_SHAPES for a in TWO_TONE_COLOURS
            for b in TWO_TONE_COLOURS if a != b]


def two_tone_split(heldout_pairs: int = 10) -> dict[tuple[str, str, str], str]:
    """Two-tone identity -> "train" | "heldout": `heldout_pairs` unordered colour pairs (of 28),
    drawn with the fixed `SPLIT_SEED`, are held out in both orders and for every shape (with
    the default 10: 20 held-out identities, 36 training ones; every colour stays in training)."""
    pairs = [(a, b) for i, a in enumerate(TWO_TONE_COLOURS) for b in TWO_TONE_COLOURS[i + 1:]]
    if not isinstance(heldout_pairs, int) or not 0 <= heldout_pairs < len(pairs):
        raise ValueError(f"heldout_pairs: expected an int in [0, {len(pairs)}), got {heldout_pairs!r}")
    rng = np.random.default_rng(SPLIT_SEED)
    while True:  # redraw until every colour is still in some training pair
        held = {pairs[j] for j in rng.permutation(len(pairs))[:heldout_pairs]}
        if {c for p in pairs if p not in held for c in p} == set(TWO_TONE_COLOURS):
            break
    out = {}
    for ident in two_tone_identities():
        a, b = two_tone_colours(ident[2])
        out[ident] = "heldout" if (a, b) in held or (b, a) in held else "train"
    return out


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------
def _polygon(xs: np.ndarray, ys: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon for every (x, y) pixel centre; verts (V, 2)."""
    inside = np.zeros(xs.shape, dtype=bool)
    vx, vy = verts[:, 0], verts[:, 1]
    for k in range(len(verts)):
        x0, y0, x1, y1 = vx[k - 1], vy[k - 1], vx[k], vy[k]
        if y0 == y1:
            continue
        crosses = (ys < y0) != (ys < y1)
        xc = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < xc)
    return inside


def _shape_mask(shape: str, xs, ys, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = r * 0.82
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.05
    if shape == "triangle":
        a = np.deg2rad([-90.0, 30.0, 150.0])
        verts = np.stack([cx + r * np.cos(a), cy + r * 1.1 * np.sin(a) + r * 0.1], axis=1)
        return _polygon(xs, ys, verts)
    if shape == "star":
        a = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, r * 1.1, r * 0.45)
        verts = np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a)], axis=1)
        return _polygon(xs, ys, verts)
    raise ValueError(f"shape: unknown {shape!r}, expected one of {SHAPES}")


def _second_colour(rgb: np.ndarray) -> np.ndarray:
    # a dark shade for light colours, a light one for dark colours: the pattern stays visible
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return rgb * 0.35 if lum > 70 else rgb + (235 - rgb) * 0.75


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """True where the second colour goes; (u, v) are subject-local pixel coordinates."""
    if pattern == "solid":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "striped":
        return np.floor(v / (period / 2)) % 2 == 1
    if pattern == "dotted":
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        return du * du + dv * dv <= (period * 0.3) ** 2
    if pattern == "checkered":
        return (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 1
    raise ValueError(f"pattern: unknown {pattern!r}, expected one of {PATTERNS}")


def _background(rng: np.random.Generator, size: int, rgb: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if rng.random() < 0.5:
        # linear gradient in a random direction, -/+ 18% of the base colour
        a = rng.uniform(0, 2 * math.pi)
        t = (xs - 0.5) * math.cos(a) + (ys - 0.5) * math.sin(a)
        img = rgb[None, None, :] * (1.0 + 0.36 * t[..., None])
    else:
        # smooth noise: a 5x5 random grid upsampled bilinearly
        g = rng.uniform(-1, 1, size=(5, 5)).astype(np.float32)
        pos = np.linspace(0, 4, size)
        i0 = np.clip(np.floor(pos).astype(int), 0, 3)
        f = (pos - i0)[:, None]
        rows = g[i0] * (1 - f) + g[i0 + 1] * f          # (size, 5)
        f2 = (pos - i0)[None, :]
        noise = rows[:, i0] * (1 - f2) + rows[:, i0 + 1] * f2  # (size, size)
        img = rgb[None, None, :] + 22.0 * noise[..., None]
    return np.clip(img, 0, 255)


def render_clip(rng: np.random.Generator, identity: tuple[str, str, str], *, size: int = 64,
                num_frames: int = 16, motion: str | None = None,
                background: str | None = None,
                subject_radius: tuple[float, float] = (0.15, 0.21),
                two_tone_side: int | None = None) -> dict:
    """Draw one clip.

    Returns {"frames": uint8 (F, size, size, 3), "mask0": bool (size, size) of frame 0,
    "box": [x1, y1, x2, y2] of mask0 (x2/y2 exclusive), "motion": str, "background": str}.
    The subject stays wholly inside the frame on every frame. subject_radius: the range the
    subject's radius is drawn from, as a fraction of the frame side (at most 0.4).
    two_tone_side: a two-tone subject's side in pixels (even, at most `size`; default
    size // 2 rounded down to even); `subject_radius` then only sets how far it moves.
    """
    shape, pattern, colour = identity
    two_tone = pattern == TWO_TONE
    if two_tone:
        if shape not in TWO_TONE_SHAPES:
            raise ValueError(f"identity: a two-tone subject is one of {TWO_TONE_SHAPES}, got {shape!r}")
        top_c, bottom_c = (np.asarray(COLOURS[c], np.float32) for c in two_tone_colours(colour))
        side = two_tone_side if two_tone_side is not None else size // 2 // 2 * 2
        if not isinstance(side, int) or side < 2 or side % 2 or side > size:
            raise ValueError(f"two_tone_side: expected an even int in [2, {size}], got {side!r}")
    elif colour not in COLOURS:
        raise ValueError(f"identity: unknown colour {colour!r}")
    motion = motion or str(rng.choice(list(MOTIONS)))
    background = background or str(rng.choice(list(BACKGROUNDS)))
    if motion not in MOTIONS:
        raise ValueError(f"motion: unknown {motion!r}, expected one of {tuple(MOTIONS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background: unknown {background!r}")
    lo_r, hi_r = (float(v) for v in subject_radius)
    if not 0.02 <= lo_r <= hi_r <= 0.4:
        raise ValueError(f"subject_radius: expected (lo, hi) with 0.02 <= lo <= hi <= 0.4, got {subject_radius!r}")
    bg = _background(rng, size, np.asarray(BACKGROUNDS[background], np.float32))
    c1 = top_c if two_tone else np.asarray(COLOURS[colour], np.float32)
    c2 = bottom_c if two_tone else _second_colour(c1)

    r = rng.uniform(lo_r, hi_r) * size                 # subject radius
    period = max(4.0, r * rng.uniform(0.5, 0.7))       # pattern period, in pixels
    phase = rng.uniform(0, period, size=2)
    dx, dy = MOTIONS[motion]
    margin = r * 1.15 + 1.0                            # the star's tips reach 1.1 r
    lo, hi = margin, size - margin
    dist = rng.uniform(0.5, 0.9) * (hi - lo)           # path length over the clip
    # start so that the whole path stays inside [lo, hi]
    cx0 = rng.uniform(lo + max(0.0, -dx) * dist, hi - max(0.0, dx) * dist)
    cy0 = rng.uniform(lo + max(0.0, -dy) * dist, hi - max(0.0, dy) * dist)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5   # pixel centres

    frames = np.empty((num_frames, size, size, 3), np.uint8)
    mask0 = None
    for f in range(num_frames):
        t = f / max(num_frames - 1, 1)
        cx, cy = cx0 + dx * dist * t, cy0 + dy * dist * t
        if two_tone:
            # A square of side `two_tone_side` (default half the frame), at even pixels: both
            # halves have exactly the same rows, and the image prompt (the box, the square
            # itself) is two equal bands with no edge inside them; when its side is the image
            # prompt's (32 px: size 64 by default, or two_tone_side=32) no resampling blends the
            # bands either (docs/demo.md: why that matters for the coarse path).
            half = side // 2
            cxs, cys = 2 * round(cx / 2), 2 * round(cy / 2)
            cxs, cys = min(max(cxs, half), size - half), min(max(cys, half), size - half)
            m = (np.abs(xs - cxs) < half) & (np.abs(ys - cys) < half)
            second = ys > cys   # the lower half in the second colour
        else:
            m = _shape_mask(shape, xs, ys, cx, cy, r)
            second = _pattern_mask(pattern, xs - cx + phase[0], ys - cy + phase[1], period)
        img = bg.copy()
        img[m] = np.where(second[m][:, None], c2, c1)
        frames[f] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        if f == 0:
            mask0 = m
    ys0, xs0 = np.nonzero(mask0)
    box = [float(xs0.min()), float(ys0.min()), float(xs0.max() + 1), float(ys0.max() + 1)]
    return {"frames": frames, "mask0": mask0, "box": box, "motion": motion,
            "background": background}


def _write_mp4(path: Path, frames: np.ndarray, fps: int, crf: int) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # one thread, for x264 and for the RGB -> YUV conversion (PyAV >= 17 hands the codec's
        # thread count to its swscale reformatter, which slices frames across threads): the
        # file then depends only on its input (and small clips gain nothing from threads)
        stream.codec_context.thread_count = 1
        # no lookahead: x264's lowres lookahead (macroblock tree, B-frame decision) reads
        # uninitialised memory on frames this small (<= 48 px; found with MALLOC_PERTURB_), so
        # without this the bytes, and the decoded pixels, depended on what the process had
        # freed before (a decode in between was enough)
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1",
                          "x264-params": "rc-lookahead=0"}
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --------------------------------------------------------------------------------------------
# the set
# --------------------------------------------------------------------------------------------
def generate(out: str | os.PathLike, num: int, seed: int = 0, *, split: str = "all",
             size: int = 64, num_frames: int = 16, fmt: str = "mp4", fps: int = 8,
             crf: int = 12, heldout_fraction: float = 0.2,
             identities: Sequence[tuple[str, str, str]] | None = None,
             caption: str = "full", subject_radius: tuple[float, float] = (0.15, 0.21),
             identity_kind: str = "shape-pattern-colour", two_tone_side: int | None = None,
             overwrite: bool = False, progress: bool = True) -> list[dict]:
    """Write `num` clips under `out` in the VideoBooth layout; returns the CSV rows written.

    Args:
        out: output folder; must be empty or absent unless `overwrite` (which only deletes a
            folder that this function wrote, i.e. one with its meta.json).
        num: number of clips.
        seed: clip i uses `default_rng([seed, i])`.
        split: "train" / "heldout" draw subjects from that side of `subject_split`;
            "all" from every identity.
        size: frame side in pixels (even, for yuv420p mp4). num_frames: frames per clip.
        fmt: "mp4" (PyAV, libx264, `crf`, `fps`) or "frames" (lossless PNGs in frames/).
        heldout_fraction: passed to `subject_split`.
        identities: draw from these (shape, pattern, colour) instead of a split.
        caption: "full" puts "a red striped star moving left on a grey background" in the
            `name` column, "short" puts "a star moving left ..." there; both are in the CSV
            (`name` and `short_caption` / `full_caption`).
        subject_radius: (lo, hi) fraction of the frame side the subject's radius is drawn from.
        identity_kind: "shape-pattern-colour" (the 200 identities of `all_identities`, split by
            `subject_split`) or "two-tone" (`two_tone_identities`: upper/lower colour halves,
            split by `two_tone_split`; `heldout_fraction` is then unused).
        two_tone_side: the two-tone square's side in pixels (`render_clip`).
        progress: show a tqdm bar.
    """
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise ValueError(f"num: expected a positive int, got {num!r}")
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if fmt not in ("mp4", "frames"):
        raise ValueError(f"fmt: expected 'mp4' or 'frames', got {fmt!r}")
    if not isinstance(size, int) or size < 16 or (fmt == "mp4" and size % 2):
        raise ValueError(f"size: expected an int >= 16 (even for mp4), got {size!r}")
    if caption not in ("full", "short"):
        raise ValueError(f"caption: expected 'full' or 'short', got {caption!r}")
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames: expected a positive int, got {num_frames!r}")
    if identity_kind not in IDENTITY_KINDS:
        raise ValueError(f"identity_kind: expected one of {IDENTITY_KINDS}, got {identity_kind!r}")
    assign = two_tone_split() if identity_kind == TWO_TONE else subject_split(heldout_fraction)
    if identities is None:
        ids = two_tone_identities() if identity_kind == TWO_TONE else all_identities()
        pool = [i for i in ids if split == "all" or assign[i] == split]
    else:
        pool = [tuple(i) for i in identities]
        for i in pool:
            ok = len(i) == 3 and i[0] in SHAPES
            if ok and i[1] == TWO_TONE:
                two_tone_colours(i[2])  # raises naming the expected form
            elif ok:
                ok = i[1] in PATTERNS and i[2] in COLOURS
            if not ok:
                raise ValueError(f"identities: {i!r} is not a (shape, pattern, colour)")
    if not pool:
        raise ValueError(f"split: no identity in split {split!r} "
                         f"(heldout_fraction={heldout_fraction})")

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out: {out} is not empty (pass overwrite=True / --overwrite)")
        if not (out / "meta.json").is_file():
            raise FileExistsError(f"out: {out} was not written by vb_train.toy.synthetic "
                                  "(no meta.json); refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"generator": "vb_train.toy.synthetic", "version": 1, "complete": False, "num": num,
            "seed": seed, "split": split, "size": size, "num_frames": num_frames, "fmt": fmt,
            "fps": fps, "crf": crf, "heldout_fraction": heldout_fraction, "caption": caption,
            "subject_radius": [float(v) for v in subject_radius]}
    if identity_kind != IDENTITY_KINDS[0]:  # (the default's meta.json stays as it was)
        meta["identity_kind"] = identity_kind
    if two_tone_side is not None:
        meta["two_tone_side"] = two_tone_side
    if identities is not None:  # the identities drawn from (a reuse check compares them)
        meta["pool"] = [list(i) for i in pool]
    # written first, so that a run that dies half-way can still be overwritten
    (out / "meta.json").write_text(json.dumps(meta, indent=1))

    rows: dict[str, list[dict]] = {s: [] for s in SHAPES}
    it = range(num)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="synthetic clips", unit="clip")
    for i in it:
        rng = np.random.default_rng([seed, i])
        ident = pool[int(rng.integers(len(pool)))]
        clip = render_clip(rng, ident, size=size, num_frames=num_frames, subject_radius=subject_radius,
                           two_tone_side=two_tone_side)
        shape, pattern, colour = ident
        videoid = f"s{seed}_{i:06d}"
        folder = out / shape / videoid
        folder.mkdir(parents=True)
        if fmt == "mp4":
            _write_mp4(folder / "video.mp4", clip["frames"], fps, crf)
        else:
            (folder / "frames").mkdir()
            for f, a in enumerate(clip["frames"]):
                Image.fromarray(a).save(folder / "frames" / f"{f:06d}.png")
        Image.fromarray(clip["mask0"].astype(np.uint8) * 255, mode="L").save(folder / "mask_1.png")
        entries = [{"value": 0, "label": "background"},
                   {"value": 1, "label": shape, "logit": 1.0, "box": clip["box"]}]
        (folder / "mask.json").write_text(json.dumps(entries))
        page = i // 1000 * 1000
        tail = f"moving {clip['motion']} on a {clip['background']} background"
        full, short = f"a {subject_phrase(*ident)} {tail}", f"a {shape} {tail}"
        rows[shape].append({
            "videoid": videoid,
            "page_dir": f"{page:06d}_{page + 999:06d}",
            "name": full if caption == "full" else short,
            "full_caption": full,
            "short_caption": short,
            "split": assign.get(ident, "custom"),
            "shape": shape, "pattern": pattern, "colour": colour,
            "motion": clip["motion"], "background": clip["background"],
        })

    fields = ["videoid", "page_dir", "name", "full_caption", "short_caption", "split", "shape",
              "pattern", "colour", "motion", "background"]
    written = []
    for shape, rs in rows.items():
        if not rs:
            continue
        with open(out / f"{shape}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
            w.writeheader()
            w.writerows(rs)
        written.extend(rs)
    meta["complete"] = True
    meta["identities"] = sorted({(r["shape"], r["pattern"], r["colour"]) for r in written})
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vb_train.toy.synthetic",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (empty or absent)")
    p.add_argument("--num", type=int, default=200, help="number of clips (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=SPLITS, default="all",
                   help="subjects from the train side, the held-out side, or all")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (default 64)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    p.add_argument("--format", choices=("mp4", "frames"), default="mp4", dest="fmt")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--crf", type=int, default=12, help="x264 quality (lower is better)")
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--caption", choices=("full", "short"), default="full",
                   help="what goes in the name column: with colour and pattern, or without")
    p.add_argument("--overwrite", action="store_true", help="replace a set written before")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    rows = generate(a.out, a.num, a.seed, split=a.split, size=a.size, num_frames=a.frames,
                    fmt=a.fmt, fps=a.fps, crf=a.crf, heldout_fraction=a.heldout_fraction,
                    caption=a.caption, overwrite=a.overwrite, progress=not a.no_progress)
    n_ids = len({(r["shape"], r["pattern"], r["colour"]) for r in rows})
    print(f"wrote {len(rows)} clips ({n_ids} subjects, split={a.split}) to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
