"""Writing files so that a reader never sees half of one, and reading many files in parallel.

A file is written under a fresh hidden name beside its target and moved over it with ``os.replace``:
a reader (or an interrupted run) sees the old file or the new one. Used by the indexer and the
realisations of :mod:`rcl_dist.data.simulate`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["temp_name", "write_parquet_atomic", "save_npy_atomic", "ordered_map"]

T = TypeVar("T")
R = TypeVar("R")


def temp_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` (created with ``open(..., "x")``: the usual umask
    permissions, unlike ``mkstemp``'s 0600, so other users' pipeline workers can read the result)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}.tmp")


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file through a temporary file in the same folder and ``os.replace``.

    A reader (or an interrupted run) sees the old file or the new one, never a half-written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    """``np.save`` through a temporary file in the same folder and ``os.replace``."""
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise



def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map`` over a thread pool, results in input order, at most ``4 * workers`` in flight.

    Pillow's decoders and hashlib release the GIL, so threads overlap I/O and decoding. Pending work
    is cancelled when the consumer stops early (an error or Ctrl-C).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    ex = ThreadPoolExecutor(workers, thread_name_prefix="rcl-index")
    try:
        it = iter(items)
        pending = deque(ex.submit(fn, x) for x in itertools.islice(it, 4 * workers))
        while pending:
            res = pending.popleft().result()
            for x in it:
                pending.append(ex.submit(fn, x))
                break
            yield res
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
