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

Two architecture presets (:data:`ARCH_PRESETS`): ``"research"`` (this project's variant, the
default) and ``"official"`` (the released VideoBooth model, Vchitect/VideoBooth; docs/official.md):
clip-level ResNet GroupNorms, temporal layers without a position code that also run on the image
branch, and the watermark sub-U-Net before ``conv_norm_out``.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .backbone import (VideoBackboneMixin, batch_timesteps, check_backbone_inputs, check_image_scale, check_tensor,
                       expand_batch)
from .context import STATE_KWARG, VideoBoothContext, VideoBoothState, resolve_state, state_kwargs
from .official.layers import ClipGroupNorm, WatermarkModule, use_clip_groupnorm
from .official.sampler import check_image_stream
from .processors import (ScheduleSpec, VideoBoothAttnProcessor, VideoBoothTextAttnProcessor, _BaseProcessor,
                         check_backend, check_schedule_spec, parse_image_bank)
from .temporal import TemporalAttention
from .unet_forward import check_walkable, unet_forward


def _block_state(block, args, kwargs) -> VideoBoothState:
    """The VideoBoothState of a BasicTransformerBlock call: in its ``cross_attention_kwargs``,
    passed by keyword (plain forward) or positionally (diffusers' gradient checkpointing)."""
    cak = kwargs.get("cross_attention_kwargs")
    if cak is None and len(args) > 5:  # forward(hidden, mask, enc, enc_mask, timestep, cross_attention_kwargs, ...)
        cak = args[5]
    return resolve_state((cak or {}).get(STATE_KWARG))


def _temporal_hook(block, args, kwargs, output):
    """Forward hook of a BasicTransformerBlock: temporal attention after it, in video passes, and
    in the image branch (as one frame) when ``in_image`` is set (the official model runs its image
    stream through every layer; over F identical frames that equals one frame). The state comes
    from the block's own arguments, so a checkpoint's recompute of the block does the same."""
    temporal = block.vb_temporal
    st = _block_state(block, args, kwargs)
    if st.mode == "video":
        return temporal(output, st.num_frames)
    if st.mode == "image" and temporal.in_image:
        return temporal(output, 1)
    return output


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


# Architecture options of the two presets. "research": this project's variant (frame-level
# GroupNorm, sinusoidal frame positions, temporal layers skipped by the image branch, no
# watermark module). "official": the released VideoBooth U-Net (docs/official.md).
ARCH_PRESETS = {
    "research": dict(clip_groupnorm=False, temporal_positions=True, temporal_in_image=False, watermark=None),
    "official": dict(clip_groupnorm=True, temporal_positions=False, temporal_in_image=True,
                     watermark=(320, 640, 640)),
}
_ARCH_KEYS = tuple(ARCH_PRESETS["research"])


def resolve_arch(preset: Optional[str], **overrides) -> dict:
    """The architecture options of ``preset`` (``"research"`` or ``"official"``, None = research)
    with every non-None override applied."""
    name = "research" if preset is None else preset
    if name not in ARCH_PRESETS:
        raise ValueError(f"preset: expected one of {sorted(ARCH_PRESETS)} or None, got {preset!r}")
    out = dict(ARCH_PRESETS[name])
    for k, v in overrides.items():
        if k not in out:
            raise TypeError(f"unknown architecture option {k!r}; expected one of {_ARCH_KEYS}")
        if v is not None:
            out[k] = v
    wm = out["watermark"]
    if wm is False:
        out["watermark"] = None
    elif wm is not None:
        if wm is True:
            wm = ARCH_PRESETS["official"]["watermark"]
        wm = tuple(wm)
        if len(wm) != 3 or not all(isinstance(c, int) and c > 0 for c in wm):
            raise ValueError(f"watermark: expected None, True or 3 positive channel counts, got {out['watermark']!r}")
        out["watermark"] = wm
    return out


def _build_unet(unet_class: Optional[str], unet_config: Optional[dict]) -> nn.Module:
    """A diffusers U-Net of class ``unet_class`` built from ``unet_config`` (random weights)."""
    import diffusers

    if unet_class is None or unet_config is None:
        raise ValueError("unet: expected a diffusers U-Net, or unet_class and unet_config to build one")
    cls = getattr(diffusers, str(unet_class), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"unet_class: expected a diffusers model class name (e.g. 'UNet2DConditionModel'), "
                         f"got {unet_class!r}")
    return cls.from_config(dict(unet_config))


class KeepVideoBoothProcessors:
    """The inner U-Net's ``set_attn_processor`` while VideoBooth is installed (an instance
    attribute that shadows diffusers' method): a processor for an ``Attention`` that holds a
    VideoBooth processor is refused with an error that names the ways that keep them, unless it
    is that VideoBooth processor itself (``unet.set_attn_processor(unet.attn_processors)`` is a
    no-op, as in diffusers). Every other ``Attention`` (motion modules, temporal layers) is set as
    diffusers sets it. Without this, a call on the inner U-Net replaced VideoBooth's processors
    silently and the model ran without its fine path."""

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def __call__(self, processor):
        current = self.unet.attn_processors
        given = processor if isinstance(processor, dict) else dict.fromkeys(current, processor)
        lost = [name for name, cur in current.items()
                if isinstance(cur, _BaseProcessor) and name in given and given[name] is not cur]
        if lost:
            shown = ", ".join(n.rsplit(".processor", 1)[0] for n in lost[:3]) + (", ..." if len(lost) > 3 else "")
            what = "the given ones" if isinstance(processor, dict) else type(processor).__name__
            raise ValueError(
                f"processor: set_attn_processor on the U-Net would replace the VideoBooth processors of "
                f"{len(lost)} attention layers ({shown}) with {what}. "
                "On the VideoBooth backbone use set_default_attn_processor(), "
                "set_use_memory_efficient_attention_xformers() or set_attn_backend(...), which keep them "
                "(their fallback processor or the op's backend changes); to drop VideoBooth, call "
                "backbone.uninstall() (or vb.uninstall_videobooth(unet)) first")
        type(self.unet).set_attn_processor(self.unet, processor)


def install_videobooth(unet: nn.Module, *, schedule: ScheduleSpec = "videobooth", attn_backend: str = "reference",
                       image_bank=None, learn_query: bool = False, temporal: Optional[bool] = None,
                       freeze_base: bool = True, temporal_positions: bool = True,
                       temporal_in_image: bool = False) -> VideoBoothContext:
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
            ``"keyframes:<m>"``, ``+img`` suffix, a ``vb_kernels.Schedule`` or a callable F -> Schedule).
        attn_backend: ``vb_kernels.videobooth_attention`` backend of every attn1.
        image_bank: None (all image tokens), ``"pool:<f>"`` or ``"learned:<M>"``.
        learn_query: add a trainable ``to_q_new`` per attn1 (the ablation of a learned query).
        temporal: add a zero-initialised temporal attention after every spatial
            ``BasicTransformerBlock``; default (None): only when the model has no temporal
            modules of its own.
        freeze_base: set ``requires_grad=False`` on every parameter the model had before
            (``to_q``/``to_out`` included); the new ones are trainable.
        temporal_positions: the temporal layers add a sinusoidal frame-position code.
        temporal_in_image: the image branch also runs the temporal layers (on one frame).

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
    ctx = VideoBoothContext()
    # What uninstall_videobooth needs to give the model back as it was.
    ctx.requires_grad = {n: p.requires_grad for n, p in unet.named_parameters()}
    if freeze_base:
        unet.requires_grad_(False)
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
                t = TemporalAttention(a.to_q.in_features, a.heads, a.to_q.out_features // a.heads,
                                      positions=temporal_positions)
                t.in_image = bool(temporal_in_image)
                module.vb_temporal = t.to(device=ref.device, dtype=ref.dtype)
                ctx.hooks.append(module.register_forward_hook(_temporal_hook, with_kwargs=True))
    unet.vb_context = ctx
    if hasattr(type(unet), "set_attn_processor"):
        unet.__dict__["set_attn_processor"] = KeepVideoBoothProcessors(unet)
    return ctx


def uninstall_videobooth(unet: nn.Module) -> nn.Module:
    """Undo :func:`install_videobooth` (and the architecture options of :class:`VideoBoothUNet`)
    in place: every attention gets back the processor it had, the temporal layers, hooks,
    motion-module switches and clip-level GroupNorms go, ``requires_grad`` flags are restored.
    The model's state_dict and outputs are then those from before the install (the weights
    VideoBooth added are dropped; save them first with ``save_adapter``/``save_pretrained``).

    Returns:
        ``unet``.
    """
    ctx = getattr(unet, "vb_context", None)
    if ctx is None:
        raise ValueError("unet: VideoBooth is not installed on this model")
    for h in getattr(ctx, "hooks", []):
        h.remove()
    for module in list(unet.modules()):
        proc = getattr(module, "processor", None)
        if isinstance(proc, _BaseProcessor) and hasattr(module, "set_processor"):
            module.set_processor(proc.base_processor)
        if "vb_temporal" in getattr(module, "_modules", {}):
            del module.vb_temporal
        for name, child in list(module.named_children()):
            if isinstance(child, ClipGroupNorm):  # the official preset's
                norm = nn.GroupNorm(child.num_groups, child.num_channels, eps=child.eps, affine=child.affine)
                if child.affine:
                    norm.weight, norm.bias = child.weight, child.bias
                setattr(module, name, norm)
    for n, p in unet.named_parameters():
        p.requires_grad_(ctx.requires_grad.get(n, p.requires_grad))
    del unet.vb_context
    unet.__dict__.pop("set_attn_processor", None)
    return unet


class VideoBoothUNet(VideoBackboneMixin, ModelMixin, ConfigMixin):
    """A 2D SD U-Net inflated to video (or AnimateDiff's ``UNetMotionModel``), with the
    VideoBooth processors installed.

    A diffusers ``ModelMixin``/``ConfigMixin``: ``save_pretrained`` writes the whole backbone
    (the U-Net's weights, the new projections, temporal layers, watermark module) and a config
    that rebuilds it (the U-Net's class and config, the install options); ``from_pretrained``
    gives back the same model, bit for bit.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (pretrained or random) or ``UNetMotionModel``,
            modified in place. None: built (random weights) from ``unet_class``/``unet_config``.
        schedule, attn_backend, image_bank, learn_query, temporal, freeze_base: as
            :func:`install_videobooth`.
        preset: architecture preset, ``"research"`` (default: this project's variant) or
            ``"official"`` (the released VideoBooth model; :func:`vb.load_official` builds it).
        clip_groupnorm: ResNet GroupNorms and ``conv_norm_out`` normalise over the whole clip
            (B, C, F*H, W) instead of per frame (:class:`ClipGroupNorm`).
        temporal_positions: the temporal layers add a sinusoidal frame-position code.
        temporal_in_image: the image branch also runs the temporal layers (on one frame).
        watermark: None/False (no watermark module), True (the official widths (320, 640, 640))
            or 3 widths: the official watermark sub-U-Net (:class:`WatermarkModule`), added before
            ``conv_norm_out`` in video passes.
        Options left None take the preset's value.
        arch: the resolved architecture options as a dict (what the saved config holds); when
            given it replaces ``preset`` and the four options above.
        unet_class, unet_config: the diffusers class name and config of ``unet`` (what the saved
            config holds), used when ``unet`` is None.
        image_scale: strength of the image prompt's fine path (:meth:`set_image_scale`; saved in
            the config).
        image_stream: what the pipeline (and the training task) feed the image branch by default:
            ``"one"`` (one copy of the image latent, one noise draw) or ``"official"`` (F copies,
            each with its own draw, fresh at every step: the official code's stream;
            ``vb.official.sampler.IMAGE_STREAMS``). None: ``"official"`` for the official
            architecture, ``"one"`` otherwise. Saved in the config (:meth:`set_image_stream`).
    """

    def __init__(self, unet: Optional[nn.Module] = None, *, schedule: ScheduleSpec = "videobooth", attn_backend: str = "reference",
                 image_bank=None, learn_query: bool = False, temporal: Optional[bool] = None,
                 freeze_base: bool = True, preset: Optional[str] = None, clip_groupnorm: Optional[bool] = None,
                 temporal_positions: Optional[bool] = None, temporal_in_image: Optional[bool] = None,
                 watermark=None, arch: Optional[dict] = None, unet_class: Optional[str] = None,
                 unet_config: Optional[dict] = None, image_scale: float = 1.0, image_stream: Optional[str] = None):
        super().__init__()
        if arch is not None:
            arch = resolve_arch(None, **arch)
        else:
            arch = resolve_arch(preset, clip_groupnorm=clip_groupnorm, temporal_positions=temporal_positions,
                                temporal_in_image=temporal_in_image, watermark=watermark)
        if unet is None:
            unet = _build_unet(unet_class, unet_config)
        self.unet = unet
        self.context = install_videobooth(unet, schedule=schedule, attn_backend=attn_backend, image_bank=image_bank,
                                          learn_query=learn_query, temporal=temporal, freeze_base=freeze_base,
                                          temporal_positions=arch["temporal_positions"],
                                          temporal_in_image=arch["temporal_in_image"])
        self.arch = arch
        self.watermark = None
        if arch["watermark"] is not None:
            cfg = unet.config
            self.watermark = WatermarkModule(
                cfg.block_out_channels[0], arch["watermark"], temb_channels=unet.time_embedding.linear_2.out_features,
                layers_per_block=cfg.layers_per_block if isinstance(cfg.layers_per_block, int) else cfg.layers_per_block[0],
                norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
                downsample_padding=cfg.downsample_padding).to(device=unet.device, dtype=unet.dtype)
        if arch["clip_groupnorm"]:
            use_clip_groupnorm(unet, [unet] + ([self.watermark] if self.watermark is not None else []))
        self.motion = is_motion_unet(unet)
        # Clip-level norms and the watermark need the pass's frame count and time embedding,
        # which diffusers' forward does not hand to them: such passes (and a motion U-Net's 2D
        # image branch) take vb.unet_forward's forward over the same modules.
        self._own_forward = bool(arch["clip_groupnorm"] or self.watermark is not None)
        if self.motion and self._own_forward:
            raise ValueError("clip_groupnorm/watermark: the official architecture options are for an inflated 2D "
                             "U-Net, not a UNetMotionModel")
        if self.motion or self._own_forward:
            check_walkable(unet)
        # What an adapter file needs to rebuild the same set of weights.
        self.image_scale = check_image_scale("image_scale", image_scale)
        if image_stream is None:
            official = (arch["clip_groupnorm"] and arch["temporal_in_image"] and not arch["temporal_positions"]
                        and arch["watermark"] is not None)
            image_stream = "official" if official else "one"
        self.image_stream = check_image_stream("image_stream", image_stream)
        has_temporal = any(hasattr(m, "vb_temporal") for m in unet.modules())
        self.install_config = {"backbone": "unet", "image_bank": parse_image_bank(image_bank),
                               "learn_query": bool(learn_query), "temporal": has_temporal,
                               "schedule": schedule if isinstance(schedule, str) else None,
                               "arch": {k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()}}
        if self.motion:
            self.install_config["motion"] = True
        # The saved config: what from_pretrained needs to rebuild this model. (No key may share a
        # name with a submodule: ModelMixin would answer the attribute from the config.)
        self.register_to_config(
            unet_class=type(unet).__name__,
            unet_config={k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
            schedule=schedule if isinstance(schedule, str) else None, attn_backend=attn_backend,
            image_bank=parse_image_bank(image_bank), learn_query=bool(learn_query), temporal=has_temporal,
            freeze_base=bool(freeze_base), arch=self.install_config["arch"], image_scale=self.image_scale,
            image_stream=self.image_stream)

    def set_image_stream(self, stream: str) -> None:
        """The image branch's default stream, ``"one"`` or ``"official"`` (the constructor's
        ``image_stream``); kept in the saved config. A pipeline call's ``image_stream`` overrides it."""
        self.image_stream = check_image_stream("stream", stream)
        self._update_config(image_stream=self.image_stream)

    def _unet_pass(self, st: VideoBoothState, frames: torch.Tensor, t: torch.Tensor, text: torch.Tensor):
        """The U-Net on frame-major ``frames`` (B*F, C, H, W) in the pass ``st`` (``t``, ``text``
        one row per frame): diffusers' forward, or vb.unet_forward's where clip-level norms, the
        watermark or a motion U-Net's 2D image branch need what that forward does not pass."""
        cak = state_kwargs(st)
        if self._own_forward or (self.motion and st.mode == "image"):
            f = st.num_frames if st.mode == "video" else 1
            # The watermark's output is read in (non-recording) video passes only.
            wm = self.watermark if st.mode == "video" and not st.record else None
            return unet_forward(self.unet, frames, t, text, cak, num_frames=f, watermark=wm)
        return self.unet(frames, t, encoder_hidden_states=text, cross_attention_kwargs=cak).sample

    @classmethod
    def from_motion_adapter(cls, unet: nn.Module, motion_adapter: nn.Module, **kwargs) -> "VideoBoothUNet":
        """VideoBooth on a pretrained text-to-video base: AnimateDiff's motion modules.

        ``UNetMotionModel.from_unet2d(unet, motion_adapter)`` (the SD U-Net's weights and the
        adapter's motion modules, as diffusers' ``AnimateDiffPipeline`` builds it), then the
        VideoBooth processors on its spatial attn1/attn2 only; the motion modules keep their
        processors, stay frozen and are skipped by the image branch, and no extra temporal
        layers are added (the motion modules are the temporal layers).

        Args:
            unet: a ``UNet2DConditionModel`` (e.g. SD-1.5's ``unet`` subfolder).
            motion_adapter: a diffusers ``MotionAdapter`` (e.g. ``MotionAdapter.from_pretrained(
                "guoyww/animatediff-motion-adapter-v1-5-2")``) whose ``block_out_channels`` match.
            kwargs: as the constructor (schedule, attn_backend, image_bank, ...).
        """
        from diffusers import MotionAdapter, UNetMotionModel

        if not isinstance(motion_adapter, MotionAdapter):
            raise TypeError(f"motion_adapter: expected a diffusers MotionAdapter, got {type(motion_adapter).__name__}")
        motion = UNetMotionModel.from_unet2d(unet, motion_adapter)
        return cls(motion.to(device=unet.device, dtype=unet.dtype), **kwargs)

    def uninstall(self) -> nn.Module:
        """Give back the model this backbone was built on, as it was before (see
        :func:`uninstall_videobooth`); this backbone is unusable afterwards."""
        unet = uninstall_videobooth(self.unet)
        self.watermark = None
        del self.unet
        return unet

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
                None for no fine-path injection (the unconditional pass of the paper), or
                (B, C, F_img, H, W): the official code's structure, the image latent as a clip
                (e.g. F copies, each noised with its own draw), frame 0 read by the video pass.
            null_encoder_hidden_states: (B or 1, L, D_text) null-prompt embedding of the image
                branch; required with ``image_latents``.
            pooled_text_embeds, image_embeds, null_pooled_text_embeds: DiT conditioning;
                accepted so both backbones share one call, unused here.

        Returns:
            (B, C_out, F, H, W) model output, dtype of the U-Net.
        """
        image5 = image_latents is not None and isinstance(image_latents, torch.Tensor) and image_latents.dim() == 5
        check_backbone_inputs(sample, None if image5 else image_latents, self.in_channels, self.latent_multiple)
        b, c, f, h, w = sample.shape
        if image5 and (image_latents.shape[0] != b or tuple(image_latents.shape[1:2] + image_latents.shape[3:]) != (c, h, w)):
            raise ValueError(f"image_latents: expected shape ({b}, {c}, H, W) or ({b}, {c}, F_img, {h}, {w}), "
                             f"got {tuple(image_latents.shape)}")
        check_tensor("encoder_hidden_states", encoder_hidden_states, 3, "(B, L, D_text)")
        text = expand_batch("encoder_hidden_states", encoder_hidden_states, b)
        t = batch_timesteps(timestep, b, sample.device)
        # One state per pass, carried by the call's arguments to every layer that reads it
        # (vb/context.py says why).
        if self.image_scale == 0.0:  # strength 0: the fine path contributes nothing; skip its branch
            image_latents = None
        image_states = None
        if image_latents is not None:
            if null_encoder_hidden_states is None:
                raise ValueError("null_encoder_hidden_states: required with image_latents (the image "
                                 "branch runs with the null prompt)")
            null = expand_batch("null_encoder_hidden_states", null_encoder_hidden_states, b)
            image_states = {}
            if image5:
                if self.motion:
                    raise ValueError("image_latents: a (B, C, F_img, H, W) image clip is for an inflated 2D "
                                     "U-Net; give a UNetMotionModel backbone (B, C, H, W)")
                # The official structure: the image latent as an F_img-frame clip through every
                # layer (clip-level norms, temporal layers, sparse-causal attn1 without image);
                # the video pass reads frame 0's attn1 inputs. F_img times the work of the
                # one-frame branch below; equal to it when the F_img frames are identical.
                fi = image_latents.shape[2]
                self._unet_pass(VideoBoothState.recording(fi, (h, w), image_states),
                                image_latents.transpose(1, 2).reshape(b * fi, c, h, w), t.repeat_interleave(fi),
                                null.repeat_interleave(fi, 0))
            else:
                # Image branch: once per sample (B images, not B*F), 2D only (a motion U-Net's
                # motion modules are not run); the attn1 processors record their inputs. Its
                # own prediction is not needed.
                self._unet_pass(VideoBoothState.image((h, w), image_states), image_latents, t, null)
        st = VideoBoothState.video(f, (h, w), image_states, self.image_scale)
        text_f = text.repeat_interleave(f, 0)
        if self.motion:  # UNetMotionModel folds the frames itself, timestep per clip
            return self.unet(sample, t, encoder_hidden_states=text_f, cross_attention_kwargs=state_kwargs(st)).sample
        out = self._unet_pass(st, sample.transpose(1, 2).reshape(b * f, c, h, w), t.repeat_interleave(f), text_f)
        return out.view(b, f, -1, h, w).transpose(1, 2)
