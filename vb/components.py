"""``VideoBoothComponents``: everything :class:`vb.VideoBoothPipeline` takes, as one object (what
:func:`vb.build_tiny_videobooth` returns and the trainer builds its model from)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .coarse import VideoBoothImageEncoder, VideoBoothMapper
from .pipeline import VideoBoothPipeline


@dataclass
class VideoBoothComponents:
    """Everything :class:`vb.VideoBoothPipeline` takes, plus helpers."""

    tokenizer: Any
    text_encoder: Any
    image_encoder: VideoBoothImageEncoder
    mapper: VideoBoothMapper
    backbone: Any
    vae: Any
    scheduler: Any

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def pipeline(self):
        """A :class:`vb.VideoBoothPipeline` over these components."""
        return VideoBoothPipeline(**self.as_dict())

    def stage_parameters(self, stage: int, include_temporal: bool = False):
        """Parameters trained in VideoBooth stage 1 (mapper + attn2 K/V) or 2 (+ attn1's four)."""
        return list(self.mapper.parameters()) + list(self.backbone.stage_parameters(stage, include_temporal))
