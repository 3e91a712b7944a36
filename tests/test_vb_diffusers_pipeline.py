"""VideoBoothPipeline the diffusers way: whole-pipeline save/from_pretrained, the standard
switches (xformers, attention slicing, default processors), the standard call arguments, an
image-prompt strength, uninstall, the adapter's schedule check."""
import copy

import pytest
import torch

import vb

from test_vb_model import inputs, randomize, run, tiny_unet

KW = dict(num_frames=3, height=16, width=16, num_inference_steps=2, output_type="latent")


def make_pipe(backbone, **opts):
    p = vb.build_tiny_videobooth(backbone, **opts).pipeline()
    p.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the zero-initialised start (see test_vb_pipeline)
        for w in list(p.backbone.parameters()) + list(p.mapper.parameters()):
            w.add_(torch.randn(w.shape, generator=g) * 0.05)
    return p


@pytest.fixture(scope="module", params=["unet", "dit"])
def pipe(request):
    return make_pipe(request.param)


def image(seed=3):
    return torch.rand(3, 16, 16, generator=torch.manual_seed(seed))


def gen(p, **kw):
    args = dict(KW, generator=torch.manual_seed(0))
    args.update(kw)
    return p(kw.pop("prompt", "a dog on grass") if "prompt_embeds" not in kw else None,
             "dog" if "prompt_embeds" not in kw else None, image(), **{k: v for k, v in args.items() if k != "prompt"}
             ).frames


# ---- whole-pipeline save / from_pretrained ----------------------------------------------------------
@pytest.mark.parametrize("backbone,opts", [("unet", dict(image_bank="pool:2", schedule="window:2")),
                                           ("dit", dict(learn_query=True))])
def test_pipeline_save_and_from_pretrained_round_trip_bit_exactly(tmp_path, backbone, opts):
    p = make_pipe(backbone, **opts)
    p.backbone.set_attn_backend("sdpa")
    p.save_pretrained(tmp_path / "pipe")
    q = vb.VideoBoothPipeline.from_pretrained(tmp_path / "pipe")
    q.set_progress_bar_config(disable=True)
    assert type(q.backbone) is type(p.backbone) and isinstance(q.image_encoder, vb.VideoBoothImageEncoder)
    assert q.backbone.install_config == p.backbone.install_config
    pa, qa = p.backbone.attn1_processors(), q.backbone.attn1_processors()
    assert [(x.name, x.schedule, x.backend) for x in pa] == [(x.name, x.schedule, x.backend) for x in qa]
    for name in ("backbone", "image_encoder", "mapper", "vae", "text_encoder"):
        sa, sb = getattr(p, name).state_dict(), getattr(q, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert p.backbone.adapter_state_dict().keys() == q.backbone.adapter_state_dict().keys()
    assert torch.equal(gen(p), gen(q))


def test_backbone_save_refuses_an_unnamed_schedule(tmp_path):
    p = vb.build_tiny_videobooth("unet")
    p.backbone.set_schedule(lambda f: __import__("vb_kernels").Schedule.first(f))
    with pytest.raises(ValueError, match="schedule"):
        p.backbone.save_pretrained(tmp_path)


def test_image_encoder_without_its_config_refuses_to_save(tmp_path):
    enc = vb.build_tiny_videobooth("unet").image_encoder
    bare = vb.VideoBoothImageEncoder(enc.visual, layers=enc.layers)
    with pytest.raises(ValueError, match="vision_cfg"):
        bare.save_pretrained(tmp_path)


def test_load_adapter_refuses_another_schedule(tmp_path):
    a = vb.build_tiny_videobooth("unet", schedule="window:2")
    vb.save_adapter(tmp_path, a.mapper, a.backbone)
    b = vb.build_tiny_videobooth("unet")
    with pytest.raises(ValueError, match="schedule='window:2'.*schedule='videobooth'"):
        b.pipeline().load_adapter(tmp_path)
    b.backbone.set_schedule("window:2")
    b.pipeline().load_adapter(tmp_path)  # now it matches
    vb.build_tiny_videobooth("unet").pipeline().load_adapter(tmp_path, strict=False)


# ---- switches -------------------------------------------------------------------------------------------
def test_disable_xformers_keeps_the_videobooth_processors(pipe):
    """diffusers' version replaced every processor (adapter tensors 52 -> 28, then "image branch
    recorded nothing"). Now the VideoBooth processors stay, the same objects; the other
    attentions (temporal layers, VAE) switch to diffusers' AttnProcessor: last-bit changes."""
    p = copy.deepcopy(pipe)
    kw = inputs(f=3)
    with torch.no_grad():
        ref = run(p.backbone, kw)
    before = gen(p)
    procs = [id(x) for x in p.backbone.attn1_processors() + p.backbone.attn2_processors()]
    n = len(p.backbone.adapter_state_dict())
    p.disable_xformers_memory_efficient_attention()
    assert [id(x) for x in p.backbone.attn1_processors() + p.backbone.attn2_processors()] == procs
    assert len(p.backbone.adapter_state_dict()) == n
    with torch.no_grad():
        torch.testing.assert_close(run(p.backbone, kw), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gen(p), before, rtol=1e-4, atol=1e-4)
    p.backbone.set_default_attn_processor()
    assert [id(x) for x in p.backbone.attn1_processors() + p.backbone.attn2_processors()] == procs
    with torch.no_grad():
        torch.testing.assert_close(run(p.backbone, kw), ref, rtol=1e-5, atol=1e-5)


def test_enable_xformers_keeps_the_processors_or_raises(pipe):
    p = copy.deepcopy(pipe)
    n = len(p.backbone.adapter_state_dict())
    try:
        p.enable_xformers_memory_efficient_attention()
    except (ModuleNotFoundError, ImportError, ValueError) as e:  # no xformers / no GPU here
        assert "xformers" in str(e).lower() or "cuda" in str(e).lower()
    assert len(p.backbone.adapter_state_dict()) == n and p.backbone.attn1_processors()
    gen(p)


def test_attention_slicing_raises_and_disabling_is_harmless(pipe):
    with pytest.raises(NotImplementedError, match="set_attn_backend"):
        pipe.enable_attention_slicing()
    with pytest.raises(NotImplementedError, match="set_attn_backend"):
        pipe.enable_attention_slicing(2)
    pipe.disable_attention_slicing()
    assert pipe.backbone.attn1_processors()


# ---- call arguments ------------------------------------------------------------------------------------
def _conditioning(p, **kw):
    """The conditioning tensors of every backbone call of one generation."""
    calls, orig = [], p._predict

    def spy(x, t, *cond):
        calls.append([c for c in cond if isinstance(c, torch.Tensor)])
        return orig(x, t, *cond)

    p._predict = spy
    try:
        out = gen(p, **kw)
    finally:
        del p._predict
    return out, calls


def test_num_videos_per_prompt(pipe):
    one, cond1 = _conditioning(pipe)
    two, cond2 = _conditioning(pipe, num_videos_per_prompt=2)
    assert two.shape == (2, *one.shape[1:]) and not torch.equal(two[0], two[1])  # own noise each
    # Each video is conditioned exactly as the single video of that prompt (encoded once,
    # repeated); the image prompt's latent gets its own noise per video, like the video.
    assert len(cond1) == len(cond2)
    for c1, c2 in zip(cond1, cond2):
        for a, b in zip(c1, c2):
            assert b.shape[0] == 2
            if b.dim() == 4:  # noised image latents
                assert not torch.equal(b[0], b[1])
            else:
                assert torch.equal(b[0], a[0]) and torch.equal(b[1], a[0])
    with pytest.raises(ValueError, match="num_videos_per_prompt"):
        gen(pipe, num_videos_per_prompt=0)


def test_negative_prompt_changes_only_the_unconditional_pass(pipe):
    base = gen(pipe)
    neg = gen(pipe, negative_prompt="blurry")
    assert not torch.equal(base, neg)
    assert torch.equal(gen(pipe, negative_prompt=""), base)  # the empty prompt is the default
    assert torch.equal(gen(pipe, negative_prompt="blurry", guidance_scale=1.0), gen(pipe, guidance_scale=1.0))
    with pytest.raises(ValueError, match="negative_prompt"):
        gen(pipe, negative_prompt=["a", "b", "c"])


def test_prompt_embeds_reproduce_the_prompt(pipe):
    images = pipe.prepare_image(image(), 1, 16, 16)
    tokens, _ = pipe.encode_image(images)
    text, pooled = vb.encode_prompt(pipe.text_encoder, pipe.tokenizer, ["a dog on grass"], ["dog"], tokens)
    neg, neg_pooled = vb.encode_prompt(pipe.text_encoder, pipe.tokenizer, ["blurry"])
    ref = gen(pipe, negative_prompt="blurry")
    out = gen(pipe, prompt_embeds=text, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
              negative_pooled_prompt_embeds=neg_pooled)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="prompt_embeds"):
        pipe("a dog", None, image(), prompt_embeds=text, pooled_prompt_embeds=pooled, **KW)
    with pytest.raises(ValueError, match="prompt_embeds"):
        gen(pipe, prompt_embeds=text[0])


def test_the_call_is_its_diffusers_style_pieces(pipe):
    """check_inputs / encode_image / encode_prompt / prepare_latents are what __call__ runs:
    their outputs fed back as prompt_embeds and latents give the same video, bit for bit."""
    images = pipe.prepare_image(image(), 1, 16, 16)
    tokens, _ = pipe.encode_image(images)
    text, pooled, neg, neg_pooled, null, null_pooled = pipe.encode_prompt(
        "a dog on grass", "dog", tokens, negative_prompt="blurry")
    assert text.shape == neg.shape == null.shape and not torch.equal(neg, null)
    dtype = next(pipe.backbone.parameters()).dtype
    lat = pipe.prepare_latents(1, KW["num_frames"], 16, 16, dtype, torch.Generator().manual_seed(0))
    ref = gen(pipe, negative_prompt="blurry", generator=torch.Generator().manual_seed(0))
    # the generator's first draw is the initial noise: passing it as latents leaves the image
    # noise on the generator's second draw, as in the reference call
    g = torch.Generator().manual_seed(0)
    pipe.prepare_latents(1, KW["num_frames"], 16, 16, dtype, g)
    out = pipe(None, None, image(), **dict(KW, generator=g), latents=lat, prompt_embeds=text,
               pooled_prompt_embeds=pooled, negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled).frames
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="latents: expected shape"):
        pipe.prepare_latents(1, KW["num_frames"], 16, 16, dtype, None, latents=lat[:, :, :1])
    with pytest.raises(ValueError, match="num_videos_per_prompt"):
        pipe.check_inputs("a dog", "dog", 2, 16, 16, 2, 7.5, num_videos_per_prompt=0)


def test_eta_reaches_ddim(pipe):
    assert not torch.equal(gen(pipe, eta=1.0), gen(pipe))
    with pytest.raises(ValueError, match="eta"):
        gen(pipe, eta=-1)


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, int(t), kw["latents"].clone()))
        return {"latents": kw["latents"] * 0} if i == 0 else {}

    out = gen(pipe, callback_on_step_end=cb)
    assert [s[0] for s in seen] == [0, 1]
    assert torch.equal(seen[-1][2], out)
    assert not torch.equal(out, gen(pipe))

    def stop(p, i, t, kw):
        p._interrupt = True
        return {}

    one = gen(pipe, callback_on_step_end=stop)
    assert one.shape == out.shape
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        gen(pipe, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["noise"])


def test_image_prompt_scale(pipe):
    full = gen(pipe)
    assert torch.equal(gen(pipe, image_prompt_scale=1.0), full)
    half = gen(pipe, image_prompt_scale=0.5)
    assert not torch.equal(half, full) and pipe.backbone.image_scale == 1.0  # per call only
    pipe.set_image_prompt_scale(0.5)
    try:
        assert torch.equal(gen(pipe), half)
    finally:
        pipe.set_image_prompt_scale(1.0)
    with pytest.raises(TypeError, match="scale"):
        pipe.set_image_prompt_scale("strong")


def test_noise_image_latents_false_feeds_the_clean_latent_at_every_step(pipe):
    """The clean-latent diagnostic: every backbone call gets the prompt's VAE latent itself."""
    seen = []
    h = pipe.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("image_latents")),
                                                with_kwargs=True)
    try:
        clean = gen(pipe, noise_image_latents=False)
        n_clean = len(seen)
        noisy = gen(pipe)
    finally:
        h.remove()
    lat = pipe.encode_vae(pipe.prepare_image(image(), 1, KW["height"], KW["width"]))
    got = [x for x in seen[:n_clean] if x is not None]
    assert len(got) >= KW["num_inference_steps"] and all(torch.equal(x, lat) for x in got)
    assert not any(x is not None and torch.equal(x, lat) for x in seen[n_clean:])
    assert not torch.equal(clean, noisy)
    with pytest.raises(TypeError, match="noise_image_latents"):
        gen(pipe, noise_image_latents="no")


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_image_scale_is_saved_and_survives_the_round_trip(tmp_path, backbone):
    p = make_pipe(backbone)
    p.set_image_prompt_scale(0.4)
    half = gen(p)
    gen(p, image_prompt_scale=0.9)  # a per-call strength leaves the saved one alone
    assert p.backbone.image_scale == 0.4 and p.backbone.config.image_scale == 0.4
    p.save_pretrained(tmp_path / "pipe")
    q = vb.VideoBoothPipeline.from_pretrained(tmp_path / "pipe")
    q.set_progress_bar_config(disable=True)
    assert q.backbone.image_scale == 0.4 and q.backbone.config.image_scale == 0.4
    assert torch.equal(gen(q), half)
    with pytest.raises(TypeError, match="image_scale: expected a float"):
        vb.VideoDiT(image_scale="half") if backbone == "dit" else vb.VideoBoothUNet(tiny_unet(), image_scale="half")


def test_set_attn_processor_on_the_inner_unet_keeps_videobooth_or_says_how():
    """diffusers' set_attn_processor on the inner U-Net used to strip the VideoBooth processors
    silently; now it refuses, naming the backbone switches that keep them, and still works for
    what it does not touch (the processors themselves, a motion module's, after uninstall)."""
    from diffusers.models.attention_processor import AttnProcessor

    from test_vb_diffusers import tiny_motion_unet

    net = vb.VideoBoothUNet(randomize(tiny_unet(), seed=1))
    unet, before = net.unet, dict(net.unet.attn_processors)
    with pytest.raises(ValueError, match=r"processor: set_attn_processor .* set_default_attn_processor\(\)"):
        unet.set_attn_processor(AttnProcessor())
    with pytest.raises(ValueError):  # diffusers' own switch refuses processors it does not know
        unet.set_default_attn_processor()
    assert unet.attn_processors == before
    unet.set_attn_processor(dict(before))  # the processors themselves: allowed, nothing changes
    assert unet.attn_processors == before
    net.set_default_attn_processor()  # the backbone's switch keeps them
    kept = {k for k, v in before.items() if isinstance(v, (vb.VideoBoothAttnProcessor, vb.VideoBoothTextAttnProcessor))}
    assert kept and all(unet.attn_processors[k] is before[k] for k in kept)

    motion = vb.VideoBoothUNet(tiny_motion_unet()).unet
    procs = dict(motion.attn_processors)
    mine = {k: (v if isinstance(v, (vb.VideoBoothAttnProcessor, vb.VideoBoothTextAttnProcessor)) else AttnProcessor())
            for k, v in procs.items()}
    assert any(not isinstance(v, AttnProcessor) for v in mine.values()) and any(
        isinstance(v, AttnProcessor) for v in mine.values())
    motion.set_attn_processor(mine)  # the motion modules' switch as usual, VideoBooth's kept
    got = motion.attn_processors
    assert all(got[k] is procs[k] if not isinstance(v, AttnProcessor) else isinstance(got[k], AttnProcessor)
               for k, v in mine.items())

    back = net.uninstall()
    back.set_attn_processor(AttnProcessor())  # diffusers' own method again
    assert all(isinstance(p, AttnProcessor) for p in back.attn_processors.values())
    assert "set_attn_processor" not in back.__dict__


def test_image_scale_blends_each_attn1_output():
    """attn1 output with strength s = plain + s * (injected - plain); s = 0 is exactly the
    pass without the image prompt, for a whole backbone too."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16)
    proc = randomize(vb.VideoBoothAttnProcessor(attn, vb.VideoBoothContext(), "x"), seed=3, std=0.2)
    attn.set_processor(proc)
    x, x_img = torch.randn(2 * 3, 5, 32), torch.randn(2, 4, 32)

    def out(scale, image=True):
        st = vb.VideoBoothState.video(3, (1, 5), {"x": x_img} if image else None, image_scale=scale)
        with torch.no_grad():
            return attn(x, vb_state=st)

    plain, full = out(1.0, image=False), out(1.0)
    torch.testing.assert_close(out(0.25), plain + 0.25 * (full - plain), rtol=1e-5, atol=1e-6)
    assert torch.equal(out(0.0), plain) and not torch.allclose(full, plain)

    net = randomize(vb.build_tiny_videobooth("unet").backbone, seed=1)
    kw = inputs(f=3)
    with torch.no_grad():
        net.set_image_scale(0.0)
        zero = run(net, kw)
        net.set_image_scale(1.0)
        assert torch.equal(zero, run(net, kw, image=False)) and not torch.allclose(zero, run(net, kw))


def test_offload_sequence_is_the_call_order():
    assert vb.VideoBoothPipeline.model_cpu_offload_seq.split("->") == [
        "image_encoder", "mapper", "text_encoder", "vae", "backbone"]


# ---- uninstall -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [dict(), dict(preset="official", watermark=(32, 64, 64), learn_query=True)])
def test_uninstall_gives_back_the_original_model(opts):
    unet = randomize(tiny_unet(), seed=1)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    procs = {k: type(p) for k, p in unet.attn_processors.items()}
    grads = {n: p.requires_grad for n, p in unet.named_parameters()}
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = unet(x, 10, encoder_hidden_states=text).sample
    net = vb.VideoBoothUNet(unet, **opts)
    with torch.no_grad():
        net(torch.randn(1, 4, 3, 8, 8), 10, text[:1])
    back = net.uninstall()
    assert back is unet
    sd = back.state_dict()
    assert sd.keys() == before.keys() and all(torch.equal(sd[k], before[k]) for k in sd)
    assert {k: type(p) for k, p in back.attn_processors.items()} == procs
    assert {n: p.requires_grad for n, p in back.named_parameters()} == grads
    with torch.no_grad():
        assert torch.equal(back(x, 10, encoder_hidden_states=text).sample, ref)
    vb.install_videobooth(back)  # installable again
    with pytest.raises(ValueError, match="not installed"):
        vb.uninstall_videobooth(tiny_unet())


def test_uninstall_a_motion_unet():
    from test_vb_diffusers import tiny_motion_unet

    motion = tiny_motion_unet()
    cls = {n: type(m) for n, m in motion.named_modules()}
    x, text = torch.randn(1, 4, 3, 8, 8), torch.randn(3, 77, 32)
    with torch.no_grad():
        ref = motion(x, 10, encoder_hidden_states=text).sample
        back = vb.VideoBoothUNet(motion).uninstall()
        assert torch.equal(back(x, 10, encoder_hidden_states=text).sample, ref)
    assert {n: type(m) for n, m in back.named_modules()} == cls


@pytest.mark.parametrize("kind", ["official", "motion"])
def test_backbone_save_and_from_pretrained_round_trip(tmp_path, kind):
    if kind == "official":
        net = vb.VideoBoothUNet(randomize(tiny_unet(), seed=2), preset="official", watermark=(32, 64, 64),
                                image_bank="pool:2", schedule="keyframes:2")
    else:
        from test_vb_diffusers import tiny_motion_unet

        net = vb.VideoBoothUNet(tiny_motion_unet(), schedule="first")
    randomize(net, seed=4, std=0.02)
    net.save_pretrained(tmp_path)
    back = vb.VideoBoothUNet.from_pretrained(tmp_path)
    assert type(back.unet) is type(net.unet) and back.install_config == net.install_config
    kw = inputs(f=3)
    with torch.no_grad():
        assert torch.equal(run(back, kw), run(net, kw))


def test_image_encoder_round_trip(tmp_path):
    enc = vb.build_tiny_videobooth("unet").image_encoder
    enc.save_pretrained(tmp_path)
    back = vb.VideoBoothImageEncoder.from_pretrained(tmp_path)
    x = torch.rand(2, 3, 32, 32, generator=torch.manual_seed(0))
    a, b = enc(x), back(x)
    assert back.layers == enc.layers and torch.equal(a.layer_tokens, b.layer_tokens)
    assert torch.equal(a.image_embeds, b.image_embeds)


def test_image_encoder_with_a_transformers_tower_round_trips(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=32, patch_size=8))
    enc = vb.VideoBoothImageEncoder(tower, layers=(2, 0), resize_mode="bilinear", antialias=False)
    enc.save_pretrained(tmp_path)
    back = vb.VideoBoothImageEncoder.from_pretrained(tmp_path)
    x = torch.rand(1, 3, 40, 40, generator=torch.manual_seed(1))
    a, b = enc(x), back(x)
    assert isinstance(back.visual, CLIPVisionModel) and back.layers == (2, 0) and back.resize_mode == "bilinear"
    assert torch.equal(a.layer_tokens, b.layer_tokens) and torch.equal(a.image_embeds, b.image_embeds)
