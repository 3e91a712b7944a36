"""Toy-scale ablations of VideoBooth (the paper's and the review's) on the CPU demo's setup.

    python -m train.ablations --out ablations_out          # about 30 minutes on 2 idle CPU cores
    python -m train.ablations --out /tmp/a --quick --arms both,coarse   # a smoke run

Every arm is a short training run of the tiny VideoBooth of `train.demo` (same synthetic data,
same pretrained tiny VAE, same held-out subjects, same seeds) followed by the demo's evaluation:
videos of held-out subjects with their image prompt and text only (grey image prompt), from the
same initial noise, scored with `train.metrics.color_identity` (no CLIP). The table's main
column is the paired difference color_id(with image) - color_id(text only): how much identity
the image prompt adds. It is a toy (16x16 px, random-init components, a few hundred steps per
arm, one seed): differences smaller than the confidence intervals mean nothing.

Arms (ARMS below):
- the paper's: both paths two-stage (the reference arm), coarse only, fine only, and one-stage
  joint training of both paths (as many steps as stage 1 + stage 2);
- the review's: learned query projection (`learn_query`), compact image-token banks
  (`pool:2`, `learned:4`; the reference arm keeps all tokens), and the temporal schedules
  (videobooth, first, window2, keyframes4) on long clips: the reference arm's stage-2 weights
  fine-tuned briefly on 32-frame clips with each schedule, evaluated on 32-frame videos, with
  the identity of the last 8 frames as its own column (does identity survive far from frame 0?).

Outputs under --out: ablations.md (one table), ablations.png (Δ per arm with its interval),
ablations.json, and each arm's run directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import evaluation as E
from . import experiment as X

log = logging.getLogger("train.ablations")


@dataclass(frozen=True)
class Arm:
    key: str
    group: str           # "paper", "review", "schedule"
    name: str
    stage1: Optional[dict]   # overrides of stage 1 (None: no stage 1, see one_stage)
    stage2: dict             # overrides of stage 2
    shares_stage1: bool = True   # stage 1 is the reference arm's (same overrides)
    one_stage: bool = False      # stage 2 only, from scratch, steps1 + steps2 steps
    schedule: Optional[str] = None   # long-clip arm: fine-tune the reference arm with this schedule


ARMS: List[Arm] = [
    Arm("both", "paper", "coarse + fine, two-stage (VideoBooth)", {}, {}),
    Arm("coarse", "paper", "coarse only (no fine path)", {}, {"model.fine_path": False}),
    Arm("fine", "paper", "fine only (no coarse path)", {"model.coarse_path": False},
        {"model.coarse_path": False}, shares_stage1=False),
    Arm("onestage", "paper", "coarse + fine, one-stage joint", None, {}, shares_stage1=False, one_stage=True),
    Arm("learnq", "review", "learned query projection", {}, {"model.learn_query": True}),
    Arm("pool2", "review", "image-token bank pool:2 (M/4 tokens)", {}, {"model.image_bank": "pool:2"}),
    Arm("learned4", "review", "image-token bank learned:4 (4 tokens)", {}, {"model.image_bank": "learned:4"}),
    Arm("long_videobooth", "schedule", "schedule videobooth", None, {}, schedule="videobooth"),
    Arm("long_first", "schedule", "schedule first", None, {}, schedule="first"),
    Arm("long_window2", "schedule", "schedule window2", None, {}, schedule="window2"),
    Arm("long_keyframes4", "schedule", "schedule keyframes4", None, {}, schedule="keyframes4"),
]


@dataclass
class AblationSettings:
    demo: X.DemoSettings
    long_frames: int = 32        # frames of the long clips (training and generation)
    long_steps: int = 60         # fine-tuning steps per schedule on long clips
    long_batch: int = 2
    long_subjects: int = 16      # held-out subjects generated at long_frames
    long_inference_steps: int = 15
    arms: Sequence[str] = tuple(a.key for a in ARMS)

    @classmethod
    def default(cls, **demo_kw) -> "AblationSettings":
        kw = dict(steps1=600, steps2=600, data_frames=32)
        kw.update(demo_kw)
        return cls(X.DemoSettings(**kw))

    @classmethod
    def quick(cls, arms: Sequence[str] = ("both", "coarse"), **demo_kw) -> "AblationSettings":
        kw = dict(data_frames=8)
        kw.update(demo_kw)
        return cls(X.DemoSettings.quick(**kw), long_frames=8, long_steps=1, long_batch=1, long_subjects=2,
                   long_inference_steps=2, arms=tuple(arms))


def _scores(pipe, items, s: X.DemoSettings, frames: int, last: Optional[int] = None) -> dict:
    vi = E.generate_videos(pipe, items, s, image=True, seed=s.seed, num_frames=frames)
    vt = E.generate_videos(pipe, items, s, image=False, seed=s.seed, num_frames=frames)
    ri, rt = E.identity_scores(vi, items), E.identity_scores(vt, items)
    out = {"color_id_image": float(np.mean([r["color_id"] for r in ri])),
           "color_id_text": float(np.mean([r["color_id"] for r in rt])),
           "color_top1_image": float(np.mean([r["color_top1"] for r in ri])),
           "delta": E.paired_difference(ri, rt)}
    if last:
        sl = slice(frames - last, frames)
        li, lt = E.identity_scores(vi, items, sl), E.identity_scores(vt, items, sl)
        out["color_id_image_last"] = float(np.mean([r["color_id"] for r in li]))
        out["delta_last"] = E.paired_difference(li, lt)
    return out


def run_ablations(a: AblationSettings, out: Path) -> dict:
    s = a.demo
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    keys = set(a.arms)
    unknown = keys - {x.key for x in ARMS}
    if unknown:
        raise ValueError(f"arms: unknown {sorted(unknown)}; known: {[x.key for x in ARMS]}")
    if s.data_frames < a.long_frames and any(x.schedule for x in ARMS if x.key in keys):
        s = dataclasses.replace(s, data_frames=a.long_frames)
    train_root, held_root = X.make_data(s, out / "data")
    items = X.make_eval_items(s, held_root)
    long_s = dataclasses.replace(s, frames=a.long_frames, frame_stride=1, inference_steps=a.long_inference_steps,
                                 batch_size=a.long_batch)
    vae_file = out / "vae" / "vae.safetensors"
    vae_stats = X.pretrain_vae(s, train_root, vae_file)
    runs = out / "runs"
    results: Dict[str, dict] = {}
    long_items = None

    def stage1_of(arm: Arm) -> Path:
        d = runs / ("stage1" if arm.shares_stage1 else f"{arm.key}-stage1")
        if not (d / "checkpoints").is_dir():
            cfg = X.stage_config(s, 1, data_root=train_root, output_dir=d, vae_file=vae_file, overrides=arm.stage1)
            summ = X.run_stage(cfg)
            results.setdefault("_stage1", {})[d.name] = {"seconds": summ["seconds"], "loss_last": summ["loss_last"]}
        return d

    need_both = bool(keys & {x.key for x in ARMS if x.schedule})
    order = [x for x in ARMS if x.key in keys or (x.key == "both" and need_both)]
    for arm in order:
        t0 = time.perf_counter()
        print(f"[ablations] {arm.key}: {arm.name}", flush=True)
        if arm.schedule:
            base = runs / "both-stage2"
            d = runs / arm.key
            over = dict(arm.stage2, **{"data.num_frames": a.long_frames, "data.frame_stride": 1,
                                       "schedule": arm.schedule, "lr_warmup_steps": 0})
            cfg = X.stage_config(dataclasses.replace(long_s, steps2=a.long_steps), 2, data_root=train_root,
                                 output_dir=d, vae_file=vae_file, init_from=base, overrides=over)
            summ = X.run_stage(cfg)
            if long_items is None:
                long_items = X.make_eval_items(long_s, held_root)[:a.long_subjects]
            pipe = E.load_trained_pipeline(cfg, d)
            sc = _scores(pipe, long_items, long_s, a.long_frames, last=8)
            steps = f"{s.steps1} + {s.steps2} (4 fr) + {a.long_steps} ({a.long_frames} fr)"
        else:
            if arm.one_stage:
                cfg = X.stage_config(dataclasses.replace(s, steps2=s.steps1 + s.steps2), 2, data_root=train_root,
                                     output_dir=runs / f"{arm.key}-stage2", vae_file=vae_file, overrides=arm.stage2)
                steps = f"{s.steps1 + s.steps2} (stage 2 only)"
            else:
                s1 = stage1_of(arm)
                cfg = X.stage_config(s, 2, data_root=train_root, output_dir=runs / f"{arm.key}-stage2",
                                     vae_file=vae_file, init_from=s1, overrides=arm.stage2)
                steps = f"{s.steps1} + {s.steps2}"
            summ = X.run_stage(cfg)
            pipe = E.load_trained_pipeline(cfg, Path(cfg.output_dir))
            sc = _scores(pipe, items, s, s.frames)
        sc.update(name=arm.name, group=arm.group, steps=steps, loss_last=summ["loss_last"],
                  seconds=round(time.perf_counter() - t0, 1),
                  n=len(long_items) if arm.schedule else len(items))
        results[arm.key] = sc
        d_ = sc["delta"]
        print(f"[ablations] {arm.key}: color_id image {sc['color_id_image']:.3f} text {sc['color_id_text']:.3f} "
              f"delta {d_['mean']:+.3f} [{d_['ci95'][0]:+.3f}, {d_['ci95'][1]:+.3f}] ({sc['seconds']:.0f} s)",
              flush=True)
    total = round(time.perf_counter() - t_start, 1)
    table = markdown(results, [x.key for x in order if x.key in keys])
    res = {"settings": {"demo": dataclasses.asdict(s), **{k: v for k, v in dataclasses.asdict(a).items()
                                                          if k != "demo"}},
           "arms": results, "vae": vae_stats, "seconds": total, "table": table}
    (out / "ablations.json").write_text(json.dumps(res, indent=1))
    md = ["# VideoBooth ablations at toy scale", "",
          f"Tiny VideoBooth (random-init components, pretrained tiny VAE), 16x16 px, one seed; "
          f"{len(items)} held-out subjects (4-frame arms), {a.long_subjects} (long-clip arms, "
          f"{a.long_frames} frames). Δ = color_id(with image prompt) - color_id(text only), paired over "
          f"subjects (same initial noise), 95% bootstrap CI. Toy scale: read differences within the CIs as "
          f"no difference.", "", table, "", f"Total wall time {total:.0f} s."]
    plot(results, [x.key for x in order if x.key in keys], out / "ablations.png")
    md[-1:-1] = ["![ablations](ablations.png)", ""]
    (out / "ablations.md").write_text("\n".join(md) + "\n")
    return res


def markdown(results: Dict[str, dict], keys: Sequence[str]) -> str:
    lines = ["| group | arm | steps | color_id (image) | color_id (text only) | Δ image - text [95% CI] | "
             "colour top-1 (image) | last 8 frames: color_id (image) / Δ | train+eval s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        r = results[k]
        d = r["delta"]
        last = "-"
        if "delta_last" in r:
            dl = r["delta_last"]
            last = f"{r['color_id_image_last']:.3f} / {dl['mean']:+.3f} [{dl['ci95'][0]:+.3f}, {dl['ci95'][1]:+.3f}]"
        lines.append(f"| {r['group']} | {r['name']} | {r['steps']} | {r['color_id_image']:.3f} | "
                     f"{r['color_id_text']:.3f} | {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | "
                     f"{r['color_top1_image']:.3f} | {last} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: Dict[str, dict], keys: Sequence[str], path: Path) -> Path:
    """A horizontal bar chart of each arm's Δ (color_id with image - text only) with its 95%
    bootstrap interval, one colour per group; the long-clip arms also show Δ on the last 8 frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"paper": "tab:blue", "review": "tab:orange", "schedule": "tab:green"}
    keys = list(keys)
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(keys) + 1.2), dpi=110)
    for i, k in enumerate(keys):
        r = results[k]
        d = r["delta"]
        y = len(keys) - 1 - i
        err = [[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]]
        ax.barh(y, d["mean"], xerr=err, color=colours.get(r["group"], "grey"), alpha=0.85, capsize=3)
        if "delta_last" in r:
            dl = r["delta_last"]
            ax.plot([dl["mean"]], [y], marker="D", color="black", ms=4,
                    label="last 8 frames" if "last 8 frames" not in ax.get_legend_handles_labels()[1] else None)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([results[k]["name"] for k in reversed(keys)], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("Δ color_id, with image prompt - text only (95% bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.85) for g, c in colours.items()
               if any(results[k]["group"] == g for k in keys)]
    labels = [g for g in colours if any(results[k]["group"] == g for k in keys)]
    h2, l2 = ax.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.ablations", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="ablations_out")
    p.add_argument("--quick", action="store_true", help="tiny everything (a smoke run; numbers mean nothing)")
    p.add_argument("--arms", help=f"comma-separated subset of {[a.key for a in ARMS]}")
    p.add_argument("--steps1", type=int)
    p.add_argument("--steps2", type=int)
    p.add_argument("--long-steps", type=int, dest="long_steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the demo's)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads: expected an int >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    kw = {k: getattr(args, k) for k in ("steps1", "steps2") if getattr(args, k) is not None}
    if args.no_progress:
        kw["progress"] = False
    if args.quick:
        a = AblationSettings.quick(**kw) if not args.arms else AblationSettings.quick(args.arms.split(","), **kw)
    else:
        a = AblationSettings.default(**kw)
        if args.arms:
            a.arms = tuple(args.arms.split(","))
    if args.long_steps is not None:
        a.long_steps = args.long_steps
    res = run_ablations(a, Path(args.out))
    print()
    print(res["table"])
    print(f"\nwrote {args.out}/ablations.md, ablations.json ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
