"""Start a distributed pre-training run: Ray (local or cluster), manifest, MLflow run, TorchTrainer.

``run_pretrain(cfg)`` is what ``rcl-dist pretrain`` and ``pipelines/pretrain.py`` call. The MLflow run
is created here, by the driver, before any worker starts: a worker that dies and restarts (or a run
resumed with ``--resume``) logs into the same run, so the experiment never holds duplicates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rcl_dist.config import Config, ConfigError, global_residual_of, pin_global_residual
from rcl_dist.console import ray_env, verbose
from rcl_dist.paths import RUN_STATE, ray_results, read_run_state, rcl_home
from rcl_dist.train.progress import driver_progress

__all__ = [
    "run_pretrain", "resume_config", "PretrainInterrupted", "RESUMABLE_KEYS", "ensure_ray", "choose_ray", "check_gpus",
    "check_crop_fits", "ensure_manifest", "PretrainResult",
]  # fmt: skip

# what `--resume` may change in a run's stored config (the rest would not match its checkpoints)
RESUMABLE_KEYS = ("train.steps", "train.log_every", "dist.max_failures", "dist.checkpoint_every", "data.threads")


class PretrainInterrupted(Exception):
    """The run was interrupted (Ctrl-C / SIGINT); the message says at which step and how to resume."""


def _run_dir(storage_path: str | None, name: str) -> Path:
    return ray_results(storage_path) / name


def resume_config(given: dict[str, Any], log: Callable[[str], None] = print) -> Config:
    """The config of ``--resume``: the run's own stored config (its run state, or for runs written
    before it was kept there, its newest valid checkpoint), with ``given`` (the user's --config file and
    overrides, see :func:`rcl_dist.config.config_layer`) laid over it. ``given`` must name
    ``dist.run_name``; it may change only :data:`RESUMABLE_KEYS`, anything else is a ConfigError
    naming the key, the stored and the given value."""
    dist = given.get("dist") or {}
    name = dist.get("run_name")
    if not name:
        raise ConfigError("--resume needs dist.run_name: the run to continue")
    Config.from_dict({"dist": {"run_name": str(name)}})  # the same rule as every run name: no path
    run_dir = _run_dir(dist.get("storage_path"), str(name))
    state_file = run_dir / RUN_STATE
    if not state_file.is_file():
        raise ConfigError(f"--resume: no run {name!r} under {run_dir.parent} (missing {state_file})")
    stored = read_run_state(run_dir).get("config")
    if stored is None:  # a run from before the config was kept in its state: the checkpoint has it
        from rcl_dist.models.io import newest_valid_checkpoint

        try:
            stored = newest_valid_checkpoint(run_dir, log=log)[1]["config"]
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"--resume: run {name!r} has no stored config in {state_file} and no valid checkpoint ({e})") from None
    stored_cfg = Config.from_dict(stored).to_dict()
    merged = {sec: dict(vals) for sec, vals in stored_cfg.items()}
    for sec, vals in given.items():
        if not isinstance(vals, dict):
            raise ConfigError(f"config section {sec!r} must be a mapping")
        merged.setdefault(sec, {}).update(vals)
    merged["dist"]["run_name"] = str(name)
    cfg = Config.from_dict(merged)
    new = cfg.to_dict()
    for sec, vals in new.items():
        for key, value in vals.items():
            full = f"{sec}.{key}"
            if full in ("dist.run_name", "dist.storage_path") or stored_cfg.get(sec, {}).get(key) == value:
                continue
            if full == "model.global_residual" and stored_cfg["model"].get("global_residual") is None:
                # a run stored before forms were pinned: the user states the form its checkpoints have
                log(f"resume: {full} null (auto) -> {value!r}")
                continue
            if full not in RESUMABLE_KEYS:
                raise ConfigError(f"{full}: run {name!r} was trained with {stored_cfg[sec][key]!r}, --resume cannot change "
                                  f"it to {value!r} (a resume keeps the run's config; it may change {', '.join(RESUMABLE_KEYS)})")  # fmt: skip
            log(f"resume: {full} {stored_cfg[sec][key]!r} -> {value!r}")
    return cfg


def _answers(address: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts a TCP connection at ``address`` (``host:port``, ``ray://host:port``)
    within ``timeout_s``: a dead head's port refuses at once, where ``ray.init`` would wait minutes."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    if ":" not in hostport:
        return False
    host, port = hostport.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _address_file() -> Path:
    """Ray's current-cluster file (``ray start`` writes it; ``$RAY_TMPDIR/ray``, default /tmp/ray)."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def choose_ray(requested: str | None, recorded: str | None, answers: Callable[[str], bool] = _answers) -> tuple[str | None, str]:
    """(address to join or None for a fresh local Ray, a sentence saying which Ray and why).

    ``requested``: what the user asked for (``RAY_ADDRESS``); ``recorded``: the address in Ray's
    current-cluster file, i.e. this machine is a cluster node started with ``ray start``. A cluster is
    joined only when asked for or recorded, and only when it answers: a file left by a head that died
    uncleanly is ignored (``ray.init()`` would try to join it). A requested address that does not
    answer is an error: the user asked for that cluster, not for a local one.
    """
    if requested and requested not in ("local", "auto"):
        if not answers(requested):
            raise ConfigError(f"RAY_ADDRESS={requested}: no Ray cluster answers there (unset RAY_ADDRESS to start a local Ray)")
        return requested, f"Ray: joining the cluster at {requested} (RAY_ADDRESS)"
    if requested != "local" and recorded:
        if answers(recorded):
            return recorded, f"Ray: joining the cluster of this node at {recorded} (started with `ray start`)"
        if requested == "auto":
            raise ConfigError(f"RAY_ADDRESS=auto: the cluster recorded on this node ({recorded}) does not answer")
        return None, f"Ray: starting a local Ray on 127.0.0.1 (ignored a stale cluster address {recorded}: nothing answers there)"
    if requested == "auto":
        raise ConfigError("RAY_ADDRESS=auto: no Ray cluster was started on this node (`ray start`)")
    return None, "Ray: starting a local Ray on 127.0.0.1"


def _ray_choice() -> tuple[str | None, str]:
    f = _address_file()
    recorded = f.read_text().strip() if f.is_file() else None
    return choose_ray(os.environ.get("RAY_ADDRESS") or None, recorded or None)


def ensure_ray(num_cpus: int | None = None, log: Callable[[str], None] | None = None) -> None:
    """Join the Ray cluster the user asked for (``RAY_ADDRESS``) or that this node belongs to, when it
    answers (see :func:`choose_ray`); otherwise start a local Ray whose servers all listen on 127.0.0.1
    only. ``log`` (default: stderr) is told which Ray is used.

    Ray resolves a node address of 127.0.0.1 to the machine's routable address and binds its servers
    there (``_node_ip_address`` cannot change that); its single-machine mode, selected with
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, uses the loopback address instead. The variable is set for
    the processes Ray starts, and the constant Ray read at import is set for this one.
    """
    import sys

    import ray

    if ray.is_initialized():
        return
    address, why = _ray_choice()
    (log or (lambda s: print(s, file=sys.stderr, flush=True)))(why)
    if address is not None:
        ray.init(address=address, runtime_env={"env_vars": ray_env(local=False)})
        return
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo between local workers over loopback
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # and NCCL's bootstrap
    _local_auth_token()
    ray.init(
        address="local",  # never Ray's own lookup: it reads the address file and joins even a dead head
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.INFO if verbose() else logging.WARNING,
        runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", "RCL_DIST_HOME": str(rcl_home()),
                                  **ray_env(local=True)}},  # fmt: skip
    )
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":
        raise RuntimeError(f"local Ray started on {node_ip}, not on loopback 127.0.0.1")


def _local_auth_token() -> Path | None:
    """Point Ray's token authentication at ``$RCL_DIST_HOME/ray/auth_token`` (created once, mode 0600)
    unless the user set ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``: without it a local Ray writes its
    token to ``~/.ray/auth_token``, outside RCL_DIST_HOME. Set in this process's environment, so the
    processes Ray starts read the same file."""
    import secrets

    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    token = rcl_home() / "ray" / "auth_token"
    if not token.is_file() or not token.read_text().strip():
        token.parent.mkdir(parents=True, exist_ok=True)
        tmp = token.with_name(f".auth_token.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())  # what Ray's own generator makes: 256 bits
        finally:
            os.close(fd)
        os.replace(tmp, token)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    return token


def _ray_is_local() -> bool:
    """Whether Ray Train's workers run on this machine: a local Ray, running or about to be started
    by :func:`ensure_ray` (no ``RAY_ADDRESS``, no cluster answering on this node)."""
    import ray

    if ray.is_initialized():
        return all(n.get("NodeManagerAddress") == "127.0.0.1" for n in ray.nodes())
    return _ray_choice()[0] is None


def check_gpus(needed: int, key: str) -> None:
    """Fail early when ``key`` asks for ``needed`` GPUs that the Ray cluster cannot give.

    On a local Ray (every node on 127.0.0.1) nothing will join, so Ray Train would wait for the
    GPUs forever: a :class:`ConfigError` naming ``key``. On a real cluster an autoscaler may still add
    GPU nodes: a warning only."""
    import warnings

    import ray

    if needed <= 0:
        return
    have = ray.cluster_resources().get("GPU", 0.0)
    if have >= needed:
        return
    what = f"{key} asks for {needed} GPU(s) but this Ray cluster has {have:g}"
    if all(n.get("NodeManagerAddress") == "127.0.0.1" for n in ray.nodes()):
        raise ConfigError(f"{what} (a local Ray on a machine without them): set {key}=false")
    warnings.warn(f"{what}; the job waits until an autoscaler adds GPU nodes", stacklevel=2)


def _write_bundled(folder: Path, tile_size: int, gray: bool) -> Path:
    """The photographs bundled with scikit-image as 8-bit PNG tiles (each tile its own image)."""
    from skimage import io

    from rcl_dist.data.images import bundled_images, tile

    folder.mkdir(parents=True, exist_ok=True)
    images = bundled_images(gray=gray)
    if tile_size:
        images = tile(images, tile_size)
    for i, img in enumerate(images):
        path = folder / f"bundled_{i:03d}.png"
        if not path.exists():
            arr = (img.transpose(1, 2, 0) * 255.0).round().astype(np.uint8)
            io.imsave(path, arr[..., 0] if gray else arr, check_contrast=False)
    return folder


def ensure_manifest(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """``data.manifest`` if given, else an index of ``data.source`` under $RCL_DIST_HOME/manifests.

    A manifest indexed as real noisy photographs (``data index --noise none``) trained with simulated
    noise added on top, or the other way round, is refused: ``data.noise`` must say what the files are.
    """
    from rcl_dist.data.index import index_images
    from rcl_dist.data.manifest import manifest_noise

    if cfg.data.manifest:
        path = Path(cfg.data.manifest).expanduser().resolve()  # workers run in another directory
        if not path.is_file():
            raise ConfigError(f"data.manifest: {path} does not exist (create it with `rcl-dist data index`)")
        indexed = manifest_noise(path)
        if indexed != cfg.data.noise:
            what = {"none": "real noisy photographs (indexed with --noise none)", "simulated": "clean images (noise simulated in training)"}
            raise ConfigError(f"data.manifest: {path} holds {what[indexed]}, but data.noise={cfg.data.noise}: set "
                              f"data.noise={indexed}, or re-index the folder with --noise {cfg.data.noise}")  # fmt: skip
        return path
    from rcl_dist.data.images import shared_data_dir

    src = cfg.data.source
    gray = cfg.model.in_channels == 1
    if src == "bundled":
        folder = _write_bundled(rcl_home() / "data" / f"bundled_t{cfg.data.tile}{'_gray' if gray else ''}", cfg.data.tile, gray)
    elif src.startswith("shared:"):
        root = shared_data_dir()
        if root is None:
            raise ConfigError(f"data.source={src!r}: no shared/data folder here (set RCL_DIST_DATA)")
        folder = root / src.split(":", 1)[1]
    else:
        folder = Path(src)
    if not folder.is_dir():
        raise ConfigError(f"data.source: {folder} is not a folder")
    # the folder's absolute path in the name: two folders of the same name get two manifests
    tag = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
    out = rcl_home() / "manifests" / f"{folder.name}-{tag}-seed{cfg.train.seed}{'-real' if cfg.data.noise == 'none' else ''}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    options = {"sigma_min": cfg.data.sigma_min, "sigma_max": cfg.data.sigma_max} if cfg.data.sampler in ("uniform", "gaussian") else None
    index_images([str(folder)], out, seed=cfg.train.seed, sampler=cfg.data.sampler, sampler_options=options,
                 noise=cfg.data.noise, log=log)  # fmt: skip
    return out


def check_crop_fits(cfg: Config, manifest: str | Path) -> None:
    """ConfigError naming ``data.crop`` when no image of ``data.split`` in ``manifest`` is large enough
    for the crop the workers will take (:func:`rcl_dist.data.spec.pipeline_rows`, the rule the
    pipelines apply, on the manifest's sizes): the workers would otherwise fail only after the run is
    created."""
    import warnings

    from rcl_dist.data.manifest import read_manifest
    from rcl_dist.data.spec import pipeline_rows
    from rcl_dist.train.pretrain import pair_spec

    spec = pair_spec(cfg, 0, cfg.dist.workers)
    try:
        with warnings.catch_warnings():  # the workers' pipelines count the images they leave out
            warnings.simplefilter("ignore")
            pipeline_rows(read_manifest(manifest), spec)
    except ValueError as e:
        raise ConfigError(f"data.crop={cfg.data.crop}: {e} (in {manifest})") from None


@dataclass
class PretrainResult:
    run_name: str
    storage_path: str
    metrics: dict[str, Any] | None
    checkpoint_path: str | None
    mlflow_run_id: str | None
    tracking_uri: str | None
    seconds: float


def _newest_step(run_dir: Path) -> int:
    """The step of the newest valid checkpoint in ``run_dir`` (0 when there is none)."""
    from rcl_dist.models.io import newest_valid_checkpoint

    try:
        return int(newest_valid_checkpoint(run_dir)[1].get("step", 0))
    except (FileNotFoundError, ValueError):
        return 0


def simulated_dir_for(cfg: Config, manifest: str | Path) -> str:
    """Where a run's stored noisy realisations live (``data.realisation=fixed``): ``data.simulated_dir``
    when set, else ``<manifest stem>_simulated`` beside the manifest (what ``rcl-dist data simulate``
    writes by default). Every launcher of pre-training workers asks this one function."""
    if cfg.data.simulated_dir:
        return str(Path(cfg.data.simulated_dir).expanduser().resolve())
    return str(Path(manifest).with_suffix("")) + "_simulated"


def _resume_point(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> tuple[str | None, int]:
    """``--resume``: (folder of the newest valid checkpoint on disk or None, its step; 0 before any checkpoint)."""
    from rcl_dist.models.io import newest_valid_checkpoint

    try:  # the newest valid checkpoint on disk: Ray may not have registered the last one
        ckpt_file, ckpt_state = newest_valid_checkpoint(run_dir, log=log)
        return str(ckpt_file.parent), int(ckpt_state.get("step", 0))
    except FileNotFoundError:
        return None, 0  # interrupted before its first checkpoint: starts again from step 0
    except ValueError as e:
        raise ConfigError(f"--resume: {e}") from None


def _check_before_ray(cfg: Config, resume: bool, log: Callable[[str], None]) -> Path | None:
    """Memory, images and crop (a new run: its manifest, indexed if need be), then Ray and its GPUs."""
    manifest = None
    if not cfg.dist.use_gpu and _ray_is_local():  # the workers share this machine's memory
        from rcl_dist.train.guards import check_memory

        check_memory(cfg, workers=cfg.dist.workers)
    if not resume:  # the images and the crop: checked (and indexed) before Ray, a run or a folder exists
        manifest = ensure_manifest(cfg, log)
        check_crop_fits(cfg, manifest)
    # then Ray: a request it cannot meet fails here, before any run or folder is created
    ensure_ray(num_cpus=max(os.cpu_count() or 1, int(cfg.dist.workers * cfg.dist.cpus_per_worker) + 1), log=log)
    check_gpus(cfg.dist.workers if cfg.dist.use_gpu else 0, "dist.use_gpu")
    return manifest


def _open_record(cfg: Config, name: str, run_dir: Path, resume: bool, manifest: Path | None, tracking_uri: str | None):
    """(manifest, MLflow run id, tracking URI, tracker): a resumed run's recorded ones reopened, or a new run
    folder with its state file and (tracking on) a new MLflow run."""
    tracker = None
    if resume:
        state = read_run_state(run_dir)
        manifest, run_id, uri = Path(state["manifest"]), state["mlflow_run_id"], state["tracking_uri"]
        if not manifest.is_file():  # before the MLflow run is reopened: a failure here changes no record
            raise ConfigError(f"--resume: run {name!r} trained on {manifest}, which no longer exists")
        if run_id is not None:
            from rcl_dist.tracking import RunTracker

            tracker = RunTracker.start(uri, cfg.tracking.experiment, None, None, run_id=run_id)
        return manifest, run_id, uri, tracker
    run_id, uri = None, None
    if cfg.tracking.enabled:
        from rcl_dist.paths import resolve_tracking_uri
        from rcl_dist.tracking import RunTracker

        uri = resolve_tracking_uri(tracking_uri or cfg.tracking.uri)
        tracker = RunTracker.start(uri, cfg.tracking.experiment, name, cfg.to_dict())  # params + config.yaml
        run_id = tracker.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_STATE).write_text(json.dumps({"manifest": str(manifest), "mlflow_run_id": run_id, "tracking_uri": uri,
                                                 "config": cfg.to_dict()}))  # fmt: skip
    return manifest, run_id, uri, tracker


def _fit(trainer, cfg: Config, name: str, storage: Path, run_dir: Path, tracker, start_step: int):
    """``trainer.fit()``, ending the MLflow run with how it went; Ctrl-C becomes PretrainInterrupted."""
    status = "FAILED"
    try:
        result = trainer.fit()
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C: Ray Train's own SIGINT handler aborts the workers and leaves with SystemExit
        status = "KILLED"
        step = _newest_step(run_dir)
        raise PretrainInterrupted(
            f"run {name} interrupted at step {step} (newest valid checkpoint in {run_dir}); resume with: "
            f"rcl-dist pretrain --resume dist.run_name={name}" + (f" dist.storage_path={storage}" if cfg.dist.storage_path else "")
            if step else f"run {name} interrupted before its first checkpoint; resume with: rcl-dist pretrain --resume dist.run_name={name}"
        ) from None
    finally:
        if tracker is not None:
            if status == "FAILED" and _newest_step(run_dir) <= start_step and tracker.previous_status in ("FINISHED", "FAILED", "KILLED"):
                # nothing trained (a failure before the first new checkpoint): the record keeps its status
                status = tracker.previous_status
            tracker.end(status)
    return result


def run_pretrain(
    cfg: Config,
    *,
    resume: bool = False,
    tracking_uri: str | None = None,
    log: Callable[[str], None] = print,
    env: dict[str, str] | None = None,
) -> PretrainResult:
    """Pre-train with ``cfg.dist.workers`` Ray Train workers; ``resume`` continues ``dist.run_name``.

    ``env``: extra environment variables for the workers (tests use it for the fault hook).
    """
    from rcl_dist.train.trainer import make_torch_trainer

    from rcl_dist.train.pretrain import train_func_per_worker

    # 1. the run: its name and folder, and where a resume starts; the network form written down
    if resume and cfg.model.global_residual is None:
        log(f"resume: the run's config leaves model.global_residual to the rule (null, written before runs pinned "
            f"it); it resumes as {global_residual_of(cfg)} (loss.method {cfg.loss.method!r}). If its checkpoints were "
            f"trained in the other form, stop and pass model.global_residual=<that form>")  # fmt: skip
    cfg = pin_global_residual(cfg)
    storage = ray_results(cfg.dist.storage_path)
    if resume and not cfg.dist.run_name:
        raise ConfigError("--resume needs dist.run_name: the run to continue")
    name = cfg.dist.run_name or time.strftime("pretrain-%Y%m%d-%H%M%S")
    run_dir = storage / name
    state_file = run_dir / RUN_STATE
    if resume and not state_file.is_file():
        raise ConfigError(f"--resume: no run {name!r} under {storage} (missing {state_file})")
    if not resume and run_dir.exists():
        raise ConfigError(f"dist.run_name {name!r} already exists under {storage}: pass --resume or another name")
    resume_from, start_step = _resume_point(cfg, run_dir, log) if resume else (None, 0)
    if resume and start_step >= cfg.train.steps:
        log(f"run {name} is complete: its newest checkpoint is at step {start_step} (train.steps={cfg.train.steps}); "
            f"nothing to do (pass train.steps=N to train further)")  # fmt: skip
        return PretrainResult(name, str(storage), None, resume_from, None, None, 0.0)

    # 2. inputs and Ray checked, 3. the run record started or reopened
    manifest = _check_before_ray(cfg, resume, log)
    manifest, run_id, uri, tracker = _open_record(cfg, name, run_dir, resume, manifest, tracking_uri)

    # 4. fit
    simulated = simulated_dir_for(cfg, manifest)
    log(f"run {name}: {cfg.dist.workers} worker(s), results in {run_dir}" + (f", MLflow run {run_id} at {uri}" if run_id else ""))
    t0 = time.perf_counter()
    with driver_progress(f"pre-training {name}", cfg.train.steps, initial=start_step, log=log) as board:
        trainer = make_torch_trainer(
            train_func_per_worker,
            {
                "config": cfg.to_dict(),
                "manifest": str(manifest),
                "simulated_dir": simulated,
                "mlflow_run_id": run_id,
                "tracking_uri": uri,
                "resume_from": resume_from,
                "progress": board,  # None: rank 0 prints a line per log step
            },
            workers=cfg.dist.workers, use_gpu=cfg.dist.use_gpu, cpus_per_worker=cfg.dist.cpus_per_worker, name=name,
            storage_path=str(storage), num_to_keep=2, max_failures=cfg.dist.max_failures, env=env,
        )  # fmt: skip
        result = _fit(trainer, cfg, name, storage, run_dir, tracker, start_step)

    # 5. the end
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    return PretrainResult(name, str(storage), result.metrics, ckpt, run_id, uri, time.perf_counter() - t0)
