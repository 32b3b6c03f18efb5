"""Issue 16, defect 3 (training): `rcl-dist pretrain --local data.sigma_max=.inf ... --save nan.pt` exited 0
and wrote all-NaN weights (the non-finite guard of the Ray worker was not applied in the local trainer),
and a model too large for the machine (`model.depth=12`: 23 GB) ran until the kernel killed it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcl_dist.cli import main
from rcl_dist.config import ConfigError, load_config
from rcl_dist.models.factory import build_model_from_config
from rcl_dist.train.guards import NonFiniteError, NonFiniteGuard, check_memory, estimate_training_memory
from rcl_dist.train.guards import NonFiniteGuard as WorkerGuard  # one guard for both trainers
from rcl_dist.train.local import train_local

TINY = ["model.width=4", "model.depth=2", "data.crop=16", "train.batch_size=4", "loss.encoder=null",
        "train.log_every=1", "train.nonfinite_limit=3"]  # fmt: skip


def _images(fill: float | None = None, n: int = 4) -> list[np.ndarray]:
    """n random [3, 24, 24] images, or images holding only ``fill`` (NaN: every loss is NaN)."""
    rng = np.random.default_rng(0)
    imgs = [rng.uniform(0.2, 0.8, size=(3, 24, 24)).astype(np.float32) for _ in range(n)]
    return imgs if fill is None else [np.full_like(im, fill) for im in imgs]


def test_local_pretrain_inf_sigma_exits_nonzero_writes_nothing(tmp_path, capsys):
    save = tmp_path / "nan.pt"
    rc = main(["pretrain", "--local", "data.sigma_max=.inf", "train.steps=3", *TINY, "--save", str(save)])
    assert rc == 2 and not save.exists()
    assert "data.sigma_max must be a finite number in [0, 1], got inf" in capsys.readouterr().err


def test_local_trainer_stops_on_nonfinite_losses(tmp_path):
    """The same guard as the Ray worker's: non-finite steps are skipped (the weights stay as they were),
    `train.nonfinite_limit` in a row stop the run with an error that names the setting."""
    assert WorkerGuard is NonFiniteGuard
    cfg = load_config(None, ["train.steps=5", *TINY])
    model = build_model_from_config(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"3 non-finite losses in a row at step 3 \(train.nonfinite_limit=3\)"):
        train_local(cfg, images=_images(float("nan")), model=model, log=None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped steps changed nothing


def test_local_trainer_never_returns_nonfinite_weights():
    """A run whose last steps are skipped still holds the weights it was given: when those are NaN the
    final check refuses them (what `--save` would have written)."""
    cfg = load_config(None, ["train.steps=2", *TINY])
    model = build_model_from_config(cfg)
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="non-finite weights after step 2 .*nothing is saved"):
        train_local(cfg, images=_images(), model=model, log=None)


def test_local_trainer_finite_run_still_trains():
    cfg = load_config(None, ["train.steps=2", *TINY])
    model, history = train_local(cfg, images=_images(), log=None)
    assert history.step == [1, 2] and all(np.isfinite(history.metrics["loss"]))


# ----------------------------------------------------------------------------------------- memory


def test_memory_estimate_counts_the_real_model():
    """Weights part: exactly 16 bytes (weight, gradient, Adam's 2 moments, float32) per parameter of the
    model the trainer builds; activations part: proportional to the batch."""
    cfg = load_config(None, TINY)
    n_params = sum(p.numel() for p in build_model_from_config(cfg).parameters())
    w4, a4 = estimate_training_memory(cfg, 4)
    w8, a8 = estimate_training_memory(cfg, 8)
    assert w4 == w8 == 16 * n_params
    assert a8 == 2 * a4 > 0


@pytest.mark.parametrize("overrides", [["model.width=1024", "model.depth=8"], ["model.width=256", "model.depth=6"],
                                       ["data.crop=4096", "train.batch_size=65536"]], ids=str)  # fmt: skip
def test_model_or_batch_that_cannot_fit_refused_naming_the_keys(tmp_path, overrides, capsys):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=r"model.width=\d+, model.depth=\d+, data.crop=\d+, train.batch_size=\d+: "
                                          r"training needs at least .* GiB .*more than the .* GiB of memory available"):  # fmt: skip
        check_memory(cfg)
    save = tmp_path / "big.pt"
    assert main(["pretrain", "--local", *overrides, "--save", str(save)]) == 2 and not save.exists()
    assert "GiB of memory available here" in capsys.readouterr().err


def test_default_config_fits():
    check_memory(load_config(None, []))


def test_distributed_pretrain_refuses_before_ray_starts(tmp_path, monkeypatch):
    """`rcl-dist pretrain` (Ray Train) on a local Ray: the same estimate, for all workers, before Ray
    starts or any run folder or MLflow run exists."""
    ray = pytest.importorskip("ray")
    from rcl_dist.train.launch import run_pretrain

    monkeypatch.setenv("RCL_DIST_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    cfg = load_config(None, ["model.width=512", "model.depth=7", "dist.workers=2", "tracking.enabled=false"])
    with pytest.raises(ConfigError, match=r"dist.workers=2: training needs at least"):
        run_pretrain(cfg, log=lambda s: None)
    assert not ray.is_initialized() and not (tmp_path / "home").exists()
