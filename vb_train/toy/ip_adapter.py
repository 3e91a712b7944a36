"""IP-Adapter-style image prompting on the VideoBooth backbone: the baseline a practitioner would
pick instead of VideoBooth (issue 14, item 4; the ablations' ``ipadapter`` arm).

IP-Adapter (Ye et al. 2023, arXiv 2308.06721; diffusers' ``IPAdapterAttnProcessor2_0``, also on
AnimateDiff) conditions a text-to-image model on an image by *decoupled cross-attention*: the
pooled CLIP image embedding is projected to a few tokens (``ImageProjModel``: a linear layer and
a LayerNorm), and every text cross-attention gets its own K/V projections for them. With the
frozen query q = to_q(x):

    attn2(x) = to_out( softmax(q K_text^T) V_text + scale * softmax(q K_ip^T) V_ip )

Nothing replaces the subject word (no coarse path), nothing reads the image latent (no fine
path). Here the extra term is added after ``to_out`` as ``scale * W_out (softmax(q K_ip^T) V_ip)``:
the same sum, since ``to_out`` is affine (its bias is not added twice). The text half is the
attn2 processor that is installed (VideoBooth's, with its new text K/V), untouched: the adapter
is forward hooks on the attn2 modules, so no parameter of the backbone is renamed and the
backbone's checkpoints load as they are.

IP-Adapter-Plus (``kind="plus"``, the variant practitioners use for detail: diffusers'
``IPAdapterPlusImageProjection``) replaces the pooled embedding by a *resampler*: learned query
tokens cross-attend (perceiver layers) to one tower layer's tokens, class and patch tokens, each
with its position, so its image tokens can carry where things are in the prompt.

Where the image embedding comes from: the backbone's ``image_embeds`` argument, which
``vb.VideoBoothPipeline`` always passes (the image encoder's pooled embedding), or
:meth:`IPAdapter.set_image_embeds` before a call (the training task does that).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..videobooth_task import VideoBoothTask


def _attn2_modules(backbone: nn.Module) -> List[nn.Module]:
    """The text cross-attention modules (diffusers ``Attention`` named ``*.attn2``) in order."""
    mods = [m for name, m in backbone.named_modules()
            if name.split(".")[-1] == "attn2" and getattr(m, "is_cross_attention", False)]
    if not mods:
        raise ValueError(f"backbone: no text cross-attention (attn2) in {type(backbone).__name__}; the "
                         f"IP-Adapter arm needs the U-Net backbone")
    return mods


class Resampler(nn.Module):
    """IP-Adapter-Plus's image projection, small: ``num_tokens`` learned queries, ``depth``
    perceiver layers (the queries attend to [image tokens; queries], then an MLP, both
    residual), a projection to the text width and a LayerNorm.

    Args:
        in_dim: the tower's token width C_vis. dim: the resampler's width. out_dim: D_text.
    """

    def __init__(self, in_dim: int, dim: int, out_dim: int, num_tokens: int = 4, depth: int = 2, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim: expected a multiple of heads={heads}, got {dim}")
        self.queries = nn.Parameter(torch.randn(1, num_tokens, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict({
                "norm_x": nn.LayerNorm(dim), "norm_q": nn.LayerNorm(dim),
                "attn": nn.MultiheadAttention(dim, heads, batch_first=True),
                "ff": nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))}))
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, C_vis) -> (B, num_tokens, D_text)."""
        x = self.proj_in(tokens)
        q = self.queries.expand(x.shape[0], -1, -1).to(x.dtype)
        for layer in self.layers:
            qn = layer["norm_q"](q)
            kv = torch.cat([layer["norm_x"](x), qn], dim=1)
            q = q + layer["attn"](qn, kv, kv, need_weights=False)[0]
            q = q + layer["ff"](q)
        return self.norm_out(self.proj_out(q))


class IPAdapter(nn.Module):
    """Decoupled image cross-attention on every attn2 of `backbone` (module docstring).

    Args:
        backbone: a ``vb.VideoBoothUNet`` (anything whose attn2 modules are diffusers
            ``Attention`` with ``to_q``/``to_k``/``to_v``/``to_out``).
        image_embed_dim: E, the pooled image embedding's width.
        num_tokens: image tokens the embedding is projected to (IP-Adapter's default is 4).
        scale: weight of the image term (IP-Adapter's ``scale``).

    Parameters: ``proj`` (E -> num_tokens * D_text), ``norm``, and per attn2 ``to_k_ip[i]`` /
    ``to_v_ip[i]`` (D_text -> C), initialised as copies of that layer's ``to_k``/``to_v`` as
    IP-Adapter does.
    """

    def __init__(self, backbone: nn.Module, image_embed_dim: int, num_tokens: int = 4, scale: float = 1.0, *,
                 kind: str = "pooled", image_encoder: Optional[nn.Module] = None, layer: int = -1):
        super().__init__()
        if kind not in ("pooled", "plus"):
            raise ValueError(f"kind: expected 'pooled' or 'plus', got {kind!r}")
        if kind == "plus" and image_encoder is None:
            raise ValueError("image_encoder: required with kind='plus' (the resampler reads its layer tokens)")
        self.kind, self.layer = kind, int(layer)
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
            raise ValueError(f"num_tokens: expected an int >= 1, got {num_tokens!r}")
        if not isinstance(image_embed_dim, int) or image_embed_dim < 1:
            raise ValueError(f"image_embed_dim: expected an int >= 1, got {image_embed_dim!r}")
        attns = _attn2_modules(backbone)
        cross = attns[0].to_k.in_features
        self.num_tokens, self.scale, self.cross_dim = num_tokens, float(scale), cross
        if kind == "pooled":
            self.proj = nn.Linear(image_embed_dim, num_tokens * cross)
            self.norm = nn.LayerNorm(cross)
        else:
            self.resampler = Resampler(int(image_encoder.hidden_size), 64, cross, num_tokens)
        self.to_k_ip = nn.ModuleList()
        self.to_v_ip = nn.ModuleList()
        for a in attns:
            for src, dst in ((a.to_k, self.to_k_ip), (a.to_v, self.to_v_ip)):
                lin = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None)
                lin.load_state_dict(src.state_dict())
                dst.append(lin)
        # not submodules: the backbone owns them (a plain list is not registered)
        self._attns = attns
        self._tokens: Optional[torch.Tensor] = None
        self._handles = [a.register_forward_hook(self._attn_hook(i), with_kwargs=True) for i, a in enumerate(attns)]
        self._handles.append(backbone.register_forward_pre_hook(self._capture, with_kwargs=True))
        self._handles.append(backbone.register_forward_hook(self._release))
        # plus: the encoder's layer tokens of each prompt it encodes, found again by the pooled
        # embedding the pipeline hands the backbone (kept for the last few encoder calls)
        self._seen: List[tuple] = []
        if kind == "plus":
            self._handles.append(image_encoder.register_forward_hook(self._remember))

    def _remember(self, module, args, out):
        self._seen = (self._seen + [(out.image_embeds.detach(), out.layer_tokens[:, self.layer].detach())])[-4:]

    def _lookup(self, image_embeds: torch.Tensor) -> torch.Tensor:
        rows = []
        for e in image_embeds:
            for pooled, tokens in reversed(self._seen):
                hit = (pooled == e.to(pooled.dtype)).all(-1).nonzero()
                if len(hit):
                    rows.append(tokens[int(hit[0])])
                    break
            else:
                raise RuntimeError("IP-Adapter-Plus: the backbone got an image embedding the image encoder did not "
                                   "produce (call the backbone through the pipeline, or set_image_embeds first)")
        return torch.stack(rows)

    # ---- the image tokens of the current call ----------------------------------------------------
    def image_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, E) pooled image embeddings -> (B, num_tokens, D_text) (IP-Adapter's ImageProjModel);
        plus: (B, T, C_vis) layer tokens -> (B, num_tokens, D_text) (the resampler)."""
        if self.kind == "plus":
            if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3:
                raise ValueError(f"image_embeds: expected (B, T, C_vis) layer tokens for IP-Adapter-Plus, got "
                                 f"{getattr(image_embeds, 'shape', type(image_embeds).__name__)}")
            return self.resampler(image_embeds.to(self.resampler.proj_in.weight.dtype))
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 2:
            raise ValueError(f"image_embeds: expected a (B, {self.proj.in_features}) tensor, got "
                             f"{getattr(image_embeds, 'shape', type(image_embeds).__name__)}")
        x = self.proj(image_embeds.to(self.proj.weight.dtype))
        return self.norm(x.view(x.shape[0], self.num_tokens, self.cross_dim))

    def set_image_embeds(self, image_embeds: Optional[torch.Tensor]) -> None:
        """Condition the next backbone call on these (B, E) embeddings, or (B, T, C_vis) layer
        tokens for IP-Adapter-Plus (None: no image term).
        Cleared when that call returns."""
        self._tokens = None if image_embeds is None else self.image_tokens(image_embeds)

    def _capture(self, module, args, kwargs):
        emb = kwargs.get("image_embeds")
        if emb is not None and self._tokens is None:  # (tokens set for this call take precedence)
            self._tokens = self.image_tokens(self._lookup(emb) if self.kind == "plus" else emb)

    def _release(self, module, args, output):
        self._tokens = None

    def remove(self) -> None:
        """Detach the hooks (the backbone is then as before)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- the decoupled attention -----------------------------------------------------------------
    def _attn_hook(self, i: int):
        def hook(attn, args, kwargs, output):
            tokens = self._tokens
            if tokens is None or self.scale == 0.0:
                return output
            x = args[0] if args else kwargs["hidden_states"]
            if x.dim() != 3:
                raise ValueError(f"IP-Adapter: attn2 input of shape (B, N, C) expected, got {tuple(x.shape)}")
            b = x.shape[0]
            if b % tokens.shape[0]:
                raise ValueError(f"IP-Adapter: attn2 batch {b} is not a multiple of the image batch "
                                 f"{tokens.shape[0]}")
            tok = tokens.to(x.dtype).repeat_interleave(b // tokens.shape[0], 0)  # frames of a clip share it
            h = attn.heads
            q = attn.to_q(x)
            d = q.shape[-1] // h
            q = q.view(b, -1, h, d).transpose(1, 2)
            k = self.to_k_ip[i](tok).view(b, -1, h, d).transpose(1, 2)
            v = self.to_v_ip[i](tok).view(b, -1, h, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
            o = o.transpose(1, 2).reshape(b, -1, h * d)
            extra = F.linear(o, attn.to_out[0].weight) * self.scale
            if getattr(attn, "rescale_output_factor", 1.0) != 1.0:
                extra = extra / attn.rescale_output_factor
            return output + extra.to(output.dtype)
        return hook


class IPAdapterTask(VideoBoothTask):
    """The VideoBooth task with an :class:`IPAdapter` on the backbone (``task: vb_train.toy.ip_adapter:IPAdapterTask``).

    cfg.model: ``ip_tokens`` [4], ``ip_scale`` [1.0], ``ip_kind`` ["pooled"; "plus": IP-Adapter-Plus],
    ``ip_layer`` [-1: the deepest of the image encoder's mapped layers]; use it with ``coarse_path: false`` and
    ``fine_path: false`` for the plain IP-Adapter baseline. The adapter's parameters train in
    every stage, beside what the VideoBooth task trains."""

    def __init__(self, cfg, components=None):
        super().__init__(cfg, components)
        m = cfg.model
        kind = m.get("ip_kind", "pooled")
        self.ip_adapter = IPAdapter(self.backbone, int(self.image_encoder.embed_dim),
                                    num_tokens=int(m.get("ip_tokens", 4)), scale=float(m.get("ip_scale", 1.0)),
                                    kind=kind, image_encoder=self.image_encoder, layer=int(m.get("ip_layer", -1)))

    def trainable_parameters(self, stage: int):
        return list(super().trainable_parameters(stage)) + list(self.ip_adapter.parameters())

    def predict(self, noisy, timesteps, batch, generator):
        # the coarse path may be off (then the task passes no image_embeds): give them here
        with torch.no_grad():
            enc = self.image_encoder((batch["image"].float() + 1) / 2)
        ip = self.ip_adapter
        ip.set_image_embeds(enc.layer_tokens[:, ip.layer] if ip.kind == "plus" else enc.image_embeds)
        try:
            return super().predict(noisy, timesteps, batch, generator)
        finally:
            self.ip_adapter.set_image_embeds(None)
