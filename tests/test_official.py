"""The official-architecture preset, the converter of the released weights, the official sampler
and preprocessing (CPU, tiny random models, nothing downloaded). docs/official.md."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vb
from vb.coarse import OFFICIAL_CLIP_LAYERS, official_preprocess
from vb.official.convert import load_official, official_key, official_mapper_key, unet_kwargs_from_official
from vb.official.sampler import ddpm_step, official_denoise, official_guidance, official_prompt, official_scheduler
from vb.temporal import TemporalAttention
from vb.official.layers import ClipGroupNorm, WatermarkModule
from vb.unet import VideoBoothUNet

# A tiny official-layout config: 2 blocks, 3-entry per-block lists as the official module needs.
TINY = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"], "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
        "cross_attention_dim": 16, "attention_head_dim": [2, 2, 2], "only_cross_attention": [False] * 3,
        "norm_num_groups": 8, "use_first_frame": True}
WATERMARK = (32, 64, 64)


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _official_state_dicts(seed=0):
    """Random state dicts in the official key layout for TINY: the U-Net file and the mapper file.

    Built by naming every tensor of a tiny official-preset model the official way; the literal
    key checks below pin that naming to the official code's."""
    from diffusers import UNet2DConditionModel

    g = torch.Generator().manual_seed(seed)
    bb = VideoBoothUNet(UNet2DConditionModel(**unet_kwargs_from_official(TINY)), preset="official", watermark=WATERMARK)
    mapper = vb.VideoBoothMapper(input_dim=24, output_dim=16, num_layers=5, hidden_dim=20)
    unet_sd, mapper_sd = {}, {}
    for k, v in bb.state_dict().items():
        file, key = official_key(k, bb)
        (unet_sd if file == "unet" else mapper_sd)[key] = torch.randn(v.shape, generator=g) / max(1, v[0].numel()) ** 0.5
    for k, v in mapper.state_dict().items():
        mapper_sd[official_mapper_key(k)] = torch.randn(v.shape, generator=g) * 0.2
    return unet_sd, mapper_sd


@pytest.fixture(scope="module")
def official_sd():
    return _official_state_dicts()


# ---- converter -------------------------------------------------------------------------------------------
def test_official_key_layout_is_the_official_codes(official_sd):
    unet_sd, mapper_sd = official_sd
    # Literal keys of the official code (models/unet.py, models/attention.py, sample.py's mapper).
    for key in ("conv_in.weight", "down_blocks.0.resnets.0.norm1.weight",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_q.weight",
                "down_blocks.0.attentions.0.transformer_blocks.0.norm_temp.bias",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight",
                "up_blocks.1.attentions.1.transformer_blocks.0.attn_temp.to_out.0.bias",
                "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
                "watermark_down_blocks.0.downsamplers.0.conv.weight", "watermark_up_blocks.2.resnets.1.conv2.weight",
                "watermark_zero_out.weight", "watermark_zero_out.bias", "conv_norm_out.weight"):
        assert key in unet_sd, key
    for key in ("mapping_0.0.weight", "mapping_4.6.bias", "mapping_patch_2.4.weight",
                "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.weight",
                "up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_v.weight",
                "mid_block_attentions_0_transformer_blocks_0_attn1_to_k_exemplar.weight",
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v_new.weight"):
        assert key in mapper_sd, key
    assert not any("processor" in k or "vb_temporal" in k for k in list(unet_sd) + list(mapper_sd))
    # 4 transformer sites (down 1, mid 1, up 2): 2 attn2 + 4 attn1 projections each.
    assert sum(1 for k in mapper_sd if not k.startswith("mapping")) == 4 * 6


def test_load_official_puts_every_tensor_in_its_place(official_sd, tmp_path):
    unet_sd, mapper_sd = official_sd
    torch.save({"ema_unet": unet_sd}, tmp_path / "watermark_remove_module.pt")
    torch.save({"ema": mapper_sd}, tmp_path / "mapper.pt")
    bb, mapper = load_official(tmp_path / "watermark_remove_module.pt", tmp_path / "mapper.pt", TINY,
                               attn_backend="reference")
    sd = bb.state_dict()
    site = "down_blocks.0.attentions.0.transformer_blocks.0"
    pairs = {f"unet.{site}.vb_temporal.attn.to_q.weight": unet_sd[f"{site}.attn_temp.to_q.weight"],
             f"unet.{site}.vb_temporal.norm.weight": unet_sd[f"{site}.norm_temp.weight"],
             "watermark.zero_out.weight": unet_sd["watermark_zero_out.weight"],
             "watermark.up_blocks.0.upsamplers.0.conv.weight": unet_sd["watermark_up_blocks.0.upsamplers.0.conv.weight"],
             "unet.conv_norm_out.weight": unet_sd["conv_norm_out.weight"],
             f"unet.{site}.attn2.processor.to_k_new.weight": mapper_sd[f"{site.replace('.', '_')}_attn2_to_k.weight"],
             f"unet.{site}.attn1.processor.to_v_exemplar.weight":
                 mapper_sd[f"{site.replace('.', '_')}_attn1_to_v_exemplar.weight"],
             f"unet.{site}.attn1.processor.to_k_new.weight": mapper_sd[f"{site.replace('.', '_')}_attn1_to_k_new.weight"]}
    for ours, theirs in pairs.items():
        assert torch.equal(sd[ours], theirs), ours
    assert torch.equal(mapper.patch_mlps[3][4].weight, mapper_sd["mapping_patch_3.4.weight"])
    assert mapper.config.hidden_dim == 20 and len(mapper.cls_mlps) == 5
    assert bb.arch["clip_groupnorm"] and not bb.arch["temporal_positions"] and bb.arch["temporal_in_image"]
    assert isinstance(bb.unet.conv_norm_out, ClipGroupNorm)


@pytest.mark.parametrize("file,change", [("unet", "drop"), ("unet", "extra"), ("mapper", "drop"), ("mapper", "extra")])
def test_load_official_is_strict_and_names_the_key(official_sd, file, change):
    unet_sd, mapper_sd = (dict(d) for d in official_sd)
    target = unet_sd if file == "unet" else mapper_sd
    key = ("down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_k.weight" if file == "unet"
           else "mid_block_attentions_0_transformer_blocks_0_attn1_to_v_new.weight")
    if change == "drop":
        del target[key]
        word = "missing"
    else:
        key = key.replace("weight", "extra")
        target[key] = torch.zeros(1)
        word = "unexpected"
    with pytest.raises(ValueError, match=rf"{word} key\(s\) {file}:{key}"):
        load_official(unet_sd, mapper_sd, TINY)


def test_load_official_rejects_a_wrong_shape_and_a_bad_type(official_sd):
    unet_sd, mapper_sd = (dict(d) for d in official_sd)
    unet_sd["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    with pytest.raises(ValueError, match=r"unet_state_dict\['conv_in.weight'\]: expected shape"):
        load_official(unet_sd, mapper_sd, TINY)
    with pytest.raises(TypeError, match="unet_state_dict"):
        load_official(42, mapper_sd, TINY)


def test_official_config_maps_3d_block_names():
    kw = unet_kwargs_from_official(TINY)
    assert kw["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert kw["attention_head_dim"] == [2, 2] and "use_first_frame" not in kw
    assert unet_kwargs_from_official(None)["block_out_channels"] == [320, 640, 1280, 1280]


# ---- architecture options against literal formulas ----------------------------------------------------------
def test_clip_groupnorm_is_groupnorm_over_the_whole_clip():
    gn = torch.nn.GroupNorm(4, 8).requires_grad_(False)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    norm = ClipGroupNorm(gn)
    b, f, c, h, w = 2, 3, 8, 5, 4
    x = torch.randn(b * f, c, h, w)
    out = norm(x, f)
    # Literal: view the clip as (B, C, F*H, W), normalise 4 groups over (C/4, F*H, W).
    clip = x.view(b, f, c, h, w).permute(0, 2, 1, 3, 4).reshape(b, 4, -1)
    lit = (clip - clip.mean(-1, keepdim=True)) / torch.sqrt(clip.var(-1, unbiased=False, keepdim=True) + gn.eps)
    lit = lit.view(b, c, f, h, w) * gn.weight.view(1, c, 1, 1, 1) + gn.bias.view(1, c, 1, 1, 1)
    assert rel(out, lit.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)) < 1e-6
    assert rel(out, gn(x)) > 1e-2  # per frame differs
    assert torch.equal(norm(x), gn(x))  # called as a plain GroupNorm (diffusers' forward): per frame
    with pytest.raises(ValueError, match="num_frames: 4 does not divide the batch of 6"):
        norm(x, 4)


def test_temporal_attention_without_positions_is_plain_attention_over_frames():
    torch.manual_seed(0)
    t = TemporalAttention(8, 2, 4, positions=False)
    torch.nn.init.normal_(t.attn.to_out[0].weight)
    b, f, n, c = 2, 5, 3, 8
    x = torch.randn(b * f, n, c)
    out = t(x, f)
    seq = x.view(b, f, n, c).transpose(1, 2).reshape(b * n, f, c)
    h = F.layer_norm(seq, (c,), t.norm.weight, t.norm.bias)
    q, k, v = (m(h).view(b * n, f, 2, 4).transpose(1, 2) for m in (t.attn.to_q, t.attn.to_k, t.attn.to_v))
    att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    lit = seq + t.attn.to_out[0](att.transpose(1, 2).reshape(b * n, f, c))
    assert rel(out, lit.view(b, n, f, c).transpose(1, 2).reshape(b * f, n, c)) < 1e-6
    assert rel(TemporalAttention(8, 2, 4, positions=True).to(torch.float32)(x, f), x) < 1e-6  # zero-init: identity
    # One frame (the official image stream, F identical frames): softmax over one key is 1, so
    # the layer is x + to_out(to_v(LayerNorm(x))).
    one = torch.randn(4, n, c)
    lit1 = one + t.attn.to_out[0](t.attn.to_v(F.layer_norm(one, (c,), t.norm.weight, t.norm.bias)))
    assert rel(t(one, 1), lit1) < 1e-6


def _tiny_backbone(preset, **kw):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    bb = VideoBoothUNet(UNet2DConditionModel(**unet_kwargs_from_official(TINY)), preset=preset, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every zero-initialised output random, so every path counts
        for p in bb.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return bb.eval()


def _inputs(f=3):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, 4, f, 8, 8, generator=g), torch.tensor([300, 300]), torch.randn(2, 7, 16, generator=g),
            torch.randn(1, 7, 16, generator=g), torch.randn(2, 4, 8, 8, generator=g))


def test_official_image_branch_on_one_frame_equals_f_identical_copies():
    bb = _tiny_backbone("official", watermark=WATERMARK)
    x, t, text, null, img = _inputs()
    with torch.no_grad():
        one = bb(x, t, text, image_latents=img, null_encoder_hidden_states=null)
        copies = bb(x, t, text, image_latents=img[:, :, None].expand(-1, -1, 3, -1, -1),
                    null_encoder_hidden_states=null)
        different = bb(x, t, text, image_latents=img[:, :, None] + torch.randn(2, 4, 3, 8, 8),
                       null_encoder_hidden_states=null)
    assert rel(one, copies) < 1e-5
    assert rel(different, one) > 1e-3  # frame 0 depends on the other copies (clip norms, temporal layers)


def test_each_official_option_changes_the_output_and_the_preset_sets_them_all():
    x, t, text, null, img = _inputs()
    outs = {}
    opts = {"research": {}, "clip_groupnorm": dict(clip_groupnorm=True), "no_positions": dict(temporal_positions=False),
            "temporal_in_image": dict(temporal_in_image=True), "watermark": dict(watermark=WATERMARK)}
    with torch.no_grad():
        for name, kw in opts.items():
            outs[name] = _tiny_backbone("research", **kw)(x, t, text, image_latents=img, null_encoder_hidden_states=null)
        all_on = _tiny_backbone("research", clip_groupnorm=True, temporal_positions=False, temporal_in_image=True,
                                watermark=WATERMARK)(x, t, text, image_latents=img, null_encoder_hidden_states=null)
        official = _tiny_backbone("official", watermark=WATERMARK)(x, t, text, image_latents=img,
                                                                   null_encoder_hidden_states=null)
    for name in opts:
        if name != "research":
            assert rel(outs[name], outs["research"]) > 1e-4, name
    assert torch.equal(all_on, official)
    with pytest.raises(ValueError, match="preset"):
        VideoBoothUNet(torch.nn.Linear(1, 1), preset="paper")


def test_watermark_term_is_added_before_conv_norm_out():
    bb = _tiny_backbone("official", watermark=WATERMARK)
    x, t, text, null, _ = _inputs()
    seen = {}
    h1 = bb.unet.conv_norm_out.register_forward_hook(lambda m, a, o: seen.__setitem__("in", a[0]))
    # The last up block ends in its last attention (no upsampler): its output is the block's.
    h2 = bb.unet.up_blocks[-1].attentions[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("up", o[0]))
    h3 = bb.unet.time_embedding.register_forward_hook(lambda m, a, o: seen.__setitem__("temb", o))
    with torch.no_grad():
        bb(x, t, text)
        lit = seen["up"] + bb.watermark(seen["up"], seen["temb"], x.shape[2])  # its ResNets: clip statistics
    for h in (h1, h2, h3):
        h.remove()
    assert torch.equal(seen["in"], lit) and rel(seen["in"], seen["up"]) > 1e-3


def test_watermark_module_shapes_and_zero_init():
    wm = WatermarkModule(32, (32, 64, 64), temb_channels=16, layers_per_block=1, norm_num_groups=8, norm_eps=1e-5)
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    assert torch.equal(wm(x, temb), torch.zeros_like(x))
    assert [len(b.resnets) for b in wm.up_blocks] == [2, 2, 2] and wm.down_blocks[2].downsamplers is None
    with pytest.raises(ValueError, match="watermark"):
        WatermarkModule(16, (32, 64, 64), temb_channels=16, layers_per_block=1, norm_num_groups=8, norm_eps=1e-5)


# ---- sampler ---------------------------------------------------------------------------------------------
def _adm_space_timesteps(num, count):
    stride = (num - 1) / (count - 1) if count > 1 else 1
    return sorted({round(i * stride) for i in range(count)})


def _adm_p_sample_loop(model, z, steps, noises):
    """A literal ADM p_sample_loop (linear betas 1e-4..0.02, respaced, epsilon, fixed_large, no
    clipping) in float64 numpy coefficients, the noise of each step given."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    acp_full = np.cumprod(1 - betas)
    use = _adm_space_timesteps(1000, steps)
    new_betas, last = [], 1.0
    for i in use:
        new_betas.append(1 - acp_full[i] / last)
        last = acp_full[i]
    nb = np.array(new_betas)
    acp = np.cumprod(1 - nb)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = nb * (1 - acp_prev) / (1 - acp)
    var = np.append(post_var[1], nb[1:])
    x = z
    for idx in reversed(range(steps)):
        eps = model(x, use[idx])
        x0 = math.sqrt(1 / acp[idx]) * x - math.sqrt(1 / acp[idx] - 1) * eps
        mean = (nb[idx] * math.sqrt(acp_prev[idx]) / (1 - acp[idx])) * x0 + \
               ((1 - acp_prev[idx]) * math.sqrt(1 - nb[idx]) / (1 - acp[idx])) * x
        x = mean + (math.sqrt(var[idx]) * noises[idx] if idx > 0 else 0)
    return x


@pytest.mark.parametrize("steps", [1, 7, 25])
def test_official_scheduler_timesteps_are_adm_respacing(steps):
    assert sorted(int(t) for t in official_scheduler(steps).timesteps) == _adm_space_timesteps(1000, steps)


def test_official_loop_equals_a_literal_adm_p_sample_loop():
    steps = 12
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 2, 3, 3, generator=g)
    noises = [torch.randn(z.shape, generator=g) for _ in range(steps)]
    w = torch.randn(4, 4, generator=g) * 0.3

    def eps_model(x, t, cond):
        return torch.einsum("dc,bcfhw->bdfhw", w, x) * (1 + t / 1000) + (0.1 if cond else 0.0)

    def guided(x, t):  # the official forward_with_cfg_with_exemplar, written out
        c, u = eps_model(x, t, True), eps_model(x, t, False)
        return torch.cat([u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]), c[:, 3:]], dim=1)

    class Backbone:
        def __call__(self, x, t, text, image_latents=None, null_encoder_hidden_states=None):
            return eps_model(x, int(t[0]), cond=bool(text.sum() > 0))

    lit = _adm_p_sample_loop(guided, z, steps, list(noises))
    order = list(reversed(noises))  # ours draws the step noise in loop order, t from high to low
    ours = official_denoise(Backbone(), official_scheduler(steps), z, torch.ones(1, 2, 2), torch.zeros(1, 2, 2), None,
                            guidance_scale=4.0, randn=lambda shape: order.pop(0))
    assert rel(ours, lit) < 1e-5


def test_ddpm_step_equals_diffusers_step():
    sched = official_scheduler(10)
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(1, 4, 2, 3, 3, generator=g), torch.randn(1, 4, 2, 3, 3, generator=g)
    for t in sched.timesteps[[0, 5, -1]]:
        want = sched.step(eps, t, x, generator=torch.Generator().manual_seed(9)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        assert rel(ddpm_step(sched, eps, t, x, noise), want) < 1e-6


def test_guidance_on_three_channels():
    cond, uncond = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    out = official_guidance(cond, uncond, 4.0)
    assert torch.allclose(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3], cond[:, 3])
    assert torch.allclose(official_guidance(cond, uncond, 4.0, None), uncond + 4 * (cond - uncond))
    with pytest.raises(ValueError, match="guided_channels"):
        official_guidance(cond, uncond, 4.0, 5)


def test_official_prompt_uses_the_placeholder():
    assert official_prompt("Panda in the tiny pond", "panda") == "sdksd in the tiny pond"
    with pytest.raises(ValueError, match="subject_word"):
        official_prompt("a cat", "dog")


# ---- preprocessing ----------------------------------------------------------------------------------------
def test_official_preprocess_crops_pads_white_and_resizes_bilinear():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    rng = np.random.RandomState(0)
    img = (rng.rand(50, 60, 3) * 255).astype(np.uint8)
    mask = (rng.rand(50, 60) > 0.3).astype(np.uint8)
    box = (10.7, 5.2, 50.9, 35.0)  # 40 wide, 30 high: pad 5 top, 5 bottom
    clip, vae_img = official_preprocess(img, mask, box, clip_size=24, vae_size=32)
    lit = img.copy()
    lit[mask == 0] = 255
    lit = lit[5:35, 10:50]
    sq = np.full((40, 40, 3), 255, np.uint8)
    sq[5:35] = lit
    t = torch.from_numpy(sq).permute(2, 0, 1)
    want_clip = resize(t, [24, 24], InterpolationMode.BILINEAR, antialias=False).float() / 255
    want_vae = resize(t, [32, 32], InterpolationMode.BILINEAR, antialias=False).float() / 127.5 - 1
    assert torch.equal(clip, want_clip) and torch.equal(vae_img, want_vae)
    with pytest.raises(ValueError, match="image"):
        official_preprocess(np.zeros((4, 4)), None)


def test_official_image_encoder_accepts_hf_clip_vision_in_the_official_layer_order():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=24,
                                             num_attention_heads=2, image_size=32, patch_size=8,
                                             hidden_act="quick_gelu")).eval()
    enc = vb.VideoBoothImageEncoder.official(model)
    images = torch.rand(2, 3, 40, 40)
    out = enc(images)
    x = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(vb.coarse.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(vb.coarse.CLIP_STD).view(1, 3, 1, 1)
    hf = model(x, output_hidden_states=True)
    want = [hf.last_hidden_state, hf.hidden_states[4], hf.hidden_states[8], hf.hidden_states[12], hf.hidden_states[16]]
    assert enc.layers == OFFICIAL_CLIP_LAYERS and out.layer_tokens.shape == (2, 5, 17, 16)
    for k in range(5):
        assert torch.allclose(out.layer_tokens[:, k], want[k], atol=1e-6)
    assert torch.allclose(out.image_embeds, hf.pooler_output, atol=1e-6)


# ---- pipeline ----------------------------------------------------------------------------------------------
def test_official_sample_runs_and_is_seeded():
    from diffusers import UNet2DConditionModel

    parts = vb.build_tiny_videobooth("unet")  # text width 32: the backbone's cross-attention width
    torch.manual_seed(0)
    bb = VideoBoothUNet(UNet2DConditionModel(**dict(unet_kwargs_from_official(TINY), cross_attention_dim=32)),
                        preset="official", watermark=WATERMARK)
    pipe = vb.VideoBoothPipeline(parts.vae, parts.text_encoder, parts.tokenizer, parts.image_encoder, parts.mapper,
                                 bb, official_scheduler())
    pipe.set_progress_bar_config(disable=True)
    img = (np.random.RandomState(0).rand(20, 30, 3) * 255).astype(np.uint8)
    kw = dict(num_frames=2, num_inference_steps=2, height=16, output_type="np")
    a = pipe.official_sample("A dog in the pond", "dog", img, generator=torch.manual_seed(0), **kw).frames
    b = pipe.official_sample("A dog in the pond", "dog", img, generator=torch.manual_seed(0), **kw).frames
    assert a.shape == (1, 2, 16, 16, 3) and np.array_equal(a, b) and np.isfinite(a).all()
    one = pipe.official_sample("A dog in the pond", "dog", img, generator=torch.manual_seed(0), image_frames=0,
                               **kw).frames
    assert one.shape == a.shape and np.isfinite(one).all()
    tokens = torch.randn(1, 3, 32)
    before, after = pipe.official_text(["a dog"], ["dog"]), pipe.official_text(["a dog"], ["dog"], tokens)
    assert before.shape == after.shape == (1, 77, 32) and rel(after, before) > 1e-3


def test_sample_command_end_to_end_on_tiny_local_models(official_sd, tmp_path):
    """``python -m vb.official sample`` with every component a tiny local folder (no download)."""
    import json

    from diffusers import AutoencoderKL
    from transformers import CLIPConfig, CLIPModel

    from vb.official.__main__ import main

    unet_sd, mapper_sd = official_sd
    torch.save({"ema_unet": unet_sd}, tmp_path / "unet.pt")
    torch.save({"ema": mapper_sd}, tmp_path / "mapper.pt")
    (tmp_path / "sd14" / "unet").mkdir(parents=True)
    (tmp_path / "sd14" / "unet" / "config.json").write_text(json.dumps(TINY))
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=16).save_pretrained(tmp_path / "vae")
    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      max_position_embeddings=77, vocab_size=49408),
                     vision_config=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=24,
                                        num_attention_heads=2, image_size=32, patch_size=16), projection_dim=8)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    vb.clip_tokenizer().save_pretrained(tmp_path / "clip")
    img = (np.random.RandomState(0).rand(30, 20, 3) * 255).astype(np.uint8)
    import PIL.Image
    PIL.Image.fromarray(img).save(tmp_path / "img.png")
    mask = np.zeros((30, 20), np.uint8)
    mask[4:25, 3:15] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.gif"
    main(["sample", "--unet", str(tmp_path / "unet.pt"), "--mapper", str(tmp_path / "mapper.pt"),
          "--sd14", str(tmp_path / "sd14"), "--vae", str(tmp_path / "vae"), "--clip", str(tmp_path / "clip"),
          "--image", str(tmp_path / "img.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", "A dog in a pond",
          "--word", "dog", "--out", str(out), "--frames", "2", "--height", "16", "--steps", "2",
          "--attn-backend", "reference"])
    frames = PIL.Image.open(out)
    assert frames.size == (16, 16) and frames.n_frames == 2
