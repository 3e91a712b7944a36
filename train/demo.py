"""The CPU demo: synthetic data -> a tiny VideoBooth trained through both stages -> videos of
held-out subjects with and without the image prompt -> GIFs and an identity-metric table.

    python -m train.demo --out demo_out            # about 8 minutes on 2 idle CPU cores
    python -m train.demo --out /tmp/q --quick      # seconds: a smoke run, numbers mean nothing
    python -m train.demo --out ablations_out --ablations   # train.ablations (one table)

What it does (docs/demo.md says more):

1. data: the synthetic subject-video set (`train.synthetic`) twice, training subjects and
   held-out subjects (identities never seen in training, `subject_split`), with the SHORT
   captions ("a star moving left on a grey background"): colour and pattern are never in the
   text, so a generated subject can only get them from the image prompt.
2. VAE: every component of `vb.build_tiny_videobooth` is random, and a random VAE decodes to
   noise whatever the latents are, so the tiny VAE is trained first as an autoencoder on the
   training frames and image prompts (the paper starts from SD's pretrained VAE), then rescaled
   so that its scaled latents have unit variance; the VideoBooth task loads it through
   `model.base_weights`. The CLIP image encoder and the text encoder stay random and frozen.
3. stage 1 then stage 2 with the trainer (`train.trainer.Trainer`, `configs/demo_stage{1,2}.yaml`);
   the base U-Net trains too (`model.extra_trainable: ['^backbone\\.']`), from random weights.
4. generation (`vb.VideoBoothPipeline`, DDIM) for every held-out subject twice, with the same
   initial noise: with its image prompt, and text only (a grey image prompt: what the trainer's
   condition dropout feeds the model when the image is dropped).
5. metrics on held-out subjects (`train.metrics.color_identity`, no CLIP): the subject's own
   prompt against the video, other held-out prompts against the video, colour retrieval; the
   real held-out clips give the ceiling. CLIP-I/CLIP-T/DINO only with real pretrained encoders
   (`--clip ViT-B-32 --clip-pretrained openai --dino vit_small_patch16_224.dino`): random-weight
   encoders would give numbers that mean nothing, so the demo leaves them out by default.

Outputs under --out: data/, vae/, runs/stage1, runs/stage2 (trainer run directories: loss
logs, checkpoints, the exported adapter), metrics.md, metrics.json, per_video.json, gifs/,
loss.png (both stages' training loss).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("train.demo")

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs"


# ================================================================================================
# settings
# ================================================================================================
@dataclass
class DemoSettings:
    """Every size and step count of the demo (the command line sets them; `quick()` for tests)."""

    seed: int = 0
    # data
    train_clips: int = 400           # training clips (training subjects)
    heldout_subjects: int = 40       # distinct held-out identities evaluated (at most 40)
    data_size: int = 32              # synthetic frames are drawn at this size ...
    data_frames: int = 16            # ... with this many frames
    size: int = 16                   # ... and loaded at this size (latents size / 2)
    frames: int = 4                  # frames per training / generated clip
    frame_stride: int = 2
    image_size: int = 32             # image prompt side
    subject_radius: tuple = (0.26, 0.32)  # subject radius / frame side (the generator's default
                                          # 0.15-0.21 leaves ~3% of a 16 px frame to the subject)
    # the tiny VAE (an autoencoder trained first)
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 3e-3
    # the two stages
    steps1: int = 800
    steps2: int = 1200
    batch_size: int = 8
    lr: float = 1e-3
    attn_backend: str = "reference"
    backbone: str = "unet"
    schedule: str = "videobooth"
    extra: Dict[str, object] = field(default_factory=dict)   # more trainer overrides (both stages)
    # generation
    inference_steps: int = 25
    guidance_scale: float = 1.0
    uncond_image: str = "grey"
    # outputs
    gif_rows: int = 8
    gif_scale: int = 4
    progress: bool = True

    @classmethod
    def quick(cls, **kw) -> "DemoSettings":
        """Tiny everything: an end-to-end smoke run in seconds (the numbers mean nothing)."""
        base = dict(train_clips=12, heldout_subjects=3, data_frames=8, vae_steps=5, vae_batch=16,
                    steps1=2, steps2=2, batch_size=2, inference_steps=2, gif_rows=3)
        base.update(kw)
        return cls(**base)


# ================================================================================================
# 1. data
# ================================================================================================
@dataclass
class EvalItem:
    """One held-out subject: its clip and image prompt as the loader builds them ([-1, 1])."""

    video: torch.Tensor        # (F, 3, H, W)
    image: torch.Tensor        # (3, S, S), the subject on white
    caption: str               # short caption (no colour, no pattern)
    full_caption: str
    subject: str               # the subject word (the shape)
    identity: tuple            # (shape, pattern, colour)
    video_id: str


def _rows_by_id(root: Path) -> Dict[str, dict]:
    rows = {}
    for p in sorted(root.glob("*.csv")):
        with open(p, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                rows[r["videoid"]] = r
    return rows


def make_data(s: DemoSettings, root: Path) -> tuple[Path, Path]:
    """Write the training set and the held-out set under `root` (skipped when already there,
    complete and made with the same arguments)."""
    from .synthetic import generate, subject_split

    n_held = sum(1 for v in subject_split().values() if v == "heldout")
    sets = {
        # held-out: oversampled, then one clip per identity is evaluated (make_eval_items)
        "train": dict(num=s.train_clips, seed=s.seed, split="train"),
        "heldout": dict(num=max(8, 8 * min(s.heldout_subjects, n_held)), seed=s.seed + 1000, split="heldout"),
    }
    paths = []
    for name, kw in sets.items():
        out = root / name
        meta = out / "meta.json"
        # PNG frames: decoding them is several times faster than decoding mp4 at this size, and the
        # data loader runs in the training process (num_workers 0 on 2 cores)
        args = dict(kw, size=s.data_size, num_frames=s.data_frames, caption="short", fmt="frames",
                    subject_radius=[float(v) for v in s.subject_radius])
        if meta.is_file():   # the generator records its arguments in meta.json
            m = json.loads(meta.read_text())
            if m.get("complete") and all(m.get(k) == v for k, v in args.items()):
                paths.append(out)
                continue
        generate(out, overwrite=True, progress=s.progress, **args)
        paths.append(out)
    return paths[0], paths[1]


def make_eval_items(s: DemoSettings, heldout_root: Path) -> List[EvalItem]:
    """One clip per held-out identity (the first clip drawn of each), at most
    `s.heldout_subjects`, loaded as the evaluation loader does (frames from 0, no augmentation)."""
    from .data import VideoBoothDataset

    ds = VideoBoothDataset(heldout_root, num_frames=s.frames, frame_stride=s.frame_stride, size=s.size,
                           image_size=s.image_size, train=False, caption_column="short_caption", seed=s.seed)
    rows = _rows_by_id(heldout_root)
    # clip order = generation order (video ids are s{seed}_{i:06d})
    order = sorted(range(len(ds.records)), key=lambda i: ds.records[i].videoid)
    seen, items = set(), []
    for i in order:
        r = rows[ds.records[i].videoid]
        ident = (r["shape"], r["pattern"], r["colour"])
        if ident in seen:
            continue
        seen.add(ident)
        it = ds[i]
        items.append(EvalItem(it["video"], it["image"], it["caption"], r["full_caption"], it["subject"], ident,
                              it["video_id"]))
        if len(items) == s.heldout_subjects:
            break
    return items


# ================================================================================================
# 2. the tiny VAE
# ================================================================================================
def pretrain_vae(s: DemoSettings, train_root: Path, out_file: Path) -> dict:
    """Train the tiny VAE of `vb.build_tiny_videobooth(seed=s.seed)` as an autoencoder on the
    training frames and image prompts, rescale its latents to unit variance after the scaling
    factor, and save its tensors as `vae.*` (a `model.base_weights` file). Returns stats."""
    import vb
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .data import VideoBoothDataset

    t0 = time.perf_counter()
    ds = VideoBoothDataset(train_root, num_frames=s.data_frames, size=s.size, image_size=s.image_size, train=False,
                           caption_column="short_caption", seed=s.seed)
    frames, images = [], []
    it = range(len(ds))
    if s.progress:
        it = tqdm(it, desc="vae data", unit="clip")
    for i in it:
        item = ds[i]
        frames.append(item["video"])
        images.append(item["image"])
    # the fine path feeds the prompt at the video's size (VideoBoothTask.predict resizes it so)
    imgs = F.interpolate(torch.stack(images), size=(s.size, s.size), mode="bicubic", align_corners=False,
                         antialias=True).clamp(-1, 1)
    grey = torch.zeros(1, 3, s.size, s.size)  # the dropped image prompt
    x_all = torch.cat([torch.cat(frames), imgs, imgs.flip(-1), grey])

    vae = vb.build_tiny_videobooth(s.backbone, seed=s.seed).vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / max(1, s.vae_steps)))))
    g = torch.Generator().manual_seed(s.seed + 77)
    bar = tqdm(range(s.vae_steps), desc="vae", unit="step", disable=not s.progress)
    for _ in bar:
        x = x_all[torch.randint(0, len(x_all), (s.vae_batch,), generator=g)]
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.mode()).sample
        # Subjects are small: pixels far from the image's median colour (the subject, mostly)
        # weigh up to 6x, or their colours blur into the background.
        med = x.flatten(2).median(-1).values[..., None, None]
        w = 1.0 + 5.0 * (x - med).abs().amax(1, keepdim=True)
        mse = ((rec - x) ** 2 * w).mean() / w.mean()
        loss = mse + 1e-4 * dist.kl().mean() / dist.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{mse.item():.4f}", refresh=False)
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        probe = x_all[torch.randperm(len(x_all), generator=g)[:512]]
        mode = vae.encode(probe).latent_dist.mode()
        std = float(mode.std())
        # z -> k * z in the encoder, z / k in the decoder: the same autoencoder, with latents whose
        # scaled version (x scaling_factor, as the task and pipeline scale them) has unit std.
        # It was trained as a deterministic autoencoder (the posterior's mode), so its posterior
        # is made a point mass (logvar -20): the task's latent_dist.sample() is then the mode.
        k = 1.0 / (vae.config.scaling_factor * std)
        lc = vae.config.latent_channels
        vae.quant_conv.weight[:lc] *= k
        vae.quant_conv.bias[:lc] *= k
        vae.quant_conv.weight[lc:] = 0.0
        vae.quant_conv.bias[lc:] = -20.0
        vae.post_quant_conv.weight /= k
        mode = vae.encode(probe).latent_dist.mode()
        rec_mse = float(F.mse_loss(vae.decode(mode).sample, probe))
        scaled_std = float(mode.std() * vae.config.scaling_factor)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"vae.{k}": v.contiguous() for k, v in vae.state_dict().items()}, str(out_file))
    stats = {"steps": s.vae_steps, "recon_mse": rec_mse, "scaled_latent_std": scaled_std,
             "train_images": len(x_all), "seconds": round(time.perf_counter() - t0, 1)}
    (out_file.parent / "vae_stats.json").write_text(json.dumps(stats, indent=1))
    return stats


# ================================================================================================
# 3. training through the trainer
# ================================================================================================
def stage_config(s: DemoSettings, stage: int, *, data_root: Path, output_dir: Path, vae_file: Path,
                 init_from: Optional[Path] = None, overrides: Optional[dict] = None):
    """The TrainConfig of one stage: configs/demo_stage{stage}.yaml + the demo's settings +
    `s.extra` + `overrides` (dotted keys for model./data., as on the trainer's command line)."""
    from .config import apply_override, load_config

    items = {"seed": s.seed, "output_dir": str(output_dir), "resume": "never",
             "max_steps": s.steps1 if stage == 1 else s.steps2, "batch_size": s.batch_size, "lr": s.lr,
             "attn_backend": s.attn_backend, "backbone": s.backbone, "schedule": s.schedule,
             "progress": s.progress, "data.root": str(data_root), "data.num_frames": s.frames,
             "data.frame_stride": s.frame_stride, "data.size": s.size, "data.image_size": s.image_size,
             "model.base_weights": str(vae_file), "init_from": str(init_from) if init_from else None}
    items.update(s.extra)
    items.update(overrides or {})
    cfg = load_config(CONFIG_DIR / f"demo_stage{stage}.yaml")
    d = cfg.to_dict()
    for k, v in items.items():
        apply_override(d, f"{k}={json.dumps(v)}")
    d["lr_warmup_steps"] = min(d["lr_warmup_steps"], max(0, d["max_steps"] // 10))
    from .config import TrainConfig
    return TrainConfig.from_dict(d)


def run_stage(cfg) -> dict:
    """Train one stage (a fresh run directory) and return the trainer's summary."""
    import shutil

    from .trainer import Trainer

    out = Path(cfg.output_dir)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    summary = Trainer(cfg).train()
    hist = summary.pop("history")
    n = max(1, len(hist) // 10)
    summary.update(seconds=round(time.perf_counter() - t0, 1), steps=len(hist),
                   loss_first=float(np.mean([h["loss"] for h in hist[:n]])),
                   loss_last=float(np.mean([h["loss"] for h in hist[-n:]])))
    return summary


def inference_scheduler(cfg):
    """A DDIM scheduler with the training run's noise schedule and prediction type."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type=cfg.prediction_type,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def load_trained_pipeline(cfg, run_dir: Path, which: str = "ema"):
    """A `VideoBoothPipeline` over the task of `cfg` (its tiny components + the VAE of
    model.base_weights) with every trained weight of `run_dir` (EMA by default), in eval mode."""
    from . import checkpoint as ckpt
    from .tasks import build_task
    from .trainer import seed_all

    seed_all(cfg.seed)
    task = build_task(cfg)
    ckpt.copy_named(task, ckpt.load_weights(run_dir, which), f"{run_dir}")
    task.eval().requires_grad_(False)
    pipe = task.parts.pipeline()
    pipe.scheduler = inference_scheduler(cfg)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ================================================================================================
# 4. generation
# ================================================================================================
GREY = 0.5


@torch.no_grad()
def generate_videos(pipe, items: Sequence[EvalItem], s: DemoSettings, *, image: bool, seed: int,
                    num_frames: Optional[int] = None, batch: int = 20, images=None) -> torch.Tensor:
    """One video per item: (N, F, 3, H, W) in [-1, 1]. image=True: with the item's image prompt
    (or `images[i]` when given); False: text only (a grey image prompt). Item i's initial noise
    depends on (seed, i) only, so both arms start from the same noise."""
    from tqdm.auto import tqdm

    f = num_frames or s.frames
    out = []
    chunks = range(0, len(items), batch)
    bar = tqdm(total=len(items), desc=f"generate ({'image' if image else 'text only'})", unit="video",
               disable=not s.progress)
    for lo in chunks:
        part = items[lo:lo + batch]
        if image:
            src = [it.image for it in part] if images is None else list(images[lo:lo + batch])
            prompts = torch.stack([(x + 1) / 2 for x in src]).clamp(0, 1)
        else:
            prompts = torch.full((len(part), 3, s.image_size, s.image_size), GREY)
        lat_shape = (pipe.backbone.in_channels, f, s.size // pipe.vae_scale_factor, s.size // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(lat_shape, generator=torch.Generator().manual_seed(seed * 100003 + lo + j))
                               for j in range(len(part))])
        res = pipe([it.caption for it in part], [it.subject for it in part], image_prompt=prompts,
                   num_frames=f, height=s.size, width=s.size, num_inference_steps=s.inference_steps,
                   guidance_scale=s.guidance_scale, uncond_image=s.uncond_image,
                   generator=torch.Generator().manual_seed(seed + lo), latents=latents, output_type="pt")
        out.append(res.frames * 2 - 1)
        bar.update(len(part))
    bar.close()
    return torch.cat(out).clamp(-1, 1)


@torch.no_grad()
def vae_roundtrip(pipe, videos: torch.Tensor) -> torch.Tensor:
    """Videos (N, F, 3, H, W) in [-1, 1] encoded and decoded by the pipeline's VAE."""
    n, f = videos.shape[:2]
    lat = pipe.encode_vae((videos.flatten(0, 1) + 1) / 2)
    lat = lat.view(n, f, *lat.shape[1:]).transpose(1, 2)
    return (pipe.decode_latents(lat) * 2 - 1).clamp(-1, 1)


# ================================================================================================
# 5. metrics
# ================================================================================================
ARM_REAL = "real held-out clip (ceiling)"
ARM_VAE = "real clip through the VAE (ceiling of generation)"
ARM_IMAGE = "with image prompt"
ARM_TEXT = "text only (grey image prompt)"


def identity_scores(videos: torch.Tensor, items: Sequence[EvalItem], frames: Optional[slice] = None) -> List[dict]:
    """Per video i: color_id against its own prompt, mean color_id against the other held-out
    prompts, and colour retrieval (does the best-matching held-out prompt have subject i's
    colour?)."""
    from .metrics import color_identity

    n = len(items)
    m = torch.empty(n, n)
    for i in range(n):
        v = videos[i] if frames is None else videos[i][frames]
        for j in range(n):
            m[i, j] = color_identity(v, items[j].image)
    rows = []
    for i in range(n):
        others = torch.cat([m[i, :i], m[i, i + 1:]])
        best = int(m[i].argmax())
        rows.append({"color_id": float(m[i, i]),
                     "color_id_other": float(others.mean()) if n > 1 else float("nan"),
                     "color_top1": float(items[best].identity[2] == items[i].identity[2])})
    return rows


def chance_color_top1(items: Sequence[EvalItem]) -> float:
    """Colour retrieval of a video that matches a random held-out prompt."""
    cols = [it.identity[2] for it in items]
    return float(np.mean([sum(c == d for d in cols) / len(cols) for c in cols]))


def encoder_metrics(videos: torch.Tensor, items: Sequence[EvalItem], clip=None, dino=None) -> List[dict]:
    """CLIP-I / CLIP-T (short caption) / DINO / temporal, with the given (pretrained) encoders."""
    from .metrics import VideoMetrics

    vm = VideoMetrics(clip=clip, dino=dino, color=False)
    return vm.evaluate(list(videos), [it.image for it in items], [it.caption for it in items])


def summarize(per_arm: Dict[str, List[dict]]) -> Dict[str, dict]:
    from .metrics import aggregate

    return {arm: aggregate(rows) for arm, rows in per_arm.items()}


COLUMNS = ("color_id", "color_id_other", "color_top1")


def markdown_table(agg: Dict[str, dict], columns: Sequence[str] = COLUMNS, digits: int = 3,
                   first: str = "arm") -> str:
    cols = [c for c in columns if any(c in a for a in agg.values())]
    cols += sorted({k for a in agg.values() for k in a} - set(cols))
    lines = [f"| {first} | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for arm, a in agg.items():
        n = max((int(v["n"]) for v in a.values()), default=0)
        cells = ["-" if c not in a else f"{a[c]['mean']:.{digits}f} ± {a[c]['std']:.{digits}f}" for c in cols]
        lines.append(f"| {arm} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_difference(a: List[dict], b: List[dict], key: str = "color_id") -> dict:
    """Mean and a paired bootstrap 95% interval of a[key] - b[key] (same subjects, same noise),
    plus how many subjects have a > b."""
    d = np.array([x[key] - y[key] for x, y in zip(a, b)], dtype=np.float64)
    rng = np.random.default_rng(0)
    boots = rng.choice(d, size=(2000, len(d)), replace=True).mean(1) if len(d) > 1 else d
    return {"mean": float(d.mean()), "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "wins": int((d > 0).sum()), "n": int(len(d))}


# ================================================================================================
# 6. GIFs
# ================================================================================================
def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def _cell(x: torch.Tensor, side: int) -> np.ndarray:
    t = F.interpolate(x[None].float(), size=(side, side), mode="nearest")[0]
    return _to_uint8(t)


def write_grid(path: Path, columns: Dict[str, torch.Tensor], images: torch.Tensor, *, side: int,
               labels: Optional[List[str]] = None, duration_ms: int = 250) -> List[Path]:
    """A grid GIF (and a PNG of its first frame): one row per subject, first column its image
    prompt, then one column per arm (videos (N, F, 3, H, W) in [-1, 1]); a header names them."""
    from PIL import Image, ImageDraw

    names = ["image prompt"] + list(columns)
    n = images.shape[0]
    f = next(iter(columns.values())).shape[1]
    pad, head, lab = 2, 12, (6 * max(map(len, labels)) + 6 if labels else 0)
    width = lab + len(names) * (side + pad) + pad
    height = head + n * (side + pad) + pad
    frames = []
    for t in range(f):
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for c, name in enumerate(names):
            draw.text((lab + pad + c * (side + pad), 1), name[: max(4, side // 6)], fill=(0, 0, 0))
        for r in range(n):
            y = head + pad + r * (side + pad)
            if labels:
                draw.text((2, y + side // 2 - 5), labels[r], fill=(0, 0, 0))
            cells = [_cell(images[r], side)] + [_cell(v[r, t], side) for v in columns.values()]
            for c, a in enumerate(cells):
                canvas.paste(Image.fromarray(a), (lab + pad + c * (side + pad), y))
        frames.append(canvas)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    png = path.with_suffix(".png")
    frames[0].save(png)
    return [path, png]


def write_arm_gifs(folder: Path, videos: torch.Tensor, items: Sequence[EvalItem], arm: str, *, side: int,
                   rows: int, duration_ms: int = 250) -> List[Path]:
    """One small GIF per subject for the first `rows` subjects."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    slug = arm.split(" (")[0].replace(" ", "_")
    for i in range(min(rows, len(items))):
        frames = [Image.fromarray(_cell(v, side)) for v in videos[i]]
        p = folder / f"{i:02d}_{'_'.join(items[i].identity)}_{slug}.gif"
        frames[0].save(p, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
        paths.append(p)
    return paths


def plot_losses(runs: Dict[str, Path], path: Path, window: int = 50) -> Path:
    """One PNG of the training loss of each run directory (its loss.jsonl), raw and as a moving
    average over `window` steps, the stages one after the other on the step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    offset = 0
    for name, run in runs.items():
        rows = [json.loads(line) for line in (Path(run) / "loss.jsonl").read_text().splitlines() if line.strip()]
        if not rows:
            raise ValueError(f"runs: {run}/loss.jsonl has no rows")
        steps = np.array([r["step"] for r in rows], dtype=np.float64) + offset
        loss = np.array([r["loss"] for r in rows], dtype=np.float64)
        (line,) = ax.plot(steps, loss, alpha=0.25, lw=0.8)
        w = max(1, min(window, len(loss)))
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, color=line.get_color(), lw=1.8, label=f"{name} (mean of {w})")
        offset = steps[-1]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("diffusion loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ================================================================================================
# the whole demo
# ================================================================================================
def train_two_stages(s: DemoSettings, work: Path, train_root: Path, vae_file: Path, *,
                     over1: Optional[dict] = None, over2: Optional[dict] = None) -> tuple:
    """Stage 1 then stage 2 (from stage 1's EMA) in work/stage1, work/stage2; returns
    (cfg2, summaries)."""
    cfg1 = stage_config(s, 1, data_root=train_root, output_dir=work / "stage1", vae_file=vae_file, overrides=over1)
    sum1 = run_stage(cfg1)
    cfg2 = stage_config(s, 2, data_root=train_root, output_dir=work / "stage2", vae_file=vae_file,
                        init_from=work / "stage1", overrides=over2)
    sum2 = run_stage(cfg2)
    return cfg2, {"stage1": sum1, "stage2": sum2}


def load_encoders(args) -> tuple:
    clip = dino = None
    if args.clip:
        from .metrics import ClipEncoder
        clip = ClipEncoder.from_pretrained(args.clip, args.clip_pretrained)
    if args.dino:
        from .metrics import DinoEncoder
        dino = DinoEncoder.from_pretrained(args.dino)
    return clip, dino


def run_demo(s: DemoSettings, out: Path, *, clip=None, dino=None, encoder_names: Optional[dict] = None) -> dict:
    """The demo end to end (module docstring); returns the results dict also written to
    out/metrics.json."""
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    def mark(name, t0):
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("%s: %.1f s", name, timings[name])

    t0 = time.perf_counter()
    train_root, held_root = make_data(s, out / "data")
    items = make_eval_items(s, held_root)
    mark("data", t0)
    print(f"[demo] data: {s.train_clips} training clips, {len(items)} held-out subjects", flush=True)

    t0 = time.perf_counter()
    vae_file = out / "vae" / "vae.safetensors"
    vae_stats = pretrain_vae(s, train_root, vae_file)
    mark("vae", t0)
    print(f"[demo] vae: reconstruction MSE {vae_stats['recon_mse']:.4f} ([-1, 1] pixels)", flush=True)

    t0 = time.perf_counter()
    cfg2, summaries = train_two_stages(s, out / "runs", train_root, vae_file)
    mark("train", t0)
    for k, v in summaries.items():
        print(f"[demo] {k}: {v['steps']} steps in {v['seconds']} s, loss {v['loss_first']:.4f} -> "
              f"{v['loss_last']:.4f}", flush=True)

    t0 = time.perf_counter()
    pipe = load_trained_pipeline(cfg2, out / "runs" / "stage2")
    real = torch.stack([it.video for it in items])
    vids = {ARM_REAL: real, ARM_VAE: vae_roundtrip(pipe, real),
            ARM_IMAGE: generate_videos(pipe, items, s, image=True, seed=s.seed),
            ARM_TEXT: generate_videos(pipe, items, s, image=False, seed=s.seed)}
    mark("generate", t0)

    t0 = time.perf_counter()
    per_arm = {arm: identity_scores(v, items) for arm, v in vids.items()}
    if clip is not None or dino is not None:
        for arm, v in vids.items():
            for row, extra in zip(per_arm[arm], encoder_metrics(v, items, clip, dino)):
                row.update(extra)
    agg = summarize(per_arm)
    diff = paired_difference(per_arm[ARM_IMAGE], per_arm[ARM_TEXT])
    chance = chance_color_top1(items)
    mark("metrics", t0)

    t0 = time.perf_counter()
    gifs = out / "gifs"
    r = min(s.gif_rows, len(items))
    labels = [" ".join(reversed(it.identity)) for it in items[:r]]
    side = s.size * s.gif_scale
    files = write_grid(gifs / "grid.gif", {"real clip": vids[ARM_REAL][:r], "with image": vids[ARM_IMAGE][:r],
                                           "text only": vids[ARM_TEXT][:r]},
                       torch.stack([it.image for it in items[:r]]), side=side, labels=labels)
    for arm, tag in ((ARM_IMAGE, "with_image"), (ARM_TEXT, "text_only")):
        files += write_arm_gifs(gifs / tag, vids[arm], items, arm, side=side, rows=r)
    files.append(plot_losses({"stage 1": out / "runs" / "stage1", "stage 2": out / "runs" / "stage2"},
                             out / "loss.png"))
    mark("gifs", t0)

    table = markdown_table(agg)
    timings["total"] = round(time.perf_counter() - t_start, 1)
    results = {
        "settings": dataclasses.asdict(s),
        "arms": agg,
        "image_minus_text_color_id": diff,
        "chance_color_top1": chance,
        "vae": vae_stats,
        "training": summaries,
        "timings_s": timings,
        "encoders": encoder_names or {"clip": None, "dino": None},
        "heldout_subjects": [" ".join(it.identity) for it in items],
        "torch_threads": torch.get_num_threads(),
    }
    (out / "metrics.json").write_text(json.dumps(results, indent=1))
    (out / "per_video.json").write_text(json.dumps(
        {arm: [dict(subject=" ".join(it.identity), **row) for it, row in zip(items, rows)]
         for arm, rows in per_arm.items()}, indent=1))
    md = [
        "# VideoBooth CPU demo: held-out subjects, with and without the image prompt", "",
        f"{len(items)} held-out subjects (colour/pattern/shape combinations never seen in training); "
        f"captions name shape, motion and background only. Toy scale: {s.size}x{s.size} px, "
        f"{s.frames} frames, every component random-init; {s.steps1} + {s.steps2} training steps.", "",
        table, "",
        f"- with image - text only, color_id (paired, same noise): {diff['mean']:+.3f} "
        f"(95% bootstrap CI {diff['ci95'][0]:+.3f} .. {diff['ci95'][1]:+.3f}); the image-prompted video "
        f"scores higher for {diff['wins']} of {diff['n']} subjects.",
        f"- color_top1 chance level (a video matching a random held-out prompt): {chance:.3f}.",
        "- color_id: colour-histogram identity of the subject (train.metrics.color_identity, no CLIP) against "
        "the subject's own image prompt; color_id_other: the same against the other held-out subjects' prompts; "
        "color_top1: the best-matching held-out prompt has the subject's colour.",
    ]
    if clip is None and dino is None:
        md.append("- CLIP-I / CLIP-T / DINO left out: no pretrained encoders here, and random-weight ones give "
                  "meaningless numbers (pass --clip ViT-B-32 --clip-pretrained openai --dino "
                  "vit_small_patch16_224.dino where the weights can be loaded).")
    md.append(f"- wall time {timings['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')}).")
    (out / "metrics.md").write_text("\n".join(md) + "\n")
    results["table"] = table
    results["files"] = [str(p) for p in files]
    return results


# ================================================================================================
# command line
# ================================================================================================
def build_parser() -> argparse.ArgumentParser:
    d = DemoSettings()
    p = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and steps: a smoke run in seconds")
    p.add_argument("--ablations", action="store_true", help="run the ablations instead (train.ablations)")
    p.add_argument("--seed", type=int)
    p.add_argument("--train-clips", type=int, dest="train_clips")
    p.add_argument("--heldout-subjects", type=int, dest="heldout_subjects")
    p.add_argument("--size", type=int, help=f"frame side in pixels (default {d.size})")
    p.add_argument("--frames", type=int, help=f"frames per clip (default {d.frames})")
    p.add_argument("--subject-radius", type=float, nargs=2, dest="subject_radius", metavar=("LO", "HI"),
                   help=f"subject radius range, fraction of the frame side (default {d.subject_radius})")
    p.add_argument("--vae-steps", type=int, dest="vae_steps")
    p.add_argument("--steps1", type=int, help=f"stage-1 steps (default {d.steps1})")
    p.add_argument("--steps2", type=int, help=f"stage-2 steps (default {d.steps2})")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--attn-backend", dest="attn_backend", choices=("reference", "sdpa", "triton"),
                   help="attention backend for training and generation (default reference; triton on a CPU "
                        "needs TRITON_INTERPRET=1 and is slow)")
    p.add_argument("--inference-steps", type=int, dest="inference_steps")
    p.add_argument("--guidance-scale", type=float, dest="guidance_scale")
    p.add_argument("--uncond-image", choices=("none", "grey"), dest="uncond_image")
    p.add_argument("--clip", help="open_clip model for CLIP-I/CLIP-T, e.g. ViT-B-32 (needs its weights)")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag (default openai)")
    p.add_argument("--dino", help="timm DINO model for DINO-I, e.g. vit_small_patch16_224.dino (needs weights)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="more trainer config overrides for both stages (model.fine_path=true, ...)")
    return p


def settings_from_args(args) -> DemoSettings:
    kw = {k: getattr(args, k) for k in ("seed", "train_clips", "heldout_subjects", "size", "frames", "vae_steps",
                                         "steps1", "steps2", "batch_size", "lr", "attn_backend", "inference_steps", "subject_radius",
                                         "guidance_scale", "uncond_image") if getattr(args, k, None) is not None}
    if args.no_progress:
        kw["progress"] = False
    extra = {}
    for item in args.overrides:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r}: expected key=value")
        import yaml
        extra[k] = yaml.safe_load(v)
    kw["extra"] = extra
    return DemoSettings.quick(**kw) if args.quick else DemoSettings(**kw)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.ablations:
        from . import ablations
        return ablations.main(["--out", args.out] + (["--quick"] if args.quick else [])
                              + (["--no-progress"] if args.no_progress else []))
    s = settings_from_args(args)
    clip, dino = load_encoders(args)
    names = {"clip": f"{args.clip}/{args.clip_pretrained}" if args.clip else None, "dino": args.dino}
    res = run_demo(s, Path(args.out), clip=clip, dino=dino, encoder_names=names)
    print()
    print((Path(args.out) / "metrics.md").read_text())
    print(f"wrote {args.out}/metrics.md, metrics.json, per_video.json, gifs/grid.gif")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
