"""Per-subject personalisation baselines on the toy's text-only base video model (issue 31, item 1:
groundwork; the comparison table and the long-horizon study are not run here).

    python -m vb_train.toy.baselines --method ti --subjects 8 --steps 200 --out baselines_ti
    python -m vb_train.toy.baselines --method dreambooth_lora --subjects 8 --steps 200 --out baselines_db
    python -m vb_train.toy.baselines --method ti --subjects 1 --steps 2 --out /tmp/b --quick   # smoke run

What a practitioner does instead of training an image-prompted model: fine-tune a text-to-video
model on each subject's one image. Both methods follow the recipes of diffusers' examples
``textual_inversion`` and ``dreambooth_lora`` (the patterns, not their code), scaled to the toy:

- **the base model**: the toy's text-only video model, i.e. the study's text-only stage 1 (the
  two-tone toy of `vb_train.toy.study`'s full table, held-out colour pairs; stage 1 with
  ``model.coarse_path: false``, so no image ever reaches it: what `vb_train.toy.ablations.run_stage1`
  trains for the ``fine_only`` arm, in ``<work>/runs/fine_only-stage1-s<seed>``). It is trained
  here through that same code path when ``<work>`` does not hold it (``--quick``: the study's quick
  settings), and reused otherwise (``--work`` may point at a study ``--full`` folder).
- **the subject**: one held-out identity's image prompt (the subject on white, as the loader
  gives it), resized to the toy's frame size as the task resizes it for the fine path, as a
  ``train_frames``-frame video (1 by default; more repeats the frame), VAE-encoded once.
- **Textual Inversion** (``ti``): one new token per subject (``<vb0>``, ``<vb1>`` ...) added to a copy of
  the toy's CLIP tokenizer, its embedding row added to a copy of the text encoder and initialised
  from the subject word's (``square``); only that row trains (AdamW on the embedding matrix, every
  other row restored after each step, as the example does); the backbone, the rest of the text
  encoder and the VAE are frozen. Training prompt ``"a <vbK>"``.
- **DreamBooth with LoRA** (``dreambooth_lora``): LoRA (peft ``LoraConfig``, rank ``rank``, Gaussian
  init of A, zero B) on the backbone's spatial attention projections that its forward uses (every
  attn1 / attn2: ``to_q``, ``to_out.0`` and the processors' ``to_k_new`` / ``to_v_new``; the
  temporal layers untouched), injected with diffusers' ``add_adapter`` on the inner U-Net (peft's
  ``inject_adapter_in_model`` for a backbone without it); only LoRA weights train. Instance prompt
  ``"a sks square"``; prior preservation: ``class_images`` class samples of ``"a square"`` drawn
  by the frozen base model (once per class word, shared by the subjects of that class) and
  VAE-encoded; every step's batch is ``batch_size`` instance copies + ``batch_size`` class
  samples, loss = instance MSE + ``prior_loss_weight`` x class MSE.
- **the loss**: the base's own denoising objective (MSE to the noise or, for this v-prediction
  base, to the velocity; t uniform over the training timesteps).
- **budget**: ``steps`` optimiser steps per subject, the same for every subject; the CPU seconds
  of those steps (``time.process_time``, every thread of the process) are measured and written.
- **sampling**: per clip of the subject in the held-out set, its caption with the subject word
  replaced by the learned token (``"a <vb0> moving left on a grey background"``) or prefixed by the
  identifier (``"a sks square moving ..."``), from the same initial noise as the base model's
  sample of the plain caption (the "before" row); text only: a grey image prompt, no fine
  branch, no subject-token injection (`vb_train.toy.evaluation.generate_videos` as the ablations
  sample their text-only arms).
- **scores**: the study's and the ablations' scorers, unchanged: `vb_train.toy.ablations.video_scores`
  (arrangement ``order`` / ``order_soft``, colour identity ``color``, temporal ``frame_change``,
  per frame), `vb_train.toy.ablations.centroid_motion` and, over the subjects, colour retrieval
  (`vb_train.toy.evaluation.identity_scores`).

Outputs under --out: ``baselines_<method>.json`` (settings, base run, per subject: compute
{steps, cpu_seconds, wall_seconds, trainable_parameters}, losses, per-clip scores of the
personalised and the base samples; a summary), ``videos_<method>.pt`` (uint8 clips) and
``learned_<method>.pt`` (the learned rows / LoRA weights).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("vb_train.toy.baselines")

METHODS = ("ti", "dreambooth_lora")
BASE_ARM = "fine_only"   # the study arm whose stage 1 is the text-only base (stage1 = NO_COARSE)
# the attention projections the backbone's forward uses (attn1 reads the processor's K/V, attn2 its
# new text K/V; attn.to_k / attn.to_v are not called): spatial attention only
LORA_TARGETS = r".*\.attn[12]\.(to_q|to_out\.0|processor\.to_k_new|processor\.to_v_new)"


@dataclass
class BaselineSettings:
    """One method's per-subject recipe (module docstring). ``lr`` None: the method's default."""

    method: str
    subjects: int = 8
    steps: int = 200
    lr: Optional[float] = None
    batch_size: int = 4            # instance copies per step (DreamBooth: + as many class samples)
    train_frames: int = 1          # frames of the image-as-video (1, or the frame repeated)
    rank: int = 4                  # LoRA rank (lora_alpha = rank)
    prior_loss_weight: float = 1.0
    class_images: int = 8
    identifier: str = "sks"        # DreamBooth's rare-token identifier
    seed: int = 0
    progress: bool = True

    DEFAULT_LR = {"ti": 5e-3, "dreambooth_lora": 1e-3}

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        for name in ("subjects", "steps", "batch_size", "train_frames", "rank", "class_images"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr: expected a float > 0, got {self.lr!r}")
        if not self.prior_loss_weight >= 0:
            raise ValueError(f"prior_loss_weight: expected a float >= 0, got {self.prior_loss_weight!r}")
        if not self.identifier.strip() or len(self.identifier.split()) != 1:
            raise ValueError(f"identifier: expected one word, got {self.identifier!r}")

    @property
    def learning_rate(self) -> float:
        return float(self.lr if self.lr is not None else self.DEFAULT_LR[self.method])


# ================================================================================================
# the base model
# ================================================================================================
def base_settings(quick: bool = False, **demo_kw):
    """The toy the base is trained on: the study's full-table settings (two-tone, held-out colour
    pairs; quick: the study's smoke settings)."""
    from . import study

    return study.settings("full", quick, **demo_kw)


def prepare_base(a, work: Path, seed: int = 0):
    """Data, VAE and the text-only base under `work` (each reused when there, trained otherwise
    through `ablations.prepare` / `ablations.run_stage1`): (task, cfg, paths, info). The task is
    the base with its EMA weights, eval mode, gradients off."""
    from . import ablations as A
    from . import evaluation as E
    from . import experiment as X

    work = Path(work)
    arm = A.ARM_BY_KEY[BASE_ARM]
    paths, vae_stats = A.prepare(a, work)
    unit = A.run_stage1(a, work, BASE_ARM, seed, paths)
    run_dir = A._stage1_dir(work, arm, seed)
    cfg = X.stage_config(A._seeded(a.demo, seed), 1, data_root=paths["train"], output_dir=run_dir,
                         vae_file=paths["vae"], overrides=arm.stage1)
    task = E.load_trained_task(cfg, run_dir)
    if task.coarse or task.fine:
        raise RuntimeError(f"base: {run_dir} is not a text-only model (coarse_path {task.coarse}, fine_path {task.fine})")
    info = {"run_dir": str(run_dir), "steps": a.demo.steps1, "seconds": unit.get("seconds"),
            "loss_last": unit.get("loss_last"), "vae": vae_stats}
    return task, cfg, paths, info


def pipeline_for(task, *, text_encoder=None, tokenizer=None, backbone=None):
    """A `VideoBoothPipeline` over the base task's parts with some replaced (a personalised text
    encoder / tokenizer / backbone), with the inference scheduler the evaluation uses."""
    from ..tasks import inference_scheduler

    parts = dataclasses.replace(task.parts, **{k: v for k, v in dict(text_encoder=text_encoder, tokenizer=tokenizer,
                                                                      backbone=backbone).items() if v is not None})
    pipe = parts.pipeline()
    pipe.scheduler = inference_scheduler(task.noise_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ================================================================================================
# the loss pieces
# ================================================================================================
def image_video(image: torch.Tensor, size: int, frames: int) -> torch.Tensor:
    """An image prompt (3, S, S) in [-1, 1] as a (1, frames, 3, size, size) video: resized as the
    task resizes it for the fine path, the frame repeated."""
    x = F.interpolate(image[None].float(), size=(size, size), mode="bicubic", align_corners=False,
                      antialias=True).clamp(-1, 1)
    return x[:, None].expand(1, frames, -1, -1, -1).contiguous()


def predict_text_only(task, backbone, noisy, timesteps, text, pooled):
    """The text-only base's prediction (what `VideoBoothTask.predict` calls without the coarse and
    fine paths), with `backbone` and already encoded prompts (gradients flow to both)."""
    null_h, null_p = task._null_prompt()
    b = noisy.shape[0]
    return backbone(noisy, timesteps, text, pooled_text_embeds=pooled, image_embeds=None, image_latents=None,
                    null_encoder_hidden_states=null_h.expand(b, -1, -1), null_pooled_text_embeds=null_p.expand(b, -1))


def denoise_losses(task, backbone, x0, text, pooled, generator) -> torch.Tensor:
    """Per sample, the base's denoising MSE (noise, or velocity for v-prediction) at a uniform
    random timestep: (B,)."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, task.noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
    noisy = task.add_noise(x0, noise, t)
    target = noise if task.prediction_type == "epsilon" else task.noise_scheduler.get_velocity(x0, noise, t)
    pred = predict_text_only(task, backbone, noisy, t, text, pooled)
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)


def dreambooth_loss(task, backbone, inst_x0, inst_text, class_x0, class_text, prior_loss_weight: float,
                    generator) -> tuple:
    """DreamBooth's objective with prior preservation: one batch of instance and class samples,
    (total, instance MSE, prior MSE); prior_loss_weight 0: the instance term only (prior None)."""
    if prior_loss_weight == 0 or class_x0 is None:
        inst = denoise_losses(task, backbone, inst_x0, *inst_text, generator).mean()
        return inst, inst, None
    n = inst_x0.shape[0]
    x0 = torch.cat([inst_x0, class_x0])
    text = tuple(torch.cat([a, b]) for a, b in zip(inst_text, class_text))
    per = denoise_losses(task, backbone, x0, *text, generator)
    inst, prior = per[:n].mean(), per[n:].mean()
    return inst + prior_loss_weight * prior, inst, prior


def _encode(text_encoder, tokenizer, prompts: List[str]):
    import vb

    return vb.encode_prompt(text_encoder, tokenizer, prompts)


# ================================================================================================
# Textual Inversion
# ================================================================================================
def add_placeholder(tokenizer, text_encoder, token: str, init_word: str):
    """Copies of the tokenizer and the text encoder with one new token whose embedding row starts
    as `init_word`'s: (tokenizer, text_encoder, token id). The originals are not touched (the
    toy's tokenizer is a shared cached object)."""
    tok = copy.deepcopy(tokenizer)
    if tok.add_tokens([token]) != 1:
        raise ValueError(f"token: {token!r} is already in the tokenizer; choose another placeholder")
    init = tok.encode(init_word, add_special_tokens=False)
    if len(init) != 1:
        raise ValueError(f"init_word: expected a word that is one token, {init_word!r} is {len(init)}")
    tid = tok.convert_tokens_to_ids(token)
    te = copy.deepcopy(text_encoder)
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        w = te.get_input_embeddings().weight
        w[tid] = w[init[0]]
    return tok, te, tid


def train_textual_inversion(task, image: torch.Tensor, s: BaselineSettings, *, token: str, init_word: str,
                            size: int, desc: str = "ti") -> dict:
    """Learn one embedding row for `token` from one image prompt on the frozen base (module
    docstring). Returns {tokenizer, text_encoder, token_id, prompt, compute, losses}."""
    from tqdm.auto import tqdm

    tok, te, tid = add_placeholder(task.tokenizer, task.text_encoder, token, init_word)
    te.eval().requires_grad_(False)   # (eval: no dropout; the embedding row still gets its gradient)
    emb = te.get_input_embeddings()
    emb.weight.requires_grad_(True)
    orig = emb.weight.detach().clone()
    keep = torch.ones(emb.weight.shape[0], dtype=torch.bool)
    keep[tid] = False
    g = torch.Generator().manual_seed(s.seed)
    with torch.no_grad():
        x0 = task.latents({"video": image_video(image, size, s.train_frames)}, g).expand(s.batch_size, -1, -1, -1, -1)
    prompt = f"a {token}"
    opt = torch.optim.AdamW([emb.weight], lr=s.learning_rate, weight_decay=0.0)
    losses = []
    c0, w0 = time.process_time(), time.perf_counter()
    bar = tqdm(range(s.steps), desc=desc, unit="step", disable=not s.progress)
    for _ in bar:
        text = _encode(te, tok, [prompt] * s.batch_size)
        loss = denoise_losses(task, task.backbone, x0, *text, g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():   # only the new row learns (the example's restore of every other row)
            emb.weight[keep] = orig[keep]
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    bar.close()
    compute = {"steps": s.steps, "cpu_seconds": round(time.process_time() - c0, 3),
               "wall_seconds": round(time.perf_counter() - w0, 3), "trainable_parameters": int(orig.shape[1])}
    te.eval().requires_grad_(False)
    return {"tokenizer": tok, "text_encoder": te, "token_id": tid, "prompt": prompt, "compute": compute,
            "losses": losses, "learned": {"token": token, "embedding": emb.weight[tid].detach().clone()}}


# ================================================================================================
# DreamBooth with LoRA
# ================================================================================================
def add_lora(backbone, rank: int):
    """A frozen copy of `backbone` with LoRA on `LORA_TARGETS` (diffusers' ``add_adapter`` on the
    inner U-Net when it has one, else peft's ``inject_adapter_in_model``); only LoRA weights
    require grad. Returns (backbone, LoRA parameters)."""
    from peft import LoraConfig

    bb = copy.deepcopy(backbone)
    bb.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    host = getattr(bb, "unet", None)
    if host is not None and hasattr(host, "add_adapter"):
        host.add_adapter(cfg)
    elif hasattr(bb, "add_adapter"):
        bb.add_adapter(cfg)
    else:
        from peft import inject_adapter_in_model
        inject_adapter_in_model(cfg, bb)
    params = []
    for n, p in bb.named_parameters():
        is_lora = "lora_" in n
        p.requires_grad_(is_lora)
        if is_lora:
            params.append(p)
    if not params:
        raise ValueError(f"backbone: no module of {type(backbone).__name__} matches the LoRA targets {LORA_TARGETS!r}")
    return bb, params


@torch.no_grad()
def class_latents(task, items, s: BaselineSettings, demo, class_prompt: str, seed: int) -> tuple:
    """`s.class_images` samples of `class_prompt` by the frozen base (`train_frames` frames at the
    toy's size), VAE-encoded as training encodes videos: (latents (N, C, F, h, w), cpu seconds)."""
    from . import evaluation as E

    c0 = time.process_time()
    fake = [dataclasses.replace(items[0], caption=class_prompt, video_id=f"class{i}") for i in range(s.class_images)]
    pipe = pipeline_for(task)
    vids = E.generate_videos(pipe, fake, dataclasses.replace(demo, progress=False), image=False, seed=seed,
                             num_frames=s.train_frames, image_prompt_scale=0.0, plain_prompts=True)
    lat = task.latents({"video": vids}, torch.Generator().manual_seed(seed))
    return lat, round(time.process_time() - c0, 3)


def train_dreambooth_lora(task, image: torch.Tensor, s: BaselineSettings, *, class_word: str,
                          class_x0: Optional[torch.Tensor], size: int, desc: str = "dreambooth_lora") -> dict:
    """LoRA on the base's attention projections from one image prompt, with prior preservation on
    `class_x0` (module docstring). Returns {backbone, prompt, compute, losses, prior_losses}."""
    from tqdm.auto import tqdm

    if s.prior_loss_weight > 0 and class_x0 is None:
        raise ValueError("class_x0: required with prior_loss_weight > 0 (the class samples of the prior loss)")
    bb, params = add_lora(task.backbone, s.rank)
    bb.train()
    g = torch.Generator().manual_seed(s.seed)
    with torch.no_grad():
        x0 = task.latents({"video": image_video(image, size, s.train_frames)}, g).expand(s.batch_size, -1, -1, -1, -1)
        prompt, class_prompt = f"a {s.identifier} {class_word}", f"a {class_word}"
        inst_text = tuple(t.expand(s.batch_size, *t.shape[1:])
                          for t in _encode(task.text_encoder, task.tokenizer, [prompt]))
        cls_text = tuple(t.expand(s.batch_size, *t.shape[1:])
                         for t in _encode(task.text_encoder, task.tokenizer, [class_prompt]))
    opt = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)
    losses, prior_losses = [], []
    c0, w0 = time.process_time(), time.perf_counter()
    bar = tqdm(range(s.steps), desc=desc, unit="step", disable=not s.progress)
    for _ in bar:
        cx = None
        if s.prior_loss_weight > 0:
            cx = class_x0[torch.randint(0, class_x0.shape[0], (s.batch_size,), generator=g)]
        loss, inst, prior = dreambooth_loss(task, bb, x0, inst_text, cx, cls_text, s.prior_loss_weight, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(inst.detach()))
        prior_losses.append(None if prior is None else float(prior.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    bar.close()
    compute = {"steps": s.steps, "cpu_seconds": round(time.process_time() - c0, 3),
               "wall_seconds": round(time.perf_counter() - w0, 3),
               "trainable_parameters": int(sum(p.numel() for p in params))}
    bb.eval().requires_grad_(False)
    learned = {n: p.detach().clone() for n, p in bb.named_parameters() if "lora_" in n}
    return {"backbone": bb, "prompt": prompt, "compute": compute, "losses": losses, "prior_losses": prior_losses,
            "learned": learned}


# ================================================================================================
# per subject: train, sample, score
# ================================================================================================
def personalised_caption(caption: str, word: str, method: str, token: str) -> str:
    """The clip's caption naming the learned subject: TI replaces the subject word by the token,
    DreamBooth puts the identifier before it."""
    words = caption.split()
    if word not in words:
        raise ValueError(f"caption: {caption!r} does not hold the subject word {word!r}")
    i = words.index(word)
    words[i] = token if method == "ti" else f"{token} {word}"
    return " ".join(words)


def subjects_of(items, n: int) -> List[list]:
    """The first `n` held-out identities, each with its clips (in the evaluation's order)."""
    groups: Dict[tuple, list] = {}
    for it in items:
        groups.setdefault(tuple(it.identity), []).append(it)
    if n > len(groups):
        raise ValueError(f"subjects: {n} asked, the toy's held-out set holds {len(groups)} identities at these settings")
    return list(groups.values())[:n]


def _scores(videos, items) -> List[dict]:
    from . import ablations as A

    rows = A.video_scores(videos, items)
    for r, v, it in zip(rows, videos, items):
        r["motion"] = A.centroid_motion(v, it)
    return rows


SUMMARY_KEYS = ("order", "order_soft", "color", "frame_change", "motion")


def _mean_rows(rows: List[dict]) -> Dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in SUMMARY_KEYS}


def run_baselines(s: BaselineSettings, out: Path, *, quick: bool = False, work: Optional[Path] = None) -> dict:
    """Train `s.method` per held-out subject on the text-only base, sample, score; writes
    ``baselines_<method>.json`` (and the videos / learned weights) under `out`. Returns the JSON."""
    from . import evaluation as E

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work) if work is not None else out / "base"
    t0 = time.perf_counter()
    a = base_settings(quick)
    a.demo = dataclasses.replace(a.demo, progress=s.progress)
    demo = a.demo
    task, cfg, paths, base_info = prepare_base(a, work, seed=s.seed)
    from . import experiment as X

    groups = subjects_of(X.make_eval_items(demo, paths["heldout"]), s.subjects)
    base_pipe = pipeline_for(task)
    gen = dict(image=False, image_prompt_scale=0.0, plain_prompts=True)
    quiet = dataclasses.replace(demo, progress=False)
    u8 = (lambda v: ((v + 1) * 127.5).round().to(torch.uint8))
    class_cache: Dict[str, tuple] = {}
    subjects, videos, learned = [], {}, {}
    all_items, all_pers, all_base = [], [], []
    for k, clips in enumerate(groups):
        first = clips[0]
        word = first.subject
        desc = f"{s.method} {k + 1}/{len(groups)} {'/'.join(first.identity)}"
        if s.method == "ti":
            token = f"<vb{k}>"
            r = train_textual_inversion(task, first.image, s, token=token, init_word=word, size=demo.size, desc=desc)
            pipe = pipeline_for(task, text_encoder=r["text_encoder"], tokenizer=r["tokenizer"])
            learned[token] = r["learned"]["embedding"]
        else:
            token = s.identifier
            if s.prior_loss_weight > 0 and word not in class_cache:
                class_cache[word] = class_latents(task, clips, s, demo, f"a {word}", seed=s.seed + 7777)
            cx, class_cpu = class_cache.get(word, (None, 0.0))
            r = train_dreambooth_lora(task, first.image, s, class_word=word, class_x0=cx, size=demo.size, desc=desc)
            r["compute"]["class_images_cpu_seconds_shared"] = class_cpu
            pipe = pipeline_for(task, backbone=r["backbone"])
            learned[f"subject{k}"] = r["learned"]
        seed = s.seed * 1000 + k   # per subject: the same noise for the personalised and the base sample
        c0 = time.process_time()
        p_items = [dataclasses.replace(it, caption=personalised_caption(it.caption, word, s.method, token)) for it in clips]
        vp = E.generate_videos(pipe, p_items, quiet, seed=seed, **gen)
        vb_ = E.generate_videos(base_pipe, clips, quiet, seed=seed, **gen)
        sample_cpu = round(time.process_time() - c0, 3)
        rows_p, rows_b = _scores(vp, clips), _scores(vb_, clips)
        videos[f"subject{k}"] = {"personalised": u8(vp), "base": u8(vb_)}
        all_items += clips
        all_pers.append(vp)
        all_base.append(vb_)
        subjects.append({
            "identity": "/".join(first.identity), "trained_on": first.video_id, "token": token,
            "train_prompt": r["prompt"], "clips": [it.video_id for it in clips],
            "prompts": [it.caption for it in p_items],
            "compute": dict(r["compute"], sample_cpu_seconds=sample_cpu),
            "loss_first": r["losses"][0], "loss_last": r["losses"][-1],
            **({"prior_loss_first": r["prior_losses"][0], "prior_loss_last": r["prior_losses"][-1]}
               if s.method == "dreambooth_lora" else {}),
            "scores": rows_p, "base_scores": rows_b,
            "mean": _mean_rows(rows_p), "base_mean": _mean_rows(rows_b)})
    ret = {}
    if len(all_items) > 1:
        for name, v in (("personalised", all_pers), ("base", all_base)):
            rows = E.identity_scores(torch.cat(v), all_items)
            ret[name] = {key: float(np.mean([x[key] for x in rows])) for key in ("color_id", "color_id_other",
                                                                                 "color_top1")}
        ret["chance_color_top1"] = E.chance_color_top1(all_items)
    summary = {"subjects": len(subjects),
               "personalised": {key: float(np.mean([x["mean"][key] for x in subjects])) for key in SUMMARY_KEYS},
               "base": {key: float(np.mean([x["base_mean"][key] for x in subjects])) for key in SUMMARY_KEYS},
               "cpu_seconds_per_subject": float(np.mean([x["compute"]["cpu_seconds"] for x in subjects])),
               "retrieval": ret}
    res = {"method": s.method, "settings": dataclasses.asdict(s), "learning_rate": s.learning_rate, "quick": quick,
           "lora_targets": LORA_TARGETS if s.method == "dreambooth_lora" else None,
           "toy": {"size": demo.size, "frames": demo.frames, "inference_steps": demo.inference_steps,
                   "guidance_scale": demo.guidance_scale, "identity_kind": demo.identity_kind},
           "base": base_info,
           "class_images": ({w: {"prompt": f"a {w}", "n": int(v[0].shape[0]), "cpu_seconds": v[1]}
                             for w, v in class_cache.items()} if s.method == "dreambooth_lora" else None),
           "subjects": subjects, "summary": summary, "seconds": round(time.perf_counter() - t0, 1)}
    (out / f"baselines_{s.method}.json").write_text(json.dumps(res, indent=1))
    torch.save(videos, out / f"videos_{s.method}.pt")
    torch.save(learned, out / f"learned_{s.method}.pt")
    return res


# ================================================================================================
# the command
# ================================================================================================
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vb_train.toy.baselines", description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--subjects", type=int, required=True, help="held-out identities, one personalisation each")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps per subject (the budget)")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="the study's quick toy and base (numbers mean nothing)")
    p.add_argument("--work", help="where the base's data, VAE and run live (default OUT/base; a study --full folder "
                                  "holds the same base)")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-frames", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--prior-loss-weight", type=float, default=1.0)
    p.add_argument("--class-images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("subjects", "steps", "batch_size", "train_frames", "rank", "class_images", "threads"):
        v = getattr(args, name)
        if v < 1:
            p.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {v}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr: expected a float > 0, got {args.lr}")
    if not args.prior_loss_weight >= 0:
        p.error(f"--prior-loss-weight: expected a float >= 0, got {args.prior_loss_weight}")
    torch.set_num_threads(args.threads)
    s = BaselineSettings(args.method, subjects=args.subjects, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, train_frames=args.train_frames, rank=args.rank,
                         prior_loss_weight=args.prior_loss_weight, class_images=args.class_images, seed=args.seed,
                         progress=not args.no_progress)
    try:
        res = run_baselines(s, Path(args.out), quick=args.quick, work=Path(args.work) if args.work else None)
    except ValueError as e:
        if str(e).startswith("subjects:"):
            p.error(f"--{e}")
        raise
    sm = res["summary"]
    print(json.dumps({"method": res["method"], "subjects": sm["subjects"],
                      "cpu_seconds_per_subject": sm["cpu_seconds_per_subject"], "personalised": sm["personalised"],
                      "base": sm["base"]}, indent=1))
    print(f"wrote {args.out}/baselines_{s.method}.json ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
