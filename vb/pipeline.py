"""``VideoBoothPipeline``: text + image prompt -> video (DESIGN.md section 1).

Per sample: the image prompt goes through the CLIP image encoder and the mapper (coarse path:
its tokens replace the subject word in the prompt) and through the VAE (fine path: its latent,
noised to each step's timestep, runs once through the backbone's image branch). Classifier-free
guidance contrasts that with an unconditional pass: null prompt and no injection at all (the
paper's), or null prompt with a grey image prompt (``uncond_image="grey"``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .adapter import load_adapter, save_adapter
from .backbone import check_tensor, expand_batch, own_aligned_storage
from .coarse import VideoBoothImageEncoder, VideoBoothMapper, _as_list, encode_prompt, official_preprocess
from .dit import VideoDiT
from .latents import encode_latents
from .official.convert import load_official
from .unet import VideoBoothUNet
from .official.sampler import (OFFICIAL_DEFAULTS, OFFICIAL_NULL_PROMPT, OFFICIAL_PLACEHOLDER, official_denoise,
                               official_prompt, official_scheduler)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
UNCOND_IMAGES = ("none", "grey")

_SHAPE_DOC = {3: "(B, L, D_text)", 2: "(B, D_text)"}


def _check_embeds(name: str, t, ndim: int) -> None:
    check_tensor(name, t, ndim, _SHAPE_DOC[ndim])


def _opt(t, name: str, ndim: int, batch: int, device):
    if t is None:
        return None
    _check_embeds(name, t, ndim)
    return expand_batch(name, t.to(device), batch)


def _tensor_inputs(callback, names) -> list:
    """The tensors a step-end callback gets: a diffusers ``PipelineCallback`` /
    ``MultiPipelineCallbacks`` names its own (``tensor_inputs``, as diffusers' pipelines read
    it), a plain callable gets ``names`` (``callback_on_step_end_tensor_inputs``)."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        try:
            own = callback.tensor_inputs
        except NotImplementedError as e:
            raise TypeError(f"callback_on_step_end: {type(callback).__name__} does not set tensor_inputs "
                            "(a PipelineCallback must name the tensors it reads)") from e
        return list(own)
    return list(names)


def _from_callback(out: dict, name: str, current: torch.Tensor) -> torch.Tensor:
    """A tensor a step-end callback returned under ``name`` (checked: same shape as the one it
    replaces), else ``current``. diffusers' SD callbacks cut a CFG-doubled batch to its last
    row; here every pass has its own (B, ...) tensor, so a cut batch is refused, not broadcast."""
    if not isinstance(out, dict):
        raise TypeError(f"callback_on_step_end: expected it to return a dict (or None), got {type(out).__name__}")
    if name not in out:
        return current
    new = out.pop(name)
    if not isinstance(new, torch.Tensor) or new.shape != current.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise ValueError(f"callback_on_step_end: returned {name!r} must keep its shape {tuple(current.shape)}, got {got}")
    return new.to(device=current.device, dtype=current.dtype)


def _repeat_each(n: int):
    """x (B, ...) -> (B * n, ...), each row n times in a row (None stays None)."""
    return lambda x: None if x is None else x.repeat_interleave(n, dim=0)


@dataclass
class VideoBoothPipelineOutput(BaseOutput):
    """frames: ``"pil"``: B lists of F PIL images; ``"np"``: (B, F, H, W, 3) float32 in [0, 1];
    ``"pt"``: (B, F, 3, H, W) in [0, 1]; ``"latent"``: (B, C, F, h, w) latents.
    ``frames[0]`` goes to ``diffusers.utils.export_to_gif`` / ``export_to_video``."""

    frames: Union[List[List[PIL.Image.Image]], np.ndarray, torch.Tensor]


def image_to_tensor(image, height: int, width: int) -> torch.Tensor:
    """A PIL image, an (H, W, 3) uint8/float array, or a (3, H, W) float tensor in [0, 1] ->
    (3, height, width) float32 in [0, 1]. Transparent pixels become white (subject on white)."""
    if isinstance(image, PIL.Image.Image):
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            bg = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = PIL.Image.alpha_composite(bg, rgba)
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image_prompt: expected an (H, W, 3) array, got shape {image.shape}")
        arr = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image_prompt: expected a PIL image, a numpy array or a torch.Tensor, "
                        f"got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image_prompt: expected a (3, H, W) tensor (or (B, 3, H, W)), got {tuple(image.shape)}")
    image = image.float()
    if image.min() < -1e-3 or image.max() > 1 + 1e-3:
        raise ValueError(f"image_prompt: expected values in [0, 1], got [{image.min().item():.3g}, "
                         f"{image.max().item():.3g}]")
    image = image.clamp(0, 1)
    if tuple(image.shape[1:]) != (height, width):
        image = F.interpolate(image[None], size=(height, width), mode="bicubic", align_corners=False,
                              antialias=True)[0].clamp(0, 1)
    return image


class VideoBoothPipeline(DiffusionPipeline):
    """Image-prompted text-to-video generation (VideoBooth, Jiang et al., CVPR 2024).

    Args:
        vae: ``diffusers.AutoencoderKL``.
        text_encoder: ``transformers.CLIPTextModel``.
        tokenizer: its CLIP tokenizer (transformers, or open_clip's with the same vocabulary).
        image_encoder: :class:`vb.VideoBoothImageEncoder` (open_clip image tower).
        mapper: :class:`vb.VideoBoothMapper`.
        backbone: :class:`vb.VideoBoothUNet` or :class:`vb.VideoDiT`.
        scheduler: any diffusers noise scheduler (DDIM, DDPM, Euler, ...).
    """

    # The order __call__ runs them in: image prompt -> CLIP -> mapper (their tokens go into the
    # prompt) -> text encoder -> VAE (the image prompt's latent) -> backbone (then the VAE decodes).
    model_cpu_offload_seq = "image_encoder->mapper->text_encoder->vae->backbone"
    # What a step-end callback may read and replace: the latents, and the conditional and
    # unconditional passes' text embeddings, each (B, L, D_text) at the call's batch.
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _guidance_scale, _num_timesteps, _interrupt = 1.0, 0, False  # until a call sets them

    # Any model may be left out (None), as diffusers' pipelines allow for their optional
    # components: the encoders alone encode prompts and image prompts (no backbone, no VAE), a
    # pipeline without the encoders denoises given embeddings. A call that needs a missing one
    # says which (``_require``). Saved as null in model_index.json, loaded back as None.
    _optional_components = ["vae", "text_encoder", "tokenizer", "image_encoder", "mapper", "backbone"]

    def __init__(self, vae: Optional[AutoencoderKL], text_encoder, tokenizer,
                 image_encoder: Optional[VideoBoothImageEncoder], mapper: Optional[VideoBoothMapper],
                 backbone: Union[VideoBoothUNet, VideoDiT, None], scheduler):
        # (the model types are annotated because diffusers' from_pipe carries a ModelMixin
        # component over to the new pipeline only when its type is the annotated one)
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, image_encoder=image_encoder,
                              mapper=mapper, backbone=backbone, scheduler=scheduler)
        # without a VAE, SD's factor (diffusers' pipelines' default)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    def _require(self, *names: str, why: str) -> None:
        """Raise a ValueError naming the first of ``names`` this pipeline was built without."""
        for name in names:
            if getattr(self, name, None) is None:
                raise ValueError(f"{name}: this pipeline has no {name} (built with {name}=None); {why} needs it "
                                 f"(add it with VideoBoothPipeline.from_pipe(pipe, {name}=...))")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "VideoBoothPipeline":
        """diffusers' ``DiffusionPipeline.from_pretrained`` (every component, the backbone and the
        image encoder included, comes back as saved by :meth:`save_pretrained`), then every
        weight gets its own freshly allocated storage.

        Why the copy: diffusers' low-memory loading leaves weights as views into one loaded
        buffer, at offsets that are not 64-byte aligned; CPU matmul kernels then take another
        path and results differ in the last bits (8.6e-6 on a tiny pipeline's latents). Owned,
        aligned weights make a saved and reloaded pipeline generate the same bits.
        """
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                own_aligned_storage(module)
        return pipe

    # ---- what a step-end callback reads and may change (diffusers' pipelines' properties) ------
    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance weight of the running call; a step-end callback may set
        ``pipe._guidance_scale`` (diffusers' ``SDCFGCutoffCallback`` sets 0) and the next steps use it."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether this step runs the unconditional pass too (``guidance_scale > 1``)."""
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        """The number of denoising steps of the running call (the scheduler's timesteps)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a step-end callback to stop after that step."""
        return self._interrupt

    # ---- diffusers' switches ---------------------------------------------------------------------
    def set_image_prompt_scale(self, scale: float) -> None:
        """Strength of the image prompt's fine path (diffusers' ``set_ip_adapter_scale``):
        1 = the trained model, 0 = no fine path (the coarse path's subject tokens stay). See
        ``backbone.set_image_scale``."""
        self.backbone.set_image_scale(scale)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """What ``enable_/disable_xformers_memory_efficient_attention`` call. diffusers' version
        sets a new processor on every ``Attention``, which would strip the VideoBooth processors;
        here the backbone keeps them (its cross-frame attention runs on ``attn_backend``:
        ``backbone.set_attn_backend("triton")`` is the memory-efficient choice) and the switch
        goes to the processors they fall back to outside a VideoBooth pass and to every other
        attention (temporal layers, motion modules, the VAE). Without xformers (or a GPU),
        enabling raises diffusers' error."""
        def recurse(module):
            if module is self.backbone:
                module.set_use_memory_efficient_attention_xformers(valid, attention_op)
                return
            if hasattr(module, "set_use_memory_efficient_attention_xformers"):
                module.set_use_memory_efficient_attention_xformers(valid, attention_op)
            for child in module.children():
                recurse(child)

        for module in self.components.values():
            if isinstance(module, torch.nn.Module):
                recurse(module)

    def enable_attention_slicing(self, slice_size="auto") -> None:
        """Refused: diffusers' sliced processor would replace the VideoBooth processors (and
        with them the fine path). The cross-frame attention's memory is the backend's:
        ``backbone.set_attn_backend("triton")`` never materialises the attention scores
        (``"sdpa"``/``"flex"`` are memory-efficient too); ``pipe.vae.enable_slicing()`` bounds the VAE.
        ``disable_attention_slicing()`` (slice_size None) is accepted and changes nothing."""
        if slice_size is None:
            return
        raise NotImplementedError(
            "enable_attention_slicing: VideoBoothPipeline does not slice attention (a sliced processor would "
            "replace the VideoBooth processors); choose a memory-efficient backend instead: "
            "pipe.backbone.set_attn_backend('triton') (or 'sdpa'/'flex'), and pipe.vae.enable_slicing() for the VAE")

    def enable_sequential_cpu_offload(self, gpu_id=None, device=None) -> None:
        """Refused: accelerate's per-module offload hooks move only what a module's own forward
        receives, and two components read weights outside that (the image encoder normalises
        with its own buffers before its tower's hooks run; the mapper's hooked ``fc`` layers get
        meta tensors), so a call would fail halfway (found on CPU with ``device="cpu"``). Use
        ``enable_model_cpu_offload()`` (whole components, in ``model_cpu_offload_seq``) or
        diffusers' group offloading on the backbone (``pipe.backbone.enable_group_offload(...)``)."""
        raise NotImplementedError(
            "enable_sequential_cpu_offload: not supported by VideoBoothPipeline (the image encoder and the mapper "
            "read weights outside accelerate's per-module hooks); use enable_model_cpu_offload(), or group "
            "offloading: pipe.backbone.enable_group_offload(onload_device=..., offload_type='block_level', "
            "num_blocks_per_group=1)")

    # ---- adapter weights ------------------------------------------------------------------------
    def save_adapter(self, save_directory: str) -> str:
        """Save the mapper and every new backbone projection (safetensors, atomic write)."""
        return save_adapter(save_directory, self.mapper, self.backbone)

    def load_adapter(self, pretrained_path: str, strict: bool = True) -> "VideoBoothPipeline":
        """Load weights saved by :meth:`save_adapter` (a directory or the .safetensors file)."""
        load_adapter(pretrained_path, self.mapper, self.backbone, strict=strict)
        return self

    # ---- pieces ---------------------------------------------------------------------------------
    def default_size(self) -> int:
        size = getattr(self.backbone, "sample_size", None) or 32
        size = size[0] if isinstance(size, (tuple, list)) else size
        return int(size) * self.vae_scale_factor

    def prepare_image(self, image_prompt, batch: int, height: int, width: int) -> torch.Tensor:
        """Image prompt(s) -> (B, 3, height, width) in [0, 1] on the pipeline's device."""
        if isinstance(image_prompt, torch.Tensor) and image_prompt.dim() == 4:
            images = [image_to_tensor(x, height, width) for x in image_prompt]
        elif isinstance(image_prompt, (list, tuple)):
            images = [image_to_tensor(x, height, width) for x in image_prompt]
        else:
            images = [image_to_tensor(image_prompt, height, width)]
        if len(images) == 1 and batch > 1:
            images = images * batch
        if len(images) != batch:
            raise ValueError(f"image_prompt: expected 1 or {batch} images (one per prompt), got {len(images)}")
        return torch.stack(images).to(self._execution_device)

    def encode_image(self, images: torch.Tensor):
        """(B, 3, H, W) in [0, 1] -> (subject tokens (B, K, D_text), image embeds (B, E))."""
        self._require("image_encoder", "mapper", why="encoding the image prompt")
        enc = self.image_encoder(images)
        return self.mapper(enc.layer_tokens), enc.image_embeds

    def encode_vae(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, H/s, W/s) scaled latents (the distribution's mode)."""
        self._require("vae", why="the image prompt's latent (fine path)")
        return encode_latents(self.vae, images * 2 - 1, sample=False).to(self.vae.dtype)

    def decode_latents(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """(B, C, F, h, w) -> (B, F, 3, H, W) in [0, 1], decoded frame by frame in chunks."""
        self._require("vae", why="decoding the latents (output_type 'latent' does not)")
        b, c, f, h, w = latents.shape
        x = latents.transpose(1, 2).reshape(b * f, c, h, w)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        x = x / self.vae.config.scaling_factor + shift
        frames = torch.cat([self.vae.decode(x[i:i + chunk].to(self.vae.dtype)).sample
                            for i in range(0, x.shape[0], chunk)])
        frames = (frames.float() / 2 + 0.5).clamp(0, 1)
        return frames.view(b, f, *frames.shape[1:])

    def check_inputs(self, prompt, subject_word, num_frames, height, width, num_inference_steps, guidance_scale,
                     uncond_image="none", output_type="pil", *, negative_prompt=None, num_videos_per_prompt=1,
                     eta=0.0, prompt_embeds=None, pooled_prompt_embeds=None, negative_prompt_embeds=None,
                     negative_pooled_prompt_embeds=None, null_prompt_embeds=None, null_pooled_prompt_embeds=None,
                     callback_on_step_end=None,
                     callback_on_step_end_tensor_inputs=("latents",), noise_image_latents=True) -> None:
        """Every argument of :meth:`__call__` that can be checked before any work; a bad one
        raises an error that names it and what was expected."""
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
            raise ValueError(f"num_frames: expected an int >= 1, got {num_frames!r}")
        mult = self.vae_scale_factor * getattr(self.backbone, "latent_multiple", 1)
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % mult:
                raise ValueError(f"{name}: expected a positive multiple of {mult}, got {v!r}")
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
            raise TypeError(f"guidance_scale: expected a float, got {type(guidance_scale).__name__}")
        if uncond_image not in UNCOND_IMAGES:
            raise ValueError(f"uncond_image: expected one of {UNCOND_IMAGES}, got {uncond_image!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        n = num_videos_per_prompt
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_videos_per_prompt: expected an int >= 1, got {n!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"eta: expected a float >= 0, got {eta!r}")
        if not isinstance(noise_image_latents, bool):
            raise TypeError(f"noise_image_latents: expected a bool, got {type(noise_image_latents).__name__}")
        tensor_inputs = _tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs: expected names from {self._callback_tensor_inputs}, "
                             f"got {bad}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"callback_on_step_end: expected a callable, got {type(callback_on_step_end).__name__}")
        if prompt_embeds is None:
            prompts = _as_list("prompt", prompt)
            _as_list("subject_word", subject_word, len(prompts))
        else:
            _check_embeds("prompt_embeds", prompt_embeds, 3)
            if prompt is not None:
                raise ValueError("prompt: give either prompt or prompt_embeds, not both")
            if self._needs_pooled and pooled_prompt_embeds is None:
                raise ValueError("pooled_prompt_embeds: the DiT backbone needs it with prompt_embeds")
        if null_prompt_embeds is not None:
            _check_embeds("null_prompt_embeds", null_prompt_embeds, 3)
            if self._needs_pooled and null_pooled_prompt_embeds is None:
                raise ValueError("null_pooled_prompt_embeds: the DiT backbone needs it with null_prompt_embeds")
        if negative_prompt_embeds is not None:
            _check_embeds("negative_prompt_embeds", negative_prompt_embeds, 3)
            if self._needs_pooled and negative_pooled_prompt_embeds is None:
                raise ValueError("negative_pooled_prompt_embeds: the DiT backbone needs it with negative_prompt_embeds")

    @property
    def _needs_pooled(self) -> bool:
        """The DiT reads a pooled text embedding; the U-Net does not."""
        return getattr(self.backbone, "install_config", {}).get("backbone") == "dit"

    def encode_prompt(self, prompt, subject_word, subject_tokens: Optional[torch.Tensor], *, negative_prompt=None,
                      prompt_embeds=None, pooled_prompt_embeds=None, negative_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None, null_prompt_embeds=None, null_pooled_prompt_embeds=None):
        """The coarse path and the text of every pass, for B prompts.

        The image prompt's ``subject_tokens`` (B, K, D_text) replace each prompt's subject word
        (unless ``prompt_embeds`` are given: then the coarse path is the caller's). Returns
        ``(text, pooled, negative_text, negative_pooled, null_text, null_pooled)``, each (B, ...):
        the conditional pass's text, the unconditional pass's (the negative prompt, its
        embeddings, or the empty prompt) and the image branch's (always the empty prompt, or
        ``null_prompt_embeds`` (1 or B, L, D_text), e.g. this method's earlier output). With
        every embedding given, no tokenizer or text encoder is needed."""
        device = self._execution_device
        if prompt_embeds is None or null_prompt_embeds is None or (
                negative_prompt_embeds is None and negative_prompt is not None):
            self._require("tokenizer", "text_encoder", why="encoding a prompt (pass prompt_embeds, "
                          "negative_prompt_embeds and null_prompt_embeds to do without)")
        if prompt_embeds is None:
            prompts = _as_list("prompt", prompt)
            words = _as_list("subject_word", subject_word, len(prompts))
            b = len(prompts)
            text, pooled = encode_prompt(self.text_encoder, self.tokenizer, prompts, words, subject_tokens)
        else:
            b = prompt_embeds.shape[0]
            text, pooled = prompt_embeds.to(device), _opt(pooled_prompt_embeds, "pooled_prompt_embeds", 2, b, device)
        if null_prompt_embeds is None:
            null_text, null_pooled = encode_prompt(self.text_encoder, self.tokenizer, [""])
        else:
            null_text = expand_batch("null_prompt_embeds", null_prompt_embeds.to(device), b)
            null_pooled = _opt(null_pooled_prompt_embeds, "null_pooled_prompt_embeds", 2, b, device)
            if null_pooled is None:  # (only the DiT reads it; check_inputs asks for it there)
                null_pooled = torch.zeros(b, null_text.shape[-1], device=device, dtype=null_text.dtype)
        if negative_prompt_embeds is not None:
            neg_text = expand_batch("negative_prompt_embeds", negative_prompt_embeds.to(device), b)
            neg_pooled = _opt(negative_pooled_prompt_embeds, "negative_pooled_prompt_embeds", 2, b, device)
        elif negative_prompt is not None:
            negs = _as_list("negative_prompt", negative_prompt)
            if len(negs) not in (1, b):
                raise ValueError(f"negative_prompt: expected 1 or {b} prompts (one per prompt), got {len(negs)}")
            neg_text, neg_pooled = encode_prompt(self.text_encoder, self.tokenizer, negs)
            neg_text, neg_pooled = expand_batch("negative_prompt", neg_text, b), expand_batch("negative_prompt", neg_pooled, b)
        else:
            neg_text, neg_pooled = null_text.expand(b, -1, -1), null_pooled.expand(b, -1)
        return text, pooled, neg_text, neg_pooled, null_text.expand(b, -1, -1), null_pooled.expand(b, -1)

    def prepare_latents(self, batch: int, num_frames: int, height: int, width: int, dtype, generator,
                        latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Initial noise (B, C, F, h, w), drawn from ``generator`` or the given ``latents``
        (checked), scaled by the scheduler's ``init_noise_sigma`` (call after ``set_timesteps``)."""
        self._require("backbone", why="the latents' shape")
        shape = (batch, self.backbone.in_channels, num_frames, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype)

    def _step_kwargs(self, generator, eta: float) -> dict:
        """The scheduler's own ``step`` keywords among generator and eta (DDIM takes both)."""
        params = inspect.signature(self.scheduler.step).parameters
        return {k: v for k, v in (("generator", generator), ("eta", float(eta))) if k in params}

    # ---- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str], None] = None, subject_word: Union[str, List[str], None] = None,
                 image_prompt=None, num_frames: int = 16, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, uncond_image: str = "none",
                 generator: Optional[torch.Generator] = None, latents: Optional[torch.Tensor] = None,
                 output_type: str = "pil", return_dict: bool = True, *,
                 negative_prompt: Union[str, List[str], None] = None, num_videos_per_prompt: int = 1,
                 eta: float = 0.0, prompt_embeds: Optional[torch.Tensor] = None,
                 pooled_prompt_embeds: Optional[torch.Tensor] = None,
                 negative_prompt_embeds: Optional[torch.Tensor] = None,
                 negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
                 null_prompt_embeds: Optional[torch.Tensor] = None,
                 null_pooled_prompt_embeds: Optional[torch.Tensor] = None,
                 image_prompt_scale: Optional[float] = None, noise_image_latents: bool = True,
                 image_stream: Optional[str] = None,
                 callback_on_step_end: Optional[Callable] = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)):
        """Generate B * ``num_videos_per_prompt`` videos of ``num_frames`` frames.

        Args:
            prompt: B prompts, each containing its ``subject_word`` (or ``prompt_embeds``).
            subject_word: the word the image prompt replaces (one, or one per prompt).
            image_prompt: the subject segmented on white: a PIL image, an (H, W, 3) array, a
                (3, H, W) or (B, 3, H, W) tensor in [0, 1], or a list of those (one per prompt).
            num_frames: F.
            height, width: pixels; default the backbone's sample size times the VAE factor.
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance weight (<= 1 disables guidance).
            uncond_image: ``"none"`` (unconditional pass without any injection, as the paper)
                or ``"grey"`` (unconditional pass with a grey image prompt).
            generator: torch.Generator for the initial and image-branch noise.
            latents: optional (B * num_videos_per_prompt, C, F, h, w) initial noise.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            negative_prompt: text of the unconditional pass (one, or one per prompt) instead of
                the empty prompt; the image branch keeps the empty prompt (the paper's).
            num_videos_per_prompt: videos per prompt (each with its own noise).
            eta: DDIM's eta (passed to schedulers whose ``step`` takes it, ignored by others).
            prompt_embeds: (B, L, D_text) text-encoder output to use instead of encoding
                ``prompt`` (the coarse path is then the caller's: nothing is injected into it);
                the DiT also needs ``pooled_prompt_embeds`` (B, D_text).
            negative_prompt_embeds, negative_pooled_prompt_embeds: the same for the
                unconditional pass.
            null_prompt_embeds, null_pooled_prompt_embeds: the image branch's empty prompt
                ((1 or B, L, D_text), (1 or B, D_text)), as :meth:`encode_prompt` returns it:
                with all three embeddings given, the call needs no tokenizer or text encoder
                (and with a U-Net no image encoder either: diffusers' encode, free the
                encoders, then denoise).
            image_prompt_scale: strength of the image prompt's fine path for this call (see
                :meth:`set_image_prompt_scale`); None keeps the backbone's.
            noise_image_latents: the fine path's image latent noised to every step's timestep
                (True, the paper's, as trained); False feeds the clean latent at every step
                (a diagnostic, for a model trained so: ``model.fine_latent: clean``).
            image_stream: what the image branch is fed: ``"one"`` (one copy of the image latent,
                one noise draw for the whole loop) or ``"official"`` (``num_frames`` copies, each
                with its own draw, fresh at every step, through every layer: the official code's
                stream, F times the image-branch work). None: the backbone's saved
                ``image_stream`` (``"official"`` on the official preset). Sample with the stream
                the model was trained with (``model.image_stream``): they are different models.
            callback_on_step_end: ``f(pipe, step, timestep, callback_kwargs) -> dict`` called
                after every step with the tensors named in ``callback_on_step_end_tensor_inputs``
                (any of ``"latents"``, ``"prompt_embeds"``, ``"negative_prompt_embeds"``; each
                pass's own (B, ...) tensor); a returned one replaces it (same shape). A diffusers
                ``PipelineCallback`` / ``MultiPipelineCallbacks`` gets the tensors its
                ``tensor_inputs`` name. It may set ``pipe._guidance_scale`` (the next steps
                guide with it; 1 or less: the conditional pass alone, as diffusers'
                ``SDCFGCutoffCallback``) and ``pipe._interrupt = True`` (stop after this step);
                it reads ``pipe.num_timesteps``, ``pipe.guidance_scale``,
                ``pipe.do_classifier_free_guidance``.

        Returns:
            :class:`VideoBoothPipelineOutput` (or a tuple ``(frames,)`` when not ``return_dict``).
        """
        height = self.default_size() if height is None else height
        width = self.default_size() if width is None else width
        self.check_inputs(prompt, subject_word, num_frames, height, width, num_inference_steps, guidance_scale,
                          uncond_image, output_type, negative_prompt=negative_prompt,
                          num_videos_per_prompt=num_videos_per_prompt, eta=eta, prompt_embeds=prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          null_prompt_embeds=null_prompt_embeds, null_pooled_prompt_embeds=null_pooled_prompt_embeds,
                          callback_on_step_end=callback_on_step_end,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          noise_image_latents=noise_image_latents)
        tensor_inputs = _tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._require("backbone", "scheduler", why="generating")
        # the backbone's compute dtype (ModelMixin.dtype: under diffusers' layerwise casting the
        # weights are stored in e.g. float8 and compute in the hook's compute dtype)
        device, dtype = self._execution_device, self.backbone.dtype
        # The call's guidance weight lives on the pipeline (diffusers' convention): a step-end
        # callback may change it, and whether a step runs the unconditional pass follows it.
        self._guidance_scale = float(guidance_scale)
        # the unconditional pass gets a grey image prompt (prepared whatever the weight is now:
        # a callback may switch guidance on mid-loop)
        grey = uncond_image == "grey"
        self._interrupt = False

        # 1. Coarse path: the image prompt's tokens replace the subject word; attn2 reads the text.
        b = len(_as_list("prompt", prompt)) if prompt_embeds is None else prompt_embeds.shape[0]
        images = self.prepare_image(image_prompt, b, height, width)
        # CLIP runs where its output is read: subject tokens for a prompt to encode, the pooled
        # image embedding for the DiT (so given embeddings and a U-Net need no image encoder)
        reads_clip = prompt_embeds is None or self._needs_pooled
        subject_tokens, image_embeds = self.encode_image(images) if reads_clip else (None, None)
        text, pooled, neg_text, neg_pooled, null_text, null_pooled = self.encode_prompt(
            prompt, subject_word, subject_tokens, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, null_prompt_embeds=null_prompt_embeds,
            null_pooled_prompt_embeds=null_pooled_prompt_embeds)
        # 2. Fine path: the image prompt's latent, noised anew at every step with one fixed draw.
        image_latents = self.encode_vae(images)
        if grey:
            grey_embeds = self.encode_image(torch.full_like(images, 0.5))[1] if reads_clip else None
            grey_latents = self.encode_vae(torch.full_like(images, 0.5))
        if num_videos_per_prompt > 1:  # every per-prompt tensor, prompt-major (prompt 0's videos first)
            rep = _repeat_each(num_videos_per_prompt)
            text, pooled, image_embeds, image_latents = rep(text), rep(pooled), rep(image_embeds), rep(image_latents)
            neg_text, neg_pooled, null_text, null_pooled = rep(neg_text), rep(neg_pooled), rep(null_text), rep(null_pooled)
            if grey:
                grey_embeds, grey_latents = rep(grey_embeds), rep(grey_latents)
            b = b * num_videos_per_prompt

        # 3. Noise: the video's, then the image latent's (per stream, below).
        latents = self.prepare_latents(b, num_frames, height, width, dtype, generator, latents)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        stream = self._image_stream(image_stream)
        # "one": one draw for every step; "official": a fresh (B, C, F, h, w) draw at every step
        # (drawn before the step's own noise, as the official loop), shared by the grey prompt
        image_noise = (randn_tensor(image_latents.shape, generator=generator, device=device, dtype=dtype)
                       if stream == "one" else None)
        fresh = {}
        step_kwargs = self._step_kwargs(generator, eta)

        def cast(*ts):
            return [None if t is None else t.to(dtype) for t in ts]

        def noised(lat, t, tb):
            lat = self._stream_latents(lat.to(dtype), stream, num_frames)
            if not noise_image_latents:
                return lat
            noise = image_noise
            if stream == "official":
                if fresh.get("t") is not t:
                    fresh.update(t=t, noise=randn_tensor(lat.shape, generator=generator, device=device, dtype=dtype))
                noise = fresh["noise"]
            return self.scheduler.scale_model_input(self.scheduler.add_noise(lat, noise, tb), t)

        # 4. Denoise, with the call's image-prompt strength (the backbone's own comes back after).
        prev_scale = getattr(self.backbone, "image_scale", 1.0)
        if image_prompt_scale is not None:
            self.backbone.set_image_scale(image_prompt_scale)
        try:
            timesteps = self.scheduler.timesteps
            self._num_timesteps = len(timesteps)
            with self.progress_bar(total=len(timesteps)) as progress:
                for i, t in enumerate(timesteps):
                    if self._interrupt:
                        break
                    x_in = self.scheduler.scale_model_input(latents, t)
                    tb = t.reshape(1).repeat(b).to(device)
                    cond_args = cast(text, pooled, image_embeds, noised(image_latents, t, tb), null_text, null_pooled)
                    w = self._guidance_scale
                    if not self.do_classifier_free_guidance:
                        pred = self._predict(x_in, t, *cond_args)
                    elif not grey:
                        pred_c = self._predict(x_in, t, *cond_args)
                        pred_u = self._predict(x_in, t, *cast(neg_text, neg_pooled, None, None, None, None))
                        pred = pred_u + w * (pred_c - pred_u)
                    else:
                        # One batched call: [uncond (negative prompt, grey image); cond].
                        uncond_args = cast(neg_text, neg_pooled, grey_embeds, noised(grey_latents, t, tb), null_text,
                                           null_pooled)
                        both = [None if u is None else torch.cat([u, c]) for u, c in zip(uncond_args, cond_args)]
                        pred_u, pred_c = self._predict(torch.cat([x_in, x_in]), t, *both).chunk(2)
                        pred = pred_u + w * (pred_c - pred_u)
                    if pred.shape[1] == 2 * latents.shape[1]:  # learned variance: keep the mean part
                        pred = pred[:, : latents.shape[1]]
                    latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample
                    if callback_on_step_end is not None:
                        avail = {"latents": latents, "prompt_embeds": text, "negative_prompt_embeds": neg_text}
                        out = callback_on_step_end(self, i, t, {k: avail[k] for k in tensor_inputs}) or {}
                        latents = _from_callback(out, "latents", latents)
                        text = _from_callback(out, "prompt_embeds", text)
                        neg_text = _from_callback(out, "negative_prompt_embeds", neg_text)
                    progress.update()
        finally:  # the backbone's own strength (and its config) as before the call
            if image_prompt_scale is not None:
                self.backbone.set_image_scale(prev_scale)

        return self._finish(latents, output_type, return_dict)

    def _finish(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Latents (B, C, F, h, w) to the requested output: ``"latent"`` as they are, else decoded
        to (B, F, 3, H, W) in [0, 1] (``"pt"``), (B, F, H, W, 3) arrays (``"np"``) or lists of PIL
        frames (``"pil"``); offload hooks released."""
        if output_type == "latent":
            frames = latents
        else:
            video = self.decode_latents(latents)  # (B, F, 3, H, W) in [0, 1]
            if output_type == "pt":
                frames = video
            else:
                arr = video.permute(0, 1, 3, 4, 2).cpu().float().numpy()
                if output_type == "np":
                    frames = arr
                else:
                    frames = [[PIL.Image.fromarray((f * 255).round().astype(np.uint8)) for f in vid] for vid in arr]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return VideoBoothPipelineOutput(frames=frames)

    # ---- the official VideoBooth sampling ---------------------------------------------------------
    @classmethod
    def from_official(cls, unet_state_dict, mapper_state_dict, *, vae, text_encoder, tokenizer, image_encoder=None,
                      unet_config=None, attn_backend: str = "auto") -> "VideoBoothPipeline":
        """A pipeline of the released VideoBooth weights (:func:`vb.load_official`): the official
        backbone and mapper, :func:`official_scheduler`, and the official image encoder
        (:meth:`vb.VideoBoothImageEncoder.official`; pass a transformers ``CLIPVisionModel`` or a
        ready :class:`vb.VideoBoothImageEncoder`, default open_clip ``ViT-L-14-quickgelu``).
        vae: ``stabilityai/sd-vae-ft-ema``; text_encoder / tokenizer: ``openai/clip-vit-large-patch14``.
        Generate with :meth:`official_sample`."""
        backbone, mapper = load_official(unet_state_dict, mapper_state_dict, unet_config, attn_backend=attn_backend)
        if not isinstance(image_encoder, VideoBoothImageEncoder):
            image_encoder = VideoBoothImageEncoder.official(image_encoder)
        return cls(vae, text_encoder, tokenizer, image_encoder, mapper, backbone, official_scheduler())

    def official_text(self, prompts, subject_words, subject_tokens: Optional[torch.Tensor] = None):
        """Prompt embeddings as the official code builds them: the subject word becomes the
        placeholder ``sdksd`` (:func:`official_prompt`), whose tokens the ``subject_tokens``
        (B, K, D_text) replace; without ``subject_tokens`` the placeholder prompt itself (the
        "before" embedding of the official text regulariser). Returns (B, L, D_text)."""
        prompts = _as_list("prompt", prompts)
        words = _as_list("subject_word", subject_words, len(prompts))
        placed = [official_prompt(p, w) for p, w in zip(prompts, words)]
        if subject_tokens is None:
            return encode_prompt(self.text_encoder, self.tokenizer, placed)[0]
        return encode_prompt(self.text_encoder, self.tokenizer, placed, [OFFICIAL_PLACEHOLDER] * len(placed),
                             subject_tokens)[0]

    @torch.no_grad()
    def official_sample(self, prompt: str, subject_word: str, image, mask=None, box=None, *,
                        num_frames: int = OFFICIAL_DEFAULTS["num_frames"],
                        num_inference_steps: int = OFFICIAL_DEFAULTS["num_inference_steps"],
                        guidance_scale: float = OFFICIAL_DEFAULTS["guidance_scale"],
                        image_frames: Optional[int] = None,
                        height: int = OFFICIAL_DEFAULTS["height"], generator: Optional[torch.Generator] = None, output_type: str = "pil",
                        return_dict: bool = True):
        """Generate one video the way the official sample script does (docs/official.md).

        Args:
            prompt, subject_word: e.g. ``"panda in the tiny pond"``, ``"panda"``.
            image, mask, box: the image prompt, its subject mask and box (:func:`vb.coarse.official_preprocess`).
            num_frames, num_inference_steps, guidance_scale: official defaults 16, 250, 4.0.
            height: video height = width in pixels (official 256: its preprocessing's VAE size).
            image_frames: None (default): the official structure, ``num_frames`` copies of the
                image latent, each with its own noise (what the official code computes); 0: one
                image-branch frame per step (the image branch costs 1/F of that; the sample moves
                away from the official one, docs/official.md).
            generator: for the initial noise, the VAE sample and every step's draws.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        self.check_inputs(prompt, subject_word, num_frames, height, height, num_inference_steps, guidance_scale,
                          output_type=output_type)
        self._require("backbone", "image_encoder", "mapper", "text_encoder", "tokenizer", "vae",
                      why="the official sampling")
        device = self._execution_device
        dtype = self.backbone.dtype
        image_frames = num_frames if image_frames is None else int(image_frames)
        clip_image, vae_image = official_preprocess(image, mask, box, vae_size=height)
        side = height // self.vae_scale_factor
        latents = randn_tensor((1, self.backbone.in_channels, num_frames, side, side), generator=generator,
                               device=device, dtype=dtype)
        tokens = self.mapper(self.image_encoder(clip_image[None].to(device)).layer_tokens)
        text = self.official_text([prompt], [subject_word], tokens)
        null = encode_prompt(self.text_encoder, self.tokenizer, [OFFICIAL_NULL_PROMPT])[0]
        x = vae_image[None].to(device=device, dtype=self.vae.dtype)
        image_latent = encode_latents(self.vae, x, generator)  # the posterior's sample, as the official code
        sched = official_scheduler(num_inference_steps)
        with self.progress_bar(total=num_inference_steps) as bar:
            latents = official_denoise(self.backbone, sched, latents, text.to(dtype), null.to(dtype),
                                       image_latent.to(dtype), guidance_scale=guidance_scale,
                                       image_frames=image_frames, generator=generator, progress=bar.update)
        return self._finish(latents, output_type, return_dict)

    def _image_stream(self, image_stream: Optional[str]) -> str:
        """A call's ``image_stream`` (None: the backbone's saved one), checked against the backbone."""
        from .official.sampler import check_image_stream

        stream = getattr(self.backbone, "image_stream", "one") if image_stream is None else image_stream
        check_image_stream("image_stream", stream)
        if stream == "official" and (not hasattr(self.backbone, "set_image_stream") or getattr(self.backbone, "motion", False)):
            raise ValueError(f"image_stream: 'official' feeds the image branch a (B, C, F, h, w) clip, which only an "
                             f"inflated 2D VideoBoothUNet takes; this backbone is a {type(self.backbone).__name__}"
                             f"{' over a UNetMotionModel' if getattr(self.backbone, 'motion', False) else ''}")
        return stream

    @staticmethod
    def _stream_latents(lat: torch.Tensor, stream: str, num_frames: int) -> torch.Tensor:
        from .official.sampler import image_stream_latents

        return image_stream_latents(lat, stream, num_frames)

    def _predict(self, x, t, text, pooled, image_embeds, image_latents, null_text, null_pooled):
        return self.backbone(x, t, text, pooled_text_embeds=pooled, image_embeds=image_embeds,
                             image_latents=image_latents, null_encoder_hidden_states=null_text,
                             null_pooled_text_embeds=null_pooled)
