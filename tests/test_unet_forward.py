"""vb.unet_forward: the U-Net forward that passes the frame count and time embedding to the
layers diffusers' forward calls without them (issue 22: per-call state by one road).

Its reference is diffusers' own forward: on every config where neither clip-level norms nor the
watermark nor a motion U-Net's image branch applies, the two must agree bit for bit, values and
gradients, gradient checkpointing included."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

import vb
from vb.context import STATE_KWARG, resolve_state, state_kwargs
from vb.unet_forward import check_walkable, unet_forward

from test_official import WATERMARK, _inputs, _tiny_backbone
from test_vb_diffusers import tiny_motion_unet
from test_vb_model import randomize, tiny_unet


def _video_call(net, f, hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = 2
    x = torch.randn(b * f, 4, *hw, generator=g)
    t = torch.tensor([300] * b).repeat_interleave(f)
    text = torch.randn(b * f, 77, 32, generator=g)
    st = vb.VideoBoothState.video(f, hw)
    return x, t, text, state_kwargs(st)


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])  # (7, 9): diffusers forwards the up-sampling sizes
def test_equals_diffusers_forward_bit_for_bit_with_gradients_and_checkpointing(hw):
    net = vb.VideoBoothUNet(randomize(tiny_unet(), seed=1), schedule="videobooth")
    randomize(net, seed=2, std=0.02)
    net.train()
    x, t, text, cak = _video_call(net, 3, hw)
    outs = {}
    for checkpointing in (False, True):
        if checkpointing:
            net.enable_gradient_checkpointing()
        for name, fn in (("diffusers", lambda: net.unet(x, t, encoder_hidden_states=text,
                                                           cross_attention_kwargs=cak).sample),
                         ("ours", lambda: unet_forward(net.unet, x, t, text, cak, num_frames=3))):
            net.zero_grad()
            y = fn()
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
            outs[name, checkpointing] = (y.detach(), grads)
    ref_y, ref_g = outs["diffusers", False]
    assert ref_g and all(g.abs().sum() > 0 for g in ref_g.values())
    for key, (y, g) in outs.items():
        assert torch.equal(y, ref_y), key
        assert g.keys() == ref_g.keys() and all(torch.equal(g[n], ref_g[n]) for n in g), key


def test_motion_unet_image_branch_is_the_2d_unet_it_was_built_from():
    """A UNetMotionModel's 2D part, its motion modules not run, is the SD U-Net it came from."""
    from diffusers import MotionAdapter, UNetMotionModel

    unet2d = randomize(tiny_unet(), seed=3)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=8, use_motion_mid_block=False)
    motion = randomize(UNetMotionModel.from_unet2d(copy.deepcopy(unet2d), adapter), seed=4, std=0.0)
    for m in motion.modules():  # the adapter zero-initialises its outputs: move them, or skipping shows nothing
        if hasattr(m, "proj_out") and isinstance(m.proj_out, torch.nn.Linear):
            torch.nn.init.normal_(m.proj_out.weight, std=0.1)
    g = torch.Generator().manual_seed(5)
    img, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([400, 400])
    with torch.no_grad():
        ref = unet2d(img, t, encoder_hidden_states=text).sample
        ours = unet_forward(motion, img, t, text)
        with_motion = motion(img[:, :, None], t, encoder_hidden_states=text).sample[:, :, 0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert (with_motion - ref).abs().max() > 1e-3  # positive control: the motion modules do act on one frame


def test_refuses_what_it_does_not_cover_with_the_reason():
    from diffusers import UNet2DConditionModel

    kw = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        check_walkable(UNet2DConditionModel(**kw, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="time_embedding_norm='scale_shift'"):
        check_walkable(UNet2DConditionModel(**kw, resnet_time_scale_shift="scale_shift"))
    with pytest.raises(ValueError, match="class_embed_type"):  # the backbone checks when it is built
        vb.VideoBoothUNet(UNet2DConditionModel(**kw, class_embed_type="timestep"), clip_groupnorm=True)
    with pytest.raises(ValueError, match="not a UNetMotionModel"):
        vb.VideoBoothUNet(tiny_motion_unet(), watermark=(32, 64, 64))
    bb = _tiny_backbone("official", watermark=WATERMARK)
    bb.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    x, t, text, _, _ = _inputs()
    with pytest.raises(ValueError, match="FreeU"):
        bb(x, t, text)


def test_no_layer_reads_a_shared_current_pass():
    """Per-call state has one road: the state object of the call. A call without one is the
    model it was installed on; the install record holds nothing of a pass; and two threads
    running the same official-preset backbone (clip-level norms, watermark) with different frame
    counts get exactly what each gets alone."""
    assert resolve_state(None).mode == "off"
    with pytest.raises(TypeError, match=STATE_KWARG):
        resolve_state({"mode": "video"})
    bb = _tiny_backbone("official", watermark=WATERMARK)
    assert set(vars(bb.context)) == {"hooks", "requires_grad"}
    calls = {}
    for f in (2, 3):
        x, t, text, null, img = _inputs(f)
        calls[f] = (x, t, text, null, img)
    with torch.no_grad():
        alone = {f: bb(x, t, text, image_latents=img, null_encoder_hidden_states=null)
                 for f, (x, t, text, null, img) in calls.items()}
    results, errors = {}, []

    def work(f):
        try:
            x, t, text, null, img = calls[f]
            with torch.no_grad():
                results[f] = [bb(x, t, text, image_latents=img, null_encoder_hidden_states=null) for _ in range(3)]
        except Exception as e:  # pragma: no cover (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f,)) for f in calls]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for f, outs in results.items():
        assert all(torch.equal(o, alone[f]) for o in outs), f
