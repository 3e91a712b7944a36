"""Toy-size VideoBooth components built from random weights, nothing downloaded: for tests,
CPU demos and the training code's smoke runs (``vb.build_tiny_videobooth``)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .coarse import VideoBoothImageEncoder, VideoBoothMapper, default_layers
from .components import VideoBoothComponents
from .dit import VideoDiT
from .tokenizer import clip_tokenizer
from .unet import VideoBoothUNet


def build_tiny_videobooth(backbone: str = "unet", attn_backend: str = "reference", schedule="videobooth", *,
                          image_bank=None, learn_query: bool = False, temporal: bool = True,
                          clip_layers: Optional[Sequence[int]] = None, seed: int = 0,
                          device="cpu", dtype: torch.dtype = torch.float32) -> VideoBoothComponents:
    """Random toy-size VideoBooth components (a few hundred thousand weights each).

    Sizes: 16x16 px frames -> 4x8x8 latents (VAE factor 2); text and CLIP width 32 with CLIP's
    real 49408-token vocabulary; image encoder 32 px ViT with patch 8 and 4 blocks, 3 of them
    mapped (K = 3 subject tokens). U-Net: 32/64 channels, 2 heads (head dims 16 and 32). DiT:
    width 32, 2 heads, patch 2, 2 spatial/temporal block pairs. DDIM scheduler.

    Args:
        backbone: ``"unet"`` (inflated ``UNet2DConditionModel``) or ``"dit"`` (:class:`vb.VideoDiT`).
        attn_backend: ``vb_kernels`` backend of every attn1.
        schedule: temporal schedule spec (name, ``vb_kernels.Schedule`` or callable; the DiT
            takes names only).
        image_bank, learn_query: fine-path options (see :func:`vb.install_videobooth`).
        temporal: U-Net only: add the zero-initialised temporal layers.
        clip_layers: image-encoder blocks fed to the mapper (default 3 of the 4).
        seed: weights are a function of the seed; the caller's RNG state is left untouched.
        device, dtype: where the components go.

    Returns:
        :class:`VideoBoothComponents` (tokenizer, text_encoder, image_encoder, mapper, backbone,
        vae, scheduler); ``.pipeline()`` wraps them in a :class:`vb.VideoBoothPipeline`.
    """
    import open_clip
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if backbone not in ("unet", "dit"):
        raise ValueError(f"backbone: expected 'unet' or 'dit', got {backbone!r}")
    width = 32
    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
        vision_cfg = dict(image_size=32, patch_size=8, width=width, layers=4, head_width=16)
        clip = open_clip.CLIP(embed_dim=width, vision_cfg=vision_cfg,
                              text_cfg=dict(context_length=77, vocab_size=64, width=16, heads=1, layers=1))
        layers = tuple(clip_layers) if clip_layers is not None else default_layers(4, 3)
        image_encoder = VideoBoothImageEncoder(clip.visual, layers=layers, embed_dim=width, vision_cfg=vision_cfg)
        mapper = VideoBoothMapper(input_dim=image_encoder.hidden_size, output_dim=width, num_layers=len(layers),
                                  hidden_dim=width)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                            layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)
        if backbone == "unet":
            unet = UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
                attention_head_dim=2, norm_num_groups=8)
            net = VideoBoothUNet(unet, schedule=schedule, attn_backend=attn_backend, image_bank=image_bank,
                                 learn_query=learn_query, temporal=temporal)
        else:
            net = VideoDiT(in_channels=4, patch_size=2, hidden_size=width, num_heads=2, depth=2, mlp_ratio=2.0,
                           text_embed_dim=width, image_embed_dim=image_encoder.embed_dim, schedule=schedule,
                           attn_backend=attn_backend, image_bank=image_bank, learn_query=learn_query, sample_size=8)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    parts = VideoBoothComponents(tokenizer, text_encoder, image_encoder, mapper, net, vae, scheduler)
    for m in (text_encoder, image_encoder, mapper, net, vae):
        m.to(device)
        if dtype != torch.float32:  # (diffusers warns about any dtype cast, even a no-op one)
            m.to(dtype)
    for m in (text_encoder, image_encoder, vae):
        m.eval().requires_grad_(False)
    return parts
