"""Bytes autograd keeps for the backward at the paper's size, with and without gradient
checkpointing: SD-1.4 U-Net (random weights, built on the meta device: nothing is computed or
allocated), B=2, F=16, 256 px (32x32 latents), bf16, the reference attention backend, stage-2
parameters trainable. Counted with ``torch.autograd.graph.saved_tensors_hooks`` over one forward:
everything saved outside checkpointed regions (inside them the recompute holds one region at a
time during the backward).

    python tools/saved_bytes_checkpointing.py [--batch 2] [--frames 16] [--no-image]
"""
import argparse

import torch
from diffusers import UNet2DConditionModel

import vb

SD14 = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)


def saved_gib(checkpointing: bool, batch: int, frames: int, image: bool) -> float:
    with torch.device("meta"):
        net = vb.VideoBoothUNet(UNet2DConditionModel(**SD14).to(torch.bfloat16), attn_backend="reference")
    for p in net.stage_parameters(2, include_temporal=True):
        p.requires_grad_(True)
    if checkpointing:
        net.enable_gradient_checkpointing()
    net.train()

    def r(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(r(batch, 4, frames, 32, 32), 500, r(batch, 77, 768), image_latents=r(batch, 4, 32, 32) if image else None,
            null_encoder_hidden_states=r(1, 77, 768))
    return total[0] / 2 ** 30


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--no-image", action="store_true")
    a = ap.parse_args()
    plain = saved_gib(False, a.batch, a.frames, not a.no_image)
    ckpt = saved_gib(True, a.batch, a.frames, not a.no_image)
    print(f"B={a.batch} F={a.frames} image={not a.no_image}: saved for backward {plain:.2f} GiB without, "
          f"{ckpt:.2f} GiB with gradient checkpointing ({plain / ckpt:.1f}x less)")


if __name__ == "__main__":
    main()
