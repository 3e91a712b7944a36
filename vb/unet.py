"""The U-Net backbone: a 2D Stable Diffusion U-Net inflated to video as Tune-A-Video did.

Why inflate ``UNet2DConditionModel`` rather than use ``UNet3DConditionModel`` (docs/model.md has
the long form): the paper inflates SD-1.4, so users bring SD weights, which load into the 2D
class as they are; the image branch *is* the 2D U-Net (one image, null prompt, no temporal
layer), which a 3D U-Net with temporal convolutions cannot run without hacks; and cross-frame
attention lives in attn1 itself, which is exactly where a diffusers processor plugs in.

Frame-wise 2D layers run on (B*F, C, H, W); attn1 processors view their input as (B, F, N, C)
and attend across frames; a zero-initialised :class:`vb.temporal.TemporalAttention` follows
every ``BasicTransformerBlock`` (where Tune-A-Video's ``attn_temp`` sits), attached with a
forward hook so the U-Net's own parameter names stay those of the pretrained checkpoint.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from .backbone import VideoBackboneMixin, batch_timesteps, check_backbone_inputs, check_tensor, expand_batch
from .context import STATE_KWARG, VideoBoothContext, VideoBoothState, state_kwargs
from .processors import (ScheduleSpec, VideoBoothAttnProcessor, VideoBoothTextAttnProcessor, check_backend,
                         check_schedule_spec, parse_image_bank)
from .temporal import TemporalAttention


def _block_state(block, args, kwargs) -> VideoBoothState:
    """The VideoBoothState of a BasicTransformerBlock call: in its ``cross_attention_kwargs``,
    passed by keyword (plain forward) or positionally (diffusers' gradient checkpointing)."""
    cak = kwargs.get("cross_attention_kwargs")
    if cak is None and len(args) > 5:  # forward(hidden, mask, enc, enc_mask, timestep, cross_attention_kwargs, ...)
        cak = args[5]
    return block.vb_temporal.context.state((cak or {}).get(STATE_KWARG))


def _temporal_hook(block, args, kwargs, output):
    """Forward hook of a BasicTransformerBlock: temporal attention after it, video passes only
    (the image branch never enters a temporal layer). The state comes from the block's own
    arguments, so a checkpoint's recompute of the block does the same."""
    st = _block_state(block, args, kwargs)
    if st.mode != "video":
        return output
    return block.vb_temporal(output, st.num_frames)


_SKIPPING_CLASSES = {}


def _skipping_class(cls):
    """A subclass of a motion-module class whose forward returns its input inside the
    context's image branch (the paper's image branch is 2D only) and is the original otherwise.
    Swapping the class keeps the module's parameters, names and state_dict as they were."""
    if cls not in _SKIPPING_CLASSES:
        def forward(self, hidden_states, *args, **kwargs):
            if self.vb_context.in_image_branch:
                return hidden_states
            return cls.forward(self, hidden_states, *args, **kwargs)

        _SKIPPING_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__,
                                                             "__qualname__": f"skipping.{cls.__name__}"})
    return _SKIPPING_CLASSES[cls]


# Names of the modules that hold a video model's own temporal attention: AnimateDiff's motion
# modules, UNet3D's temp_attentions / transformer_in, Latte's temporal_transformer_blocks, ours.
_TEMPORAL_NAME = re.compile(r"(temporal|motion_module|temp_attention|transformer_in$|attn_temp|vb_temporal)")


def temporal_module_names(model: nn.Module) -> set:
    """Qualified names of the modules of ``model`` that are temporal (attend across frames):
    diffusers' ``TransformerTemporalModel`` and ``AnimateDiffTransformer3D`` instances and any
    module whose own name says temporal/motion (see ``_TEMPORAL_NAME``)."""
    classes = []
    try:
        from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
        classes.append(TransformerTemporalModel)
    except ImportError:  # pragma: no cover (older diffusers)
        pass
    try:
        from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
        classes.append(AnimateDiffTransformer3D)
    except ImportError:  # pragma: no cover
        pass
    out = set()
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, tuple(classes)) or _TEMPORAL_NAME.search(name.rsplit(".", 1)[-1]):
            out.add(name)
    return out


def _inside(name: str, prefixes: set) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts) + 1))


def is_motion_unet(unet: nn.Module) -> bool:
    """Whether ``unet`` is a diffusers ``UNetMotionModel`` (AnimateDiff): it takes (B, C, F, H, W)
    and brings pretrained temporal (motion) modules."""
    try:
        from diffusers import UNetMotionModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(unet, UNetMotionModel)


def install_videobooth(unet: nn.Module, *, schedule: ScheduleSpec = "videobooth", attn_backend: str = "reference",
                       image_bank=None, learn_query: bool = False, temporal: Optional[bool] = None,
                       freeze_base: bool = True) -> VideoBoothContext:
    """Install the VideoBooth processors on every spatial attn1/attn2 of a diffusers model, in place.

    Works on models built from diffusers ``Attention`` modules named ``attn1`` (self-attention)
    and ``attn2`` (text cross-attention): a ``UNet2DConditionModel`` (pretrained or not), and
    video models with temporal transformer blocks of their own, such as AnimateDiff's
    ``UNetMotionModel`` (``UNetMotionModel.from_unet2d(unet, MotionAdapter...)``) or Latte. Only
    *spatial* attention gets a processor: attention inside a temporal module (see
    :func:`temporal_module_names`: motion modules, ``TransformerTemporalModel``, Latte's
    ``temporal_transformer_blocks``) keeps the processor it had, and such a model gets no
    extra temporal layers by default. New weights are created on the device and dtype of the
    layer they copy.

    Args:
        unet: the model, modified in place.
        schedule: temporal schedule spec (``"videobooth"``, ``"first"``, ``"window:<k>"``,
            ``"keyframes:<m>"``, ``+img`` suffix, a ``kernels.Schedule`` or a callable F -> Schedule).
        attn_backend: ``kernels.videobooth_attention`` backend of every attn1.
        image_bank: None (all image tokens), ``"pool:<f>"`` or ``"learned:<M>"``.
        learn_query: add a trainable ``to_q_new`` per attn1 (the ablation of a learned query).
        temporal: add a zero-initialised temporal attention after every spatial
            ``BasicTransformerBlock``; default (None): only when the model has no temporal
            modules of its own.
        freeze_base: set ``requires_grad=False`` on every parameter the model had before
            (``to_q``/``to_out`` included); the new ones are trainable.

    Returns:
        The :class:`VideoBoothContext` shared by all installed processors and temporal layers;
        also stored as ``unet.vb_context``.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention

    if not isinstance(unet, nn.Module):
        raise TypeError(f"unet: expected a torch.nn.Module (a diffusers model), got {type(unet).__name__}")
    if getattr(unet, "vb_context", None) is not None:
        raise ValueError("unet: VideoBooth is already installed on this model")
    check_schedule_spec(schedule)
    check_backend(attn_backend)
    parse_image_bank(image_bank)
    if freeze_base:
        unet.requires_grad_(False)
    ctx = VideoBoothContext()
    own_temporal = temporal_module_names(unet)
    if temporal is None:
        temporal = not own_temporal
    n_attn1 = 0
    for name, module in list(unet.named_modules()):
        if not isinstance(module, Attention) or _inside(name, own_temporal):
            continue
        leaf = name.rsplit(".", 1)[-1]
        ref = module.to_q.weight
        if leaf == "attn1" and not module.is_cross_attention:
            proc = VideoBoothAttnProcessor(module, ctx, name, schedule=schedule, backend=attn_backend,
                                           image_bank=image_bank, learn_query=learn_query,
                                           base_processor=module.processor)
            n_attn1 += 1
        elif leaf == "attn2" and module.is_cross_attention:
            proc = VideoBoothTextAttnProcessor(module, ctx, name, base_processor=module.processor)
        else:
            continue
        module.set_processor(proc.to(device=ref.device, dtype=ref.dtype))
    if n_attn1 == 0:
        raise ValueError("unet: found no diffusers Attention module named 'attn1'; nothing to install")
    if temporal:
        for name, module in list(unet.named_modules()):
            if (isinstance(module, BasicTransformerBlock) and isinstance(getattr(module, "attn1", None), Attention)
                    and not _inside(name, own_temporal)):
                a = module.attn1
                ref = a.to_q.weight
                t = TemporalAttention(a.to_q.in_features, a.heads, a.to_q.out_features // a.heads)
                t.context = ctx
                module.vb_temporal = t.to(device=ref.device, dtype=ref.dtype)
                module.register_forward_hook(_temporal_hook, with_kwargs=True)
    if is_motion_unet(unet):
        # Motion modules are called without cross_attention_kwargs: the image branch reaches
        # them through the context's switch.
        for name, module in unet.named_modules():
            if name.endswith("motion_modules") and isinstance(module, nn.ModuleList):
                for mm in module:
                    mm.vb_context = ctx
                    mm.__class__ = _skipping_class(type(mm))
    unet.vb_context = ctx
    return ctx


class VideoBoothUNet(VideoBackboneMixin, nn.Module):
    """A 2D SD U-Net inflated to video, with the VideoBooth processors installed.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (pretrained or random), modified in place.
        schedule, attn_backend, image_bank, learn_query, temporal, freeze_base: as
            :func:`install_videobooth`.
    """

    def __init__(self, unet: nn.Module, *, schedule: ScheduleSpec = "videobooth", attn_backend: str = "reference",
                 image_bank=None, learn_query: bool = False, temporal: Optional[bool] = None,
                 freeze_base: bool = True):
        super().__init__()
        self.unet = unet
        self.context = install_videobooth(unet, schedule=schedule, attn_backend=attn_backend, image_bank=image_bank,
                                          learn_query=learn_query, temporal=temporal, freeze_base=freeze_base)
        self.motion = is_motion_unet(unet)
        self.image_scale = 1.0
        has_temporal = any(hasattr(m, "vb_temporal") for m in unet.modules())
        # What an adapter file needs to rebuild the same set of weights.
        self.install_config = {"backbone": "unet", "image_bank": parse_image_bank(image_bank),
                               "learn_query": bool(learn_query), "temporal": has_temporal,
                               "schedule": schedule if isinstance(schedule, str) else None}
        if self.motion:
            self.install_config["motion"] = True

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' gradient checkpointing of the U-Net (its resnets and transformer blocks,
        the VideoBooth processors and temporal layers inside them are recomputed in backward);
        the loss and every gradient stay those of the plain forward."""
        self.unet.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.unet, "is_gradient_checkpointing", False))

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.unet.config.out_channels

    @property
    def latent_multiple(self) -> int:
        """Latent height/width must be multiples of this (one halving per down block)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def sample_size(self):
        """Default latent size of the U-Net's config (the pipeline's default video size)."""
        return self.unet.config.sample_size

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor = None, *,
                image_latents: Optional[torch.Tensor] = None,
                null_encoder_hidden_states: Optional[torch.Tensor] = None,
                pooled_text_embeds=None, image_embeds=None, null_pooled_text_embeds=None) -> torch.Tensor:
        """Predict the noise (or v) of a video, optionally conditioned on an image prompt.

        Args:
            sample: (B, C, F, H, W) noisy video latents.
            timestep: scalar or (B,) diffusion timestep.
            encoder_hidden_states: (B, L, D_text) prompt embedding (subject tokens injected by
                the coarse path, or a plain/null prompt).
            image_latents: (B, C, H, W) the image prompt's VAE latent noised to ``timestep``, or
                None for no fine-path injection (the unconditional pass of the paper).
            null_encoder_hidden_states: (B or 1, L, D_text) null-prompt embedding of the image
                branch; required with ``image_latents``.
            pooled_text_embeds, image_embeds, null_pooled_text_embeds: DiT conditioning;
                accepted so both backbones share one call, unused here.

        Returns:
            (B, C_out, F, H, W) model output, dtype of the U-Net.
        """
        check_backbone_inputs(sample, image_latents, self.in_channels, self.latent_multiple)
        b, c, f, h, w = sample.shape
        check_tensor("encoder_hidden_states", encoder_hidden_states, 3, "(B, L, D_text)")
        text = expand_batch("encoder_hidden_states", encoder_hidden_states, b)
        t = batch_timesteps(timestep, b, sample.device)
        # One state per pass, carried by cross_attention_kwargs (vb/context.py says why).
        image_states = None
        if image_latents is not None:
            if null_encoder_hidden_states is None:
                raise ValueError("null_encoder_hidden_states: required with image_latents (the image "
                                 "branch runs with the null prompt)")
            null = expand_batch("null_encoder_hidden_states", null_encoder_hidden_states, b)
            # Image branch: once per sample (B images, not B*F), 2D only; the attn1
            # processors record their inputs. Its own prediction is not needed.
            image_states = {}
            kw = state_kwargs(VideoBoothState.image((h, w), image_states))
            if self.motion:
                with self.context.image_branch():  # motion modules: identity
                    self.unet(image_latents[:, :, None], t, encoder_hidden_states=null, cross_attention_kwargs=kw)
            else:
                self.unet(image_latents, t, encoder_hidden_states=null, cross_attention_kwargs=kw)
        kw = state_kwargs(VideoBoothState.video(f, (h, w), image_states, self.image_scale))
        text_f = text.repeat_interleave(f, 0)
        if self.motion:  # UNetMotionModel folds the frames itself, timestep per clip
            return self.unet(sample, t, encoder_hidden_states=text_f, cross_attention_kwargs=kw).sample
        frames = sample.transpose(1, 2).reshape(b * f, c, h, w)
        out = self.unet(frames, t.repeat_interleave(f), encoder_hidden_states=text_f, cross_attention_kwargs=kw).sample
        return out.view(b, f, -1, h, w).transpose(1, 2)
