"""What both video backbones (inflated U-Net, DiT) share: input checks, the processor registry,
backend/schedule switches, and the adapter weights (everything VideoBooth added)."""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from .processors import (ScheduleSpec, VideoBoothAttnProcessor, VideoBoothTextAttnProcessor, _BaseProcessor,
                         check_backend, check_schedule_spec)

# Parameter-name fragments of the weights VideoBooth adds to a backbone: the attention
# processors' projections and banks, the inflated U-Net's temporal layers and its watermark module.
ADAPTER_KEY_PARTS = (".processor.", ".vb_temporal.", "watermark.")


def is_adapter_key(name: str) -> bool:
    return any(p in name for p in ADAPTER_KEY_PARTS)


def own_aligned_storage(module: nn.Module) -> nn.Module:
    """Give every CPU parameter and buffer of ``module`` that is not 64-byte aligned its own
    storage. diffusers' low-memory ``from_pretrained`` leaves weights as views into one loaded
    buffer at unaligned offsets; CPU matmul kernels then take another path and results differ in
    the last bits (8.6e-6 on a tiny pipeline's latents), so a reloaded model would not
    reproduce the saved one bit for bit. Returns ``module``."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.device.type == "cpu" and t.data_ptr() % 64:
                t.data = t.data.clone()
    return module


def check_image_scale(name: str, scale) -> float:
    """An image-prompt strength as a float (any real number; bools refused)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(scale).__name__}")
    return float(scale)


class VideoBackboneMixin:
    """Methods shared by :class:`vb.VideoBoothUNet` and :class:`vb.VideoDiT` (both nn.Modules
    with a ``context`` attribute)."""

    # -- processors -----------------------------------------------------------------------------
    def attn1_processors(self) -> List[VideoBoothAttnProcessor]:
        return [m for m in self.modules() if isinstance(m, VideoBoothAttnProcessor)]

    def attn2_processors(self) -> List[VideoBoothTextAttnProcessor]:
        return [m for m in self.modules() if isinstance(m, VideoBoothTextAttnProcessor)]

    def _vb_attention_modules(self):
        from diffusers.models.attention_processor import Attention

        for m in self.modules():
            if isinstance(m, Attention):
                yield m

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """diffusers' xformers switch without losing the VideoBooth processors: an ``Attention``
        with a VideoBooth processor keeps it and the switch applies to the processor it falls
        back to (context ``off``); every other ``Attention`` switches as usual."""
        for attn in list(self._vb_attention_modules()):
            proc = attn.processor
            attn.set_use_memory_efficient_attention_xformers(valid, attention_op)  # raises without xformers
            if isinstance(proc, _BaseProcessor):
                proc.__dict__["base_processor"] = attn.processor
                attn.set_processor(proc)

    def set_default_attn_processor(self) -> None:
        """diffusers' ``set_default_attn_processor`` for the processors the VideoBooth ones fall
        back to, and for every other ``Attention``; the VideoBooth processors stay."""
        from diffusers.models.attention_processor import AttnProcessor

        for attn in self._vb_attention_modules():
            if isinstance(attn.processor, _BaseProcessor):
                attn.processor.__dict__["base_processor"] = AttnProcessor()
            else:
                attn.set_processor(AttnProcessor())

    def set_attention_slice(self, slice_size) -> None:
        """Refused (see ``VideoBoothPipeline.enable_attention_slicing``); None is accepted."""
        if slice_size is not None:
            raise NotImplementedError("set_attention_slice: the VideoBooth processors do not slice; use "
                                      "set_attn_backend('triton') (or 'sdpa'/'flex') for memory-efficient attention")

    def set_attn_backend(self, backend: str) -> None:
        """Switch every attn1 processor to another ``vb_kernels`` backend (nothing else changes)."""
        check_backend(backend)
        for p in self.attn1_processors():
            p.backend = backend
        self._update_config(attn_backend=backend)

    def _update_config(self, **kwargs) -> None:
        """Keep a ConfigMixin backbone's saved config in step with a runtime switch."""
        if hasattr(self, "register_to_config") and hasattr(self, "config"):
            self.register_to_config(**{k: v for k, v in kwargs.items() if k in self.config})

    def set_image_scale(self, scale: float) -> None:
        """Strength of the image prompt's fine path (like diffusers' ``set_ip_adapter_scale``):
        every attn1 output becomes ``plain + scale * (injected - plain)``, where ``plain`` is the
        pass without the image prompt. 1 (default) is the paper's model, 0 removes the fine path
        (the coarse path's subject tokens are not affected). Any float; values above 1
        extrapolate."""
        self.image_scale = check_image_scale("scale", scale)
        self._update_config(image_scale=self.image_scale)  # saved with the model, survives from_pretrained

    def set_schedule(self, schedule: ScheduleSpec) -> None:
        """Switch every attn1 processor to another temporal schedule."""
        check_schedule_spec(schedule)
        for p in self.attn1_processors():
            p.set_schedule(schedule)
        self.install_config["schedule"] = schedule if isinstance(schedule, str) else None
        self._update_config(schedule=schedule if isinstance(schedule, str) else None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``ModelMixin.from_pretrained``, then :func:`own_aligned_storage` (the
        reloaded backbone computes the same bits as the saved one)."""
        return own_aligned_storage(super().from_pretrained(pretrained_model_name_or_path, **kwargs))

    def save_pretrained(self, save_directory, is_main_process: bool = True, save_function=None,
                        safe_serialization: bool = True, variant: Optional[str] = None,
                        max_shard_size="10GB", push_to_hub: bool = False, use_flashpack: bool = False, **kwargs):
        """diffusers' ``ModelMixin.save_pretrained`` (config + weights) with every option passed
        on. They are named here, not taken as ``*args``: ``DiffusionPipeline.save_pretrained``
        hands ``safe_serialization``, ``variant`` and ``max_shard_size`` only to save methods
        whose signature names them. Refused when the schedule is not a name: a hand-built
        ``vb_kernels.Schedule`` or callable cannot be written to the JSON config, and the
        reloaded model would run another schedule."""
        if self.install_config.get("schedule") is None:
            raise ValueError("schedule: save_pretrained needs a named schedule ('videobooth', 'first', 'self', "
                             "'window:<k>', 'keyframes:<m>'); this backbone runs a hand-built Schedule or callable")
        return super().save_pretrained(save_directory, is_main_process=is_main_process, save_function=save_function,
                                       safe_serialization=safe_serialization, variant=variant,
                                       max_shard_size=max_shard_size, push_to_hub=push_to_hub,
                                       use_flashpack=use_flashpack, **kwargs)

    # -- adapter weights ------------------------------------------------------------------------
    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """Every tensor VideoBooth added (new projections, banks, temporal layers of an inflated
        U-Net), keyed as in ``self.state_dict()``."""
        return {k: v for k, v in self.state_dict().items() if is_adapter_key(k)}

    def load_adapter_state_dict(self, state: Dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy adapter tensors in place (dtype/device of the model kept). With ``strict``, the
        key sets must match exactly; shapes must always match."""
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise ValueError(f"state: adapter keys do not match this backbone; missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
        with torch.no_grad():
            for k, t in state.items():
                if k not in own:
                    continue
                if own[k].shape != t.shape:
                    raise ValueError(f"state[{k!r}]: expected shape {tuple(own[k].shape)}, got {tuple(t.shape)}")
                own[k].copy_(t)

    def stage_parameters(self, stage: int, include_temporal: bool = False) -> Iterator[nn.Parameter]:
        """Backbone parameters trained in a VideoBooth stage (DESIGN.md section 1).

        stage 1: attn2's ``to_k_new``/``to_v_new``. stage 2: those plus every attn1 processor's
        parameters (``to_k_new``, ``to_v_new``, ``to_k_exemplar``, ``to_v_exemplar``, the learned
        query and bank if configured). ``include_temporal`` adds an inflated U-Net's temporal layers.
        (The mapper's parameters are the pipeline's to add.)
        """
        if stage not in (1, 2):
            raise ValueError(f"stage: expected 1 or 2, got {stage!r}")
        mods: List[nn.Module] = list(self.attn2_processors())
        if stage == 2:
            mods += self.attn1_processors()
        seen = set()
        for m in mods:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p
        if include_temporal and self.install_config.get("motion"):
            raise ValueError("include_temporal: this backbone's temporal layers are AnimateDiff's pretrained motion "
                             "modules, which VideoBooth keeps frozen and does not save in its adapter; to fine-tune "
                             "them, make them trainable yourself and save the whole backbone with save_pretrained")
        if include_temporal:
            for name, p in self.named_parameters():
                if ".vb_temporal." in name and id(p) not in seen:
                    seen.add(id(p))
                    yield p


def check_tensor(name: str, t, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected shape {shape_doc}, got {tuple(t.shape)}")
    return t


def batch_timesteps(timestep, batch: int, device) -> torch.Tensor:
    """A scalar or (B,) timestep as a (B,) tensor on ``device``."""
    t = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(timestep)
    t = t.to(device)
    if t.dim() == 0:
        return t.expand(batch)
    if t.dim() != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"timestep: expected a scalar or shape ({batch},), got {tuple(t.shape)}")
    return t.expand(batch)


def check_backbone_inputs(sample, image_latents, in_channels: int, multiple: int) -> None:
    """Shared checks of ``sample`` (B, C, F, H, W) and ``image_latents`` (B, C, H, W)."""
    check_tensor("sample", sample, 5, f"(B, {in_channels}, F, H, W)")
    b, c, f, h, w = sample.shape
    if c != in_channels:
        raise ValueError(f"sample: expected {in_channels} channels (B, C, F, H, W), got shape {tuple(sample.shape)}")
    if h % multiple or w % multiple:
        raise ValueError(f"sample: latent height and width must be multiples of {multiple}, got {h}x{w}")
    if image_latents is not None:
        check_tensor("image_latents", image_latents, 4, f"({b}, {c}, {h}, {w})")
        if tuple(image_latents.shape) != (b, c, h, w):
            raise ValueError(f"image_latents: expected shape {(b, c, h, w)}, got {tuple(image_latents.shape)}")


def expand_batch(name: str, t: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    """(1, ...) or (B, ...) -> (B, ...)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{name}: expected batch 1 or {batch}, got shape {tuple(t.shape)}")
