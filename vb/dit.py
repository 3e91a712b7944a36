"""A small video diffusion transformer (Latte-style) with the VideoBooth fine path.

Patchify every frame, then alternate spatial blocks (tokens of one frame; attn1 is the
VideoBooth cross-frame processor, so "spatial" attention also reads the schedule's reference
frames and the image prompt) and temporal blocks (one spatial position over the frames), as
Latte's variant 1 does (Ma et al. 2024). No cross-attention: timestep, pooled text and the CLIP
image embedding condition every block through adaLN-Zero (Peebles & Xie 2023), so the coarse
path reaches the DiT through the pooled embedding of the subject-injected prompt.

Image branch: the image prompt's latent is patchified and run through the spatial blocks only,
once per sample, with the null prompt's pooled embedding; each spatial attn1 records its input.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin

from .backbone import (VideoBackboneMixin, batch_timesteps, check_backbone_inputs, check_image_scale, check_tensor,
                       expand_batch)
from .context import VideoBoothContext, VideoBoothState, state_kwargs
from .processors import VideoBoothAttnProcessor, check_backend, check_schedule_spec, parse_image_bank
from .temporal import sinusoidal_positions


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


def sincos_2d(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h*w, dim) fixed 2D sin/cos position code: half the channels for rows, half for columns."""
    half = dim // 2
    rows = sinusoidal_positions(h, half, device)[:, None].expand(h, w, half)
    cols = sinusoidal_positions(w, dim - half, device)[None].expand(h, w, dim - half)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, dim).to(dtype)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: x += g1 * attn(mod(LN(x))); x += g2 * mlp(mod(LN(x))).

    The attention module is called ``attn1`` in spatial blocks (the VideoBooth processor goes
    there) and ``attn_temp`` in temporal blocks (plain attention over frames).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cond_dim: int, spatial: bool):
        super().__init__()
        self.spatial = spatial
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=True)
        if spatial:
            self.attn1 = attn
        else:
            self.attn_temp = attn
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
        # adaLN-Zero: every block starts as the identity.
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    @property
    def attn(self) -> Attention:
        return self.attn1 if self.spatial else self.attn_temp

    def forward(self, x: torch.Tensor, cond: torch.Tensor, state: Optional[VideoBoothState] = None) -> torch.Tensor:
        """x: (B', L, D) tokens; cond: (B', D_cond) per sequence; state: the pass's
        :class:`vb.VideoBoothState` for a spatial block's processor. Returns (B', L, D)."""
        s1, c1, g1, s2, c2, g2 = self.ada(cond)[:, None].chunk(6, dim=-1)
        h = _modulate(self.norm1(x), s1, c1)
        a = self.attn1(h, **state_kwargs(state)) if self.spatial and state is not None else self.attn(h)
        x = x + g1 * a
        return x + g2 * self.mlp(_modulate(self.norm2(x), s2, c2))


class VideoDiT(VideoBackboneMixin, ModelMixin, ConfigMixin):
    """Video DiT with alternating spatial/temporal blocks and VideoBooth injection.

    Args:
        in_channels, out_channels: latent channels (out defaults to in).
        patch_size: p; latent H and W must be multiples of p.
        hidden_size, num_heads: token width D and heads (D / heads is the op's head dim:
            a multiple of 8 in [16, 256]).
        depth: number of (spatial, temporal) block pairs.
        mlp_ratio: MLP width / D.
        text_embed_dim: width of the pooled text embedding.
        image_embed_dim: width of the CLIP image embedding (0: no image-embedding condition).
        schedule, attn_backend, image_bank, learn_query: as :func:`vb.install_videobooth`
            (``schedule`` must be a name here so the config stays JSON).
        sample_size: default latent height/width (the pipeline's default video size).
        image_scale: strength of the image prompt's fine path (:meth:`set_image_scale`; saved in
            the config).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, in_channels: int = 4, out_channels: Optional[int] = None, patch_size: int = 2,
                 hidden_size: int = 64, num_heads: int = 4, depth: int = 2, mlp_ratio: float = 4.0,
                 text_embed_dim: int = 32, image_embed_dim: int = 32, schedule: str = "videobooth",
                 attn_backend: str = "reference", image_bank: Optional[str] = None, learn_query: bool = False,
                 sample_size: int = 32, image_scale: float = 1.0):
        super().__init__()
        check_schedule_spec(schedule)
        check_backend(attn_backend)
        image_bank = parse_image_bank(image_bank)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size: expected a multiple of num_heads={num_heads}, got {hidden_size}")
        out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.x_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, hidden_size)
        self.text_embed = nn.Sequential(nn.Linear(text_embed_dim, hidden_size), nn.SiLU(),
                                        nn.Linear(hidden_size, hidden_size))
        self.image_embed = (nn.Sequential(nn.Linear(image_embed_dim, hidden_size), nn.SiLU(),
                                          nn.Linear(hidden_size, hidden_size)) if image_embed_dim else None)
        self.spatial_blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, hidden_size, spatial=True) for _ in range(depth)])
        self.temporal_blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, hidden_size, spatial=False) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_proj = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        for lin in (self.final_ada[1], self.final_proj):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

        self.gradient_checkpointing = False  # diffusers' enable_gradient_checkpointing() sets it
        self.image_scale = check_image_scale("image_scale", image_scale)
        # The same processor as the U-Net's attn1, on every spatial block.
        self.context = VideoBoothContext()
        for i, blk in enumerate(self.spatial_blocks):
            blk.attn1.set_processor(VideoBoothAttnProcessor(
                blk.attn1, self.context, f"spatial_blocks.{i}.attn1", schedule=schedule, backend=attn_backend,
                image_bank=image_bank, learn_query=learn_query))
        self.install_config = {"backbone": "dit", "image_bank": image_bank, "learn_query": bool(learn_query),
                               "temporal": False, "schedule": schedule}

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.config.out_channels or self.config.in_channels

    @property
    def latent_multiple(self) -> int:
        return self.patch_size

    @property
    def sample_size(self) -> int:
        return self.config.sample_size

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B', C, H, W) -> (B', (H/p)(W/p), D) with the 2D position code added."""
        t = self.x_embed(x)
        _, d, gh, gw = t.shape
        return t.flatten(2).transpose(1, 2) + sincos_2d(gh, gw, d, t.device, t.dtype)

    def _cond(self, t, pooled, image_embeds, dtype):
        c = self.time_embed(self.time_proj(t).to(dtype)) + self.text_embed(pooled.to(dtype))
        if image_embeds is not None:
            if self.image_embed is None:
                raise ValueError("image_embeds: this VideoDiT was built with image_embed_dim=0")
            c = c + self.image_embed(image_embeds.to(dtype))
        return c

    def _block(self, blk: DiTBlock, x, cond, state):
        """One block, checkpointed when gradient checkpointing is on (the state is an argument,
        so the recompute sees the forward's)."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(blk, x, cond, state)
        return blk(x, cond, state)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states=None, *,
                pooled_text_embeds: torch.Tensor = None, image_embeds: Optional[torch.Tensor] = None,
                image_latents: Optional[torch.Tensor] = None,
                null_pooled_text_embeds: Optional[torch.Tensor] = None,
                null_encoder_hidden_states=None) -> torch.Tensor:
        """Predict the noise of a video.

        Args:
            sample: (B, C, F, H, W) noisy video latents, H and W multiples of ``patch_size``.
            timestep: scalar or (B,).
            encoder_hidden_states: unused (no cross-attention); accepted for a shared call.
            pooled_text_embeds: (B, D_text) pooled prompt embedding (subject-injected or null).
            image_embeds: (B, E) CLIP image embedding of the image prompt, or None.
            image_latents: (B, C, H, W) the image prompt's latent noised to ``timestep``, or
                None for no fine-path injection.
            null_pooled_text_embeds: (B or 1, D_text) null prompt, for the image branch;
                required with ``image_latents``.

        Returns:
            (B, C_out, F, H, W).
        """
        check_backbone_inputs(sample, image_latents, self.in_channels, self.patch_size)
        b, c, f, h, w = sample.shape
        check_tensor("pooled_text_embeds", pooled_text_embeds, 2, "(B, D_text)")
        pooled = expand_batch("pooled_text_embeds", pooled_text_embeds, b)
        if image_embeds is not None:
            check_tensor("image_embeds", image_embeds, 2, "(B, E)")
            image_embeds = expand_batch("image_embeds", image_embeds, b)
        dtype = self.dtype  # the compute dtype (float8-stored weights under layerwise casting compute in it)
        p = self.patch_size
        gh, gw = h // p, w // p
        t = batch_timesteps(timestep, b, sample.device)
        # One state per pass, handed to every spatial block (vb/context.py says why).
        if self.image_scale == 0.0:  # strength 0: the fine path contributes nothing; skip its branch
            image_latents = None
        image_states = None
        if image_latents is not None:
            if null_pooled_text_embeds is None:
                raise ValueError("null_pooled_text_embeds: required with image_latents (the image "
                                 "branch runs with the null prompt)")
            null = expand_batch("null_pooled_text_embeds", null_pooled_text_embeds, b)
            image_states = {}
            st_img = VideoBoothState.image((gh, gw), image_states)
            xi = self._patchify(image_latents.to(dtype))
            ci = self._cond(t, null, None, dtype)
            for blk in self.spatial_blocks:  # spatial only: never a temporal block
                xi = self._block(blk, xi, ci, st_img)
        st = VideoBoothState.video(f, (gh, gw), image_states, self.image_scale)
        cond = self._cond(t, pooled, image_embeds, dtype)  # (B, D)
        x = self._patchify(sample.transpose(1, 2).reshape(b * f, c, h, w).to(dtype))  # (B*F, N, D)
        n, d = x.shape[1:]
        cond_frames = cond.repeat_interleave(f, 0)
        cond_tokens = cond.repeat_interleave(n, 0)
        tpos = sinusoidal_positions(f, d, x.device, x.dtype)
        for i, (sb, tb) in enumerate(zip(self.spatial_blocks, self.temporal_blocks)):
            x = self._block(sb, x, cond_frames, st)
            x = x.view(b, f, n, d).transpose(1, 2).reshape(b * n, f, d)
            if i == 0:  # Latte adds the temporal position code once, before the first temporal block
                x = x + tpos
            x = self._block(tb, x, cond_tokens, None)
            x = x.view(b, n, f, d).transpose(1, 2).reshape(b * f, n, d)
        shift, scale = self.final_ada(cond_frames)[:, None].chunk(2, dim=-1)
        x = self.final_proj(_modulate(self.final_norm(x), shift, scale))  # (B*F, N, p*p*C_out)
        co = self.out_channels
        x = x.view(b, f, gh, gw, p, p, co).permute(0, 6, 1, 2, 4, 3, 5)
        return x.reshape(b, co, f, h, w)
