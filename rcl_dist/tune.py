"""Ray Tune sweeps over the pre-training settings, judged by downstream quality: ``rcl-dist sweep``.

A trial is one pre-training run (a TorchTrainer; config = the space's base <- the trial's sampled
values) whose rank 0 runs the proxy validation of :mod:`rcl_dist.train.validate` every
``objective.steps_per_round`` steps: a fresh denoising last layer fitted on a few labelled crops,
then PSNR on whole images of the manifest's validation split (never a test set). Each validation is
one ASHA round, so weak trials stop early; the pretext loss is logged but never ranks anything. The
sweep is an MLflow parent run with one nested run per trial and ends with the trial table, the best
config (``best_config.yaml``, usable by ``rcl-dist pretrain --config``) and ``objective.png``;
``--resume`` continues it, and a failing trial is recorded, not fatal. The space file:
:mod:`rcl_dist.tune_space`; details: ``docs/sweeps.md``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rcl_dist.config import Config, ConfigError, pin_global_residual
from rcl_dist.tune_report import SweepResult, git_commit, trial_markdown, write_report
from rcl_dist.tune_space import Param, SweepSpace, set_key

__all__ = ["run_sweep", "SweepResult", "trial_config", "best_config_dict", "write_report"]

STATE_FILE = "rcl_dist_sweep.json"  # in the Tune experiment folder: the parent run, manifest, space
TRIAL_STATE = "rcl_dist_trial.json"  # in a trial's pre-training folder: its nested MLflow run
PG_FILE = "placement_group"  # in a trial's pre-training folder: the id of its workers' placement group


# ---------------------------------------------------------------------------------------------- a trial


def trial_config(space: SweepSpace, params: dict[str, Any], manifest: str, storage: str, run_name: str) -> Config:
    """The pre-training config of one trial: base <- sampled values <- what the sweep sets."""
    d = copy.deepcopy(space.base)
    for k, v in params.items():
        set_key(d, k, v)
    res = space.resources
    set_key(d, "train.steps", space.total_steps)
    set_key(d, "train.log_every", space.steps_per_round)
    set_key(d, "dist.checkpoint_every", space.steps_per_round)
    set_key(d, "dist.workers", res["workers"])
    set_key(d, "dist.cpus_per_worker", float(res["cpus_per_worker"]))
    set_key(d, "dist.use_gpu", res["use_gpu"])
    set_key(d, "dist.storage_path", storage)
    set_key(d, "dist.run_name", run_name)
    set_key(d, "data.manifest", manifest)
    set_key(d, "tracking.experiment", space.experiment)
    return Config.from_dict(d)


def _trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune trainable: one pre-training run with proxy validation; its reports reach Tune."""
    from ray import tune
    from rcl_dist.train.trainer import make_torch_trainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from rcl_dist.train.launch import simulated_dir_for
    from rcl_dist.train.pretrain import train_func_per_worker

    space = SweepSpace(**{**ctx["space"], "params": [Param(**p) for p in ctx["space"]["params"]]})
    tctx = tune.get_context()
    trial_id = tctx.get_trial_id()
    run_name = f"trial-{trial_id}"
    storage = ctx["trials_dir"]
    cfg = pin_global_residual(trial_config(space, params, ctx["manifest"], storage, run_name))  # the form, written down
    state_file = Path(storage) / run_name / TRIAL_STATE
    tracker = None
    if ctx["tracking_uri"]:
        from rcl_dist.tracking import RunTracker

        if state_file.is_file():  # the sweep was resumed: the trial logs into its own nested run again
            tracker = RunTracker.start(ctx["tracking_uri"], space.experiment, None, None,
                                       run_id=json.loads(state_file.read_text())["mlflow_run_id"])  # fmt: skip
        else:
            tags = {"mlflow.parentRunId": ctx["parent_run_id"], "sweep.name": space.name, "sweep.trial_id": trial_id,
                    "sweep.default": str(params == ctx["default_point"]).lower()}  # fmt: skip
            tags.update({f"sweep.param.{k}": v for k, v in params.items()})
            tracker = RunTracker.start(ctx["tracking_uri"], space.experiment, f"{space.name}-{run_name}", cfg.to_dict(), tags=tags)
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"mlflow_run_id": tracker.run_id, "params": params}))
    objective = {**space.objective, "manifest": ctx["manifest"]}
    trainer = make_torch_trainer(
        train_func_per_worker,
        {
            "config": cfg.to_dict(),
            "manifest": ctx["manifest"],
            "simulated_dir": simulated_dir_for(cfg, ctx["manifest"]),  # honours data.simulated_dir, as pretrain does
            "mlflow_run_id": tracker.run_id if tracker else None,
            "tracking_uri": ctx["tracking_uri"],
            "validation": {"objective": objective, "every": space.steps_per_round,
                           "placement_group_file": str(Path(storage) / run_name / PG_FILE)},  # fmt: skip
        },
        workers=cfg.dist.workers, use_gpu=cfg.dist.use_gpu, cpus_per_worker=cfg.dist.cpus_per_worker, name=run_name,
        storage_path=storage, num_to_keep=1, max_failures=0, callbacks=[TuneReportCallback()],
    )  # fmt: skip
    try:
        trainer.fit()
    except BaseException as e:
        if tracker is not None:
            tracker.set_tags({"sweep.error": _error_text(e, 5000)})
            tracker.end("FAILED")
        raise
    if tracker is not None:
        tracker.end("FINISHED")


# ---------------------------------------------------------------------------------------------- the sweep


def _interrupted(grid, space: SweepSpace) -> bool:
    """Whether ``Tuner.fit`` returned before every trial ended (it returns normally on Ctrl-C)."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)
    if trials is None:
        return len(grid) < space.trials
    return len(trials) < space.trials or any(t.status not in ("TERMINATED", "ERROR") for t in trials)


def _placement_group_cleanup(trials_dir: Path):
    """A Tune callback that removes the placement group of every trial that has ended.

    A trial the scheduler stops is killed with its TorchTrainer controller and workers, but the
    controller's placement group belongs to the job and stays reserved: Train's own cleaner asks the
    state API (the dashboard, which local runs here do not start) whether the controller died. Left
    alone, the reserved CPUs starve every later trial (``WorkerGroupStartupTimeoutError``)."""
    from ray.tune import Callback

    class PlacementGroupCleanup(Callback):
        def _remove(self, trial) -> None:
            from ray._raylet import PlacementGroupID
            from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

            trial_id = trial.trial_id
            f = trials_dir / f"trial-{trial_id}" / PG_FILE
            if not f.is_file():
                return
            pg_id = f.read_text().strip()
            if placement_group_table().get(pg_id, {}).get("state") not in (None, "REMOVED"):
                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._remove(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._remove(trial)

    return PlacementGroupCleanup()


def trial_needs(resources: dict[str, Any]) -> dict[str, float]:
    """What one trial holds at once: its driver's CPUs plus its workers' CPUs (and GPUs)."""
    need = {"CPU": resources["driver_cpus"] + resources["workers"] * resources["cpus_per_worker"]}
    if resources["use_gpu"]:
        need["GPU"] = float(resources["workers"])
    return need


def fit_concurrency(space: SweepSpace, log: Callable[[str], None]) -> SweepSpace:
    """The space with at most as many trials at once as the running Ray holds whole.

    A trial's driver takes its CPUs before its workers ask for theirs: with more drivers running than
    the cluster can also give workers to, every driver waits for the others' workers forever. A local
    Ray is started big enough; a cluster is what it is, so the concurrency is lowered to what fits
    (at least 1), saying so."""
    import dataclasses

    import ray

    need, have = trial_needs(space.resources), ray.cluster_resources()
    fits = [math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    fit = max(1, min(fits)) if fits else space.concurrency
    if fit >= space.concurrency:
        return space
    wanted = ", ".join(f"{space.concurrency * v:g} {k}" for k, v in need.items() if v > 0)
    held = ", ".join(f"{have.get(k, 0.0):g} {k}" for k in need)
    log(f"sweep {space.name}: concurrency {space.concurrency} needs {wanted} at once, Ray has {held}: "
        f"running {fit} at a time (a trial's driver would otherwise wait forever for its workers)")  # fmt: skip
    return dataclasses.replace(space, concurrency=fit)


def _searcher(space: SweepSpace):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    points = space.initial_points() or None
    if space.search_alg["type"] == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        alg = OptunaSearch(points_to_evaluate=points, seed=space.search_alg["seed"])
        return ConcurrencyLimiter(alg, max_concurrent=space.concurrency)
    return BasicVariantGenerator(points_to_evaluate=points, random_state=space.search_alg["seed"], max_concurrent=space.concurrency)


def _scheduler(space: SweepSpace):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler["type"] == "asha":
        return ASHAScheduler(
            time_attr="round", max_t=space.rounds, grace_period=space.scheduler["grace_period"],
            reduction_factor=space.scheduler["reduction_factor"],
        )  # fmt: skip
    return FIFOScheduler()


def _error_text(err: BaseException, limit: int = 500) -> str:
    """The root cause of a trial's error in one line: Ray wraps the worker's exception in a task error
    whose text is a traceback; the last ``SomeError: message`` line is what went wrong."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*?: ", ln)]
    root = causes[-1] if causes else (lines[-1] if lines else "")
    return f"{type(err).__name__}: {root}"[:limit]


def _trial_rows(space: SweepSpace, grid, default_point: dict[str, Any], trials_dir: Path) -> list[dict[str, Any]]:
    """One row per trial: params, status (finished / stopped / failed), the objective per round."""
    rows = []
    # a trial that never reported has no result config: Tune's trial records still hold it
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    by_path = {str(getattr(t, "path", "")): t for t in trials}
    for r in grid:
        config = r.config if r.config is not None else getattr(by_path.get(str(r.path)), "config", None) or {}
        cfg = {p.key: config.get(p.key) for p in space.params}
        df = r.metrics_dataframe
        history: list[tuple[int, float]] = []
        if df is not None and space.metric in df.columns and "round" in df.columns:
            sub = df[["round", space.metric]].dropna()
            history = [(int(a), float(b)) for a, b in zip(sub["round"], sub[space.metric])]
        trial_id = (r.metrics or {}).get("trial_id") or getattr(by_path.get(str(r.path)), "trial_id", None)
        state = None
        if trial_id and (trials_dir / f"trial-{trial_id}" / TRIAL_STATE).is_file():
            state = json.loads((trials_dir / f"trial-{trial_id}" / TRIAL_STATE).read_text())
        else:  # no report reached Tune (e.g. failed at start): find the trial by its parameters
            for f in trials_dir.glob(f"*/{TRIAL_STATE}"):
                s = json.loads(f.read_text())
                if s.get("params") == cfg:
                    state, trial_id = s, f.parent.name.removeprefix("trial-")
        rounds = max((h[0] for h in history), default=0)
        if r.error is not None:
            status = "failed"
        elif rounds >= space.rounds:
            status = "finished"
        else:
            status = "stopped"
        rows.append({
            "trial": trial_id or (Path(r.path).name if r.path else ""),
            "status": status,
            "rounds": rounds,
            space.metric: history[-1][1] if history else None,
            f"{space.metric}_best": max((h[1] for h in history), default=None),
            f"{space.metric}_per_round": json.dumps({str(a): round(b, 4) for a, b in history}),
            "val_ssim": (r.metrics or {}).get("val_ssim"),
            "default": cfg == default_point,
            **{p.key: cfg[p.key] for p in space.params},
            "error": _error_text(r.error) if r.error is not None else "",
            "mlflow_run_id": (state or {}).get("mlflow_run_id"),
        })  # fmt: skip
    return rows


def _plot(space: SweepSpace, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(space.params)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), squeeze=False)
    colours = {"finished": "tab:blue", "stopped": "tab:orange", "failed": "tab:red"}
    for ax, p in zip(axes[0], space.params):
        for status, colour in colours.items():
            sel = [r for r in rows if r["status"] == status and r[space.metric] is not None]
            if not sel:
                continue
            xs = [r[p.key] for r in sel]
            if p.kind == "choice":
                xs = [list(map(str, p.values)).index(str(x)) for x in xs]
            ax.scatter(xs, [r[space.metric] for r in sel], c=colour, s=18, label=status)
        for r in rows:
            if r["default"] and r[space.metric] is not None:
                x = list(map(str, p.values)).index(str(r[p.key])) if p.kind == "choice" else r[p.key]
                ax.scatter([x], [r[space.metric]], facecolors="none", edgecolors="k", s=70, label="default config")
        if p.kind == "choice":
            ax.set_xticks(range(len(p.values)), [str(v) for v in p.values])
        elif p.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{space.metric} (last round reached)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"sweep {space.name}: {space.metric} against each searched parameter", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_config_dict(space: SweepSpace, params: dict[str, Any], manifest: str) -> dict[str, Any]:
    """The best trial's config for a fresh ``rcl-dist pretrain --config``: same settings, full step
    budget, no sweep-specific run name, storage or derived manifest."""
    cfg = trial_config(space, params, manifest, "", "x").to_dict()
    # a manifest the sweep made from data.source is not kept: pretrain indexes the source again (the
    # same seed gives the same manifest), so the file also works on another machine
    cfg["data"]["manifest"] = space.base["data"]["manifest"]
    cfg["dist"]["run_name"] = None
    cfg["dist"]["storage_path"] = None
    cfg["tracking"]["experiment"] = Config().tracking.experiment
    return Config.from_dict(cfg).to_dict()


def _start_ray(space: SweepSpace, log: Callable[[str], None]) -> SweepSpace:
    """Ray first: a request it cannot meet fails here, before any run or folder is created; the space with the
    concurrency that fits."""
    from rcl_dist.train.launch import check_gpus, ensure_ray

    res = space.resources
    ensure_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(space.concurrency * trial_needs(res)["CPU"])))
    check_gpus(res["workers"] if res["use_gpu"] else 0, "resources.use_gpu")
    return fit_concurrency(space, log)


def _open_sweep(space: SweepSpace, resume: bool, exp_dir: Path, tracking_uri: str | None, log: Callable[[str], None]):
    """(space, manifest, parent run id, tracking URI, tracker): a resumed sweep's stored ones reopened, or the
    inputs checked, a new parent MLflow run (tracking on) and the sweep's state file."""
    from rcl_dist.train.launch import ensure_manifest
    from rcl_dist.train.validate import validation_images

    state_file = exp_dir / STATE_FILE
    tracker = None
    if resume:
        state = json.loads(state_file.read_text())
        manifest, parent_id, uri = state["manifest"], state["parent_run_id"], state["tracking_uri"]
        if state["space"] != json.loads(json.dumps(space.to_dict())):
            log("note: the space differs from the one the sweep started with; the stored one is used")
            stored = state["space"]
            space = SweepSpace(**{**stored, "params": [Param(**{**p, "values": tuple(p["values"])}) for p in stored["params"]]})
        if parent_id:
            from rcl_dist.tracking import RunTracker

            tracker = RunTracker.start(uri, space.experiment, None, None, run_id=parent_id)
        return space, manifest, parent_id, uri, tracker
    base_cfg = Config.from_dict(space.base)
    manifest = str(ensure_manifest(base_cfg, log))
    validation_images(manifest, space.objective.get("val_split", "val"), 1)  # fails now, not in every trial
    parent_id, uri = None, None
    if base_cfg.tracking.enabled:
        from rcl_dist.paths import resolve_tracking_uri
        from rcl_dist.tracking import RunTracker

        uri = resolve_tracking_uri(tracking_uri or base_cfg.tracking.uri)
        tracker = RunTracker.start(uri, space.experiment, space.name, space.to_dict(), tags={"sweep.name": space.name})
        parent_id = tracker.run_id
    exp_dir.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"manifest": manifest, "parent_run_id": parent_id, "tracking_uri": uri,
                                      "space": space.to_dict(), "commit": git_commit()}, default=list))  # fmt: skip
    return space, manifest, parent_id, uri, tracker


def _tuner(space: SweepSpace, trainable, resume: bool, storage: Path, exp_dir: Path, log: Callable[[str], None]):
    """The Tuner: restored from the experiment folder on ``--resume`` (where Tune saved one), else a new one."""
    from ray.tune import RunConfig as TuneRunConfig, TuneConfig, Tuner

    param_space = {p.key: p.domain() for p in space.params}
    if resume and Tuner.can_restore(str(exp_dir)):
        log(f"sweep {space.name}: resuming {exp_dir}")
        return Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=False,
                             restart_errored=False, param_space=param_space)  # fmt: skip
    return Tuner(
        trainable,
        param_space=param_space,
        tune_config=TuneConfig(
            metric=space.metric, mode="max", scheduler=_scheduler(space), search_alg=_searcher(space),
            num_samples=space.trials,  # concurrency: the search algorithm's own limit
        ),  # fmt: skip
        run_config=TuneRunConfig(
            name=space.name, storage_path=str(storage), callbacks=[_placement_group_cleanup(exp_dir / "trials")]
        ),
    )


def run_sweep(
    space: SweepSpace,
    *,
    resume: bool = False,
    tracking_uri: str | None = None,
    storage: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run (or ``resume``) the sweep of ``space``; see the module docstring and ``docs/sweeps.md``."""
    from ray import tune

    from rcl_dist.paths import rcl_home

    # 1. the sweep's folder: new, or the one to resume
    storage = Path(storage or rcl_home() / "sweeps").expanduser().resolve()
    exp_dir = storage / space.name
    state_file = exp_dir / STATE_FILE
    trials_dir = exp_dir / "trials"
    if resume and not state_file.is_file():
        raise ConfigError(f"--resume: no sweep {space.name!r} under {storage} (missing {state_file})")
    if not resume and exp_dir.exists():
        raise ConfigError(f"sweep {space.name!r} already exists under {storage}: pass --resume, or another name= ")

    # 2. Ray, 3. the inputs and the sweep's record
    space = _start_ray(space, log)
    driver_cpus = space.resources["driver_cpus"]  # of the space given now, also when a resume uses the stored one
    t0 = time.perf_counter()
    space, manifest, parent_id, uri, tracker = _open_sweep(space, resume, exp_dir, tracking_uri, log)
    trials_dir.mkdir(parents=True, exist_ok=True)

    # 4. fit the trials and write the results
    default_point = space.default_point() if space.include_default else {}
    ctx = {"space": space.to_dict(), "manifest": manifest, "trials_dir": str(trials_dir), "tracking_uri": uri,
           "parent_run_id": parent_id, "default_point": default_point}  # fmt: skip
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"CPU": driver_cpus})
    status = "FAILED"
    try:
        tuner = _tuner(space, trainable, resume, storage, exp_dir, log)
        log(f"sweep {space.name}: {space.trials} trials, {space.concurrency} at a time, {space.rounds} rounds of "
            f"{space.steps_per_round} steps; Tune experiment {exp_dir}" + (f", MLflow parent run {parent_id} at {uri}" if parent_id else ""))  # fmt: skip
        grid = tuner.fit()
        if _interrupted(grid, space):
            # Tune caught Ctrl-C (or SIGUSR1), saved its state and returned: nothing is final yet
            log(f"sweep {space.name} interrupted; continue it with: rcl-dist sweep {space.source} --resume")
            status = "KILLED"
            return SweepResult(space.name, str(exp_dir), [], None, None, None, parent_id, uri,
                               time.perf_counter() - t0, {"interrupted": True})  # fmt: skip
        rows = _trial_rows(space, grid, default_point, trials_dir)
        result = _finish(space, rows, exp_dir, manifest, tracker, uri, log)
        result.summary["code_commit"] = json.loads(state_file.read_text()).get("commit", "unknown")
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.end(status)

    # 5. this session's totals
    result.parent_run_id, result.tracking_uri = parent_id, uri
    result.seconds = time.perf_counter() - t0
    if tracker is not None:
        tracker.client.log_metric(parent_id, "sweep_seconds_last_session", result.seconds)
    return result


def _finish(space: SweepSpace, rows: list[dict[str, Any]], exp_dir: Path, manifest: str, tracker, uri, log) -> SweepResult:
    """Trial table, best config, plot: files in the experiment folder and artifacts of the parent run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = space.metric
    scored = [r for r in rows if r[m] is not None and r["status"] != "failed"]
    full = [r for r in scored if r["status"] == "finished"]
    best = max(full or scored, key=lambda r: r[m]) if scored else None
    default = next((r for r in rows if r["default"]), None)
    rows.sort(key=lambda r: (r[m] is None, -(r[m] or 0.0)))
    columns = ["trial", "status", "rounds", m, *[p.key for p in space.params], "default", "error"]
    md = trial_markdown(rows, columns)
    (exp_dir / "trials.md").write_text(md)
    keys = list(rows[0]) if rows else columns
    pq.write_table(pa.Table.from_pylist([{k: (json.dumps(r[k]) if isinstance(r[k], (list, dict)) else r[k]) for k in keys} for r in rows]),
                   exp_dir / "trials.parquet")  # fmt: skip
    import csv

    with open(exp_dir / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    best_path = None
    if best is not None:
        params = {p.key: best[p.key] for p in space.params}
        best_path = exp_dir / "best_config.yaml"
        header = (f"# best trial {best['trial']} of sweep {space.name}: {m} {best[m]:.4f} after {best['rounds']} rounds\n"
                  f"# rcl-dist pretrain --config {best_path}\n")  # fmt: skip
        best_path.write_text(header + yaml.safe_dump(best_config_dict(space, params, manifest), sort_keys=False))
    if rows:
        _plot(space, rows, exp_dir / "objective.png")
    summary: dict[str, Any] = {
        "trials": len(rows),
        "finished": sum(r["status"] == "finished" for r in rows),
        "stopped": sum(r["status"] == "stopped" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "metric": m,
    }
    if best is not None:
        summary.update(best_trial=best["trial"], best_value=best[m], best_rounds=best["rounds"],
                       best_params={p.key: best[p.key] for p in space.params})  # fmt: skip
    if default is not None and default[m] is not None:
        summary.update(default_value=default[m], default_rounds=default["rounds"], default_status=default["status"])
        if best is not None:
            per_round = json.loads(best[f"{m}_per_round"])
            same = per_round.get(str(default["rounds"]))
            summary["best_minus_default_final"] = best[m] - default[m]
            if same is not None:
                summary["best_minus_default_same_round"] = same - default[m]
    (exp_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log(md)
    log(json.dumps(summary, indent=2, default=str))
    if tracker is not None:
        for name in ("trials.md", "trials.csv", "trials.parquet", "objective.png", "summary.json", "best_config.yaml"):
            if (exp_dir / name).is_file():
                tracker.log_artifact_file(exp_dir / name)
        tracker.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=0)
        if best is not None:
            tracker.set_tags({"sweep.best_trial": best["trial"], **{f"sweep.best.{k}": v for k, v in summary["best_params"].items()}})
        # Tune ends a trial when it reaches max_t or the scheduler stops it, killing the trial before its
        # own code can close the nested run: close each one here with the status the table gives it
        client = tracker.client
        final = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
        for r in rows:
            rid = r.get("mlflow_run_id")
            if not rid:
                continue
            client.set_tag(rid, "sweep.status", r["status"])
            if r["error"]:
                client.set_tag(rid, "sweep.error", r["error"])
            if client.get_run(rid).info.status != final[r["status"]]:
                client.set_terminated(rid, final[r["status"]])
    return SweepResult(space.name, str(exp_dir), rows, best, str(best_path) if best_path else None, default, None, uri, 0.0, summary)
