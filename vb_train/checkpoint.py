"""Atomic training checkpoints.

Layout of a run directory::

    output_dir/
      config.yaml                 the resolved config of the latest start
      loss.jsonl, loss.csv        one row per logged optimizer step
      logs/                       tracker output (tensorboard events, ...)
      validation/step-N/          validation samples of each checkpoint (GIFs)
      checkpoints/
        step-00000500/            one complete checkpoint (never a partial one, see below)
          trainable.safetensors   trainable parameters, by name in the task (fp32 as trained)
          ema.safetensors         EMA of the trainable parameters (absent when ema_decay = 0)
          optimizer.bin           optimizer state        } accelerator.save_state
          custom_checkpoint_0.pkl LR scheduler state     } (register_for_checkpointing)
          scaler.pt               fp16 grad scaler state } (only with mixed_precision=fp16)
          random_states_<r>.pkl   RNG states of process r: python, numpy, torch, cuda
          config.yaml             the config that wrote it
          state.json              step, stage, data position, world size, versions; written last
        .tmp-step-00000600/       a checkpoint being written (ignored and removed on resume)
      replicas/rank-<r>.json      digest of each process's parameters at the end of the run

Atomicity: a checkpoint is written into ``checkpoints/.tmp-step-N``; every file is fsynced, then
the directory, then it is renamed to ``step-N`` (``os.replace`` of a directory is atomic on
POSIX) and the parent directory is fsynced. A crash at any point leaves either the previous
checkpoints untouched plus a ``.tmp-*`` directory that no reader looks at, or the new complete
one. Old checkpoints are removed by renaming them to ``.trash-*`` first, so a crash during
deletion cannot leave a half-deleted ``step-N`` either. Readers only consider ``step-N``
directories whose ``state.json`` parses (a belt-and-braces check for file systems without
atomic rename).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
FORMAT_VERSION = 2  # 2: accelerate's save_state layout (1: the hand-written one)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---- fsync helpers -----------------------------------------------------------------------------
def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (new names, renames). No-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file, then every directory (deepest first) under ``root``."""
    dirs = []
    for d, _, files in os.walk(root):
        for f in files:
            fsync_file(os.path.join(d, f))
        dirs.append(d)
    for d in reversed(dirs):
        fsync_dir(d)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small file atomically (temp file in the same dir, fsync, replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---- finding checkpoints -----------------------------------------------------------------------
def is_complete(path: str | os.PathLike) -> bool:
    """A finished checkpoint: named ``step-N`` and its ``state.json`` parses."""
    p = Path(path)
    if not _STEP_DIR.match(p.name) or not p.is_dir():
        return False
    try:
        with open(p / STATE_FILE, encoding="utf-8") as f:
            state = json.load(f)
        return isinstance(state, dict) and "step" in state and (p / TRAINABLE_FILE).is_file()
    except (OSError, ValueError):
        return False


def list_checkpoints(run_or_ckpt_root: str | os.PathLike) -> List[Path]:
    """Complete checkpoints of a run (``output_dir`` or ``output_dir/checkpoints``), oldest first."""
    root = Path(run_or_ckpt_root)
    if (root / CKPT_DIR).is_dir():
        root = root / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
        elif m:
            log.warning("ignoring incomplete checkpoint %s", p)
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_or_ckpt_root: str | os.PathLike) -> Optional[Path]:
    ckpts = list_checkpoints(run_or_ckpt_root)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint path or a run directory (its latest checkpoint)."""
    p = Path(path)
    if is_complete(p):
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint at {p} (expected a step-N directory with "
                                f"{STATE_FILE}, or a run directory holding {CKPT_DIR}/step-N)")
    return latest


def remove_stale(ckpt_root: str | os.PathLike) -> None:
    """Remove leftovers of interrupted writes and deletions (``.tmp-*``, ``.trash-*``)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)


def prune(ckpt_root: str | os.PathLike, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints (0: keep all). Deletion is rename-then-remove."""
    if keep <= 0:
        return
    for p in list_checkpoints(ckpt_root)[:-keep]:
        trash = p.with_name(f".trash-{p.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(p, trash)
        fsync_dir(p.parent)
        shutil.rmtree(trash, ignore_errors=True)


# ---- writing -----------------------------------------------------------------------------------
def begin(ckpt_root: str | os.PathLike, step: int) -> Path:
    """Create (fresh) the temporary directory of the checkpoint of ``step``. Main process only."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: str | os.PathLike, state: dict) -> Path:
    """Write ``state.json`` last, fsync the whole tree and rename it into place. Main process only.

    Returns the final ``step-N`` path. An existing checkpoint of the same step is replaced
    (moved aside first, so the name always points at a complete checkpoint or nothing).
    """
    tmp = Path(tmp)
    with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    fsync_tree(tmp)
    final = tmp.with_name(step_dir_name(int(state["step"])))
    if final.exists():
        trash = final.with_name(f".trash-{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        fsync_dir(final.parent)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def save_tensors(tensors: Dict[str, torch.Tensor], path: str | os.PathLike, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(flat, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_tensors(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_state(ckpt: str | os.PathLike) -> dict:
    with open(Path(ckpt) / STATE_FILE, encoding="utf-8") as f:
        return json.load(f)


def load_weights(ckpt: str | os.PathLike, which: str = "ema") -> Dict[str, torch.Tensor]:
    """Trained weights of a checkpoint (or of a run's latest): ``which`` = ``"ema"`` (falls back
    to the raw parameters when the run had no EMA) or ``"params"``. Keys are parameter names of
    the task (``TrainTask.named_parameters()``)."""
    if which not in ("ema", "params"):
        raise ValueError(f"which: expected 'ema' or 'params', got {which!r}")
    ckpt = resolve_checkpoint(ckpt)
    if which == "ema" and (ckpt / EMA_FILE).is_file():
        return load_tensors(ckpt / EMA_FILE)
    if which == "ema":
        log.warning("%s has no EMA weights; using the trained parameters", ckpt)
    return load_tensors(ckpt / TRAINABLE_FILE)


def copy_named(module: torch.nn.Module, tensors: Dict[str, torch.Tensor], what: str) -> int:
    """Copy `tensors` into `module`'s parameters and buffers of the same names; `what` names the
    source in the errors (a name the module does not have, a shape that differs). Returns how
    many tensors were copied."""
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"{what} has tensors this model does not: {unknown[:5]}"
                         + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    with torch.no_grad():
        for k, t in tensors.items():
            if own[k].shape != t.shape:
                raise ValueError(f"{what}: {k} has shape {tuple(t.shape)}, the model {tuple(own[k].shape)}")
            own[k].copy_(t)
    return len(tensors)


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal digests mean bit-identical tensors."""
    import hashlib

    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
