"""VideoBooth cross-frame attention: frames attend to reference frames, keyframes' values are
first refreshed from the image prompt's tokens, and nothing is concatenated in the fused path.

    from vb_kernels import Schedule, videobooth_attention
    out = videobooth_attention(q, k, v, k_img, v_img, schedule=Schedule.videobooth(F))
"""
from .api import BACKENDS, videobooth_attention
from .impl.fused.choice import BWD_BUILDS, backward_build
from .schedule import Schedule

__all__ = ["BACKENDS", "BWD_BUILDS", "Schedule", "backward_build", "videobooth_attention"]
