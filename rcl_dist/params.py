"""A configuration as MLflow params and tags: flat ``section.key`` strings within MLflow's limits.

MLflow params are flat, immutable strings with length and character limits; a whole batch is
rejected when one value breaks them, so values are cut here (with a marker; the full config is the
run's ``config.yaml`` artifact) and odd keys are cleaned before anything reaches the server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["flatten_params", "plain", "tag_value", "MAX_PARAM_VAL_LENGTH", "MAX_TAG_VAL_LENGTH", "MAX_KEY_LENGTH"]

# MLflow's limits (mlflow.utils.validation in 3.x), repeated so that values can be cut on this side
# instead of having a whole batch rejected by the server.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250

_TRUNCATION_MARK = "...[truncated; full value in config.yaml]"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def plain(value: Any) -> Any:
    """A YAML/JSON-safe copy: dataclasses and objects with ``to_dict`` become dicts, paths strings,
    tuples lists, numpy/torch scalars Python numbers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif hasattr(value, "to_dict") and callable(value.to_dict) and not isinstance(value, Mapping):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalar
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _param_key(key: str) -> str:
    key = _BAD_KEY_CHARS.sub("_", key)
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = f"{key[: MAX_KEY_LENGTH - 9]}~{digest}"
    return key


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, sort_keys=False, default=str)
    else:
        text = str(value)  # None -> "None", True -> "True", 0.001 -> "0.001"
    if len(text) > MAX_PARAM_VAL_LENGTH:
        text = text[: MAX_PARAM_VAL_LENGTH - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK
    return text


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.001}}`` -> ``{"train.lr": "0.001"}``: MLflow params are flat strings.

    Nested mappings (and dataclasses) are joined with ``.``; lists become JSON; ``None`` becomes
    ``"None"``; an empty mapping is kept as ``"{}"``. Values longer than MLflow's 6000 characters are
    cut with a marker (the untruncated config is the ``config.yaml`` artifact); characters MLflow
    rejects in keys become ``_`` and keys longer than 250 characters are shortened with a hash.
    """
    out: dict[str, str] = {}
    config = plain(config)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a mapping (or a dataclass), got {type(config).__name__}")
    for key, value in config.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, full))
        else:
            out[_param_key(full)] = _param_value(value)
    return out


def tag_value(value: Any) -> str:
    """A tag value as a string, cut to MLflow's 8000 characters."""
    text = str(value)
    return text if len(text) <= MAX_TAG_VAL_LENGTH else text[: MAX_TAG_VAL_LENGTH - 3] + "..."
