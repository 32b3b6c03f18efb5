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
    assert any(line.startswith("reading: proxy: RCL") for line in lines)
    assert "rcl_dist.demo" in sys.modules
    # the console: each worker line once; none of Ray Train's routine chatter (before: 143 lines of the
    # placement-group cleaner's failed state-API polls, every report as a raw dict, each progress line twice)
    err = capfd.readouterr().err
    worker = [line for line in err.splitlines() if "[rcl-dist" in line]
    assert worker and len(worker) == len(set(worker)), worker
    for noise in ("Failed to query Ray Train Controller", "Reporting training result", "PreemptionWatcher",
                  "Downloading artifacts"):  # fmt: skip
        assert noise not in err, noise


def test_reading_says_where_pre_training_pays_off():
    from rcl_dist.demo import _reading

    def rows(proxy_rcl, proxy_none, full_rcl, full_none):
        return [{"method": "noisy input", "psnr": 29.0}, {"method": "no pre-training, proxy", "psnr": proxy_none},
                {"method": "RCL, proxy", "psnr": proxy_rcl}, {"method": "no pre-training, full (32 labels)", "psnr": full_none},
                {"method": "RCL, full (32 labels)", "psnr": full_rcl}]  # fmt: skip

    text = _reading(rows(29.91, 29.14, 31.10, 31.84), 32)
    assert text.startswith("reading: proxy: RCL +0.91 dB over the noisy input, +0.77 dB over no pre-training; "
                           "full: RCL +2.10 dB over the noisy input, -0.74 dB over no pre-training")  # fmt: skip
    assert "pays off in proxy mode only" in text
    assert "pays off in both modes" in _reading(rows(31, 30, 32, 31), 32)
    assert "does not pay off here" in _reading(rows(29, 30, 31, 32), 32)
