"""``python -m vb.official sample ...``: the official sample script's job on this project's kernels
(the released weights + SD-1.4's VAE and CLIP -> a GIF or MP4; docs/official.md). Not imported by
the model."""
from __future__ import annotations

import argparse
import json
import os

import torch

from ..pipeline import VideoBoothPipeline
from .sampler import OFFICIAL_DEFAULTS


def _cmd_sample(args) -> None:
    """The official sample script's job on our kernels: weights + SD-1.4 folder + image + mask +
    prompt + word -> GIF/MP4."""
    import numpy as np
    import PIL.Image
    from diffusers import AutoencoderKL
    from diffusers.utils import export_to_gif, export_to_video
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel

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
