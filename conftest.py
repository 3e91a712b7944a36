"""Shared by tests/ and bench/. On a machine without a CUDA GPU the Triton kernels run through
the interpreter: TRITON_INTERPRET must be set before any @triton.jit function is created, so it
is set here, before the kernels package is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# fp32 dots in IEEE precision, so DESIGN.md's fp32 tolerance (1e-5) means something on a GPU.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
