"""Training configuration: one YAML file, then command-line overrides.

    python -m vb_train --config configs/stage1.yaml --attn-backend sdpa max_steps=200 data.root=/data

Every key of :class:`TrainConfig` can be set in the YAML file or overridden on the command line
as ``key=value`` (the value is parsed as YAML, so ``lr=1e-4``, ``adam_betas=[0.9,0.99]``,
``init_from=null`` work). ``model`` and ``data`` are free-form mappings that the task reads
(:mod:`vb_train.tasks`); their entries are overridden with dotted keys (``model.channels=[32,64]``,
``data.root=/data/videobooth``). docs/train.md lists every key.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

BACKBONES = ("unet", "dit")
MIXED_PRECISION = ("no", "fp16", "bf16")
DROPOUT_MODES = ("joint", "independent")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOG_FORMATS = ("jsonl", "csv", "both")
OPTIMIZERS = ("adamw", "adamw8bit")
# the noise-schedule keys that default to the pretrained model's scheduler (None in the config)
NOISE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
NOISE_DEFAULTS = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012, "prediction_type": "epsilon"}  # SD-1.x's, for models without one


def _attn_backends() -> tuple:
    from vb_kernels import BACKENDS  # the one list of backends

    return tuple(BACKENDS)


def normalize_schedule(name: str) -> str:
    """A schedule name checked by ``vb``'s parser (the one parser: ``vb.processors``), in the
    canonical spelling: ``window2`` -> ``window:2``, ``keyframes4`` -> ``keyframes:4`` (vb's
    adapter files record the name, and a pipeline compares it when loading one)."""
    from vb.processors import check_schedule_spec

    if not isinstance(name, str):
        raise TypeError(f"schedule: expected a name, got {type(name).__name__}")
    name = check_schedule_spec(name.strip())
    return re.sub(r"^([a-z]+)(\d)", r"\1:\2", name)


@dataclass
class TrainConfig:
    """Every setting of a training run (docs/train.md explains each one)."""

    # what trains
    task: str = "videobooth"          # a registered task name or "package.module:factory"
    stage: int = 1                    # 1: mapper + attn2 K/V; 2: adds the four attn1 projections
    init_from: Optional[str] = None   # stage 2: a stage-1 checkpoint dir or run dir (its latest)
    init_weights: str = "ema"         # which weights of init_from: "ema" or "params"
    backbone: str = "unet"
    attn_backend: str = "reference"
    schedule: str = "videobooth"
    model: dict = field(default_factory=dict)   # task-specific model options
    data: dict = field(default_factory=dict)    # task-specific data options

    # run
    output_dir: str = "runs/train"
    resume: str = "auto"              # "auto" (latest checkpoint of output_dir if any), "never", or a path
    seed: int = 0
    max_steps: int = 1000             # optimizer steps
    batch_size: int = 1               # per process, per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    num_workers: int = 0
    mixed_precision: str = "no"
    device: str = "auto"              # "auto" (accelerate's choice) or "cpu"
    cast_frozen: bool = True          # mixed precision: frozen weights in fp16/bf16 (diffusers examples)
    allow_tf32: bool = False          # TF32 matmuls / convolutions on Ampere+ GPUs
    gradient_checkpointing: bool = False   # recompute the backbone's activations in the backward

    # optimisation
    optimizer: str = "adamw"          # "adamw" or "adamw8bit" (bitsandbytes)
    lr: float = 1e-5
    weight_decay: float = 1e-2
    adam_betas: Sequence[float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_scheduler: str = "constant_with_warmup"   # any name of diffusers.optimization.get_scheduler
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0        # 0 or None: no clipping (the norm is still logged)
    ema_decay: float = 0.9999         # 0: no EMA
    ema_warmup: bool = True           # decay min(ema_decay, (1 + n) / (10 + n)) for update n
    ema_update_every: int = 1

    # diffusion
    cond_dropout: float = 0.1         # null text + grey image with this probability
    cond_dropout_mode: str = "joint"  # "joint": both together; "independent": each on its own
    # None: the pretrained model's scheduler (components=pretrained), else NOISE_DEFAULTS (SD-1.x);
    # a value that differs from the pretrained scheduler's is an error unless noise_override
    num_train_timesteps: Optional[int] = None
    beta_schedule: Optional[str] = None
    beta_start: Optional[float] = None
    beta_end: Optional[float] = None
    prediction_type: Optional[str] = None
    noise_override: bool = False
    # extra loss terms (the official VideoBooth objective: 0.01 and 0.01)
    mapper_l1: float = 0.0            # weight of mean |mapper output| (the injected subject tokens)
    text_drift_l1: float = 0.0        # weight of mean |injected - plain caption text embedding|

    # checkpoints and logs
    checkpoint_every: int = 500
    keep_checkpoints: int = 3         # 0: keep all
    log_every: int = 1
    log_format: str = "both"
    report_to: Sequence[str] = ("tensorboard",)   # accelerate trackers: tensorboard, wandb, ...; [] none
    validation_samples: int = 2       # image prompts (training items 0..n-1) sampled at every checkpoint
    validation_prompts: list = field(default_factory=list)  # or these: [{caption, subject, image: path}]
    validation_steps: int = 25        # denoising steps of the validation samples
    validation_guidance: float = 4.0  # their classifier-free guidance (the official sampler's)
    progress: bool = True
    find_unused_parameters: bool = False

    # ---------------------------------------------------------------------------------------
    def __post_init__(self):
        # YAML 1.1 reads "1e-4" (no dot) as a string: accept it for float keys.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("float", "Optional[float]") and isinstance(v, str):
                try:
                    setattr(self, f.name, float(v))
                except ValueError:
                    pass
        self.validate()

    def validate(self) -> "TrainConfig":
        def need(cond, key, msg):
            if not cond:
                raise ValueError(f"{key}: {msg}, got {getattr(self, key)!r}")

        need(isinstance(self.task, str) and self.task, "task", "expected a task name")
        need(self.stage in (1, 2), "stage", "expected 1 or 2")
        need(self.init_weights in ("ema", "params"), "init_weights", "expected 'ema' or 'params'")
        need(self.backbone in BACKBONES, "backbone", f"expected one of {BACKBONES}")
        need(self.attn_backend in _attn_backends(), "attn_backend", f"expected one of {_attn_backends()}")
        self.schedule = normalize_schedule(self.schedule)
        need(isinstance(self.model, dict), "model", "expected a mapping")
        need(isinstance(self.data, dict), "data", "expected a mapping")
        need(isinstance(self.resume, str) and self.resume, "resume", "expected 'auto', 'never' or a path")
        for key in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "log_every",
                    "ema_update_every", "validation_steps"):
            v = getattr(self, key)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, key, "expected an int >= 1")
        for key in ("num_workers", "lr_warmup_steps", "keep_checkpoints", "seed", "validation_samples"):
            v = getattr(self, key)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, key, "expected an int >= 0")
        need(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"expected one of {MIXED_PRECISION}")
        need(self.device in ("auto", "cpu"), "device", "expected 'auto' or 'cpu'")
        need(isinstance(self.lr, (int, float)) and self.lr > 0, "lr", "expected a number > 0")
        need(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, "weight_decay",
             "expected a number >= 0")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
             "expected two numbers in [0, 1)")
        if self.max_grad_norm is None:
            self.max_grad_norm = 0.0
        need(isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0, "max_grad_norm",
             "expected a number >= 0 (0: no clipping)")
        need(isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1, "ema_decay",
             "expected a number in [0, 1) (0: no EMA)")
        need(isinstance(self.cond_dropout, (int, float)) and 0 <= self.cond_dropout <= 1, "cond_dropout",
             "expected a probability in [0, 1]")
        need(self.cond_dropout_mode in DROPOUT_MODES, "cond_dropout_mode", f"expected one of {DROPOUT_MODES}")
        need(self.prediction_type is None or self.prediction_type in PREDICTION_TYPES, "prediction_type",
             f"expected one of {PREDICTION_TYPES} or null (the pretrained scheduler's)")
        need(self.num_train_timesteps is None or (isinstance(self.num_train_timesteps, int)
                                                  and self.num_train_timesteps >= 1),
             "num_train_timesteps", "expected an int >= 1 or null")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"expected one of {OPTIMIZERS}")
        for key in ("mapper_l1", "text_drift_l1"):
            v = getattr(self, key)
            need(isinstance(v, (int, float)) and v >= 0, key, "expected a loss weight >= 0")
        need(isinstance(self.validation_prompts, list) and all(
            isinstance(v, dict) and set(v) == {"caption", "subject", "image"} and all(isinstance(x, str) for x in v.values())
            for v in self.validation_prompts), "validation_prompts",
            "expected a list of {caption, subject, image} mappings (strings; image: a file of the subject on white)")
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        self.report_to = list(self.report_to or [])
        need(self.log_format in LOG_FORMATS, "log_format", f"expected one of {LOG_FORMATS}")
        if self.init_from is not None and self.stage == 1:
            pass  # allowed: fine-tune a stage-1 run further
        return self

    # ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        d["report_to"] = list(self.report_to)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        d = self.to_dict()
        d.update(changes)
        return TrainConfig.from_dict(d)


def apply_override(d: dict, item: str) -> None:
    """Apply one ``key=value`` (``a.b=value`` for nested mappings) to the dict ``d`` in place."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip().replace("-", "_") if "." not in key else key.strip()
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: the value is not valid YAML ({e})") from e
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"override {item!r}: empty key")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"override {item!r}: {p!r} is not a mapping")
        cur = nxt
    cur[parts[-1]] = value


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (), **flags) -> TrainConfig:
    """Config from a YAML file (optional), then ``key=value`` overrides, then keyword flags
    (those that are not None win: they come from dedicated command-line options)."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config: no such file {p}")
        with open(p, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"config: {p} must hold a mapping of keys, got {type(d).__name__}")
    for item in overrides:
        apply_override(d, item)
    for k, v in flags.items():
        if v is not None:
            d[k] = v
    return TrainConfig.from_dict(d)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vb_train",
        description="Two-stage VideoBooth training (also: accelerate launch -m vb_train ...). "
                    "Extra key=value arguments override config keys (docs/train.md).")
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--stage", type=int, choices=(1, 2))
    p.add_argument("--init-from", dest="init_from",
                   help="stage-1 checkpoint (or run dir: its latest checkpoint) that stage 2 starts from")
    p.add_argument("--attn-backend", dest="attn_backend", choices=_attn_backends())
    p.add_argument("--backbone", choices=BACKBONES)
    p.add_argument("--schedule", help="videobooth, first, window<k>, keyframes<m> (optionally +img)")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--resume", help="auto (default), never, or a checkpoint/run dir")
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def config_from_args(argv: Optional[Sequence[str]] = None) -> tuple[TrainConfig, argparse.Namespace]:
    args = build_arg_parser().parse_intermixed_args(argv)
    flags = {k: getattr(args, k) for k in ("stage", "init_from", "attn_backend", "backbone", "schedule",
                                          "output_dir", "resume", "max_steps", "seed", "progress")}
    return load_config(args.config, args.overrides, **flags), args
