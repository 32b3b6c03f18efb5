"""`make demo`'s pipeline on a reduced setting: index -> pre-train (Ray, DALI, MLflow) -> proxy and full
fine-tuning -> evaluation -> register -> promote -> denoise -> table and side-by-side PNG."""

from __future__ import annotations

import sys

import pytest

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_demo_pipeline_reduced(tmp_path, monkeypatch, capfd):
    from rcl_dist.cli import DEMO_OVERRIDES
    from rcl_dist.demo import run_demo

    monkeypatch.setenv("RCL_DIST_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    small = [*DEMO_OVERRIDES, "model.width=4", "model.depth=2", "data.crop=32", "data.tile=64", "train.batch_size=8"]
    lines: list[str] = []
    try:
        out = run_demo(small, pretrain_steps=4, finetune_steps=4, labels=16, full_labels=16, eval_images=1, log=lines.append)
    finally:
        ray.shutdown()
    methods = [r["method"] for r in out["rows"]]
    assert methods[0] == "noisy input" and "RCL, proxy" in methods and "no pre-training, proxy" in methods
    assert all(r["psnr"] > 0 for r in out["rows"])
    assert (tmp_path / "home" / "demo" / "side_by_side.png").stat().st_size > 0
    assert out["model_version"] in ("1", 1)
    assert any("mlflow ui --backend-store-uri" in line for line in lines)
    assert any(line.startswith("| RCL, full") for line in lines)
    assert "rcl_dist.demo" in sys.modules
    # the console: each worker line once; none of Ray Train's routine chatter (before: 143 lines of the
    # placement-group cleaner's failed state-API polls, every report as a raw dict, each progress line twice)
    err = capfd.readouterr().err
    worker = [line for line in err.splitlines() if "[rcl-dist" in line]
    assert worker and len(worker) == len(set(worker)), worker
    for noise in ("Failed to query Ray Train Controller", "Reporting training result", "PreemptionWatcher",
                  "Downloading artifacts"):  # fmt: skip
        assert noise not in err, noise
