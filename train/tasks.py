"""The model-specific half of training: :class:`TrainTask`.

The trainer (:mod:`train.trainer`) owns everything generic: processes, optimizer, scheduler,
EMA, gradient clipping, checkpoints, exact resume, logs. A task owns the model, the data and the
loss. Its contract:

``TrainTask(cfg)``
    an ``nn.Module`` built from a :class:`train.config.TrainConfig` (``cfg.model``/``cfg.data``
    hold its own options). It must build the same weights on every process for the same
    ``cfg.seed`` (the trainer seeds the global RNGs with ``cfg.seed`` right before building it).
``trainable_parameters(stage) -> iterable of nn.Parameter (or (name, Parameter))``
    what stage 1 / stage 2 trains. Every parameter must belong to the task (names come from
    ``task.named_parameters()``; they are the keys of the checkpoint files). The trainer freezes
    everything else.
``build_dataset() -> torch.utils.data.Dataset``
    map-style; deterministic per (epoch, index) if it is random (``set_epoch(epoch)`` is called
    when it exists), which is what exact resume needs.
``collate(items) -> batch``
    default ``torch.utils.data.default_collate``.
``forward(batch, generator) -> dict``
    ``{"loss": scalar tensor, ...}`` (other entries: floats or 0-d tensors, logged). All the
    randomness of a step (noise, timesteps, condition dropout) must come from ``generator``
    (a ``torch.Generator`` on the task's device that the trainer seeds from (seed, rank, step)),
    so the loss of a step does not depend on what ran before it.
``set_train_mode(stage)``
    put modules in train/eval mode for training (default: frozen parts in eval).
``export(directory)``
    optional: write the final (EMA) weights in the model's own format (the VideoBooth task
    writes a ``vb`` adapter that ``VideoBoothPipeline.load_adapter`` reads).

:class:`DiffusionTask` implements ``forward`` for epsilon- (or v-) prediction diffusion with
condition dropout and a diffusers ``DDPMScheduler``; a subclass supplies ``latents``,
``drop_conditions`` and ``predict``. Two tasks are registered: ``toy`` (a small VideoBooth-
shaped denoiser on synthetic token videos, through the real ``kernels`` attention op: it runs in
seconds on a CPU and is what the tests train) and ``videobooth`` (the real model, ``vb``, on the
VideoBooth data layout, ``train.data``).
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig, normalize_schedule


# ================================================================================================
# the interface
# ================================================================================================
class TrainTask(nn.Module):
    """Base class of training tasks (module docstring)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg

    def trainable_parameters(self, stage: int) -> Iterable[nn.Parameter]:
        raise NotImplementedError

    def build_dataset(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def collate(self, items: List[dict]):
        return torch.utils.data.default_collate(items)

    def forward(self, batch, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def export(self, directory) -> Optional[str]:
        """Optional: write the trained weights in the model's own format (called once at the end,
        main process only, with the EMA weights in place). Returns a path or None."""
        return None

    def set_train_mode(self, stage: int) -> None:
        """Train mode for modules holding trainable parameters, eval for the rest."""
        trainable = {id(p) for p in self.trainable_parameters(stage)}
        self.eval()
        for m in self.modules():
            if any(id(p) in trainable for p in m.parameters(recurse=False)):
                m.train()

    def named_trainable_parameters(self, stage: int) -> List[Tuple[str, nn.Parameter]]:
        """(name, parameter) of ``trainable_parameters(stage)``, names from ``named_parameters``,
        in a stable order (sorted by name), no duplicates."""
        names = {id(p): n for n, p in self.named_parameters(remove_duplicate=True)}
        out: Dict[str, nn.Parameter] = {}
        for item in self.trainable_parameters(stage):
            p = item[1] if isinstance(item, tuple) else item
            if not isinstance(p, nn.Parameter):
                raise TypeError(f"trainable_parameters: expected nn.Parameter items, got {type(p).__name__}")
            if id(p) not in names:
                raise ValueError("trainable_parameters: a parameter does not belong to the task module")
            out[names[id(p)]] = p
        if not out:
            raise ValueError(f"trainable_parameters({stage}): no parameters")
        return sorted(out.items())


def batch_size_of(batch) -> int:
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
            if isinstance(v, (list, tuple)):
                return len(v)
    if isinstance(batch, (list, tuple)):
        return batch_size_of(batch[0]) if isinstance(batch[0], (dict, list, tuple)) else len(batch)
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    raise TypeError(f"batch: cannot tell the batch size of a {type(batch).__name__}")


class DiffusionTask(TrainTask):
    """Diffusion training loss with condition dropout (DESIGN.md section 1).

    forward: drop masks (B,) from ``generator`` (``cond_dropout``, ``cond_dropout_mode``), the
    batch with dropped conditions (``drop_conditions``), clean latents x0 (``latents``, no
    gradient), t ~ U{0..T-1}, eps ~ N(0, I), x_t = add_noise(x0, eps, t) (DDPMScheduler),
    prediction (``predict``), loss = MSE(prediction, eps) (or v for ``v_prediction``), in fp32.
    """

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
            beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type=cfg.prediction_type)

    # -- to implement ------------------------------------------------------------------------
    def latents(self, batch, generator: torch.Generator) -> torch.Tensor:
        """Clean latents x0 of the batch (frozen encoders; no gradient needed)."""
        raise NotImplementedError

    def drop_conditions(self, batch, drop_text: torch.Tensor, drop_image: torch.Tensor):
        """The batch with the text of ``drop_text`` samples replaced by the null prompt and the
        image prompt of ``drop_image`` samples by a grey image."""
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def dropout_masks(self, b: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        p = float(self.cfg.cond_dropout)
        dev = generator.device
        if self.cfg.cond_dropout_mode == "joint":
            drop = torch.rand(b, generator=generator, device=dev) < p
            return drop, drop.clone()
        drop_text = torch.rand(b, generator=generator, device=dev) < p
        drop_image = torch.rand(b, generator=generator, device=dev) < p
        return drop_text, drop_image

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, noise, t)

    def forward(self, batch, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        b = batch_size_of(batch)
        drop_text, drop_image = self.dropout_masks(b, generator)
        batch = self.drop_conditions(batch, drop_text, drop_image)
        with torch.no_grad():
            x0 = self.latents(batch, generator)
        dev = x0.device
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator,
                          device=generator.device).to(dev)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32)
        noise = noise.to(device=dev, dtype=x0.dtype)
        noisy = self.add_noise(x0, noise, t)
        pred = self.predict(noisy, t, batch, generator)
        if self.cfg.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        loss = F.mse_loss(pred.float(), target.float())
        return {"loss": loss, "dropped_text": drop_text.float().mean(), "dropped_image": drop_image.float().mean()}


# ================================================================================================
# schedules
# ================================================================================================
def make_schedule(name: str, num_frames: int):
    """A ``kernels.Schedule`` from a config name (``videobooth``, ``first``, ``window:<k>``,
    ``keyframes:<m>``, optional ``+img``)."""
    from kernels import Schedule

    name = normalize_schedule(name)
    img = name.endswith("+img")
    base = name[:-4] if img else name
    kind, _, arg = base.partition(":")
    if kind == "videobooth":
        s = Schedule.videobooth(num_frames)
    elif kind == "first":
        s = Schedule.first(num_frames)
    elif kind == "window":
        s = Schedule.window(num_frames, int(arg))
    else:
        s = Schedule.keyframes(num_frames, int(arg))
    return s.with_image_everywhere() if img else s


# ================================================================================================
# the toy task: VideoBooth's structure on synthetic token videos
# ================================================================================================
class ToyVideoDataset(torch.utils.data.Dataset):
    """Synthetic "videos" of tokens: item i shows subject ``i % num_classes`` (a fixed random
    token pattern per class) sliding over F frames on a noisy background; its image prompt is
    the subject's pattern; its caption is the class id. Deterministic in (seed, index); no files.

    Item: {"video": (F, N, C), "image": (M, C), "label": int64, "index": int64}.
    """

    def __init__(self, num_items: int = 64, num_frames: int = 4, tokens: int = 16, image_tokens: int = 8,
                 channels: int = 32, num_classes: int = 4, seed: int = 0):
        self.n, self.f, self.tokens, self.m, self.c, self.k = num_items, num_frames, tokens, image_tokens, channels, num_classes
        g = torch.Generator().manual_seed(10_000 + seed)
        self.patterns = torch.randn(num_classes, image_tokens, channels, generator=g)
        self.seed = seed

    def __len__(self):
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        c = i % self.k
        pat = self.patterns[c]
        video = 0.3 * torch.randn(self.f, self.tokens, self.c, generator=g)
        start = int(torch.randint(0, self.tokens, (1,), generator=g))
        for f in range(self.f):
            for j in range(self.m):
                video[f, (start + f + j) % self.tokens] += pat[j]
        image = pat + 0.05 * torch.randn(self.m, self.c, generator=g)
        return {"video": video, "image": image, "label": torch.tensor(c), "index": torch.tensor(i)}


class _Attn(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)


class ToyVideoTask(DiffusionTask):
    """A small denoiser with VideoBooth's trainable pieces (stage 1: the mapper and attn2's new
    K/V; stage 2: adds attn1's ``to_k_new``, ``to_v_new``, ``to_k_exemplar``, ``to_v_exemplar``)
    and its attn1 running through ``kernels.videobooth_attention`` with ``cfg.attn_backend`` and
    ``cfg.schedule``. Everything else (text embedding, time embedding, q/out projections, in/out
    layers) is a frozen random "pretrained" network. ``cfg.backbone`` is ignored.

    cfg.model: channels (32), heads (2), frames (4), tokens (16), image_tokens (8), classes (4).
    cfg.data: num_items (64), seed (0).
    """

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        m = dict(cfg.model)
        unknown = sorted(set(m) - {"channels", "heads", "frames", "tokens", "image_tokens", "classes"})
        if unknown:
            raise ValueError(f"model: unknown keys for the toy task: {unknown}")
        self.c = c = int(m.get("channels", 32))
        self.h = int(m.get("heads", 2))
        self.frames = int(m.get("frames", 4))
        self.tokens = int(m.get("tokens", 16))
        self.image_tokens = int(m.get("image_tokens", 8))
        self.classes = int(m.get("classes", 4))
        if c % self.h or (c // self.h) % 8:
            raise ValueError(f"model.channels / model.heads must be a multiple of 8, got {c}/{self.h}")
        self.schedule = make_schedule(cfg.schedule, self.frames)
        self.backend = cfg.attn_backend
        # frozen "pretrained" parts
        self.text_embed = nn.Embedding(self.classes + 1, c)  # last row: the null prompt
        self.time_mlp = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.pos = nn.Parameter(torch.randn(self.tokens, c) * 0.1)
        self.proj_in = nn.Linear(c, c)
        self.norm1 = nn.LayerNorm(c)
        self.norm2 = nn.LayerNorm(c)
        self.norm3 = nn.LayerNorm(c)
        self.ff = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.proj_out = nn.Linear(c, c)
        self.attn1 = _Attn(c, self.h)
        self.attn2 = _Attn(c, self.h)
        # VideoBooth's new weights, initialised as copies of the pretrained K/V
        self.mapper = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, c))
        self.attn2_to_k_new = nn.Linear(c, c, bias=False)
        self.attn2_to_v_new = nn.Linear(c, c, bias=False)
        self.attn1_to_k_new = nn.Linear(c, c, bias=False)
        self.attn1_to_v_new = nn.Linear(c, c, bias=False)
        self.attn1_to_k_exemplar = nn.Linear(c, c, bias=False)
        self.attn1_to_v_exemplar = nn.Linear(c, c, bias=False)
        with torch.no_grad():
            for new, old in ((self.attn2_to_k_new, self.attn2.to_k), (self.attn2_to_v_new, self.attn2.to_v),
                             (self.attn1_to_k_new, self.attn1.to_k), (self.attn1_to_v_new, self.attn1.to_v),
                             (self.attn1_to_k_exemplar, self.attn1.to_k),
                             (self.attn1_to_v_exemplar, self.attn1.to_v)):
                new.weight.copy_(old.weight)

    def trainable_parameters(self, stage: int):
        mods = [self.mapper, self.attn2_to_k_new, self.attn2_to_v_new]
        if stage == 2:
            mods += [self.attn1_to_k_new, self.attn1_to_v_new, self.attn1_to_k_exemplar, self.attn1_to_v_exemplar]
        return [p for mod in mods for p in mod.parameters()]

    def build_dataset(self):
        d = dict(self.cfg.data)
        unknown = sorted(set(d) - {"num_items", "seed"})
        if unknown:
            raise ValueError(f"data: unknown keys for the toy task: {unknown}")
        return ToyVideoDataset(num_items=int(d.get("num_items", 64)), num_frames=self.frames, tokens=self.tokens,
                               image_tokens=self.image_tokens, channels=self.c, num_classes=self.classes,
                               seed=int(d.get("seed", 0)))

    def drop_conditions(self, batch, drop_text, drop_image):
        batch = dict(batch)
        dev = batch["label"].device
        batch["label"] = torch.where(drop_text.to(dev), torch.full_like(batch["label"], self.classes), batch["label"])
        img = batch["image"]
        batch["image"] = torch.where(drop_image.to(img.device)[:, None, None], torch.zeros_like(img), img)  # grey
        return batch

    def latents(self, batch, generator):
        return batch["video"]

    def _time(self, t: torch.Tensor) -> torch.Tensor:
        half = self.c // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        ang = t.float()[:, None] * freqs[None]
        return self.time_mlp(torch.cat([ang.sin(), ang.cos()], dim=-1))

    def predict(self, noisy, timesteps, batch, generator):
        from kernels import videobooth_attention

        b, f, n, c = noisy.shape
        h, d = self.h, c // self.h
        temb = self._time(timesteps)  # (B, C)
        x = self.proj_in(noisy) + self.pos + temb[:, None, None]
        # image branch: the image prompt noised to the same t, through the same input layer
        img = batch["image"]
        img_noise = torch.randn(img.shape, generator=generator, device=generator.device).to(img)
        x_img = self.proj_in(self.add_noise(img, img_noise, timesteps)) + temb[:, None]
        # attn1: cross-frame attention with image-prompt injection (the fine path)
        y = self.norm1(x)
        yi = self.norm1(x_img)
        q = self.attn1.to_q(y).view(b, f, n, h, d)
        k = self.attn1_to_k_new(y).view(b, f, n, h, d)
        v = self.attn1_to_v_new(y).view(b, f, n, h, d)
        m = yi.shape[1]
        k_img = self.attn1_to_k_exemplar(yi).view(b, m, h, d)
        v_img = self.attn1_to_v_exemplar(yi).view(b, m, h, d)
        a = videobooth_attention(q, k, v, k_img, v_img, schedule=self.schedule, backend=self.backend)
        x = x + self.attn1.to_out(a.reshape(b, f, n, c))
        # attn2: text cross-attention; the text is [class token, mapped image token] (the coarse path)
        text = torch.stack([self.text_embed(batch["label"]), self.mapper(batch["image"].mean(1))], dim=1)
        y = self.norm2(x).reshape(b, f * n, c)
        q2 = self.attn2.to_q(y).view(b, f * n, h, d).transpose(1, 2)
        k2 = self.attn2_to_k_new(text).view(b, -1, h, d).transpose(1, 2)
        v2 = self.attn2_to_v_new(text).view(b, -1, h, d).transpose(1, 2)
        a2 = F.scaled_dot_product_attention(q2, k2, v2).transpose(1, 2).reshape(b, f, n, c)
        x = x + self.attn2.to_out(a2)
        x = x + self.ff(self.norm3(x))
        return self.proj_out(x)


# ================================================================================================
# registry
# ================================================================================================
TASKS: Dict[str, Callable[[TrainConfig], TrainTask]] = {"toy": ToyVideoTask}


def _videobooth(cfg: TrainConfig) -> TrainTask:
    from .videobooth_task import VideoBoothTask  # imports vb (diffusers models) only when used

    return VideoBoothTask(cfg)


TASKS["videobooth"] = _videobooth


def register_task(name: str, factory: Callable[[TrainConfig], TrainTask]) -> None:
    TASKS[name] = factory


def build_task(cfg: TrainConfig) -> TrainTask:
    """The task ``cfg.task`` names: a registered name or ``"package.module:factory"``."""
    name = cfg.task
    if name in TASKS:
        factory = TASKS[name]
    elif ":" in name:
        mod, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"task: cannot import {name!r} ({e})") from e
    else:
        raise ValueError(f"task: expected one of {sorted(TASKS)} or 'package.module:factory', got {name!r}")
    task = factory(cfg)
    if not isinstance(task, TrainTask):
        raise TypeError(f"task: {name!r} built a {type(task).__name__}, expected a train.tasks.TrainTask")
    return task
