"""The VideoBooth training task: ``vb`` components + ``vb_train.data`` triplets (DESIGN.md section 1).

One training step, per sample (caption, subject word, image prompt, video):

1. condition dropout (from the step's generator): the caption becomes the null prompt "" and/or
   the image prompt a grey image (0.5 in [0, 1]);
2. video latents: the VAE encodes the frames (a posterior sample), times its scaling factor;
3. coarse path (``model.coarse_path``): CLIP layer tokens of the image prompt -> mapper ->
   tokens that replace the subject word of the caption -> text encoder (``vb.encode_prompt``);
   samples whose text was dropped use the null prompt instead; samples whose subject word is
   not in the caption use the plain caption (counted as ``no_subject_span``);
4. fine path (``model.fine_path``, default: on in stage 2 only): the image prompt's VAE latent
   (the mode), resized to the video's size, noised to the video's timestep with its own noise,
   runs once through the backbone's image branch with the null prompt;
5. epsilon-prediction MSE of the backbone (``vb.VideoBoothUNet`` or ``vb.VideoDiT``).

What trains (``trainable_parameters``): stage 1 the mapper and every attn2 ``to_k_new``/
``to_v_new``; stage 2 adds every attn1 processor's parameters (``to_k_new``, ``to_v_new``,
``to_k_exemplar``, ``to_v_exemplar``, and a learned query / token bank when configured), as
``vb.VideoBoothComponents.stage_parameters`` says; ``model.train_temporal`` adds the inflated
U-Net's temporal layers; ``model.extra_trainable`` adds parameters whose names match regexes
(``backbone\\.`` trains the whole backbone: for toy-scale runs from random weights).
Parameters of a switched-off path are left out (DDP needs every trainable parameter used).

cfg.model keys (defaults in brackets):
    components    "tiny" (vb.build_tiny_videobooth, random weights) or "pretrained" [tiny]
    seed          weights seed of the tiny components [cfg.seed]
    image_bank, learn_query, temporal, clip_layers   vb options [None, False, True, None]
    coarse_path   bool [True];  fine_path  "auto" (stage 2 only), True or False ["auto"]
    train_temporal bool [False];  extra_trainable  list of regexes [[]]
    base_weights  a safetensors file of task parameters (by name) loaded after building, e.g.
                  a backbone pretrained on the same data [None]
    adapter       a vb adapter (vb.save_adapter) loaded after building [None]
    pretrained_model_name_or_path, clip_model, clip_pretrained, mapper_hidden, revision:
                  for components=pretrained (an SD-1.x diffusers directory; open_clip tower)
    motion_adapter, motion_adapter_revision: components=pretrained on AnimateDiff's pretrained
                  motion modules (a diffusers MotionAdapter folder or hub id) instead of
                  zero-initialised temporal layers; leave temporal unset [None]
    clip_positions bool [True]; false zeroes the image tower's positional embedding (a bag of
                  patches: the two-tone ablations' coarse encoder, docs/demo.md)
    ip_tokens, ip_scale  the IP-Adapter task only (vb_train.toy.ip_adapter) [4, 1.0]
    ip_kind, ip_layer   the IP-Adapter task only: "pooled" (IP-Adapter) or "plus" (IP-Adapter-Plus:
                  a resampler over one mapped tower layer's tokens, with positions) [pooled, -1]
    exemplar_init "attn1" or "construction" ["attn1"]: at stage 2's start (init_from), attn1's
                  ``to_k_exemplar``/``to_v_exemplar`` are cloned from the trained attn1 K/V
                  (``to_k_new``/``to_v_new``), as the official code does at its stage-2 set-up,
                  unless the init weights hold them; "construction" keeps the copies made when the
                  processors were built
    coarse_input  what the coarse path encodes ["image"]: "image" (the prompt), "swap-average"
                  (the mean of the tower's outputs for the prompt and for ``image_paired``, so a
                  prompt and its paired version give the same tokens: the toy's order-blind coarse
                  path), "halves" (the oracle control: the mapper's tokens of the upper and of the
                  lower half of the prompt, in that order, 2K tokens)
    grey_prompt   bool [False]: every image prompt is grey in training (the negative control; the
                  toy's evaluation then feeds it real prompts, as every arm)
    fine_latent   "noised" (the image latent noised to the video's timestep, the paper's) or
                  "clean" (the diagnostic: the clean latent at every step) ["noised"]
    image_stream  what the image branch is fed: "one" (one copy of the image latent, one noise
                  draw: this project's cheaper stream) or "official" (the latent repeated over the
                  clip's F frames, each copy with its own draw at the video's timestep, through every
                  layer, temporal attention included: the official train_stage2.py's stream); None:
                  the backbone's (``VideoBoothUNet(image_stream=)``: "official" on the official
                  preset, else "one"). The backbone keeps the value, so its pipeline samples with
                  the same stream (a fresh draw per copy at every step) [None]
cfg.data keys: root (required), categories, video_root, num_frames [4], frame_stride [1],
    size [16], image_size [32], caption_column, split (keep CSV rows whose ``split`` column
    has this value), prompt_augment {hflip, degrees, translate, scale, box_trim} (box_trim
    defaults to 0.2 in stage 2 and 0 in stage 1, as the original code), max_skips,
    paired_transform (an import path "module:function", the dataset's ``paired_transform``:
    batches then hold ``image_paired``; coarse_input "swap-average" needs it).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig
from .registry import import_object
from .tasks import DiffusionTask

log = logging.getLogger(__name__)

MODEL_KEYS = {"components", "seed", "image_bank", "learn_query", "temporal", "clip_layers", "coarse_path",
              "fine_path", "train_temporal", "extra_trainable", "base_weights", "adapter",
              "pretrained_model_name_or_path", "clip_model", "clip_pretrained", "mapper_hidden", "revision",
              "motion_adapter", "motion_adapter_revision", "clip_positions", "ip_tokens", "ip_scale",
              "ip_kind", "ip_layer", "exemplar_init", "coarse_input", "grey_prompt", "fine_latent",
              "image_stream"}
DATA_KEYS = {"root", "categories", "video_root", "num_frames", "frame_stride", "size", "image_size",
             "caption_column", "split", "prompt_augment", "prompt_augment_vae", "max_skips", "paired_transform"}
COARSE_INPUTS = ("image", "swap-average", "halves")
IMAGE_KEYS = ("image", "image_vae", "image_paired")   # every image prompt a batch may hold


def coarse_subject_tokens(image_encoder, mapper, image01: torch.Tensor, paired01: Optional[torch.Tensor] = None,
                          mode: str = "image"):
    """The coarse path's input and output for (B, 3, S, S) prompts in [0, 1]: (subject tokens
    (B, K or 2K, D_text), pooled image embeds (B, E)); ``mode`` is ``model.coarse_input``.

    The training task and the toy's sampling both call this, so the tensor that reaches the
    mapper is the same in both. "swap-average" averages the tower's layer tokens and pooled
    embedding over the prompt and ``paired01`` (its swapped version): the result is symmetric in
    the two, so swapping the prompt cannot change it. "halves" maps the upper and the lower half
    (each resized to the tower's input by its preprocessing) separately and concatenates them."""
    if mode not in COARSE_INPUTS:
        raise ValueError(f"model.coarse_input: expected one of {COARSE_INPUTS}, got {mode!r}")
    if mode == "image":
        with torch.no_grad():
            enc = image_encoder(image01)
        return mapper(enc.layer_tokens), enc.image_embeds
    if mode == "swap-average":
        if paired01 is None or paired01.shape != image01.shape:
            raise ValueError("model.coarse_input: 'swap-average' needs the swapped prompts (batch['image_paired'], "
                             "from data.paired_transform) of the prompts' shape")
        with torch.no_grad():
            enc = image_encoder(torch.cat([image01, paired01]))
        b = image01.shape[0]
        tokens = (enc.layer_tokens[:b] + enc.layer_tokens[b:]) / 2
        return mapper(tokens), (enc.image_embeds[:b] + enc.image_embeds[b:]) / 2
    s = image01.shape[-2]
    with torch.no_grad():
        top, bottom = image_encoder(image01[..., : s // 2, :]), image_encoder(image01[..., s // 2:, :])
    tokens = torch.cat([mapper(top.layer_tokens), mapper(bottom.layer_tokens)], dim=1)
    return tokens, (top.image_embeds + bottom.image_embeds) / 2


def build_components(cfg: TrainConfig):
    """``vb.VideoBoothComponents`` for cfg.model.components (tiny or pretrained)."""
    import vb

    m = cfg.model
    kind = m.get("components", "tiny")
    common = dict(image_bank=m.get("image_bank"), learn_query=bool(m.get("learn_query", False)))
    if kind == "tiny":
        return vb.build_tiny_videobooth(cfg.backbone, cfg.attn_backend, cfg.schedule,
                                        temporal=bool(m.get("temporal", True)), clip_layers=m.get("clip_layers"),
                                        seed=int(m.get("seed", cfg.seed)), **common)
    if kind != "pretrained":
        raise ValueError(f"model.components: expected 'tiny' or 'pretrained', got {kind!r}")
    return _pretrained_components(cfg, **common)


def _pretrained_components(cfg: TrainConfig, image_bank=None, learn_query=False):
    """SD-1.x (diffusers layout) + an open_clip image tower, the paper's setup (U-Net only).

    Unverified here (no weights offline): the code follows vb's documented constructors."""
    import vb
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    m = cfg.model
    path = m.get("pretrained_model_name_or_path")
    if not path:
        raise ValueError("model.pretrained_model_name_or_path: required with components=pretrained")
    if cfg.backbone != "unet":
        raise ValueError("backbone: components=pretrained builds the SD U-Net; use backbone=unet")
    rev = m.get("revision")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev)
    backbone = build_unet_backbone(cfg, unet, image_bank=image_bank, learn_query=learn_query)
    image_encoder = vb.VideoBoothImageEncoder.from_open_clip(m.get("clip_model", "ViT-L-14"),
                                                             pretrained=m.get("clip_pretrained", "openai"),
                                                             layers=m.get("clip_layers"))
    mapper = vb.VideoBoothMapper(input_dim=image_encoder.hidden_size, output_dim=text_encoder.config.hidden_size,
                                 num_layers=len(image_encoder.layers), hidden_dim=int(m.get("mapper_hidden", 1024)))
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=rev)
    for mod in (text_encoder, image_encoder, vae):
        mod.eval().requires_grad_(False)
    return vb.VideoBoothComponents(tokenizer, text_encoder, image_encoder, mapper, backbone, vae, scheduler)


def build_unet_backbone(cfg: TrainConfig, unet, image_bank=None, learn_query=False):
    """``vb.VideoBoothUNet`` on a pretrained ``UNet2DConditionModel``: inflated with zero-initialised
    temporal layers (Tune-A-Video style, the paper's base), or, with ``model.motion_adapter`` (a
    diffusers ``MotionAdapter`` folder or hub id, e.g. guoyww/animatediff-motion-adapter-v1-5-2),
    on AnimateDiff's pretrained motion modules: VideoBooth on the spatial attention only, the
    motion modules frozen (``vb.VideoBoothUNet.from_motion_adapter``)."""
    import vb

    m = cfg.model
    kwargs = dict(schedule=cfg.schedule, attn_backend=cfg.attn_backend, image_bank=image_bank,
                  learn_query=learn_query)
    adapter_path = m.get("motion_adapter")
    if not adapter_path:
        return vb.VideoBoothUNet(unet, temporal=bool(m.get("temporal", True)), **kwargs)
    if m.get("temporal") is not None:
        raise ValueError("model.temporal: leave it unset with model.motion_adapter (the motion modules are "
                         f"the temporal layers), got {m.get('temporal')!r}")
    if m.get("train_temporal"):
        raise ValueError("model.train_temporal: the motion adapter's modules stay frozen (they are not in the "
                         "VideoBooth adapter file); set it to false")
    from diffusers import MotionAdapter

    adapter = MotionAdapter.from_pretrained(adapter_path, revision=m.get("motion_adapter_revision"))
    return vb.VideoBoothUNet.from_motion_adapter(unet, adapter, **kwargs)


def drop_clip_positions(image_encoder) -> None:
    """Zero the (frozen) positional embedding of an open_clip image tower, in place: the tower
    then sees a bag of patches (`model.clip_positions: false`, the two-tone ablations' coarse
    encoder, docs/demo.md says why)."""
    visual = getattr(image_encoder, "visual", None)
    pos = getattr(visual, "positional_embedding", None)
    if not isinstance(pos, torch.Tensor):
        raise ValueError(f"model.clip_positions: false needs an open_clip ViT tower with a positional_embedding; "
                         f"{type(image_encoder).__name__} has none")
    with torch.no_grad():
        pos.zero_()


class VideoBoothTask(DiffusionTask):
    """VideoBooth's two training stages as a :class:`vb_train.tasks.TrainTask` (module docstring)."""

    def __init__(self, cfg: TrainConfig, components=None):
        m = cfg.model
        unknown = sorted(set(m) - MODEL_KEYS)
        if unknown:
            raise ValueError(f"model: unknown keys {unknown}; known: {sorted(MODEL_KEYS)}")
        unknown = sorted(set(cfg.data) - DATA_KEYS)
        if unknown:
            raise ValueError(f"data: unknown keys {unknown}; known: {sorted(DATA_KEYS)}")
        parts = components if components is not None else build_components(cfg)
        if m.get("clip_positions", True) is False:
            drop_clip_positions(parts.image_encoder)
        # Only a pretrained model's scheduler says how that model was trained (the tiny random
        # components' default scheduler says nothing).
        pretrained = dict(parts.scheduler.config) if m.get("components", "tiny") == "pretrained" else None
        super().__init__(cfg, pretrained_scheduler=pretrained)
        self.parts = parts
        # Submodules named as vb's adapter files name them ("mapper.*", "backbone.*").
        self.mapper = parts.mapper
        self.backbone = parts.backbone
        self.text_encoder = parts.text_encoder
        self.image_encoder = parts.image_encoder
        self.vae = parts.vae
        self.tokenizer = parts.tokenizer
        self.coarse = bool(m.get("coarse_path", True))
        fine = m.get("fine_path", "auto")
        if fine not in ("auto", True, False):
            raise ValueError(f"model.fine_path: expected 'auto', true or false, got {fine!r}")
        self.fine = (cfg.stage == 2) if fine == "auto" else bool(fine)
        self.train_temporal = bool(m.get("train_temporal", False))
        self.extra = [re.compile(p) for p in (m.get("extra_trainable") or [])]
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for mod in (self.text_encoder, self.image_encoder, self.vae):
            mod.requires_grad_(False)
        if m.get("base_weights"):
            self._load_named(m["base_weights"])
        if m.get("adapter"):
            import vb
            vb.load_adapter(m["adapter"], self.mapper, self.backbone)
        self.coarse_input = m.get("coarse_input", "image")
        if self.coarse_input not in COARSE_INPUTS:
            raise ValueError(f"model.coarse_input: expected one of {COARSE_INPUTS}, got {self.coarse_input!r}")
        if self.coarse_input == "swap-average" and not cfg.data.get("paired_transform"):
            raise ValueError("model.coarse_input: 'swap-average' needs data.paired_transform (the swapped prompt)")
        self.exemplar_init = m.get("exemplar_init", "attn1")
        if self.exemplar_init not in ("attn1", "construction"):
            raise ValueError(f"model.exemplar_init: expected 'attn1' or 'construction', got {self.exemplar_init!r}")
        self.fine_latent = m.get("fine_latent", "noised")
        if self.fine_latent not in ("noised", "clean"):
            raise ValueError(f"model.fine_latent: expected 'noised' or 'clean', got {self.fine_latent!r}")
        from vb.official.sampler import check_image_stream

        stream = m.get("image_stream")
        if stream is None:
            stream = getattr(self.backbone, "image_stream", "one")
        self.image_stream = check_image_stream("model.image_stream", stream)
        if self.image_stream == "official":
            if not hasattr(self.backbone, "set_image_stream") or getattr(self.backbone, "motion", False):
                raise ValueError(f"model.image_stream: 'official' feeds the image branch a (B, C, F, h, w) clip, which "
                                 f"only an inflated 2D VideoBoothUNet takes (backbone: {type(self.backbone).__name__})")
        if hasattr(self.backbone, "set_image_stream"):  # the pipeline samples with the trained stream
            self.backbone.set_image_stream(self.image_stream)
        self.grey_prompt = bool(m.get("grey_prompt", False))
        self._null = None
        self.no_span = 0
        self.exemplars_cloned = 0

    def after_init_from(self, loaded: set) -> None:
        """Called by the trainer once stage 2's start weights (``init_from``) are in, with the
        names it loaded: the exemplar projections become copies of the trained attn1 K/V
        (``to_k_new``/``to_v_new``, what the video pass used in stage 1), as the official code
        clones them when stage 2 begins; skipped when the init weights hold them (a run that
        starts from a stage-2 run) or with ``model.exemplar_init: construction``."""
        if self.exemplar_init != "attn1" or self.cfg.stage != 2:
            return
        names = {id(p): n for n, p in self.named_parameters()}
        n = 0
        with torch.no_grad():
            for proc in self.backbone.attn1_processors():
                for src, dst in ((proc.to_k_new, proc.to_k_exemplar), (proc.to_v_new, proc.to_v_exemplar)):
                    if any(names.get(id(p)) in loaded for p in dst.parameters()):
                        continue
                    dst.load_state_dict(src.state_dict())
                    n += 1
        self.exemplars_cloned = n
        if n:
            log.info("stage 2: %d exemplar projections cloned from the trained attn1 K/V", n)

    def _load_named(self, path: str) -> None:
        from safetensors.torch import load_file

        from .checkpoint import copy_named

        copy_named(self, load_file(path), f"model.base_weights: {path}")

    # ---- what trains -----------------------------------------------------------------------------
    def trainable_parameters(self, stage: int):
        params = list(self.backbone.stage_parameters(stage, include_temporal=self.train_temporal))
        if self.coarse:
            params = list(self.mapper.parameters()) + params
        if self.extra:
            seen = {id(p) for p in params}
            for name, p in self.named_parameters():
                if id(p) not in seen and any(r.search(name) for r in self.extra):
                    params.append(p)
                    seen.add(id(p))
        # Parameters of a switched-off path get no gradient (DDP needs every trainable one used).
        skip = set()
        if not self.fine:  # the exemplar projections, learned query and image banks see the image only
            skip |= {id(p) for proc in self.backbone.attn1_processors()
                     for mod in (proc.to_k_exemplar, proc.to_v_exemplar, proc.image_bank, proc.to_q_new)
                     if mod is not None for p in mod.parameters()}
        if not self.coarse:
            skip |= {id(p) for p in self.mapper.parameters()}
            if getattr(self.backbone, "image_embed", None) is not None:
                skip |= {id(p) for p in self.backbone.image_embed.parameters()}
        return [p for p in params if id(p) not in skip]

    def set_train_mode(self, stage: int) -> None:
        self.eval()
        self.mapper.train()
        self.backbone.train()

    # ---- data ------------------------------------------------------------------------------------
    def build_dataset(self):
        from .data import PromptAugment, VideoBoothDataset

        d = dict(self.cfg.data)
        if not d.get("root"):
            raise ValueError("data.root: required (a folder in the VideoBooth layout; python -m vb_train.toy.synthetic "
                             "writes one)")
        aug = dict(d.get("prompt_augment") or {})
        aug.setdefault("box_trim", 0.2 if self.cfg.stage == 2 else 0.0)
        for k in ("translate", "scale"):
            if k in aug:
                aug[k] = tuple(aug[k])
        vae_aug = None
        if d.get("prompt_augment_vae") is not None:  # the official code's independent VAE-branch draw
            vae_aug = {k: tuple(v) if k in ("translate", "scale") else v
                       for k, v in dict(d["prompt_augment_vae"]).items()}
            if "box_trim" in vae_aug:
                raise ValueError("data.prompt_augment_vae.box_trim: the box is trimmed once, for both branches "
                                 "(set it in data.prompt_augment)")
            vae_aug = PromptAugment(**vae_aug)
        split = d.get("split")
        row_filter = (lambda r: r.get("split") == split) if split else None
        paired = import_object(d["paired_transform"], "data.paired_transform") if d.get("paired_transform") else None
        size = d.get("size", 16)
        return VideoBoothDataset(
            d["root"], d.get("categories"), video_root=d.get("video_root"), num_frames=int(d.get("num_frames", 4)),
            frame_stride=int(d.get("frame_stride", 1)), size=tuple(size) if isinstance(size, list) else size,
            image_size=int(d.get("image_size", 32)), train=True, prompt_augment=PromptAugment(**aug),
            vae_prompt_augment=vae_aug,
            seed=self.cfg.seed, max_skips=int(d.get("max_skips", 64)), row_filter=row_filter,
            caption_column=d.get("caption_column"), paired_transform=paired)

    def collate(self, items: List[dict]):
        keep = ("video", *IMAGE_KEYS, "caption", "subject", "index", "skipped")
        return torch.utils.data.default_collate([{k: it[k] for k in keep if k in it} for it in items])

    # ---- the loss pieces -------------------------------------------------------------------------
    def drop_conditions(self, batch, drop_text, drop_image):
        batch = dict(batch)
        batch["drop_text"] = drop_text
        if self.grey_prompt:  # the negative control: no prompt ever reaches the model
            drop_image = torch.ones_like(drop_image)
        for key in IMAGE_KEYS:  # every branch's image prompt: 0 in [-1, 1] = 0.5 grey
            if key in batch:
                x = batch[key]
                batch[key] = torch.where(drop_image.to(x.device)[:, None, None, None], torch.zeros_like(x), x)
        return batch

    def latents(self, batch, generator):
        from vb.latents import encode_latents

        video = batch["video"]  # (B, F, 3, H, W) in [-1, 1]
        b, f, _, h, w = video.shape
        lat = encode_latents(self.vae, video.reshape(b * f, 3, h, w), generator, sample=True)
        return lat.view(b, f, *lat.shape[1:]).transpose(1, 2)  # (B, C, F, h, w)

    def _null_prompt(self):
        if self._null is None:
            import vb
            with torch.no_grad():
                self._null = vb.encode_prompt(self.text_encoder, self.tokenizer, [""])
        return self._null

    def _prompts(self, captions: List[str], words: List[str], drop_text: torch.Tensor,
                 subject_tokens: Optional[torch.Tensor]):
        """(text (B, L, D), pooled (B, D')) with the subject injected where possible."""
        import vb
        from vb.coarse import find_subject_span, text_max_length, tokenize, word_token_ids

        b = len(captions)
        null_h, null_p = self._null_prompt()
        if subject_tokens is None:
            with torch.no_grad():
                plain_h, plain_p = vb.encode_prompt(self.text_encoder, self.tokenizer, captions)
            keep = ~drop_text.to(plain_h.device)
            return (torch.where(keep[:, None, None], plain_h, null_h.expand(b, -1, -1)),
                    torch.where(keep[:, None], plain_p, null_p.expand(b, -1)))
        length = text_max_length(self.text_encoder, self.tokenizer)
        ids = tokenize(self.tokenizer, captions, length)
        has_span = []
        for row, word in zip(ids, words):
            has_span.append(bool(word.strip()) and
                            find_subject_span(row.tolist(), word_token_ids(self.tokenizer, word)) is not None)
        prompts = [c if ok else f"a {w or 'thing'}" for c, w, ok in zip(captions, words, has_span)]
        words_ = [w if ok else (w or "thing") for w, ok in zip(words, has_span)]
        # The injected prompt is computed for every sample (and then selected) so that the mapper
        # is always in the graph: DDP needs every trainable parameter to get a gradient.
        inj_h, inj_p = vb.encode_prompt(self.text_encoder, self.tokenizer, prompts, words_, subject_tokens)
        dev = inj_h.device
        span = torch.tensor(has_span, device=dev)
        self.no_span += int((~span).sum())
        keep = ~drop_text.to(dev)
        drift = self.cfg.text_drift_l1 > 0
        if not all(has_span) or drift:
            with torch.no_grad():
                plain_h, plain_p = vb.encode_prompt(self.text_encoder, self.tokenizer, captions)
            inj_h = torch.where(span[:, None, None], inj_h, plain_h)
            inj_p = torch.where(span[:, None], inj_p, plain_p)
        if drift:  # the official objective: how far the injection moves the caption's embedding
            self.regularizers["text_drift_l1"] = (inj_h.float() - plain_h.float()).abs().mean()
        return (torch.where(keep[:, None, None], inj_h, null_h.expand(b, -1, -1).to(inj_h.dtype)),
                torch.where(keep[:, None], inj_p, null_p.expand(b, -1).to(inj_p.dtype)))

    def forward(self, batch, generator):
        before = self.no_span
        out = super().forward(batch, generator)
        out["no_subject_span"] = float(self.no_span - before)
        return out

    def predict(self, noisy, timesteps, batch, generator):
        image = batch["image"]  # (B, 3, S, S) in [-1, 1]
        b = image.shape[0]
        subject_tokens = image_embeds = None
        if self.coarse:
            paired = batch.get("image_paired")
            subject_tokens, image_embeds = coarse_subject_tokens(
                self.image_encoder, self.mapper, (image.float() + 1) / 2,
                None if paired is None else (paired.float() + 1) / 2, self.coarse_input)
        if subject_tokens is not None and self.cfg.mapper_l1 > 0:  # the official objective
            self.regularizers["mapper_l1"] = subject_tokens.float().abs().mean()
        text, pooled = self._prompts(list(batch["caption"]), list(batch["subject"]), batch["drop_text"],
                                     subject_tokens)
        null_h, null_p = self._null_prompt()
        image_latents = None
        if self.fine:
            from vb.latents import encode_latents

            h, w = noisy.shape[-2:]
            size = (h * self.vae_scale, w * self.vae_scale)
            src = batch.get("image_vae", image)  # an independent augmentation when configured
            img = F.interpolate(src.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
            with torch.no_grad():
                lat = encode_latents(self.vae, img.clamp(-1, 1), sample=False)
            # "one": (B, C, h, w); "official": the F copies (B, C, F, h, w), each with its own draw
            from vb.official.sampler import image_stream_latents

            lat = image_stream_latents(lat, self.image_stream, noisy.shape[2])
            img_noise = torch.randn(lat.shape, generator=generator, device=generator.device).to(lat)
            # (the noise is drawn either way: the generator's stream does not depend on fine_latent)
            image_latents = lat if self.fine_latent == "clean" else self.add_noise(lat, img_noise, timesteps)
        dtype = next(self.backbone.parameters()).dtype
        cast = (lambda t: None if t is None else t.to(dtype))
        return self.backbone(cast(noisy), timesteps, cast(text), pooled_text_embeds=cast(pooled),
                             image_embeds=cast(image_embeds), image_latents=cast(image_latents),
                             null_encoder_hidden_states=cast(null_h.expand(b, -1, -1)),
                             null_pooled_text_embeds=cast(null_p.expand(b, -1)))

    # ---- validation and memory -------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Recompute the backbone's activations in the backward (diffusers' ModelMixin API)."""
        fn = getattr(self.backbone, "enable_gradient_checkpointing", None)
        if fn is None:
            raise ValueError(f"gradient_checkpointing: the {type(self.backbone).__name__} backbone has no "
                             f"enable_gradient_checkpointing()")
        fn()

    def _validation_items(self) -> List[dict]:
        """The fixed prompts and image prompts of every validation: ``validation_prompts`` (image
        files, resized to ``data.image_size``) or else training items 0..validation_samples-1 as
        the evaluation loader gives them (no augmentation)."""
        if getattr(self, "_val_items", None) is None:
            if self.cfg.validation_prompts:
                from PIL import Image

                size = int(self.cfg.data.get("image_size", 32))
                items = []
                for v in self.cfg.validation_prompts:
                    if not Path(v["image"]).is_file():
                        raise FileNotFoundError(f"validation_prompts: no image file {v['image']!r}")
                    with Image.open(v["image"]) as im:
                        img = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
                    items.append({"caption": v["caption"], "subject": v["subject"],
                                  "image": torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1})
            else:
                ds = self.build_dataset()
                ds.train = False
                items = [{k: item[k] for k in ("caption", "subject", "image")}  # one load per item
                         for item in map(ds.__getitem__, range(min(self.cfg.validation_samples, len(ds))))]
            self._val_items = items
        return self._val_items

    @torch.no_grad()
    def validate(self, directory, step: int, progress: bool = False) -> Optional[dict]:
        """Sample ``validation_samples`` videos (DDIM, ``validation_steps`` steps, guidance
        ``validation_guidance``, seeded with cfg.seed) of fixed training prompts with their image
        prompts; write ``directory/<i>.gif``; return their colour identity against the image
        prompt (``vb_train.metrics.color_identity``) and the frames (uint8) for the trackers."""
        from diffusers.utils import export_to_gif
        from PIL import Image

        from .tasks import inference_scheduler
        from .metrics import color_identity

        items = self._validation_items()
        if not items:
            return None
        pipe = self.parts.pipeline()
        pipe.scheduler = inference_scheduler(self.noise_config)
        pipe.set_progress_bar_config(disable=not progress, desc=f"validation (step {step})", leave=False)
        f = int(self.cfg.data.get("num_frames", 4))
        size = self.cfg.data.get("size", 16)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        images = torch.stack([(it["image"] + 1) / 2 for it in items]).clamp(0, 1)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        frames = pipe([it["caption"] for it in items], [it["subject"] for it in items], image_prompt=images,
                      num_frames=f, height=h, width=w, num_inference_steps=self.cfg.validation_steps,
                      guidance_scale=self.cfg.validation_guidance, generator=g, output_type="pt").frames
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        videos, scores = {}, []
        for i, (it, v) in enumerate(zip(items, frames.float().cpu())):  # v: (F, 3, H, W) in [0, 1]
            scores.append(color_identity(v * 2 - 1, it["image"].float().cpu()))
            u8 = (v.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            videos[f"{i}_{it['subject']}"] = u8
            export_to_gif([Image.fromarray(x) for x in u8], str(out / f"{i}.gif"), fps=4)
        return {"metrics": {"color_id": float(np.mean(scores))}, "videos": videos, "directory": str(out)}

    # ---- after training ------------------------------------------------------------------------
    def export(self, directory) -> Optional[str]:
        """Write a vb adapter (``vb.save_adapter``: mapper + backbone adapter tensors) that
        ``VideoBoothPipeline.load_adapter`` reads. Called by the trainer with the EMA weights."""
        import vb

        return vb.save_adapter(str(directory), self.mapper, self.backbone,
                               extra_config={"stage": self.cfg.stage, "task": "videobooth",
                                             "image_stream": self.image_stream})

