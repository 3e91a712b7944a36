"""vb_train.metrics on tiny random encoders (nothing downloaded) and hand-made videos."""
import math

import numpy as np
import pytest
import torch

from vb_train import metrics as M
from vb_train.toy.synthetic import render_clip


@pytest.fixture(scope="module")
def clip():
    return M.tiny_clip_encoder(seed=0)


@pytest.fixture(scope="module")
def dino():
    return M.tiny_dino_encoder(seed=0)


def _video(f=4, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(f, 3, h, w, generator=g) * 2 - 1


def _clip_of(identity, seed=0, size=32, frames=4):
    """A lossless synthetic clip (F, 3, S, S) and its subject-on-white prompt (3, S, S)."""
    c = render_clip(np.random.default_rng(seed), identity, size=size, num_frames=frames)
    video = torch.from_numpy(c["frames"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    x1, y1, x2, y2 = (int(v) for v in c["box"])
    crop = video[0, :, y1:y2, x1:x2].clone()
    crop[:, ~torch.from_numpy(c["mask0"][y1:y2, x1:x2])] = 1.0
    side = max(crop.shape[1:])
    prompt = torch.ones(3, side, side)
    prompt[:, :crop.shape[1], :crop.shape[2]] = crop
    return video, prompt


# --------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------
def test_encoders_shapes_normalised_and_deterministic(clip, dino):
    v = _video(5, 40, 24)
    fi = clip.encode_image(v)
    ft = clip.encode_text(["a red star", "a blue circle moving left"])
    fd = dino.encode_image(v)
    assert fi.shape == (5, 32) and ft.shape == (2, 32) and fd.shape == (5, 32)
    for f in (fi, ft, fd):
        assert f.dtype == torch.float32
        assert torch.allclose(f.norm(dim=-1), torch.ones(len(f)), atol=1e-5)
    assert torch.allclose(M.tiny_clip_encoder(seed=0).encode_image(v), fi)
    assert not torch.allclose(M.tiny_clip_encoder(seed=1).encode_image(v), fi)
    assert isinstance(clip, M.ImageEncoder) and isinstance(clip, M.TextEncoder)


def test_tiny_encoders_leave_global_rng_alone():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    M.tiny_clip_encoder(seed=5)
    M.tiny_dino_encoder(seed=5)
    assert torch.equal(torch.rand(3), a)


# --------------------------------------------------------------------------------------------
# metrics: identical inputs give the maximum
# --------------------------------------------------------------------------------------------
def test_identical_inputs_give_one(clip, dino):
    img = _video(1, 32, 32)[0]
    still = img[None].repeat(4, 1, 1, 1)
    assert M.clip_i(still, img, clip) == pytest.approx(1.0, abs=1e-5)
    assert M.dino_i(still, img, dino) == pytest.approx(1.0, abs=1e-5)
    assert M.temporal_consistency(still, clip) == pytest.approx(1.0, abs=1e-5)
    assert M.temporal_consistency(still, dino) == pytest.approx(1.0, abs=1e-5)
    assert M.color_identity(still, img) == pytest.approx(1.0, abs=1e-6)
    sims = M.frame_similarities(_video(3, 32, 32, seed=1), img, clip)
    assert sims.shape == (3,) and torch.all(sims <= 1 + 1e-6) and torch.all(sims >= -1 - 1e-6)
    t = M.clip_t(still, "a red striped star moving left", clip)
    assert isinstance(t, float) and -1 <= t <= 1


def test_color_identity_tells_subjects_apart():
    video, prompt = _clip_of(("square", "solid", "red"))
    _, blue = _clip_of(("square", "solid", "blue"), seed=1)
    _, striped = _clip_of(("square", "striped", "red"), seed=2)
    same = M.color_identity(video, prompt)
    assert same > 0.9
    assert M.color_identity(video, blue) < 0.2
    assert M.color_identity(video, striped) < same - 0.2  # the pattern's colours count
    # the background does not count against a subject that moves over it
    video2, prompt2 = _clip_of(("square", "solid", "red"), seed=3)
    assert M.color_identity(video2, prompt) > 0.9
    # a big prompt (as real ones are) is scored the same way
    big = torch.nn.functional.interpolate(prompt[None], size=96, mode="nearest")[0]
    assert M.color_identity(video, big) > 0.85
    with pytest.raises(ValueError, match="image_prompt"):
        M.color_identity(video, torch.ones(3, 16, 16))


# --------------------------------------------------------------------------------------------
# per video, many videos, aggregation
# --------------------------------------------------------------------------------------------
def test_video_metrics_per_video(clip, dino):
    m = M.VideoMetrics(clip=clip, dino=dino)
    video, prompt = _clip_of(("star", "dotted", "green"), frames=3)
    row = m(video, prompt, "a green dotted star moving up")
    assert set(row) == {"clip_i", "clip_t", "temporal_clip", "dino_i", "temporal_dino", "color_id"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in row.values())
    # the shared-feature path gives what the single metrics give
    assert row["clip_i"] == pytest.approx(M.clip_i(video, prompt, clip), abs=1e-6)
    assert row["clip_t"] == pytest.approx(M.clip_t(video, "a green dotted star moving up", clip),
                                          abs=1e-6)
    assert row["dino_i"] == pytest.approx(M.dino_i(video, prompt, dino), abs=1e-6)
    # without a prompt or caption those metrics are left out; one frame has no temporal one
    assert set(m(video)) == {"temporal_clip", "temporal_dino"}
    assert set(m(video[:1], prompt)) == {"clip_i", "dino_i", "color_id"}
    assert set(M.VideoMetrics()(video, prompt)) == {"color_id"}


def test_evaluate_and_aggregate(clip):
    m = M.VideoMetrics(clip=clip)
    videos = [_video(3, 32, 32, seed=s) for s in range(3)]
    prompts = [v[0] for v in videos]
    rows = m.evaluate(videos, prompts, ["a", "b", "c"])
    assert len(rows) == 3 and all("clip_i" in r for r in rows)
    agg = M.aggregate(rows)
    vals = torch.tensor([r["clip_i"] for r in rows], dtype=torch.float64)
    assert agg["clip_i"]["n"] == 3
    assert agg["clip_i"]["mean"] == pytest.approx(float(vals.mean()))
    assert agg["clip_i"]["std"] == pytest.approx(float(vals.std()))
    # a batched (B, F, 3, H, W) tensor works as well
    assert m.evaluate(torch.stack(videos), torch.stack(prompts)) == m.evaluate(videos, prompts)

    agg = M.aggregate([{"a": 1.0}, {"a": 3.0, "b": 2.0}, {"a": float("nan")}])
    assert agg["a"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.0)), "n": 2}
    assert agg["b"] == {"mean": 2.0, "std": 0.0, "n": 1}
    table = M.format_table({"with image": agg, "text only": {"a": agg["a"]}})
    lines = table.splitlines()
    assert lines[0] == "| arm | n | a | b |"
    assert lines[2] == "| with image | 2 | 2.000 ± 1.414 | 2.000 ± 0.000 |"
    assert lines[3] == "| text only | 2 | 2.000 ± 1.414 | - |"


def test_injected_encoder():
    class MeanColour:
        """A toy image encoder: the mean colour plus a constant (so it is never zero)."""

        def encode_image(self, images):
            return torch.cat([images.mean((2, 3)), torch.ones(len(images), 1)], 1)

    red = torch.tensor([1.0, -1, -1]).view(3, 1, 1).expand(3, 8, 8)
    video = red[None].repeat(2, 1, 1, 1)
    row = M.VideoMetrics(dino=MeanColour(), color=False)(video, red)
    assert row == {"dino_i": pytest.approx(1.0), "temporal_dino": pytest.approx(1.0)}
    with pytest.raises(TypeError, match="clip"):
        M.VideoMetrics(clip=MeanColour())  # no encode_text


def test_bad_inputs(clip):
    v = _video(2, 16, 16)
    with pytest.raises(ValueError, match="video"):
        M.clip_i(v[0], v[0], clip)
    with pytest.raises(TypeError, match="video"):
        M.clip_i((v * 127 + 128).to(torch.uint8), v[0], clip)
    with pytest.raises(ValueError, match=r"video: values must be in \[-1, 1\]"):
        M.temporal_consistency(v * 100, clip)
    with pytest.raises(ValueError, match="image_prompt"):
        M.clip_i(v, v, clip)
    with pytest.raises(TypeError, match="caption"):
        M.clip_t(v, ["a", "b"], clip)
    with pytest.raises(ValueError, match="F >= 2"):
        M.temporal_consistency(v[:1], clip)
    with pytest.raises(TypeError, match="encoder"):
        M.clip_i(v, v[0], None)
    with pytest.raises(ValueError, match="captions"):
        M.VideoMetrics(clip=clip).evaluate([v, v], None, ["only one"])
    with pytest.raises(ValueError, match="video"):
        M.VideoMetrics()(torch.full((2, 3, 4, 4), float("nan")))
