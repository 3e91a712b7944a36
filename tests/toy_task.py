"""The toy training task (a test fixture): VideoBooth's trainable structure on synthetic token
videos, through the real ``vb_kernels`` attention op, in seconds on a CPU. The trainer's tests train
it as ``task: "tests.toy_task:ToyVideoTask"`` (any ``package.module:factory`` is a task)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vb_train.config import TrainConfig
from vb_train.tasks import DiffusionTask
from vb.processors import resolve_schedule

TASK = "tests.toy_task:ToyVideoTask"


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
    and its attn1 running through ``vb_kernels.videobooth_attention`` with ``cfg.attn_backend`` and
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
        if cfg.text_drift_l1 > 0:
            raise ValueError("text_drift_l1: the toy task has no text encoder to drift")
        self.c = c = int(m.get("channels", 32))
        self.h = int(m.get("heads", 2))
        self.frames = int(m.get("frames", 4))
        self.tokens = int(m.get("tokens", 16))
        self.image_tokens = int(m.get("image_tokens", 8))
        self.classes = int(m.get("classes", 4))
        if c % self.h or (c // self.h) % 8:
            raise ValueError(f"model.channels / model.heads must be a multiple of 8, got {c}/{self.h}")
        self.schedule = resolve_schedule(cfg.schedule, self.frames)
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
        from vb_kernels import videobooth_attention

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
        mapped = self.mapper(batch["image"].mean(1))
        if self.cfg.mapper_l1 > 0:  # the official objective's regulariser on the mapper output
            self.regularizers["mapper_l1"] = mapped.abs().mean()
        text = torch.stack([self.text_embed(batch["label"]), mapped], dim=1)
        y = self.norm2(x).reshape(b, f * n, c)
        q2 = self.attn2.to_q(y).view(b, f * n, h, d).transpose(1, 2)
        k2 = self.attn2_to_k_new(text).view(b, -1, h, d).transpose(1, 2)
        v2 = self.attn2_to_v_new(text).view(b, -1, h, d).transpose(1, 2)
        a2 = F.scaled_dot_product_attention(q2, k2, v2).transpose(1, 2).reshape(b, f, n, c)
        x = x + self.attn2.to_out(a2)
        x = x + self.ff(self.norm3(x))
        return self.proj_out(x)
