"""The official VideoBooth sampler (Vchitect/VideoBooth's sample script and its ADM loop): the
scheduler, the guidance, one DDPM step with given noise and the whole loop on latents, plus the
prompt rewriting of its sample script. :meth:`vb.VideoBoothPipeline.official_sample` runs it;
docs/official.md says what each piece reproduces."""
from __future__ import annotations

from typing import Optional

import torch

# The official VideoBooth sampling (docs/official.md).
OFFICIAL_NULL_PROMPT = "None"  # the official code's null text is this literal word
OFFICIAL_PLACEHOLDER = "sdksd"  # the official sample script puts this word in place of the subject
OFFICIAL_DEFAULTS = dict(height=256, width=256, num_frames=16, num_inference_steps=250, guidance_scale=4.0, fps=8)

# What the fine path's image branch is fed (docs/official.md, difference 4b):
#   "one": one copy of the image latent per sample, (B, C, h, w), one noise draw (this project's
#          research default; the image branch runs once: 1/F of the work of "official");
#   "official": the image latent repeated over the F frames, (B, C, F, h, w), each copy with its own
#          noise draw, a fresh draw at every sampling step (in training: at the video's timestep),
#          run through every layer, temporal attention included (the official code's stream).
# The two are different models: one trained with one stream is not the other's estimator.
IMAGE_STREAMS = ("one", "official")


def check_image_stream(name: str, stream) -> str:
    """``stream`` if it is one of :data:`IMAGE_STREAMS`, else a ValueError naming ``name``."""
    if not isinstance(stream, str) or stream not in IMAGE_STREAMS:
        raise ValueError(f"{name}: expected one of {IMAGE_STREAMS}, got {stream!r}")
    return stream


def image_stream_latents(image_latent: torch.Tensor, stream: str, num_frames: int) -> torch.Tensor:
    """The clean input of the image branch for ``stream``: (B, C, h, w) as it is ("one"), or
    repeated over ``num_frames`` frames, (B, C, F, h, w) ("official"); noise each copy with its own
    draw of the returned shape."""
    check_image_stream("image_stream", stream)
    if not isinstance(image_latent, torch.Tensor) or image_latent.dim() != 4:
        got = tuple(image_latent.shape) if isinstance(image_latent, torch.Tensor) else type(image_latent).__name__
        raise ValueError(f"image_latent: expected a (B, C, h, w) tensor, got {got}")
    if stream == "one":
        return image_latent
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames: expected an int >= 1, got {num_frames!r}")
    return image_latent[:, :, None].repeat(1, 1, num_frames, 1, 1)


def official_prompt(prompt: str, subject_word: str) -> str:
    """The official sample script's prompt: lower-cased, every occurrence of the subject word
    (as a substring) replaced by the placeholder ``sdksd``."""
    if not isinstance(prompt, str) or not isinstance(subject_word, str) or not subject_word.strip():
        raise TypeError("prompt, subject_word: expected a str and a non-empty str")
    low, word = prompt.lower(), subject_word.lower()
    if word not in low:
        raise ValueError(f"subject_word: {subject_word!r} does not occur in prompt {prompt!r}")
    return low.replace(word, OFFICIAL_PLACEHOLDER)


def official_scheduler(num_inference_steps: int = 250):
    """The official sampler as a diffusers scheduler: ADM linear betas 1e-4..0.02 over 1000 steps,
    DDPM with the "fixed_large" variance, no clipping, ``num_inference_steps`` respaced steps
    (linspace spacing gives the official ``space_timesteps`` set). ``alphas_cumprod`` is
    recomputed in float64 as the official code keeps it (float32 drifts 3.8e-3 over 250 steps).
    """
    from diffusers import DDPMScheduler

    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          variance_type="fixed_large", clip_sample=False, timestep_spacing="linspace")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    sched.betas = betas
    sched.alphas = 1.0 - betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    sched.set_timesteps(num_inference_steps)
    return sched


def ddpm_step(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
              noise: Optional[torch.Tensor]) -> torch.Tensor:
    """One epsilon-prediction DDPM step of a diffusers ``DDPMScheduler`` ("fixed_large" or
    "fixed_small" variance, no clipping) with the variance noise given: what
    ``scheduler.step(...).prev_sample`` computes, with ``noise`` instead of its own draw (the
    official loop draws it with ``torch.randn_like``; the parity check replays those draws).

    Args:
        model_output: (B, C, F, H, W) predicted noise; sample: x_t, same shape.
        timestep: the current (training-scale) timestep, one of ``scheduler.timesteps``.
        noise: standard normal tensor shaped like ``sample``; unused (may be None) at t = 0.
    Returns:
        x_{t-1}, dtype of ``sample``.
    """
    t = int(timestep)
    prev_t = int(scheduler.previous_timestep(t))
    acp = scheduler.alphas_cumprod
    a_t = acp[t]
    a_prev = acp[prev_t] if prev_t >= 0 else torch.tensor(1.0, dtype=acp.dtype)
    beta_t = 1 - a_t / a_prev
    x0 = (sample - (1 - a_t) ** 0.5 * model_output) / a_t ** 0.5
    mean = (a_prev ** 0.5 * beta_t / (1 - a_t)) * x0 + ((1 - beta_t) ** 0.5 * (1 - a_prev) / (1 - a_t)) * sample
    if t == 0:
        return mean.to(sample.dtype)
    if noise is None or noise.shape != sample.shape:
        raise ValueError(f"noise: expected a tensor of shape {tuple(sample.shape)} for t={t}")
    var = beta_t if scheduler.config.variance_type == "fixed_large" else (1 - a_prev) / (1 - a_t) * beta_t
    return (mean + var ** 0.5 * noise).to(sample.dtype)


def official_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                      guided_channels: Optional[int] = 3) -> torch.Tensor:
    """Classifier-free guidance as the official code applies it: on latent channels
    [0, guided_channels) only; the other channels take the conditional output.
    cond, uncond: (B, C, F, H, W). guided_channels None guides every channel."""
    if cond.shape != uncond.shape:
        raise ValueError(f"uncond: expected shape {tuple(cond.shape)}, got {tuple(uncond.shape)}")
    k = cond.shape[1] if guided_channels is None else int(guided_channels)
    if not 0 <= k <= cond.shape[1]:
        raise ValueError(f"guided_channels: expected 0..{cond.shape[1]} or None, got {guided_channels!r}")
    guided = uncond[:, :k] + guidance_scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


def official_denoise(backbone, scheduler, latents: torch.Tensor, text: torch.Tensor, null_text: torch.Tensor,
                     image_latent: Optional[torch.Tensor], *, guidance_scale: float = 4.0,
                     guided_channels: Optional[int] = 3, image_frames: int = 0,
                     generator: Optional[torch.Generator] = None, randn=None, progress=None) -> torch.Tensor:
    """The official sampling loop on latents (ADM ``p_sample_loop`` with its CFG function).

    At every step t: the image latent gets a fresh noise draw at the same t; the conditional pass
    has the prompt and the image branch (null text), the unconditional pass the null text and no
    image; guidance on ``guided_channels`` channels (:func:`official_guidance`); a DDPM step
    (:func:`ddpm_step`) with the scheduler's "fixed_large" variance.

    Args:
        backbone: a :class:`vb.VideoBoothUNet` (or anything with its call).
        scheduler: :func:`official_scheduler` (timesteps already set).
        latents: (B, C, F, h, w) initial noise x_T.
        text: (B, L, D) prompt embedding with the subject injected; null_text: (1 or B, L, D).
        image_latent: (B, C, h, w) the image prompt's scaled VAE latent, or None (no image).
        image_frames: 0: one image-branch frame per sample (ours; noise (B, C, h, w)); F > 0: the
            official structure, F copies each with its own noise (B, C, F, h, w), F times the
            image-branch work (the official code uses F = num_frames).
        generator: for the noise draws (image noise first, then the step noise, per step).
        randn: optional callable ``shape -> tensor`` replacing the generator's draws, in that
            order (the parity check replays the official draws through it).
        progress: optional callable run after every step.
    Returns:
        (B, C, F, h, w) denoised latents x_0.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if randn is None:
        def randn(shape):
            return randn_tensor(shape, generator=generator, device=latents.device, dtype=latents.dtype)
    b = latents.shape[0]
    lat = None  # the image branch's clean latents: (B, C, h, w), or F copies (B, C, F, h, w)
    if image_latent is not None:
        lat = (image_latent if image_frames == 0
               else image_stream_latents(image_latent, "official", int(image_frames)))
    for t in scheduler.timesteps:
        tb = t.reshape(1).repeat(b).to(latents.device)
        img_t = None
        if lat is not None:  # fresh noise at every step; add_noise broadcasts (B,) over the rest
            img_t = scheduler.add_noise(lat, randn(tuple(lat.shape)).to(lat.dtype), tb)
        cond = backbone(latents, tb, text, image_latents=img_t, null_encoder_hidden_states=null_text)
        uncond = backbone(latents, tb, null_text.expand(b, -1, -1))
        eps = official_guidance(cond, uncond, guidance_scale, guided_channels)
        step_noise = randn(tuple(latents.shape)) if int(t) > 0 else None
        latents = ddpm_step(scheduler, eps, t, latents, step_noise)
        if progress is not None:
            progress()
    return latents
