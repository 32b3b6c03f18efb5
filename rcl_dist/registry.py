"""The model registry: register a fine-tuning run's checkpoint as an MLflow model version with its
lineage, and promote a version by evaluation (``rcl-dist register | promote``).

A registration is a new run nested under the fine-tuning run (which stays as training left it); the
version's tags carry the lineage (``lineage.*``), what it was trained on (``trained_on.*``) and, with
evaluation data, its PSNR/SSIM (``eval.*``). Promotion moves an alias (stages are deprecated in
MLflow 3) only when the candidate beats the holder's mean PSNR on the same fixed noisy inputs. The
packaged model itself and loading it back: :mod:`rcl_dist.serving`. Details: ``docs/registry.md``.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc

from rcl_dist.serving import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    MODEL_ARTIFACT,
    global_uris,
    input_example,
    mlflow_error,
    model_signature,
    pyfunc_model_args,
    restorer_from_uri,
    runtime_requirements,
)

__all__ = [
    "DEFAULT_ALIAS",
    "eval_fingerprint",
    "register",
    "promote",
    "main_register",
    "main_promote",
]

DEFAULT_ALIAS = "champion"
_MAX_TAG = 5000  # MLflow's limit for model version tag values
_log = logging.getLogger(__name__)
_PACKAGE_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------- helpers
def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    from rcl_dist.paths import prepare_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    prepare_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_sha256_or_note(path: str | None) -> str:
    if not path:
        return "unknown"
    p = Path(path)
    return _sha256(p) if p.is_file() else f"unavailable: {path} not found on this machine"


def _code_version() -> dict[str, str]:
    """The commit of the checkout this package runs from (``-dirty`` when tracked files differ), else the
    installed package version."""
    try:
        version = f"rcl-dist=={importlib.metadata.version('rcl-dist')}"
    except importlib.metadata.PackageNotFoundError:
        version = "rcl-dist (version unknown)"
    try:
        run = lambda *args: subprocess.run(  # noqa: E731
            ["git", "-C", str(_PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
        return {"code_commit": commit + ("-dirty" if dirty else ""), "code_version": version}
    except (OSError, subprocess.SubprocessError):
        return {"code_commit": f"unknown (no git checkout; {version})", "code_version": version}


def _tag(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= _MAX_TAG else text[: _MAX_TAG - 12] + "[truncated]"


def eval_fingerprint(folder: str | os.PathLike, task: str, limit: int | None, seed: int = 0) -> str:
    """sha256 over (task, seed, limit, every image file's name and content hash) of an evaluation folder:
    two evaluations with the same fingerprint measured the same inputs."""
    from rcl_dist.data.images import list_images

    h = hashlib.sha256(f"task={task};seed={seed};limit={limit}\n".encode())
    for p in list_images(folder):
        h.update(f"{p.name}:{_sha256(p)}\n".encode())
    return h.hexdigest()


def _evaluate(model, eval_data: str | os.PathLike, eval_task: str, eval_limit: int | None) -> dict[str, Any]:
    """Mean PSNR/SSIM of ``model`` on ``eval_data`` (evaluate_folder's fixed inputs, seed 0)."""
    from rcl_dist.evaluate import evaluate_folder, summarise

    table = evaluate_folder(model, eval_data, eval_task, limit=eval_limit, progress=None)
    s = summarise(table)
    if s["n"] == 0:
        raise ValueError(f"{eval_data}: no image could be evaluated ({s['skipped']} skipped)")
    return s


def _check_eval_data(eval_data: str | os.PathLike | None, eval_task: str) -> None:
    from rcl_dist.evaluate import EVAL_TASKS

    if eval_data is not None and not Path(eval_data).is_dir():
        raise FileNotFoundError(f"eval data {eval_data}: no such folder")
    if eval_task not in EVAL_TASKS:
        raise ValueError(f"eval task must be one of {EVAL_TASKS}, got {eval_task!r}")


def _download_checkpoint(client, run, dest: Path) -> Path:
    """The fine-tuned state.pt: the run's ``checkpoint/`` artifact, else (no artifact) the file its
    ``checkpoint`` tag names when that exists on this machine."""
    from mlflow.exceptions import MlflowException

    from rcl_dist.models.io import checkpoint_file

    run_id = run.info.run_id
    try:
        local = client.download_artifacts(run_id, "checkpoint", str(dest))
        return checkpoint_file(local)
    except (MlflowException, OSError, FileNotFoundError) as e:
        tagged = run.data.tags.get("checkpoint")
        if tagged and Path(tagged).is_file():
            return Path(tagged)
        raise ValueError(
            f"fine-tuning run {run_id}: no checkpoint/state.pt artifact ({mlflow_error(e)}) and no checkpoint "
            f"file at its 'checkpoint' tag ({tagged!r}); is it a finished `rcl-dist finetune` run?"
        ) from None


def _pretrain_lineage(pretrain_checkpoint: str | None) -> dict[str, str]:
    """Pre-training run id and manifest from the Ray run state beside the pre-training checkpoint."""
    from rcl_dist.paths import read_run_state

    out = {"pretrain_run_id": "unknown", "pretrain_manifest": "unknown"}
    if not pretrain_checkpoint or pretrain_checkpoint.lower() == "none":
        out.update(pretrain_run_id="none (random initialisation)", pretrain_manifest="none")
        return out
    try:
        info = read_run_state(pretrain_checkpoint)
    except (OSError, ValueError):  # no run state beside it (FileNotFoundError), or an unreadable one
        return out
    out["pretrain_run_id"] = str(info.get("mlflow_run_id") or "none (not tracked)")
    out["pretrain_manifest"] = str(info.get("manifest") or "unknown")
    return out


def _describe(info: dict[str, str], cfg, ev: dict[str, Any] | None) -> str:
    m = cfg.model
    text = (
        f"{m.name} (width {m.width}, depth {m.depth}, {m.in_channels} channel(s)) fine-tuned for "
        f"{info['trained_on.task']} ({info['trained_on.mode']} mode, {info['trained_on.labels']} labelled crops, "
        f"{info['trained_on.steps']} steps, crop {info['trained_on.crop']}) on manifest {info['lineage.finetune_manifest']} "
        f"(split {info['trained_on.split']}, sha256 {info['lineage.finetune_manifest_sha256'][:16]}), from pre-training "
        f"checkpoint {info['lineage.pretrain_checkpoint']} (MLflow run {info['lineage.pretrain_run_id']}). "
        f"Fine-tuning run {info['lineage.finetune_run_id']}; code {info['lineage.code_commit']}."
    )
    if ev is not None:
        text += (
            f" Evaluation ({ev['task']}, {ev['n']} images of {info['eval.data']}): PSNR {ev['psnr_mean']:.2f} dB "
            f"(input {ev['psnr_input_mean']:.2f}), SSIM {ev['ssim_mean']:.4f}."
        )
    return text


# ---------------------------------------------------------------------------------------------- register
def _load_finetuned(ckpt: Path, finetune_run_id: str):
    """(model, config, state) of a run's checkpoint; refuses a pre-training or RAW-input checkpoint."""
    from rcl_dist.models.io import load_checkpoint

    model, cfg, state = load_checkpoint(ckpt)
    if "task" not in state:
        raise ValueError(
            f"run {finetune_run_id}: {ckpt.name} is not a fine-tuned checkpoint (no 'task' entry): "
            "register the output of `rcl-dist finetune`"
        )
    if getattr(model, "raw", None) is not None:
        raise ValueError(f"run {finetune_run_id}: a RAW-input model (raw={model.raw!r}, task {state['task']}) cannot be served on image files")
    return model, cfg, state


def _lineage(finetune_run_id: str, run, ckpt: Path, cfg, state: dict[str, Any]) -> dict[str, str]:
    """The version's lineage.* and trained_on.* tags: runs, manifests and their digests, code, training settings."""
    from rcl_dist.models.io import head_label

    params, rtags = run.data.params, run.data.tags
    pretrain = str(state.get("pretrain_checkpoint") or rtags.get("pretrain_checkpoint") or params.get("source") or "unknown")
    pre = _pretrain_lineage(pretrain)
    ft_manifest = params.get("manifest")
    pre_manifest = cfg.data.manifest or (pre["pretrain_manifest"] if pre["pretrain_manifest"] not in ("unknown", "none") else None)
    code = _code_version()
    return {
        "lineage.finetune_run_id": finetune_run_id,
        "lineage.finetune_experiment_id": run.info.experiment_id,
        "lineage.finetune_run_name": run.info.run_name or "",
        "lineage.finetune_code_commit": rtags.get("mlflow.source.git.commit", "unknown"),
        "lineage.pretrain_checkpoint": pretrain,
        "lineage.pretrain_run_id": pre["pretrain_run_id"],
        "lineage.pretrain_manifest": str(pre_manifest or "unknown"),
        "lineage.pretrain_manifest_sha256": _file_sha256_or_note(pre_manifest),
        "lineage.finetune_manifest": str(ft_manifest or "unknown"),
        "lineage.finetune_manifest_sha256": _file_sha256_or_note(ft_manifest),
        "lineage.checkpoint_sha256": _sha256(ckpt),
        "lineage.code_commit": code["code_commit"],
        "lineage.code_version": code["code_version"],
        "trained_on.task": str(state.get("task")),
        "trained_on.mode": str(state.get("mode", "unknown")),
        "trained_on.labels": str(state.get("labels", "unknown")),
        "trained_on.steps": str(state.get("steps", "unknown")),
        "trained_on.crop": str(state.get("crop", "unknown")),
        "trained_on.seed": str(state.get("seed", "unknown")),
        "trained_on.split": str(params.get("split", "unknown")),
        "trained_on.data": str(ft_manifest or "unknown"),
        "trained_on.label_l1": str(state.get("label_l1", "unknown")),
        "trained_on.model": f"{cfg.model.name} width={cfg.model.width} depth={cfg.model.depth} in_channels={cfg.model.in_channels}",
        "trained_on.head": head_label(state["head"]) if state.get("head") else "pre-training head",
    }


def _eval_tags(ev: dict[str, Any], eval_data: str | os.PathLike, eval_task: str, eval_limit: int | None) -> dict[str, str]:
    """The version's eval.* tags: the folder, its fingerprint and the mean scores measured on it."""
    return {
        "eval.task": str(ev["task"]),
        "eval.data": str(Path(eval_data).resolve()),
        "eval.fingerprint": eval_fingerprint(eval_data, eval_task, eval_limit),
        "eval.limit": str(eval_limit),
        "eval.n": str(ev["n"]),
        "eval.psnr": f"{ev['psnr_mean']:.6f}",
        "eval.ssim": f"{ev['ssim_mean']:.6f}",
        "eval.psnr_input": f"{ev['psnr_input_mean']:.6f}",
        "eval.ssim_input": f"{ev['ssim_input_mean']:.6f}",
    }


def _log_denoiser(client, uri: str, run, finetune_run_id: str, name: str, ckpt: Path, info: dict[str, str],
                  description: str, ev: dict[str, Any] | None, tile: int, overlap: int):
    """Log the pyfunc model (and the eval metrics) in a new run nested under the fine-tuning run: (model info, run id)."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    try:
        reg_run = client.create_run(
            run.info.experiment_id,
            run_name=f"register-{name}",
            tags={"mlflow.parentRunId": finetune_run_id, "rcl_dist.kind": "register", "registered_model": name,
                  "mlflow.note.content": description, **{k: _tag(v) for k, v in info.items()}},
        )  # fmt: skip
    except MlflowException as e:
        raise ValueError(f"cannot create the registering run at {uri}: {mlflow_error(e)}") from None
    reg_run_id = reg_run.info.run_id
    status = "FAILED"
    try:
        if ev is not None:
            client.log_batch(reg_run_id, metrics=[
                Metric(f"eval_{k}", float(ev[k]), int(datetime.datetime.now().timestamp() * 1000), 0)
                for k in ("psnr_mean", "ssim_mean", "psnr_input_mean", "ssim_input_mean")
            ])  # fmt: skip
        with global_uris(uri), mlflow.start_run(run_id=reg_run_id, nested=True):
            model_info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                **pyfunc_model_args(ckpt, tile, overlap),
                pip_requirements=runtime_requirements(),
                signature=model_signature(tile, overlap),
                input_example=input_example(),
                metadata={"rcl_dist": {k: v for k, v in info.items()}},
            )
        status = "FINISHED"
    except MlflowException as e:
        raise ValueError(f"cannot log the model in run {reg_run_id} at {uri}: {mlflow_error(e)}") from None
    finally:
        client.set_terminated(reg_run_id, status)
    return model_info, reg_run_id


def _new_version(client, uri: str, name: str, model_info, reg_run_id: str, info: dict[str, str], description: str):
    """Create the registered model if new and a version of it from the logged model, tagged with ``info``."""
    from mlflow.exceptions import MlflowException

    try:
        try:
            client.create_registered_model(
                name, description="RCL image restorers (rcl_dist); versions are promoted by evaluation, see their tags"
            )
        except MlflowException as e:
            if "ALREADY_EXISTS" not in str(e.error_code):
                raise
        # a SQLite registry resolves the models:/m-... source through the *global* tracking URI
        with global_uris(uri):
            mv = client.create_model_version(
                name,
                source=model_info.model_uri,
                run_id=reg_run_id,
                tags={k: _tag(v) for k, v in info.items()},
                description=description,
                model_id=model_info.model_id,
            )
        return client.get_model_version(name, mv.version)
    except MlflowException as e:
        raise ValueError(f"cannot register {name!r} at {uri}: {mlflow_error(e)}") from None


def register(
    finetune_run_id: str,
    name: str,
    *,
    tracking_uri: str | None = None,
    eval_data: str | os.PathLike | None = None,
    eval_task: str = "denoise",
    eval_limit: int | None = None,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
):
    """Register the fine-tuned checkpoint of MLflow run ``finetune_run_id`` as a new version of ``name``.

    Logs a :class:`rcl_dist.serving.DenoiserModel` pyfunc model (artifact ``denoiser``) in a new run nested under the
    fine-tuning run (see ``docs/registry.md``), registers it, and tags the version with its lineage,
    training description and (``eval_data`` given) its evaluation on that folder. ``tile``/``overlap``:
    the served model's default tiling. Returns the :class:`mlflow.entities.model_registry.ModelVersion`
    (with its tags). Raises ``ValueError`` (unknown run, no checkpoint, a RAW-input model, an MLflow
    error, with the reason) or ``FileNotFoundError`` (``eval_data`` missing) before logging anything.
    """
    from mlflow.exceptions import MlflowException

    if not name or not isinstance(name, str):
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    _check_eval_data(eval_data, eval_task)
    client, uri = _client(tracking_uri)
    try:
        run = client.get_run(finetune_run_id)
    except MlflowException as e:
        raise ValueError(f"fine-tuning run {finetune_run_id!r} not found at {uri}: {mlflow_error(e)}") from None

    with tempfile.TemporaryDirectory(prefix="rcl-register-") as tmp:
        ckpt = _download_checkpoint(client, run, Path(tmp) / "download")
        model, cfg, state = _load_finetuned(ckpt, finetune_run_id)
        ev = _evaluate(model, eval_data, eval_task, eval_limit) if eval_data is not None else None
        info = _lineage(finetune_run_id, run, ckpt, cfg, state)
        if ev is not None:
            info.update(_eval_tags(ev, eval_data, eval_task, eval_limit))
        description = _describe(info, cfg, ev)
        model_info, reg_run_id = _log_denoiser(
            client, uri, run, finetune_run_id, name, ckpt, info, description, ev, tile, overlap
        )
    return _new_version(client, uri, name, model_info, reg_run_id, info, description)


# ---------------------------------------------------------------------------------------------- promote
def _check_promote_args(eval_data, eval_task: str, version: int | str, alias: str) -> str:
    """Refuse a missing evaluation folder, a non-numeric version or a malformed alias; the version as text."""
    if eval_data is None:
        raise ValueError("promote needs eval_data: the evaluation folder both versions are measured on")
    _check_eval_data(eval_data, eval_task)
    version = str(version)
    if not version.isdigit():
        raise ValueError(f"version must be a version number, got {version!r}")
    if not alias or not re.fullmatch(r"[A-Za-z0-9_\-]+", alias):
        raise ValueError(f"alias must be letters, digits, '_' or '-', got {alias!r}")
    return version


def _decide(cand: dict[str, Any], held: dict[str, Any] | None, holder: str | None, version: str, alias: str,
            force: bool) -> tuple[str, bool, str]:
    """(decision, promoted, reason): whether the candidate takes ``alias`` from its holder, by mean PSNR or force."""
    if holder == version:
        decision, promoted, reason = "already-holder", True, f"version {version} already holds @{alias}"
    elif holder is None:
        decision, promoted, reason = "no-holder", True, f"@{alias} was not set"
    elif cand["psnr_mean"] > held["psnr_mean"]:
        decision, promoted, reason = "promoted", True, (
            f"candidate PSNR {cand['psnr_mean']:.4f} dB > holder v{holder} {held['psnr_mean']:.4f} dB"
        )
    elif force:
        decision, promoted, reason = "forced", True, (
            f"forced: candidate PSNR {cand['psnr_mean']:.4f} dB <= holder v{holder} {held['psnr_mean']:.4f} dB"
        )
    else:
        decision, promoted, reason = "rejected", False, (
            f"candidate PSNR {cand['psnr_mean']:.4f} dB <= holder v{holder} {held['psnr_mean']:.4f} dB: @{alias} unchanged"
        )
    if force and decision == "promoted":
        reason += " (force was not needed)"
    return decision, promoted, reason


def _record_promotion(client, uri: str, record: dict[str, Any]) -> None:
    """Move the alias when promoted and write the decision as tags on both versions and the model."""
    from mlflow.exceptions import MlflowException

    name, alias, version, holder = record["name"], record["alias"], record["candidate_version"], record["holder_version"]
    promoted, now, fingerprint = record["promoted"], record["time"], record["eval_fingerprint"]
    fmt = lambda v: "none" if v is None else f"{v:.6f}"  # noqa: E731
    p = f"promotion.{alias}"
    try:
        if promoted and holder != version:
            client.set_registered_model_alias(name, alias, version)
        cand_tags = {
            f"{p}.decision": record["decision"],
            f"{p}.promoted": str(promoted).lower(),
            f"{p}.candidate_psnr": fmt(record["candidate_psnr"]),
            f"{p}.holder_psnr": fmt(record["holder_psnr"]),
            f"{p}.candidate_ssim": fmt(record["candidate_ssim"]),
            f"{p}.holder_ssim": fmt(record["holder_ssim"]),
            f"{p}.holder_version": str(holder) if holder is not None else "none",
            f"{p}.n_images": str(record["n_images"]),
            f"{p}.eval_data": record["eval_data"],
            f"{p}.eval_fingerprint": fingerprint,
            f"{p}.reason": record["reason"],
            f"{p}.time": now,
        }
        for k, v in cand_tags.items():
            client.set_model_version_tag(name, version, k, _tag(v))
        if holder is not None and holder != version:
            holder_tags = {
                f"{p}.challenge.by_version": version,
                f"{p}.challenge.outcome": "replaced" if promoted else "kept",
                f"{p}.challenge.holder_psnr": fmt(record["holder_psnr"]),
                f"{p}.challenge.candidate_psnr": fmt(record["candidate_psnr"]),
                f"{p}.challenge.eval_fingerprint": fingerprint,
                f"{p}.challenge.time": now,
            }
            for k, v in holder_tags.items():
                client.set_model_version_tag(name, holder, k, _tag(v))
        client.set_registered_model_tag(name, f"{p}.last", _tag(record))
    except MlflowException as e:
        raise ValueError(f"promote {name!r} v{version} to @{alias} at {uri}: {mlflow_error(e)}") from None


def promote(
    name: str,
    version: int | str,
    alias: str = DEFAULT_ALIAS,
    *,
    eval_data: str | os.PathLike,
    eval_task: str = "denoise",
    force: bool = False,
    tracking_uri: str | None = None,
    eval_limit: int | None = None,
) -> dict[str, Any]:
    """Move ``alias`` of registered model ``name`` to ``version`` if it measures better than the holder.

    Both the candidate and the alias's current holder are loaded from the registry and evaluated on
    ``eval_data`` for ``eval_task`` (the same fixed inputs). The alias moves when there is no holder,
    when ``force``, or when the candidate's mean PSNR is strictly higher than the holder's. Returns the
    decision: ``{"name", "alias", "candidate_version", "holder_version" (None: no holder),
    "candidate_psnr", "holder_psnr", "candidate_ssim", "holder_ssim", "n_images", "eval_data",
    "eval_task", "eval_fingerprint", "promoted" (bool: the alias now points at the candidate),
    "decision" ("promoted", "rejected", "forced", "no-holder", "already-holder"), "reason", "time"}``,
    and records it as tags (``docs/registry.md``). Raises ``ValueError`` for an unknown model/version or
    an MLflow error, ``FileNotFoundError`` for a missing ``eval_data``.
    """
    from mlflow.exceptions import MlflowException

    version = _check_promote_args(eval_data, eval_task, version, alias)
    client, uri = _client(tracking_uri)
    try:
        client.get_model_version(name, version)
    except MlflowException as e:
        raise ValueError(f"model {name!r} version {version} not found at {uri}: {mlflow_error(e)}") from None
    try:
        holder = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        holder = None  # the alias is not set (or points at a deleted version)

    fingerprint = eval_fingerprint(eval_data, eval_task, eval_limit)
    cand = _evaluate(restorer_from_uri(f"models:/{name}/{version}", tracking_uri=uri), eval_data, eval_task, eval_limit)
    held = None
    if holder is not None and holder != version:
        held = _evaluate(restorer_from_uri(f"models:/{name}/{holder}", tracking_uri=uri), eval_data, eval_task, eval_limit)
    elif holder == version:
        held = cand

    decision, promoted, reason = _decide(cand, held, holder, version, alias, force)
    record: dict[str, Any] = {
        "name": name,
        "alias": alias,
        "candidate_version": version,
        "holder_version": holder,
        "candidate_psnr": cand["psnr_mean"],
        "holder_psnr": None if held is None else held["psnr_mean"],
        "candidate_ssim": cand["ssim_mean"],
        "holder_ssim": None if held is None else held["ssim_mean"],
        "n_images": cand["n"],
        "eval_data": str(Path(eval_data).resolve()),
        "eval_task": cand["task"],
        "eval_limit": eval_limit,
        "eval_fingerprint": fingerprint,
        "force": bool(force),
        "promoted": promoted,
        "decision": decision,
        "reason": reason,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _record_promotion(client, uri, record)
    return record


# ---------------------------------------------------------------------------------------------- CLI entry points
def main_register(
    run_id: str,
    name: str,
    tracking_uri: str | None = None,
    eval_data: str | None = None,
    eval_task: str = "denoise",
    eval_limit: int | None = None,
) -> int:
    """``rcl-dist register --run RUN_ID --name NAME [--eval-data DIR --eval-task T --eval-limit N] [--tracking-uri URI]``.

    Prints the new version and its URI; returns 0. Errors raise ``ValueError``/``FileNotFoundError``
    (the CLI prints them and exits with 2).
    """
    mv = register(run_id, name, tracking_uri=tracking_uri, eval_data=eval_data, eval_task=eval_task, eval_limit=eval_limit)
    print(f"registered {name} version {mv.version} (models:/{name}/{mv.version}) from fine-tuning run {run_id}")
    if "eval.psnr" in mv.tags:
        print(f"evaluation on {mv.tags['eval.data']} ({mv.tags['eval.n']} images, {mv.tags['eval.task']}): "
              f"PSNR {float(mv.tags['eval.psnr']):.2f} dB, SSIM {float(mv.tags['eval.ssim']):.4f}")  # fmt: skip
    print(f"promote with: rcl-dist promote --name {name} --version {mv.version} --eval-data DIR")
    return 0


def main_promote(
    name: str,
    version: int | str,
    alias: str = DEFAULT_ALIAS,
    eval_data: str | None = None,
    eval_task: str = "denoise",
    force: bool = False,
    tracking_uri: str | None = None,
    eval_limit: int | None = None,
) -> int:
    """``rcl-dist promote --name NAME --version N [--alias champion] --eval-data DIR [--force]``.

    Prints the decision with both PSNR figures. Returns 0 when ``alias`` now points at the version
    (promoted, forced, first holder, or already held), 1 when the candidate was rejected (alias
    unchanged). Errors raise ``ValueError``/``FileNotFoundError`` (the CLI exits with 2).
    """
    d = promote(name, version, alias, eval_data=eval_data, eval_task=eval_task, force=force,
                tracking_uri=tracking_uri, eval_limit=eval_limit)  # fmt: skip
    held = "none" if d["holder_psnr"] is None else f"{d['holder_psnr']:.2f} dB (v{d['holder_version']})"
    print(f"{name} v{d['candidate_version']}: PSNR {d['candidate_psnr']:.2f} dB vs @{alias} holder {held} "
          f"on {d['n_images']} images -> {d['decision']}: {d['reason']}")  # fmt: skip
    return 0 if d["promoted"] else 1
