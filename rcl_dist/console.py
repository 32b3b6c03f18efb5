"""What the console shows: rcl_dist's own progress lines, once each; Ray's and MLflow's routine
chatter only with ``-v`` (``RCL_DIST_VERBOSE=1``). Warnings and errors always pass.

Each source is quieted where it starts, not by filtering output: Ray Train's print patch (which
tees every worker ``print`` into a logger with its own console handler, so each line came twice),
the per-report INFO line of Ray Train's worker context (its logger is named by file path, so
``RunConfig``'s log level misses it), the preemption watcher of a local Ray (no node of one machine
is preempted; the watcher's actor logs an error at every start), MLflow's artifact progress bars and
INFO records."""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "RCL_DIST_VERBOSE"


def verbose() -> bool:
    """Whether ``-v`` (``RCL_DIST_VERBOSE=1``) asked for everything."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def set_verbose(on: bool) -> None:
    """Record the choice in the environment, which the Ray processes of this run inherit."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def ray_env(local: bool) -> dict[str, str]:
    """Environment variables for the Ray processes of a run (controller and workers)."""
    if verbose():
        return {VERBOSE_ENV: "1"}
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if local:
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return env


def quiet_libraries() -> None:
    """In this process: MLflow's INFO records and artifact progress bars off unless verbose."""
    if verbose():
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow configures its loggers
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def quiet_train_worker() -> None:
    """In a Ray Train worker: the INFO line Ray Train logs for every ``report`` off unless verbose."""
    if verbose():
        return
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    quiet_libraries()


def ui_hint(tracking_uri: str) -> str:
    """How to look at a tracking store: a server's own address, or ``mlflow ui`` on a local database."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open the UI at {tracking_uri}"
    return f"open the UI with:  mlflow ui --backend-store-uri {tracking_uri}  (then http://127.0.0.1:5000)"
