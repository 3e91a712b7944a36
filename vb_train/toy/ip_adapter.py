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

    def __init__(self, backbone: nn.Module, image_embed_dim: int, num_tokens: int = 4, scale: float = 1.0):
        super().__init__()
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
            raise ValueError(f"num_tokens: expected an int >= 1, got {num_tokens!r}")
        if not isinstance(image_embed_dim, int) or image_embed_dim < 1:
            raise ValueError(f"image_embed_dim: expected an int >= 1, got {image_embed_dim!r}")
        attns = _attn2_modules(backbone)
        cross = attns[0].to_k.in_features
        self.num_tokens, self.scale, self.cross_dim = num_tokens, float(scale), cross
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross)
        self.norm = nn.LayerNorm(cross)
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

    # ---- the image tokens of the current call ----------------------------------------------------
    def image_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, E) pooled image embeddings -> (B, num_tokens, D_text) (IP-Adapter's ImageProjModel)."""
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 2:
            raise ValueError(f"image_embeds: expected a (B, {self.proj.in_features}) tensor, got "
                             f"{getattr(image_embeds, 'shape', type(image_embeds).__name__)}")
        x = self.proj(image_embeds.to(self.proj.weight.dtype))
        return self.norm(x.view(x.shape[0], self.num_tokens, self.cross_dim))

    def set_image_embeds(self, image_embeds: Optional[torch.Tensor]) -> None:
        """Condition the next backbone call on these (B, E) embeddings (None: no image term).
        Cleared when that call returns."""
        self._tokens = None if image_embeds is None else self.image_tokens(image_embeds)

    def _capture(self, module, args, kwargs):
        emb = kwargs.get("image_embeds")
        if emb is not None:
            self._tokens = self.image_tokens(emb)

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

    cfg.model: ``ip_tokens`` [4], ``ip_scale`` [1.0]; use it with ``coarse_path: false`` and
    ``fine_path: false`` for the plain IP-Adapter baseline. The adapter's parameters train in
    every stage, beside what the VideoBooth task trains."""

    def __init__(self, cfg, components=None):
        super().__init__(cfg, components)
        m = cfg.model
        self.ip_adapter = IPAdapter(self.backbone, int(self.image_encoder.embed_dim),
                                    num_tokens=int(m.get("ip_tokens", 4)), scale=float(m.get("ip_scale", 1.0)))

    def trainable_parameters(self, stage: int):
        return list(super().trainable_parameters(stage)) + list(self.ip_adapter.parameters())

    def predict(self, noisy, timesteps, batch, generator):
        # the coarse path may be off (then the task passes no image_embeds): give them here
        with torch.no_grad():
            enc = self.image_encoder((batch["image"].float() + 1) / 2)
        self.ip_adapter.set_image_embeds(enc.image_embeds)
        try:
            return super().predict(noisy, timesteps, batch, generator)
        finally:
            self.ip_adapter.set_image_embeds(None)
