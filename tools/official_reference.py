"""Reference side of the parity check against the official VideoBooth code (docs/official.md).

Runs in its own process, started by ``tools/official_parity.py``: it imports the official
code from a user-given checkout (Vchitect/VideoBooth, no licence: it is imported, never copied)
with diffusers 0.11.1 from a separate folder, so it never imports this project's ``vb`` nor the
project's diffusers. It reads the inputs the parity command wrote, builds the official tiny
U-Net and mapper with random weights, runs them, and writes the official state dicts and outputs.

    python tools/official_reference.py --official-repo PATH --diffusers-0111 PATH --inputs IN.pt --out OUT.pt
"""
from __future__ import annotations

import argparse
import os
import sys
import types


def _install_shims(diffusers_root: str) -> None:
    """Make diffusers 0.11.1 and the official sample script importable next to today's
    huggingface_hub / transformers, without running diffusers' package __init__ (its pipelines
    import transformers names that no longer exist)."""
    import huggingface_hub as hub

    class _Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("not available in the parity harness (no network)")

    for name in ("HfFolder", "cached_download", "model_info", "whoami", "HfApi", "Repository", "create_repo"):
        if not hasattr(hub, name):
            setattr(hub, name, _Unavailable)
    pkg_dir = os.path.join(diffusers_root, "diffusers")
    if not os.path.isdir(pkg_dir):
        raise SystemExit(f"--diffusers-0111: no diffusers/ package folder under {diffusers_root}")
    pkg = types.ModuleType("diffusers")
    pkg.__path__ = [pkg_dir]
    pkg.__version__ = "0.11.1"
    sys.modules["diffusers"] = pkg
    # The sample script imports these at module level; only its helper functions are used here.
    import transformers.models.clip.modeling_clip as mc
    if not hasattr(mc, "_expand_mask"):
        mc._expand_mask = lambda mask, dtype, tgt_len=None: None
    if not hasattr(mc, "CLIP_TEXT_INPUTS_DOCSTRING"):
        mc.CLIP_TEXT_INPUTS_DOCSTRING = ""
    import transformers.utils as tu
    for name in ("add_start_docstrings_to_model_forward", "replace_return_docstrings"):
        if not hasattr(tu, name):
            setattr(tu, name, lambda *a, **k: (lambda f: f))
    if "omegaconf" not in sys.modules:
        try:
            import omegaconf  # noqa: F401
        except ImportError:
            stub = types.ModuleType("omegaconf")
            stub.OmegaConf = None  # only the sample script's main() reads configs with it
            sys.modules["omegaconf"] = stub


def _randomize(module, gen, torch) -> None:
    """Random weights everywhere, including the zero-initialised outputs (attn_temp.to_out,
    watermark_zero_out), so every path contributes to the output."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official-repo", required=True)
    ap.add_argument("--diffusers-0111", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    _install_shims(os.path.abspath(args.diffusers_0111))
    sys.path.insert(0, os.path.abspath(args.official_repo))
    import torch
    from torch import nn

    torch.set_grad_enabled(False)
    from models.unet import UNet3DConditionModelWaterMark
    from sample_scripts import sample as official
    from diffusion import create_diffusion

    inp = torch.load(args.inputs, weights_only=False)
    gen = torch.Generator().manual_seed(int(inp["seed"]))
    cfg = dict(inp["config"])
    unet = UNet3DConditionModelWaterMark.from_config(cfg).eval()
    _randomize(unet, gen, torch)
    mapper = official.Mapper(input_dim=inp["clip_width"], output_dim=cfg["cross_attention_dim"])
    # Install the new projections the way the official sample script's main() does: attn2 gets
    # to_k_global/to_v_global (mapper keys <name>_to_k/_to_v), attn1 (SparseCausalAttention)
    # to_k_exemplar/to_v_exemplar/to_k_new/to_v_new, all held by the mapper.
    for name, mod in unet.named_modules():
        cls = mod.__class__.__name__
        flat = name.replace(".", "_")
        if cls == "CrossAttention" and "attn2" in name:
            mod.__class__.forward = official.inj_forward_crossattention
            for suffix in ("k", "v"):
                w = getattr(mod, f"to_{suffix}").weight
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data = w.data.clone()
                mapper.add_module(f"{flat}_to_{suffix}", lin)
        if cls == "SparseCausalAttention" and "attn1" in name:
            mod.__class__.forward = official.inj_forward_stattention
            for new in ("exemplar", "new"):
                for suffix in ("k", "v"):
                    w = getattr(mod, f"to_{suffix}").weight
                    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
                    lin.weight.data = w.data.clone()
                    mapper.add_module(f"{flat}_to_{suffix}_{new}", lin)
    _randomize(mapper, gen, torch)
    for name, mod in unet.named_modules():
        flat = name.replace(".", "_")
        if mod.__class__.__name__ == "CrossAttention" and "attn2" in name:
            mod.add_module("to_k_global", getattr(mapper, f"{flat}_to_k"))
            mod.add_module("to_v_global", getattr(mapper, f"{flat}_to_v"))
        if mod.__class__.__name__ == "SparseCausalAttention" and "attn1" in name:
            for key in ("to_k_exemplar", "to_v_exemplar", "to_k_new", "to_v_new"):
                mod.add_module(key, getattr(mapper, f"{flat}_{key}"))

    out = {"unet_state": {k: v.clone() for k, v in unet.state_dict().items()
                          if not any(s in k for s in ("to_k_global", "to_v_global", "to_k_new", "to_v_new",
                                                       "to_k_exemplar", "to_v_exemplar"))},
           "mapper_state": {k: v.clone() for k, v in mapper.state_dict().items()}}

    # U-Net: conditional (image stream = F copies of the image latent, null text), unconditional,
    # and the guided output of the official CFG function.
    x, t, text, null, img = inp["x"], inp["t"], inp["text"], inp["null"], inp["image_latent"]
    f = x.shape[2]
    img_clip = img[:, :, None].repeat(1, 1, f, 1, 1)
    out["cond"] = unet(x, t, text, img_clip, t, null).sample
    out["uncond"] = unet(x, t, null).sample
    out["cond_clip"] = unet(x, t, text, inp["image_clip"], t, null).sample  # per-frame different image latents
    out["cfg"] = unet.forward_with_cfg_with_exemplar(
        torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, null]), torch.cat([img_clip, img_clip]),
        torch.cat([t, t]), torch.cat([null, null]), cfg_scale=inp["guidance"])[: x.shape[0]]

    # Mapper: a list of K (B, 1 + P, C) layer token tensors.
    out["mapper_out"] = mapper(list(inp["layer_tokens"].unbind(1)))

    # Text injection: the official inj_forward_text up to the embedding layer; a stand-in
    # `self` hands back the token embeddings it would feed to the position embedding.
    class _Stop(Exception):
        pass

    captured = {}

    def _embeddings(input_ids=None, position_ids=None, inputs_embeds=None):
        captured["embeds"] = inputs_embeds
        raise _Stop

    emb_table = nn.Embedding.from_pretrained(inp["token_table"])
    embeddings = type("Embeddings", (), {"__call__": lambda self, **kw: _embeddings(**kw),
                                         "token_embedding": emb_table})()
    fake = types.SimpleNamespace(config=types.SimpleNamespace(output_attentions=False, output_hidden_states=False,
                                                              use_return_dict=True),
                                 embeddings=embeddings)
    injected = []
    for ids, place, tokens in zip(inp["text_ids"], inp["placeholder_ids"], inp["text_tokens"]):
        try:
            official.inj_forward_text(fake, {"input_ids": ids[None], "inj_embedding": tokens[None],
                                             "inj_index": [place]})
        except _Stop:
            pass
        injected.append(captured.pop("embeds")[0])
    out["text_injected"] = injected

    # Sampling loop: the official p_sample_loop with its CFG function, every randn_like recorded.
    steps = int(inp["steps"])
    diffusion = create_diffusion(str(steps))
    noises = []
    randn_like = torch.randn_like

    def recording(x, *a, **k):
        n = randn_like(x, *a, **k)
        noises.append(n.clone())
        return n

    torch.manual_seed(int(inp["seed"]))
    torch.randn_like = recording
    try:
        z = inp["z"]
        ex = inp["image_latent"][:, :, None].repeat(1, 1, z.shape[2], 1, 1)
        kwargs = dict(encoder_hidden_states=torch.cat([text[:1], null[:1]]), class_labels=None,
                      cfg_scale=inp["guidance"], exemplar_latent_ori=torch.cat([ex[:1], ex[:1]]),
                      add_noise_to_exemplar=True, exemplar_encoder_hidden_states=torch.cat([null[:1], null[:1]]))
        zz = torch.cat([z, z])
        samples = diffusion.p_sample_loop(unet.forward_with_cfg_with_exemplar, zz.shape, zz, clip_denoised=False,
                                          model_kwargs=kwargs, progress=False, device="cpu")
    finally:
        torch.randn_like = randn_like
    out["sample_noises"] = noises
    out["sample_final"] = samples[:1]
    out["timestep_map"] = list(diffusion.timestep_map)

    # The same loop at guidance 1 (the conditional pass alone) on the inputs of the parity tool's
    # pipeline check: its image latent (our VAE's) and its null text (our text encoder's ""),
    # every randn_like recorded again.
    if "pipe_image_latent" in inp:
        noises = []
        torch.manual_seed(int(inp["seed"]) + 1)
        torch.randn_like = recording
        try:
            pnull = inp["pipe_null"]
            ex = inp["pipe_image_latent"][:, :, None].repeat(1, 1, z.shape[2], 1, 1)
            kwargs = dict(encoder_hidden_states=torch.cat([text[:1], pnull]), class_labels=None, cfg_scale=1.0,
                          exemplar_latent_ori=torch.cat([ex, ex]), add_noise_to_exemplar=True,
                          exemplar_encoder_hidden_states=torch.cat([pnull, pnull]))
            samples = diffusion.p_sample_loop(unet.forward_with_cfg_with_exemplar, zz.shape, zz, clip_denoised=False,
                                              model_kwargs=kwargs, progress=False, device="cpu")
        finally:
            torch.randn_like = randn_like
        out["pipe_sample_noises"] = noises
        out["pipe_sample_final"] = samples[:1]
    torch.save(out, args.out)


if __name__ == "__main__":
    main()
