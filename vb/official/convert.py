"""The released VideoBooth weights (Vchitect/VideoBooth @ d10e06f) as this project's modules.

:func:`load_official` converts the two official weight files into ``(VideoBoothUNet, VideoBoothMapper)``:
``watermark_remove_module.pt["ema_unet"]`` (the whole video U-Net) and ``mapper.pt["ema"]`` (the
mapper plus every attn2 ``to_k``/``to_v`` and attn1 ``to_[kv]_exemplar``/``to_[kv]_new``). Every
tensor is loaded strictly: a missing or unexpected key is an error naming it. docs/official.md
lists every official key -> ours and each architectural difference.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from ..coarse import VideoBoothMapper
from ..unet import VideoBoothUNet

PathOrDict = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

# SD-1.4's unet config.json (what the official code inflates), with its 3D block names.
SD14_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
}
_BLOCKS_3D_TO_2D = {"CrossAttnDownBlock3D": "CrossAttnDownBlock2D", "DownBlock3D": "DownBlock2D",
                    "CrossAttnUpBlock3D": "CrossAttnUpBlock2D", "UpBlock3D": "UpBlock2D",
                    "UNetMidBlock3DCrossAttn": "UNetMidBlock2DCrossAttn"}
# Config keys of UNet2DConditionModel that the official config may carry; others (``_class_name``,
# ``use_first_frame``, ``_diffusers_version``, ...) say nothing about the weights.
_UNET_KEYS = ("sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
              "down_block_types", "mid_block_type", "up_block_types", "only_cross_attention", "block_out_channels",
              "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
              "norm_eps", "cross_attention_dim", "attention_head_dim", "use_linear_projection", "upcast_attention",
              "resnet_time_scale_shift")
_NEW_PROJ = {"attn2": (("to_k", "to_k_new"), ("to_v", "to_v_new")),
             "attn1": (("to_k_exemplar", "to_k_exemplar"), ("to_v_exemplar", "to_v_exemplar"),
                       ("to_k_new", "to_k_new"), ("to_v_new", "to_v_new"))}


def unet_kwargs_from_official(config: Optional[Mapping] = None) -> dict:
    """``UNet2DConditionModel`` keyword arguments for an official U-Net config (SD-1.4's when None).

    The official 3D block names become the 2D ones (the layers are the same, run frame-wise);
    per-block lists longer than the number of blocks (the official watermark module needs 3
    entries) are cut to it.
    """
    cfg = dict(SD14_UNET_CONFIG if config is None else config)
    if not isinstance(cfg.get("down_block_types"), (list, tuple)):
        raise ValueError("unet_config: expected an official U-Net config dict with 'down_block_types'")
    out = {k: cfg[k] for k in _UNET_KEYS if k in cfg}
    n = len(cfg["down_block_types"])
    for key in ("down_block_types", "up_block_types"):
        names = list(out[key])
        bad = [b for b in names if b not in _BLOCKS_3D_TO_2D and b not in _BLOCKS_3D_TO_2D.values()]
        if bad:
            raise ValueError(f"unet_config[{key!r}]: unknown block types {bad}")
        out[key] = [_BLOCKS_3D_TO_2D.get(b, b) for b in names]
    if "mid_block_type" in out:
        out["mid_block_type"] = _BLOCKS_3D_TO_2D.get(out["mid_block_type"], out["mid_block_type"])
    for key in ("attention_head_dim", "only_cross_attention"):
        if isinstance(out.get(key), (list, tuple)):
            out[key] = list(out[key])[:n]
    return out


def _read(obj: PathOrDict, name: str, wrapper: str) -> Dict[str, torch.Tensor]:
    """A state dict from a dict or a file (``torch.load(weights_only=True)``), unwrapping the
    official files' ``wrapper`` key (``"ema_unet"`` / ``"ema"``) when present."""
    if isinstance(obj, (str, os.PathLike)):
        obj = torch.load(os.fspath(obj), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise TypeError(f"{name}: expected a state dict or a path to one, got {type(obj).__name__}")
    if wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"{name}: expected only tensors, got {bad[:3]} as non-tensors")
    return dict(obj)


def official_key(our_key: str, backbone: VideoBoothUNet) -> Tuple[str, str]:
    """Which official file (``"unet"`` or ``"mapper"``) and key hold the tensor that our
    backbone's ``state_dict`` key ``our_key`` takes."""
    m = re.match(r"^unet\.(.+\.(attn[12]))\.processor\.(\w+)\.weight$", our_key)
    if m:
        site, kind, ours = m.groups()
        for theirs, mine in _NEW_PROJ[kind]:
            if mine == ours:
                return "mapper", f"{site.replace('.', '_')}_{theirs}.weight"
        raise KeyError(our_key)
    if our_key.startswith("watermark."):
        head, rest = our_key[len("watermark."):].split(".", 1)
        return "unet", f"watermark_{head}.{rest}"
    if our_key.startswith("unet."):
        key = our_key[len("unet."):].replace(".vb_temporal.attn.", ".attn_temp.").replace(".vb_temporal.norm.", ".norm_temp.")
        return "unet", key
    raise KeyError(our_key)


def official_mapper_key(our_key: str) -> str:
    """Official ``mapper.pt`` key of a :class:`VideoBoothMapper` ``state_dict`` key."""
    m = re.match(r"^(cls|patch)_mlps\.(\d+)\.(.+)$", our_key)
    if not m:
        raise KeyError(our_key)
    kind, i, rest = m.groups()
    return f"mapping_{i}.{rest}" if kind == "cls" else f"mapping_patch_{i}.{rest}"


def convert_official(unet_state: Mapping[str, torch.Tensor], mapper_state: Mapping[str, torch.Tensor],
                     backbone: VideoBoothUNet, mapper: VideoBoothMapper):
    """Official state dicts -> (backbone state dict, mapper state dict) keyed as ours.

    Strict: every tensor of both files must have a place and every tensor of ours a source,
    with equal shapes; otherwise ValueError naming the file, the key and what was expected.
    """
    sources = {"unet": dict(unet_state), "mapper": dict(mapper_state)}
    used = {"unet": set(), "mapper": set()}
    missing = []
    out_backbone, out_mapper = {}, {}
    targets = [(k, v, official_key(k, backbone), out_backbone) for k, v in backbone.state_dict().items()]
    targets += [(k, v, ("mapper", official_mapper_key(k)), out_mapper) for k, v in mapper.state_dict().items()]
    for ours, ref, (file, key), dst in targets:
        src = sources[file].get(key)
        if src is None:
            missing.append(f"{file}:{key}")
            continue
        if tuple(src.shape) != tuple(ref.shape):
            raise ValueError(f"{file}_state_dict[{key!r}]: expected shape {tuple(ref.shape)} (for {ours}), "
                             f"got {tuple(src.shape)}")
        dst[ours] = src
        used[file].add(key)
    unexpected = [f"{f}:{k}" for f in ("unet", "mapper") for k in sorted(set(sources[f]) - used[f])]
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")
        raise ValueError("official weights do not match the model: "
                         + (f"missing key(s) {show(missing)}" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"unexpected key(s) {show(unexpected)}" if unexpected else "")
                         + " (unet_config must be the official U-Net's config)")
    return out_backbone, out_mapper


def _watermark_widths(unet_state: Mapping[str, torch.Tensor]):
    keys = [f"watermark_down_blocks.{i}.resnets.0.conv1.weight" for i in range(3)]
    if not all(k in unet_state for k in keys):
        return None
    return tuple(int(unet_state[k].shape[0]) for k in keys)


def load_official(unet_state_dict: PathOrDict, mapper_state_dict: PathOrDict, unet_config: Optional[Mapping] = None,
                  *, attn_backend: str = "auto", device=None,
                  dtype: Optional[torch.dtype] = None) -> Tuple[VideoBoothUNet, VideoBoothMapper]:
    """The released VideoBooth weights as ``(backbone, mapper)``.

    Args:
        unet_state_dict: ``watermark_remove_module.pt`` (path, or its dict) or its ``["ema_unet"]``.
        mapper_state_dict: ``mapper.pt`` (path, or its dict) or its ``["ema"]``.
        unet_config: the official U-Net's config dict (SD-1.4's ``unet/config.json`` keys, official
            3D block names); None for SD-1.4's.
        attn_backend: ``vb_kernels`` backend of every attn1 (``"auto"``: triton on CUDA, else sdpa).
        device, dtype: where the returned modules go (default: CPU, float32 as stored).

    Returns:
        (:class:`vb.VideoBoothUNet` with the ``"official"`` preset, :class:`vb.VideoBoothMapper`
        with 5 layers, hidden 1024), both in eval mode. The backbone takes
        ``(sample (B,C,F,H,W), timestep, encoder_hidden_states, image_latents=(B,C,H,W) or None,
        null_encoder_hidden_states=...)``; the mapper (B, K, T, C_vis) stacked CLIP layers in the
        official order (last layer, then layers 4, 8, 12, 16 of CLIP ViT-L/14).
    """
    from diffusers import UNet2DConditionModel

    unet_sd = _read(unet_state_dict, "unet_state_dict", "ema_unet")
    mapper_sd = _read(mapper_state_dict, "mapper_state_dict", "ema")
    kwargs = unet_kwargs_from_official(unet_config)
    widths = _watermark_widths(unet_sd)
    if widths is None:
        raise ValueError("unet_state_dict: missing key(s) unet:watermark_down_blocks.{0,1,2}.resnets.0.conv1.weight "
                         "(not an official VideoBooth U-Net?)")
    for key in ("mapping_0.0.weight", "mapping_0.6.weight"):
        if key not in mapper_sd:
            raise ValueError(f"mapper_state_dict: missing key mapper:{key}")
    num_layers = sum(1 for k in mapper_sd if re.match(r"^mapping_\d+\.0\.weight$", k))
    hidden, c_vis = mapper_sd["mapping_0.0.weight"].shape
    d_text = mapper_sd["mapping_0.6.weight"].shape[0]
    unet = UNet2DConditionModel(**kwargs)
    backbone = VideoBoothUNet(unet, schedule="videobooth", attn_backend=attn_backend, preset="official",
                              watermark=widths)
    mapper = VideoBoothMapper(input_dim=int(c_vis), output_dim=int(d_text), num_layers=num_layers, hidden_dim=int(hidden))
    ours_b, ours_m = convert_official(unet_sd, mapper_sd, backbone, mapper)
    backbone.load_state_dict(ours_b, strict=True)
    mapper.load_state_dict(ours_m, strict=True)
    for m in (backbone, mapper):
        m.eval()
        if device is not None or dtype is not None:
            m.to(device=device, dtype=dtype)
    return backbone, mapper


def tiny_official_config(cross_attention_dim: int = 64) -> dict:
    """The smallest config the official code builds: its watermark module hard-codes widths
    (320, 640, 640) and indexes 3-entry per-block lists."""
    return {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": [320, 640], "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
            "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"], "cross_attention_dim": cross_attention_dim,
            "attention_head_dim": [8, 8, 8], "only_cross_attention": [False, False, False], "norm_num_groups": 32,
            "use_first_frame": True}
