"""The model registry (rcl_dist.registry) against a real `mlflow server`: register a fine-tuning run's
checkpoint as a pyfunc model, load it back and predict on any image size, promotion by evaluation
(aliases only), a clear error for a model that does not exist, and `mlflow models serve` answering a
base64 PNG request."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from rcl_dist.data.codec import decode_image_bytes, encode_png, read_image
from rcl_dist.denoise import denoise_paths
from rcl_dist.evaluate import evaluate_folder, summarise
from rcl_dist.models.io import load_checkpoint
from rcl_dist.registry import DEFAULT_ALIAS, main_promote, promote, register
from rcl_dist.serving import load_denoiser
from rcl_dist.tracking import RunTracker
from rcl_dist.train.finetune_spec import FinetuneSpec
from rcl_dist.paths import RUN_STATE

from test_denoise import expected, fine_tuned_checkpoint, smooth
from servers import free_port, mlflow_command, stop_group, wait_until_answers

EXPERIMENT = "rcl-finetune-test"


# ----------------------------------------------------------------------------------------- fixtures


def finetune_run(uri: str, ckpt: Path, pretrain: str, manifest: Path, name: str) -> str:
    """An MLflow run as `run_finetune` leaves it: spec params, tags, checkpoint/state.pt artifact."""
    spec = FinetuneSpec(source=pretrain, manifest=str(manifest), task="denoise", mode="proxy", labels=8, steps=5)
    tags = {"pretrain_checkpoint": pretrain, "task": "denoise", "mode": "proxy", "labels": "8"}
    tracker = RunTracker.start(uri, EXPERIMENT, name, spec.to_dict(), tags=tags)
    tracker.set_tags({"checkpoint": str(ckpt)})
    tracker.log_artifact_file(ckpt, subdir="checkpoint")
    tracker.end("FINISHED")
    return tracker.run_id


@pytest.fixture(scope="module", autouse=True)
def cpu_only():
    """The served model runs on $RCL_DIST_DEVICE (else cuda when present): pin the CPU here so the pyfunc's
    output can be compared bit for bit with the CPU reference (test_denoise.test_cli_on_device covers cuda)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RCL_DIST_DEVICE", "cpu")
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_server):
    """Three fine-tuning runs (tiny U-Nets, seeds 0-2), an evaluation folder and each model's PSNR on it."""
    root = tmp_path_factory.mktemp("registry")
    pre = root / "ray_results" / "pretrain-x"
    (pre / "checkpoint_000001").mkdir(parents=True)
    (pre / "checkpoint_000001" / "state.pt").write_bytes(b"placeholder")
    pre_manifest = root / "pretrain.parquet"
    pre_manifest.write_bytes(b"pretrain manifest")
    (pre / RUN_STATE).write_text(json.dumps({"manifest": str(pre_manifest), "mlflow_run_id": "pretrain-run-123", "tracking_uri": None}))
    manifest = root / "labels.parquet"
    manifest.write_bytes(b"fine-tuning manifest bytes")
    evald = root / "eval"
    evald.mkdir()
    for i, (h, w) in enumerate([(40, 48), (37, 45)]):
        (evald / f"e{i}.png").write_bytes(encode_png(smooth(h, w, 3, np.uint8, 10 + i)))
    models = []
    for seed in range(3):
        ckpt = fine_tuned_checkpoint(root / f"ft{seed}", seed=seed, pretrain=str(pre / "checkpoint_000001"))
        run_id = finetune_run(mlflow_server, ckpt, str(pre / "checkpoint_000001"), manifest, f"ft-{seed}")
        net = load_checkpoint(ckpt)[0]
        psnr = summarise(evaluate_folder(net, evald, "denoise", progress=None))["psnr_mean"]
        models.append({"ckpt": ckpt, "run_id": run_id, "net": net, "psnr": psnr})
    return {"uri": mlflow_server, "root": root, "eval": evald, "manifest": manifest, "models": models}


@pytest.fixture(scope="module")
def champion(world):
    """Model 0 registered as rcl-denoiser v1 with an evaluation, promoted to @champion (no holder)."""
    m = world["models"][0]
    mv = register(m["run_id"], "rcl-denoiser", tracking_uri=world["uri"], eval_data=world["eval"])
    decision = promote("rcl-denoiser", mv.version, eval_data=world["eval"], tracking_uri=world["uri"])
    assert decision["promoted"] and decision["decision"] == "no-holder"
    return mv


# ----------------------------------------------------------------------------------------- register and load


def test_register_records_lineage_and_evaluation(world, champion):
    mv, m = champion, world["models"][0]
    assert mv.version == "1"
    t = mv.tags
    assert t["lineage.finetune_run_id"] == m["run_id"]
    assert t["lineage.pretrain_run_id"] == "pretrain-run-123"
    assert t["lineage.finetune_manifest_sha256"] == hashlib.sha256(world["manifest"].read_bytes()).hexdigest()
    assert t["lineage.checkpoint_sha256"] == hashlib.sha256(m["ckpt"].read_bytes()).hexdigest()
    assert t["lineage.code_commit"] and t["trained_on.task"] == "denoise" and t["trained_on.labels"] == "8"
    assert t["trained_on.mode"] == "proxy" and t["trained_on.data"] == str(world["manifest"])
    assert float(t["eval.psnr"]) == pytest.approx(m["psnr"], abs=1e-5) and t["eval.n"] == "2"
    assert "denoise" in mv.description and "proxy" in mv.description
    client = MlflowClient(world["uri"])
    reg_run = client.get_run(mv.run_id)
    assert reg_run.data.tags["mlflow.parentRunId"] == m["run_id"]  # nested under the fine-tuning run
    assert reg_run.info.status == "FINISHED"
    assert client.get_run(m["run_id"]).info.status == "FINISHED"  # the fine-tuning run is left alone
    assert client.get_model_version_by_alias("rcl-denoiser", DEFAULT_ALIAS).version == "1"


def test_pyfunc_predicts_any_size_like_the_tiled_model(world, champion):
    net = world["models"][0]["net"]
    model = load_denoiser("models:/rcl-denoiser@champion", tracking_uri=world["uri"])
    img8, img16 = smooth(37, 45, 3, np.uint8, 1), smooth(52, 33, 3, np.uint16, 2)
    df = pd.DataFrame({"image": [base64.b64encode(encode_png(img8)).decode(), base64.b64encode(encode_png(img16)).decode()]})
    out = model.predict(df)
    assert list(out.columns) == ["image"] and len(out) == 2
    r8, r16 = (decode_image_bytes(base64.b64decode(s)) for s in out["image"])
    assert r8.dtype == np.uint8 and r8.shape == (37, 45, 3) and np.array_equal(r8, expected(net, img8))
    assert r16.dtype == np.uint16 and r16.shape == (52, 33, 3) and np.array_equal(r16, expected(net, img16))
    # request params change the tiling (a 70x90 image in 32-pixel tiles)
    big = smooth(70, 90, 3, np.uint8, 3)
    tiled = model.predict(pd.DataFrame({"image": [base64.b64encode(encode_png(big)).decode()]}), params={"tile": 32, "overlap": 8})
    got = decode_image_bytes(base64.b64decode(tiled["image"][0]))
    assert np.array_equal(got, expected(net, big, tile=32, overlap=8))
    # arrays through the unwrapped model: [N, H, W, C] float in [0, 1]
    batch = np.stack([smooth(21, 27, 3, np.uint8, s) for s in (4, 5)]).astype(np.float32) / 255
    y = model.unwrap_python_model().predict(None, batch)
    assert y.shape == batch.shape and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1


def test_denoise_cli_accepts_a_registry_uri(world, champion, tmp_path):
    img = smooth(31, 29, 3, np.uint16, 6)
    (tmp_path / "n.png").write_bytes(encode_png(img))
    done, failed = denoise_paths(
        "models:/rcl-denoiser@champion", [tmp_path / "n.png"], tmp_path / "out", tracking_uri=world["uri"], progress=False,
        device="cpu",
    )
    assert failed == []
    got = read_image(done[0][1])
    assert got.dtype == np.uint16 and np.array_equal(got, expected(world["models"][0]["net"], img))


def test_missing_model_or_run_is_a_clear_error(world, tmp_path):
    uri = world["uri"]
    with pytest.raises(ValueError, match="models:/no-such-model@champion"):
        load_denoiser("models:/no-such-model@champion", tracking_uri=uri)
    with pytest.raises(ValueError, match="models:/rcl-denoiser/99"):
        load_denoiser("models:/rcl-denoiser/99", tracking_uri=uri)
    (tmp_path / "a.png").write_bytes(encode_png(smooth(9, 9, 3, np.uint8)))
    with pytest.raises(ValueError, match="no-such-model"):
        denoise_paths("models:/no-such-model@champion", [tmp_path / "a.png"], tmp_path / "o", tracking_uri=uri)
    with pytest.raises(ValueError, match="fine-tuning run 'f00' not found"):
        register("f00", "x", tracking_uri=uri)
    with pytest.raises(ValueError, match="version 42 not found"):
        promote("rcl-denoiser", 42, eval_data=world["eval"], tracking_uri=uri)
    # a run without a checkpoint
    tracker = RunTracker.start(uri, EXPERIMENT, "empty", {"a": 1})
    tracker.end("FINISHED")
    with pytest.raises(ValueError, match="no checkpoint"):
        register(tracker.run_id, "x", tracking_uri=uri)
    # a pre-training checkpoint (no task) is not a fine-tuned model
    from rcl_dist.config import Config
    from rcl_dist.models.io import save_checkpoint
    from rcl_dist.models.factory import build_model_from_config

    cfg = Config.from_dict({"model": {"width": 4, "depth": 2}})
    pre = save_checkpoint(tmp_path / "pre", build_model_from_config(cfg), cfg, step=3)
    run_id = finetune_run(uri, pre, "none-given", world["manifest"], "pretrain-like")
    with pytest.raises(ValueError, match="not a fine-tuned checkpoint"):
        register(run_id, "x", tracking_uri=uri)
    with pytest.raises(FileNotFoundError, match="no_such_eval"):
        register(world["models"][0]["run_id"], "x", tracking_uri=uri, eval_data=tmp_path / "no_such_eval")
    assert "x" not in [m.name for m in MlflowClient(uri).search_registered_models()]  # nothing registered


def test_default_sqlite_store_register_promote_denoise(world, tmp_path, monkeypatch, capsys):
    """The local default store (SQLite under $RCL_DIST_HOME), through the CLI entry points; MLflow's
    global URIs are left as they were and nothing lands in the working directory."""
    import mlflow

    from rcl_dist.registry import main_register
    from rcl_dist.paths import default_tracking_uri

    monkeypatch.setenv("RCL_DIST_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    before = mlflow.get_tracking_uri()
    m = world["models"][1]
    run_id = finetune_run(default_tracking_uri(), m["ckpt"], "none-given", world["manifest"], "ft-sqlite")
    assert main_register(run_id, "local-denoiser", eval_data=str(world["eval"])) == 0
    assert main_promote("local-denoiser", 1, eval_data=str(world["eval"])) == 0
    out = capsys.readouterr().out
    assert "registered local-denoiser version 1" in out and "no-holder" in out
    img = smooth(27, 35, 3, np.uint8, 8)
    (tmp_path / "n.png").write_bytes(encode_png(img))
    assert main_denoise_ok("models:/local-denoiser@champion", tmp_path / "n.png", tmp_path / "den", m["net"], img)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["den", "home", "n.png"]  # no ./mlflow.db, no ./mlruns
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in os.environ


def main_denoise_ok(model: str, src: Path, out: Path, net, img: np.ndarray) -> bool:
    from rcl_dist.denoise import main_denoise

    assert main_denoise(model, [str(src)], str(out), device="cpu") == 0
    return bool(np.array_equal(read_image(out / src.name), expected(net, img)))


# ----------------------------------------------------------------------------------------- promotion


def test_promotion_moves_the_alias_only_for_a_better_candidate(world):
    uri, name, client = world["uri"], "rcl-promo", MlflowClient(world["uri"])
    order = sorted(world["models"], key=lambda m: m["psnr"])  # worst, middle, best
    worst, middle, best = order
    assert worst["psnr"] < middle["psnr"] < best["psnr"]
    v = {id(m): register(m["run_id"], name, tracking_uri=uri).version for m in (middle, worst, best)}

    def holder() -> str:
        return client.get_model_version_by_alias(name, "champion").version

    d = promote(name, v[id(middle)], eval_data=world["eval"], tracking_uri=uri)  # no holder: set
    assert d["decision"] == "no-holder" and d["promoted"] and holder() == v[id(middle)]

    # a worse candidate: rejected, alias unchanged, both figures recorded on both versions
    rc = main_promote(name, v[id(worst)], eval_data=str(world["eval"]), tracking_uri=uri)
    assert rc == 1 and holder() == v[id(middle)]
    t = client.get_model_version(name, v[id(worst)]).tags
    assert t["promotion.champion.decision"] == "rejected"
    assert float(t["promotion.champion.candidate_psnr"]) == pytest.approx(worst["psnr"], abs=1e-5)
    assert float(t["promotion.champion.holder_psnr"]) == pytest.approx(middle["psnr"], abs=1e-5)
    assert t["promotion.champion.holder_version"] == v[id(middle)]
    h = client.get_model_version(name, v[id(middle)]).tags
    assert h["promotion.champion.challenge.outcome"] == "kept" and h["promotion.champion.challenge.by_version"] == v[id(worst)]
    last = json.loads(client.get_registered_model(name).tags["promotion.champion.last"])
    assert last["decision"] == "rejected" and last["candidate_psnr"] == pytest.approx(worst["psnr"], abs=1e-5)

    # a better candidate: the alias moves
    d = promote(name, v[id(best)], eval_data=world["eval"], tracking_uri=uri)
    assert d["decision"] == "promoted" and holder() == v[id(best)]
    assert d["candidate_psnr"] == pytest.approx(best["psnr"], abs=1e-5) and d["holder_psnr"] == pytest.approx(middle["psnr"], abs=1e-5)
    assert client.get_model_version(name, v[id(middle)]).tags["promotion.champion.challenge.outcome"] == "replaced"

    # force: the worse one takes the alias, and the record says it was forced
    d = promote(name, v[id(worst)], eval_data=world["eval"], tracking_uri=uri, force=True)
    assert d["decision"] == "forced" and holder() == v[id(worst)]
    assert client.get_model_version(name, v[id(worst)]).tags["promotion.champion.decision"] == "forced"
    # the same version again: nothing to do, still 0
    assert main_promote(name, v[id(worst)], eval_data=str(world["eval"]), tracking_uri=uri) == 0
    # no stage was ever used
    assert all(mv.current_stage in (None, "None") for mv in client.search_model_versions(f"name='{name}'"))


# ----------------------------------------------------------------------------------------- serving


SERVE_TIMEOUT_S = 90


def test_mlflow_models_serve_answers_a_base64_png(world, champion, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=world["uri"])
    # the server runs `uvicorn` from PATH: the venv's bin folder must be on it even when not activated
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    log_path = tmp_path / "serve.log"
    cmd = mlflow_command() + [
        "models", "serve", "-m", "models:/rcl-denoiser@champion", "--host", "127.0.0.1", "--port", str(port),
        "--env-manager", "local", "--workers", "1",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_answers(url + "/ping", proc, log_path, SERVE_TIMEOUT_S, "mlflow models serve")

        img = smooth(45, 61, 3, np.uint16, 9)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(encode_png(img)).decode()]]},
                "params": {"tile": 32, "overlap": 8}}  # fmt: skip
        req = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        (pred,) = answer["predictions"]
        got = decode_image_bytes(base64.b64decode(pred["image"]))
        assert got.dtype == np.uint16 and got.shape == (45, 61, 3)
        want = expected(world["models"][0]["net"], img, tile=32, overlap=8)
        assert np.abs(got.astype(np.int64) - want.astype(np.int64)).max() <= 2  # another process: allow rounding

        bad = {"dataframe_split": {"columns": ["image"], "data": [["not base64 !"]]}}
        req = urllib.request.Request(url + "/invocations", data=json.dumps(bad).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400 and "row 0" in e.value.read().decode()
    finally:
        stop_group(proc)
