"""Toy-scale ablations of VideoBooth (the paper's and the review's) on the two-tone toy.

    python -m vb_train.toy.ablations --out ablations_out --jobs 2      # 47 minutes on the shared 2-core CPU
    python -m vb_train.toy.ablations --out /tmp/a --quick              # a smoke run (numbers mean nothing)

The toy (docs/demo.md): the tiny VideoBooth of `vb_train.toy.demo` on the two-tone synthetic set
(`vb_train.toy.synthetic`, identity_kind="two-tone"): a square whose upper half has colour A and lower
half colour B; the identity is the ordered pair, and held-out subjects are colour pairs never
seen in training, in both orders. The coarse path's image tower is a bag of patches
(`model.clip_positions: false`), so its features carry the colour set but not which colour is on
top (`python -m vb_train.toy.probe` checks that with linear probes); the fine path's image latent
carries both. Two metrics, neither uses CLIP:

- order (the detail): `vb_train.metrics.two_tone_order`, +1 when the video keeps A over B, -1 when
  it swaps them, 0 without both colours; text only (grey image prompt) is about 0;
- colour (the colour set): `vb_train.metrics.color_identity`, a colour-histogram match.

Every arm trains the tiny model from the same data and VAE and is evaluated on the same
held-out clips with the image prompt and text only (a grey prompt), from the same initial
noise. Each arm generates as it was trained: no fine-path branch for arms trained without it
(image_prompt_scale 0), no subject-token injection for arms trained without the coarse path.

Arms (ARMS): the paper's (both paths two-stage = the reference, coarse only, fine only, one-stage
joint), the baseline a practitioner would pick (IP-Adapter: decoupled image cross-attention,
`vb_train.toy.ip_adapter`), a diagnostic (coarse only with the image tower's positional embedding kept:
does the coarse path then learn the arrangement?), the review's (learned query projection; compact image banks pool:2, pool:4,
learned:4, learned:16, with their attention cost), and schedules on long clips (the reference
arm fine-tuned on 32-frame clips with each schedule, identity per frame index). Paper and
baseline arms run `seeds` seeds (intervals across seeds and subjects); the others one.

Outputs under --out: ablations.md (tables), ablations.json, one plot per group
(ablations_paper.png, ablations_review.png, ablations_schedule.png), each unit's result under
units/ (a rerun with the same --out skips finished units), and the run directories.
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

log = logging.getLogger("vb_train.toy.ablations")


@dataclass(frozen=True)
class Arm:
    key: str
    group: str                     # "paper", "baseline", "review", "schedule"
    name: str
    stage1: Optional[dict]         # overrides of stage 1 (None: no stage 1 of its own, see one_stage)
    stage2: dict                   # overrides of stage 2
    shares_stage1: bool = True     # stage 1 is the reference arm's (same seed)
    one_stage: bool = False        # stage 2 only, from scratch, steps1 + steps2 steps
    schedule: Optional[str] = None  # long-clip arm: fine-tune the reference arm with this schedule
    multi_seed: bool = False       # run every seed (the paper's arms and the baseline)
    bank: Optional[str] = None     # the image bank (for its attention cost)
    generate: bool = True          # sample videos (False: the loss-based scores only)

    @property
    def coarse(self) -> bool:
        return bool(self.stage2.get("model.coarse_path", True))

    @property
    def fine(self) -> bool:
        return bool(self.stage2.get("model.fine_path", True))

    def setting(self, key: str, s: X.DemoSettings, default=None):
        """A model/data setting as this arm trains it (its stage-2 overrides, else the suite's)."""
        return self.stage2.get(key, s.extra.get(key, default))


NO_COARSE = {"model.coarse_path": False}
IP = {"task": "vb_train.toy.ip_adapter:IPAdapterTask", "model.coarse_path": False, "model.fine_path": False}
ARMS: List[Arm] = [
    Arm("both", "paper", "coarse + fine, two-stage (VideoBooth)", {}, {}, multi_seed=True),
    Arm("coarse", "paper", "coarse only (no fine path)", {}, {"model.fine_path": False}, multi_seed=True),
    Arm("fine", "paper", "fine only (no coarse path)", NO_COARSE, NO_COARSE, shares_stage1=False, multi_seed=True),
    Arm("onestage", "paper", "coarse + fine, one-stage joint", None, {}, shares_stage1=False, one_stage=True,
        multi_seed=True),
    Arm("ipadapter", "baseline", "IP-Adapter (decoupled image cross-attn, no coarse/fine)", IP, IP,
        shares_stage1=False),
    Arm("coarse_pos", "diagnostic", "coarse only, image tower WITH positions", {"model.clip_positions": True},
        {"model.clip_positions": True, "model.fine_path": False}, shares_stage1=False),
    Arm("learnq", "review", "learned query projection", {}, {"model.learn_query": True}),
    Arm("pool2", "review", "image bank pool:2", {}, {"model.image_bank": "pool:2"}, bank="pool:2"),
    Arm("pool4", "review", "image bank pool:4", {}, {"model.image_bank": "pool:4"}, bank="pool:4"),
    Arm("learned4", "review", "image bank learned:4", {}, {"model.image_bank": "learned:4"}, bank="learned:4"),
    Arm("learned16", "review", "image bank learned:16", {}, {"model.image_bank": "learned:16"}, bank="learned:16"),
    Arm("long_videobooth", "schedule", "schedule videobooth", None, {}, schedule="videobooth"),
    Arm("long_first", "schedule", "schedule first", None, {}, schedule="first"),
    Arm("long_window2", "schedule", "schedule window2", None, {}, schedule="window2"),
    Arm("long_keyframes8", "schedule", "schedule keyframes8", None, {}, schedule="keyframes8"),
]
# The fine-path study (issue 21, `vb_train.toy.study`): every arm's coarse input averages the prompt
# with its swapped version (exactly order-blind) unless the arm says otherwise; the oracle's coarse
# path is told the arrangement (the upper and lower half as separate tokens), the grey arm never
# sees a prompt. Run them with `python -m vb_train.toy.study` (`study.settings("gate" / "full")`).
ORACLE = {"model.coarse_input": "halves"}
GREY = {"model.grey_prompt": True}
IP_PLUS = dict(IP, **{"model.ip_kind": "plus"})
STUDY_ARMS: List[Arm] = [
    Arm("ref", "study", "coarse + fine, two-stage (VideoBooth)", {}, {}, multi_seed=True),
    Arm("coarse_only", "study", "coarse only", {}, {"model.fine_path": False}, multi_seed=True),
    Arm("fine_only", "study", "fine only", NO_COARSE, NO_COARSE, shares_stage1=False, multi_seed=True),
    Arm("joint", "study", "coarse + fine, one-stage joint", None, {}, shares_stage1=False, one_stage=True,
        multi_seed=True),
    Arm("oracle", "study", "oracle: coarse told the arrangement (positive control)", ORACLE,
        dict(ORACLE, **{"model.fine_path": False}), shares_stage1=False, multi_seed=True),
    Arm("grey", "study", "grey prompt (negative control)", GREY, GREY, shares_stage1=False, multi_seed=True),
    Arm("ipplus", "study", "IP-Adapter-Plus (resampler over patch tokens)", IP_PLUS, IP_PLUS, shares_stage1=False,
        multi_seed=True),
    Arm("clean", "study", "diagnostic: fine path reads the clean image latent", {},
        {"model.fine_latent": "clean"}, multi_seed=True),
    # issue 32: the reference arm with the official image stream (F copies of the image latent, each
    # with its own draw at the video's t in training, fresh at every sampling step, through the
    # temporal layers); stage 1 is the reference arm's (no fine path in stage 1)
    Arm("ref_official", "study", "coarse + fine, two-stage, official image stream (F noised copies)", {},
        {"model.image_stream": "official"}, multi_seed=True),
]
ARM_BY_KEY = {a.key: a for a in ARMS + STUDY_ARMS}


@dataclass
class AblationSettings:
    demo: X.DemoSettings
    seeds: int = 3               # seeds of the multi-seed arms (0 .. seeds-1); the others use seed 0
    long_frames: int = 32        # frames of the long clips (training and generation)
    long_steps: int = 60         # fine-tuning steps per schedule on long clips
    long_batch: int = 2
    long_subjects: int = 20      # held-out clips generated at long_frames
    long_inference_steps: int = 15
    arms: Sequence[str] = tuple(a.key for a in ARMS if a.group != "diagnostic")   # (--arms adds it)

    @staticmethod
    def toy(**demo_kw) -> dict:
        """The two-tone toy's demo settings (module docstring)."""
        # data_size 48 with a 32 px square: the subject is 2/3 of the frame (its arrangement
        # weighs more in the loss) and the image prompt is the 32 px square itself (no resampling)
        kw = dict(identity_kind="two-tone", clips_per_subject=2, heldout_subjects=40, data_size=48,
                  two_tone_side=32, data_frames=32, extra={"model.clip_positions": False})
        kw.update(demo_kw)
        return kw

    @classmethod
    def default(cls, **demo_kw) -> "AblationSettings":
        return cls(X.DemoSettings(**cls.toy(**dict(dict(steps1=300, steps2=500), **demo_kw))))

    @classmethod
    def quick(cls, arms: Sequence[str] = ("both", "coarse"), **demo_kw) -> "AblationSettings":
        kw = cls.toy(data_size=32, two_tone_side=16, data_frames=8, heldout_subjects=4)
        kw.update(demo_kw)
        return cls(X.DemoSettings.quick(**kw), seeds=1, long_frames=8, long_steps=1, long_batch=1, long_subjects=2,
                   long_inference_steps=2, arms=tuple(arms))


# ================================================================================================
# scores
# ================================================================================================
def frame_change(video: torch.Tensor) -> float:
    """Temporal steadiness without an encoder: mean |frame f+1 - frame f| over pixels and
    frames, video (F, 3, H, W) in [-1, 1] (0 for a still clip; lower is steadier)."""
    if video.shape[0] < 2:
        return 0.0
    return float((video[1:] - video[:-1]).abs().mean())


def video_scores(videos: torch.Tensor, items) -> List[dict]:
    """Per video: order (two_tone_order), colour (color_identity), frame change, and the order
    and colour of every frame index (lists)."""
    from ..metrics import color_identity, two_tone_order, two_tone_order_soft

    rows = []
    for v, it in zip(videos, items):
        rows.append({"order": two_tone_order(v, it.image), "order_loose": two_tone_order(v, it.image, tol=0.5),
                     "order_soft": two_tone_order_soft(v, it.image),
                     "color": color_identity(v, it.image),
                     "frame_change": frame_change(v),
                     "order_f": [two_tone_order(v[f:f + 1], it.image) for f in range(v.shape[0])],
                     "color_f": [color_identity(v[f:f + 1], it.image) for f in range(v.shape[0])]})
    return rows


def centroid_motion(video: torch.Tensor, item) -> float:
    """How far the subject's centroid moves along the caption's direction ("moving left" ...),
    from the first frame to the last, as a fraction of the frame side (+: as captioned; about 0
    when every frame copies frame one). The subject: pixels within 0.3 (RGB in [0, 1]) of either
    of the prompt's two colours, weighted as `two_tone_order` weighs them."""
    from ..metrics import two_tone_colours_of
    from .synthetic import MOTIONS

    words = item.caption.split()
    direction = next((MOTIONS[w] for w in words if w in MOTIONS), None)
    if direction is None or video.shape[0] < 2:
        return 0.0
    a, b = two_tone_colours_of(item.image)
    x = ((video.float() + 1) * 0.5).clamp(0, 1)
    d = torch.minimum((x - a[None, :, None, None]).norm(dim=1), (x - b[None, :, None, None]).norm(dim=1))
    w = (1 - d / 0.3).clamp(min=0)                                        # (F, H, W)
    h, wd = x.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32)[None, :, None]
    xs = torch.arange(wd, dtype=torch.float32)[None, None, :]
    n = w.sum((1, 2)).clamp(min=1e-6)
    cx, cy = (w * xs).sum((1, 2)) / n, (w * ys).sum((1, 2)) / n
    move = (cx[-1] - cx[0]) * direction[0] + (cy[-1] - cy[0]) * direction[1]
    return float(move / max(h, wd))


def generate_for_arm(pipe, items, s: X.DemoSettings, arm: Arm, *, image: bool, seed: int,
                     num_frames: Optional[int] = None, swapped: bool = False) -> torch.Tensor:
    """`evaluation.generate_videos` as the arm was trained: without the fine-path branch when
    it trained without one, without subject-token injection when it trained without the
    coarse path (the plain caption's embedding instead)."""
    kw = {}
    if not arm.fine:
        kw["image_prompt_scale"] = 0.0
    if not arm.coarse:
        kw["plain_prompts"] = True
    else:
        kw["coarse_input"] = arm.setting("model.coarse_input", s, "image")
    if arm.setting("model.fine_latent", s, "noised") == "clean":
        kw["noise_image_latents"] = False
    if arm.setting("model.image_stream", s, None) is not None:
        kw["image_stream"] = arm.setting("model.image_stream", s, None)
    return E.generate_videos(pipe, items, s, image=image, seed=seed, num_frames=num_frames, swapped=swapped, **kw)


def bootstrap_ci(d: np.ndarray, n: int = 2000, seed: int = 0) -> List[float]:
    """95% interval of the mean of d (S seeds, N subjects) by a two-level bootstrap: seeds
    with replacement, then subjects with replacement within each drawn seed."""
    d = np.asarray(d, np.float64)
    if d.ndim == 1:
        d = d[None]
    rng = np.random.default_rng(seed)
    s_, n_ = d.shape
    si = rng.integers(0, s_, size=(n, s_))
    ni = rng.integers(0, n_, size=(n, s_, n_))
    means = d[si[..., None], ni].mean((1, 2))
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def diff_summary(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of a - b over (seeds, subjects), paired, with `bootstrap_ci` and the per-seed means."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.ndim == 1:
        d = d[None]
    return {"mean": float(d.mean()), "ci95": bootstrap_ci(d), "per_seed": [float(x) for x in d.mean(1)],
            "wins": int((d > 0).sum()), "n": int(d.size)}


def attention_cost(arm: Arm, frames: int, schedule: str, n_tokens: int = 64) -> dict:
    """Keys per frame at the 8x8-latent attn1 level (N = 64 tokens per frame): phase 1 reads
    M image tokens + the keyframe's N, phase 2 the references' N each (DESIGN.md section 2).
    Returns {image_tokens M, keys_per_frame (mean over frames, both phases)}."""
    from vb.processors import resolve_schedule

    bank = arm.bank
    m = n_tokens
    if bank and bank.startswith("pool:"):
        side = int(round(n_tokens ** 0.5))
        m = (-(-side // int(bank.split(":")[1]))) ** 2
    elif bank and bank.startswith("learned:"):
        m = int(bank.split(":")[1])
    if not arm.fine:
        m = 0
    def per_frame(spec: str) -> float:
        sch = resolve_schedule(spec, frames)
        phase2 = sch.keys_per_frame(n_tokens, m)
        phase1 = (m + n_tokens) * len(sch.keyframes) if m else 0
        return (sum(phase2) + phase1) / frames

    # "+img": the image tokens in every frame's keys too (where a compact bank saves the most)
    return {"image_tokens": m, "keys_per_frame": per_frame(schedule),
            "keys_per_frame_img_everywhere": per_frame(schedule + "+img") if m else per_frame(schedule)}


# ================================================================================================
# units of work (one training run + its evaluation), run in worker processes
# ================================================================================================
def _unit_file(out: Path, name: str) -> Path:
    return out / "units" / f"{name}.json"


def _stage1_dir(out: Path, arm: Arm, seed: int) -> Path:
    return out / "runs" / (f"stage1-s{seed}" if arm.shares_stage1 else f"{arm.key}-stage1-s{seed}")


def _seeded(s: X.DemoSettings, seed: int) -> X.DemoSettings:
    # data, VAE and held-out clips stay those of s.seed; the model, training and noise change
    return dataclasses.replace(s, seed=seed)


def run_stage1(a: AblationSettings, out: Path, arm_key: str, seed: int, paths: dict) -> dict:
    arm = ARM_BY_KEY[arm_key]
    s = _seeded(a.demo, seed)
    d = _stage1_dir(out, arm, seed)
    f = _unit_file(out, d.name)
    if f.is_file():
        return json.loads(f.read_text())
    cfg = X.stage_config(s, 1, data_root=paths["train"], output_dir=d, vae_file=paths["vae"], overrides=arm.stage1)
    summ = X.run_stage(cfg)
    res = {"seconds": summ["seconds"], "loss_last": summ["loss_last"]}
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(res))
    return res


def run_arm(a: AblationSettings, out: Path, arm_key: str, seed: int, paths: dict) -> dict:
    """Train (stage 2, or one stage, or the long-clip fine-tuning) and evaluate one arm at one
    seed; the result is also written to units/<arm>-s<seed>.json."""
    arm = ARM_BY_KEY[arm_key]
    f = _unit_file(out, f"{arm.key}-s{seed}")
    if f.is_file():
        return json.loads(f.read_text())
    t0 = time.perf_counter()
    s = _seeded(a.demo, seed)
    runs = out / "runs"
    held_root = paths["heldout"]
    if arm.schedule:
        long_s = dataclasses.replace(s, frames=a.long_frames, frame_stride=1, inference_steps=a.long_inference_steps,
                                     batch_size=a.long_batch, steps2=a.long_steps)
        over = dict(arm.stage2, **{"data.num_frames": a.long_frames, "data.frame_stride": 1,
                                   "schedule": arm.schedule, "lr_warmup_steps": 0})
        cfg = X.stage_config(long_s, 2, data_root=paths["train"], output_dir=runs / f"{arm.key}-s{seed}",
                             vae_file=paths["vae"], init_from=runs / f"both-s{seed}", overrides=over)
        items = X.make_eval_items(long_s, held_root)[:a.long_subjects]
        steps = f"{s.steps1} + {s.steps2} (4 fr) + {a.long_steps} ({a.long_frames} fr)"
        gen_s, frames = long_s, a.long_frames
    else:
        if arm.one_stage:
            cfg = X.stage_config(dataclasses.replace(s, steps2=s.steps1 + s.steps2), 2, data_root=paths["train"],
                                 output_dir=runs / f"{arm.key}-s{seed}", vae_file=paths["vae"], overrides=arm.stage2)
            steps = f"{s.steps1 + s.steps2} (stage 2 only)"
        else:
            cfg = X.stage_config(s, 2, data_root=paths["train"], output_dir=runs / f"{arm.key}-s{seed}",
                                 vae_file=paths["vae"], init_from=_stage1_dir(out, arm, seed), overrides=arm.stage2)
            steps = f"{s.steps1} + {s.steps2}"
        items = X.make_eval_items(s, held_root)
        gen_s, frames = s, s.frames
    summ = X.run_stage(cfg)
    task = E.load_trained_task(cfg, Path(cfg.output_dir))
    res = {"arm": arm.key, "seed": seed, "steps": steps, "loss_last": summ["loss_last"],
           "subjects": [it.video_id for it in items], "identities": ["/".join(it.identity) for it in items]}
    if arm.group == "study":
        by_t = np.asarray(E.flip_loss_gap(task, items, seed=seed))   # (clips, timesteps)
        res["flip_loss_gap"] = by_t.mean(1).tolist()
        res["flip_loss_gap_by_t"] = by_t.mean(0).tolist()
        res["exemplars_cloned"] = summ.get("exemplars_cloned")
    if arm.generate:
        pipe = E.load_trained_pipeline(cfg, Path(cfg.output_dir), task=task)
        u8 = (lambda v: ((v + 1) * 127.5).round().to(torch.uint8))
        vi = generate_for_arm(pipe, items, gen_s, arm, image=True, seed=seed, num_frames=frames)
        vt = generate_for_arm(pipe, items, gen_s, arm, image=False, seed=seed, num_frames=frames)
        videos = {"image": u8(vi), "text": u8(vt)}
        res.update(image=video_scores(vi, items), text=video_scores(vt, items))
        if arm.group == "study":   # the paired flip contrast: the swapped prompt, the same noise
            vs = generate_for_arm(pipe, items, gen_s, arm, image=True, seed=seed, num_frames=frames, swapped=True)
            videos["swapped"] = u8(vs)
            res["swapped"] = video_scores(vs, items)
            res["motion"] = {k: [centroid_motion(v, it) for v, it in zip(vid, items)]
                             for k, vid in (("image", vi), ("text", vt))}
        # the videos too (uint8), so that a new metric can score them without generating again
        torch.save(videos, f.with_suffix(".pt"))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if arm.schedule:
        res["schedule"] = arm.schedule
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(res))
    return res


def _unit_fn(fn_name: str):
    """A unit's function: a name in this module, or ``"module:function"``."""
    if ":" in fn_name:
        import importlib
        mod, _, attr = fn_name.partition(":")
        return getattr(importlib.import_module(mod), attr)
    return globals()[fn_name]


def _call(fn_name: str, args: tuple, threads: int):
    """Worker entry (a fresh process): torch threads, then the unit."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    return _unit_fn(fn_name)(*args)


def _sigterm_to_exit(signum, frame):
    raise SystemExit(128 + signum)


def _stop_workers(ex) -> None:
    """Cancel the units not started and end the running ones' processes: a failed unit, Ctrl-C or
    SIGTERM stops the whole run now, rather than after the other units finish (minutes), and
    leaves no worker computing after the parent is gone."""
    procs = list((getattr(ex, "_processes", None) or {}).values())  # no public handle before 3.14;
    ex.shutdown(wait=False, cancel_futures=True)  # (shutdown drops it)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=10)


def _run_units(units: Dict[str, tuple], deps: Dict[str, List[str]], jobs: int, threads: int) -> None:
    """Run named (fn_name, args) units, each once every unit it depends on (`deps`) is done,
    `jobs` at a time in spawned processes (1: in this process, in order). Ready units start in
    the order given, so put the long ones first. A failed unit (its error is raised), Ctrl-C or
    SIGTERM ends the running units' processes too."""
    if jobs <= 1:
        for name, (fn, args) in units.items():
            _unit_fn(fn)(*args)
        return
    import multiprocessing as mp
    import signal
    import threading
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    done: set = set()
    pending = dict(units)
    running: Dict[object, str] = {}
    t0 = time.perf_counter()
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _sigterm_to_exit) if main else None
    ex = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))
    try:
        while pending or running:
            for name in list(pending):
                if len(running) >= jobs:
                    break
                if all(d in done for d in deps.get(name, ())):
                    fn, args = pending.pop(name)
                    running[ex.submit(_call, fn, args, threads)] = name
                    print(f"[ablations] {time.perf_counter() - t0:6.0f} s  start {name}", flush=True)
            if not running:
                raise RuntimeError(f"ablations: units {sorted(pending)} wait on units that never run")
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                name = running.pop(fut)
                fut.result()   # a failed unit stops the run, with its error
                done.add(name)
                print(f"[ablations] {time.perf_counter() - t0:6.0f} s  done  {name}", flush=True)
    except BaseException:
        _stop_workers(ex)
        raise
    else:
        ex.shutdown(wait=True)
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


# ================================================================================================
# the whole table
# ================================================================================================
def run_ablations(a: AblationSettings, out: Path, jobs: int = 1, threads: int = 1) -> dict:
    s = a.demo
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    keys = list(dict.fromkeys(a.arms))
    unknown = set(keys) - set(ARM_BY_KEY)
    if unknown:
        raise ValueError(f"arms: unknown {sorted(unknown)}; known: {list(ARM_BY_KEY)}")
    if not isinstance(a.seeds, int) or a.seeds < 1:
        raise ValueError(f"seeds: expected an int >= 1, got {a.seeds!r}")
    arms = [ARM_BY_KEY[k] for k in keys]
    if any(x.schedule for x in arms) and s.data_frames < a.long_frames:
        s = a.demo = dataclasses.replace(s, data_frames=a.long_frames)
    paths, vae_stats = prepare(a, out)

    run_units_of(a, out, arms, keys, paths, jobs, threads)
    per_arm: Dict[str, List[dict]] = {}
    for arm in arms:
        per_arm[arm.key] = [json.loads(_unit_file(out, f"{arm.key}-s{seed}").read_text()) for seed in seeds_of(a, arm)]
    total = round(time.perf_counter() - t_start, 1)
    summary = summarise(per_arm, a)
    md = report(summary, a, total, out)
    res = {"settings": {"demo": dataclasses.asdict(s), **{k: v for k, v in dataclasses.asdict(a).items()
                                                          if k != "demo"}},
           "summary": summary, "units": per_arm, "vae": vae_stats, "seconds": total}
    (out / "ablations.json").write_text(json.dumps(res, indent=1))
    (out / "ablations.md").write_text(md)
    return res


def seeds_of(a: AblationSettings, arm: Arm) -> range:
    return range(a.seeds if arm.multi_seed else 1)


def prepare(a: AblationSettings, out: Path) -> tuple:
    """Data, held-out set and VAE under `out` (each reused when already there): (paths, VAE stats)."""
    s = a.demo
    train_root, held_root = X.make_data(s, out / "data")
    vae_file = out / "vae" / "vae.safetensors"
    vae_stats = (json.loads((vae_file.parent / "vae_stats.json").read_text()) if vae_file.is_file()
                 else X.pretrain_vae(s, train_root, vae_file))
    return {"train": train_root, "heldout": held_root, "vae": vae_file}, vae_stats


def run_units_of(a: AblationSettings, out: Path, arms: List[Arm], keys: List[str], paths: dict, jobs: int,
                 threads: int) -> None:
    """Train and evaluate every arm x seed (units already in out/units are read, not rerun)."""
    # Units: every stage 1 (a shared one once per seed), every arm x seed (after its stage 1),
    # the long-clip arms (after the reference arm's stage 2 at seed 0). Longest first.
    need = [ARM_BY_KEY["both"]] if any(x.schedule for x in arms) and "both" not in keys else []
    units: Dict[str, tuple] = {}
    deps: Dict[str, List[str]] = {}
    for arm in sorted(arms + need, key=lambda x: (not x.one_stage, not x.fine, bool(x.schedule))):
        for seed in ([0] if arm.schedule else seeds_of(a, arm)):
            name = f"{arm.key}-s{seed}"
            units[name] = ("run_arm", (a, out, arm.key, seed, paths))
            if arm.schedule:
                deps[name] = [f"both-s{seed}"]
            elif arm.stage1 is not None and not arm.one_stage:
                d = _stage1_dir(out, arm, seed).name
                deps[name] = [d]
                if d not in units:
                    units[d] = ("run_stage1", (a, out, arm.key, seed, paths))
    # stage 1s first (everything waits on them), then the arms in the order above
    order = [n for n, u in units.items() if u[0] == "run_stage1"] + [n for n, u in units.items() if u[0] == "run_arm"]
    # one-stage arms need nothing: start them beside the first stage 1s
    one = {n for n, u in units.items() if u[0] == "run_arm" and ARM_BY_KEY[u[1][2]].one_stage}
    order = ([n for n in order if units[n][0] == "run_stage1"][:1] + [n for n in order if n in one]
             + [n for n in order if units[n][0] == "run_stage1"][1:] + [n for n in order if units[n][0] == "run_arm"
                                                                         and n not in one])
    print(f"[ablations] {len(units)} training runs, {jobs} at a time", flush=True)
    _run_units({n: units[n] for n in order}, deps, jobs, threads)


def _matrix(units: List[dict], side: str, key: str) -> np.ndarray:
    return np.array([[r[key] for r in u[side]] for u in units], np.float64)


def summarise(per_arm: Dict[str, List[dict]], a: AblationSettings) -> Dict[str, dict]:
    """Per arm: means of each metric with the image prompt and text only, Δ image - text with
    its interval, per-frame curves; the paper/baseline arms also get contrasts against the
    reference arm (both) on the same seeds and subjects."""
    out: Dict[str, dict] = {}
    for key, units in per_arm.items():
        arm = ARM_BY_KEY[key]
        r = {"name": arm.name, "group": arm.group, "steps": units[0]["steps"], "seeds": len(units),
             "n": len(units[0]["image"]), "seconds": sum(u["seconds"] for u in units)}
        for m in ("order", "order_loose", "color", "frame_change"):
            im, tx = _matrix(units, "image", m), _matrix(units, "text", m)
            r[f"{m}_image"] = float(im.mean())
            r[f"{m}_text"] = float(tx.mean())
            r[f"{m}_image_per_seed"] = [float(x) for x in im.mean(1)]
            if m != "frame_change":
                r[f"delta_{m}"] = diff_summary(im, tx)
        for m in ("order_f", "color_f"):
            r[f"{m}_image"] = np.mean([[row[m] for row in u["image"]] for u in units], axis=(0, 1)).tolist()
        frames = len(units[0]["image"][0]["order_f"])
        # the cost at the paper's 16 frames for the 4-frame arms (phase 1 is amortised over F)
        r["cost"] = attention_cost(arm, frames if arm.schedule else 16, arm.schedule or a.demo.schedule)
        if arm.schedule:
            last = slice(frames - 8, frames)
            r["order_last8"] = float(np.mean(r["order_f_image"][last]))
            r["order_first8"] = float(np.mean(r["order_f_image"][:8]))
            r["color_last8"] = float(np.mean(r["color_f_image"][last]))
        out[key] = r
    if "both" in per_arm:
        ref = per_arm["both"]
        for key, units in per_arm.items():
            arm = ARM_BY_KEY[key]
            if key == "both" or arm.schedule:
                continue
            seeds = [u["seed"] for u in units]
            refs = [u for u in ref if u["seed"] in seeds]
            if [u["seed"] for u in refs] != seeds:
                continue
            out[key]["vs_both"] = {m: diff_summary(_matrix(refs, "image", m), _matrix(units, "image", m))
                                   for m in ("order", "order_loose", "color", "frame_change")}
    return out


# ================================================================================================
# tables and plots
# ================================================================================================
def _ci(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def _md(header: Sequence[str], rows) -> str:
    """A markdown table: ``header`` cells, then one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def tables(summary: Dict[str, dict]) -> Dict[str, str]:
    rs = summary.values()
    main = _md(["group", "arm", "seeds", "steps", "order (image)", "order (text)", "Δ order image - text [95% CI]",
                "Δ order, tol 0.5 [95% CI]", "colour (image)", "Δ colour image - text [95% CI]",
                "frame change (image)", "s"],
               ([r["group"], r["name"], str(r["seeds"]), r["steps"], f"{r['order_image']:+.3f}",
                 f"{r['order_text']:+.3f}", _ci(r["delta_order"]), _ci(r["delta_order_loose"]),
                 f"{r['color_image']:.3f}", _ci(r["delta_color"]), f"{r['frame_change_image']:.4f}",
                 f"{r['seconds']:.0f}"]
                for r in rs if r["group"] in ("paper", "baseline", "diagnostic", "review")))
    contrasts = _md(["arm", "seeds", "reference - arm: order [95% CI]", "per seed", "order, tol 0.5 [95% CI]",
                     "colour [95% CI]", "frame change [95% CI]"],
                    ([r["name"], str(r["seeds"]), _ci(r["vs_both"]["order"]),
                      ", ".join(f"{x:+.3f}" for x in r["vs_both"]["order"]["per_seed"]),
                      _ci(r["vs_both"]["order_loose"]), _ci(r["vs_both"]["color"]), _ci(r["vs_both"]["frame_change"])]
                     for r in rs if "vs_both" in r))
    cost = _md(["arm", "image tokens M (8x8 level)", "keys per frame, paper's schedule (F=16)",
                "keys per frame, image in every frame's keys (+img)", "order (image)",
                "Δ order image - text [95% CI]", "Δ colour image - text [95% CI]"],
               ([r["name"], str(r["cost"]["image_tokens"]), f"{r['cost']['keys_per_frame']:.1f}",
                 f"{r['cost'].get('keys_per_frame_img_everywhere', float('nan')):.1f}", f"{r['order_image']:+.3f}",
                 _ci(r["delta_order"]), _ci(r["delta_color"])]
                for k, r in summary.items() if r["group"] in ("paper", "review") and k not in ("fine", "coarse")))
    schedule = _md(["schedule", "keys per frame (8x8 level)", "order (image), all frames",
                    "Δ order image - text [95% CI]", "order, first 8 frames", "order, last 8 frames",
                    "colour, last 8 frames", "frame change"],
                   ([r["name"], f"{r['cost']['keys_per_frame']:.1f}", f"{r['order_image']:+.3f}",
                     _ci(r["delta_order"]), f"{r['order_first8']:+.3f}", f"{r['order_last8']:+.3f}",
                     f"{r['color_last8']:.3f}", f"{r['frame_change_image']:.4f}"]
                    for r in rs if r["group"] == "schedule"))
    return {"main": main, "contrasts": contrasts, "cost": cost, "schedule": schedule}


def report(summary: Dict[str, dict], a: AblationSettings, total: float, out: Path) -> str:
    t = tables(summary)
    plots = plot_groups(summary, out)
    s = a.demo
    md = ["# VideoBooth ablations on the two-tone toy", "",
          f"Tiny VideoBooth (random-init components, pretrained tiny VAE), {s.size}x{s.size} px, {s.frames} frames; "
          f"two-tone subjects (a square, upper half colour A, lower half colour B; held-out colour pairs in both "
          f"orders); the coarse path's image tower is a bag of patches (`model.clip_positions: false`). "
          f"{summary[next(iter(summary))]['n']} held-out clips per arm and seed ({a.long_subjects} for the long-clip "
          f"arms, {a.long_frames} frames). order = `two_tone_order` (+1 keeps A over B, -1 swaps, 0 either colour "
          f"missing; text only ~ 0; tol 0.5 accepts colours up to 0.5 away in RGB instead of 0.3); colour = `color_identity` (colour histogram: blind to the order). Δ and contrasts "
          f"are paired (same subjects, same initial noise; the reference arm shares each seed), 95% intervals by a "
          f"two-level bootstrap (seeds, then subjects). Reading: `docs/demo.md`.", "",
          "## All arms (4-frame clips)", "", t["main"], "",
          "## The paper's claim: reference (coarse + fine, two-stage) minus each arm, same seeds", "",
          t["contrasts"], "", "## Compact image banks: attention cost", "", t["cost"], "",
          f"## Schedules on {a.long_frames}-frame clips (seed 0)", "", t["schedule"], ""]
    for p in plots:
        md += [f"![{p.stem}]({p.name})", ""]
    md += [f"Wall time of this invocation {total:.0f} s (units already done are read, not rerun); the arms' own "
           f"train + evaluation times sum to {sum(r['seconds'] for r in summary.values()):.0f} s (several at once "
           f"with --jobs)."]
    return "\n".join(md) + "\n"


def plot_groups(summary: Dict[str, dict], out: Path) -> List[Path]:
    """One PNG per group: paper + baseline and review arms as bars of Δ order and Δ colour
    (image - text) with their intervals; schedules as order and colour per frame index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for group, groups in (("paper", ("paper", "baseline", "diagnostic")), ("review", ("review",))):
        keys = [k for k, r in summary.items() if r["group"] in groups]
        if not keys:
            continue
        if group == "review" and "both" in summary:   # the reference arm (all image tokens) first
            keys = ["both"] + keys
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(keys) + 1.4), dpi=110, sharey=True)
        for ax, m, title in ((axes[0], "delta_order", "Δ order (the detail)"),
                             (axes[1], "delta_color", "Δ colour (the colour set)")):
            for i, k in enumerate(keys):
                d = summary[k][m]
                y = len(keys) - 1 - i
                ax.barh(y, d["mean"], xerr=[[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]],
                        color={"paper": "tab:blue", "baseline": "tab:red", "diagnostic": "tab:grey"}.get(
                            summary[k]["group"], "tab:orange"), alpha=0.85, capsize=3)
            ax.axvline(0, color="black", lw=0.8)
            ax.set_title(title, fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        labels = []
        for k in reversed(keys):
            r = summary[k]
            lab = r["name"] if r["seeds"] == 1 else f"{r['name']} ({r['seeds']} seeds)"
            if group == "review":
                lab += f" [{r['cost']['keys_per_frame']:.0f} keys/frame]"
            labels.append(lab)
        axes[0].set_yticks(range(len(keys)))
        axes[0].set_yticklabels(labels, fontsize=7)
        fig.supxlabel("with image prompt - text only (95% interval)", fontsize=8)
        fig.tight_layout()
        p = out / f"ablations_{group}.png"
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    keys = [k for k, r in summary.items() if r["group"] == "schedule"]
    if keys:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=110)
        for k in keys:
            r = summary[k]
            axes[0].plot(r["order_f_image"], label=r["name"].replace("schedule ", ""))
            axes[1].plot(r["color_f_image"], label=r["name"].replace("schedule ", ""))
        axes[0].set_ylabel("order (image prompt)")
        axes[1].set_ylabel("colour (image prompt)")
        for ax in axes:
            ax.set_xlabel("frame index")
            ax.grid(alpha=0.3)
        axes[0].axhline(0, color="black", lw=0.8)
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        p = out / "ablations_schedule.png"
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    return paths


def add_run_options(p: argparse.ArgumentParser, threads_help: str) -> None:
    """The CLIs' options for how training runs are executed (the ablations' and the study's)."""
    p.add_argument("--jobs", type=int, default=1, help="training runs at once, each in its own process")
    p.add_argument("--threads", type=int, default=1, help=threads_help)
    p.add_argument("--no-progress", action="store_true")


def apply_run_options(args: argparse.Namespace, settings_kw: dict) -> dict:
    """Check ``--jobs``/``--threads``, set torch's threads and the log format; ``settings_kw``
    with ``progress=False`` added where bars would interleave (or were turned off)."""
    for name in ("threads", "jobs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.no_progress or args.jobs > 1:
        settings_kw = dict(settings_kw, progress=False)
    return settings_kw


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vb_train.toy.ablations", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="ablations_out")
    p.add_argument("--quick", action="store_true", help="tiny everything (a smoke run; numbers mean nothing)")
    p.add_argument("--arms", help=f"comma-separated subset of {list(ARM_BY_KEY)}")
    p.add_argument("--seeds", type=int, help="seeds of the paper and baseline arms (default 3)")
    p.add_argument("--steps1", type=int)
    p.add_argument("--steps2", type=int)
    p.add_argument("--long-steps", type=int, dest="long_steps")
    p.add_argument("--data-size", type=int, dest="data_size", help="synthetic frames' side before loading (64)")
    p.add_argument("--two-tone-side", type=int, dest="two_tone_side",
                   help="the two-tone square's side at --data-size (default half of it)")
    add_run_options(p, "torch CPU threads per run (default 1, as the demo's)")
    args = p.parse_args(argv)
    kw = apply_run_options(args, {k: getattr(args, k) for k in ("steps1", "steps2", "data_size", "two_tone_side")
                                  if getattr(args, k) is not None})
    if args.quick:
        a = AblationSettings.quick(**kw) if not args.arms else AblationSettings.quick(args.arms.split(","), **kw)
    else:
        a = AblationSettings.default(**kw)
        if args.arms:
            a.arms = tuple(args.arms.split(","))
    if args.long_steps is not None:
        a.long_steps = args.long_steps
    if args.seeds is not None:
        a.seeds = args.seeds
    res = run_ablations(a, Path(args.out), jobs=args.jobs, threads=args.threads)
    print()
    print((Path(args.out) / "ablations.md").read_text())
    print(f"wrote {args.out}/ablations.md, ablations.json ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
