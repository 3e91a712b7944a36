"""VideoBoothPipeline end to end on CPU with tiny random components; frames export to GIF."""
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.utils import export_to_gif

import vb

KW = dict(num_frames=3, height=16, width=16, num_inference_steps=2)


@pytest.fixture(scope="module", params=["unet", "dit"])
def pipe(request):
    p = vb.build_tiny_videobooth(request.param).pipeline()
    p.set_progress_bar_config(disable=True)
    # Off the zero-initialised start (adaLN-Zero, zero temporal outputs), where every
    # prediction is the same and guidance modes could not differ.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in p.backbone.parameters():
            w.add_(torch.randn(w.shape, generator=g) * 0.05)
    return p


def subject_on_white(size=24):
    """A red disc on white, with a transparent corner (becomes white)."""
    yy, xx = np.mgrid[:size, :size]
    rgba = np.full((size, size, 4), 255, np.uint8)
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    rgba[disc, 1:3] = 0
    rgba[:3, :3, 3] = 0
    return PIL.Image.fromarray(rgba, "RGBA")


def test_end_to_end_frames_export_to_gif(pipe, tmp_path):
    out = pipe("a photo of a dog on the beach", "dog", subject_on_white(), generator=torch.manual_seed(0), **KW)
    frames = out.frames
    assert len(frames) == 1 and len(frames[0]) == 3
    assert all(isinstance(f, PIL.Image.Image) and f.size == (16, 16) for f in frames[0])
    path = export_to_gif(frames[0], str(tmp_path / "video.gif"))
    with PIL.Image.open(path) as gif:
        assert gif.n_frames == 3


def test_frames_export_to_video(pipe, tmp_path):
    pytest.importorskip("imageio_ffmpeg", reason="export_to_video needs imageio + imageio-ffmpeg (the train extra)")
    from diffusers.utils import export_to_video

    frames = pipe("a dog", "dog", torch.rand(3, 16, 16), output_type="np", **KW).frames
    path = export_to_video(list(frames[0]), str(tmp_path / "video.mp4"), fps=4)  # 16x16: a whole macroblock
    assert (tmp_path / "video.mp4").stat().st_size > 0 and path.endswith(".mp4")


@pytest.mark.parametrize("output_type,shape", [("np", (2, 3, 16, 16, 3)), ("pt", (2, 3, 3, 16, 16)),
                                               ("latent", (2, 4, 3, 8, 8))])
def test_output_types_and_batching(pipe, output_type, shape):
    images = torch.rand(2, 3, 20, 20)
    out = pipe(["a dog on grass", "my teddybear in the snow"], ["dog", "teddybear"], images,
               output_type=output_type, generator=torch.manual_seed(0), **KW).frames
    assert tuple(out.shape) == shape
    if output_type != "latent":
        assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_seeded_runs_repeat_and_guidance_modes_differ(pipe):
    args = ("a dog on grass", "dog", torch.rand(3, 16, 16, generator=torch.manual_seed(3)))
    a = pipe(*args, output_type="latent", generator=torch.manual_seed(0), **KW).frames
    b = pipe(*args, output_type="latent", generator=torch.manual_seed(0), **KW).frames
    grey = pipe(*args, output_type="latent", uncond_image="grey", generator=torch.manual_seed(0), **KW).frames
    nocfg = pipe(*args, output_type="latent", guidance_scale=1.0, generator=torch.manual_seed(0), **KW).frames
    assert torch.equal(a, b)
    assert grey.shape == a.shape and not torch.allclose(a, grey) and not torch.allclose(a, nocfg)


def test_image_branch_once_per_sample_per_step(pipe):
    """Per denoising step: the conditional pass runs the image branch once on B images;
    the unconditional pass (paper's mode) runs no image branch at all."""
    attn1 = next(m for n, m in pipe.backbone.named_modules() if n.endswith("attn1"))
    batches = []
    h = attn1.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    try:
        pipe(["a dog", "a dog"], "dog", torch.rand(3, 16, 16), output_type="latent", **KW)
    finally:
        h.remove()
    b, f = 2, 3
    assert batches == [b, b * f, b * f] * KW["num_inference_steps"]


@pytest.mark.parametrize("kwargs,match,exc", [
    (dict(num_frames=0), "num_frames", ValueError),
    (dict(height=15), "height", ValueError),
    (dict(width=-16), "width", ValueError),
    (dict(num_inference_steps=0), "num_inference_steps", ValueError),
    (dict(guidance_scale="7"), "guidance_scale", TypeError),
    (dict(uncond_image="black"), "uncond_image", ValueError),
    (dict(output_type="gif"), "output_type", ValueError),
    (dict(subject_word="cat"), "subject_word", ValueError),
    (dict(subject_word=["dog", "dog"]), "subject_word", ValueError),
    (dict(image_prompt=torch.rand(3, 8, 8) * 4), "image_prompt", ValueError),
    (dict(image_prompt=torch.rand(1, 8, 8)), "image_prompt", ValueError),
    (dict(image_prompt="dog.png"), "image_prompt", TypeError),
    (dict(prompt=3), "prompt", TypeError),
    (dict(latents=torch.randn(1, 4, 2, 8, 8)), "latents", ValueError),
])
def test_bad_input_names_the_argument(pipe, kwargs, match, exc):
    args = dict(prompt="a dog", subject_word="dog", image_prompt=torch.rand(3, 16, 16), **KW)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        pipe(**args)


def test_adapter_through_the_pipeline(pipe, tmp_path):
    pipe.save_adapter(str(tmp_path))
    state = {k: v.clone() for k, v in pipe.backbone.adapter_state_dict().items()}
    with torch.no_grad():
        for v in pipe.backbone.adapter_state_dict().values():
            v.mul_(0.5)
    pipe.load_adapter(str(tmp_path / "videobooth_adapter.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in pipe.backbone.adapter_state_dict().items())
