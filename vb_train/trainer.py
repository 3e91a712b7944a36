"""The training loop on accelerate's and diffusers' machinery: ``Accelerator`` processes, mixed
precision, gradient accumulation (``accelerator.accumulate``), state saving and loading
(``save_state`` / ``load_state`` with hooks, ``register_for_checkpointing``), trackers
(``init_trackers`` / ``log``: tensorboard by default, wandb, ...), ``set_seed``,
``skip_first_batches``; diffusers' ``EMAModel`` and ``get_scheduler``. Model, data and loss come
from a :class:`vb_train.tasks.TrainTask`.

What the libraries do not give, and this file adds:

* atomic checkpoints: ``save_state`` writes into ``checkpoints/.tmp-step-N``, which is fsynced and
  renamed to ``step-N`` once complete (:mod:`vb_train.checkpoint`); a kill at any point leaves the
  previous checkpoints intact. accelerate's own ``total_limit`` deletes checkpoints in place, so
  pruning stays ours (rename, then delete);
* checkpoints hold the trainable weights only (a save hook writes them, and the EMA, by parameter
  name to safetensors; the frozen pretrained weights are rebuilt from ``cfg.seed`` / the
  pretrained files), plus accelerate's optimizer, scaler, RNG and registered LR-scheduler state;
* exact resume. Everything a step depends on is either restored from the checkpoint or a pure
  function of (seed, rank, step): weights, EMA, optimizer, LR scheduler, grad scaler and every
  process's global RNGs (accelerate's state); the data order (epoch e's permutation is
  ``randperm(n)`` seeded with (seed, e), accelerate shards its batches over the processes, and a
  resumed run skips the batches this process already read with ``skip_first_batches``, without
  loading them; datasets that draw random augmentations do it from (seed, epoch, index) through
  ``set_epoch``); the randomness of step s (noise, timesteps, condition dropout) comes from a
  ``torch.Generator`` seeded with (seed, rank, micro-batch number), not from global state.
  So on CPU a resumed run reproduces the uninterrupted run's losses bit for bit (tests/test_train.py).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import TrainConfig
from .registry import build_task
from .tasks import TrainTask

log = logging.getLogger(__name__)

FAULT_ENV = "VB_TRAIN_FAULT"  # testing hook: "exit_after_step=N" or "exit_in_save=N" (os._exit, no cleanup)
FAULT_EXIT_CODE = 86
TRACKER_PROJECT = "videobooth"


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams for (seed, rank, step), ...)."""
    a, b = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)


def seed_all(seed: int) -> None:
    """python, numpy, torch (and CUDA) global RNGs from one seed (``accelerate.utils.set_seed``;
    numpy's global seed takes 32 bits, so larger seeds are folded)."""
    from accelerate.utils import set_seed

    set_seed(int(seed) % 2 ** 32 if seed >= 2 ** 32 else int(seed))


# ================================================================================================
# data order
# ================================================================================================
class EpochBatchSampler(torch.utils.data.Sampler):
    """Global batches of a seeded per-epoch permutation; accelerate shards them over processes.

    Epoch e: ``perm = randperm(n, seed=(seed, e))`` (or ``arange`` without shuffle), cut to a
    multiple of ``batch_size * world_size`` (so every process runs the same number of steps),
    yielded as ``len(perm) / batch_size`` batches of ``batch_size``; accelerate's
    ``BatchSamplerShard`` gives process r batches r, r + world_size, ... .
    ``set_epoch(e)`` selects the epoch the next iteration yields.
    """

    def __init__(self, num_items: int, batch_size: int, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if num_items < batch_size * world_size:
            raise ValueError(f"dataset: {num_items} items is fewer than one global batch "
                             f"(batch_size {batch_size} x {world_size} processes)")
        self.n, self.batch_size, self.world = num_items, batch_size, world_size
        self.drop_last = True  # read by accelerate's BatchSamplerShard
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches each process reads per epoch."""
        return self.n // (self.batch_size * self.world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self, epoch: int) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, 0x5A3D, epoch))
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        return perm[:self.batches_per_epoch * self.batch_size * self.world]

    def __len__(self) -> int:
        return self.batches_per_epoch * self.world

    def __iter__(self) -> Iterator[List[int]]:
        idx, bs = self.epoch_indices(self.epoch), self.batch_size
        for i in range(len(self)):
            yield idx[i * bs:(i + 1) * bs]


# ================================================================================================
# optimizer, trackers, EMA
# ================================================================================================
def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """AdamW (``cfg.optimizer = "adamw"``) or bitsandbytes' 8-bit AdamW (``"adamw8bit"``)."""
    kw = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError("optimizer: 'adamw8bit' needs bitsandbytes (pip install bitsandbytes); "
                             "use optimizer: adamw without it") from e
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def resolve_trackers(report_to) -> List[str]:
    """accelerate tracker names of ``cfg.report_to`` whose packages are installed; a requested
    tracker whose package is missing is an error naming it."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    avail = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    out = []
    for n in names:
        if n == "none":
            continue
        if n in avail and not avail[n]():
            raise ValueError(f"report_to: {n!r} is not installed (pip install {n}); use report_to: [] for no tracker")
        out.append(n)
    return out


def _tracker_config(cfg: TrainConfig) -> dict:
    """The config flattened to scalars (tensorboard's hparams take nothing else)."""
    flat = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        elif isinstance(v, (int, float, str, bool)):
            flat[prefix] = v
        else:
            flat[prefix] = json.dumps(v)
    walk("", cfg.to_dict())
    return flat


def build_ema(cfg: TrainConfig, params):
    """diffusers' ``EMAModel`` over the trainable parameters (None when ``ema_decay`` is 0).

    Its decay for update n (1-based) is 0 for n = 1 (the average starts at the first trained
    weights) and then ``min(ema_decay, n / (9 + n))`` with ``ema_warmup``, ``ema_decay`` without
    (``min_decay = ema_decay``)."""
    if cfg.ema_decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=cfg.ema_decay, min_decay=0.0 if cfg.ema_warmup else cfg.ema_decay,
                    use_ema_warmup=False)


# ================================================================================================
# the trainer
# ================================================================================================
def check_distributed_setup(acc, environ) -> None:
    """Refuse a launch that accelerate did not set up as launched, instead of training something
    else: an FSDP config (``ACCELERATE_USE_FSDP``) that accelerate turned into another mode
    (accelerate 1.16 wraps models in FSDP on accelerators only: on a CPU machine it gives DDP on
    gloo with ``device: cpu`` and one independent process per rank without), or WORLD_SIZE
    processes that each think they are alone (every one would write the same run)."""
    from accelerate.utils import DistributedType

    wants_fsdp = str(environ.get("ACCELERATE_USE_FSDP", "false")).lower() in ("1", "true")
    if wants_fsdp and acc.distributed_type != DistributedType.FSDP:
        import accelerate

        raise RuntimeError(
            f"accelerate config: FSDP was requested, but accelerate {accelerate.__version__} set up "
            f"{acc.distributed_type.value} on {acc.device} (it wraps models in FSDP on accelerators only). "
            "On CPUs train with DDP (configs/accelerate/ddp.yaml, or accelerate launch --multi_gpu with device: cpu); "
            "the trainer's FSDP needs GPUs (vb_train.trainer.FSDPProcess shards a model with accelerate's FSDP2 on "
            "CPU processes, as tests/test_train_fsdp.py does)")
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and acc.num_processes != world:
        raise RuntimeError(f"launcher: WORLD_SIZE={world} processes were started, but accelerate set up "
                           f"{acc.num_processes} ({acc.distributed_type.value}); each would train alone and write the "
                           "same run. With device: cpu, launch with --multi_gpu (gloo); on GPUs, check the accelerate config")


def sharded_parameters(model: torch.nn.Module, names: List[str]) -> List[tuple]:
    """``(name, parameter)`` of ``model`` for ``names``, looked up again after sharding.
    FSDP2's ``fully_shard`` replaces every parameter by a sharded ``DTensor`` under the same
    name, so the parameter objects collected before (the trainer's list, for gradient
    clipping) are no longer the model's: their ``.grad`` stays None and a clip over them clips
    nothing."""
    own = dict(model.named_parameters())
    missing = [n for n in names if n not in own]
    if missing:
        raise ValueError(f"model: {len(missing)} trainable parameters are not found by name after sharding "
                         f"(e.g. {missing[:3]}); FSDP2 (fsdp_version: 2) keeps the names, FSDP1 does not")
    return [(n, own[n]) for n in names]


class FSDPProcess:
    """What accelerate's FSDP2 helpers (``fsdp2_prepare_model``, ``save_fsdp_model`` /
    ``load_fsdp_model``, ``save_fsdp_optimizer`` / ``load_fsdp_optimizer``) read of an
    ``Accelerator``, for a process group accelerate did not set up as FSDP: accelerate 1.16 wraps
    models in FSDP on accelerators only (on CPU processes it gives DDP), while PyTorch's
    ``fully_shard`` runs on CPU processes with gloo. So the sharding, the state-dict options and
    the distributed checkpoint are accelerate's own, from the plugin that ``accelerate launch
    --config_file configs/accelerate/fsdp.yaml`` sets up (``FullyShardedDataParallelPlugin()``
    reads it from the environment). tests/test_train_fsdp.py runs the stage-2 step through it."""

    def __init__(self, fsdp_plugin, device, mixed_precision: str = "no"):
        import torch.distributed as dist

        if getattr(fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError(f"fsdp_plugin: expected fsdp_version 2 (FSDP2, fully_shard), got "
                             f"{getattr(fsdp_plugin, 'fsdp_version', None)}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("FSDPProcess: torch.distributed is not initialised (launch with accelerate launch "
                               "or torchrun, then init_process_group)")
        from types import SimpleNamespace

        self.state = SimpleNamespace(fsdp_plugin=fsdp_plugin)
        self.device = torch.device(device)
        self.mixed_precision = mixed_precision
        self.process_index, self.num_processes = dist.get_rank(), dist.get_world_size()
        self.is_main_process = self.process_index == 0
        self.torch_device_mesh = None  # one flat mesh over every process (fully_shard's default)
        self.parallelism_config = None
        self.is_fsdp = True

    def wait_for_everyone(self) -> None:
        torch.distributed.barrier()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` sharded in place by accelerate's ``fsdp2_prepare_model`` (units from the
        plugin's auto-wrap policy, then the root); returns it."""
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(self, model.to(self.device))


class Trainer:
    """Runs one training stage of a task.

    >>> Trainer(load_config("configs/videobooth_tiny_stage1.yaml")).train()

    ``task``: an already built :class:`TrainTask` (default: ``build_task(cfg)``). Its weights must
    be the same on every process.
    """

    def __init__(self, cfg: TrainConfig, task: Optional[TrainTask] = None):
        from accelerate import Accelerator
        from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, GradientAccumulationPlugin,
                                      ProjectConfiguration)

        self.cfg = cfg.validate()
        self.out = Path(cfg.output_dir)
        self.trackers = resolve_trackers(cfg.report_to)
        # sync_with_dataloader=False: a step's micro-batches may straddle an epoch boundary (the
        # data never ends here); the gradients sync on every grad_accum-th micro-batch only.
        self.accelerator = Accelerator(
            cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum,
                                                                    sync_with_dataloader=False),
            log_with=self.trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)])
        acc = self.accelerator
        check_distributed_setup(acc, os.environ)
        if cfg.attn_backend == "flex" and acc.device.type == "cpu":
            raise ValueError("attn_backend: 'flex' (FlexAttention) has no backward on CPU; train with "
                             "'reference', 'sdpa' or 'triton' there")
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.rank, self.world = acc.process_index, acc.num_processes
        self.main = acc.is_main_process
        # FSDP shards the parameters themselves: accelerate saves and loads the model, the
        # trainable weights are gathered for trainable.safetensors, and there is no EMA
        # (EMAModel keeps full copies). accelerate sets FSDP up on accelerators only; on a CPU
        # machine check_distributed_setup refuses an FSDP launch (docs/train.md).
        self.fsdp = acc.distributed_type == DistributedType.FSDP
        if self.fsdp and cfg.ema_decay > 0:
            raise ValueError("ema_decay: diffusers' EMAModel keeps a full copy of the trained weights on every "
                             "process, which FSDP's sharding avoids; set ema_decay: 0 with FSDP, or train with DDP")
        self.ckpt_root = self.out / ckpt.CKPT_DIR
        self._fault = _parse_fault(os.environ.get(FAULT_ENV, ""))
        self._stop = False

        # -- the task (same weights everywhere: seeded with cfg.seed) --------------------------
        seed_all(cfg.seed)
        self.task = task if task is not None else build_task(cfg)
        self.resume_from = self._find_resume()
        if self.resume_from is None and cfg.init_from:
            self._init_weights(cfg.init_from)
        self.named_params = self.task.named_trainable_parameters(cfg.stage)
        self.task.requires_grad_(False)
        for _, p in self.named_params:
            p.requires_grad_(True)
        self.params = [p for _, p in self.named_params]
        # As the diffusers examples: the frozen weights in the weight dtype of mixed precision
        # (half the memory, no per-step casts), the trained ones stay fp32 for the optimizer.
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        if self.weight_dtype != torch.float32 and cfg.cast_frozen:
            trained = {id(p) for p in self.params}
            for p in self.task.parameters():
                if id(p) not in trained and p.is_floating_point():
                    p.data = p.data.to(self.weight_dtype)
        self.task.to(acc.device)
        if cfg.gradient_checkpointing:
            self.task.enable_gradient_checkpointing()
        self.task.set_train_mode(cfg.stage)

        # -- optimisation ------------------------------------------------------------------------
        from diffusers.optimization import get_scheduler

        self.optimizer = build_optimizer(cfg, self.params)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps)
        self.ema = build_ema(cfg, self.params)

        # -- data --------------------------------------------------------------------------------
        self.dataset = self.task.build_dataset()
        self.sampler = EpochBatchSampler(len(self.dataset), cfg.batch_size, self.world, cfg.seed)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=self.cfg.num_workers,
            collate_fn=self.task.collate, persistent_workers=False,
            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, 0xDA7A)),
            pin_memory=acc.device.type == "cuda")
        # The LR scheduler stays outside prepare (accelerate's wrapper would step it once per
        # process); it is saved with the state as a registered object.
        self.model, self.optimizer, self.loader = acc.prepare(self.task, self.optimizer, loader)
        if self.fsdp:  # FSDP2 replaced every parameter by a sharded one (same name): clip and digest those
            self.named_params = sharded_parameters(self.model, [n for n, _ in self.named_params])
            self.params = [p for _, p in self.named_params]
        acc.register_for_checkpointing(self.lr_scheduler)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)

        # -- position ------------------------------------------------------------------------------
        self.step = 0            # optimizer steps done
        self.epoch = 0           # data position: epoch ...
        self.batch_in_epoch = 0  # ... and batches of it this process has consumed
        if self.resume_from is not None:
            self._load(self.resume_from)
        else:
            seed_all(derive_seed(cfg.seed, 0xC0FFEE, self.rank))

    # ---------------------------------------------------------------------------------------------
    def _find_resume(self) -> Optional[Path]:
        r = self.cfg.resume
        if r == "never":
            if ckpt.list_checkpoints(self.ckpt_root):
                raise ValueError(f"resume: 'never', but {self.ckpt_root} already holds checkpoints of another "
                                 f"run (a later resume would mix them up); use a new output_dir or resume: auto")
            return None
        if r == "auto":
            return ckpt.latest_checkpoint(self.ckpt_root)
        return ckpt.resolve_checkpoint(r)

    def _init_weights(self, path: str) -> None:
        """Stage 2's start: the (EMA) weights of a stage-1 checkpoint, by name."""
        src = ckpt.resolve_checkpoint(path)
        weights = ckpt.load_weights(src, self.cfg.init_weights)
        ckpt.copy_named(self.task, weights, f"init_from: {src}")
        self.task.after_init_from(set(weights))  # e.g. VideoBooth's exemplars, cloned at stage 2's start
        if self.main:
            log.info("initialised %d tensors from %s (%s)", len(weights), src, self.cfg.init_weights)
        self.init_source = str(src)

    # -- accelerate's state hooks: trainable weights and EMA by name, not the whole model --------
    def _save_hook(self, models, weights, output_dir) -> None:
        trained = dict(self.named_params)
        if self.fsdp:  # every process takes part in the gather; the main one gets the full tensors
            full = self.accelerator.get_state_dict(self.model)
            trained = {k: full[k] for k in trained} if self.main else {}
        if self.main:
            meta = {"step": self.step, "stage": self.cfg.stage, "task": self.cfg.task}
            ckpt.save_tensors(trained, Path(output_dir) / ckpt.TRAINABLE_FILE, meta)
            if self.ema is not None:
                ckpt.save_tensors(self.ema_state_dict(), Path(output_dir) / ckpt.EMA_FILE, meta)
        weights.clear()  # accelerate would write the whole task (frozen weights too)

    def _load_hook(self, models, input_dir) -> None:
        if self.fsdp:
            return  # accelerate has loaded the (sharded) model itself
        path = Path(input_dir)
        weights = ckpt.load_tensors(path / ckpt.TRAINABLE_FILE)
        names = {k for k, _ in self.named_params}
        if set(weights) != names:
            raise ValueError(f"resume: {path} holds other parameters than this stage trains: missing "
                             f"{sorted(names - set(weights))[:5]}, unexpected {sorted(set(weights) - names)[:5]}")
        ckpt.copy_named(self.task, weights, f"resume: {path}")
        if self.ema is not None:
            if (path / ckpt.EMA_FILE).is_file():
                self.load_ema_state_dict(ckpt.load_tensors(path / ckpt.EMA_FILE),
                                         ckpt.load_state(path).get("ema_updates", 0))
            else:
                log.warning("resume: %s has no EMA; the EMA restarts from the current weights", path)
        models.clear()  # loaded above

    def ema_state_dict(self) -> Dict[str, torch.Tensor]:
        """The EMA weights by trainable-parameter name."""
        return {k: s for (k, _), s in zip(self.named_params, self.ema.shadow_params)}

    def load_ema_state_dict(self, state: Dict[str, torch.Tensor], num_updates: int) -> None:
        names = [k for k, _ in self.named_params]
        if set(state) != set(names):
            raise ValueError(f"EMA state: keys do not match the trainable parameters; missing "
                             f"{sorted(set(names) - set(state))[:5]}, unexpected {sorted(set(state) - set(names))[:5]}")
        with torch.no_grad():
            for k, s in zip(names, self.ema.shadow_params):
                if state[k].shape != s.shape:
                    raise ValueError(f"EMA state[{k!r}]: expected shape {tuple(s.shape)}, got {tuple(state[k].shape)}")
                s.copy_(state[k])
        self.ema.optimization_step = int(num_updates)

    def _load(self, path: Path) -> None:
        cfg = self.cfg
        state = ckpt.load_state(path)
        if state.get("format", 1) != ckpt.FORMAT_VERSION:
            raise ValueError(f"resume: {path} is a format-{state.get('format', 1)} checkpoint (an older trainer), "
                             f"this trainer reads format {ckpt.FORMAT_VERSION}; start a new output_dir with "
                             f"init_from: {path} (its weights load)")
        if state.get("stage") != cfg.stage:
            raise ValueError(f"resume: {path} is a stage-{state.get('stage')} checkpoint, this run is stage "
                             f"{cfg.stage}; use init_from to start stage 2 from stage 1, and a new output_dir")
        for key in ("batch_size", "grad_accum", "seed", "world_size"):
            old = state.get(key)
            new = self.world if key == "world_size" else getattr(cfg, key)
            if old is not None and old != new:
                log.warning("resume: %s was %s, now %s: the run continues but not exactly as it would have",
                            key, old, new)
        self.accelerator.load_state(str(path))  # hooks above, optimizer, LR scheduler, scaler, RNGs
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        if self.batch_in_epoch >= self.sampler.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if self.main:
            log.info("resumed from %s (step %d, epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)

    # ---------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator:
        """Batches forever from the current data position; the position advances as they are taken."""
        while True:
            self.sampler.set_epoch(self.epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            self.loader.set_epoch(self.epoch)  # accelerate's loader re-sets the epoch when iterated
            loader = self.loader
            if self.batch_in_epoch:  # a resumed run: skip what this process already read
                loader = self.accelerator.skip_first_batches(self.loader, self.batch_in_epoch)
                loader.set_epoch(self.epoch)
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _generator(self, micro: int) -> torch.Generator:
        g = torch.Generator(device=self.accelerator.device)
        g.manual_seed(derive_seed(self.cfg.seed, 0x57E9, self.rank, micro))
        return g

    def train(self) -> dict:
        """Train until ``max_steps`` (or a stop signal); returns a summary."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale(self.ckpt_root)
            ckpt.atomic_write_text(self.out / "config.yaml", cfg.to_yaml())
            self._prepare_logs()
        if self.trackers:
            acc.init_trackers(TRACKER_PROJECT, config=_tracker_config(cfg))
        acc.wait_for_everyone()
        restore = self._install_signal_handlers()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (self.main and cfg.progress),
                   desc=f"stage {cfg.stage}", dynamic_ncols=True, unit="step")
        batches = self._batches()
        last_saved = self.step if self.resume_from is not None else None
        t0 = time.perf_counter()
        status = "done"
        history: List[dict] = []
        try:
            while self.step < cfg.max_steps:
                rec = self._train_step(batches)
                self.step += 1
                rec.update(step=self.step, time_s=round(time.perf_counter() - t0, 4))
                history.append(rec)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    if self.main:
                        self._write_log(rec)
                    if self.trackers:  # accelerate logs on the main process only
                        acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"},
                                step=self.step)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", refresh=False)
                self._maybe_fault("exit_after_step", self.step)
                stop = self._stop_agreed()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps or stop:
                    self.save_checkpoint()
                    last_saved = self.step
                    self.validate()
                if stop:
                    status = "stopped"
                    break
        finally:
            bar.close()
            restore()
        if last_saved != self.step:
            self.save_checkpoint()
        self.write_replica_digest()
        exported = self.export() if status == "done" else None
        acc.wait_for_everyone()
        if self.trackers:
            acc.end_training()
        return {"status": status, "step": self.step, "output_dir": str(self.out),
                "checkpoint": str(ckpt.latest_checkpoint(self.ckpt_root)), "export": exported,
                "history": history}

    def ema_weights(self):
        """Context: inside it the trainable parameters hold the EMA weights (no-op without EMA)."""
        if self.ema is None:
            return nullcontext()
        return _EMASwap(self.ema, self.params)

    def export(self) -> Optional[str]:
        """The task's own export of the final weights (EMA if any) into ``output_dir/export``."""
        if not self.main:
            return None
        with self.ema_weights():
            path = self.task.export(self.out / "export")
        return None if path is None else str(path)

    def validate(self) -> Optional[dict]:
        """Validation samples of the current (EMA) weights: the task's ``validate`` (main process
        only; videos under ``output_dir/validation/step-N``, metrics and videos to the trackers)."""
        if self.cfg.validation_samples <= 0 and not self.cfg.validation_prompts:
            return None
        result = None
        if self.main:
            out = self.out / "validation" / ckpt.step_dir_name(self.step)
            was_training = self.task.training
            try:
                # autocast as in training: with mixed precision the frozen weights are fp16/bf16
                with self.ema_weights(), torch.no_grad(), self.accelerator.autocast():
                    result = self.task.validate(out, self.step, progress=self.cfg.progress)
            except Exception:  # a failed sample must not end a long run; the checkpoint is written
                log.exception("validation at step %d failed; training continues", self.step)
                result = None
            if was_training:
                self.task.set_train_mode(self.cfg.stage)
            if result and self.trackers:
                self._log_validation(result)
        self.accelerator.wait_for_everyone()
        return result

    def _log_validation(self, result: dict) -> None:
        acc = self.accelerator
        scalars = {f"validation/{k}": float(v) for k, v in result.get("metrics", {}).items()}
        if scalars:
            acc.log(scalars, step=self.step)
        videos = result.get("videos") or {}
        for name in self.trackers:
            tracker = acc.get_tracker(name, unwrap=True)
            for key, frames in videos.items():  # frames: (F, H, W, 3) uint8
                if name == "tensorboard":  # the frames side by side (add_video needs moviepy)
                    strip = np.concatenate(list(np.asarray(frames)), axis=1)  # (H, F*W, 3)
                    tracker.add_image(f"validation/{key}", strip, global_step=self.step, dataformats="HWC")
                elif name == "wandb":
                    import wandb
                    tracker.log({f"validation/{key}": wandb.Video(np.asarray(frames).transpose(0, 3, 1, 2), fps=4)},
                                step=self.step)

    def _train_step(self, batches) -> dict:
        cfg, acc = self.cfg, self.accelerator
        losses, extras = [], {}
        grad_norm = None
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            g = self._generator(self.step * cfg.grad_accum + micro)
            # accumulate: no gradient sync (DDP) before the last micro-batch, loss / grad_accum,
            # and the optimizer steps only once the window is complete.
            with acc.accumulate(self.model):
                out = self.model(batch, g)
                loss = out["loss"]
                acc.backward(loss)
                if acc.sync_gradients:
                    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                    grad_norm = acc.clip_grad_norm_(self.params, max_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            for k, v in out.items():  # kept on the device: one transfer per step, not one per value
                if k != "loss":
                    v = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                    extras.setdefault(k, []).append(v.to(acc.device, torch.float64).reshape(()))
        # fp16: a step the grad scaler skipped (inf/nan gradients) moves neither LR nor EMA
        skipped = bool(getattr(self.optimizer, "step_was_skipped", False))
        if not skipped:
            self.lr_scheduler.step()
        if self.ema is not None and not skipped and (self.step + 1) % cfg.ema_update_every == 0:
            self.ema.step(self.params)
        local = torch.stack(losses).mean().reshape(1)
        per_rank = acc.gather(local).cpu().tolist()
        loss = float(sum(per_rank) / len(per_rank))
        names = sorted(extras)
        if names:  # other logged values: mean over micro-batches and processes
            vals = torch.stack([torch.stack(extras[k]).mean() for k in names])
            if self.world > 1:
                vals = acc.reduce(vals, "mean")
            extras = dict(zip(names, vals.cpu().tolist()))
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {self.step + 1}: loss is {loss} (per process {per_rank})")
        rec = {"step": self.step + 1, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "loss": loss,
               "lr": float(self.lr_scheduler.get_last_lr()[0]),
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
        if self.world > 1:
            rec["loss_per_process"] = per_rank
        if skipped:
            rec["skipped_step"] = True
        rec.update(extras)
        return rec

    # ---------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step atomically (all processes take part):
        ``accelerator.save_state`` into a temporary directory, then ``state.json`` and the rename."""
        cfg, acc = self.cfg, self.accelerator
        acc.wait_for_everyone()
        tmp = self.ckpt_root / f".tmp-{ckpt.step_dir_name(self.step)}"
        if self.main:
            ckpt.begin(self.ckpt_root, self.step)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)  # every process writes its RNG state
        acc.wait_for_everyone()
        final = self.ckpt_root / ckpt.step_dir_name(self.step)
        if self.main:
            self._maybe_fault("exit_in_save", self.step)
            (tmp / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
            state = {
                "format": ckpt.FORMAT_VERSION, "step": self.step, "stage": cfg.stage, "task": cfg.task,
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "batches_per_epoch": self.sampler.batches_per_epoch, "sampler_seed": cfg.seed,
                "seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "world_size": self.world, "ema_updates": self.ema.optimization_step if self.ema is not None else 0,
                "trainable": [k for k, _ in self.named_params],
                "init_from": getattr(self, "init_source", None),
                "versions": _versions(),
            }
            final = ckpt.commit(tmp, state)
            ckpt.prune(self.ckpt_root, cfg.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def write_replica_digest(self) -> dict:
        """Each process writes ``replicas/rank-<r>.json`` (digest of its trainable parameters and
        EMA); identical digests across ranks mean the replicas stayed identical."""
        dist = torch.distributed
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
        d = {"rank": self.rank, "world_size": self.world, "step": self.step, "backend": backend,
             "params": ckpt.tensor_digest(self.named_params),
             "ema": ckpt.tensor_digest(sorted(self.ema_state_dict().items())) if self.ema is not None else None,
             "param_sum": float(sum(p.detach().double().sum() for p in self.params))}
        path = self.out / "replicas"
        path.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(path / f"rank-{self.rank}.json", json.dumps(d, indent=1))
        return d

    # ---------------------------------------------------------------------------------------------
    def _log_paths(self):
        fmt = self.cfg.log_format
        return (self.out / "loss.jsonl" if fmt in ("jsonl", "both") else None,
                self.out / "loss.csv" if fmt in ("csv", "both") else None)

    def _prepare_logs(self) -> None:
        """Fresh run: start empty logs. Resumed run: drop rows after the resumed step (they were
        written by the interrupted run and will be recomputed)."""
        jl, cs = self._log_paths()
        keep = self.step if self.resume_from is not None else 0
        if jl is not None:
            rows = []
            if keep and jl.is_file():
                for line in jl.read_text(encoding="utf-8").splitlines():
                    try:
                        if json.loads(line)["step"] <= keep:
                            rows.append(line)
                    except (ValueError, KeyError):
                        pass
            ckpt.atomic_write_text(jl, "".join(r + "\n" for r in rows))
        if cs is not None:
            text = ""
            if keep and cs.is_file():
                with open(cs, newline="", encoding="utf-8") as f:
                    r = list(csv.reader(f))
                if r:
                    head, rows = r[0], r[1:]
                    si = head.index("step") if "step" in head else 0
                    rows = [row for row in rows if row and row[si].isdigit() and int(row[si]) <= keep]
                    import io
                    buf = io.StringIO()
                    w = csv.writer(buf)
                    w.writerow(head)
                    w.writerows(rows)
                    text = buf.getvalue()
            ckpt.atomic_write_text(cs, text)
        self._csv_header = None

    def _write_log(self, rec: dict) -> None:
        jl, cs = self._log_paths()
        if jl is not None:
            with open(jl, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        if cs is not None:
            flat = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in rec.items()}
            new_file = not cs.is_file() or cs.stat().st_size == 0
            if self._csv_header is None:
                if new_file:
                    self._csv_header = list(flat)
                else:
                    with open(cs, newline="", encoding="utf-8") as f:
                        self._csv_header = next(csv.reader(f), list(flat))
            with open(cs, "a", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=self._csv_header, extrasaction="ignore")
                if new_file:
                    w.writeheader()
                w.writerow(flat)

    # ---------------------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        """SIGTERM/SIGINT: finish the current step, checkpoint, stop (a second one kills)."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {}

        def handler(signum, frame):
            if self._stop:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self._stop = True
            log.warning("signal %d: checkpointing at the end of this step, then stopping", signum)

        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                old[s] = signal.signal(s, handler)
            except (ValueError, OSError):
                pass

        def restore():
            for s, h in old.items():
                signal.signal(s, h)
        return restore

    def _stop_agreed(self) -> bool:
        if self.world == 1:
            return self._stop
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    def _maybe_fault(self, point: str, step: int) -> None:
        if self._fault.get(point) == step:
            log.warning("%s=%d: exiting now (%s testing hook)", point, step, FAULT_ENV)
            os._exit(FAULT_EXIT_CODE)


class _EMASwap:
    """The EMA weights in the parameters for the block (``EMAModel.store``/``copy_to``/``restore``)."""

    def __init__(self, ema, params):
        self.ema, self.params = ema, params

    def __enter__(self):
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        return self

    def __exit__(self, *a):
        self.ema.restore(self.params)
        return False


def _parse_fault(spec: str) -> Dict[str, int]:
    out = {}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        k, _, v = part.partition("=")
        if k not in ("exit_after_step", "exit_in_save") or not v.isdigit():
            raise ValueError(f"{FAULT_ENV}: expected exit_after_step=N or exit_in_save=N, got {part!r}")
        out[k] = int(v)
    return out


def _versions() -> dict:
    import platform

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("accelerate", "diffusers", "safetensors"):
        try:
            v[name] = __import__(name).__version__
        except Exception:
            pass
    return v


def train(cfg: TrainConfig, task: Optional[TrainTask] = None) -> dict:
    """Build a :class:`Trainer` and run it."""
    return Trainer(cfg, task).train()
