"""Does the two-tone toy do what it claims? Linear probes before any VideoBooth training.

    python -m vb_train.toy.probe --out probe_out        # about 2 minutes on one CPU core

The two-tone identity (`vb_train.toy.synthetic`, identity_kind="two-tone") is an ordered colour pair:
the upper half of the subject in colour A, the lower half in colour B. The claim is that the
arrangement (which colour is on top) is a detail the coarse path's input barely carries while
the fine path's input (the image prompt's VAE latent) carries it plainly. A ridge probe is
fitted on the image prompts of the training clips and scored on the held-out subjects (colour
pairs never seen in training, in both orders), for two targets:

- detail: rgb(A) - rgb(B) (antisymmetric: it flips sign when the halves swap);
- colour set: rgb(A) + rgb(B) (what a colour histogram sees).

Reported per feature set: R^2 of each target on held-out subjects, and the order accuracy
(the fraction of held-out prompts where the predicted detail d satisfies d . (A - B) > 0;
chance 0.5). Feature sets: the coarse path's input (the frozen image encoder's CLS tokens, mean
patch tokens, both, the pooled embedding), optionally a trained mapper's output, and the fine
path's input (the VAE latent of the prompt at the video's size, flattened).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple:
    """Ridge regression on standardised features. x (N, D), y (N, T) float64.
    Returns (mean_x, std_x, mean_y, W (D, T))."""
    mx, sx = x.mean(0), x.std(0) + 1e-8
    my = y.mean(0)
    z = (x - mx) / sx
    d = z.shape[1]
    if d <= z.shape[0]:
        w = np.linalg.solve(z.T @ z + alpha * np.eye(d), z.T @ (y - my))
    else:  # the dual form when features outnumber samples
        w = z.T @ np.linalg.solve(z @ z.T + alpha * np.eye(z.shape[0]), y - my)
    return mx, sx, my, w


def ridge_predict(model: tuple, x: np.ndarray) -> np.ndarray:
    mx, sx, my, w = model
    return (x - mx) / sx @ w + my


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination over all target columns (pooled), 1 - SSE / SST."""
    return float(1 - ((y - pred) ** 2).sum() / max(((y - y.mean(0)) ** 2).sum(), 1e-12))


def linear_probe(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray,
                 groups_tr: Optional[np.ndarray] = None, alphas: Sequence[float] = ALPHAS) -> dict:
    """Ridge probe: alpha chosen by 4-fold cross-validation on the training rows (folds by
    `groups_tr` when given, e.g. the subject's colour pair, so that a fold's subjects are new to
    its fit), refitted on all training rows, scored on the test rows.

    x_tr (N, D), y_tr (N, T), x_te (M, D), y_te (M, T). Returns {"alpha", "r2_cv", "r2",
    "pred" (M, T)}."""
    x_tr, y_tr, x_te, y_te = (np.asarray(a, np.float64) for a in (x_tr, y_tr, x_te, y_te))
    if x_tr.ndim != 2 or y_tr.ndim != 2 or len(x_tr) != len(y_tr) or x_te.shape[1] != x_tr.shape[1]:
        raise ValueError(f"linear_probe: expected x_tr (N, D), y_tr (N, T), x_te (M, D); got {x_tr.shape}, "
                         f"{y_tr.shape}, {x_te.shape}")
    g = np.arange(len(x_tr)) if groups_tr is None else np.asarray(groups_tr)
    uniq = np.unique(g)
    fold_of = {u: i % 4 for i, u in enumerate(np.random.default_rng(0).permutation(uniq))}
    fold = np.array([fold_of[u] for u in g])
    best = None
    for a in alphas:
        preds = np.empty_like(y_tr)
        for k in range(4):
            tr, va = fold != k, fold == k
            if not va.any() or not tr.any():
                continue
            preds[va] = ridge_predict(ridge_fit(x_tr[tr], y_tr[tr], a), x_tr[va])
        score = r2(y_tr, preds)
        if best is None or score > best[1]:
            best = (a, score)
    model = ridge_fit(x_tr, y_tr, best[0])
    pred = ridge_predict(model, x_te)
    return {"alpha": best[0], "r2_cv": best[1], "r2": r2(y_te, pred), "pred": pred}


def order_accuracy(pred_detail: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> float:
    """Fraction of rows where the predicted detail points from the lower to the upper colour:
    pred . (upper - lower) > 0. All (N, 3)."""
    return float(((pred_detail * (upper - lower)).sum(1) > 0).mean())


def _prompts(root: Path, s) -> tuple:
    """Every clip's image prompt (eval loader, no augmentation) with its (upper, lower) rgb in
    [0, 1] and its colour-pair id."""
    from ..data import VideoBoothDataset
    from .experiment import _rows_by_id
    from .synthetic import COLOURS, two_tone_colours

    ds = VideoBoothDataset(root, num_frames=1, size=s.size, image_size=s.image_size, train=False,
                           caption_column="short_caption", seed=s.seed)
    rows = _rows_by_id(root)
    images, up, low, pair = [], [], [], []
    for i in range(len(ds)):
        it = ds[i]
        a, b = two_tone_colours(rows[it["video_id"]]["colour"])
        images.append(it["image"])
        up.append(COLOURS[a])
        low.append(COLOURS[b])
        pair.append("/".join(sorted((a, b))))
    return (torch.stack(images), np.asarray(up, np.float64) / 255, np.asarray(low, np.float64) / 255,
            np.asarray(pair))


@torch.no_grad()
def features(images: torch.Tensor, parts, size: int, mapper=None) -> Dict[str, np.ndarray]:
    """Feature sets of image prompts (N, 3, S, S) in [-1, 1]: the coarse path's input (CLS,
    mean patch tokens, both, pooled embedding), a mapper's output when given, and the fine
    path's input (the VAE latent at the video's size)."""
    from vb.latents import encode_latents

    x01 = ((images + 1) / 2).clamp(0, 1)
    enc = parts.image_encoder(x01)
    lt = enc.layer_tokens                                     # (N, K, 1 + P, C)
    out = {"coarse: CLS tokens": lt[:, :, 0].flatten(1),
           "coarse: mean patch tokens": lt[:, :, 1:].mean(2).flatten(1),
           "coarse: CLS + mean patch": torch.cat([lt[:, :, 0], lt[:, :, 1:].mean(2)], -1).flatten(1),
           "coarse: pooled embedding": enc.image_embeds}
    if mapper is not None:
        out["coarse: trained mapper output"] = mapper(lt).flatten(1)
    img = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False,
                        antialias=True).clamp(-1, 1)
    out["fine: VAE latent"] = encode_latents(parts.vae, img, sample=False).flatten(1)
    return {k: v.double().numpy() for k, v in out.items()}


def run_probe(s, train_root: Path, held_root: Path, vae_file: Optional[Path] = None, mapper=None,
              clip_positions: bool = True) -> dict:
    """Probe every feature set (module docstring); returns {feature set: {detail_r2,
    colour_set_r2, order_acc, alpha_detail, alpha_set, dims}} plus "n_train" / "n_test"."""
    import vb

    parts = vb.build_tiny_videobooth(s.backbone, seed=s.seed)
    if not clip_positions:
        from ..videobooth_task import drop_clip_positions
        drop_clip_positions(parts.image_encoder)
    if vae_file is not None:
        from safetensors.torch import load_file
        sd = load_file(str(vae_file))
        parts.vae.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("vae.")})
    parts.vae.eval()
    im_tr, up_tr, lo_tr, pair_tr = _prompts(train_root, s)
    im_te, up_te, lo_te, _ = _prompts(held_root, s)
    f_tr = features(im_tr, parts, s.size, mapper)
    f_te = features(im_te, parts, s.size, mapper)
    res = {"n_train": len(im_tr), "n_test": len(im_te)}
    for name in f_tr:
        det = linear_probe(f_tr[name], up_tr - lo_tr, f_te[name], up_te - lo_te, pair_tr)
        cset = linear_probe(f_tr[name], up_tr + lo_tr, f_te[name], up_te + lo_te, pair_tr)
        res[name] = {"detail_r2": det["r2"], "colour_set_r2": cset["r2"],
                     "order_acc": order_accuracy(det["pred"], up_te, lo_te),
                     "alpha_detail": det["alpha"], "alpha_set": cset["alpha"], "dims": int(f_tr[name].shape[1])}
    return res


@torch.no_grad()
def fine_path_sensitivity(pipe, items, s, timesteps: Sequence[int] = (50, 200, 400, 600, 800),
                          seed: int = 0) -> Dict[int, dict]:
    """How much a trained model's prediction depends on the image prompt's arrangement.

    For held-out clips (their real frames noised to t), the backbone's output with the fine
    path fed the prompt's latent vs the vertically flipped prompt's (the other arrangement, the
    same colour set), both noised to t with one draw, relative L2: `swap`; and with vs without
    the fine path at all: `fine`. The coarse path gets the true prompt's subject tokens in every
    case. For scale, `coarse`: the same with the subject tokens of the next clip's prompt (other
    colours) in place of the true ones, the fine path fed the true latent. Returns {t: {"swap",
    "fine", "coarse"}}."""
    from vb.coarse import encode_prompt

    imgs = torch.stack([(it.image + 1) / 2 for it in items]).clamp(0, 1)
    tok, _ = pipe.encode_image(imgs)
    text, _ = encode_prompt(pipe.text_encoder, pipe.tokenizer, [it.caption for it in items],
                            [it.subject for it in items], tok)
    other, _ = encode_prompt(pipe.text_encoder, pipe.tokenizer, [it.caption for it in items],
                             [it.subject for it in items], tok.roll(1, 0))
    null = encode_prompt(pipe.text_encoder, pipe.tokenizer, [""])[0].expand(len(items), -1, -1)

    def latent(x01):
        x = F.interpolate(x01 * 2 - 1, size=(s.size, s.size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(-1, 1)
        return pipe.encode_vae((x + 1) / 2)

    lat, lat_sw = latent(imgs), latent(imgs.flip(-2))
    v0 = torch.stack([pipe.encode_vae((it.video + 1) / 2) for it in items]).transpose(1, 2)
    g = torch.Generator().manual_seed(seed)
    noise, img_noise = torch.randn(v0.shape, generator=g), torch.randn(lat.shape, generator=g)
    sch = pipe.scheduler
    out = {}
    for t in timesteps:
        tt = torch.full((len(items),), int(t))
        x = sch.add_noise(v0, noise, tt)

        def pred(il, txt=text):
            if il is None:
                return pipe.backbone(x, tt, txt)
            return pipe.backbone(x, tt, txt, image_latents=sch.add_noise(il, img_noise, tt),
                                 null_encoder_hidden_states=null)

        p, p_sw, p_none, p_other = pred(lat), pred(lat_sw), pred(None), pred(lat, other)
        rel = (lambda q: float((p - q).norm() / p.norm()))
        out[int(t)] = {"swap": rel(p_sw), "fine": rel(p_none), "coarse": rel(p_other)}
    return out


# ================================================================================================
# issue 32 item 2: can the noised image latent carry the arrangement? one draw vs F pooled draws
# ================================================================================================
STREAM_TIMESTEPS = (0, 500, 600, 700, 800, 900)
STREAM_POOLS = (1, 4, 16)


def _phi(x: np.ndarray) -> np.ndarray:
    from math import erf, sqrt
    return np.vectorize(lambda v: 0.5 * (1 + erf(v / sqrt(2))))(np.asarray(x, np.float64))


def _phi_inv(p: float) -> float:
    """The standard normal quantile (bisection; no scipy here)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _phi(mid) < p else (lo, mid)
    return (lo + hi) / 2


def pair_interval(correct: np.ndarray, pairs: Sequence[str]) -> list:
    """95% t interval of the mean accuracy with the colour pair (unordered) as the unit: rows of
    one pair (its two orders, their clips and draws) are averaged first."""
    from .study import t_interval

    by: Dict[str, list] = {}
    for c, p in zip(np.asarray(correct, np.float64), pairs):
        by.setdefault(p, []).append(c)
    return t_interval([float(np.mean(v)) for v in by.values()])["ci95"]


@torch.no_grad()
def stream_probe(s, train_root: Path, held_root: Path, vae_file: Path, *,
                 timesteps: Sequence[int] = STREAM_TIMESTEPS, pools: Sequence[int] = STREAM_POOLS, draws: int = 4,
                 seed: int = 0) -> dict:
    """How well the arrangement can be read off the prompt's VAE latent noised to t, from one
    draw and from the mean of F independent draws (what the official stream's F copies allow a
    layer that pools them, e.g. the temporal attention, to see).

    The toy's betas (the training task's noise schedule). Per (t, F): a ridge probe of
    detail = rgb(upper) - rgb(lower) fitted on ``draws`` noised versions of every training prompt
    (alpha by cross-validation over colour pairs), scored on as many noised versions of every
    held-out prompt (the study's evaluation clips: colour pairs never seen in training, both
    orders): order accuracy (the predicted detail points from the lower to the upper colour),
    with a 95% interval over held-out colour pairs. Beside it, the ideal observer who knows both
    candidate latents (the prompt's and its colour-swapped version's): d' = sqrt(abar) ||z - z_swap||
    / sqrt((1 - abar) / F), its median over the held-out prompts and the accuracy Phi(d'/2) it
    implies. Returns {"rows": [...], "snr": {t: abar / (1 - abar)}, "n_train", "n_test", ...}."""
    import vb
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    from ..config import NOISE_DEFAULTS
    from ..tasks import resolve_noise_config
    from .experiment import make_eval_items, stage_config

    cfg = stage_config(s, 2, data_root=train_root, output_dir=Path("/tmp/unused"), vae_file=vae_file)
    noise = resolve_noise_config(cfg)
    sched = DDPMScheduler(**noise)
    abar = sched.alphas_cumprod.double()
    parts = vb.build_tiny_videobooth(s.backbone, seed=s.seed)
    sd = load_file(str(vae_file))
    parts.vae.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("vae.")})
    parts.vae.eval()

    def latents(images):
        img = F.interpolate(images.float(), size=(s.size, s.size), mode="bicubic", align_corners=False,
                            antialias=True).clamp(-1, 1)
        from vb.latents import encode_latents
        return encode_latents(parts.vae, img, sample=False).flatten(1).double()

    im_tr, up_tr, lo_tr, pair_tr = _prompts(train_root, s)
    items = make_eval_items(s, held_root)
    from .synthetic import COLOURS, two_tone_colours
    ab = [two_tone_colours(it.identity[2]) for it in items]
    up_te = np.asarray([COLOURS[x] for x, _ in ab], np.float64) / 255
    lo_te = np.asarray([COLOURS[y] for _, y in ab], np.float64) / 255
    pair_te = ["/".join(sorted(p)) for p in ab]
    z_tr = latents(im_tr)
    z_te = latents(torch.stack([it.image for it in items]))
    z_sw = latents(torch.stack([it.image_paired for it in items]))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in timesteps:
        a = float(abar[t]) if t > 0 else 1.0
        for f in pools:
            if t == 0 and f > 1:
                continue

            def noisy(z):
                reps = []
                for _ in range(draws):
                    eps = torch.randn((f,) + tuple(z.shape), generator=g, dtype=torch.float64).mean(0)
                    reps.append(a ** 0.5 * z + (1 - a) ** 0.5 * eps)
                return torch.cat(reps).numpy()

            x_tr, x_te = noisy(z_tr), noisy(z_te)
            y_tr = np.tile(up_tr - lo_tr, (draws, 1))
            y_te = np.tile(up_te - lo_te, (draws, 1))
            probe = linear_probe(x_tr, y_tr, x_te, y_te, np.tile(pair_tr, draws))
            correct = ((probe["pred"] * np.tile(up_te - lo_te, (draws, 1))).sum(1) > 0).astype(np.float64)
            acc = float(correct.mean())
            if t > 0:
                dprime = (a ** 0.5 * (z_te - z_sw).norm(dim=1) / ((1 - a) / f) ** 0.5).numpy()
                d_med = float(np.median(dprime))
                ideal = float(np.mean(_phi(dprime / 2)))
            else:
                d_med, ideal = float("inf"), 1.0
            rows.append({"t": int(t), "pool": int(f), "snr": (a / (1 - a)) if t > 0 else float("inf"),
                         "order_acc": acc, "order_acc_ci95": pair_interval(correct, pair_te * draws),
                         "probe_dprime": 2 * _phi_inv(min(max(acc, 1e-4), 1 - 1e-4)),
                         "ideal_dprime_median": d_med, "ideal_acc": ideal, "alpha": probe["alpha"]})
    per_element = (z_te - z_sw).std(dim=1) / z_te.std()
    return {"rows": rows, "noise": {k: noise[k] for k in ("beta_schedule", "beta_start", "beta_end")},
            "n_train": int(len(z_tr)), "n_test": int(len(z_te)), "pairs_test": len(set(pair_te)), "draws": draws,
            "latent_dims": int(z_tr.shape[1]),
            "swap_difference_per_element_std": float(per_element.median())}


def stream_markdown(res: dict) -> str:
    n = res["noise"]
    lines = [f"Prompt VAE latents ({res['latent_dims']} dims) noised with the toy's betas ({n['beta_schedule']} "
             f"{n['beta_start']}..{n['beta_end']}); pool F: the mean of F independent draws (F = 1: one draw, the "
             f"one-copy stream). Ridge probe of rgb(upper) - rgb(lower) fitted on {res['n_train']} training prompts x "
             f"{res['draws']} draws, order accuracy on {res['n_test']} held-out prompts x {res['draws']} draws "
             f"(interval: 95% t over {res['pairs_test']} held-out colour pairs); d' of the probe = 2 Phi^-1(accuracy). "
             f"Ideal observer: knows the prompt's and its swap's latents, d' = sqrt(abar) |z - z_swap| / "
             f"sqrt((1 - abar) / F) (median over held-out prompts), its accuracy Phi(d'/2). The two orders' latents "
             f"differ by {res['swap_difference_per_element_std']:.2f} latent std per element (median over prompts).",
             "", "| t | SNR abar/(1-abar) | pool F | probe order accuracy [95% over pairs] | probe d' | ideal d' (median) "
             "| ideal accuracy |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lo, hi = r["order_acc_ci95"]
        snr = "clean" if r["t"] == 0 else f"{r['snr']:.3f}"
        ideal = "-" if r["t"] == 0 else f"{r['ideal_dprime_median']:.1f}"
        probe_d = f"{r['probe_dprime']:.2f}" if r["order_acc"] < 1 else "(all correct)"
        lines.append(f"| {r['t']} | {snr} | {r['pool']} | {r['order_acc']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{probe_d} | {ideal} | {r['ideal_acc']:.3f} |")
    return "\n".join(lines)


def stream_plot(res: dict, path: Path) -> Path:
    """Order accuracy of the probe (with its interval over colour pairs) and of the ideal observer
    against t, one line per pool F."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    for i, f in enumerate(sorted({r["pool"] for r in res["rows"]})):
        rows = [r for r in res["rows"] if r["pool"] == f and r["t"] > 0]
        ts = np.array([r["t"] for r in rows], np.float64) + (i - 1) * 6
        acc = np.array([r["order_acc"] for r in rows])
        lo = np.array([r["order_acc_ci95"][0] for r in rows])
        hi = np.array([r["order_acc_ci95"][1] for r in rows])
        line = ax.errorbar(ts, acc, yerr=[acc - lo, hi - acc], marker="o", capsize=3, label=f"probe, pool F = {f}")
        ax.plot(ts, [r["ideal_acc"] for r in rows], ls=":", color=line[0].get_color(), label=f"ideal observer, F = {f}")
    ax.axhline(0.5, color="black", lw=0.8)
    ax.set_xlabel("timestep t of the noised prompt latent")
    ax.set_ylabel("order accuracy (held-out pairs)")
    ax.set_ylim(0.4, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown(res: dict) -> str:
    lines = [f"Ridge probes fitted on {res['n_train']} training image prompts, scored on {res['n_test']} held-out "
             f"ones (colour pairs never seen in training, both orders). detail = rgb(upper) - rgb(lower); colour "
             f"set = rgb(upper) + rgb(lower); order accuracy: sign of the predicted detail along (upper - lower), "
             f"chance 0.5.", "",
             "| features | dims | detail R^2 | order accuracy | colour set R^2 |", "|---|---|---|---|---|"]
    for k, v in res.items():
        if isinstance(v, dict):
            lines.append(f"| {k} | {v['dims']} | {v['detail_r2']:.3f} | {v['order_acc']:.3f} | "
                         f"{v['colour_set_r2']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import experiment as X

    p = argparse.ArgumentParser(prog="python -m vb_train.toy.probe", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="probe_out")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stream", action="store_true",
                   help="only the noised-latent probe (issue 32): one draw vs F pooled draws, t = 500..900, on the "
                        "fine-path study's data and VAE (under --study-dir, made there when missing)")
    p.add_argument("--study-dir", default="results/ablations/study_official",
                   help="with --stream: the study folder whose data/ and vae/ are probed")
    p.add_argument("--sensitivity", nargs="*", default=[],
                   help="also measure fine_path_sensitivity of these arm runs (e.g. both-s0 under "
                        "OUT/runs, from vb_train.toy.ablations)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.stream:
        from . import ablations as A
        from .study import settings

        a = settings("full")
        paths, _ = A.prepare(a, Path(args.study_dir))
        res = stream_probe(a.demo, paths["train"], paths["heldout"], paths["vae"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe_stream.json").write_text(json.dumps(res, indent=1))
        stream_plot(res, out / "probe_stream.png")
        md = "\n".join(["# Can the noised prompt latent carry the arrangement? (issue 32 item 2)", "",
                         f"    python -m vb_train.toy.probe --stream --out {args.out} --study-dir {args.study_dir}", "",
                         stream_markdown(res), "", "![probe](probe_stream.png)"])
        (out / "probe_stream.md").write_text(md + "\n")
        print(md)
        return 0
    from .ablations import AblationSettings

    s = X.DemoSettings(**AblationSettings.toy(progress=False))   # the ablations' toy
    train_root, held_root = X.make_data(s, out / "data")
    vae_file = out / "vae" / "vae.safetensors"
    if not vae_file.is_file():
        X.pretrain_vae(s, train_root, vae_file)
    res = {"clip_positions": run_probe(s, train_root, held_root, vae_file, clip_positions=True),
           "no_clip_positions": run_probe(s, train_root, held_root, vae_file, clip_positions=False)}
    sens_md = []
    if args.sensitivity:
        from . import evaluation as E
        items = X.make_eval_items(s, held_root)[:16]
        sens_md = ["", "## How much the trained models' predictions depend on the arrangement", "",
                   "Relative L2 change of the backbone's output (16 held-out clips noised to t): swap = the fine path "
                   "fed the flipped prompt (other arrangement, same colours); fine = without the fine path at all; "
                   "coarse (for scale) = another clip's subject tokens (other colours) on the coarse path.",
                   "", "| run | t | swap | fine | coarse |", "|---|---|---|---|---|"]
        res["sensitivity"] = {}
        for run in args.sensitivity:
            from .ablations import ARM_BY_KEY
            arm = ARM_BY_KEY[run.rsplit("-s", 1)[0]]
            if not arm.fine:
                continue  # trained without the fine path: nothing to measure
            d = out / "runs" / run
            cfg = X.stage_config(s, 2, data_root=train_root, output_dir=d, vae_file=vae_file, overrides=arm.stage2)
            pipe = E.load_trained_pipeline(cfg, d)
            r = fine_path_sensitivity(pipe, items, s)
            res["sensitivity"][run] = r
            sens_md += [f"| {run} | {t} | {v['swap']:.4f} | {v['fine']:.4f} | {v['coarse']:.4f} |"
                        for t, v in r.items()]
    (out / "probe.json").write_text(json.dumps(res, indent=1))
    md = "\n".join(["# Linear probes on the two-tone toy", "",
                    "## The tiny CLIP tower as built (positional embedding on)", "", markdown(res["clip_positions"]),
                    "", "## The tower as the ablations use it (`model.clip_positions: false`: a bag of patches)",
                    "", markdown(res["no_clip_positions"])] + sens_md)
    (out / "probe.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
