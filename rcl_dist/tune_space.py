"""A sweep's search space: reading and checking a space file (``tune_spaces/*.yaml``) before anything runs.

:func:`load_space` gives a :class:`SweepSpace`: the base pre-training config (``config`` file <-
``fixed`` <- command-line overrides), the searched keys as :class:`Param` distributions, the
initial points, trial counts, scheduler, search algorithm, resources and the proxy objective. Every
error is a ``ConfigError`` naming the file and the key, and every searched value is checked against
the config's own validation. The keys of a space file: ``docs/sweeps.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcl_dist.config import Config, ConfigError, load_yaml_text, read_yaml_mapping

__all__ = ["SweepSpace", "Param", "load_space", "get_key", "set_key"]

SPACE_KEYS = {
    "name", "config", "fixed", "search", "include_default", "points", "trials", "concurrency", "scheduler",
    "search_alg", "resources", "objective", "experiment",
}  # fmt: skip
SCHEDULER_KEYS = {"asha": {"type", "grace_period", "reduction_factor"}, "fifo": {"type"}}
SEARCH_ALG_KEYS = {"optuna": {"type", "seed"}, "random": {"type", "seed"}}
RESOURCE_KEYS = {"workers", "cpus_per_worker", "use_gpu", "driver_cpus"}
OBJECTIVE_EXTRA = {"metric", "rounds", "steps_per_round"}
METRICS = ("val_psnr", "val_ssim")
DISTRIBUTIONS = ("choice", "loguniform", "uniform")


@dataclass(frozen=True)
class Param:
    """One searched config key: ``kind`` "choice" (``values``) or "loguniform"/"uniform" (``low``, ``high``)."""

    key: str
    kind: str
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0

    def domain(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.uniform(self.low, self.high)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclass
class SweepSpace:
    name: str
    source: str  # the space file (for messages)
    base: dict[str, Any]  # the base config dict (config file <- fixed <- command-line overrides)
    params: list[Param]
    include_default: bool = True
    points: list[dict[str, Any]] = field(default_factory=list)
    trials: int = 16
    concurrency: int = 1
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha", "grace_period": 1, "reduction_factor": 2})
    search_alg: dict[str, Any] = field(default_factory=lambda: {"type": "random", "seed": 0})
    resources: dict[str, Any] = field(default_factory=dict)
    objective: dict[str, Any] = field(default_factory=dict)  # ProxyObjective fields (manifest filled in later)
    metric: str = "val_psnr"
    rounds: int = 4
    steps_per_round: int = 100
    experiment: str = "rcl-sweep"

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    def default_point(self) -> dict[str, Any]:
        return {p.key: get_key(self.base, p.key) for p in self.params}  # base: a complete, validated config dict

    def initial_points(self) -> list[dict[str, Any]]:
        """Configurations evaluated before the search algorithm's own: the default, then ``points``."""
        out: list[dict[str, Any]] = []
        for p in ([self.default_point()] if self.include_default else []) + [dict(p) for p in self.points]:
            if p not in out:
                out.append(p)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["params"] = [dataclasses.asdict(p) for p in self.params]
        return d


def get_key(d: dict[str, Any], key: str) -> Any:
    """``d[section][name]`` of a config dict, for ``key`` = ``section.name``."""
    section, name = key.split(".")
    return d[section][name]


def set_key(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``d[section][name]`` of a config dict (creating the section), for ``key`` = ``section.name``."""
    section, name = key.split(".")
    d.setdefault(section, {})[name] = value


def _config_keys() -> set[str]:
    return {f"{s}.{k}" for s, sec in Config().to_dict().items() for k in sec}


def _fail(source: str, key: str, what: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {what}")


def _positive_int(source: str, key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(source, key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _check_value(source: str, base: dict[str, Any], key: str, value: Any, where: str) -> None:
    """``value`` for config ``key`` passes the config's own validation (on top of ``base``)."""
    trial = copy.deepcopy(base)
    set_key(trial, key, value)
    try:
        Config.from_dict(trial)
    except ConfigError as e:
        raise _fail(source, where, f"value {value!r} is not valid for {key} ({e})") from None


def _parse_param(source: str, key: str, spec: Any, base: dict[str, Any], known: set[str]) -> Param:
    where = f"search.{key}"
    if key not in known:
        raise _fail(source, where, "unknown config key; searchable keys are section.key of `rcl-dist config` (e.g. loss.alpha)")
    if key in ("data.manifest", "dist.run_name", "dist.storage_path", "train.steps", "train.log_every",
               "dist.checkpoint_every", "tracking.uri", "tracking.experiment", "tracking.enabled", "model.raw"):  # fmt: skip
        raise _fail(source, where, "is set by the sweep itself and cannot be searched")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(source, where, f"must be one of {{choice: [...]}}, {{loguniform: [low, high]}}, {{uniform: [low, high]}}; got {spec!r}")
    (kind, arg), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise _fail(source, where, f"unknown distribution {kind!r}; allowed: {list(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise _fail(source, where, f"choice needs a non-empty list of values, got {arg!r}")
        if len({json.dumps(v, sort_keys=True) for v in arg}) != len(arg):
            raise _fail(source, where, f"choice has repeated values: {arg!r}")
        for v in arg:
            _check_value(source, base, key, v, where)
        return Param(key, kind, values=tuple(arg))
    if (not isinstance(arg, list) or len(arg) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)):  # fmt: skip
        raise _fail(source, where, f"{kind} needs [low, high] numbers, got {arg!r}")
    low, high = float(arg[0]), float(arg[1])
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise _fail(source, where, f"{kind} needs finite low < high, got [{arg[0]}, {arg[1]}]")
    if kind == "loguniform" and low <= 0:
        raise _fail(source, where, f"loguniform needs low > 0, got {arg[0]}")
    default = get_key(Config().to_dict(), key)
    if isinstance(default, int) and not isinstance(default, bool):
        raise _fail(source, where, f"{key} takes integers: use choice, not {kind}")
    for v in (low, high):
        _check_value(source, base, key, v, where)
    return Param(key, kind, low=low, high=high)


def _check_section(source: str, name: str, value: Any, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(source, name, f"must be a mapping, got {value!r}")
    unknown = set(value) - allowed
    if unknown:
        raise _fail(source, name, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return dict(value)


def _apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """``key=value`` on the command line: top-level space keys (``trials=4``, ``objective.rounds=2``) or
    config keys (``loss.alpha=0.01``, added to ``fixed``)."""
    sections = set(Config().to_dict())
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. trials=4 or loss.alpha=0.01)")
        value = load_yaml_text(text, f"override {key}") if text.strip() else None
        parts = key.split(".")
        if parts[0] in sections:
            if len(parts) != 2:
                raise ConfigError(f"override {item!r}: a config key is section.key (e.g. loss.alpha)")
            raw.setdefault("fixed", {})
            if not isinstance(raw["fixed"], dict):
                raise _fail(source, "fixed", "must be a mapping")
            raw["fixed"][key] = value
        elif parts[0] in SPACE_KEYS:
            node = raw
            for p in parts[:-1]:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {item!r}: {p} is not a mapping in {source}")
            node[parts[-1]] = value
        else:
            raise ConfigError(
                f"override {item!r}: unknown key {parts[0]!r}; space keys: {sorted(SPACE_KEYS)}, config sections: {sorted(sections)}"
            )
    return raw


def _read_space(path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The file's mapping with the overrides applied; refuses unknown top-level keys and a bad or missing name."""
    source = str(path)
    raw = read_yaml_mapping(path, "search space file", f"a search space must be a mapping (keys: {sorted(SPACE_KEYS)})")
    raw = _apply_overrides(raw, overrides, source)
    unknown = set(raw) - SPACE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SPACE_KEYS)}")
    for key in ("name", "search"):
        if key not in raw:
            raise _fail(source, key, "is required")
    name = raw["name"]
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise _fail(source, "name", f"must be a non-empty folder-safe string, got {name!r}")
    return raw


def _base_config(path: Path, raw: dict[str, Any], known: set[str]) -> Config:
    """The base config every trial starts from: the config file (relative to the space file) <- fixed."""
    source = str(path)
    base: dict[str, Any] = {}
    if raw.get("config") is not None:
        cfg_path = Path(raw["config"])
        if not cfg_path.is_absolute():
            cfg_path = path.parent / cfg_path
        try:
            base = read_yaml_mapping(cfg_path, "config file", "a config file must be a mapping of sections")
        except ConfigError as e:
            raise _fail(source, "config", str(e)) from None
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _fail(source, "fixed", f"must be a mapping of section.key: value, got {fixed!r}")
    for key, value in fixed.items():
        if key not in known:
            raise _fail(source, f"fixed.{key}", "unknown config key (section.key of `rcl-dist config`)")
        if not isinstance(base.get(key.split(".")[0], {}), dict):
            raise _fail(source, "config", f"section {key.split('.')[0]!r} must be a mapping")
        set_key(base, key, value)
    try:
        base_cfg = Config.from_dict(base)
    except ConfigError as e:
        raise ConfigError(f"{path}: base config (config + fixed): {e}") from None
    if base_cfg.model.raw is not None:
        raise _fail(source, "fixed.model.raw", "sweeps validate by RGB denoising: model.raw must be null")
    return base_cfg


def _search_params(source: str, raw: dict[str, Any], base: dict[str, Any], known: set[str]) -> list[Param]:
    """The searched keys and their distributions; a key is either fixed or searched."""
    search = raw["search"]
    if not isinstance(search, dict) or not search:
        raise _fail(source, "search", "must be a non-empty mapping of section.key: distribution")
    params = [_parse_param(source, str(k), v, base, known) for k, v in search.items()]
    fixed = raw.get("fixed") or {}
    for p in params:
        if p.key in fixed:
            raise _fail(source, f"search.{p.key}", "is also in fixed: a key is either fixed or searched")
    return params


def _scheduler_and_alg(source: str, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The scheduler (default ASHA, grace 1, factor 2) and search algorithm (default random, seed 0) sections."""
    sched = _check_section(source, "scheduler", raw.get("scheduler", {"type": "asha"}), set().union(*SCHEDULER_KEYS.values()))
    sched.setdefault("type", "asha")
    if sched["type"] not in SCHEDULER_KEYS:
        raise _fail(source, "scheduler.type", f"must be one of {sorted(SCHEDULER_KEYS)}, got {sched['type']!r}")
    _check_section(source, "scheduler", sched, SCHEDULER_KEYS[sched["type"]])
    if sched["type"] == "asha":
        sched.setdefault("grace_period", 1)
        sched.setdefault("reduction_factor", 2)
        _positive_int(source, "scheduler.grace_period", sched["grace_period"])
        _positive_int(source, "scheduler.reduction_factor", sched["reduction_factor"], 2)

    alg = _check_section(source, "search_alg", raw.get("search_alg", {"type": "random"}), {"type", "seed"})
    alg.setdefault("type", "random")
    alg.setdefault("seed", 0)
    if alg["type"] not in SEARCH_ALG_KEYS:
        raise _fail(source, "search_alg.type", f"must be one of {sorted(SEARCH_ALG_KEYS)}, got {alg['type']!r}")
    _positive_int(source, "search_alg.seed", alg["seed"], 0)
    return sched, alg


def _resources(source: str, raw: dict[str, Any], base_cfg: Config, params: list[Param]) -> dict[str, Any]:
    """Each trial's resources with their defaults; every batch size must split evenly over the workers."""
    res = _check_section(source, "resources", raw.get("resources"), RESOURCE_KEYS)
    res = {"workers": 1, "cpus_per_worker": 1.0, "use_gpu": False, "driver_cpus": 1.0, **res}
    _positive_int(source, "resources.workers", res["workers"])
    for key in ("cpus_per_worker", "driver_cpus"):
        v = res[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "cpus_per_worker" and v == 0):
            raise _fail(source, f"resources.{key}", f"must be a number {'> 0' if key == 'cpus_per_worker' else '>= 0'}, got {v!r}")
    if not isinstance(res["use_gpu"], bool):
        raise _fail(source, "resources.use_gpu", f"must be true or false, got {res['use_gpu']!r}")
    if base_cfg.train.batch_size % res["workers"]:
        raise _fail(source, "resources.workers", f"train.batch_size {base_cfg.train.batch_size} is not divisible by {res['workers']} workers")
    for p in params:
        if p.key == "train.batch_size" and any(v % res["workers"] for v in p.values):
            raise _fail(source, "search.train.batch_size", f"every choice must be divisible by resources.workers={res['workers']}")
    return res


def _objective(source: str, raw: dict[str, Any], sched: dict[str, Any]) -> tuple[dict[str, Any], str, int, int]:
    """(proxy objective fields, metric, rounds, steps per round); ASHA's grace period must fit in the rounds."""
    from rcl_dist.train.validate import ProxyObjective

    obj_fields = {f.name for f in dataclasses.fields(ProxyObjective)} - {"manifest"}
    obj = _check_section(source, "objective", raw.get("objective"), obj_fields | OBJECTIVE_EXTRA)
    metric = obj.pop("metric", "val_psnr")
    if metric not in METRICS:
        raise _fail(source, "objective.metric", f"must be one of {list(METRICS)}, got {metric!r}")
    rounds = _positive_int(source, "objective.rounds", obj.pop("rounds", 4))
    per_round = _positive_int(source, "objective.steps_per_round", obj.pop("steps_per_round", 100))
    try:
        ProxyObjective(manifest="-", **obj)  # checks every field (errors name objective.<field>)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if sched["type"] == "asha" and sched["grace_period"] > rounds:
        raise _fail(source, "scheduler.grace_period", f"{sched['grace_period']} exceeds objective.rounds={rounds}")
    return obj, metric, rounds, per_round


def _points(source: str, raw: dict[str, Any], params: list[Param], base: dict[str, Any]) -> tuple[bool, list[dict[str, Any]]]:
    """(include_default, the points to evaluate first): each point gives every searched key, inside its domain."""
    include_default = raw.get("include_default", True)
    if not isinstance(include_default, bool):
        raise _fail(source, "include_default", f"must be true or false, got {include_default!r}")
    points = raw.get("points") or []
    if not isinstance(points, list) or not all(isinstance(pt, dict) for pt in points):
        raise _fail(source, "points", "must be a list of mappings {section.key: value}")
    by_key = {p.key: p for p in params}
    for i, pt in enumerate(points):
        missing, extra = set(by_key) - set(pt), set(pt) - set(by_key)
        if missing or extra:
            raise _fail(source, f"points[{i}]", f"must give exactly the searched keys {sorted(by_key)} (missing {sorted(missing)}, extra {sorted(extra)})")
        for k, v in pt.items():
            if not by_key[k].contains(v):
                raise _fail(source, f"points[{i}].{k}", f"{v!r} is outside the searched domain")
            _check_value(source, base, k, v, f"points[{i}].{k}")
    return include_default, list(points)


def load_space(path: str | os.PathLike, overrides: Sequence[str] = ()) -> SweepSpace:
    """Read and check a search space file; every error names the file and the key."""
    path = Path(path)
    source = str(path)
    raw = _read_space(path, overrides)
    known = _config_keys()
    base_cfg = _base_config(path, raw, known)
    base = base_cfg.to_dict()
    params = _search_params(source, raw, base, known)
    sched, alg = _scheduler_and_alg(source, raw)
    res = _resources(source, raw, base_cfg, params)
    obj, metric, rounds, per_round = _objective(source, raw, sched)
    include_default, points = _points(source, raw, params, base)
    space = SweepSpace(
        name=raw["name"], source=source, base=base, params=params, include_default=include_default, points=points,
        trials=_positive_int(source, "trials", raw.get("trials", 16)),
        concurrency=_positive_int(source, "concurrency", raw.get("concurrency", 1)),
        scheduler=sched, search_alg=alg, resources=res, objective=obj, metric=metric, rounds=rounds,
        steps_per_round=per_round, experiment=str(raw.get("experiment") or "rcl-sweep"),
    )  # fmt: skip
    by_key = {p.key: p for p in params}
    if include_default:
        for k, v in space.default_point().items():
            if not by_key[k].contains(v):
                raise _fail(
                    source, f"search.{k}",
                    f"include_default is true but the base config's value {v!r} lies outside the searched domain",
                )  # fmt: skip
    if len(space.initial_points()) > space.trials:
        raise _fail(source, "trials", f"{space.trials} is fewer than the {len(space.initial_points())} configurations to evaluate first")
    return space
