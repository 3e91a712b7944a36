"""Exponential moving average of the trainable parameters, keyed by parameter name.

The shadow copies are fp32 (whatever the parameters' dtype) and live on the parameters'
device. With ``warmup`` the decay of update n (0-based) is ``min(decay, (1 + n) / (10 + n))``
(the schedule of diffusers' ``EMAModel`` without power warm-up), so early averages are not
dominated by the initial weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Tuple

import torch
from torch import nn


class EMA:
    def __init__(self, named_params: Iterable[Tuple[str, nn.Parameter]], decay: float = 0.9999,
                 warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
        self.params: Dict[str, nn.Parameter] = dict(named_params)
        if not self.params:
            raise ValueError("named_params: nothing to average")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow: Dict[str, torch.Tensor] = {
            k: p.detach().to(torch.float32).clone() for k, p in self.params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for k, p in self.params.items():
            s = self.shadow[k]
            s.lerp_(p.detach().to(torch.float32), 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Dict[str, torch.Tensor], num_updates: int) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state: keys do not match the trainable parameters; missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for k, v in state.items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(f"EMA state[{k!r}]: expected shape {tuple(self.shadow[k].shape)}, got {tuple(v.shape)}")
            self.shadow[k].copy_(v)
        self.num_updates = int(num_updates)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.shadow[k].to(p.dtype))

    @contextmanager
    def swapped_in(self):
        """Inside the block the parameters hold the EMA weights (for evaluation)."""
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(saved[k])
