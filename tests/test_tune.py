"""Sweeps (rcl_dist/tune.py, rcl_dist/tune_space.py, rcl_dist/train/validate.py): space files are checked before anything runs;
a 4-trial ASHA sweep runs end to end on a local Ray with a real MLflow server, records one nested run
per trial (a failing trial with its error), writes a best config that pre-trains, and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rcl_dist.config import ConfigError, load_config
from rcl_dist.tune import best_config_dict, trial_config
from rcl_dist.tune_space import load_space

REPO = Path(__file__).resolve().parents[1]

TINY_FIXED = {
    "model.width": 4,
    "model.depth": 1,
    "data.crop": 16,
    "data.threads": 1,
    "train.batch_size": 4,
    "loss.encoder": None,
}
TINY_OBJECTIVE = {"rounds": 2, "steps_per_round": 2, "labels": 8, "steps": 3, "crop": 16, "batch_size": 4,
                  "val_images": 2, "tile": 64}  # fmt: skip


def _space(tmp_path: Path, **changes) -> Path:
    d = {
        "name": "tiny",
        "fixed": dict(TINY_FIXED),
        "search": {"loss.alpha": {"loguniform": [1e-4, 1.0]}, "loss.temperature": {"choice": [0.05, 0.1]}},
        "trials": 4,
        "concurrency": 2,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "search_alg": {"type": "random", "seed": 0},
        "objective": dict(TINY_OBJECTIVE),
        "experiment": "tiny-sweep",
    }
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


# ---------------------------------------------------------------------------------------------- the space file


def test_shipped_spaces_load():
    files = sorted((REPO / "tune_spaces").glob("*.yaml"))
    assert {f.name for f in files} >= {"cpu-small.yaml", "gpu-paper.yaml"}
    for f in files:
        space = load_space(f)
        assert space.include_default and space.initial_points()[0] == space.default_point()
        assert space.scheduler["type"] == "asha"
    assert load_space(REPO / "tune_spaces/gpu-paper.yaml").resources["use_gpu"] is True


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"colour": "blue"}, "unknown key(s) ['colour']"),
        ({"search": {"loss.alpah": {"loguniform": [1e-4, 1]}}}, "search.loss.alpah: unknown config key"),
        ({"search": {"loss.temperature": {"choice": []}}}, "search.loss.temperature: choice needs a non-empty list"),
        ({"search": {"loss.alpha": {"loguniform": [1.0, 0.1]}}}, "search.loss.alpha: loguniform needs finite low < high"),
        ({"search": {"loss.alpha": {"loguniform": [0.0, 1.0]}}}, "loguniform needs low > 0"),
        ({"search": {"loss.alpha": {"uniform": [-1.0, 1.0]}}}, "loss.alpha must be >= 0"),
        ({"search": {"loss.distance": {"choice": ["emd", "cosine"]}}}, "search.loss.distance: value 'cosine' is not valid"),
        ({"search": {"train.batch_size": {"uniform": [4, 8]}}}, "takes integers: use choice"),
        ({"search": {"loss.alpha": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
        ({"search": {"train.steps": {"choice": [1, 2]}}}, "is set by the sweep itself"),
        ({"search": {}}, "search: must be a non-empty mapping"),
        ({"search": None}, "search: is required"),
        ({"search": {"loss.alpha": {"loguniform": [0.1, 1.0]}}}, "include_default is true but the base config's value 0.001"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type: must be one of"),
        ({"scheduler": {"type": "asha", "grace_period": 3}}, "grace_period: 3 exceeds objective.rounds=2"),
        ({"search_alg": {"type": "bayes"}}, "search_alg.type: must be one of"),
        ({"objective": {**TINY_OBJECTIVE, "labels": 0}}, "objective.labels must be an integer >= 1"),
        ({"objective": {**TINY_OBJECTIVE, "val_split": "train"}}, "validate on held-out images"),
        ({"objective": {**TINY_OBJECTIVE, "metric": "loss"}}, "objective.metric: must be one of"),
        ({"objective": {**TINY_OBJECTIVE, "epochs": 3}}, "objective: unknown key(s) ['epochs']"),
        ({"fixed": {**TINY_FIXED, "loss.tau": 0.1}}, "fixed.loss.tau: unknown config key"),
        ({"fixed": {**TINY_FIXED, "loss.alpha": 0.1}}, "search.loss.alpha: is also in fixed"),
        ({"resources": {"workers": 3}}, "not divisible by 3 workers"),
        ({"trials": 0}, "trials: must be an integer >= 1"),
        ({"config": "nope.yaml"}, "config: "),
        ({"points": [{"loss.alpha": 0.5}]}, "points[0]: must give exactly the searched keys"),
        ({"points": [{"loss.alpha": 5.0, "loss.temperature": 0.1}]}, "points[0].loss.alpha: 5.0 is outside the searched domain"),
    ],
)
def test_bad_space_is_rejected_naming_file_and_key(tmp_path, changes, message):
    path = _space(tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        load_space(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_overrides_and_trial_config(tmp_path):
    space = load_space(_space(tmp_path), ["trials=3", "objective.rounds=3", "loss.consistency_normalize=true"])
    assert space.trials == 3 and space.rounds == 3 and space.total_steps == 6
    assert space.base["loss"]["consistency_normalize"] is True
    with pytest.raises(ConfigError, match="unknown key 'trails'"):
        load_space(_space(tmp_path), ["trails=3"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_space(_space(tmp_path), ["loss.distance=cosine"])

    params = {"loss.alpha": 0.25, "loss.temperature": 0.05}
    cfg = trial_config(space, params, "/data/m.parquet", "/tmp/trials", "trial-x")
    assert (cfg.loss.alpha, cfg.loss.temperature) == (0.25, 0.05)
    assert (cfg.train.steps, cfg.train.log_every, cfg.dist.checkpoint_every) == (6, 2, 2)
    assert cfg.data.manifest == "/data/m.parquet" and cfg.model.width == 4

    # the best config is a complete pre-training config that `rcl-dist pretrain --config` takes as it is
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump(best_config_dict(space, params, "/data/m.parquet")))
    loaded = load_config(best)
    assert (loaded.loss.alpha, loaded.loss.temperature, loaded.train.steps) == (0.25, 0.05, 6)
    assert loaded.dist.run_name is None and loaded.dist.storage_path is None
    assert loaded.data.manifest is None  # derived from data.source by the sweep: indexed again by pretrain


# ---------------------------------------------------------------------------------------------- validation


def _tiny_data(root: Path) -> Path:
    """10 train and 2 val images of 48x48 (crops of a bundled photograph) and their manifest."""
    from skimage import data, io

    from rcl_dist.data.index import index_images

    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "val").mkdir(exist_ok=True)
    img = data.astronaut()
    k = 0
    for i in range(4):
        for j in range(3):
            tile = img[i * 96 : i * 96 + 48, j * 96 : j * 96 + 48]
            io.imsave(root / ("val" if k < 2 else "train") / f"t{k:02d}.png", tile, check_contrast=False)
            k += 1
    index_images([f"{root}/train:train", f"{root}/val:val"], root / "m.parquet", seed=0, log=lambda _m: None)
    return root / "m.parquet"


def test_proxy_validator_is_deterministic_and_leaves_the_model_alone(tmp_path):
    from rcl_dist.models.factory import build_model_from_config
    from rcl_dist.train.validate import ProxyValidator

    manifest = _tiny_data(tmp_path / "data")
    cfg = load_config(None, ["model.width=4", "model.depth=1", "loss.encoder=null"])
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objective = {"manifest": str(manifest), "labels": 8, "steps": 5, "crop": 16, "batch_size": 4, "val_images": 2, "tile": 32}
    v = ProxyValidator(objective, cfg)
    a, b = v(model), ProxyValidator(objective, cfg)(model)
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())  # the copy is trained, not f
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen on f itself
    for k in ("val_psnr", "val_ssim", "val_l1"):
        assert np.isfinite(a[k]) and a[k] == b[k]
    assert 0.0 < a["val_psnr"] < 60.0


def test_validation_needs_a_val_split(tmp_path):
    from rcl_dist.data.index import index_images
    from rcl_dist.train.validate import validation_images

    manifest = _tiny_data(tmp_path / "data")
    assert [Path(p).name for p, _ in validation_images(manifest, "val", 5)] == ["t00.png", "t01.png"]
    only_train = tmp_path / "train_only.parquet"
    index_images([f"{tmp_path}/data/train:train"], only_train, seed=0, log=lambda _m: None)
    with pytest.raises(ConfigError, match="no 'val' rows to validate on"):
        validation_images(only_train, "val", 5)


# ---------------------------------------------------------------------------------------------- a real sweep


@pytest.mark.slow
def test_asha_sweep_end_to_end(tmp_path, local_ray, mlflow_server):
    """4 trials (2 at a time, ASHA over 2 rounds): the default config, a point that fails at run time
    (crops larger than every image), two more points. Then the best config pre-trains, and --resume
    keeps every finished trial without running anything again."""
    import mlflow

    from rcl_dist.train.launch import run_pretrain
    from rcl_dist.tune import run_sweep, write_report

    manifest = _tiny_data(tmp_path / "data")
    (tmp_path / "base.yaml").write_text("data: {crop: 16}\n")  # the base config file: crop searched around it
    path = _space(
        tmp_path,
        config="base.yaml",
        fixed={k: v for k, v in TINY_FIXED.items() if k != "data.crop"},
        search={"loss.alpha": {"loguniform": [1e-4, 1.0]}, "data.crop": {"choice": [16, 64]}},
        points=[{"loss.alpha": 0.01, "data.crop": 64}, {"loss.alpha": 0.1, "data.crop": 16},
                {"loss.alpha": 0.3, "data.crop": 16}],  # with the default: all 4 trials fixed in advance
    )
    space = load_space(path, [f"data.manifest={manifest}"])
    storage = tmp_path / "sweeps"
    result = run_sweep(space, tracking_uri=mlflow_server, storage=storage, log=lambda _m: None)

    rows = {r["trial"]: r for r in result.table}
    assert len(rows) == 4
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["data.crop"] == 64
    assert "is at least" in failed[0]["error"], failed[0]["error"]
    ok = [r for r in rows.values() if r["status"] != "failed"]
    assert all(np.isfinite(r["val_psnr"]) and r["rounds"] >= 1 for r in ok)
    assert any(r["status"] == "finished" and r["rounds"] == 2 for r in ok)
    assert sum(r["default"] for r in rows.values()) == 1
    assert result.summary["trials"] == 4 and result.summary["failed"] == 1

    # MLflow: the parent run and one nested run per trial, each with its status (and the error)
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("tiny-sweep")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == result.parent_run_id][0]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(runs) == 5 and len(nested) == 4
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 4
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.md", "trials.csv", "trials.parquet", "objective.png", "best_config.yaml", "summary.json"} <= artifacts
    by_status = {r.data.tags["sweep.status"]: r for r in nested}
    assert "failed" in by_status and by_status["failed"].info.status == "FAILED"
    assert "is at least" in by_status["failed"].data.tags["sweep.error"]
    for r in nested:
        if r.data.tags["sweep.status"] != "failed":
            assert [m.step for m in client.get_metric_history(r.info.run_id, "val_psnr")][0] == 2  # round 1 at step 2
            assert r.info.status in ("FINISHED", "KILLED")

    # the report and the best config, which pre-trains as it is (fewer steps here)
    md = write_report(result, space, tmp_path / "report" / "sweep", ["rcl-dist", "sweep", str(path)])
    assert "best - default" in md.read_text() or "default config" in md.read_text()
    assert json.loads(md.with_suffix(".json").read_text())["summary"]["trials"] == 4
    cfg = load_config(result.best_config_path, ["train.steps=2", "tracking.enabled=false",
                                                f"dist.storage_path={tmp_path / 'best'}"])  # fmt: skip
    best_params = result.summary["best_params"]
    assert cfg.loss.alpha == pytest.approx(best_params["loss.alpha"]) and cfg.data.crop == best_params["data.crop"]
    assert run_pretrain(cfg, log=lambda _m: None).checkpoint_path is not None

    # --resume: the finished sweep is restored; no trial runs again, the same parent run is reopened
    again = run_sweep(space, resume=True, tracking_uri=mlflow_server, storage=storage, log=lambda _m: None)
    assert again.parent_run_id == result.parent_run_id
    assert {r["trial"]: r["status"] for r in again.table} == {k: r["status"] for k, r in rows.items()}
    assert len(client.search_runs([exp.experiment_id])) == 5
    with pytest.raises(ConfigError, match="already exists"):
        run_sweep(space, tracking_uri=mlflow_server, storage=storage)


def test_cli_rejects_a_bad_space_before_starting_anything(tmp_path, capsys):
    from rcl_dist.cli import main

    path = _space(tmp_path, search={"loss.temperature": {"choice": []}})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "search.loss.temperature: choice needs a non-empty list" in err


@pytest.mark.slow
def test_interrupted_sweep_resumes_keeping_finished_trials(tmp_path, local_ray, mlflow_server):
    """Ctrl-C a running `rcl-dist sweep` (one trial at a time) once its second trial has started; then
    --resume: the finished first trial is kept (not run again, one nested run per trial in all) and
    the others run to the end, logging into their own nested runs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    from rcl_dist.tune import TRIAL_STATE, run_sweep

    manifest = _tiny_data(tmp_path / "data")
    path = _space(tmp_path, name="interrupted", trials=3, concurrency=1, scheduler={"type": "fifo"},
                  experiment="interrupted-sweep")
    overrides = [f"data.manifest={manifest}"]
    storage = tmp_path / "sweeps"
    env = {**os.environ, "RCL_DIST_HOME": str(local_ray)}
    cmd = [sys.executable, "-m", "rcl_dist.cli", "sweep", str(path), *overrides, "--storage", str(storage),
           "--tracking-uri", mlflow_server]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trials = storage / "interrupted" / "trials"
    deadline = time.monotonic() + 300
    while len(list(trials.glob(f"*/{TRIAL_STATE}"))) < 2:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the second trial did not start within 300 s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("interrupted-sweep")
    before = {r.data.tags["sweep.trial_id"]: r for r in client.search_runs([exp.experiment_id])
              if "sweep.trial_id" in r.data.tags}  # fmt: skip
    assert len(before) == 2
    first = min(before, key=lambda t: before[t].info.start_time)
    first_history = [m.step for m in client.get_metric_history(before[first].info.run_id, "val_psnr")]
    assert first_history == [2, 4]  # it finished both rounds before the interruption

    space = load_space(path, overrides)
    result = run_sweep(space, resume=True, tracking_uri=mlflow_server, storage=storage, log=lambda _m: None)
    assert len(result.table) == 3 and all(r["status"] == "finished" for r in result.table), result.table
    nested = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(nested) == 3  # the interrupted trial logs into its own run again; nothing duplicated
    assert [m.step for m in client.get_metric_history(before[first].info.run_id, "val_psnr")] == first_history
    for r in nested:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_psnr")]
        assert steps == sorted(set(steps)) and steps[-1] == 4


def test_gpu_request_without_gpus_fails_before_anything_is_created(tmp_path, local_ray):
    """A local Ray on a machine without GPUs: pretrain and sweep stop at once, naming the key, with no
    run folder, sweep folder or MLflow run left behind (Ray Train would otherwise wait forever)."""
    import ray

    from rcl_dist.train.launch import run_pretrain
    from rcl_dist.tune import run_sweep

    if ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has GPUs")
    cfg = load_config(None, ["dist.use_gpu=true", f"dist.storage_path={tmp_path / 'runs'}", "dist.run_name=gpu",
                             f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])  # fmt: skip
    with pytest.raises(ConfigError, match="dist.use_gpu asks for 1 GPU"):
        run_pretrain(cfg, log=lambda _m: None)
    assert not (tmp_path / "runs" / "gpu").exists() and not (tmp_path / "m.db").exists()

    space = load_space(_space(tmp_path, resources={"use_gpu": True}))
    with pytest.raises(ConfigError, match="resources.use_gpu asks for 1 GPU"):
        run_sweep(space, storage=tmp_path / "sweeps", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not (tmp_path / "sweeps" / "tiny").exists() and not (tmp_path / "m.db").exists()


def test_pretraining_and_sweep_trials_take_the_realisations_folder_from_one_place(tmp_path, monkeypatch):
    """The sweep hard-coded `<manifest>_simulated` and so ignored data.simulated_dir; both launchers
    now ask `simulated_dir_for`."""
    import inspect

    import rcl_dist.tune as tune_mod
    from rcl_dist.config import load_config
    from rcl_dist.train.launch import simulated_dir_for

    manifest = tmp_path / "m.parquet"
    assert simulated_dir_for(load_config(None, []), manifest) == str(tmp_path / "m") + "_simulated"
    monkeypatch.setenv("HOME", str(tmp_path))
    got = simulated_dir_for(load_config(None, ["data.simulated_dir=~/real"]), manifest)
    assert got == str((tmp_path / "real").resolve())
    assert '"_simulated"' not in inspect.getsource(tune_mod._trial)


def test_concurrency_is_lowered_to_what_the_running_ray_holds(tmp_path, local_ray):
    """On a cluster smaller than concurrency x (driver + workers) CPUs, every trial's driver would hold
    a CPU and wait for its workers forever (seen on a 2-CPU cluster head: 2 trials of 1 + 1 CPUs): the
    sweep runs as many at once as fit, and says so. local_ray has 4 CPUs; each trial here needs 2."""
    import ray

    from rcl_dist.tune import fit_concurrency

    assert ray.cluster_resources()["CPU"] == 4
    said: list[str] = []
    wide = fit_concurrency(load_space(_space(tmp_path, concurrency=3)), said.append)
    assert wide.concurrency == 2 and len(said) == 1
    assert "concurrency 3 needs 6 CPU at once, Ray has 4 CPU: running 2 at a time" in said[0]
    narrow = load_space(_space(tmp_path, concurrency=2))
    assert fit_concurrency(narrow, said.append) is narrow and len(said) == 1  # fits: unchanged, silent
