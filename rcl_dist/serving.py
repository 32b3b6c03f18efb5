"""Serving a registered denoiser: the MLflow pyfunc model, its request codec and signature, loading by URI.

Why a pyfunc wrapper: MLflow 3's ``mlflow.pytorch`` default (``pt2``, torch.export) locks the input shape
to the example's, while a fully convolutional denoiser must take any image size. :class:`DenoiserModel`
holds the checkpoint as an artifact (loaded with ``weights_only=True``: nothing is unpickled from it)
and runs tiled inference, so the memory of a request is bounded by the tile size. A request is a
DataFrame column ``image`` of base64 image files, answered in kind at the input's bit depth; bad input
is an HTTP 400 naming the row, no response carries Python internals. The model is logged as MLflow
"models from code" (:mod:`rcl_dist.registry_model`) and :func:`load_denoiser` refuses one stored as a
pickle. Request format, errors and the pixel budget: ``docs/serving.md``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

__all__ = [
    "DenoiserModel",
    "MODEL_ARTIFACT",
    "DEFAULT_TILE",
    "DEFAULT_OVERLAP",
    "RUNTIME_DISTRIBUTIONS",
    "runtime_requirements",
    "model_signature",
    "pyfunc_model_args",
    "input_example",
    "encode_image_b64",
    "decode_image_b64",
    "global_uris",
    "mlflow_error",
    "load_denoiser",
    "restorer_from_uri",
]

MODEL_ARTIFACT = "denoiser"  # the logged model's name (artifact folder) in the registering run
DEFAULT_TILE, DEFAULT_OVERLAP = 256, 32
# What loading and running the pyfunc model imports (rcl_dist itself ships inside the model).
RUNTIME_DISTRIBUTIONS = (
    "mlflow", "cloudpickle", "torch", "numpy", "pandas", "scipy", "scikit-image", "pyarrow", "PyYAML",
    "pillow", "tifffile",
)  # fmt: skip
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
    """A fine-tuned RCL restorer as an MLflow pyfunc model taking images of any size (request format:
    ``docs/serving.md``).

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
        from rcl_dist.infer import restore_array

        if self.model is None:
            raise RuntimeError("DenoiserModel: load_context has not run (load it with mlflow.pyfunc.load_model)")
        return restore_array(self.model, img, tile=tile, overlap=overlap)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        """Restore every image of ``model_input`` (DataFrame column ``image`` of base64 image files, or a
        numpy array [H, W, C] / [N, H, W, C]); returns the same kind (see ``docs/serving.md``).

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


def input_example() -> pd.DataFrame:
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


# ---------------------------------------------------------------------------------------------- load
def load_denoiser(model_uri: str, *, tracking_uri: str | None = None):
    """``mlflow.pyfunc.load_model`` of ``model_uri`` (``models:/NAME@alias``, ``models:/NAME/3``,
    ``runs:/RUN/denoiser``, a local model folder, ...) against ``tracking_uri`` (default: as
    :func:`rcl_dist.paths.resolve_tracking_uri`; it serves as the registry URI too). MLflow's global
    URIs are set only while the files download and restored afterwards (:func:`global_uris`).

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
            with global_uris(uri):  # models:/ resolution reads the global registry URI
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=uri, registry_uri=uri))
        if not (local / "MLmodel").is_file():
            raise ValueError(f"model {model_uri!r}: no MLmodel file there (not an MLflow model)")
        _refuse_pickled(model_uri, local / "MLmodel")
        return mlflow.pyfunc.load_model(str(local))
    except MlflowException as e:
        raise ValueError(f"model {model_uri!r} not found at {uri}: {mlflow_error(e)}") from None
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


# ---------------------------------------------------------------------------------------------- MLflow's globals
@contextlib.contextmanager
def global_uris(uri: str):
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


def mlflow_error(e: Exception) -> str:
    """The first line of an MLflow error's message (or the exception's type): short enough for ours."""
    msg = getattr(e, "message", None) or str(e)
    return msg.splitlines()[0] if msg else type(e).__name__
