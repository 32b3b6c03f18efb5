"""The rows of a manifest from validated file records (:mod:`rcl_dist.data.index`): per-image values
drawn from (base seed, content hash) and duplicates resolved by path order.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from rcl_dist.data.manifest import META_KEY
from rcl_dist.data.spec import MANIFEST_SCHEMA, derived_seed

__all__ = ["Derived", "FILE_FIELDS", "assemble", "with_metadata", "DUPLICATE"]

DUPLICATE = "duplicate"  # the rejection category of a file whose content is already in the manifest


class Derived:
    """Per-image values that are pure functions of (base seed, sha256): split draw, NLF, noise seed."""

    def __init__(self, seed: int, sampler: str, options: dict[str, float], val_fraction: float, test_fraction: float):
        self.seed, self.sampler, self.options = seed, sampler, options
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._cache: dict[str, tuple[float, float, float, int]] = {}

    def __call__(self, sha: str) -> tuple[float, float, float, int]:
        """(u in [0, 1) for the split, shot, read, noise_seed)."""
        got = self._cache.get(sha)
        if got is None:
            import torch

            from rcl_dist.noise import sample_nlf

            u = derived_seed(self.seed, sha, "split") / float(1 << 63)
            gen = torch.Generator().manual_seed(derived_seed(self.seed, sha, "nlf"))
            p = sample_nlf(self.sampler, 1, generator=gen, **self.options)
            got = (u, float(p.shot[0]), float(p.read[0]), derived_seed(self.seed, sha, "noise"))
            self._cache[sha] = got
        return got

    def split(self, u: float, fixed: str | None) -> str:
        if fixed is not None:
            return fixed
        if u < self.val_fraction:
            return "val"
        if u < self.val_fraction + self.test_fraction:
            return "test"
        return "train"


FILE_FIELDS = ("sha256", "width", "height", "channels", "bit_depth", "mode")


def assemble(
    records: dict[str, tuple[dict[str, Any], str | None, int, int]], derived: Derived
) -> tuple[pa.Table, dict[str, str]]:
    """Manifest table (sorted by path, duplicates resolved) from path -> (file fields, split, size, mtime)."""
    cols: dict[str, list[Any]] = {f.name: [] for f in MANIFEST_SCHEMA}
    kept_sha: dict[str, str] = {}
    kept_id: dict[str, str] = {}
    dups: dict[str, str] = {}
    for path in sorted(records):
        rec, fixed, size, mtime = records[path]
        sha = rec["sha256"]
        if sha in kept_sha:
            dups[path] = (
                f"{DUPLICATE}: duplicate of {kept_sha[sha]} "
                f"(same sha256 {sha[:16]}; the first path in sorted order is kept)"
            )
            continue
        image_id = sha[:16]
        if image_id in kept_id:  # a 64-bit prefix collision: never seen, but the id must stay unique
            dups[path] = f"{DUPLICATE}: image_id {image_id} already used by {kept_id[image_id]} (sha256 prefix collision)"
            continue
        kept_sha[sha], kept_id[image_id] = path, path
        u, shot, read, noise_seed = derived(sha)
        row = {
            **{k: rec[k] for k in FILE_FIELDS},
            "path": path,
            "image_id": image_id,
            "split": derived.split(u, fixed),
            "shot": shot,
            "read": read,
            "noise_seed": noise_seed,
            "size_bytes": size,
            "mtime_ns": mtime,
        }
        for k, v in row.items():
            cols[k].append(v)
    return pa.Table.from_pydict(cols, schema=MANIFEST_SCHEMA), dups


def with_metadata(table: pa.Table, settings: dict[str, Any]) -> pa.Table:
    """``table`` with the index settings in its schema metadata (what the manifest was built with)."""
    return table.replace_schema_metadata({META_KEY: json.dumps(settings, sort_keys=True).encode()})
