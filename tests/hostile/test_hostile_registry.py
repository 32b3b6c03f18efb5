"""Issue 16, defect 11: a registered model must not unpickle code when it is loaded.

Before: ``register`` logged the pyfunc as a Python object, so MLflow stored ``python_model.pkl``
(CloudPickle of :class:`rcl_dist.serving.DenoiserModel`, with MLflow's warning on every register), and
loading the model unpickled it. Now the pyfunc is logged as "models from code" (the path of
``rcl_dist/registry_model.py``), and :func:`rcl_dist.serving.load_denoiser` refuses a model stored as
a pickle. Real engines: a SQLite MLflow store with its registry.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from rcl_dist.data.codec import decode_image_bytes, encode_png
from rcl_dist.models.io import load_checkpoint
from rcl_dist.registry import register
from rcl_dist.serving import DenoiserModel, global_uris, load_denoiser, model_signature
from rcl_dist.paths import RUN_STATE

from test_denoise import expected, fine_tuned_checkpoint, smooth
from test_registry import finetune_run


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny fine-tuned U-Net registered as ``hostile-denoiser`` v1 in a SQLite store."""
    root = tmp_path_factory.mktemp("hostile_registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    manifest = root / "labels.parquet"
    manifest.write_bytes(b"fine-tuning manifest bytes")
    pre = root / "ray_results" / "pretrain-x" / "checkpoint_000001"  # lineage only: never loaded
    pre.mkdir(parents=True)
    (pre / "state.pt").write_bytes(b"placeholder")
    (pre.parent / RUN_STATE).write_text(json.dumps({"manifest": str(manifest), "mlflow_run_id": None, "tracking_uri": None}))
    ckpt = fine_tuned_checkpoint(root / "ft", seed=0, pretrain=str(pre))
    run_id = finetune_run(uri, ckpt, str(pre), manifest, "ft-hostile")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # MLflow's own warnings, as the user sees them
    logging.getLogger("mlflow").addHandler(handler)
    try:
        mv = register(run_id, "hostile-denoiser", tracking_uri=uri)
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    with global_uris(uri):  # a SQLite registry resolves models:/ through MLflow's global URIs
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/hostile-denoiser/{mv.version}",
                                                          tracking_uri=uri, registry_uri=uri, dst_path=str(root / "dl")))  # fmt: skip
    return {"uri": uri, "version": mv.version, "folder": folder, "ckpt": ckpt, "root": root, "logs": records}


def test_registered_model_folder_holds_no_pickle_of_the_class(registered):
    folder = registered["folder"]
    pyfunc = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert "model_code_path" in pyfunc and "python_model" not in pyfunc, pyfunc
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.pickle"))
    assert not (folder / "python_model.pkl").exists()
    assert any(p.name == "registry_model.py" for p in folder.rglob("*.py"))
    assert pyfunc.get("config") == {"tile": 256, "overlap": 32} or pyfunc.get("model_config") == {"tile": 256, "overlap": 32}


def test_register_gives_no_cloudpickle_warning(registered):
    assert not [m for m in registered["logs"] if "CloudPickle" in m], registered["logs"]


def test_registered_model_loads_from_code_and_predicts(registered):
    loaded = load_denoiser(f"models:/hostile-denoiser/{registered['version']}", tracking_uri=registered["uri"])
    inner = loaded.unwrap_python_model()
    assert isinstance(inner, DenoiserModel) and (inner.tile, inner.overlap) == (256, 32)
    img = smooth(37, 45, 3, np.uint8, 3)
    out = loaded.predict(pd.DataFrame({"image": [base64.b64encode(encode_png(img)).decode()]}))
    restored = decode_image_bytes(base64.b64decode(out["image"][0]))
    net = load_checkpoint(registered["ckpt"])[0]
    np.testing.assert_array_equal(restored, expected(net, img))


def test_model_stored_as_pickle_is_refused_before_unpickling(registered, tmp_path):
    """A model folder in the old format (python_model.pkl) whose pickle would run code when loaded:
    the refusal comes from reading MLmodel, so the marker file is never created."""
    marker = tmp_path / "unpickled"
    folder = tmp_path / "old_model"
    mlflow.pyfunc.save_model(
        str(folder), python_model=_Evil(str(marker)), artifacts={"checkpoint": str(registered["ckpt"])},
        signature=model_signature(), pip_requirements=["torch"],
    )  # fmt: skip
    assert (folder / "python_model.pkl").is_file()
    with pytest.raises(ValueError, match="stores its Python model as a pickle"):
        load_denoiser(str(folder), tracking_uri=registered["uri"])
    assert not marker.exists()


class _Evil(mlflow.pyfunc.PythonModel):
    """Unpickling this writes a marker file (what a hostile pickle would do, harmlessly)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))

    def predict(self, context, model_input, params=None):
        return model_input


def _touch(marker: str):
    Path(marker).write_text("unpickled")
    return DenoiserModel()
