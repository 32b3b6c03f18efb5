"""Issue 16, defects 3 and 4 (configuration): values that passed validation and then broke the run, and
a YAML "billion laughs" document as the value of a key, which was expanded into the error message."""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from rcl_dist.config import RANGES, Config, ConfigError, load_config, load_yaml_text, show_value
from rcl_dist.tune_space import load_space

from hostile_inputs import billion_laughs

REPO = Path(__file__).resolve().parents[2]

# (override, the key the error must name). Each passed validation before the fix (exit status 0 from
# `rcl-dist config`), except the two string forms, which were already refused.
PROBES = [
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("loss.alpha=.inf", "loss.alpha"),
    ("loss.alpha=.nan", "loss.alpha"),
    ("loss.temperature=.inf", "loss.temperature"),
    ("loss.temperature=1e-45", "loss.temperature"),  # float32 turns it into 0: ZeroDivisionError in the loss
    ("data.sigma_max=.inf", "data.sigma_max"),
    ("data.sigma_max=.nan", "data.sigma_max"),
    ("dist.cpus_per_worker=.inf", "dist.cpus_per_worker"),
    ("dist.cpus_per_worker=.nan", "dist.cpus_per_worker"),
    ("train.beta1=5", "train.beta1"),
    ("train.beta2=1", "train.beta2"),  # Adam's betas are in [0, 1)
    ("train.eps=-1", "train.eps"),
    ("train.eps=.nan", "train.eps"),
    ("train.grad_clip=.inf", "train.grad_clip"),
    ("model.depth=12", "model.depth"),  # a 23 GB U-Net: killed by the kernel
    ("model.width=100000000", "model.width"),
    ("model.width=1e8", "model.width"),
    ("train.steps=100000000000000000000", "train.steps"),
    ("train.steps=1e20", "train.steps"),
    ("train.seed=-1", "train.seed"),
    ("model.name=dncnn model.depth=1", "model.depth"),  # DnCNN needs its first layer and its head
]


@pytest.mark.parametrize("override, key", PROBES, ids=[p for p, _ in PROBES])
def test_value_that_broke_the_run_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}\b"):
        load_config(None, override.split())


def _numeric_fields() -> list[tuple[str, type]]:
    out = []
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.type if isinstance(section.type, type) else getattr(Config(), section.name).__class__)
        for name, hint in hints.items():
            options = typing.get_args(hint) or (hint,)
            numeric = [t for t in options if t in (int, float)]
            if numeric:
                out.append((f"{section.name}.{name}", numeric[0]))
    return out


NUMERIC = _numeric_fields()


def test_every_numeric_field_has_a_finite_range():
    assert len(NUMERIC) > 25 and {k for k, _ in NUMERIC} == set(RANGES)
    for key, _ in NUMERIC:
        lo, hi, _, _ = RANGES[key]
        assert math.isfinite(lo) and math.isfinite(hi) and lo < hi, key


@pytest.mark.parametrize("key, kind", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_every_numeric_field_refuses_out_of_range_and_non_finite(key, kind):
    lo, hi, _, _ = RANGES[key]
    bad = [hi * 2 + 1, lo - 1] if kind is int else [hi * 2 + 1, lo - 1, ".inf", "-.inf", ".nan"]
    for value in bad:
        text = str(int(value)) if kind is int and not isinstance(value, str) else str(value)
        with pytest.raises(ConfigError, match=key.replace(".", "[.]")):
            load_config(None, [f"{key}={text}"])


def test_defaults_and_shipped_configs_still_valid():
    Config.from_dict({}).validate()
    load_config(REPO / "tune_spaces" / "base" / "paper.yaml")


def test_scientific_notation_accepted_in_file_and_override(tmp_path):
    """YAML 1.1 reads `1e-3` (no dot) as a string: `train.lr=1e-3` must still be the float 0.001."""
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-3\n  eps: 2E-8\nloss:\n  alpha: 5e-4\n")
    cfg = load_config(tmp_path / "c.yaml", ["loss.temperature=5e-2"])
    assert (cfg.train.lr, cfg.train.eps, cfg.loss.alpha, cfg.loss.temperature) == (1e-3, 2e-8, 5e-4, 5e-2)
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3


# ----------------------------------------------------------------------------------------- YAML bombs


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`rcl-dist` in a child process with 2 GB of address space and a timeout: unfixed, the bomb ran
    until MemoryError (after 36 s for 9 levels), so a regression fails here instead of hanging."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "rcl_dist.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, preexec_fn=_capped)  # fmt: skip


def test_billion_laughs_as_train_steps_in_a_config_file(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"train:\n  steps: {billion_laughs(9)}\n")  # 9**9 = 387 M strings once expanded
    t0 = time.monotonic()
    r = _cli("config", "--config", str(path))
    assert r.returncode == 2 and time.monotonic() - t0 < 30
    assert "bomb.yaml: the YAML expands to more than 100000 values through its aliases" in r.stderr
    assert len(r.stderr) < 500


def test_billion_laughs_as_an_override():
    r = _cli("config", f"train.steps={billion_laughs(9)}")
    assert r.returncode == 2 and "override train.steps: the YAML expands to more than 100000 values" in r.stderr
    assert len(r.stderr) < 500


def test_billion_laughs_as_a_sweep_override():
    with pytest.raises(ConfigError, match="override loss.alpha: the YAML expands"):
        load_space(REPO / "tune_spaces" / "cpu-small.yaml", [f"loss.alpha={billion_laughs(9)}"])


def test_few_aliases_many_levels_counted_not_listed():
    """Two aliases a level for 40 levels: 80 aliases, 2**40 values. The count is of the expansion, not
    of the aliases, so this is refused too; a small shared value is fine."""
    with pytest.raises(ConfigError, match="expands to more than 100000"):
        load_yaml_text(billion_laughs(40, fan_out=2), "doc")
    assert load_yaml_text("a: &x [1, 2]\nb: *x\n", "doc") == {"a": [1, 2], "b": [1, 2]}


def test_recursive_alias_and_deep_nesting_refused():
    with pytest.raises(ConfigError, match="doc: a YAML alias refers to a value that contains it"):
        load_yaml_text("&a [*a]", "doc")
    with pytest.raises(ConfigError, match="doc: YAML nested too deeply"):
        load_yaml_text("[" * 5000 + "]" * 5000, "doc")


def test_bad_value_shown_cut_short():
    """A huge value that reaches an error message (here the bomb, loaded without the expansion check) is
    shown in at most 200 characters, in milliseconds."""
    bomb = yaml.safe_load(billion_laughs(9))
    t0 = time.monotonic()
    text = show_value(bomb)
    assert len(text) <= 200 and time.monotonic() - t0 < 0.1
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"train": {"steps": bomb}})
    assert str(e.value).startswith("train.steps must be int, got [[") and len(str(e.value)) < 300
