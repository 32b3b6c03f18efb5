"""Where rcl_dist keeps things on disk: its home folder, the local MLflow store, and each pre-training
run's state file.

``$RCL_DIST_HOME`` (default ``~/.rcl_dist``) holds the local MLflow store (``mlflow.db``, artifacts
under ``mlartifacts/``), manifests, Ray results and sweeps. A tracking URI resolves to the argument,
else ``$MLFLOW_TRACKING_URI``, else that local store (see ``docs/tracking.md``). Beside each
pre-training run's Ray folder, :data:`RUN_STATE` records its MLflow run, manifest and config.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

__all__ = [
    "rcl_home",
    "ray_results",
    "RUN_STATE",
    "read_run_state",
    "default_tracking_uri",
    "default_artifacts_dir",
    "resolve_tracking_uri",
    "sqlite_uri",
    "sqlite_path",
    "local_artifacts_root",
    "prepare_store",
]


def rcl_home() -> Path:
    """``$RCL_DIST_HOME`` (``~`` expanded, made absolute), or ``~/.rcl_dist`` when unset: the local
    MLflow store, manifests, Ray results. Not created here (a getter has no side effects)."""
    env = os.environ.get("RCL_DIST_HOME")
    # abspath, not resolve(): keep the user's spelling of symlinked folders (e.g. /tmp on macOS)
    return Path(os.path.abspath(os.path.expanduser(env) if env else Path.home() / ".rcl_dist"))


def ray_results(storage_path: str | os.PathLike | None = None) -> Path:
    """Where Ray keeps runs (checkpoints, run state): ``storage_path``, else ``$RCL_DIST_HOME/ray_results``
    (``~`` expanded, resolved)."""
    return Path(storage_path or rcl_home() / "ray_results").expanduser().resolve()


RUN_STATE = "rcl_dist_run.json"  # beside Ray's run folder: the MLflow run id, the manifest, the config


def read_run_state(path: str | os.PathLike) -> dict[str, Any]:
    """The state of the pre-training run holding ``path`` (its run folder, or a checkpoint folder or file
    in it): the :data:`RUN_STATE` file of ``path`` or of the nearest folder above it, as a dict
    (``manifest``, ``mlflow_run_id``, ``tracking_uri``, ``config``). FileNotFoundError when there is
    none; OSError or ValueError when it cannot be read."""
    p = Path(path)
    state = next((d / RUN_STATE for d in [p, *p.parents] if (d / RUN_STATE).is_file()), None)
    if state is None:
        raise FileNotFoundError(f"{path}: no {RUN_STATE} there or in a folder above it")
    return json.loads(state.read_text())


def default_tracking_uri() -> str:
    """``sqlite:///<RCL_DIST_HOME>/mlflow.db``: the local default store (a SQLite file, so the model
    registry works too; MLflow 3's file store is deprecated)."""
    return sqlite_uri(rcl_home() / "mlflow.db")


def default_artifacts_dir() -> Path:
    """``<RCL_DIST_HOME>/mlartifacts``: where runs of the local default store keep their artifacts."""
    return rcl_home() / "mlartifacts"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The URI to use: the argument if given, else ``$MLFLOW_TRACKING_URI``, else the local default.

    Only the *environment* variable is consulted, never ``mlflow.get_tracking_uri()``, which could
    have been changed by other code in the same process."""
    if tracking_uri:
        return str(tracking_uri)
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def sqlite_uri(path: Path) -> str:
    """The SQLAlchemy URI of a database file: an absolute POSIX path gives the four-slash form."""
    return f"sqlite:///{Path(path).absolute().as_posix()}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///...`` URI (None for other stores and in-memory SQLite).

    As in SQLAlchemy, ``sqlite:///x.db`` is relative to the working directory and
    ``sqlite:////abs/x.db`` absolute."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    path = urllib.parse.urlparse(tracking_uri).path
    path = path[1:] if path.startswith("/") else path
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().absolute()


def local_artifacts_root(tracking_uri: str) -> Path | None:
    """Artifacts folder for a local SQLite store: ``<db folder>/mlartifacts`` (for the default store
    that is :func:`default_artifacts_dir`); None for servers and other stores."""
    db = sqlite_path(tracking_uri)
    return None if db is None else db.parent / "mlartifacts"


def prepare_store(tracking_uri: str) -> None:
    """SQLite does not create missing folders: create the database's folder first."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
