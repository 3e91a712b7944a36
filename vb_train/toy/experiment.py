"""The toy-scale experiment the CPU demo (`vb_train.toy.demo`) and the ablations (`vb_train.toy.ablations`)
share: settings, the synthetic data and held-out subjects, the tiny VAE trained first, and the
two training stages through the trainer. docs/demo.md describes it."""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]  # vb_train/toy/experiment.py -> the repo root
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
    identity_kind: str = "shape-pattern-colour"  # or "two-tone" (vb_train.toy.synthetic; the ablations')
    two_tone_side: Optional[int] = None   # the two-tone square's side at data_size (px)
    clips_per_subject: int = 1       # held-out clips evaluated per identity (different motion,
                                     # background and noise)
    colours: Optional[tuple] = None  # two-tone only: draw every identity (training and evaluation)
                                     # from the ordered pairs of these colours (None: the split's)
    eval_split: str = "heldout"      # evaluate on "heldout" identities, or "train" (seen ones,
                                     # new clips); with `colours` both sets use those identities
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
    image_paired: Optional[torch.Tensor] = None   # the swapped prompt (data.paired_transform)


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
    from .synthetic import IDENTITY_KINDS, TWO_TONE, generate, subject_split, two_tone_split

    split = two_tone_split() if s.identity_kind == TWO_TONE else subject_split()
    if s.eval_split not in ("heldout", "train"):
        raise ValueError(f"eval_split: expected 'heldout' or 'train', got {s.eval_split!r}")
    n_held = sum(1 for v in split.values() if v == s.eval_split)
    sets = {
        # held-out: oversampled, then one clip per identity is evaluated (make_eval_items)
        "train": dict(num=s.train_clips, seed=s.seed, split="train"),
        "heldout": dict(num=max(8, 8 * min(s.heldout_subjects, n_held * s.clips_per_subject)), seed=s.seed + 1000,
                        split=s.eval_split),
    }
    if s.colours is not None:
        if s.identity_kind != TWO_TONE:
            raise ValueError("colours: only with identity_kind='two-tone'")
        ids = [(sh, TWO_TONE, f"{a}/{b}") for sh in ("square",) for a in s.colours for b in s.colours if a != b]
        if len(ids) < 2:
            raise ValueError(f"colours: expected at least 2 colours, got {s.colours!r}")
        n_held = len(ids)
        sets["heldout"]["num"] = max(8, 8 * min(s.heldout_subjects, n_held * s.clips_per_subject))
        for kw in sets.values():
            kw["identities"] = [list(i) for i in ids]
    paths = []
    for name, kw in sets.items():
        out = root / name
        meta = out / "meta.json"
        # PNG frames: decoding them is several times faster than decoding mp4 at this size, and the
        # data loader runs in the training process (num_workers 0 on 2 cores)
        args = dict(kw, size=s.data_size, num_frames=s.data_frames, caption="short", fmt="frames",
                    subject_radius=[float(v) for v in s.subject_radius])
        if s.identity_kind != IDENTITY_KINDS[0]:  # (the demo's meta.json and reuse check unchanged)
            args["identity_kind"] = s.identity_kind
        if s.two_tone_side is not None:
            args["two_tone_side"] = s.two_tone_side
        ids = args.pop("identities", None)
        recorded = dict(args, pool=ids) if ids is not None else args   # generate records its pool as "pool"
        if meta.is_file():   # the generator records its arguments in meta.json
            m = json.loads(meta.read_text())
            if m.get("complete") and all(m.get(k) == v for k, v in recorded.items()):
                paths.append(out)
                continue
        generate(out, overwrite=True, progress=s.progress, identities=ids, **args)
        paths.append(out)
    return paths[0], paths[1]


def make_eval_items(s: DemoSettings, heldout_root: Path) -> List[EvalItem]:
    """`s.clips_per_subject` clips per held-out identity (the first ones drawn of each), at most
    `s.heldout_subjects` in all, loaded as the evaluation loader does (frames from 0, no
    augmentation). Items are ordered by each identity's first clip, then by clip."""
    from ..data import VideoBoothDataset

    paired = s.extra.get("data.paired_transform")
    if paired:
        from ..registry import import_object
        paired = import_object(paired, "data.paired_transform")
    ds = VideoBoothDataset(heldout_root, num_frames=s.frames, frame_stride=s.frame_stride, size=s.size,
                           image_size=s.image_size, train=False, caption_column="short_caption", seed=s.seed,
                           paired_transform=paired or None)
    rows = _rows_by_id(heldout_root)
    # clip order = generation order (video ids are s{seed}_{i:06d})
    order = sorted(range(len(ds.records)), key=lambda i: ds.records[i].videoid)
    per = max(1, int(s.clips_per_subject))
    chosen: Dict[tuple, list] = {}
    for i in order:
        r = rows[ds.records[i].videoid]
        ident = (r["shape"], r["pattern"], r["colour"])
        if len(chosen.setdefault(ident, [])) < per:
            chosen[ident].append(i)
    items = []
    for ident, idx in chosen.items():   # (dicts keep the order of each identity's first clip)
        for i in idx:
            r = rows[ds.records[i].videoid]
            it = ds[i]
            items.append(EvalItem(it["video"], it["image"], it["caption"], r["full_caption"], it["subject"], ident,
                                  it["video_id"], it.get("image_paired")))
            if len(items) == s.heldout_subjects:
                return items
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

    from ..data import VideoBoothDataset

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
    from ..config import apply_override, load_config

    items = {"seed": s.seed, "output_dir": str(output_dir), "resume": "never",
             "max_steps": s.steps1 if stage == 1 else s.steps2, "batch_size": s.batch_size, "lr": s.lr,
             "attn_backend": s.attn_backend, "backbone": s.backbone, "schedule": s.schedule,
             "progress": s.progress, "data.root": str(data_root), "data.num_frames": s.frames,
             "data.frame_stride": s.frame_stride, "data.size": s.size, "data.image_size": s.image_size,
             "model.base_weights": str(vae_file), "init_from": str(init_from) if init_from else None,
             # the trainer's validation at the checkpoint: as many steps as the demo's generation
             "validation_steps": s.inference_steps, "validation_guidance": s.guidance_scale}
    items.update(s.extra)
    items.update(overrides or {})
    cfg = load_config(CONFIG_DIR / f"demo_stage{stage}.yaml")
    d = cfg.to_dict()
    for k, v in items.items():
        apply_override(d, f"{k}={json.dumps(v)}")
    d["lr_warmup_steps"] = min(d["lr_warmup_steps"], max(0, d["max_steps"] // 10))
    from ..config import TrainConfig
    return TrainConfig.from_dict(d)


def run_stage(cfg) -> dict:
    """Train one stage (a fresh run directory) and return the trainer's summary."""
    import shutil

    from ..trainer import Trainer

    out = Path(cfg.output_dir)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    summary = trainer.train()
    if summary.get("status") == "stopped":  # a signal (e.g. the study's SIGTERM): not a finished run
        raise RuntimeError(f"run_stage: {out} stopped at step {summary.get('step')} (a signal); the run is not "
                           f"finished and is not recorded")
    summary["exemplars_cloned"] = getattr(trainer.task, "exemplars_cloned", None)
    hist = summary.pop("history")
    n = max(1, len(hist) // 10)
    summary.update(seconds=round(time.perf_counter() - t0, 1), steps=len(hist),
                   loss_first=float(np.mean([h["loss"] for h in hist[:n]])),
                   loss_last=float(np.mean([h["loss"] for h in hist[-n:]])))
    return summary


# ================================================================================================
# both stages
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
