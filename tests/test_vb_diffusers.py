"""vb the diffusers way: gradient checkpointing with per-call processor state (both backbones),
install on AnimateDiff's UNetMotionModel and Latte (spatial attention only), the 'self'
schedule reproducing the model installed on for any number of frames."""
import copy

import pytest
import torch
from diffusers import MotionAdapter, UNetMotionModel

import vb
from vb.unet import temporal_module_names

from test_vb_model import inputs, randomize, run, tiny_unet


# ---- gradient checkpointing -------------------------------------------------------------------
def _loss_and_grads(net, kw, image, stage, checkpointing):
    net = copy.deepcopy(net)
    net.requires_grad_(False)
    params = dict(net.named_parameters())
    temporal = stage == 2 and not net.install_config.get("motion")  # (motion modules stay frozen)
    trained = {id(p) for p in net.stage_parameters(stage, include_temporal=temporal)}
    for p in params.values():
        p.requires_grad_(id(p) in trained)
    if checkpointing:
        net.enable_gradient_checkpointing()
    net.train()
    # The prompt embeddings stand in for the mapper's output (the coarse path trains it in
    # both stages): their gradient is compared too.
    kw = {k: (v.clone().requires_grad_(True) if k in ("encoder_hidden_states", "pooled_text_embeds") else v)
          for k, v in kw.items()}
    out = run(net, kw, image=image)
    loss = (out - torch.linspace(-1, 1, out.numel()).view_as(out)).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in params.items() if p.requires_grad}
    grads.update({k: kw[k].grad for k in ("encoder_hidden_states", "pooled_text_embeds")
                  if kw[k].grad is not None})
    return loss.detach(), grads


@pytest.fixture(scope="module")
def nets():
    return {name: randomize(vb.build_tiny_videobooth(name).backbone, seed=4) for name in ("unet", "dit")}


@pytest.mark.parametrize("backbone", ["unet", "dit"])
@pytest.mark.parametrize("image", [True, False], ids=["image", "noimage"])
@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(nets, backbone, image, stage):
    net = nets[backbone]
    kw = inputs(b=2, f=3, seed=7)
    loss, grads = _loss_and_grads(net, kw, image, stage, checkpointing=False)
    loss_c, grads_c = _loss_and_grads(net, kw, image, stage, checkpointing=True)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=0)
    assert grads.keys() == grads_c.keys() and len(grads) > 0
    for name, g in grads.items():
        if g is None:  # e.g. the exemplar projections without an image prompt
            assert grads_c[name] is None, name
            continue
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert sum(g is not None for g in grads.values()) >= 1
    if image and stage == 2:  # the fine path's projections did get gradients
        assert any(".to_k_exemplar." in n and g.abs().sum() > 0 for n, g in grads_c.items())


def _saved_bytes(net, kw, checkpointing):
    """Bytes of the tensors autograd keeps for backward outside checkpointed regions."""
    net = copy.deepcopy(net)
    for p in net.stage_parameters(2, include_temporal=True):
        p.requires_grad_(True)
    if checkpointing:
        net.enable_gradient_checkpointing()
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(net, kw)
    return total[0]


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_gradient_checkpointing_saves_fewer_bytes(nets, backbone):
    kw = inputs(b=1, f=4, seed=2)
    plain, ckpt = _saved_bytes(nets[backbone], kw, False), _saved_bytes(nets[backbone], kw, True)
    assert ckpt < plain / 2, (plain, ckpt)


# ---- the 'self' schedule: a fresh install is the model it was installed on ---------------------
def test_fresh_install_with_self_schedule_equals_the_2d_model_for_many_frames():
    unet = tiny_unet()
    randomize(unet, seed=1)
    b, f = 2, 3
    x, text = torch.randn(b, 4, f, 8, 8), torch.randn(b, 77, 32)
    with torch.no_grad():
        frames = x.transpose(1, 2).reshape(b * f, 4, 8, 8)
        ref = unet(frames, 10, encoder_hidden_states=text.repeat_interleave(f, 0)).sample
        ref = ref.view(b, f, 4, 8, 8).transpose(1, 2)
        net = vb.VideoBoothUNet(unet, schedule="self")
        torch.testing.assert_close(net(x, 10, text), ref, rtol=1e-5, atol=1e-5)
        # The paper's schedule mixes frames: frame 1 reads [0, 0], so it differs beyond frame 0.
        net.set_schedule("videobooth")
        out = net(x, 10, text)
    torch.testing.assert_close(out[:, :, 0], ref[:, :, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, :, 1:], ref[:, :, 1:], atol=1e-4)


# ---- a pretrained temporal base: AnimateDiff's UNetMotionModel ------------------------------------
def tiny_motion_unet(seed=0):
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=8, use_motion_mid_block=False)
    motion = UNetMotionModel.from_unet2d(randomize(tiny_unet(), seed=seed), adapter)
    # MotionAdapter zero-initialises its output projections: move them, or the motion modules
    # would be the identity and the test could not see them.
    return randomize(motion, seed=seed + 1)


def test_motion_unet_install_touches_spatial_attention_only():
    motion = tiny_motion_unet()
    temporal = temporal_module_names(motion)
    net = vb.VideoBoothUNet(motion, schedule="self")
    procs = motion.attn_processors
    in_motion = {k: p for k, p in procs.items() if ".motion_modules." in k}
    assert in_motion and not any(isinstance(p, (vb.VideoBoothAttnProcessor, vb.VideoBoothTextAttnProcessor))
                                 for p in in_motion.values())
    spatial_attn1 = [k for k in procs if k.endswith("attn1.processor") and ".motion_modules." not in k]
    assert spatial_attn1 and all(isinstance(procs[k], vb.VideoBoothAttnProcessor) for k in spatial_attn1)
    assert temporal and all("motion_modules" in n for n in temporal)
    assert net.install_config["temporal"] is False  # the motion modules are the temporal layers
    assert not any(hasattr(m, "vb_temporal") for m in motion.modules())


def test_motion_unet_with_self_schedule_and_no_image_equals_unet_motion_model():
    motion = tiny_motion_unet()
    b, f = 2, 4
    x, text = torch.randn(b, 4, f, 8, 8), torch.randn(b, 77, 32)
    with torch.no_grad():
        ref = motion(x, 10, encoder_hidden_states=text.repeat_interleave(f, 0)).sample
        net = vb.VideoBoothUNet(copy.deepcopy(motion), schedule="self")
        out = net(x, 10, text)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # The motion modules do act: dropping them changes the output.
        plain = copy.deepcopy(net)
        for name, m in plain.unet.named_modules():
            if name.endswith("motion_modules"):
                for mm in m:
                    mm.register_forward_hook(lambda mod, a, o: a[0])
        assert not torch.allclose(plain(x, 10, text), out, atol=1e-4)


def test_motion_unet_image_branch_skips_motion_modules_and_trains_with_checkpointing():
    net = vb.VideoBoothUNet(tiny_motion_unet(), schedule="videobooth")
    randomize(net, seed=5, std=0.02)
    kw = inputs(b=1, f=3, seed=3)
    mm = [m for n, m in net.unet.named_modules() if n.endswith("motion_modules.0")]
    # Motion-module attention runs on (B*H*W, F, C): count the frames it sees.
    frames_seen = []
    hs = [m.transformer_blocks[0].register_forward_pre_hook(
        lambda mod, a, k: frames_seen.append((a[0] if a else k['hidden_states']).shape[1]), with_kwargs=True)
          for m in mm]
    with torch.no_grad():
        out = run(net, kw)
        plain = run(net, kw, image=False)
    for h in hs:
        h.remove()
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)
    # The image branch (one frame) never entered a motion module: only 3-frame calls.
    assert frames_seen and set(frames_seen) == {3}
    loss, grads = _loss_and_grads(net, kw, True, 2, checkpointing=False)
    loss_c, grads_c = _loss_and_grads(net, kw, True, 2, checkpointing=True)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-7, msg=name)


# ---- Latte: temporal transformer blocks stay untouched -----------------------------------------
def test_latte_install_touches_spatial_blocks_only():
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(0)
    latte = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=1, cross_attention_dim=16, sample_size=8, patch_size=2,
                                    caption_channels=16, video_length=4, norm_type="ada_norm_single")
    from diffusers.models.attention_processor import Attention

    vb.install_videobooth(latte)
    procs = {f"{n}.processor": m.processor for n, m in latte.named_modules() if isinstance(m, Attention)}
    assert isinstance(procs["transformer_blocks.0.attn1.processor"], vb.VideoBoothAttnProcessor)
    assert isinstance(procs["transformer_blocks.0.attn2.processor"], vb.VideoBoothTextAttnProcessor)
    temporal = {k: p for k, p in procs.items() if k.startswith("temporal_transformer_blocks")}
    assert temporal and not any(isinstance(p, vb.processors._BaseProcessor) for p in temporal.values())
    assert not any(hasattr(m, "vb_temporal") for m in latte.modules())


@pytest.mark.parametrize("clip_image", [False, True], ids=["image", "image-clip"])
def test_gradient_checkpointing_with_the_official_preset(clip_image):
    """Clip-level GroupNorms (inside checkpointed ResNets) and the watermark module read the
    pass's state from the context: the checkpoint replays them with the forward's state."""
    net = vb.VideoBoothUNet(randomize(tiny_unet(), seed=2), preset="official", watermark=(32, 64, 64))
    randomize(net, seed=6, std=0.02)
    kw = inputs(b=1, f=3, seed=9)
    if clip_image:  # the official structure's image branch: the image latent as a 2-frame clip
        kw["image_latents"] = torch.stack([kw["image_latents"], kw["image_latents"] * 0.5], dim=2)
    loss, grads = _loss_and_grads(net, kw, True, 2, checkpointing=False)
    loss_c, grads_c = _loss_and_grads(net, kw, True, 2, checkpointing=True)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=0)
    assert grads.keys() == grads_c.keys()
    for name, g in grads.items():
        if g is None:
            assert grads_c[name] is None, name
            continue
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_from_motion_adapter_builds_the_animatediff_base():
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=8, use_motion_mid_block=False)
    randomize(adapter, seed=3)
    unet = randomize(tiny_unet(), seed=2)
    net = vb.VideoBoothUNet.from_motion_adapter(copy.deepcopy(unet), adapter, schedule="self")
    ref_model = UNetMotionModel.from_unet2d(unet, adapter)
    x, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        ref = ref_model(x, 10, encoder_hidden_states=text.repeat(3, 1, 1)).sample
        torch.testing.assert_close(net(x, 10, text), ref, rtol=1e-5, atol=1e-5)
    assert net.install_config["motion"] and not any(p.requires_grad for n, p in net.named_parameters()
                                                    if "motion_modules" in n)
    assert list(net.stage_parameters(2))  # the VideoBooth projections train
    with pytest.raises(ValueError, match="include_temporal"):
        list(net.stage_parameters(2, include_temporal=True))
    with pytest.raises(TypeError, match="motion_adapter"):
        vb.VideoBoothUNet.from_motion_adapter(tiny_unet(), tiny_unet())


@pytest.mark.slow
def test_torch_compile_sees_each_pass_state():
    """torch.compile (aot_eager, CPU) of a backbone: the per-pass state is an argument, so the
    compiled model with and without the image prompt equals eager (about 10 s: marked slow)."""
    net = randomize(vb.build_tiny_videobooth("dit").backbone, seed=1)
    kw = inputs(f=3)
    compiled = torch.compile(net, backend="aot_eager")
    with torch.no_grad():
        for image in (True, False):
            torch.testing.assert_close(run(compiled, kw, image=image), run(net, kw, image=image), rtol=1e-6, atol=1e-6)
