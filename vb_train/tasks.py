"""The model-specific half of training: :class:`TrainTask`.

The trainer (:mod:`vb_train.trainer`) owns everything generic: processes, optimizer, scheduler,
EMA, gradient clipping, checkpoints, exact resume, logs. A task owns the model, the data and the
loss. Its contract:

``TrainTask(cfg)``
    an ``nn.Module`` built from a :class:`vb_train.config.TrainConfig` (``cfg.model``/``cfg.data``
    hold its own options). It must build the same weights on every process for the same
    ``cfg.seed`` (the trainer seeds the global RNGs with ``cfg.seed`` right before building it).
``trainable_parameters(stage) -> iterable of nn.Parameter (or (name, Parameter))``
    what stage 1 / stage 2 trains. Every parameter must belong to the task (names come from
    ``task.named_parameters()``; they are the keys of the checkpoint files). The trainer freezes
    everything else.
``build_dataset() -> torch.utils.data.Dataset``
    map-style; deterministic per (epoch, index) if it is random (``set_epoch(epoch)`` is called
    when it exists), which is what exact resume needs.
``collate(items) -> batch``
    default ``torch.utils.data.default_collate``.
``forward(batch, generator) -> dict``
    ``{"loss": scalar tensor, ...}`` (other entries: floats or 0-d tensors, logged). All the
    randomness of a step (noise, timesteps, condition dropout) must come from ``generator``
    (a ``torch.Generator`` on the task's device that the trainer seeds from (seed, rank, step)),
    so the loss of a step does not depend on what ran before it.
``set_train_mode(stage)``
    put modules in train/eval mode for training (default: frozen parts in eval).
``export(directory)``
    optional: write the final (EMA) weights in the model's own format (the VideoBooth task
    writes a ``vb`` adapter that ``VideoBoothPipeline.load_adapter`` reads).
``validate(directory, step, progress)``
    optional: sample validation videos with the current (EMA) weights at a checkpoint; returns
    ``{"metrics": {name: float}, "videos": {name: (F, H, W, 3) uint8}}`` or None.
``enable_gradient_checkpointing()``
    optional: recompute activations in the backward (``gradient_checkpointing: true``).

:class:`DiffusionTask` implements ``forward`` for epsilon- (or v-) prediction diffusion with
condition dropout and a diffusers ``DDPMScheduler``; a subclass supplies ``latents``,
``drop_conditions`` and ``predict``. Tasks are built by name in :mod:`vb_train.registry`.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import NOISE_DEFAULTS, NOISE_KEYS, TrainConfig


# ================================================================================================
# the interface
# ================================================================================================
class TrainTask(nn.Module):
    """Base class of training tasks (module docstring)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg

    def trainable_parameters(self, stage: int) -> Iterable[nn.Parameter]:
        raise NotImplementedError

    def build_dataset(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def collate(self, items: List[dict]):
        return torch.utils.data.default_collate(items)

    def forward(self, batch, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def export(self, directory) -> Optional[str]:
        """Optional: write the trained weights in the model's own format (called once at the end,
        main process only, with the EMA weights in place). Returns a path or None."""
        return None

    def validate(self, directory, step: int, progress: bool = False) -> Optional[dict]:
        """Optional: validation samples at a checkpoint (module docstring). Default: none."""
        return None

    def after_init_from(self, loaded: set) -> None:
        """Optional: called once ``init_from``'s weights are loaded (a fresh run, not a resume),
        with the names loaded. Default: nothing."""

    def enable_gradient_checkpointing(self) -> None:
        raise ValueError(f"gradient_checkpointing: the {type(self).__name__} task does not support it")

    def set_train_mode(self, stage: int) -> None:
        """Train mode for modules holding trainable parameters, eval for the rest."""
        trainable = {id(p) for p in self.trainable_parameters(stage)}
        self.eval()
        for m in self.modules():
            if any(id(p) in trainable for p in m.parameters(recurse=False)):
                m.train()

    def named_trainable_parameters(self, stage: int) -> List[Tuple[str, nn.Parameter]]:
        """(name, parameter) of ``trainable_parameters(stage)``, names from ``named_parameters``,
        in a stable order (sorted by name), no duplicates."""
        names = {id(p): n for n, p in self.named_parameters(remove_duplicate=True)}
        out: Dict[str, nn.Parameter] = {}
        for item in self.trainable_parameters(stage):
            p = item[1] if isinstance(item, tuple) else item
            if not isinstance(p, nn.Parameter):
                raise TypeError(f"trainable_parameters: expected nn.Parameter items, got {type(p).__name__}")
            if id(p) not in names:
                raise ValueError("trainable_parameters: a parameter does not belong to the task module")
            out[names[id(p)]] = p
        if not out:
            raise ValueError(f"trainable_parameters({stage}): no parameters")
        return sorted(out.items())


def batch_size_of(batch) -> int:
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
            if isinstance(v, (list, tuple)):
                return len(v)
    if isinstance(batch, (list, tuple)):
        return batch_size_of(batch[0]) if isinstance(batch[0], (dict, list, tuple)) else len(batch)
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    raise TypeError(f"batch: cannot tell the batch size of a {type(batch).__name__}")


class DiffusionTask(TrainTask):
    """Diffusion training loss with condition dropout (DESIGN.md section 1).

    forward: drop masks (B,) from ``generator`` (``cond_dropout``, ``cond_dropout_mode``), the
    batch with dropped conditions (``drop_conditions``), clean latents x0 (``latents``, no
    gradient), t ~ U{0..T-1}, eps ~ N(0, I), x_t = add_noise(x0, eps, t) (DDPMScheduler),
    prediction (``predict``), loss = MSE(prediction, eps) (or v for ``v_prediction``), in fp32,
    plus ``sum(weight * value)`` of the regularisers ``predict`` reports in ``self.regularizers``
    (the VideoBooth task: ``mapper_l1``, ``text_drift_l1``), each also logged.

    The noise schedule and prediction type (``NOISE_KEYS``) come from ``pretrained_scheduler``
    (the pretrained model's scheduler config, when the task has one) unless the config sets
    them; a set value that differs from the pretrained one is an error naming both, unless
    ``noise_override: true``. Without a pretrained scheduler, unset keys take ``NOISE_DEFAULTS``.
    """

    def __init__(self, cfg: TrainConfig, pretrained_scheduler: Optional[dict] = None):
        super().__init__(cfg)
        from diffusers import DDPMScheduler

        self.noise_config = resolve_noise_config(cfg, pretrained_scheduler)
        self.noise_scheduler = DDPMScheduler(**self.noise_config)
        self.prediction_type = self.noise_config["prediction_type"]
        self.regularizers: Dict[str, torch.Tensor] = {}

    # -- to implement ------------------------------------------------------------------------
    def latents(self, batch, generator: torch.Generator) -> torch.Tensor:
        """Clean latents x0 of the batch (frozen encoders; no gradient needed)."""
        raise NotImplementedError

    def drop_conditions(self, batch, drop_text: torch.Tensor, drop_image: torch.Tensor):
        """The batch with the text of ``drop_text`` samples replaced by the null prompt and the
        image prompt of ``drop_image`` samples by a grey image."""
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def dropout_masks(self, b: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        p = float(self.cfg.cond_dropout)
        dev = generator.device
        if self.cfg.cond_dropout_mode == "joint":
            drop = torch.rand(b, generator=generator, device=dev) < p
            return drop, drop.clone()
        drop_text = torch.rand(b, generator=generator, device=dev) < p
        drop_image = torch.rand(b, generator=generator, device=dev) < p
        return drop_text, drop_image

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, noise, t)

    def forward(self, batch, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        b = batch_size_of(batch)
        drop_text, drop_image = self.dropout_masks(b, generator)
        batch = self.drop_conditions(batch, drop_text, drop_image)
        with torch.no_grad():
            x0 = self.latents(batch, generator)
        dev = x0.device
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator,
                          device=generator.device).to(dev)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32)
        noise = noise.to(device=dev, dtype=x0.dtype)
        noisy = self.add_noise(x0, noise, t)
        self.regularizers = {}
        pred = self.predict(noisy, t, batch, generator)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        mse = F.mse_loss(pred.float(), target.float())
        out = {"loss": mse, "dropped_text": drop_text.float().mean(), "dropped_image": drop_image.float().mean()}
        if self.regularizers:
            out["loss_mse"] = mse.detach()
            loss = mse
            for name, value in sorted(self.regularizers.items()):
                loss = loss + float(getattr(self.cfg, name)) * value.float()
                out[name] = value.detach()
            out["loss"] = loss
        self.regularizers = {}
        return out


def inference_scheduler(noise_config: dict):
    """A DDIM scheduler for sampling a model trained with ``noise_config`` (a
    ``DiffusionTask.noise_config``: DDPMScheduler keyword arguments)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**noise_config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def resolve_noise_config(cfg: TrainConfig, pretrained: Optional[dict] = None) -> dict:
    """``DDPMScheduler`` keyword arguments for ``NOISE_KEYS``: the config's value, else the
    pretrained scheduler's, else ``NOISE_DEFAULTS`` (DiffusionTask docstring). ``pretrained``:
    the pretrained scheduler's config (a mapping), or None."""
    out = {}
    for key in NOISE_KEYS:
        mine = getattr(cfg, key)
        theirs = None if pretrained is None else pretrained.get(key)
        if mine is not None and theirs is not None and mine != theirs and not cfg.noise_override:
            raise ValueError(f"{key}: the config says {mine!r}, the pretrained model's scheduler says {theirs!r}; "
                             f"remove {key} from the config to train as the model was, or set noise_override: "
                             f"true to train with {mine!r}")
        out[key] = mine if mine is not None else theirs if theirs is not None else NOISE_DEFAULTS[key]
    return out
