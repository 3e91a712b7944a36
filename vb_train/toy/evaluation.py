"""Evaluation helpers the demo and the ablations share: a trained run as a pipeline, generation of
held-out subjects with and without the image prompt, identity metrics and their summaries,
GIF grids and loss plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only
    from .experiment import DemoSettings, EvalItem


# ================================================================================================
# a trained run as a pipeline
# ================================================================================================
def load_trained_task(cfg, run_dir: Path, which: str = "ema"):
    """The training task of `cfg` with every trained weight of `run_dir` (EMA by default), in
    eval mode, gradients off."""
    from .. import checkpoint as ckpt
    from ..registry import build_task
    from ..trainer import seed_all

    seed_all(cfg.seed)
    task = build_task(cfg)
    ckpt.copy_named(task, ckpt.load_weights(run_dir, which), f"{run_dir}")
    return task.eval().requires_grad_(False)


def load_trained_pipeline(cfg, run_dir: Path, which: str = "ema", task=None):
    """A `VideoBoothPipeline` over the task of `cfg` (its tiny components + the VAE of
    model.base_weights) with every trained weight of `run_dir` (EMA by default), in eval mode
    (or over `task`, one `load_trained_task` returned)."""
    from ..tasks import inference_scheduler

    task = task if task is not None else load_trained_task(cfg, run_dir, which)
    pipe = task.parts.pipeline()
    pipe.scheduler = inference_scheduler(task.noise_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ================================================================================================
# 4. generation
# ================================================================================================
GREY = 0.5


@torch.no_grad()
def generate_videos(pipe, items: Sequence[EvalItem], s: DemoSettings, *, image: bool, seed: int,
                    num_frames: Optional[int] = None, batch: int = 20, images=None,
                    image_prompt_scale: Optional[float] = None, plain_prompts: bool = False,
                    coarse_input: str = "image", swapped: bool = False, noise_image_latents: bool = True,
                    image_stream: Optional[str] = None) -> torch.Tensor:
    """One video per item: (N, F, 3, H, W) in [-1, 1]. image=True: with the item's image prompt
    (or `images[i]` when given); False: text only (a grey image prompt). Item i's initial noise
    depends on (seed, i) only, so both arms start from the same noise.

    image_prompt_scale: the pipeline's fine-path strength for these calls (0: no image branch,
    for a model trained without the fine path). plain_prompts: the captions' own embeddings,
    without subject-token injection (for a model trained without the coarse path).
    coarse_input: the task's ``model.coarse_input``; other than "image", the coarse path's tokens
    come from `vb_train.videobooth_task.coarse_subject_tokens` (what the task trained on) and reach
    the pipeline as its ``prompt_embeds``. swapped: every item's swapped prompt (``image_paired``)
    instead of its prompt, for both paths (the paired flip contrast). noise_image_latents: the
    pipeline's (False for a model trained on the clean image latent). image_stream: the
    pipeline's (None: the backbone's, i.e. the stream the task trained with)."""
    from tqdm.auto import tqdm

    f = num_frames or s.frames
    out = []
    chunks = range(0, len(items), batch)
    bar = tqdm(total=len(items), desc=f"generate ({'image' if image else 'text only'})", unit="video",
               disable=not s.progress)
    for lo in chunks:
        part = items[lo:lo + batch]
        paired = None
        if image:
            if swapped and any(it.image_paired is None for it in part):
                raise ValueError("swapped: the items have no swapped prompt (data.paired_transform)")
            src = ([it.image_paired if swapped else it.image for it in part] if images is None
                   else list(images[lo:lo + batch]))
            prompts = torch.stack([(x + 1) / 2 for x in src]).clamp(0, 1)
            if all(it.image_paired is not None for it in part) and images is None:
                paired = torch.stack([(it.image if swapped else it.image_paired) + 1 for it in part]).div(2).clamp(0, 1)
        else:
            prompts = torch.full((len(part), 3, s.image_size, s.image_size), GREY)
        if paired is None:
            paired = prompts
        lat_shape = (pipe.backbone.in_channels, f, s.size // pipe.vae_scale_factor, s.size // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(lat_shape, generator=torch.Generator().manual_seed(seed * 100003 + lo + j))
                               for j in range(len(part))])
        text = dict(prompt=[it.caption for it in part], subject_word=[it.subject for it in part])
        if plain_prompts:
            from vb.coarse import encode_prompt
            text = dict(prompt_embeds=encode_prompt(pipe.text_encoder, pipe.tokenizer, text["prompt"])[0])
        elif coarse_input != "image":
            from vb.coarse import encode_prompt

            from ..videobooth_task import coarse_subject_tokens
            tokens, _ = coarse_subject_tokens(pipe.image_encoder, pipe.mapper, prompts, paired, coarse_input)
            text = dict(prompt_embeds=encode_prompt(pipe.text_encoder, pipe.tokenizer, text["prompt"],
                                                    text["subject_word"], tokens)[0])
        res = pipe(**text, image_prompt=prompts, image_prompt_scale=image_prompt_scale,
                   noise_image_latents=noise_image_latents, image_stream=image_stream,
                   num_frames=f, height=s.size, width=s.size, num_inference_steps=s.inference_steps,
                   guidance_scale=s.guidance_scale, uncond_image=s.uncond_image,
                   generator=torch.Generator().manual_seed(seed + lo), latents=latents, output_type="pt")
        out.append(res.frames * 2 - 1)
        bar.update(len(part))
    bar.close()
    return torch.cat(out).clamp(-1, 1)


@torch.no_grad()
def flip_loss_gap(task, items: Sequence[EvalItem], *, seed: int = 0,
                  timesteps: Sequence[int] = (100, 200, 300, 400, 500, 600, 700, 800, 900)) -> List[List[float]]:
    """Per item, per timestep of `timesteps`: the denoising loss with the swapped prompt minus
    with the true one; the same clean latents, noise, image-branch noise and caption for both
    (everything drawn from `seed`). Positive: the model's prediction is better with the true
    arrangement, i.e. it uses the arrangement. Both paths get the swapped prompt (a coarse input
    averaged over the prompt and its swap gets the same tokens either way, so a coarse-only model
    scores 0 by construction). The prompts are fed as they are, also to a model trained on grey
    prompts (``grey_prompt``, the negative control), as sampling feeds them."""
    if any(it.image_paired is None for it in items):
        raise ValueError("items: flip_loss_gap needs each item's swapped prompt (data.paired_transform)")
    b = len(items)
    true = {"video": torch.stack([it.video for it in items]), "image": torch.stack([it.image for it in items]),
            "image_paired": torch.stack([it.image_paired for it in items]),
            "caption": [it.caption for it in items], "subject": [it.subject for it in items]}
    true["drop_text"] = torch.zeros(b, dtype=torch.bool)
    flip = dict(true, image=true["image_paired"], image_paired=true["image"])
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    x0 = task.latents(true, g)
    gaps = []
    for t in timesteps:
        tt = torch.full((b,), int(t), dtype=torch.long)
        noise = torch.randn(x0.shape, generator=g)
        noisy = task.add_noise(x0, noise, tt)
        target = noise if task.prediction_type == "epsilon" else task.noise_scheduler.get_velocity(x0, noise, tt)
        branch_seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))
        losses = []
        for batch in (true, flip):
            pred = task.predict(noisy, tt, batch, torch.Generator().manual_seed(branch_seed))
            losses.append(((pred.float() - target.float()) ** 2).flatten(1).mean(1).double())
        gaps.append(losses[1] - losses[0])
    return torch.stack(gaps, dim=1).tolist()   # (items, timesteps)


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
    from ..metrics import color_identity

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
    from ..metrics import VideoMetrics

    vm = VideoMetrics(clip=clip, dino=dino, color=False)
    return vm.evaluate(list(videos), [it.image for it in items], [it.caption for it in items])


def summarize(per_arm: Dict[str, List[dict]]) -> Dict[str, dict]:
    from ..metrics import aggregate

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
