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

# OpenAI CLIP's normalisation, the default of open_clip models without a preprocess config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
            without ``visual``, the tower is built from them (random weights).
            :meth:`from_open_clip` fills them in; a tower passed without them saves, but
            ``from_pretrained`` cannot rebuild it.

    A diffusers ``ModelMixin``/``ConfigMixin``: ``save_pretrained``/``from_pretrained`` and a
    pipeline's ``save_pretrained``/``from_pretrained`` keep it. The tower is frozen (``requires_grad=False``) and kept in eval mode by the pipeline; the
    mapper after it is what trains.
    """

    def __init__(self, visual: Optional[nn.Module] = None, layers: Optional[Sequence[int]] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, *,
                 embed_dim: Optional[int] = None, vision_cfg: Optional[dict] = None, quick_gelu: bool = False):
        super().__init__()
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
        if size is None and hasattr(visual, "trunk"):
            size = visual.trunk.patch_embed.img_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.requires_grad_(False)
        self.register_to_config(layers=list(self.layers), mean=[float(x) for x in mean], std=[float(x) for x in std],
                                embed_dim=None if embed_dim is None else int(embed_dim),
                                vision_cfg=None if vision_cfg is None else dict(vision_cfg), quick_gelu=bool(quick_gelu))

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

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' ``ModelMixin.save_pretrained``; refused for a tower whose open_clip
        configuration is unknown (``from_pretrained`` could not rebuild it)."""
        if self.config.vision_cfg is None:
            raise ValueError("vision_cfg: this image encoder was built from a tower without its open_clip "
                             "configuration; use VideoBoothImageEncoder.from_open_clip(...) or pass embed_dim= and "
                             "vision_cfg= so that from_pretrained can rebuild it")
        return super().save_pretrained(save_directory, *args, **kwargs)

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
        x = F.interpolate(images.to(self.device, torch.float32), size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
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


def _tower_blocks(visual):
    """(blocks, batch_first, number of prefix tokens, has a class token) of a visual tower."""
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
