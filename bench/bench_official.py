"""One conditional classifier-free-guidance denoising step of the official VideoBooth U-Net:
the original structure against ours, same outputs (docs/official.md).

* original: the image latent as F copies through every layer (the official code's exemplar
  stream), attn1 on the ``reference`` backend (literal concatenation of K/V, as the official
  ``inj_forward_stattention``);
* ours: the image branch on one frame per sample, attn1 on ``sdpa`` (CPU) or ``triton`` (GPU).

Both run the conditional pass (prompt + image) and the unconditional pass (null prompt, no
image) and guide 3 latent channels. Weights are random, the U-Net is the official architecture
at the tiny official widths (320, 640) unless ``--sd14`` (the full SD-1.4 shape).

    python -m bench.bench_official --frames 16            # prints both timings and the ratio
    python -m pytest bench/bench_official.py -m smoke     # CI: tiny, checks equal outputs
    BENCH_FULL=1 python -m pytest bench/bench_official.py # F = 16 rows with pytest-benchmark
"""
from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

from bench.measure import full_grid


def build(frames: int, size: int, *, widths=(320, 640), sd14: bool = False, seed: int = 0, device="cpu",
          dtype=torch.float32):
    """(backbone, inputs) of the official architecture with random weights (zero-initialised
    outputs made random so every path counts)."""
    from diffusers import UNet2DConditionModel

    from vb.official.convert import SD14_UNET_CONFIG, tiny_official_config, unet_kwargs_from_official
    from vb.unet import VideoBoothUNet

    torch.manual_seed(seed)
    if sd14:
        cfg = dict(SD14_UNET_CONFIG)
    else:
        cfg = dict(tiny_official_config(), block_out_channels=list(widths))
        if widths[0] < 320:  # smoke widths: fewer groups and heads (head dim 16/32)
            cfg.update(norm_num_groups=8, attention_head_dim=[2, 2, 2])
    bb = VideoBoothUNet(UNet2DConditionModel(**unet_kwargs_from_official(cfg)), preset="official",
                        watermark=(widths[0], widths[1], widths[1]) if not sd14 else True).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in bb.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    d = cfg["cross_attention_dim"]
    inputs = dict(x=torch.randn(1, 4, frames, size, size, generator=g), t=torch.tensor([500]),
                  text=torch.randn(1, 77, d, generator=g), null=torch.randn(1, 77, d, generator=g),
                  image=torch.randn(1, 4, size, size, generator=g))
    inputs = {k: v.to(device) if k == "t" else v.to(device, dtype) for k, v in inputs.items()}
    return bb.to(device, dtype), inputs


@torch.no_grad()
def cfg_step(bb, inputs, structure: str, guidance: float = 4.0) -> torch.Tensor:
    """The guided noise prediction of one step in ``structure`` ``"original"`` or ``"ours"``."""
    from vb.official.sampler import official_guidance

    x, t, text, null, img = (inputs[k] for k in ("x", "t", "text", "null", "image"))
    if structure == "original":
        bb.set_attn_backend("reference")
        img = img[:, :, None].repeat(1, 1, x.shape[2], 1, 1)
    else:
        bb.set_attn_backend("triton" if torch.cuda.is_available() else "sdpa")
    cond = bb(x, t, text, image_latents=img, null_encoder_hidden_states=null)
    uncond = bb(x, t, null)
    return official_guidance(cond, uncond, guidance)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.smoke
def test_official_structures_give_the_same_step():
    bb, inputs = build(frames=4, size=8, widths=(32, 64))
    assert _rel(cfg_step(bb, inputs, "ours"), cfg_step(bb, inputs, "original")) < 1e-5


@pytest.fixture(scope="module")
def f16_model(request):
    if not full_grid(request.config):
        pytest.skip("F = 16 rows: --bench-full or BENCH_FULL=1")
    return build(frames=16, size=16)


@pytest.mark.parametrize("structure", ["original", "ours"])
def test_official_cfg_step_f16(benchmark, f16_model, structure):
    bb, inputs = f16_model
    out = benchmark.pedantic(cfg_step, args=(bb, inputs, structure), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(structure=structure, frames=16, size=16, device=str(inputs["x"].device))
    assert torch.isfinite(out).all()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="official CFG step: original structure vs ours (CPU unless CUDA)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=16, help="latent height = width")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sd14", action="store_true", help="the full SD-1.4 U-Net shape (slow on CPU)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    # fp32 means fp32: cuDNN's convolutions default to TF32 on Ampere+, which alone moves the two
    # structures (different batch sizes, different accumulation) apart by ~1e-3.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    bb, inputs = build(args.frames, args.size, sd14=args.sd14, device=device, dtype=dtype)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times, outs = {}, {}
    for structure in ("original", "ours"):
        outs[structure] = cfg_step(bb, inputs, structure)  # warm-up (and Triton compiles)
        runs = []
        for _ in range(args.rounds):
            sync()
            t0 = time.perf_counter()
            cfg_step(bb, inputs, structure)
            sync()
            runs.append(time.perf_counter() - t0)
        times[structure] = statistics.median(runs)
    print(f"F={args.frames} latent {args.size}x{args.size} threads={torch.get_num_threads()} "
          f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} dtype={args.dtype} "
          f"sd14={args.sd14} torch {torch.__version__}")
    for s in ("original", "ours"):
        print(f"{s:9s} median {times[s] * 1e3:9.1f} ms over {args.rounds} rounds")
    print(f"ratio original / ours = {times['original'] / times['ours']:.2f}x; "
          f"outputs rel L2 {_rel(outs['ours'], outs['original']):.2e}")


if __name__ == "__main__":
    main()
