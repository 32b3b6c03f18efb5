"""MLflow tracking for RCL pre-training: one run per training job, resumable after a failure.

Used from rank 0 of a Ray Train run (other ranks do not track), from the local trainer and from
tests. The module imports neither Ray nor DALI (their versions are read from package metadata only),
and it never touches MLflow's global state (``mlflow.set_tracking_uri`` / ``mlflow.start_run`` /
the active-run stack): every call goes through an explicit :class:`mlflow.MlflowClient` bound to a
tracking URI. Global state is per process and thread, which breaks as soon as a Ray worker, a test or
a Tune trial runs next to another user of MLflow.

Where things are stored
-----------------------
* ``tracking_uri=None`` resolves to ``$MLFLOW_TRACKING_URI`` when that is set, otherwise to the
  **local default store**: ``$RCL_DIST_HOME/mlflow.db`` (SQLite; ``RCL_DIST_HOME`` defaults to
  ``~/.rcl_dist``), with artifacts under ``$RCL_DIST_HOME/mlartifacts/<experiment>/<run id>/``.
  With a SQLite store MLflow would otherwise put artifacts in ``./mlruns`` of whatever directory the
  process happens to run in (a Ray worker's temporary working dir), so :func:`ensure_experiment`
  creates experiments with an explicit ``artifact_location``. The same applies to any
  ``sqlite:///path/x.db`` store: its artifacts go to ``path/mlartifacts/<experiment>``.
* Against a tracking server (``http://host:port``) the server decides (``--artifacts-destination``,
  proxied through ``mlflow-artifacts:/``); nothing is set here.

Runs, resume and metric histories
---------------------------------
:meth:`RunTracker.start` creates a run and logs the configuration: every value as a flat param
(``section.key``, see :func:`flatten_params`) and the whole nested config as ``config.yaml``.
The trainer stores :attr:`RunTracker.run_id` in each checkpoint. After a failure (Ray Train restarts
the workers, or ``--resume``) it passes that id back as ``run_id=`` and the tracker reopens **the same
run** (status RUNNING again, tag ``resumed_count`` incremented); no second run appears. MLflow params
are immutable, so on resume only keys the run does not have yet are logged; keys whose value differs
are *not* re-logged (that would raise) but listed in the tag ``resume.<n>.changed_params`` and in the
artifact ``config_resume<n>.yaml`` (the configuration the resumed attempt actually used).

MLflow never overwrites a metric point: logging (key, step) twice keeps both points. Suppose the
last checkpoint was written at step ``s`` and the job crashed at step ``c > s`` after logging up to
``c``. The resumed trainer restarts from the checkpoint and computes steps ``s+1 .. c`` again. The
tracker keeps a per-key high-water mark, the largest step logged for that key, and drops any point
whose step is not larger (counted in :attr:`RunTracker.skipped_replayed`); no ``delete`` is needed.
On resume the marks are seeded from the run's stored history (:meth:`RunTracker.last_logged_step`).
So a reader of the history sees **exactly one point per step, with steps increasing**:

* steps ``<= s``: the first attempt (which the checkpoint continues from);
* steps ``s+1 .. c``: still the first attempt's values: the points of the crashed attempt beyond its
  last checkpoint (the resumed attempt recomputed them from the same state with other random
  crops/noise, so they agree statistically, not bit for bit);
* steps ``> c``: the resumed attempt.

The tag ``resume.<n>.stored_max_step`` records ``c`` for each resume (and
``resume.<n>.from_step`` records ``s`` when the trainer passes ``resume_step=``), so the seam is
visible. With ``replayed_steps="log"`` the tracker seeds no marks from the store: steps
``s+1 .. c`` then carry two points each (told apart by timestamp, the later one from the resumed
attempt) and ``metric_history(key, latest_per_step=True)`` keeps the later one. Within one process
the guard always applies (a step is logged at most once per key).

Non-finite metric values (NaN, +-inf) are not logged: each one is counted per key
(:attr:`RunTracker.nonfinite_counts`), warned about once per key, and the cumulative count is logged
as the metric ``tracking.nonfinite_skipped`` at the step where it happened, so a reader can see when
a loss diverged instead of finding a silently shorter curve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import os
import platform
import re
import socket
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RunTracker",
    "default_home",
    "default_tracking_uri",
    "default_artifacts_dir",
    "resolve_tracking_uri",
    "ensure_experiment",
    "flatten_params",
    "pos_neg_from_distance_matrix",
    "NONFINITE_METRIC",
    "FIG2_ARTIFACT",
]

log = logging.getLogger(__name__)

#: Metric under which the cumulative number of skipped non-finite values is logged.
NONFINITE_METRIC = "tracking.nonfinite_skipped"
#: Artifact name of the paper's Fig. 2 (density of EMD(neg) - EMD(pos) before/after training).
FIG2_ARTIFACT = "fig2_emd_gap_density.png"

# MLflow's limits (mlflow.utils.validation in 3.x), repeated so that this module can truncate and
# batch on its own side instead of having a whole batch rejected by the server.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100

_TRUNCATION_MARK = "...[truncated; full value in config.yaml]"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_STATUSES = ("FINISHED", "FAILED", "KILLED")


# --------------------------------------------------------------------------------------------------
# Where the local default store lives
# --------------------------------------------------------------------------------------------------


def default_home() -> Path:
    """``$RCL_DIST_HOME`` (``~`` expanded), or ``~/.rcl_dist`` when unset: the folder of the local
    default store. Not created here (a getter has no side effects); the tracker creates it on use."""
    env = os.environ.get("RCL_DIST_HOME")
    # abspath, not resolve(): keep the user's spelling of symlinked folders (e.g. /tmp on macOS)
    return Path(os.path.abspath(os.path.expanduser(env) if env else Path.home() / ".rcl_dist"))


def default_tracking_uri() -> str:
    """``sqlite:///<RCL_DIST_HOME>/mlflow.db``: the local default store (a SQLite file, so the model
    registry works too; MLflow 3's file store is deprecated)."""
    return _sqlite_uri(default_home() / "mlflow.db")


def default_artifacts_dir() -> Path:
    """``<RCL_DIST_HOME>/mlartifacts``: where runs of the local default store keep their artifacts."""
    return default_home() / "mlartifacts"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The URI to use: the argument if given, else ``$MLFLOW_TRACKING_URI``, else the local default.

    Only the *environment* variable is consulted, never ``mlflow.get_tracking_uri()``, which could
    have been changed by other code in the same process."""
    if tracking_uri:
        return str(tracking_uri)
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _sqlite_uri(path: Path) -> str:
    # SQLAlchemy: "sqlite:///" + path; an absolute POSIX path gives the four-slash form.
    return f"sqlite:///{Path(path).absolute().as_posix()}"


def _sqlite_path(tracking_uri: str) -> Path | None:
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


def _local_artifacts_root(tracking_uri: str) -> Path | None:
    """Artifacts folder for a local SQLite store: ``<db folder>/mlartifacts`` (for the default store
    that is :func:`default_artifacts_dir`); None for servers and other stores."""
    db = _sqlite_path(tracking_uri)
    return None if db is None else db.parent / "mlartifacts"


def _prepare_store(tracking_uri: str) -> None:
    """SQLite does not create missing folders: create the database's folder first."""
    db = _sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    _prepare_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    return s[:100]


def ensure_experiment(name: str, tracking_uri: str | None = None, client=None) -> str:
    """Return the id of experiment ``name``, creating it if needed.

    For a local SQLite store the experiment is created with ``artifact_location`` =
    ``<db folder>/mlartifacts/<name>`` (for the default store: ``$RCL_DIST_HOME/mlartifacts/<name>``)
    so that artifacts do not land in ``./mlruns`` of the current directory. For a tracking server
    the server's own artifact root is used. Safe against a concurrent creator (two Tune trials):
    a lost creation race re-reads the experiment. A *deleted* experiment of that name is an error
    (restore it or pick another name) rather than being silently restored.
    """
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    client = client or _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = _local_artifacts_root(uri)
        location = None
        if root is not None:
            (root / _slug(name)).mkdir(parents=True, exist_ok=True)
            location = (root / _slug(name)).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # created meanwhile by someone else
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment {name!r} (id {exp.experiment_id}) at {uri} is deleted; restore it "
            "(`mlflow experiments restore`) or use another experiment name"
        )
    if _local_artifacts_root(uri) is not None and exp.artifact_location.rstrip("/").endswith("mlruns"):
        log.warning("experiment %r keeps its artifacts in %s (created elsewhere)", name, exp.artifact_location)
    return exp.experiment_id


# --------------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A YAML/JSON-safe copy: dataclasses and objects with ``to_dict`` become dicts, paths strings,
    tuples lists, numpy/torch scalars Python numbers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif hasattr(value, "to_dict") and callable(value.to_dict) and not isinstance(value, Mapping):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalar
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _param_key(key: str) -> str:
    key = _BAD_KEY_CHARS.sub("_", key)
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = f"{key[: MAX_KEY_LENGTH - 9]}~{digest}"
    return key


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, sort_keys=False, default=str)
    else:
        text = str(value)  # None -> "None", True -> "True", 0.001 -> "0.001"
    if len(text) > MAX_PARAM_VAL_LENGTH:
        text = text[: MAX_PARAM_VAL_LENGTH - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK
    return text


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.001}}`` -> ``{"train.lr": "0.001"}``: MLflow params are flat strings.

    Nested mappings (and dataclasses) are joined with ``.``; lists become JSON; ``None`` becomes
    ``"None"``; an empty mapping is kept as ``"{}"``. Values longer than MLflow's 6000 characters are
    cut with a marker (the untruncated config is the ``config.yaml`` artifact); characters MLflow
    rejects in keys become ``_`` and keys longer than 250 characters are shortened with a hash.
    """
    out: dict[str, str] = {}
    config = _plain(config)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a mapping (or a dataclass), got {type(config).__name__}")
    for key, value in config.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, full))
        else:
            out[_param_key(full)] = _param_value(value)
    return out


# --------------------------------------------------------------------------------------------------
# Fig. 2 helpers
# --------------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def pos_neg_from_distance_matrix(dist: Any, positive_index: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Split a ``[B_q, K]`` distance matrix (``ResidualContrastiveLoss.distance_matrix``) into the
    per-anchor positive distance ``[B_q]`` and the negatives ``[B_q, K-1]`` (all other columns).
    ``positive_index[j]`` is the positive column of row j (default j, keys aligned with queries)."""
    d = _to_numpy(dist)
    if d.ndim != 2 or d.shape[1] < 2:
        raise ValueError(f"need a [B_q, K>=2] distance matrix, got shape {d.shape}")
    b, k = d.shape
    idx = np.arange(b) if positive_index is None else _to_numpy(positive_index).astype(np.int64)
    if idx.shape != (b,) or (idx < 0).any() or (idx >= k).any():
        raise ValueError(f"positive_index must hold {b} column indices in [0, {k})")
    mask = np.zeros_like(d, dtype=bool)
    mask[np.arange(b), idx] = True
    return d[mask], d[~mask].reshape(b, k - 1)


def _gaps(pos: Any, neg: Any, what: str) -> np.ndarray:
    """EMD(negative) - EMD(positive) for every (anchor, negative) pair, flattened."""
    p, n = _to_numpy(pos).reshape(-1), _to_numpy(neg)
    if n.ndim == 1 and n.shape[0] == p.shape[0]:
        d = n - p
    elif n.ndim == 2 and n.shape[0] == p.shape[0]:
        d = n - p[:, None]
    else:
        raise ValueError(
            f"{what}: positives must be [B] (one per anchor) and negatives [B] or [B, K] with the same B; "
            f"got {tuple(p.shape)} and {tuple(n.shape)}"
        )
    return d.reshape(-1)


def _bandwidth(x: np.ndarray) -> float:
    """Silverman's rule (robust to outliers via the IQR), floored so constant data still plot."""
    n = x.size
    std = float(np.std(x, ddof=1)) if n > 1 else 0.0
    q75, q25 = np.percentile(x, [75, 25]) if n else (0.0, 0.0)
    spread = min(std, (q75 - q25) / 1.349) if q75 > q25 else std
    h = 0.9 * spread * n ** (-0.2) if n else 0.0
    floor = 1e-3 * max(float(np.max(np.abs(x))) if n else 0.0, 1e-6)
    return max(h, floor)


def _kde(x: np.ndarray, grid: np.ndarray, h: float) -> np.ndarray:
    """Gaussian kernel density estimate on ``grid`` (chunked: memory O(chunk * grid))."""
    out = np.zeros_like(grid)
    if x.size == 0:
        return out
    for start in range(0, x.size, 4096):
        z = (grid[None, :] - x[start : start + 4096, None]) / h
        out += np.exp(-0.5 * z * z).sum(axis=0)
    return out / (x.size * h * math.sqrt(2 * math.pi))


def _summary(x: np.ndarray, n_nonfinite: int, h: float, max_values: int) -> dict[str, Any]:
    if x.size == 0:
        return {"n": 0, "n_nonfinite": n_nonfinite}
    q = np.percentile(x, [5, 25, 50, 75, 95])
    return {
        "n": int(x.size),
        "n_nonfinite": n_nonfinite,
        "mean": float(x.mean()),
        "std": float(x.std()),
        "q05": float(q[0]),
        "q25": float(q[1]),
        "median": float(q[2]),
        "q75": float(q[3]),
        "q95": float(q[4]),
        "frac_positive": float((x > 0).mean()),
        "kde_bandwidth": h,
        "values": x.tolist() if x.size <= max_values else None,
    }


# --------------------------------------------------------------------------------------------------
# Image grids
# --------------------------------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure on the Agg canvas, without pyplot: no global backend switch, no figure
    registry to leak into, safe in worker threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")  # room for titles and colour bars
    FigureCanvasAgg(fig)
    return fig


def _display_image(chw: np.ndarray) -> tuple[np.ndarray, str | None]:
    """[C, H, W] in [0, 1] -> something imshow takes: grey, RGB, or RGGB-packed RAW shown as RGB."""
    c = chw.shape[0]
    if c == 1:
        return np.clip(chw[0], 0, 1), "gray"
    if c == 3:
        return np.clip(chw.transpose(1, 2, 0), 0, 1), None
    if c == 4:  # packed RGGB: R, mean of the two greens, B
        rgb = np.stack([chw[0], 0.5 * (chw[1] + chw[2]), chw[3]], axis=-1)
        return np.clip(rgb, 0, 1), None
    return np.clip(chw[0], 0, 1), "gray"


# --------------------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _tag_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_TAG_VAL_LENGTH else text[: MAX_TAG_VAL_LENGTH - 3] + "..."


class RunTracker:
    """One MLflow run of a training job, through an explicit ``MlflowClient``.

    Create with :meth:`start` (new run, or ``run_id=`` to reopen the run a checkpoint names), log
    with the ``log_*`` methods, close with :meth:`end` (or use it as a context manager: an exception
    ends the run FAILED, Ctrl-C KILLED). Meant for one process (rank 0); it keeps no global state.

    Attributes:
        client: the ``mlflow.MlflowClient`` bound to :attr:`tracking_uri`.
        tracking_uri, experiment_id: where the run lives.
        resumed_count: 0 for a fresh run, n after the n-th resume.
        nonfinite_counts: per metric key, how many NaN/inf values were skipped (this process and,
            for the total, earlier attempts: see ``NONFINITE_METRIC``).
        skipped_replayed: points not logged because their step was not above the key's high-water
            mark (steps replayed after a resume, or a step logged twice in this process).
        changed_params: on resume, the keys whose value differs from the stored params
            (``{key: (stored, now)}``); they are not re-logged.
    """

    def __init__(self, client, run_id: str, experiment_id: str, tracking_uri: str, resumed_count: int = 0):
        """Wrap an existing, already-open run. Prefer :meth:`start`."""
        self.client = client
        self._run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self.resumed_count = resumed_count
        self.previous_status: str | None = None  # on resume: the run's status before it was reopened
        self.nonfinite_counts: dict[str, int] = {}
        self._nonfinite_total = 0
        self.skipped_replayed = 0
        self.changed_params: dict[str, tuple[str, str]] = {}
        self._max_step: dict[str, int] = {}
        self._ended = False

    # ---- creation / resume ------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        tracking_uri: str | None,
        experiment: str | None,
        run_name: str | None,
        config: Any,
        run_id: str | None = None,
        *,
        tags: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        replayed_steps: str = "skip",
    ) -> RunTracker:
        """Open the run for a training job.

        Args:
            tracking_uri: ``sqlite:///...``, ``http://host:port``, ...; None: see
                :func:`resolve_tracking_uri` (``$MLFLOW_TRACKING_URI`` or the local default store).
            experiment: experiment name (created if missing, see :func:`ensure_experiment`). On resume
                it is only checked: the run must belong to it (None skips the check).
            run_name: display name of a new run (ignored on resume: the run keeps its name).
            config: nested dict (or dataclass, e.g. ``Config``) of settings; a new run logs it as flat
                params and as ``config.yaml``.
            run_id: the id stored in the checkpoint: reopen that run instead of creating one.
            tags: extra tags to set (on resume too; tags are mutable).
            resume_step: the checkpoint's step, recorded as tag ``resume.<n>.from_step``.
            replayed_steps: "skip" (default): on resume, seed the per-key step marks from the stored
                history so that replayed steps are not logged twice; "log": log them again (two
                points per replayed step). See the module docstring.

        Raises:
            ValueError: ``run_id`` names a run that is deleted, absent from this store, or belongs to
                another experiment; ``replayed_steps`` unknown.
        """
        if replayed_steps not in ("skip", "log"):
            raise ValueError(f"replayed_steps must be 'skip' or 'log', got {replayed_steps!r}")
        uri = resolve_tracking_uri(tracking_uri)
        client = _client(uri)
        if run_id:
            return cls._resume(client, uri, experiment, config, run_id, tags, resume_step, replayed_steps)

        if not experiment:
            raise ValueError("experiment name is required for a new run")
        experiment_id = ensure_experiment(experiment, uri, client=client)
        run_tags = {"resumed_count": "0", "mlflow.source.name": "rcl_dist"}
        run_tags.update({k: _tag_value(v) for k, v in (tags or {}).items()})
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        tracker = cls(client, run.info.run_id, experiment_id, uri, resumed_count=0)
        try:
            tracker._log_params(flatten_params(config))
            tracker.log_dict(_plain(config), "config.yaml")
        except BaseException:
            tracker.end("FAILED")
            raise
        log.info("MLflow run %s in experiment %r at %s", tracker.run_id, experiment, uri)
        return tracker

    @classmethod
    def _resume(cls, client, uri, experiment, config, run_id, tags, resume_step, replayed_steps) -> RunTracker:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            raise ValueError(f"cannot resume MLflow run {run_id!r}: not found at {uri} ({e.message})") from e
        if run.info.lifecycle_stage != "active":
            raise ValueError(f"cannot resume MLflow run {run_id!r}: it is deleted (restore it first)")
        if experiment:
            exp = client.get_experiment(run.info.experiment_id)
            if exp.name != experiment:
                raise ValueError(
                    f"MLflow run {run_id!r} belongs to experiment {exp.name!r}, not {experiment!r}: "
                    "refusing to continue it under another name"
                )
        previous_status = run.info.status
        try:
            resumed = int(run.data.tags.get("resumed_count", "0"))
        except ValueError:
            resumed = 0
        if not run.data.metrics:
            # Nothing logged yet: the first attach to a run its driver created (or a restart that lost
            # nothing). Not a resume: no tags, no count.
            tracker = cls(client, run_id, run.info.experiment_id, uri, resumed_count=resumed)
            tracker.previous_status = previous_status
            client.update_run(run_id, status="RUNNING")
            return tracker
        resumed += 1
        tracker = cls(client, run_id, run.info.experiment_id, uri, resumed_count=resumed)
        tracker.previous_status = previous_status
        client.update_run(run_id, status="RUNNING")

        # High-water marks from the stored history: what this run already has, per key.
        stored_max = None
        stored_keys = list(run.data.metrics)
        for key in stored_keys:
            step = tracker.last_logged_step(key)
            if step is None:
                continue
            stored_max = step if stored_max is None else max(stored_max, step)
            if replayed_steps == "skip":
                tracker._max_step[key] = step
        tracker._nonfinite_total = int(run.data.metrics.get(NONFINITE_METRIC, 0))

        # Params are immutable: log only new keys, report differing ones.
        stored = run.data.params
        wanted = flatten_params(config) if config is not None else {}
        new = {k: v for k, v in wanted.items() if k not in stored}
        tracker.changed_params = {k: (stored[k], v) for k, v in wanted.items() if k in stored and stored[k] != v}
        tracker._log_params(new)

        resume_tags = {
            "resumed_count": str(resumed),
            f"resume.{resumed}.previous_status": previous_status,
            f"resume.{resumed}.time_ms": str(_now_ms()),
            f"resume.{resumed}.stored_max_step": "none" if stored_max is None else str(stored_max),
        }
        if resume_step is not None:
            resume_tags[f"resume.{resumed}.from_step"] = str(int(resume_step))
        if tracker.changed_params:
            resume_tags[f"resume.{resumed}.changed_params"] = _tag_value(",".join(sorted(tracker.changed_params)))
            log.warning(
                "resumed MLflow run %s with changed settings %s; params are immutable, so the run keeps "
                "the first values (the new config is in config_resume%d.yaml)",
                run_id,
                sorted(tracker.changed_params),
                resumed,
            )
        resume_tags.update({k: _tag_value(v) for k, v in (tags or {}).items()})
        tracker._set_tags(resume_tags)
        if config is not None:
            tracker.log_dict(_plain(config), f"config_resume{resumed}.yaml")
        log.info("resumed MLflow run %s (resume #%d, history up to step %s)", run_id, resumed, stored_max)
        return tracker

    # ---- properties -------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The MLflow run id: store it in every checkpoint so a resume reopens this run."""
        return self._run_id

    @property
    def nonfinite_total(self) -> int:
        """Non-finite values skipped over the whole run (earlier attempts included)."""
        return self._nonfinite_total

    # ---- params / tags ----------------------------------------------------------------------------

    def _log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, params=chunk)

    def _set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, _tag_value(v)) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, tags=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) run tags; values are stringified and cut to MLflow's 8000 characters."""
        self._set_tags({k: _tag_value(v) for k, v in tags.items()})

    # ---- metrics ----------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> int:
        """Log ``metrics`` at ``step`` in one ``log_batch`` request (chunks of 1000 keys).

        Values may be Python/numpy numbers or 0-d tensors. Non-finite values are skipped and counted;
        a point whose step is not above the key's high-water mark is skipped (see the module
        docstring). Returns the number of points logged.
        """
        from mlflow.entities import Metric

        step = int(step)
        ts = _now_ms()
        points: list = []
        nonfinite_here = 0
        for key, raw in metrics.items():
            try:
                value = float(raw.item() if hasattr(raw, "item") else raw)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"metric {key!r} at step {step}: not a number ({raw!r})") from e
            if not math.isfinite(value):
                count = self.nonfinite_counts.get(key, 0) + 1
                self.nonfinite_counts[key] = count
                nonfinite_here += 1
                if count == 1:
                    log.warning(
                        "metric %r is %s at step %d: not logged (counted in %s)", key, value, step, NONFINITE_METRIC
                    )
                continue
            mark = self._max_step.get(key)
            if mark is not None and step <= mark:
                self.skipped_replayed += 1
                continue
            self._max_step[key] = step
            points.append(Metric(key, value, ts, step))
        if nonfinite_here:
            self._nonfinite_total += nonfinite_here
            points.append(Metric(NONFINITE_METRIC, float(self._nonfinite_total), ts, step))  # never guarded
        for chunk in _chunks(points, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self._run_id, metrics=chunk)
        return len(points) - (1 if nonfinite_here else 0)

    def metric_history(self, key: str, latest_per_step: bool = False) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` of ``key`` as stored, sorted by step then logging time.

        With ``latest_per_step=True`` only the last-logged point of each step is kept (what a reader
        wants when replayed steps were logged twice with ``replayed_steps="log"``)."""
        hist = sorted(self.client.get_metric_history(self._run_id, key), key=lambda m: (m.step, m.timestamp))
        if latest_per_step:
            by_step: dict[int, float] = {}
            for m in hist:
                by_step[m.step] = m.value
            return sorted(by_step.items())
        return [(m.step, m.value) for m in hist]

    def last_logged_step(self, key: str | None = None) -> int | None:
        """The largest step stored for ``key`` (or over all metrics of the run when None), read from
        the store; None when nothing was logged. A trainer may compare it with its checkpoint step."""
        keys = [key] if key is not None else list(self.client.get_run(self._run_id).data.metrics)
        steps = [m.step for k in keys for m in self.client.get_metric_history(self._run_id, k)]
        return max(steps) if steps else None

    # ---- artifacts --------------------------------------------------------------------------------

    def log_artifact_file(self, path: str | os.PathLike, subdir: str | None = None) -> str:
        """Upload a local file (or folder) to ``<subdir>/<name>``; returns the artifact path."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(path)
        self.client.log_artifact(self._run_id, str(path), artifact_path=subdir or None)
        return f"{subdir.strip('/')}/{path.name}" if subdir else path.name

    def log_text(self, text: str, artifact_file: str) -> str:
        """Store ``text`` as the artifact ``artifact_file`` (e.g. ``"notes/eval.md"``)."""
        self.client.log_text(self._run_id, text, artifact_file)
        return artifact_file

    def log_dict(self, data: Any, artifact_file: str = "config.yaml") -> str:
        """Store a mapping (or dataclass) as YAML (``.yaml``/``.yml``) or JSON (anything else), keeping
        key order; values are made plain first (paths to strings, tuples to lists)."""
        plain = _plain(data)
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)
        else:
            text = json.dumps(plain, indent=2)
        return self.log_text(text, artifact_file)

    def _log_bytes(self, data: bytes, artifact_file: str) -> str:
        subdir, name = os.path.split(artifact_file)
        with tempfile.TemporaryDirectory(prefix="rcl_dist_artifact_") as tmp:
            local = Path(tmp) / name
            local.write_bytes(data)
            self.client.log_artifact(self._run_id, str(local), artifact_path=subdir or None)
        return artifact_file

    def _log_figure(self, fig, artifact_file: str, dpi: int = 100) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        return self._log_bytes(buf.getvalue(), artifact_file)

    def log_image_grid(
        self,
        name: str,
        tensors: Mapping[str, Any],
        step: int,
        *,
        max_samples: int = 4,
        residual_keys: Iterable[str] | None = None,
    ) -> str:
        """A PNG grid of samples: one row per sample (the first ``max_samples``), one column per entry
        of ``tensors`` (``{"noisy": x, "output": f(x), "residual": x - f(x)}``, each ``[B, C, H, W]``;
        sizes may differ between columns, e.g. a x2 SR output).

        Images are shown clipped to [0, 1] (1 channel grey, 3 RGB, 4 packed RGGB as RGB). Residual
        columns (names containing "resid", or listed in ``residual_keys``) are signed: they are shown
        as the channel mean with a diverging colour map on a symmetric scale ``[-m, m]``, m the
        largest magnitude in that column, with a colour bar, so 0 is always the same neutral colour
        and positive/negative residuals are comparable across samples.
        Stored as ``images/<name>/step_<step>.png``; returns that artifact path.
        """
        if not tensors:
            raise ValueError("log_image_grid needs at least one tensor")
        signed = set(residual_keys or ()) | {k for k in tensors if "resid" in k.lower()}
        arrays: dict[str, np.ndarray] = {}
        for key, t in tensors.items():
            a = _to_numpy(t)
            if a.ndim == 3:
                a = a[None]
            if a.ndim != 4:
                raise ValueError(f"{key}: expected [B, C, H, W], got shape {a.shape}")
            arrays[key] = a[:max_samples]
        rows = min(a.shape[0] for a in arrays.values())
        cols = len(arrays)
        fig = _new_figure((2.4 * cols + 0.6 * len(signed & set(arrays)), 2.4 * rows + 0.4))
        axes = fig.subplots(rows, cols, squeeze=False)
        for j, (key, a) in enumerate(arrays.items()):
            if key in signed:
                mean = a[:rows].mean(axis=1)
                m = float(np.nanmax(np.abs(mean))) if mean.size else 0.0
                m = m if m > 0 and math.isfinite(m) else 1e-6
                for i in range(rows):
                    im = axes[i, j].imshow(mean[i], cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
                fig.colorbar(im, ax=list(axes[:, j]), shrink=0.6, location="right")
            else:
                for i in range(rows):
                    img, cmap = _display_image(a[i])
                    axes[i, j].imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            axes[0, j].set_title(f"{key} [{a.shape[1]}x{a.shape[2]}x{a.shape[3]}]", fontsize=9)
            for i in range(rows):
                axes[i, j].set_xticks([])
                axes[i, j].set_yticks([])
        fig.suptitle(f"{name}, step {int(step)}", fontsize=10)
        return self._log_figure(fig, f"images/{name}/step_{int(step):08d}.png")

    def log_emd_density_plot(
        self,
        pos_init: Any,
        neg_init: Any,
        pos_final: Any,
        neg_final: Any,
        *,
        reference: tuple[Any, Any] | None = None,
        noise_distance: dict[str, Any] | None = None,
        subdir: str | None = None,
        bins: int = 60,
        max_values: int = 50_000,
    ) -> dict[str, Any]:
        """The paper's Fig. 2: density of EMD(negative pair) - EMD(positive pair) per anchor, at
        initialisation (random weights) and after training, both on one figure.

        ``pos_*``: ``[B]`` distance of each anchor to its positive; ``neg_*``: ``[B]`` (one negative
        per anchor) or ``[B, K]`` (K negatives each); every (anchor, negative) pair gives one
        difference. :func:`pos_neg_from_distance_matrix` splits a ``[B, K]`` loss distance matrix.
        Larger (more positive) differences mean the residuals of crops of one image are closer than
        those of different images: RCL should move the density to the right.

        The gap alone cannot tell a good denoiser from the identity or from one that keeps image
        content in its residual, so two references may be drawn with it:

        * ``reference`` = (pos, neg) of the same pairs with the *true simulated noise* as the
          residual (an ideal denoiser): where a trained network's density should land ("noise");
        * ``noise_distance`` = ``{"init": [B], "final": [B]}``: per crop d(n_hat, n) between the
          network's residual and the noise it holds, before and after training, in a second panel;
          the paper's caption says RCL contracts it.

        Writes ``fig2_emd_gap_density.png`` (histogram + Gaussian KDE of each set, a line at 0) and
        ``fig2_emd_gap_density.json`` (summary statistics, the KDE curves, histogram, and the raw
        differences when there are at most ``max_values`` of them). Non-finite differences are
        dropped and counted. Returns the JSON content.
        """
        raw = {"init": _gaps(pos_init, neg_init, "init"), "final": _gaps(pos_final, neg_final, "final")}
        if reference is not None:
            raw["noise"] = _gaps(reference[0], reference[1], "noise")
        finite = {k: v[np.isfinite(v)] for k, v in raw.items()}
        allv = np.concatenate(list(finite.values()))
        if allv.size == 0:
            raise ValueError("no finite EMD differences to plot")
        h = {k: _bandwidth(v) for k, v in finite.items()}
        lo, hi = float(allv.min()), float(allv.max())
        pad = 3 * max(h.values())
        grid = np.linspace(lo - pad, hi + pad, 512)
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        dens = {k: _kde(v, grid, h[k]) for k, v in finite.items()}
        hist = {
            k: np.histogram(v, bins=edges, density=True)[0] if v.size else np.zeros(bins) for k, v in finite.items()
        }

        labels = {"init": "initialisation (random weights)", "final": "after training",
                  "noise": "true noise as the residual (ideal denoiser)"}  # fmt: skip
        colours = {"init": "tab:gray", "final": "tab:blue", "noise": "tab:green"}
        panels = 2 if noise_distance is not None else 1
        fig = _new_figure((6.4 * panels, 4.0))
        ax = fig.add_subplot(1, panels, 1)
        for k, v in finite.items():
            if v.size == 0:
                continue
            ax.hist(v, bins=edges, density=True, alpha=0.25, color=colours[k])
            ax.plot(grid, dens[k], color=colours[k], lw=2,
                    label=f"{labels[k]}: mean {v.mean():.3g}, {(v > 0).mean():.0%} > 0 (n={v.size})")
        ax.axvline(0.0, color="k", ls="--", lw=0.8)
        ax.set_xlabel("EMD(negative pair) - EMD(positive pair)")
        ax.set_ylabel("density")
        ax.set_title("Residual contrastive loss before and after training (cf. RCL Fig. 2)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")

        result = {
            "description": "per (anchor, negative) pair: EMD(negative) - EMD(positive); "
            "'init' at random initialisation, 'final' after training (RCL paper, Fig. 2)"
            + ("; 'noise' with the true simulated noise as the residual" if reference is not None else ""),
            **{k: _summary(finite[k], int(raw[k].size - finite[k].size), h[k], max_values) for k in raw},
            "kde": {"grid": grid.tolist(), **{k: dens[k].tolist() for k in raw}},
            "histogram": {"edges": edges.tolist(), **{k: hist[k].tolist() for k in raw}},
        }
        if noise_distance is not None:
            nd = {k: _to_numpy(noise_distance[k]).reshape(-1) for k in ("init", "final")}
            nd = {k: v[np.isfinite(v)] for k, v in nd.items()}
            ax2 = fig.add_subplot(1, panels, 2)
            both = np.concatenate(list(nd.values()))
            if both.size:
                e2 = np.linspace(float(both.min()), float(both.max()) + 1e-9, bins + 1)
                for k, v in nd.items():
                    ax2.hist(v, bins=e2, alpha=0.5, color=colours[k], label=f"{labels[k]}: median {np.median(v):.3g}")
            ax2.set_xlabel("d(residual x - f(x), true noise n) per crop")
            ax2.set_ylabel("crops")
            ax2.set_title("Distance of the residual to the true noise", fontsize=10)
            ax2.legend(fontsize=8)
            result["noise_distance"] = {k: _summary(v, 0, _bandwidth(v), max_values) for k, v in nd.items()}
        prefix = f"{subdir.strip('/')}/" if subdir else ""
        self._log_figure(fig, prefix + FIG2_ARTIFACT, dpi=120)
        self.log_text(json.dumps(result), prefix + FIG2_ARTIFACT.replace(".png", ".json"))
        return result

    def log_system_info(self) -> dict[str, Any]:
        """Record where this attempt ran: Python, platform, hostname, CPU counts, torch (and CUDA, GPU
        names), Ray / DALI / MLflow / numpy versions when installed (read from package metadata, so
        Ray and DALI are not imported). Stored as ``system/attempt_<n>.json`` (one per attempt: a
        resume may land on another machine) and as ``sys.*`` tags for searching. Returns the dict."""
        info: dict[str, Any] = {
            "hostname": socket.gethostname(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "pid": os.getpid(),
        }
        versions: dict[str, str | None] = {}
        for dist in ("rcl-dist", "torch", "numpy", "mlflow", "ray"):
            versions[dist] = _dist_version(dist)
        dali = [d for d in _installed_dists() if d.startswith("nvidia-dali")]
        versions["nvidia-dali"] = (f"{dali[0]}=={_dist_version(dali[0])}") if dali else None
        info["versions"] = versions
        info["gpus"] = []
        if "torch" in sys.modules or importlib.util.find_spec("torch") is not None:
            import torch

            info["cuda_available"] = bool(torch.cuda.is_available())
            info["torch_cuda"] = torch.version.cuda
            if info["cuda_available"]:
                info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.log_text(json.dumps(info, indent=2), f"system/attempt_{self.resumed_count}.json")
        self._set_tags(
            {
                "sys.hostname": info["hostname"],
                "sys.python": info["python"],
                "sys.torch": versions["torch"] or "none",
                "sys.cpu_count": str(info["cpu_count"]),
                "sys.gpus": ", ".join(info["gpus"]) or "none",
            }
        )
        return info

    # ---- end --------------------------------------------------------------------------------------

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated with ``status`` (FINISHED, FAILED or KILLED). Idempotent. A run
        ended FAILED can still be reopened with ``start(run_id=...)``."""
        status = status.upper()
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        if self._ended:
            return
        self.client.set_terminated(self._run_id, status=status)
        self._ended = True

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def __repr__(self) -> str:
        return f"RunTracker(run_id={self._run_id!r}, experiment_id={self.experiment_id!r}, uri={self.tracking_uri!r})"


def _installed_dists() -> list[str]:
    names = set()
    for d in importlib.metadata.distributions():
        name = (d.metadata["Name"] or "").lower().replace("_", "-")
        if name:
            names.add(name)
    return sorted(names)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
