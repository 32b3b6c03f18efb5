"""``rcl-dist`` command line.

    rcl-dist demo [--steps N] [key=value ...]         the main job on bundled images: local Ray, DALI (CPU), local MLflow
    rcl-dist pretrain --config FILE [key=value ...]   distributed pre-training on Ray Train (--local: one process)
    rcl-dist config [--config FILE] [key=value ...]   print the validated configuration as YAML
    rcl-dist data index DIR[:SPLIT] ... --out manifest.parquet [--seed S] [--val-fraction F]
    rcl-dist data simulate --manifest manifest.parquet --out DIR [--raw] [--pairs]
    rcl-dist finetune --from CHECKPOINT|RUN|none --task T --mode proxy|full --labels N [--manifest M] [...]
    rcl-dist register --run FINETUNE_RUN_ID --name NAME [--eval-data DIR]
    rcl-dist promote --name NAME --version V [--alias champion] --eval-data DIR [--force]
    rcl-dist denoise --model models:/NAME@champion|CHECKPOINT IN [IN ...] OUT [--overwrite] [--max-pixels N]
    rcl-dist evaluate --model CHECKPOINT --data DIR --task denoise|gaussian|sr|jdensr|jdd|real [--out STEM]
    rcl-dist sweep tune_spaces/NAME.yaml [key=value ...] [--resume] [--out PREFIX]   Ray Tune sweep (pre-train -> proxy -> val PSNR)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]

# The demo's embedded default: 2 Ray Train workers on a 2-core laptop, about 4 minutes of pre-training
# (1000 steps; at 500 the fully fine-tuned RCL row was only +0.7 dB over its input, measured).
DEMO_STEPS = 1000
DEMO_OVERRIDES = (
    "model.width=16",
    "model.depth=3",
    "data.crop=48",
    "data.tile=96",
    "data.threads=1",
    "train.batch_size=16",
    "train.log_every=50",
    "dist.workers=2",
    "dist.checkpoint_every=250",
    "tracking.experiment=rcl-demo",
    # model.global_residual stays "auto": RCL pre-trains the paper's direct-prediction U-Net. With the
    # input skip RCL's objective is stationary at f(x) = x, so the pre-trained body stays at its
    # random start (measured at 100 steps: RCL proxy 29.06 dB = no pre-training 29.14, input 29.00)
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rcl-dist", description="Residual Contrastive Learning for image restoration")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show everything Ray and MLflow log (anywhere on the command line)")  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the whole system on images bundled with scikit-image: pre-train, evaluate, register, denoise")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"pre-training steps (default {DEMO_STEPS})")
    demo.add_argument("--local", action="store_true", help="single process, no Ray/DALI/MLflow")
    demo.add_argument("--save", type=Path, default=None, help="--local: write the pre-trained weights here (.pt)")
    demo.add_argument("overrides", nargs="*", help="section.key=value config overrides")

    pre = sub.add_parser("pretrain", help="pre-train on Ray Train workers (local Ray unless a cluster is running)")
    pre.add_argument("--config", type=Path, default=None, help="YAML config (defaults when omitted)")
    pre.add_argument("--resume", action="store_true", help="continue the run dist.run_name from its latest checkpoint")
    pre.add_argument("--tracking-uri", default=None, help="MLflow tracking server (default: the local store)")
    pre.add_argument("--local", action="store_true", help="single process, no Ray/DALI/MLflow (debugging)")
    pre.add_argument("--save", type=Path, default=None, help="--local: write the pre-trained weights here (.pt)")
    pre.add_argument("overrides", nargs="*", help="section.key=value config overrides")

    data = sub.add_parser("data", help="image manifests and materialised noisy realisations")
    dsub = data.add_subparsers(dest="data_command", required=True)
    idx = dsub.add_parser("index", help="validate image folders and write a manifest (parquet)")
    idx.add_argument("dirs", nargs="+", help="image folders; DIR:train|val|test gives the whole folder one split")
    idx.add_argument("--out", type=Path, required=True, help="manifest file (.parquet); rejects go beside it")
    idx.add_argument("--seed", type=int, default=0, help="base seed of splits and noise parameters")
    idx.add_argument("--val-fraction", type=float, default=0.1)
    idx.add_argument("--test-fraction", type=float, default=0.0)
    idx.add_argument("--sampler", choices=("uniform", "brooks", "gaussian"), default="uniform", help="NLF parameter sampler")
    idx.add_argument("--sigma-min", type=float, default=0.0, help="uniform sampler: sigma range on [0, 1]")
    idx.add_argument("--sigma-max", type=float, default=20.0 / 255.0)
    idx.add_argument("--noise", choices=("simulated", "none"), default="simulated",
                     help="simulated: clean images, noise added in training; none: real noisy photographs (train "
                          "with data.noise=none; *_mean clean references are left out)")  # fmt: skip
    idx.add_argument("--replace", action="store_true",
                     help="--out already indexes other folders: replace it with an index of these only (default: refuse)")
    sim = dsub.add_parser("simulate", help="materialise each image's fixed noisy realisation (.npy)")
    sim.add_argument("--manifest", type=Path, required=True)
    sim.add_argument("--out", type=Path, required=True, help="folder for the .npy files")
    sim.add_argument("--raw", action="store_true", help="noise in the RAW domain (RGGB mosaic first)")
    sim.add_argument("--pairs", action="store_true", help="also a second realisation (Noise2Noise)")
    sim.add_argument("--split", default=None, help="only this split")
    sim.add_argument("--gray", action="store_true", help="1-channel realisations (grey models); default RGB")
    sim.add_argument("--force", action="store_true", help="rewrite existing files (e.g. after re-indexing with another seed)")

    ft = sub.add_parser("finetune", help="fine-tune a pre-trained model on N labelled crops (proxy or full)")
    ft.add_argument("--from", dest="source", required=True,
                    help="pre-training checkpoint (file/folder), a run name under $RCL_DIST_HOME/ray_results, or none")
    ft.add_argument("--task", required=True, choices=("denoise", "sr", "jdensr", "jdd", "real"))
    ft.add_argument("--mode", default="proxy", choices=("proxy", "full"))
    ft.add_argument("--labels", type=int, default=100, help="N labelled training crops (seeded: the same for every method)")
    ft.add_argument("--manifest", default=None, help="labelled images (default: the pre-training run's manifest)")
    ft.add_argument("--config", type=Path, default=None, help="with --from none: the architecture (YAML config)")
    ft.add_argument("--fit", default="lstsq+l1", choices=("lstsq+l1", "lstsq", "adam"),
                    help="proxy mode: how the fresh last layer is fitted: closed-form least squares then IRLS towards "
                         "L1 until the label L1 settles (default), least squares only, or --steps Adam steps (comparison)")
    ft.add_argument("--steps", type=int, default=1000, help="full mode (and --fit adam): Adam steps")
    ft.add_argument("--schedule", default="constant", choices=("constant", "cosine"), help="full mode: learning rate")
    ft.add_argument("--warmup", type=int, default=0, help="full mode: linear learning-rate warm-up steps (fewer than --steps)")
    ft.add_argument("--probe-first", action="store_true",
                    help="full mode: fit the last layer with the probe on the frozen body first, then train every "
                         "layer (LP-FT): +2.5 dB from scratch at the demo's 150 steps, -1.4 dB at 1000 steps on "
                         "10 labels (docs/finetune.md)")
    ft.add_argument("--augment", default="auto", choices=("auto", "none", "dihedral", "dihedral+channels"),
                    help="full mode: each labelled pair under a random rotation/flip (and RGB permutation); auto: "
                         "dihedral+channels for RGB, dihedral for grey, none for packed RAW (docs/finetune.md)")
    ft.add_argument("--grad-clip", type=_clip_value, default=1.0, metavar="NORM",
                    help="full mode: clip the gradient's L2 norm to NORM before each Adam step (default 1.0: only "
                         "spikes; 'none' turns it off)")
    ft.add_argument("--sr-skip", default="bicubic", choices=("bicubic", "none"),
                    help="tasks sr/jdensr: the new last layer adds the input's bicubic upsampling (default; a zero "
                         "layer is the bicubic baseline) or predicts the HR image alone (none)")
    ft.add_argument("--batch-size", type=int, default=16)
    ft.add_argument("--crop", type=int, default=64)
    ft.add_argument("--lr", type=float, default=1e-3)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--workers", type=int, default=1)
    ft.add_argument("--use-gpu", action="store_true")
    ft.add_argument("--tracking-uri", default=None)
    ft.add_argument("--out", default=None, help="also copy the fine-tuned checkpoint here")

    ev = sub.add_parser("evaluate", help="PSNR/SSIM of a model on whole test images (tiled when large)")
    ev.add_argument("--model", required=True, help="checkpoint file or folder (state.pt), or classical:nlm, classical:wavelet, classical:bm3d (no training; noise level estimated per image)")
    ev.add_argument("--data", required=True, help="folder of test images (clean; real pairs: *_real/*_mean)")
    ev.add_argument("--task", required=True, choices=("denoise", "gaussian", "sr", "jdensr", "jdd", "real"))
    ev.add_argument("--out", default=None, help="write STEM.parquet/.json/.md (a folder: one file set per data set)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the fixed noisy test inputs")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    ev.add_argument("--sigma", type=float, default=None, help="Gaussian noise sigma on 0-255 (task gaussian)")
    ev.add_argument("--tile", type=int, default=256)
    ev.add_argument("--overlap", type=int, default=32)

    reg = sub.add_parser("register", help="register a fine-tuned denoiser in the MLflow model registry")
    reg.add_argument("--run", required=True, help="the fine-tuning run id (MLflow)")
    reg.add_argument("--name", required=True, help="registered model name")
    reg.add_argument("--eval-data", default=None, help="evaluate on this test folder and record the metrics")
    reg.add_argument("--eval-task", default="denoise")
    reg.add_argument("--eval-limit", type=int, default=None)
    reg.add_argument("--tracking-uri", default=None)

    pro = sub.add_parser("promote", help="move an alias to a version if it beats the holder's PSNR")
    pro.add_argument("--name", required=True)
    pro.add_argument("--version", required=True)
    pro.add_argument("--alias", default="champion")
    pro.add_argument("--eval-data", required=True, help="the designated evaluation folder")
    pro.add_argument("--eval-task", default="denoise")
    pro.add_argument("--eval-limit", type=int, default=None)
    pro.add_argument("--force", action="store_true", help="move the alias whatever the figures")
    pro.add_argument("--tracking-uri", default=None)

    den = sub.add_parser("denoise", help="denoise image files or folders (tiled; 8/16-bit kept; inputs never overwritten)")
    den.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint")
    den.add_argument("paths", nargs="+", metavar="PATH", help="inputs (files or folders), then the output folder or file")
    den.add_argument("--tile", type=int, default=256)
    den.add_argument("--overlap", type=int, default=32)
    den.add_argument("--max-pixels", type=float, default=None,
                     help="pixel budget per image, checked from the header before decoding "
                          "(default: $RCL_DIST_MAX_PIXELS, else 2**26 = 67108864)")
    den.add_argument("--overwrite", action="store_true",
                     help="replace existing output files that this command did not write (default: leave them, report them)")

    sw = sub.add_parser("sweep", help="Ray Tune sweep: each trial pre-trains, proxy-fine-tunes and reports validation PSNR")
    sw.add_argument("space", type=Path, help="search space YAML (tune_spaces/*.yaml)")
    sw.add_argument("overrides", nargs="*", help="space keys (trials=4, objective.rounds=2) or config keys (loss.tau=0.1)")
    sw.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name (finished trials kept)")
    sw.add_argument("--tracking-uri", default=None, help="MLflow tracking server (default: the local store)")
    sw.add_argument("--storage", default=None, help="Tune experiments folder (default: $RCL_DIST_HOME/sweeps)")
    sw.add_argument("--out", default=None, help="also write PREFIX.md/.csv/.parquet/.json/.png and PREFIX_best_config.yaml")

    show = sub.add_parser("config", help="print the validated configuration")
    show.add_argument("--config", type=Path, default=None)
    show.add_argument("overrides", nargs="*")
    return p


def _pretrain(cfg, save: Path | None) -> int:
    from rcl_dist.train.guards import NonFiniteError
    from rcl_dist.train.local import train_local

    print(
        f"pre-training {cfg.model.name} (width {cfg.model.width}, depth {cfg.model.depth}) with "
        f"method={cfg.loss.method} distance={cfg.loss.distance} tau={cfg.loss.temperature} alpha={cfg.loss.alpha} "
        f"on {('manifest ' + cfg.data.manifest) if cfg.data.manifest else cfg.data.source} images, crop {cfg.data.crop}, batch {cfg.train.batch_size}, {cfg.train.steps} steps",
        flush=True,
    )
    try:
        model, history = train_local(cfg, log=lambda s: print(s, flush=True))
    except NonFiniteError as e:  # the run's own failure, not a usage error: nothing is saved
        print(f"rcl-dist: error: training stopped: {e}", file=sys.stderr)
        return 1
    m = history.metrics
    if "dist_gap" in m:
        print(
            f"done in {history.seconds:.1f} s: contrastive loss {m['contrast'][0]:.4g} -> {m['contrast'][-1]:.4g}, "
            f"EMD gap (negative - positive) {m['dist_gap'][0]:.4g} -> {m['dist_gap'][-1]:.4g}"
            + (f" (uniform guess {m['contrast_uniform'][-1]:.4g})" if "contrast_uniform" in m else "")
        )
        if "grad_ratio" in m:
            print(f"alpha * |grad L_contrast| / |grad L_consistency| on the body: {m['grad_ratio'][0]:.3g} -> {m['grad_ratio'][-1]:.3g}")
    else:
        print(f"done in {history.seconds:.1f} s: loss {m['loss'][0]:.4g} -> {m['loss'][-1]:.4g}")
    if save is not None:
        from rcl_dist.models.io import save_checkpoint

        # the one checkpoint format: `finetune --from`, `evaluate --model` and `denoise --model` read it
        from rcl_dist.config import pin_global_residual

        written = save_checkpoint(save, model, pin_global_residual(cfg))  # the network form written down
        print(f"weights written to {written}")
    return 0


def _pretrain_distributed(cfg, resume: bool, tracking_uri: str | None) -> int:
    from rcl_dist.train.launch import PretrainInterrupted, run_pretrain

    try:
        r = run_pretrain(cfg, resume=resume, tracking_uri=tracking_uri)
    except PretrainInterrupted as e:
        print(f"rcl-dist: {e}", file=sys.stderr, flush=True)
        return 130
    if r.metrics is None and r.seconds == 0.0:  # a resume of a complete run: nothing was done
        return 0
    from rcl_dist.console import ui_hint

    m = r.metrics or {}
    print(
        f"run {r.run_name} finished in {r.seconds:.1f} s: step {m.get('step', float('nan')):.0f}, "
        f"loss {m.get('loss', float('nan')):.4g}, restarts {m.get('restarts', 0):.0f}"
    )
    print(f"checkpoint: {r.checkpoint_path}")
    if r.mlflow_run_id:
        print(f"MLflow run {r.mlflow_run_id} in {r.tracking_uri}")
        print(ui_hint(r.tracking_uri))
    return 0


def _clip_value(text: str) -> float | None:
    """--grad-clip: a norm > 0, or 'none' (off)."""
    if text.strip().lower() in ("none", "off", "null"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'none', got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'none', got {text!r}")
    return value


def _finetune(args) -> None:
    from rcl_dist.config import load_config
    from rcl_dist.paths import rcl_home, read_run_state
    from rcl_dist.train.finetune_ray import run_finetune
    from rcl_dist.train.finetune_spec import FinetuneSpec

    source, manifest = args.source, args.manifest
    if source != "none" and not Path(source).exists():
        run_dir = rcl_home() / "ray_results" / source  # a pre-training run name
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--from {source}: neither a checkpoint path nor a run under {run_dir.parent}")
        source = str(run_dir)
    if manifest is None and source != "none":
        try:
            state = read_run_state(source)
        except FileNotFoundError:
            raise FileNotFoundError(f"--from {args.source}: no run state beside it to take the manifest from: pass --manifest") from None
        manifest = state["manifest"]
    if manifest is None:
        raise FileNotFoundError("--from none needs --manifest")
    spec = FinetuneSpec(
        source=source, task=args.task, mode=args.mode, labels=args.labels, steps=args.steps,
        batch_size=args.batch_size, crop=args.crop, lr=args.lr, seed=args.seed, manifest=str(manifest),
        workers=args.workers, use_gpu=args.use_gpu, tracking_uri=args.tracking_uri, out=args.out,
        config=load_config(args.config).to_dict() if source == "none" else None, fit=args.fit, schedule=args.schedule,
        warmup=args.warmup, probe_first=args.probe_first and args.mode == "full", augment=args.augment,
        grad_clip=args.grad_clip, sr_skip=args.sr_skip,
    )
    r = run_finetune(spec)
    m = r.metrics or {}
    print(f"fine-tuned ({args.task}, {args.mode}, {args.labels} labels) in {r.seconds:.1f} s: "
          f"label L1 {m.get('label_l1_initial', float('nan')):.4g} -> {m.get('label_l1', float('nan')):.4g}")
    print(f"checkpoint: {r.checkpoint_path}")
    if r.mlflow_run_id:
        print(f"MLflow run {r.mlflow_run_id} in {r.tracking_uri}")


def _data(args) -> None:
    if args.data_command == "index":
        from rcl_dist.data.index import index_images

        options = {"sigma_min": args.sigma_min, "sigma_max": args.sigma_max} if args.sampler in ("uniform", "gaussian") else None
        index_images(  # logs its progress, rejects and summary
            args.dirs,
            args.out,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            sampler=args.sampler,
            sampler_options=options,
            noise=args.noise,
            replace=args.replace,
        )
    else:
        from rcl_dist.data.simulate import simulate

        n = simulate(
            args.manifest, args.out, raw=args.raw, pairs=args.pairs, split=args.split, gray=args.gray, force=args.force
        )
        print(f"{n} noisy realisation(s) in {args.out}")


def _demo(args) -> int:
    """``rcl-dist demo``: the single-process loop (``--local``) or the whole flow of rcl_dist/demo.py."""
    from rcl_dist.config import load_config

    cfg = load_config(None, [*DEMO_OVERRIDES, f"train.steps={args.steps}", *args.overrides])
    if args.local:
        return _pretrain(cfg, args.save)
    from rcl_dist.demo import run_demo

    run_demo([*DEMO_OVERRIDES, *args.overrides], pretrain_steps=args.steps)
    return 0


def _pretrain_command(args) -> int:
    """``rcl-dist pretrain``: the config (a resumed run's own, with the given layer over it), then local or Ray."""
    from rcl_dist.config import ConfigError, load_config

    if args.resume and args.local:
        raise ConfigError("--resume continues a distributed run: it cannot be used with --local")
    if args.resume:  # the run's own stored config, with only what the user gave laid over it
        from rcl_dist.config import config_layer
        from rcl_dist.train.launch import resume_config

        cfg = resume_config(config_layer(args.config, args.overrides), log=lambda s: print(s, flush=True))
    else:
        cfg = load_config(args.config, args.overrides)
    if args.local:
        return _pretrain(cfg, args.save)
    return _pretrain_distributed(cfg, args.resume, args.tracking_uri)


def _sweep(args, argv: list[str] | None) -> int:
    """``rcl-dist sweep``: 130 when interrupted, 1 when no trial reported a value, else 0 (and the report)."""
    from rcl_dist.tune import run_sweep, write_report
    from rcl_dist.tune_space import load_space

    space = load_space(args.space, args.overrides)
    result = run_sweep(space, resume=args.resume, tracking_uri=args.tracking_uri, storage=args.storage)
    if result.summary.get("interrupted"):
        return 130
    if args.out:
        write_report(result, space, args.out, ["rcl-dist", *(argv if argv is not None else sys.argv[1:])])
    print(f"best config: {result.best_config_path}" if result.best_config_path else "no trial reported a value")
    return 0 if result.best_config_path else 1


def main(argv: list[str] | None = None) -> int:
    from rcl_dist.config import ConfigError, load_config
    from rcl_dist.console import quiet_libraries, set_verbose

    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {"-v", "--verbose"}
    args = _parser().parse_args([a for a in argv if a not in flags])
    set_verbose(any(a in flags for a in argv))
    quiet_libraries()
    try:
        if args.command == "demo":
            return _demo(args)
        elif args.command == "pretrain":
            return _pretrain_command(args)
        elif args.command == "data":
            _data(args)
        elif args.command == "finetune":
            _finetune(args)
        elif args.command == "register":
            from rcl_dist.registry import main_register

            return main_register(args.run, args.name, args.tracking_uri, args.eval_data, args.eval_task, args.eval_limit)
        elif args.command == "promote":
            from rcl_dist.registry import main_promote

            return main_promote(
                args.name, args.version, args.alias, args.eval_data, args.eval_task, args.force,
                args.tracking_uri, args.eval_limit,
            )
        elif args.command == "denoise":
            from rcl_dist.denoise import main_denoise

            if len(args.paths) < 2:
                raise ValueError("denoise needs at least one input and an output: rcl-dist denoise --model M IN OUT")
            return main_denoise(
                args.model, args.paths[:-1], args.paths[-1], args.tile, args.overlap, max_pixels=args.max_pixels,
                overwrite=args.overwrite,
            )
        elif args.command == "evaluate":
            from rcl_dist.evaluate import main_evaluate

            return main_evaluate(
                args.model, args.data, args.task, out=args.out, seed=args.seed, limit=args.limit,
                sigma=args.sigma, tile=args.tile, overlap=args.overlap,
            )
        elif args.command == "sweep":
            return _sweep(args, argv)
        elif args.command == "config":
            import yaml

            print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"rcl-dist: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        where = _disk_full(e)
        if where is None:
            raise
        print(f"rcl-dist: error: the disk is full ({where}): free some space and run the command again; files "
              "written before are kept (checkpoints and outputs are replaced only once written whole)", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _disk_full(e: BaseException) -> str | None:
    """What was being written when ``e`` (or an error it was raised from) says the disk is full: an
    ``OSError`` ENOSPC/EDQUOT (its file), or SQLite's "database or disk is full" (an MLflow store)."""
    import errno

    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"writing {x.filename}" if x.filename else "No space left on device"
        if "database or disk is full" in str(x)[:1000]:
            return "SQLite: database or disk is full, in the MLflow store"
        todo += [x.__cause__, x.__context__, getattr(x, "orig", None)]
    return None


if __name__ == "__main__":
    raise SystemExit(main())
