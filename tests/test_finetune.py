"""Fine-tuning with few labels (rcl_dist.train.finetune): proxy evaluation (Sec. 4) and full fine-tuning
(Sec. 5): the label set, the task layers, what is trained, and a 2-worker Ray run tracked in MLflow."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcl_dist.config import Config, ConfigError
from rcl_dist.models.io import load_checkpoint, save_checkpoint
from rcl_dist.train.finetune import finetune_local, head_kind, prepare_finetune_model
from rcl_dist.train.finetune_spec import FinetuneSpec
from rcl_dist.train.labels import build_label_set
from rcl_dist.models.factory import build_model_from_config

TINY_MODEL = {"name": "unet", "width": 4, "depth": 2}


# ----------------------------------------------------------------------------- data and checkpoints


def _smooth_rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth 8-bit RGB image (a bilinear upsampling of a coarse random grid): learnable to denoise."""
    coarse = torch.from_numpy(rng.uniform(0.15, 0.85, size=(1, 3, 5, 5)).astype(np.float32))
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0]
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _index(folder: Path, out: Path) -> str:
    from rcl_dist.data.index import index_images

    index_images([(str(folder), "train")], out, seed=0, log=lambda *_: None)
    return str(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Manifests of 4 RGB images (denoise/sr/jdensr/jdd) and of 2 *_real/*_mean pairs (real)."""
    root = tmp_path_factory.mktemp("ft_data")
    rng = np.random.default_rng(0)
    imgs = root / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.fromarray(_smooth_rgb(rng, 40, 48)).save(imgs / f"img{i}.png")
    real = root / "real"
    real.mkdir()
    for i in range(2):
        clean = _smooth_rgb(rng, 36, 40)
        noisy = np.clip(clean.astype(np.int16) + rng.integers(-12, 13, clean.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(real / f"p{i}_real.png")
        Image.fromarray(clean).save(real / f"p{i}_mean.png")
    return {"rgb": _index(imgs, root / "rgb.parquet"), "real": _index(real, root / "real.parquet")}


def _pretrained(folder: Path, **model) -> str:
    """A 'pre-training' checkpoint: a seeded tiny U-Net saved the way pre-training saves it."""
    cfg = Config.from_dict({"model": {**TINY_MODEL, **model}})
    torch.manual_seed(123)
    save_checkpoint(folder, build_model_from_config(cfg), cfg, step=10)
    return str(folder)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_ckpt")
    return {
        "rgb": _pretrained(root / "rgb"),
        "packed": _pretrained(root / "packed", raw="packed"),
        "mosaic": _pretrained(root / "mosaic", raw="mosaic"),
    }


def _spec(source: str, manifest: str, **kw) -> FinetuneSpec:
    base = dict(task="denoise", mode="proxy", labels=4, steps=3, batch_size=4, crop=16, seed=1, log_every=1)
    return FinetuneSpec(source=source, manifest=manifest, **{**base, **kw})


def _body(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.body.state_dict().items()}


# ----------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"labels": 0}, "labels"),
        ({"task": "deblur"}, "task"),
        ({"mode": "linear"}, "mode"),
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"crop": 4}, "crop"),
        ({"task": "sr", "crop": 17}, "crop"),
        ({"labels": 5, "workers": 2}, "labels 5 must be divisible by workers"),
        ({"batch_size": 3, "workers": 2, "labels": 4}, "batch_size"),
        ({"head": "keep"}, "head 'keep'"),
        ({"source": "none"}, "config"),
        ({"manifest": ""}, "manifest"),
        ({"split": "all"}, "split"),
        ({"fit": "sgd"}, "fit must be one of"),
        ({"ridge": 0.0}, "ridge"),
        ({"probe_tol": float("nan")}, "probe_tol"),
        ({"probe_max_iters": 0}, "probe_max_iters"),
        ({"schedule": "step"}, "schedule"),
        ({"warmup": 5, "steps": 5}, "warmup 5 must be smaller than steps 5"),
        ({"probe_first": True}, "probe_first applies to mode 'full'"),
        ({"probe_first": True, "mode": "full", "fit": "adam"}, "fits the last layer in closed form: use fit"),
        ({"probe_first": 1, "mode": "full"}, "probe_first must be true or false"),
        ({"augment": "flips"}, "augment must be one of"),
        ({"augment": "dihedral", "task": "jdd", "crop": 16}, "does not apply to task 'jdd'"),
        ({"grad_clip": 0.0}, "grad_clip must be a finite number > 0 or null"),
        ({"grad_clip": float("inf")}, "grad_clip"),
        ({"grad_clip": True}, "grad_clip"),
        ({"sr_skip": "bilinear"}, "sr_skip must be one of"),
    ],
)
def test_spec_errors_name_the_field(kw, field):
    args = {"source": "ckpt", "manifest": "m.parquet", **kw}
    with pytest.raises(ConfigError, match=field):
        FinetuneSpec(**args)


def test_spec_round_trips_and_accepts_a_config():
    spec = FinetuneSpec(source="none", manifest="m.parquet", config=Config.from_dict({"model": TINY_MODEL}), workers=2, labels=4)
    assert isinstance(spec.config, dict) and spec.config["model"]["width"] == 4
    assert FinetuneSpec.from_dict(spec.to_dict()) == spec
    assert spec.per_worker_batch == 2 and spec.effective_batch_size == 4  # at most the labels
    with pytest.raises(ConfigError, match="unknown fine-tuning field"):
        FinetuneSpec.from_dict({**spec.to_dict(), "epochs": 3})


# ----------------------------------------------------------------------------- the label set


def test_label_set_is_exactly_n_deterministic_nested_and_method_independent(data, ckpts):
    n = 10  # > 4 images: cycles over the images at new positions
    spec = _spec(ckpts["rgb"], data["rgb"], labels=n)
    a = build_label_set(spec, None, False)
    b = build_label_set(spec, None, False)
    assert len(a) == n and a.input.shape == (n, 3, 16, 16) and a.target.shape == (n, 3, 16, 16)
    assert torch.equal(a.input, b.input) and torch.equal(a.target, b.target)
    assert torch.equal(a.index, torch.arange(n))
    # every label is a distinct crop, also those that reuse an image
    flat = a.target.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == n

    # another method / mode / source / optimiser: the same labels
    other = _spec("none", data["rgb"], labels=n, mode="full", config={"model": TINY_MODEL}, steps=50, lr=1e-4, batch_size=8)
    c = build_label_set(other, None, False)
    assert torch.equal(a.input, c.input) and torch.equal(a.target, c.target)

    # nested: the labels of a smaller N are the first of a larger N
    small = build_label_set(_spec(ckpts["rgb"], data["rgb"], labels=6), None, False)
    assert torch.equal(small.input, a.input[:6]) and torch.equal(small.target, a.target[:6])

    # sharded: rank r of w holds labels r::w, and the shards make up the set (any worker count)
    for world in (2, 5):
        sharded = _spec(ckpts["rgb"], data["rgb"], labels=n, workers=world, batch_size=world)
        for r in range(world):
            s = build_label_set(sharded, None, False, rank=r, world=world)
            assert len(s) == n // world
            assert torch.equal(s.index, torch.arange(r, n, world))
            assert torch.equal(s.input, a.input[r::world]) and torch.equal(s.target, a.target[r::world])

    # another seed: another label set
    d = build_label_set(_spec(ckpts["rgb"], data["rgb"], labels=n, seed=2), None, False)
    assert not torch.equal(a.target, d.target)


# ----------------------------------------------------------------------------- task layers


@pytest.mark.parametrize(
    "task, source, manifest, kind, in_shape, out_shape",
    [
        ("denoise", "rgb", "rgb", "rgb", (3, 16, 16), (3, 16, 16)),
        ("sr", "rgb", "rgb", "sr2", (3, 8, 8), (3, 16, 16)),
        ("jdensr", "rgb", "rgb", "sr2", (3, 8, 8), (3, 16, 16)),
        ("jdd", "packed", "rgb", "raw2rgb", (4, 8, 8), (3, 16, 16)),
        ("jdd", "mosaic", "rgb", "rgb", (1, 16, 16), (3, 16, 16)),
        ("real", "rgb", "real", "rgb", (3, 16, 16), (3, 16, 16)),
    ],
)
def test_each_task_gets_its_head_and_output_shape(data, ckpts, task, source, manifest, kind, in_shape, out_shape):
    spec = _spec(ckpts[source], data[manifest], task=task, labels=2, batch_size=2)
    model, cfg, head, params = prepare_finetune_model(spec)
    assert head_kind(model.head) == kind == head["kind"] and head["fresh"]
    assert {id(p) for p in params} == {id(p) for p in model.head.parameters()}  # proxy: only the head trains
    labels = build_label_set(spec, model.raw, False)
    assert labels.input.shape[1:] == in_shape and labels.target.shape[1:] == out_shape
    with torch.no_grad():
        assert model.restore(labels.input).shape == labels.target.shape


def test_raw_and_rgb_models_refuse_the_other_tasks(data, ckpts):
    with pytest.raises(ValueError, match="task 'jdd'.*needs a RAW model"):
        prepare_finetune_model(_spec(ckpts["rgb"], data["rgb"], task="jdd"))
    with pytest.raises(ValueError, match="RAW input.*use task 'jdd'"):
        prepare_finetune_model(_spec(ckpts["packed"], data["rgb"], task="denoise"))
    with pytest.raises(ValueError, match="head 'keep'"):
        prepare_finetune_model(_spec(ckpts["rgb"], data["rgb"], task="sr", mode="full", head="keep"))
    with pytest.raises(ConfigError, match="differs from the checkpoint"):
        prepare_finetune_model(_spec(ckpts["rgb"], data["rgb"], config={"model": {**TINY_MODEL, "width": 8}}))


def test_which_head_is_kept_and_which_is_fresh(data, ckpts):
    pre, _, _ = load_checkpoint(ckpts["rgb"])
    pre_head = pre.head.conv.weight.detach()
    # full denoise: the whole pre-trained network, last layer included
    full, _, head, params = prepare_finetune_model(_spec(ckpts["rgb"], data["rgb"], mode="full"))
    assert not head["fresh"] and torch.equal(full.head.conv.weight, pre_head)
    assert len(params) == len(list(full.parameters())) and all(p.requires_grad for p in full.parameters())
    # full + head 'new', and proxy: a fresh layer, the same for every source at one seed
    new, _, head, _ = prepare_finetune_model(_spec(ckpts["rgb"], data["rgb"], mode="full", head="new"))
    proxy, _, _, _ = prepare_finetune_model(_spec(ckpts["rgb"], data["rgb"]))
    scratch, _, _, _ = prepare_finetune_model(_spec("none", data["rgb"], config={"model": TINY_MODEL}))
    assert head["fresh"] and not torch.equal(new.head.conv.weight, pre_head)
    assert torch.equal(new.head.conv.weight, proxy.head.conv.weight)
    assert torch.equal(proxy.head.conv.weight, scratch.head.conv.weight)
    # full sr: another output shape, so a fresh sr2 layer
    sr, _, head, _ = prepare_finetune_model(_spec(ckpts["rgb"], data["rgb"], task="sr", mode="full"))
    assert head["fresh"] and head_kind(sr.head) == "sr2"
    # full jdd on a packed-RAW model: pre-training already outputs full-res RGB, kept
    _, _, head, _ = prepare_finetune_model(_spec(ckpts["packed"], data["rgb"], task="jdd", mode="full"))
    assert not head["fresh"] and head["kind"] == "raw2rgb"


# ----------------------------------------------------------------------------- what training changes


def test_proxy_changes_only_the_head_full_changes_the_body(data, ckpts, tmp_path):
    pre, _, _ = load_checkpoint(ckpts["rgb"])
    body0 = _body(pre)
    spec = _spec(ckpts["rgb"], data["rgb"], out=str(tmp_path / "proxy"))
    before, _, _, _ = prepare_finetune_model(spec)
    head0 = {k: v.clone() for k, v in before.head.state_dict().items()}
    model, metrics, history = finetune_local(spec)
    assert len(history) == 1 and history[0]["step"] == metrics["probe_iterations"]  # one fit, its trace
    assert metrics["label_l1"] <= metrics["probe_lstsq_l1"] < metrics["label_l1_initial"]
    for k, v in _body(model).items():
        assert torch.equal(v, body0[k]), f"proxy mode changed body weight {k}"
    assert any(not torch.equal(v, head0[k]) for k, v in model.head.state_dict().items())
    loaded, _, state = load_checkpoint(tmp_path / "proxy")  # the fresh head is rebuilt before loading
    assert state["task"] == "denoise" and state["mode"] == "proxy" and state["labels"] == 4
    assert state["fit"] == "lstsq+l1" and state["probe"]["label_l1"] == pytest.approx(metrics["label_l1"])
    assert torch.equal(loaded.head.conv.weight, model.head.conv.weight)

    full, _, _ = finetune_local(_spec(ckpts["rgb"], data["rgb"], mode="full"))
    changed = [k for k, v in _body(full).items() if v.dtype.is_floating_point and not torch.equal(v, body0[k])]
    assert len(changed) > len(body0) // 2


@pytest.mark.parametrize("fit", ["lstsq", "adam"])
def test_proxy_fits_by_name(data, ckpts, fit):
    """The other fits: the closed form alone (converged, no iterations) and the old Adam steps."""
    _, metrics, _ = finetune_local(_spec(ckpts["rgb"], data["rgb"], fit=fit))
    if fit == "lstsq":
        assert metrics["probe_iterations"] == 0 and metrics["probe_converged"] == 1.0
        assert metrics["label_l1"] == metrics["probe_lstsq_l1"] < metrics["label_l1_initial"]
    else:
        assert "probe_lstsq_l1" not in metrics and metrics["probe_iterations"] == 3  # the spec's steps


def test_probe_first_starts_adam_from_the_probes_head_then_trains_every_layer(data, ckpts, tmp_path):
    """LP-FT: full mode's first label L1 is the proxy fit's (not the pre-trained head's), and the body moves."""
    pre, _, _ = load_checkpoint(ckpts["rgb"])
    body0 = _body(pre)
    _, proxy, _ = finetune_local(_spec(ckpts["rgb"], data["rgb"]))
    _, kept, _ = finetune_local(_spec(ckpts["rgb"], data["rgb"], mode="full", steps=1, lr=1e-12))
    model, metrics, _ = finetune_local(_spec(ckpts["rgb"], data["rgb"], mode="full", probe_first=True, out=str(tmp_path / "lpft")))
    # the same seeded labels: Adam starts where the probe ended, below where the kept head starts
    assert metrics["label_l1_initial"] == pytest.approx(proxy["label_l1"], rel=1e-5)
    assert metrics["label_l1_initial"] < kept["label_l1_initial"]
    changed = [k for k, v in _body(model).items() if v.dtype.is_floating_point and not torch.equal(v, body0[k])]
    assert len(changed) > len(body0) // 2  # then every layer trains
    _, _, state = load_checkpoint(tmp_path / "lpft")
    assert state["probe_first"] is True and state["mode"] == "full" and state["probe"]["label_l1"] == pytest.approx(proxy["label_l1"], rel=1e-5)


def test_training_reduces_the_l1_loss_on_the_labels(data):
    spec = _spec("none", data["rgb"], mode="full", config={"model": TINY_MODEL}, labels=8, batch_size=8, steps=40, log_every=10, lr=3e-3)
    _, metrics, history = finetune_local(spec)
    assert metrics["label_l1"] < 0.6 * metrics["label_l1_initial"], metrics
    assert history[-1]["loss"] < history[0]["loss"]


def test_augmented_pairs_stay_pairs_and_cover_every_symmetry():
    """augment_pairs: the same rotation / transpose / channel permutation on input and target, each of
    the 8 x 6 symmetries drawn, reproducible from the generator; SR's two sizes move together."""
    from rcl_dist.train.labels import augment_pairs

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 6, 6, generator=g)
    y = torch.nn.functional.interpolate(x, scale_factor=2)  # a "target" at twice the side (SR)
    xa, ya = augment_pairs(x, y, "dihedral+channels", torch.Generator().manual_seed(1))
    assert torch.equal(torch.nn.functional.interpolate(xa, scale_factor=2), ya)
    xb, _ = augment_pairs(x, y, "dihedral+channels", torch.Generator().manual_seed(1))
    assert torch.equal(xa, xb)
    seen = set()
    for i in range(64):
        for k in range(4):
            for t in (False, True):
                for perm in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]):
                    z = x[i].transpose(-1, -2) if t else x[i]
                    if torch.equal(torch.rot90(z, k, (-2, -1))[perm], xa[i]):
                        seen.add((k, t, tuple(perm)))
    assert len({(k, t) for k, t, _ in seen}) >= 7 and len({p for *_, p in seen}) == 6
    xd, _ = augment_pairs(x, y, "dihedral", torch.Generator().manual_seed(1))
    assert torch.allclose(xd.sum((2, 3)), x.sum((2, 3)))  # no channel moved
    assert augment_pairs(x, y, "none", g) == (x, y)
    with pytest.raises(ValueError, match="square"):
        augment_pairs(torch.rand(2, 3, 4, 6), torch.rand(2, 3, 4, 6), "dihedral", g)


def test_auto_augmentation_follows_the_task():
    from rcl_dist.train.labels import augmentation

    rgb = FinetuneSpec(source="ckpt", manifest="m.parquet")
    assert augmentation(rgb, 3) == "dihedral+channels" and augmentation(rgb, 1) == "dihedral"
    assert augmentation(FinetuneSpec(source="ckpt", manifest="m.parquet", task="jdd", crop=16), 0) == "none"
    assert augmentation(FinetuneSpec(source="ckpt", manifest="m.parquet", augment="dihedral+channels"), 1) == "dihedral"
    assert augmentation(FinetuneSpec(source="ckpt", manifest="m.parquet", augment="none"), 3) == "none"


# ----------------------------------------------------------------------------- Ray Train + MLflow

ray = pytest.importorskip("ray")


def test_mismatch_fails_before_any_worker(data, ckpts, tmp_path):
    from rcl_dist.train.finetune_ray import run_finetune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match="needs a RAW model"):
        run_finetune(_spec(ckpts["rgb"], data["rgb"], task="jdd", tracking_uri=uri), log=lambda *_: None)
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run for a job that cannot start


def test_two_ray_workers_finetune_writes_a_loadable_checkpoint_and_tracks_in_mlflow(local_ray, data, ckpts, tmp_path):
    from mlflow import MlflowClient

    from rcl_dist.train.finetune_ray import run_finetune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _spec(
        ckpts["rgb"], data["rgb"], task="sr", workers=2, labels=4, batch_size=4, steps=4, log_every=2,
        tracking_uri=uri, experiment="ft-test", run_name="ft-sr", storage_path=str(tmp_path / "ray"),
        out=str(tmp_path / "out"),
    )  # fmt: skip
    result = run_finetune(spec, log=lambda *_: None)
    assert result.metrics["step"] == result.metrics["probe_iterations"] and np.isfinite(result.metrics["loss"])
    assert result.metrics["label_l1"] <= result.metrics["probe_lstsq_l1"]
    assert result.checkpoint_path == str(tmp_path / "out" / "state.pt") and Path(result.checkpoint_path).is_file()

    model, cfg, state = load_checkpoint(result.checkpoint_path)
    assert state["task"] == "sr" and state["mode"] == "proxy"
    assert state["head"] == {"kind": "sr2", "out_channels": 3, "skip": "bicubic"} and model.head.skip == "bicubic"
    with torch.no_grad():
        assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)
    pre, _, _ = load_checkpoint(ckpts["rgb"])
    for k, v in _body(pre).items():  # proxy through DDP: the frozen body is untouched
        assert torch.equal(model.body.state_dict()[k], v), k
    ray_model, _, _ = load_checkpoint(result.ray_checkpoint_path)
    assert torch.equal(ray_model.head.conv.weight, model.head.conv.weight)
    # two ranks holding half the labels each fit the head one process fits on all of them
    one, one_metrics, _ = finetune_local(dataclasses.replace(spec, workers=1, tracking=False, out=None, run_name=None))
    torch.testing.assert_close(model.head.conv.weight, one.head.conv.weight, atol=5e-4, rtol=0)  # IRLS: sums in another order
    assert result.metrics["label_l1"] == pytest.approx(one_metrics["label_l1"], rel=1e-4)

    client = MlflowClient(uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "ft-sr"
    assert run.data.tags["pretrain_checkpoint"] == ckpts["rgb"]
    assert run.data.tags["checkpoint"] == result.checkpoint_path
    assert run.data.params["labels"] == "4" and run.data.params["task"] == "sr" and run.data.params["workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [int(result.metrics["step"])]
    assert len(client.get_metric_history(run.info.run_id, "probe_l1")) == len(state["probe"]["history"])
    assert run.data.metrics["label_l1"] == pytest.approx(result.metrics["label_l1"])
    assert "checkpoint" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_cli_local_pretrain_save_is_a_checkpoint_finetune_accepts(data, tmp_path, capsys):
    """`rcl-dist pretrain --local --save x.pt` writes the one checkpoint format (it wrote a bare
    state_dict that `finetune --from x.pt` rejected), and prints the RCL diagnostics it recorded."""
    from rcl_dist.cli import main

    out = tmp_path / "x.pt"
    argv = ["pretrain", "--local", "--save", str(out), "model.width=8", "model.depth=2", "data.crop=32", "data.tile=64",
            "train.batch_size=4", "train.steps=2", "train.log_every=1"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "uniform guess" in printed and "grad L_contrast" in printed
    saved, _, _ = load_checkpoint(out)
    model, _, _ = finetune_local(_spec(str(out), data["rgb"]))
    before, after = _body(saved), _body(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # the proxy kept that body


def test_cli_full_fine_tuning_probes_first_when_asked():
    from rcl_dist.cli import _parser

    base = ["finetune", "--from", "x", "--task", "denoise", "--mode", "full"]
    assert _parser().parse_args(base).probe_first is False
    assert _parser().parse_args([*base, "--probe-first"]).probe_first is True


def test_cli_full_fine_tuning_warmup_reaches_the_spec(monkeypatch, tmp_path, capsys):
    """`finetune --warmup N` is the spec's warm-up (the README's real-noise command uses the harness's
    recipe: LP-FT, lr 2e-4, cosine, 50 warm-up steps); a warm-up as long as the run is refused by name."""
    import rcl_dist.cli as cli
    import rcl_dist.train.finetune_ray as finetune_ray

    seen = {}

    def capture(spec):  # the spec the command built, before any work; the engine is tested elsewhere
        seen["spec"] = spec
        raise SystemExit(0)

    monkeypatch.setattr(finetune_ray, "run_finetune", capture)
    (tmp_path / "m.parquet").write_bytes(b"")
    base = ["finetune", "--from", "none", "--manifest", str(tmp_path / "m.parquet"), "--task", "denoise", "--mode", "full",
            "--steps", "100", "--schedule", "cosine"]  # fmt: skip
    with pytest.raises(SystemExit):
        cli.main([*base, "--warmup", "50"])
    assert seen["spec"].warmup == 50 and seen["spec"].schedule == "cosine"
    seen.clear()
    assert cli.main([*base, "--warmup", "100"]) != 0
    assert "warmup 100 must be smaller than steps 100" in capsys.readouterr().err and not seen


def test_full_fine_tuning_clips_the_gradient_norm_before_each_adam_step(data, monkeypatch):
    """grad_clip: the gradient Adam steps with has a global norm of at most the clip (the spikes that
    made SL from scratch end at its input are cut), the report says how large it was and how often it
    was cut; grad_clip=None leaves the gradient as it is (and reports nothing of it)."""
    seen: list[float] = []
    step = torch.optim.Adam.step

    def recording(self, *a, **k):
        grads = [q.grad for g in self.param_groups for q in g["params"] if q.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([gr.norm() for gr in grads]))))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", recording)
    base = dict(mode="full", config={"model": TINY_MODEL}, labels=8, batch_size=8, steps=6, log_every=3, lr=3e-3)
    _, _, free = finetune_local(_spec("none", data["rgb"], grad_clip=None, **base))
    unclipped, seen[:] = list(seen), []
    assert "grad_norm_max" not in free[-1]
    clip = 0.5 * min(unclipped)  # every step's gradient is larger: every step is cut
    _, _, history = finetune_local(_spec("none", data["rgb"], grad_clip=clip, **base))
    assert len(seen) == 6 and max(seen) <= clip * (1 + 1e-5), (seen, clip)
    assert [h["grad_clipped"] for h in history] == [3.0, 3.0]
    assert all(h["grad_norm_max"] > clip for h in history)  # the norm before the cut
    assert FinetuneSpec(source="x", manifest="m").grad_clip == 1.0  # the product's default


def test_cli_grad_clip_reaches_the_spec_and_none_turns_it_off():
    from rcl_dist.cli import _parser

    base = ["finetune", "--from", "x", "--task", "denoise", "--mode", "full"]
    assert _parser().parse_args(base).grad_clip == 1.0
    assert _parser().parse_args([*base, "--grad-clip", "0.25"]).grad_clip == 0.25
    assert _parser().parse_args([*base, "--grad-clip", "none"]).grad_clip is None
    with pytest.raises(SystemExit):
        _parser().parse_args([*base, "--grad-clip", "-1"])


def test_sr_heads_add_bicubic_by_default_and_checkpoints_keep_the_choice(data, ckpts, tmp_path):
    """sr_skip "bicubic" (the default): the fresh SR layer starts at zero, so before any fitting the model
    is the bicubic baseline; the choice is written to the checkpoint and rebuilt on load. A checkpoint
    written before the option (head record without "skip") loads as "none", the form it was trained in."""
    from rcl_dist.models.base import bicubic_up
    from rcl_dist.models.io import head_label, save_checkpoint

    spec = _spec(ckpts["rgb"], data["rgb"], task="sr", labels=2, batch_size=2)
    assert spec.sr_skip == "bicubic"
    model, cfg, head, _ = prepare_finetune_model(spec)
    assert head["skip"] == "bicubic" and model.head.skip == "bicubic"
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.restore(x), bicubic_up(x, (16, 16)), atol=0, rtol=0)
    plain, _, head_none, _ = prepare_finetune_model(_spec(ckpts["rgb"], data["rgb"], task="sr", sr_skip="none"))
    assert head_none["skip"] == "none" and not torch.equal(plain.restore(x), bicubic_up(x, (16, 16)))
    # the denoising head has no skip to record
    _, _, den, _ = prepare_finetune_model(_spec(ckpts["rgb"], data["rgb"]))
    assert "skip" not in den
    rec = {"kind": "sr2", "out_channels": 3, "skip": "bicubic"}
    save_checkpoint(tmp_path / "new", model, cfg, head=rec)
    back, _, state = load_checkpoint(tmp_path / "new")
    assert back.head.skip == "bicubic" and head_label(state["head"]) == "sr2/3+bicubic"
    with torch.no_grad():
        torch.testing.assert_close(back.restore(x), model.restore(x))
    save_checkpoint(tmp_path / "old", plain, cfg, head={"kind": "sr2", "out_channels": 3})  # before the option
    old, _, state = load_checkpoint(tmp_path / "old")
    assert old.head.skip == "none" and head_label(state["head"]) == "sr2/3"
    with torch.no_grad():
        torch.testing.assert_close(old.restore(x), plain.restore(x))


def test_cli_sr_skip_reaches_the_spec():
    from rcl_dist.cli import _parser

    base = ["finetune", "--from", "x", "--task", "sr"]
    assert _parser().parse_args(base).sr_skip == "bicubic"
    assert _parser().parse_args([*base, "--sr-skip", "none"]).sr_skip == "none"
    with pytest.raises(SystemExit):
        _parser().parse_args([*base, "--sr-skip", "nearest"])
