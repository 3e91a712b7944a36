"""Adapter weights: the mapper and everything VideoBooth added to the backbone, in one
safetensors file beside a small JSON config (``save_pretrained``/``from_pretrained`` style).

Files are written to a temporary name in the target directory and moved into place with
``os.replace``, so a crash mid-write never leaves a truncated adapter where a good one was.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict

import torch

WEIGHTS_NAME = "videobooth_adapter.safetensors"
CONFIG_NAME = "videobooth_adapter.json"
FORMAT_VERSION = 1


def adapter_state_dict(mapper, backbone) -> Dict[str, torch.Tensor]:
    """``mapper.*`` (every mapper tensor) and ``backbone.*`` (the backbone's adapter tensors)."""
    out = {f"mapper.{k}": v for k, v in mapper.state_dict().items()}
    out.update({f"backbone.{k}": v for k, v in backbone.adapter_state_dict().items()})
    return out


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapter(save_directory: str, mapper, backbone, extra_config: dict = None) -> str:
    """Write the adapter weights and config into ``save_directory`` (created if needed).

    Returns the path of the weights file. Tensors are saved in their current dtype, on CPU.
    """
    from safetensors.torch import save_file

    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory: expected a path, got {type(save_directory).__name__}")
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory: expected a directory, got the file {save_directory!r}")
    os.makedirs(save_directory, exist_ok=True)
    # Own, contiguous CPU copies: safetensors refuses shared or strided storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(mapper, backbone).items()}
    config = {
        "format_version": FORMAT_VERSION,
        "backbone": dict(backbone.install_config),
        "mapper": {k: v for k, v in dict(mapper.config).items() if not k.startswith("_")},
    }
    if extra_config:
        config.update(extra_config)
    weights = os.path.join(save_directory, WEIGHTS_NAME)
    _atomic_write(weights, lambda p: save_file(tensors, p, metadata={"format": "pt"}))

    def write_json(p):
        with open(p, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)

    _atomic_write(os.path.join(save_directory, CONFIG_NAME), write_json)
    return weights


def read_adapter_config(path: str) -> dict:
    """The JSON config saved beside the weights (``{}`` if there is none)."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    cfg = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(cfg):
        return {}
    with open(cfg, encoding="utf-8") as fh:
        return json.load(fh)


def load_adapter(path: str, mapper, backbone, strict: bool = True) -> None:
    """Load adapter weights saved by :func:`save_adapter` into ``mapper`` and ``backbone`` in place.

    Args:
        path: the directory given to :func:`save_adapter`, or the ``.safetensors`` file.
        strict: the key sets must match exactly (a backbone built with another image bank,
            learned query or temporal setting fails with a ValueError saying which).
    """
    from safetensors.torch import load_file

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory or file path, got {type(path).__name__}")
    path = os.fspath(path)
    weights = os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"path: no adapter weights at {weights!r}")
    cfg = read_adapter_config(path)
    saved, own = cfg.get("backbone", {}), backbone.install_config
    # The schedule is part of what was trained (which frames each frame's K/V come from); a
    # schedule saved as None was a hand-built Schedule or callable, which JSON cannot say.
    for key in ("backbone", "image_bank", "learn_query", "temporal", "schedule", "arch", "motion"):
        if not strict or key not in saved or (key == "schedule" and (saved[key] is None or own.get(key) is None)):
            continue
        if saved[key] != own.get(key, False if key == "motion" else None):
            hint = (" (set the backbone's schedule first: backbone.set_schedule(...), or load with strict=False)"
                    if key == "schedule" else "")
            raise ValueError(f"path: adapter saved with {key}={saved[key]!r}, but this backbone has "
                             f"{key}={own.get(key)!r}{hint}")
    state = load_file(weights, device="cpu")
    mapper_state = {k[len("mapper."):]: v for k, v in state.items() if k.startswith("mapper.")}
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    missing, unexpected = mapper.load_state_dict(mapper_state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"path: mapper keys do not match; missing {missing[:5]}, unexpected {unexpected[:5]}")
    backbone.load_adapter_state_dict(backbone_state, strict=strict)
