"""Typed config: defaults, YAML + overrides, and clear errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rcl_dist.config import Config, ConfigError, load_config


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.loss.alpha == 1e-3 and cfg.loss.distance == "emd" and cfg.loss.reduction == "sum"
    assert (cfg.train.lr, cfg.train.beta1, cfg.train.beta2, cfg.train.eps) == (1e-3, 0.9, 0.999, 1e-7)
    assert cfg.data.sigma_max == pytest.approx(20 / 255)


def test_yaml_and_overrides_roundtrip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  distance: bd\n  temperature: 0.5\ntrain:\n  steps: 7\n")
    cfg = load_config(f, ["train.steps=9", "loss.quantiles=null", "data.overlap=1"])
    assert cfg.loss.distance == "bd" and cfg.train.steps == 9 and cfg.loss.quantiles is None
    assert cfg.data.overlap == 1.0 and isinstance(cfg.data.overlap, float)
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.foo=1", r"loss\.foo"),
        ("optim.lr=1", "unknown config section"),
        ("loss.distance=kl", r"loss\.distance must be one of \['emd', 'bd', 'mmd'\]"),
        ("loss.temperature=0", r"loss\.temperature must be > 0"),
        ("train.steps=abc", r"train\.steps must be int"),
        ("train.steps=true", r"train\.steps must be int"),
        ("data.overlap=0", r"data\.overlap"),
        ("model.name=resnet", r"model\.name"),
        ("steps=3", "section.key=value"),
        ("train.lr=null", r"train\.lr may not be null"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_scientific_notation_and_warmup():
    cfg = load_config(None, ["train.lr=1e-3", "train.eps=2E-8", "loss.temperature=5e-2", "train.warmup=10"])
    assert (cfg.train.lr, cfg.train.eps, cfg.loss.temperature, cfg.train.warmup) == (1e-3, 2e-8, 5e-2, 10)
    with pytest.raises(ConfigError, match=r"train\.lr must be float"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"train\.warmup 200 must be smaller than train\.steps 200"):
        load_config(None, ["train.warmup=200", "train.steps=200"])


def test_checkpoints_written_before_global_residual_load_as_they_were(tmp_path):
    """model.global_residual (default auto) did not exist before: such checkpoints predicted the image directly."""
    import torch

    from rcl_dist.models.io import load_checkpoint, save_checkpoint
    from rcl_dist.models.factory import build_model_from_config

    cfg = load_config(None, ["model.width=4", "model.depth=1", "model.global_residual=false"])
    model = build_model_from_config(cfg)
    path = save_checkpoint(tmp_path / "old.pt", model, cfg)
    state = torch.load(path, weights_only=True)
    del state["config"]["model"]["global_residual"]  # as an older version wrote it: no digest beside it either
    torch.save(state, path)
    Path(str(path) + ".sha256").unlink()
    loaded, lcfg, _ = load_checkpoint(path)
    assert lcfg.model.global_residual is False and loaded.global_residual is False
    assert load_config().model.global_residual is None  # a new config: the auto rule


@pytest.mark.parametrize("method, skip", [("rcl", False), ("consistency", False), ("supervised", True), ("n2n", True), ("nb2nb", True),
                                          ("n2s", False), ("b2u", False)])
def test_auto_global_residual_follows_the_method_and_an_explicit_setting_wins(method, skip):
    from rcl_dist.config import global_residual_of
    from rcl_dist.models.factory import build_model_from_config

    small = ["model.width=4", "model.depth=1", f"loss.method={method}"]
    assert global_residual_of(load_config(None, small)) is skip
    assert build_model_from_config(load_config(None, small)).global_residual is skip
    for explicit in (True, False):
        cfg = load_config(None, [*small, f"model.global_residual={str(explicit).lower()}"])
        assert global_residual_of(cfg) is explicit and build_model_from_config(cfg).global_residual is explicit


def test_pinned_config_writes_the_form_down_and_a_resume_keeps_it(tmp_path):
    """pin_global_residual: null resolved by today's rule and stored, so a later rule change cannot rebuild
    the weights in the other form (both forms have the same parameters: nothing else would notice). A
    resume keeps a pinned form; a run stored before pinning (null) may have its form stated on resume."""
    import json

    from rcl_dist.config import config_layer, pin_global_residual
    from rcl_dist.paths import RUN_STATE
    from rcl_dist.train.launch import resume_config

    small = ["model.width=4", "model.depth=1", f"dist.storage_path={tmp_path}"]
    for method, form in (("n2s", False), ("n2n", True)):
        cfg = load_config(None, [*small, f"loss.method={method}"])
        assert cfg.model.global_residual is None and pin_global_residual(cfg).model.global_residual is form
        assert pin_global_residual(cfg).loss == cfg.loss and cfg.model.global_residual is None  # a copy
    explicit = load_config(None, [*small, "loss.method=n2s", "model.global_residual=true"])
    assert pin_global_residual(explicit) is explicit

    def stored_run(name: str, cfg) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / RUN_STATE).write_text(json.dumps({"config": cfg.to_dict()}))

    n2s = load_config(None, [*small, "loss.method=n2s"])
    stored_run("pinned", pin_global_residual(n2s))
    layer = lambda *o: config_layer(None, [f"dist.storage_path={tmp_path}", *o])  # noqa: E731
    assert resume_config(layer("dist.run_name=pinned"), log=lambda s: None).model.global_residual is False
    with pytest.raises(ConfigError, match="model.global_residual: run 'pinned' was trained with False"):
        resume_config(layer("dist.run_name=pinned", "model.global_residual=true"), log=lambda s: None)
    stored_run("legacy", n2s)  # written before runs pinned the form
    said = []
    cfg = resume_config(layer("dist.run_name=legacy", "model.global_residual=true"), log=said.append)
    assert cfg.model.global_residual is True and said == ["resume: model.global_residual null (auto) -> True"]
