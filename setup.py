"""VideoBooth with fused Triton attention: vb_kernels/, vb/, vb_train/, bench/ (see README.md)."""
from setuptools import find_packages, setup

MODEL = [
    "diffusers>=0.30",
    "transformers>=4.40",
    "open_clip_torch>=2.24",
    "safetensors>=0.4",
    "accelerate>=0.30",
    "timm>=0.9",
    "tqdm>=4.60",
]
TRAIN = MODEL + ["av>=17", "imageio>=2.30", "imageio-ffmpeg>=0.4", "matplotlib>=3.7", "peft>=0.10", "pyyaml>=6", "tensorboard>=2.10"]
BENCH = ["pytest-benchmark>=4.0", "nvtx>=0.2", "matplotlib>=3.7"]

setup(
    name="videobooth-triton",
    version="0.1.0",
    description="VideoBooth (image-prompted text-to-video diffusion) with fused Triton cross-frame attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vb_kernels", "vb_kernels.*", "vb", "vb.*", "vb_train", "vb_train.*", "bench", "bench.*"]),
    python_requires=">=3.10",
    # torch: the registry's default (CUDA) build, which also runs on CPU; torchvision, pulled by
    # open_clip and timm, only works with that build. The GPU machines run torch 2.11 / triton 3.6.
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux'",
        "einops>=0.7",
        "numpy>=1.24",
    ],
    extras_require={
        "model": MODEL,
        "train": TRAIN,
        "bench": BENCH,
        "flash": ["flash-attn>=2.5"],
        # pytest-xdist: the CPU suite runs on every core (README's test command, .ci/run)
        "dev": sorted(set(TRAIN + BENCH + ["pytest>=7.4", "pytest-xdist>=3.5"])),
    },
)
