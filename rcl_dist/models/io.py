"""Reading and writing model checkpoints safely (``torch.load(weights_only=True)``: never unpickling).

A checkpoint is a ``state.pt`` file (or a Ray checkpoint folder holding one) with at least
``{"model": state_dict, "config": Config.to_dict()}``; pre-training writes more (optimiser, step, ...).
``head`` records the kind and output channels of the last layer when it is not the pre-training
head (fine-tuned models), so that the same architecture can be rebuilt before loading the weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rcl_dist.config import Config

__all__ = ["CHECKPOINT_FILE", "checkpoint_file", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FILE = "state.pt"


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/state.pt``, else (a Ray run folder) the state.pt of
    its latest ``checkpoint_*`` folder; a clear error when there is none."""
    p = Path(path)
    f = p if p.is_file() else p / CHECKPOINT_FILE
    if not f.is_file() and p.is_dir():
        latest = sorted(d for d in p.glob("checkpoint_*") if (d / CHECKPOINT_FILE).is_file())
        if latest:
            f = latest[-1] / CHECKPOINT_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here (expected a {CHECKPOINT_FILE} file or a folder holding one)")
    return f


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """(model with its weights, its Config, the whole state dict) from a checkpoint file or folder."""
    from rcl_dist.models.factory import build_model_from_config

    f = checkpoint_file(path)
    try:
        state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file or one that holds objects: say which file
        raise ValueError(f"{f}: not a readable rcl_dist checkpoint ({type(e).__name__}: {e})") from None
    for key in ("model", "config"):
        if key not in state:
            raise ValueError(f"{f}: not an rcl_dist checkpoint (no {key!r} entry)")
    stored = state["config"]
    if isinstance(stored, dict) and isinstance(stored.get("model"), dict) and "global_residual" not in stored["model"]:
        # written before model.global_residual existed: those U-Nets predicted the image directly
        stored = {**stored, "model": {**stored["model"], "global_residual": False}}
    cfg = Config.from_dict(stored)
    model = build_model_from_config(cfg)
    head = state.get("head")
    if head:  # a fine-tuned last layer: rebuild it before loading the weights
        model.replace_head(model.new_head(head["kind"], int(head["out_channels"])))
    model.load_state_dict(state["model"])
    return model, cfg, state


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, cfg: Config, **extra: Any) -> Path:
    """Write ``{"model", "config", **extra}`` to ``path`` (a file, or a folder that gets state.pt), atomically."""
    p = Path(path)
    f = p / CHECKPOINT_FILE if p.suffix != ".pt" else p
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".pt.tmp")
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), **extra}, tmp)
    os.replace(tmp, f)
    return f
