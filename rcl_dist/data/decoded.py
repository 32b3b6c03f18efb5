"""Small data sets decoded once and kept in memory, for the CPU pipelines of :mod:`rcl_dist.data.dali`.

On a CPU, decoding is the input stage's own limit: even decoding only the parent crop of a pre-training
pair (ROI decoding) costs ~0.5-1 ms per sample per core, while copying that crop out of an image already
decoded costs microseconds (``benchmarks/results/data_throughput.md``). A data set whose decoded pixels
fit a budget (CBSD432: 432 x 481 x 321 x 3 bytes = 200 MB) is therefore decoded once, when the loader is
built, by DALI's own decoder (the same pixels the graph would decode), and written as raw HWC pixel
files into a private folder on a RAM-backed file system (``/dev/shm`` where there is one): DALI's file
reader then reads pixels instead of JPEG bytes, with its usual sharding, shuffling and epochs, and the
graph reshapes each sample with the image's size looked up by its label. The folder is removed when
the pipeline is garbage-collected (and at exit); one left behind by a process that was killed (its
pid is in the name) is removed by the next process that decodes into memory.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DecodedImages", "decode_into_memory", "keep_until_collected", "remove_orphans", "fits", "memory_folder", "DEFAULT_BUDGET"]

# Decoded bytes a loader may keep without being asked (per loader: every rank keeps its own copy,
# since DALI's reader moves to another shard each epoch).
DEFAULT_BUDGET = 1 << 30
_PREFIX = "rcl_dist-decoded-"  # then the creating process's pid, "-", a random suffix


@dataclass
class DecodedImages:
    """Raw uint8 HWC pixel files, one per label, and each image's height and width (channels: ``channels``)."""

    folder: Path
    files: list[str]
    heights: np.ndarray
    widths: np.ndarray
    channels: int

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def memory_folder() -> Path:
    """Where decoded pixels go: ``/dev/shm`` (RAM) when it exists and is writable, else the temp folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def fits(nbytes: int, budget: int, folder: Path | None = None) -> bool:
    """Whether ``nbytes`` of pixels fit the budget and a quarter of the free space where they would go."""
    folder = folder or memory_folder()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return False
    return nbytes <= budget and nbytes <= free // 4


def decode_into_memory(paths: list[str], gray: bool, num_threads: int = 2) -> DecodedImages:
    """Decode every file of ``paths`` (uint8, RGB or GRAY as ``gray``) with DALI's CPU decoder and
    write its pixels to ``<memory_folder>/rcl_dist-decoded-*/<label>.u8``; label = position in ``paths``."""
    from nvidia.dali import fn, pipeline_def, types

    n = len(paths)
    batch = min(32, n)

    @pipeline_def(batch_size=batch, num_threads=max(1, num_threads), device_id=None, prefetch_queue_depth=1)
    def decode_all():
        enc, label = fn.readers.file(files=paths, labels=list(range(n)), random_shuffle=False, pad_last_batch=True,
                                     name="Reader")  # fmt: skip
        return fn.decoders.image(enc, device="cpu", output_type=types.GRAY if gray else types.RGB), label

    remove_orphans()
    folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=memory_folder()))
    try:
        pipe = decode_all()
        pipe.build()
        files = [str(folder / f"{i}.u8") for i in range(n)]
        heights, widths = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        done = np.zeros(n, dtype=bool)
        while not done.all():
            images, labels = pipe.run()
            for j in range(len(labels)):
                i = int(np.asarray(labels.at(j)).reshape(-1)[0])
                if done[i]:
                    continue  # the padding of the last batch
                arr = np.asarray(images.at(j))
                heights[i], widths[i] = arr.shape[:2]
                arr.tofile(files[i])
                done[i] = True
        del pipe
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    decoded = DecodedImages(folder, files, heights, widths, 1 if gray else 3)
    atexit.register(decoded.remove)  # weakref.finalize (see keep_until_collected) covers the usual case
    return decoded


def remove_orphans(folder: Path | None = None) -> list[Path]:
    """Remove the decoded copies whose process is gone (killed before its finalizer ran); returns them."""
    removed = []
    for d in (folder or memory_folder()).glob(f"{_PREFIX}*-*"):
        pid = d.name[len(_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def keep_until_collected(owner: object, decoded: DecodedImages) -> None:
    """Remove ``decoded``'s folder when ``owner`` (the pipeline that reads it) is garbage-collected."""
    weakref.finalize(owner, decoded.remove)
