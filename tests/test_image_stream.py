"""The image branch's two streams (issue 32 item 1): "one" (one copy of the image latent, one
draw) and "official" (F copies, each with its own draw, fresh at every sampling step; in training
at the video's timestep), in the backbone's saved config, the pipeline and the training task.
Parity of the pipeline's official stream with the official sampler itself: tools/official_parity.py
(docs/official.md); here against ``official_denoise``, which that tool checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vb
from vb.official.convert import unet_kwargs_from_official
from vb.official.sampler import IMAGE_STREAMS, image_stream_latents, official_denoise, official_scheduler
from vb.unet import VideoBoothUNet

TINY = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"], "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
        "cross_attention_dim": 32, "attention_head_dim": [2, 2, 2], "only_cross_attention": [False] * 3,
        "norm_num_groups": 8, "use_first_frame": True}
WATERMARK = (32, 64, 64)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _official_backbone():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    bb = VideoBoothUNet(UNet2DConditionModel(**unet_kwargs_from_official(TINY)), preset="official", watermark=WATERMARK)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every zero-initialised output random, so every path counts
        for p in bb.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return bb.eval()


@pytest.fixture(scope="module")
def official_pipe():
    parts = vb.build_tiny_videobooth("unet")  # text width 32: the backbone's cross-attention width
    pipe = vb.VideoBoothPipeline(parts.vae, parts.text_encoder, parts.tokenizer, parts.image_encoder, parts.mapper,
                                 _official_backbone(), official_scheduler(2))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image():
    return torch.from_numpy(np.random.RandomState(0).rand(3, 16, 16).astype(np.float32))


def test_stream_defaults_and_saved_config(tmp_path):
    assert IMAGE_STREAMS == ("one", "official")
    research = vb.build_tiny_videobooth("unet").backbone
    assert research.image_stream == "one" and research.config.image_stream == "one"
    official = _official_backbone()
    assert official.image_stream == "official" and official.config.image_stream == "official"
    research.set_image_stream("official")
    research.save_pretrained(tmp_path / "bb")
    back = VideoBoothUNet.from_pretrained(tmp_path / "bb")
    assert back.image_stream == "official"
    with pytest.raises(ValueError, match="stream"):
        research.set_image_stream("copies")
    with pytest.raises(ValueError, match="image_stream"):
        VideoBoothUNet(None, unet_class="UNet2DConditionModel", unet_config=dict(research.config.unet_config),
                       image_stream="F")


def test_image_stream_latents_shapes_and_errors():
    lat = torch.randn(2, 4, 8, 8)
    assert image_stream_latents(lat, "one", 5) is lat
    rep = image_stream_latents(lat, "official", 5)
    assert rep.shape == (2, 4, 5, 8, 8) and torch.equal(rep[:, :, 3], lat)
    with pytest.raises(ValueError, match="image_stream"):
        image_stream_latents(lat, "all", 5)
    with pytest.raises(ValueError, match="num_frames"):
        image_stream_latents(lat, "official", 0)
    with pytest.raises(ValueError, match="image_latent"):
        image_stream_latents(lat[0], "official", 2)


def test_pipeline_official_stream_equals_official_denoise(official_pipe):
    """The pipeline's official stream (guidance 1: the conditional pass alone) on the official
    scheduler is the official loop: the same draws in the same order (F image copies, then the
    step's noise, at every step), the same latents out."""
    pipe, f = official_pipe, 3
    z = torch.randn(1, 4, f, 8, 8, generator=torch.Generator().manual_seed(5))
    img = _image()
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(6))
    null = vb.encode_prompt(pipe.text_encoder, pipe.tokenizer, [""])[0]
    lat = pipe.encode_vae(img[None])
    with torch.no_grad():
        ours = pipe(prompt_embeds=text, image_prompt=img, num_frames=f, height=16, width=16, num_inference_steps=2,
                    guidance_scale=1.0, latents=z, generator=torch.Generator().manual_seed(7), output_type="latent",
                    image_stream="official").frames
        theirs = official_denoise(pipe.backbone, official_scheduler(2), z, text, null, lat, guidance_scale=1.0,
                                  image_frames=f, generator=torch.Generator().manual_seed(7))
        one = pipe(prompt_embeds=text, image_prompt=img, num_frames=f, height=16, width=16, num_inference_steps=2,
                   guidance_scale=1.0, latents=z, generator=torch.Generator().manual_seed(7), output_type="latent",
                   image_stream="one").frames
        default = pipe(prompt_embeds=text, image_prompt=img, num_frames=f, height=16, width=16, num_inference_steps=2,
                       guidance_scale=1.0, latents=z, generator=torch.Generator().manual_seed(7),
                       output_type="latent").frames
    assert rel(ours, theirs) < 1e-5
    assert torch.equal(default, ours)  # the official preset's saved stream is the official one
    assert rel(one, theirs) > 1e-3     # the one-copy stream is another estimator


def test_streams_agree_when_the_copies_are_identical(official_pipe):
    """With the clean latent (every copy identical) the F-copy stream equals the one-copy stream
    on the official architecture (clip norms and temporal layers over identical frames). DDIM
    (eta 0): no step noise, so the streams' different generator use does not enter."""
    from diffusers import DDIMScheduler

    pipe = vb.VideoBoothPipeline(**{**official_pipe.components, "scheduler": DDIMScheduler(clip_sample=False)})
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(prompt_embeds=torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(6)), image_prompt=_image(),
              num_frames=3, height=16, width=16, num_inference_steps=2, guidance_scale=1.0, latents=z,
              output_type="latent", noise_image_latents=False)
    with torch.no_grad():
        one = pipe(**kw, generator=torch.Generator().manual_seed(7), image_stream="one").frames
        official = pipe(**kw, generator=torch.Generator().manual_seed(7), image_stream="official").frames
    assert rel(official, one) < 1e-5


def test_pipeline_refuses_bad_streams(official_pipe):
    kw = dict(prompt_embeds=torch.randn(1, 77, 32), image_prompt=_image(), num_frames=2, height=16, width=16,
              num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="image_stream"):
        official_pipe(**kw, image_stream="copies")
    dit = vb.build_tiny_videobooth("dit").pipeline()
    dit.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="image_stream: 'official'"):
        dit("a dog", "dog", image_prompt=_image(), num_frames=2, num_inference_steps=1, output_type="latent",
            image_stream="official")


def test_research_pipeline_official_stream_draws_fresh_noise_per_step():
    """On the research preset the official stream runs (the copies through the temporal layers)
    and differs from the one-copy stream; the same seed gives the same video."""
    pipe = vb.build_tiny_videobooth("unet").pipeline()
    pipe.set_progress_bar_config(disable=True)
    bb = pipe.backbone
    with torch.no_grad():  # zero-initialised temporal outputs made random: the copies interact
        for n, p in bb.named_parameters():
            if "vb_temporal" in n and not p.any():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    kw = dict(image_prompt=_image(), num_frames=2, num_inference_steps=2, output_type="latent", guidance_scale=1.0)
    a = pipe("a dog", "dog", **kw, generator=torch.Generator().manual_seed(0), image_stream="official").frames
    b = pipe("a dog", "dog", **kw, generator=torch.Generator().manual_seed(0), image_stream="official").frames
    c = pipe("a dog", "dog", **kw, generator=torch.Generator().manual_seed(0), image_stream="one").frames
    assert torch.equal(a, b) and rel(a, c) > 1e-4


def _task(tmp_path, **model):
    from vb_train.config import TrainConfig
    from vb_train.registry import build_task

    cfg = TrainConfig(task="videobooth", stage=2, seed=0, output_dir=str(tmp_path / "run"),
                      model=dict(model), data={"root": str(tmp_path / "data"), "num_frames": 2, "size": 16,
                                               "image_size": 32})
    return build_task(cfg)


def test_task_official_stream_feeds_f_noised_copies(tmp_path, monkeypatch):
    """model.image_stream: official: the backbone gets (B, C, F, h, w), the copies noised with
    different draws at the video's timestep; the backbone keeps the stream (the pipeline samples
    with it); bad values are refused naming the key."""
    task = _task(tmp_path, image_stream="official")
    assert task.image_stream == "official" and task.backbone.image_stream == "official"
    seen = {}
    real = type(task.backbone).forward

    def spy(self, sample, timestep, text=None, **kw):
        seen["image"] = kw.get("image_latents")
        return real(self, sample, timestep, text, **kw)

    monkeypatch.setattr(type(task.backbone), "forward", spy)
    b, f = 2, 2
    batch = {"video": torch.rand(b, f, 3, 16, 16) * 2 - 1, "image": torch.rand(b, 3, 32, 32) * 2 - 1,
             "caption": ["a dog runs", "a cat sits"], "subject": ["dog", "cat"],
             "drop_text": torch.zeros(b, dtype=torch.bool)}
    noisy = torch.randn(b, 4, f, 8, 8)
    with torch.no_grad():
        task.predict(noisy, torch.tensor([900, 900]), batch, torch.Generator().manual_seed(0))
    img = seen["image"]
    assert img.shape == (b, 4, f, 8, 8)
    assert rel(img[:, :, 0], img[:, :, 1]) > 0.5  # each copy its own draw (t = 900: mostly noise)
    one = _task(tmp_path, image_stream="one")
    assert one.backbone.image_stream == "one"
    with torch.no_grad():
        one.predict(noisy, torch.tensor([900, 900]), batch, torch.Generator().manual_seed(0))
    assert seen["image"].shape == (b, 4, 8, 8)
    with pytest.raises(ValueError, match="model.image_stream"):
        _task(tmp_path, image_stream="all")


def test_official_stage2_config_trains_the_official_stream():
    from pathlib import Path

    from vb_train.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "official_stage2.yaml")
    assert cfg.model["image_stream"] == "official"
