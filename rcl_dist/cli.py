"""``rcl-dist`` command line.

    rcl-dist demo [--steps N] [key=value ...]         short single-process RCL pre-training on bundled images
    rcl-dist pretrain --config FILE [key=value ...]   single-process pre-training (Ray Train: its own issue)
    rcl-dist config [--config FILE] [key=value ...]   print the validated configuration as YAML
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]

# The demo's embedded default: small enough for a laptop CPU in about a minute.
DEMO_OVERRIDES = (
    "model.width=16",
    "model.depth=3",
    "data.crop=48",
    "data.tile=96",
    "train.batch_size=16",
    "train.log_every=10",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rcl-dist", description="Residual Contrastive Learning for image restoration")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="short RCL pre-training on images bundled with scikit-image")
    demo.add_argument("--steps", type=int, default=100, help="optimiser steps (default 100)")
    demo.add_argument("--save", type=Path, default=None, help="write the pre-trained weights here (.pt)")
    demo.add_argument("overrides", nargs="*", help="section.key=value config overrides")

    pre = sub.add_parser("pretrain", help="pre-train from a config file (single process)")
    pre.add_argument("--config", type=Path, default=None, help="YAML config (defaults when omitted)")
    pre.add_argument("--save", type=Path, default=None, help="write the pre-trained weights here (.pt)")
    pre.add_argument("overrides", nargs="*", help="section.key=value config overrides")

    show = sub.add_parser("config", help="print the validated configuration")
    show.add_argument("--config", type=Path, default=None)
    show.add_argument("overrides", nargs="*")
    return p


def _pretrain(cfg, save: Path | None) -> None:
    import torch

    from rcl_dist.train.local import train_local

    print(
        f"pre-training {cfg.model.name} (width {cfg.model.width}, depth {cfg.model.depth}) with "
        f"method={cfg.loss.method} distance={cfg.loss.distance} tau={cfg.loss.temperature} alpha={cfg.loss.alpha} "
        f"on {cfg.data.source} images, crop {cfg.data.crop}, batch {cfg.train.batch_size}, {cfg.train.steps} steps",
        flush=True,
    )
    model, history = train_local(cfg, log=lambda s: print(s, flush=True))
    m = history.metrics
    if "dist_gap" in m:
        print(
            f"done in {history.seconds:.1f} s: contrastive loss {m['contrast'][0]:.4g} -> {m['contrast'][-1]:.4g}, "
            f"EMD gap (negative - positive) {m['dist_gap'][0]:.4g} -> {m['dist_gap'][-1]:.4g}"
        )
    else:
        print(f"done in {history.seconds:.1f} s: loss {m['loss'][0]:.4g} -> {m['loss'][-1]:.4g}")
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "config": cfg.to_dict()}, save)
        print(f"weights written to {save}")


def main(argv: list[str] | None = None) -> int:
    from rcl_dist.config import ConfigError, load_config

    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            cfg = load_config(None, [*DEMO_OVERRIDES, f"train.steps={args.steps}", *args.overrides])
            _pretrain(cfg, args.save)
        elif args.command == "pretrain":
            _pretrain(load_config(args.config, args.overrides), args.save)
        elif args.command == "config":
            import yaml

            print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
    except (ConfigError, FileNotFoundError) as e:
        print(f"rcl-dist: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
