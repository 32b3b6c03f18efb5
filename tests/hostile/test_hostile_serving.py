"""Issue 16, defect 2 (serving): `mlflow models serve` of the denoiser, on 127.0.0.1, sent images over the
pixel budget. Each is answered 400 with a short message that names the row and the budget and carries no
Python internals, fast (checked from the header, nothing decoded), and the server stays up: a good
image sent afterwards is restored."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch

from rcl_dist.config import Config
from rcl_dist.data.codec import decode_image_bytes, encode_png
from rcl_dist.models.io import save_checkpoint
from rcl_dist.serving import model_signature, pyfunc_model_args
from rcl_dist.models.factory import build_model_from_config

from hostile_inputs import lying_png, noisy_rgb, zero_png
from servers import free_port, mlflow_command, stop_group, wait_until_answers

BUDGET = 4096  # pixels: the served process's $RCL_DIST_MAX_PIXELS, small so that a real over-budget PNG is tiny
SERVE_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny fine-tuned U-Net saved as the registry's pyfunc model (no tracking server needed) and served
    by `mlflow models serve` on 127.0.0.1 with a pixel budget of BUDGET; yields the base URL."""
    root = tmp_path_factory.mktemp("serve")
    cfg = Config.from_dict({"model": {"name": "unet", "width": 4, "depth": 2}})
    torch.manual_seed(0)
    net = build_model_from_config(cfg)
    net.replace_head(net.new_head("rgb", 3))
    ckpt = save_checkpoint(root / "ckpt", net, cfg, head={"kind": "rgb", "out_channels": 3}, task="denoise", mode="proxy")
    mlflow.pyfunc.save_model(  # as `rcl-dist register` logs it: models from code, no pickle
        str(root / "model"), **pyfunc_model_args(ckpt, tile=32, overlap=8), signature=model_signature(32, 8),
        pip_requirements=["torch"],
    )  # fmt: skip
    assert not (root / "model" / "python_model.pkl").exists()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, RCL_DIST_MAX_PIXELS=str(BUDGET), RCL_DIST_DEVICE="cpu")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # uvicorn from the venv
    log_path = root / "serve.log"
    cmd = mlflow_command() + [
        "models", "serve", "-m", str(root / "model"), "--host", "127.0.0.1", "--port", str(port),
        "--env-manager", "local", "--workers", "1",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_answers(url + "/ping", proc, log_path, SERVE_TIMEOUT_S, "mlflow models serve")
        yield {"url": url, "proc": proc}
    finally:
        stop_group(proc)


def _post(url: str, files: list[bytes]) -> tuple[int, str, float]:
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(f).decode()] for f in files]}}
    req = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode(), time.monotonic() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), time.monotonic() - t0


def _assert_short_refusal(status: int, text: str, seconds: float) -> None:
    assert status == 400, text[:2000]
    message = json.loads(text)["message"]
    assert "row 0" in message and "pixel budget" in message, message
    for internal in ("Traceback", 'File "', "stack_trace", "site-packages"):
        assert internal not in text, text[:2000]
    assert len(text) < 2000 and seconds < 30


@pytest.mark.parametrize(
    "probe",
    [
        "png16_header_100000x100000",  # allocated until MemoryError before the fix
        "png8_decompression_bomb_20000x20000",  # Pillow's DecompressionBombError: a full stack trace in the body
        "png8_all_zero_over_budget",  # a valid 6000^2 all-zero PNG (140 KB) cost 42 s / 2.5 GB: here 100x100 over 4096
    ],
)
def test_server_refuses_image_over_pixel_budget_and_stays_up(server, probe):
    data = {
        "png16_header_100000x100000": lambda: lying_png(100000, 100000, depth=16),
        "png8_decompression_bomb_20000x20000": lambda: lying_png(20000, 20000, depth=8),
        "png8_all_zero_over_budget": lambda: zero_png(100, 100),
    }[probe]()
    _assert_short_refusal(*_post(server["url"], [data]))
    assert server["proc"].poll() is None
    good = noisy_rgb(20, 24, seed=1)  # 480 pixels: within the budget
    status, text, _ = _post(server["url"], [encode_png(good)])
    assert status == 200, text[:2000]
    (pred,) = json.loads(text)["predictions"]
    assert decode_image_bytes(base64.b64decode(pred["image"])).shape == (20, 24, 3)
