"""Does the fine path carry the detail the coarse path cannot? The two-tone study, with controls.

    python -m vb_train.toy.study --gate --out study_gate --jobs 2    # the gate (about 20 min, 2-core CPU)
    python -m vb_train.toy.study --full --out study_full --jobs 2    # the full table (longer)
    python -m vb_train.toy.study --gate --quick --out /tmp/q         # a smoke run (numbers mean nothing)

The toy is the ablations' two-tone square (`vb_train.toy.ablations`, docs/demo.md): upper half colour
A, lower half colour B, the identity is the ordered pair. What changed against the ablations:

- the coarse path is blind to the order *on the tensor it is fed*: it encodes the prompt and the
  prompt with its two colours swapped (`vb_train.toy.synthetic.swap_two_tone`, made by the loader
  with the same crop and augmentation draws) and averages the tower's outputs
  (``model.coarse_input: swap-average``), in training and in sampling alike; the image tower keeps
  its positional embedding;
- the exemplar projections start stage 2 as copies of the trained attn1 K/V (as the official code
  does; ``model.exemplar_init``);
- controls: an oracle arm whose coarse path is told the arrangement (the mapper's tokens of the
  upper half, then of the lower half: ``model.coarse_input: halves``) is the positive control, a
  grey-prompt arm (no prompt ever reaches the model in training) the negative one;
- metrics that can see the order: the flip-loss gap (the denoising loss with the swapped prompt
  minus with the true one, same noisy input, t = 100..900; 0 by construction without a path
  that sees the order), the paired flip contrast on samples from the same noise (threshold-free
  `two_tone_order_soft` with the true prompt minus with the swapped one), the thresholded
  `two_tone_order` as before, colour identity, and frame-one copying as the subject's centroid
  motion along the caption's direction;
- intervals: per seed, clips are averaged within an identity and identities averaged (clips of
  one identity are not independent); the interval is a t interval over the seed means. Within a
  seed the unit is the colour pair (A over B and B over A share their colours: not independent;
  issue 32); sign tests over seed means are two-sided; the flip-loss gap is the primary metric;
  a seed whose grey control's interval excludes 0 is marked and the run is not called clean.

Gate (`--gate`): seen colour pairs of four high-contrast colours (red, green, blue, yellow: 12
ordered pairs, training and evaluation clips drawn from the same identities), arms reference (one
image copy), reference with the official image stream (F noised copies, `model.image_stream:
official`), coarse only, oracle, grey; it passes when the oracle's flip contrast is above 0 in
every seed (each seed's interval over colour pairs). Full table (`--full`): held-out colour pairs
as in the ablations, arms reference, reference with the official stream, coarse only, fine only,
one-stage joint, oracle, grey, IP-Adapter-Plus, and the clean-latent fine path (a diagnostic: the
image latent un-noised in training and sampling). ``--reread DIR`` summarises a finished folder's
units again without training; ``--control-dir DIR`` adds another folder's oracle (another budget,
same data) as a positive control.

Outputs under --out: study.md, study.json, study.png, units/ (per arm and seed; a rerun skips the
finished ones) and the run directories.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import ablations as A
from . import experiment as X

GATE_ARMS = ("ref", "ref_official", "coarse_only", "oracle", "grey")
FULL_ARMS = ("ref", "ref_official", "coarse_only", "fine_only", "joint", "oracle", "grey", "ipplus", "clean")
POSITIVE_CONTROLS = ("oracle",)   # arms that must find the arrangement (what --control-dir adds)
GATE_COLOURS = ("red", "green", "blue", "yellow")
STUDY_EXTRA = {"model.coarse_input": "swap-average", "data.paired_transform": "vb_train.toy.synthetic:swap_two_tone"}
# two-sided 95% t quantiles by degrees of freedom (no scipy here)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    if df < 1:
        return float("nan")
    return T975.get(df) or T975[max(k for k in T975 if k <= df)]


def settings(kind: str, quick: bool = False, **demo_kw) -> A.AblationSettings:
    """The gate's or the full table's settings (module docstring); quick: a smoke run."""
    if kind not in ("gate", "full"):
        raise ValueError(f"kind: expected 'gate' or 'full', got {kind!r}")
    extra = dict(STUDY_EXTRA)
    kw = dict(identity_kind="two-tone", clips_per_subject=2, data_size=48, two_tone_side=32, data_frames=8,
              steps1=300, steps2=500, vae_steps=600)
    if kind == "gate":
        # seen pairs: the 12 ordered pairs of 4 colours, in training and in evaluation (new clips);
        # the CSV's split column is the ablations' held-out split, so no row filter
        kw.update(colours=GATE_COLOURS, eval_split="train", heldout_subjects=24)
        extra["data.split"] = None
    else:
        kw.update(heldout_subjects=40)
    kw["extra"] = extra
    if quick:
        kw.update(train_clips=12, heldout_subjects=4, data_size=32, two_tone_side=16, vae_steps=5, vae_batch=16,
                  steps1=2, steps2=2, batch_size=2, inference_steps=2, gif_rows=3)
    kw.update(demo_kw)
    arms = GATE_ARMS if kind == "gate" else FULL_ARMS
    return A.AblationSettings(X.DemoSettings(**kw), seeds=1 if quick else 3, arms=arms)


# ================================================================================================
# numbers
# ================================================================================================
def identity_means(values: Sequence[float], identities: Sequence[str]) -> List[float]:
    """The mean of each identity's clips (clips of one identity are not independent), in the
    order the identities first appear."""
    groups: Dict[str, List[float]] = {}
    for v, i in zip(values, identities):
        groups.setdefault(i, []).append(float(v))
    return [float(np.mean(g)) for g in groups.values()]


def seed_means(values: Sequence[float], identities: Sequence[str]) -> float:
    """The mean over identities of the mean over each identity's clips."""
    return float(np.mean(identity_means(values, identities)))


def t_interval(x: Sequence[float]) -> dict:
    """Mean of x (one value per seed) with its two-sided 95% t interval."""
    x = np.asarray(x, np.float64)
    m = float(x.mean())
    if len(x) < 2:
        return {"mean": m, "ci95": [float("nan"), float("nan")], "per_seed": x.tolist()}
    h = t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return {"mean": m, "ci95": [m - h, m + h], "per_seed": x.tolist()}


def colour_pair(identity: str) -> str:
    """The unordered colour pair of a two-tone identity ``shape/two-tone/A/B`` (``A/B`` and ``B/A``
    are one pair: the same two colours in both orders, not independent); other identities are
    their own unit."""
    parts = str(identity).split("/")
    if len(parts) >= 4 and parts[1] == "two-tone":
        return "/".join(sorted(parts[-2:]))
    return str(identity)


def pair_means(values: Sequence[float], identities: Sequence[str]) -> List[float]:
    """The mean of each colour pair's identity means (clips averaged within an identity, then the
    pair's two orders averaged), in the order the pairs first appear."""
    ids = identity_means(values, identities)
    order = list(dict.fromkeys(identities))
    groups: Dict[str, List[float]] = {}
    for m, i in zip(ids, order):
        groups.setdefault(colour_pair(i), []).append(m)
    return [float(np.mean(g)) for g in groups.values()]


def within_seed_interval(values: Sequence[float], identities: Sequence[str], unit: str = "pair") -> List[float]:
    """A 95% t interval of one seed's mean: over colour pairs (``unit="pair"``, the independent
    unit of the two-tone toy: a pair's two orders share their colours) or over identities
    (``unit="identity"``, what the study used before issue 32: too narrow where orders correlate)."""
    if unit not in ("pair", "identity"):
        raise ValueError(f"unit: expected 'pair' or 'identity', got {unit!r}")
    xs = pair_means(values, identities) if unit == "pair" else identity_means(values, identities)
    return t_interval(xs)["ci95"]


def sign_test(x: Sequence[float]) -> dict:
    """The two-sided exact sign test of "the median is 0" over seed means: {positive, n, p}
    (zeros dropped; p = min(1, 2 P(X <= min(k, n - k))) for X ~ Binomial(n, 1/2)). With 5 seeds
    its smallest p is 2/32 = 0.0625: five seeds can not be significant by a sign test."""
    xs = [v for v in x if v != 0]
    n, k = len(xs), sum(v > 0 for v in xs)
    if n == 0:
        return {"positive": 0, "n": 0, "p": 1.0}
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n
    return {"positive": int(k), "n": n, "p": float(min(1.0, 2 * tail))}


def excludes_zero(ci: Sequence[float]) -> bool:
    lo, hi = ci
    return not (math.isnan(lo) or lo <= 0 <= hi)


def unit_metrics(u: dict) -> Dict[str, List[float]]:
    """Per clip, every score of one unit (arm x seed)."""
    m: Dict[str, List[float]] = {"flip_loss_gap": u["flip_loss_gap"]}
    if "image" in u:
        im, tx, sw = u["image"], u["text"], u["swapped"]
        m["flip_contrast"] = [a["order_soft"] - b["order_soft"] for a, b in zip(im, sw)]
        m["order_soft_image"] = [a["order_soft"] for a in im]
        m["order_image"] = [a["order"] for a in im]
        m["delta_order"] = [a["order"] - b["order"] for a, b in zip(im, tx)]
        m["order_contrast"] = [a["order"] - b["order"] for a, b in zip(im, sw)]
        m["color_image"] = [a["color"] for a in im]
        m["delta_color"] = [a["color"] - b["color"] for a, b in zip(im, tx)]
        m["motion_image"] = u["motion"]["image"]
        m["motion_text"] = u["motion"]["text"]
        m["frame_change_image"] = [a["frame_change"] for a in im]
    return m


METRICS = ("flip_loss_gap", "flip_contrast", "order_contrast", "order_soft_image", "delta_order", "color_image",
           "delta_color", "motion_image", "motion_text", "frame_change_image")


def summarise(per_arm: Dict[str, List[dict]]) -> Dict[str, dict]:
    out: Dict[str, dict] = {}
    # per arm, per seed: every metric's mean over identities (each unit's clips read once)
    means: Dict[str, Dict[int, Dict[str, float]]] = {}
    for key, units in per_arm.items():
        arm = A.ARM_BY_KEY[key]
        per = [unit_metrics(u) for u in units]
        means[key] = {u["seed"]: {m: seed_means(v, u["identities"]) for m, v in p.items()}
                      for p, u in zip(per, units)}
        r = {"name": arm.name, "seeds": len(units), "steps": units[0]["steps"], "n": len(units[0]["subjects"]),
             "identities": len(set(units[0]["identities"])), "seconds": sum(u["seconds"] for u in units)}
        for m in METRICS:
            if m in per[0]:
                r[m] = t_interval([means[key][u["seed"]][m] for u in units])
        r["seed_ids"] = [u["seed"] for u in units]
        r["flip_contrast_within_seed"] = ([within_seed_interval(p["flip_contrast"], u["identities"])
                                           for p, u in zip(per, units)] if "flip_contrast" in per[0] else None)
        r["flip_gap_within_seed"] = [within_seed_interval(p["flip_loss_gap"], u["identities"])
                                     for p, u in zip(per, units)]
        r["pairs"] = len(pair_means(per[0]["flip_loss_gap"], units[0]["identities"]))
        r["sign_test"] = {m: sign_test(r[m]["per_seed"]) for m in ("flip_loss_gap", "flip_contrast") if m in r}
        if all("flip_loss_gap_by_t" in u for u in units):  # mean over seeds (and clips) per timestep
            r["flip_loss_gap_by_t"] = np.mean([u["flip_loss_gap_by_t"] for u in units], axis=0).tolist()
        out[key] = r
    # the paper's claim and the baselines, as differences of seed means against coarse only / the reference
    for base in ("coarse_only", "ref"):
        if base not in per_arm:
            continue
        for key, units in per_arm.items():
            if key == base or (base == "ref" and key == "coarse_only"):
                continue
            diffs = {}
            for m in ("flip_loss_gap", "flip_contrast", "order_contrast", "delta_order", "color_image"):
                xs = [means[key][u["seed"]][m] - means[base][u["seed"]][m] for u in units
                      if u["seed"] in means[base] and m in means[key][u["seed"]] and m in means[base][u["seed"]]]
                if xs:
                    diffs[m] = t_interval(xs)
            out[key][f"vs_{base}"] = diffs
    return out


def controls_verdict(summary: Dict[str, dict], positive: Sequence[str] = ("oracle",)) -> dict:
    """The run's controls on the primary metric (the flip-loss gap) and the flip contrast:

    - negative control (grey): the seeds whose within-seed interval (over colour pairs) excludes 0;
      any such seed marks the run as not clean;
    - positive controls (``positive``, those present): whether the interval over seed means
      excludes 0 (significant across seeds), per seed whether the within-seed interval does, and
      the two-sided sign test.
    A null of another arm means something only where a positive control holds on the same split."""
    out: dict = {"grey_excludes_zero": {}, "positive": {}}
    g = summary.get("grey")
    if g:
        for m, key in (("flip_loss_gap", "flip_gap_within_seed"), ("flip_contrast", "flip_contrast_within_seed")):
            out["grey_excludes_zero"][m] = [sd for sd, ci in zip(g["seed_ids"], g.get(key) or []) if excludes_zero(ci)]
    out["grey_present"] = bool(g)
    out["clean"] = bool(g) and not any(out["grey_excludes_zero"].values())
    for k in positive:
        r = summary.get(k)
        if not r:
            continue
        out["positive"][k] = {
            "name": r["name"], "across_seeds": excludes_zero(r["flip_loss_gap"]["ci95"]),
            "ci95": r["flip_loss_gap"]["ci95"],
            "seeds_excluding_zero": [sd for sd, ci in zip(r["seed_ids"], r["flip_gap_within_seed"]) if excludes_zero(ci)],
            "seeds": r["seed_ids"], "sign_test": r["sign_test"]["flip_loss_gap"]}
    out["positive_control_holds"] = any(v["across_seeds"] for v in out["positive"].values())
    return out


def gate_verdict(summary: Dict[str, dict]) -> dict:
    """The gate passes when the oracle's flip contrast is above 0 in every seed (the lower end of
    each seed's interval over identities) and the negative control's seed intervals hold 0."""
    o = summary.get("oracle", {})
    per = o.get("flip_contrast_within_seed") or []
    ok = bool(per) and all(lo > 0 for lo, _ in per)
    g = summary.get("grey", {}).get("flip_contrast_within_seed") or []
    null_ok = bool(g) and all(lo <= 0 <= hi for lo, hi in g)
    return {"oracle_learns_every_seed": ok, "oracle_per_seed": per, "grey_holds_zero_every_seed": null_ok,
            "grey_per_seed": g}


# ================================================================================================
# tables and plots
# ================================================================================================
def _ci(d: Optional[dict], digits: int = 3) -> str:
    if not d:
        return "-"
    lo, hi = d["ci95"]
    if math.isnan(lo):
        return f"{d['mean']:+.{digits}f}"
    return f"{d['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def tables(summary: Dict[str, dict]) -> Dict[str, str]:
    md = A._md
    main = md(["arm", "seeds", "steps", "flip-loss gap (x1e3)", "flip contrast (soft order)",
               "order: true - swapped prompt", "Δ order image - text", "colour (image)", "Δ colour image - text",
               "motion along caption (image)", "(text only)"],
              ([r["name"], str(r["seeds"]), r["steps"],
                _ci({"mean": r["flip_loss_gap"]["mean"] * 1e3, "ci95": [v * 1e3 for v in r["flip_loss_gap"]["ci95"]]}),
                _ci(r.get("flip_contrast")), _ci(r.get("order_contrast")), _ci(r.get("delta_order")),
                _ci(r.get("color_image")), _ci(r.get("delta_color")), _ci(r.get("motion_image")),
                _ci(r.get("motion_text"))] for r in summary.values()))
    rows = []
    for key, r in summary.items():
        for base in ("coarse_only", "ref"):
            d = r.get(f"vs_{base}")
            if d:
                rows.append([f"{r['name']} - {summary[base]['name']}", str(len(d.get('flip_loss_gap', {}).get('per_seed', []))),
                             _ci({"mean": d["flip_loss_gap"]["mean"] * 1e3,
                                  "ci95": [v * 1e3 for v in d["flip_loss_gap"]["ci95"]]}) if "flip_loss_gap" in d else "-",
                             _ci(d.get("flip_contrast")), _ci(d.get("order_contrast")), _ci(d.get("color_image"))])
    contrasts = md(["contrast (differences of seed means)", "seeds", "flip-loss gap (x1e3)", "flip contrast",
                    "order: true - swapped", "colour (image)"], rows)
    grey_bad = set()
    g = summary.get("grey")
    if g:
        grey_bad = {sd for sd, a, b in zip(g["seed_ids"], g["flip_gap_within_seed"], g.get("flip_contrast_within_seed")
                                           or [[0, 0]] * len(g["seed_ids"])) if excludes_zero(a) or excludes_zero(b)}

    def cell(sd, lo, hi, k=1.0, digits=3):
        mark = " †" if sd in grey_bad else ""
        star = "*" if excludes_zero([lo, hi]) else ""
        return f"s{sd}: [{lo * k:+.{digits}f}, {hi * k:+.{digits}f}]{star}{mark}"

    def sign(r, m):
        st = r.get("sign_test", {}).get(m)
        return f"{st['positive']}/{st['n']} positive, p = {st['p']:.3f}" if st else "-"

    per_seed = md(["arm", "flip-loss gap per seed (x1e3) [95% over colour pairs]", "sign test, gap (two-sided)",
                   "flip contrast per seed [95% over colour pairs]", "sign test, contrast (two-sided)"],
                  ([r["name"], "; ".join(cell(sd, lo, hi, 1e3, 2) for sd, (lo, hi) in zip(r["seed_ids"], r["flip_gap_within_seed"])),
                    sign(r, "flip_loss_gap"),
                    "; ".join(cell(sd, lo, hi) for sd, (lo, hi) in zip(r["seed_ids"], r["flip_contrast_within_seed"] or [])) or "-",
                    sign(r, "flip_contrast")]
                   for r in summary.values()))
    ts = (100, 200, 300, 400, 500, 600, 700, 800, 900)
    by_t = md(["arm"] + [f"t={t}" for t in ts],
              ([r["name"]] + [f"{x * 1e3:+.3f}" for x in r["flip_loss_gap_by_t"]]
               for r in summary.values() if r.get("flip_loss_gap_by_t")))
    return {"main": main, "contrasts": contrasts, "per_seed": per_seed, "by_t": by_t}


def plot(summary: Dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.45 * len(keys) + 1.6), dpi=110, sharey=True)
    for ax, (m, title, k) in zip(axes, (("flip_loss_gap", "flip-loss gap (x1e3)", 1e3),
                                        ("flip_contrast", "flip contrast (soft order)", 1.0),
                                        ("delta_color", "Δ colour image - text", 1.0))):
        for i, key in enumerate(keys):
            d = summary[key].get(m)
            if not d:
                continue
            y = len(keys) - 1 - i
            lo, hi = (v * k for v in d["ci95"])
            mean = d["mean"] * k
            err = None if math.isnan(lo) else [[mean - lo], [hi - mean]]
            ax.barh(y, mean, xerr=err, color="tab:grey" if key in ("oracle", "grey") else "tab:blue", alpha=0.85,
                    capsize=3)
            ax.scatter([v * k for v in d["per_seed"]], [y] * len(d["per_seed"]), color="black", s=8, zorder=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(keys)))
    axes[0].set_yticklabels([summary[k]["name"] for k in reversed(keys)], fontsize=7)
    fig.supxlabel("mean over seeds, 95% t interval over seed means; dots: seeds", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def real_clip_scores(a: A.AblationSettings, paths: dict) -> dict:
    """The evaluated clips themselves, scored as the generated ones (what a model that draws the
    arrangement and the motion would reach): order and soft order against their own prompt and
    against the swapped one, colour, centroid motion along the caption."""
    items = X.make_eval_items(a.demo, paths["heldout"])
    videos = torch.stack([it.video for it in items])
    own = A.video_scores(videos, items)
    swapped = [dataclasses.replace(it, image=it.image_paired) for it in items]
    other = A.video_scores(videos, swapped)
    ids = ["/".join(it.identity) for it in items]
    return {"order": seed_means([r["order"] for r in own], ids),
            "order_soft": seed_means([r["order_soft"] for r in own], ids),
            "flip_contrast": seed_means([x["order_soft"] - y["order_soft"] for x, y in zip(own, other)], ids),
            "color": seed_means([r["color"] for r in own], ids),
            "motion": seed_means([A.centroid_motion(v, it) for v, it in zip(videos, items)], ids)}


def flip_grid(a: A.AblationSettings, out: Path, paths: dict, keys: Sequence[str], rows: int = 8) -> Optional[Path]:
    """study_flip.gif (+ .png): per clip (seed 0), its prompt, then per arm the video from the
    prompt and from the swapped prompt, same noise (what the flip contrast scores)."""
    from . import evaluation as E

    items = X.make_eval_items(a.demo, paths["heldout"])[:rows]
    cols = {}
    for k in keys:
        f = A._unit_file(out, f"{k}-s0").with_suffix(".pt")
        if not f.is_file():
            continue
        v = torch.load(f)
        if "swapped" not in v:
            continue
        for side, tag in (("image", "prompt"), ("swapped", "swap")):
            cols[f"{k} {tag}"] = v[side][: len(items)].float() / 127.5 - 1
    if not cols:
        return None
    labels = [it.identity[2] for it in items]
    side = a.demo.size * a.demo.gif_scale
    return E.write_grid(out / "study_flip.gif", cols, torch.stack([it.image for it in items]), side=side,
                        labels=labels)[0]


def controls_lines(cv: dict) -> List[str]:
    """The report's first lines: is there a positive control that holds across seeds, and is the
    run clean (the grey control's seed intervals hold 0)."""
    lines = []
    for k, v in cv["positive"].items():
        lo, hi = v["ci95"]
        st = v["sign_test"]
        lines.append(f"- positive control **{v['name']}**: flip-loss gap over seed means [{lo * 1e3:+.2f}, {hi * 1e3:+.2f}] "
                     f"x1e3: {'**significant across seeds**' if v['across_seeds'] else '**not significant across seeds**'}; "
                     f"its interval over colour pairs excludes 0 in seeds {v['seeds_excluding_zero'] or 'none'} of "
                     f"{v['seeds']}; sign test {st['positive']}/{st['n']} positive, two-sided p = {st['p']:.3f}.")
    if not cv["positive_control_holds"]:
        lines.append("- **No positive control holds across seeds in this table: no conclusion is drawn from its "
                     "nulls** (an arm that finds nothing means something only beside a control that finds it on the "
                     "same split).")
    bad = cv["grey_excludes_zero"]
    if not cv.get("grey_present", True):
        lines.append("- no negative control (grey) in this run: it can not be called clean.")
    elif cv["clean"]:
        lines.append("- negative control (grey): its interval over colour pairs holds 0 in every seed, for the flip-loss "
                     "gap and the flip contrast: the run is clean.")
    else:
        lines.append(f"- **negative control (grey) fails its own rule**: its interval over colour pairs excludes 0 in "
                     f"seeds {bad.get('flip_loss_gap') or 'none'} (flip-loss gap) and {bad.get('flip_contrast') or 'none'} "
                     f"(flip contrast); those seeds are marked † below and **the run is not clean**.")
    return lines


def report(kind: str, summary: Dict[str, dict], verdict: Optional[dict], a: A.AblationSettings, total: float,
           out: Path, ceiling: Optional[dict] = None, controls: Optional[dict] = None,
           header: Sequence[str] = ()) -> str:
    t = tables(summary)
    p = plot(summary, out / "study.png")
    s = a.demo
    what = (f"seen pairs of {', '.join(s.colours or ())} (new clips of the training identities)"
            if s.eval_split == "train" else "held-out colour pairs in both orders")
    md = [f"# Fine-path study on the two-tone toy: {kind}", "",
          f"Tiny VideoBooth, {s.size} px, {s.frames} frames, {s.steps1} + {s.steps2} steps, batch {s.batch_size}; "
          f"evaluation on {what}, {summary[next(iter(summary))]['n']} clips of "
          f"{summary[next(iter(summary))]['identities']} identities per seed, the same initial noise for every arm. "
          f"The coarse input is the mean of the tower's outputs for the prompt and its colour-swapped version "
          f"(order-blind on the fed tensor) except in the oracle (the upper and the lower half as separate "
          f"tokens). Intervals: 95% t over seed means (clips averaged within an identity first); within a seed, "
          f"95% t over colour pairs (a pair's two orders averaged first: they are not independent). The flip-loss "
          f"gap is the primary metric. Sign tests two-sided over seed means. Reading: docs/demo.md.", ""]
    md += list(header)
    if controls is not None:
        md += ["## Controls", ""] + controls_lines(controls) + [""]
    if verdict is not None:
        md += [f"**Gate:** oracle learns the arrangement in every seed: **{verdict['oracle_learns_every_seed']}** "
               f"(flip contrast per seed, 95% over colour pairs: "
               f"{'; '.join(f'[{lo:+.3f}, {hi:+.3f}]' for lo, hi in verdict['oracle_per_seed'])}); the grey control's "
               f"intervals hold 0 in every seed: {verdict['grey_holds_zero_every_seed']}.", ""]
    if ceiling:
        md += [f"Real clips against their own prompt (the ceiling): order {ceiling['order']:+.3f}, soft order "
               f"{ceiling['order_soft']:+.3f}, flip contrast (own - swapped prompt) {ceiling['flip_contrast']:+.3f}, "
               f"colour {ceiling['color']:.3f}, motion along the caption {ceiling['motion']:+.3f}.", ""]
    md += ["## Every arm", "", t["main"], "", "## Contrasts", "", t["contrasts"], "", "## Per seed", "",
           "`*`: the seed's interval over colour pairs excludes 0; `†`: a seed in which the grey control's interval "
           "excludes 0 (flip-loss gap or flip contrast).", "", t["per_seed"], ""]
    if any(r.get("flip_loss_gap_by_t") for r in summary.values()):
        md += ["## Flip-loss gap by noise level (x1e3, mean over seeds and clips)", "", t["by_t"], ""]
    md += [f"![study]({p.name})", ""]
    if (out / "study_flip.png").is_file():
        md += ["Seed 0, first clips: the prompt, then per arm the video from the prompt and from the swapped "
               "prompt (same noise); animated in `study_flip.gif`.", "", "![flip](study_flip.png)", ""]
    md += [
           f"Wall time {total:.0f} s (the longest invocation; finished units are read, not rerun); the arms' own "
           f"train + evaluation times sum to {sum(r['seconds'] for r in summary.values()):.0f} s."]
    return "\n".join(md) + "\n"


# ================================================================================================
# the command
# ================================================================================================
def control_summaries(dirs: Sequence[Path]) -> Dict[str, dict]:
    """Positive-control arms of other study folders (e.g. the oracle at a larger budget), read from
    their units and summarised as here; keyed ``<arm>@<folder name>``, named with their steps."""
    out: Dict[str, dict] = {}
    for d in dirs:
        d = Path(d)
        units: Dict[str, List[dict]] = {}
        for f in sorted((d / "units").glob("*-s*.json")):
            u = json.loads(f.read_text())
            if "arm" in u and "flip_loss_gap" in u:
                units.setdefault(u["arm"], []).append(u)
        if not units:
            raise FileNotFoundError(f"control_dirs: no arm units under {d}/units")
        units = {k: v for k, v in units.items() if k in POSITIVE_CONTROLS}
        if not units:
            raise FileNotFoundError(f"control_dirs: no positive-control arm ({POSITIVE_CONTROLS}) under {d}/units")
        for key, r in summarise(units).items():
            r = dict(r, name=f"{r['name']}, {r['steps']} steps")
            out[f"{key}@{d.name}"] = r
    return out


def run_study(kind: str, a: A.AblationSettings, out: Path, jobs: int = 1, threads: int = 1,
              control_dirs: Sequence[Path] = (), header: Sequence[str] = ()) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    keys = list(dict.fromkeys(a.arms))
    unknown = set(keys) - {x.key for x in A.STUDY_ARMS}
    if unknown:
        raise ValueError(f"arms: unknown {sorted(unknown)}; the study's: {[x.key for x in A.STUDY_ARMS]}")
    arms = [A.ARM_BY_KEY[k] for k in keys]
    paths, vae_stats = A.prepare(a, out)
    A.run_units_of(a, out, arms, keys, paths, jobs, threads)
    per_arm = {arm.key: [json.loads(A._unit_file(out, f"{arm.key}-s{seed}").read_text())
                         for seed in A.seeds_of(a, arm)] for arm in arms}
    total = round(time.perf_counter() - t0, 1)
    prev = out / "study.json"   # a rerun that only read finished units keeps the training run's wall time
    if prev.is_file():
        total = max(total, float(json.loads(prev.read_text()).get("seconds", 0.0)))
    summary = summarise(per_arm)
    extra = control_summaries(control_dirs)
    summary.update(extra)
    verdict = gate_verdict(summary) if kind == "gate" else None
    controls = controls_verdict(summary, ["oracle", *extra])
    ceiling = real_clip_scores(a, paths)
    flip_grid(a, out, paths, [k for k in ("ref", "ref_official", "coarse_only", "oracle", "ipplus") if k in per_arm])
    md = report(kind, summary, verdict, a, total, out, ceiling, controls, header)
    res = {"kind": kind, "settings": {"demo": dataclasses.asdict(a.demo), "seeds": a.seeds, "arms": list(a.arms),
                                      "control_dirs": [str(d) for d in control_dirs]},
           "summary": summary, "gate": verdict, "controls": controls, "real_clips": ceiling, "vae": vae_stats,
           "seconds": total}
    (out / "study.json").write_text(json.dumps(res, indent=1))
    (out / "study.md").write_text(md)
    return res


def reread(out: Path, control_dirs: Sequence[Path] = (), header: Sequence[str] = ()) -> str:
    """A finished study folder's units summarised again with this module's statistics (within-seed
    intervals over colour pairs, two-sided sign tests, the controls' verdict), without training,
    data or VAE: ``<out>/study_reread.md`` (+ .json). Returns the markdown."""
    out = Path(out)
    per_arm: Dict[str, List[dict]] = {}
    for f in sorted((out / "units").glob("*-s*.json")):
        u = json.loads(f.read_text())
        if "arm" in u and "flip_loss_gap" in u and u["arm"] in A.ARM_BY_KEY:
            per_arm.setdefault(u["arm"], []).append(u)
    if not per_arm:
        raise FileNotFoundError(f"out: no study units under {out}/units")
    order = [k for k in (*FULL_ARMS, *GATE_ARMS) if k in per_arm]
    per_arm = {k: sorted(per_arm[k], key=lambda u: u["seed"]) for k in dict.fromkeys(order)}
    summary = summarise(per_arm)
    summary.update(control_summaries(control_dirs))
    controls = controls_verdict(summary, ["oracle", *[k for k in summary if "@" in k]])
    t = tables(summary)
    md = [f"# {out.name}: the committed units re-read (issue 32's statistics)", "",
          f"    python -m vb_train.toy.study --reread {out}" + "".join(f" --control-dir {d}" for d in control_dirs), "",
          "Nothing retrained: the units of the table as committed, summarised with within-seed intervals over colour "
          "pairs (a pair's two orders averaged first), two-sided sign tests over seed means and the controls' rule. "
          "Intervals over seed means are unchanged.", "", *header, *([""] if header else []),
          "## Controls", "", *controls_lines(controls), "",
          "## Every arm", "", t["main"], "", "## Contrasts", "", t["contrasts"], "", "## Per seed", "",
          "`*`: the seed's interval over colour pairs excludes 0; `†`: a seed in which the grey control's interval "
          "excludes 0 (flip-loss gap or flip contrast).", "", t["per_seed"], ""]
    if any(r.get("flip_loss_gap_by_t") for r in summary.values()):
        md += ["## Flip-loss gap by noise level (x1e3, mean over seeds and clips)", "", t["by_t"], ""]
    md += [f"![study]({plot(summary, out / 'study_reread.png').name})", ""]
    text = "\n".join(md) + "\n"
    (out / "study_reread.md").write_text(text)
    (out / "study_reread.json").write_text(json.dumps({"summary": summary, "controls": controls}, indent=1))
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vb_train.toy.study", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--gate", action="store_true", help="the gate: seen pairs, reference / coarse only / oracle / grey")
    g.add_argument("--full", action="store_true", help="the full table: held-out pairs, every arm")
    g.add_argument("--reread", metavar="DIR", help="summarise a finished study folder's units again (no training)")
    p.add_argument("--out")
    p.add_argument("--quick", action="store_true", help="tiny everything (a smoke run; numbers mean nothing)")
    p.add_argument("--arms", help="comma-separated subset of the suite's arms")
    p.add_argument("--seeds", type=int, help="seeds (default 3)")
    p.add_argument("--steps1", type=int)
    p.add_argument("--steps2", type=int)
    p.add_argument("--control-dir", action="append", default=[],
                   help="another study folder whose arms are added as positive controls (e.g. the oracle at a "
                        "larger budget, same data); repeatable")
    p.add_argument("--header", action="append", default=[], help="a line for the top of study.md; repeatable")
    A.add_run_options(p, "torch CPU threads per run (default 1)")
    args = p.parse_args(argv)
    if args.reread:
        print(reread(Path(args.reread), [Path(d) for d in args.control_dir], args.header))
        return 0
    if not args.out:
        p.error("--out: required with --gate / --full")
    kind = "gate" if args.gate else "full"
    kw = A.apply_run_options(args, {k: getattr(args, k) for k in ("steps1", "steps2") if getattr(args, k) is not None})
    a = settings(kind, args.quick, **kw)
    if args.arms:
        a.arms = tuple(args.arms.split(","))
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit(f"--seeds: expected an int >= 1, got {args.seeds}")
        a.seeds = args.seeds
    res = run_study(kind, a, Path(args.out), jobs=args.jobs, threads=args.threads,
                    control_dirs=[Path(d) for d in args.control_dir], header=args.header)
    print((Path(args.out) / "study.md").read_text())
    print(f"wrote {args.out}/study.md, study.json, study.png ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
