"""MLflow tracking for RCL pre-training: one run per training job, resumable after a failure.

Used from rank 0 of a Ray Train run (other ranks do not track), from the local trainer and from
tests. It imports neither Ray nor DALI and never touches MLflow's global state (``set_tracking_uri``,
``start_run``, the active-run stack): every call goes through an explicit ``MlflowClient`` bound to a
tracking URI, because global state is per process and thread and breaks as soon as a Ray worker, a
test or a Tune trial runs next to another user of MLflow. A resumed job reopens the same run; a
per-key step high-water mark keeps exactly one point per step, and non-finite values are counted
(``tracking.nonfinite_skipped``), not logged. Where runs are stored and how a resume's metric history
reads: ``docs/tracking.md``.
"""

from __future__ import annotations

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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rcl_dist.figures import emd_gap_density, image_grid
from rcl_dist.params import flatten_params, plain, tag_value
from rcl_dist.paths import local_artifacts_root, prepare_store, resolve_tracking_uri

__all__ = [
    "RunTracker",
    "ensure_experiment",
    "NONFINITE_METRIC",
    "FIG2_ARTIFACT",
]

log = logging.getLogger(__name__)

#: Metric under which the cumulative number of skipped non-finite values is logged.
NONFINITE_METRIC = "tracking.nonfinite_skipped"
#: Artifact name of the paper's Fig. 2 (density of EMD(neg) - EMD(pos) before/after training).
FIG2_ARTIFACT = "fig2_emd_gap_density.png"

# MLflow's batch limits (mlflow.utils.validation in 3.x), repeated so that this module can batch on
# its own side instead of having a whole batch rejected by the server.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
_STATUSES = ("FINISHED", "FAILED", "KILLED")


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    prepare_store(tracking_uri)
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
        root = local_artifacts_root(uri)
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
    if local_artifacts_root(uri) is not None and exp.artifact_location.rstrip("/").endswith("mlruns"):
        log.warning("experiment %r keeps its artifacts in %s (created elsewhere)", name, exp.artifact_location)
    return exp.experiment_id


# --------------------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


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
                points per replayed step). See ``docs/tracking.md``.

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
        run_tags.update({k: tag_value(v) for k, v in (tags or {}).items()})
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        tracker = cls(client, run.info.run_id, experiment_id, uri, resumed_count=0)
        try:
            tracker._log_params(flatten_params(config))
            tracker.log_dict(plain(config), "config.yaml")
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
            resume_tags[f"resume.{resumed}.changed_params"] = tag_value(",".join(sorted(tracker.changed_params)))
            log.warning(
                "resumed MLflow run %s with changed settings %s; params are immutable, so the run keeps "
                "the first values (the new config is in config_resume%d.yaml)",
                run_id,
                sorted(tracker.changed_params),
                resumed,
            )
        resume_tags.update({k: tag_value(v) for k, v in (tags or {}).items()})
        tracker._set_tags(resume_tags)
        if config is not None:
            tracker.log_dict(plain(config), f"config_resume{resumed}.yaml")
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

        items = [RunTag(k, tag_value(v)) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, tags=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) run tags; values are stringified and cut to MLflow's 8000 characters."""
        self._set_tags({k: tag_value(v) for k, v in tags.items()})

    # ---- metrics ----------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> int:
        """Log ``metrics`` at ``step`` in one ``log_batch`` request (chunks of 1000 keys).

        Values may be Python/numpy numbers or 0-d tensors. Non-finite values are skipped and counted;
        a point whose step is not above the key's high-water mark is skipped (see ``docs/tracking.md``). Returns the number of points logged.
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
        data = plain(data)
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
        else:
            text = json.dumps(data, indent=2)
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
        fig = image_grid(name, tensors, step, max_samples=max_samples, residual_keys=residual_keys)
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
        fig, result = emd_gap_density(
            (pos_init, neg_init), (pos_final, neg_final),
            reference=reference, noise_distance=noise_distance, bins=bins, max_values=max_values,
        )  # fmt: skip
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
