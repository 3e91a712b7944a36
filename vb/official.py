"""Run the released VideoBooth model (Vchitect/VideoBooth @ d10e06f) on this project's kernels.

* :func:`load_official` converts the two official weight files into ``(VideoBoothUNet, VideoBoothMapper)``:
  ``watermark_remove_module.pt["ema_unet"]`` (the whole video U-Net) and ``mapper.pt["ema"]``
  (the mapper plus every attn2 ``to_k``/``to_v`` and attn1 ``to_[kv]_exemplar``/``to_[kv]_new``).
  Every tensor is loaded strictly: a missing or unexpected key is an error naming it.
* ``python -m vb.official sample ...``: the official sample script's job (docs/official.md).
* ``python -m vb.official parity --official-repo PATH --diffusers-0111 PATH``: imports the official
  code from the user's checkout in a separate process (``tools/official_reference.py``) and
  compares it with ours on random weights. No official code is part of this project.

docs/official.md lists every official key -> ours and each architectural difference.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from .coarse import VideoBoothMapper
from .unet import VideoBoothUNet

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


# ---- parity against the official code ----------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def tiny_official_config(cross_attention_dim: int = 64) -> dict:
    """The smallest config the official code builds: its watermark module hard-codes widths
    (320, 640, 640) and indexes 3-entry per-block lists."""
    return {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": [320, 640], "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
            "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"], "cross_attention_dim": cross_attention_dim,
            "attention_head_dim": [8, 8, 8], "only_cross_attention": [False, False, False], "norm_num_groups": 32,
            "use_first_frame": True}


def parity(official_repo: str, diffusers_0111: str, *, backends=("reference", "sdpa"), frames: int = 4,
           size: int = 8, steps: int = 10, seed: int = 0, guidance: float = 4.0, reference_out: Optional[str] = None,
           log=print) -> dict:
    """Compare ours with the official code on random weights (fp32, CPU); returns the figures.

    The official side runs in a subprocess (``tools/official_reference.py``) that imports the
    official code from ``official_repo`` and diffusers 0.11.1 from ``diffusers_0111`` (the
    unpacked wheel). Figures are relative L2 errors ||ours - official|| / ||official||.
    ``reference_out``: keep the official outputs in this file and reuse them when it exists
    (same seed and sizes).
    """
    from .coarse import inject_subject_ids, word_token_ids
    from .tiny import clip_tokenizer
    from .pipeline import OFFICIAL_PLACEHOLDER, official_denoise, official_guidance, official_scheduler

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "official_reference.py")
    for path, what in ((official_repo, "--official-repo"), (diffusers_0111, "--diffusers-0111"), (script, "script")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{what}: {path} does not exist")
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_official_config()
    d_text, c_vis, b = cfg["cross_attention_dim"], 32, 2
    tok = clip_tokenizer()
    place = word_token_ids(tok, OFFICIAL_PLACEHOLDER)
    prompts = {"one occurrence": "a sdksd swimming in the tiny pond",
               "one occurrence, 73 tokens": "a sdksd " + " ".join(["pond"] * 69),
               "one occurrence, 74 tokens": "a sdksd " + " ".join(["pond"] * 70),
               "two occurrences": "a sdksd and another sdksd in the tiny pond"}
    ids = tok(list(prompts.values()), padding="max_length", max_length=77, truncation=True,
              return_tensors="pt")["input_ids"]
    inputs = {
        "seed": seed, "config": cfg, "clip_width": c_vis, "guidance": guidance, "steps": steps,
        "x": torch.randn(b, 4, frames, size, size, generator=g), "t": torch.tensor([417, 417]),
        "text": torch.randn(b, 77, d_text, generator=g), "null": torch.randn(b, 77, d_text, generator=g),
        "image_latent": torch.randn(b, 4, size, size, generator=g),
        "image_clip": torch.randn(b, 4, frames, size, size, generator=g),
        "layer_tokens": torch.randn(b, 5, 17, c_vis, generator=g),
        "token_table": torch.randn(49408, d_text, generator=g),
        "text_ids": list(ids), "placeholder_ids": [place] * len(prompts),
        "text_tokens": [torch.randn(5, d_text, generator=g) for _ in prompts],
        "z": torch.randn(1, 4, frames, size, size, generator=g),
    }
    if reference_out is not None and os.path.exists(reference_out):
        ref = torch.load(reference_out, weights_only=False)  # the official outputs of an earlier run
    else:
        with tempfile.TemporaryDirectory() as tmp:
            inp_path = os.path.join(tmp, "in.pt")
            out_path = reference_out or os.path.join(tmp, "out.pt")
            torch.save(inputs, inp_path)
            env = dict(os.environ, PYTHONPATH="")
            proc = subprocess.run([sys.executable, script, "--official-repo", official_repo, "--diffusers-0111",
                                   diffusers_0111, "--inputs", inp_path, "--out", out_path], env=env,
                                  capture_output=True, text=True, cwd=tmp)
            if proc.returncode != 0:
                raise RuntimeError(f"official reference failed:\n{proc.stderr[-4000:]}")
            ref = torch.load(out_path, weights_only=False)

    res = {"config": cfg, "frames": frames, "size": size, "steps": steps}
    x, t, text, null, img = inputs["x"], inputs["t"], inputs["text"], inputs["null"], inputs["image_latent"]
    with torch.no_grad():
        for backend in backends:
            bb, mapper = load_official(ref["unet_state"], ref["mapper_state"], cfg, attn_backend=backend)
            cond = bb(x, t, text, image_latents=img, null_encoder_hidden_states=null)
            uncond = bb(x, t, null)
            row = {"cond": _rel(cond, ref["cond"]), "uncond": _rel(uncond, ref["uncond"]),
                   "cond_image_clip": _rel(bb(x, t, text, image_latents=inputs["image_clip"],
                                              null_encoder_hidden_states=null), ref["cond_clip"]),
                   "cfg": _rel(official_guidance(cond, uncond, guidance), ref["cfg"])}
            res[backend] = row
            log(f"unet [{backend}] " + ", ".join(f"{k} {v:.2e}" for k, v in row.items()))
        res["mapper"] = _rel(mapper(inputs["layer_tokens"]), ref["mapper_out"])
        log(f"mapper {res['mapper']:.2e}")
        table = inputs["token_table"]
        res["text"] = {}
        for (name, prompt), row_ids, tokens, theirs in zip(prompts.items(), inputs["text_ids"], inputs["text_tokens"],
                                                           ref["text_injected"]):
            inj = inject_subject_ids(row_ids, place, tokens.shape[0], int(tok.eos_token_id), prompt, OFFICIAL_PLACEHOLDER)
            mine = table[inj.input_ids].clone()
            mine[inj.start:inj.start + inj.count] = tokens[:inj.count]
            res["text"][name] = _rel(mine, theirs)
            log(f"text injection [{name}] {res['text'][name]:.2e}")

        # Sampling loop: replay the official draws (image noise, then step noise, per step).
        noises = list(ref["sample_noises"])

        def replay(shape):
            n = noises.pop(0)
            return n[: shape[0]].reshape(shape) if n.dim() == len(shape) else n

        bb, _ = load_official(ref["unet_state"], ref["mapper_state"], cfg, attn_backend=backends[0])
        sched = official_scheduler(steps)
        res["timesteps_equal"] = sorted(int(v) for v in sched.timesteps) == sorted(ref["timestep_map"])
        final = official_denoise(bb, sched, inputs["z"], text[:1], null[:1], img[:1], guidance_scale=guidance,
                                 image_frames=frames, randn=replay)
        res["sampling"] = _rel(final, ref["sample_final"])
        log(f"sampling loop ({steps} steps, image branch on {frames} noised copies) {res['sampling']:.2e}; "
            f"timesteps equal: {res['timesteps_equal']}")
        # Ours, one image-branch frame: the same draws, frame 0's image noise only. Not equal by
        # design (the official frame 0 also sees its F-1 differently noised copies); the figure
        # says how far the cheaper branch moves the sample.
        noises = list(ref["sample_noises"])

        def replay_frame0(shape):
            n = noises.pop(0)
            return n[: shape[0], :, 0] if len(shape) == 4 else n[: shape[0]]

        final1 = official_denoise(bb, official_scheduler(steps), inputs["z"], text[:1], null[:1], img[:1],
                                  guidance_scale=guidance, image_frames=0, randn=replay_frame0)
        res["sampling_one_image_frame"] = _rel(final1, ref["sample_final"])
        log(f"sampling loop, image branch on one frame (not expected equal) {res['sampling_one_image_frame']:.2e}")
    return res


# ---- command line ---------------------------------------------------------------------------------------
def _cmd_parity(args) -> None:
    res = parity(args.official_repo, args.diffusers_0111, backends=tuple(args.backends.split(",")),
                 frames=args.frames, size=args.size, steps=args.steps, seed=args.seed,
                 reference_out=args.reference_out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


def _cmd_sample(args) -> None:
    """The official sample script's job on our kernels: weights + SD-1.4 folder + image + mask +
    prompt + word -> GIF/MP4."""
    import numpy as np
    import PIL.Image
    from diffusers import AutoencoderKL
    from diffusers.utils import export_to_gif, export_to_video
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel

    from .pipeline import OFFICIAL_DEFAULTS, VideoBoothPipeline

    config = None
    if args.sd14:
        with open(os.path.join(args.sd14, "unet", "config.json")) as fh:
            config = json.load(fh)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    vae = AutoencoderKL.from_pretrained(args.vae)
    tokenizer = CLIPTokenizer.from_pretrained(args.clip)
    text_encoder = CLIPTextModel.from_pretrained(args.clip)
    vision = CLIPVisionModel.from_pretrained(args.clip)
    pipe = VideoBoothPipeline.from_official(args.unet, args.mapper, vae=vae, text_encoder=text_encoder,
                                            tokenizer=tokenizer, image_encoder=vision, unet_config=config,
                                            attn_backend=args.attn_backend).to(device, dtype)
    image = PIL.Image.open(args.image).convert("RGB")
    mask = np.asarray(PIL.Image.open(args.mask)) if args.mask else None
    gen = torch.Generator(device).manual_seed(args.seed)
    frames = pipe.official_sample(args.prompt, args.word, image, mask, args.box, num_frames=args.frames,
                                  num_inference_steps=args.steps, guidance_scale=args.guidance,
                                  image_frames=0 if args.one_frame_image_branch else args.frames,
                                  height=args.height, generator=gen).frames[0]
    if args.out.lower().endswith(".gif"):
        export_to_gif(frames, args.out, fps=OFFICIAL_DEFAULTS["fps"])
    else:
        export_to_video(frames, args.out, fps=OFFICIAL_DEFAULTS["fps"])
    print(f"wrote {args.out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vb.official", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parity", help="compare with the official code (random weights, CPU, fp32)")
    p.add_argument("--official-repo", required=True, help="a checkout of Vchitect/VideoBooth")
    p.add_argument("--diffusers-0111", required=True, help="folder holding diffusers 0.11.1's diffusers/ package")
    p.add_argument("--backends", default="reference,sdpa",
                   help="comma-separated vb_kernels backends (triton on CPU needs TRITON_INTERPRET=1)")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=8, help="latent height = width")
    p.add_argument("--steps", type=int, default=10, help="sampling steps of the loop check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--reference-out", default=None, help="keep (and reuse) the official outputs in this file")
    p.set_defaults(func=_cmd_parity)
    q = sub.add_parser("sample", help="generate a video with the released weights (the official sample script's job)")
    q.add_argument("--unet", required=True, help="watermark_remove_module.pt")
    q.add_argument("--mapper", required=True, help="mapper.pt")
    q.add_argument("--sd14", default=None, help="SD-1.4 folder (its unet/config.json); default SD-1.4's config")
    q.add_argument("--vae", default="stabilityai/sd-vae-ft-ema")
    q.add_argument("--clip", default="openai/clip-vit-large-patch14", help="tokenizer, text and image encoder")
    q.add_argument("--image", required=True)
    q.add_argument("--mask", default=None)
    q.add_argument("--box", type=float, nargs=4, default=None, metavar=("X1", "Y1", "X2", "Y2"))
    q.add_argument("--prompt", required=True)
    q.add_argument("--word", required=True, help="the subject word the image prompt replaces")
    q.add_argument("--out", default="videobooth.gif", help=".gif or .mp4")
    q.add_argument("--frames", type=int, default=16)
    q.add_argument("--height", type=int, default=256, help="video height = width in pixels")
    q.add_argument("--steps", type=int, default=250)
    q.add_argument("--guidance", type=float, default=4.0)
    q.add_argument("--seed", type=int, default=10)
    q.add_argument("--attn-backend", default="auto")
    q.add_argument("--device", default=None)
    q.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    q.add_argument("--one-frame-image-branch", action="store_true",
                   help="run the image branch once per step instead of on F copies with their own noise "
                        "(cheaper; not the official code's sample)")
    q.set_defaults(func=_cmd_sample)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
