"""Evaluation metrics for image-prompted video generation.

Per video (F frames), each a float; aggregated over videos as mean, std and n:

- ``clip_i``  CLIP-I: mean over frames of cos(CLIP(frame), CLIP(image prompt)).
- ``clip_t``  CLIP-T: mean over frames of cos(CLIP(frame), CLIP-text(caption)). Raw cosine,
  not the 100x / 2.5x scaled CLIPScore variants.
- ``dino_i``  DINO: mean over frames of cos(DINO(frame), DINO(image prompt)), DINO = timm
  ``vit_small_patch16_224.dino`` CLS token (the DreamBooth DINO metric).
- ``temporal_clip`` / ``temporal_dino``  temporal consistency: mean over f of
  cos(E(frame f), E(frame f+1)). Needs F >= 2; left out for one-frame videos.
- ``color_id``  colour identity, no CLIP and no learned features (`color_identity`): how well
  some window of each frame matches the colour distribution of the subject in the image
  prompt, relative to how well the prompt matches itself. At toy scale, where the synthetic
  subjects are colour + pattern, it is the most direct identity check; DINO is the other
  CLIP-free identity metric.

Inputs everywhere: a video is float (F, 3, H, W) in [-1, 1]; an image prompt is float (3, S, S)
(any H, W) in [-1, 1], the subject on white; a caption is a str. Encoders resize (shorter side,
then centre crop) and normalise internally.

Encoders are objects, so tests and users can inject their own: anything with
``encode_image(images (N, 3, H, W) in [-1, 1]) -> (N, D)`` (and ``encode_text(list[str]) ->
(N, D)`` for CLIP-T) works. `ClipEncoder.from_pretrained` and `DinoEncoder.from_pretrained`
load the real backbones with pretrained weights (downloads on first use);
`tiny_clip_encoder` / `tiny_dino_encoder` build tiny random ones that load nothing (their
numbers mean nothing; they exist for tests).

Example::

    m = VideoMetrics(clip=ClipEncoder.from_pretrained(), dino=DinoEncoder.from_pretrained())
    rows = m.evaluate(videos, image_prompts, captions)        # one dict per video
    print(format_table({"with image": aggregate(rows)}))
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "ClipEncoder", "DinoEncoder", "ImageEncoder", "TextEncoder", "VideoMetrics",
    "aggregate", "clip_i", "clip_t", "color_histograms", "color_identity", "dino_i",
    "format_table", "frame_similarities", "temporal_consistency", "tiny_clip_encoder",
    "tiny_dino_encoder", "two_tone_colours_of", "two_tone_order", "two_tone_order_soft",
]


@runtime_checkable
class ImageEncoder(Protocol):
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, D) features (need not be normalised)."""


@runtime_checkable
class TextEncoder(Protocol):
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """N captions -> (N, D) features in the image features' space."""


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _check_images(x, name: str, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    want = "(F, 3, H, W)" if ndim == 4 else "(3, H, W)"
    if x.ndim != ndim or x.shape[-3] != 3 or x.shape[-1] < 1 or x.shape[-2] < 1:
        raise ValueError(f"{name}: expected {want}, got {tuple(x.shape)}")
    if ndim == 4 and x.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one frame, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype with values in [-1, 1], got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    # a small slack for resampling overshoot; [0, 255] or [0, 1]-with-no-negatives inputs
    # cannot be told apart from dark images, but [0, 255] can
    if lo < -1.01 or hi > 1.01:
        raise ValueError(f"{name}: values must be in [-1, 1], got [{lo:.3g}, {hi:.3g}]")
    return x


def _preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[-1, 1] (N, 3, H, W) -> normalised (N, 3, size, size): shorter side to `size`
    (bicubic, antialiased), centre crop, (x - mean) / std."""
    x = (images.float() + 1.0) * 0.5
    h, w = x.shape[-2:]
    k = size / min(h, w)
    nh, nw = max(size, round(h * k)), max(size, round(w * k))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------
class _ImageEncoder:
    """What the image encoders share: preprocessing ([-1, 1] -> resize, centre crop, normalise),
    batching, L2-normalised float32 outputs. Subclasses give `_image_features`."""

    def __init__(self, model: torch.nn.Module, *, image_size: int, mean, std, batch_size: int):
        self.model = model.eval()
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size = int(batch_size)

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, D) unit vectors."""
        dev = _model_device(self.model)
        out = []
        for chunk in images.split(self.batch_size):
            x = _preprocess(chunk.to(dev), self.image_size, self.mean, self.std)
            out.append(F.normalize(self._image_features(x).float(), dim=-1))
        return torch.cat(out)


class ClipEncoder(_ImageEncoder):
    """An open_clip model as image and text encoder. Outputs are L2-normalised float32.

    Args:
        model: an `open_clip.CLIP` (anything with encode_image / encode_text).
        tokenizer: callable list[str] -> LongTensor (N, context_length).
        image_size: the model's input side.
        mean, std: input normalisation (OpenAI CLIP's by default).
        batch_size: frames per forward pass.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, image_size: int = 224,
                 mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, batch_size: int = 64):
        if not hasattr(model, "encode_image") or not hasattr(model, "encode_text"):
            raise TypeError("model: expected an open_clip model with encode_image/encode_text")
        if not callable(tokenizer):
            raise TypeError("tokenizer: expected a callable list[str] -> LongTensor")
        super().__init__(model, image_size=image_size, mean=mean, std=std, batch_size=batch_size)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, model_name: str = "ViT-B-32", pretrained: str = "openai",
                        device: str | torch.device | None = None, **kw) -> "ClipEncoder":
        """Load an open_clip model with pretrained weights (downloaded on first use).
        pretrained=None builds the same architecture with random weights."""
        import open_clip

        model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD
        return cls(model, open_clip.get_tokenizer(model_name), image_size=size, mean=mean,
                   std=std, **kw)

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """N captions -> (N, D) unit vectors."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: expected a list of str")
        tokens = self.tokenizer(list(texts)).to(_model_device(self.model))
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


class DinoEncoder(_ImageEncoder):
    """A timm ViT (DINO) as image encoder: the pooled (CLS) feature, L2-normalised float32.

    Args:
        model: a timm model built with num_classes=0 (forward returns (N, D) features).
        image_size, mean, std: its input side and normalisation (ImageNet's by default).
    """

    def __init__(self, model: torch.nn.Module, *, image_size: int = 224, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, batch_size: int = 64):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        super().__init__(model, image_size=image_size, mean=mean, std=std, batch_size=batch_size)

    @classmethod
    def from_pretrained(cls, name: str = "vit_small_patch16_224.dino",
                        device: str | torch.device | None = None, *, pretrained: bool = True,
                        **kw) -> "DinoEncoder":
        """Load a timm model with pretrained weights (downloaded on first use).
        pretrained=False builds the same architecture with random weights."""
        import timm

        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
        if device is not None:
            model = model.to(device)
        cfg = timm.data.resolve_model_data_config(model)
        return cls(model, image_size=cfg["input_size"][-1], mean=cfg["mean"], std=cfg["std"], **kw)

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model(x)
        return feats[:, 0] if feats.ndim == 3 else feats  # a model that returns tokens: its CLS token


def tiny_clip_encoder(seed: int = 0, image_size: int = 32, embed_dim: int = 32,
                      context_length: int = 32) -> ClipEncoder:
    """A random, tiny open_clip CLIP (1 layer each tower, width 32) with open_clip's bundled
    BPE tokenizer. Nothing is downloaded. For tests: its similarities are meaningless."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from open_clip.tokenizer import SimpleTokenizer

    # open_clip initialises from the global generator: seed it inside a fork, so the caller's
    # random state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(
            embed_dim=embed_dim,
            vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                     image_size=image_size),
            text_cfg=CLIPTextCfg(context_length=context_length, vocab_size=49408, width=32,
                                 heads=2, layers=1),
        )
    return ClipEncoder(model, SimpleTokenizer(context_length=context_length),
                       image_size=image_size)


def tiny_dino_encoder(seed: int = 0, image_size: int = 32) -> DinoEncoder:
    """A random, tiny timm ViT (patch 8, width 32, 1 block), pretrained=False. For tests."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(img_size=image_size, patch_size=8, embed_dim=32, depth=1,
                                  num_heads=2, num_classes=0)
    return DinoEncoder(model, image_size=image_size)


# --------------------------------------------------------------------------------------------
# feature metrics
# --------------------------------------------------------------------------------------------
def _encoder(enc, name: str, text: bool = False):
    need = "encode_text" if text else "encode_image"
    if enc is None or not callable(getattr(enc, need, None)):
        raise TypeError(f"{name}: expected an encoder with {need}(), got {type(enc).__name__}")
    return enc


def frame_similarities(video: torch.Tensor, image: torch.Tensor, encoder) -> torch.Tensor:
    """cos(E(frame f), E(image)) for every frame: float32 (F,) on the CPU."""
    _check_images(video, "video", 4)
    _check_images(image, "image_prompt", 3)
    enc = _encoder(encoder, "encoder")
    fv = F.normalize(enc.encode_image(video).float(), dim=-1)
    fi = F.normalize(enc.encode_image(image[None]).float(), dim=-1)
    return (fv @ fi[0]).cpu()


def clip_i(video: torch.Tensor, image_prompt: torch.Tensor, encoder: ClipEncoder) -> float:
    """CLIP-I: mean over frames of cos(CLIP(frame), CLIP(image prompt)); 1 = identical."""
    return float(frame_similarities(video, image_prompt, encoder).mean())


def dino_i(video: torch.Tensor, image_prompt: torch.Tensor, encoder: DinoEncoder) -> float:
    """DINO: mean over frames of cos(DINO(frame), DINO(image prompt)); 1 = identical."""
    return float(frame_similarities(video, image_prompt, encoder).mean())


def clip_t(video: torch.Tensor, caption: str, encoder: ClipEncoder) -> float:
    """CLIP-T: mean over frames of cos(CLIP(frame), CLIP-text(caption))."""
    _check_images(video, "video", 4)
    if not isinstance(caption, str):
        raise TypeError(f"caption: expected a str, got {type(caption).__name__}")
    enc = _encoder(encoder, "encoder", text=True)
    fv = F.normalize(enc.encode_image(video).float(), dim=-1)
    ft = F.normalize(enc.encode_text([caption]).float(), dim=-1)
    return float((fv @ ft[0]).mean())


def temporal_consistency(video: torch.Tensor, encoder) -> float:
    """Mean over f of cos(E(frame f), E(frame f+1)); 1 = a still video. Needs F >= 2."""
    _check_images(video, "video", 4)
    if video.shape[0] < 2:
        raise ValueError(f"video: temporal consistency needs F >= 2 frames, got {video.shape[0]}")
    fv = F.normalize(_encoder(encoder, "encoder").encode_image(video).float(), dim=-1)
    return float((fv[:-1] * fv[1:]).sum(-1).mean())


# --------------------------------------------------------------------------------------------
# colour identity (no CLIP, no learned features)
# --------------------------------------------------------------------------------------------
def color_histograms(images: torch.Tensor, bins: int = 4) -> torch.Tensor:
    """Per-pixel soft RGB bin memberships: (N, 3, H, W) in [0, 1] -> (N, bins**3, H, W).

    Each channel value is shared linearly between its two nearest bin centres (so a colour
    near a bin edge does not flip bins under small shifts, as from video coding); the joint
    membership is the product over channels and sums to 1 per pixel.
    """
    pos = (images * bins - 0.5).clamp(0, bins - 1)  # (N, 3, H, W) in bin-centre units
    centres = torch.arange(bins, dtype=images.dtype, device=images.device).view(1, 1, bins, 1, 1)
    w = (1.0 - (pos[:, :, None] - centres).abs()).clamp_min(0)  # (N, 3, bins, H, W)
    r, g, b = w[:, 0], w[:, 1], w[:, 2]
    joint = r[:, :, None, None] * g[:, None, :, None] * b[:, None, None, :]  # (N, b, b, b, H, W)
    return joint.flatten(1, 3)


def color_identity(video: torch.Tensor, image_prompt: torch.Tensor, *, bins: int = 4,
                   window_fracs: Sequence[float] = (0.2, 0.25, 0.3, 0.375, 0.45, 0.55, 0.7,
                                                    0.85, 1.0),
                   white_threshold: float = 0.94, work_size: int = 64,
                   prompt_size: int = 32) -> float:
    """Colour-histogram identity of the subject across the video, in [0, 1].

    1. The subject histogram p: the soft RGB histogram (`bins` per channel,
       `color_histograms`) of the prompt's subject pixels, after resizing the prompt to
       `prompt_size` (about the size of a subject in the downsampled frames: resampling mixes
       colours, so both sides are compared at a similar resolution). Subject pixels: not
       white (white: every channel >= white_threshold, in [0, 1]), eroded by one pixel, as the
       edge pixels are blends with white that frames do not have.
    2. A window's score is the histogram intersection sum_b min(p_b, h_b), h = the window's
       histogram divided by its area: pixels of colours the subject lacks count against it,
       so no window scores high by holding a few subject-coloured pixels. A frame's score is
       its best square window, over sides `window_fracs` of its shorter side, every position.
    3. The reference r is the same best-window score of the prompt against itself (a subject
       seldom fills its square: a circle fills 79 %, a star less). The frame score over r,
       clipped to 1, averaged over frames, is the result.

    1 means some window of every frame matches the subject's colours as well as the prompt
    does itself; identical frames and prompt give exactly 1 (when the prompt is no larger than
    `prompt_size`). Colour, and the proportions a pattern gives (stripes of two colours),
    count; shape and layout do not. Frames are first downsampled (area) so that their shorter
    side is at most `work_size`, which bounds the cost.
    """
    _check_images(video, "video", 4)
    _check_images(image_prompt, "image_prompt", 3)
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins: expected a positive int, got {bins!r}")
    if not window_fracs or not all(0 < f <= 1 for f in window_fracs):
        raise ValueError(f"window_fracs: expected fractions in (0, 1], got {window_fracs!r}")
    for name, v in (("work_size", work_size), ("prompt_size", prompt_size)):
        if not isinstance(v, int) or v < 4:
            raise ValueError(f"{name}: expected an int >= 4, got {v!r}")

    def to_unit(x: torch.Tensor, limit: int) -> torch.Tensor:
        x = ((x.detach().float().cpu() + 1.0) * 0.5).clamp(0, 1)
        h, w = x.shape[-2:]
        if min(h, w) > limit:
            z = limit / min(h, w)
            x = F.interpolate(x, size=(max(1, round(h * z)), max(1, round(w * z))), mode="area")
        return x

    prompt = to_unit(image_prompt[None], prompt_size)
    frames = to_unit(video, work_size)
    fg = (prompt < white_threshold).any(1, keepdim=True).float()
    if fg.sum() == 0:
        raise ValueError("image_prompt: every pixel is white; there is no subject to match")
    eroded = -F.max_pool2d(-fg, 3, stride=1, padding=1)
    if eroded.sum() > 0:  # a subject thinner than 3 px keeps its edge pixels
        fg = eroded
    mem_p = color_histograms(prompt, bins)
    p = (mem_p * fg).sum((0, 2, 3))
    p = p / p.sum()
    ref = _best_window_score(mem_p, p, window_fracs)[0]
    scores = _best_window_score(color_histograms(frames, bins), p, window_fracs)
    return float((scores / ref.clamp_min(1e-8)).clamp(max=1.0).mean())


def two_tone_colours_of(image_prompt: torch.Tensor, *, white_threshold: float = 0.94,
                        band: float = 1 / 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The (upper, lower) colours of a two-tone subject on white: the per-channel medians of
    the subject pixels (not white) in the top and the bottom `band` of the subject's rows.
    image_prompt: (3, S, S) in [-1, 1]. Returns two (3,) tensors in [0, 1]."""
    _check_images(image_prompt, "image_prompt", 3)
    x = ((image_prompt.detach().float().cpu() + 1) * 0.5).clamp(0, 1)
    subject = (x < white_threshold).any(0)
    rows = torch.nonzero(subject.any(1)).flatten()
    if len(rows) < 2:
        raise ValueError("image_prompt: fewer than 2 rows with subject (non-white) pixels")
    top, bottom = int(rows.min()), int(rows.max())
    k = max(1, round(band * (bottom - top + 1)))
    ys = torch.arange(x.shape[1])[:, None].expand_as(subject)
    up = subject & (ys < top + k)
    low = subject & (ys > bottom - k)
    return x[:, up].median(1).values, x[:, low].median(1).values


def two_tone_order(video: torch.Tensor, image_prompt: torch.Tensor, *, tol: float = 0.3,
                   min_pixels: float = 1.0, separation: float = 1 / 8) -> float:
    """Does the video keep the prompt's arrangement (upper colour over lower colour)? In [-1, 1].

    The prompt's colours A (upper) and B (lower) come from `two_tone_colours_of`. In every
    frame, a pixel counts for A with weight max(0, 1 - |p - A| / tol) when it is nearer A than
    B (RGB in [0, 1], Euclidean), and likewise for B. The frame's score is
    clip((y_B - y_A) / (separation * H), -1, 1), y the weighted mean row of each colour: +1 when
    A sits above B (as in the prompt), -1 when the halves are swapped, 0 when either colour has
    less than `min_pixels` of weight (a frame without both colours says nothing about their
    arrangement). The video's score is the mean over frames. A colour histogram cannot see
    this: (A over B) and (B over A) have the same one.

    video: (F, 3, H, W) in [-1, 1]; image_prompt: (3, S, S) in [-1, 1], the subject on white.
    """
    _check_images(video, "video", 4)
    for name, v in (("tol", tol), ("separation", separation)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name}: expected a positive float, got {v!r}")
    a, b = two_tone_colours_of(image_prompt)
    x = ((video.detach().float().cpu() + 1) * 0.5).clamp(0, 1)          # (F, 3, H, W)
    da = (x - a[None, :, None, None]).norm(dim=1)                        # (F, H, W)
    db = (x - b[None, :, None, None]).norm(dim=1)
    wa = (1 - da / tol).clamp(min=0) * (da < db)
    wb = (1 - db / tol).clamp(min=0) * (db < da)
    ys = torch.arange(x.shape[-2], dtype=torch.float32)[None, :, None]
    na, nb = wa.sum((1, 2)), wb.sum((1, 2))
    ya = (wa * ys).sum((1, 2)) / na.clamp(min=1e-6)
    yb = (wb * ys).sum((1, 2)) / nb.clamp(min=1e-6)
    score = ((yb - ya) / (separation * x.shape[-2])).clamp(-1, 1)
    score = torch.where((na >= min_pixels) & (nb >= min_pixels), score, torch.zeros_like(score))
    return float(score.mean())


def two_tone_order_soft(video: torch.Tensor, image_prompt: torch.Tensor) -> float:
    """A threshold-free order score in [-1, 1]: per frame, the correlation over pixels between
    "nearer A than B" (|p - B| - |p - A|, RGB in [0, 1]) and height (-row); the mean over
    frames. +1 when every pixel nearer A sits above every pixel nearer B in proportion, -1 for
    the swapped arrangement, 0 for a frame where the two are unrelated (or constant). Unlike
    `two_tone_order` no pixel is ever thrown away, so a washed-out subject still counts, and
    backgrounds add a term that cancels in a paired contrast (same noise, swapped prompt).
    video: (F, 3, H, W) in [-1, 1]; image_prompt: (3, S, S) in [-1, 1] (A, B as in
    `two_tone_colours_of`)."""
    _check_images(video, "video", 4)
    a, b = two_tone_colours_of(image_prompt)
    x = ((video.detach().float().cpu() + 1) * 0.5).clamp(0, 1)
    d = ((x - b[None, :, None, None]).norm(dim=1) - (x - a[None, :, None, None]).norm(dim=1)).flatten(1)  # (F, HW)
    up = -torch.arange(x.shape[-2], dtype=torch.float32)[:, None].expand(x.shape[-2:]).flatten()
    d = d - d.mean(1, keepdim=True)
    up = up - up.mean()
    den = d.norm(dim=1) * up.norm()
    r = torch.where(den > 1e-12, (d * up).sum(1) / den.clamp(min=1e-12), torch.zeros_like(den))
    return float(r.mean())


def _best_window_score(mem: torch.Tensor, p: torch.Tensor, fracs: Sequence[float]) -> torch.Tensor:
    """max over square windows (sides `fracs` of the shorter side, every position) of
    sum_b min(p_b, h_b), h = the window's sum of mem over its area: (N,).
    mem: (N, B, H, W) memberships; p: (B,), sums to 1."""
    side = min(mem.shape[-2:])
    # only the bins the subject has matter: min(p_b, h_b) = 0 where p_b = 0
    keep = p > 0
    mem, p = mem[:, keep], p[keep]
    table = F.pad(mem.double().cumsum(-1).cumsum(-2), (1, 0, 1, 0))  # summed-area table
    best = torch.zeros(mem.shape[0], dtype=torch.float64)
    for k in sorted({min(side, max(2, round(f * side))) for f in fracs}):
        t = table
        sums = t[:, :, k:, k:] - t[:, :, :-k, k:] - t[:, :, k:, :-k] + t[:, :, :-k, :-k]
        score = torch.minimum(sums / (k * k), p.double().view(1, -1, 1, 1)).sum(1)
        best = torch.maximum(best, score.flatten(1).amax(1))
    return best.float()


# --------------------------------------------------------------------------------------------
# all of it, per video and aggregated
# --------------------------------------------------------------------------------------------
class VideoMetrics:
    """Every metric whose inputs and encoders are there, per video.

    Args:
        clip: a ClipEncoder (or any image+text encoder): clip_i, clip_t, temporal_clip.
        dino: a DinoEncoder (or any image encoder): dino_i, temporal_dino.
        color: compute color_id (needs only the image prompt). color_kwargs go to
            `color_identity`.
    Without an image prompt the identity metrics are left out; without a caption, clip_t.
    """

    def __init__(self, clip=None, dino=None, *, color: bool = True,
                 color_kwargs: Mapping | None = None):
        if clip is not None:
            _encoder(clip, "clip")
            _encoder(clip, "clip", text=True)
        if dino is not None:
            _encoder(dino, "dino")
        self.clip, self.dino, self.color = clip, dino, bool(color)
        self.color_kwargs = dict(color_kwargs or {})

    def __call__(self, video: torch.Tensor, image_prompt: torch.Tensor | None = None,
                 caption: str | None = None) -> dict[str, float]:
        """Metrics of one video (F, 3, H, W): {name: value}."""
        _check_images(video, "video", 4)
        if image_prompt is not None:
            _check_images(image_prompt, "image_prompt", 3)
        if caption is not None and not isinstance(caption, str):
            raise TypeError(f"caption: expected a str or None, got {type(caption).__name__}")
        out: dict[str, float] = {}
        many = video.shape[0] >= 2
        if self.clip is not None:
            # one pass over the frames, shared by the three CLIP metrics
            fv = F.normalize(self.clip.encode_image(video).float(), dim=-1).cpu()
            if image_prompt is not None:
                fi = F.normalize(self.clip.encode_image(image_prompt[None]).float(), dim=-1).cpu()
                out["clip_i"] = float((fv @ fi[0]).mean())
            if caption is not None:
                ft = F.normalize(self.clip.encode_text([caption]).float(), dim=-1).cpu()
                out["clip_t"] = float((fv @ ft[0]).mean())
            if many:
                out["temporal_clip"] = float((fv[:-1] * fv[1:]).sum(-1).mean())
        if self.dino is not None:
            fv = F.normalize(self.dino.encode_image(video).float(), dim=-1).cpu()
            if image_prompt is not None:
                fi = F.normalize(self.dino.encode_image(image_prompt[None]).float(), dim=-1).cpu()
                out["dino_i"] = float((fv @ fi[0]).mean())
            if many:
                out["temporal_dino"] = float((fv[:-1] * fv[1:]).sum(-1).mean())
        if self.color and image_prompt is not None:
            out["color_id"] = color_identity(video, image_prompt, **self.color_kwargs)
        return out

    def evaluate(self, videos: Iterable[torch.Tensor],
                 image_prompts: Iterable[torch.Tensor | None] | None = None,
                 captions: Iterable[str | None] | None = None,
                 progress: bool = False) -> list[dict[str, float]]:
        """Metrics of many videos: one dict per video, in order.

        videos: a list of (F, 3, H, W) tensors or one (B, F, 3, H, W) tensor; image_prompts
        and captions likewise (or None), one per video.
        """
        videos = list(videos)
        n = len(videos)
        prompts = [None] * n if image_prompts is None else list(image_prompts)
        caps = [None] * n if captions is None else list(captions)
        if isinstance(captions, str):
            raise TypeError("captions: expected one str per video, got a single str")
        if len(prompts) != n:
            raise ValueError(f"image_prompts: expected {n} (one per video), got {len(prompts)}")
        if len(caps) != n:
            raise ValueError(f"captions: expected {n} (one per video), got {len(caps)}")
        it = range(n)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="metrics", unit="video")
        return [self(videos[i], prompts[i], caps[i]) for i in it]


def aggregate(rows: Iterable[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric over videos: {"mean", "std", "n"}. A metric missing (or NaN) in a row is left
    out of that metric only. std is the sample standard deviation (ddof=1), 0 when n == 1."""
    values: dict[str, list[float]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"rows: item {i} is a {type(row).__name__}, expected a dict")
        for k, v in row.items():
            v = float(v)
            if not math.isnan(v):
                values.setdefault(k, []).append(v)
    out = {}
    for k, vs in values.items():
        t = torch.tensor(vs, dtype=torch.float64)
        std = float(t.std(correction=1)) if len(vs) > 1 else 0.0
        out[k] = {"mean": float(t.mean()), "std": std, "n": len(vs)}
    return out


METRIC_ORDER = ("clip_i", "dino_i", "color_id", "clip_t", "temporal_clip", "temporal_dino")


def format_table(results: Mapping[str, Mapping[str, Mapping[str, float]]],
                 metrics: Sequence[str] | None = None, digits: int = 3) -> str:
    """A markdown table: one row per arm (results' keys), "mean ± std" per metric.

    results: {arm name: aggregate(...)}. metrics: the columns (default: every metric present,
    identity metrics first).
    """
    if not isinstance(results, Mapping):
        raise TypeError("results: expected {arm name: aggregate(rows)}")
    present = {k for agg in results.values() for k in agg}
    if metrics is None:
        metrics = [m for m in METRIC_ORDER if m in present]
        metrics += sorted(present - set(metrics))
    lines = ["| arm | n | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for arm, agg in results.items():
        n = max((int(a["n"]) for a in agg.values()), default=0)
        cells = []
        for m in metrics:
            a = agg.get(m)
            cells.append("-" if a is None else f"{a['mean']:.{digits}f} ± {a['std']:.{digits}f}")
        lines.append(f"| {arm} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
