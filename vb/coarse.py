"""The coarse path (DESIGN.md section 1): image prompt -> CLIP tokens of several layers ->
mapper -> one text-space token per layer -> they replace the subject word in the prompt.

As in ELITE and the original VideoBooth code, the replacement happens on the text encoder's
*input* token embeddings: the subject word's span is cut out, the mapped tokens go in its place,
the rest of the prompt shifts right and is truncated to the text model's length, then the
(frozen) text transformer runs as usual. attn2's new K/V (:mod:`vb.processors`) read its output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .backbone import own_aligned_storage

# OpenAI CLIP's normalisation, the default of open_clip models without a preprocess config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The official VideoBooth mapper's CLIP ViT-L/14 blocks, in its order: last, then 4, 8, 12, 16.
OFFICIAL_CLIP_LAYERS = (23, 3, 7, 11, 15)


# ---- image encoder -----------------------------------------------------------------------------
@dataclass
class ImageEncoderOutput:
    """layer_tokens: (B, K, 1 + P, C_vis) CLS then patch tokens of K layers;
    image_embeds: (B, E) the tower's pooled, projected embedding."""

    layer_tokens: torch.Tensor
    image_embeds: torch.Tensor


def default_layers(num_blocks: int, num_layers: int = 5) -> Tuple[int, ...]:
    """``num_layers`` block indices spread evenly over the tower, the last block included (ELITE
    takes blocks 4, 8, 12, 16 and 24 of CLIP ViT-L/14)."""
    picks = sorted({max(0, round(num_blocks * (i + 1) / num_layers) - 1) for i in range(num_layers)})
    return tuple(picks)


class VideoBoothImageEncoder(ModelMixin, ConfigMixin):
    """open_clip's image tower, returning the CLS and patch tokens of several blocks.

    Args:
        visual: an open_clip visual tower: ``open_clip.transformer.VisionTransformer`` (the
            ``model.visual`` of every open_clip ViT) or a ``TimmModel`` whose ``trunk`` is a timm
            ViT. Any open_clip model name works through :meth:`from_open_clip`.
        layers: 0-based (negative allowed) indices of the transformer blocks whose outputs are
            taken; default :func:`default_layers` (5 blocks).
        mean, std: RGB normalisation; default the tower's preprocess config, else OpenAI CLIP's.
        embed_dim, vision_cfg, quick_gelu: the open_clip configuration the tower was built from
            (``open_clip.model._build_vision_tower(embed_dim, vision_cfg, quick_gelu)``); saved
            by ``save_pretrained`` so that ``from_pretrained`` can rebuild the tower. Given
            without ``visual``, the tower is built from them (random weights). A transformers
            ``CLIPVisionModel`` tower records its own config instead (``hf_vision_config``).
            :meth:`from_open_clip` fills them in; a tower passed without them saves, but
            ``from_pretrained`` cannot rebuild it.
        resize_mode, antialias: how images are resized to the tower's input size (the official
            VideoBooth code: ``"bilinear"`` without antialiasing).

    ``visual`` may also be a transformers ``CLIPVisionModel`` (the official code's encoder):
    block i's output is its ``hidden_states[i + 1]``, ``image_embeds`` its ``pooler_output``.

    A diffusers ``ModelMixin``/``ConfigMixin``: ``save_pretrained``/``from_pretrained`` and a
    pipeline's ``save_pretrained``/``from_pretrained`` keep it. The tower is frozen
    (``requires_grad=False``) and kept in eval mode by the pipeline; the
    mapper after it is what trains.
    """

    def __init__(self, visual: Optional[nn.Module] = None, layers: Optional[Sequence[int]] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 resize_mode: str = "bicubic", antialias: bool = True, *,
                 embed_dim: Optional[int] = None, vision_cfg: Optional[dict] = None, quick_gelu: bool = False,
                 hf_vision_config: Optional[dict] = None):
        super().__init__()
        if resize_mode not in ("bicubic", "bilinear"):
            raise ValueError(f"resize_mode: expected 'bicubic' or 'bilinear', got {resize_mode!r}")
        self.resize_mode, self.antialias = resize_mode, bool(antialias)
        if visual is None and hf_vision_config is not None:
            from transformers import CLIPVisionConfig, CLIPVisionModel

            visual = CLIPVisionModel(CLIPVisionConfig.from_dict(dict(hf_vision_config)))
        if visual is None:
            if vision_cfg is None or embed_dim is None:
                raise ValueError("vision_cfg: this image encoder was saved from a tower without its open_clip "
                                 "configuration; build it with VideoBoothImageEncoder.from_open_clip(...) or pass "
                                 "visual= (and embed_dim=, vision_cfg=) to save a loadable one")
            from open_clip.model import _build_vision_tower

            visual = _build_vision_tower(int(embed_dim), dict(vision_cfg), quick_gelu=bool(quick_gelu))
        if not isinstance(visual, nn.Module):
            raise TypeError(f"visual: expected an open_clip visual tower (nn.Module), got {type(visual).__name__}")
        self.visual = visual
        blocks, self._batch_first, self._prefix, self._has_cls = _tower_blocks(visual)
        n = len(blocks)
        layers = default_layers(n) if layers is None else tuple(layers)
        if not layers:
            raise ValueError("layers: expected at least one block index")
        for i in layers:
            if not isinstance(i, int) or not -n <= i < n:
                raise ValueError(f"layers: expected block indices in [{-n}, {n - 1}], got {i!r}")
        self.layers = tuple(i % n for i in layers)
        # Not registered as a submodule: they are the tower's own blocks (registered twice, the
        # weights would be saved twice, which safetensors refuses).
        self.__dict__["_blocks"] = blocks
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        mean = mean or cfg.get("mean") or getattr(visual, "image_mean", None) or CLIP_MEAN
        std = std or cfg.get("std") or getattr(visual, "image_std", None) or CLIP_STD
        # (named apart from the config's mean/std, which ConfigMixin would otherwise return)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        size = getattr(visual, "image_size", None)
        if size is None and _is_hf_vision(visual):
            size = visual.config.image_size
        if size is None and hasattr(visual, "trunk"):
            size = visual.trunk.patch_embed.img_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.requires_grad_(False)
        self.register_to_config(layers=list(self.layers), mean=[float(x) for x in mean], std=[float(x) for x in std],
                                resize_mode=resize_mode, antialias=bool(antialias),
                                embed_dim=None if embed_dim is None else int(embed_dim),
                                vision_cfg=None if vision_cfg is None else dict(vision_cfg), quick_gelu=bool(quick_gelu),
                                hf_vision_config=(visual.config.to_dict() if _is_hf_vision(visual) else None))

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: Optional[str] = None, layers=None, **kwargs):
        """Build from an open_clip model name, e.g. ``("ViT-L-14", pretrained="openai")``.
        ``kwargs`` go to ``open_clip.create_model`` (``cache_dir``, ``precision``, ...)."""
        import open_clip

        model = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
        visual = model.visual
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        model_cfg = open_clip.get_model_config(model_name) or {}
        # OpenAI weights run QuickGELU whatever the name says: read it off the built tower.
        quick = any(type(m).__name__ == "QuickGELU" for m in visual.modules())
        return cls(visual, layers=layers, mean=cfg.get("mean"), std=cfg.get("std"),
                   embed_dim=model_cfg.get("embed_dim"), vision_cfg=model_cfg.get("vision_cfg"), quick_gelu=quick)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``ModelMixin.from_pretrained``, then every weight in its own aligned
        storage (see ``vb.backbone.own_aligned_storage``: bit-exact reloads on CPU)."""

        return own_aligned_storage(super().from_pretrained(pretrained_model_name_or_path, **kwargs))

    def save_pretrained(self, save_directory, is_main_process: bool = True, save_function=None,
                        safe_serialization: bool = True, variant: Optional[str] = None,
                        max_shard_size: Union[int, str] = "10GB", push_to_hub: bool = False,
                        use_flashpack: bool = False, **kwargs):
        """diffusers' ``ModelMixin.save_pretrained`` with every option passed on (named, because
        ``DiffusionPipeline.save_pretrained`` hands ``safe_serialization``, ``variant`` and
        ``max_shard_size`` only to save methods whose signature names them); refused for a tower
        whose open_clip configuration is unknown (``from_pretrained`` could not rebuild it)."""
        if self.config.vision_cfg is None and self.config.hf_vision_config is None:
            raise ValueError("vision_cfg: this image encoder was built from a tower without its open_clip "
                             "configuration; use VideoBoothImageEncoder.from_open_clip(...) or pass embed_dim= and "
                             "vision_cfg= so that from_pretrained can rebuild it")
        return super().save_pretrained(save_directory, is_main_process=is_main_process, save_function=save_function,
                                       safe_serialization=safe_serialization, variant=variant,
                                       max_shard_size=max_shard_size, push_to_hub=push_to_hub,
                                       use_flashpack=use_flashpack, **kwargs)

    @classmethod
    def official(cls, visual: Optional[nn.Module] = None, pretrained: Optional[str] = "openai", **kwargs):
        """The official VideoBooth image encoder: CLIP ViT-L/14 with QuickGELU, blocks
        (23, 3, 7, 11, 15) in that order (its ``[last_hidden_state, hidden_states[4], [8], [12],
        [16]]``, no post-LayerNorm), bilinear resize without antialiasing.

        Args:
            visual: a transformers ``CLIPVisionModel`` (e.g. ``openai/clip-vit-large-patch14``,
                as the official code loads it) or an open_clip tower; None builds open_clip's
                ``ViT-L-14-quickgelu`` with ``pretrained`` (``kwargs`` go to ``create_model``).
                (open_clip's plain ``ViT-L-14`` has GELU, not the QuickGELU the weights were
                trained with.)
        """
        cfg = {}
        if visual is None:
            import open_clip

            visual = open_clip.create_model("ViT-L-14-quickgelu", pretrained=pretrained, **kwargs).visual
            model_cfg = open_clip.get_model_config("ViT-L-14-quickgelu") or {}
            # what save_pretrained/from_pretrained need to rebuild the tower
            cfg = dict(embed_dim=model_cfg.get("embed_dim"), vision_cfg=model_cfg.get("vision_cfg"), quick_gelu=True)
        return cls(visual, layers=OFFICIAL_CLIP_LAYERS, mean=CLIP_MEAN, std=CLIP_STD, resize_mode="bilinear",
                   antialias=False, **cfg)

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        """C_vis, the width of the layer tokens (the mapper's input)."""
        return _tower_width(self.visual)

    @property
    def embed_dim(self) -> int:
        """E, the width of the pooled image embedding."""
        return int(getattr(self.visual, "output_dim", None) or getattr(self.visual, "embed_dim", 0)
                   or self.hidden_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> resized, normalised tower input."""
        x = F.interpolate(images.to(self.device, torch.float32), size=self.image_size, mode=self.resize_mode,
                          align_corners=False, antialias=self.antialias)
        x = (x.clamp(0, 1) - self.pixel_mean) / self.pixel_std
        return x.to(self.dtype)

    def forward(self, images: torch.Tensor) -> ImageEncoderOutput:
        """images: (B, 3, H, W) RGB in [0, 1] (segmented subject on white).
        Returns :class:`ImageEncoderOutput` (layer_tokens (B, K, 1+P, C_vis), image_embeds (B, E))."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a (B, 3, H, W) tensor in [0, 1], got {got}")
        captured = {}

        def grab(idx):
            def hook(_module, _args, out):
                captured[idx] = out[0] if isinstance(out, tuple) else out
            return hook

        handles = [self._blocks[i].register_forward_hook(grab(i)) for i in self.layers]
        try:
            pooled = self.visual(self.preprocess(images))
        finally:
            for h in handles:
                h.remove()
        if hasattr(pooled, "pooler_output"):  # transformers CLIPVisionModel
            pooled = pooled.pooler_output
        if isinstance(pooled, tuple):  # output_tokens=True towers
            pooled = pooled[0]
        tokens = []
        for i in self.layers:
            t = captured[i]
            if not self._batch_first:
                t = t.transpose(0, 1)  # LND (older open_clip) -> NLD
            if self._has_cls:
                t = torch.cat([t[:, :1], t[:, self._prefix:]], dim=1)
            else:  # no class token (e.g. SigLIP): the token mean stands in for it
                t = torch.cat([t.mean(dim=1, keepdim=True), t[:, self._prefix:]], dim=1)
            tokens.append(t)
        return ImageEncoderOutput(torch.stack(tokens, dim=1), pooled)


def _is_hf_vision(visual) -> bool:
    """A transformers CLIP vision tower (``CLIPVisionModel``: its layers sit under
    ``vision_model.encoder`` in transformers 4, directly under ``encoder`` in 5)."""
    inner = getattr(visual, "vision_model", visual)
    return hasattr(getattr(visual, "config", None), "image_size") and hasattr(getattr(inner, "encoder", None), "layers")


def _tower_blocks(visual):
    """(blocks, batch_first, number of prefix tokens, has a class token) of a visual tower."""
    if _is_hf_vision(visual):
        return getattr(visual, "vision_model", visual).encoder.layers, True, 1, True
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        # open_clip < 2.24 ran its resblocks on LND; newer versions say so with batch_first.
        batch_first = bool(getattr(visual.transformer, "batch_first", False))
        has_cls = getattr(visual, "class_embedding", None) is not None
        return visual.transformer.resblocks, batch_first, 1 if has_cls else 0, has_cls
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks"):
        prefix = int(getattr(trunk, "num_prefix_tokens", 1 if getattr(trunk, "cls_token", None) is not None else 0))
        has_cls = getattr(trunk, "cls_token", None) is not None
        return trunk.blocks, True, prefix, has_cls
    raise TypeError(f"visual: expected an open_clip ViT tower (VisionTransformer, or TimmModel with a ViT trunk), "
                    f"got {type(visual).__name__}")


def _tower_width(visual) -> int:
    if _is_hf_vision(visual):
        return int(visual.config.hidden_size)
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "width"):
        return int(visual.transformer.width)
    if hasattr(visual, "trunk"):
        return int(visual.trunk.embed_dim)
    return int(visual.class_embedding.shape[-1])


# ---- mapper --------------------------------------------------------------------------------------
def _mlp(din: int, hidden: int, dout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(din, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, dout))


class VideoBoothMapper(ModelMixin, ConfigMixin):
    """ELITE-style global mapping: per CLIP layer k, token_k = MLP_k(CLS_k) + mean_p MLP'_k(patch_p).

    Args:
        input_dim: C_vis, width of the image encoder's tokens.
        output_dim: D_text, width of the text encoder's token embeddings.
        num_layers: K, number of image-encoder layers (= number of subject tokens).
        hidden_dim: MLP width (1024 in the paper).
    """

    @register_to_config
    def __init__(self, input_dim: int, output_dim: int, num_layers: int = 5, hidden_dim: int = 1024):
        super().__init__()
        self.cls_mlps = nn.ModuleList([_mlp(input_dim, hidden_dim, output_dim) for _ in range(num_layers)])
        self.patch_mlps = nn.ModuleList([_mlp(input_dim, hidden_dim, output_dim) for _ in range(num_layers)])

    def forward(self, layer_tokens: torch.Tensor) -> torch.Tensor:
        """layer_tokens: (B, K, 1 + P, C_vis), CLS first. Returns (B, K, D_text)."""
        if layer_tokens.dim() != 4 or layer_tokens.shape[1] != len(self.cls_mlps):
            raise ValueError(f"layer_tokens: expected (B, {len(self.cls_mlps)}, 1 + P, {self.config.input_dim}), "
                             f"got {tuple(layer_tokens.shape)}")
        out = []
        for k, (fc, fp) in enumerate(zip(self.cls_mlps, self.patch_mlps)):
            t = layer_tokens[:, k].to(self.dtype)
            cls_tok = fc(t[:, 0])
            patch = fp(t[:, 1:]).mean(dim=1) if t.shape[1] > 1 else torch.zeros_like(cls_tok)
            out.append(cls_tok + patch)
        return torch.stack(out, dim=1)


# ---- tokenizers ------------------------------------------------------------------------------------
def _is_hf_tokenizer(tok) -> bool:
    return hasattr(tok, "convert_tokens_to_ids") and hasattr(tok, "model_max_length")


def _is_open_clip_tokenizer(tok) -> bool:
    return callable(tok) and hasattr(tok, "encode") and not _is_hf_tokenizer(tok)


def _check_tokenizer(tok) -> None:
    if not (_is_hf_tokenizer(tok) or _is_open_clip_tokenizer(tok)):
        raise TypeError(f"tokenizer: expected a transformers CLIP tokenizer or an open_clip tokenizer "
                        f"(SimpleTokenizer), got {type(tok).__name__}")


def word_token_ids(tokenizer, word: str) -> List[int]:
    """Token ids of ``word`` alone, without start/end tokens."""
    _check_tokenizer(tokenizer)
    if _is_hf_tokenizer(tokenizer):
        return list(tokenizer(word, add_special_tokens=False)["input_ids"])
    return list(tokenizer.encode(word))


def tokenize(tokenizer, prompts: List[str], max_length: int) -> torch.Tensor:
    """(B, max_length) int64 ids with start/end tokens, padded and truncated as the tokenizer does."""
    _check_tokenizer(tokenizer)
    if _is_hf_tokenizer(tokenizer):
        return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt")["input_ids"]
    return tokenizer(prompts, context_length=max_length)


def end_token_id(tokenizer) -> int:
    """The end-of-text id (CLIP pools the text at its first occurrence)."""
    if _is_hf_tokenizer(tokenizer):
        return int(tokenizer.eos_token_id)
    eot = getattr(tokenizer, "eot_token_id", None)
    return int(eot if eot is not None else tokenizer.encoder["<end_of_text>"])


def find_subject_span(input_ids: Sequence[int], word_ids: Sequence[int]) -> Optional[Tuple[int, int]]:
    """[start, end) of the first occurrence of ``word_ids`` in ``input_ids``, or None."""
    ids, w = list(input_ids), list(word_ids)
    if not w:
        return None
    for s in range(len(ids) - len(w) + 1):
        if ids[s:s + len(w)] == w:
            return s, s + len(w)
    return None


@dataclass
class Injection:
    """Where the mapped tokens go in one tokenized prompt: ids after the shift, and the
    [start, start + count) positions whose embeddings are replaced."""

    input_ids: torch.Tensor  # (L,)
    start: int
    count: int


def inject_subject_ids(input_ids: torch.Tensor, word_ids: Sequence[int], num_tokens: int, eos_id: int,
                       prompt: str = "", word: str = "") -> Injection:
    """Replace the subject span of one tokenized prompt by ``num_tokens`` placeholder slots.

    input_ids: (L,) ids of the prompt. The span of ``word_ids`` becomes ``num_tokens`` slots (the
    subject's first id as a placeholder; never the end token, so CLIP still pools at the real
    end token), the rest shifts right and is cut at L. If the end token would fall off, it is
    kept in the last position (and the slots shrink if they would overlap it).

    Raises:
        ValueError naming ``subject_word`` when the word's tokens are not in the prompt.
    """
    ids = input_ids.tolist()
    length = len(ids)
    span = find_subject_span(ids, word_ids)
    if span is None:
        raise ValueError(f"subject_word: {word!r} does not occur in prompt {prompt!r} "
                         f"(as tokens {list(word_ids)}, within the first {length} tokens)")
    s, e = span
    new = ids[:s] + [word_ids[0]] * num_tokens + ids[e:]
    eos_pos = ids.index(eos_id) if eos_id in ids else None
    count = min(num_tokens, length - s)
    if len(new) > length:
        new = new[:length]
        if eos_pos is not None and eos_pos + (num_tokens - (e - s)) >= length:
            new[-1] = eos_id
            count = min(num_tokens, length - 1 - s)
    return Injection(torch.tensor(new, dtype=input_ids.dtype), s, max(count, 0))


def _as_list(name: str, x, n: Optional[int] = None) -> List[str]:
    if isinstance(x, str):
        x = [x]
    if not isinstance(x, (list, tuple)) or not all(isinstance(p, str) for p in x):
        raise TypeError(f"{name}: expected a str or a list of str, got {type(x).__name__}")
    if n is not None and len(x) == 1 and n > 1:
        x = list(x) * n
    if n is not None and len(x) != n:
        raise ValueError(f"{name}: expected {n} entries (one per prompt), got {len(x)}")
    return list(x)


def text_max_length(text_encoder, tokenizer=None) -> int:
    """The text model's sequence length (77 for CLIP)."""
    cfg = getattr(text_encoder, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    if n is None and tokenizer is not None:
        n = getattr(tokenizer, "context_length", None) or getattr(tokenizer, "model_max_length", None)
    return int(n or 77)


def encode_prompt(text_encoder, tokenizer, prompts: Union[str, List[str]],
                  subject_words: Union[str, List[str], None] = None,
                  subject_tokens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts with a transformers CLIP text model, optionally with the subject injected.

    Args:
        text_encoder: ``transformers.CLIPTextModel`` (or ``CLIPTextModelWithProjection``).
        tokenizer: the transformers CLIP tokenizer or an open_clip tokenizer with the same vocab.
        prompts: B prompts (a str is one prompt).
        subject_words: one word per prompt (a str is used for all); with ``subject_tokens``.
        subject_tokens: (B, K, D_text) the mapper's tokens, replacing each prompt's subject span.

    Returns:
        (hidden (B, L, D_text), pooled (B, D_pool)): last hidden states after the final norm and
        the end-token pooled embedding (``text_embeds`` for a model with projection).
    """
    prompts = _as_list("prompt", prompts)
    length = text_max_length(text_encoder, tokenizer)
    ids = tokenize(tokenizer, prompts, length)
    device = text_encoder.device
    handle = None
    if subject_tokens is not None:
        if subject_words is None:
            raise ValueError("subject_word: required with subject_tokens")
        words = _as_list("subject_word", subject_words, len(prompts))
        if not isinstance(subject_tokens, torch.Tensor) or subject_tokens.dim() != 3 \
                or subject_tokens.shape[0] != len(prompts):
            got = tuple(subject_tokens.shape) if isinstance(subject_tokens, torch.Tensor) else type(subject_tokens).__name__
            raise ValueError(f"subject_tokens: expected shape ({len(prompts)}, K, D_text), got {got}")
        eos = end_token_id(tokenizer)
        rows, spans = [], []
        for row, prompt, word in zip(ids, prompts, words):
            if not word.strip():
                raise ValueError("subject_word: expected a non-empty word")
            inj = inject_subject_ids(row, word_token_ids(tokenizer, word), subject_tokens.shape[1], eos, prompt, word)
            rows.append(inj.input_ids)
            spans.append((inj.start, inj.count))
        ids = torch.stack(rows)

        def replace(_module, _args, out):
            # The token embeddings of the placeholder slots become the mapped image tokens;
            # position embeddings are added after this, as for any token.
            out = out.clone()
            tok = subject_tokens.to(device=out.device, dtype=out.dtype)
            for b, (s, c) in enumerate(spans):
                if c > 0:
                    out[b, s:s + c] = tok[b, :c]
            return out

        handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        out = text_encoder(ids.to(device))
    finally:
        if handle is not None:
            handle.remove()
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out.text_embeds
    return out.last_hidden_state, pooled


# ---- the official image-prompt preprocessing -----------------------------------------------------------
def _resize_uint8(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8: bilinear, no antialiasing, rounded (what
    torchvision 0.15's ``Resize`` does to a uint8 tensor, as the official code calls it)."""
    x = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def official_preprocess(image, mask=None, box=None, clip_size: int = 224,
                        vae_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official sample script's image prompt: pixels outside the mask turn white, the image
    is cropped to the subject's box, padded to a white square (the short side centred, the
    extra pixel at the bottom/right), then resized bilinearly without antialiasing.

    Args:
        image: a PIL image or an (H, W, 3) uint8 array (RGB).
        mask: optional PIL image or (H, W) / (H, W, 3) array; where it is 0 the image turns white.
        box: optional (x1, y1, x2, y2) pixel box (floats are truncated as the official code does);
            default the mask's bounding box, else the whole image.
        clip_size, vae_size: output sizes of the two branches.

    Returns:
        (clip_image (3, clip_size, clip_size) float32 in [0, 1], vae_image (3, vae_size, vae_size)
        float32 in [-1, 1]); both come from the padded uint8 square.
    """
    import numpy as np
    import PIL.Image

    arr = np.asarray(image.convert("RGB")) if isinstance(image, PIL.Image.Image) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image: expected a PIL image or an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    arr = arr.copy()
    if mask is not None:
        m = np.asarray(mask)
        if m.shape[:2] != arr.shape[:2]:
            raise ValueError(f"mask: expected spatial shape {arr.shape[:2]}, got {m.shape}")
        arr[m == 0] = 255
        if box is None:
            on = m != 0 if m.ndim == 2 else (m != 0).any(-1)
            ys, xs = np.nonzero(on)
            if len(ys) == 0:
                raise ValueError("mask: is empty (no subject pixel)")
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    if box is not None:
        if len(box) != 4:
            raise ValueError(f"box: expected (x1, y1, x2, y2), got {box!r}")
        x1, y1, x2, y2 = (int(v) for v in box)
        arr = arr[y1:y2, x1:x2]
        if arr.size == 0:
            raise ValueError(f"box: {box!r} selects no pixel of the image")
    img = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    h, w = img.shape[1:]
    if h != w:
        diff = abs(w - h)
        a, b = diff // 2, diff - diff // 2
        pad = (0, 0, a, b) if h < w else (a, b, 0, 0)  # (left, right, top, bottom)
        img = F.pad(img, pad, value=255)
    clip_image = _resize_uint8(img, clip_size).float() / 255.0
    vae_image = _resize_uint8(img, vae_size).float() / 127.5 - 1
    return clip_image, vae_image
