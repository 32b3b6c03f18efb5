"""The distributed pre-training job with real engines: local Ray (127.0.0.1), DALI on the CPU, and a
real `mlflow server`.

* 2 Ray Train workers with `global` negatives give the same loss and the same parameter update as
  1 process on the concatenated batch (identical inputs);
* a worker killed mid-run restarts from the last checkpoint and completes; the restart is in the
  metrics, and the MLflow run is the same run with one point per step;
* `--resume` continues a finished run to a higher step count in the same MLflow run.
"""

from __future__ import annotations

import math

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from rcl_dist.config import ConfigError, load_config
from rcl_dist.train.guards import NonFiniteGuard

ray = pytest.importorskip("ray")

TINY = [
    "model.width=8",
    "model.depth=2",
    "data.crop=32",
    "data.tile=64",
    "data.threads=1",
    "train.batch_size=8",
    "train.log_every=1",
    "loss.encoder=null",  # keeps workers light; the Eq. 5 path is tested in-process
    "loss.alpha=1",
]


# ---------------------------------------------------------------- 2 workers == 1 process


def _parity_loop(config: dict) -> None:
    """Each worker takes its slice of one fixed batch; rank 0 saves gradients and updated params."""
    import ray.train
    import ray.train.torch

    from rcl_dist.dist import make_key_gather
    from rcl_dist.train.worker import DDPRestorer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    batch, model, objective = _parity_setup()
    b = batch["q"].shape[0] // world
    local = {k: v[rank * b : (rank + 1) * b] for k, v in batch.items()}
    wrapped = DDPRestorer(ray.train.torch.prepare_model(model, move_to_device=False), model)
    out = objective(wrapped, local, key_gather=make_key_gather(), world_size=world)
    out["loss"].backward()
    contrast = out["contrast"].detach().clone()
    torch.distributed.all_reduce(contrast)
    grads = [p.grad.clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    if rank == 0:
        torch.save({"contrast": contrast, "grads": grads, "params": [p.detach() for p in model.parameters()]}, config["out"])
    ray.train.report({"done": 1.0})


def _parity_setup():
    from rcl_dist.losses.contrastive import ResidualContrastiveLoss
    from rcl_dist.losses.objectives import RCLObjective
    from rcl_dist.models import build_model

    g = torch.Generator().manual_seed(3)
    scale = torch.linspace(0.05, 0.3, 8).view(-1, 1, 1, 1)
    batch = {k: 0.5 + scale * torch.randn(8, 3, 16, 16, generator=g) for k in ("q", "k")}
    torch.manual_seed(0)
    model = build_model("unet", width=4, depth=2)
    objective = RCLObjective(ResidualContrastiveLoss("emd", temperature=0.05), None, alpha=1.0)
    return batch, model, objective


def test_two_ray_workers_global_negatives_equal_one_process(local_ray, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tmp_path / "rank0.pt"
    TorchTrainer(
        _parity_loop,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="parity", storage_path=str(tmp_path / "ray")),
    ).fit()
    got = torch.load(out, weights_only=True)

    batch, model, objective = _parity_setup()
    ref = objective(model, batch)
    ref["loss"].backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert got["contrast"].item() == pytest.approx(ref["contrast"].item(), rel=1e-5)
    gmax = max(g.abs().max().item() for g in ref_grads)
    for g, rg in zip(got["grads"], ref_grads):
        assert torch.allclose(g, rg, rtol=1e-3, atol=5e-4 * gmax)  # see tests/test_dist.py
    for p, rp in zip(got["params"], model.parameters()):
        assert torch.allclose(p, rp.detach(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- failure, restart, MLflow


def _history(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_worker_killed_midrun_restarts_from_checkpoint_same_mlflow_run(local_ray, mlflow_server, tmp_path):
    from rcl_dist.train.launch import run_pretrain

    cfg = load_config(
        None,
        [
            *TINY,
            "train.steps=8",
            "dist.workers=2",
            "dist.checkpoint_every=3",
            "dist.max_failures=1",
            "data.engine=dali",
            "dist.run_name=fault",
            f"dist.storage_path={tmp_path / 'ray'}",
            "tracking.experiment=fault-test",
        ],
    )
    marker = tmp_path / "killed"
    result = run_pretrain(cfg, tracking_uri=mlflow_server, env={"RCL_DIST_FAULT": f"1:5:{marker}"})
    assert marker.exists(), "the fault hook did not fire"
    assert result.metrics["step"] == 8
    assert result.metrics["restarts"] == 1  # the restart is visible in the metrics

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("fault-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == result.mlflow_run_id  # no duplicate run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_count"] == "1"
    # continuous history: every step once, none lost before the checkpoint, none duplicated after
    assert _history(client, run.info.run_id, "loss") == list(range(1, 9))
    restarts = dict((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "restarts"))
    assert restarts[8] == 1.0 and restarts[1] == 0.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "fig2_emd_gap_density.png", "images", "system"} <= artifacts
    assert run.data.params["dist.workers"] == "2"


def test_resume_continues_the_same_run(local_ray, tmp_path):
    from rcl_dist.train.launch import run_pretrain

    base = [*TINY, "data.engine=torch", f"dist.storage_path={tmp_path / 'ray'}", "dist.run_name=r1", "dist.checkpoint_every=2"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = run_pretrain(load_config(None, [*base, "train.steps=4"]), tracking_uri=uri)
    assert first.metrics["step"] == 4
    # the network form is written down (pin_global_residual), in the run state and in the checkpoint
    from rcl_dist.models.io import load_checkpoint
    from rcl_dist.paths import read_run_state

    assert load_config(None, base).model.global_residual is None  # the given config leaves it to the rule
    assert read_run_state(tmp_path / "ray" / "r1")["config"]["model"]["global_residual"] is False  # rcl: direct
    assert load_checkpoint(first.checkpoint_path)[1].model.global_residual is False
    with pytest.raises(ConfigError, match="already exists"):
        run_pretrain(load_config(None, [*base, "train.steps=4"]), tracking_uri=uri)
    second = run_pretrain(load_config(None, [*base, "train.steps=6"]), resume=True)
    assert second.metrics["step"] == 6 and second.mlflow_run_id == first.mlflow_run_id
    client = MlflowClient(uri)
    assert _history(client, first.mlflow_run_id, "loss") == list(range(1, 7))
    with pytest.raises(ConfigError, match="no run"):
        run_pretrain(load_config(None, [*base[:-2], "dist.run_name=nope", "train.steps=2"]), resume=True)


def test_pretraining_is_reproducible_and_logging_does_not_change_it(local_ray, tmp_path):
    """2 workers, DALI input, the Eq. 5 encoder: two runs that differ only in train.log_every end with the
    same weights bit for bit: the run is reproducible, and a log step's diagnostics and noise probe
    draw nothing and leave no gradient behind."""
    from rcl_dist.models.io import load_checkpoint
    from rcl_dist.train.launch import run_pretrain

    base = [*[o for o in TINY if o not in ("loss.encoder=null", "train.log_every=1")], "dist.workers=2",
            f"dist.storage_path={tmp_path / 'ray'}", "dist.checkpoint_every=100", "train.steps=8"]  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    weights = []
    for name, every in (("a", 2), ("c", 3)):
        r = run_pretrain(load_config(None, [*base, f"train.log_every={every}", f"dist.run_name={name}"]), tracking_uri=uri)
        weights.append([p.detach() for p in load_checkpoint(r.checkpoint_path)[0].parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_two_workers_calibrate_one_alpha_and_resume_keeps_it(local_ray, tmp_path):
    """loss.alpha_ratio on 2 workers with the Eq. 5 term: alpha is set from the gradient ratio before
    step 1, recorded every log step, and a resumed run goes on from the checkpointed alpha (not from
    loss.alpha again)."""
    from rcl_dist.train.launch import run_pretrain

    base = [*[o for o in TINY if o not in ("loss.encoder=null", "loss.alpha=1")], "data.engine=torch", "dist.workers=2",
            f"dist.storage_path={tmp_path / 'ray'}", "dist.run_name=a1", "dist.checkpoint_every=2", "loss.alpha_ratio=0.1"]  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = run_pretrain(load_config(None, [*base, "train.steps=4"]), tracking_uri=uri)
    run_pretrain(load_config(None, [*base, "train.steps=6"]), resume=True)
    client = MlflowClient(uri)
    alpha = {m.step: m.value for m in client.get_metric_history(first.mlflow_run_id, "alpha")}
    ratio = {m.step: m.value for m in client.get_metric_history(first.mlflow_run_id, "grad_ratio")}
    assert sorted(alpha) == list(range(1, 7)) and sorted(ratio) == list(range(1, 7))
    assert alpha[1] != pytest.approx(1e-3, rel=0.01)  # calibrated before the first step
    assert 0.5 <= alpha[5] / alpha[4] <= 2.0 and alpha[5] != pytest.approx(1e-3, rel=0.01)  # resumed, not reset
    # the residual against the known simulated noise of a few manifest images, at every log step
    noise = {m.step: m.value for m in client.get_metric_history(first.mlflow_run_id, "noise_distance")}
    assert sorted(noise) == list(range(1, 7)) and all(math.isfinite(v) and v > 0 for v in noise.values())


# ---------------------------------------------------------------- pieces without Ray


def test_nonfinite_guard_skips_and_stops():
    guard = NonFiniteGuard(limit=3)
    assert guard.check(True, 1) is False
    assert guard.check(False, 2) is True and guard.check(False, 3) is True
    assert guard.check(True, 4) is False  # a finite loss resets the run of bad steps
    guard.check(False, 5)
    guard.check(False, 6)
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row at step 7"):
        guard.check(False, 7)
    assert guard.skipped == 5


@pytest.mark.parametrize(
    "override, message",
    [
        ("dist.negatives=all", r"dist\.negatives"),
        ("dist.workers=3", "divisible"),
        ("dist.negatives=global+queue", "queue_size"),
    ],
)
def test_bad_distributed_config_fails_before_any_worker(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, override])


def test_checkpoint_files_load_with_weights_only(tmp_path):
    """Checkpoints hold only tensors and plain containers: torch.load(weights_only=True) reads them."""
    state = {"model": {"w": torch.zeros(2)}, "step": 3, "config": {"a": {"b": 1}}, "dist_init": torch.empty(0)}
    torch.save(state, tmp_path / "state.pt")
    assert torch.load(Path(tmp_path / "state.pt"), weights_only=True)["step"] == 3


@pytest.mark.parametrize("method", ["rcl", "consistency", "n2n", "n2s", "nb2nb", "b2u", "supervised"])
def test_every_method_gets_the_batch_keys_its_objective_needs(method):
    """The pipeline task chosen for each pre-training method yields what the objective reads."""
    from rcl_dist.data.spec import TASK_KEYS
    from rcl_dist.losses.objectives import build_objective
    from rcl_dist.train.pretrain import METHOD_TASK

    consistency = torch.nn.Identity() if method == "consistency" else None
    objective = build_objective(method, consistency=consistency)
    assert set(objective.required_keys) <= set(TASK_KEYS[METHOD_TASK[method]])
