"""Reading and writing model checkpoints safely (``torch.load(weights_only=True)``: never unpickling).

A checkpoint is a ``state.pt`` file (or a Ray checkpoint folder holding one) with at least
``{"model": state_dict, "config": Config.to_dict()}``; pre-training writes more (optimiser, step, ...).
``head`` records the kind and output channels of the last layer when it is not the pre-training
head (fine-tuned models), and for SR heads their ``skip`` (absent in checkpoints written before it
existed: ``"none"``), so that the same network can be rebuilt before loading the weights.

Writes are atomic (a temporary file in the same folder, fsync, ``os.replace``) and leave a SHA-256
digest beside the file (``state.pt.sha256``); reads verify it when present, so a ``state.pt``
truncated by a full disk, or by a copy cut short, is refused with its reason. Where a folder holds
several checkpoints (a Ray run folder), the newest *valid* one is used.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import torch

from rcl_dist.config import Config

__all__ = [
    "CHECKPOINT_FILE", "checkpoint_file", "checkpoint_candidates", "head_label", "load_checkpoint", "newest_valid_checkpoint",
    "read_state", "save_checkpoint", "write_state",
]  # fmt: skip

CHECKPOINT_FILE = "state.pt"
DIGEST_SUFFIX = ".sha256"


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _atomic_write(f: Path, write: Callable[[Any], None]) -> None:
    tmp = f.with_name(f".{f.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, f)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # torch.save into an open file reports a full disk without the file's name (a RuntimeError
        # raised while handling the OSError): name the file the caller asked for
        cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
        if isinstance(cause, OSError) and cause.errno is not None and cause.filename is None:
            raise OSError(cause.errno, cause.strerror, str(f)) from e
        raise


def write_state(f: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` to ``f`` atomically, then its digest beside it (``f.sha256``), fsync'd.

    A crash between the two leaves a digest that does not match: the checkpoint is then judged
    invalid and an older one is used, never a half-written one."""
    f = Path(f)
    f.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(f, lambda fh: torch.save(state, fh))
    digest = _sha256(f)
    _atomic_write(f.with_name(f.name + DIGEST_SUFFIX), lambda fh: fh.write(f"{digest}  {f.name}\n".encode()))
    _fsync_dir(f.parent)
    return f


def read_state(f: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The verified state dict of checkpoint file ``f``: digest (when one lies beside it), a readable
    ``torch.load(weights_only=True)``, ``model`` and ``config`` entries; else ValueError saying why."""
    f = Path(f)
    digest_file = f.with_name(f.name + DIGEST_SUFFIX)
    if digest_file.is_file():
        words = digest_file.read_text(errors="replace").split()
        if not words or words[0] != _sha256(f):
            raise ValueError(f"{f}: damaged checkpoint (its SHA-256 does not match {digest_file.name}: truncated or changed)")
    try:
        state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file or one that holds objects: say which file
        raise ValueError(f"{f}: not a readable rcl_dist checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{f}: not an rcl_dist checkpoint (holds a {type(state).__name__}, not a dict)")
    for key in ("model", "config"):
        if key not in state:
            raise ValueError(f"{f}: not an rcl_dist checkpoint (no {key!r} entry)")
    return state


def checkpoint_candidates(path: str | os.PathLike) -> list[Path]:
    """The checkpoint files ``path`` stands for, newest first: ``path`` itself if it is a file, else
    ``path/state.pt``, else (a Ray run folder) the state.pt of each ``checkpoint_*`` folder (Ray names
    them by time, so the name order is the write order)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if (p / CHECKPOINT_FILE).is_file():
        return [p / CHECKPOINT_FILE]
    if p.is_dir():
        return sorted((d / CHECKPOINT_FILE for d in p.glob("checkpoint_*") if (d / CHECKPOINT_FILE).is_file()), reverse=True)
    return []


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The newest checkpoint file ``path`` stands for (see :func:`checkpoint_candidates`), not yet
    verified; a clear error when there is none."""
    found = checkpoint_candidates(path)
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint here (expected a {CHECKPOINT_FILE} file or a folder holding one)")
    return found[0]


def newest_valid_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", log: Callable[[str], None] | None = None
) -> tuple[Path, dict[str, Any]]:
    """(file, verified state) of the newest checkpoint under ``path`` that passes :func:`read_state`;
    the invalid newer ones are skipped with their reason told to ``log``. ValueError listing every
    reason when none is valid; FileNotFoundError when there is none at all."""
    reasons = []
    for f in checkpoint_candidates(path):
        try:
            return f, read_state(f, map_location)
        except ValueError as e:
            reasons.append(str(e))
            if log is not None:
                log(f"skipping a damaged checkpoint: {e}")
    if not reasons:
        checkpoint_file(path)  # FileNotFoundError naming the path
    raise ValueError(f"{path}: no valid checkpoint: " + "; ".join(reasons))


def head_label(head: dict[str, Any]) -> str:
    """A checkpoint's ``head`` record in words: ``kind/out_channels``, plus ``+bicubic`` for an SR head
    that adds the input's bicubic upsampling (e.g. ``sr2/3+bicubic``)."""
    label = f"{head['kind']}/{head['out_channels']}"
    return label + "+bicubic" if head.get("skip") == "bicubic" else label


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """(model with its weights, its Config, the whole state dict) from a checkpoint file or folder
    (a run folder: its newest valid checkpoint)."""
    import sys

    from rcl_dist.models.factory import build_model_from_config

    f, state = newest_valid_checkpoint(path, map_location, log=lambda s: print(f"rcl-dist: {s}", file=sys.stderr))
    stored = state["config"]
    if isinstance(stored, dict) and isinstance(stored.get("model"), dict) and "global_residual" not in stored["model"]:
        # written before model.global_residual existed: those U-Nets predicted the image directly
        stored = {**stored, "model": {**stored["model"], "global_residual": False}}
    cfg = Config.from_dict(stored)
    model = build_model_from_config(cfg)
    head = state.get("head")
    if head:  # a fine-tuned last layer: rebuild it before loading the weights
        # an SR head's skip (written since it existed; older SR heads predicted the HR image: "none")
        options = {"skip": head.get("skip", "none")} if head["kind"] == "sr2" else {}
        model.replace_head(model.new_head(head["kind"], int(head["out_channels"]), **options))
    model.load_state_dict(state["model"])
    return model, cfg, state


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, cfg: Config, **extra: Any) -> Path:
    """Write ``{"model", "config", **extra}`` to ``path`` (a file, or a folder that gets state.pt), atomically."""
    p = Path(path)
    f = p / CHECKPOINT_FILE if p.suffix != ".pt" else p
    return write_state(f, {"model": model.state_dict(), "config": cfg.to_dict(), **extra})
