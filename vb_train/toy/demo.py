"""The CPU demo: synthetic data -> a tiny VideoBooth trained through both stages -> videos of
held-out subjects with and without the image prompt -> GIFs and an identity-metric table.

    python -m vb_train.toy.demo --out demo_out            # about 8 minutes on 2 idle CPU cores
    python -m vb_train.toy.demo --out /tmp/q --quick      # seconds: a smoke run, numbers mean nothing
    python -m vb_train.toy.ablations --out ablations_out   # the ablations (vb_train.toy.ablations, one table)

What it does (docs/demo.md says more):

1. data: the synthetic subject-video set (`vb_train.toy.synthetic`) twice, training subjects and
   held-out subjects (identities never seen in training, `subject_split`), with the SHORT
   captions ("a star moving left on a grey background"): colour and pattern are never in the
   text, so a generated subject can only get them from the image prompt.
2. VAE: every component of `vb.build_tiny_videobooth` is random, and a random VAE decodes to
   noise whatever the latents are, so the tiny VAE is trained first as an autoencoder on the
   training frames and image prompts (the paper starts from SD's pretrained VAE), then rescaled
   so that its scaled latents have unit variance; the VideoBooth task loads it through
   `model.base_weights`. The CLIP image encoder and the text encoder stay random and frozen.
3. stage 1 then stage 2 with the trainer (`vb_train.trainer.Trainer`, `configs/demo_stage{1,2}.yaml`);
   the base U-Net trains too (`model.extra_trainable: ['^backbone\\.']`), from random weights.
4. generation (`vb.VideoBoothPipeline`, DDIM) for every held-out subject twice, with the same
   initial noise: with its image prompt, and text only (a grey image prompt: what the trainer's
   condition dropout feeds the model when the image is dropped).
5. metrics on held-out subjects (`vb_train.metrics.color_identity`, no CLIP): the subject's own
   prompt against the video, other held-out prompts against the video, colour retrieval; the
   real held-out clips give the ceiling. CLIP-I/CLIP-T/DINO only with real pretrained encoders
   (`--clip ViT-B-32 --clip-pretrained openai --dino vit_small_patch16_224.dino`): random-weight
   encoders would give numbers that mean nothing, so the demo leaves them out by default.

Outputs under --out: data/, vae/, runs/stage1, runs/stage2 (trainer run directories: loss
logs, checkpoints, the exported adapter), metrics.md, metrics.json, per_video.json, gifs/,
loss.png (both stages' training loss).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .evaluation import (ARM_IMAGE, ARM_REAL, ARM_TEXT, ARM_VAE, COLUMNS, chance_color_top1,  # noqa: F401
                         encoder_metrics, generate_videos, identity_scores,
                         load_trained_pipeline, markdown_table, paired_difference, plot_losses, summarize,
                         vae_roundtrip, write_arm_gifs, write_grid)
from .experiment import (DemoSettings, EvalItem, make_data, make_eval_items, pretrain_vae,  # noqa: F401
                         run_stage, stage_config, train_two_stages)

log = logging.getLogger("vb_train.toy.demo")


# ================================================================================================
# the whole demo
# ================================================================================================
def load_encoders(args) -> tuple:
    clip = dino = None
    if args.clip:
        from ..metrics import ClipEncoder
        clip = ClipEncoder.from_pretrained(args.clip, args.clip_pretrained)
    if args.dino:
        from ..metrics import DinoEncoder
        dino = DinoEncoder.from_pretrained(args.dino)
    return clip, dino


def run_demo(s: DemoSettings, out: Path, *, clip=None, dino=None, encoder_names: Optional[dict] = None) -> dict:
    """The demo end to end (module docstring); returns the results dict also written to
    out/metrics.json."""
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    def mark(name, t0):
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("%s: %.1f s", name, timings[name])

    t0 = time.perf_counter()
    train_root, held_root = make_data(s, out / "data")
    items = make_eval_items(s, held_root)
    mark("data", t0)
    print(f"[demo] data: {s.train_clips} training clips, {len(items)} held-out subjects", flush=True)

    t0 = time.perf_counter()
    vae_file = out / "vae" / "vae.safetensors"
    vae_stats = pretrain_vae(s, train_root, vae_file)
    mark("vae", t0)
    print(f"[demo] vae: reconstruction MSE {vae_stats['recon_mse']:.4f} ([-1, 1] pixels)", flush=True)

    t0 = time.perf_counter()
    cfg2, summaries = train_two_stages(s, out / "runs", train_root, vae_file)
    mark("train", t0)
    for k, v in summaries.items():
        print(f"[demo] {k}: {v['steps']} steps in {v['seconds']} s, loss {v['loss_first']:.4f} -> "
              f"{v['loss_last']:.4f}", flush=True)

    t0 = time.perf_counter()
    pipe = load_trained_pipeline(cfg2, out / "runs" / "stage2")
    real = torch.stack([it.video for it in items])
    vids = {ARM_REAL: real, ARM_VAE: vae_roundtrip(pipe, real),
            ARM_IMAGE: generate_videos(pipe, items, s, image=True, seed=s.seed),
            ARM_TEXT: generate_videos(pipe, items, s, image=False, seed=s.seed)}
    mark("generate", t0)

    t0 = time.perf_counter()
    per_arm = {arm: identity_scores(v, items) for arm, v in vids.items()}
    if clip is not None or dino is not None:
        for arm, v in vids.items():
            for row, extra in zip(per_arm[arm], encoder_metrics(v, items, clip, dino)):
                row.update(extra)
    agg = summarize(per_arm)
    diff = paired_difference(per_arm[ARM_IMAGE], per_arm[ARM_TEXT])
    chance = chance_color_top1(items)
    mark("metrics", t0)

    t0 = time.perf_counter()
    gifs = out / "gifs"
    r = min(s.gif_rows, len(items))
    labels = [" ".join(reversed(it.identity)) for it in items[:r]]
    side = s.size * s.gif_scale
    files = write_grid(gifs / "grid.gif", {"real clip": vids[ARM_REAL][:r], "with image": vids[ARM_IMAGE][:r],
                                           "text only": vids[ARM_TEXT][:r]},
                       torch.stack([it.image for it in items[:r]]), side=side, labels=labels)
    for arm, tag in ((ARM_IMAGE, "with_image"), (ARM_TEXT, "text_only")):
        files += write_arm_gifs(gifs / tag, vids[arm], items, arm, side=side, rows=r)
    files.append(plot_losses({"stage 1": out / "runs" / "stage1", "stage 2": out / "runs" / "stage2"},
                             out / "loss.png"))
    mark("gifs", t0)

    table = markdown_table(agg)
    timings["total"] = round(time.perf_counter() - t_start, 1)
    results = {
        "settings": dataclasses.asdict(s),
        "arms": agg,
        "image_minus_text_color_id": diff,
        "chance_color_top1": chance,
        "vae": vae_stats,
        "training": summaries,
        "timings_s": timings,
        "encoders": encoder_names or {"clip": None, "dino": None},
        "heldout_subjects": [" ".join(it.identity) for it in items],
        "torch_threads": torch.get_num_threads(),
    }
    (out / "metrics.json").write_text(json.dumps(results, indent=1))
    (out / "per_video.json").write_text(json.dumps(
        {arm: [dict(subject=" ".join(it.identity), **row) for it, row in zip(items, rows)]
         for arm, rows in per_arm.items()}, indent=1))
    md = [
        "# VideoBooth CPU demo: held-out subjects, with and without the image prompt", "",
        f"{len(items)} held-out subjects (colour/pattern/shape combinations never seen in training); "
        f"captions name shape, motion and background only. Toy scale: {s.size}x{s.size} px, "
        f"{s.frames} frames, every component random-init; {s.steps1} + {s.steps2} training steps.", "",
        table, "",
        f"- with image - text only, color_id (paired, same noise): {diff['mean']:+.3f} "
        f"(95% bootstrap CI {diff['ci95'][0]:+.3f} .. {diff['ci95'][1]:+.3f}); the image-prompted video "
        f"scores higher for {diff['wins']} of {diff['n']} subjects.",
        f"- color_top1 chance level (a video matching a random held-out prompt): {chance:.3f}.",
        "- color_id: colour-histogram identity of the subject (vb_train.metrics.color_identity, no CLIP) against "
        "the subject's own image prompt; color_id_other: the same against the other held-out subjects' prompts; "
        "color_top1: the best-matching held-out prompt has the subject's colour.",
    ]
    if clip is None and dino is None:
        md.append("- CLIP-I / CLIP-T / DINO left out: no pretrained encoders here, and random-weight ones give "
                  "meaningless numbers (pass --clip ViT-B-32 --clip-pretrained openai --dino "
                  "vit_small_patch16_224.dino where the weights can be loaded).")
    md.append(f"- wall time {timings['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')}).")
    (out / "metrics.md").write_text("\n".join(md) + "\n")
    results["table"] = table
    results["files"] = [str(p) for p in files]
    return results


GUIDANCE_SWEEP = ((1.0, "grey"), (2.0, "grey"), (4.0, "grey"), (4.0, "none"))


def guidance_sweep(s: DemoSettings, out: Path, points=GUIDANCE_SWEEP) -> list:
    """Classifier-free guidance on the demo's trained run (out/runs/stage2): per (guidance,
    unconditional image) point, color_id with the image prompt and text only from the same
    noise, their paired difference and colour top-1; written to out/guidance_sweep.json."""
    out = Path(out)
    if not (out / "runs" / "stage2").is_dir():
        raise FileNotFoundError(f"out: no trained demo run in {out}/runs/stage2 (run the demo first)")
    cfg2 = stage_config(s, 2, data_root=out / "data" / "train", output_dir=out / "runs" / "stage2",
                        vae_file=out / "vae" / "vae.safetensors", init_from=out / "runs" / "stage1")
    items = make_eval_items(s, out / "data" / "heldout")
    pipe = load_trained_pipeline(cfg2, out / "runs" / "stage2")
    rows = []
    for g, uncond in points:
        gs = dataclasses.replace(s, guidance_scale=g, uncond_image=uncond)
        im = identity_scores(generate_videos(pipe, items, gs, image=True, seed=s.seed), items)
        tx = identity_scores(generate_videos(pipe, items, gs, image=False, seed=s.seed), items)
        mean = (lambda rs, k: float(sum(r[k] for r in rs) / len(rs)))
        rows.append({"guidance": g, "uncond_image": uncond, "color_id_image": mean(im, "color_id"),
                     "color_id_text": mean(tx, "color_id"), "diff": paired_difference(im, tx),
                     "top1_image": mean(im, "color_top1"), "top1_text": mean(tx, "color_top1")})
        print(f"[demo] guidance {g} ({uncond}): color_id {rows[-1]['color_id_image']:.3f} / "
              f"{rows[-1]['color_id_text']:.3f}", flush=True)
    (out / "guidance_sweep.json").write_text(json.dumps(rows, indent=1))
    return rows


# ================================================================================================
# command line
# ================================================================================================
def build_parser() -> argparse.ArgumentParser:
    d = DemoSettings()
    p = argparse.ArgumentParser(prog="python -m vb_train.toy.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and steps: a smoke run in seconds")
    p.add_argument("--seed", type=int)
    p.add_argument("--train-clips", type=int, dest="train_clips")
    p.add_argument("--heldout-subjects", type=int, dest="heldout_subjects")
    p.add_argument("--size", type=int, help=f"frame side in pixels (default {d.size})")
    p.add_argument("--frames", type=int, help=f"frames per clip (default {d.frames})")
    p.add_argument("--subject-radius", type=float, nargs=2, dest="subject_radius", metavar=("LO", "HI"),
                   help=f"subject radius range, fraction of the frame side (default {d.subject_radius})")
    p.add_argument("--vae-steps", type=int, dest="vae_steps")
    p.add_argument("--steps1", type=int, help=f"stage-1 steps (default {d.steps1})")
    p.add_argument("--steps2", type=int, help=f"stage-2 steps (default {d.steps2})")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--attn-backend", dest="attn_backend", choices=("reference", "sdpa", "triton"),
                   help="attention backend for training and generation (default reference; triton on a CPU "
                        "needs TRITON_INTERPRET=1 and is slow)")
    p.add_argument("--inference-steps", type=int, dest="inference_steps")
    p.add_argument("--guidance-scale", type=float, dest="guidance_scale")
    p.add_argument("--uncond-image", choices=("none", "grey"), dest="uncond_image")
    p.add_argument("--clip", help="open_clip model for CLIP-I/CLIP-T, e.g. ViT-B-32 (needs its weights)")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag (default openai)")
    p.add_argument("--dino", help="timm DINO model for DINO-I, e.g. vit_small_patch16_224.dino (needs weights)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the float rounding, so the table's digits, depends on "
                        "the thread count, and one thread is also the fastest on a shared CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--guidance-sweep", action="store_true", dest="guidance_sweep",
                   help="only the guidance sweep on the trained run already in --out (guidance_sweep.json)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="more trainer config overrides for both stages (model.fine_path=true, ...)")
    return p


def settings_from_args(args) -> DemoSettings:
    kw = {k: getattr(args, k) for k in ("seed", "train_clips", "heldout_subjects", "size", "frames", "vae_steps",
                                         "steps1", "steps2", "batch_size", "lr", "attn_backend", "inference_steps", "subject_radius",
                                         "guidance_scale", "uncond_image") if getattr(args, k, None) is not None}
    if args.no_progress:
        kw["progress"] = False
    extra = {}
    for item in args.overrides:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r}: expected key=value")
        import yaml
        extra[k] = yaml.safe_load(v)
    kw["extra"] = extra
    return DemoSettings.quick(**kw) if args.quick else DemoSettings(**kw)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.threads < 1:
        raise SystemExit(f"--threads: expected an int >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    s = settings_from_args(args)
    clip, dino = load_encoders(args)
    if args.guidance_sweep:
        guidance_sweep(s, Path(args.out))
        print(f"wrote {args.out}/guidance_sweep.json")
        return 0
    names = {"clip": f"{args.clip}/{args.clip_pretrained}" if args.clip else None, "dino": args.dino}
    res = run_demo(s, Path(args.out), clip=clip, dino=dino, encoder_names=names)
    print()
    print((Path(args.out) / "metrics.md").read_text())
    print(f"wrote {args.out}/metrics.md, metrics.json, per_video.json, gifs/grid.gif")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
