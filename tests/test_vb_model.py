"""vb backbones: shapes, triton vs reference, the image branch once per sample, the pass without
an image prompt reducing to plain sparse-causal attention, install on a plain diffusers U-Net,
adapter save/load."""
import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

import vb_kernels
import vb
from vb_kernels.testing import rel_err

FUSED = Path(vb_kernels.__file__).parent / "impl" / "fused" / "function.py"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randomize(module, seed=0, std=0.05):
    """Move every weight off its initial value: zero-init gates, identity adaLN and copied
    projections would otherwise hide wiring mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * std)
    return module


def inputs(b=1, f=3, hw=8, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).to(device)

    return dict(sample=r(b, 4, f, hw, hw), timestep=torch.tensor(500), encoder_hidden_states=r(b, 77, 32),
                pooled_text_embeds=r(b, 32), image_embeds=r(b, 32), image_latents=r(b, 4, hw, hw),
                null_encoder_hidden_states=r(1, 77, 32), null_pooled_text_embeds=r(1, 32))


def run(net, kw, image=True):
    kw = dict(kw)
    if not image:
        kw["image_latents"] = None
    x, t = kw.pop("sample"), kw.pop("timestep")
    return net(x, t, kw.pop("encoder_hidden_states"), **kw)


@pytest.fixture(scope="module")
def nets():
    out = {}
    for name in ("unet", "dit"):
        out[name] = randomize(vb.build_tiny_videobooth(name).backbone)
    return out


@pytest.fixture(params=["unet", "dit"])
def net(request, nets):
    return nets[request.param]


# ---- shapes and gradients ----------------------------------------------------------------------
@pytest.mark.parametrize("b,f", [(2, 3), (1, 1)])
def test_backbone_shapes(net, b, f):
    kw = inputs(b=b, f=f)
    with torch.no_grad():
        out = run(net, kw)
        out_plain = run(net, kw, image=False)
    assert out.shape == (b, 4, f, 8, 8) and torch.isfinite(out).all()
    assert out_plain.shape == out.shape
    assert not torch.allclose(out, out_plain)  # the image prompt changes the prediction
    assert set(vars(net.context)) == {"hooks", "requires_grad"}  # no per-call state kept anywhere


def test_gradients_reach_the_new_projections_only(net):
    net.zero_grad(set_to_none=True)
    run(net, inputs(b=1, f=3)).square().mean().backward()
    attn1 = net.attn1_processors()
    assert attn1 and all(p.to_k_exemplar.weight.grad is not None and p.to_k_exemplar.weight.grad.abs().sum() > 0
                         for p in attn1)
    assert all(p.to_v_new.weight.grad is not None for p in attn1)
    if hasattr(net, "unet"):  # pretrained weights frozen by install_videobooth
        assert all(p.grad is None for n, p in net.unet.named_parameters() if ".processor." not in n
                   and ".vb_temporal." not in n)
    net.zero_grad(set_to_none=True)


def test_stage_parameters(nets):
    net = nets["unet"]
    s1 = {id(p) for p in net.stage_parameters(1)}
    s2 = {id(p) for p in net.stage_parameters(2)}
    assert s1 < s2
    assert s1 == {id(p) for proc in net.attn2_processors() for p in proc.parameters()}
    assert all(p.requires_grad for p in net.stage_parameters(2))
    assert len({id(p) for p in net.stage_parameters(2, include_temporal=True)}) > len(s2)
    with pytest.raises(ValueError, match="stage"):
        list(net.stage_parameters(3))


# ---- backends ------------------------------------------------------------------------------------
@pytest.mark.skipif(not FUSED.exists(), reason="vb_kernels/impl/fused/function.py (Triton backend) not written yet")
@pytest.mark.parametrize("name", ["unet", "dit"])
def test_triton_backend_matches_reference(nets, name):
    net = copy.deepcopy(nets[name]).to(DEVICE)
    kw = inputs(b=1, f=3, hw=4 if name == "unet" else 8, device=DEVICE)  # tiny: the CPU runs the interpreter
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 all the way, so the tolerance means the op
    try:
        with torch.no_grad():
            net.set_attn_backend("reference")
            ref = run(net, kw)
            net.set_attn_backend("triton")
            out = run(net, kw)
            # The pass without an image prompt (no keyframes) through the same processor class:
            # once is enough, on the cheaper backbone (the interpreter pays per launch).
            if name == "dit":
                out_plain = run(net, kw, image=False)
                net.set_attn_backend("reference")
                assert rel_err(out_plain, run(net, kw, image=False)) < 1e-5
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert rel_err(out, ref) < 1e-5


@pytest.mark.skipif(not FUSED.exists(), reason="vb_kernels/impl/fused/function.py (Triton backend) not written yet")
def test_triton_backend_gradients_match_reference(nets):
    """Training through the fused backward: the new projections get the same gradients."""
    net = copy.deepcopy(nets["dit"]).to(DEVICE)
    kw = inputs(b=1, f=3, device=DEVICE)
    grads = {}
    for backend in ("reference", "triton"):
        net.set_attn_backend(backend)
        net.zero_grad(set_to_none=True)
        run(net, kw).square().mean().backward()
        grads[backend] = {n: p.grad.clone() for n, p in net.named_parameters() if ".processor." in n}
    assert grads["reference"].keys() == grads["triton"].keys() and grads["reference"]
    for name, g in grads["reference"].items():
        assert rel_err(grads["triton"][name], g) < 1e-4, name


def test_sdpa_backend_matches_reference(nets):
    net = nets["dit"]
    kw = inputs()
    with torch.no_grad():
        ref = run(net, kw)
        net.set_attn_backend("sdpa")
        try:
            out = run(net, kw)
        finally:
            net.set_attn_backend("reference")
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="attn_backend"):
        net.set_attn_backend("cuda-magic")


# ---- image branch -----------------------------------------------------------------------------
def test_image_branch_runs_once_per_sample(net):
    b, f = 2, 3
    attn1 = [m for n, m in net.named_modules() if n.endswith("attn1")]
    calls = []  # (layer, batch of the call)
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: calls.append((i, args[0].shape[0])))
               for i, m in enumerate(attn1)]
    temporal = [m for n, m in net.named_modules() if n.endswith("vb_temporal") or n.endswith("attn_temp")]
    t_calls = []
    handles += [m.register_forward_pre_hook(lambda mod, args: t_calls.append(args[0].shape[0])) for m in temporal]
    try:
        with torch.no_grad():
            run(net, inputs(b=b, f=f))
    finally:
        for h in handles:
            h.remove()
    for i in range(len(attn1)):
        # Every attn1 runs twice: once on the B image latents, once on the B*F frames.
        assert [bs for j, bs in calls if j == i] == [b, b * f]
    # Temporal layers run once each, only in the video pass (on B*F frames or B*N positions).
    assert temporal and len(t_calls) == len(temporal)
    per_frame = {b * f} if hasattr(net, "unet") else {b * 16}  # DiT: (B*N, F, D), N = 4*4 patches
    assert set(t_calls) == per_frame


# ---- the pass without an image prompt ------------------------------------------------------------
class PlainSparseCausal:
    """Tune-A-Video's attn1, written out: keys/values of frame f are the literal concatenation
    of frame 0's and frame max(f-1, 0)'s, softmax attention per head."""

    def __init__(self, to_k, to_v, context):
        self.to_k, self.to_v, self.context = to_k, to_v, context

    def __call__(self, attn, x, encoder_hidden_states=None, attention_mask=None, temb=None, vb_state=None):
        assert vb_state.mode == "video"
        f = vb_state.num_frames
        bf, n, _ = x.shape
        b, h = bf // f, attn.heads
        q, k, v = attn.to_q(x), self.to_k(x), self.to_v(x)
        d = q.shape[-1] // h
        prev = [max(i - 1, 0) for i in range(f)]
        k, v = k.view(b, f, n, h * d), v.view(b, f, n, h * d)
        k = torch.cat([k[:, [0] * f], k[:, prev]], dim=2).reshape(bf, 2 * n, h, d).transpose(1, 2)
        v = torch.cat([v[:, [0] * f], v[:, prev]], dim=2).reshape(bf, 2 * n, h, d).transpose(1, 2)
        q = q.view(bf, n, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(bf, n, h * d)
        return attn.to_out[1](attn.to_out[0](out))


def test_without_image_the_model_is_plain_sparse_causal(nets, net):
    kw = inputs(b=2, f=4)
    with torch.no_grad():
        ours = run(net, kw, image=False)
        plain_net = copy.deepcopy(net)
        for name, attn in plain_net.named_modules():
            if name.endswith("attn1"):
                proc = attn.processor
                attn.set_processor(PlainSparseCausal(proc.to_k_new, proc.to_v_new, plain_net.context))
        plain = run(plain_net, kw, image=False)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


def test_processor_with_image_matches_the_original_transcribed():
    """The original's attn1 with an exemplar: frame 0's values are first refreshed by attending
    to [exemplar; frame 0], then every frame attends to [frame 0; previous frame]."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16)
    ctx = vb.VideoBoothContext()
    proc = randomize(vb.VideoBoothAttnProcessor(attn, ctx, "x"), seed=3, std=0.2)
    attn.set_processor(proc)
    b, f, n, m = 2, 4, 6, 5
    x, x_img = torch.randn(b * f, n, 32), torch.randn(b, m, 32)
    with torch.no_grad():
        out = attn(x, vb_state=vb.VideoBoothState.video(f, (2, 3), {"x": x_img}))
        assert torch.equal(attn(x), proc.base_processor(attn, x))  # no state in the call: the model it was

        def heads(t):  # (..., L, 32) -> (..., 2, L, 16)
            return t.unflatten(-1, (2, 16)).transpose(-2, -3)

        q = heads(attn.to_q(x).view(b, f, n, 32))
        k = heads(proc.to_k_new(x).view(b, f, n, 32))
        v = heads(proc.to_v_new(x).view(b, f, n, 32))
        ki, vi = heads(proc.to_k_exemplar(x_img)), heads(proc.to_v_exemplar(x_img))
        u0 = F.scaled_dot_product_attention(q[:, 0], torch.cat([ki, k[:, 0]], -2), torch.cat([vi, v[:, 0]], -2))
        w = torch.cat([u0[:, None], v[:, 1:]], dim=1)
        prev = [max(i - 1, 0) for i in range(f)]
        kk = torch.cat([k[:, [0] * f], k[:, prev]], dim=-2)
        vv = torch.cat([w[:, [0] * f], w[:, prev]], dim=-2)
        ref = F.scaled_dot_product_attention(q, kk, vv).transpose(-2, -3).flatten(-2).reshape(b * f, n, 32)
        ref = attn.to_out[0](ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone,opts", [
    ("unet", dict(image_bank="pool:2", schedule="window:2")),
    ("unet", dict(image_bank=("learned", 4), learn_query=True, schedule="first+img")),
    ("dit", dict(image_bank="learned:3", schedule="keyframes:2")),
])
def test_fine_path_options(backbone, opts):
    net = randomize(vb.build_tiny_videobooth(backbone, **opts).backbone)
    with torch.no_grad():
        out = run(net, inputs(b=1, f=3))
    assert out.shape == (1, 4, 3, 8, 8) and torch.isfinite(out).all()
    procs = net.attn1_processors()
    if opts.get("learn_query"):
        assert all(p.to_q_new is not None for p in procs)
    if opts.get("image_bank"):
        assert all(p.image_bank is not None for p in procs)
    seen = []
    procs[0].image_bank.register_forward_hook(lambda m, a, o: seen.append((a[0].shape[1], o.shape[1])))
    with torch.no_grad():
        run(net, inputs(b=1, f=3))
    kind, n = vb.processors.parse_image_bank(opts["image_bank"]).split(":")
    m_in, m_out = seen[0]
    assert m_out == (m_in // int(n) ** 2 if kind == "pool" else int(n))


def test_schedule_can_be_a_kernels_schedule_or_callable(nets):
    net = copy.deepcopy(nets["dit"])
    kw = inputs(f=4)
    with torch.no_grad():
        ref = run(net, kw)
        net.set_schedule(vb_kernels.Schedule.videobooth(4))
        torch.testing.assert_close(run(net, kw), ref, rtol=0, atol=0)
        net.set_schedule(lambda n: vb_kernels.Schedule.first(n))
        assert not torch.allclose(run(net, kw), ref)
        net.set_schedule(vb_kernels.Schedule.videobooth(3))
        with pytest.raises(ValueError, match="schedule"):
            run(net, kw)
    with pytest.raises(ValueError, match="schedule"):
        net.set_schedule("sparse-ish")


# ---- install on a plain diffusers U-Net ---------------------------------------------------------
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=8)


def test_install_on_a_plain_unet():
    unet = tiny_unet()
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        before = unet(x, 10, encoder_hidden_states=text).sample
    n1 = sum(n.endswith("attn1") for n, _ in unet.named_modules())
    n2 = sum(n.endswith("attn2") for n, _ in unet.named_modules())
    net = vb.VideoBoothUNet(unet)  # calls install_videobooth(unet)
    procs = unet.attn_processors
    assert sum(isinstance(p, vb.VideoBoothAttnProcessor) for p in procs.values()) == n1
    assert sum(isinstance(p, vb.VideoBoothTextAttnProcessor) for p in procs.values()) == n2
    assert net.context is unet.vb_context
    assert not any(p.requires_grad for n, p in unet.named_parameters() if ".processor." not in n
                   and ".vb_temporal." not in n)
    with torch.no_grad():  # outside a VideoBooth forward the model is the 2D model it was
        after = unet(x, 10, encoder_hidden_states=text).sample
        # A freshly inflated model with F = 1 (the frame reads itself, temporal layers add zero)
        # is exactly the 2D model.
        video = net(x[:, :, None], 10, text)
    assert torch.equal(before, after)
    torch.testing.assert_close(video[:, :, 0], before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already installed"):
        vb.install_videobooth(unet)
    with pytest.raises(ValueError, match="attn1"):
        vb.install_videobooth(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="image_bank"):
        vb.install_videobooth(tiny_unet(), image_bank="median:3")
    with pytest.raises(TypeError, match="unet"):
        vb.install_videobooth("runwayml/stable-diffusion-v1-5")


def test_backbone_input_errors(nets):
    net = nets["unet"]
    kw = inputs()
    with pytest.raises(ValueError, match="sample"):
        net(kw["sample"][:, :3], 10, kw["encoder_hidden_states"])
    with pytest.raises(ValueError, match="image_latents"):
        net(kw["sample"], 10, kw["encoder_hidden_states"], image_latents=kw["image_latents"][:, :, :4])
    with pytest.raises(ValueError, match="null_encoder_hidden_states"):
        net(kw["sample"], 10, kw["encoder_hidden_states"], image_latents=kw["image_latents"])
    with pytest.raises(TypeError, match="encoder_hidden_states"):
        net(kw["sample"], 10, None)
    with pytest.raises(ValueError, match="timestep"):
        net(kw["sample"], torch.tensor([1, 2, 3]), kw["encoder_hidden_states"])
    with pytest.raises(ValueError, match="pooled_text_embeds"):
        nets["dit"](kw["sample"], 10, pooled_text_embeds=torch.randn(1, 77, 32))


# ---- adapter weights ----------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_adapter_save_load_round_trip_is_bit_exact(tmp_path, backbone):
    a = vb.build_tiny_videobooth(backbone, image_bank="learned:2", seed=0)
    randomize(a.mapper, seed=1)
    randomize(a.backbone, seed=2)
    path = vb.save_adapter(tmp_path / "adapter", a.mapper, a.backbone)
    assert os.path.basename(path) == "videobooth_adapter.safetensors"
    assert sorted(os.listdir(tmp_path / "adapter")) == ["videobooth_adapter.json", "videobooth_adapter.safetensors"]
    cfg = json.loads((tmp_path / "adapter" / "videobooth_adapter.json").read_text())
    assert cfg["backbone"]["image_bank"] == "learned:2" and cfg["mapper"]["num_layers"] == 3

    b = vb.build_tiny_videobooth(backbone, image_bank="learned:2", seed=0)
    randomize(b.backbone, seed=2)  # same base weights as a; now make the adapter differ
    randomize(b.mapper, seed=9)
    with torch.no_grad():
        for v in b.backbone.adapter_state_dict().values():
            v.add_(1.0)
    kw = inputs()
    with torch.no_grad():
        assert not torch.equal(run(a.backbone, kw), run(b.backbone, kw))
    b.pipeline().load_adapter(str(tmp_path / "adapter"))
    sa, sb = a.backbone.adapter_state_dict(), b.backbone.adapter_state_dict()
    assert sa.keys() == sb.keys() and len(sa) > 0
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(x, y) for x, y in zip(a.mapper.state_dict().values(), b.mapper.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(run(a.backbone, kw), run(b.backbone, kw))
        img = torch.rand(1, 3, 32, 32)
        assert torch.equal(a.mapper(a.image_encoder(img).layer_tokens), b.mapper(a.image_encoder(img).layer_tokens))

    c = vb.build_tiny_videobooth(backbone, image_bank=None)
    with pytest.raises(ValueError, match="image_bank"):
        vb.load_adapter(tmp_path / "adapter", c.mapper, c.backbone)
    with pytest.raises(FileNotFoundError, match="path"):
        vb.load_adapter(tmp_path / "nowhere", c.mapper, c.backbone)
