"""VideoBooth (Jiang et al., CVPR 2024) on diffusers, with the cross-frame attention of ``vb_kernels``.

    import vb
    parts = vb.build_tiny_videobooth("unet")          # or your own components, see docs/model.md
    pipe = parts.pipeline()
    video = pipe("a dog on the grass", "dog", image, num_frames=4, num_inference_steps=2).frames[0]
"""
from .adapter import load_adapter, save_adapter
from .coarse import (ImageEncoderOutput, VideoBoothImageEncoder, VideoBoothMapper, encode_prompt, find_subject_span,
                     inject_subject_ids, word_token_ids)
from .context import VideoBoothContext, VideoBoothState
from .dit import VideoDiT
from .pipeline import VideoBoothPipeline, VideoBoothPipelineOutput
from .processors import (LearnedTokenBank, PooledTokenBank, VideoBoothAttnProcessor, VideoBoothTextAttnProcessor,
                         resolve_schedule, without_image)
from .components import VideoBoothComponents
from .official.convert import load_official
from .tiny import build_tiny_videobooth
from .tokenizer import clip_tokenizer
from .unet import VideoBoothUNet, install_videobooth, uninstall_videobooth


__all__ = [
    "ImageEncoderOutput", "LearnedTokenBank", "PooledTokenBank", "VideoBoothAttnProcessor", "VideoBoothComponents",
    "VideoBoothContext", "VideoBoothImageEncoder", "VideoBoothState", "VideoBoothMapper", "VideoBoothPipeline",
    "VideoBoothPipelineOutput", "VideoBoothTextAttnProcessor", "VideoBoothUNet", "VideoDiT",
    "build_tiny_videobooth", "clip_tokenizer", "encode_prompt", "find_subject_span", "inject_subject_ids",
    "install_videobooth", "load_adapter", "load_official", "resolve_schedule", "save_adapter", "uninstall_videobooth",
    "without_image", "word_token_ids",
]
