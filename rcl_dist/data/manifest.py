"""The image manifest: which files a data set is made of, and each image's own noise parameters.

A manifest is a Parquet table, one row per usable image (columns :data:`spec.MANIFEST_SCHEMA`),
written by :func:`rcl_dist.data.index.index_images` (``rcl-dist data index``). Why a manifest: the
DALI pipelines read file lists, not folders, and the paper's one-to-one mapping between images and
noise parameters (Sec. 4) needs the parameters fixed per image, not per batch. This module reads and
checks one (:func:`read_manifest`, :func:`load_manifest`, :func:`check_manifest`) for every input
pipeline. How an index is built and what it rejects: ``docs/manifest.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rcl_dist.data.spec import MANIFEST_SCHEMA

__all__ = ["read_manifest", "load_manifest", "check_manifest", "manifest_noise", "check_paths", "SPLITS", "META_KEY"]

SPLITS = ("train", "val", "test")
META_KEY = b"rcl_dist.index"  # the Parquet metadata key of the indexing settings


def manifest_noise(path: str | os.PathLike) -> str:
    """What a manifest's images are: ``"simulated"`` (clean, noise added in training) or ``"none"``
    (real noisy photographs), as ``index_images(noise=...)`` recorded it; ``"simulated"`` for a
    manifest written before the setting existed."""
    meta = pq.read_schema(path).metadata or {}
    try:
        return json.loads(meta.get(META_KEY, b"{}")).get("noise", "simulated")
    except (ValueError, AttributeError):
        return "simulated"


def read_manifest(path: str | os.PathLike, split: str | None = None) -> pa.Table:
    """Read and check a manifest; rows of one ``split`` when given.

    Checks every column of :data:`MANIFEST_SCHEMA` is there with its type, none is null, splits are
    known, and paths and image ids are unique (the one-to-one image/noise mapping). Errors name the
    file and what is wrong; extra columns are dropped.
    """
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (create it with `rcl-dist data index`)")
    try:
        table = pq.read_table(path)
    except Exception as e:  # ArrowInvalid and friends
        raise ValueError(f"{path}: not a readable Parquet manifest ({type(e).__name__}: {e})") from None
    return check_manifest(table, str(path), split)


def load_manifest(manifest: pa.Table | str | os.PathLike, split: str | None = None) -> pa.Table:
    """A manifest file (:func:`read_manifest`) or an in-memory table (:func:`check_manifest`): what every
    input pipeline (DALI, the reference DataLoader) reads, checked one way."""
    if isinstance(manifest, pa.Table):
        return check_manifest(manifest, "manifest table", split)
    return read_manifest(manifest, split)


def check_manifest(table: pa.Table, where: str = "manifest table", split: str | None = None) -> pa.Table:
    """The checks of :func:`read_manifest` on a table already in memory; errors start with ``where``."""
    path = where
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    missing = [f for f in MANIFEST_SCHEMA if f.name not in table.column_names]
    if missing:
        cols = ", ".join(f"'{f.name}' ({f.type})" for f in missing)
        raise ValueError(f"{path}: manifest lacks column(s) {cols}; re-create it with `rcl-dist data index`")
    for f in MANIFEST_SCHEMA:
        got = table.schema.field(f.name).type
        if got != f.type:
            raise ValueError(f"{path}: column '{f.name}' has type {got}, expected {f.type}")
        nulls = table.column(f.name).null_count
        if nulls:
            raise ValueError(f"{path}: column '{f.name}' has {nulls} null value(s)")
    table = table.select(MANIFEST_SCHEMA.names)
    bad = set(pc.unique(table.column("split")).to_pylist()) - set(SPLITS)
    if bad:
        raise ValueError(f"{path}: column 'split' has unknown value(s) {sorted(bad)}; expected {SPLITS}")
    for col in ("path", "image_id"):
        if pc.count_distinct(table.column(col)).as_py() != table.num_rows:
            raise ValueError(f"{path}: column '{col}' has repeated values; each image must appear once")
    if split is not None:
        table = table.filter(pc.equal(table.column("split"), split))
    return table


def check_paths(table: pa.Table) -> tuple[pa.Table, list[str]]:
    """(rows whose file exists, paths that are gone): run before building a pipeline or simulating."""
    paths = table.column("path").to_pylist()
    present = [os.path.isfile(p) for p in paths]
    missing = [p for p, ok in zip(paths, present) if not ok]
    return (table.filter(pa.array(present, type=pa.bool_())) if missing else table), missing
