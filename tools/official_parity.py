"""Parity of this project's VideoBooth with the official code (Vchitect/VideoBooth @ d10e06f), on
random weights (fp32, CPU): the U-Net's conditional / unconditional / guided outputs per attention
backend, the mapper, the subject-token injection and the whole sampling loop (replaying the
official noise draws). The official side runs in a subprocess (``official_reference.py`` beside
this file) that imports the official code from the user's checkout; no official code is part of
this project. A tool, not part of the model's import path:

    python tools/official_parity.py parity --official-repo PATH --diffusers-0111 PATH [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Optional

import torch

from vb.coarse import encode_prompt, inject_subject_ids, word_token_ids
from vb.latents import encode_latents
from vb.official.convert import load_official, tiny_official_config
from vb.official.sampler import OFFICIAL_PLACEHOLDER, official_denoise, official_guidance, official_scheduler
from vb.tokenizer import clip_tokenizer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


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
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_reference.py")
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
    # The pipeline check's own inputs: an image prompt, its latent by our VAE, our null text "".
    parts = _stream_parts(d_text, seed)
    pipe_image = torch.rand(3, 2 * size, 2 * size, generator=g)
    with torch.no_grad():
        inputs["pipe_image_latent"] = encode_latents(parts["vae"], pipe_image[None] * 2 - 1, sample=False)
        inputs["pipe_null"] = encode_prompt(parts["text_encoder"], parts["tokenizer"], [""])[0]
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

        # The pipeline's own loop (VideoBoothPipeline.__call__, image_stream="official", the
        # official scheduler, guidance 1: the conditional pass alone) against the official
        # p_sample_loop at cfg_scale 1 on the same image latent and null text, the official draws
        # replayed: F image copies, then the step's noise, at every step.
        if "pipe_sample_final" in ref:
            import diffusers.schedulers.scheduling_ddpm as ddpm_mod
            import vb.pipeline as pipe_mod
            from vb import VideoBoothPipeline

            pipe = VideoBoothPipeline(parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["image_encoder"],
                                      parts["mapper"], bb, official_scheduler(steps))
            pipe.set_progress_bar_config(disable=True)
            noises = list(ref["pipe_sample_noises"])

            def replay_any(shape, *args, **kwargs):
                n = noises.pop(0)
                return n[: shape[0]].reshape(shape)

            for stream, key in (("official", "pipeline_official_stream"), ("one", "pipeline_one_copy_stream")):
                noises = list(ref["pipe_sample_noises"])
                if stream == "one":  # one draw for the whole loop (frame 0 of the first), then the steps'
                    first = noises.pop(0)
                    noises = [first[:, :, 0]] + [n for i, n in enumerate(noises) if i % 2 == 0]
                saved = pipe_mod.randn_tensor, ddpm_mod.randn_tensor
                pipe_mod.randn_tensor = ddpm_mod.randn_tensor = replay_any
                try:
                    out = pipe(prompt_embeds=text[:1], image_prompt=pipe_image, num_frames=frames,
                               height=2 * size, width=2 * size, num_inference_steps=steps, guidance_scale=1.0,
                               latents=inputs["z"], output_type="latent", image_stream=stream).frames
                finally:
                    pipe_mod.randn_tensor, ddpm_mod.randn_tensor = saved
                res[key] = _rel(out, ref["pipe_sample_final"])
            log(f"pipeline __call__ ({steps} steps, guidance 1): official stream {res['pipeline_official_stream']:.2e}; "
                f"one-copy stream (not expected equal) {res['pipeline_one_copy_stream']:.2e}")
    return res


def _stream_parts(d_text: int, seed: int) -> dict:
    """Tiny random components of the pipeline check (the backbone is the official one loaded
    later): the tiny VAE (factor 2), a CLIP text encoder of the official config's width, the tiny
    image encoder and mapper (their output is not used: the check passes ``prompt_embeds``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    import vb

    tiny = vb.build_tiny_videobooth("unet", seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=d_text, intermediate_size=2 * d_text, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407)).eval()
    return {"vae": tiny.vae.eval(), "text_encoder": text_encoder, "tokenizer": tiny.tokenizer,
            "image_encoder": tiny.image_encoder, "mapper": tiny.mapper}


def _cmd_parity(args) -> None:
    res = parity(args.official_repo, args.diffusers_0111, backends=tuple(args.backends.split(",")),
                 frames=args.frames, size=args.size, steps=args.steps, seed=args.seed,
                 reference_out=args.reference_out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python tools/official_parity.py", description=__doc__.splitlines()[0])
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
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
