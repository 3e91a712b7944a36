"""The released VideoBooth model (Vchitect/VideoBooth @ d10e06f), one module per concern:

- :mod:`vb.official.convert`: the two official weight files -> ``(VideoBoothUNet, VideoBoothMapper)``
  (:func:`vb.load_official`), key tables, the official U-Net config.
- :mod:`vb.official.sampler`: the official sampling loop, scheduler, guidance and prompt rewriting
  (:meth:`vb.VideoBoothPipeline.official_sample` runs it).
- :mod:`vb.official.layers`: the layers only the official preset has (clip-level GroupNorm,
  watermark sub-U-Net).
- ``python -m vb.official sample ...`` (:mod:`vb.official.__main__`): the official sample script's job.

Parity with the official code itself is a tool beside the project, ``tools/official_parity.py``.
This package's ``__init__`` imports only what needs no model (the layers and the sampler), so
that :mod:`vb.unet` can use the layers while :mod:`vb.official.convert` builds a ``VideoBoothUNet``.
"""
from .layers import ClipGroupNorm, WatermarkModule
from .sampler import (IMAGE_STREAMS, OFFICIAL_DEFAULTS, OFFICIAL_NULL_PROMPT, OFFICIAL_PLACEHOLDER, check_image_stream,
                      ddpm_step, image_stream_latents, official_denoise, official_guidance, official_prompt,
                      official_scheduler)

__all__ = ["ClipGroupNorm", "IMAGE_STREAMS", "OFFICIAL_DEFAULTS", "OFFICIAL_NULL_PROMPT", "OFFICIAL_PLACEHOLDER", "WatermarkModule",
           "check_image_stream", "ddpm_step", "image_stream_latents", "official_denoise", "official_guidance", "official_prompt", "official_scheduler"]
