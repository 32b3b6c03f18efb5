"""MLflow tracking (rcl_dist.tracking, .params, .paths, .figures) against a local SQLite store and a real `mlflow server`.

The server is started once per module (module-scoped fixture) on 127.0.0.1 and a free port, with
its own SQLite database and artifact folder under pytest's tmp dir, and is always terminated (its
whole process group: uvicorn and job-runner children included) in teardown. Store-level tests run
twice, once per store. Nothing here touches MLflow's global tracking state.
"""

from __future__ import annotations

import json
import math
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from rcl_dist import figures, params
from rcl_dist.figures import pos_neg_from_distance_matrix
from rcl_dist.params import flatten_params
from rcl_dist.paths import default_artifacts_dir, default_tracking_uri
from rcl_dist.tracking import FIG2_ARTIFACT, NONFINITE_METRIC, RunTracker, ensure_experiment

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz

CONFIG = {
    "model": {"name": "unet", "width": 32, "raw": None},
    "loss": {"distance": "emd", "temperature": 0.1, "alpha": 1e-3, "quantiles": 256},
    "train": {"steps": 200, "lr": 1e-3, "grad_clip": None},
    "data": {"source": "bundled", "crop": 64},
}


# --------------------------------------------------------------------------------------------------
# Fixtures: stores
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "server"])
def store_uri(request, tmp_path_factory):
    """The tracking URI of each store kind: a local SQLite file, and the real server."""
    if request.param == "sqlite":
        return f"sqlite:///{(tmp_path_factory.mktemp('sqlite_store') / 'mlflow.db').as_posix()}"
    return request.getfixturevalue("mlflow_server")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the developer's MLFLOW_TRACKING_URI or writes to ~/.rcl_dist; and any stray
    ./mlruns would land in (and be checked in) a temporary working directory."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RCL_DIST_HOME", str(tmp_path / "rcl_home"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not (cwd / "mlruns").exists(), "artifacts or runs leaked into ./mlruns"


def _experiment() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """All artifact file paths of a run (recursive)."""
    out = set()
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            out |= _artifact_paths(client, run_id, info.path)
        else:
            out.add(info.path)
    return out


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def test_flatten_params_nested_lists_none_and_limits():
    flat = flatten_params({"a": {"b": 1, "c": {"d": [1, 2]}, "e": None, "f": {}}, "g": True, "h": "x" * 7000})
    assert flat["a.b"] == "1" and flat["a.c.d"] == "[1, 2]" and flat["a.e"] == "None" and flat["a.f"] == "{}"
    assert flat["g"] == "True"
    assert len(flat["h"]) == params.MAX_PARAM_VAL_LENGTH and flat["h"].endswith("config.yaml]")
    odd = flatten_params({"bad|key": 1, "k" * 300: 2})
    assert "bad_key" in odd and all(len(k) <= params.MAX_KEY_LENGTH for k in odd)
    # dataclass configs (rcl_dist.config.Config) flatten the same way
    from rcl_dist.config import Config

    cfg = flatten_params(Config())
    assert cfg["train.lr"] == "0.001" and cfg["loss.distance"] == "emd" and cfg["model.raw"] == "None"


def test_pos_neg_split_and_gap_shapes():
    dist = torch.tensor([[0.1, 0.5, 0.7], [0.6, 0.2, 0.9]])
    pos, neg = pos_neg_from_distance_matrix(dist)
    np.testing.assert_allclose(pos, [0.1, 0.2])
    np.testing.assert_allclose(neg, [[0.5, 0.7], [0.6, 0.9]])
    pos2, _ = pos_neg_from_distance_matrix(dist, positive_index=torch.tensor([2, 0]))
    np.testing.assert_allclose(pos2, [0.7, 0.6])
    np.testing.assert_allclose(figures._gaps(pos, neg, "x"), [0.4, 0.6, 0.4, 0.7], atol=1e-6)
    with pytest.raises(ValueError, match="same B"):
        figures._gaps(np.zeros(3), np.zeros((2, 2)), "x")


def test_default_store_honours_rcl_dist_home(tmp_path, monkeypatch):
    home = tmp_path / "rcl_home"  # set by _isolated_env
    assert default_tracking_uri() == f"sqlite:///{home.as_posix()}/mlflow.db"
    assert default_tracking_uri().startswith("sqlite:////")  # absolute: four slashes
    assert default_artifacts_dir() == home / "mlartifacts"
    monkeypatch.setenv("RCL_DIST_HOME", "~/elsewhere")
    monkeypatch.setenv("HOME", str(tmp_path / "fakehome"))
    assert default_tracking_uri() == f"sqlite:///{(tmp_path / 'fakehome' / 'elsewhere').as_posix()}/mlflow.db"
    monkeypatch.delenv("RCL_DIST_HOME")
    assert default_artifacts_dir() == tmp_path / "fakehome" / ".rcl_dist" / "mlartifacts"
    monkeypatch.setenv("RCL_DIST_HOME", str(home))

    # tracking_uri=None -> the default store; the experiment's artifacts live under RCL_DIST_HOME
    name = _experiment()
    tracker = RunTracker.start(None, name, "local", CONFIG)
    tracker.log_text("hello", "notes/hello.txt")
    tracker.end()
    assert tracker.tracking_uri == default_tracking_uri() and (home / "mlflow.db").is_file()
    exp = MlflowClient(default_tracking_uri()).get_experiment(tracker.experiment_id)
    assert exp.artifact_location == (home / "mlartifacts" / name).as_uri()
    assert (home / "mlartifacts" / name / tracker.run_id / "artifacts" / "notes" / "hello.txt").read_text() == "hello"
    assert ensure_experiment(name, None) == tracker.experiment_id  # found, not created again


# --------------------------------------------------------------------------------------------------
# Both stores
# --------------------------------------------------------------------------------------------------


def test_params_logged_flat(store_uri):
    tracker = RunTracker.start(store_uri, _experiment(), "params", CONFIG)
    run = tracker.client.get_run(tracker.run_id)
    tracker.end()
    assert run.data.params == flatten_params(CONFIG)
    assert run.data.params["loss.alpha"] == "0.001" and run.data.params["model.raw"] == "None"
    assert run.data.tags["resumed_count"] == "0" and run.info.run_name == "params"
    assert "config.yaml" in _artifact_paths(tracker.client, tracker.run_id)
    if store_uri.startswith("sqlite"):  # artifacts next to the database, not in ./mlruns
        assert run.info.artifact_uri.startswith((Path(store_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri())
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"


def test_metrics_batched_read_back_and_nonfinite_skipped(store_uri):
    tracker = RunTracker.start(store_uri, _experiment(), "metrics", CONFIG)
    calls = []
    real_log_batch = tracker.client.log_batch

    def spy(run_id, **kwargs):
        calls.append(kwargs)
        return real_log_batch(run_id, **kwargs)

    tracker.client.log_batch = spy
    for step in range(5):
        values = {"loss": 1.0 / (step + 1), "psnr": np.float32(20 + step), "lr": torch.tensor(1e-3)}
        assert tracker.log_metrics(values, step) == 3
    assert len(calls) == 5 and all(len(c["metrics"]) == 3 for c in calls)  # one request per step

    assert tracker.log_metrics({"loss": float("nan"), "psnr": float("inf"), "lr": 1e-3}, step=5) == 1
    assert tracker.log_metrics({"loss": float("nan")}, step=6) == 0
    assert tracker.nonfinite_counts == {"loss": 2, "psnr": 1} and tracker.nonfinite_total == 3
    tracker.log_metrics({"loss": 0.1}, step=7)
    assert tracker.log_metrics({"loss": 0.05}, step=7) == 0 and tracker.skipped_replayed == 1  # same step twice

    hist = tracker.metric_history("loss")
    assert [s for s, _ in hist] == [0, 1, 2, 3, 4, 7]
    assert [v for _, v in hist[:5]] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert [s for s, _ in tracker.metric_history("psnr")] == [0, 1, 2, 3, 4]
    assert tracker.metric_history(NONFINITE_METRIC) == [(5, 2.0), (6, 3.0)]
    assert all(math.isfinite(v) for _, v in tracker.metric_history("psnr"))
    assert tracker.last_logged_step("psnr") == 4 and tracker.last_logged_step() == 7
    assert tracker.last_logged_step("never") is None
    with pytest.raises(TypeError, match="'bad' at step 8"):
        tracker.log_metrics({"bad": "x"}, 8)
    tracker.end()


def test_resume_reopens_same_run_with_continuous_history(store_uri):
    name = _experiment()
    first = RunTracker.start(store_uri, name, "pretrain", CONFIG)
    run_id = first.run_id
    # attempt 1: checkpoint written at step 4 (it stores run_id), crash after logging step 7
    for step in range(8):
        first.log_metrics({"loss": float(step)}, step)
    first.log_system_info()
    # (a crashed worker never calls end(): the run stays RUNNING)

    changed = json.loads(json.dumps(CONFIG))
    changed["train"]["lr"] = 5e-4  # differs: must not be re-logged (params are immutable)
    changed["train"]["accum"] = 2  # new key: logged
    second = RunTracker.start(store_uri, name, "ignored-on-resume", changed, run_id=run_id, resume_step=4)
    assert second.run_id == run_id and second.resumed_count == 1
    assert second.changed_params == {"train.lr": ("0.001", "0.0005")}
    # attempt 2 restarts from the checkpoint at step 4: replays 5..7, then goes on to 11
    for step in range(5, 12):
        second.log_metrics({"loss": 100.0 + step}, step)
    assert second.skipped_replayed == 3
    second.log_system_info()

    client = MlflowClient(store_uri)
    runs = client.search_runs([second.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # no duplicate run
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "pretrain"
    assert run.data.tags["resumed_count"] == "1"
    assert run.data.tags["resume.1.from_step"] == "4" and run.data.tags["resume.1.stored_max_step"] == "7"
    assert run.data.tags["resume.1.changed_params"] == "train.lr"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.accum"] == "2"
    # continuous: one point per step, attempt 1 up to its last logged step, attempt 2 after it
    hist = second.metric_history("loss")
    assert [s for s, _ in hist] == list(range(12))
    assert [v for _, v in hist] == [float(s) for s in range(8)] + [100.0 + s for s in range(8, 12)]
    assert second.last_logged_step() == 11
    arts = _artifact_paths(client, run_id)
    assert {"config.yaml", "config_resume1.yaml", "system/attempt_0.json", "system/attempt_1.json"} <= arts
    second.end("FAILED")

    # a second resume of the FAILED run, logging replayed steps again ("log" policy)
    third = RunTracker.start(store_uri, name, None, changed, run_id=run_id, replayed_steps="log")
    third.log_metrics({"loss": -1.0}, 11)
    third.log_metrics({"loss": -2.0}, 12)
    third.end()
    run = client.get_run(run_id)
    assert run.data.tags["resumed_count"] == "2" and run.data.tags["resume.2.previous_status"] == "FAILED"
    assert run.info.status == "FINISHED" and len(client.search_runs([third.experiment_id])) == 1
    steps = [s for s, _ in third.metric_history("loss")]
    assert steps.count(11) == 2 and steps[-1] == 12  # MLflow keeps both points of step 11
    latest = dict(third.metric_history("loss", latest_per_step=True))
    assert latest[11] == -1.0 and latest[10] == 110.0 and len(latest) == 13


def test_resume_refuses_unknown_run_and_other_experiment(store_uri):
    name = _experiment()
    tracker = RunTracker.start(store_uri, name, "r", CONFIG)
    tracker.end("FAILED")
    with pytest.raises(ValueError, match="belongs to experiment"):
        RunTracker.start(store_uri, _experiment(), None, CONFIG, run_id=tracker.run_id)
    with pytest.raises(ValueError, match="not found"):
        RunTracker.start(store_uri, name, None, CONFIG, run_id=uuid.uuid4().hex)
    assert MlflowClient(store_uri).get_run(tracker.run_id).data.tags["resumed_count"] == "0"


def test_artifacts_images_fig2_system_info(store_uri, tmp_path):
    gen = torch.Generator().manual_seed(0)
    with RunTracker.start(store_uri, _experiment(), "artifacts", CONFIG) as tracker:
        noisy = torch.rand(6, 3, 16, 16, generator=gen)
        output = (noisy * 0.9).clamp(0, 1)
        grid = {"noisy": noisy, "output": output, "residual": noisy - output, "sr": torch.rand(6, 3, 32, 32)}
        path = tracker.log_image_grid("samples", grid, step=40)
        assert path == "images/samples/step_00000040.png"
        tracker.log_image_grid("raw", {"packed": torch.rand(2, 4, 8, 8), "grey": torch.rand(2, 1, 8, 8)}, step=0)

        # Fig. 2: 32 anchors x 31 negatives; the gap is ~0 at init and ~+0.5 after training
        rng = np.random.default_rng(0)
        pos_i, neg_i = rng.random(32), rng.random((32, 31))
        pos_f, neg_f = 0.1 * rng.random(32), 0.5 + 0.1 * rng.random((32, 31))
        neg_f[0, 0] = np.nan
        result = tracker.log_emd_density_plot(pos_i, neg_i, torch.tensor(pos_f), torch.tensor(neg_f))
        assert result["init"]["n"] == 32 * 31 and result["final"]["n"] == 32 * 31 - 1
        assert result["final"]["n_nonfinite"] == 1
        assert abs(result["init"]["mean"]) < 0.1 and result["final"]["mean"] == pytest.approx(0.5, abs=0.05)
        assert result["final"]["frac_positive"] == 1.0
        kde_grid = np.array(result["kde"]["grid"])
        for k in ("init", "final"):  # each density integrates to ~1
            assert _trapezoid(result["kde"][k], kde_grid) == pytest.approx(1.0, abs=0.02)
        # with the true-noise reference and the per-crop distance to the noise (second panel)
        ref = tracker.log_emd_density_plot(pos_i, neg_i, pos_f, neg_f, reference=(0.01 * pos_f, neg_f + 0.2),
                                           noise_distance={"init": rng.random(32), "final": 0.1 * rng.random(32)},
                                           subdir="with_noise")  # fmt: skip
        assert ref["noise"]["mean"] == pytest.approx(np.nanmean(neg_f + 0.2 - 0.01 * pos_f[:, None]), rel=1e-6)
        assert ref["noise_distance"]["final"]["median"] < ref["noise_distance"]["init"]["median"]
        assert _trapezoid(ref["kde"]["noise"], np.array(ref["kde"]["grid"])) == pytest.approx(1.0, abs=0.02)

        info = tracker.log_system_info()
        assert info["versions"]["mlflow"] and info["versions"]["torch"] and info["cpu_count"] >= 1
        local = tmp_path / "extra.txt"
        local.write_text("x")
        assert tracker.log_artifact_file(local, "extras") == "extras/extra.txt"
        tracker.log_dict({"a": Path("/p"), "b": (1, 2)}, "meta/info.json")
        run_id, client = tracker.run_id, tracker.client

    arts = _artifact_paths(client, run_id)
    assert {
        "images/samples/step_00000040.png",
        "images/raw/step_00000000.png",
        FIG2_ARTIFACT,
        "fig2_emd_gap_density.json",
        "system/attempt_0.json",
        "extras/extra.txt",
        "meta/info.json",
        "config.yaml",
    } <= arts
    dst = tmp_path / "dl"
    dst.mkdir()
    png = Path(client.download_artifacts(run_id, FIG2_ARTIFACT, str(dst)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads(Path(client.download_artifacts(run_id, "fig2_emd_gap_density.json", str(dst))).read_text())
    assert stored["final"]["mean"] == pytest.approx(result["final"]["mean"])
    assert len(stored["init"]["values"]) == 32 * 31
    assert json.loads(Path(client.download_artifacts(run_id, "meta/info.json", str(dst))).read_text()) == {
        "a": "/p",
        "b": [1, 2],
    }
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sys.hostname"] == socket.gethostname()


def test_context_manager_ends_failed_on_error(store_uri):
    with pytest.raises(RuntimeError):
        with RunTracker.start(store_uri, _experiment(), "boom", CONFIG) as tracker:
            raise RuntimeError("worker died")
    assert tracker.client.get_run(tracker.run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="status"):
        tracker.end("DONE")
