"""The model registry: package a fine-tuned checkpoint as an MLflow pyfunc model, register it, promote it by
evaluation, load it back (``rcl-dist register | promote``, ``mlflow models serve``).

Why a pyfunc wrapper: MLflow 3's ``mlflow.pytorch`` default (``pt2``, torch.export) locks the input shape
to the example's, while a fully convolutional denoiser must take any image size. :class:`DenoiserModel`
holds the checkpoint as an artifact (loaded with ``weights_only=True``: nothing is unpickled from it)
and runs tiled inference (:func:`rcl_dist.evaluate.tiled_restore`), so the memory of a request is bounded
by the tile size.

Request format (``mlflow models serve``, ``/invocations``)
--------------------------------------------------------
Input: a DataFrame with one string column ``image``; each row one image file, base64-encoded: PNG
(8- or 16-bit; grey, grey+alpha, RGB or RGBA; any size), or TIFF (8/16-bit), JPEG, BMP. JSON::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG>"], ["<base64 PNG>"]]},
     "params": {"tile": 256, "overlap": 32}}

``params`` are optional (defaults: tile 256, overlap 32 input pixels). Output: a DataFrame with one
string column ``image``, one row per input row: the restored image as a base64 PNG with the input's
bit depth (8 -> 8, 16 -> 16) and channels (alpha passed through), the same size for a denoiser (x2 for
an SR model). Served as ``{"predictions": [{"image": "<base64 PNG>"}, ...]}``. A row that is not a
readable image is an ``INVALID_PARAMETER_VALUE`` error (HTTP 400) naming the row, and so is an image over
the pixel budget (``$RCL_DIST_MAX_PIXELS`` of the serving process, default 2**26 pixels: checked from the
header before decoding, see :func:`rcl_dist.data.images.pixel_budget`; lower it for a public server, a
request costs about 70 bytes a pixel). Any other failure is a short ``INTERNAL_ERROR`` (HTTP 500) naming
the row, with the traceback in the server's log only: no response body carries Python internals.

In process, :meth:`DenoiserModel.predict` also takes a numpy array, ``[H, W, C]`` or ``[N, H, W, C]``
(C 1-4), float in [0, 1] (or uint8/uint16), and returns an array of the same kind and dtype. The
registered signature is the DataFrame one (what the server needs), and MLflow's schema enforcement in
``PyFuncModel.predict`` rejects arrays against it, so call arrays through the unwrapped model:
``load_denoiser(uri).unwrap_python_model().predict(None, array)``.

Registering (:func:`register`)
------------------------------
The fine-tuned checkpoint is the ``checkpoint/state.pt`` artifact of the fine-tuning run
(:func:`rcl_dist.train.finetune_ray.run_finetune`). The model is logged in a **new run** in the fine-tuning
run's experiment, nested under it (tag ``mlflow.parentRunId``), named ``register-<name>``, not in the
fine-tuning run itself: that run stays as training left it (status, end time, artifacts), each
registration (with its own evaluation) is a run of its own, and the UI shows it under the training run.
The model version's ``run_id`` is that run; its tags carry the lineage (``lineage.*``: fine-tuning run,
pre-training checkpoint and run, manifests and their sha256, checkpoint sha256, code commit),
what it was trained on (``trained_on.*``) and, with ``eval_data``, the evaluation (``eval.*``: PSNR/SSIM
means, number of images, data folder and its fingerprint); the version's description says the same
in a sentence. The pyfunc is logged as MLflow "models from code" (``python_model`` is the path of
:mod:`rcl_dist.registry_model`, which calls ``mlflow.models.set_model``): the model folder holds source,
no pickle of the class, and :func:`load_denoiser` refuses a model stored as a pickle. The model ships its code (``code/rcl_dist``, MLflow ``code_paths``) and pins the
runtime packages to the versions installed when it was registered (:func:`runtime_requirements`).

Promoting (:func:`promote`)
---------------------------
Aliases only (stages are deprecated in MLflow 3). The candidate version and the current holder of the
alias are evaluated in one process on the same evaluation folder with the same fixed noisy inputs
(:func:`rcl_dist.evaluate.evaluate_folder`: noise seeded by each file's content); the alias moves only
if the candidate's mean PSNR is strictly higher, or when there is no holder, or with ``force``. The
decision and both figures are tags on the candidate (``promotion.<alias>.*``) and on the holder
(``promotion.<alias>.challenge.*``), and the whole record is the registered model's tag
``promotion.<alias>.last``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
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
import numpy as np
import pandas as pd

__all__ = [
    "DenoiserModel",
    "MODEL_ARTIFACT",
    "DEFAULT_ALIAS",
    "RUNTIME_DISTRIBUTIONS",
    "runtime_requirements",
    "model_signature",
    "pyfunc_model_args",
    "encode_image_b64",
    "decode_image_b64",
    "eval_fingerprint",
    "register",
    "promote",
    "load_denoiser",
    "restorer_from_uri",
    "main_register",
    "main_promote",
]

MODEL_ARTIFACT = "denoiser"  # the logged model's name (artifact folder) in the registering run
DEFAULT_ALIAS = "champion"
DEFAULT_TILE, DEFAULT_OVERLAP = 256, 32
# What loading and running the pyfunc model imports (rcl_dist itself ships inside the model).
RUNTIME_DISTRIBUTIONS = (
    "mlflow", "cloudpickle", "torch", "numpy", "pandas", "scipy", "scikit-image", "pyarrow", "PyYAML",
    "pillow", "tifffile",
)  # fmt: skip
_MAX_TAG = 5000  # MLflow's limit for model version tag values
_log = logging.getLogger(__name__)
_PACKAGE_DIR = Path(__file__).resolve().parent
_MODEL_CODE = _PACKAGE_DIR / "registry_model.py"  # the pyfunc as source: mlflow.models.set_model(DenoiserModel())


# ---------------------------------------------------------------------------------------------- images <-> base64
def encode_image_b64(img: np.ndarray) -> str:
    """uint8/uint16 [H, W, C] -> base64 (ASCII) of its PNG, same bit depth."""
    from rcl_dist.data.codec import encode_png

    return base64.b64encode(encode_png(img)).decode("ascii")


def decode_image_b64(text: str | bytes) -> np.ndarray:
    """base64 of an image file (or the raw file bytes) -> uint8/uint16 [H, W, C]; ValueError if unreadable
    or over the pixel budget (the text's length is checked before it is decoded, the header before pixels)."""
    from rcl_dist.data.images import file_byte_limit, pixel_budget
    from rcl_dist.data.codec import PNG_SIGNATURE, decode_image_bytes

    limit = file_byte_limit(pixel_budget())
    if isinstance(text, (str, bytes, bytearray)) and len(text) > limit * 4 // 3 + 4:
        raise ValueError(f"too large: {len(text)} characters, more than a file within the pixel budget can need ({limit} bytes)")

    raw_file = isinstance(text, (bytes, bytearray)) and (
        bytes(text[:8]) == PNG_SIGNATURE or bytes(text[:2]) in (b"II", b"MM", b"\xff\xd8", b"BM")
    )  # PNG, TIFF, JPEG, BMP file bytes rather than base64
    if raw_file:
        data = bytes(text)
    else:
        if not isinstance(text, (str, bytes, bytearray)):
            raise ValueError(f"expected a base64 string, got {type(text).__name__}")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"not valid base64 ({e})") from None
    return decode_image_bytes(data)


# ---------------------------------------------------------------------------------------------- the pyfunc model
class DenoiserModel(mlflow.pyfunc.PythonModel):
    """A fine-tuned RCL restorer as an MLflow pyfunc model taking images of any size (see the module
    docstring for the request format).

    Artifacts: ``checkpoint`` (the fine-tuned ``state.pt``). ``load_context`` loads it with
    :func:`rcl_dist.models.io.load_checkpoint` (``torch.load(weights_only=True)``) on
    ``$RCL_DIST_DEVICE``, else cuda when available, else cpu. After loading, ``model`` is the torch
    Restorer, ``config`` its Config and ``info`` what the checkpoint says about its training (task, mode,
    labels, ...). ``tile``/``overlap`` are the defaults when a request passes no params.
    """

    def __init__(self, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> None:
        self.tile = int(tile)
        self.overlap = int(overlap)
        self.model = None
        self.config = None
        self.info: dict[str, Any] = {}

    def load_context(self, context) -> None:
        import torch

        from rcl_dist.models.io import load_checkpoint

        device = os.environ.get("RCL_DIST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        model, cfg, state = load_checkpoint(context.artifacts["checkpoint"], map_location=device)
        if getattr(model, "raw", None) is not None:
            raise ValueError(f"a RAW-input model (raw={model.raw!r}) cannot be served on RGB/grey images")
        settings = getattr(context, "model_config", None) or {}  # logged as models from code: the defaults
        self.tile = int(settings.get("tile", self.tile))
        self.overlap = int(settings.get("overlap", self.overlap))
        self.model = model.eval()
        self.config = cfg
        self.info = {k: state[k] for k in ("task", "mode", "labels", "steps", "head", "pretrain_checkpoint") if k in state}

    def _settings(self, params: dict[str, Any] | None) -> tuple[int, int]:
        params = params or {}
        tile, overlap = params.get("tile", self.tile), params.get("overlap", self.overlap)
        try:
            tile, overlap = int(tile), int(overlap)
        except (TypeError, ValueError):
            raise _bad_input(f"params tile and overlap must be integers, got {tile!r}, {overlap!r}") from None
        if tile < 8 or not 0 <= overlap < tile:
            raise _bad_input(f"need tile >= 8 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        return tile, overlap

    def _restore(self, img: np.ndarray, tile: int, overlap: int) -> np.ndarray:
        from rcl_dist.evaluate import restore_array

        if self.model is None:
            raise RuntimeError("DenoiserModel: load_context has not run (load it with mlflow.pyfunc.load_model)")
        return restore_array(self.model, img, tile=tile, overlap=overlap)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        """Restore every image of ``model_input`` (DataFrame column ``image`` of base64 image files, or a
        numpy array [H, W, C] / [N, H, W, C]); returns the same kind (see the module docstring).

        The annotation names the served contract (a DataFrame; MLflow then neither warns nor infers a
        schema from it); arrays are accepted too when this method is called directly."""
        from rcl_dist.data.codec import from_float, to_float

        tile, overlap = self._settings(params)
        if isinstance(model_input, np.ndarray):
            a = model_input
            if a.ndim not in (3, 4):
                raise _bad_input(f"an array input must be [H, W, C] or [N, H, W, C], got shape {a.shape}")
            batch = a[None] if a.ndim == 3 else a
            outs = [from_float(self._restore(to_float(im), tile, overlap), a.dtype) for im in batch]
            return outs[0] if a.ndim == 3 else np.stack(outs)
        if isinstance(model_input, pd.Series):
            model_input = model_input.to_frame(name=model_input.name or "image")
        if not isinstance(model_input, pd.DataFrame):
            raise _bad_input(
                f"expected a DataFrame with a column 'image' (base64 image files) or a numpy array, got {type(model_input).__name__}"
            )
        if "image" not in model_input.columns:
            raise _bad_input(f"the input needs a column 'image' (base64 image files); got columns {list(model_input.columns)}")
        results = []
        for i, value in enumerate(model_input["image"].tolist()):
            try:
                img = decode_image_b64(value)
            except ValueError as e:
                raise _bad_input(f"row {i}: cannot decode the image: {e}") from None
            except Exception as e:  # a decoder's own error type: still the input's fault, not a crash
                _log.exception("row %d: decoding failed", i)
                raise _bad_input(f"row {i}: cannot decode the image ({type(e).__name__})") from None
            try:
                restored = from_float(self._restore(to_float(img), tile, overlap), img.dtype)
                results.append(encode_image_b64(restored))
            except MemoryError:
                raise _server_error(f"row {i}: out of memory restoring a {img.shape[1]}x{img.shape[0]} image") from None
            except Exception:  # the traceback goes to the server log, not to the client
                _log.exception("row %d: restoring failed", i)
                raise _server_error(f"row {i}: internal error while restoring the image (details in the server log)") from None
        return pd.DataFrame({"image": results})


def _bad_input(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _server_error(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

    return MlflowException(message, error_code=INTERNAL_ERROR)


def pyfunc_model_args(checkpoint: str | os.PathLike, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> dict[str, Any]:
    """The arguments of ``mlflow.pyfunc.log_model`` / ``save_model`` that make an rcl_dist denoiser:
    the pyfunc as MLflow "models from code" (``python_model`` is the path of :mod:`rcl_dist.registry_model`,
    so MLflow stores source, never a pickle of the class), ``tile``/``overlap`` as its model config, the
    checkpoint as an artifact and the package as shipped code."""
    return {
        "python_model": str(_MODEL_CODE),
        "model_config": {"tile": int(tile), "overlap": int(overlap)},
        "artifacts": {"checkpoint": str(checkpoint)},
        "code_paths": [str(_PACKAGE_DIR)],
    }


def model_signature(tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP):
    """Input and output: one string column ``image``; params ``tile`` and ``overlap`` (long)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("string", "image")]),
        params=ParamSchema([ParamSpec("tile", "long", int(tile)), ParamSpec("overlap", "long", int(overlap))]),
    )


def _input_example() -> pd.DataFrame:
    """One 24x20 8-bit RGB gradient: small, and above a U-Net's minimum size."""
    y, x = np.mgrid[0:20, 0:24]
    img = np.stack([x * 10, y * 12, (x + y) * 5], axis=-1).clip(0, 255).astype(np.uint8)
    return pd.DataFrame({"image": [encode_image_b64(img)]})


def runtime_requirements() -> list[str]:
    """``name==version`` for :data:`RUNTIME_DISTRIBUTIONS` as installed now (a local version label such
    as torch's ``+cpu`` is dropped: ``torch==2.13.0`` resolves to the CPU or CUDA build per host)."""
    reqs = []
    for dist in RUNTIME_DISTRIBUTIONS:
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


# ---------------------------------------------------------------------------------------------- helpers
def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    from rcl_dist.paths import prepare_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    prepare_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


@contextlib.contextmanager
def _global_uris(uri: str):
    """Point MLflow's *global* tracking and registry URIs at ``uri`` for the block, then restore both
    globals and ``$MLFLOW_TRACKING_URI`` / ``$MLFLOW_REGISTRY_URI`` as they were.

    Needed because ``mlflow.pyfunc.log_model`` works through the global tracking URI and active run,
    and because resolving ``models:/NAME@alias`` in ``download_artifacts`` consults the global registry
    URI even when ``registry_uri=`` is passed (MLflow 3.17). MLflow's own ``_use_tracking_uri`` would
    unset an environment variable that was set before. Not thread-safe (MLflow's globals are not).
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_globals = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_globals[0])
        registry_utils._registry_uri = saved_globals[1]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def _mlflow_error(e: Exception) -> str:
    msg = getattr(e, "message", None) or str(e)
    return msg.splitlines()[0] if msg else type(e).__name__


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
            f"fine-tuning run {run_id}: no checkpoint/state.pt artifact ({_mlflow_error(e)}) and no checkpoint "
            f"file at its 'checkpoint' tag ({tagged!r}); is it a finished `rcl-dist finetune` run?"
        ) from None


def _pretrain_lineage(pretrain_checkpoint: str | None) -> dict[str, str]:
    """Pre-training run id and manifest from the Ray run state beside the pre-training checkpoint."""
    from rcl_dist.train.launch import RUN_STATE

    out = {"pretrain_run_id": "unknown", "pretrain_manifest": "unknown"}
    if not pretrain_checkpoint or pretrain_checkpoint.lower() == "none":
        out.update(pretrain_run_id="none (random initialisation)", pretrain_manifest="none")
        return out
    p = Path(pretrain_checkpoint)
    state = next((d / RUN_STATE for d in [p, *p.parents] if (d / RUN_STATE).is_file()), None)
    if state is not None:
        try:
            info = json.loads(state.read_text())
            out["pretrain_run_id"] = str(info.get("mlflow_run_id") or "none (not tracked)")
            out["pretrain_manifest"] = str(info.get("manifest") or "unknown")
        except (OSError, ValueError):
            pass
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

    Logs a :class:`DenoiserModel` pyfunc model (artifact ``denoiser``) in a new run nested under the
    fine-tuning run (see the module docstring), registers it, and tags the version with its lineage,
    training description and (``eval_data`` given) its evaluation on that folder. ``tile``/``overlap``:
    the served model's default tiling. Returns the :class:`mlflow.entities.model_registry.ModelVersion`
    (with its tags). Raises ``ValueError`` (unknown run, no checkpoint, a RAW-input model, an MLflow
    error, with the reason) or ``FileNotFoundError`` (``eval_data`` missing) before logging anything.
    """
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from rcl_dist.models.io import load_checkpoint

    if not name or not isinstance(name, str):
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    _check_eval_data(eval_data, eval_task)
    client, uri = _client(tracking_uri)
    try:
        run = client.get_run(finetune_run_id)
    except MlflowException as e:
        raise ValueError(f"fine-tuning run {finetune_run_id!r} not found at {uri}: {_mlflow_error(e)}") from None

    with tempfile.TemporaryDirectory(prefix="rcl-register-") as tmp:
        ckpt = _download_checkpoint(client, run, Path(tmp) / "download")
        model, cfg, state = load_checkpoint(ckpt)
        if "task" not in state:
            raise ValueError(
                f"run {finetune_run_id}: {ckpt.name} is not a fine-tuned checkpoint (no 'task' entry): "
                "register the output of `rcl-dist finetune`"
            )
        if getattr(model, "raw", None) is not None:
            raise ValueError(f"run {finetune_run_id}: a RAW-input model (raw={model.raw!r}, task {state['task']}) cannot be served on image files")
        ev = _evaluate(model, eval_data, eval_task, eval_limit) if eval_data is not None else None

        params, rtags = run.data.params, run.data.tags
        pretrain = str(state.get("pretrain_checkpoint") or rtags.get("pretrain_checkpoint") or params.get("source") or "unknown")
        pre = _pretrain_lineage(pretrain)
        ft_manifest = params.get("manifest")
        pre_manifest = cfg.data.manifest or (pre["pretrain_manifest"] if pre["pretrain_manifest"] not in ("unknown", "none") else None)
        code = _code_version()
        info: dict[str, str] = {
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
            "trained_on.head": f"{state['head']['kind']}/{state['head']['out_channels']}" if state.get("head") else "pre-training head",
        }
        if ev is not None:
            info.update({
                "eval.task": str(ev["task"]),
                "eval.data": str(Path(eval_data).resolve()),
                "eval.fingerprint": eval_fingerprint(eval_data, eval_task, eval_limit),
                "eval.limit": str(eval_limit),
                "eval.n": str(ev["n"]),
                "eval.psnr": f"{ev['psnr_mean']:.6f}",
                "eval.ssim": f"{ev['ssim_mean']:.6f}",
                "eval.psnr_input": f"{ev['psnr_input_mean']:.6f}",
                "eval.ssim_input": f"{ev['ssim_input_mean']:.6f}",
            })  # fmt: skip
        description = _describe(info, cfg, ev)

        try:
            reg_run = client.create_run(
                run.info.experiment_id,
                run_name=f"register-{name}",
                tags={"mlflow.parentRunId": finetune_run_id, "rcl_dist.kind": "register", "registered_model": name,
                      "mlflow.note.content": description, **{k: _tag(v) for k, v in info.items()}},
            )  # fmt: skip
        except MlflowException as e:
            raise ValueError(f"cannot create the registering run at {uri}: {_mlflow_error(e)}") from None
        reg_run_id = reg_run.info.run_id
        status = "FAILED"
        try:
            if ev is not None:
                client.log_batch(reg_run_id, metrics=[
                    Metric(f"eval_{k}", float(ev[k]), int(datetime.datetime.now().timestamp() * 1000), 0)
                    for k in ("psnr_mean", "ssim_mean", "psnr_input_mean", "ssim_input_mean")
                ])  # fmt: skip
            with _global_uris(uri), mlflow.start_run(run_id=reg_run_id, nested=True):
                model_info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT,
                    **pyfunc_model_args(ckpt, tile, overlap),
                    pip_requirements=runtime_requirements(),
                    signature=model_signature(tile, overlap),
                    input_example=_input_example(),
                    metadata={"rcl_dist": {k: v for k, v in info.items()}},
                )
            status = "FINISHED"
        except MlflowException as e:
            raise ValueError(f"cannot log the model in run {reg_run_id} at {uri}: {_mlflow_error(e)}") from None
        finally:
            client.set_terminated(reg_run_id, status)

    try:
        try:
            client.create_registered_model(
                name, description="RCL image restorers (rcl_dist); versions are promoted by evaluation, see their tags"
            )
        except MlflowException as e:
            if "ALREADY_EXISTS" not in str(e.error_code):
                raise
        # a SQLite registry resolves the models:/m-... source through the *global* tracking URI
        with _global_uris(uri):
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
        raise ValueError(f"cannot register {name!r} at {uri}: {_mlflow_error(e)}") from None


# ---------------------------------------------------------------------------------------------- load
def load_denoiser(model_uri: str, *, tracking_uri: str | None = None):
    """``mlflow.pyfunc.load_model`` of ``model_uri`` (``models:/NAME@alias``, ``models:/NAME/3``,
    ``runs:/RUN/denoiser``, a local model folder, ...) against ``tracking_uri`` (default: as
    :func:`rcl_dist.paths.resolve_tracking_uri`; it serves as the registry URI too). MLflow's global
    URIs are set only while the files download and restored afterwards (:func:`_global_uris`).

    A URI that names no model raises ``ValueError`` naming the URI and the store, instead of an MLflow
    traceback. The model's files are downloaded to a temporary folder that is kept (the loaded model
    may import its shipped code from there).
    """
    from mlflow.exceptions import MlflowException

    from rcl_dist.paths import resolve_tracking_uri

    if not model_uri or not isinstance(model_uri, str):
        raise ValueError(f"model URI must be a non-empty string, got {model_uri!r}")
    uri = resolve_tracking_uri(tracking_uri)
    local = Path(model_uri)
    try:
        if not (local.is_dir() and (local / "MLmodel").is_file()):
            if "://" not in model_uri and ":/" not in model_uri:
                raise ValueError(
                    f"model {model_uri!r}: neither an MLflow model URI (models:/NAME@alias, models:/NAME/VERSION, "
                    "runs:/RUN_ID/denoiser) nor a local model folder"
                )
            with _global_uris(uri):  # models:/ resolution reads the global registry URI
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=uri, registry_uri=uri))
        if not (local / "MLmodel").is_file():
            raise ValueError(f"model {model_uri!r}: no MLmodel file there (not an MLflow model)")
        _refuse_pickled(model_uri, local / "MLmodel")
        return mlflow.pyfunc.load_model(str(local))
    except MlflowException as e:
        raise ValueError(f"model {model_uri!r} not found at {uri}: {_mlflow_error(e)}") from None
    except OSError as e:
        raise ValueError(f"model {model_uri!r}: cannot be loaded ({type(e).__name__}: {e})") from None


def _refuse_pickled(model_uri: str, mlmodel: Path) -> None:
    """A pyfunc stored as a pickled Python object (``python_model.pkl``: MLflow would unpickle a class
    to load it) is refused; rcl_dist registers its models from code (``model_code_path``)."""
    import yaml

    try:
        meta = yaml.safe_load(mlmodel.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"model {model_uri!r}: unreadable {mlmodel.name} ({type(e).__name__}: {e})") from None
    pyfunc = (meta.get("flavors") or {}).get("python_function") or {}
    if "python_model" in pyfunc and "model_code_path" not in pyfunc:
        raise ValueError(
            f"model {model_uri!r} stores its Python model as a pickle ({pyfunc['python_model']}); loading it would "
            "unpickle code, so it is refused: register the fine-tuning run again with `rcl-dist register` "
            "(models from code)"
        )


def restorer_from_uri(model_uri: str, *, tracking_uri: str | None = None):
    """The torch Restorer inside the registered model ``model_uri`` (:func:`load_denoiser`, then the
    :class:`DenoiserModel`'s ``model``); ``ValueError`` when the URI names no model or a model that is
    not an rcl_dist denoiser."""
    from mlflow.exceptions import MlflowException

    loaded = load_denoiser(model_uri, tracking_uri=tracking_uri)
    try:
        net = getattr(loaded.unwrap_python_model(), "model", None)
    except MlflowException:
        net = None
    if net is None:
        raise ValueError(f"model {model_uri!r} is not an rcl_dist denoiser (a pyfunc DenoiserModel registered by `rcl-dist register`)")
    return net


# ---------------------------------------------------------------------------------------------- promote
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
    and records it as tags (module docstring). Raises ``ValueError`` for an unknown model/version or
    an MLflow error, ``FileNotFoundError`` for a missing ``eval_data``.
    """
    from mlflow.exceptions import MlflowException

    if eval_data is None:
        raise ValueError("promote needs eval_data: the evaluation folder both versions are measured on")
    _check_eval_data(eval_data, eval_task)
    version = str(version)
    if not version.isdigit():
        raise ValueError(f"version must be a version number, got {version!r}")
    if not alias or not re.fullmatch(r"[A-Za-z0-9_\-]+", alias):
        raise ValueError(f"alias must be letters, digits, '_' or '-', got {alias!r}")
    client, uri = _client(tracking_uri)
    try:
        client.get_model_version(name, version)
    except MlflowException as e:
        raise ValueError(f"model {name!r} version {version} not found at {uri}: {_mlflow_error(e)}") from None
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
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
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
        "time": now,
    }
    fmt = lambda v: "none" if v is None else f"{v:.6f}"  # noqa: E731
    p = f"promotion.{alias}"
    try:
        if promoted and holder != version:
            client.set_registered_model_alias(name, alias, version)
        cand_tags = {
            f"{p}.decision": decision,
            f"{p}.promoted": str(promoted).lower(),
            f"{p}.candidate_psnr": fmt(record["candidate_psnr"]),
            f"{p}.holder_psnr": fmt(record["holder_psnr"]),
            f"{p}.candidate_ssim": fmt(record["candidate_ssim"]),
            f"{p}.holder_ssim": fmt(record["holder_ssim"]),
            f"{p}.holder_version": str(holder) if holder is not None else "none",
            f"{p}.n_images": str(record["n_images"]),
            f"{p}.eval_data": record["eval_data"],
            f"{p}.eval_fingerprint": fingerprint,
            f"{p}.reason": reason,
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
        raise ValueError(f"promote {name!r} v{version} to @{alias} at {uri}: {_mlflow_error(e)}") from None
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
